"""``<name>_emb.safetensors``: the learnt token rows, ``clip_l`` (and ``clip_g`` for SDXL), as A1111, ComfyUI and
``pipe.load_textual_inversion`` read them."""
from __future__ import annotations

import os

import torch

from .files import atomic_save


def save_embeddings(run_dir: str, cfg, emb: dict[str, torch.Tensor]) -> str:
    path = os.path.join(run_dir, f"{cfg.run_name}_emb.safetensors")
    atomic_save(emb, path)
    return path
