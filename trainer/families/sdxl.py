"""Stable Diffusion XL: two CLIP text encoders (ViT-L 768 + OpenCLIP bigG 1280 with projection), a
``text_time`` UNet conditioned on pooled text and six micro-conditioning numbers per image."""
from __future__ import annotations

import torch

from ..devices import to_device
from .base import Components, ModelFamily


class SDXLFamily(ModelFamily):
    name = "sdxl"
    pipeline_class_names = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    text_encoder_attrs = ("text_encoder", "text_encoder_2")
    tokenizer_attrs = ("tokenizer", "tokenizer_2")
    embedding_keys = ("clip_l", "clip_g")
    kohya_te_prefixes = ("lora_te1", "lora_te2")
    kohya_unet_layout = "sgm"  # sd-scripts trains SDXL on library/sdxl_original_unet.py

    def text_encoder_classes(self) -> list:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return [CLIPTextModel, CLIPTextModelWithProjection]

    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def build_pipeline(self, c: Components, scheduler=None):
        from diffusers import EulerDiscreteScheduler

        scheduler = scheduler or EulerDiscreteScheduler.from_config(c.noise_scheduler.config)
        return self.pipeline_class()(
            vae=c.vae, text_encoder=c.text_encoders[0], text_encoder_2=c.text_encoders[1],
            tokenizer=c.tokenizers[0], tokenizer_2=c.tokenizers[1], unet=c.unet, scheduler=scheduler)

    def encode(self, c: Components, input_ids):
        embeds, pooled = [], None
        for te, ids in zip(c.text_encoders, input_ids):
            out = te(ids.to(te.device), output_hidden_states=True)
            pooled = out[0]  # the last encoder's projected pooled output (text_embeds)
            embeds.append(out.hidden_states[-2])
        return torch.cat(embeds, dim=-1), pooled

    def added_conditioning(self, pooled, original_sizes, crops, target_sizes, device, dtype):
        # time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per image
        rows = [list(o) + list(cr) + list(t) for o, cr, t in zip(original_sizes, crops, target_sizes)]
        time_ids = to_device(torch.tensor(rows, dtype=dtype), device)
        return {"text_embeds": pooled.to(device=device, dtype=dtype), "time_ids": time_ids}
