"""One optimizer step: forward and loss per micro-batch, backward, gradients averaged over the ranks, clipped,
then the optimizer and scheduler steps."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..distributed import average_gradients
from .batches import MicroBatch
from .loss import diffusion_loss, target_for


def forward_loss(mb: MicroBatch, *, family, comps, unet_forward, encode_text: Callable, accelerator, cfg,
                 with_prior: bool):
    """(loss, parts) of one micro-batch."""
    noisy = comps.noise_scheduler.add_noise(mb.latents, mb.noise, mb.timesteps)
    wdtype = comps.unet.dtype
    embeds, pooled = encode_text(mb.captions)
    added = family.added_conditioning(pooled, mb.original_sizes, mb.crops, mb.target_sizes, mb.latents.device,
                                      wdtype)
    with accelerator.autocast():
        pred = unet_forward(noisy.to(wdtype), mb.timesteps, embeds.to(wdtype), added_cond_kwargs=added,
                            return_dict=False)[0]
    target = target_for(comps.noise_scheduler, mb.latents, mb.noise, mb.timesteps)
    return diffusion_loss(pred, target, mb.timesteps, comps.noise_scheduler, snr_gamma=cfg.snr_gamma,
                          num_instance=mb.num_instance if with_prior else None,
                          prior_loss_weight=cfg.prior_loss_weight)


def backward(loss: torch.Tensor, scaler=None) -> None:
    """The backward of one micro-batch's loss; with fp16 through the GradScaler (accelerate's ``scaler``), so
    gradients below fp16's range (~6e-8) are scaled up instead of flushed to zero."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def apply_gradients(params: list[torch.nn.Parameter], *, optimizer, scheduler, accelerator, world: int,
                    max_grad_norm: float, fault_hook: Optional[Callable[[str], None]], step: int,
                    scaler=None) -> None:
    """Averages gradients over ``world`` ranks (in buckets: ``distributed.average_gradients``), clips them, steps the optimizer and the scheduler. With a
    GradScaler the (identical, averaged) gradients are unscaled before clipping, and a step whose gradients
    overflowed is skipped by the scaler, which then lowers its scale."""
    if world > 1:
        average_gradients(params)  # one all-reduce per ~25 MB bucket, not one per tensor
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if fault_hook:
        fault_hook(f"before-optimizer-step:{step}")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
