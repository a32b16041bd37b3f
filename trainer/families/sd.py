"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, epsilon (SD 1.x, SD 2.x-base) or v-prediction
(SD 2.x 768) targets, no micro-conditioning."""
from __future__ import annotations


from .base import Components, ModelFamily


class SDFamily(ModelFamily):
    name = "sd"
    pipeline_class_names = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
    text_encoder_attrs = ("text_encoder",)
    tokenizer_attrs = ("tokenizer",)
    embedding_keys = ("clip_l",)
    kohya_te_prefixes = ("lora_te",)
    kohya_unet_layout = "diffusers"  # sd-scripts trains SD 1.x/2.x on library/original_unet.py (diffusers names)

    def text_encoder_classes(self) -> list:
        from transformers import CLIPTextModel

        return [CLIPTextModel]

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
