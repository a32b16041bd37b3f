"""Generation requests: the fields, their limits (checked before anything is loaded), and a request made
from a finished run folder (base model, LoRA, embeddings and tokens from its config.json and files)."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from trainer.training.placeholders import new_tokens, split_abstractions

from .errors import InferenceInputError
from .schedulers import SCHEDULERS

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
MAX_NUM_IMAGES = 8
MAX_STEPS = 150
MIN_SIZE, MAX_SIZE = 64, 2048
MAX_PROMPT_CHARS = 4000


@dataclass
class GenerateRequest:
    base_model: str
    prompt: str
    negative_prompt: str = ""
    lora_path: Optional[str] = None          # a run folder, a diffusers LoRA file or a kohya LoRA file
    embeddings_path: Optional[str] = None    # <name>_emb.safetensors (clip_l [, clip_g])
    token_abstraction: str = "TOK"           # comma list, as in TrainConfig
    num_new_tokens_per_abstraction: int = 2
    scheduler: str = "Euler a"
    steps: int = 25
    guidance_scale: float = 5.0
    width: Optional[int] = None              # None -> the model's default resolution
    height: Optional[int] = None
    seed: Optional[int] = None               # None -> random; the used seeds are reported
    lora_scale: float = 1.0
    num_images: int = 1

    def abstractions(self) -> list[str]:
        return split_abstractions(self.token_abstraction)

    def tokens_per_abstraction(self) -> dict[str, list[str]]:
        """The training numbering (``trainer.config.new_tokens``): {"TOK": ["<s0>", "<s1>"], ...}."""
        return new_tokens(self.token_abstraction, int(self.num_new_tokens_per_abstraction))


@dataclass
class GenerateResult:
    images: list          # PIL.Image.Image
    seeds: list[int]
    info: dict = field(default_factory=dict)


def read_run_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise InferenceInputError(f"{run_dir} is not a finished run folder (no config.json).")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise InferenceInputError(f"{path} could not be read: {exc}") from None
    if not isinstance(cfg, dict) or not cfg.get("pretrained_model_name_or_path"):
        raise InferenceInputError(f"{path} has no pretrained_model_name_or_path; is this a run folder?")
    return cfg


def run_files(run_dir: str, cfg: dict) -> tuple[Optional[str], Optional[str]]:
    """(LoRA file, embeddings file or None) of a run folder: the diffusers file, else the kohya file."""
    lora = os.path.join(run_dir, LORA_WEIGHTS)
    names = sorted(n for n in os.listdir(run_dir) if n.endswith(".safetensors"))
    if not os.path.isfile(lora):
        kohya = [n for n in names if not n.endswith("_emb.safetensors")]
        lora = os.path.join(run_dir, kohya[0]) if kohya else None
    emb = None
    if cfg.get("train_text_encoder_ti", True):
        embs = [n for n in names if n.endswith("_emb.safetensors")]
        if embs:
            emb = os.path.join(run_dir, embs[0])
    return lora, emb


def request_from_run(run_dir: str, **overrides) -> GenerateRequest:
    """A request for a finished run: base model, LoRA, embeddings and tokens from its config.json and files.

    ``prompt`` defaults to the run's validation prompt (else its instance prompt); any field can be overridden.
    """
    run_dir = os.path.abspath(run_dir)
    if not os.path.isdir(run_dir):
        raise InferenceInputError(f"run folder {run_dir} does not exist.")
    cfg = read_run_config(run_dir)
    lora, emb = run_files(run_dir, cfg)
    if lora is None:
        raise InferenceInputError(f"{run_dir} has no LoRA file ({LORA_WEIGHTS} or <name>.safetensors).")
    fields: dict[str, Any] = dict(
        base_model=cfg["pretrained_model_name_or_path"],
        prompt=cfg.get("validation_prompt") or cfg.get("instance_prompt") or "",
        lora_path=lora,
        embeddings_path=emb,
        token_abstraction=cfg.get("token_abstraction") or "TOK",
        num_new_tokens_per_abstraction=int(cfg.get("num_new_tokens_per_abstraction") or 2),
    )
    if cfg.get("validation_guidance_scale") is not None:
        fields["guidance_scale"] = float(cfg["validation_guidance_scale"])
    unknown = set(overrides) - set(GenerateRequest.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown GenerateRequest fields: {sorted(unknown)}")
    fields.update(overrides)
    return GenerateRequest(**fields)


def validate_request(req: GenerateRequest) -> None:
    """Raises InferenceInputError for values out of range (before anything is loaded)."""
    if not isinstance(req.base_model, str) or not req.base_model.strip():
        raise InferenceInputError("base_model is empty: choose a base model (e.g. tiny-sdxl or a diffusers folder).")
    if not isinstance(req.prompt, str) or not isinstance(req.negative_prompt or "", str):
        raise InferenceInputError("prompt and negative_prompt must be text.")
    if len(req.prompt) > MAX_PROMPT_CHARS or len(req.negative_prompt or "") > MAX_PROMPT_CHARS:
        raise InferenceInputError(f"prompts are limited to {MAX_PROMPT_CHARS} characters.")
    if req.scheduler not in SCHEDULERS:
        raise InferenceInputError(f"unknown scheduler {req.scheduler!r}; choose one of {', '.join(SCHEDULERS)}.")
    if not _is_int(req.steps) or not 1 <= req.steps <= MAX_STEPS:
        raise InferenceInputError(f"steps must be a whole number from 1 to {MAX_STEPS} (got {req.steps!r}).")
    if not _is_int(req.num_images) or not 1 <= req.num_images <= MAX_NUM_IMAGES:
        raise InferenceInputError(f"num_images must be from 1 to {MAX_NUM_IMAGES} (got {req.num_images!r}).")
    for name in ("width", "height"):
        v = getattr(req, name)
        if v is not None and (not _is_int(v) or v % 8 or not MIN_SIZE <= v <= MAX_SIZE):
            raise InferenceInputError(
                f"{name} must be a multiple of 8 from {MIN_SIZE} to {MAX_SIZE} (got {v!r}); leave it empty for the "
                "model's default resolution.")
    if not _is_number(req.guidance_scale) or not 0.0 <= float(req.guidance_scale) <= 50.0:
        raise InferenceInputError(f"guidance_scale must be between 0 and 50 (got {req.guidance_scale!r}).")
    if not _is_number(req.lora_scale) or not -10.0 <= float(req.lora_scale) <= 10.0:
        raise InferenceInputError(f"lora_scale must be between -10 and 10 (got {req.lora_scale!r}).")
    if req.seed is not None and (not _is_int(req.seed) or not 0 <= req.seed < 2 ** 63):
        raise InferenceInputError(f"seed must be a non-negative whole number (got {req.seed!r}).")
    if not _is_int(req.num_new_tokens_per_abstraction) or not 1 <= req.num_new_tokens_per_abstraction <= 16:
        raise InferenceInputError("num_new_tokens_per_abstraction must be from 1 to 16.")
    for a in req.abstractions():
        if re.search(r"[\s<>]", a):
            raise InferenceInputError(f"token placeholder {a!r} must be one word without spaces or <>, e.g. TOK.")
    if req.embeddings_path is not None and not req.abstractions():
        raise InferenceInputError("embeddings need a token_abstraction (e.g. TOK).")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
