"""The public entry point: ``train(config, on_event=None, stop=None) -> RunResult``.

With ``auto_fit`` the preflight measures a few steps first (through the Trainer itself) and returns a plan; the
run then trains with the plan's settings. Only this module knows both the preflight and the Trainer. Both use one
``RunInputs``: the model is loaded once and each image decoded once per call, and the seconds to the first step
(load, checks, caches, preflight) are counted there.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Optional

from . import distributed
from .config import TrainConfig
from .training.errors import RunResult, TrainingError
from .training.inputs import RunInputs
from .training.trainer import Trainer


def train(config: TrainConfig, on_event=None, stop: Optional[threading.Event] = None, *,
          fault_hook=None) -> RunResult:
    """Trains a LoRA as ``config`` says, in the caller's thread. Emits typed events to ``on_event`` and to
    ``<output_dir>/events.jsonl``; checks ``stop`` after every step (a stop saves a checkpoint and the current
    LoRA). Raises TrainingError (after a ``failed`` event) when the run cannot go on."""
    notes = []
    inputs = RunInputs()
    if not distributed.is_main():  # under torchrun / accelerate launch rank 0 alone reports (one bar, one set of notes)
        on_event = None
    if config.auto_fit:
        from .preflight import preflight

        t0, before = time.time(), sum(inputs.seconds.values())
        try:
            # every rank measures (the measurements train data parallel); rank 0's plan is the one all use
            plan = distributed.broadcast(preflight(config, on_event=on_event, stop=stop, inputs=inputs))
        finally:  # the preflight's own share: its wall time less the loading/reading/caching it did for the run
            inputs.seconds["preflight"] += max(0.0, time.time() - t0 - (sum(inputs.seconds.values()) - before))
        if stop is not None and stop.is_set():  # stopped during the measurement: nothing was trained
            return RunResult(run_dir=os.path.abspath(config.output_dir), step=0, total_steps=plan.total_steps,
                             stopped=True)
        if not plan.fits:
            raise TrainingError("the run does not fit in memory", plan.message)
        config = plan.config.replace(auto_fit=False)
        notes.append(f"auto-fit: {plan.message}")
    result = Trainer(config, on_event=on_event, stop=stop, fault_hook=fault_hook, notes=notes, inputs=inputs).run()
    if config.pick_best and not result.stopped and result.artifacts:  # artifacts: the main process
        pick_after_training(config, result, on_event, stop)
    return result


def pick_after_training(config: TrainConfig, result: RunResult, on_event=None,
                        stop: Optional[threading.Event] = None) -> None:
    """``--pick_best``: the sweep of the finished run, its progress as ``status`` events and its recommendation
    as a ``picked`` event (also in events.jsonl); ``result.artifacts["pick"]`` is pick.json. A sweep that fails
    leaves the trained run as it is: the failure is a ``status`` event and ``result.pick_error``."""
    from .events import EventLog, Picked, Status
    from .picking import PickError, SweepSettings, run_sweep
    from .picking.scorer import ScorerError

    log = EventLog(os.path.join(result.run_dir, "events.jsonl"), on_event)
    settings = SweepSettings(scales=config.pick_scale_values, seeds=tuple(range(config.pick_seeds)),
                             clip_model=config.pick_clip_model)

    def progress(done, total, what):
        log.emit(Status(phase="pick", message=f"sweep {done}/{total}: {what}", current=done, total=total))

    log.emit(Status(phase="pick", message="sweeping the checkpoints x LoRA scales (--pick_best)"))
    try:
        record = run_sweep(result.run_dir, settings, on_progress=progress, stop=stop)
    except (PickError, ScorerError) as exc:
        result.pick_error = str(exc)
        log.emit(Status(phase="pick", message=f"the sweep failed: {exc}"))
        return
    pick = record["pick"]
    result.artifacts["pick"] = os.path.join(result.run_dir, "pick.json")
    log.emit(Picked(checkpoint=pick["checkpoint"], scale=pick["scale"], why=record["why"],
                    path=result.artifacts["pick"]))
