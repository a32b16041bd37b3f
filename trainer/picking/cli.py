"""``python -m trainer pick RUN``: the sweep of a finished run on demand, with a progress bar; prints the pick
and why. Scales, seeds and the CLIP model default to the run's own ``--pick_*`` options."""
from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer pick", description=(
        "Sweep a finished run's kept checkpoints x LoRA scales x prompts, score each image with CLIP and "
        "recommend a checkpoint and scale (writes RUN/pick.json and RUN/pick/grid.png)."))
    p.add_argument("run", metavar="RUN", help="The run folder training wrote (its --output_dir).")
    p.add_argument("--scales", help="LoRA scales, comma list (default: the run's --pick_scales, 0.6,0.8,1.0,1.2).")
    p.add_argument("--seeds", type=int, help="Fixed seeds 0..N-1 per prompt (default: the run's --pick_seeds, 2).")
    p.add_argument("--clip_model", help="CLIP model id or folder (default openai/clip-vit-large-patch14; "
                                        "tiny-clip for the tiny models).")
    p.add_argument("--prompts", help="Prompts separated by '|' (default: the instance prompt, 'TOK on a beach', "
                                     "'a painting of TOK').")
    p.add_argument("--steps", type=int, help="Denoising steps (default: the run's --validation_inference_steps).")
    p.add_argument("--size", type=int, help="Image side in pixels (default: the run's resolution).")
    return p


def main(argv: list[str]) -> int:
    from ..config import ConfigError
    from ..config.rules import field_errors
    from ..events import Picked, Status
    from ..progress import CliProgress
    from .record import PickError
    from .scorer import ScorerError
    from .sweep import SweepSettings, read_run_config, run_sweep

    args = build_parser().parse_args(argv)
    try:
        if not os.path.isdir(args.run):
            raise PickError(f"run folder {args.run} does not exist")
        cfg = read_run_config(args.run)
        overrides = {k: v for k, v in {"pick_scales": args.scales, "pick_seeds": args.seeds,
                                       "pick_clip_model": args.clip_model}.items() if v is not None}
        cfg = cfg.replace(**overrides)
        # only the sweep's own options: the rest describes a finished run (its data folder may be elsewhere now)
        bad = [e for e in field_errors(cfg) if e.name in ("pick_scales", "pick_seeds", "pick_clip_model")]
        if bad:
            raise ConfigError(bad)
        for name, v in (("--steps", args.steps), ("--size", args.size)):
            if v is not None and (v < 1 or (name == "--size" and v % 8)):
                raise PickError(f"{name} {v}: must be a positive whole number" + (" and a multiple of 8" if
                                                                                   name == "--size" else ""))
        prompts = tuple(p.strip() for p in args.prompts.split("|") if p.strip()) if args.prompts else None
        settings = SweepSettings(scales=cfg.pick_scale_values, seeds=tuple(range(cfg.pick_seeds)), prompts=prompts,
                                 steps=args.steps, size=args.size, clip_model=cfg.pick_clip_model)
    except (PickError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    progress = CliProgress()
    try:
        record = run_sweep(args.run, settings, on_progress=lambda d, t, w: progress(
            Status(phase="pick", message=f"sweep {d}/{t}: {w}", current=d, total=t)))
    except (PickError, ScorerError) as exc:
        progress.close()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pick = record["pick"]
    progress(Picked(checkpoint=pick["checkpoint"], scale=pick["scale"], why=record["why"],
                    path=os.path.join(os.path.abspath(args.run), "pick.json")))
    print(f"rule: {record['rule_text']}")
    print(f"grid: {os.path.join(os.path.abspath(args.run), record['grid'])}")
    return 0
