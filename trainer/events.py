"""Typed progress events emitted by the trainer.

Every event is a small dataclass with a ``type`` tag. ``train()`` hands each one to the caller's
``on_event`` callback and appends it, as one JSON line, to ``<run>/events.jsonl``. The UI, the CLI's tqdm bar
and the tests all read the same stream.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


@dataclass
class Event:
    type: str = field(init=False, default="event")
    time: float = field(init=False, default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Started(Event):
    run_dir: str
    total_steps: int
    num_images: int
    start_step: int = 0
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.type = "started"


@dataclass
class Status(Event):
    """A phase that is not a training step (loading, caching latents, generating class images...)."""

    phase: str
    message: str
    current: int = 0
    total: int = 0

    def __post_init__(self):
        self.type = "status"


@dataclass
class Step(Event):
    step: int
    total: int
    loss: Optional[float]
    lr: float
    d_lr: Optional[float]
    s_per_it: float
    eta_s: float
    epoch: int = 0
    text_trainable: bool = False

    def __post_init__(self):
        self.type = "step"


@dataclass
class FirstStep(Event):
    """The time to the first step: seconds since ``train()`` began, and by phase (``load``, ``checks``,
    ``caches``, ``preflight``, ``first step``, ``other``)."""

    seconds: float
    phases: dict[str, float]

    def __post_init__(self):
        self.type = "first_step"


def describe_first_step(ev) -> str:
    """One line for the CLI and the app: ``time to first step 12.3 s: load 5.1 s, checks 0.4 s, ...``."""
    get = ev.get if isinstance(ev, dict) else (lambda k: getattr(ev, k, None))
    phases = get("phases") or {}
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
    return f"time to first step {float(get('seconds') or 0.0):.1f} s: {parts}"


@dataclass
class ValidationLoss(Event):
    """The loss on the held-out images (``--validation_loss_images``) at fixed noise and timesteps."""

    step: int
    loss: float

    def __post_init__(self):
        self.type = "validation_loss"


@dataclass
class Picked(Event):
    """The sweep's recommendation (``--pick_best`` / ``python -m trainer pick``): see ``<run>/pick.json``."""

    checkpoint: str
    scale: float
    why: str
    path: str

    def __post_init__(self):
        self.type = "picked"


@dataclass
class Sample(Event):
    step: int
    images: list[str]
    prompt: str

    def __post_init__(self):
        self.type = "sample"


@dataclass
class Checkpoint(Event):
    step: int
    path: str

    def __post_init__(self):
        self.type = "checkpoint"


@dataclass
class Finished(Event):
    step: int
    artifacts: dict[str, str]
    stopped: bool = False

    def __post_init__(self):
        self.type = "finished"


@dataclass
class Failed(Event):
    error: str
    step: int = 0
    advice: str = ""

    def __post_init__(self):
        self.type = "failed"


EventCallback = Callable[[Event], None]


class EventLog:
    """Appends events to ``events.jsonl`` (one JSON object per line, flushed each time) and forwards them."""

    def __init__(self, path: Optional[str], on_event: Optional[EventCallback] = None, enabled: bool = True):
        self.path = path
        self.on_event = on_event
        self.enabled = enabled
        self._failing = False
        if path and enabled:
            os.makedirs(os.path.dirname(path), exist_ok=True)

    def emit(self, event: Event) -> None:
        failure = None
        if self.path and self.enabled:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(event.to_dict()) + "\n")
                self._failing = False
            except OSError as exc:  # a full disk must not turn a clear error into a crash of the log itself
                if not self._failing:  # say it once per failing stretch, to the log and to the caller
                    self._failing = True
                    failure = (f"the event log {os.path.basename(self.path)} could not be written "
                               f"({exc.strerror or type(exc).__name__}); progress is shown but not saved")
                    log.warning(failure)
        if self.on_event is not None:
            self.on_event(event)
            if failure:
                self.on_event(Status(phase="events", message=failure))


def read_events(path: str) -> list[dict[str, Any]]:
    """Reads an ``events.jsonl`` file; a torn last line (a crash mid-write) is skipped."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
