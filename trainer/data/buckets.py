"""Aspect-ratio buckets: sizes of about resolution^2 pixels whose sides are multiples of ``step``."""
from __future__ import annotations

import math


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) pairs, each side a multiple of ``step``, area <= resolution^2, aspect <= max_ratio."""
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    w = step
    while w <= resolution * max_ratio:
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            buckets.add((w, h))
            buckets.add((h, w))
        w += step
    return sorted(buckets)


def bucket_step_for(resolution: int, step: int = 64) -> int:
    """The step actually used: ``step``, but finer for small resolutions (the tiny demo models train at 64 px)
    so there is more than one bucket; always a multiple of 16 (8 px per latent x one UNet downsampling)."""
    return max(16, min(step, resolution // 4 // 16 * 16))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest in log aspect ratio (ties: the larger area, so less upscaling)."""
    ar = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1]))


def bucket_histogram(sizes: list[tuple[int, int]], resolution: int, step: int = 64,
                     enabled: bool = True) -> dict[str, int]:
    """'WxH' -> number of images, for the dataset tab and the CLI summary."""
    buckets = make_buckets(resolution, bucket_step_for(resolution, step)) if enabled else [(resolution, resolution)]
    hist: dict[str, int] = {}
    for w, h in sizes:
        b = nearest_bucket(w, h, buckets)
        key = f"{b[0]}x{b[1]}"
        hist[key] = hist.get(key, 0) + 1
    return dict(sorted(hist.items(), key=lambda kv: -kv[1]))
