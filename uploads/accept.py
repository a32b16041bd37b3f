"""Which uploaded files are kept, under which name: an image extension the content really has, nothing else.

A stranger's file is kept only when its name ends in an image extension (:data:`IMAGE_EXTENSIONS`) and Pillow
reads it as an image of a format that extension belongs to; a valid PNG named ``evil.html`` (or ``.svg``,
``.xhtml``, ``.js``) is refused by name, so the app never stores, nor serves, a file a browser would run. A
photo whose extension names another image format (a JPEG saved as ``.png``) is kept under the right extension.
"""
from __future__ import annotations

import os
from typing import Optional

from trainer.data.images import IMAGE_EXTENSIONS, is_unsupported_image_name

from .names import split_ext

# Pillow's format name -> the extensions that format is saved under (the first one is used to rename).
FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"), "MPO": (".jpg", ".jpeg", ".mpo", ".jpe", ".jfif"),
    "PNG": (".png", ".apng"), "WEBP": (".webp",), "BMP": (".bmp", ".dib"), "GIF": (".gif",),
    "TIFF": (".tif", ".tiff"),
}
KEPT_EXTENSIONS_TEXT = ".jpg, .jpeg, .png, .webp, .bmp, .gif, .tif"


def name_problem(name: str) -> Optional[dict]:
    """A problem dict (file, code, severity, message, fix) when ``name`` is not an image file name, else None."""
    ext = os.path.splitext(name)[1].lower()
    if ext in IMAGE_EXTENSIONS:
        return None
    if is_unsupported_image_name(name):
        message = f"'{name}' is in an image format that is not supported here; it was not added."
        fix = "Convert it to JPEG, PNG or WebP and upload it again."
    else:
        message = (f"'{name}' is not an image file (only {KEPT_EXTENSIONS_TEXT} files and .zip archives are "
                   "taken); it was not added.")
        fix = "Upload photos as JPEG, PNG or WebP files, or a .zip of them."
    return {"file": name, "code": "not_an_image_name", "severity": "error", "message": message, "fix": fix}


def name_for_content(name: str, image_format: str) -> str:
    """``name`` with an extension of ``image_format`` (Pillow's name): unchanged when it already has one."""
    wanted = FORMAT_EXTENSIONS.get((image_format or "").upper())
    stem, ext = split_ext(name)
    if not wanted or ext.lower() in wanted:
        return name
    return (stem if ext else name) + wanted[0]


def too_many_files_problem(count: int, limit: int) -> dict:
    """The problem of an upload that carries more files than the operator's limit (nothing of it is added)."""
    return {"file": f"{count} files", "code": "too_many_files", "severity": "error",
            "message": f"This upload carries {count} files; this app takes at most {limit} per upload. Nothing "
                       "was added.", "fix": f"Upload at most {limit} files at a time, or one .zip of them."}
