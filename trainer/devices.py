"""Device and dtype choice: the one rule used by training, generation and captioning; and host-to-device copies
that do not stall the GPU.

On a CUDA GPU: bf16 where the GPU supports it, else fp16 (pre-Ampere, e.g. Colab's T4). Elsewhere: fp32 on the
CPU. Torch is imported lazily, so importing this module is cheap.

A plain ``tensor.to("cuda")`` from ordinary (pageable) host memory waits for the copy, and so for every kernel
queued before it: one stall per call. The training step makes a few small host tensors per step (noise,
timesteps, SDXL's size ids); copied from page-locked memory with ``non_blocking=True`` they are queued behind
the running kernels instead, and the host goes on preparing the next step. PyTorch's pinned-memory allocator
keeps each staging buffer alive until its copy has run, so the source may be dropped at once.
"""
from __future__ import annotations

from typing import Any

_DTYPE_NAMES = {
    "fp32": "float32", "float32": "float32", "float": "float32", "32": "float32", "no": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16", "16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - a broken torch install
        return False


def resolve_device(device: Any = None):
    """None/"auto" -> cuda when available, else cpu; anything else as ``torch.device``."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def half_dtype():
    """The half precision this GPU runs best: bf16 when supported, else fp16."""
    import torch

    try:
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
    except Exception:  # pragma: no cover - very old drivers
        pass
    return torch.float16


def resolve_dtype(dtype: Any, device) -> Any:
    """None/"auto" -> :func:`half_dtype` on CUDA, fp32 elsewhere; names (fp16, bf16, ...) or torch dtypes."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or str(dtype).lower() == "auto":
        return half_dtype() if getattr(device, "type", str(device)).startswith("cuda") else torch.float32
    name = _DTYPE_NAMES.get(str(dtype).lower().replace("torch.", ""))
    if name is None:
        raise ValueError(f"unknown dtype {dtype!r}; use fp32, fp16, bf16 or a torch.dtype")
    return getattr(torch, name)


def default_mixed_precision() -> str:
    """accelerate's ``mixed_precision`` when the user gave none: bf16 on a GPU that has it, else "no"."""
    if not cuda_available():
        return "no"
    import torch

    return "bf16" if half_dtype() == torch.bfloat16 else "no"


def weight_dtype(mixed_precision: str):
    """dtype of the frozen weights under accelerate's ``mixed_precision`` ("no" -> fp32)."""
    return resolve_dtype(mixed_precision or "no", "cpu")


def to_device(t, device):
    """``t`` on ``device``; from the host to a CUDA device without waiting for the copy."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)

