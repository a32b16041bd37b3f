"""Sample images during and after training, always with the learnt tokens in place."""
from __future__ import annotations

import os

import torch

from generation.pipelines import render


@torch.no_grad()
def render_samples(family, components, *, prompt: str, num_images: int, steps: int, guidance: float,
                   resolution: int, seed: int, out_dir: str, tag: str, device, autocast=None,
                   should_stop=None) -> list[str]:
    """Renders ``num_images`` images of ``prompt`` (placeholders already replaced) and returns their paths.

    ``should_stop()`` is checked after every denoising step; when it turns true the render is abandoned and
    :class:`~generation.pipelines.RenderStopped` propagates (images already saved stay on disk)."""
    pipe = family.build_pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    modules = [components.unet, *components.text_encoders]  # samples without dropout: every module in eval
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    try:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for i in range(num_images):
            image = render(pipe, prompt, steps=steps, guidance=guidance, width=resolution, height=resolution,
                           generator=gen, autocast=autocast, should_stop=should_stop)[0]
            path = os.path.join(out_dir, f"{tag}-{i}.png")
            image.save(path)
            paths.append(path)
    finally:
        for m, training in zip(modules, was_training):
            m.train(training)
    return paths
