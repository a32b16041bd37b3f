"""What a failure to reach or read the Hugging Face Hub means, from ``huggingface_hub.errors`` types.

The one place that classifies Hub failures (model loading, datasets, captioners, uploads): each predicate
walks the exception and everything it was raised from (transformers and diffusers wrap Hub errors in their own
``OSError``/``EnvironmentError``), so callers never match message strings.
"""
from __future__ import annotations

import os
import socket
from typing import Iterator, Optional

OFFLINE_HINT = ("The Hugging Face Hub could not be reached (offline, HF_HUB_OFFLINE=1, or a network error). "
                "Use a local diffusers folder (--pretrained_model_name_or_path /path/to/model) or the built-in "
                "offline demo model `tiny-sdxl` (`tiny-sd` for SD 1.x).")


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes / contexts, each once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _errors():
    from huggingface_hub import errors

    return errors


def offline_requested() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set *now* (huggingface_hub only reads them at import)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _network_types() -> tuple:
    types: list = [ConnectionError, TimeoutError, socket.gaierror]
    try:
        import httpx

        types += [httpx.TransportError]
    except ImportError:  # pragma: no cover - httpx comes with huggingface_hub >= 1
        pass
    try:
        import requests

        types += [requests.ConnectionError, requests.Timeout]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def is_unreachable(exc: BaseException) -> bool:
    """The Hub could not be reached (no network, offline mode) and nothing usable was cached."""
    e = _errors()
    net = _network_types()
    for x in chain(exc):
        if isinstance(x, (e.LocalEntryNotFoundError, e.OfflineModeIsEnabled) + net):
            return True
    return False


def is_not_found(exc: BaseException) -> bool:
    """The repository, revision or file does not exist (or is private and no token was given)."""
    e = _errors()
    for x in chain(exc):
        if isinstance(x, e.GatedRepoError):
            return False
        if isinstance(x, (e.RepositoryNotFoundError, e.RevisionNotFoundError, e.RemoteEntryNotFoundError)):
            return True
    return False


def http_status(exc: BaseException) -> Optional[int]:
    """The HTTP status of a Hub error in the chain, if any."""
    e = _errors()
    for x in chain(exc):
        if isinstance(x, e.HfHubHTTPError):
            resp = getattr(x, "response", None)
            code = getattr(resp, "status_code", None)
            if code is not None:
                return int(code)
    return None


def is_gated(exc: BaseException) -> bool:
    e = _errors()
    return any(isinstance(x, e.GatedRepoError) for x in chain(exc))
