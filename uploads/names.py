"""Safe file names for what strangers upload: one name component, no path tricks, no reserved names, bounded
length, never overwriting another file."""
from __future__ import annotations

import os
import re
import unicodedata
from typing import Optional

_WINDOWS_RESERVED = frozenset(
    {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
)
_FORBIDDEN_CHARS = set('/\\:*?"<>|')
_EXT_RE = re.compile(r"^\.[A-Za-z0-9]{1,10}$")
MAX_NAME_BYTES = 200  # well below the usual 255-byte file system limit, leaving room for temp prefixes


def clean_component(name: str) -> str:
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


def split_ext(name: str) -> tuple[str, str]:
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
    cleaned = clean_component(name) or "file"
    stem, ext = split_ext(cleaned)
    if stem.split(".")[0].lower() in _WINDOWS_RESERVED:
        stem = "_" + stem
    ext = ext.lower() if ext.upper() == ext else ext
    candidate = _fit(stem, ext, max_len)
    if taken is None:
        return candidate
    folded = {t.casefold() for t in taken}
    base_stem = split_ext(candidate)[0] if ext else candidate
    i = 0
    while candidate.casefold() in folded:
        i += 1
        suffix = f"-{i}"
        candidate = _fit(base_stem[: max(1, max_len - len(ext) - len(suffix))], suffix + ext, max_len)
        if i > 100_000:  # pragma: no cover - defensive
            raise RuntimeError("could not find a free file name")
    taken.add(candidate)
    return candidate
