"""The sweep as one picture: rows are checkpoints, columns LoRA scales; each cell shows one image per prompt
(the first seed) side by side, and the recommended cell has a thick green frame and a "PICK" label."""
from __future__ import annotations

from PIL import Image, ImageDraw

THUMB = 128
PAD = 6
LABEL_W, LABEL_H = 90, 22
PICK_COLOUR = (20, 170, 60)


def draw_grid(cell_images: dict, steps: list[int], scales: list[float], pick: tuple[int, float],
              prompts: list[str]) -> Image.Image:
    """``cell_images[(step, scale)]`` = one PIL image per prompt."""
    n = len(prompts)
    cell_w, cell_h = n * THUMB + 2 * PAD, THUMB + 2 * PAD
    img = Image.new("RGB", (LABEL_W + len(scales) * cell_w, LABEL_H + len(steps) * cell_h), "white")
    draw = ImageDraw.Draw(img)
    for j, scale in enumerate(scales):
        draw.text((LABEL_W + j * cell_w + PAD, 5), f"scale {scale:g}", fill="black")
    for i, step in enumerate(steps):
        y = LABEL_H + i * cell_h
        draw.text((5, y + cell_h // 2 - 6), f"step {step}", fill="black")
        for j, scale in enumerate(scales):
            x = LABEL_W + j * cell_w
            for k, im in enumerate(cell_images.get((step, float(scale)), [])):
                img.paste(im.convert("RGB").resize((THUMB, THUMB)), (x + PAD + k * THUMB, y + PAD))
            if (step, float(scale)) == (pick[0], float(pick[1])):
                draw.rectangle([x + 1, y + 1, x + cell_w - 2, y + cell_h - 2], outline=PICK_COLOUR, width=PAD - 1)
                draw.rectangle([x + PAD, y + PAD, x + PAD + 34, y + PAD + 14], fill=PICK_COLOUR)
                draw.text((x + PAD + 3, y + PAD + 1), "PICK", fill="white")
    return img
