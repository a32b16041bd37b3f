"""How far the DoRA other tools compute from a kohya file is from the trained one, measured at export for the model
card (so the card states a number instead of "approximately").

peft trained W' = m / ||W + dW||_row * (W + dW). From ``dora_scale`` = m ([out, 1]):

- ComfyUI / Forge (``weight_decompose``, output axis) compute m / ||W||_row * (W + dW): row r is off by the factor
  ||W + dW||_r / ||W||_r, so the relative error is sqrt(sum_r m_r^2 (that factor - 1)^2) / ||m||;
- AUTOMATIC1111 (``apply_weight_decompose``) divides by the input-column norms of W + dW instead: computed on the
  full weight.
"""
from __future__ import annotations

import torch


def _dora_layers(model):
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if module.use_dora.get(adapter):
                    yield module, adapter


@torch.no_grad()
def dora_tool_deviation(models) -> dict[str, float]:
    """``{"comfyui": x, "a1111": y}``: the largest relative error (Frobenius, per layer) of each tool's rebuilt
    weight against the trained DoRA weight, over every DoRA layer of ``models``; empty without DoRA layers."""
    worst = {"comfyui": 0.0, "a1111": 0.0}
    seen = False
    for model in models:
        for layer, adapter in _dora_layers(model):
            seen = True
            weight = layer.get_base_layer().weight.float()
            merged = weight + layer.get_delta_weight(adapter).float()
            out = weight.shape[0]
            mag = layer.lora_magnitude_vector[adapter].weight.float().reshape(out)
            base_rows = weight.reshape(out, -1).norm(dim=1)
            rows = merged.reshape(out, -1).norm(dim=1)
            comfy = torch.sqrt((mag ** 2 * (rows / base_rows - 1) ** 2).sum()) / mag.norm()
            shape = (out,) + (1,) * (weight.dim() - 1)
            trained = merged * (mag / rows).reshape(shape)
            cols = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
            a1111 = merged * mag.reshape(shape) / cols.reshape((1, -1) + (1,) * (weight.dim() - 2))
            worst["comfyui"] = max(worst["comfyui"], float(comfy))
            worst["a1111"] = max(worst["a1111"], float((a1111 - trained).norm() / trained.norm()))
    return worst if seen else {}
