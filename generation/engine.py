"""Generation engine for the app's Generate tab and the benchmark.

One base pipeline stays loaded (cached by base model id + dtype); LoRAs and learnt embeddings are swapped on it
without reloading the base:

- LoRA: ``load_lora_weights(..., adapter_name=...)`` / ``set_adapters(..., adapter_weights=scale)`` /
  ``delete_adapters``; "no LoRA" disables the adapter layers (exactly the base model, verified bit-identical).
  ``set_adapters`` weights and ``cross_attention_kwargs={"scale": s}`` give identical images in diffusers 0.42
  and scale 0 equals the base image exactly; this engine uses ``set_adapters`` (it also covers text-encoder LoRAs).
- Embeddings: ``pipe.load_textual_inversion(state_dict[key], token=[...], text_encoder=..., tokenizer=...)`` per
  text encoder. Unloading puts back the untouched base tokenizer object and shrinks the embedding matrix to its
  original rows (bit-identical), instead of diffusers' ``unload_textual_inversion`` which rewrites tokenizer
  internals that differ between transformers versions.

Safety (public server, uploaded files): only ``.safetensors`` files are read (``safetensors`` never unpickles;
diffusers is called with ``use_safetensors=True``, which disables its pickle fallback). Every file is checked
before it touches the pipeline: parse errors, LoRAs for another model family (key prefixes, module names and
weight shapes compared with this UNet / these text encoders) and embeddings of the wrong width or row count
raise :class:`InferenceInputError` naming the file and the problem; after any failure the pipeline is put back
into a clean state, so the next generate works and matches earlier images for the same seed.

Usage::

    engine = Engine()
    res = engine.generate(request_from_run("output/my-run", prompt="a photo of TOK on a beach", seed=1))
    res.images[0].save("out.png"); print(res.seeds, res.info["timings"])
"""
from __future__ import annotations

import copy
import gc
import logging
import os
import secrets
import threading
import time
from typing import Any, Callable, Optional

import torch

from trainer.devices import half_dtype, resolve_device
from trainer.families.pooling import pool_at_end_of_text
from trainer.training.placeholders import replace_placeholders

from .errors import InferenceInputError
from .files import (MAX_EMBEDDING_BYTES, MAX_LORA_BYTES, check_embeddings, check_lora_against_pipeline,
                    check_safetensors_path, file_key, load_safetensors)
from .pipelines import render
from .requests import GenerateRequest, GenerateResult, read_run_config, run_files, validate_request
from .schedulers import SCHEDULERS

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "studio_lora"


class Engine:
    """Keeps one base pipeline loaded and swaps LoRAs / embeddings on it; ``generate`` is thread-safe."""

    def __init__(self, device: Optional[str] = None, dtype: Optional[torch.dtype] = None):
        self.device = device or str(resolve_device())
        self.dtype = dtype or (half_dtype() if self.device.startswith("cuda") else torch.float32)
        self._lock = threading.Lock()
        self.pipe = None
        self.family = None
        self._key: Optional[tuple] = None
        self._base_scheduler_config = None
        self._pristine_tokenizers: dict[str, Any] = {}
        self._base_rows: dict[str, int] = {}
        self._lora: Optional[tuple] = None       # file key of the loaded adapter
        self._lora_enabled = False
        self._adapter_counter = 0
        self._adapter_name: Optional[str] = None
        self._emb: Optional[tuple] = None        # (file key, tokens) of the loaded embeddings
        self._emb_tokens: list[str] = []
        self.load_count = 0                      # base pipeline loads (for tests / the benchmark)

    # ----- base pipeline ---------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def _ensure_pipeline(self, base_model: str) -> float:
        from trainer.families import ModelLoadError, detect_family, resolve
        from trainer.families.loading import wrap_load_error

        key = (base_model, str(self.dtype), self.device)
        if self.pipe is not None and self._key == key:
            return 0.0
        t0 = time.perf_counter()
        self._release_locked()
        try:
            path = resolve(base_model)
            family = detect_family(path)
            kwargs: dict[str, Any] = dict(dtype=self.dtype, use_safetensors=True)
            if family.name == "sd":
                kwargs.update(safety_checker=None, requires_safety_checker=False)
            pipe = family.pipeline_class().from_pretrained(path, **kwargs)
        except ModelLoadError as exc:
            raise InferenceInputError(str(exc)) from None
        except Exception as exc:  # a missing safetensors file included: the one message of the loader role
            raise InferenceInputError(str(wrap_load_error(base_model, exc))) from None
        # the pooled text vector at the end-of-text token, as in training (trainer/families/pooling.py)
        pool_at_end_of_text([getattr(pipe, a) for a in family.text_encoder_attrs],
                            [getattr(pipe, a) for a in family.tokenizer_attrs])
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe, self.family, self._key = pipe, family, key
        self._base_scheduler_config = copy.deepcopy(pipe.scheduler.config)
        self._pristine_tokenizers = {a: getattr(pipe, a) for a in family.tokenizer_attrs}
        self._base_rows = {a: int(getattr(pipe, a).get_input_embeddings().weight.shape[0])
                           for a in family.text_encoder_attrs}
        self.load_count += 1
        return time.perf_counter() - t0

    def default_size(self) -> int:
        """The base model's default resolution (the trainer's one rule, ``families.default_resolution``)."""
        from trainer.families import default_resolution

        return default_resolution(self.family.name, getattr(self.pipe.vae.config, "sample_size", None),
                                  self.pipe.scheduler.config.get("prediction_type", "epsilon"))

    def release(self) -> None:
        """Frees the pipeline (before training starts); the next generate loads it again."""
        with self._lock:
            self._release_locked()

    def _release_locked(self) -> None:
        self.pipe = None
        self.family = None
        self._key = None
        self._pristine_tokenizers, self._base_rows = {}, {}
        self._lora, self._lora_enabled, self._adapter_name = None, False, None
        self._emb, self._emb_tokens = None, []
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ----- LoRA --------------------------------------------------------------------------------------------
    def _delete_lora(self) -> None:
        if self._adapter_name is not None:
            try:
                self.pipe.delete_adapters(self._adapter_name)
            except Exception:  # never leave a half-state behind: fall back to removing every LoRA layer
                self.pipe.unload_lora_weights()
        self._lora, self._lora_enabled, self._adapter_name = None, False, None

    def _disable_lora(self) -> None:
        if self._adapter_name is not None and self._lora_enabled:
            self.pipe.disable_lora()
            self._lora_enabled = False

    def _apply_lora(self, lora_file: Optional[str], scale: float) -> float:
        if lora_file is None:
            self._disable_lora()
            return 0.0
        t0 = time.perf_counter()
        key = file_key(lora_file)
        if key != self._lora:
            self._delete_lora()
            name = os.path.basename(lora_file)
            sd, meta = load_safetensors(lora_file, "LoRA")
            check_lora_against_pipeline(self.pipe, self.family, sd, meta, name)
            del sd
            self._adapter_counter += 1
            adapter = f"{ADAPTER_PREFIX}_{self._adapter_counter}"
            try:
                self.pipe.load_lora_weights(os.path.dirname(lora_file), weight_name=name, adapter_name=adapter,
                                            use_safetensors=True)
                present = {a for names in self.pipe.get_list_adapters().values() for a in names}
                if adapter not in present:
                    raise ValueError("no layer of this model matched the LoRA's keys")
            except Exception as exc:
                self._adapter_name = adapter
                self._delete_lora()
                raise InferenceInputError(f"LoRA {name!r} could not be applied to this base model: "
                                          f"{type(exc).__name__}: {str(exc)[:300]}") from None
            self._lora, self._adapter_name = key, adapter
            self._lora_enabled = False  # layers may still carry the disabled flag of a deleted adapter
        if not self._lora_enabled:
            self.pipe.enable_lora()
            self._lora_enabled = True
        self.pipe.set_adapters([self._adapter_name], adapter_weights=[float(scale)])
        return time.perf_counter() - t0

    # ----- embeddings ----------------------------------------------------------------------------------------
    def _unload_embeddings(self) -> None:
        import torch.nn as nn

        if self.pipe is None:
            return
        changed = self._emb is not None
        for tok_attr, te_attr in zip(self.family.tokenizer_attrs, self.family.text_encoder_attrs):
            if getattr(self.pipe, tok_attr) is not self._pristine_tokenizers[tok_attr]:
                setattr(self.pipe, tok_attr, self._pristine_tokenizers[tok_attr])
                changed = True
            te = getattr(self.pipe, te_attr)
            emb = te.get_input_embeddings()
            rows = self._base_rows[te_attr]
            if emb.weight.shape[0] != rows:
                w = emb.weight.detach()[:rows].clone()
                plain = nn.Embedding(rows, w.shape[1], device=w.device, dtype=w.dtype)
                plain.weight.data = w
                plain.weight.requires_grad_(False)
                te.set_input_embeddings(plain)
                te.config.vocab_size = rows
                changed = True
        self._emb, self._emb_tokens = None, []
        if changed:
            log.debug("embeddings unloaded")

    def _apply_embeddings(self, emb_file: Optional[str], tokens: list[str]) -> float:
        if emb_file is None:
            self._unload_embeddings()
            return 0.0
        key = (file_key(emb_file), tuple(tokens))
        if key == self._emb:
            return 0.0
        t0 = time.perf_counter()
        self._unload_embeddings()
        name = os.path.basename(emb_file)
        sd, _meta = load_safetensors(emb_file, "embeddings")
        check_embeddings(self.pipe, self.family, sd, name, len(tokens))
        try:
            for k, tok_attr, te_attr in zip(self.family.embedding_keys, self.family.tokenizer_attrs,
                                            self.family.text_encoder_attrs):
                clash = [t for t in tokens if t in self._pristine_tokenizers[tok_attr].get_vocab()]
                if clash:
                    raise ValueError(f"the base tokenizer already has the tokens {clash}")
                tok = copy.deepcopy(self._pristine_tokenizers[tok_attr])  # the pristine one is never mutated
                setattr(self.pipe, tok_attr, tok)
                self.pipe.load_textual_inversion(sd[k], token=list(tokens), text_encoder=getattr(self.pipe, te_attr),
                                                 tokenizer=tok)
                ids = tok.convert_tokens_to_ids(list(tokens))
                if len(set(ids)) != len(tokens):
                    raise ValueError(f"tokens {tokens} did not get distinct ids ({ids})")
        except Exception as exc:
            self._unload_embeddings()
            raise InferenceInputError(f"embeddings {name!r} could not be loaded: {type(exc).__name__}: "
                                      f"{str(exc)[:300]}") from None
        self._emb, self._emb_tokens = key, list(tokens)
        return time.perf_counter() - t0

    def unload(self) -> None:
        """Removes the LoRA and the embeddings; the base pipeline stays loaded (exactly the base model again)."""
        with self._lock:
            if self.pipe is not None:
                self._delete_lora()
                self._unload_embeddings()

    # ----- generation ----------------------------------------------------------------------------------------
    def _resolve_files(self, req: GenerateRequest) -> tuple[Optional[str], Optional[str], dict[str, list[str]]]:
        mapping = req.tokens_per_abstraction()
        lora, emb = req.lora_path, req.embeddings_path
        if lora and os.path.isdir(lora):
            cfg = read_run_config(lora)
            run_lora, run_emb = run_files(lora, cfg)
            if run_lora is None:
                raise InferenceInputError(f"run folder {lora} has no LoRA file.")
            if emb is None and run_emb is not None:
                emb = run_emb
                # The run folder defines its own tokens.
                mapping = GenerateRequest(
                    base_model="", prompt="", token_abstraction=cfg.get("token_abstraction") or "TOK",
                    num_new_tokens_per_abstraction=int(cfg.get("num_new_tokens_per_abstraction") or 2),
                ).tokens_per_abstraction()
            lora = run_lora
        if lora:
            lora = check_safetensors_path(lora, "LoRA", MAX_LORA_BYTES)
        if emb:
            emb = check_safetensors_path(emb, "embeddings", MAX_EMBEDDING_BYTES)
        return lora or None, emb or None, mapping

    def generate(self, req: GenerateRequest, on_progress: Optional[Callable[[int, int], Any]] = None
                 ) -> GenerateResult:
        validate_request(req)
        t_start = time.perf_counter()
        with self._lock:
            waited = time.perf_counter() - t_start
            t_start = time.perf_counter()
            lora_file, emb_file, mapping = self._resolve_files(req)
            load_s = self._ensure_pipeline(req.base_model)
            pipe = self.pipe
            try:
                tokens = [t for ts in mapping.values() for t in ts]
                load_s += self._apply_embeddings(emb_file, tokens)
                load_s += self._apply_lora(lora_file, req.lora_scale)
            except Exception:
                # Back to the clean base state: the next request works and matches earlier images.
                self._delete_lora()
                self._unload_embeddings()
                raise
            prompt, negative = req.prompt, req.negative_prompt or ""
            if emb_file is not None:
                prompt = replace_placeholders(prompt, mapping)
                negative = replace_placeholders(negative, mapping)
            width = req.width or self.default_size()
            height = req.height or self.default_size()
            base_seed = req.seed if req.seed is not None else secrets.randbelow(2 ** 32)
            seeds = [(base_seed + i) % 2 ** 63 for i in range(req.num_images)]
            images, first_image_s = [], None
            total_steps = req.steps * req.num_images

            for i, seed in enumerate(seeds):
                pipe.scheduler = SCHEDULERS[req.scheduler](self._base_scheduler_config)

                def _on_step(step, n, _i=i):
                    if on_progress is not None:
                        on_progress(_i * n + step, n * req.num_images)

                images += render(pipe, prompt, negative_prompt=negative or None, steps=req.steps,
                                 guidance=req.guidance_scale, width=width, height=height,
                                 generator=torch.Generator("cpu").manual_seed(seed), on_step=_on_step)
                if first_image_s is None:
                    first_image_s = time.perf_counter() - t_start
            total_s = time.perf_counter() - t_start
            info = {
                "base_model": req.base_model,
                "family": self.family.name,
                "prompt": prompt,
                "negative_prompt": negative,
                "scheduler": req.scheduler,
                "steps": req.steps,
                "guidance": float(req.guidance_scale),
                "size": (width, height),
                "lora": lora_file,
                "lora_scale": float(req.lora_scale) if lora_file else None,
                "embeddings": emb_file,
                "tokens": mapping if emb_file else {},
                "seeds": list(seeds),
                "device": self.device,
                "dtype": str(self.dtype).replace("torch.", ""),
                "pipeline_loads": self.load_count,
                "timings": {"queue_s": round(waited, 4), "load_s": round(load_s, 4),
                            "first_image_s": round(first_image_s or 0.0, 4), "total_s": round(total_s, 4),
                            "per_image_s": round((total_s - load_s) / max(1, len(images)), 4),
                            "steps_total": total_steps},
            }
            return GenerateResult(images=images, seeds=list(seeds), info=info)


_DEFAULT_ENGINE: Optional[Engine] = None
_DEFAULT_LOCK = threading.Lock()


def get_engine() -> Engine:
    """The process-wide engine shared by the app and the benchmark."""
    global _DEFAULT_ENGINE
    with _DEFAULT_LOCK:
        if _DEFAULT_ENGINE is None:
            _DEFAULT_ENGINE = Engine()
        return _DEFAULT_ENGINE
