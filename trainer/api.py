"""The public entry point: ``train(config, on_event=None, stop=None) -> RunResult``.

With ``auto_fit`` the preflight measures a few steps first (through the Trainer itself) and returns a plan; the
run then trains with the plan's settings. Only this module knows both the preflight and the Trainer.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

from .config import TrainConfig
from .training.errors import RunResult, TrainingError
from .training.trainer import Trainer


def train(config: TrainConfig, on_event=None, stop: Optional[threading.Event] = None, *,
          fault_hook=None) -> RunResult:
    """Trains a LoRA as ``config`` says, in the caller's thread. Emits typed events to ``on_event`` and to
    ``<output_dir>/events.jsonl``; checks ``stop`` after every step (a stop saves a checkpoint and the current
    LoRA). Raises TrainingError (after a ``failed`` event) when the run cannot go on."""
    notes = []
    if config.auto_fit:
        from .preflight import preflight

        plan = preflight(config, on_event=on_event, stop=stop)
        if stop is not None and stop.is_set():  # stopped during the measurement: nothing was trained
            return RunResult(run_dir=os.path.abspath(config.output_dir), step=0, total_steps=plan.total_steps,
                             stopped=True)
        if not plan.fits:
            raise TrainingError("the run does not fit in memory", plan.message)
        config = plan.config.replace(auto_fit=False)
        notes.append(f"auto-fit: {plan.message}")
    return Trainer(config, on_event=on_event, stop=stop, fault_hook=fault_hook, notes=notes).run()
