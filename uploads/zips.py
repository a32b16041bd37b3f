"""Safe extraction of untrusted zip uploads.

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

import os
import re
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Optional

from trainer.data.images import is_image_name, is_unsupported_image_name
from trainer.data.problems import (CAPTION_EXTENSIONS, JUNK_NAMES, METADATA_NAMES, IngestProblem, PathLike,
                                   fmt_bytes, is_within)

from .names import clean_component, safe_filename, split_ext
from .store import DISK_FULL_MESSAGE, is_disk_full

MAX_ZIP_DEPTH = 8
_CHUNK = 1024 * 1024
_TINY = 16 * 1024  # entries up to this size skip the per-entry ratio (the archive's own ratio still counts)


@dataclass
class ExtractResult:
    extracted: list[str] = field(default_factory=list)  # absolute paths of the files written
    problems: list[IngestProblem] = field(default_factory=list)


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
    if leaf.lower() in JUNK_NAMES:
        return "skip"
    ext = os.path.splitext(leaf)[1].lower()
    if is_image_name(leaf) or ext in CAPTION_EXTENSIONS or leaf.lower() in METADATA_NAMES:
        return "keep"
    if is_unsupported_image_name(leaf):
        return "unsupported_image"
    return "other"


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
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)  # an OSError's text holds a path
        problem(zip_name, "bad_zip", f"'{zip_name}' is not a valid zip archive ({why}).",
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
            # Every entry, small ones too: 400 entries of 900 KiB made of zeros are a 450 KB zip writing 360 MB.
            # Only entries too small to matter (a caption, a tiny icon) are spared the ratio.
            if info.file_size > max(info.compress_size, 1) * max_ratio and info.file_size > _TINY:
                problem(shown, "zip_bomb",
                        f"Zip entry '{shown}' expands from {fmt_bytes(info.compress_size)} to "
                        f"{fmt_bytes(info.file_size)} (more than {max_ratio:g}x); this looks like a zip bomb and "
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
        archive_size = max(1, _file_size(zip_path))
        if declared > _CHUNK and declared > archive_size * max_ratio:  # many tiny entries that each pass
            problem(zip_name, "zip_bomb",
                    f"'{zip_name}' ({fmt_bytes(archive_size)}) would expand to {fmt_bytes(declared)} (more than "
                    f"{max_ratio:g}x); this looks like a zip bomb. Nothing was extracted.",
                    "Upload ordinary compressed images (JPEG/PNG/WebP), not padded or generated files.")
            return result
        if declared > max_total_bytes:
            problem(zip_name, "too_large",
                    f"'{zip_name}' would expand to {fmt_bytes(declared)}, more than the "
                    f"{fmt_bytes(max_total_bytes)} limit. Nothing was extracted.",
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
            if not is_within(target_dir, dest) or os.path.islink(target_dir):
                problem(shown, "unsafe_path", f"Zip entry '{shown}' would be written outside the upload folder.",
                        "Zip the images with paths relative to the folder that contains them.")
                continue

            leaf = parts[-1]
            taken = taken_by_dir.setdefault(rel_dir, _existing_names(target_dir))
            orig_stem, orig_ext = split_ext(clean_component(leaf) or "file")
            key = (orig_dir, orig_stem.casefold())
            if key in stem_map:
                cand = safe_filename(stem_map[key] + orig_ext)
                new_name = cand if cand.casefold() not in {t.casefold() for t in taken} else \
                    safe_filename(leaf, taken=taken)
                if new_name == cand:
                    taken.add(cand)
            else:
                new_name = safe_filename(leaf, taken=taken)
                stem_map[key] = split_ext(new_name)[0]
            final_path = os.path.join(target_dir, new_name)
            if not is_within(final_path, dest):
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
                                f"{fmt_bytes(max_total_bytes)}. Files after it were not extracted.",
                                "Resize the images or upload fewer of them.")
                        break
                    problem(shown, "zip_bomb",
                            f"Zip entry '{shown}' contains more data than its header declares "
                            f"({fmt_bytes(info.file_size)}); it looks like a zip bomb and was not extracted.",
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
            except OSError as e:
                if is_disk_full(e):  # no room: stop here, the partial entry is deleted below
                    problem(shown, "disk_full", DISK_FULL_MESSAGE, "Free some space, then upload the zip again.")
                    break
                why = e.strerror or "read error"
                problem(shown, "bad_entry", f"Zip entry '{shown}' could not be extracted ({why}).",
                        "Re-create the zip and upload it again.")
            except (zipfile.BadZipFile, EOFError, ValueError, Exception) as e:  # noqa: BLE001
                problem(shown, "bad_entry", f"Zip entry '{shown}' is damaged and could not be extracted ({e}).",
                        "Re-create the zip and upload it again.")
            finally:
                if tmp_path is not None:
                    try:
                        os.unlink(tmp_path)
                    except OSError:
                        pass
    return result


def _file_size(path: PathLike) -> int:
    try:
        return os.path.getsize(os.fspath(path))
    except OSError:
        return 0


def _existing_names(directory: str) -> set:
    try:
        return set(os.listdir(directory))
    except OSError:
        return set()
