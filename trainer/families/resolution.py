"""A model's default training / generation resolution: the one rule, used by the trainer, the preflight, the
app's dataset checks and the Generate engine.

SDXL: its VAE's ``sample_size`` (1024). SD 2.x v-prediction: 768. Other SD 1.x/2.x: 512. Tiny models (VAE
sample size below 512): their VAE size (64).
"""
from __future__ import annotations

import json
import os
from typing import Optional


def default_resolution(family: str, vae_sample_size: Optional[int], prediction_type: str = "epsilon") -> int:
    size = int(vae_sample_size) if vae_sample_size else None
    if size and size < 512:
        return size
    if family == "sdxl":
        return size or 1024
    return 768 if prediction_type == "v_prediction" else 512


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def default_resolution_of_folder(path: str) -> Optional[int]:
    """The rule applied to a local diffusers folder's configs, without loading any weights (None: unknown)."""
    try:
        cls = _read_json(os.path.join(path, "model_index.json")).get("_class_name", "")
        size = _read_json(os.path.join(path, "vae", "config.json")).get("sample_size")
        pred = "epsilon"
        sched = os.path.join(path, "scheduler", "scheduler_config.json")
        if os.path.exists(sched):
            pred = _read_json(sched).get("prediction_type", "epsilon")
    except (OSError, ValueError):
        return None
    return default_resolution("sdxl" if "XL" in cls else "sd", size, pred)


def default_resolution_of_model(model_id: str, revision: Optional[str] = None,
                                cache_dir: Optional[str] = None) -> Optional[int]:
    """The rule applied to a model id: a tiny id, a local folder, or a Hub id (its three small config files are
    fetched, or read from the cache; None when the Hub cannot be reached)."""
    from ..tiny import is_tiny, resolve_model_id

    path = resolve_model_id(model_id) if is_tiny(model_id) else model_id
    if os.path.isdir(path):
        return default_resolution_of_folder(path)
    try:
        from huggingface_hub import hf_hub_download

        def get(name: str, required: bool = True) -> dict:
            try:
                return _read_json(hf_hub_download(path, name, revision=revision, cache_dir=cache_dir))
            except Exception:
                if required:
                    raise
                return {}

        cls = get("model_index.json").get("_class_name", "")
        size = get("vae/config.json").get("sample_size")
        pred = get("scheduler/scheduler_config.json", required=False).get("prediction_type", "epsilon")
    except Exception:  # offline, unknown id: the caller decides
        return None
    return default_resolution("sdxl" if "XL" in cls else "sd", size, pred)
