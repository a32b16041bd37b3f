"""``pytorch_lora_weights.safetensors``: the diffusers LoRA file (``pipe.load_lora_weights(run_dir)``), with
peft's adapter metadata."""
from __future__ import annotations

import os
from typing import Optional

from ..training.lora import TEXT_ENCODER_TARGETS
from .files import LORA_WEIGHTS


def lora_metadata(cfg, targets: Optional[list[str]] = None) -> dict:
    from peft import LoraConfig

    targets = targets or [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.effective_alpha, target_modules=targets,
                      use_dora=cfg.use_dora).to_dict()


def save_diffusers_lora(run_dir: str, family, cfg, unet_sd: dict, te_sds: list[dict]) -> str:
    from diffusers.utils import convert_state_dict_to_diffusers

    kwargs = {"unet_lora_layers": convert_state_dict_to_diffusers(unet_sd),
              "unet_lora_adapter_metadata": lora_metadata(cfg)}
    names = ["text_encoder_lora_layers", "text_encoder_2_lora_layers"]
    for name, sd in zip(names, te_sds):
        if sd:
            kwargs[name.replace("_layers", "_adapter_metadata")] = lora_metadata(cfg, TEXT_ENCODER_TARGETS)
            # transformers 5 dropped the `text_model.` level of CLIPTextModel; diffusers' loader (and every
            # other tool) still matches text-encoder LoRA keys under it, so write them the classic way.
            sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}
            kwargs[name] = convert_state_dict_to_diffusers(sd)
    family.pipeline_class().save_lora_weights(run_dir, weight_name=LORA_WEIGHTS, safe_serialization=True, **kwargs)
    return os.path.join(run_dir, LORA_WEIGHTS)
