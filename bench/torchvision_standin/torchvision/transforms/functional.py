"""``crop`` with torchvision's argument order (top, left, height, width) on a PIL image."""
from __future__ import annotations


def crop(img, top: int, left: int, height: int, width: int):
    return img.crop((left, top, left + width, top + height))


def hflip(img):
    from PIL import Image

    return img.transpose(Image.FLIP_LEFT_RIGHT)

