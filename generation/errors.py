"""The one error type of generation: a request or an uploaded file that cannot be used."""
from __future__ import annotations


class InferenceInputError(ValueError):
    """A request or an uploaded file cannot be used; the message says which and why (safe to show to users)."""
