"""The dataset on disk (a session's ``uploads/`` folder): reading and writing its captions, taking uploads in,
removing one image, and the trigger the app wrote into the captions.

The Dataset and Train tabs both use these; nothing here builds a component.
"""
from __future__ import annotations

import json
import os
import shutil

import pandas as pd

from trainer import Record, is_image_name, read_metadata_jsonl, replace_word, write_metadata_jsonl

from uploads.ingest import ingest_files  # noqa: F401 (taking uploads in: what the app accepts, uploads/ingest.py)

from .dataset_store import locked

PROBLEMS_FILE = ".upload_problems.json"
TRIGGER_FILE = ".trigger"  # the trigger word the captions of this folder were written with
TABLE_HEADERS = ["file", "caption"]
PROBLEM_HEADERS = ["file", "severity", "message", "fix"]


# ----- dataset on disk ----------------------------------------------------------------------------------------
def list_images(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        for f in sorted(filenames):
            if not f.startswith(".") and is_image_name(f):
                out.append(os.path.join(dirpath, f))
    return out


def read_records(folder: str) -> list[Record]:
    """Every image of the folder with its caption (metadata.jsonl first, then a .txt sidecar)."""
    caps: dict[str, str] = {}
    if os.path.isfile(os.path.join(folder, "metadata.jsonl")):
        recs, _ = read_metadata_jsonl(folder)
        caps = {os.path.realpath(r.path): r.caption for r in recs if r.caption is not None}
    records = []
    for p in list_images(folder):
        cap = caps.get(os.path.realpath(p))
        if cap is None:
            txt = os.path.splitext(p)[0] + ".txt"
            if os.path.isfile(txt):
                try:
                    with open(txt, encoding="utf-8", errors="replace") as f:
                        cap = f.read(64 * 1024).strip()
                except OSError:
                    cap = None
        records.append(Record(p, cap or "", os.path.relpath(p, folder).replace(os.sep, "/")))
    return records


def save_records(folder: str, records: list[Record]) -> None:
    write_metadata_jsonl(folder, records)


def load_problems(folder: str) -> list[dict]:
    try:
        with open(os.path.join(folder, PROBLEMS_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return []


def save_problems(folder: str, problems: list[dict]) -> None:
    with open(os.path.join(folder, PROBLEMS_FILE), "w", encoding="utf-8") as f:
        json.dump(problems[-200:], f)


def table_of(records: list[Record]) -> pd.DataFrame:
    return pd.DataFrame([[r.source_name, r.caption or ""] for r in records], columns=TABLE_HEADERS)


def gallery_of(records: list[Record]) -> list[tuple[str, str]]:
    return [(r.path, r.source_name) for r in records]


def problems_table(problems: list[dict]) -> pd.DataFrame:
    rows = [[p.get("file", ""), p.get("severity", "error"), p.get("message", ""), p.get("fix", "")] for p in problems]
    return pd.DataFrame(rows, columns=PROBLEM_HEADERS)


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def caption_template(concept: str) -> tuple[str, str]:
    """(concept understood by the captioner, template with {caption}/{trigger}) for a preset."""
    from trainer import preset_info

    try:
        tmpl = preset_info(concept).get("caption_template")
    except OSError:
        tmpl = None
    if tmpl:
        tmpl = tmpl.replace("TOK", "{trigger}")
    cap_concept = concept if concept in ("face", "object", "style", "character") else "object"
    return cap_concept, tmpl


# ----- one image, one trigger ------------------------------------------------------------------------------------
def cards_of(records: list[Record]) -> list[dict]:
    """What the caption cards show: one dict (path, name, caption) per image."""
    return [{"path": r.path, "name": r.source_name, "caption": r.caption or ""} for r in records]


@locked  # one dataset edit at a time (ui/dataset_store.py)
def set_caption(folder: str, name: str, caption: str) -> bool:
    """Writes the caption of the image ``name`` (its shown, relative name); False when there is no such image."""
    recs = read_records(folder)
    hit = [r for r in recs if r.source_name == name]
    if not hit:
        return False
    hit[0].caption = (caption or "").strip()
    save_records(folder, recs)
    return True


@locked  # one dataset edit at a time (ui/dataset_store.py)
def remove_image(folder: str, name: str) -> bool:
    """Deletes one image of the dataset (and its .txt sidecar), by its shown name; False when it is not there."""
    recs = read_records(folder)
    hit = [r for r in recs if r.source_name == name]
    if not hit:
        return False
    _unlink(hit[0].path)
    _unlink(os.path.splitext(hit[0].path)[0] + ".txt")
    save_records(folder, [r for r in recs if r is not hit[0]])
    return True


def captions_trigger(folder: str, default: str = "TOK") -> str:
    """The trigger word the captions of ``folder`` were last written with (``default`` when never recorded)."""
    try:
        with open(os.path.join(folder, TRIGGER_FILE), encoding="utf-8") as f:
            return f.read(200).strip() or default
    except OSError:
        return default


def record_trigger(folder: str, trigger: str) -> None:
    with open(os.path.join(folder, TRIGGER_FILE), "w", encoding="utf-8") as f:
        f.write((trigger or "").strip())


@locked  # one dataset edit at a time (ui/dataset_store.py)
def rename_trigger(folder: str, new: str) -> tuple[int, str]:
    """Rewrites every caption of ``folder`` from the trigger they were written with to ``new`` (whole words,
    the trainer's one placeholder rule). Returns (captions changed, the old trigger)."""
    new = (new or "").strip()
    old = captions_trigger(folder)
    if not new or new == old:
        return 0, old
    recs = read_records(folder)
    changed = 0
    for r in recs:
        text = replace_word(r.caption or "", old, new)
        if text != (r.caption or ""):
            r.caption, changed = text, changed + 1
    if changed:
        save_records(folder, recs)
    record_trigger(folder, new)
    return changed, old


def lacking_trigger(records: list[Record], trigger: str, fallback: str = "") -> list[Record]:
    """The records whose training caption does not hold ``trigger`` as the trainer reads it (whole word, exact
    case); an empty caption trains on ``fallback`` (the instance prompt), as in the trainer."""
    from captioning.templates import contains_trigger

    return [r for r in records if not contains_trigger((r.caption or "").strip() or fallback, trigger)]


@locked  # one dataset edit at a time (ui/dataset_store.py)
def add_trigger(folder: str, concept: str, trigger: str, fallback: str = "") -> int:
    """Puts ``trigger`` into every caption that lacks it: an old trigger word (the one recorded, or ``TOK``) is
    renamed, else the concept's caption template adds it (the captioner's rule: 'a photo of TOK, <caption>',
    '<caption>, in the style of TOK'). Returns how many captions were changed."""
    from captioning.templates import apply_trigger, contains_trigger

    trigger = (trigger or "").strip()
    recs = read_records(folder)
    todo = lacking_trigger(recs, trigger, fallback)
    cap_concept, tmpl = caption_template(concept)
    olds = [w for w in dict.fromkeys([captions_trigger(folder), "TOK"]) if w != trigger]
    for r in todo:
        text = r.caption or ""
        old = next((w for w in olds if contains_trigger(text, w)), None)
        r.caption = replace_word(text, old, trigger) if old else apply_trigger(text, cap_concept, trigger=trigger,
                                                                               template=tmpl)
    if todo:
        save_records(folder, recs)
    record_trigger(folder, trigger)
    return len(todo)
