"""Models that load like SDXL / SD but would train wrongly, refused before any weight is loaded, each with a
message that says what the model is and what to use instead:

* the SDXL **refiner** (``text_encoder`` absent, only ``text_encoder_2``, ``requires_aesthetics_score``): its UNet
  is conditioned on an aesthetic score instead of the target size and has one text encoder;
* a VAE whose config has ``latents_mean`` / ``latents_std`` (Playground v2.5): its latents are normalised by
  mean and std, not by ``scaling_factor`` alone as training here does;
* an **EDM** noise scheduler (Playground v2.5's ``EDMDPMSolverMultistepScheduler``): the model was trained on the
  EDM noise schedule, not on the DDPM schedule the training loop uses.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from .loading import ModelLoadError, read_model_index


def _absent(entry) -> bool:
    """A model_index.json entry that names no component (missing, null, or [null, null])."""
    return entry is None or (isinstance(entry, (list, tuple)) and all(e is None for e in entry))


def read_component_config(model_path: str, subfolder: Optional[str], name: str, revision=None,
                          cache_dir=None) -> dict:
    """``<model>/<subfolder>/<name>`` as a dict, from a folder or the Hub; {} when it cannot be read (the load
    that follows reports a missing part with its own message)."""
    rel = f"{subfolder}/{name}" if subfolder else name
    if os.path.isdir(model_path):
        path = os.path.join(model_path, *rel.split("/"))
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model_path, rel, revision=revision, cache_dir=cache_dir)
        except Exception:  # noqa: BLE001 - offline or missing: the real load says why
            return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def unsupported_reason(model_path: str, vae_path: Optional[str] = None, revision=None,
                       cache_dir=None) -> Optional[str]:
    """Why ``model_path`` (with the VAE ``vae_path`` when given) cannot be trained here, or None."""
    index = read_model_index(model_path, revision=revision, cache_dir=cache_dir)
    if index.get("requires_aesthetics_score") or (_absent(index.get("text_encoder"))
                                                    and not _absent(index.get("text_encoder_2"))):
        return (f"{model_path!r} is an SDXL refiner (it has only text_encoder_2 and is conditioned on an "
                "aesthetic score): it refines the last denoising steps of another model and cannot be trained as "
                "a base model here. Train on stabilityai/stable-diffusion-xl-base-1.0 (or another SDXL base); "
                "the refiner can still be used after the LoRA'd base at generation time.")
    sched = read_component_config(model_path, "scheduler", "scheduler_config.json", revision, cache_dir)
    if str(sched.get("_class_name", "")).startswith("EDM"):
        return (f"{model_path!r} uses an EDM noise schedule ({sched['_class_name']}, as Playground v2.5 does); "
                "this trainer trains on the DDPM schedule of SD / SDXL, so the LoRA would learn the wrong noise "
                "levels. Use an SDXL or SD 1.x/2.x model with a DDPM-family scheduler.")
    vae = (read_component_config(vae_path, None, "config.json", None, cache_dir) if vae_path else
           read_component_config(model_path, "vae", "config.json", revision, cache_dir))
    if vae.get("latents_mean") is not None or vae.get("latents_std") is not None:
        return (f"the VAE of {vae_path or model_path!r} normalises latents with latents_mean/latents_std (as "
                "Playground v2.5's does); training here scales latents by scaling_factor only, so they would be "
                "wrong. Use an SD / SDXL VAE (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL).")
    return None


def refuse_unsupported(model_path: str, vae_path: Optional[str] = None, revision=None, cache_dir=None) -> None:
    """Raises ModelLoadError with :func:`unsupported_reason` when the model cannot be trained here."""
    reason = unsupported_reason(model_path, vae_path, revision, cache_dir)
    if reason:
        raise ModelLoadError(reason)
