"""Auto-captioning of training images (BLIP by default) with the trigger word put in per concept.

    from captioning import caption, release_all
    captions = caption(paths, concept="style", trigger="TOK", on_progress=lambda done, total: ...)
    release_all()  # before training: the captioner must not stay in GPU memory

``model`` is any Hub id, a local folder, or ``"tiny-blip"`` (a tiny random BLIP built offline, for tests).
Loaded captioners are cached per (model, device, dtype) so repeated calls reuse them until :func:`release_all`.
"""
from __future__ import annotations

import gc
import threading
from typing import Any, Callable, Optional, Sequence

from .base import DEFAULT_MODEL, CaptionerLoadError, ImageLike, clean_caption, load_image, resolve_device, resolve_dtype
from .blip import Captioner, resolve_model_source
from .templates import CONCEPTS, apply_trigger, contains_trigger, normalize_concept
from .tiny import TINY_BLIP_ID, tiny_blip_path

__all__ = [
    "CONCEPTS",
    "DEFAULT_MODEL",
    "TINY_BLIP_ID",
    "Captioner",
    "CaptionerLoadError",
    "apply_trigger",
    "caption",
    "clean_caption",
    "contains_trigger",
    "get_captioner",
    "load_image",
    "loaded_captioners",
    "release_all",
    "resolve_model_source",
    "tiny_blip_path",
]

_CACHE: dict[tuple, Captioner] = {}
_CACHE_LOCK = threading.Lock()


def _cache_key(model: str, device: Any, dtype: Any) -> tuple:
    dev = resolve_device(device)
    return (str(model).strip(), str(dev), str(resolve_dtype(dtype, dev)))


def get_captioner(model: str = DEFAULT_MODEL, device: Any = None, dtype: Any = None) -> Captioner:
    """The cached, loaded :class:`Captioner` for (model, device, dtype); loads it on first use."""
    key = _cache_key(model, device, dtype)
    with _CACHE_LOCK:
        cap = _CACHE.get(key)
        if cap is None:
            cap = Captioner(model, device=device, dtype=dtype)
            _CACHE[key] = cap
    try:
        cap.load()
    except BaseException:
        with _CACHE_LOCK:
            if _CACHE.get(key) is cap:
                del _CACHE[key]
        raise
    return cap


def loaded_captioners() -> list[Captioner]:
    """Captioners currently held in the module cache."""
    with _CACHE_LOCK:
        return list(_CACHE.values())


def release_all() -> int:
    """Release every cached captioner, ``gc.collect()`` and empty the CUDA cache. Returns how many were released."""
    with _CACHE_LOCK:
        caps = list(_CACHE.values())
        _CACHE.clear()
    count = len(caps)
    for cap in caps:
        cap.release()
    del caps
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
    return count


def caption(
    images: Sequence[ImageLike],
    model: str = DEFAULT_MODEL,
    concept: str = "object",
    trigger: str = "TOK",
    template: Optional[str] = None,
    prefix: str = "",
    suffix: str = "",
    batch_size: int = 8,
    device: Any = None,
    dtype: Any = None,
    max_new_tokens: int = 30,
    on_progress: Optional[Callable[[int, int], Any]] = None,
) -> list[str]:
    """Caption ``images`` (PIL images or file paths) and put ``trigger`` in each caption.

    Each raw caption is cleaned, then ``prefix + caption + suffix`` is passed through
    :func:`captioning.templates.apply_trigger` with ``concept``/``trigger``/``template``.
    ``on_progress(done, total)`` is called after every batch. Raises :class:`CaptionerLoadError` when the
    model cannot be loaded (e.g. Hub unreachable) and ``ValueError`` for an unknown concept.
    """
    normalize_concept(concept)  # fail before loading anything
    if batch_size is None or int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    batch_size = int(batch_size)
    images = list(images)
    total = len(images)
    if total == 0:
        return []
    cap = get_captioner(model, device=device, dtype=dtype)
    results: list[str] = []
    for start in range(0, total, batch_size):
        chunk = images[start:start + batch_size]
        for raw in cap.caption_batch(chunk, max_new_tokens=max_new_tokens):
            text = f"{prefix}{raw}{suffix}".strip()
            results.append(apply_trigger(text, concept, trigger=trigger, template=template))
        if on_progress is not None:
            on_progress(len(results), total)
    return results
