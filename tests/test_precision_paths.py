"""GPU precisions on the CPU: fp16 loss scaling (the GradScaler path of Colab's T4), prior-preservation class
images with a bf16 UNet and an fp32 VAE, and the text encoders' training mode (LoRA dropout, checkpointing)."""
from __future__ import annotations

import os

import torch

from trainer import TrainConfig
from trainer.training.step import apply_gradients, backward
from trainer.training.trainer import Trainer

torch.set_flush_denormal(True)


class _NoAcc:
    @staticmethod
    def reduce(t, reduction="mean"):
        return t


def _fp16_step(scaler) -> torch.Tensor:
    """One step of an fp32 master weight behind an fp16 forward whose loss gradient (1e-9) underflows fp16."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(2, 4).half()
    opt = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    before = w.detach().clone()
    loss = (x @ w.half()).float().sum() * 1e-9  # d loss / d (fp16 output) = 1e-9: 0 in fp16
    backward(loss, scaler)
    apply_gradients([w], optimizer=opt, scheduler=sched, accelerator=_NoAcc(), world=1, max_grad_norm=1.0,
                    fault_hook=None, step=0, scaler=scaler)
    return (w.detach() - before).abs().max()


def test_fp16_loss_scaling_keeps_an_underflowing_gradient():
    assert _fp16_step(None) == 0  # without a scaler the gradient underflows and nothing learns
    assert _fp16_step(torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)) > 0


def _cfg(dataset, out, **kw) -> TrainConfig:
    base = dict(pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=dataset, output_dir=out,
                optimizer="adamw", learning_rate=1e-3, max_train_steps=2, checkpointing_steps=1000, seed=7,
                resolution=64, rank=2)
    base.update(kw)
    return TrainConfig.from_sources(**base)


def test_trainer_steps_through_the_accelerators_scaler(dataset, tmp_path, tiny_sdxl):
    t = Trainer(_cfg(dataset, str(tmp_path / "run"))).open()
    t.setup()
    # accelerate makes a GradScaler for fp16 on a GPU only; the CPU scaler stands in for it
    t.scaler = scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    t.train_steps(0, 2)
    assert scaler.get_scale() == 2.0 ** 12  # two finite steps through scaler.step/update, each growing it
    assert all(p.dtype == torch.float32 for p in t.trainable())  # fp32 master weights


def test_prior_class_images_in_bf16_with_an_fp32_vae(dataset, tmp_path, tiny_sdxl):
    cfg = _cfg(dataset, str(tmp_path / "run"), mixed_precision="bf16", with_prior_preservation=True,
               class_data_dir=str(tmp_path / "class"), class_prompt="a photo of a person", num_class_images=1,
               sample_batch_size=1, max_train_steps=1)
    t = Trainer(cfg).open()
    t.setup()
    assert t.comps.unet.dtype == torch.bfloat16 and t.comps.vae.dtype == torch.float32
    assert len([f for f in os.listdir(tmp_path / "class") if f.endswith(".png")]) == 1


def test_text_encoders_train_in_training_mode_and_checkpoint(dataset, tmp_path, tiny_sdxl):
    cfg = _cfg(dataset, str(tmp_path / "run"), train_text_encoder=True, train_text_encoder_frac=0.5,
               gradient_checkpointing=True, lora_dropout=0.1, max_train_steps=2)
    t = Trainer(cfg).open()
    t.setup()
    te = t.comps.text_encoders[0]
    mlp = getattr(te, "text_model", te).encoder.layers[0].mlp  # inside the checkpointed layer forward
    seen = []
    mlp.register_forward_pre_hook(lambda m, i: seen.append((t.step, m.training)))  # the recompute stops early
    t.train_steps(0, 2)
    # step 0 trains text: the layer's MLP runs in training mode, twice (the checkpointed forward is recomputed in the
    # backward); step 1 is past te_stop_step: the encoders are back in eval mode
    assert [s for s in seen if s[0] == 0] == [(0, True), (0, True)]
    assert all(not training for step, training in seen if step == 1)
    assert not te.training
