"""The training run: setup -> steps -> finish, under accelerate (one process, or ``accelerate launch`` /
``torchrun`` data parallel: each rank takes its slice of one global batch; a step is one global batch;
gradients are averaged with explicit all-reduces in ~25 MB buckets (``distributed.average_gradients``), because
the trainable parameters live in three modules and the text ones leave training at the pivot, which DDP wrappers
handle poorly). Only rank 0 writes the run folder and forwards events (progress bar, notes).

The work is done by the role modules: ``setup`` (data, model, trainable parameters), ``batches``, ``caches``,
``step`` and ``finish`` (checkpoints, samples, export). This class holds the state they share.
"""
from __future__ import annotations

import math
import os
import threading
import time
from typing import Optional

import numpy as np
import torch

from .. import checkpoint as ckpt
from ..config import TrainConfig
from ..data.buckets import nearest_bucket
from ..config.run_folder import settle_seed
from ..data.sources import collect_records
from ..data.sampler import BucketBatchSampler, compute_total_steps
from ..events import EventLog, Failed, Started, Status, Step, ValidationLoss
from ..export.kohya import outside_sdscripts_blocks
from . import finish, setup
from .batches import Batches
from .caches import LatentCache, TextEncoding
from .inputs import RunInputs, run_buckets
from .heldout import HeldOutLoss, split_held_out
from .errors import NONFINITE_ADVICE, RunResult, TrainingError, describe_failure
from .placeholders import replace_placeholders
from .optim import build_optimizer, build_scheduler, drop_group_params, effective_lr
from .step import apply_gradients, backward, forward_loss


class Trainer:
    """One training run. ``run()`` does the work; tests drive ``open()``, ``setup()`` and the steps directly."""

    # Devices whose memory is worth freeing by moving the text encoders to the CPU after the pivot (see
    # caches.TextEncoding.OFFLOAD_FROM); tests add "cpu" to run that path without a GPU.
    OFFLOAD_TEXT_ENCODERS_FROM = TextEncoding.OFFLOAD_FROM

    def __init__(self, cfg: TrainConfig, on_event=None, stop: Optional[threading.Event] = None, fault_hook=None,
                 notes: Optional[list[str]] = None, inputs: Optional[RunInputs] = None):
        self.cfg = cfg.validate()
        self.inputs = inputs or RunInputs()  # shared with the preflight's measurements: one load, one read
        self.extra_notes = list(notes or [])
        self.stop = stop or threading.Event()
        self.fault_hook = fault_hook  # tests inject faults (kill during checkpoint write, OOM, NaN) through this
        self.run_dir = os.path.abspath(cfg.output_dir)
        self.on_event = on_event
        self.text_trainable = True  # until setup/restore/the pivot freezes text (once) via freeze_text

    def status(self, phase: str, message: str, current: int = 0, total: int = 0) -> None:
        self.log.emit(Status(phase=phase, message=message, current=current, total=total))

    # ----- the whole run ----------------------------------------------------------------------------------
    def run(self) -> RunResult:
        self.open()
        try:
            self.setup()
            return self.train_steps(self.step, self.total)
        except Exception as exc:
            text, advice = describe_failure(exc, self.run_dir)
            self.log.emit(Failed(error=text, step=getattr(self, "step", 0), advice=advice))
            if isinstance(exc, TrainingError) and not advice:
                raise
            raise TrainingError(text, advice) from exc
        finally:
            if getattr(self.accelerator, "trackers", None):
                self.accelerator.end_training()

    def open(self) -> "Trainer":
        """Creates the accelerator and event log (``run()`` does this; tests call it before ``setup()``)."""
        os.makedirs(self.run_dir, exist_ok=True)
        self.accelerator = setup.make_accelerator(self.cfg, self.run_dir)
        self.scaler = self.accelerator.scaler  # fp16 on a GPU: accelerate's GradScaler; None otherwise
        main = self.accelerator.is_main_process
        # rank 0 alone writes events.jsonl and forwards events: one progress bar and one set of notes, not N
        self.log = EventLog(os.path.join(self.run_dir, "events.jsonl"), self.on_event if main else None,
                            enabled=main)
        return self

    def setup(self) -> None:
        """Everything before the first step: data, model, adapters, optimizer, resume, caches."""
        cfg, acc = self.cfg, self.accelerator
        device = acc.device
        seed_note = None
        if cfg.seed is None:  # chosen once, saved in config.json, reused on resume; every rank takes rank 0's
            cfg, seed_note = settle_seed(cfg, self.run_dir)
            if acc.num_processes > 1:
                from accelerate.utils import broadcast_object_list

                cfg = cfg.replace(seed=broadcast_object_list([cfg.seed])[0])
            self.cfg = cfg
        self.started_at = time.time()  # the kohya metadata's ss_training_started_at
        self.world, self.rank = acc.num_processes, acc.process_index
        if acc.is_main_process:
            cfg.save(os.path.join(self.run_dir, "config.json"))
        notes = self.extra_notes + list(cfg.warnings()) + ([seed_note] if seed_note else [])
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        self.seed = seed = cfg.seed
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True

        inputs = self.inputs
        collected = collect_records(cfg) if inputs.items is None else None  # an empty folder fails before loading
        self.family, self.comps = family, comps = inputs.model(cfg, acc, self.status)
        self.resolution = resolution = cfg.resolution or family.default_resolution(comps)
        self.status("data", "reading images")
        items, more = inputs.dataset(cfg, resolution, self.status, collected)
        notes += more
        notes += inputs.check(cfg, resolution, comps.tokenizers[0])
        items, held_out = split_held_out(items, cfg.validation_loss_images)
        class_items: list = []
        if cfg.with_prior_preservation:  # class images before anything is attached to the model
            class_items, more = setup.prepare_class_images(cfg, family, comps, acc, resolution, seed, self.status)
            notes += more
        self.pivotal, self.te_lora, groups = setup.trainable_groups(cfg, comps, self.world, seed)
        outside = outside_sdscripts_blocks(comps.unet)
        if outside:
            notes.append(f"--lora_target_modules adapts {', '.join(outside[:4])}{' ...' if len(outside) > 4 else ''}: "
                         "ComfyUI and A1111 load those keys, kohya's sd-scripts has no LoRA there and ignores them")
        self.unet_forward = torch.compile(comps.unet) if cfg.compile_unet else comps.unet

        buckets = run_buckets(cfg, resolution)
        self.items, self.class_items = items, class_items
        self.item_buckets = item_buckets = [nearest_bucket(*it.size, buckets) for it in items]
        self.sampler = BucketBatchSampler(item_buckets, repeats=cfg.repeats, batch_size=cfg.train_batch_size * self.world,
                                          seed=seed, random_flip=cfg.random_flip)
        self.total, self.steps_per_epoch = compute_total_steps(cfg, len(items), self.sampler.batches_per_epoch(),
                                                                   self.world)
        self.pivot_step = max(1, int(cfg.train_text_encoder_ti_frac * self.total)) if self.pivotal else 0
        self.te_stop_step = max(1, int(cfg.train_text_encoder_frac * self.total)) if self.te_lora else 0
        self.optimizer = build_optimizer(cfg, groups)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total)
        self.noise_gen = torch.Generator().manual_seed(seed + 1)
        self.latents = LatentCache(cfg, inputs.latent_store(cfg), items, item_buckets, class_items)
        self.text = TextEncoding(cfg, family, comps, device)
        self.batches = Batches(cfg, self.sampler, items, item_buckets, class_items, self.latents.get,
                               comps.noise_scheduler.config.num_train_timesteps, self.noise_gen, self.rank,
                               pivotal=bool(self.pivotal))
        self.held_out = None
        if held_out:
            self.held_out = HeldOutLoss(
                held_out, buckets, self.latents.encode_item,
                lambda c: replace_placeholders(c, cfg.tokens_per_abstraction) if self.pivotal else c,
                comps.noise_scheduler.config.num_train_timesteps, seed)
            notes.append(f"validation loss on {len(held_out)} held-out image(s) every {cfg.validation_loss_every} "
                         f"steps: {', '.join(it.name for it in held_out)}")

        start = 0
        if cfg.resume_from_checkpoint:
            ckpt_root = os.path.join(self.run_dir, "checkpoints")
            path = (ckpt.latest_checkpoint(ckpt_root) if cfg.resume_from_checkpoint == "latest"
                    else cfg.resume_from_checkpoint)
            if path:
                start = finish.restore(self, path)
                notes.append(f"resumed from {path} at step {start}")
            else:
                notes.append("no checkpoint to resume from: starting at step 0")
        self.step = start
        if self.text_trainable and not self.text_should_train(start):
            self.freeze_text()  # nothing textual trains, or a resume past the pivot already froze it
        if cfg.cache_latents:
            t0 = time.time()
            self.latents.fill(self.status)
            inputs.seconds["caches"] += time.time() - t0
        notes += inputs.store.notes if inputs.store is not None else []

        self.log.emit(Started(run_dir=self.run_dir, total_steps=self.total, num_images=len(items),
                              start_step=start, notes=notes))
        if acc.is_main_process and cfg.report_to.value != "none":
            acc.init_trackers("lora-studio", config={k: v for k, v in cfg.to_dict().items()
                                                     if isinstance(v, (int, float, str, bool))})

    # ----- the pivot ----------------------------------------------------------------------------------------
    def text_should_train(self, step: int) -> bool:
        return bool((self.pivotal and step < self.pivot_step) or (self.te_lora and step < self.te_stop_step))

    def freeze_text(self) -> None:
        """The pivot: text parameters stop training and leave the optimizer (state freed)."""
        if self.pivotal:
            self.pivotal.set_trainable(False)
        if self.te_lora:
            for te in self.comps.text_encoders:
                for p in te.parameters():
                    p.requires_grad_(False)
                te.eval()
        drop_group_params(self.optimizer, "text")
        self.text_trainable = False
        n = self.text.freeze(self.batches.fixed_captions(), self.OFFLOAD_TEXT_ENCODERS_FROM)
        if n is not None:
            self.status("cache_text", f"{n} prompt embeddings cached; text encoders moved off the GPU")

    # ----- steps ----------------------------------------------------------------------------------------------
    def forward_loss(self, position: int, device):
        """(epoch, loss) of micro-batch ``position``."""
        mb = self.batches.micro_batch(position, device)
        loss, self.last_parts = forward_loss(mb, family=self.family, comps=self.comps,
                                             unet_forward=self.unet_forward, encode_text=self.text.encode,
                                             accelerator=self.accelerator, cfg=self.cfg,
                                             with_prior=bool(self.class_items))
        return mb.epoch, loss

    def validation_loss(self, step: int) -> None:
        """Emits the held-out images' loss (main process; the UNet in eval mode, so no LoRA dropout)."""
        if self.held_out is None or not self.accelerator.is_main_process:
            return
        self.comps.unet.eval()
        try:
            loss = self.held_out.compute(
                lambda mb: forward_loss(mb, family=self.family, comps=self.comps, unet_forward=self.unet_forward,
                                        encode_text=self.text.encode, accelerator=self.accelerator, cfg=self.cfg,
                                        with_prior=False)[0], self.accelerator.device)
        finally:
            self.comps.unet.train()
        self.log.emit(ValidationLoss(step=step, loss=loss))

    def checkpoint(self, step: int) -> None:
        """Checkpoint ``step``: every rank first agrees that the weights are finite (a NaN seen by one rank stops
        them all with the error, instead of leaving the others waiting), then rank 0 saves and all wait."""
        finish.agree_finite(self, step)
        if self.accelerator.is_main_process:
            finish.save(self, step)
        self.accelerator.wait_for_everyone()

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]

    def train_steps(self, start: int, total: int) -> RunResult:
        cfg, acc = self.cfg, self.accelerator
        device = acc.device
        accum = cfg.gradient_accumulation_steps
        self.comps.unet.train()
        if self.te_lora and self.text_trainable:
            # transformers checkpoints and peft applies LoRA dropout only in training mode
            for te in self.comps.text_encoders:
                te.train()
        loss_acc = torch.zeros((), device=device)  # summed on the device; read every log_every steps
        acc_steps = 0  # steps in loss_acc: fewer than log_every after a resume and at the last step
        last_loss = None
        t_start, steps_done = time.time(), 0
        step, epoch = start, 0
        if step < total:
            self.validation_loss(step)  # where the curve starts (the base model's loss on the held-out images)
        while step < total:
            if self.text_trainable and not self.text_should_train(step):
                self.freeze_text()
                self.status("pivot", f"step {step}: text embeddings frozen; they leave the optimizer")
            params = self.trainable()
            for micro in range(accum):
                epoch, loss = self.forward_loss(step * accum + micro, device)
                backward(loss / accum, self.scaler)
                loss_acc += loss.detach() / accum
            acc_steps += 1
            apply_gradients(params, optimizer=self.optimizer, scheduler=self.scheduler, accelerator=acc,
                            world=self.world, max_grad_norm=cfg.max_grad_norm, fault_hook=self.fault_hook, step=step,
                            scaler=self.scaler)
            if cfg.pull_back_token_norm and self.pivotal and self.text_trainable:
                self.pivotal.pull_back()  # as the reference script does after each step
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
                        f"(the last good checkpoint is kept).", NONFINITE_ADVICE)
                last_loss = value
            s_it = (time.time() - t_start) / steps_done
            lr, d_lr = effective_lr(self.optimizer)
            self.log.emit(Step(step=step, total=total, loss=value, lr=lr, d_lr=d_lr, s_per_it=s_it,
                               eta_s=s_it * (total - step), epoch=epoch, text_trainable=self.text_trainable))
            if steps_done == 1:
                self.log.emit(self.inputs.first_step(time.time() - t_start))
            if acc.is_main_process and getattr(acc, "trackers", None) and value is not None:
                acc.log({"loss": value, "lr": lr, **({"d*lr": d_lr} if d_lr else {})}, step=step)
            stopping = self.stop.is_set()
            if step % cfg.validation_loss_every == 0 or step == total:
                self.validation_loss(step)
            if (step % cfg.checkpointing_steps == 0 or stopping) and step < total:
                self.checkpoint(step)
            if cfg.validation_prompt and step % cfg.validation_steps == 0 and step < total and not stopping:
                finish.validate(self, step)
                if self.stop.is_set():  # Stop pressed during the samples: keep this step, end now
                    stopping = True
                    if step % cfg.checkpointing_steps != 0:
                        self.checkpoint(step)
            if stopping:
                break
        stopped = step < total
        artifacts = finish.finish(self, step, stopped)
        return RunResult(run_dir=self.run_dir, step=step, total_steps=total, artifacts=artifacts, stopped=stopped,
                         final_loss=last_loss)
