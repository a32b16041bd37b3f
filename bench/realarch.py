"""Real-size Stable Diffusion architectures with random weights, built offline from configs written in code.

``tiny.py`` gives models with the *shape* of SDXL but a few MB of weights; this module gives the *real*
architectures (SDXL base: 2.567e9-parameter UNet, CLIP ViT-L 768 + OpenCLIP bigG 1280 text encoders with a
49408-token vocabulary, the SDXL VAE; SD 1.5 likewise) with random weights, so speed and memory can be
benchmarked exactly as with the published checkpoints without downloading them. The result is an ordinary
diffusers folder loaded through the normal path (``--pretrained_model_name_or_path <folder>``).

Building never holds an fp32 copy of the UNet: each component is created on the meta device, materialised
directly in ``dtype`` (bf16 by default: ~5.1 GB for the SDXL UNet) and filled with a variance-preserving random
init, then saved and freed before the next one. The trainer loads it in its own dtype (bf16 on GPU).

Ids: ``real-sdxl``, ``real-sd15``. ``real_model_path(name)`` builds once into the cache and returns the folder.
Random weights produce noise images; they are for benchmarks only.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any

from trainer.tiny import write_clip_tokenizer_files, build_cached, cache_root

REAL_MODELS = ("real-sdxl", "real-sd15")
CLIP_VOCAB_SIZE = 49408


# ---------------------------------------------------------------------------------------------------------
# Configs (those of stabilityai/stable-diffusion-xl-base-1.0 and runwayml/stable-diffusion-v1-5)
# ---------------------------------------------------------------------------------------------------------
def sdxl_unet_config() -> dict[str, Any]:
    return dict(
        sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        only_cross_attention=False, block_out_channels=(320, 640, 1280), layers_per_block=2,
        downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
        cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        dual_cross_attention=False, use_linear_projection=True, upcast_attention=None,
        resnet_time_scale_shift="default", addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, conv_in_kernel=3, conv_out_kernel=3,
    )


def sd15_unet_config() -> dict[str, Any]:
    return dict(
        sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
        mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768,
        attention_head_dim=8,
    )


def sd21_unet_config() -> dict[str, Any]:
    """stabilityai/stable-diffusion-2-1 (768 px, v-prediction): the SD 1.5 layout with 1024-wide cross-attention
    (OpenCLIP-H), per-level head widths, linear attention projections and upcast attention."""
    return dict(sd15_unet_config(), sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True, upcast_attention=True)


def vae_config(scaling_factor: float, sample_size: int) -> dict[str, Any]:
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=sample_size,
        scaling_factor=scaling_factor, force_upcast=True,
    )


def sdxl_vae_fp16_fix_config() -> dict[str, Any]:
    """madebyollin/sdxl-vae-fp16-fix: the SDXL VAE's architecture and scaling factor (its weights were rescaled
    so that activations fit in fp16); its config has ``force_upcast`` false, so pipelines keep it in half
    precision, and a sample_size of 512."""
    return dict(vae_config(0.13025, 512), force_upcast=False)


def clip_l_config(vocab_size: int = CLIP_VOCAB_SIZE):
    """CLIP ViT-L/14 text tower (SDXL ``text_encoder``, SD 1.5 ``text_encoder``)."""
    from transformers import CLIPTextConfig

    # eos_token_id=2 is the legacy value of the published configs: the pooled output is taken at argmax(ids),
    # which is <|endoftext|> (the last id of the vocabulary).
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=768, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                          pad_token_id=1)


def clip_bigg_config(vocab_size: int = CLIP_VOCAB_SIZE):
    """OpenCLIP ViT-bigG/14 text tower with its 1280 projection (SDXL ``text_encoder_2``)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                          num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                          projection_dim=1280, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                          pad_token_id=1)


def clip_h_config(vocab_size: int = CLIP_VOCAB_SIZE):
    """OpenCLIP ViT-H/14 text tower as SD 2.x ships it (``text_encoder``): the HF conversion keeps 23 of its 24
    layers (SD 2 conditions on the penultimate one) and its 512 projection."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                          num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                          projection_dim=512, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                          pad_token_id=1)


SCHEDULER_COMMON = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                        steps_offset=1, clip_sample=False, set_alpha_to_one=False)

# Published parameter counts, checked by the tests against the configs above.
KNOWN_PARAMS = {
    "sdxl_unet": 2_567_463_684,
    "sd15_unet": 859_520_964,
    "sd21_unet": 865_910_724,
    "clip_h": 340_387_840,
    "clip_l": 123_060_480,
    "clip_bigg_projection": 694_659_840,
    "vae": 83_653_863,
}


# ---------------------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------------------
def meta_model(kind: str):
    """The module of ``kind`` (sdxl_unet, sd15_unet, sd21_unet, clip_l, clip_bigg, clip_h, sdxl_vae, sd15_vae,
    sdxl_vae_fp16_fix) on
    the meta device:
    no memory, no init; for parameter counts and FLOP counting."""
    import torch

    with torch.device("meta"):
        return _construct(kind)


def _construct(kind: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind == "sdxl_unet":
        return UNet2DConditionModel(**sdxl_unet_config())
    if kind == "sd15_unet":
        return UNet2DConditionModel(**sd15_unet_config())
    if kind == "sd21_unet":
        return UNet2DConditionModel(**sd21_unet_config())
    if kind == "clip_h":
        return CLIPTextModel(clip_h_config())
    if kind == "clip_l":
        return CLIPTextModel(clip_l_config())
    if kind == "clip_bigg":
        return CLIPTextModelWithProjection(clip_bigg_config())
    if kind == "sdxl_vae":
        return AutoencoderKL(**vae_config(0.13025, 1024))
    if kind == "sd15_vae":
        return AutoencoderKL(**vae_config(0.18215, 512))
    if kind == "sdxl_vae_fp16_fix":
        return AutoencoderKL(**sdxl_vae_fp16_fix_config())
    raise ValueError(f"unknown component {kind!r}")


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def random_init_(module, seed: int = 0) -> None:
    """Variance-preserving random weights in place: linear/conv N(0, 1/fan_in), norms 1/0, embeddings N(0, 0.02),
    biases 0. Works in any floating dtype (generated in fp32 per tensor, then cast), on the module's device (a
    CUDA module draws from a CUDA generator: other numbers than a CPU build, same distribution)."""
    import torch

    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                p.zero_()
            elif p.ndim == 1:  # norm weights
                p.fill_(1.0)
            elif "embedding" in name or "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen, device=device) * 0.02)
            else:
                fan_in = math.prod(p.shape[1:])
                # in chunks along dim 0 so the fp32 temporary stays small
                step = max(1, (1 << 24) // max(1, fan_in))
                for i in range(0, p.shape[0], step):
                    chunk = p[i:i + step]
                    chunk.copy_(torch.randn(chunk.shape, generator=gen, device=device) / math.sqrt(fan_in))
        for name, b in module.named_buffers():
            if b.is_meta:
                raise RuntimeError(f"buffer {name} was left on the meta device")


def materialize(kind: str, dtype, seed: int = 0, device: str = "cpu"):
    """``kind`` built on meta, materialised on ``device`` directly in ``dtype`` and randomly initialised (on a
    GPU the SDXL UNet takes seconds instead of a minute of CPU)."""
    import torch

    module = meta_model(kind)
    torch.nn.Module.to(module, dtype=dtype)  # plain Module.to: diffusers' override warns about fp32 modules
    module = module.to_empty(device=device)
    # Non-persistent buffers (e.g. CLIP position_ids) are lost by to_empty: rebuild them from a fresh module.
    _restore_buffers(module, kind)
    random_init_(module, seed)
    return module.eval()


def _restore_buffers(module, kind: str) -> None:
    import torch

    for name, buf in list(module.named_buffers()):
        if name.endswith("position_ids"):
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            leaf = name.rsplit(".", 1)[-1]
            owner.register_buffer(leaf, torch.arange(buf.shape[-1], device=buf.device).expand((1, -1)).contiguous(),
                                  persistent=False)


def _write_tokenizer(folder: str, tmp: str):
    """A CLIP tokenizer whose vocabulary has exactly 49408 entries (the real size), with <|startoftext|> at
    49406 and <|endoftext|> at 49407 as in openai/clip-vit-large-patch14; the BPE merges are the small built-in
    set of ``tiny.py``, padded with never-produced placeholder entries."""
    from transformers import CLIPTokenizer

    src = os.path.join(tmp, "_tok_src")
    write_clip_tokenizer_files(src)
    with open(os.path.join(src, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    ordinary = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in specials]
    pad = CLIP_VOCAB_SIZE - len(ordinary) - len(specials)
    ordinary += [f"<|unused{i}|>" for i in range(pad)]
    full = {t: i for i, t in enumerate(ordinary + specials)}
    with open(os.path.join(src, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(full, f, ensure_ascii=False)
    tok = CLIPTokenizer.from_pretrained(src, model_max_length=77)
    if len(tok) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}")
    tok.save_pretrained(folder)
    return tok


def _write_model_index(out: str, class_name: str, parts: dict[str, tuple[str, str]], **extra) -> None:
    import diffusers

    index: dict[str, Any] = {"_class_name": class_name, "_diffusers_version": diffusers.__version__}
    index.update(extra)
    index.update({k: list(v) for k, v in parts.items()})
    with open(os.path.join(out, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)


def _save_component(kind: str, folder: str, dtype, seed: int, device: str = "cpu") -> None:
    import gc

    module = materialize(kind, dtype, seed, device)
    module.save_pretrained(folder, safe_serialization=True)
    del module
    gc.collect()


def build_real_sdxl(out: str, dtype=None, tmp: str | None = None, device: str = "cpu") -> str:
    import torch
    from diffusers import EulerDiscreteScheduler

    dtype = dtype or torch.bfloat16
    tmp = tmp or tempfile.mkdtemp()
    os.makedirs(out, exist_ok=True)
    _write_tokenizer(os.path.join(out, "tokenizer"), tmp)
    _write_tokenizer(os.path.join(out, "tokenizer_2"), tmp)
    _save_component("clip_l", os.path.join(out, "text_encoder"), dtype, 1, device)
    _save_component("clip_bigg", os.path.join(out, "text_encoder_2"), dtype, 2, device)
    _save_component("sdxl_vae", os.path.join(out, "vae"), torch.float32, 4, device)  # small; run in fp32
    _save_component("sdxl_unet", os.path.join(out, "unet"), dtype, 3, device)
    EulerDiscreteScheduler(prediction_type="epsilon", timestep_spacing="leading", interpolation_type="linear",
                           use_karras_sigmas=False, **{k: v for k, v in SCHEDULER_COMMON.items()
                                                       if k not in ("clip_sample", "set_alpha_to_one")}
                           ).save_pretrained(os.path.join(out, "scheduler"))
    _write_model_index(out, "StableDiffusionXLPipeline", {
        "scheduler": ("diffusers", "EulerDiscreteScheduler"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "CLIPTokenizer"),
        "unet": ("diffusers", "UNet2DConditionModel"),
        "vae": ("diffusers", "AutoencoderKL"),
    }, force_zeros_for_empty_prompt=True, feature_extractor=[None, None], image_encoder=[None, None])
    return out


def build_real_sd15(out: str, dtype=None, tmp: str | None = None, device: str = "cpu") -> str:
    import torch
    from diffusers import PNDMScheduler

    dtype = dtype or torch.bfloat16
    tmp = tmp or tempfile.mkdtemp()
    os.makedirs(out, exist_ok=True)
    _write_tokenizer(os.path.join(out, "tokenizer"), tmp)
    _save_component("clip_l", os.path.join(out, "text_encoder"), dtype, 11, device)
    _save_component("sd15_vae", os.path.join(out, "vae"), torch.float32, 14, device)
    _save_component("sd15_unet", os.path.join(out, "unet"), dtype, 13, device)
    PNDMScheduler(skip_prk_steps=True, prediction_type="epsilon",
                  **{k: v for k, v in SCHEDULER_COMMON.items() if k != "clip_sample"}
                  ).save_pretrained(os.path.join(out, "scheduler"))
    _write_model_index(out, "StableDiffusionPipeline", {
        "scheduler": ("diffusers", "PNDMScheduler"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "unet": ("diffusers", "UNet2DConditionModel"),
        "vae": ("diffusers", "AutoencoderKL"),
    }, safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    return out


_BUILDERS = {"real-sdxl": build_real_sdxl, "real-sd15": build_real_sd15}


def real_model_path(name: str = "real-sdxl", build: bool = True, dtype=None, device: str = "cpu") -> str:
    """Folder of the random-weight real-architecture model ``name``; built once (temp folder, then rename) with
    its weights made on ``device``. SDXL takes ~7 GB of disk in bf16 and a few minutes of CPU."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown real-architecture model {name!r}; choose one of {', '.join(REAL_MODELS)}")
    if not build:
        return os.path.join(cache_root(), "realarch", name)
    return build_cached("realarch", name, lambda out, tmp: _BUILDERS[name](out, dtype=dtype, tmp=tmp, device=device))


FP16_FIX_VAE = "sdxl-vae-fp16-fix"


def fp16_fix_vae_path(build: bool = True, device: str = "cpu") -> str:
    """Folder of a random-weight VAE with madebyollin/sdxl-vae-fp16-fix's config (for
    ``--pretrained_vae_model_name_or_path``), built once (temp folder, then rename). Its path contains "fp16-fix":
    the trainer runs such a VAE in the weight dtype (``training/setup.py`` ``load_model``), any other in fp32."""
    import shutil

    import torch

    path = os.path.join(cache_root(), "realarch", FP16_FIX_VAE)
    if not build or os.path.exists(os.path.join(path, "config.json")):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{FP16_FIX_VAE}-", dir=os.path.dirname(path))
    try:
        _save_component("sdxl_vae_fp16_fix", os.path.join(tmp, "vae"), torch.float32, 5, device)  # published: fp32
        try:
            os.rename(os.path.join(tmp, "vae"), path)
        except OSError:
            if not os.path.exists(os.path.join(path, "config.json")):  # another process won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


if __name__ == "__main__":  # python -m bench.realarch real-sdxl
    import sys

    print(real_model_path(sys.argv[1] if len(sys.argv) > 1 else "real-sdxl"))
