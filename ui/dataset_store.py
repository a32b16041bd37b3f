"""The session's dataset as runs and edits see it: one edit at a time, and a frozen copy per run.

* :func:`edit_lock`: every read-modify-write of a session's ``uploads/`` (upload, caption edit, Auto-caption's
  write, Remove all images, the copy made at Start) holds this folder's lock, so none writes back records it read
  before another edit landed.
* :func:`merge_captions`: Auto-caption reads the captions, captions for a while without the lock, then merges its
  results into the *current* captions: an image removed meanwhile is skipped, a caption edited meanwhile is kept.
* :func:`freeze_dataset`: at Start (a queued job too) the images and their captions are copied into
  ``<run>/dataset/``; the run trains on that copy and its ``config.json`` points at it, so edits after Start change
  the next run, never this one, and Resume reads the same items. A finished run's copy is deleted
  (:func:`discard_frozen_dataset`): only a stopped, failed or interrupted run can still resume.
"""
from __future__ import annotations

import functools
import os
import shutil
import threading
from typing import Iterable

from trainer import Record, write_metadata_jsonl

DISK_FULL = ("The disk is full: the dataset could not be copied for this run, and nothing of it was kept. "
             "Remove old runs or images (or ask the app's operator to free space), then press Start again.")
FROZEN_DIR = "dataset"  # inside the run folder; the Hub upload leaves it out (trainer/export/hub.py)

_locks: dict[str, threading.RLock] = {}
_locks_guard = threading.Lock()


def edit_lock(folder: str) -> threading.RLock:
    """The one lock of a dataset folder (re-entrant: a handler may call helpers that take it too)."""
    key = os.path.realpath(folder)
    with _locks_guard:
        return _locks.setdefault(key, threading.RLock())


def locked(fn):
    """Decorates a read-modify-write helper whose first argument is the dataset folder: it runs under
    :func:`edit_lock` of that folder."""
    @functools.wraps(fn)
    def wrapper(folder, *args, **kwargs):
        with edit_lock(folder):
            return fn(folder, *args, **kwargs)

    return wrapper


def merge_captions(current: list[Record], read_before: dict[str, str], captions: dict[str, str]) -> tuple[int, int]:
    """Writes ``captions`` (path -> new caption) into ``current`` (the records as they are now), only where the
    caption is still the one Auto-caption read (``read_before``); returns (written, kept because edited meanwhile).
    Paths that are gone are skipped."""
    written = kept = 0
    for r in current:
        if r.path not in captions:
            continue
        if (r.caption or "") == (read_before.get(r.path) or ""):
            r.caption = captions[r.path]
            written += 1
        else:
            kept += 1
    return written, kept


def freeze_dataset(records: Iterable[Record], uploads: str, run_dir: str) -> str:
    """Copies ``records`` (images under ``uploads``, with their captions) into ``<run_dir>/dataset/`` with a
    ``metadata.jsonl``; returns that folder. The caller holds :func:`edit_lock` of ``uploads``. On failure
    (a full disk...) the partial copy is removed and the error raised."""
    dest = os.path.join(run_dir, FROZEN_DIR)
    os.makedirs(dest)
    try:
        frozen = []
        for r in records:
            rel = os.path.relpath(os.path.realpath(r.path), os.path.realpath(uploads))
            if rel.startswith(os.pardir) or os.path.isabs(rel):
                continue  # never outside the session's uploads
            target = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(r.path, target)  # a copy, not a link: the upload may be removed or replaced
            frozen.append(Record(target, r.caption or "", r.source_name))
        write_metadata_jsonl(dest, frozen)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def discard_frozen_dataset(run_dir: str, instance_data_dir: str) -> None:
    """Deletes the run's frozen copy (a finished run no longer needs the photos); nothing else."""
    dest = os.path.join(run_dir, FROZEN_DIR)
    if instance_data_dir and os.path.realpath(instance_data_dir) == os.path.realpath(dest):
        shutil.rmtree(dest, ignore_errors=True)
