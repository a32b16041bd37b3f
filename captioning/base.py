"""Shared pieces of the captioning package: errors, image loading, caption cleaning. Device/dtype choice,
Hub errors and image conversion are the trainer's (one rule each), re-exported here."""
from __future__ import annotations

import os
import re
from typing import Union

from PIL import Image

from trainer.data.images import ImageProblem, to_rgb
from trainer.data.images import load_image as safe_load_image
from trainer.devices import resolve_device, resolve_dtype  # noqa: F401  (re-exported: the captioner's choice)
from trainer.hub_errors import is_unreachable as is_hub_unreachable  # noqa: F401  (re-exported)
from trainer.hub_errors import offline_requested

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"

ImageLike = Union[Image.Image, str, os.PathLike]


class CaptionerLoadError(RuntimeError):
    """The captioning model (or its processor) could not be loaded."""

    def __init__(self, message: str, model_id: str = "", hub_unreachable: bool = False):
        super().__init__(message)
        self.model_id = model_id
        self.hub_unreachable = hub_unreachable


# --------------------------------------------------------------------------------------------- images


def load_image(image: ImageLike) -> Image.Image:
    """A PIL image or a file path -> 8-bit RGB PIL image, by the trainer's rules (``trainer.data.images``: EXIF
    orientation applied, transparency on white, 16-bit/float rescaled; files are decoded safely)."""
    if isinstance(image, Image.Image):
        return to_rgb(image, [])
    if isinstance(image, (str, os.PathLike)):
        try:
            return safe_load_image(os.path.expanduser(os.fspath(image))).image
        except ImageProblem as exc:
            raise ValueError(str(exc)) from None
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


# ------------------------------------------------------------------------------------- load errors


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

