"""The validation loss: the training loss on held-out images (``--validation_loss_images``) at noise and
timesteps fixed once per run, so its curve moves only because the weights do (the training loss jumps with each
step's random noise and timestep). Each image is seen at ``TIMESTEPS`` timesteps spread evenly over the schedule,
with its own caption (placeholders replaced as in training) and no caption dropout or flip."""
from __future__ import annotations

from typing import Callable

import torch

from ..data.buckets import nearest_bucket
from ..data.sources import TrainItem
from .batches import MicroBatch
from .errors import TrainingError

TIMESTEPS = 4


def split_held_out(items: list[TrainItem], count: int) -> tuple[list[TrainItem], list[TrainItem]]:
    """(training items, held-out items): the last ``count`` items in file order are held out."""
    if not count:
        return items, []
    if count >= len(items):
        raise TrainingError(
            f"--validation_loss_images {count} holds out every image ({len(items)} in the dataset), leaving none "
            f"to train on; hold out at most {len(items) - 1} (or use 0 to turn the validation loss off).")
    return items[:-count], items[-count:]


class HeldOutLoss:
    """Fixed micro-batches of the held-out images; ``compute(loss_of)`` is their mean loss."""

    def __init__(self, items: list[TrainItem], buckets: list, encode_item: Callable, caption_of: Callable[[str], str],
                 num_train_timesteps: int, seed: int):
        gen = torch.Generator().manual_seed(seed + 7)  # its own generator: the training noise stream is untouched
        # evenly spread, away from both ends of the schedule
        ts = torch.linspace(0, num_train_timesteps - 1, TIMESTEPS + 2)[1:-1].round().long()
        self.batches: list[MicroBatch] = []
        for item in items:
            lat, orig, crop, target = encode_item(item, nearest_bucket(*item.size, buckets), False, 0)
            lats = lat.unsqueeze(0).repeat(TIMESTEPS, *([1] * lat.ndim))
            noise = torch.randn(lats.shape, generator=gen)
            self.batches.append(MicroBatch(0, lats, noise, ts.clone(), [caption_of(item.caption)] * TIMESTEPS,
                                           [orig] * TIMESTEPS, [crop] * TIMESTEPS, [target] * TIMESTEPS, TIMESTEPS))

    @torch.no_grad()
    def compute(self, loss_of: Callable[[MicroBatch], torch.Tensor], device) -> float:
        total = 0.0
        for mb in self.batches:
            mb = mb._replace(latents=mb.latents.to(device), noise=mb.noise.to(device),
                             timesteps=mb.timesteps.to(device))
            total += float(loss_of(mb).item())
        return total / max(1, len(self.batches))
