"""The checks bench/gpu_table.py makes besides timing: what a run's events say (the text encoders leaving after
the pivot, a loss scale), what ``torch.compile`` did (graphs, graph breaks, the guard behind each recompile),
this GPU's measured bf16 matrix rate, and the versions in use."""
from __future__ import annotations

import contextlib
import functools
import logging
import platform
import statistics


class Events:
    """What a run's events say about the paths: the text encoders leaving after the pivot, and any loss-scale
    value the trainer reports (a field or a message naming it)."""

    STEP_FIELDS = {"type", "time", "step", "total", "loss", "lr", "d_lr", "s_per_it", "eta_s", "epoch",
                   "text_trainable"}

    def __init__(self):
        self.offloaded_at, self.loss_scale, self.step = None, None, 0

    def __call__(self, ev) -> None:
        kind = getattr(ev, "type", "")
        if kind == "step":
            self.step = ev.step
            for k, v in vars(ev).items():
                if k not in self.STEP_FIELDS and "scale" in k.lower() and v is not None:
                    self.loss_scale = f"{k}={v} (step {ev.step})"
        elif kind == "status":
            if ev.phase == "cache_text" and "off the GPU" in ev.message:
                self.offloaded_at = self.step
            if "scale" in ev.message.lower() and self.loss_scale is None:
                self.loss_scale = f"status {ev.phase}: {ev.message[:120]}"
        elif kind == "started":
            for note in getattr(ev, "notes", []):
                if "scale" in note.lower() and "loss" in note.lower():
                    self.loss_scale = f"note: {note[:120]}"


@contextlib.contextmanager
def compile_backend(name: str):
    """``torch.compile`` with ``backend=name`` while the block runs (the trainer calls plain torch.compile);
    yields a dict that gets dynamo's graph and graph-break counts at the end. The CPU dry run uses "eager":
    dynamo traces the UNet (graph breaks, recompiles) without inductor's C++ build, which took 410 s for the
    tiny UNet on a busy 2-core machine."""
    import torch

    from torch._dynamo.utils import counters

    counters.clear()
    stats: dict = {"recompiles": []}
    handler = _Recompiles(stats["recompiles"])
    dynamo_log = logging.getLogger("torch._dynamo")
    dynamo_log.addHandler(handler)
    torch._logging.set_logs(recompiles=True)
    original = torch.compile
    if name != "inductor":
        torch.compile = functools.partial(original, backend=name)
    try:
        yield stats
    finally:
        torch.compile = original
        torch._logging.set_logs()
        dynamo_log.removeHandler(handler)
        stats["graphs"] = counters["stats"]["unique_graphs"]
        stats["graph_breaks"] = sum(counters["graph_break"].values())


class _Recompiles(logging.Handler):
    """Collects the guard failure that dynamo names for each recompilation (its ``recompiles`` log)."""

    def __init__(self, into: list):
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record) -> None:
        text = record.getMessage()
        if "guard failure" in text:
            reasons = [ln.strip(" -") for ln in text.splitlines() if ln.strip().startswith("- ")]
            self.into.append("; ".join(reasons)[:200] or text.splitlines()[-1][:200])


def measured_matmul_flops(n: int = 8192, reps: int = 20) -> float:
    """This GPU's bf16 matrix-product rate now (median of ``reps`` n x n x n products on random data, timed with
    CUDA events): the ceiling MFU is also read against, next to the datasheet peak."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n ** 3 / statistics.median(times)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "prodigyopt",
                 "bitsandbytes", "torchvision"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    import torch

    out["cuda"] = torch.version.cuda or "none"
    return out
