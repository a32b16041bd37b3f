"""Prior preservation: make sure ``class_data_dir`` holds ``num_class_images`` images of ``class_prompt``,
generating the missing ones with the base model (before any LoRA is attached), with progress."""
from __future__ import annotations

import hashlib
import os

import torch

from generation.pipelines import render

from ..data.images import is_image_name


def count_class_images(folder: str) -> int:
    if not os.path.isdir(folder):
        return 0
    return sum(1 for f in os.listdir(folder) if is_image_name(f))


@torch.no_grad()
def generate_class_images(family, components, *, folder: str, prompt: str, wanted: int, resolution: int,
                          batch_size: int, seed: int, on_progress=None, steps: int = 25, autocast=None) -> int:
    """Generates the missing class images; returns how many were written. ``autocast`` (accelerate's) lets a
    bf16/fp16 UNet feed the fp32 VAE."""
    os.makedirs(folder, exist_ok=True)
    have = count_class_images(folder)
    missing = max(0, wanted - have)
    if missing == 0:
        return 0
    pipe = family.build_pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    done = 0
    while done < missing:
        n = min(batch_size, missing - done)
        images = render(pipe, prompt, steps=steps, guidance=None, width=resolution,
                        height=resolution, generator=gen, num_images=n, autocast=autocast)
        for img in images:
            digest = hashlib.sha1(img.tobytes()).hexdigest()[:12]
            tmp = os.path.join(folder, f".class-{have + done:05d}-{digest}.png.tmp")
            img.save(tmp, format="PNG")
            os.replace(tmp, os.path.join(folder, f"class-{have + done:05d}-{digest}.png"))
            done += 1
        if on_progress:
            on_progress(done, missing)
    return done
