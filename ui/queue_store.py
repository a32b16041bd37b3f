"""The job queue on disk: ``<root>/queue.json``, so a restart (even ``kill -9``) loses no job.

The file lists, in submit order, every job that is queued, running (its preflight included) or interrupted, with
its session, run folder, config and state. It is rewritten atomically (a temporary file, fsync, rename) on every
change. After a restart :func:`restore` tells the :class:`~ui.jobs.JobManager` what to do with each record:
queued jobs go back in line in their order; a job that was running comes back *interrupted*, with Resume and a
message saying where it was (its preflight, or training with a checkpoint at step N).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Optional

from trainer import TrainConfig, read_events
from trainer.checkpoint import latest_checkpoint

VERSION = 1


@dataclass
class Restored:
    """One job read back from the store: what the manager re-creates, with the message its session sees."""

    session: str
    config: TrainConfig
    resume: bool
    state: str  # "queued" or "interrupted"
    message: str


def write(path: str, records: list[dict]) -> None:
    """Atomically replaces the store with ``records``; a failure (disk full) keeps the previous file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".queue-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": VERSION, "jobs": records}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass


def record_of(session: str, config: TrainConfig, resume: bool, state: str) -> dict:
    return {"session": session, "config": config.to_dict(), "resume": bool(resume), "state": state}


def _read(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return []
    jobs = data.get("jobs") if isinstance(data, dict) else None
    return [j for j in jobs if isinstance(j, dict)] if isinstance(jobs, list) else []


def _interrupted_message(run_dir: str) -> str:
    """Where a job that was running when the app stopped had got to, and what Resume will do."""
    started = [e for e in read_events(os.path.join(run_dir, "events.jsonl")) if e.get("type") == "started"]
    ck = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if ck:
        step = os.path.basename(ck).split("-")[-1]
        return (f"The app restarted while this run was training; its checkpoint at step {step} is kept. "
                "Press Resume to continue from it.")
    if started:
        return ("The app restarted while this run was training, before its first checkpoint. "
                "Press Resume to start it again from step 0.")
    return ("The app restarted during this run's preparation (its preflight); nothing was trained yet. "
            "Press Resume to start it again.")


def restore(path: str) -> list[Restored]:
    """The store's jobs as they must come back after a restart, in submit order (unreadable records skipped)."""
    out: list[Restored] = []
    position = 0
    for rec in _read(path):
        try:
            cfg = TrainConfig.from_dict(rec["config"])
            session, state = str(rec["session"]), rec.get("state")
        except Exception:
            continue
        if state == "queued":
            position += 1
            out.append(Restored(session, cfg, bool(rec.get("resume")), "queued",
                                "The app restarted; this run kept its place in the line."))
        elif state in ("running", "interrupted"):
            out.append(Restored(session, cfg, bool(rec.get("resume")), "interrupted",
                                _interrupted_message(cfg.output_dir)))
    return out


def load_config(run_dir: str) -> Optional[TrainConfig]:
    """The run's saved ``config.json`` (what it trains with, after the preflight's plan), or None."""
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            return TrainConfig.from_dict(json.load(f))
    except (OSError, ValueError):
        return None
