"""Writing artifact files: atomically (a temp file, then a rename, so a crash never leaves a half file under the
final name) and in the precision the user chose (``--save_precision``)."""
from __future__ import annotations

import os
from typing import Optional

import torch
from safetensors.torch import save_file

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def save_dtype(cfg) -> torch.dtype:
    """The dtype of ``cfg.save_precision`` (an enum or its value)."""
    return SAVE_DTYPES[getattr(cfg.save_precision, "value", cfg.save_precision)]


def cast_for_saving(tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                    keep: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Floating tensors cast to ``dtype`` (keys ending in ``keep`` stay as they are); a value that does not fit
    ``dtype`` (fp16 overflows past 65504) raises instead of writing inf into the file."""
    out = {}
    for key, value in tensors.items():
        if value.is_floating_point() and not key.endswith(keep):
            cast = value.detach().to(dtype)
            if not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(value).all()):
                raise ValueError(f"{key} does not fit {str(dtype).replace('torch.', '')} (largest value "
                                 f"{value.abs().max().item():.4g}); save with --save_precision bf16 or fp32")
            value = cast
        out[key] = value
    return out


def atomic_save(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    tmp = path + ".tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)
