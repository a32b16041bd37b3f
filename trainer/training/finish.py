"""What a run writes: checkpoints (and reading them back on resume), sample images, and the final artifacts.

Each function takes the :class:`~trainer.training.trainer.Trainer` whose state it saves or restores.
"""
from __future__ import annotations

import math
import os

import torch

from .. import checkpoint as ckpt
from .. import export
from ..distributed import all_true
from ..events import Checkpoint, Finished, Sample as SampleEvent
from .errors import NONFINITE_ADVICE, TrainingError
from .lora import load_peft_state_dict, peft_state_dict
from .placeholders import replace_placeholders
from generation.pipelines import RenderStopped

from .validation import render_samples


def weights_finite(t) -> bool:
    """Whether every trainable weight (and learnt token row) of the run is finite."""
    params = [p for g in t.optimizer.param_groups for p in g["params"]]
    if t.pivotal:
        params += t.pivotal.parameters()
    return not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def agree_finite(t, step: int) -> None:
    """``check_finite`` on every rank at once: one collective, so all ranks raise together when any rank's
    weights went NaN/inf (every rank calls it at the same step)."""
    if not all_true(weights_finite(t), t.accelerator.device):
        _raise_nonfinite(step)


def check_finite(t, step: int) -> None:
    """Never write a checkpoint or LoRA whose weights went NaN/inf (the previous checkpoint stays latest)."""
    if not weights_finite(t):
        _raise_nonfinite(step)


def _raise_nonfinite(step: int) -> None:
    raise TrainingError(
            f"the LoRA weights became NaN/inf at step {step}; nothing was saved over the last good checkpoint.",
            NONFINITE_ADVICE)


def _lora_tensors(t) -> dict[str, dict]:
    tensors = {"lora_unet": peft_state_dict(t.comps.unet)}
    if t.te_lora:
        for i, te in enumerate(t.comps.text_encoders):
            tensors[f"lora_te{i + 1}"] = peft_state_dict(te)
    if t.pivotal:
        tensors["embeddings"] = t.pivotal.state_dict(t.family.embedding_keys)
    return tensors


def save(t, step: int) -> str:
    check_finite(t, step)
    path = ckpt.save_checkpoint(
        os.path.join(t.run_dir, "checkpoints"), step, tensors=_lora_tensors(t), optimizer=t.optimizer,
        scheduler=t.scheduler, meta={"total_steps": t.total, "config_model": t.cfg.pretrained_model_name_or_path},
        generators={"noise": t.noise_gen}, total_limit=t.cfg.checkpoints_total_limit, fault_hook=t.fault_hook)
    t.log.emit(Checkpoint(step=step, path=path))
    return path


def restore(t, path: str) -> int:
    """Loads checkpoint ``path`` into the run; returns its step."""
    data = ckpt.load_checkpoint(path)
    tensors = data["tensors"]
    load_peft_state_dict(t.comps.unet, tensors["lora_unet"])
    if t.te_lora:
        for i, te in enumerate(t.comps.text_encoders):
            load_peft_state_dict(te, tensors[f"lora_te{i + 1}"])
    if t.pivotal:
        t.pivotal.load_state_dict(tensors["embeddings"], t.family.embedding_keys)
    step = int(data["state"]["step"])
    # The pivot freezes the text group at the top of the step after it, so a checkpoint at the pivot step (or at
    # te_stop_step) still holds that group: freeze before loading only when the saved text group is empty, and
    # after loading (which drops its state) when the checkpoint still has it but its step is past the boundary.
    saved_text = sum(len(g["params"]) for g in data["optimizer"]["param_groups"] if g.get("name") == "text")
    if t.text_trainable and not saved_text:
        t.freeze_text()
    t.optimizer.load_state_dict(data["optimizer"])
    if t.text_trainable and not t.text_should_train(step):
        t.freeze_text()
    t.scheduler.load_state_dict(data["scheduler"])
    t.noise_gen.set_state(data["rng"]["gen_noise"])
    ckpt.restore_global_rng(data["rng"], data["state"])
    return step


def validate(t, step: int, final: bool = False) -> list[str]:
    """Sample images of the validation prompt (learnt tokens in place); their paths."""
    if not t.accelerator.is_main_process:
        return []
    cfg = t.cfg
    prompt = cfg.validation_prompt
    if t.pivotal:
        prompt = replace_placeholders(prompt, cfg.tokens_per_abstraction)
    t.comps.vae.to(t.accelerator.device)
    if t.text.offloaded:
        t.text.encoders_to(t.accelerator.device)
    try:
        paths = render_samples(t.family, t.comps, prompt=prompt, num_images=cfg.num_validation_images,
                               steps=cfg.validation_inference_steps, guidance=cfg.validation_guidance_scale,
                               resolution=t.resolution, seed=t.seed, device=t.accelerator.device,
                               out_dir=os.path.join(t.run_dir, "samples"),
                               tag=f"final-step-{step}" if final else f"step-{step}",
                               autocast=t.accelerator.autocast, should_stop=t.stop.is_set)
    except RenderStopped:  # a Stop does not wait for the rest of the sample images
        t.status("samples", f"step {step}: sample images interrupted by Stop")
        return []
    finally:
        if t.text.offloaded:
            t.text.encoders_to("cpu")
    t.log.emit(SampleEvent(step=step, images=paths, prompt=prompt))
    return paths


def run_facts(t, step: int) -> export.RunFacts:
    """What the kohya metadata says about this run beyond its config: the base model's version (from the model
    itself), the data, steps, epochs and precision."""
    comps = t.comps
    return export.RunFacts(
        model_id=t.cfg.pretrained_model_name_or_path,
        version=export.base_version(t.family.name, comps.unet.config, comps.prediction_type),
        resolution=t.resolution, steps=step, epochs=max(1, math.ceil(step / max(1, t.steps_per_epoch))),
        batches_per_epoch=t.sampler.batches_per_epoch(), mixed_precision=str(t.accelerator.mixed_precision),
        started_at=t.started_at, items=t.items, item_buckets=t.item_buckets, class_items=t.class_items)


def finish(t, step: int, stopped: bool) -> dict[str, str]:
    """The last checkpoint (unless stopped: the stop already saved one), the LoRA files, embeddings, samples,
    model card and the Hub upload; emits Finished."""
    cfg, acc = t.cfg, t.accelerator
    agree_finite(t, step)  # all ranks stop with the error, not only rank 0
    acc.wait_for_everyone()
    artifacts: dict[str, str] = {}
    if not acc.is_main_process:
        return artifacts
    if stopped:
        artifacts["checkpoint"] = ckpt.latest_checkpoint(os.path.join(t.run_dir, "checkpoints")) or ""
    else:
        artifacts["checkpoint"] = save(t, step)
    check_finite(t, step)
    t.status("export", "writing the LoRA files")
    unet_sd = peft_state_dict(t.comps.unet)
    te_sds = [peft_state_dict(te) for te in t.comps.text_encoders] if t.te_lora else []
    fam = t.family
    artifacts["diffusers"] = export.save_diffusers_lora(t.run_dir, fam, cfg, unet_sd, te_sds)
    meta = export.kohya_metadata(cfg, run_facts(t, step), unet_sd)
    artifacts["kohya"] = export.save_kohya_lora(t.run_dir, fam, cfg, unet_sd, te_sds, meta, t.comps.unet.config)
    if t.pivotal:
        artifacts["embeddings"] = export.save_embeddings(t.run_dir, cfg, t.pivotal.state_dict(fam.embedding_keys))
    samples = []
    if cfg.validation_prompt and not stopped:
        samples = validate(t, step, final=True)
    deviation = (export.dora_tool_deviation([t.comps.unet] + (t.comps.text_encoders if t.te_lora else []))
                 if cfg.use_dora else None)
    artifacts["model_card"] = export.write_model_card(
        t.run_dir, cfg, fam, model_id=cfg.pretrained_model_name_or_path, steps=step, samples=samples,
        has_embeddings=bool(t.pivotal), dora_deviation=deviation)
    if cfg.push_to_hub and not stopped:
        t.status("push", f"uploading to {cfg.hub_model_id}")
        artifacts["hub"] = export.push_to_hub(t.run_dir, cfg.hub_model_id, cfg.hub_token, cfg.hub_private)
    t.log.emit(Finished(step=step, artifacts=artifacts, stopped=stopped))
    return artifacts
