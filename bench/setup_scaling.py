"""Setup time and peak memory as the dataset grows (tiny-sdxl): the run's setup (load, read + checks, latents)
for N images, cold (empty latent cache) and warm (a second run on the same images), each N in a fresh process.

    HF_HUB_OFFLINE=1 python bench/setup_scaling.py --images 30,150,600 --json /tmp/scaling.json

Prints one table (setup seconds cold / warm, seconds per image, VAE encodes, peak RSS), then the linearity (the
cold per-image time of the largest N over that of the smallest) and the RSS check: the peak RSS of the largest N
may exceed that of the smallest by at most ``--rss-bound-mib`` (default 64 MiB), i.e. nothing per image is kept
in RAM beyond a few bytes of facts and a cache key.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vmhwm() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def child(n: int, data: str, resolution: int) -> dict:
    sys.path.insert(0, ROOT)
    import gc

    import numpy as np
    import torch
    from PIL import Image

    torch.set_flush_denormal(True)
    rng = np.random.default_rng(0)
    os.makedirs(data, exist_ok=True)
    shapes = [(resolution * 5 // 4, resolution), (resolution, resolution * 5 // 4), (resolution, resolution)]
    for i in range(n):
        w, h = shapes[i % 3]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(f"{data}/img{i:04d}.png")
        with open(f"{data}/img{i:04d}.txt", "w") as f:
            f.write(f"a photo of TOK, picture {i}")
    from trainer import TrainConfig
    from trainer.training.trainer import Trainer

    out = {"images": n}
    for label in ("cold", "warm"):
        cfg = TrainConfig.from_sources(pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=data,
                                       output_dir=os.path.join(data + "-runs", label), resolution=resolution,
                                       random_flip=True, max_train_steps=10, seed=0)
        t = Trainer(cfg).open()
        t0 = time.time()
        t.setup()
        out[f"{label}_s"] = time.time() - t0
        out[f"{label}_encodes"] = t.inputs.store.encodes
        out[f"{label}_phases"] = {k: round(v, 3) for k, v in t.inputs.seconds.items()}
        out[f"{label}_peak_rss"] = _vmhwm()
        del t
        gc.collect()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="30,150,600", help="comma-separated dataset sizes")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--rss-bound-mib", type=float, default=64.0)
    p.add_argument("--json")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.data, args.resolution)), flush=True)
        return 0
    work = tempfile.mkdtemp(prefix="setup-scaling-")
    rows = []
    try:
        for n in [int(x) for x in args.images.split(",")]:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", str(n), "--data",
                   os.path.join(work, f"data{n}"), "--resolution", str(args.resolution)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                  env=dict(os.environ, HF_HUB_OFFLINE="1"))
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                raise SystemExit(f"setup of {n} images failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(lines[-1]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| images | setup cold (s) | s/image cold | setup warm (s) | VAE images cold / warm | peak RSS cold "
          "| phases cold |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ph = ", ".join(f"{k} {v:.1f}" for k, v in r["cold_phases"].items())
        print(f"| {r['images']} | {r['cold_s']:.1f} | {r['cold_s'] / r['images']:.3f} | {r['warm_s']:.1f} "
              f"| {r['cold_encodes']} / {r['warm_encodes']} | {r['cold_peak_rss'] / 2**20:.0f} MiB | {ph} |")
    small, big = rows[0], rows[-1]
    per = lambda r: (r["cold_s"] - r["cold_phases"]["load"]) / r["images"]  # noqa: E731 - the per-image part
    linearity = per(big) / per(small)
    growth = (big["cold_peak_rss"] - small["cold_peak_rss"]) / 2**20
    flat = growth <= args.rss_bound_mib
    print(f"linearity: per-image setup time (load left out) at {big['images']} / at {small['images']} images = "
          f"{linearity:.2f} (1.0 = linear)")
    print(f"peak RSS growth from {small['images']} to {big['images']} images: {growth:.1f} MiB "
          f"(bound {args.rss_bound_mib:.0f} MiB): {'flat' if flat else 'NOT flat'}")
    print(f"warm runs: {sum(r['warm_encodes'] for r in rows)} VAE encodes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "linearity": linearity, "rss_growth_mib": growth, "flat": flat}, f, indent=1)
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
