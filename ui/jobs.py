"""One training at a time, in a background thread of the app's process.

Jobs wait in a FIFO queue (each can see its position), each has a stop ``Event``, and every event the trainer
emits is buffered on the job, so any page of the same session (also after a reload) can re-attach. Before a
training starts, the captioner and the generation engine are released (``before_train`` hooks) so their
weights do not sit in memory next to the trainer's, and the training takes the GPU from the
:class:`~ui.gpu.GpuArbiter` (Auto-caption then runs on the CPU).

With a ``store`` path the queue is durable (``ui/queue_store.py``): every queued, running or interrupted job is
on disk, and a new manager on the same path puts queued jobs back in line in their order and shows the ones that
were running as *interrupted* (Resume), each with a message its session sees.
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

from . import queue_store
from .dataset_store import discard_frozen_dataset
from .gpu import GpuArbiter

QUEUED, RUNNING, FINISHED, STOPPED, FAILED = "queued", "running", "finished", "stopped", "failed"
INTERRUPTED = "interrupted"  # was running when the app stopped (restart): Resume continues it
ACTIVE = (QUEUED, RUNNING)


class JobLimitError(RuntimeError):
    """A submit refused by the operator's limits (runs per session)."""


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


def _note(job: Job, message: str) -> None:
    job.add_event({"type": "status", "phase": "queue", "message": message, "time": time.time()})


class JobManager:
    def __init__(self, train_fn: Optional[Callable] = None, before_train: Optional[list[Callable]] = None,
                 store: Optional[str] = None, max_runs_per_session: int = 1, gpu: Optional[GpuArbiter] = None,
                 start: bool = True):
        self._train_fn = train_fn
        self.before_train = list(before_train or [])
        self.max_runs_per_session = max(1, int(max_runs_per_session))
        self.gpu = gpu or GpuArbiter()
        self._store = store
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: list[Job] = []
        self._current: Optional[Job] = None
        self._cv = threading.Condition()
        if store:
            self._restore(store)
        self._worker = threading.Thread(target=self._work, name="training-worker", daemon=True)
        if start:  # else start() later (the app starts it once the server answers: a restored job waits)
            self._worker.start()

    def start(self) -> None:
        """Starts the worker (once); with ``start=False`` nothing trains before this call."""
        if not self._worker.is_alive() and self._worker.ident is None:
            self._worker.start()

    # ----- submitting -------------------------------------------------------------------------------------
    def submit(self, session: str, config: Any, resume: bool = False,
               history: Optional[list[dict]] = None) -> Job:
        with self._cv:
            mine = [j for j in self._jobs if j.session == session and j.state in ACTIVE]
            if len(mine) >= self.max_runs_per_session:
                if self.max_runs_per_session == 1:
                    raise JobLimitError(f"run '{mine[0].run_name}' is still {mine[0].state}: stop it first")
                raise JobLimitError(f"this app allows {self.max_runs_per_session} queued or running runs per "
                                    "session: wait for one to finish, or stop one first")
            for j in self._jobs:
                if j.state in ACTIVE and os.path.realpath(j.run_dir) == os.path.realpath(config.output_dir):
                    raise RuntimeError("that run folder is in use")
            # a resumed (or restarted) run replaces its interrupted job
            self._jobs = [j for j in self._jobs if not (j.state == INTERRUPTED and
                          os.path.realpath(j.run_dir) == os.path.realpath(config.output_dir))]
            job = Job(session, config, resume=resume, history=history)
            self._jobs.append(job)
            self._queue.append(job)
            self._save()
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
                self._save()

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

    # ----- the store -----------------------------------------------------------------------------------------
    def _save(self) -> None:
        """Writes every queued, running and interrupted job to the store (callers hold ``_cv``)."""
        if not self._store:
            return
        keep = [j for j in self._jobs if j.state in ACTIVE + (INTERRUPTED,)]
        queue_store.write(self._store, [queue_store.record_of(j.session, j.config, j.resume, j.state)
                                        for j in keep])

    def _restore(self, store: str) -> None:
        """Puts the store's jobs back: queued ones in line (in order), running ones as interrupted."""
        for r in queue_store.restore(store):
            history = read_events(os.path.join(r.config.output_dir, "events.jsonl"))
            job = Job(r.session, r.config, resume=True, history=history)  # resume: its view shows the history
            job.state = QUEUED if r.state == QUEUED else INTERRUPTED
            _note(job, r.message)
            self._jobs.append(job)
            if job.state == QUEUED:
                self._queue.append(job)
        self._save()

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
                self._save()
            try:
                with self.gpu.training(on_wait=lambda: _note(job, "waiting for Auto-caption to free the GPU")):
                    self._run(job)
                if job.state == FINISHED:
                    discard_frozen_dataset(job.run_dir, getattr(job.config, "instance_data_dir", None))
            finally:
                with self._cv:
                    self._current = None
                    self._save()

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
