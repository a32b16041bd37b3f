"""``tiny-clip``: a randomly initialised CLIP (text + vision towers, a few hundred kB) built locally from a config,
for tests and offline demos of the picker. Written with ``save_pretrained`` (model, tokenizer, image processor)
into an ordinary transformers folder and loaded by the same ``CLIPModel`` / ``CLIPProcessor`` code as
``openai/clip-vit-large-patch14``. Deterministic (fixed seed) and cached like the tiny diffusion models."""
from __future__ import annotations

from ..tiny import build_cached, write_clip_tokenizer_files

TINY_CLIP = "tiny-clip"
TINY_CLIP_IMAGE_SIZE = 32


def _build(out: str, tmp: str) -> None:
    import os

    import torch
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPTokenizer, CLIPVisionConfig)

    tok_dir = os.path.join(tmp, "_tok_src")
    n = write_clip_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    text = CLIPTextConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=n - 2,
                          eos_token_id=n - 1, pad_token_id=n - 1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=TINY_CLIP_IMAGE_SIZE, patch_size=8)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    torch.manual_seed(21)
    CLIPModel(cfg).save_pretrained(out)
    images = CLIPImageProcessor(size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
                                crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out)


def tiny_clip_path() -> str:
    """Folder of ``tiny-clip``; built once (atomically) into the tiny-model cache."""
    return build_cached("tiny", TINY_CLIP, _build, marker="config.json")


def resolve_clip_id(model_id: str) -> str:
    """``tiny-clip`` -> its local folder; a Hub id or folder is returned unchanged."""
    return tiny_clip_path() if model_id == TINY_CLIP else model_id
