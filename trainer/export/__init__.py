"""Artifacts the ecosystem loads, written into the run folder:

- ``diffusers.py``: ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(run_dir)``);
- ``kohya.py``: ``<name>.safetensors`` with kohya keys, the real alpha and ``ss_*`` metadata (A1111 / ComfyUI /
  kohya);
- ``embeddings.py``: ``<name>_emb.safetensors`` with ``clip_l`` (and ``clip_g`` for SDXL);
- ``card.py``: ``README.md``, the model card;
- ``hub.py``: the upload to the Hub.
"""
from .card import write_model_card
from .diffusers import lora_metadata, save_diffusers_lora
from .embeddings import save_embeddings
from .files import LORA_WEIGHTS, atomic_save
from .hub import HUB_PATTERNS, HubError, describe_hub_error, push_to_hub
from .kohya import kohya_metadata, save_kohya_lora, to_kohya

__all__ = ["LORA_WEIGHTS", "atomic_save", "save_diffusers_lora", "lora_metadata", "to_kohya", "kohya_metadata",
           "save_kohya_lora", "save_embeddings", "write_model_card", "push_to_hub", "HubError",
           "describe_hub_error", "HUB_PATTERNS"]
