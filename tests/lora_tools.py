"""How the tools that load our LoRA files name modules and rebuild weights, written for the export tests from the
tools' published code (read, not imported or copied):

- kohya's sd-scripts (``networks/lora.py`` ``LoRANetwork.create_modules``: names; ``networks/merge_lora.py``
  ``merge_to_sd_model``: merged weight) and LyCORIS (``modules/locon.py`` ``apply_weight_decompose``, DoRA on the
  output axis, the layout ``lycoris.kohya`` reads);
- ComfyUI (``comfy/lora.py`` ``model_lora_keys_unet`` / ``model_lora_keys_clip``; ``weight_adapter/lora.py``
  ``LoRAAdapter.calculate_weight``; ``weight_adapter/base.py`` ``weight_decompose``), which Forge copies;
- AUTOMATIC1111 v1.10 (``extensions-builtin/Lora/networks.py`` ``convert_diffusers_name_to_compvis`` and the
  fallbacks of ``load_network``; ``network.py`` ``finalize_updown`` / ``apply_weight_decompose``).

A U-Net's LDM (original) module names come from ``ldm_pairs``: the product's mapping, certified by diffusers'
own single-file converter (LDM -> diffusers) sending every tensor back to where it came from.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

SDSCRIPTS_UNET_CLASSES = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
SDSCRIPTS_TE_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def _plain_name(name: str) -> str:
    return name.replace(".base_layer", "")


def base_modules(model) -> dict[str, torch.nn.Module]:
    """Linear / Conv2d modules of ``model`` by their path, peft's wrappers seen through (``.base_layer``)."""
    out = {}
    for name, m in model.named_modules():
        if type(m) in (torch.nn.Linear, torch.nn.Conv2d) and ".lora_" not in name and not name.startswith("lora_"):
            out[_plain_name(name)] = m
    return out


def ldm_pairs(unet) -> dict[str, str]:
    """LDM module path -> diffusers module path, for every module with a weight. The LDM names are the product's
    ``sgm_module_name``; the pairing is what diffusers' ``convert_ldm_unet_checkpoint`` does with a checkpoint
    under those names (raises when it does not send every tensor back to its own key)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from trainer.export.sgm_names import sgm_module_name

    sd = {_plain_name(k): v for k, v in unet.state_dict().items() if ".lora_" not in k}
    ldm_of = {}
    ckpt = {}
    for key, tensor in sd.items():
        module, leaf = key.rsplit(".", 1)
        ldm = sgm_module_name(module, unet.config)
        ldm_of[module] = ldm
        ckpt[f"model.diffusion_model.{ldm}.{leaf}"] = tensor
    converted = convert_ldm_unet_checkpoint(ckpt, dict(unet.config))
    wrong = [k for k in sd if converted.get(k) is not sd[k]]
    if wrong or set(converted) != set(sd):
        raise AssertionError(f"diffusers' converter does not invert the LDM names: {wrong[:5]}")
    return {ldm: module for module, ldm in ldm_of.items()}


# ----- sd-scripts ----------------------------------------------------------------------------------------------
def _under(model, classes) -> set[str]:
    """Paths of the Linear / Conv2d modules inside a module whose class is one of ``classes``."""
    roots = [n for n, m in model.named_modules() if type(m).__name__ in classes and ".lora_" not in n]
    mods = base_modules(model)
    return {p for p in mods if any(p.startswith(_plain_name(r) + ".") for r in roots)}


def sdscripts_unet_names(unet, sgm: bool, pairs: dict[str, str]) -> dict[str, str]:
    """kohya name -> diffusers path of every module sd-scripts puts a LoRA on (``conv_dim`` set, so the conv
    classes are targets too). SDXL: named from sd-scripts' own original-layout U-Net (``pairs``); SD 1/2: from
    its diffusers-layout U-Net."""
    targets = _under(unet, SDSCRIPTS_UNET_CLASSES)
    if sgm:
        return {"lora_unet_" + ldm.replace(".", "_"): d for ldm, d in pairs.items() if d in targets}
    return {"lora_unet_" + d.replace(".", "_"): d for d in targets}


def sdscripts_te_names(te, prefix: str) -> dict[str, str]:
    """kohya name -> module path for a CLIP text encoder, named as in transformers 4 (``text_model.`` level)."""
    out = {}
    for path in _under(te, SDSCRIPTS_TE_CLASSES):
        full = path if path.startswith("text_model.") else "text_model." + path
        out[prefix + "_" + full.replace(".", "_")] = path
    return out


def kohya_merge_delta(down, up, alpha, weight_shape) -> torch.Tensor:
    """``merge_to_sd_model``: W += ratio * (U @ D) * alpha / dim (1x1 convs squeezed; 3x3 via conv2d)."""
    scale = float(alpha) / down.shape[0]
    if len(weight_shape) == 2:
        if up.dim() == 4:
            up, down = up.squeeze(3).squeeze(2), down.squeeze(3).squeeze(2)
        return (up @ down) * scale
    if tuple(down.shape[2:4]) == (1, 1):
        return (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scale
    return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale


def lycoris_dora(weight, delta, dora_scale) -> torch.Tensor:
    """LyCORIS ``apply_weight_decompose`` (``wd_on_out``): (W + dW) * dora_scale / ||W + dW|| per output row."""
    merged = weight + delta
    norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *[1] * (merged.dim() - 1))
    return merged * (dora_scale / (norm + torch.finfo(merged.dtype).eps))


# ----- ComfyUI / Forge -----------------------------------------------------------------------------------------
def comfy_unet_key_map(pairs: dict[str, str]) -> dict[str, str]:
    """``model_lora_keys_unet``: kohya key -> LDM module, from the model's own (LDM) names and from
    ``unet_to_diffusers`` (diffusers names)."""
    out = {}
    for ldm, d in pairs.items():
        out["lora_unet_" + ldm.replace(".", "_")] = ldm
        out["lora_unet_" + d.replace(".", "_")] = ldm
    return out


def comfy_clip_key_map(kinds: list[str], layers: list[int]) -> dict[str, tuple[int, str]]:
    """``model_lora_keys_clip``: kohya key -> (text encoder index, HF module path under ``text_model.``) for the
    encoders ``kinds`` ('clip_l', 'clip_g', 'clip_h') with ``layers`` layers each."""
    out = {}
    clip_l_present = "clip_l" in kinds
    for index, (kind, n) in enumerate(zip(kinds, layers)):
        for b in range(n):
            for c, lora in LORA_CLIP_MAP.items():
                target = (index, f"text_model.encoder.layers.{b}.{c}")
                if kind in ("clip_h", "clip_l"):
                    out[f"lora_te_text_model_encoder_layers_{b}_{lora}"] = target
                    out[f"lora_te1_text_model_encoder_layers_{b}_{lora}"] = target
                elif kind == "clip_g" and clip_l_present:
                    out[f"lora_te2_text_model_encoder_layers_{b}_{lora}"] = target
    return out


def comfy_delta(down, up, alpha, weight_shape, strength: float = 1.0) -> torch.Tensor:
    """``LoRAAdapter.calculate_weight``: strength * alpha / rank * (up.flatten(1) @ down.flatten(1))."""
    scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
    return strength * scale * torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(weight_shape)


def comfy_dora(weight, delta, dora_scale) -> torch.Tensor:
    """``weight_decompose`` at strength 1: the output axis when ``dora_scale.shape[0] == out``, normalised by the
    base weight's rows (not those of W + dW); otherwise the input axis, by the columns of W + dW."""
    calc = weight + delta
    if dora_scale.shape[0] == calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(
            weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True).reshape(
            calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    return calc * (dora_scale / (norm + torch.finfo(weight.dtype).eps))


# ----- AUTOMATIC1111 -------------------------------------------------------------------------------------------
_RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                  "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_convert(key: str, is_sd2: bool) -> str:
    """``convert_diffusers_name_to_compvis`` (its SD 1 block arithmetic: 3 layers per level)."""
    def m(pattern):
        return re.match(pattern, key)

    if r := m(r"lora_unet_conv_in(.*)"):
        return f"diffusion_model_input_blocks_0_0{r[1]}"
    if r := m(r"lora_unet_conv_out(.*)"):
        return f"diffusion_model_out_2{r[1]}"
    if r := m(r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{int(r[1]) * 2 - 2}{r[2]}"
    if r := m(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _RESNET_SUFFIX.get(r[4], r[4]) if r[2] == "resnets" else r[4]
        index = 1 + int(r[1]) * 3 + int(r[3])
        return f"diffusion_model_input_blocks_{index}_{1 if r[2] == 'attentions' else 0}_{suffix}"
    if r := m(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _RESNET_SUFFIX.get(r[3], r[3]) if r[1] == "resnets" else r[3]
        return f"diffusion_model_middle_block_{1 if r[1] == 'attentions' else int(r[2]) * 2}_{suffix}"
    if r := m(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _RESNET_SUFFIX.get(r[4], r[4]) if r[2] == "resnets" else r[4]
        return f"diffusion_model_output_blocks_{int(r[1]) * 3 + int(r[3])}_{1 if r[2] == 'attentions' else 0}_{suffix}"
    if r := m(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{3 + int(r[1]) * 3}_0_op"
    if r := m(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{2 + int(r[1]) * 3}_{2 if int(r[1]) > 0 else 1}_conv"
    if r := m(r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        if is_sd2:
            rest = r[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
            return f"model_transformer_resblocks_{r[1]}_{rest}"
        return f"transformer_text_model_encoder_layers_{r[1]}_{r[2]}"
    if r := m(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)"):
        rest = r[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"1_model_transformer_resblocks_{r[1]}_{rest}"
    return key


def openclip_layer_names(prefix: str, layers: int) -> dict[str, str]:
    """A1111 layer names of an OpenCLIP text tower (``nn.MultiheadAttention`` + ``mlp.c_fc`` / ``c_proj``) ->
    the HF module path they correspond to (the MHA stands for q, k and v)."""
    out = {}
    for b in range(layers):
        base = f"{prefix}model_transformer_resblocks_{b}"
        out[f"{base}_attn"] = f"text_model.encoder.layers.{b}.self_attn.(q|k|v)_proj"
        out[f"{base}_attn_out_proj"] = f"text_model.encoder.layers.{b}.self_attn.out_proj"
        out[f"{base}_mlp_c_fc"] = f"text_model.encoder.layers.{b}.mlp.fc1"
        out[f"{base}_mlp_c_proj"] = f"text_model.encoder.layers.{b}.mlp.fc2"
    return out


def hf_clip_layer_names(prefix: str, layers: int) -> dict[str, str]:
    """A1111 layer names of a HF CLIP-L text tower (``FrozenCLIPEmbedder.transformer``)."""
    return {f"{prefix}transformer_text_model_encoder_layers_{b}_{lora}": f"text_model.encoder.layers.{b}.{c}"
            for b in range(layers) for c, lora in LORA_CLIP_MAP.items()}


def a1111_resolve(module_key: str, layer_names: dict[str, str], is_sd2: bool):
    """``load_network``'s lookup of one kohya module name: converted name, then the ``[qkv]_proj`` -> MHA rule,
    then the "SDXL loras seem to already have correct compvis keys" fallbacks. The layer name, or None (A1111
    then drops the key without an error)."""
    key = a1111_convert(module_key, is_sd2)
    if key in layer_names:
        return key
    r = re.match(r"(.*)_([qkv]_proj)$", key)
    if r and r[1] in layer_names:
        return r[1]
    if "lora_unet" in module_key:
        key = module_key.replace("lora_unet", "diffusion_model")
        return key if key in layer_names else None
    if "lora_te1_text_model" in module_key:
        for replacement in ("0_transformer_text_model", "transformer_text_model"):
            key = module_key.replace("lora_te1_text_model", replacement)
            if key in layer_names:
                return key
    return None


def a1111_delta(down, up, alpha, weight_shape, multiplier: float = 1.0) -> torch.Tensor:
    """``NetworkModuleLora.calc_updown`` + ``finalize_updown``: (up @ down) reshaped to the weight, * alpha / dim."""
    scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
    updown = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return updown.reshape(weight_shape) * scale * multiplier


def a1111_dora(weight, delta, dora_scale) -> torch.Tensor:
    """``apply_weight_decompose``: (W + dW) * dora_scale / ||W + dW|| per input column (no output-axis branch)."""
    merged = weight + delta
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True).reshape(
        merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
    return merged * (dora_scale / norm)
