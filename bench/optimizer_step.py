"""Time one Prodigy step on the LoRA parameter shapes of a model: prodigyopt's vs ours (trainer/prodigy.py), and
count the values each reads back from the device per step (a sync each on a GPU).

    HF_HUB_OFFLINE=1 python bench/optimizer_step.py --model real-sdxl --rank 32 --steps 5 --rounds 2

The shapes come from the model's UNet config with the benchmark's LoRA targets (``train_speed.lora_unet``, on
the meta device: no weights are loaded); the parameters and gradients are random, on CUDA when available.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def lora_shapes(path: str, rank: int) -> list:
    from train_speed import lora_unet  # noqa: E402  (bench/ is on sys.path when run as a script)

    return [tuple(p.shape) for n, p in lora_unet(path, rank).named_parameters() if "lora_" in n]


class HostReads:
    """Counts Tensor.item / Tensor.tolist calls while active."""

    def __enter__(self):
        import torch

        self.n, self._saved = 0, {}
        for name in ("item", "tolist"):
            orig = self._saved[name] = getattr(torch.Tensor, name)

            def wrapped(t, *a, _orig=orig, **k):
                self.n += 1
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapped)
        return self

    def __exit__(self, *exc):
        import torch

        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)


def time_steps(cls, shapes, steps: int, device: str) -> tuple[float, int]:
    """(seconds per step after one warm-up step, host reads in one step)."""
    import torch

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.01).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    opt = cls(params, lr=1.0, betas=(0.9, 0.99), weight_decay=0.01)
    opt.step()
    with HostReads() as reads:
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, reads.n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="real-sdxl", help="real-sdxl | real-sd15 | tiny-sdxl | PATH")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two optimizers")
    args = p.parse_args(argv)

    import contextlib
    import io

    import torch
    from prodigyopt import Prodigy

    from trainer.training.prodigy import SyncFreeProdigy
    from train_speed import model_path  # noqa: E402  (bench/ is on sys.path when run as a script)

    path = model_path(args.model)
    shapes = lora_shapes(path, args.rank)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    print(f"# {args.model} rank {args.rank}: {len(shapes)} LoRA tensors, {numel / 1e6:.1f} M parameters, on {device}")
    for r in range(args.rounds):
        for cls in (Prodigy, SyncFreeProdigy):
            with contextlib.redirect_stdout(io.StringIO()):  # prodigyopt prints a line per construction
                s, reads = time_steps(cls, shapes, args.steps, device)
            print(f"round {r + 1}: {cls.__module__}.{cls.__name__}: {s * 1000:.1f} ms/step, "
                  f"{reads} host reads/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
