"""Taking a stranger's upload into a dataset folder: image files and zips, each bad file one problem.

Only image names whose content matches are kept (``accept.py``), names are made safe once here
(``names.safe_filename``), zips are extracted by ``zips.safe_extract_zip``, at most ``room`` images are added, and a
full disk stops the upload with a plain message, leaving no partial file (``store.py``).
"""
from __future__ import annotations

import os
import shutil

from trainer import ImageProblem, collect_folder, load_image, read_metadata_jsonl

from .accept import name_for_content, name_problem
from .names import safe_filename
from .store import DiskFull, copy_in
from .zips import safe_extract_zip

# Problems of a zip that leave the image in the dataset (shown as warnings, not as skipped files).
_KEPT_CODES = frozenset({"caption_not_utf8", "caption_too_large", "unreadable_caption", "missing_caption_column",
                         "bad_caption"})


def ingest_files(paths: list[str], dest: str, room: int | None = None,
                 limit: int | None = None) -> tuple[list[str], list[dict], list[dict]]:
    """Copies good images (and the images of zips) into ``dest``; bad files give one problem each and are dropped.
    Only image names whose content matches are kept (``uploads/accept.py``); at most ``room`` images are added
    (``limit``, the dataset's maximum, is what the message names);
    a full disk stops the upload with a plain message and leaves no partial file (``uploads/store.py``).

    Returns ``(added paths, problems, notes)``: problems are dicts (file, code, severity, message, fix) with
    severity "error" (file skipped) or "warning" (file kept); notes tell what was done to accepted files
    (16-bit scaled, first frame of an animation, EXIF rotation, renamed...).
    """
    added, problems, notes = [], [], []
    taken = {n.lower() for n in os.listdir(dest)}
    for src in paths or []:
        src = src if isinstance(src, str) else getattr(src, "name", str(src))
        shown = os.path.basename(src)
        left = None if room is None else room - len(added)
        if left is not None and left <= 0:
            problems.append(_full_problem(shown, limit or room))
            continue
        if shown.lower().endswith(".zip"):
            a, p, n = _ingest_zip(src, shown, dest)
            for extra in a[left:] if left is not None and len(a) > left else []:  # over the dataset's limit
                _unlink(extra)
                _unlink(os.path.splitext(extra)[0] + ".txt")
            if left is not None and len(a) > left:
                a, p = a[:left], p + [_full_problem(shown, limit or room)]
            added += a
            problems += p
            notes += n
            taken = {n.lower() for n in os.listdir(dest)}
            continue
        if name_problem(shown):  # not an image name (evil.html, .svg, .js...): refused by name, never stored
            problems.append(name_problem(shown))
            continue
        try:
            loaded = load_image(src)
        except ImageProblem as e:
            problems.append({"file": shown, "code": e.code, "severity": "error", "message": e.message, "fix": e.fix})
            continue
        name = safe_filename(name_for_content(shown, loaded.format), taken=taken)
        taken.add(name.lower())
        target = os.path.join(dest, name)
        try:
            copy_in(src, target)
        except DiskFull as e:
            problems.append({"file": shown, "code": "disk_full", "severity": "error", "message": str(e),
                             "fix": "Free some space, then upload the remaining files again."})
            break
        added.append(target)
        file_notes = list(loaded.notes)
        if name != shown:
            file_notes.append(f"saved as '{name}'")
        if file_notes:
            notes.append({"file": shown, "message": "; ".join(file_notes)})
    return added, problems, notes


def _full_problem(shown: str, limit: int) -> dict:
    return {"file": shown, "code": "dataset_full", "severity": "error",
            "message": f"The dataset is full: this app takes at most {limit} images per dataset, so '{shown}' was "
                       "not (fully) added.",
            "fix": "Remove some images first, or keep your best ones."}


def _ingest_zip(src: str, shown: str, dest: str) -> tuple[list[str], list[dict], list[dict]]:
    """Extracts a zip into a hidden staging folder, reads its metadata.jsonl / .txt captions, checks every image
    and moves the good ones (with a .txt caption) into ``dest``. Problems name '<zip>: <entry>'."""
    import tempfile

    added, problems, notes = [], [], []

    def prob(file, code, message, fix, severity="error"):
        problems.append({"file": f"{shown}: {file}" if file != shown else shown, "code": code,
                         "severity": severity, "message": message, "fix": fix})

    staging = tempfile.mkdtemp(prefix=".zip-", dir=dest)
    try:
        res = safe_extract_zip(src, staging)
        for p in res.problems:
            prob(p.file, p.code, p.message, p.fix)
        records, folder_probs = collect_folder(staging)
        for p in folder_probs:
            prob(p.file, p.code, p.message, p.fix, "warning" if p.code in _KEPT_CODES else "error")
        captions: dict[str, str] = {}
        for dirpath, _dirs, files in os.walk(staging):
            if "metadata.jsonl" in files:
                recs, meta_probs = read_metadata_jsonl(dirpath)
                rel_dir = os.path.relpath(dirpath, staging)
                for p in meta_probs:
                    where = p.file if rel_dir == "." else f"{rel_dir}/{p.file}"
                    prob(where, p.code, p.message, p.fix, "warning" if p.code in _KEPT_CODES else "error")
                captions.update({os.path.realpath(r.path): r.caption for r in recs if r.caption is not None})
        for rec in records:
            rel = rec.source_name
            try:
                loaded = load_image(rec.path)
            except ImageProblem as e:
                prob(rel, e.code, e.message, e.fix)
                continue
            rel_dir = os.path.dirname(rel)
            target_dir = os.path.join(dest, rel_dir) if rel_dir else dest
            os.makedirs(target_dir, exist_ok=True)
            name = safe_filename(os.path.basename(rel), taken={n.lower() for n in os.listdir(target_dir)})
            target = os.path.join(target_dir, name)
            os.replace(rec.path, target)
            added.append(target)
            caption = captions.get(os.path.realpath(rec.path), rec.caption)
            if caption is not None:
                with open(os.path.splitext(target)[0] + ".txt", "w", encoding="utf-8") as f:
                    f.write(caption)
            if loaded.notes:
                notes.append({"file": f"{shown}: {rel}", "message": "; ".join(loaded.notes)})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return added, problems, notes


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass
