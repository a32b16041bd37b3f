"""What Start and Resume hand the job queue: a run on its own frozen dataset, and a resume on its saved plan.

* :func:`freeze_for_run`: the copy of the session's dataset a new run trains on (``ui/dataset_store.py``), or a
  :class:`SubmitError` whose message the visitor reads (a full disk says so, with no server path).
* :func:`resume`: Resume of the session's latest run: its saved ``config.json`` (the settings it trained with,
  the preflight's plan included: no second preflight) on its frozen dataset; a run that never wrote a checkpoint
  starts again, as it was submitted when it never wrote a config.
"""
from __future__ import annotations

import os
import shutil

from trainer import ConfigError
from trainer.checkpoint import is_disk_full, latest_checkpoint

from . import jobs as J
from .dataset_files import read_records, save_records
from .dataset_store import DISK_FULL, edit_lock, freeze_dataset
from .queue_store import load_config


class SubmitError(ValueError):
    """A Start or Resume refused, with the message the visitor reads."""


def freeze_for_run(folder: str, run_dir: str) -> tuple[str, list]:
    """(frozen dataset folder, its records) for a new run in ``run_dir``; the folder is made here."""
    try:
        with edit_lock(folder):
            recs = read_records(folder)
            if not recs:
                raise SubmitError("The dataset is empty: add images in the Dataset tab first.")
            save_records(folder, recs)
            return freeze_dataset(recs, folder, run_dir), recs
    except OSError as e:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise SubmitError(DISK_FULL if is_disk_full(e) else
                          "The dataset could not be copied for this run; try again.") from None


def resume(ctx, sid: str) -> str:
    """Submits Resume of session ``sid``'s latest run; returns the message (raises :class:`SubmitError`)."""
    job = ctx.jobs.latest(sid)
    if job is not None and job.state in J.ACTIVE:
        return f"'{job.run_name}' is still {job.state}."
    if job is not None:
        run_dir = job.run_dir
    else:
        runs = ctx.workspaces.list_runs(sid)
        if not runs:
            return "No run to resume."
        run_dir = os.path.join(ctx.workspaces.runs_dir(sid), runs[0])
    cfg = load_config(run_dir) or (job.config if job is not None else None)
    if cfg is None:
        raise SubmitError("This run's settings cannot be read; start a new run.")
    state, history = J.run_state_from_disk(run_dir)
    if state == J.FINISHED:
        return "This run already finished."
    if not cfg.instance_data_dir or not os.path.isdir(cfg.instance_data_dir):
        raise SubmitError("This run's copy of the dataset is gone; start a new run.")
    again = latest_checkpoint(os.path.join(run_dir, "checkpoints")) is None
    try:
        cfg = cfg.replace(resume_from_checkpoint=None if again else "latest").validate()
        new = ctx.jobs.submit(sid, cfg, resume=True, history=history)
    except (RuntimeError, ConfigError) as e:
        raise SubmitError(str(e)) from None
    if again:
        return f"**{new.run_name}** had no checkpoint yet: it starts again from step 0."
    return f"Resuming **{new.run_name}** from its latest checkpoint."
