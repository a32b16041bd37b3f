"""LoRA adapters through peft: UNet (and optionally text encoders), fp32 trainable weights under
half-precision base weights, and their state dicts in peft / diffusers form."""
from __future__ import annotations

import torch

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def lora_config(rank: int, alpha: float, dropout: float, targets: list[str], use_dora: bool):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                      target_modules=targets, use_dora=use_dora)


def add_unet_lora(unet, cfg) -> list[torch.nn.Parameter]:
    targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
    unet.requires_grad_(False)
    try:
        unet.add_adapter(lora_config(cfg.rank, cfg.effective_alpha, cfg.lora_dropout, targets, cfg.use_dora))
    except ValueError as exc:
        raise ValueError(f"--lora_target_modules {cfg.lora_target_modules!r}: {exc}") from None
    return upcast_trainable(unet)


def add_text_encoder_lora(text_encoder, cfg) -> list[torch.nn.Parameter]:
    text_encoder.requires_grad_(False)
    text_encoder.add_adapter(lora_config(cfg.rank, cfg.effective_alpha, cfg.lora_dropout, TEXT_ENCODER_TARGETS,
                                         cfg.use_dora))
    return upcast_trainable(text_encoder)


def upcast_trainable(model) -> list[torch.nn.Parameter]:
    """Trainable (LoRA) parameters are kept in fp32 even when the frozen base is bf16/fp16; returns them."""
    from diffusers.training_utils import cast_training_params

    cast_training_params(model, dtype=torch.float32)
    return [p for p in model.parameters() if p.requires_grad]


def peft_state_dict(model) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_peft_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA state does not match the model: unexpected keys {unexpected[:3]}...")
