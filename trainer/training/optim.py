"""Optimizers and learning-rate schedules.

Parameter groups are fixed for the whole run: group 0 is the UNet LoRA (Prodigy reads its d estimate from
the first group), then one group per kind of text parameter. When text parameters stop training at the pivot,
their group is emptied and their optimizer state deleted, so they leave the optimizer for good; resume rebuilds
the same structure before loading the saved state.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import Optimizer, TrainConfig


class OptimizerUnavailable(RuntimeError):
    pass


def build_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    kind = Optimizer.adamw8bit if cfg.use_8bit_adam else Optimizer(cfg.optimizer)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if kind == Optimizer.prodigy:
        try:
            from .prodigy import SyncFreeProdigy
        except ImportError:
            raise OptimizerUnavailable("--optimizer prodigy needs the prodigyopt package: pip install prodigyopt") from None
        return SyncFreeProdigy(groups, lr=cfg.learning_rate, betas=betas, beta3=cfg.prodigy_beta3,
                       weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, decouple=cfg.prodigy_decouple,
                       use_bias_correction=cfg.prodigy_use_bias_correction,
                       safeguard_warmup=cfg.prodigy_safeguard_warmup, d_coef=cfg.prodigy_d_coef)
    if kind == Optimizer.adamw:
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon,
                                 weight_decay=cfg.adam_weight_decay)
    if kind == Optimizer.adamw8bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise OptimizerUnavailable("--optimizer adamw8bit needs bitsandbytes and a CUDA GPU "
                                       "(pip install bitsandbytes); use adamw or prodigy otherwise") from None
        if not torch.cuda.is_available():
            raise OptimizerUnavailable("--optimizer adamw8bit needs a CUDA GPU; use adamw or prodigy on CPU")
        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon,
                                   weight_decay=cfg.adam_weight_decay)
    if kind == Optimizer.adafactor:
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=cfg.learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=cfg.adam_weight_decay)
    raise OptimizerUnavailable(f"unknown optimizer {kind}")


def build_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(str(cfg.lr_scheduler.value), optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                         num_training_steps=total_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)


def drop_group_params(optimizer: torch.optim.Optimizer, group_name: str) -> None:
    """Removes a group's parameters (and their state) from the optimizer; the empty group stays in place."""
    for group in optimizer.param_groups:
        if group.get("name") == group_name:
            for p in group["params"]:
                optimizer.state.pop(p, None)
                p.grad = None
            group["params"] = []


def effective_lr(optimizer) -> tuple[float, Optional[float]]:
    """(scheduled lr of the UNet group, Prodigy's effective d*lr or None)."""
    g = optimizer.param_groups[0]
    lr = float(g["lr"])
    if "d" in g:
        return lr, float(g["d"]) * lr
    return lr, None

