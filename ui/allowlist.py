"""What a visitor of the app may set: the one allowlist, used by the form and by every API endpoint.

A public Space serves strangers, so the app splits the ``TrainConfig`` fields in three:

* :data:`VISITOR_FIELDS`: the training knobs a visitor may change (steps, rank, learning rates, resolution,
  fractions, repeats, prior on/off, ...). Train → Advanced shows exactly these, ``/start_training`` takes exactly
  these as parameters, and :func:`check_request` refuses any other name.
* :data:`APP_FIELDS`: filled by the app for each run from the controls above the form (base model, trigger,
  concept) or from the session's workspace (dataset folder, run folder, resume); a visitor never types them.
* :data:`OPERATOR_FIELDS`: everything else (server paths, Hub push and token, trackers, caches, separate VAEs,
  Hub revisions, Hub datasets). They keep their defaults in the app (a run never pushes, never reports to a
  tracker, never reads or writes outside its own folder); only the operator changes the app, through its flags
  and environment (see :class:`Policy`). A new ``TrainConfig`` field is operator-only until it is listed here.

The base model is a choice from the operator's list (:attr:`Policy.base_models`: Hub ids and the built-in demo
models); the captioning model likewise (:attr:`Policy.caption_models`). The server's own credentials are never
used for a visitor's action: runs never push, and Publish uses only the token the visitor typed.

Use from another module (e.g. a short form)::

    from ui.allowlist import VISITOR_FIELDS, VisitorError, check_request
    check_request({"max_train_steps": 500, "pretrained_model_name_or_path": "tiny-sdxl"}, policy)  # or raises
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable, Mapping, Optional

from trainer import TrainConfig

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SD15_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_BASE_MODELS = (SDXL_BASE, SD15_BASE, "tiny-sdxl", "tiny-sd")
DEFAULT_CAPTION_MODELS = ("Salesforce/blip-image-captioning-large", "tiny-blip")

# The training knobs a visitor may set (Train → Advanced and the /start_training parameters), in form order.
VISITOR_FIELDS: tuple[str, ...] = (
    # model
    "variant", "model_family",
    # data
    "instance_prompt", "repeats", "resolution", "center_crop", "random_flip", "aspect_buckets", "bucket_step",
    "caption_dropout", "shuffle_tags", "keep_tokens", "cache_latents", "cache_text_embeddings",
    "image_interpolation_mode",
    # prior preservation (class images are generated in the run's class_images/ folder)
    "with_prior_preservation", "class_prompt", "num_class_images", "prior_loss_weight", "sample_batch_size",
    # pivotal tuning / text
    "train_text_encoder_ti", "train_text_encoder_ti_frac", "num_new_tokens_per_abstraction", "pull_back_token_norm",
    "train_text_encoder",
    "train_text_encoder_frac", "text_encoder_lr", "adam_weight_decay_text_encoder",
    # LoRA
    "rank", "lora_alpha", "lora_dropout", "use_dora", "lora_target_modules",
    # optimizer
    "optimizer", "learning_rate", "scale_lr", "use_8bit_adam", "adam_beta1", "adam_beta2", "adam_epsilon",
    "adam_weight_decay", "prodigy_beta3", "prodigy_decouple", "prodigy_use_bias_correction",
    "prodigy_safeguard_warmup", "prodigy_d_coef", "max_grad_norm", "lr_scheduler", "lr_warmup_steps",
    "lr_num_cycles", "lr_power", "snr_gamma", "noise_offset",
    # schedule & precision
    "train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_train_steps", "steps_per_image",
    "gradient_checkpointing", "seed", "mixed_precision", "allow_tf32", "compile_unet", "auto_fit", "log_every",
    # checkpoints and samples (inside the run folder)
    "save_precision", "checkpointing_steps", "checkpoints_total_limit", "validation_prompt",
    "num_validation_images", "validation_steps", "validation_inference_steps", "validation_guidance_scale",
)

# Filled by the app for each run (controls above the form, the session's own folders); never a visitor input.
# class_data_dir is the run's own class_images/ folder when prior preservation is on.
APP_FIELDS: tuple[str, ...] = ("pretrained_model_name_or_path", "token_abstraction", "concept", "preset",
                               "instance_data_dir", "output_dir", "resume_from_checkpoint", "class_data_dir")

# Everything else: server paths, Hub push/token, trackers, caches, separate VAEs, revisions, Hub datasets.
OPERATOR_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(TrainConfig)
                                         if f.name not in VISITOR_FIELDS and f.name not in APP_FIELDS)


@dataclass(frozen=True)
class Policy:
    """The operator's choices for visitors (app flags): offered models and per-visitor limits."""

    base_models: tuple[str, ...] = DEFAULT_BASE_MODELS
    caption_models: tuple[str, ...] = DEFAULT_CAPTION_MODELS
    max_train_steps: int = 5000  # optimizer steps of one run, however they are asked for
    max_resolution: int = 1024
    max_sessions: int = 200  # workspaces seen within the idle time (older ones do not count)
    max_runs_per_session: int = 1  # queued + running runs of one session
    max_upload_mb: float = 200.0  # one upload request (all its files together); larger ones are refused unread
    max_upload_files: int = 300  # files in one upload
    max_dataset_images: int = 300  # images one session's dataset may hold

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    def default_base_model(self, cuda: bool) -> str:
        """SDXL on a GPU, the tiny demo model without one, when offered; else the list's first."""
        for wanted in ((SDXL_BASE, "tiny-sdxl") if cuda else ("tiny-sdxl", "tiny-sd")):
            if wanted in self.base_models:
                return wanted
        return self.base_models[0]


class VisitorError(ValueError):
    """A visitor's request that asks for something only the operator may set, or more than the limits."""


def _listed(items: Iterable[str]) -> str:
    return ", ".join(f"`{i}`" for i in items)


def _check_offered(name: Optional[str], offered: tuple[str, ...], what: str) -> str:
    """The stripped model id when it is in ``offered`` (an operator's list); else :class:`VisitorError`."""
    value = (name or "").strip()
    if value not in offered:
        raise VisitorError(f"The {what} `{value}` is not offered by this app. Pick one of: {_listed(offered)}.")
    return value


def check_base_model(name: Optional[str], policy: Policy) -> str:
    """The stripped base model id when it is on the operator's list; else :class:`VisitorError`."""
    return _check_offered(name, policy.base_models, "base model")


def check_caption_model(name: Optional[str], policy: Policy) -> str:
    """The stripped captioning model id when it is on the operator's list; else :class:`VisitorError`."""
    return _check_offered(name, policy.caption_models, "captioning model")


def check_request(values: Mapping, policy: Policy) -> None:
    """Refuses (:class:`VisitorError`, every problem in one message) a visitor's training request that names a
    field outside :data:`VISITOR_FIELDS` (the base model aside, which must be on the operator's list) or asks
    for more steps or a higher resolution than the limits. Values are those of the form (before validation)."""
    problems = []
    foreign = [k for k in values if k not in VISITOR_FIELDS and k != "pretrained_model_name_or_path"]
    operator = [k for k in foreign if k in OPERATOR_FIELDS or k in APP_FIELDS]
    unknown = [k for k in foreign if k not in operator]
    if operator:
        problems.append(f"{_listed(operator)} can only be set by the operator of this app (its flags and "
                        "environment), not in a request: leave them out.")
    if unknown:
        problems.append(f"{_listed(unknown)} are not training settings: leave them out.")
    if "pretrained_model_name_or_path" in values:
        try:
            check_base_model(values["pretrained_model_name_or_path"], policy)
        except VisitorError as e:
            problems.append(str(e))
    steps = values.get("max_train_steps")
    if isinstance(steps, (int, float)) and not isinstance(steps, bool) and steps > policy.max_train_steps:
        problems.append(f"`max_train_steps` = {steps} is above this app's limit of {policy.max_train_steps}: "
                        "ask for fewer steps.")
    res = values.get("resolution")
    if isinstance(res, (int, float)) and not isinstance(res, bool) and res > policy.max_resolution:
        problems.append(f"`resolution` = {res} is above this app's limit of {policy.max_resolution} pixels: "
                        "use a smaller one.")
    if problems:
        raise VisitorError(" ".join(problems))


def planned_steps(cfg: TrainConfig, num_images: int) -> int:
    """The optimizer steps a run of ``cfg`` on ``num_images`` images trains (max_train_steps, steps_per_image or
    epochs), counted with one item per batch slot: what the limit checks and the Train tab announces."""
    from trainer.data.sampler import compute_total_steps

    items = max(1, num_images) * cfg.repeats
    batches = -(-items // cfg.train_batch_size)
    return compute_total_steps(cfg, items, batches)[0]


def check_total_steps(cfg: TrainConfig, num_images: int, policy: Policy) -> None:
    """Refuses a run whose steps (however asked for: max_train_steps, steps_per_image or epochs) exceed the
    limit; counted with one item per batch slot, an upper bound of what the trainer will run."""
    total = planned_steps(cfg, num_images)
    if total > policy.max_train_steps:
        raise VisitorError(f"These settings train {total} steps on {num_images} image(s), above this app's limit "
                           f"of {policy.max_train_steps}: lower `max_train_steps`, `steps_per_image` or "
                           "`num_train_epochs`.")
    if cfg.resolution is not None and cfg.resolution > policy.max_resolution:
        raise VisitorError(f"`resolution` = {cfg.resolution} is above this app's limit of "
                           f"{policy.max_resolution} pixels: use a smaller one.")
