"""One training at a time, in a background thread of the app's process.

Jobs wait in a FIFO queue (each can see its position), each has a stop ``Event``, and every event the trainer
emits is buffered on the job, so any page of the same session (also after a reload) can re-attach. Before a
training starts, the captioner and the generation engine are released (``before_train`` hooks) so their
weights do not sit in memory next to the trainer's.
"""
from __future__ import annotations

import collections
import itertools
import os
import threading
import time
import traceback
from typing import Any, Callable, Optional

from trainer import read_events

QUEUED, RUNNING, FINISHED, STOPPED, FAILED = "queued", "running", "finished", "stopped", "failed"
ACTIVE = (QUEUED, RUNNING)


class Job:
    _ids = itertools.count(1)

    def __init__(self, session: str, config: Any, resume: bool = False, history: Optional[list[dict]] = None):
        self.id = next(self._ids)
        self.session = session
        self.config = config
        self.run_dir = config.output_dir
        self.run_name = os.path.basename(os.path.normpath(config.output_dir))
        self.resume = resume
        self.stop = threading.Event()
        self.state = QUEUED
        self.events: list[dict] = []
        self.history: list[dict] = list(history or [])  # a resumed run's earlier events, read from its folder
        self.error: Optional[str] = None
        self.created = time.time()
        self.lock = threading.Lock()

    def add_event(self, event: dict) -> None:
        with self.lock:
            self.events.append(event)

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.events)


class JobManager:
    def __init__(self, train_fn: Optional[Callable] = None, before_train: Optional[list[Callable]] = None):
        self._train_fn = train_fn
        self.before_train = list(before_train or [])
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: list[Job] = []
        self._current: Optional[Job] = None
        self._cv = threading.Condition()
        self._worker = threading.Thread(target=self._work, name="training-worker", daemon=True)
        self._worker.start()

    # ----- submitting -------------------------------------------------------------------------------------
    def submit(self, session: str, config: Any, resume: bool = False,
               history: Optional[list[dict]] = None) -> Job:
        with self._cv:
            for j in self._jobs:
                if j.session == session and j.state in ACTIVE:
                    raise RuntimeError(f"run '{j.run_name}' is still {j.state}: stop it first")
                if j.state in ACTIVE and os.path.realpath(j.run_dir) == os.path.realpath(config.output_dir):
                    raise RuntimeError("that run folder is in use")
            job = Job(session, config, resume=resume, history=history)
            self._jobs.append(job)
            self._queue.append(job)
            self._cv.notify_all()
            return job

    def stop(self, job: Job) -> None:
        with self._cv:
            job.stop.set()
            if job.state == QUEUED:
                try:
                    self._queue.remove(job)
                except ValueError:
                    pass
                job.state = STOPPED
                job.add_event({"type": "finished", "step": 0, "artifacts": {}, "stopped": True,
                               "time": time.time(), "note": "removed from the queue before it started"})

    # ----- looking up -------------------------------------------------------------------------------------
    def position(self, job: Job) -> int:
        """0 while running (or done), n >= 1 while n-1 jobs wait before it."""
        with self._cv:
            if job.state != QUEUED:
                return 0
            try:
                return list(self._queue).index(job) + 1 + (1 if self._current is not None else 0)
            except ValueError:
                return 0

    def queue_length(self) -> int:
        with self._cv:
            return len(self._queue)

    def latest(self, session: str) -> Optional[Job]:
        with self._cv:
            mine = [j for j in self._jobs if j.session == session]
        return mine[-1] if mine else None

    def active_sessions(self) -> set[str]:
        with self._cv:
            return {j.session for j in self._jobs if j.state in ACTIVE}

    def busy(self) -> bool:
        with self._cv:
            return self._current is not None or bool(self._queue)

    def wait_idle(self, timeout: float = 60) -> bool:
        end = time.time() + timeout
        while time.time() < end:
            if not self.busy():
                return True
            time.sleep(0.05)
        return False

    # ----- the worker -------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                job = self._queue.popleft()
                if job.state != QUEUED:
                    continue
                job.state = RUNNING
                self._current = job
            try:
                self._run(job)
            finally:
                with self._cv:
                    self._current = None

    def _run(self, job: Job) -> None:
        for hook in self.before_train:
            try:
                hook()
            except Exception:
                pass
        train_fn = self._train_fn
        if train_fn is None:
            from trainer import train as train_fn

        def on_event(ev) -> None:
            job.add_event(ev.to_dict() if hasattr(ev, "to_dict") else dict(ev))

        try:
            result = train_fn(job.config, on_event=on_event, stop=job.stop)
            stopped = bool(getattr(result, "stopped", False)) or job.stop.is_set()
            last = job.snapshot()[-1:] or [{}]
            if last[0].get("type") == "failed":
                job.state = FAILED
                job.error = last[0].get("error")
            else:
                job.state = STOPPED if stopped else FINISHED
        except Exception as exc:  # the trainer normally emits `failed` itself; keep the UI informed anyway
            job.state = FAILED
            job.error = f"{type(exc).__name__}: {exc}"
            if not any(e.get("type") == "failed" for e in job.snapshot()):
                job.add_event({"type": "failed", "error": job.error, "advice": "", "time": time.time(),
                               "trace": traceback.format_exc(limit=3)})


def run_state_from_disk(run_dir: str) -> tuple[str, list[dict]]:
    """(state, events) of a run folder that no job in memory knows (e.g. after an app restart)."""
    events = read_events(os.path.join(run_dir, "events.jsonl"))
    state = STOPPED
    for e in reversed(events):
        if e.get("type") == "finished":
            state = STOPPED if e.get("stopped") else FINISHED
            break
        if e.get("type") == "failed":
            state = FAILED
            break
    return state, events
