"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, epsilon (SD 1.x, SD 2.x-base) or v-prediction
(SD 2.x 768) targets, no micro-conditioning."""
from __future__ import annotations

import torch

from .base import Components, ModelFamily


class SDFamily(ModelFamily):
    name = "sd"
    pipeline_class_names = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
    text_encoder_attrs = ("text_encoder",)
    tokenizer_attrs = ("tokenizer",)
    embedding_keys = ("clip_l",)
    kohya_te_prefixes = ("lora_te",)
    uses_time_ids = False

    def load(self, model_path, *, revision=None, variant=None, vae_path=None, cache_dir=None,
             dtype=torch.float32) -> Components:
        from transformers import CLIPTextModel

        return self._load_parts(model_path, [CLIPTextModel], revision=revision, variant=variant,
                                vae_path=vae_path, cache_dir=cache_dir, dtype=dtype)

    def default_resolution(self, c: Components) -> int:
        # SD 2.x v-prediction models are 768 px, everything else in this family 512 px (tiny models: their VAE size).
        size = getattr(c.vae.config, "sample_size", None)
        if size and size < 512:
            return int(size)
        return 768 if c.prediction_type == "v_prediction" else 512

    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def build_pipeline(self, c: Components, scheduler=None):
        from diffusers import DPMSolverMultistepScheduler

        scheduler = scheduler or DPMSolverMultistepScheduler.from_config(c.noise_scheduler.config)
        return self.pipeline_class()(
            vae=c.vae, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0], unet=c.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def encode(self, c: Components, input_ids):
        te = c.text_encoders[0]
        return te(input_ids[0].to(te.device))[0], None
