"""What the app accepts from strangers: which files (image names whose content matches), under which safe
names, zip extraction (zip slip, bombs, links), limits, and writes that survive a full disk.

The trainer's ``data/`` package reads folders the app (or a user) prepared; this package makes those folders
safe to prepare from untrusted uploads.
"""
from .accept import name_for_content, name_problem, too_many_files_problem
from .names import safe_filename
from .store import DiskFull, copy_in, is_disk_full
from .zips import ExtractResult, safe_extract_zip

__all__ = ["safe_filename", "safe_extract_zip", "ExtractResult", "name_problem", "name_for_content",
           "too_many_files_problem", "DiskFull", "copy_in", "is_disk_full"]
