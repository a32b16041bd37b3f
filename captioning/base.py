"""Shared pieces of the captioning package: errors, image loading, caption cleaning, device/dtype choice."""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Iterable, Union

from PIL import Image, ImageOps

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"

ImageLike = Union[Image.Image, str, os.PathLike]


class CaptionerLoadError(RuntimeError):
    """The captioning model (or its processor) could not be loaded."""

    def __init__(self, message: str, model_id: str = "", hub_unreachable: bool = False):
        super().__init__(message)
        self.model_id = model_id
        self.hub_unreachable = hub_unreachable


# --------------------------------------------------------------------------------------------- images


def _flatten_alpha(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, background + (255,))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> RGB. Transparency is composited on white (not black), 16-bit/float is rescaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _flatten_alpha(img)
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if mode.startswith("I;16") else float(arr.max()) if arr.size else 1.0
        if hi > 255.0:
            arr = arr * (255.0 / hi)
        arr = np.clip(arr, 0, 255).astype("uint8")
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")


def load_image(image: ImageLike) -> Image.Image:
    """A PIL image or a file path -> RGB PIL image (EXIF orientation applied for files)."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im) or im
            return to_rgb(im).copy()
    raise TypeError(f"expected a PIL image or a file path, got {type(image).__name__}")


# ------------------------------------------------------------------------------------------- captions

_WS = re.compile(r"\s+")
# BLIP-large's well-known artefacts at the start of captions ("arafed man ...", "araffe woman ...").
_ARAFED = re.compile(r"^(?:ara+f+e*d?|arafe+d?|araffe)\b[\s,]*", re.IGNORECASE)
_THERE_IS = re.compile(r"^there (?:is|are) (?=\S)", re.IGNORECASE)


def clean_caption(text: str) -> str:
    """Strip, collapse whitespace, re-attach WordPiece-split punctuation, drop "arafed"/"there is" artefacts."""
    text = _WS.sub(" ", str(text or "")).strip()
    text = re.sub(r"\s*'\s*s\b", "'s", text)  # "woman ' s hat" -> "woman's hat"
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)  # "dog , cat" -> "dog, cat"
    text = re.sub(r"(\w)\s*-\s*(\w)", r"\1-\2", text)  # "close - up" -> "close-up"
    text = text.strip(" ,;:")
    before = text
    for _ in range(2):  # "there is arafed man" -> "man"
        text = _THERE_IS.sub("", _ARAFED.sub("", text)).strip(" ,;:")
    return text or before


# ------------------------------------------------------------------------------------- device / dtype


def resolve_device(device: Any = None):
    import torch

    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(device)


_DTYPE_NAMES = {
    "fp32": "float32", "float32": "float32", "float": "float32", "32": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16", "16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}


def resolve_dtype(dtype: Any, device) -> "Any":
    """None/"auto" -> bf16 on CUDA when supported, else fp16 on CUDA; fp32 on CPU and anything else."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or str(dtype).lower() == "auto":
        if getattr(device, "type", str(device)) == "cuda":
            try:
                if torch.cuda.is_bf16_supported():
                    return torch.bfloat16
            except Exception:  # pragma: no cover - very old drivers
                pass
            return torch.float16
        return torch.float32
    name = _DTYPE_NAMES.get(str(dtype).lower().replace("torch.", ""))
    if name is None:
        raise ValueError(f"unknown dtype {dtype!r}; use fp32, fp16, bf16 or a torch.dtype")
    return getattr(torch, name)


# --------------------------------------------------------------------------------- load-error helpers

_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_requested() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set *now* (huggingface_hub only reads them at import)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in _OFFLINE_ENV)


_UNREACHABLE_NAMES = {
    "LocalEntryNotFoundError",
    "OfflineModeIsEnabled",
    "ConnectionError",
    "ConnectError",
    "ConnectTimeout",
    "ConnectTimeoutError",
    "NewConnectionError",
    "NameResolutionError",
    "MaxRetryError",
    "ReadTimeout",
    "ReadTimeoutError",
    "Timeout",
    "TimeoutException",
    "ProxyError",
    "NetworkError",
}
_UNREACHABLE_TEXT = (
    "couldn't connect to",
    "could not connect to",
    "offline mode",
    "outgoing traffic has been disabled",
    "check your connection",
    "name or service not known",
    "temporary failure in name resolution",
    "connection refused",
)


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_hub_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything it was raised from) means the Hub could not be reached / not cached offline."""
    for e in _chain(exc):
        if isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
        if any(t.__name__ in _UNREACHABLE_NAMES for t in type(e).__mro__):
            return True
        msg = str(e).lower()
        if any(t in msg for t in _UNREACHABLE_TEXT):
            return True
    return False


def hub_unreachable_message(model_id: str) -> str:
    why = "offline mode is on (HF_HUB_OFFLINE)" if offline_requested() else "network error"
    return (
        f"Could not load the captioning model '{model_id}': the Hugging Face Hub could not be reached "
        f"({why}) and the model is not in the local cache. Download it on a machine with internet access "
        f"and pass its local folder as the model (e.g. model='/path/to/{model_id.rstrip('/').split('/')[-1]}'), "
        f"or use the offline tiny model id 'tiny-blip' (random weights, for testing only)."
    )


def looks_like_local_path(model_id: str) -> bool:
    """True for strings that can only mean a folder on disk (absolute, ./, ~, Windows, or a/b/c)."""
    s = str(model_id)
    return (
        os.path.isabs(s)
        or s.startswith((".", "~"))
        or "\\" in s
        or s.count("/") > 1
        or (len(s) > 1 and s[1] == ":")
    )

