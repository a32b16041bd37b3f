"""What a run loads and reads before its first step, shared by every run of one ``train()`` call: the preflight's
measurements and the run itself use the same loaded model, the same read of the dataset and the same latent
store, so ``--auto_fit`` loads the model once and decodes each image once.

* ``model()`` loads the components once per (model, VAE, device, precision); after a measurement ``release()``
  puts them back as loaded (adapters, new tokens, gradient checkpointing and offload undone).
* ``dataset()`` reads the images once: each is decoded one time, and from that one decode come its size, the
  facts the checks need (pixel hash, dHash, thumbnail) and, with ``--cache_latents``, its latents at the run's
  buckets (the :class:`~.latents.LatentStore` skips the VAE for entries it already has on disk).
* ``seconds`` adds up the time to the first step by phase: ``load``, ``checks`` (reading, decoding, checking),
  ``caches`` (latents) and ``preflight`` (the measured steps).
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Optional

from ..config import TrainConfig
from ..data.buckets import bucket_step_for, make_buckets, nearest_bucket
from ..data.checks import ImageFacts, check_facts, image_facts, size_problems
from ..data.sources import TrainItem, collect_records, load_items
from ..events import FirstStep
from .errors import TrainingError
from .latents import LatentStore, default_cache_dir
from .pivotal import set_token_embedding


def run_buckets(cfg: TrainConfig, resolution: int) -> list[tuple[int, int]]:
    """The buckets of a run at ``resolution``."""
    return (make_buckets(resolution, bucket_step_for(resolution, cfg.bucket_step)) if cfg.aspect_buckets
            else [(resolution, resolution)])


class RunInputs:
    """The model, the dataset and the latent store of one ``train()`` call (see the module docstring)."""

    def __init__(self, started: Optional[float] = None):
        self.started = time.time() if started is None else started
        self.seconds: dict[str, float] = {"load": 0.0, "checks": 0.0, "caches": 0.0, "preflight": 0.0}
        self.model_loads = 0
        self.family = self.comps = None
        self._model_key = self._data_key = self._store_key = None
        self._tokenizers: list = []
        self.items: Optional[list[TrainItem]] = None
        self.facts: dict[int, ImageFacts] = {}
        self.ingest_notes: list[str] = []
        self.store: Optional[LatentStore] = None

    def first_step(self, step_seconds: float) -> FirstStep:
        """The FirstStep event: the phases so far, the first step itself, and the rest (adapters, optimizer...)."""
        total = time.time() - self.started
        phases = {k: round(v, 3) for k, v in self.seconds.items()}
        phases["first step"] = round(step_seconds, 3)
        phases["other"] = round(max(0.0, total - sum(phases.values())), 3)
        return FirstStep(seconds=round(total, 3), phases=phases)

    # ----- the model --------------------------------------------------------------------------------------
    def model(self, cfg: TrainConfig, accelerator, status: Callable[..., None]):
        """(family, components), loaded on the first call for this model, device and precision."""
        from .setup import load_model

        key = (cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant, cfg.pretrained_vae_model_name_or_path,
               cfg.cache_dir, cfg.model_family.value, str(accelerator.device), str(accelerator.mixed_precision))
        if key != self._model_key:
            t0 = time.time()
            self.family, self.comps = load_model(cfg, accelerator, status)
            self._tokenizers = [copy.deepcopy(tok) for tok in self.comps.tokenizers]  # as loaded: release() restores
            self._model_key, self.store, self._store_key = key, None, None
            self.model_loads += 1
            self.seconds["load"] += time.time() - t0
        return self.family, self.comps

    def release(self, trainer) -> None:
        """Undoes what a (measurement) run attached to the shared components, so the next run starts from the model
        as loaded: LoRA adapters, pivotal tokens, gradient checkpointing, the text encoders' offload."""
        comps = self.comps
        if comps is None or getattr(trainer, "comps", None) is not comps:
            return
        from diffusers.utils import recurse_remove_peft_layers

        if getattr(trainer, "pivotal", None):
            for te, module in zip(comps.text_encoders, trainer.pivotal.modules):
                set_token_embedding(te, module.base)
        comps.tokenizers[:] = [copy.deepcopy(tok) for tok in self._tokenizers]
        for model in [comps.unet, *comps.text_encoders]:
            if getattr(model, "peft_config", None):
                recurse_remove_peft_layers(model)
                del model.peft_config
                model._hf_peft_config_loaded = False
            model.requires_grad_(False)
        if trainer.cfg.gradient_checkpointing:  # setup.trainable_groups turned it on
            comps.unet.disable_gradient_checkpointing()
            for te in comps.text_encoders:  # transformers 5 names it activation checkpointing
                getattr(te, "activation_checkpointing_disable", te.gradient_checkpointing_disable)()
        comps.unet.eval()
        text = getattr(trainer, "text", None)
        if text is not None and text.offloaded:
            text.encoders_to(text.device)

    # ----- the latent store ---------------------------------------------------------------------------------
    def latent_store(self, cfg: TrainConfig) -> LatentStore:
        """The store of this run's VAE and image preparation (folder: ``--latent_cache_dir`` or next to the data)."""
        folder = default_cache_dir(cfg) if cfg.cache_latents else None
        key = (folder, cfg.center_crop, cfg.image_interpolation_mode)
        if self.store is None or key != self._store_key:
            self.store = LatentStore(self.comps.vae, folder, center_crop=cfg.center_crop,
                                     interpolation=cfg.image_interpolation_mode)
            self._store_key = key
        return self.store

    # ----- the dataset --------------------------------------------------------------------------------------
    def dataset(self, cfg: TrainConfig, resolution: int, status: Callable[..., None],
                collected=None) -> tuple[list[TrainItem], list[str]]:
        """(items, notes of skipped files): read once per dataset. With ``--cache_latents`` the latents at the
        buckets of ``resolution`` come from the same decode (until an image blocks training: then only the
        checks go on)."""
        key = (cfg.instance_data_dir, cfg.dataset_name, cfg.dataset_config_name, cfg.image_column,
               cfg.caption_column, cfg.instance_prompt)
        if key == self._data_key and self.items is not None:
            return self.items, list(self.ingest_notes)
        store = self.latent_store(cfg) if cfg.cache_latents else None
        buckets = run_buckets(cfg, resolution)
        variants = [False, True] if cfg.random_flip else [False]
        facts: dict[int, ImageFacts] = {}
        encode_s = [0.0]
        blocked = [False]

        def on_image(item: TrainItem, image) -> None:
            f = facts[item.index] = image_facts(item.name, image)
            item.content = f.sha
            if item.index % 8 == 0:
                status("data", f"read {item.index + 1} images")
            if store is None or blocked[0]:
                return
            if any(p.severity == "error" for p in size_problems(item.name, item.size, resolution)):
                blocked[0] = True  # training will not start: no VAE time for the rest, the checks go on
                return
            t = time.time()
            bucket = nearest_bucket(*item.size, buckets)
            for flip in variants:
                store.ensure(f.sha, lambda: image, bucket, flip)
            encode_s[0] += time.time() - t

        t0 = time.time()
        if collected is None:
            collected = collect_records(cfg)
        items, problems = load_items(cfg, on_image=on_image, collected=collected)
        self.seconds["caches"] += encode_s[0]
        self.seconds["checks"] += time.time() - t0 - encode_s[0]
        # caption problems keep their image; every other problem means the file was skipped
        self.ingest_notes = [f"{'' if p.code.startswith('caption') else 'skipped '}{p.file}: {p.message}"
                             for p in problems]
        self.items, self.facts, self._data_key = items, facts, key
        return items, list(self.ingest_notes)

    def check(self, cfg: TrainConfig, resolution: int, tokenizer) -> list[str]:
        """Notes of the dataset checks at ``resolution`` (from the facts read once: no image is opened); raises
        TrainingError when a problem blocks training. In-memory images (a ``datasets`` dataset) are checked as
        files are: their facts come from the same single decode."""
        t0 = time.time()
        entries = [(it.name, it.caption, self.facts[it.index]) for it in self.items]
        problems = check_facts(entries, resolution=resolution,
                               trigger=cfg.abstractions[0] if cfg.abstractions else "", min_images=3,
                               tokenizer=tokenizer)
        self.seconds["checks"] += time.time() - t0
        blocking = [p for p in problems if p.severity == "error"]
        if blocking:
            # the files skipped while reading (unreadable, unsupported...) are part of why too few images are left
            skipped = [f"  {n[len('skipped '):]}" for n in self.ingest_notes if n.startswith("skipped ")]
            raise TrainingError("the dataset has problems:\n" + "\n".join(
                [f"  {p.file + ': ' if p.file else ''}{p.message} Fix: {p.fix}" for p in blocking]
                + (["skipped while reading:"] + skipped if skipped else [])))
        return [f"{p.file}: {p.message}" for p in problems]
