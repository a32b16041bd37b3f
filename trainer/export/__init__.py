"""Artifacts the ecosystem loads, written into the run folder:

- ``diffusers.py``: ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(run_dir)``; diffusers only);
- ``kohya.py``: ``<name>.safetensors`` with kohya's keys (SDXL U-Net in the original layout, ``sgm_names.py``),
  the real alpha, ``dora_scale`` as LyCORIS / ComfyUI read it; metadata from ``kohya_metadata.py``
  (ComfyUI / A1111 / Forge / kohya's sd-scripts);
- ``embeddings.py``: ``<name>_emb.safetensors`` with ``clip_l`` (and ``clip_g`` for SDXL);
- ``triggers.py``: how each tool's prompt names the learnt tokens;
- ``dora.py``: how far ComfyUI's and A1111's DoRA are from the trained one (numbers for the card);
- ``card.py``: ``README.md``, the model card;
- ``hub.py``: the upload to the Hub.

``files.py`` writes them atomically in ``--save_precision``.
"""
from .card import write_model_card
from .diffusers import lora_metadata, save_diffusers_lora
from .dora import dora_tool_deviation
from .embeddings import embeddings_file_name, save_embeddings
from .files import LORA_WEIGHTS, atomic_save, save_dtype
from .hub import HUB_PATTERNS, HubError, describe_hub_error, push_to_hub
from .kohya import kohya_file_name, save_kohya_lora, to_kohya
from .kohya_metadata import RunFacts, base_version, kohya_metadata

__all__ = ["LORA_WEIGHTS", "atomic_save", "save_dtype", "save_diffusers_lora", "lora_metadata", "to_kohya",
           "dora_tool_deviation", "kohya_metadata", "kohya_file_name", "save_kohya_lora", "RunFacts", "base_version", "save_embeddings",
           "embeddings_file_name", "write_model_card", "push_to_hub", "HubError", "describe_hub_error",
           "HUB_PATTERNS"]
