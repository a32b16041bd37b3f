"""Diffusion losses: epsilon / v-prediction targets, min-SNR weighting, prior preservation."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


def target_for(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r} (epsilon and v_prediction are supported)")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))


def diffusion_loss(pred, target, timesteps, noise_scheduler, *, snr_gamma: Optional[float] = None,
                   num_instance: Optional[int] = None, prior_loss_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Mean loss over the batch. With prior preservation the batch is [instance..., class...] and the class
    half's loss is added with ``prior_loss_weight``. Returns (loss, parts)."""
    losses = per_sample_mse(pred, target)
    if snr_gamma is not None:
        snr = compute_snr(noise_scheduler, timesteps)
        clipped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
        if noise_scheduler.config.prediction_type == "v_prediction":
            weights = clipped / (snr + 1)
        else:
            weights = clipped / snr
        losses = losses * weights
    if num_instance is not None and num_instance < losses.shape[0]:
        inst, prior = losses[:num_instance].mean(), losses[num_instance:].mean()
        return inst + prior_loss_weight * prior, {"instance": inst.detach(), "prior": prior.detach()}
    loss = losses.mean()
    return loss, {"instance": loss.detach()}
