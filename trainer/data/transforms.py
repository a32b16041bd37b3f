"""Image transforms with Pillow/numpy/torch (torchvision has no usable build here): resize to cover the
bucket, crop (centre or random), optional horizontal flip, and SDXL's micro-conditioning numbers."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

FILTERS = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR,
           "nearest": Image.NEAREST}


@dataclass
class Prepared:
    pixels: torch.Tensor          # [3, H, W] in [-1, 1]
    original_size: tuple[int, int]  # (height, width) of the source image, SDXL's original_size
    crop_top_left: tuple[int, int]  # (top, left) in the resized image, SDXL's crops_coords_top_left
    target_size: tuple[int, int]    # (height, width) = the bucket


def prepare_image(image: Image.Image, bucket: tuple[int, int], *, center_crop: bool = True, flip: bool = False,
                  crop_rng: np.random.Generator | None = None, interpolation: str = "lanczos") -> Prepared:
    bw, bh = bucket
    w, h = image.size
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    img = image.resize((rw, rh), FILTERS[interpolation]) if (rw, rh) != (w, h) else image
    if center_crop or crop_rng is None:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    else:
        top = int(crop_rng.integers(0, rh - bh + 1))
        left = int(crop_rng.integers(0, rw - bw + 1))
    img = img.crop((left, top, left + bw, top + bh))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        left = rw - (left + bw)  # the crop as seen in the flipped image
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    return Prepared(pixels=pixels, original_size=(h, w), crop_top_left=(top, left), target_size=(bh, bw))
