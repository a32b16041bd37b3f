"""``pytorch_lora_weights.safetensors``: the diffusers LoRA file (``pipe.load_lora_weights(run_dir)``), with
peft's adapter metadata, in ``--save_precision``. Only diffusers loads it (ComfyUI skips its attention keys,
A1111 reads none of it): the other tools take ``<name>.safetensors`` (``kohya.py``)."""
from __future__ import annotations

import os
from typing import Optional

from ..training.lora import TEXT_ENCODER_TARGETS
from .files import LORA_WEIGHTS, cast_for_saving, save_dtype


def lora_metadata(cfg, targets: Optional[list[str]] = None) -> dict:
    from peft import LoraConfig

    targets = targets or [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.effective_alpha, target_modules=targets,
                      use_dora=cfg.use_dora).to_dict()


def text_encoder_keys(sd: dict) -> dict:
    """A text encoder's peft tensors under the names diffusers' loader maps:

    - ``text_model.`` in front: transformers 5 dropped that level of CLIPTextModel, but diffusers' loader (and
      every other tool) matches text-encoder keys under it;
    - DoRA magnitudes as ``...lora_magnitude_vector.weight``: transformers loads a bare ``...lora_magnitude_vector``
      into nothing ("unexpected key ...lora_magnitude_vector.default_0"), so the text encoder would lose them.
    """
    out = {}
    for key, value in sd.items():
        key = key if key.startswith("text_model.") else "text_model." + key
        if key.endswith(".lora_magnitude_vector"):
            key += ".weight"
        out[key] = value
    return out


def save_diffusers_lora(run_dir: str, family, cfg, unet_sd: dict, te_sds: list[dict]) -> str:
    """Writes the file with peft's own key names (``lora_A`` / ``lora_B``). Not through
    ``convert_state_dict_to_diffusers``: it renames Linear layers to the old ``lora.down`` spelling but leaves
    Conv layers as ``lora_A``, and diffusers' loader then skips every attention layer of such a mixed file."""
    dtype = save_dtype(cfg)
    kwargs = {"unet_lora_layers": cast_for_saving(unet_sd, dtype), "unet_lora_adapter_metadata": lora_metadata(cfg)}
    names = ["text_encoder_lora_layers", "text_encoder_2_lora_layers"]
    for name, sd in zip(names, te_sds):
        if sd:
            kwargs[name.replace("_layers", "_adapter_metadata")] = lora_metadata(cfg, TEXT_ENCODER_TARGETS)
            kwargs[name] = text_encoder_keys(cast_for_saving(sd, dtype))
    family.pipeline_class().save_lora_weights(run_dir, weight_name=LORA_WEIGHTS, safe_serialization=True, **kwargs)
    return os.path.join(run_dir, LORA_WEIGHTS)
