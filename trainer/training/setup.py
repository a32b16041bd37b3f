"""Everything a run needs before its first step, one function per part: the accelerator, the model on its
devices, the class images of prior preservation and the trainable parameters (the dataset is read and checked
once per ``train()`` call by ``inputs.RunInputs``)."""
from __future__ import annotations

import os
from typing import Callable

import torch

from ..config import TrainConfig
from ..data.sources import TrainItem, load_class_items
from ..devices import default_mixed_precision, weight_dtype
from ..families import detect_family, get_family, resolve
from ..families.loading import load_parts
from ..families.unsupported import refuse_unsupported
from .errors import TrainingError
from .lora import add_text_encoder_lora, add_unet_lora
from .pivotal import PivotalTokens
from .prior import generate_class_images


def make_accelerator(cfg: TrainConfig, run_dir: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    mp = cfg.mixed_precision.value if cfg.mixed_precision else default_mixed_precision()
    log_with = None
    if cfg.report_to.value != "none":
        try:
            __import__(cfg.report_to.value)
        except ImportError:
            raise TrainingError(f"--report_to {cfg.report_to.value} needs the {cfg.report_to.value} package: "
                                f"pip install {cfg.report_to.value} (or use --report_to none)") from None
        log_with = cfg.report_to.value
    # The app trains several runs in one process; accelerate's state is a singleton, so reset what can change.
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True on a machine without CUDA lets accelerate see torchrun/`accelerate launch` ranks as MULTI_CPU (gloo).
    return Accelerator(mixed_precision=mp, log_with=log_with, cpu=not torch.cuda.is_available(),
                       project_config=ProjectConfiguration(project_dir=run_dir,
                                                           logging_dir=os.path.join(run_dir, cfg.logging_dir)))


def load_model(cfg: TrainConfig, accelerator, status: Callable[[str, str], None]):
    """(family, components) with the frozen parts on the accelerator's device in their training dtypes."""
    device = accelerator.device
    model_path = resolve(cfg.pretrained_model_name_or_path)
    vae_path = resolve(cfg.pretrained_vae_model_name_or_path) if cfg.pretrained_vae_model_name_or_path else None
    refuse_unsupported(model_path, vae_path, cfg.revision, cfg.cache_dir)  # refiner, EDM, latents_mean VAE
    family = (detect_family(model_path, cfg.revision, cfg.cache_dir) if cfg.model_family.value == "auto"
              else get_family(cfg.model_family.value))
    status("model", f"loading {cfg.pretrained_model_name_or_path} ({family.name})")
    wdtype = weight_dtype(accelerator.mixed_precision)
    comps = load_parts(family, model_path, revision=cfg.revision, variant=cfg.variant, vae_path=vae_path,
                       cache_dir=cfg.cache_dir, dtype=wdtype)
    # The VAE runs in fp32 unless it is the fp16-fix VAE (plain SDXL VAE overflows in half precision).
    vae_dtype = wdtype if (vae_path and "fp16-fix" in vae_path) else torch.float32
    comps.vae.to(device, dtype=vae_dtype).requires_grad_(False).eval()
    comps.unet.to(device).requires_grad_(False)
    for te in comps.text_encoders:
        te.to(device).requires_grad_(False).eval()
    return family, comps


def prepare_class_images(cfg: TrainConfig, family, comps, accelerator, resolution: int, seed: int,
                         status: Callable[..., None]) -> tuple[list[TrainItem], list[str]]:
    """Prior preservation: generates the missing class images (main process), then everyone reads them."""
    notes = []
    if accelerator.is_main_process:
        status("class_images", f"checking {cfg.num_class_images} class images", 0, cfg.num_class_images)
        n = generate_class_images(
            family, comps, folder=cfg.class_data_dir, prompt=cfg.class_prompt, wanted=cfg.num_class_images,
            resolution=resolution, batch_size=cfg.sample_batch_size, seed=seed, autocast=accelerator.autocast,
            on_progress=lambda d, t: status("class_images", f"generated {d}/{t} class images", d, t))
        if n:
            notes.append(f"generated {n} class images in {cfg.class_data_dir}")
    accelerator.wait_for_everyone()
    class_items = load_class_items(cfg.class_data_dir)
    if not class_items:
        raise TrainingError(f"--class_data_dir {cfg.class_data_dir} holds no usable image")
    return class_items, notes


def trainable_groups(cfg: TrainConfig, comps, world: int, seed: int):
    """(pivotal tokens or None, text-encoder LoRA on?, optimizer groups). Group 0 is the UNet LoRA; text
    parameters (new token rows or text-encoder LoRA) form the group named "text"."""
    gen_init = torch.Generator().manual_seed(seed)
    pivotal = None
    if cfg.train_text_encoder_ti:
        pivotal = PivotalTokens(cfg.tokens_per_abstraction)
        pivotal.install(comps.tokenizers, comps.text_encoders, generator=gen_init)
    torch.manual_seed(seed)
    groups = [{"name": "unet", "params": add_unet_lora(comps.unet, cfg), "lr": cfg.learning_rate,
               "weight_decay": cfg.adam_weight_decay}]
    text_wd = (cfg.adam_weight_decay_text_encoder if cfg.adam_weight_decay_text_encoder is not None
               else cfg.adam_weight_decay)
    te_lora = bool(cfg.train_text_encoder)
    if te_lora:
        te_params = []
        for te in comps.text_encoders:
            te_params += add_text_encoder_lora(te, cfg)
        groups.append({"name": "text", "params": te_params, "lr": cfg.effective_text_lr, "weight_decay": text_wd})
    if pivotal:
        pivotal.set_trainable(True)
        groups.append({"name": "text", "params": pivotal.parameters(), "lr": cfg.effective_text_lr,
                       "weight_decay": text_wd})
    if cfg.scale_lr:
        factor = cfg.train_batch_size * cfg.gradient_accumulation_steps * world
        for g in groups:
            g["lr"] *= factor
    if cfg.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
        if te_lora:
            for te in comps.text_encoders:
                te.gradient_checkpointing_enable()
    return pivotal, te_lora, groups
