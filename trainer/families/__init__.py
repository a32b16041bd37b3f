"""Model families, registered by name and detected from a model's ``model_index.json``."""
from __future__ import annotations

from typing import Optional

from .base import Components, ModelFamily
from .loading import ModelLoadError, read_model_index, resolve, wrap_load_error
from .resolution import default_resolution, default_resolution_of_folder, default_resolution_of_model
from .sd import SDFamily
from .sdxl import SDXLFamily

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SDXLFamily(), SDFamily())}


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelLoadError(f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}") from None


def detect_family(model_path: str, revision: Optional[str] = None, cache_dir: Optional[str] = None) -> ModelFamily:
    """Family from the pipeline class in model_index.json; a clear error for unsupported models."""
    index = read_model_index(model_path, revision=revision, cache_dir=cache_dir)
    cls = index.get("_class_name", "")
    for fam in FAMILIES.values():
        if cls in fam.pipeline_class_names:
            return fam
    raise ModelLoadError(
        f"{model_path!r} is a {cls or 'unknown'} model; this trainer supports Stable Diffusion XL "
        "(StableDiffusionXLPipeline) and Stable Diffusion 1.x/2.x (StableDiffusionPipeline). Flux, SD3, "
        "refiners, inpainting and ControlNet models are not supported.")


__all__ = ["Components", "ModelFamily", "ModelLoadError", "FAMILIES", "get_family", "detect_family", "resolve",
           "read_model_index", "wrap_load_error", "default_resolution", "default_resolution_of_folder",
           "default_resolution_of_model"]
