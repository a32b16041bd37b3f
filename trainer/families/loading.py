"""The loader role: model ids -> local folders, ``model_index.json`` lookup, ``from_pretrained`` of every part,
and load errors that say what to do.

Weights load from ``.safetensors`` files only (``use_safetensors=True`` everywhere): a pickled ``.bin`` / ``.ckpt``
can run code when it is unpickled, so a repo or folder without safetensors weights is refused with a message
(:data:`SAFETENSORS_ONLY`), never loaded."""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch

from ..hub_errors import OFFLINE_HINT, is_gated, is_not_found, is_unreachable
from ..tiny import is_tiny, resolve_model_id
from .base import Components
from .pooling import pool_at_end_of_text


class ModelLoadError(RuntimeError):
    """The base model could not be loaded; the message says why and what to do."""


SAFETENSORS_ONLY = ("has no .safetensors weights (only pickled .bin/.ckpt files, which can run code when loaded). "
                    "Only safetensors weights are loaded: pick a model that has them, or convert it once on a "
                    "trusted machine (load it and save_pretrained(..., safe_serialization=True)).")
_ABS_PATH = re.compile(r"(?<![\w.:])/(?:[^\s/'\"`]+/)+[^\s'\"`]*")


def lacks_safetensors(exc: BaseException) -> bool:
    """True for the errors diffusers / transformers raise when ``use_safetensors=True`` finds no such file."""
    text = str(exc).lower()
    return "safetensors" in text and any(k in text for k in ("no file named", "does not appear to have",
                                                                 "could not find", "not found"))


def without_paths(text: str) -> str:
    """``text`` with absolute server paths replaced (load errors quote the folders they looked in)."""
    return _ABS_PATH.sub("<a server folder>", text)


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
            raise wrap_load_error(model_path, exc) from None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def wrap_load_error(model_path: str, exc: Exception) -> ModelLoadError:
    """A Hub / loading failure as a ModelLoadError that says what to do (no server folder in it)."""
    if lacks_safetensors(exc):
        return ModelLoadError(f"Model {model_path!r} {SAFETENSORS_ONLY}")
    if is_gated(exc):
        return ModelLoadError(f"Model {model_path!r} is gated: accept its license on the Hub and log in "
                              "(huggingface-cli login), then try again.")
    if is_not_found(exc):
        return ModelLoadError(f"Model {model_path!r} was not found on the Hub (check the id, or log in for "
                              f"a gated/private model). {OFFLINE_HINT}")
    if is_unreachable(exc):
        return ModelLoadError(f"Could not load {model_path!r}: {OFFLINE_HINT}")
    return ModelLoadError(f"Could not load {model_path!r}: {type(exc).__name__}: {without_paths(str(exc))[:500]}")


def load_parts(family, model_path: str, *, revision=None, variant=None, vae_path=None, cache_dir=None,
               dtype=torch.float32) -> Components:
    """Loads tokenizers, text encoders (``family.text_encoder_classes()``), UNet, VAE and the training noise
    scheduler from a diffusers folder or Hub id; any failure becomes a ModelLoadError that says what to do. The
    text encoders pool at the end-of-text token (``pooling.py``)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer

    kw = dict(revision=revision, cache_dir=cache_dir, use_safetensors=True)
    try:
        tokenizers = [AutoTokenizer.from_pretrained(model_path, subfolder=sub, use_fast=False, **kw)
                      for sub in family.tokenizer_attrs]
        encoders = [cls.from_pretrained(model_path, subfolder=sub, variant=variant, torch_dtype=dtype, **kw)
                    for cls, sub in zip(family.text_encoder_classes(), family.text_encoder_attrs)]
        unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", variant=variant,
                                                    torch_dtype=dtype, **kw)
        if vae_path:
            vae = AutoencoderKL.from_pretrained(vae_path, cache_dir=cache_dir, use_safetensors=True)
        else:
            vae = AutoencoderKL.from_pretrained(model_path, subfolder="vae", variant=variant, **kw)
        sched = DDPMScheduler.from_pretrained(model_path, subfolder="scheduler", revision=revision,
                                              cache_dir=cache_dir)
    except Exception as exc:
        raise wrap_load_error(model_path, exc) from None
    pool_at_end_of_text(encoders, tokenizers)
    return Components(unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                      noise_scheduler=sched, model_path=model_path, vae_path=vae_path)
