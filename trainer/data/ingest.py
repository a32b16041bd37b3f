"""Safe ingestion of untrusted uploads: zip archives, folders and ImageFolder-style ``metadata.jsonl``.

Nothing here raises for bad user input: every problem with one entry becomes an :class:`IngestProblem` (file, code,
message, fix) and the good entries are still returned. Guarantees:

* nothing is written or read outside the target folder (zip slip, absolute paths, ``..``, symlinks that point out);
* a zip bomb cannot fill the disk: declared sizes and compression ratios are checked first, then the bytes really
  written are counted while streaming, so a lying header is stopped at the limit;
* written file names are sanitised (:func:`safe_filename`) and never overwrite each other or existing files.

Zip layout: sub-folders are kept (each path component is sanitised), so ``a/x.png`` + ``a/x.txt`` and a
``metadata.jsonl`` referring to ``a/x.png`` keep working. :func:`collect_folder` walks sub-folders too.
"""
from __future__ import annotations

import json
import os
import re
import stat
import tempfile
import unicodedata
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional, Union

from .images import ACCEPTED_FORMATS, is_image_name, is_unsupported_image_name

__all__ = [
    "IngestProblem",
    "ExtractResult",
    "Record",
    "safe_filename",
    "safe_extract_zip",
    "collect_folder",
    "collect_dataset",
    "read_metadata_jsonl",
    "write_metadata_jsonl",
    "CAPTION_EXTENSIONS",
]

PathLike = Union[str, os.PathLike]

#: Non-image files that are extracted from a zip (captions and dataset metadata).
CAPTION_EXTENSIONS = frozenset({".txt", ".caption"})
METADATA_NAMES = frozenset({"metadata.jsonl", "metadata.json", "metadata.csv"})
MAX_ZIP_DEPTH = 8
MAX_CAPTION_BYTES = 64 * 1024
MAX_METADATA_BYTES = 64 * 1024 * 1024
MAX_METADATA_LINE = 1024 * 1024
_CHUNK = 1024 * 1024
_JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini"})


class ProblemText:
    """What every problem dataclass shows the user: the message, then the fix; and its dict form."""

    def __str__(self) -> str:
        return f"{self.message} Fix: {self.fix}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class IngestProblem(ProblemText):
    file: str  # the name the user knows (zip entry name, relative path, "metadata.jsonl line 3")
    code: str
    message: str
    fix: str


@dataclass
class ExtractResult:
    extracted: list[str] = field(default_factory=list)  # absolute paths of the files written
    problems: list[IngestProblem] = field(default_factory=list)


@dataclass
class Record:
    path: str  # absolute path of the image
    caption: Optional[str] = None  # None = no caption given (as opposed to an empty one)
    source_name: str = ""  # what to show the user: path relative to the dataset folder


# --------------------------------------------------------------------------------------------------------------
# file names

_WINDOWS_RESERVED = frozenset(
    {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
)
_FORBIDDEN_CHARS = set('/\\:*?"<>|')
_EXT_RE = re.compile(r"^\.[A-Za-z0-9]{1,10}$")
MAX_NAME_BYTES = 200  # well below the usual 255-byte file system limit, leaving room for temp prefixes


def _clean_component(name: str) -> str:
    name = unicodedata.normalize("NFC", str(name))
    out = []
    for ch in name:
        cat = unicodedata.category(ch)
        if ch in _FORBIDDEN_CHARS or cat[0] == "C" or cat in ("Zl", "Zp"):
            out.append("_")
        elif cat == "Zs":
            out.append(" ")
        else:
            out.append(ch)
    cleaned = re.sub(r"\s+", " ", "".join(out))
    return cleaned.strip(" .")  # no leading dots (hidden files, "..") and no trailing dots/spaces (Windows)


def _split_ext(name: str) -> tuple[str, str]:
    stem, ext = os.path.splitext(name)
    if ext and _EXT_RE.match(ext) and stem:
        return stem, ext
    return name, ""


def _fit(stem: str, ext: str, max_len: int) -> str:
    """Truncate ``stem`` so that ``stem + ext`` fits both ``max_len`` characters and MAX_NAME_BYTES bytes."""
    max_len = max(max_len, len(ext) + 1)
    stem = stem[: max_len - len(ext)]
    while stem and len((stem + ext).encode("utf-8")) > MAX_NAME_BYTES:
        stem = stem[:-1]
    stem = stem.rstrip(" .")
    return (stem or "file") + ext


def safe_filename(name: str, max_len: int = 120, taken: Optional[set] = None) -> str:
    """Return a safe single file-name component for ``name``.

    Keeps unicode letters/digits and ordinary punctuation; replaces path separators, control/format characters and
    characters Windows forbids with ``_``; strips leading dots and trailing dots/spaces; avoids Windows reserved
    names; truncates long names keeping the extension (at most ``max_len`` characters and 200 UTF-8 bytes).
    When ``taken`` (a set of names already used, compared case-insensitively) is given, a ``-1``, ``-2``, ...
    suffix is added before the extension until the name is free, and the chosen name is added to ``taken``.
    """
    cleaned = _clean_component(name) or "file"
    stem, ext = _split_ext(cleaned)
    if stem.split(".")[0].lower() in _WINDOWS_RESERVED:
        stem = "_" + stem
    ext = ext.lower() if ext.upper() == ext else ext
    candidate = _fit(stem, ext, max_len)
    if taken is None:
        return candidate
    folded = {t.casefold() for t in taken}
    base_stem = _split_ext(candidate)[0] if ext else candidate
    i = 0
    while candidate.casefold() in folded:
        i += 1
        suffix = f"-{i}"
        candidate = _fit(base_stem[: max(1, max_len - len(ext) - len(suffix))], suffix + ext, max_len)
        if i > 100_000:  # pragma: no cover - defensive
            raise RuntimeError("could not find a free file name")
    taken.add(candidate)
    return candidate


# --------------------------------------------------------------------------------------------------------------
# zip extraction

def _is_within(child: str, parent: str) -> bool:
    try:
        return os.path.commonpath([os.path.realpath(child), os.path.realpath(parent)]) == os.path.realpath(parent)
    except ValueError:  # different drives on Windows
        return False


def _entry_kind(info: zipfile.ZipInfo) -> str:
    """'dir', 'symlink', 'special' or 'file' from the zip entry's Unix mode bits (when the creator was Unix)."""
    if info.is_dir():
        return "dir"
    mode = (info.external_attr >> 16) & 0xFFFF
    ftype = stat.S_IFMT(mode)
    if ftype == stat.S_IFLNK:
        return "symlink"
    if ftype and ftype != stat.S_IFREG:
        return "special"
    return "file"


def _zip_parts(name: str) -> Optional[list[str]]:
    """Split an entry name into components; None when it is absolute or climbs out (``..``)."""
    n = name.replace("\\", "/")
    if n.startswith("/") or re.match(r"^[A-Za-z]:", n) or "\x00" in n:
        return None
    parts = [p for p in n.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        return None
    return parts


def _wanted(parts: list[str]) -> str:
    """'skip' (silently), 'keep', 'unsupported_image' or 'other' for an entry's path components."""
    if parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
        return "skip"
    leaf = parts[-1]
    if leaf.lower() in _JUNK_NAMES:
        return "skip"
    ext = os.path.splitext(leaf)[1].lower()
    if is_image_name(leaf) or ext in CAPTION_EXTENSIONS or leaf.lower() in METADATA_NAMES:
        return "keep"
    if is_unsupported_image_name(leaf):
        return "unsupported_image"
    return "other"


def _fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # pragma: no cover


def safe_extract_zip(
    zip_path: PathLike,
    dest_dir: PathLike,
    max_files: int = 2000,
    max_total_bytes: int = 2 * 1024**3,
    max_ratio: float = 200,
) -> ExtractResult:
    """Extract the images, captions and metadata of an untrusted zip into ``dest_dir``.

    Per-entry problems (entry skipped, others still extracted): ``unsafe_path`` (absolute or ``..``), ``symlink``,
    ``special_file``, ``too_deep``, ``zip_bomb`` (one entry's compression ratio over ``max_ratio``, or more bytes
    than its header declared), ``encrypted``, ``bad_entry`` (damaged data / CRC error), ``unsupported_format``,
    ``skipped_file`` (not an image or caption). Whole-archive problems (nothing extracted): ``bad_zip``,
    ``too_many_files`` (more than ``max_files`` usable entries), ``too_large`` (declared total over
    ``max_total_bytes``). While streaming, actual bytes are counted; when the total limit is reached the current
    entry is deleted and extraction stops with ``too_large``.
    Silently ignored: directories, ``__MACOSX/``, dotfiles, Thumbs.db/desktop.ini.
    """
    result = ExtractResult()
    zip_name = os.path.basename(os.fspath(zip_path))
    dest = os.path.realpath(os.fspath(dest_dir))

    def problem(file: str, code: str, message: str, fix: str) -> None:
        result.problems.append(IngestProblem(file, code, message, fix))

    try:
        os.makedirs(dest, exist_ok=True)
        zf = zipfile.ZipFile(os.fspath(zip_path))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        problem(zip_name, "bad_zip", f"'{zip_name}' is not a valid zip archive ({e}).",
                "Re-create the zip with a standard tool (e.g. 'Compress' / 'Send to > Compressed folder') "
                "and upload it again.")
        return result

    with zf:
        try:
            infos = zf.infolist()
        except Exception as e:  # noqa: BLE001
            problem(zip_name, "bad_zip", f"'{zip_name}' has a damaged table of contents ({e}).",
                    "Re-create the zip and upload it again.")
            return result

        # ---- pass 1: classify entries, without writing anything
        plan: list[tuple[zipfile.ZipInfo, list[str]]] = []
        for info in infos:
            shown = info.filename
            kind = _entry_kind(info)
            if kind == "dir":
                continue
            parts = _zip_parts(info.filename)
            if parts is None:
                problem(shown, "unsafe_path",
                        f"Zip entry '{shown}' points outside the upload folder (absolute path or '..'); it was "
                        "not extracted.",
                        "Zip the images with paths relative to the folder that contains them.")
                continue
            if not parts:
                continue
            want = _wanted(parts)
            if want == "skip":
                continue
            if kind == "symlink":
                problem(shown, "symlink", f"Zip entry '{shown}' is a symbolic link; links are not extracted.",
                        "Put the real image file in the zip instead of a link to it.")
                continue
            if kind == "special":
                problem(shown, "special_file", f"Zip entry '{shown}' is not a regular file; it was not extracted.",
                        "Only put image and caption files in the zip.")
                continue
            if len(parts) > MAX_ZIP_DEPTH:
                problem(shown, "too_deep",
                        f"Zip entry '{shown}' is nested more than {MAX_ZIP_DEPTH} folders deep; it was not "
                        "extracted.", "Move the images into fewer nested folders.")
                continue
            if want == "unsupported_image":
                problem(shown, "unsupported_format",
                        f"'{shown}' is in a format that is not supported; it was not extracted.",
                        "Convert it to JPEG, PNG, WebP, BMP, GIF or TIFF and upload it again.")
                continue
            if want == "other":
                problem(shown, "skipped_file",
                        f"'{shown}' is not an image or a caption (.txt) file; it was ignored.",
                        "Nothing to do if this file is not part of the dataset.")
                continue
            if info.flag_bits & 0x1:
                problem(shown, "encrypted", f"Zip entry '{shown}' is password-protected; it was not extracted.",
                        "Create the zip without a password.")
                continue
            if info.file_size > max(info.compress_size, 1) * max_ratio and info.file_size > _CHUNK:
                problem(shown, "zip_bomb",
                        f"Zip entry '{shown}' expands from {_fmt_bytes(info.compress_size)} to "
                        f"{_fmt_bytes(info.file_size)} (more than {max_ratio:g}x); this looks like a zip bomb and "
                        "it was not extracted.",
                        "Upload ordinary compressed images (JPEG/PNG/WebP), not padded or generated files.")
                continue
            plan.append((info, parts))

        if len(plan) > max_files:
            problem(zip_name, "too_many_files",
                    f"'{zip_name}' contains {len(plan)} images/captions; at most {max_files} are accepted. "
                    "Nothing was extracted.",
                    f"Split the dataset or keep the best {max_files} files.")
            return result
        declared = sum(i.file_size for i, _ in plan)
        if declared > max_total_bytes:
            problem(zip_name, "too_large",
                    f"'{zip_name}' would expand to {_fmt_bytes(declared)}, more than the "
                    f"{_fmt_bytes(max_total_bytes)} limit. Nothing was extracted.",
                    "Resize the images (2048 px on the long side is plenty) or upload fewer of them.")
            return result

        # ---- pass 2: stream each entry into a temp file, counting real bytes
        taken_by_dir: dict[str, set] = {}
        stem_map: dict[tuple[str, str], str] = {}  # (original dir, original stem) -> new stem, keeps pairs
        dir_map: dict[str, str] = {}  # original dir (posix) -> sanitised relative dir
        written_total = 0
        for info, parts in plan:
            shown = info.filename
            # sanitise directories, keeping a stable mapping
            rel_dir = ""
            orig_dir = ""
            for comp in parts[:-1]:
                orig_dir = f"{orig_dir}/{comp}" if orig_dir else comp
                if orig_dir not in dir_map:
                    parent_taken = taken_by_dir.setdefault(rel_dir, _existing_names(os.path.join(dest, rel_dir)))
                    new_comp = safe_filename(comp)
                    cand_path = os.path.join(dest, rel_dir, new_comp)
                    is_real_dir = os.path.isdir(cand_path) and not os.path.islink(cand_path)
                    if is_real_dir or new_comp.casefold() not in {t.casefold() for t in parent_taken}:
                        parent_taken.add(new_comp)  # new folder, or merge into an existing real folder
                    else:  # the name is used by a file or a link: pick a free one
                        new_comp = safe_filename(comp, taken=parent_taken)
                    dir_map[orig_dir] = os.path.join(rel_dir, new_comp) if rel_dir else new_comp
                rel_dir = dir_map[orig_dir]
            target_dir = os.path.join(dest, rel_dir) if rel_dir else dest
            try:
                os.makedirs(target_dir, exist_ok=True)
            except OSError as e:
                problem(shown, "bad_entry", f"Could not create a folder for '{shown}' ({e.strerror}).",
                        "Rename the folders inside the zip to simple names.")
                continue
            if not _is_within(target_dir, dest) or os.path.islink(target_dir):
                problem(shown, "unsafe_path", f"Zip entry '{shown}' would be written outside the upload folder.",
                        "Zip the images with paths relative to the folder that contains them.")
                continue

            leaf = parts[-1]
            taken = taken_by_dir.setdefault(rel_dir, _existing_names(target_dir))
            orig_stem, orig_ext = _split_ext(_clean_component(leaf) or "file")
            key = (orig_dir, orig_stem.casefold())
            if key in stem_map:
                cand = safe_filename(stem_map[key] + orig_ext)
                new_name = cand if cand.casefold() not in {t.casefold() for t in taken} else \
                    safe_filename(leaf, taken=taken)
                if new_name == cand:
                    taken.add(cand)
            else:
                new_name = safe_filename(leaf, taken=taken)
                stem_map[key] = _split_ext(new_name)[0]
            final_path = os.path.join(target_dir, new_name)
            if not _is_within(final_path, dest):
                problem(shown, "unsafe_path", f"Zip entry '{shown}' would be written outside the upload folder.",
                        "Zip the images with paths relative to the folder that contains them.")
                continue

            budget = max_total_bytes - written_total
            limit = min(info.file_size, budget)
            tmp_path = None
            try:
                fd, tmp_path = tempfile.mkstemp(prefix=".extract-", suffix=".part", dir=target_dir)
                written = 0
                over = False
                with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                    while True:
                        chunk = src.read(min(_CHUNK, limit - written + 1))
                        if not chunk:
                            break
                        written += len(chunk)
                        if written > limit:
                            over = True
                            break
                        out.write(chunk)
                if over:
                    os.unlink(tmp_path)
                    tmp_path = None
                    if written_total + written > max_total_bytes:
                        problem(shown, "too_large",
                                f"Extraction stopped at '{shown}': the files expand to more than "
                                f"{_fmt_bytes(max_total_bytes)}. Files after it were not extracted.",
                                "Resize the images or upload fewer of them.")
                        break
                    problem(shown, "zip_bomb",
                            f"Zip entry '{shown}' contains more data than its header declares "
                            f"({_fmt_bytes(info.file_size)}); it looks like a zip bomb and was not extracted.",
                            "Re-create the zip with a standard tool.")
                    continue
                os.replace(tmp_path, final_path)
                tmp_path = None
                written_total += written
                result.extracted.append(final_path)
            except RuntimeError as e:  # encrypted entries without the flag we checked, etc.
                problem(shown, "encrypted" if "encrypt" in str(e).lower() or "password" in str(e).lower()
                        else "bad_entry", f"Zip entry '{shown}' could not be extracted ({e}).",
                        "Create the zip without a password using a standard tool.")
            except NotImplementedError as e:
                problem(shown, "bad_entry", f"Zip entry '{shown}' uses an unsupported compression method ({e}).",
                        "Re-create the zip with standard (deflate) compression.")
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, Exception) as e:  # noqa: BLE001
                problem(shown, "bad_entry", f"Zip entry '{shown}' is damaged and could not be extracted ({e}).",
                        "Re-create the zip and upload it again.")
            finally:
                if tmp_path is not None:
                    try:
                        os.unlink(tmp_path)
                    except OSError:
                        pass
    return result


def _existing_names(directory: str) -> set:
    try:
        return set(os.listdir(directory))
    except OSError:
        return set()


# --------------------------------------------------------------------------------------------------------------
# folders

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
                if not _is_within(full, root):
                    shown = PurePosixPath(*Path(rel_dir, d).parts).as_posix()
                    problems.append(IngestProblem(shown, "symlink_outside",
                                                  f"Folder '{shown}' is a link to a place outside the dataset "
                                                  "folder; it was ignored.",
                                                  "Copy the images into the dataset folder instead of linking."))
                continue  # links to inside would only duplicate (or loop)
            keep_dirs.append(d)
        dirnames[:] = keep_dirs
        for fn in filenames:
            if fn.startswith(".") or fn.lower() in _JUNK_NAMES:
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
        if os.path.islink(full) and not _is_within(full, root):
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
                if os.path.islink(side) and not _is_within(side, root):
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


def read_metadata_jsonl(
    folder: PathLike, caption_column: str = "text", image_column: str = "file_name"
) -> tuple[list[Record], list[IngestProblem]]:
    """Read an ImageFolder-style ``<folder>/metadata.jsonl``; one problem per bad line, good lines returned.

    Codes: ``missing_metadata``, ``metadata_too_large``, ``bad_json`` (with line number), ``missing_file_name``,
    ``missing_caption_column`` (record kept without caption; available columns named), ``bad_caption``,
    ``unsafe_path`` (absolute or ``..``), ``symlink_outside``, ``missing_file``, ``not_an_image``,
    ``duplicate_entry``.
    """
    root = os.path.realpath(os.fspath(folder))
    meta = os.path.join(root, "metadata.jsonl")
    records: list[Record] = []
    problems: list[IngestProblem] = []

    def add(file: str, code: str, message: str, fix: str) -> None:
        problems.append(IngestProblem(file, code, message, fix))

    if not os.path.isfile(meta):
        add("metadata.jsonl", "missing_metadata", f"There is no metadata.jsonl in '{os.fspath(folder)}'.",
            "Add a metadata.jsonl with one {\"file_name\": ..., \"text\": ...} object per line, or use .txt "
            "caption files.")
        return records, problems
    if not _is_within(meta, root):
        add("metadata.jsonl", "symlink_outside", "metadata.jsonl links to a file outside the dataset folder.",
            "Put the real metadata.jsonl file in the dataset folder.")
        return records, problems
    try:
        size = os.path.getsize(meta)
    except OSError:
        size = 0
    if size > MAX_METADATA_BYTES:
        add("metadata.jsonl", "metadata_too_large",
            f"metadata.jsonl is {_fmt_bytes(size)}; at most {_fmt_bytes(MAX_METADATA_BYTES)} is read.",
            "Keep only the file name and caption columns.")
        return records, problems

    seen: set[str] = set()
    try:
        f = open(meta, "rb")
    except OSError as e:
        add("metadata.jsonl", "missing_metadata", f"metadata.jsonl could not be read ({e.strerror}).",
            "Check the file and upload it again.")
        return records, problems
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
                add(where, "bad_json", f"{where} is longer than {_fmt_bytes(MAX_METADATA_LINE)}; it was skipped.",
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
            cols = ", ".join(sorted(map(str, obj.keys()))) or "none"
            value = obj.get(image_column)
            if not isinstance(value, str) or not value.strip():
                add(where, "missing_file_name",
                    f"{where} has no '{image_column}' text value (columns present: {cols}).",
                    f"Add \"{image_column}\": \"<image file name>\" to that line.")
                continue
            shown = value.strip()
            parts = _meta_path_parts(shown)
            if parts is None:
                add(shown, "unsafe_path",
                    f"{where}: '{shown}' points outside the dataset folder (absolute path or '..'); skipped.",
                    "Use a path relative to the folder that contains metadata.jsonl, e.g. \"images/a.png\".")
                continue
            rel = "/".join(parts)
            full = os.path.join(root, *parts)
            if not _is_within(full, root):
                add(rel, "symlink_outside",
                    f"{where}: '{rel}' is a link to a file outside the dataset folder; skipped.",
                    "Copy the image into the dataset folder instead of linking to it.")
                continue
            if not os.path.exists(full):
                add(rel, "missing_file", f"{where}: the image '{rel}' does not exist in the dataset folder.",
                    "Upload that image or remove its line from metadata.jsonl.")
                continue
            if not os.path.isfile(full):
                add(rel, "not_an_image", f"{where}: '{rel}' is not a file.",
                    "Point file_name at an image file.")
                continue
            if not is_image_name(rel):
                add(rel, "not_an_image",
                    f"{where}: '{rel}' does not have an image extension "
                    f"({', '.join(f.lower() for f in ACCEPTED_FORMATS)}).",
                    "Point file_name at an image file or convert the file.")
                continue
            if rel.casefold() in seen:
                add(rel, "duplicate_entry", f"{where}: '{rel}' is listed more than once; the first line was used.",
                    "Remove the duplicate line.")
                continue
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
                elif c is None:
                    caption = None
                else:
                    add(rel, "bad_caption",
                        f"{where}: the caption of '{rel}' is a {type(c).__name__}, not text; it was ignored.",
                        f"Make \"{caption_column}\" a plain string.")
            records.append(Record(path=full, caption=caption, source_name=rel))
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
        if not _is_within(p, root):
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
    """``read_metadata_jsonl`` when the folder has a metadata.jsonl, otherwise ``collect_folder``."""
    if os.path.isfile(os.path.join(os.fspath(folder), "metadata.jsonl")):
        return read_metadata_jsonl(folder, caption_column=caption_column, image_column=image_column)
    return collect_folder(folder)
