"""``<name>.safetensors``: the LoRA in kohya's format, the file ComfyUI, AUTOMATIC1111 / Forge and kohya's
sd-scripts load.

Keys are named as sd-scripts itself writes them (``networks/lora.py``: ``prefix + "." + module path`` with dots
turned into ``_``):

- SDXL U-Net: sd-scripts trains SDXL on its own original-layout U-Net, so the keys use those module names
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k``; ``sgm_names.py``). sd-scripts'
  ``--network_weights`` and ``sdxl_merge_lora.py`` match them and nothing else; ComfyUI and A1111 read them from
  their own checkpoint layout (A1111 would drop ``up_blocks_0_upsamplers_0_conv`` in diffusers naming).
- SD 1.x/2.x U-Net: sd-scripts trains those on a diffusers-layout U-Net, so the diffusers module names are its
  names (``lora_unet_down_blocks_0_attentions_0_...``).
- text encoders: ``lora_te_`` (SD) / ``lora_te1_`` + ``lora_te2_`` (SDXL) + ``text_model_encoder_layers_N_...``.

Per module: ``lora_down.weight`` [r, in(, k, k)], ``lora_up.weight`` [out, r(, 1, 1)], ``alpha`` (the real
lora_alpha, a 0-d fp32 tensor: every reader takes it with ``.item()``, and fp32 keeps any alpha exact), and for
DoRA ``dora_scale``: peft's magnitude as the [out, 1] (Linear) / [out, 1, 1, 1] (Conv) column that LyCORIS,
ComfyUI and Forge apply on the output axis (see README "DoRA in other tools" for what each reproduces).
The metadata carries sd-scripts' ``sshs_model_hash`` / ``sshs_legacy_hash`` (A1111 shows the first as the
LoRA's hash).
"""
from __future__ import annotations

import hashlib
import os
import re

import torch

from .files import atomic_save, cast_for_saving, save_dtype
from .sgm_names import sgm_module_name

_PEFT_KEY = re.compile(r"^(.*)\.(lora_A|lora_B|lora_magnitude_vector)(?:\.weight)?$")
_KOHYA_PART = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight", "lora_magnitude_vector": "dora_scale"}


def kohya_file_name(cfg) -> str:
    """The kohya LoRA file of a run; its stem is the name A1111 prompts use (``<lora:name:1>``)."""
    return f"{cfg.run_name}.safetensors"


def kohya_module_name(family, prefix: str, path: str, unet_config=None) -> str:
    """The kohya name of the module at ``path`` (a diffusers U-Net path or a text-encoder path), e.g.
    ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k`` (SDXL) or
    ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``."""
    if prefix == "lora_unet":
        if family.kohya_unet_layout == "sgm":
            path = sgm_module_name(path, unet_config)
    elif not path.startswith("text_model."):
        path = "text_model." + path  # transformers 5 flattened CLIPTextModel; every tool keeps text_model
    return prefix + "_" + path.replace(".", "_")


def dora_scale(magnitude: torch.Tensor) -> torch.Tensor:
    """peft's DoRA magnitude ([out] for Linear, [1, out, 1, 1] for Conv) as a kohya ``dora_scale``:
    [out, 1] / [out, 1, 1, 1]. A 1-D [out] would broadcast to [out, out] in ComfyUI, Forge and A1111."""
    out = magnitude.numel()
    return magnitude.reshape((out, 1, 1, 1) if magnitude.dim() == 4 else (out, 1))


def to_kohya(family, cfg, unet_sd: dict, te_sds: list[dict], unet_config=None,
             dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """peft-named LoRA tensors (U-Net, then one dict per text encoder) -> kohya names, LoRA weights in
    ``dtype``, with the alpha of every module. ``unet_config`` (``unet.config``) is needed for SDXL."""
    out: dict[str, torch.Tensor] = {}
    alpha = torch.tensor(float(cfg.effective_alpha), dtype=torch.float32)
    parts = [("lora_unet", unet_sd)] + list(zip(family.kohya_te_prefixes, te_sds))
    for prefix, sd in parts:
        for key, value in (sd or {}).items():
            m = _PEFT_KEY.match(key)
            if not m:
                continue
            module = kohya_module_name(family, prefix, m.group(1), unet_config)
            kind = m.group(2)
            out[f"{module}.{_KOHYA_PART[kind]}"] = dora_scale(value) if kind == "lora_magnitude_vector" else value
            if kind == "lora_A":
                out[f"{module}.alpha"] = alpha.clone()
    return cast_for_saving(out, dtype, keep=(".alpha",))


# The U-Net blocks whose Linear / Conv2d children sd-scripts' LoRA adapts (networks/lora.py LoRANetwork); its
# SDXL U-Net keeps diffusers' class names for them
SDSCRIPTS_UNET_BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")


def outside_sdscripts_blocks(unet) -> list[str]:
    """Adapted U-Net modules that sit outside sd-scripts' LoRA blocks (conv_in, conv_out, the time and
    added-condition embeddings): ComfyUI and A1111 load them, sd-scripts ignores their keys."""
    from peft.tuners.lora import LoraLayer

    blocks = [n for n, m in unet.named_modules() if type(m).__name__ in SDSCRIPTS_UNET_BLOCKS]
    return [n for n, m in unet.named_modules()
            if isinstance(m, LoraLayer) and not any(n.startswith(b + ".") for b in blocks)]


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) as sd-scripts computes them
    (``train_util.precalculate_safetensors_hashes``): the file serialised with only its ``ss_*`` metadata; the
    model hash is the sha256 of everything after the header (= A1111's ``addnet_hash_safetensors`` of the written
    file, whose tensor bytes are the same), the legacy hash the first 8 hex digits of the sha256 of the 64 KiB at
    offset 1 MiB of that serialisation."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    return (hashlib.sha256(data[8 + header:]).hexdigest(),
            hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8])


def save_kohya_lora(run_dir: str, family, cfg, unet_sd: dict, te_sds: list[dict], metadata: dict,
                    unet_config=None) -> str:
    """Writes ``<name>.safetensors`` (tensors in ``--save_precision``, ``metadata`` plus the two hashes)."""
    path = os.path.join(run_dir, kohya_file_name(cfg))
    tensors = to_kohya(family, cfg, unet_sd, te_sds, unet_config, save_dtype(cfg))
    model_hash, legacy_hash = addnet_hashes(tensors, metadata)
    atomic_save(tensors, path, metadata={**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash})
    return path
