"""Batched image captioning through transformers (BLIP by default, any image-to-text auto class otherwise)."""
from __future__ import annotations

import gc
import os
import threading
from typing import Any, Optional, Sequence

from .base import (
    DEFAULT_MODEL,
    CaptionerLoadError,
    ImageLike,
    clean_caption,
    hub_unreachable_message,
    is_hub_unreachable,
    load_image,
    looks_like_local_path,
    offline_requested,
    resolve_device,
    resolve_dtype,
)
from .tiny import TINY_BLIP_ID, tiny_blip_path


def resolve_model_source(model: str) -> str:
    """``"tiny-blip"`` -> the built tiny folder; ``~`` in local paths expanded; Hub ids unchanged."""
    if not isinstance(model, (str, os.PathLike)) or not str(model).strip():
        raise ValueError(f"model must be a Hub id or a local folder, got {model!r}")
    name = str(model).strip()
    if name == TINY_BLIP_ID:
        return tiny_blip_path(build=True)
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    return name


def _model_classes(model_type: str) -> list:
    """Candidate model classes for a config's ``model_type``, most specific first."""
    import transformers

    classes = []
    if model_type == "blip":
        classes.append(transformers.BlipForConditionalGeneration)
    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):  # the latter: transformers < 4.50
        cls = getattr(transformers, name, None)
        if cls is not None:
            classes.append(cls)
    return classes


def _dtype_kwarg() -> str:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return "dtype" if major >= 5 else "torch_dtype"


class Captioner:
    """One loaded captioning model + processor.

    >>> cap = Captioner("tiny-blip").load()
    >>> cap.caption_batch([pil_image])  # -> ["..."]
    >>> cap.release()
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: Any = None,
        dtype: Any = None,
        max_new_tokens: int = 30,
        prompt: Optional[str] = None,
    ):
        self.model_id = str(model)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_new_tokens = int(max_new_tokens)
        self.prompt = prompt
        self.source: Optional[str] = None
        self.model = None
        self.processor = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------ lifecycle

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self) -> "Captioner":
        """Load processor and model (idempotent). Raises :class:`CaptionerLoadError`."""
        with self._lock:
            if self.model is not None:
                return self
            self.source = resolve_model_source(self.model_id)
            local = os.path.isdir(self.source)
            if not local and looks_like_local_path(self.source):
                raise CaptionerLoadError(
                    f"Captioning model folder '{self.model_id}' does not exist. Pass an existing local folder, "
                    f"a Hugging Face Hub id such as '{DEFAULT_MODEL}', or the offline tiny model id 'tiny-blip'.",
                    model_id=self.model_id,
                )
            # Never run code from the repository; explicit False also stops transformers from prompting.
            common: dict[str, Any] = {"trust_remote_code": False}
            if not local and offline_requested():
                common["local_files_only"] = True
            try:
                model, processor = self._load(common)
            except CaptionerLoadError:
                raise
            except Exception as exc:
                if not local and is_hub_unreachable(exc):
                    raise CaptionerLoadError(
                        hub_unreachable_message(self.model_id), model_id=self.model_id, hub_unreachable=True
                    ) from exc
                raise CaptionerLoadError(
                    f"Could not load the captioning model '{self.model_id}': {type(exc).__name__}: {exc}",
                    model_id=self.model_id,
                ) from exc
            self.model, self.processor = model, processor
            return self

    def _load(self, common: dict):
        from transformers import AutoConfig, AutoProcessor

        config = AutoConfig.from_pretrained(self.source, **common)
        model_type = getattr(config, "model_type", "")
        classes = _model_classes(model_type)
        processor = AutoProcessor.from_pretrained(self.source, **common)
        last_error: Optional[Exception] = None
        model = None
        for cls in classes:
            try:
                model = cls.from_pretrained(self.source, **{_dtype_kwarg(): self.dtype}, **common)
                break
            except ValueError as exc:  # "Unrecognized configuration class ..." -> try the next auto class
                if "Unrecognized configuration class" not in str(exc):
                    raise
                last_error = exc
        if model is None:
            raise CaptionerLoadError(
                f"'{self.model_id}' (model_type '{model_type}') is not an image-captioning model that "
                f"transformers can load without custom code: {last_error}",
                model_id=self.model_id,
            )
        model.to(self.device)
        model.eval()
        return model, processor

    def release(self) -> None:
        """Drop the model and processor and give the memory back (GPU cache included)."""
        with self._lock:
            self.model = None
            self.processor = None
        gc.collect()
        _empty_cuda_cache()

    # ----------------------------------------------------------------------------------- captioning

    def _generate_kwargs(self, max_new_tokens: int) -> dict:
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "min_new_tokens": 1}
        cfg = self.model.config
        if getattr(cfg, "model_type", "") == "blip":
            # Special tokens other than the end-of-caption one decode to nothing; forbidding them (plus
            # min_new_tokens) guarantees a non-empty caption even from random weights.
            text_cfg = cfg.text_config
            keep = {text_cfg.sep_token_id, text_cfg.eos_token_id}
            tok = getattr(self.processor, "tokenizer", None)
            special = set(getattr(tok, "all_special_ids", []) or []) | {text_cfg.pad_token_id, text_cfg.bos_token_id}
            vocab = text_cfg.vocab_size
            suppress = sorted(i for i in special if i is not None and i not in keep and 0 <= i < vocab)
            if suppress:
                kwargs["suppress_tokens"] = suppress
        return kwargs

    def caption_batch(self, images: Sequence[ImageLike], max_new_tokens: Optional[int] = None) -> list[str]:
        """Caption one batch of PIL images / file paths; returns one cleaned caption per image."""
        import torch

        if not images:
            return []
        self.load()
        with self._lock:
            model, processor = self.model, self.processor
            if model is None:  # released concurrently
                raise RuntimeError("captioner was released")
            pil = [load_image(im) for im in images]
            if self.prompt:
                inputs = processor(images=pil, text=[self.prompt] * len(pil), return_tensors="pt", padding=True)
            else:
                inputs = processor(images=pil, return_tensors="pt")
            batch = {}
            for key, value in inputs.items():
                if isinstance(value, torch.Tensor):
                    value = value.to(self.device)
                    if value.is_floating_point():
                        value = value.to(self.dtype)
                batch[key] = value
            n_new = int(max_new_tokens if max_new_tokens is not None else self.max_new_tokens)
            with torch.inference_mode():
                out = model.generate(**batch, **self._generate_kwargs(n_new))
            if hasattr(out, "sequences"):
                out = out.sequences
            ids = batch.get("input_ids")
            is_blip = getattr(model.config, "model_type", "") == "blip"
            if ids is not None and not is_blip and not getattr(model.config, "is_encoder_decoder", False):
                out = out[:, ids.shape[1]:]  # decoder-only models echo the prompt
            texts = processor.batch_decode(out, skip_special_tokens=True)
        return [clean_caption(t) for t in texts]

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else "not loaded"
        return f"Captioner({self.model_id!r}, device={self.device}, dtype={self.dtype}, {state})"


def _empty_cuda_cache() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
