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
def watch_scaler(cpu_standin: bool):
    """Sees the fp16 GradScaler our trainer steps through (``Trainer.scaler``, accelerate's; its optimizer steps go
    through ``training.step.apply_gradients``) and yields a dict: ``steps`` through a scaler, ``unscaled`` steps
    without one, the scaler's ``init``/``final`` scale. No read per step (``get_scale`` waits for the GPU): the
    final scale is read once after the run. accelerate makes a GradScaler for fp16 on a GPU only; with
    ``cpu_standin`` (the dry run) a ``torch.amp.GradScaler("cpu")`` stands in for it, as in
    tests/test_precision_paths.py, so the same unscale / clip / step / update calls run."""
    import torch

    from trainer.training import trainer as trainer_mod

    seen: dict = {"steps": 0, "unscaled": 0, "standin": False, "init": None, "final": None}
    scalers: list = []
    cls, orig_open, orig_apply = trainer_mod.Trainer, trainer_mod.Trainer.open, trainer_mod.apply_gradients

    def open_(self):
        out = orig_open(self)
        if cpu_standin and self.scaler is None and "fp16" in str(self.cfg.mixed_precision):
            self.scaler, seen["standin"] = torch.amp.GradScaler("cpu"), True
        return out

    def apply(params, *, scaler=None, **kw):
        out = orig_apply(params, scaler=scaler, **kw)
        if scaler is None:
            seen["unscaled"] += 1
        else:
            seen["steps"] += 1
            if not scalers or scalers[-1] is not scaler:
                scalers.append(scaler)
        return out

    cls.open, trainer_mod.apply_gradients = open_, apply
    try:
        yield seen
    finally:
        cls.open, trainer_mod.apply_gradients = orig_open, orig_apply
        if scalers:
            seen["init"], seen["final"] = float(scalers[-1]._init_scale), float(scalers[-1].get_scale())


def describe_scaler(seen: dict, where: str) -> str:
    """The fp16 path line from ``watch_scaler``'s record: ok when every optimizer step went through a scaler.
    With the default growth interval (2000 steps) the scale cannot grow in a short run, so each halving of it is
    one overflowed step the scaler skipped."""
    if not seen["steps"]:
        return (f"FAILED: no GradScaler in {seen['unscaled']} fp16 optimizer steps on {where} (accelerate made "
                "none; fp16 gradients under ~6e-8 would flush to zero)")
    import math

    halvings = round(math.log2(seen["init"] / seen["final"])) if seen["final"] else None
    skipped = ("" if halvings is None else ", no overflowed step" if halvings == 0
               else f", {halvings} overflowed step(s) skipped" if halvings > 0 else ", scale grew")
    who = "a CPU GradScaler standing in for accelerate's" if seen["standin"] else "accelerate's GradScaler"
    return (f"{'FAILED' if seen['unscaled'] else 'ok'}: {seen['steps']} optimizer steps through {who} on {where}, "
            f"scale {seen['init']:g} -> {seen['final']:g}{skipped}"
            + (f"; {seen['unscaled']} steps without it" if seen["unscaled"] else ""))


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


def bnb_import_error() -> str | None:
    """Why ``import bitsandbytes`` fails here (type and first line), or None when it imports."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a CUDA library the (cut) wheel lacks
        return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"
    return None


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


#: What bench/gpu_wheels.sh carries at constraints.txt's versions (bitsandbytes is GPU only: not pinned there).
CARRIED = ("diffusers", "transformers", "peft", "prodigyopt", "regex")


def constraint_mismatches(constraints: str, names=CARRIED) -> list[str]:
    """One line per package of ``names`` whose version here is not the one ``constraints`` pins (a wheel that did
    not install, or an older copy first on the path), so a table is never read as taken at the pinned versions
    when it was not."""
    import importlib.metadata as md

    pins = {}
    with open(constraints, encoding="utf-8") as fh:
        for line in fh:
            name, sep, version = line.split("#", 1)[0].strip().partition("==")
            if sep:
                pins[name.strip().lower()] = version.strip()
    out = []
    for name in names:
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            have = "absent"
        if name in pins and have != pins[name]:
            out.append(f"{name} {have} here, constraints.txt pins {pins[name]}")
    return out


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
