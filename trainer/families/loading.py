"""Shared loading helpers: tiny-model ids, model_index.json lookup, and Hub errors that say what to do."""
from __future__ import annotations

import json
import os
from typing import Optional

from ..tiny import is_tiny, resolve_model_id
from .base import ModelLoadError

OFFLINE_HINT = ("The Hugging Face Hub could not be reached (offline, HF_HUB_OFFLINE=1, or a network error). "
                "Use a local diffusers folder (--pretrained_model_name_or_path /path/to/model) or the built-in "
                "offline demo model `tiny-sdxl` (`tiny-sd` for SD 1.x).")


def resolve(model_id: str) -> str:
    return resolve_model_id(model_id) if is_tiny(model_id) else model_id


def read_model_index(model_path: str, revision: Optional[str] = None, cache_dir: Optional[str] = None) -> dict:
    """The pipeline's model_index.json, from a folder or the Hub; clear errors when neither works."""
    if os.path.isdir(model_path):
        path = os.path.join(model_path, "model_index.json")
        if not os.path.exists(path):
            raise ModelLoadError(
                f"{model_path} is a folder but not a diffusers pipeline (no model_index.json). Point "
                "--pretrained_model_name_or_path at the folder that holds model_index.json, unet/, vae/, ...")
    elif os.path.isfile(model_path):
        raise ModelLoadError(
            f"{model_path} is a single file; this trainer needs a diffusers folder or Hub id "
            "(convert single-file checkpoints with diffusers' from_single_file + save_pretrained).")
    else:
        if model_path.count("/") != 1 or model_path.startswith((".", "/")):
            raise ModelLoadError(f"{model_path!r} is neither an existing folder nor a Hub id like owner/name.")
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model_path, "model_index.json", revision=revision, cache_dir=cache_dir)
        except Exception as exc:  # network, offline mode, missing repo, gated repo
            name = type(exc).__name__
            if "RepositoryNotFound" in name or "404" in str(exc):
                raise ModelLoadError(f"Model {model_path!r} was not found on the Hub (check the id, or log in for "
                                     f"a gated/private model). {OFFLINE_HINT}") from None
            raise ModelLoadError(f"Could not load {model_path!r}: {OFFLINE_HINT}") from None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def wrap_load_error(model_path: str, exc: Exception) -> ModelLoadError:
    text = str(exc)
    offline_words = ("offline", "connect", "resolve", "Max retries", "LocalEntryNotFound", "timed out",
                     "Network", "cannot find the requested files")
    if any(w.lower() in (text + type(exc).__name__).lower() for w in offline_words):
        return ModelLoadError(f"Could not load {model_path!r}: {OFFLINE_HINT}")
    return ModelLoadError(f"Could not load {model_path!r}: {type(exc).__name__}: {text[:500]}")
