"""Caption handling at training time: tag shuffling with kept leading tags, caption dropout."""
from __future__ import annotations

import numpy as np


def shuffle_tags(caption: str, keep_tokens: int, rng: np.random.Generator) -> str:
    tags = [t.strip() for t in caption.split(",")]
    tags = [t for t in tags if t]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    order = rng.permutation(len(tail)) if tail else []
    return ", ".join(head + [tail[i] for i in order])


def training_caption(caption: str, *, dropout: float, shuffle: bool, keep_tokens: int,
                     rng: np.random.Generator) -> str:
    """The caption actually used for one sample (rng is per sample, so resume reproduces it)."""
    if dropout > 0 and rng.random() < dropout:
        return ""
    if shuffle:
        return shuffle_tags(caption, keep_tokens, rng)
    return caption
