"""The closed choices of a configuration."""
from __future__ import annotations

from enum import Enum


class Optimizer(str, Enum):
    prodigy = "prodigy"
    adamw = "adamw"
    adamw8bit = "adamw8bit"
    adafactor = "adafactor"


class LRScheduler(str, Enum):
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"


class MixedPrecision(str, Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class SavePrecision(str, Enum):
    """dtype of the exported LoRA and embedding files (kohya's ``--save_precision``; ``float`` is read as fp32)."""
    fp16 = "fp16"
    bf16 = "bf16"
    fp32 = "fp32"


class ReportTo(str, Enum):
    none = "none"
    tensorboard = "tensorboard"
    wandb = "wandb"


class ModelFamilyName(str, Enum):
    auto = "auto"
    sdxl = "sdxl"
    sd = "sd"
