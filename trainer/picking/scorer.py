"""The picker's two measurements, with CLIP through transformers (``CLIPModel`` / ``CLIPProcessor``):

- **likeness**: cosine similarity of an image's CLIP embedding to the mean embedding of the training images;
- **prompt fit**: cosine similarity of an image's embedding to the embedding of its prompt *without the
  trigger* ("a painting of TOK" -> "a painting of"), so it measures how much of the rest of the prompt survived.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from ..training.placeholders import replace_word, split_abstractions
from .tiny_clip import resolve_clip_id

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class ScorerError(RuntimeError):
    """The CLIP model could not be loaded or used (the message says which and what to do)."""


def prompt_without_trigger(prompt: str, token_abstraction: str) -> str:
    """``prompt`` with every placeholder removed as whole words (``trainer.training.placeholders``' one rule),
    spaces and stray commas tidied: 'a photo of TOK, smiling' -> 'a photo of, smiling'."""
    text = prompt or ""
    for abst in split_abstractions(token_abstraction):
        text = replace_word(text, abst, "")
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r"(^[\s,]+)|([\s,]+$)", "", text)
    return re.sub(r"\s{2,}", " ", text).replace(", ,", ",")


def _features(out) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected feature; 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """Embeds images and texts with one CLIP model (``model_id``: a Hub id, a folder, or ``tiny-clip``)."""

    def __init__(self, model_id: str = DEFAULT_CLIP, device: Optional[str] = None):
        from transformers import CLIPModel, CLIPProcessor

        self.model_id = model_id
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path = resolve_clip_id(model_id)
        try:
            self.model = CLIPModel.from_pretrained(path).eval().to(self.device)
            self.processor = CLIPProcessor.from_pretrained(path)
        except Exception as exc:
            raise ScorerError(
                f"the CLIP model {model_id!r} could not be loaded ({type(exc).__name__}: {str(exc)[:200]}). "
                "Give a Hub id of a CLIP model (e.g. openai/clip-vit-large-patch14, downloaded once) or a local "
                "folder with its config, weights and processor files; tiny-clip works offline for trying.") from None

    @torch.no_grad()
    def embed_images(self, images: list, batch_size: int = 16) -> torch.Tensor:
        """[N, D] unit-length image embeddings of PIL images."""
        out = []
        for i in range(0, len(images), batch_size):
            px = self.processor(images=[im.convert("RGB") for im in images[i:i + batch_size]],
                                return_tensors="pt")["pixel_values"].to(self.device)
            out.append(_features(self.model.get_image_features(pixel_values=px)).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """[N, D] unit-length text embeddings (truncated to CLIP's 77 tokens)."""
        tok = self.processor.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        feats = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                             attention_mask=tok["attention_mask"].to(self.device))
        return torch.nn.functional.normalize(_features(feats).float(), dim=-1).cpu()

    def reference(self, images: list) -> torch.Tensor:
        """The unit-length mean embedding of the training images (what likeness compares with)."""
        if not images:
            raise ScorerError("no training images to compare with: the run's dataset folder is empty or gone")
        return torch.nn.functional.normalize(self.embed_images(images).mean(0), dim=-1)

    @staticmethod
    def likeness(image_embs: torch.Tensor, reference: torch.Tensor) -> list[float]:
        return (image_embs @ reference).tolist()

    @staticmethod
    def prompt_fit(image_embs: torch.Tensor, text_embs: torch.Tensor) -> list[float]:
        """Row i: image i against text i."""
        return (image_embs * text_embs).sum(-1).tolist()
