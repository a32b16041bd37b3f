"""From the deterministic batch order to one rank's tensors: the global batch -> this rank's slice, its latents
(from the latent cache), its captions, and the noise and timesteps every rank draws from one shared generator
(so N ranks at batch B train exactly like one rank at batch N x B)."""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

from ..config import TrainConfig
from ..data.captions import training_caption
from ..data.sampler import BucketBatchSampler, Sample
from ..data.sources import TrainItem
from .placeholders import replace_placeholders
from ..devices import to_device


class MicroBatch(NamedTuple):
    epoch: int
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    captions: list
    original_sizes: list
    crops: list
    target_sizes: list
    num_instance: int   # the first ``num_instance`` rows are instance images, the rest class images


class Batches:
    """Micro-batch ``position`` of the run, for one rank."""

    def __init__(self, cfg: TrainConfig, sampler: BucketBatchSampler, items: list[TrainItem],
                 item_buckets: list, class_items: list[TrainItem], latents_for: Callable, num_train_timesteps: int,
                 noise_gen: torch.Generator, rank: int, pivotal: bool):
        self.cfg, self.sampler = cfg, sampler
        self.items, self.item_buckets, self.class_items = items, item_buckets, class_items
        self.latents_for = latents_for    # (key, item, bucket, sample) -> (latent, original, crop, target)
        self.num_train_timesteps = num_train_timesteps
        self.noise_gen, self.rank, self.pivotal = noise_gen, rank, pivotal

    def caption_for(self, item: TrainItem, sample: Sample) -> str:
        cfg = self.cfg
        rng = np.random.default_rng([sample.seed, 7])
        text = training_caption(item.caption, dropout=cfg.caption_dropout, shuffle=cfg.shuffle_tags,
                                keep_tokens=cfg.keep_tokens, rng=rng)
        return replace_placeholders(text, cfg.tokens_per_abstraction) if self.pivotal else text

    def fixed_captions(self) -> list[str] | None:
        """Every caption training can use, when they are fixed (no dropout, no tag shuffling)."""
        cfg = self.cfg
        if cfg.caption_dropout > 0 or cfg.shuffle_tags:
            return None
        caps = {replace_placeholders(it.caption, cfg.tokens_per_abstraction) if self.pivotal else it.caption
                for it in self.items}
        if self.class_items:
            caps.add(cfg.class_prompt)
        return sorted(caps)

    def micro_batch(self, position: int, device) -> MicroBatch:
        """Inputs of this rank for micro-batch ``position``: every rank draws the global batch's noise and
        timesteps from the shared generator and takes its own slice."""
        cfg = self.cfg
        epoch, batch = self.sampler.batch_at(position)
        B = cfg.train_batch_size
        mine = batch[self.rank * B:(self.rank + 1) * B]
        lats, origs, crops, targets, captions = [], [], [], [], []
        for s in mine:
            item = self.items[s.item]
            lat, o, c, t = self.latents_for(s.item, item, self.item_buckets[s.item], s)
            lats.append(lat), origs.append(o), crops.append(c), targets.append(t)
            captions.append(self.caption_for(item, s))
        n_inst = len(mine)
        gb = len(batch)
        if self.class_items:
            bucket = self.item_buckets[mine[0].item]
            for j in range(self.rank * B, (self.rank + 1) * B):
                ci = (position * gb + j) % len(self.class_items)
                lat, o, c, t = self.latents_for(-1 - ci, self.class_items[ci], bucket, Sample(ci, False, 0))
                lats.append(lat), origs.append(o), crops.append(c), targets.append(t)
                captions.append(cfg.class_prompt)
        latents = torch.stack(lats).to(device)
        gshape = (gb * (2 if self.class_items else 1),) + tuple(latents.shape[1:])
        noise_all = torch.randn(gshape, generator=self.noise_gen)
        if cfg.noise_offset:
            noise_all += cfg.noise_offset * torch.randn(gshape[:2] + (1, 1), generator=self.noise_gen)
        t_all = torch.randint(0, self.num_train_timesteps, (gshape[0],), generator=self.noise_gen)
        idx = list(range(self.rank * B, (self.rank + 1) * B))
        if self.class_items:
            idx += [gb + j for j in idx]
        noise, timesteps = to_device(noise_all[idx], device), to_device(t_all[idx], device)
        return MicroBatch(epoch, latents, noise, timesteps, captions, origs, crops, targets, n_inst)
