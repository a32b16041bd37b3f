"""What the dataset readers and the upload code share: the problem type every bad entry becomes, a dataset
record, the caption/metadata file names, and the path-containment test."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional, Union

PathLike = Union[str, os.PathLike]

#: Non-image files that are extracted from a zip (captions and dataset metadata).
CAPTION_EXTENSIONS = frozenset({".txt", ".caption"})
METADATA_NAMES = frozenset({"metadata.jsonl", "metadata.json", "metadata.csv"})
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini"})


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
class Record:
    path: str  # absolute path of the image
    caption: Optional[str] = None  # None = no caption given (as opposed to an empty one)
    source_name: str = ""  # what to show the user: path relative to the dataset folder


def is_within(child: str, parent: str) -> bool:
    try:
        return os.path.commonpath([os.path.realpath(child), os.path.realpath(parent)]) == os.path.realpath(parent)
    except ValueError:  # different drives on Windows
        return False


def fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"  # pragma: no cover
