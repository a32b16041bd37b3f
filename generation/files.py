"""Safe reading of uploaded LoRA / embedding files and their compatibility with the loaded pipeline.

Only ``.safetensors`` files are read (``safetensors`` never unpickles). Every file is checked before it touches
the pipeline: parse errors, LoRAs for another model family (key prefixes, module names and weight shapes
compared with this UNet / these text encoders) and embeddings of the wrong width or row count raise
:class:`InferenceInputError` naming the file and the problem.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import torch

from .errors import InferenceInputError
from .requests import LORA_WEIGHTS

MAX_LORA_BYTES = 4 << 30
MAX_EMBEDDING_BYTES = 64 << 20


def check_safetensors_path(path: str, what: str, max_bytes: int) -> str:
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


def load_safetensors(path: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
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


def check_lora_against_pipeline(pipe, family, sd: dict, meta: dict, name: str) -> None:
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
        # unet_config lets diffusers map original-layout (input_blocks...) keys onto this U-Net, as
        # load_lora_weights does: an SDXL kohya file then meets the width checks below on an SD 1.x model
        converted, _alphas = type(pipe).lora_state_dict(dict(sd), unet_config=pipe.unet.config)
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


def check_embeddings(pipe, family, sd: dict, name: str, n_tokens: int) -> None:
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


def file_key(path: str) -> tuple:
    st = os.stat(path)
    return (path, st.st_mtime_ns, st.st_size)
