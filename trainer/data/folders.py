"""What the trainer reads from a folder: images with ``.txt``/``.caption`` sidecars, or an ImageFolder-style
``metadata.jsonl`` / ``metadata.csv``; and writing ``metadata.jsonl`` back.

Nothing here raises for bad user input: every problem with one entry becomes an :class:`IngestProblem` (file,
code, message, fix) and the good entries are still returned. Nothing is read outside the folder (``..``,
absolute paths, symlinks that point out).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional

from .images import ACCEPTED_FORMATS, is_image_name, is_unsupported_image_name
from .problems import JUNK_NAMES, IngestProblem, PathLike, Record, fmt_bytes, is_within

MAX_CAPTION_BYTES = 64 * 1024
MAX_METADATA_BYTES = 64 * 1024 * 1024
MAX_METADATA_LINE = 1024 * 1024


def _read_caption(path: str, shown: str, problems: list[IngestProblem]) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CAPTION_BYTES + 1)
    except OSError as e:
        problems.append(IngestProblem(shown, "unreadable_caption", f"Caption file '{shown}' could not be read "
                                      f"({e.strerror}).", "Check the file and upload it again."))
        return None
    if len(data) > MAX_CAPTION_BYTES:
        problems.append(IngestProblem(shown, "caption_too_large",
                                      f"Caption file '{shown}' is larger than {MAX_CAPTION_BYTES // 1024} KB; "
                                      "only the beginning was used.", "Keep captions to a sentence or two."))
        data = data[:MAX_CAPTION_BYTES]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if len(data) == MAX_CAPTION_BYTES and e.start >= len(data) - 3:  # cut inside the last character
            text = data[:e.start].decode("utf-8-sig", errors="replace")
        else:  # not UTF-8: most often a Windows editor's ANSI (cp1252 / Latin-1) text
            text = data.decode("cp1252", errors="replace")
            problems.append(IngestProblem(shown, "caption_not_utf8",
                                          f"Caption file '{shown}' is not UTF-8 text (invalid byte at position "
                                          f"{e.start}); it was read as Windows-1252/Latin-1, so check its accents.",
                                          "Save the caption file as UTF-8."))
    return text.replace("\x00", "").strip()


def collect_folder(folder: PathLike, max_files: int = 10_000) -> tuple[list[Record], list[IngestProblem]]:
    """Find the images under ``folder`` (sorted, sub-folders included) with their ``.txt`` sidecar captions.

    Hidden files/folders and ``__MACOSX`` are ignored. Symlinks are followed only when they resolve inside the
    folder; one pointing out gives a ``symlink_outside`` problem. Files with a known but unsupported image
    extension (HEIC, PSD...) give ``unsupported_format``. A caption file that is not UTF-8 is read as cp1252 and
    gives ``caption_not_utf8`` (the image is kept). Returns ``(records, problems)``.
    """
    root = os.path.realpath(os.fspath(folder))
    records: list[Record] = []
    problems: list[IngestProblem] = []
    if not os.path.isdir(root):
        problems.append(IngestProblem(os.fspath(folder), "not_a_folder",
                                      f"'{os.fspath(folder)}' is not a folder.", "Choose the folder with the images."))
        return records, problems

    candidates: list[tuple[str, str]] = []  # (relative posix path, absolute path)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        keep_dirs = []
        for d in sorted(dirnames):
            if d.startswith(".") or d == "__MACOSX":
                continue
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                if not is_within(full, root):
                    shown = PurePosixPath(*Path(rel_dir, d).parts).as_posix()
                    problems.append(IngestProblem(shown, "symlink_outside",
                                                  f"Folder '{shown}' is a link to a place outside the dataset "
                                                  "folder; it was ignored.",
                                                  "Copy the images into the dataset folder instead of linking."))
                continue  # links to inside would only duplicate (or loop)
            keep_dirs.append(d)
        dirnames[:] = keep_dirs
        for fn in filenames:
            if fn.startswith(".") or fn.lower() in JUNK_NAMES:
                continue
            rel = Path(rel_dir, fn).as_posix() if rel_dir else fn
            candidates.append((rel, os.path.join(dirpath, fn)))
    candidates.sort(key=lambda c: c[0])

    for rel, full in candidates:
        if is_unsupported_image_name(rel):
            problems.append(IngestProblem(rel, "unsupported_format",
                                          f"'{rel}' is in a format that is not supported; it was skipped.",
                                          "Convert it to JPEG, PNG, WebP, BMP, GIF or TIFF."))
            continue
        if not is_image_name(rel):
            continue
        if os.path.islink(full) and not is_within(full, root):
            problems.append(IngestProblem(rel, "symlink_outside",
                                          f"'{rel}' is a link to a file outside the dataset folder; it was skipped.",
                                          "Copy the image into the dataset folder instead of linking to it."))
            continue
        if not os.path.isfile(full):
            continue
        if len(records) >= max_files:
            problems.append(IngestProblem(rel, "too_many_files",
                                          f"The folder has more than {max_files} images; the rest were skipped.",
                                          f"Keep at most {max_files} images."))
            break
        caption = None
        stem = os.path.splitext(full)[0]
        for cext in (".txt", ".caption"):
            side = stem + cext
            if os.path.lexists(side):
                side_rel = os.path.splitext(rel)[0] + cext
                if os.path.islink(side) and not is_within(side, root):
                    problems.append(IngestProblem(side_rel, "symlink_outside",
                                                  f"Caption '{side_rel}' links to a file outside the dataset "
                                                  "folder; it was ignored.",
                                                  "Copy the caption file into the dataset folder."))
                    break
                if os.path.isfile(side):
                    caption = _read_caption(side, side_rel, problems)
                break
        records.append(Record(path=full, caption=caption, source_name=rel))
    return records, problems


# --------------------------------------------------------------------------------------------------------------
# metadata.jsonl

def _meta_path_parts(value: str) -> Optional[list[str]]:
    v = value.replace("\\", "/")
    if v.startswith("/") or re.match(r"^[A-Za-z]:", v) or "\x00" in v:
        return None
    parts = [p for p in v.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return parts


def _metadata_row(obj: dict, where: str, root: str, seen: set, caption_column: str, image_column: str,
                  add) -> Optional[Record]:
    """The record of one metadata row (a JSON object or a CSV row), or None after reporting why it was skipped."""
    cols = ", ".join(sorted(map(str, obj.keys()))) or "none"
    meta = where.split(" line ")[0]
    value = obj.get(image_column)
    if not isinstance(value, str) or not value.strip():
        add(where, "missing_file_name", f"{where} has no '{image_column}' text value (columns present: {cols}).",
            f"Add \"{image_column}\": \"<image file name>\" to that line.")
        return None
    shown = value.strip()
    parts = _meta_path_parts(shown)
    if parts is None:
        add(shown, "unsafe_path",
            f"{where}: '{shown}' points outside the dataset folder (absolute path or '..'); skipped.",
            f"Use a path relative to the folder that contains {meta}, e.g. \"images/a.png\".")
        return None
    rel = "/".join(parts)
    full = os.path.join(root, *parts)
    if not is_within(full, root):
        add(rel, "symlink_outside", f"{where}: '{rel}' is a link to a file outside the dataset folder; skipped.",
            "Copy the image into the dataset folder instead of linking to it.")
        return None
    if not os.path.exists(full):
        add(rel, "missing_file", f"{where}: the image '{rel}' does not exist in the dataset folder.",
            f"Upload that image or remove its line from {meta}.")
        return None
    if not os.path.isfile(full):
        add(rel, "not_an_image", f"{where}: '{rel}' is not a file.", "Point file_name at an image file.")
        return None
    if not is_image_name(rel):
        add(rel, "not_an_image", f"{where}: '{rel}' does not have an image extension "
            f"({', '.join(f.lower() for f in ACCEPTED_FORMATS)}).",
            "Point file_name at an image file or convert the file.")
        return None
    if rel.casefold() in seen:
        add(rel, "duplicate_entry", f"{where}: '{rel}' is listed more than once; the first line was used.",
            "Remove the duplicate line.")
        return None
    seen.add(rel.casefold())
    caption: Optional[str] = None
    if caption_column not in obj:
        add(rel, "missing_caption_column",
            f"{where}: no '{caption_column}' caption column for '{rel}' (columns present: {cols}); "
            "the image is used without a caption.",
            f"Add \"{caption_column}\": \"...\" or choose one of the present columns as the caption column.")
    else:
        c = obj[caption_column]
        if isinstance(c, str):
            caption = c.strip()
        elif c is not None:
            add(rel, "bad_caption", f"{where}: the caption of '{rel}' is a {type(c).__name__}, not text; it was "
                "ignored.", f"Make \"{caption_column}\" a plain string.")
    return Record(path=full, caption=caption, source_name=rel)


def _open_metadata(folder: PathLike, name: str, add):
    """(root, open binary file) of ``<folder>/<name>``, or (root, None) after reporting why it cannot be read."""
    root = os.path.realpath(os.fspath(folder))
    meta = os.path.join(root, name)
    if not os.path.isfile(meta):
        add(name, "missing_metadata", f"There is no {name} in '{os.fspath(folder)}'.",
            "Add a metadata.jsonl with one {\"file_name\": ..., \"text\": ...} object per line (or a "
            "metadata.csv with file_name,text columns), or use .txt caption files.")
        return root, None
    if not is_within(meta, root):
        add(name, "symlink_outside", f"{name} links to a file outside the dataset folder.",
            f"Put the real {name} file in the dataset folder.")
        return root, None
    try:
        size = os.path.getsize(meta)
    except OSError:
        size = 0
    if size > MAX_METADATA_BYTES:
        add(name, "metadata_too_large", f"{name} is {fmt_bytes(size)}; at most {fmt_bytes(MAX_METADATA_BYTES)} is "
            "read.", "Keep only the file name and caption columns.")
        return root, None
    try:
        return root, open(meta, "rb")
    except OSError as e:
        add(name, "missing_metadata", f"{name} could not be read ({e.strerror}).",
            "Check the file and upload it again.")
        return root, None


def read_metadata_jsonl(
    folder: PathLike, caption_column: str = "text", image_column: str = "file_name"
) -> tuple[list[Record], list[IngestProblem]]:
    """Read an ImageFolder-style ``<folder>/metadata.jsonl``; one problem per bad line, good lines returned.

    Codes: ``missing_metadata``, ``metadata_too_large``, ``bad_json`` (with line number), ``missing_file_name``,
    ``missing_caption_column`` (record kept without caption; available columns named), ``bad_caption``,
    ``unsafe_path`` (absolute or ``..``), ``symlink_outside``, ``missing_file``, ``not_an_image``,
    ``duplicate_entry``.
    """
    records: list[Record] = []
    problems: list[IngestProblem] = []

    def add(file: str, code: str, message: str, fix: str) -> None:
        problems.append(IngestProblem(file, code, message, fix))

    root, f = _open_metadata(folder, "metadata.jsonl", add)
    if f is None:
        return records, problems
    seen: set[str] = set()
    with f:
        lineno = 0
        while True:
            raw = f.readline(MAX_METADATA_LINE + 1)
            if not raw:
                break
            lineno += 1
            where = f"metadata.jsonl line {lineno}"
            if len(raw) > MAX_METADATA_LINE and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of the overlong line
                    raw = f.readline(MAX_METADATA_LINE)
                add(where, "bad_json", f"{where} is longer than {fmt_bytes(MAX_METADATA_LINE)}; it was skipped.",
                    "Keep one short JSON object per line.")
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                add(where, "bad_json", f"{where} is not valid UTF-8 text.", "Save metadata.jsonl as UTF-8.")
                continue
            if not line:
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as e:
                add(where, "bad_json", f"{where} is not valid JSON ({e}).",
                    "Fix that line: each line must be one JSON object like "
                    "{\"file_name\": \"a.png\", \"text\": \"a photo of TOK\"}.")
                continue
            if not isinstance(obj, dict):
                add(where, "bad_json", f"{where} is JSON but not an object ({type(obj).__name__}).",
                    "Each line must be one JSON object like {\"file_name\": \"a.png\", \"text\": \"...\"}.")
                continue
            rec = _metadata_row(obj, where, root, seen, caption_column, image_column, add)
            if rec is not None:
                records.append(rec)
    return records, problems


def read_metadata_csv(
    folder: PathLike, caption_column: str = "text", image_column: str = "file_name"
) -> tuple[list[Record], list[IngestProblem]]:
    """Read an ImageFolder-style ``<folder>/metadata.csv`` (a header row naming the columns, as ``datasets``'
    imagefolder reads it); the same codes as :func:`read_metadata_jsonl`, ``bad_csv`` for a malformed file."""
    records: list[Record] = []
    problems: list[IngestProblem] = []

    def add(file: str, code: str, message: str, fix: str) -> None:
        problems.append(IngestProblem(file, code, message, fix))

    root, f = _open_metadata(folder, "metadata.csv", add)
    if f is None:
        return records, problems
    with f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        add("metadata.csv", "bad_csv", f"metadata.csv is not valid UTF-8 text (byte {e.start}).",
            "Save metadata.csv as UTF-8.")
        return records, problems
    seen: set[str] = set()
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            where = f"metadata.csv line {reader.line_num}"
            obj = {str(k).strip(): v for k, v in row.items() if k is not None}  # None: cells beyond the header
            rec = _metadata_row(obj, where, root, seen, caption_column, image_column, add)
            if rec is not None:
                records.append(rec)
    except csv.Error as e:
        add(f"metadata.csv line {reader.line_num}", "bad_csv", f"metadata.csv line {reader.line_num} is not valid "
            f"CSV ({e}); the rest of the file was skipped.", "Quote captions that contain commas or quotes.")
    return records, problems


def write_metadata_jsonl(folder: PathLike, records: Iterable[Record]) -> str:
    """Atomically write ``<folder>/metadata.jsonl`` with ``{"file_name": relpath, "text": caption}`` lines.

    Paths are written relative to ``folder`` with ``/`` separators; a record outside the folder raises
    ``ValueError`` (nothing is written). A ``None`` caption is written as ``""``. Returns the file path.
    """
    root = os.path.realpath(os.fspath(folder))
    lines = []
    for r in records:
        p = os.path.realpath(os.path.join(root, r.path)) if not os.path.isabs(r.path) else os.path.realpath(r.path)
        if not is_within(p, root):
            raise ValueError(f"{r.path!r} is outside {root!r}")
        rel = Path(os.path.relpath(p, root)).as_posix()
        lines.append(json.dumps({"file_name": rel, "text": r.caption or ""}, ensure_ascii=False))
    target = os.path.join(root, "metadata.jsonl")
    fd, tmp = tempfile.mkstemp(prefix=".metadata-", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + ("\n" if lines else ""))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        tmp = None
        try:  # make the rename durable; not possible on every platform
            dfd = os.open(root, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return target


def collect_dataset(
    folder: PathLike, caption_column: str = "text", image_column: str = "file_name"
) -> tuple[list[Record], list[IngestProblem]]:
    """``read_metadata_jsonl`` when the folder has a metadata.jsonl, else ``read_metadata_csv`` when it has a
    metadata.csv, otherwise ``collect_folder``."""
    for name, read in (("metadata.jsonl", read_metadata_jsonl), ("metadata.csv", read_metadata_csv)):
        if os.path.isfile(os.path.join(os.fspath(folder), name)):
            return read(folder, caption_column=caption_column, image_column=image_column)
    return collect_folder(folder)
