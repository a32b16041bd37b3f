"""``<name>_emb.safetensors``: the learnt token rows, ``clip_l`` (and ``clip_g`` for SDXL), as A1111, ComfyUI and
``pipe.load_textual_inversion`` read them, in ``--save_precision``."""
from __future__ import annotations

import os

import torch

from .files import atomic_save, cast_for_saving, save_dtype


def embeddings_file_name(cfg) -> str:
    """The embeddings file of a run; its stem is the name A1111 and ComfyUI prompts use (``<name>_emb``)."""
    return f"{cfg.run_name}_emb.safetensors"


def save_embeddings(run_dir: str, cfg, emb: dict[str, torch.Tensor]) -> str:
    path = os.path.join(run_dir, embeddings_file_name(cfg))
    atomic_save(cast_for_saving(emb, save_dtype(cfg)), path)
    return path
