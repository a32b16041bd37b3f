"""Deterministic, resumable batch order: repeat, then shuffle; batches drawn from one bucket.

Everything random about a sample (its flip, crop, caption dropout, tag order) is decided here from
``(seed, epoch)`` and carried with the sample, never from step order or global RNG state, so caches keyed by
(image, flip) always pair a latent with its own caption and micro-conditioning, and a resumed run sees exactly
the samples an uninterrupted one would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sample:
    item: int      # index into the items list
    flip: bool
    seed: int      # per-sample seed for crop / caption randomness


class BucketBatchSampler:
    def __init__(self, item_buckets: list[tuple[int, int]], *, repeats: int, batch_size: int, seed: int,
                 random_flip: bool):
        self.item_buckets = item_buckets
        self.repeats = repeats
        self.batch_size = batch_size
        self.seed = seed
        self.random_flip = random_flip
        self._cache: dict[int, list[list[Sample]]] = {}

    def epoch(self, epoch: int) -> list[list[Sample]]:
        if epoch in self._cache:
            return self._cache[epoch]
        rng = np.random.default_rng([self.seed, epoch])
        entries = [i for i in range(len(self.item_buckets)) for _ in range(self.repeats)]
        order = [entries[j] for j in rng.permutation(len(entries))]
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i in order:
            by_bucket.setdefault(self.item_buckets[i], []).append(i)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            members = by_bucket[bucket]
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                k = 0
                while len(chunk) < self.batch_size:  # pad from the same bucket: every batch is full and single-bucket
                    chunk.append(members[k % len(members)])
                    k += 1
                batches.append(chunk)
        batches = [batches[j] for j in rng.permutation(len(batches))]
        out = []
        for chunk in batches:
            out.append([Sample(item=i, flip=bool(self.random_flip and rng.random() < 0.5),
                               seed=int(rng.integers(0, 2**31 - 1))) for i in chunk])
        self._cache[epoch] = out
        for old in [e for e in self._cache if e not in (0, epoch)]:
            del self._cache[old]
        return out

    def batches_per_epoch(self) -> int:
        return len(self.epoch(0))

    def batch_at(self, position: int) -> tuple[int, list[Sample]]:
        """(epoch, batch) of the ``position``-th micro-batch of the whole run."""
        n = self.batches_per_epoch()
        epoch, idx = divmod(position, n)
        return epoch, self.epoch(epoch)[idx]


def compute_total_steps(cfg, num_items: int, batches_per_epoch: int, world: int = 1) -> tuple[int, int]:
    """(total optimizer steps, optimizer steps per epoch). A step is one global batch: ``world`` processes x
    ``train_batch_size`` x ``gradient_accumulation_steps`` images (``batches_per_epoch`` counts global batches),
    so ``steps_per_image`` on N processes sees as many images as on one, in 1/N of the steps."""
    per_epoch = max(1, math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps))
    if cfg.max_train_steps:
        return cfg.max_train_steps, per_epoch
    if cfg.steps_per_image:
        images_per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * max(1, world)
        return max(1, math.ceil(cfg.steps_per_image * num_items / images_per_step)), per_epoch
    return cfg.num_train_epochs * per_epoch, per_epoch
