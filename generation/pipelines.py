"""Rendering with a diffusers pipeline: the one loop shared by the Generate engine and the trainer's sample
images (validation during training, class images for prior preservation)."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Optional

import torch


class RenderStopped(RuntimeError):
    """``should_stop()`` turned true while an image was being denoised; the image was not finished."""


def render(pipe, prompt, *, steps: int, guidance: Optional[float], width: int, height: int, generator: torch.Generator,
           negative_prompt=None, on_step: Optional[Callable[[int, int], Any]] = None,
           should_stop: Optional[Callable[[], bool]] = None, autocast=None, output_type: str = "pil",
           num_images: int = 1) -> list:
    """``num_images`` images of ``prompt`` (placeholders already replaced), in inference mode.

    ``on_step(step, total)`` is called after every denoising step; ``should_stop()`` is checked there too and
    interrupts the pipeline (diffusers' ``_interrupt``), raising :class:`RenderStopped`, so a Stop does not wait
    for the rest of the image. ``autocast`` (a context-manager factory, e.g. accelerate's) wraps the call.
    """
    stopped = [False]

    def _callback(p, step, timestep, kwargs):
        if on_step is not None:
            on_step(step + 1, int(getattr(p, "_num_timesteps", steps) or steps))
        if should_stop is not None and should_stop():
            stopped[0] = True
            p._interrupt = True  # diffusers' pipelines skip the remaining steps when this is set
        return kwargs

    kwargs = {} if guidance is None else {"guidance_scale": float(guidance)}
    with torch.inference_mode(), (autocast or nullcontext)():
        out = pipe(prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps, width=width,
                   height=height, generator=generator, num_images_per_prompt=num_images,
                   callback_on_step_end=_callback, output_type=output_type, **kwargs)
    if stopped[0]:
        raise RenderStopped("stopped during rendering")
    return list(out.images)
