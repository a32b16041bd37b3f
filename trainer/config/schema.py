"""The typed, validated training configuration.

``TrainConfig`` holds every option. Field names are those of diffusers' ``train_dreambooth_lora_sdxl_advanced.py``
so an existing command line works unchanged (``trainer/cli.py`` turns these fields into flags). Values come, in
increasing priority, from: the dataclass defaults < a preset (``presets/<name>.yaml``) < a config file (YAML/JSON)
< explicit flags / keyword overrides. ``validate()`` reports *every* bad field at once, each naming the field,
the value and what is accepted, and nothing starts while any is left.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from ..training.placeholders import new_tokens, split_abstractions
from .coercion import ConfigError, FieldError, coerce_value
from .enums import LRScheduler, MixedPrecision, ModelFamilyName, Optimizer, ReportTo, SavePrecision
from .files import load_config_file, load_preset
from .rules import config_warnings, field_errors


def opt(default, help: str, *, choices=None, min=None, max=None, min_exclusive=False, group="general", cli=True):
    """A dataclass field carrying its help text and its accepted range (used by the CLI and by validate())."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive,
            "group": group, "cli": cli}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)

@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------------------
    pretrained_model_name_or_path: str = opt(
        "stabilityai/stable-diffusion-xl-base-1.0",
        "Base model: a Hub id, a local diffusers folder, or a tiny offline model (tiny-sdxl, tiny-sd, tiny-sd2-v).",
        group="model")
    pretrained_vae_model_name_or_path: Optional[str] = opt(
        None, "Separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix, which is safe in half precision).", group="model")
    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) of the base model.", group="model")
    variant: Optional[str] = opt(None, "Weight variant of the base model files, e.g. fp16.", group="model")
    model_family: ModelFamilyName = opt(ModelFamilyName.auto, "Model family; auto detects it from the model folder.",
                                        group="model")
    cache_dir: Optional[str] = opt(None, "Where downloaded models and datasets are cached.", group="model")

    # --- data --------------------------------------------------------------------------------------------
    dataset_name: Optional[str] = opt(
        None, "Hub dataset name, or a local ImageFolder (images + metadata.jsonl).", group="data")
    dataset_config_name: Optional[str] = opt(None, "Config name of the Hub dataset.", group="data")
    instance_data_dir: Optional[str] = opt(
        None, "Folder of images; a .txt file next to an image is its caption.", group="data")
    image_column: str = opt("image", "Image column of the dataset (file_name for an ImageFolder).", group="data")
    caption_column: Optional[str] = opt(None, "Caption column of the dataset; none means --instance_prompt.",
                                        group="data")
    instance_prompt: str = opt("a photo of TOK", "Prompt used for images without their own caption.", group="data")
    repeats: int = opt(1, "How many times each image is repeated (before shuffling).", min=1, max=1000, group="data")
    resolution: Optional[int] = opt(
        None, "Training resolution in pixels; default by family (SDXL 1024, SD 2.x-v 768, SD 512).",
        min=64, max=4096, group="data")
    center_crop: bool = opt(True, "Crop to the bucket from the centre (false: a random crop).", group="data")
    random_flip: bool = opt(False, "Flip images horizontally at random.", group="data")
    aspect_buckets: bool = opt(True, "Group images in aspect-ratio buckets instead of square crops.", group="data")
    bucket_step: int = opt(64, "Bucket sides are multiples of this many pixels.", min=8, max=512, group="data")
    caption_dropout: float = opt(0.0, "Probability of training on an empty caption.", min=0.0, max=1.0, group="data")
    shuffle_tags: bool = opt(False, "Shuffle comma-separated tags of each caption.", group="data")
    keep_tokens: int = opt(0, "Number of leading tags kept in place when shuffling.", min=0, max=100, group="data")
    cache_latents: bool = opt(True, "Encode each image (and flip) once and keep the latents.", group="data")
    latent_cache_dir: Optional[str] = opt(
        None, "Folder of the on-disk latent cache, keyed by image content, bucket, flip and VAE (a second run on "
        "the same images skips the VAE); default: .latent_cache inside the dataset folder.", group="data")
    cache_text_embeddings: bool = opt(
        True, "Cache prompt embeddings once no text parameter trains (after the pivot).", group="data")
    image_interpolation_mode: str = opt("lanczos", "Resize filter.",
                                        choices=["lanczos", "bicubic", "bilinear", "nearest"], group="data")

    # --- prior preservation ------------------------------------------------------------------------------
    with_prior_preservation: bool = opt(False, "Add the prior-preservation loss on class images.", group="prior")
    class_data_dir: Optional[str] = opt(None, "Folder of class images (missing ones are generated).", group="prior")
    class_prompt: Optional[str] = opt(None, "Prompt of the class images, e.g. 'a photo of a person'.", group="prior")
    num_class_images: int = opt(100, "Minimum number of class images.", min=1, max=100000, group="prior")
    prior_loss_weight: float = opt(1.0, "Weight of the prior loss.", min=0.0, max=100.0, group="prior")
    sample_batch_size: int = opt(4, "Batch size when generating class images.", min=1, max=64, group="prior")

    # --- pivotal tuning / text ---------------------------------------------------------------------------
    train_text_encoder_ti: bool = opt(False, "Pivotal tuning: learn new token embeddings for the trigger.",
                                      group="text")
    train_text_encoder_ti_frac: float = opt(0.5, "Fraction of the steps during which the tokens train.",
                                            min=0.0, max=1.0, min_exclusive=True, group="text")
    token_abstraction: str = opt("TOK", "Placeholder(s) in prompts replaced by the new tokens (comma list).",
                                 group="text")
    num_new_tokens_per_abstraction: int = opt(2, "New tokens per placeholder.", min=1, max=16, group="text")
    pull_back_token_norm: bool = opt(False, "Each step, rescale the new token rows by (vocabulary std / their std)"
                                     "^0.1, as diffusers' advanced script does (off: the rows are free).",
                                     group="text")
    train_text_encoder: bool = opt(False, "Train LoRA adapters on the text encoder(s) instead.", group="text")
    train_text_encoder_frac: float = opt(1.0, "Fraction of the steps during which the text-encoder LoRA trains.",
                                         min=0.0, max=1.0, min_exclusive=True, group="text")
    text_encoder_lr: Optional[float] = opt(None, "Learning rate of text parameters (default: --learning_rate; "
                                           "Prodigy uses --learning_rate for every group, as diffusers does).",
                                           min=0.0, max=10.0, min_exclusive=True, group="text")
    adam_weight_decay_text_encoder: Optional[float] = opt(
        None, "Weight decay of text parameters (default: --adam_weight_decay).", min=0.0, max=1.0, group="text")

    # --- LoRA --------------------------------------------------------------------------------------------
    rank: int = opt(32, "LoRA rank.", min=1, max=1024, group="lora")
    lora_alpha: Optional[float] = opt(None, "LoRA alpha (default: the rank).", min=0.0, max=4096.0,
                                      min_exclusive=True, group="lora")
    lora_dropout: float = opt(0.0, "LoRA dropout.", min=0.0, max=0.9, group="lora")
    use_dora: bool = opt(False, "Weight-decomposed LoRA (DoRA).", group="lora")
    lora_target_modules: str = opt("to_k,to_q,to_v,to_out.0", "UNet modules that get adapters (comma list).",
                                   group="lora")

    # --- optimisation ------------------------------------------------------------------------------------
    optimizer: Optimizer = opt(Optimizer.adamw, "Optimizer.", group="optim")
    learning_rate: float = opt(1e-4, "UNet learning rate (Prodigy: 1.0).", min=0.0, max=10.0, min_exclusive=True,
                               group="optim")
    scale_lr: bool = opt(False, "Multiply the lr by batch size x accumulation x processes.", group="optim")
    use_8bit_adam: bool = opt(False, "Same as --optimizer adamw8bit.", group="optim")
    adam_beta1: float = opt(0.9, "Adam/Prodigy beta1.", min=0.0, max=1.0, group="optim")
    adam_beta2: float = opt(0.999, "Adam/Prodigy beta2.", min=0.0, max=1.0, group="optim")
    adam_epsilon: float = opt(1e-8, "Adam epsilon.", min=0.0, max=1.0, min_exclusive=True, group="optim")
    adam_weight_decay: float = opt(1e-4, "Weight decay of UNet parameters.", min=0.0, max=1.0, group="optim")
    prodigy_beta3: Optional[float] = opt(None, "Prodigy beta3 (default: sqrt(beta2)).", min=0.0, max=1.0,
                                         group="optim")
    prodigy_decouple: bool = opt(True, "Prodigy: AdamW-style decoupled weight decay.", group="optim")
    prodigy_use_bias_correction: bool = opt(True, "Prodigy: Adam bias correction.", group="optim")
    prodigy_safeguard_warmup: bool = opt(True, "Prodigy: safeguard warm-up.", group="optim")
    prodigy_d_coef: float = opt(1.0, "Prodigy: coefficient of the d estimate.", min=0.0, max=100.0,
                                min_exclusive=True, group="optim")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 turns it off).", min=0.0, max=1e6, group="optim")
    lr_scheduler: LRScheduler = opt(LRScheduler.constant, "Learning-rate schedule.", group="optim")
    lr_warmup_steps: int = opt(0, "Warm-up steps.", min=0, max=10**7, group="optim")
    lr_num_cycles: int = opt(1, "Cycles of cosine_with_restarts.", min=1, max=1000, group="optim")
    lr_power: float = opt(1.0, "Power of the polynomial schedule.", min=0.0, max=100.0, group="optim")
    snr_gamma: Optional[float] = opt(None, "Min-SNR weighting gamma (5.0 is the recommended value).", min=0.0,
                                     max=100.0, min_exclusive=True, group="optim")
    noise_offset: float = opt(0.0, "Noise offset.", min=0.0, max=1.0, group="optim")

    # --- schedule ----------------------------------------------------------------------------------------
    train_batch_size: int = opt(1, "Images per step and process.", min=1, max=256, group="schedule")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.", min=1, max=1024,
                                           group="schedule")
    num_train_epochs: int = opt(1, "Epochs (used when --max_train_steps is not given).", min=1, max=100000,
                                group="schedule")
    max_train_steps: Optional[int] = opt(None, "Optimizer steps; overrides --num_train_epochs.", min=1,
                                         max=10**7, group="schedule")
    steps_per_image: Optional[int] = opt(
        None, "Preset rule: steps = this x number of images (when --max_train_steps is not given).",
        min=1, max=100000, group="schedule")
    gradient_checkpointing: bool = opt(False, "Recompute activations to save memory.", group="schedule")
    seed: Optional[int] = opt(42, "Random seed (training is reproducible on CPU with a seed).", min=0,
                              max=2**32 - 1, group="schedule")
    mixed_precision: Optional[MixedPrecision] = opt(None, "Mixed precision (default: bf16 on GPU, no on CPU).",
                                                    group="schedule")
    allow_tf32: bool = opt(False, "Allow TF32 matmuls on Ampere+ GPUs.", group="schedule")
    compile_unet: bool = opt(False, "torch.compile the UNet.", group="schedule")
    auto_fit: bool = opt(False, "Measure a few steps first and adjust settings that would not fit in memory.",
                         group="schedule")
    log_every: int = opt(1, "Read the loss back from the device every N steps.", min=1, max=10000,
                         group="schedule")

    # --- output, checkpoints, validation ------------------------------------------------------------------
    output_dir: str = opt("outputs/lora", "Run folder: config, events, checkpoints, samples, artifacts.",
                          group="output")
    output_name: Optional[str] = opt(None, "File name of the kohya/embedding artifacts (default: run folder name).",
                                     group="output")
    save_precision: SavePrecision = opt(
        SavePrecision.fp16, "dtype of the LoRA files and embeddings: fp16 (half the size of fp32, what A1111, "
        "ComfyUI and kohya users expect), bf16 or fp32. Checkpoints always stay fp32.", group="output")
    checkpointing_steps: int = opt(500, "Save a resumable checkpoint every N steps.", min=1, max=10**7,
                                   group="output")
    checkpoints_total_limit: Optional[int] = opt(None, "Keep at most this many checkpoints.", min=1, max=10000,
                                                 group="output")
    resume_from_checkpoint: Optional[str] = opt(None, "'latest' or a checkpoint folder.", group="output")
    validation_prompt: Optional[str] = opt(None, "Prompt for sample images (TOK is replaced).", group="output")
    num_validation_images: int = opt(4, "Sample images per validation.", min=1, max=64, group="output")
    validation_steps: int = opt(100, "Render samples every N steps.", min=1, max=10**7, group="output")
    validation_inference_steps: int = opt(25, "Denoising steps of sample images.", min=1, max=1000,
                                          group="output")
    validation_guidance_scale: float = opt(5.0, "Guidance scale of sample images.", min=0.0, max=50.0,
                                           group="output")
    validation_loss_images: int = opt(
        0, "Hold out this many dataset images (the last ones in file order) from training and report a validation "
        "loss on them, at fixed noise and timesteps, every --validation_loss_every steps (0: off).",
        min=0, max=1000, group="output")
    validation_loss_every: int = opt(50, "Compute the validation loss every N steps (and at the first and last).",
                                     min=1, max=10**7, group="output")
    pick_best: bool = opt(
        False, "After training, sweep every kept checkpoint x LoRA scales x prompts, score the images with CLIP "
        "and recommend a checkpoint and scale (pick.json + a grid in the run folder; later: python -m trainer pick RUN).",
        group="output")
    pick_scales: str = opt("0.6,0.8,1.0,1.2", "LoRA scales of the --pick_best sweep (comma list).", group="output")
    pick_seeds: int = opt(2, "Fixed seeds (0..N-1) per prompt in the --pick_best sweep.", min=1, max=16,
                          group="output")
    pick_clip_model: Optional[str] = opt(
        None, "CLIP model that scores the sweep (default openai/clip-vit-large-patch14; tiny-clip for the tiny "
        "models).", group="output")
    report_to: ReportTo = opt(ReportTo.none, "Experiment tracker.", group="output")
    logging_dir: str = opt("logs", "Tracker log folder, inside the run folder.", group="output")
    push_to_hub: bool = opt(False, "Upload the artifacts to the Hub when done.", group="output")
    hub_model_id: Optional[str] = opt(None, "Hub repo, e.g. user/my-lora.", group="output")
    hub_token: Optional[str] = opt(None, "Hub token (used for the upload only; never saved).", group="output")
    hub_private: bool = opt(False, "Create the Hub repo private.", group="output")

    # --- bookkeeping (not flags) ---------------------------------------------------------------------------
    preset: Optional[str] = opt(None, "Preset the defaults came from (face, style, object, custom).",
                                group="general")
    concept: Optional[str] = opt(None, "Concept type (face, style, object...); informational.", group="general",
                                 cli=False)

    # --------------------------------------------------------------------------------------------------------
    @property
    def tokens_per_abstraction(self) -> dict[str, list[str]]:
        """``{"TOK": ["<s0>", "<s1>"], ...}``: the new tokens that replace each placeholder."""
        return new_tokens(self.token_abstraction, self.num_new_tokens_per_abstraction)

    @property
    def abstractions(self) -> list[str]:
        return split_abstractions(self.token_abstraction)

    @property
    def run_name(self) -> str:
        return self.output_name or os.path.basename(os.path.normpath(self.output_dir)) or "lora"

    @property
    def effective_text_lr(self) -> float:
        """The text groups' lr: --text_encoder_lr, else --learning_rate. Prodigy takes one lr for every group
        (prodigyopt refuses groups with another non-zero lr at its first step), so with Prodigy it is
        --learning_rate, as in diffusers' script; config_warnings() says so when the two differ."""
        prodigy = Optimizer(self.optimizer) == Optimizer.prodigy and not self.use_8bit_adam
        if self.text_encoder_lr is None or prodigy:
            return self.learning_rate
        return self.text_encoder_lr

    @property
    def pick_scale_values(self) -> tuple[float, ...]:
        """``pick_scales`` as numbers (validate() has checked them)."""
        return tuple(float(x) for x in self.pick_scales.split(",") if x.strip())

    @property
    def effective_alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else float(self.rank)

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        d = {}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = v.value if isinstance(v, Enum) else v
        if redact:
            d["hub_token"] = None  # secrets are never written anywhere
        return d

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **{k: coerce_field(k, v) for k, v in changes.items()})

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(redact=True), f, indent=2, sort_keys=True)
        os.replace(tmp, path)

    # ----- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_sources(cls, preset: Optional[str] = None, config_file: Optional[str] = None,
                     **overrides) -> "TrainConfig":
        """defaults < preset < config file < overrides; then validated."""
        values: dict[str, Any] = {}
        file_values = load_config_file(config_file) if config_file else {}
        # the explicit preset (a keyword, i.e. the command line's --preset) wins over a config file's preset:
        preset = overrides.get("preset") or preset or file_values.get("preset")
        if preset:
            values.update(load_preset(preset))
            values["preset"] = preset
        values.update({k: v for k, v in file_values.items() if k != "preset"})
        values.update({k: v for k, v in overrides.items()})
        cfg = cls.from_dict(values)
        cfg.validate()
        return cfg

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = [k for k in values if k not in known]
        if unknown:
            raise ConfigError([FieldError(k, values[k], f"unknown option{_suggest(k, known)}") for k in unknown])
        errors, kwargs = [], {}
        for k, v in values.items():
            try:
                kwargs[k] = coerce_field(k, v)
            except FieldError as e:
                errors.append(e)
        if errors:
            # Report the range/consistency problems of the other fields too: one message lists them all.
            try:
                cls(**kwargs).validate()
            except ConfigError as more:
                errors += [m for m in more.errors if m.name not in {x.name for x in errors}]
            raise ConfigError(errors)
        return cls(**kwargs)

    # ----- validation ------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raises ConfigError listing every bad field (``rules.field_errors``); returns ``self`` when valid."""
        errors = field_errors(self)
        if errors:
            raise ConfigError(errors)
        return self

    def warnings(self) -> list[str]:
        """Settings that are legal but very probably wrong (printed and emitted as notes)."""
        return config_warnings(self)


def field_type(name: str):
    """(type, optional) of the TrainConfig field ``name``; KeyError for an unknown one."""
    hints = get_type_hints(TrainConfig)
    t = hints[name]
    optional = False
    if get_origin(t) is Union:
        args = [a for a in get_args(t) if a is not type(None)]
        optional = len(args) < len(get_args(t))
        t = args[0]
    return t, optional


def coerce_field(name: str, value: Any) -> Any:
    """Converts a raw value (string from a flag, YAML scalar) to the field's type or raises FieldError."""
    try:
        t, optional = field_type(name)
    except KeyError:
        raise FieldError(name, value, "unknown option")
    return coerce_value(name, t, optional, value)


def _suggest(name: str, known) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""
