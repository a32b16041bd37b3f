"""diffusers U-Net module paths in the original Stable Diffusion (LDM / SGM) layout.

The published SD 1.x/2.x/XL checkpoints, ComfyUI, AUTOMATIC1111 / Forge and kohya's sd-scripts (for SDXL: its
``sdxl_original_unet``) name U-Net modules ``input_blocks.N.M...``, ``middle_block.N...`` and
``output_blocks.N.M...``; diffusers names the same modules ``down_blocks.i.resnets.j...`` and so on. This is the
one mapping from the diffusers name to the LDM name, written from the U-Net's own config (so it holds for any
``layers_per_block`` and block layout, the tiny test models included):

================================================  ===================================================
diffusers                                          LDM / SGM (``L`` = ``layers_per_block``)
================================================  ===================================================
``down_blocks.i.resnets.j``                        ``input_blocks.{1 + i(L+1) + j}.0``
``down_blocks.i.attentions.j``                     ``input_blocks.{1 + i(L+1) + j}.1``
``down_blocks.i.downsamplers.0.conv``              ``input_blocks.{(i+1)(L+1)}.0.op``
``mid_block.resnets.j`` / ``mid_block.attentions.0``   ``middle_block.{2j}`` / ``middle_block.1``
``up_blocks.i.resnets.j``                          ``output_blocks.{i(L+1) + j}.0``
``up_blocks.i.attentions.j``                       ``output_blocks.{i(L+1) + j}.1``
``up_blocks.i.upsamplers.0``                       ``output_blocks.{i(L+1) + L}.{2 with attention, else 1}``
resnet ``norm1 conv1 norm2 conv2``                 ``in_layers.0 in_layers.2 out_layers.0 out_layers.3``
resnet ``time_emb_proj`` / ``conv_shortcut``       ``emb_layers.1`` / ``skip_connection``
``time_embedding.linear_1/2``                      ``time_embed.0/2``
``add_embedding.linear_1/2``                       ``label_emb.0.0/0.2``
``conv_in`` / ``conv_norm_out`` / ``conv_out``     ``input_blocks.0.0`` / ``out.0`` / ``out.2``
================================================  ===================================================

Everything inside a block (``transformer_blocks.0.attn1.to_k``, ``proj_in``, ``ff.net.0.proj``) keeps its name.
The same table is sd-scripts' ``sdxl_model_util.make_unet_conversion_map``, ComfyUI's ``utils.unet_to_diffusers``
and diffusers' own single-file converter (``convert_ldm_unet_checkpoint``, which the tests check this against).
"""
from __future__ import annotations

import re
from typing import Any

_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                 "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


class NotMappable(ValueError):
    """The module has no LDM name (an unknown block, or a U-Net whose blocks have different depths)."""


def _config(unet_config: Any, key: str):
    return unet_config[key] if isinstance(unet_config, dict) else getattr(unet_config, key)


def _layers_per_block(unet_config) -> int:
    layers = _config(unet_config, "layers_per_block")
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise NotMappable(f"layers_per_block {list(layers)} differs between blocks; the LDM layout has one depth")
        layers = layers[0]
    return int(layers)


def _resnet_part(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return _RESNET_PARTS.get(head, head) + (f".{tail}" if tail else "")


def _join(*parts) -> str:
    return ".".join(str(p) for p in parts if p not in (None, ""))


def sgm_module_name(path: str, unet_config) -> str:
    """The LDM / SGM name of the diffusers U-Net module ``path``, e.g. for SDXL
    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k`` ->
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_k``. ``unet_config`` is ``unet.config`` (or its dict). Raises :class:`NotMappable`."""
    for prefix, target in _TOP_LEVEL.items():
        if path == prefix or path.startswith(prefix + "."):
            return target + path[len(prefix):]
    stride = _layers_per_block(unet_config) + 1
    m = _MID.match(path)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3) or ""
        if kind == "attentions":
            return _join("middle_block", 1, rest)
        return _join("middle_block", 2 * j, _resnet_part(rest) if rest else "")
    m = _BLOCK.match(path)
    if not m:
        raise NotMappable(f"{path!r} is not a module of the LDM U-Net layout")
    side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
    if side == "down_blocks":
        if kind == "downsamplers":
            # diffusers' Downsample2D.conv is the LDM Downsample's "op"
            rest = "op" + rest[len("conv"):] if rest.startswith("conv") else rest
            return _join("input_blocks", (i + 1) * stride, 0, rest)
        index = 1 + i * stride + j
    else:
        if kind == "upsamplers":
            has_attention = str(_config(unet_config, "up_block_types")[i]).startswith("CrossAttn")
            return _join("output_blocks", i * stride + stride - 1, 2 if has_attention else 1, rest)
        index = i * stride + j
    block = "input_blocks" if side == "down_blocks" else "output_blocks"
    if kind == "resnets":
        return _join(block, index, 0, _resnet_part(rest) if rest else "")
    if kind == "attentions":
        return _join(block, index, 1, rest)
    raise NotMappable(f"{path!r} is not a module of the LDM U-Net layout")
