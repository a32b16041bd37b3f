"""The judge: an MLP on the toy VAE's 8x8x4 latent with a colour head and a shape head, trained on encoded renders
of every colour x shape (4 x 4, the unseen ones included) with latent-noise augmentation. Used only to measure."""
from __future__ import annotations

import os

import numpy as np
import torch

from .render import COLOURS, SHAPES, render_set
from .vae import encode

JUDGE_FILE = "judge.safetensors"
COLOUR_NAMES = tuple(COLOURS)


class Judge(torch.nn.Module):
    """latents [N, 4, 8, 8] -> (colour logits [N, 4], shape logits [N, 4])."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, hidden), torch.nn.GELU(),
                                        torch.nn.Linear(hidden, hidden), torch.nn.GELU())
        self.colour = torch.nn.Linear(hidden, len(COLOUR_NAMES))
        self.shape = torch.nn.Linear(hidden, len(SHAPES))

    def forward(self, latents):
        h = self.body(latents.float())
        return self.colour(h), self.shape(h)

    @torch.no_grad()
    def labels(self, latents) -> list[tuple[str, str]]:
        """(colour, shape) of each latent."""
        c, s = self(latents)
        return [(COLOUR_NAMES[i], SHAPES[j]) for i, j in zip(c.argmax(1).tolist(), s.argmax(1).tolist())]


def _data(vae, n_each: int, seed: int):
    pairs = [(c, s) for c in COLOUR_NAMES for s in SHAPES]
    images, labels = render_set(pairs, n_each, seed)
    lat = encode(vae, images)
    cy = torch.tensor([COLOUR_NAMES.index(c) for c, _ in labels])
    sy = torch.tensor([SHAPES.index(s) for _, s in labels])
    return lat, cy, sy


def train_judge(vae, steps: int = 400, n_each: int = 100, noise: float = 0.3, seed: int = 0) -> tuple[Judge, dict]:
    """(judge, {"colour_acc", "shape_acc"} on held-out renders)."""
    torch.manual_seed(seed)
    lat, cy, sy = _data(vae, n_each, seed + 1)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(lat), (128,), generator=g)
        x = lat[idx] + noise * torch.randn(lat[idx].shape, generator=g)  # robust to imperfect samples
        c, s = judge(x)
        loss = torch.nn.functional.cross_entropy(c, cy[idx]) + torch.nn.functional.cross_entropy(s, sy[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    judge.eval()
    hl, hc, hs = _data(vae, 20, seed + 2)
    with torch.no_grad():
        c, s = judge(hl)
    acc = {"colour_acc": float((c.argmax(1) == hc).float().mean()), "shape_acc": float((s.argmax(1) == hs).float().mean())}
    return judge, acc


def save_judge(judge: Judge, folder: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, os.path.join(folder, JUDGE_FILE))


def load_judge(folder: str) -> Judge:
    from safetensors.torch import load_file

    judge = Judge()
    judge.load_state_dict(load_file(os.path.join(folder, JUDGE_FILE)))
    return judge.eval()


def judge_images(judge: Judge, vae, images) -> list[tuple[str, str]]:
    """(colour, shape) of PIL images or uint8 arrays, through the VAE's encoder."""
    arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.uint8) for im in images])
    return judge.labels(encode(vae, arr))
