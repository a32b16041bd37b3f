"""Judged hit rates on the toy world: sample latents for a prompt at fixed seeds (``output_type="latent"``, no
decoding) and count how many the judge labels as the wanted colour and shape."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

STEPS = 20          # Euler steps per sample
GUIDANCE = 5.0


def load_toy(path: str):
    """(StableDiffusionXLPipeline, judge) of a built toy-world folder, pooling at the end-of-text token."""
    from diffusers import StableDiffusionXLPipeline

    from ..families.pooling import pool_at_end_of_text
    from .judge import load_judge

    pipe = StableDiffusionXLPipeline.from_pretrained(path, use_safetensors=True)
    pool_at_end_of_text([pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2])
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_judge(path)


@torch.no_grad()
def sample_latents(pipe, prompt: str, seeds: Iterable[int], steps: int = STEPS, guidance: float = GUIDANCE,
                   cross_attention_kwargs: Optional[dict] = None) -> torch.Tensor:
    """[N, 4, 8, 8] latents of ``prompt``, one per seed, all in one batch."""
    seeds = list(seeds)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(prompt=[prompt] * len(seeds), generator=gens, num_inference_steps=steps, guidance_scale=guidance,
               height=64, width=64, output_type="latent", cross_attention_kwargs=cross_attention_kwargs)
    return out.images


def hit_rate(labels, colour: Optional[str], shape: Optional[str]) -> float:
    """Share of (colour, shape) labels matching the wanted ones (None: any)."""
    labels = list(labels)
    ok = [(colour is None or c == colour) and (shape is None or s == shape) for c, s in labels]
    return sum(ok) / max(1, len(ok))


def prompt_hit_rate(pipe, judge, prompt: str, colour: Optional[str], shape: Optional[str], seeds, **kw) -> float:
    """Judged hit rate of ``prompt`` over ``seeds``."""
    return hit_rate(judge.labels(sample_latents(pipe, prompt, seeds, **kw)), colour, shape)


def prior_accuracy(pipe, judge, seeds, colours, shapes, **kw) -> float:
    """Mean hit rate over every "a photo of a <colour> <shape>" prompt of the base set."""
    rates = [prompt_hit_rate(pipe, judge, f"a photo of a {c} {s}", c, s, seeds, **kw) for c in colours for s in shapes]
    return sum(rates) / len(rates)
