"""What the app accepts from strangers: zip extraction (zip slip, bombs, links) and safe file names.

The trainer's ``data/`` package reads folders the app (or a user) prepared; this package makes those folders
safe to prepare from untrusted uploads.
"""
from .names import safe_filename
from .zips import ExtractResult, safe_extract_zip

__all__ = ["safe_filename", "safe_extract_zip", "ExtractResult"]
