"""The metadata of ``<name>.safetensors``, as kohya's sd-scripts writes it (``train_network.py``) and as
AUTOMATIC1111 / Forge read it:

- every value is a string (sd-scripts ends with ``{k: str(v)}``: booleans ``"True"``/``"False"``, unset values
  ``"None"``); nested values are JSON (A1111 decodes those that start with ``{``);
- ``ss_base_model_version`` / ``ss_v2`` come from the model itself (A1111 sorts the LoRA into its SD1 / SD2 / SDXL
  tab by them; Forge also by ``modelspec.architecture``); ``ss_v_parameterization`` says v-prediction;
- the ModelSpec keys sd-scripts writes (``modelspec.sai_model_spec`` 1.0.1, ``architecture``, ``implementation``,
  ``title``, ``resolution``, ``date``, ``prediction_type``, ``trigger_phrase``, ``description``);
- the dataset as sd-scripts describes one: ``ss_datasets`` (a JSON list), ``ss_tag_frequency``,
  ``ss_dataset_dirs``, ``ss_bucket_info``.
"""
from __future__ import annotations

import datetime
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from .triggers import diffusers_trigger, trigger_comment

MODELSPEC_VERSION = "1.0.1"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"


@dataclass(frozen=True)
class BaseVersion:
    """Which Stable Diffusion a LoRA is for, in the spellings kohya, A1111 and ModelSpec use."""
    sdxl: bool
    v2: bool
    v_parameterization: bool

    @property
    def kohya(self) -> str:
        """``ss_base_model_version``: sd-scripts' ``sdxl_base_v1-0``, ``sd_v1``, ``sd_v2``, ``sd_v2_v``."""
        if self.sdxl:
            return "sdxl_base_v1-0"
        return "sd" + ("_v2" if self.v2 else "_v1") + ("_v" if self.v_parameterization else "")

    @property
    def architecture(self) -> str:
        """``modelspec.architecture`` of a LoRA (sd-scripts' ``determine_architecture``)."""
        if self.sdxl:
            arch = "stable-diffusion-xl-v1-base"
        elif self.v2:
            arch = "stable-diffusion-v2-768-v" if self.v_parameterization else "stable-diffusion-v2-512"
        else:
            arch = "stable-diffusion-v1"
        return arch + "/lora"

    @property
    def implementation(self) -> str:
        """``modelspec.implementation``: sd-scripts names its SDXL LoRA's layout after Stability's repo."""
        return IMPL_STABILITY_AI if self.sdxl else "diffusers"


def base_version(family_name: str, unet_config, prediction_type: str) -> BaseVersion:
    """From the model, not its name: SD 2.x has the 1024-wide OpenCLIP-H text encoder as cross-attention input
    and linear attention projections (SD 1.x: 768 and 1x1 convs); v-prediction from the noise scheduler."""
    v = prediction_type == "v_prediction"
    if family_name == "sdxl":
        return BaseVersion(sdxl=True, v2=False, v_parameterization=v)
    cross = unet_config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    v2 = int(cross) == 1024 or bool(getattr(unet_config, "use_linear_projection", False))
    return BaseVersion(sdxl=False, v2=v2, v_parameterization=v)


@dataclass
class RunFacts:
    """What the metadata says about a finished run that the config alone does not know."""
    model_id: str
    version: BaseVersion
    resolution: int
    steps: int
    epochs: int
    batches_per_epoch: int
    mixed_precision: str
    started_at: float
    items: list                              # TrainItem: .caption, .size (w, h)
    item_buckets: list                       # (w, h) bucket of each item
    class_items: list = field(default_factory=list)
    finished_at: float = field(default_factory=time.time)


def _dir_name(cfg) -> str:
    src = cfg.instance_data_dir or cfg.dataset_name or "dataset"
    return os.path.basename(os.path.normpath(src)) or "dataset"


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """sd-scripts' ``set_tag_frequency``: comma-separated tags, stripped and lower-cased, counted."""
    return dict(Counter(t.strip().lower() for c in captions for t in c.split(",") if t.strip()))


def bucket_info(facts: RunFacts, repeats: int) -> dict:
    """``{"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": x}`` (counts with repeats)."""
    counts = Counter(tuple(b) for b in facts.item_buckets)
    buckets = {i: {"resolution": list(b), "count": n * repeats} for i, (b, n) in enumerate(sorted(counts.items()))}
    errors = [abs(b[0] / b[1] - it.size[0] / it.size[1]) for it, b in zip(facts.items, facts.item_buckets)]
    return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}


def datasets_entry(cfg, facts: RunFacts) -> list[dict]:
    """``ss_datasets``: one DreamBooth dataset with its image subset (and the class images as a reg subset)."""
    sides = [s for b in facts.item_buckets for s in b] or [facts.resolution]
    common = {"color_aug": False, "flip_aug": bool(cfg.random_flip), "random_crop": not cfg.center_crop,
              "shuffle_caption": bool(cfg.shuffle_tags), "keep_tokens": cfg.keep_tokens,
              "keep_tokens_separator": "", "secondary_separator": None, "enable_wildcard": False,
              "caption_prefix": None, "caption_suffix": None, "resize_interpolation": cfg.image_interpolation_mode}
    subsets = [{"img_count": len(facts.items), "num_repeats": cfg.repeats, **common, "image_dir": _dir_name(cfg),
                "class_tokens": " ".join(cfg.abstractions) or None, "is_reg": False}]
    if facts.class_items:
        subsets.append({"img_count": len(facts.class_items), "num_repeats": 1, **common,
                        "image_dir": os.path.basename(os.path.normpath(cfg.class_data_dir or "class")),
                        "class_tokens": cfg.class_prompt, "is_reg": True})
    return [{"is_dreambooth": True, "batch_size_per_device": cfg.train_batch_size,
             "num_train_images": len(facts.items) * cfg.repeats, "num_reg_images": len(facts.class_items),
             "resolution": [facts.resolution, facts.resolution], "enable_bucket": bool(cfg.aspect_buckets),
             "min_bucket_reso": min(sides), "max_bucket_reso": max(sides),
             "tag_frequency": {_dir_name(cfg): tag_frequency([it.caption for it in facts.items])},
             "bucket_info": bucket_info(facts, cfg.repeats), "resize_interpolation": cfg.image_interpolation_mode,
             "subsets": subsets}]


def network_args(cfg, unet_sd: dict) -> Optional[dict[str, str]]:
    """``ss_network_args`` as sd-scripts writes ``--network_args`` (string values), or None when a plain
    ``networks.lora`` needs none: ``conv_dim``/``conv_alpha`` when 3x3 convs carry LoRA, and LyCORIS' DoRA
    switches (``algo=lora``, ``dora_wd``) for DoRA files."""
    args: dict[str, str] = {}
    if cfg.use_dora:
        args.update({"algo": "lora", "dora_wd": "True", "wd_on_output": "True"})
    if any(k.endswith("lora_A.weight") and v.dim() == 4 and v.shape[-1] > 1 for k, v in unet_sd.items()):
        args.update({"conv_dim": str(cfg.rank), "conv_alpha": str(cfg.effective_alpha)})
    return args or None


def _name(model_id: Optional[str]) -> Optional[str]:
    """sd-scripts writes the basename of a local model path, a Hub id as it is."""
    if model_id and os.path.exists(model_id):
        return os.path.basename(os.path.normpath(model_id))
    return model_id


def kohya_metadata(cfg, facts: RunFacts, unet_sd: dict) -> dict[str, str]:
    """The ``ss_*`` and ``modelspec.*`` metadata of the kohya file (all values strings)."""
    ver = facts.version
    captions = [it.caption for it in facts.items]
    dirs = {_dir_name(cfg): {"n_repeats": cfg.repeats, "img_count": len(facts.items)}}
    reg_dirs = ({os.path.basename(os.path.normpath(cfg.class_data_dir or "class")):
                 {"n_repeats": 1, "img_count": len(facts.class_items)}} if facts.class_items else {})
    meta = {
        "ss_session_id": random.randint(0, 2 ** 32),
        "ss_training_started_at": facts.started_at,
        "ss_training_finished_at": facts.finished_at,
        "ss_output_name": cfg.run_name,
        "ss_learning_rate": cfg.learning_rate,
        "ss_text_encoder_lr": cfg.effective_text_lr,
        "ss_unet_lr": cfg.learning_rate,
        "ss_num_train_images": len(facts.items) * cfg.repeats,
        "ss_num_reg_images": len(facts.class_items),
        "ss_num_batches_per_epoch": facts.batches_per_epoch,
        "ss_num_epochs": facts.epochs,
        "ss_epoch": facts.epochs,
        "ss_steps": facts.steps,
        "ss_max_train_steps": facts.steps,
        "ss_gradient_checkpointing": bool(cfg.gradient_checkpointing),
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_lr_scheduler": cfg.lr_scheduler.value,
        "ss_optimizer": cfg.optimizer.value,
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_network_module": "lycoris.kohya" if cfg.use_dora else "networks.lora",
        "ss_network_dim": cfg.rank,
        "ss_network_alpha": cfg.effective_alpha,
        "ss_network_dropout": cfg.lora_dropout,
        "ss_mixed_precision": facts.mixed_precision,
        "ss_full_fp16": False,
        "ss_v2": ver.v2,
        "ss_v_parameterization": ver.v_parameterization,
        "ss_base_model_version": ver.kohya,
        "ss_clip_skip": None,  # the last layer (SD) / the penultimate one (SDXL), sd-scripts' defaults
        "ss_max_token_length": None,
        "ss_cache_latents": bool(cfg.cache_latents),
        "ss_seed": cfg.seed,
        "ss_noise_offset": cfg.noise_offset,
        "ss_min_snr_gamma": cfg.snr_gamma,
        "ss_caption_dropout_rate": cfg.caption_dropout,
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_training_comment": trigger_comment(cfg),
        "ss_sd_model_name": _name(facts.model_id),
        "ss_resolution": (facts.resolution, facts.resolution),
        "ss_batch_size_per_device": cfg.train_batch_size,
        "ss_datasets": json.dumps(datasets_entry(cfg, facts)),
        "ss_tag_frequency": json.dumps({_dir_name(cfg): tag_frequency(captions)}),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_bucket_info": json.dumps(bucket_info(facts, cfg.repeats)),
    }
    if cfg.pretrained_vae_model_name_or_path:
        meta["ss_vae_name"] = _name(cfg.pretrained_vae_model_name_or_path)
    args = network_args(cfg, unet_sd)
    if args:
        meta["ss_network_args"] = json.dumps(args)
    meta = {k: str(v) for k, v in meta.items()}
    meta.update(modelspec(cfg, facts))
    return meta


def modelspec(cfg, facts: RunFacts) -> dict[str, str]:
    """The ModelSpec keys sd-scripts writes for a LoRA (``sai_model_spec.build_metadata``)."""
    ver = facts.version
    what = "DoRA" if cfg.use_dora else "LoRA"
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": ver.architecture,
        "modelspec.implementation": ver.implementation,
        "modelspec.title": cfg.run_name,
        "modelspec.resolution": f"{facts.resolution}x{facts.resolution}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(facts.finished_at)).isoformat(),
        "modelspec.prediction_type": "v" if ver.v_parameterization else "epsilon",
        "modelspec.trigger_phrase": diffusers_trigger(cfg),
        "modelspec.description": (f"DreamBooth {what} (rank {cfg.rank}, alpha {cfg.effective_alpha:g}) for "
                                  f"{facts.model_id}, {facts.steps} steps. {trigger_comment(cfg)}"),
    }
