"""The training loop: ``train(config, on_event=None, stop=None) -> RunResult``.

Runs in the caller's thread (the app calls it from a background thread, the CLI from the main one) under
accelerate, single process or ``accelerate launch``/``torchrun`` (DDP-style data parallel: each rank takes its
slice of one global batch; gradients are averaged with an explicit all-reduce, because the trainable parameters
live in three modules and the text ones leave training at the pivot, which DDP wrappers handle poorly).
"""
from __future__ import annotations

import math
import os
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from . import export
from .config import TrainConfig
from .data.buckets import bucket_step_for, make_buckets, nearest_bucket
from .data.captions import training_caption
from .data.checks import check_dataset
from .data.sampler import BucketBatchSampler, Sample
from .data.sources import TrainItem, load_class_items, load_items
from .data.transforms import prepare_image
from .events import Checkpoint, EventLog, Failed, Finished, Sample as SampleEvent, Started, Status, Step
from .families import detect_family, get_family, resolve
from .lora import add_text_encoder_lora, add_unet_lora, load_peft_state_dict, peft_state_dict
from .loss import diffusion_loss, target_for
from .optim import build_optimizer, build_scheduler, drop_group_params, effective_lr
from .pivotal import PivotalTokens, replace_placeholders
from .prior import generate_class_images
from .transfer import to_device
from .validation import render_samples


class TrainingError(RuntimeError):
    def __init__(self, message: str, advice: str = ""):
        super().__init__(message)
        self.advice = advice


@dataclass
class RunResult:
    run_dir: str
    step: int
    total_steps: int
    artifacts: dict[str, str] = field(default_factory=dict)
    stopped: bool = False
    final_loss: Optional[float] = None


OOM_ADVICE = ("Out of memory. Lower the memory use, in this order: turn on --gradient_checkpointing, lower "
              "--train_batch_size (raise --gradient_accumulation_steps to keep the effective batch), use "
              "--optimizer adamw8bit, lower --rank, lower --resolution; or run with --auto_fit.")


def _accelerator(cfg: TrainConfig, run_dir: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    mp = cfg.mixed_precision.value if cfg.mixed_precision else None
    if mp is None:
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    log_with = None
    if cfg.report_to.value != "none":
        try:
            __import__(cfg.report_to.value)
        except ImportError:
            raise TrainingError(f"--report_to {cfg.report_to.value} needs the {cfg.report_to.value} package: "
                                f"pip install {cfg.report_to.value} (or use --report_to none)") from None
        log_with = cfg.report_to.value
    # The app trains several runs in one process; accelerate's state is a singleton, so reset what can change.
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True on a machine without CUDA lets accelerate see torchrun/`accelerate launch` ranks as MULTI_CPU (gloo).
    return Accelerator(mixed_precision=mp, log_with=log_with, cpu=not torch.cuda.is_available(),
                       project_config=ProjectConfiguration(project_dir=run_dir,
                                                           logging_dir=os.path.join(run_dir, cfg.logging_dir)))


def _weight_dtype(accelerator) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)


def compute_total_steps(cfg: TrainConfig, num_items: int, batches_per_epoch: int) -> tuple[int, int]:
    """(total optimizer steps, optimizer steps per epoch)."""
    per_epoch = max(1, math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps))
    if cfg.max_train_steps:
        return cfg.max_train_steps, per_epoch
    if cfg.steps_per_image:
        images_per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps
        return max(1, math.ceil(cfg.steps_per_image * num_items / images_per_step)), per_epoch
    return cfg.num_train_epochs * per_epoch, per_epoch


class Trainer:
    """One training run. Holds the state the loop shares; ``run()`` does the work."""

    # Devices whose memory is worth freeing by moving the text encoders to the CPU after the pivot. On a CPU
    # the move is a no-op; tests add "cpu" to run the same path (pre-encode every caption, never call the
    # encoders again) without a GPU.
    OFFLOAD_TEXT_ENCODERS_FROM = ("cuda",)

    def __init__(self, cfg: TrainConfig, on_event=None, stop: Optional[threading.Event] = None, fault_hook=None,
                 notes: Optional[list[str]] = None):
        self.cfg = cfg.validate()
        self.extra_notes = list(notes or [])
        self.stop = stop or threading.Event()
        self.fault_hook = fault_hook  # tests inject faults (kill during checkpoint write, OOM, NaN) through this
        self.run_dir = os.path.abspath(cfg.output_dir)
        self.on_event = on_event
        self.latent_cache: dict[tuple, tuple] = {}   # (image, flip, bucket) -> latent + micro-conditioning
        self.text_cache: dict[str, tuple] = {}       # caption -> (prompt embeds, pooled), once text is frozen
        self.text_offloaded = False
        self.text_trainable = True  # until setup/restore/the pivot freezes text (once) via _freeze_text

    # ------------------------------------------------------------------------------------------------------
    def status(self, phase: str, message: str, current: int = 0, total: int = 0) -> None:
        self.log.emit(Status(phase=phase, message=message, current=current, total=total))

    def run(self) -> RunResult:
        self.open()
        try:
            self.setup()
            return self._loop(self.step, self.total)
        except Exception as exc:
            advice = ""
            text = f"{exc}"
            if ckpt.is_disk_full(exc) and "disk is full" not in text:
                text = (f"the disk is full ({self.run_dir}): {text.splitlines()[0][:200]}")
                advice = ("Free some space (old runs in outputs/, the Hugging Face cache) and resume with "
                          "--resume_from_checkpoint latest; the last complete checkpoint is intact.")
            elif isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
                advice, text = OOM_ADVICE, "out of memory: " + text.splitlines()[0][:300]
            elif isinstance(exc, TrainingError):
                advice = exc.advice
            self.log.emit(Failed(error=text, step=getattr(self, "step", 0), advice=advice))
            if isinstance(exc, TrainingError) and not advice:
                raise
            raise TrainingError(text, advice) from exc
        finally:
            if getattr(self.accelerator, "trackers", None):
                self.accelerator.end_training()

    # ------------------------------------------------------------------------------------------------------
    def open(self) -> "Trainer":
        """Creates the accelerator and event log (``run()`` does this; tests call it before ``setup()``)."""
        os.makedirs(self.run_dir, exist_ok=True)
        self.accelerator = _accelerator(self.cfg, self.run_dir)
        self.log = EventLog(os.path.join(self.run_dir, "events.jsonl"), self.on_event,
                            enabled=self.accelerator.is_main_process)
        return self

    def setup(self) -> None:
        """Everything before the first step: data, model, adapters, optimizer, resume, caches."""
        cfg, acc = self.cfg, self.accelerator
        device = acc.device
        self.world, self.rank = acc.num_processes, acc.process_index
        if acc.is_main_process:
            cfg.save(os.path.join(self.run_dir, "config.json"))
        notes = self.extra_notes + list(cfg.warnings())
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
            np.random.seed(cfg.seed % 2**32)
        seed = cfg.seed if cfg.seed is not None else int(time.time())
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True

        # ---- data --------------------------------------------------------------------------------------
        self.status("data", "reading images")
        items, problems = load_items(cfg)
        for p in problems:  # caption problems keep their image; every other problem means the file was skipped
            notes.append(f"{'' if p.code.startswith('caption') else 'skipped '}{p.file}: {p.message}")
        # ---- model -------------------------------------------------------------------------------------
        model_path = resolve(cfg.pretrained_model_name_or_path)
        family = (detect_family(model_path, cfg.revision, cfg.cache_dir) if cfg.model_family.value == "auto"
                  else get_family(cfg.model_family.value))
        self.family = family
        self.status("model", f"loading {cfg.pretrained_model_name_or_path} ({family.name})")
        wdtype = _weight_dtype(acc)
        vae_path = resolve(cfg.pretrained_vae_model_name_or_path) if cfg.pretrained_vae_model_name_or_path else None
        comps = family.load(model_path, revision=cfg.revision, variant=cfg.variant, vae_path=vae_path,
                            cache_dir=cfg.cache_dir, dtype=wdtype)
        self.comps = comps
        resolution = cfg.resolution or family.default_resolution(comps)
        self.resolution = resolution
        # The VAE runs in fp32 unless it is the fp16-fix VAE (plain SDXL VAE overflows in half precision).
        vae_dtype = wdtype if (vae_path and "fp16-fix" in vae_path) else torch.float32
        comps.vae.to(device, dtype=vae_dtype).requires_grad_(False).eval()
        comps.unet.to(device).requires_grad_(False)
        for te in comps.text_encoders:
            te.to(device).requires_grad_(False).eval()

        ds_problems = check_dataset([r for r in map(_as_record, items) if r], resolution=resolution,
                                    trigger=cfg.abstractions[0] if cfg.abstractions else "", min_images=3,
                                    tokenizer=comps.tokenizers[0])
        blocking = [p for p in ds_problems if p.severity == "error"]
        if blocking:
            raise TrainingError("the dataset has problems:\n" + "\n".join(
                f"  {p.file}: {p.message} Fix: {p.fix}" for p in blocking))
        notes += [f"{p.file}: {p.message}" for p in ds_problems]

        # ---- prior preservation: class images before anything is attached to the model ------------------
        class_items: list[TrainItem] = []
        if cfg.with_prior_preservation:
            if acc.is_main_process:
                self.status("class_images", f"checking {cfg.num_class_images} class images", 0,
                            cfg.num_class_images)
                n = generate_class_images(
                    family, comps, folder=cfg.class_data_dir, prompt=cfg.class_prompt, wanted=cfg.num_class_images,
                    resolution=resolution, batch_size=cfg.sample_batch_size, seed=seed,
                    on_progress=lambda d, t: self.status("class_images", f"generated {d}/{t} class images", d, t))
                if n:
                    notes.append(f"generated {n} class images in {cfg.class_data_dir}")
            acc.wait_for_everyone()
            class_items = load_class_items(cfg.class_data_dir)
            if not class_items:
                raise TrainingError(f"--class_data_dir {cfg.class_data_dir} holds no usable image")

        # ---- trainable parameters ---------------------------------------------------------------------
        gen_init = torch.Generator().manual_seed(seed)
        self.pivotal = None
        groups = []
        if cfg.train_text_encoder_ti:
            self.pivotal = PivotalTokens(cfg.tokens_per_abstraction)
            self.pivotal.install(comps.tokenizers, comps.text_encoders, generator=gen_init)
        torch.manual_seed(seed)
        unet_params = add_unet_lora(comps.unet, cfg)
        groups.append({"name": "unet", "params": unet_params, "lr": cfg.learning_rate,
                       "weight_decay": cfg.adam_weight_decay})
        text_wd = (cfg.adam_weight_decay_text_encoder if cfg.adam_weight_decay_text_encoder is not None
                   else cfg.adam_weight_decay)
        self.te_lora = False
        if cfg.train_text_encoder:
            self.te_lora = True
            te_params = []
            for te in comps.text_encoders:
                te_params += add_text_encoder_lora(te, cfg)
            groups.append({"name": "text", "params": te_params, "lr": cfg.effective_text_lr,
                           "weight_decay": text_wd})
        if self.pivotal:
            for p in self.pivotal.parameters():
                p.requires_grad_(True)
            groups.append({"name": "text", "params": self.pivotal.parameters(), "lr": cfg.effective_text_lr,
                           "weight_decay": text_wd})
        if cfg.scale_lr:
            factor = cfg.train_batch_size * cfg.gradient_accumulation_steps * self.world
            for g in groups:
                g["lr"] *= factor
        if cfg.gradient_checkpointing:
            comps.unet.enable_gradient_checkpointing()
            if self.te_lora:
                for te in comps.text_encoders:
                    te.gradient_checkpointing_enable()
        self.unet_forward = torch.compile(comps.unet) if cfg.compile_unet else comps.unet

        # ---- batches ----------------------------------------------------------------------------------
        buckets = (make_buckets(resolution, bucket_step_for(resolution, cfg.bucket_step)) if cfg.aspect_buckets
                   else [(resolution, resolution)])
        item_buckets = [nearest_bucket(*it.size, buckets) for it in items]
        self.items, self.item_buckets, self.class_items = items, item_buckets, class_items
        global_batch = cfg.train_batch_size * self.world
        sampler = BucketBatchSampler(item_buckets, repeats=cfg.repeats, batch_size=global_batch, seed=seed,
                                     random_flip=cfg.random_flip)
        self.sampler = sampler
        total, per_epoch = compute_total_steps(cfg, len(items), sampler.batches_per_epoch())
        self.total = total
        self.pivot_step = max(1, int(cfg.train_text_encoder_ti_frac * total)) if self.pivotal else 0
        self.te_stop_step = max(1, int(cfg.train_text_encoder_frac * total)) if self.te_lora else 0

        optimizer = build_optimizer(cfg, groups)
        scheduler = build_scheduler(cfg, optimizer, total)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.noise_gen = torch.Generator().manual_seed(seed + 1)
        self.seed = seed

        # ---- resume ------------------------------------------------------------------------------------
        ckpt_root = os.path.join(self.run_dir, "checkpoints")
        start = 0
        if cfg.resume_from_checkpoint:
            path = (ckpt.latest_checkpoint(ckpt_root) if cfg.resume_from_checkpoint == "latest"
                    else cfg.resume_from_checkpoint)
            if path:
                start = self._restore(path)
                notes.append(f"resumed from {path} at step {start}")
            else:
                notes.append("no checkpoint to resume from: starting at step 0")
        self.step = start
        if self.text_trainable and not self._text_should_train(start):
            self._freeze_text()  # nothing textual trains, or a resume past the pivot already froze it

        # ---- caches ------------------------------------------------------------------------------------
        if cfg.cache_latents:
            self._cache_latents(device)

        self.log.emit(Started(run_dir=self.run_dir, total_steps=total, num_images=len(items), start_step=start,
                              notes=notes))
        if acc.is_main_process and log_trackers(cfg):
            acc.init_trackers("lora-studio", config={k: v for k, v in cfg.to_dict().items()
                                                     if isinstance(v, (int, float, str, bool))})

    # ------------------------------------------------------------------------------------------------------
    def _text_should_train(self, step: int) -> bool:
        return bool((self.pivotal and step < self.pivot_step) or (self.te_lora and step < self.te_stop_step))

    def _freeze_text(self) -> None:
        """The pivot: text parameters stop training and leave the optimizer (state freed)."""
        if self.pivotal:
            self.pivotal.set_trainable(False)
        if self.te_lora:
            for te in self.comps.text_encoders:
                for p in te.parameters():
                    p.requires_grad_(False)
        drop_group_params(self.optimizer, "text")
        self.text_trainable = False
        self.text_cache = {}
        self._maybe_offload_text_encoders()

    def _fixed_captions(self) -> Optional[list[str]]:
        """Every caption training can use, when they are fixed (no dropout, no tag shuffling)."""
        cfg = self.cfg
        if cfg.caption_dropout > 0 or cfg.shuffle_tags:
            return None
        caps = {replace_placeholders(it.caption, cfg.tokens_per_abstraction) if self.pivotal else it.caption
                for it in self.items}
        if self.class_items:
            caps.add(cfg.class_prompt)
        return sorted(caps)

    def _maybe_offload_text_encoders(self) -> None:
        """After the pivot on a GPU: encode every caption once, then move the text encoders to the CPU."""
        device = self.accelerator.device
        captions = self._fixed_captions()
        if (device.type not in self.OFFLOAD_TEXT_ENCODERS_FROM or not self.cfg.cache_text_embeddings
                or captions is None):
            return
        for start in range(0, len(captions), 16):
            self._encode_text(captions[start:start + 16])
        for te in self.comps.text_encoders:
            te.to("cpu")
        self.text_offloaded = True
        self.status("cache_text", f"{len(captions)} prompt embeddings cached; text encoders moved off the GPU")

    def _text_encoders_to(self, device) -> None:
        for te in self.comps.text_encoders:
            te.to(device)

    def _restore(self, path: str) -> int:
        data = ckpt.load_checkpoint(path)
        t = data["tensors"]
        load_peft_state_dict(self.comps.unet, t["lora_unet"])
        if self.te_lora:
            for i, te in enumerate(self.comps.text_encoders):
                load_peft_state_dict(te, t[f"lora_te{i + 1}"])
        if self.pivotal:
            self.pivotal.load_state_dict(t["embeddings"], self.family.embedding_keys)
        step = int(data["state"]["step"])
        if self.text_trainable and not self._text_should_train(step):
            self._freeze_text()  # before loading the optimizer state, which was saved without the text group
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        self.noise_gen.set_state(data["rng"]["gen_noise"])
        ckpt.restore_global_rng(data["rng"], data["state"])
        return step

    def _check_finite(self, step: int) -> None:
        """Never write a checkpoint or LoRA whose weights went NaN/inf (the previous checkpoint stays latest)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.pivotal:
            params += self.pivotal.parameters()
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise TrainingError(
                f"the LoRA weights became NaN/inf at step {step}; nothing was saved over the last good checkpoint.",
                "Lower the learning rate (AdamW) or use --optimizer prodigy, use --mixed_precision bf16 instead of "
                "fp16, or the fp16-fix VAE.")

    def _save(self, step: int) -> str:
        self._check_finite(step)
        tensors = {"lora_unet": peft_state_dict(self.comps.unet)}
        if self.te_lora:
            for i, te in enumerate(self.comps.text_encoders):
                tensors[f"lora_te{i + 1}"] = peft_state_dict(te)
        if self.pivotal:
            tensors["embeddings"] = self.pivotal.state_dict(self.family.embedding_keys)
        path = ckpt.save_checkpoint(
            os.path.join(self.run_dir, "checkpoints"), step, tensors=tensors, optimizer=self.optimizer,
            scheduler=self.scheduler, meta={"total_steps": self.total, "config_model": self.cfg.pretrained_model_name_or_path},
            generators={"noise": self.noise_gen}, total_limit=self.cfg.checkpoints_total_limit,
            fault_hook=self.fault_hook)
        self.log.emit(Checkpoint(step=step, path=path))
        return path

    # ------------------------------------------------------------------------------------------------------
    def _prepared(self, item: TrainItem, bucket, flip: bool, sample_seed: int):
        crop_rng = np.random.default_rng(sample_seed) if not self.cfg.center_crop else None
        return prepare_image(item.load(), bucket, center_crop=self.cfg.center_crop, flip=flip, crop_rng=crop_rng,
                             interpolation=self.cfg.image_interpolation_mode)

    def _encode_item(self, item: TrainItem, bucket, flip: bool, sample_seed: int) -> tuple:
        """(latent, original_size, crop_top_left, target_size) of one image at one bucket and flip."""
        prep = self._prepared(item, bucket, flip, sample_seed)
        lat = self._encode_pixels(prep.pixels.unsqueeze(0))[0]
        return lat, prep.original_size, prep.crop_top_left, prep.target_size

    @torch.no_grad()
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.comps.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        lat = dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((lat - shift) * vae.config.scaling_factor).float()

    def _cache_latents(self, device) -> None:
        """Latents of every (image, flip variant, bucket), keyed by the image, never by step order."""
        variants = [False, True] if self.cfg.random_flip else [False]
        todo = [(i, f) for i in range(len(self.items)) for f in variants]
        todo += [(-1 - j, False) for j in range(len(self.class_items))]
        for n, (i, flip) in enumerate(todo):
            if i >= 0:
                item, bucket = self.items[i], self.item_buckets[i]
                buckets = [bucket]
            else:
                item = self.class_items[-1 - i]
                buckets = sorted(set(self.item_buckets))  # a class image may join a batch of any bucket
            for b in buckets:
                self.latent_cache[(i, flip, b)] = self._encode_item(item, b, flip, 0)
            if n % 8 == 0 or n == len(todo) - 1:
                self.status("cache_latents", f"encoding images {n + 1}/{len(todo)}", n + 1, len(todo))

    def _latents_for(self, key_item: int, item: TrainItem, bucket, sample: Sample):
        key = (key_item, sample.flip, bucket)
        if key in self.latent_cache:
            return self.latent_cache[key]
        return self._encode_item(item, bucket, sample.flip, sample.seed)

    def _caption_for(self, item: TrainItem, sample: Sample) -> str:
        cfg = self.cfg
        rng = np.random.default_rng([sample.seed, 7])
        text = training_caption(item.caption, dropout=cfg.caption_dropout, shuffle=cfg.shuffle_tags,
                                keep_tokens=cfg.keep_tokens, rng=rng)
        return replace_placeholders(text, cfg.tokens_per_abstraction) if self.pivotal else text

    def _encode_text(self, captions: list[str]):
        fam, comps = self.family, self.comps
        use_cache = self.cfg.cache_text_embeddings and not self.text_trainable
        if use_cache and all(c in self.text_cache for c in captions):
            embs = [self.text_cache[c] for c in captions]
            pooled = [e[1] for e in embs]
            return (torch.stack([e[0] for e in embs]),
                    torch.stack(pooled) if pooled[0] is not None else None)
        ctx = nullcontext() if self.text_trainable else torch.no_grad()
        if self.text_offloaded:  # a caption that was not pre-encoded: bring the encoders back for it
            self._text_encoders_to(self.accelerator.device)
        with ctx:
            ids = fam.tokenize(comps, captions)
            embeds, pooled = fam.encode(comps, ids)
        if self.text_offloaded:
            self._text_encoders_to("cpu")
        if use_cache:
            for j, c in enumerate(captions):
                self.text_cache[c] = (embeds[j].detach(), pooled[j].detach() if pooled is not None else None)
        return embeds, pooled

    # ------------------------------------------------------------------------------------------------------
    def _micro_batch(self, position: int, device):
        """Inputs of this rank for micro-batch ``position``: every rank draws the global batch's noise and
        timesteps from the shared generator and takes its own slice (so N ranks == one rank at N x batch)."""
        cfg = self.cfg
        epoch, batch = self.sampler.batch_at(position)
        B = cfg.train_batch_size
        mine = batch[self.rank * B:(self.rank + 1) * B]
        lats, origs, crops, targets, captions = [], [], [], [], []
        for s in mine:
            item = self.items[s.item]
            lat, o, c, t = self._latents_for(s.item, item, self.item_buckets[s.item], s)
            lats.append(lat), origs.append(o), crops.append(c), targets.append(t)
            captions.append(self._caption_for(item, s))
        n_inst = len(mine)
        if self.class_items:
            bucket = self.item_buckets[mine[0].item]
            gb = len(batch)
            for j in range(self.rank * B, (self.rank + 1) * B):
                ci = (position * gb + j) % len(self.class_items)
                lat, o, c, t = self._latents_for(-1 - ci, self.class_items[ci], bucket, Sample(ci, False, 0))
                lats.append(lat), origs.append(o), crops.append(c), targets.append(t)
                captions.append(cfg.class_prompt)
        latents = torch.stack(lats).to(device)
        gshape = (len(batch) * (2 if self.class_items else 1),) + tuple(latents.shape[1:])
        noise_all = torch.randn(gshape, generator=self.noise_gen)
        if cfg.noise_offset:
            noise_all += cfg.noise_offset * torch.randn(gshape[:2] + (1, 1), generator=self.noise_gen)
        t_all = torch.randint(0, self.comps.noise_scheduler.config.num_train_timesteps, (gshape[0],),
                              generator=self.noise_gen)
        gb = len(batch)
        idx = list(range(self.rank * B, (self.rank + 1) * B))
        if self.class_items:
            idx += [gb + j for j in idx]
        noise, timesteps = to_device(noise_all[idx], device), to_device(t_all[idx], device)
        return epoch, latents, noise, timesteps, captions, origs, crops, targets, n_inst

    def _forward_loss(self, position: int, device):
        cfg, comps, fam = self.cfg, self.comps, self.family
        (epoch, latents, noise, timesteps, captions, origs, crops, targets,
         n_inst) = self._micro_batch(position, device)
        noisy = comps.noise_scheduler.add_noise(latents, noise, timesteps)
        wdtype = comps.unet.dtype
        embeds, pooled = self._encode_text(captions)
        added = fam.added_conditioning(pooled, origs, crops, targets, device, wdtype)
        with self.accelerator.autocast():
            pred = self.unet_forward(noisy.to(wdtype), timesteps, embeds.to(wdtype),
                                     added_cond_kwargs=added, return_dict=False)[0]
        target = target_for(comps.noise_scheduler, latents, noise, timesteps)
        loss, parts = diffusion_loss(pred, target, timesteps, comps.noise_scheduler, snr_gamma=cfg.snr_gamma,
                                     num_instance=n_inst if self.class_items else None,
                                     prior_loss_weight=cfg.prior_loss_weight)
        self.last_parts = parts
        return epoch, loss

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]

    def _loop(self, start: int, total: int) -> RunResult:
        cfg, acc = self.cfg, self.accelerator
        device = acc.device
        accum = cfg.gradient_accumulation_steps
        comps = self.comps
        comps.unet.train()
        loss_acc = torch.zeros((), device=device)  # summed on the device; read every log_every steps
        acc_steps = 0  # steps in loss_acc: fewer than log_every after a resume and at the last step
        last_loss = None
        t_start, steps_done = time.time(), 0
        step = start
        epoch = 0
        while step < total:
            if self.text_trainable and not self._text_should_train(step):
                self._freeze_text()
                self.status("pivot", f"step {step}: text embeddings frozen; they leave the optimizer")
            params = self._trainable()
            for micro in range(accum):
                position = step * accum + micro
                epoch, loss = self._forward_loss(position, device)
                (loss / accum).backward()
                loss_acc += loss.detach() / accum
            acc_steps += 1
            if self.world > 1:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad = acc.reduce(p.grad, reduction="mean")
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if self.fault_hook:
                self.fault_hook(f"before-optimizer-step:{step}")
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            self.step = step
            steps_done += 1
            value = None
            if step % cfg.log_every == 0 or step == total or self.stop.is_set():
                value = float(loss_acc.item()) / acc_steps  # the mean over the steps since the last read
                if self.world > 1:
                    value = float(acc.reduce(torch.tensor(value, device=device), reduction="mean").item())
                loss_acc.zero_()
                acc_steps = 0
                if not math.isfinite(value):
                    raise TrainingError(
                        f"the loss became {value} at step {step}; training stopped before saving a broken LoRA "
                        f"(the last good checkpoint is kept).",
                        "Lower the learning rate (AdamW) or use --optimizer prodigy, use --mixed_precision bf16 "
                        "instead of fp16, or the fp16-fix VAE.")
                last_loss = value
            elapsed = time.time() - t_start
            s_it = elapsed / steps_done
            lr, d_lr = effective_lr(self.optimizer)
            self.log.emit(Step(step=step, total=total, loss=value, lr=lr, d_lr=d_lr, s_per_it=s_it,
                               eta_s=s_it * (total - step), epoch=epoch, text_trainable=self.text_trainable))
            if acc.is_main_process and getattr(acc, "trackers", None) and value is not None:
                acc.log({"loss": value, "lr": lr, **({"d*lr": d_lr} if d_lr else {})}, step=step)
            stopping = self.stop.is_set()
            if (step % cfg.checkpointing_steps == 0 or stopping) and step < total:
                if acc.is_main_process:
                    self._save(step)
                acc.wait_for_everyone()
            if cfg.validation_prompt and step % cfg.validation_steps == 0 and step < total and not stopping:
                self._validate(step)
            if stopping:
                break
        stopped = step < total
        artifacts = self._finish(step, stopped)
        return RunResult(run_dir=self.run_dir, step=step, total_steps=total, artifacts=artifacts, stopped=stopped,
                         final_loss=last_loss)

    # ------------------------------------------------------------------------------------------------------
    def _validate(self, step: int, final: bool = False) -> list[str]:
        if not self.accelerator.is_main_process:
            return []
        cfg = self.cfg
        prompt = cfg.validation_prompt
        if self.pivotal:
            prompt = replace_placeholders(prompt, cfg.tokens_per_abstraction)
        self.comps.vae.to(self.accelerator.device)
        if self.text_offloaded:
            self._text_encoders_to(self.accelerator.device)
        paths = render_samples(self.family, self.comps, prompt=prompt, num_images=cfg.num_validation_images,
                               steps=cfg.validation_inference_steps, guidance=cfg.validation_guidance_scale,
                               resolution=self.resolution, seed=self.seed, device=self.accelerator.device,
                               out_dir=os.path.join(self.run_dir, "samples"),
                               tag=f"final-step-{step}" if final else f"step-{step}",
                               autocast=self.accelerator.autocast)
        if self.text_offloaded:
            self._text_encoders_to("cpu")
        self.log.emit(SampleEvent(step=step, images=paths, prompt=prompt))
        return paths

    def _finish(self, step: int, stopped: bool) -> dict[str, str]:
        cfg, acc = self.cfg, self.accelerator
        acc.wait_for_everyone()
        artifacts: dict[str, str] = {}
        if not acc.is_main_process:
            return artifacts
        if stopped:
            artifacts["checkpoint"] = ckpt.latest_checkpoint(os.path.join(self.run_dir, "checkpoints")) or ""
        else:
            artifacts["checkpoint"] = self._save(step)
        self._check_finite(step)
        self.status("export", "writing the LoRA files")
        unet_sd = peft_state_dict(self.comps.unet)
        te_sds = [peft_state_dict(te) for te in self.comps.text_encoders] if self.te_lora else []
        fam = self.family
        artifacts["diffusers"] = export.save_diffusers_lora(self.run_dir, fam, cfg, unet_sd, te_sds)
        meta = export.kohya_metadata(cfg, fam, len(self.items), step, self.resolution,
                                     [it.caption for it in self.items], cfg.pretrained_model_name_or_path)
        artifacts["kohya"] = export.save_kohya_lora(self.run_dir, fam, cfg, unet_sd, te_sds, meta)
        if self.pivotal:
            artifacts["embeddings"] = export.save_embeddings(self.run_dir, cfg,
                                                             self.pivotal.state_dict(fam.embedding_keys))
        samples = []
        if cfg.validation_prompt and not stopped:
            samples = self._validate(step, final=True)
        artifacts["model_card"] = export.write_model_card(
            self.run_dir, cfg, fam, model_id=cfg.pretrained_model_name_or_path, steps=step, samples=samples,
            has_embeddings=bool(self.pivotal))
        if cfg.push_to_hub and not stopped:
            self.status("push", f"uploading to {cfg.hub_model_id}")
            artifacts["hub"] = export.push_to_hub(self.run_dir, cfg.hub_model_id, cfg.hub_token, cfg.hub_private)
        self.log.emit(Finished(step=step, artifacts=artifacts, stopped=stopped))
        return artifacts


def log_trackers(cfg: TrainConfig) -> bool:
    return cfg.report_to.value != "none"


def _as_record(item: TrainItem):
    from .data.ingest import Record

    return Record(path=item.path, caption=item.caption, source_name=item.name) if item.path else None


def train(config: TrainConfig, on_event=None, stop: Optional[threading.Event] = None, *, fault_hook=None) -> RunResult:
    """Trains a LoRA as ``config`` says, in the caller's thread. Emits typed events to ``on_event`` and to
    ``<output_dir>/events.jsonl``; checks ``stop`` after every step (a stop saves a checkpoint and the current
    LoRA). Raises TrainingError (after a ``failed`` event) when the run cannot go on."""
    notes = []
    if config.auto_fit:
        from .preflight import preflight

        plan = preflight(config, on_event=on_event, stop=stop)
        if stop is not None and stop.is_set():  # stopped during the measurement: nothing was trained
            return RunResult(run_dir=os.path.abspath(config.output_dir), step=0, total_steps=plan.total_steps,
                             stopped=True)
        if not plan.fits:
            raise TrainingError("the run does not fit in memory", plan.message)
        config = plan.config.replace(auto_fit=False)
        notes.append(f"auto-fit: {plan.message}")
    return Trainer(config, on_event=on_event, stop=stop, fault_hook=fault_hook, notes=notes).run()
