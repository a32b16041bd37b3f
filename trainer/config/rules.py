"""The rules a configuration must follow (every broken one reported at once) and the legal-but-probably-wrong
settings that deserve a warning."""
from __future__ import annotations

import os
from dataclasses import fields

from ..training.placeholders import contains_placeholder
from .coercion import FieldError
from .enums import Optimizer


def field_errors(cfg) -> list[FieldError]:
    """Every range / consistency problem of ``cfg``, each naming the field, the value and what is accepted."""
    errors: list[FieldError] = []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        m = f.metadata
        if v is None:
            continue
        if m.get("choices") is not None and v not in m["choices"]:
            errors.append(FieldError(f.name, v, f"accepted: {', '.join(str(c) for c in m['choices'] if c)}"))
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if v != v or v in (float("inf"), float("-inf")):
                errors.append(FieldError(f.name, v, "must be a finite number"))
                continue
            lo, hi = m.get("min"), m.get("max")
            if lo is not None and (v < lo or (m.get("min_exclusive") and v == lo)):
                op = ">" if m.get("min_exclusive") else ">="
                errors.append(FieldError(f.name, v, f"must be {op} {lo}" + (f" and <= {hi}" if hi is not None else "")))
            elif hi is not None and v > hi:
                errors.append(FieldError(f.name, v, f"must be <= {hi}"))
    e = errors.append
    if not cfg.pretrained_model_name_or_path or not str(cfg.pretrained_model_name_or_path).strip():
        e(FieldError("pretrained_model_name_or_path", cfg.pretrained_model_name_or_path,
                     "a Hub id, a local folder or tiny-sdxl is required"))
    if not cfg.instance_data_dir and not cfg.dataset_name:
        e(FieldError("instance_data_dir", None, "give --instance_data_dir (a folder of images) or --dataset_name"))
    if cfg.instance_data_dir and cfg.dataset_name:
        e(FieldError("dataset_name", cfg.dataset_name, "give either --dataset_name or --instance_data_dir, not both"))
    if cfg.instance_data_dir and not os.path.isdir(cfg.instance_data_dir):
        e(FieldError("instance_data_dir", cfg.instance_data_dir, "folder does not exist"))
    data = cfg.instance_data_dir or (cfg.dataset_name if cfg.dataset_name and os.path.isdir(cfg.dataset_name) else None)
    if data and cfg.output_dir and _inside(cfg.output_dir, data):
        e(FieldError("output_dir", cfg.output_dir, "is the data folder (or inside it): the run's samples and "
                                                   "checkpoints would be read as training images; give a folder "
                                                   "outside the data"))
    if cfg.resolution is not None and cfg.resolution % 8:
        e(FieldError("resolution", cfg.resolution, "must be a multiple of 8 (e.g. 512, 768, 1024)"))
    if cfg.bucket_step % 8:
        e(FieldError("bucket_step", cfg.bucket_step, "must be a multiple of 8"))
    if cfg.train_text_encoder and cfg.train_text_encoder_ti:
        e(FieldError("train_text_encoder", True,
                     "choose one: --train_text_encoder (text-encoder LoRA) or --train_text_encoder_ti (pivotal)"))
    for a in cfg.abstractions:
        if any(c.isspace() for c in a) or "<" in a or ">" in a:
            e(FieldError("token_abstraction", a, "a placeholder is one word without spaces or <>, e.g. TOK"))
    if cfg.train_text_encoder_ti:
        if not cfg.abstractions:
            e(FieldError("token_abstraction", cfg.token_abstraction, "needs at least one placeholder, e.g. TOK"))
        if cfg.abstractions and not any(contains_placeholder(cfg.instance_prompt, a) for a in cfg.abstractions) \
                and not cfg.caption_column and not cfg.instance_data_dir:
            e(FieldError("instance_prompt", cfg.instance_prompt,
                         f"must contain the placeholder {cfg.abstractions[0]} when pivotal tuning is on"))
    if cfg.with_prior_preservation:
        if not cfg.class_prompt:
            e(FieldError("class_prompt", None, "required with --with_prior_preservation, e.g. 'a photo of a person'"))
        if not cfg.class_data_dir:
            e(FieldError("class_data_dir", None, "required with --with_prior_preservation (a folder; missing "
                                                 "images are generated there)"))
    if cfg.cache_latents and not cfg.center_crop:
        e(FieldError("cache_latents", True, "a cached latent holds one crop: use --center_crop or turn off "
                                            "--cache_latents for random crops"))
    if cfg.latent_cache_dir and os.path.exists(cfg.latent_cache_dir) and not os.path.isdir(cfg.latent_cache_dir):
        e(FieldError("latent_cache_dir", cfg.latent_cache_dir, "is a file; give a folder (it is created if missing)"))
    if cfg.keep_tokens and not cfg.shuffle_tags:
        e(FieldError("keep_tokens", cfg.keep_tokens, "only used with --shuffle_tags true"))
    if cfg.push_to_hub and not cfg.hub_model_id:
        e(FieldError("hub_model_id", None, "required with --push_to_hub, e.g. your-name/my-lora"))
    if cfg.hub_model_id and (cfg.hub_model_id.count("/") > 1 or " " in cfg.hub_model_id):
        e(FieldError("hub_model_id", cfg.hub_model_id, "must look like name or user/name"))
    if cfg.resume_from_checkpoint and cfg.resume_from_checkpoint != "latest" \
            and not os.path.isdir(cfg.resume_from_checkpoint):
        e(FieldError("resume_from_checkpoint", cfg.resume_from_checkpoint,
                     "use 'latest' or an existing checkpoint folder"))
    for name in ("lora_target_modules",):
        if not [t for t in getattr(cfg, name).split(",") if t.strip()]:
            e(FieldError(name, getattr(cfg, name), "needs at least one module name, e.g. to_q,to_k,to_v,to_out.0"))
    try:
        scales = [float(x) for x in cfg.pick_scales.split(",") if x.strip()]
        bad = not scales or any(not 0.0 <= x <= 2.0 for x in scales)
    except ValueError:
        bad = True
    if bad:
        e(FieldError("pick_scales", cfg.pick_scales, "a comma list of LoRA scales from 0 to 2, e.g. 0.6,0.8,1.0,1.2"))
    if cfg.pick_clip_model is not None and not cfg.pick_clip_model.strip():
        e(FieldError("pick_clip_model", cfg.pick_clip_model, "a CLIP model id or folder (e.g. "
                                                             "openai/clip-vit-large-patch14, tiny-clip), or leave it out"))
    if cfg.output_name and (os.sep in cfg.output_name or cfg.output_name.startswith(".")):
        e(FieldError("output_name", cfg.output_name, "a plain file name without folders"))
    return errors


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or below it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def config_warnings(cfg) -> list[str]:
    """Settings of ``cfg`` that are legal but very probably wrong (printed and emitted as notes)."""
    w = []
    opt_ = Optimizer(cfg.optimizer)
    if opt_ == Optimizer.prodigy and cfg.learning_rate < 0.1:
        w.append(f"--optimizer prodigy with --learning_rate {cfg.learning_rate}: Prodigy expects ~1.0 (it "
                 "estimates the step size itself); a small value makes it barely learn.")
    if opt_ == Optimizer.prodigy and not cfg.use_8bit_adam and cfg.text_encoder_lr is not None \
            and cfg.text_encoder_lr != cfg.learning_rate:
        w.append(f"--optimizer prodigy takes one learning rate for every group: --text_encoder_lr "
                 f"{cfg.text_encoder_lr} is ignored and the text parameters use --learning_rate "
                 f"{cfg.learning_rate}, as in diffusers' script (Prodigy adapts the step size itself).")
    if opt_ in (Optimizer.adamw, Optimizer.adamw8bit) and cfg.learning_rate > 0.01:
        w.append(f"--optimizer {opt_.value} with --learning_rate {cfg.learning_rate}: that is Prodigy's value; "
                 "AdamW wants ~1e-4 (text: 3e-4 pivotal, 5e-5 full text encoder).")
    if opt_ in (Optimizer.adamw, Optimizer.adamw8bit) and cfg.text_encoder_lr is not None \
            and cfg.text_encoder_lr > 0.01:
        w.append(f"--optimizer {opt_.value} with --text_encoder_lr {cfg.text_encoder_lr}: AdamW wants ~3e-4.")
    if cfg.rank >= 64:
        w.append(f"--rank {cfg.rank}: rank 64+ tends to over-smooth faces; 32 is the tested default.")
    return w
