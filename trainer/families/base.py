"""What every model family provides: loading, prompt encoding, conditioning, pipelines, export names.

A family is registered once (``families/__init__.py``) and looked up by name or detected from the model's
``model_index.json``. The training loop only talks to this interface, so SDXL and SD 1.x/2.x share one loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


class ModelLoadError(RuntimeError):
    """The base model could not be loaded; the message says why and what to do."""


@dataclass
class Components:
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any
    model_path: str
    vae_path: Optional[str] = None
    extra: dict = field(default_factory=dict)

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
    uses_time_ids: bool = False

    # ----- loading -----------------------------------------------------------------------------------------
    def load(self, model_path: str, *, revision=None, variant=None, vae_path=None, cache_dir=None,
             dtype=torch.float32) -> Components:
        raise NotImplementedError

    def _load_parts(self, model_path: str, text_encoder_classes: list, *, revision=None, variant=None,
                    vae_path=None, cache_dir=None, dtype=torch.float32) -> Components:
        """Loads tokenizers, text encoders (one class per ``text_encoder_attrs``), UNet, VAE and the training
        noise scheduler from a diffusers folder or Hub id; any failure becomes a ModelLoadError that says what to do."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer

        from .loading import wrap_load_error

        kw = dict(revision=revision, cache_dir=cache_dir)
        try:
            tokenizers = [AutoTokenizer.from_pretrained(model_path, subfolder=sub, use_fast=False, **kw)
                          for sub in self.tokenizer_attrs]
            encoders = [cls.from_pretrained(model_path, subfolder=sub, variant=variant, torch_dtype=dtype, **kw)
                        for cls, sub in zip(text_encoder_classes, self.text_encoder_attrs)]
            unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", variant=variant,
                                                        torch_dtype=dtype, **kw)
            if vae_path:
                vae = AutoencoderKL.from_pretrained(vae_path, cache_dir=cache_dir)
            else:
                vae = AutoencoderKL.from_pretrained(model_path, subfolder="vae", variant=variant, **kw)
            sched = DDPMScheduler.from_pretrained(model_path, subfolder="scheduler", **kw)
        except Exception as exc:
            raise wrap_load_error(model_path, exc) from None
        return Components(unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                          noise_scheduler=sched, model_path=model_path, vae_path=vae_path)

    def default_resolution(self, components: Components) -> int:
        size = getattr(components.vae.config, "sample_size", None)
        return int(size) if size else 512

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
