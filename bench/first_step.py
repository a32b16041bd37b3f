"""Start to first step with ``--auto_fit``: this checkout against another one (e.g. the commit before issue 16).

    HF_HUB_OFFLINE=1 python bench/first_step.py --model tiny-sdxl --before /tmp/base-checkout --rounds 2
    HF_HUB_OFFLINE=1 python bench/first_step.py --model real-sdxl --resolution 64 --mixed_precision bf16 \
        --before /tmp/base-checkout --rounds 1

Each measurement is a fresh process that imports the trainer from its checkout, writes a fresh random dataset
(so the latent cache starts cold), calls ``train()`` with ``--auto_fit`` and exits at the first ``Step`` event. It
reports the seconds from the ``train()`` call to that event, the ``from_pretrained`` calls per component, the
VAE encodes and the peak RSS; the "after, warm" row is a second run on the same dataset (latents read from the
on-disk cache). Checkouts alternate, round by round; the ratio is before / after (median over rounds).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args) -> None:
    """One measured run in this process (the checkout ``--root`` first on the path); prints one JSON line."""
    sys.path.insert(0, args.root)
    import resource

    try:  # on a shared machine, if memory runs out this run is the one the kernel ends, not a neighbour's
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass

    import numpy as np
    import torch
    from PIL import Image

    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    loads: dict = {}
    for cls in (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection):
        orig = cls.from_pretrained.__func__

        def counted(klass, *a, _orig=orig, **kw):
            k = f"{klass.__name__}/{kw.get('subfolder') or ''}"
            loads[k] = loads.get(k, 0) + 1
            return _orig(klass, *a, **kw)

        cls.from_pretrained = classmethod(counted)
    encodes = [0]
    enc = AutoencoderKL.encode

    def counted_encode(self, x, *a, **kw):
        encodes[0] += x.shape[0]
        return enc(self, x, *a, **kw)

    AutoencoderKL.encode = counted_encode
    if not os.path.isdir(args.data):
        os.makedirs(args.data)
        rng = np.random.default_rng(0)
        for i in range(args.images):
            w, h = [(args.resolution * 3 // 2, args.resolution), (args.resolution, args.resolution * 3 // 2),
                    (args.resolution, args.resolution)][i % 3]
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(f"{args.data}/img{i}.png")
            with open(f"{args.data}/img{i}.txt", "w") as f:
                f.write(f"a photo of TOK, picture {i}")
    model = args.model
    if model.startswith("real-"):
        from bench.realarch import real_model_path

        model = real_model_path(model, build=False)
    from trainer import TrainConfig, train

    kw = dict(pretrained_model_name_or_path=model, instance_data_dir=args.data, output_dir=args.out,
              resolution=args.resolution, auto_fit=True, max_train_steps=args.steps, train_text_encoder_ti=True,
              train_text_encoder_ti_frac=0.5, rank=args.rank, seed=0)
    if args.mixed_precision:
        kw["mixed_precision"] = args.mixed_precision
    cfg = TrainConfig.from_sources(**kw)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0, cpu0 = time.time(), ru0.ru_utime + ru0.ru_stime
    phases: dict = {}

    def on_event(ev):
        if ev.type == "first_step":
            phases.update(ev.phases)
        # exit right after step 1: at the FirstStep event that follows it, or (older checkouts) at its Step event
        if ev.type == "first_step" or (ev.type == "step" and args.no_phases_ok):
            ru = resource.getrusage(resource.RUSAGE_SELF)
            print(json.dumps({"seconds": time.time() - t0, "cpu_seconds": ru.ru_utime + ru.ru_stime - cpu0,
                              "loads": loads, "vae_images": encodes[0],
                              "phases": phases,
                              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)
            os._exit(0)

    train(cfg, on_event=on_event)


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def wait_for_memory(min_gib: float, max_wait_s: float = 1800) -> float:
    """Waits (polling every 10 s, up to ``max_wait_s``) until ``min_gib`` GiB are available; returns what is
    available then, in GiB. On a shared machine a run of the real model started short of memory would be killed,
    or would make the preflight choose other settings than the run it is compared with."""
    t0 = time.time()
    while min_gib and mem_available() < min_gib * 2**30:
        if time.time() - t0 > max_wait_s:
            raise SystemExit(f"only {mem_available() / 2**30:.1f} GiB available after {max_wait_s:.0f} s of "
                             f"waiting (need {min_gib} GiB): not measured")
        time.sleep(10)
    return mem_available() / 2**30


def run_child(root: str, data: str, args, out: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--root", root, "--data", data, "--out", out,
           "--model", args.model, "--resolution", str(args.resolution), "--images", str(args.images),
           "--steps", str(args.steps), "--rank", str(args.rank), "--threads", str(args.threads)]
    if args.mixed_precision:
        cmd += ["--mixed_precision", args.mixed_precision]
    if root != ROOT:
        cmd += ["--no_phases_ok"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=root)
    available = wait_for_memory(args.min_available_gib)
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"run in {root} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result.update(available_gib_before=round(available, 1), load_before=round(load, 2),
                  load_after=round(os.getloadavg()[0], 2))
    print(f"# run in {root}: {result['seconds']:.1f} s wall, {result['cpu_seconds']:.1f} s CPU, "
          f"{available:.1f} GiB available before, load {load:.2f} -> {result['load_after']:.2f}", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sdxl")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--mixed_precision", default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1: CPU seconds stay "
                   "comparable on a shared machine; 0: torch's default)")
    p.add_argument("--min-available-gib", type=float, default=0, help="before each run, wait until this much "
                   "memory is available (the real SDXL in bf16 needs ~16 GiB for the run that loads it twice)")
    p.add_argument("--before", help="root of the other checkout (without it only this checkout is measured)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", help="write the runs and the ratio here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no_phases_ok", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 1  # train() returned without a first step
    work = tempfile.mkdtemp(prefix="first-step-")
    runs: dict[str, list] = {"before": [], "after": [], "after, warm": []}
    try:
        for r in range(args.rounds):
            order = [("before", args.before), ("after", ROOT)] if args.before else [("after", ROOT)]
            if r % 2:
                order.reverse()
            for label, root in order:
                data = os.path.join(work, f"data-{label}-{r}")
                runs[label].append(run_child(root, data, args, os.path.join(work, f"out-{label}-{r}")))
                if label == "after":
                    runs["after, warm"].append(run_child(root, data, args, os.path.join(work, f"warm-{r}")))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| checkout | model | res | start to first step: wall s (each) | CPU s | from_pretrained per component "
          "| VAE images | peak RSS | phases (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, rs in runs.items():
        if not rs:
            continue
        med = statistics.median(x["seconds"] for x in rs)
        cpu = statistics.median(x["cpu_seconds"] for x in rs)
        ph = rs[-1]["phases"]
        each = ", ".join(f"{x['seconds']:.1f}" for x in rs)
        print(f"| {label} | {args.model} | {args.resolution} | {med:.1f} ({each}) | {cpu:.1f} "
              f"| {json.dumps(rs[-1]['loads'])} | {rs[-1]['vae_images']} | {rs[-1]['peak_rss'] / 2**30:.2f} GiB "
              f"| {', '.join(f'{k} {v:.1f}' for k, v in ph.items()) or 'n/a'} |")
    ratios = {}
    if runs["before"]:
        b = statistics.median(x["seconds"] for x in runs["before"])
        bc = statistics.median(x["cpu_seconds"] for x in runs["before"])
        for label in ("after", "after, warm"):
            ratios[f"wall before/{label}"] = b / statistics.median(x["seconds"] for x in runs[label])
            ratios[f"CPU before/{label}"] = bc / statistics.median(x["cpu_seconds"] for x in runs[label])
        for k, v in ratios.items():
            print(f"ratio start-to-first-step {k}: {v:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "ratios": ratios, "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
