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
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .config import new_tokens, split_abstractions

log = logging.getLogger(__name__)

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
MAX_NUM_IMAGES = 8
MAX_STEPS = 150
MIN_SIZE, MAX_SIZE = 64, 2048
MAX_PROMPT_CHARS = 4000
MAX_LORA_BYTES = 4 << 30
MAX_EMBEDDING_BYTES = 64 << 20
ADAPTER_PREFIX = "studio_lora"


class InferenceInputError(ValueError):
    """A request or an uploaded file cannot be used; the message says which and why (safe to show to users)."""


# --------------------------------------------------------------------------------------------------------------
# Schedulers
# --------------------------------------------------------------------------------------------------------------
def _euler_a(cfg):
    from diffusers import EulerAncestralDiscreteScheduler

    return EulerAncestralDiscreteScheduler.from_config(cfg)


def _euler(cfg):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(cfg)


def _dpmpp_2m(cfg):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2,
                                                   use_karras_sigmas=False)


def _dpmpp_2m_karras(cfg):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2,
                                                   use_karras_sigmas=True)


def _ddim(cfg):
    from diffusers import DDIMScheduler

    # Latents are not in [-1, 1]: clipping x0 (DDIM's default for pixel models) would wreck them.
    return DDIMScheduler.from_config(cfg, clip_sample=False)


def _unipc(cfg):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler.from_config(cfg)


SCHEDULERS: dict[str, Callable[[Any], Any]] = {
    "Euler a": _euler_a,
    "Euler": _euler,
    "DPM++ 2M": _dpmpp_2m,
    "DPM++ 2M Karras": _dpmpp_2m_karras,
    "DDIM": _ddim,
    "UniPC": _unipc,
}


# --------------------------------------------------------------------------------------------------------------
# Requests and results
# --------------------------------------------------------------------------------------------------------------
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


def _read_run_config(run_dir: str) -> dict:
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


def _run_files(run_dir: str, cfg: dict) -> tuple[Optional[str], Optional[str]]:
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
    cfg = _read_run_config(run_dir)
    lora, emb = _run_files(run_dir, cfg)
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


# --------------------------------------------------------------------------------------------------------------
# Validation of requests and files
# --------------------------------------------------------------------------------------------------------------
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


def _check_safetensors_path(path: str, what: str, max_bytes: int) -> str:
    """Existing regular .safetensors file (by extension, never unpickled); returns its real path."""
    name = os.path.basename(str(path))
    if not str(path).lower().endswith(".safetensors"):
        raise InferenceInputError(
            f"{what} {name!r} is not a .safetensors file. Only .safetensors files are accepted (.ckpt, .pt, .bin "
            "and .pth files can run code when opened); convert it to safetensors first.")
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        raise InferenceInputError(f"{what} {name!r} does not exist.")
    size = os.path.getsize(real)
    if size < 16:
        raise InferenceInputError(f"{what} {name!r} is empty or truncated ({size} bytes).")
    if size > max_bytes:
        raise InferenceInputError(f"{what} {name!r} is too large ({size / 2**20:.0f} MiB).")
    return real


def _load_safetensors(path: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    name = os.path.basename(path)
    try:
        out = {}
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except Exception as exc:  # SafetensorError, OSError, header/JSON errors
        raise InferenceInputError(
            f"{what} {name!r} is not a valid safetensors file (corrupt, truncated or another format renamed to "
            f".safetensors): {type(exc).__name__}: {str(exc)[:200]}") from None
    if not out:
        raise InferenceInputError(f"{what} {name!r} contains no tensors.")
    bad = [k for k, v in out.items() if not v.is_floating_point()]
    if bad:
        raise InferenceInputError(f"{what} {name!r} has non-float tensors (e.g. {bad[0]!r}); not a LoRA/embedding.")
    nonfinite = [k for k, v in out.items() if not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise InferenceInputError(f"{what} {name!r} contains NaN/inf values (e.g. in {nonfinite[0]!r}).")
    return out, meta


_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
def _lora_family(sd: dict, name: str) -> Optional[str]:
    """'sdxl' / 'sd' from text-encoder key names, or None when the file has only UNet keys."""
    keys = list(sd)
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl"
    if any(k.startswith("lora_te_") for k in keys):
        return "sd"
    return None


def _check_lora_against_pipeline(pipe, family, sd: dict, meta: dict, name: str) -> None:
    """Refuses a LoRA whose keys/shapes do not fit this pipeline (another model family, another architecture)."""
    fam_name = "SDXL" if family.name == "sdxl" else "SD 1.x/2.x"
    kohya = all(k.startswith(_KOHYA_PREFIXES) for k in sd)
    other = _lora_family(sd, name)
    if other is not None and other != family.name:
        what = "SDXL (two text encoders: lora_te1/lora_te2 or text_encoder_2 keys)" if other == "sdxl" \
            else "SD 1.x/2.x (one text encoder: lora_te_ keys)"
        raise InferenceInputError(f"LoRA {name!r} is for {what}, but the base model is {fam_name}.")
    if kohya and any(k.endswith(".dora_scale") for k in sd):
        raise InferenceInputError(
            f"LoRA {name!r} is a kohya DoRA file; diffusers drops its magnitude vectors, so it would not render as "
            f"trained. Use the run's {LORA_WEIGHTS} instead.")
    if not kohya and not all(("lora" in k) for k in sd):
        sample = next(k for k in sd if "lora" not in k)
        raise InferenceInputError(f"{name!r} is not a LoRA file (key {sample!r} is not a LoRA weight); is it a full "
                                  "model checkpoint?")
    try:
        converted, _alphas = type(pipe).lora_state_dict(dict(sd), unet_config=pipe.unet.config) \
            if family.name == "sdxl" else type(pipe).lora_state_dict(dict(sd))
    except Exception as exc:
        raise InferenceInputError(f"LoRA {name!r} could not be read as a LoRA: {type(exc).__name__}: "
                                  f"{str(exc)[:200]}") from None
    unet_modules = dict(pipe.unet.named_modules())
    cross_dim = int(pipe.unet.config.cross_attention_dim if not isinstance(pipe.unet.config.cross_attention_dim,
                                                                           (list, tuple))
                    else pipe.unet.config.cross_attention_dim[0])
    te_widths = set()
    for attr in family.text_encoder_attrs:
        te = getattr(pipe, attr, None)
        if te is not None:
            te_widths |= {int(te.config.hidden_size), int(te.config.intermediate_size)}
    from diffusers.utils import convert_unet_state_dict_to_peft

    n_unet = n_te = 0
    unet_sd = {}
    for key, t in converted.items():
        if key.startswith("text_encoder"):
            if key.endswith(".alpha") or t.ndim != 2:
                continue
            n_te += 1
            is_down = bool(re.search(r"(lora_A|down)(\.weight)?$", key))
            is_up = bool(re.search(r"(lora_B|up)(\.weight)?$", key))
            if (is_down and t.shape[1] not in te_widths) or (is_up and t.shape[0] not in te_widths):
                raise InferenceInputError(
                    f"LoRA {name!r}: text-encoder weight {key} has shape {tuple(t.shape)}, which does not fit this "
                    f"model's text encoders (widths {sorted(te_widths)}); it is a LoRA for another model.")
        elif not key.endswith(".alpha"):
            unet_sd[key[len("unet."):] if key.startswith("unet.") else key] = t
    try:
        unet_sd = convert_unet_state_dict_to_peft(unet_sd)
    except Exception as exc:
        raise InferenceInputError(f"LoRA {name!r}: unrecognised UNet LoRA keys ({type(exc).__name__}: "
                                  f"{str(exc)[:200]}).") from None
    for key, t in unet_sd.items():
        m = re.search(r"\.(lora_A|lora_B|lora_magnitude_vector)(\.[^.]+)?(\.weight)?$", key)
        if m is None:
            raise InferenceInputError(f"LoRA {name!r}: {key!r} is not a LoRA weight this tool understands.")
        module_name, kind = key[: m.start()], m.group(1)
        n_unet += 1
        module = unet_modules.get(module_name)
        if module is None:
            raise InferenceInputError(
                f"LoRA {name!r} targets {module_name!r}, which the {fam_name} base model's UNet does not have; it is "
                "a LoRA for another model (family or architecture).")
        if kind == "lora_magnitude_vector":
            continue
        is_down = kind == "lora_A"
        if "attn2" in module_name and module_name.endswith(("to_k", "to_v")) and is_down and t.ndim == 2 \
                and t.shape[1] != cross_dim:
            raise InferenceInputError(
                f"LoRA {name!r}: cross-attention width {t.shape[1]} does not match this UNet's {cross_dim} "
                "(SD 1.x LoRAs have 768, SD 2.x 1024, SDXL 2048); it is a LoRA for another model family.")
        in_f = getattr(module, "in_features", getattr(module, "in_channels", None))
        out_f = getattr(module, "out_features", getattr(module, "out_channels", None))
        if t.ndim >= 2 and ((is_down and in_f is not None and t.shape[1] != in_f)
                            or (not is_down and out_f is not None and t.shape[0] != out_f)):
            raise InferenceInputError(
                f"LoRA {name!r}: {key} has shape {tuple(t.shape)} but {module_name} is {in_f} -> {out_f} in this "
                f"{fam_name} UNet; it is a LoRA for another model.")
    if n_unet + n_te == 0:
        raise InferenceInputError(f"{name!r} contains no LoRA weights for this model.")


def _check_embeddings(pipe, family, sd: dict, name: str, n_tokens: int) -> None:
    expected = family.embedding_keys
    missing = [k for k in expected if k not in sd]
    if missing:
        raise InferenceInputError(
            f"embeddings {name!r} lack {', '.join(missing)}; a {family.name.upper()} run's _emb.safetensors has "
            f"{', '.join(expected)} (found {', '.join(sorted(sd)[:5])}).")
    for key, attr in zip(expected, family.text_encoder_attrs):
        t = sd[key]
        width = int(getattr(pipe, attr).get_input_embeddings().weight.shape[1])
        if t.ndim != 2:
            raise InferenceInputError(f"embeddings {name!r}: {key} has shape {tuple(t.shape)}, expected [tokens, "
                                      f"{width}].")
        if t.shape[1] != width:
            raise InferenceInputError(
                f"embeddings {name!r}: {key} has width {t.shape[1]} but this model's {attr} has {width}; the "
                "embedding was learnt for another model.")
        if t.shape[0] != n_tokens:
            raise InferenceInputError(
                f"embeddings {name!r}: {key} has {t.shape[0]} rows but the request names {n_tokens} new tokens; set "
                "num_new_tokens_per_abstraction / token_abstraction as in the run's config.json.")


# --------------------------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------------------------
def _default_device_dtype() -> tuple[str, torch.dtype]:
    if torch.cuda.is_available():
        return "cuda", (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return "cpu", torch.float32


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return (path, st.st_mtime_ns, st.st_size)


class Engine:
    """Keeps one base pipeline loaded and swaps LoRAs / embeddings on it; ``generate`` is thread-safe."""

    def __init__(self, device: Optional[str] = None, dtype: Optional[torch.dtype] = None):
        d_dev, d_dtype = _default_device_dtype()
        self.device = device or d_dev
        self.dtype = dtype or (d_dtype if self.device.startswith("cuda") else torch.float32)
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
        from .families import ModelLoadError, detect_family, resolve

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
        except Exception as exc:
            raise InferenceInputError(f"Could not load base model {base_model!r}: {type(exc).__name__}: "
                                      f"{str(exc)[:300]}") from None
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
        return int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)

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
        key = _file_key(lora_file)
        if key != self._lora:
            self._delete_lora()
            name = os.path.basename(lora_file)
            sd, meta = _load_safetensors(lora_file, "LoRA")
            _check_lora_against_pipeline(self.pipe, self.family, sd, meta, name)
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
        key = (_file_key(emb_file), tuple(tokens))
        if key == self._emb:
            return 0.0
        t0 = time.perf_counter()
        self._unload_embeddings()
        name = os.path.basename(emb_file)
        sd, _meta = _load_safetensors(emb_file, "embeddings")
        _check_embeddings(self.pipe, self.family, sd, name, len(tokens))
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
            cfg = _read_run_config(lora)
            run_lora, run_emb = _run_files(lora, cfg)
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
            lora = _check_safetensors_path(lora, "LoRA", MAX_LORA_BYTES)
        if emb:
            emb = _check_safetensors_path(emb, "embeddings", MAX_EMBEDDING_BYTES)
        return lora or None, emb or None, mapping

    def generate(self, req: GenerateRequest, on_progress: Optional[Callable[[int, int], Any]] = None
                 ) -> GenerateResult:
        from .pivotal import replace_placeholders

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

                def _callback(p, step, timestep, kwargs, _i=i):
                    if on_progress is not None:
                        n = int(getattr(p, "_num_timesteps", req.steps) or req.steps)
                        on_progress(_i * n + step + 1, n * req.num_images)
                    return kwargs

                gen = torch.Generator("cpu").manual_seed(seed)
                with torch.inference_mode():
                    out = pipe(prompt=prompt, negative_prompt=negative or None, num_inference_steps=req.steps,
                               guidance_scale=float(req.guidance_scale), width=width, height=height,
                               generator=gen, num_images_per_prompt=1, callback_on_step_end=_callback,
                               output_type="pil")
                images.append(out.images[0])
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


__all__ = ["SCHEDULERS", "GenerateRequest", "GenerateResult", "Engine", "InferenceInputError", "request_from_run",
           "validate_request", "get_engine", "MAX_NUM_IMAGES", "MAX_STEPS"]
