"""Command line: ``python -m trainer --pretrained_model_name_or_path ... --instance_data_dir ...``.

Flags are generated from ``TrainConfig`` fields, so they are exactly diffusers' advanced-script names. Booleans
accept ``--flag`` (true), ``--flag true|false|1|0|yes|no``. Flags of the advanced script that make no sense here
are accepted with a one-line note; an unknown flag is an error that suggests the nearest known one.
"""
from __future__ import annotations

import argparse
import difflib
import sys
import threading
from dataclasses import fields
from enum import Enum

from .cli_help import COMPAT_TITLE, EXAMPLES, StudioParser, field_help, make_groups, quiet_libraries
from .config import ConfigError, FieldError, TrainConfig, field_type, available_presets
from .config.run_folder import output_dir_problem

# Flags of diffusers' script accepted for compatibility, with why they change nothing here.
IGNORED_FLAGS = {
    "enable_xformers_memory_efficient_attention": "PyTorch SDPA attention is always used",
    "local_rank": "the process rank comes from accelerate/torchrun",
    "set_grads_to_none": "gradients are always set to None",
    "validation_epochs": "use --validation_steps (samples are rendered every N steps)",
    "class_labels_conditioning": "not used by SD/SDXL UNets",
    "with_tracking": "use --report_to",
    "dataloader_num_workers": "images are decoded once and their latents cached; no loader workers are used",
    "prior_generation_precision": "class images are generated in the training precision (--mixed_precision)",
    "clip_skip": "not implemented: SDXL always reads the penultimate layer of both text encoders (diffusers' "
                 "default, A1111's 'Clip skip 2'), SD 1.x/2.x the last layer, in training, samples and Generate",
}
IGNORED_BOOL = {"enable_xformers_memory_efficient_attention", "set_grads_to_none"}


def build_parser() -> argparse.ArgumentParser:
    p = StudioParser(
        prog="python -m trainer", allow_abbrev=False, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="python -m trainer [--preset NAME] [--config FILE] --instance_data_dir DIR [options]",
        description="DreamBooth LoRA with pivotal tuning for SDXL / SD 1.x / SD 2.x.")
    groups = make_groups(p)
    p.add_argument("--preset", choices=available_presets(), help="Fill defaults from presets/<name>.yaml "
                   "(explicit flags win).")
    p.add_argument("--config", help="YAML or JSON file of option: value (flags win).")
    groups["data"].add_argument("--random_crop", nargs="?", const="true", default=None, metavar="BOOL",
                   help="Random crops (the opposite of --center_crop).")
    for f in fields(TrainConfig):
        if not f.metadata.get("cli", True) or f.name == "preset":
            continue
        t, _ = field_type(f.name)
        kw = {"dest": f.name, "default": None, "help": field_help(f)}
        if t is bool:
            kw.update(nargs="?", const="true", metavar="BOOL")
        elif isinstance(t, type) and issubclass(t, Enum):
            kw.update(metavar="{" + ",".join(m.value for m in t) + "}")
        elif not f.metadata.get("choices"):
            kw.update(metavar={int: "N", float: "X"}.get(t, "TEXT"))
        groups.get(f.metadata.get("group", "general"), groups["general"]).add_argument(f"--{f.name}", **kw)
    compat = p.add_argument_group(COMPAT_TITLE)
    for name, why in IGNORED_FLAGS.items():
        kw = {"dest": f"_ignored_{name}", "default": None, "help": f"no effect: {why}"}
        if name in IGNORED_BOOL:
            kw.update(nargs="?", const="true", metavar="BOOL")
        compat.add_argument(f"--{name}", **kw)
    return p


def _known_flags(parser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def parse_config(argv: list[str]) -> tuple[TrainConfig, list[str]]:
    """(config, notes). Raises ConfigError (bad values) or SystemExit (unknown flags)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        msgs, after_flag = [], False
        for u in unknown:
            if u.startswith("--"):
                flag = u.split("=", 1)[0]
                close = difflib.get_close_matches(flag, _known_flags(parser), n=1, cutoff=0.6)
                msgs.append(f"unknown flag {flag}" + (f"; did you mean {close[0]}?" if close else ""))
                after_flag = "=" not in u
            elif after_flag:  # the value of the unknown flag just named
                after_flag = False
            else:
                msgs.append(f"unexpected argument {u!r}")
        parser.error("; ".join(msgs))
    notes = []
    overrides = {}
    for k, v in vars(args).items():
        if v is None or k in ("preset", "config", "random_crop"):
            continue
        if k.startswith("_ignored_"):
            name = k[len("_ignored_"):]
            notes.append(f"note: --{name} is accepted for compatibility and has no effect ({IGNORED_FLAGS[name]})")
            continue
        overrides[k] = v
    if args.random_crop is not None:
        from .config import parse_bool

        try:
            overrides["center_crop"] = not parse_bool(args.random_crop)
        except ValueError as exc:
            raise ConfigError([FieldError("random_crop", args.random_crop, str(exc))])
    cfg = TrainConfig.from_sources(preset=args.preset, config_file=args.config, **overrides)
    return cfg, notes


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_libraries()
    try:
        cfg, notes = parse_config(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from . import distributed

    main_rank = distributed.is_main()  # under torchrun / accelerate launch only rank 0 prints notes and the bar
    # rank 0 alone checks (the others would see the folder rank 0 just made); its exit ends the launch
    busy = output_dir_problem(cfg) if main_rank else None  # the command line never writes a new run over another
    if busy:
        print(f"error: {busy}", file=sys.stderr)
        return 2
    for n in (notes + cfg.warnings()) if main_rank else []:
        print(n, file=sys.stderr)
    from .api import train
    from .training.errors import TrainingError
    from .progress import CliProgress

    stop = threading.Event()
    progress = CliProgress()
    try:
        result = train(cfg, on_event=progress, stop=stop)
    except KeyboardInterrupt:
        progress.close()
        print("interrupted: the last checkpoint is kept; resume with --resume_from_checkpoint latest",
              file=sys.stderr)
        return 130
    except TrainingError as exc:
        progress.close()
        if not progress.failed:
            print(f"error: {exc}", file=sys.stderr)
        if exc.advice:
            print(f"advice: {exc.advice}", file=sys.stderr)
        return 1
    except Exception as exc:  # model loading, dataset problems...: the message says what to do, no traceback
        progress.close()
        if not progress.failed:  # the `failed` event already printed it
            print(f"error: {exc}", file=sys.stderr)
        return 1
    progress.close()
    if not main_rank:
        return 0
    print(f"done: {result.step}/{result.total_steps} steps; run folder {result.run_dir}")
    for k, v in result.artifacts.items():
        print(f"  {k}: {v}")
    if result.pick_error:  # --pick_best: the run is trained, but no recommendation was made
        print(f"error: --pick_best: {result.pick_error}", file=sys.stderr)
        return 1
    return 0
