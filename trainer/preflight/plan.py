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

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from .. import distributed
from ..config import Optimizer, TrainConfig
from ..events import Status
from .measure import Measurement, measure_run
from .memory import _cuda, available_memory, fmt_bytes, fmt_seconds

MeasureFn = Callable[[TrainConfig], tuple[Optional[int], float]]


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


def default_resolution(cfg: TrainConfig) -> Optional[int]:
    """cfg.resolution, else the family default read from the model's configs (None when unknown)."""
    if cfg.resolution:
        return int(cfg.resolution)
    from ..families import default_resolution_of_model

    return default_resolution_of_model(cfg.pretrained_model_name_or_path, revision=cfg.revision,
                                       cache_dir=cfg.cache_dir)


def planned_total_steps(cfg: TrainConfig, items=None) -> int:
    """Optimizer steps of the whole run, computed as the loop does (with this launch's number of processes).
    ``items``: the dataset as already read (else it is read here)."""
    if cfg.max_train_steps:
        return int(cfg.max_train_steps)
    from ..data.buckets import make_buckets, nearest_bucket
    from ..data.sampler import BucketBatchSampler
    from ..data.sampler import compute_total_steps
    from ..data.sources import load_items

    if items is None:
        items, _ = load_items(cfg)
    res = default_resolution(cfg) or 1024
    buckets = make_buckets(res, cfg.bucket_step) if cfg.aspect_buckets else [(res, res)]
    item_buckets = [nearest_bucket(*it.size, buckets) for it in items]
    world = distributed.world_size()
    sampler = BucketBatchSampler(item_buckets, repeats=cfg.repeats, batch_size=cfg.train_batch_size * world,
                                 seed=cfg.seed or 0, random_flip=cfg.random_flip)
    return compute_total_steps(cfg, len(items), sampler.batches_per_epoch(), world)[0]


def text_steps(cfg: TrainConfig, total: int) -> int:
    """How many of ``total`` steps train text parameters (as the loop schedules them)."""
    n = 0
    if cfg.train_text_encoder_ti:
        n = max(n, max(1, int(cfg.train_text_encoder_ti_frac * total)))
    if cfg.train_text_encoder:
        n = max(n, max(1, int(cfg.train_text_encoder_frac * total)))
    return min(n, total)


def measurement_config(cfg: TrainConfig, measure_steps: int, output_dir: str, items=None) -> TrainConfig:
    """The copy that is measured: ``measure_steps`` steps, no validation/checkpoints/uploads/trackers, and, when
    the real run has both phases, the text pivot placed mid-way so that both get timed."""
    m = cfg.replace(max_train_steps=measure_steps, steps_per_image=None, validation_prompt=None,
                    output_dir=output_dir, checkpointing_steps=10 ** 7, checkpoints_total_limit=None,
                    push_to_hub=False, report_to="none", resume_from_checkpoint=None, auto_fit=False)
    total = planned_total_steps(cfg, items)
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


def worst_of_ranks(m: Measurement) -> Measurement:
    """Several ranks: rank 0's measurement with the highest peak of any rank (out of memory if any rank was),
    the same on every rank, so every rank takes the same decisions and measures the same next settings (the
    measurements are data parallel runs: ranks that disagreed would wait on each other)."""
    peaks = distributed.gather((m.peak_bytes, m.oom))
    if len(peaks) == 1:
        return m
    from dataclasses import replace

    m = distributed.broadcast(m)
    oom = any(o for _, o in peaks)
    return replace(m, oom=oom, peak_bytes=None if oom else max(int(p or 0) for p, _ in peaks))


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


def _real_measure(measure_steps: int, workdir: str, on_event, stop=None,
                  inputs=None) -> Callable[[TrainConfig], Measurement]:
    counter = [0]

    def run(cfg: TrainConfig) -> Measurement:
        counter[0] += 1
        out = os.path.join(workdir, f"measure-{counter[0]}")
        mcfg = measurement_config(cfg, measure_steps, out, inputs.items if inputs is not None else None)
        try:
            return measure_run(mcfg, warmup=1, stop=stop, inputs=inputs)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    return run


def _prepare(cfg: TrainConfig, inputs, workdir: str, status) -> None:
    """Loads the model and reads the dataset (latents included) into ``inputs`` once, for every measurement and
    the run; a failure is a TrainingError that says what to do, as it would be from the run itself."""
    from ..training.errors import TrainingError, describe_failure
    from ..training.setup import make_accelerator

    try:
        acc = make_accelerator(cfg.replace(report_to="none"), workdir)
        family, comps = inputs.model(cfg, acc, lambda phase, msg, *a: status(msg))
        inputs.dataset(cfg, cfg.resolution or family.default_resolution(comps), lambda phase, msg, *a: status(msg))
    except TrainingError:
        raise
    except Exception as exc:
        text, advice = describe_failure(exc, workdir)
        raise TrainingError(text, advice) from exc


def _describe(cfg: TrainConfig) -> dict:
    return {"gradient_checkpointing": cfg.gradient_checkpointing, "train_batch_size": cfg.train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "optimizer": "adamw8bit" if cfg.use_8bit_adam else Optimizer(cfg.optimizer).value,
            "resolution": cfg.resolution}


def preflight(cfg: TrainConfig, measure_steps: int = 3, budget_bytes: Optional[int] = None, on_event=None, *,
              measure: Optional[MeasureFn] = None, min_resolution: int = 512,
              total_steps: Optional[int] = None, stop: Optional[threading.Event] = None,
              inputs=None) -> FitPlan:
    """Measures ``cfg`` for ``measure_steps`` steps (through ``train()``), adjusts it until the predicted peak
    memory fits ``budget_bytes`` (default: 92 % of free CUDA memory / available RAM) and predicts the run.

    ``inputs`` (a :class:`~trainer.training.inputs.RunInputs`): the model, dataset and latents the run will
    train with; the measurements use them (loaded and read here once, before the budget is taken, so weights
    count in neither the budget nor the measured growth), and the caller's run then reuses them.

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
    workdir = tempfile.mkdtemp(prefix="preflight-")
    if measure is None:
        if inputs is None:
            from ..training.inputs import RunInputs

            inputs = RunInputs()
        try:
            _prepare(cfg, inputs, workdir, status)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
    budget = int(budget_bytes) if budget_bytes is not None else available_memory()
    budget = min(distributed.gather(budget))  # several ranks: the smallest budget of them all
    real = _real_measure(measure_steps, workdir, on_event, stop, inputs) if measure is None else None

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
            m = worst_of_ranks(run(current))
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

    total = int(total_steps) if total_steps else planned_total_steps(
        current, inputs.items if inputs is not None else None)
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
