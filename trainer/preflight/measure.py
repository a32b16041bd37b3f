"""Measuring one real run: peak memory (growth during the run), seconds per step (warm-up left out, text and
frozen phases timed separately) and the fixed overhead (loading, caching, export)."""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Optional

from ..config import TrainConfig
from ..events import Started, Step
from .memory import _RssSampler, _cuda, _malloc_trim, _proc_status_kb, _reset_peak_rss, current_rss


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


def measure_run(cfg: TrainConfig, *, warmup: int = 1, on_event=None, stop=None, inputs=None) -> Measurement:
    """Runs ``train(cfg)`` in this process and measures it. ``warmup`` steps are left out of the per-step means.
    An out-of-memory failure returns ``Measurement(peak_bytes=None, oom=True)``; other failures raise.
    ``inputs`` (``RunInputs``): the loaded model and read dataset to measure on; released afterwards (the
    adapters come off), so that the next measurement or the run starts from the model as loaded."""
    import torch

    from ..training.errors import TrainingError
    from ..training.trainer import Trainer

    def train(c, on_event, stop):  # the run itself, never api.train: no preflight inside the preflight
        trainer = Trainer(c, on_event=on_event, stop=stop, inputs=inputs)
        try:
            return trainer.run()
        finally:
            if inputs is not None:
                inputs.release(trainer)

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
