"""Data parallel helpers: which rank this is, agreement between ranks, and gradient averaging in buckets.

One process (no process group, no ``RANK``/``WORLD_SIZE`` in the environment) is rank 0 of a world of 1, and
every helper is then a no-op. Under ``torchrun`` / ``accelerate launch`` the process group exists once the
accelerator is made; before that, the launcher's environment variables say the rank and world size.
"""
from __future__ import annotations

import os
from typing import Any

# Gradients are averaged in buckets of about this many bytes (DDP's default bucket size): one all-reduce per
# bucket instead of one per tensor (~1,120 tensors per SDXL step with the text-encoder LoRA).
BUCKET_BYTES = 25 * 1024 * 1024


def _group():
    """torch.distributed when a process group with more than one rank is up, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def rank() -> int:
    dist = _group()
    return dist.get_rank() if dist else int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    dist = _group()
    return dist.get_world_size() if dist else max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def is_main() -> bool:
    """Rank 0 (the one process that prints progress and notes and writes the run folder)."""
    return rank() == 0


def all_true(flag: bool, device=None) -> bool:
    """True on every rank when ``flag`` is true on every rank (one all-reduce, MIN); ``flag`` alone otherwise.
    Every rank must call it at the same point."""
    dist = _group()
    if dist is None:
        return bool(flag)
    import torch

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects); ``obj`` itself in one process."""
    dist = _group()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank; ``[obj]`` in one process."""
    dist = _group()
    if dist is None:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def buckets(tensors: list, max_bytes: int = BUCKET_BYTES) -> list[list]:
    """``tensors`` split, in order, into runs of one dtype and device of at most ``max_bytes`` each (a tensor
    larger than that is a bucket of its own)."""
    out: list[list] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if out and out[-1][0].dtype == t.dtype and out[-1][0].device == t.device and size + nbytes <= max_bytes:
            out[-1].append(t)
            size += nbytes
        else:
            out.append([t])
            size = nbytes
    return out


def average_gradients(params: list, max_bytes: int = BUCKET_BYTES) -> int:
    """Averages ``p.grad`` of ``params`` over the ranks in buckets: each bucket is flattened into one buffer,
    all-reduced once (SUM) and divided by the world size, and copied back. A parameter without a gradient
    counts as zeros (every rank must send the same buckets). Returns the number of all-reduces (0 alone)."""
    dist = _group()
    if dist is None or not params:
        return 0
    import torch
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    calls = 0
    for bucket in buckets(grads, max_bytes):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        calls += 1
        flat.div_(world)
        for g, avg in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(avg)
    return calls
