"""The samplers the Generate tab offers, by their usual names, each built from the base pipeline's scheduler
config."""
from __future__ import annotations

from typing import Any, Callable


def _euler_a(cfg):
    from diffusers import EulerAncestralDiscreteScheduler

    return EulerAncestralDiscreteScheduler.from_config(cfg)


def _euler(cfg):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(cfg)


def _dpmpp_2m(cfg):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2,
                                                   use_karras_sigmas=False)


def _dpmpp_2m_karras(cfg):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2,
                                                   use_karras_sigmas=True)


def _ddim(cfg):
    from diffusers import DDIMScheduler

    # Latents are not in [-1, 1]: clipping x0 (DDIM's default for pixel models) would wreck them.
    return DDIMScheduler.from_config(cfg, clip_sample=False)


def _unipc(cfg):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler.from_config(cfg)


SCHEDULERS: dict[str, Callable[[Any], Any]] = {
    "Euler a": _euler_a,
    "Euler": _euler,
    "DPM++ 2M": _dpmpp_2m,
    "DPM++ 2M Karras": _dpmpp_2m_karras,
    "DDIM": _ddim,
    "UniPC": _unipc,
}
