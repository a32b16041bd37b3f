"""Tiny, randomly initialised diffusion pipelines built locally from configs.

They have the exact *shape* of the real families (SDXL: two CLIP text encoders of different widths, a
`text_time` UNet; SD 1.x / 2.x: one encoder, epsilon or v-prediction) but only a few MB of weights, so the whole
tool runs offline for demos, CI and tests. Each is written with ``save_pretrained`` to an ordinary diffusers
folder and then loaded through the same code path as ``stabilityai/stable-diffusion-xl-base-1.0``.

Ids: ``tiny-sdxl``, ``tiny-sd`` (SD 1.x-shaped, epsilon), ``tiny-sd2-v`` (SD 2.x-shaped, v-prediction), and
``toy-sdxl``: the SDXL-shaped toy-world model, *pretrained* on coloured shapes (``trainer/toyworld``), cached under
the content hash of its sources.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading

from .clip_vocab import write_clip_tokenizer_files  # noqa: F401  (re-exported: tiny_clip uses it)

TINY_MODELS = ("tiny-sdxl", "tiny-sd", "tiny-sd2-v", "toy-sdxl")
TINY_RESOLUTION = 64
_BUILD_LOCK = threading.Lock()

def cache_root() -> str:
    return os.environ.get("LORA_STUDIO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lora-studio")


def is_tiny(model_id: str | None) -> bool:
    return bool(model_id) and model_id in TINY_MODELS


def _tokenizer(tmp: str):
    from transformers import CLIPTokenizer

    d = os.path.join(tmp, "_tok_src")
    n = write_clip_tokenizer_files(d)
    # Loaded from vocab.json + merges.txt exactly as a Hub CLIP tokenizer folder is.
    tok = CLIPTokenizer.from_pretrained(d, model_max_length=77)
    if len(tok) != n:
        raise RuntimeError(f"tiny tokenizer has {len(tok)} tokens, expected {n}")
    return tok, n


def _text_encoder(vocab_size: int, hidden: int, with_projection: bool, eos_token_id: int, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=eos_token_id,
        pad_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg)


def _vae(scaling_factor: float, seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        scaling_factor=scaling_factor,
    )


def _unet(cross_attention_dim: int, seed: int, **extra):
    """The tiny UNet both families share: two levels, one attention level, 32/64 channels."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=cross_attention_dim,
        norm_num_groups=16, **extra)


def _build_sdxl(out: str, tmp: str) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tok, n = _tokenizer(tmp)
    # eos_token_id=2 mirrors the legacy value in the real SDXL configs (pooled output taken at argmax(ids)).
    te1 = _text_encoder(n, 32, False, 2, seed=1)
    te2 = _text_encoder(n, 48, True, 2, seed=2)
    unet = _unet(32 + 48, seed=3, attention_head_dim=(2, 4), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
                 projection_class_embeddings_input_dim=6 * 8 + 32)
    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(0.13025, seed=4), text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
        unet=unet, scheduler=sched,
    )
    pipe.save_pretrained(out)


def _build_sd(out: str, tmp: str, v_prediction: bool) -> None:
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    tok, n = _tokenizer(tmp)
    te = _text_encoder(n, 32, False, 2, seed=11)
    unet = _unet(32, seed=13, attention_head_dim=(2, 4) if v_prediction else 4,
                 use_linear_projection=v_prediction)
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  steps_offset=1)
    if v_prediction:
        sched = DDIMScheduler(prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, **common)
    else:
        sched = PNDMScheduler(skip_prk_steps=True, **common)
    pipe = StableDiffusionPipeline(
        vae=_vae(0.18215, seed=14), text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out)


_BUILDERS = {
    "tiny-sdxl": lambda out, tmp: _build_sdxl(out, tmp),
    "tiny-sd": lambda out, tmp: _build_sd(out, tmp, v_prediction=False),
    "tiny-sd2-v": lambda out, tmp: _build_sd(out, tmp, v_prediction=True),
}


def build_cached(kind: str, name: str, builder, marker: str = "model_index.json") -> str:
    """``<cache>/<kind>/<name>``, built once by ``builder(out_dir, tmp_dir)`` into a temporary folder and then
    renamed into place, so a crash mid-build never leaves a half model that looks finished. ``marker`` is the
    file whose presence means "built" (``config.json`` for a transformers model)."""
    root = os.path.join(cache_root(), kind)
    path = os.path.join(root, name)
    if os.path.exists(os.path.join(path, marker)):
        return path
    with _BUILD_LOCK:
        if os.path.exists(os.path.join(path, marker)):
            return path
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=root)
        try:
            out = os.path.join(tmp, "model")
            builder(out, tmp)
            try:
                os.rename(out, path)
            except OSError:
                if not os.path.exists(os.path.join(path, marker)):  # another process won the race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_model_path(name: str = "tiny-sdxl", build: bool = True) -> str:
    """Folder of the tiny model ``name``; built once (atomically: temp folder, then rename)."""
    if name == "toy-sdxl":
        from .toyworld.base import build_toy_sdxl, toy_cache_name

        if not build:
            return os.path.join(cache_root(), "toy", toy_cache_name())
        return build_cached("toy", toy_cache_name(), build_toy_sdxl)
    if name not in _BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    if not build:
        return os.path.join(cache_root(), "tiny", name)
    return build_cached("tiny", name, _BUILDERS[name])


def resolve_model_id(model_id: str) -> str:
    """Maps a tiny-model id to its local folder; any other id (Hub id or folder) is returned unchanged."""
    return tiny_model_path(model_id) if is_tiny(model_id) else model_id
