"""``<name>.safetensors``: kohya keys (``lora_unet_*``, ``lora_te1_*``/``lora_te2_*`` for SDXL, ``lora_te_*`` for
SD) with the real ``alpha`` (diffusers' converter writes alpha = rank, wrong whenever lora_alpha != rank) and
``ss_*`` metadata, for A1111 / ComfyUI / kohya."""
from __future__ import annotations

import json
import os
import re
import time
from collections import Counter

import torch

from .files import atomic_save


def to_kohya(family, cfg, unet_sd: dict, te_sds: list[dict]) -> dict[str, torch.Tensor]:
    """peft-named LoRA tensors -> kohya names with alpha (diffusers module names, as A1111/ComfyUI accept)."""
    out: dict[str, torch.Tensor] = {}
    alpha = torch.tensor(float(cfg.effective_alpha))
    parts = [("lora_unet", unet_sd)] + list(zip(family.kohya_te_prefixes, te_sds))
    for prefix, sd in parts:
        for key, value in (sd or {}).items():
            m = re.match(r"^(.*)\.(lora_A|lora_B|lora_magnitude_vector)(?:\.weight)?$", key)
            if not m:
                continue
            name = m.group(1)
            if prefix != "lora_unet" and not name.startswith("text_model."):
                name = "text_model." + name  # transformers 5 flattened CLIPTextModel; kohya/A1111 keep text_model
            module = prefix + "_" + name.replace(".", "_")
            kind = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight",
                    "lora_magnitude_vector": "dora_scale"}[m.group(2)]
            out[f"{module}.{kind}"] = value
            if m.group(2) == "lora_A":
                out[f"{module}.alpha"] = alpha.clone()
    return out


def kohya_metadata(cfg, family, num_images: int, steps: int, resolution: int, captions: list[str],
                   model_id: str) -> dict[str, str]:
    tags = Counter(t.strip() for c in captions for t in c.split(",") if t.strip())
    trigger = " ".join(cfg.tokens_per_abstraction.get(a, [a])[0] if cfg.train_text_encoder_ti else a
                       for a in cfg.abstractions)
    return {
        "ss_base_model_version": "sdxl_base_v1-0" if family.name == "sdxl" else "sd_v1",
        "ss_sd_model_name": model_id,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.effective_alpha),
        "ss_network_dropout": str(cfg.lora_dropout),
        "ss_num_train_images": str(num_images),
        "ss_max_train_steps": str(steps),
        "ss_steps": str(steps),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_text_encoder_lr": str(cfg.effective_text_lr),
        "ss_unet_lr": str(cfg.learning_rate),
        "ss_optimizer": str(cfg.optimizer.value),
        "ss_lr_scheduler": str(cfg.lr_scheduler.value),
        "ss_seed": str(cfg.seed),
        "ss_training_comment": f"trigger: {trigger}; tokens: {json.dumps(cfg.tokens_per_abstraction)}",
        "ss_tag_frequency": json.dumps({"dataset": dict(tags.most_common(200))}),
        "ss_v2": str(family.name == "sd" and "v_prediction" in model_id),
        "modelspec.title": cfg.run_name,
        "modelspec.trigger_phrase": "".join(t for ts in cfg.tokens_per_abstraction.values() for t in ts),
        "ss_training_finished_at": str(int(time.time())),
    }


def save_kohya_lora(run_dir: str, family, cfg, unet_sd, te_sds, metadata: dict) -> str:
    path = os.path.join(run_dir, f"{cfg.run_name}.safetensors")
    atomic_save(to_kohya(family, cfg, unet_sd, te_sds), path, metadata=metadata)
    return path
