"""Preflight: measure a few real steps, predict the whole run, and make the settings fit in memory.

``preflight(cfg)`` trains ``measure_steps`` optimizer steps through the public ``train()`` on a copy of the
config (validation, checkpoints, uploads off; a temporary run folder), measures the peak memory and the seconds
per step, and predicts the whole run's time and peak. When the peak is above the budget it applies the cheapest
fix and measures again, in this order:

1. gradient checkpointing on;
2. half the batch size, twice the gradient accumulation (the effective batch stays the same), repeated down to 1;
3. ``adamw8bit`` instead of ``adamw`` (only on CUDA with bitsandbytes importable; never replaces Prodigy, whose
   learning rate means something else);
4. the resolution lowered in 128 px steps (last: it changes what the LoRA learns), not below ``min_resolution``.

Memory: on CUDA the growth of ``torch.cuda.max_memory_allocated`` over what was allocated before (after
``reset_peak_memory_stats``); the budget is 92 % of the free GPU memory. On CPU the growth of the process's peak
RSS (``VmHWM``, reset through ``/proc/self/clear_refs``; a sampling thread where that is not possible); the
budget is the available RAM. On CPU, memory freed earlier in the process and reused is not counted, so the CPU
figure is a lower bound.

Time: per-step durations come from the ``Step`` events' timestamps; the first (warm-up) step is left out of the
per-step average, and its extra cost is counted with loading, caching and export in the fixed overhead. Steps
that train text parameters (pivotal tuning before the pivot, text-encoder LoRA) and steps after the pivot are
timed separately when the measurement covers both (the measurement's pivot is placed mid-way for that).
"""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .config import Optimizer, TrainConfig
from .events import Started, Status, Step

MeasureFn = Callable[[TrainConfig], tuple[Optional[int], float]]

GiB = 1024 ** 3


@dataclass
class Measurement:
    """One measured run."""

    peak_bytes: Optional[int]          # growth during the run (None: out of memory)
    s_per_it: float                    # mean seconds per optimizer step after the warm-up steps
    steps: int = 0
    step_durations: list[float] = field(default_factory=list)
    text_s_per_it: Optional[float] = None    # steps that train text parameters
    frozen_s_per_it: Optional[float] = None  # steps after the pivot / without text training
    overhead_s: float = 0.0            # wall time not spent in (post-warm-up-rate) steps: load, cache, export
    wall_s: float = 0.0
    process_peak_bytes: Optional[int] = None  # CUDA: max_memory_allocated; CPU: peak RSS of the process
    peak_to_last_step_bytes: Optional[int] = None  # the same counter read at the last Step (before the export)
    total_steps: int = 0               # total steps of the measured run (from its Started event)
    device: str = "cpu"
    oom: bool = False
    error: str = ""


@dataclass
class FitPlan:
    config: TrainConfig
    changes: list[str]
    predicted_peak_bytes: Optional[int]
    predicted_seconds: float
    measured_s_per_it: float
    fits: bool
    message: str
    budget_bytes: int = 0
    total_steps: int = 0
    attempts: list[dict] = field(default_factory=list)   # one per measurement: settings, peak, s/it
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# Memory helpers
# ----------------------------------------------------------------------------------------------------------
def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def _proc_status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        v = _proc_status_kb("VmRSS")
        if v is not None:
            return v
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS counter of this process (Linux 4.0+); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return _proc_status_kb("VmHWM") is not None
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


class _RssSampler:
    """Peak RSS by sampling, for systems where the kernel's counter cannot be reset."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak = interval, current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


def available_memory() -> int:
    """Default budget: 92 % of free CUDA memory, or the available RAM on CPU."""
    if _cuda():
        import torch

        gc.collect()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.92)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return 8 * GiB


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 1024 ** 2:.0f} MiB"


def fmt_seconds(s: float) -> str:
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


# ----------------------------------------------------------------------------------------------------------
# Measuring one run
# ----------------------------------------------------------------------------------------------------------
def measure_run(cfg: TrainConfig, *, warmup: int = 1, on_event=None, stop=None) -> Measurement:
    """Runs ``train(cfg)`` in this process and measures it. ``warmup`` steps are left out of the per-step means.
    An out-of-memory failure returns ``Measurement(peak_bytes=None, oom=True)``; other failures raise."""
    import torch

    from .loop import TrainingError, train

    events: list = []
    last_step_peak: list = [None]

    def peak_now() -> Optional[int]:
        """The run's peak so far: host-side counters, no device sync."""
        if cuda:
            return int(torch.cuda.max_memory_allocated())
        return sampler.peak if sampler else _proc_status_kb("VmHWM")

    def collect(ev):
        events.append(ev)
        if getattr(ev, "type", None) == "step" and getattr(ev, "step", None) == getattr(ev, "total", None):
            last_step_peak[0] = peak_now()
        if on_event is not None:
            on_event(ev)

    cuda = _cuda()
    gc.collect()
    oom, error = False, ""
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        sampler = None
    else:
        _malloc_trim()  # hand freed heap back to the OS, so that this run's allocations show up as RSS growth
        before = current_rss()
        sampler = None if _reset_peak_rss() else _RssSampler()
    t0 = time.time()
    try:
        if sampler:
            with sampler:
                train(cfg, on_event=collect, stop=stop)
        else:
            train(cfg, on_event=collect, stop=stop)
    except TrainingError as exc:
        if "out of memory" not in str(exc).lower():
            raise
        oom, error = True, str(exc)
    wall = time.time() - t0
    if cuda:
        torch.cuda.synchronize()
        process_peak = peak_now()
        peak = process_peak - before
        gc.collect()
        torch.cuda.empty_cache()
    else:
        process_peak = peak_now() or current_rss()
        peak = max(0, process_peak - before)
    m = summarize_events(events, warmup=warmup)
    m.peak_bytes = None if oom else int(peak)
    m.process_peak_bytes = None if oom else int(process_peak)
    m.peak_to_last_step_bytes = None if oom or last_step_peak[0] is None else int(last_step_peak[0])
    m.wall_s = wall
    m.overhead_s = max(0.0, wall - _steady_time(m))
    m.device = torch.cuda.get_device_name() if cuda else "cpu"
    m.oom, m.error = oom, error
    return m


def summarize_events(events, warmup: int = 1) -> Measurement:
    """Per-step timing from Started/Step events (objects or dicts)."""
    def get(ev, k):
        return ev.get(k) if isinstance(ev, dict) else getattr(ev, k, None)

    started = [e for e in events if get(e, "type") == "started" or isinstance(e, Started)]
    steps = [e for e in events if get(e, "type") == "step" or isinstance(e, Step)]
    m = Measurement(peak_bytes=None, s_per_it=float("nan"), steps=len(steps))
    if started:
        m.total_steps = int(get(started[-1], "total_steps"))
    if not steps:
        return m
    t_prev = get(started[-1], "time") if started else None
    durations, kinds = [], []
    for i, e in enumerate(steps):
        t = get(e, "time")
        if t_prev is None:  # no Started event: the first duration is the cumulative s/it of step 1
            d = float(get(e, "s_per_it"))
        else:
            d = float(t) - float(t_prev)
        durations.append(d)
        kinds.append(bool(get(e, "text_trainable")))
        t_prev = t
    m.step_durations = durations
    steady = list(range(min(warmup, len(durations) - 1), len(durations)))  # keep >= 1 step
    mean = lambda idx: (sum(durations[i] for i in idx) / len(idx)) if idx else None  # noqa: E731
    m.s_per_it = mean(steady)
    m.text_s_per_it = mean([i for i in steady if kinds[i]])
    m.frozen_s_per_it = mean([i for i in steady if not kinds[i]])
    m._kinds = kinds  # type: ignore[attr-defined]
    return m


def _steady_time(m: Measurement) -> float:
    """Seconds the measured steps would take at their steady per-phase rates (the rest is overhead)."""
    kinds = getattr(m, "_kinds", [False] * m.steps)
    total = 0.0
    for k in kinds:
        rate = (m.text_s_per_it if k else m.frozen_s_per_it) or m.s_per_it
        total += rate if rate == rate else 0.0
    return total


# ----------------------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------------------
def default_resolution(cfg: TrainConfig) -> Optional[int]:
    """cfg.resolution, else the family default read from a local model folder (None when unknown)."""
    if cfg.resolution:
        return int(cfg.resolution)
    import json

    try:
        from .families.loading import resolve

        path = resolve(cfg.pretrained_model_name_or_path)
        if not os.path.isdir(path):
            return 1024 if "xl" in path.lower() else None
        with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
            cls = json.load(f).get("_class_name", "")
        with open(os.path.join(path, "vae", "config.json"), encoding="utf-8") as f:
            size = int(json.load(f).get("sample_size") or 512)
        if "XL" in cls:
            return size
        if size < 512:
            return size
        with open(os.path.join(path, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
            pred = json.load(f).get("prediction_type", "epsilon")
        return 768 if pred == "v_prediction" else 512
    except Exception:
        return None


def planned_total_steps(cfg: TrainConfig) -> int:
    """Optimizer steps of the whole run, computed as the loop does (single process)."""
    if cfg.max_train_steps:
        return int(cfg.max_train_steps)
    from .data.buckets import make_buckets, nearest_bucket
    from .data.sampler import BucketBatchSampler
    from .data.sources import load_items
    from .loop import compute_total_steps

    items, _ = load_items(cfg)
    res = default_resolution(cfg) or 1024
    buckets = make_buckets(res, cfg.bucket_step) if cfg.aspect_buckets else [(res, res)]
    item_buckets = [nearest_bucket(*it.size, buckets) for it in items]
    sampler = BucketBatchSampler(item_buckets, repeats=cfg.repeats, batch_size=cfg.train_batch_size,
                                 seed=cfg.seed or 0, random_flip=cfg.random_flip)
    return compute_total_steps(cfg, len(items), sampler.batches_per_epoch())[0]


def text_steps(cfg: TrainConfig, total: int) -> int:
    """How many of ``total`` steps train text parameters (as the loop schedules them)."""
    n = 0
    if cfg.train_text_encoder_ti:
        n = max(n, max(1, int(cfg.train_text_encoder_ti_frac * total)))
    if cfg.train_text_encoder:
        n = max(n, max(1, int(cfg.train_text_encoder_frac * total)))
    return min(n, total)


def measurement_config(cfg: TrainConfig, measure_steps: int, output_dir: str) -> TrainConfig:
    """The copy that is measured: ``measure_steps`` steps, no validation/checkpoints/uploads/trackers, and, when
    the real run has both phases, the text pivot placed mid-way so that both get timed."""
    m = cfg.replace(max_train_steps=measure_steps, steps_per_image=None, validation_prompt=None,
                    output_dir=output_dir, checkpointing_steps=10 ** 7, checkpoints_total_limit=None,
                    push_to_hub=False, report_to="none", resume_from_checkpoint=None, auto_fit=False)
    total = planned_total_steps(cfg)
    n_text = text_steps(cfg, total)
    if 0 < n_text < total and measure_steps >= 3:
        pivot = max(2, (measure_steps + 1) // 2)  # warm-up + >= 1 text step, then >= 1 frozen step
        frac = min(1.0, (pivot + 0.5) / measure_steps)
        if cfg.train_text_encoder_ti:
            m = m.replace(train_text_encoder_ti_frac=frac)
        if cfg.train_text_encoder:
            m = m.replace(train_text_encoder_frac=frac)
    return m


def predict_seconds(m: Measurement, cfg: TrainConfig, total: int) -> float:
    n_text = text_steps(cfg, total)
    s_text = m.text_s_per_it or m.s_per_it
    s_frozen = m.frozen_s_per_it or m.s_per_it
    return m.overhead_s + n_text * s_text + (total - n_text) * s_frozen


def _bnb_ok() -> bool:
    if not _cuda():
        return False
    try:
        import bitsandbytes  # noqa: F401

        return True
    except Exception:
        return False


def next_fix(cfg: TrainConfig, *, cuda: bool, bnb: bool, min_resolution: int = 512,
             notes: Optional[list[str]] = None) -> Optional[tuple[TrainConfig, str]]:
    """The cheapest change that lowers memory and is not applied yet, as (new config, description)."""
    notes = notes if notes is not None else []
    if not cfg.gradient_checkpointing:
        return cfg.replace(gradient_checkpointing=True), "gradient checkpointing on"
    b, acc = cfg.train_batch_size, cfg.gradient_accumulation_steps
    if b > 1:
        nb = b // 2 if b % 2 == 0 else max(d for d in range(1, b) if b % d == 0)
        na = acc * (b // nb)
        return (cfg.replace(train_batch_size=nb, gradient_accumulation_steps=na),
                f"batch size {b} -> {nb} with gradient accumulation {acc} -> {na} (same effective batch {b * acc})")
    opt = Optimizer.adamw8bit if cfg.use_8bit_adam else Optimizer(cfg.optimizer)
    if opt == Optimizer.adamw:
        if cuda and bnb:
            return cfg.replace(optimizer="adamw8bit"), "optimizer adamw -> adamw8bit"
        msg = "adamw8bit skipped: it needs a CUDA GPU and bitsandbytes"
        if msg not in notes:
            notes.append(msg)
    elif opt == Optimizer.prodigy:
        msg = "adamw8bit skipped: the run uses Prodigy (its learning rate has another meaning)"
        if msg not in notes:
            notes.append(msg)
    res = default_resolution(cfg)
    if res and res - 128 >= min_resolution:
        return cfg.replace(resolution=res - 128), f"resolution {res} -> {res - 128} px"
    return None


def _real_measure(measure_steps: int, workdir: str, on_event, stop=None) -> Callable[[TrainConfig], Measurement]:
    counter = [0]

    def run(cfg: TrainConfig) -> Measurement:
        counter[0] += 1
        out = os.path.join(workdir, f"measure-{counter[0]}")
        mcfg = measurement_config(cfg, measure_steps, out)
        try:
            return measure_run(mcfg, warmup=1, stop=stop)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    return run


def _describe(cfg: TrainConfig) -> dict:
    return {"gradient_checkpointing": cfg.gradient_checkpointing, "train_batch_size": cfg.train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "optimizer": "adamw8bit" if cfg.use_8bit_adam else Optimizer(cfg.optimizer).value,
            "resolution": cfg.resolution}


def preflight(cfg: TrainConfig, measure_steps: int = 3, budget_bytes: Optional[int] = None, on_event=None, *,
              measure: Optional[MeasureFn] = None, min_resolution: int = 512,
              total_steps: Optional[int] = None, stop: Optional[threading.Event] = None) -> FitPlan:
    """Measures ``cfg`` for ``measure_steps`` steps (through ``train()``), adjusts it until the predicted peak
    memory fits ``budget_bytes`` (default: 92 % of free CUDA memory / available RAM) and predicts the run.

    ``measure(cfg) -> (peak_bytes or None for out-of-memory, s_per_it)`` replaces the real measurement (tests,
    or callers that measure elsewhere); predictions then have no fixed overhead.
    ``on_event`` receives ``Status(phase="preflight", ...)`` events.
    """
    cfg = cfg.validate()
    if measure_steps < 1:
        raise ValueError("measure_steps must be >= 1")

    def status(msg: str, cur: int = 0, tot: int = 0):
        if on_event is not None:
            on_event(Status(phase="preflight", message=msg, current=cur, total=tot))

    cuda = _cuda()
    bnb = _bnb_ok()
    budget = int(budget_bytes) if budget_bytes is not None else available_memory()
    workdir = tempfile.mkdtemp(prefix="preflight-")
    real = _real_measure(measure_steps, workdir, on_event, stop) if measure is None else None

    def run(c: TrainConfig) -> Measurement:
        if real is not None:
            return real(c)
        peak, s_it = measure(c)
        return Measurement(peak_bytes=None if peak is None else int(peak), s_per_it=float(s_it),
                           oom=peak is None)

    changes: list[str] = []
    notes: list[str] = []
    attempts: list[dict] = []
    current = cfg
    try:
        while True:
            label = ", ".join(changes) if changes else "the settings as given"
            status(f"measuring {measure_steps} steps with {label}", len(attempts), 0)
            m = run(current)
            attempts.append({**_describe(current), "peak_bytes": m.peak_bytes, "s_per_it": m.s_per_it,
                             "oom": m.oom, "change": changes[-1] if changes else None})
            fits = m.peak_bytes is not None and m.peak_bytes <= budget
            if fits or (stop is not None and stop.is_set()):
                break
            fix = next_fix(current, cuda=cuda, bnb=bnb, min_resolution=min_resolution, notes=notes)
            if fix is None:
                break
            current, what = fix
            changes.append(what)
            status(f"peak {fmt_bytes(m.peak_bytes) if not m.oom else 'out of memory'} > budget "
                   f"{fmt_bytes(budget)}: trying {what}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    total = int(total_steps) if total_steps else planned_total_steps(current)
    seconds = predict_seconds(m, current, total) if m.s_per_it == m.s_per_it else float("nan")
    mean_s = (seconds - m.overhead_s) / total if total else m.s_per_it
    eta = (f"estimated time {fmt_seconds(seconds)} ({total} steps at {mean_s:.3g} s/it"
           + (f" + {fmt_seconds(m.overhead_s)} loading/caching/export" if m.overhead_s else "")
           + (", sample images not included" if cfg.validation_prompt else "") + ")")
    peak_txt = "out of memory" if m.oom else f"peak {fmt_bytes(m.peak_bytes)}"
    if fits and not changes:
        message = f"Fits as configured: {peak_txt} of a {fmt_bytes(budget)} budget; {eta}."
    elif fits:
        message = f"Fits after: {'; '.join(changes)}. {peak_txt} of a {fmt_bytes(budget)} budget; {eta}."
    else:
        tried = f" even after: {'; '.join(changes)}" if changes else ""
        message = (f"Does not fit{tried}: {peak_txt} vs a {fmt_bytes(budget)} budget. Lower --rank or "
                   f"--resolution further, or use a GPU with more memory; {eta}.")
    if notes:
        message += " Notes: " + "; ".join(notes) + "."
    status(message)
    return FitPlan(config=current, changes=changes, predicted_peak_bytes=m.peak_bytes, predicted_seconds=seconds,
                   measured_s_per_it=m.s_per_it, fits=fits, message=message, budget_bytes=budget, total_steps=total,
                   attempts=attempts, notes=notes)


__all__ = ["FitPlan", "Measurement", "preflight", "measure_run", "summarize_events", "next_fix",
           "planned_total_steps", "available_memory", "fmt_bytes", "fmt_seconds"]
