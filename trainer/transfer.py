"""Host-to-device copies that do not stall the GPU.

A plain ``tensor.to("cuda")`` from ordinary (pageable) host memory waits for the copy, and so for every kernel
queued before it: one stall per call. The training step makes a few small host tensors per step (noise,
timesteps, SDXL's size ids); copied from page-locked memory with ``non_blocking=True`` they are queued behind
the running kernels instead, and the host goes on preparing the next step. PyTorch's pinned-memory allocator
keeps each staging buffer alive until its copy has run, so the source may be dropped at once.
"""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``; from the host to a CUDA device without waiting for the copy."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
