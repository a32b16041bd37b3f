"""What a run computes once and reuses: the VAE latents of every (image, flip, bucket), and, once no text
parameter trains, the prompt embeddings of every caption; on a GPU the text encoders then leave it."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional

import torch

from ..config import TrainConfig
from ..data.sampler import Sample
from ..data.sources import TrainItem
from ..data.checks import pixel_sha256
from .latents import LatentStore


class LatentCache:
    """Latents keyed by the image (index; class images negative), its flip and its bucket, never by step order.
    ``entries`` maps each to its key in the :class:`~.latents.LatentStore` (on disk, keyed by content)."""

    def __init__(self, cfg: TrainConfig, store: LatentStore, items: list[TrainItem], item_buckets: list,
                 class_items: list[TrainItem]):
        self.cfg, self.store = cfg, store
        self.items, self.item_buckets, self.class_items = items, item_buckets, class_items
        self.entries: dict[tuple, str] = {}   # (image, flip, bucket) -> store key

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.store.encode_pixels(pixels)

    def encode_item(self, item: TrainItem, bucket, flip: bool, sample_seed: int) -> tuple:
        """(latent, original_size, crop_top_left, target_size) of one image at one bucket and flip."""
        return self.store.encode(item.load(), bucket, flip, sample_seed)

    def fill(self, status: Callable[..., None]) -> None:
        """Makes sure every (image, flip variant, bucket) has an entry: read back when the store has it (the setup's
        read of the dataset already encoded what was missing at this resolution), encoded otherwise; each image
        missing something is decoded once."""
        variants = [False, True] if self.cfg.random_flip else [False]
        todo = [(i, self.items[i], [self.item_buckets[i]]) for i in range(len(self.items))]
        all_buckets = sorted(set(self.item_buckets))  # a class image may join a batch of any bucket
        todo += [(-1 - j, it, all_buckets) for j, it in enumerate(self.class_items)]
        before = self.store.encodes
        for n, (i, item, buckets) in enumerate(todo):
            image = None

            def decoded():
                nonlocal image
                if image is None:
                    image = item.load()
                return image

            if item.content is None:
                item.content = pixel_sha256(decoded())
            for b in buckets:
                for flip in (variants if i >= 0 else [False]):
                    self.entries[(i, flip, b)] = self.store.ensure(item.content, decoded, b, flip)
            if n % 8 == 0 or n == len(todo) - 1:
                status("cache_latents", f"latents {n + 1}/{len(todo)} ({self.store.encodes - before} encoded)",
                       n + 1, len(todo))

    def get(self, key_item: int, item: TrainItem, bucket, sample: Sample) -> tuple:
        key = self.entries.get((key_item, sample.flip, bucket))
        if key is not None:
            entry = self.store.load(key)
            if entry is None:  # removed or damaged since the setup: encode it again
                entry = self.store.encode(item.load(), bucket, sample.flip, 0)
                self.store.save(key, entry)
            return entry
        return self.encode_item(item, bucket, sample.flip, sample.seed)


class TextEncoding:
    """Prompt encoding with gradients while text trains; afterwards cached per caption (``cache_text_embeddings``),
    and on a GPU the encoders leave it once every caption is cached."""

    # Devices whose memory is worth freeing by moving the text encoders to the CPU after the pivot. On a CPU
    # the move is a no-op; tests add "cpu" to run the same path (pre-encode every caption, never call the
    # encoders again) without a GPU.
    OFFLOAD_FROM = ("cuda",)

    def __init__(self, cfg: TrainConfig, family, comps, device):
        self.cfg, self.family, self.comps, self.device = cfg, family, comps, device
        self.trainable = True
        self.cache: dict[str, tuple] = {}      # caption -> (prompt embeds, pooled), once text is frozen
        self.offloaded = False

    def encoders_to(self, device) -> None:
        for te in self.comps.text_encoders:
            te.to(device)

    def encode(self, captions: list[str]):
        fam, comps = self.family, self.comps
        use_cache = self.cfg.cache_text_embeddings and not self.trainable
        if use_cache and all(c in self.cache for c in captions):
            embs = [self.cache[c] for c in captions]
            pooled = [e[1] for e in embs]
            return (torch.stack([e[0] for e in embs]),
                    torch.stack(pooled) if pooled[0] is not None else None)
        ctx = nullcontext() if self.trainable else torch.no_grad()
        if self.offloaded:  # a caption that was not pre-encoded: bring the encoders back for it
            self.encoders_to(self.device)
        with ctx:
            ids = fam.tokenize(comps, captions)
            embeds, pooled = fam.encode(comps, ids)
        if self.offloaded:
            self.encoders_to("cpu")
        if use_cache:
            for j, c in enumerate(captions):
                self.cache[c] = (embeds[j].detach(), pooled[j].detach() if pooled is not None else None)
        return embeds, pooled

    def freeze(self, captions: Optional[list[str]], offload_from: tuple) -> Optional[int]:
        """Text stopped training: drop the gradient-carrying cache; on an offload device, encode every caption
        once and move the encoders to the CPU. Returns how many captions were cached when it offloaded."""
        self.trainable = False
        self.cache = {}
        if (self.device.type not in offload_from or not self.cfg.cache_text_embeddings or captions is None):
            return None
        for start in range(0, len(captions), 16):
            self.encode(captions[start:start + 16])
        self.encoders_to("cpu")
        self.offloaded = True
        return len(captions)
