"""Writing what a stranger uploaded into a dataset: all or nothing, and a full disk said in plain words.

:func:`copy_in` writes to a hidden temporary name next to the target and renames it into place, so a failure
(a full disk, a quota) never leaves a half-written file in the dataset; it raises :class:`DiskFull` with a
message that names no server path. :func:`write_bytes` is the one place bytes reach the disk (tests inject
faults there).
"""
from __future__ import annotations

import errno
import os
import shutil

DISK_FULL_MESSAGE = ("The disk is full: the server has no room left for these files, so they were not added. "
                     "Remove some images (or finished runs you no longer need), upload fewer or smaller files, "
                     "or ask the app's operator for more space.")
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


class DiskFull(OSError):
    """No room left on the server's disk; ``str()`` is :data:`DISK_FULL_MESSAGE` (no path)."""

    def __init__(self):
        super().__init__(errno.ENOSPC, DISK_FULL_MESSAGE)

    def __str__(self) -> str:
        return DISK_FULL_MESSAGE


def is_disk_full(exc: BaseException) -> bool:
    """True for the OSErrors a full disk or an exhausted quota give."""
    return isinstance(exc, DiskFull) or (isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS)


def write_bytes(src, dst) -> None:
    """Copies the open binary file ``src`` into the open binary file ``dst`` (the named fault point)."""
    shutil.copyfileobj(src, dst, 1024 * 1024)


def copy_in(src: str, target: str) -> None:
    """Copies ``src`` to ``target`` atomically; :class:`DiskFull` on a full disk, nothing left behind on any error."""
    folder, name = os.path.split(target)
    tmp = os.path.join(folder, f".{name}.part")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            write_bytes(fin, fout)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if is_disk_full(exc):
            raise DiskFull() from None
        raise
