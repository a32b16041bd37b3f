"""The toy world's images: one flat shape of one colour on a white 64 px square, at a random size and position,
and the captions that name it ("a photo of a red circle")."""
from __future__ import annotations

import numpy as np

SIZE = 64
COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}
SHAPES = ("circle", "square", "triangle", "plus")
#: What the base model is pretrained on; yellow and the plus are never shown to it.
BASE_COLOURS = ("red", "green", "blue")
BASE_SHAPES = ("circle", "square", "triangle")


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = SIZE) -> np.ndarray:
    """Boolean [size, size] mask of ``shape`` centred at (cx, cy) with half-extent ``r`` pixels."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "triangle":  # pointing up: the base at cy + r, the apex at cy - r
        t = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    if shape == "plus":
        arm = r * 0.35
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def render(colour: str, shape: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """One image as uint8 [size, size, 3]: the shape at a random half-extent (13-19 px) and centre (+-6 px)."""
    r = rng.uniform(13.0, 19.0)
    cx, cy = size / 2 + rng.uniform(-6, 6), size / 2 + rng.uniform(-6, 6)
    img = np.ones((size, size, 3), np.float32)
    img[shape_mask(shape, cx, cy, r, size)] = COLOURS[colour]
    return (img * 255).round().astype(np.uint8)


def caption(colour: str, shape: str) -> str:
    return f"a photo of a {colour} {shape}"


def render_set(pairs, n_each: int, seed: int) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """``n_each`` renders of every (colour, shape) in ``pairs``: (uint8 [N, 64, 64, 3], the (colour, shape) of each)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for colour, shape in pairs:
        for _ in range(n_each):
            images.append(render(colour, shape, rng))
            labels.append((colour, shape))
    return np.stack(images), labels


def to_tensor(images: np.ndarray):
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1], as the pipelines feed the VAE."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
