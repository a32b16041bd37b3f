"""What every model family provides: loading, prompt encoding, conditioning, pipelines, export names.

This module is the interface only. A family is registered once (``families/__init__.py``) and looked up by name
or detected from the model's ``model_index.json``; loading from a folder or the Hub lives in ``loading.py``.
The training loop only talks to this interface, so SDXL and SD 1.x/2.x share one loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass
class Components:
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any
    model_path: str
    vae_path: Optional[str] = None

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


class ModelFamily:
    name: str = ""
    pipeline_class_names: tuple[str, ...] = ()
    text_encoder_attrs: tuple[str, ...] = ()
    tokenizer_attrs: tuple[str, ...] = ()
    embedding_keys: tuple[str, ...] = ()          # keys of <name>_emb.safetensors, one per text encoder
    kohya_te_prefixes: tuple[str, ...] = ()       # kohya key prefixes, one per text encoder
    # U-Net module names in the kohya file: those of the U-Net sd-scripts trains this family on ("sgm": the
    # original SD layout, export/sgm_names.py; "diffusers": diffusers' own module paths)
    kohya_unet_layout: str = "diffusers"

    # ----- loading -----------------------------------------------------------------------------------------
    def text_encoder_classes(self) -> list:
        """The transformers class of each text encoder, in ``text_encoder_attrs`` order (``loading.load_parts``
        loads the parts)."""
        raise NotImplementedError

    def default_resolution(self, components: Components) -> int:
        from .resolution import default_resolution

        return default_resolution(self.name, getattr(components.vae.config, "sample_size", None),
                                  components.prediction_type)

    def pipeline_class(self):
        raise NotImplementedError

    def build_pipeline(self, components: Components, scheduler=None):
        raise NotImplementedError

    # ----- conditioning ------------------------------------------------------------------------------------
    def tokenize(self, components: Components, captions: list[str]) -> list[torch.Tensor]:
        out = []
        for tok in components.tokenizers:
            out.append(tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                           return_tensors="pt").input_ids)
        return out

    def encode(self, components: Components, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(prompt_embeds [B, 77, D], pooled [B, P] or None)."""
        raise NotImplementedError

    def added_conditioning(self, pooled, original_sizes, crops, target_sizes, device, dtype) -> Optional[dict]:
        return None
