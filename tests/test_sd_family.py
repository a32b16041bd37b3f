"""The SD 1.x / 2.x family behind the same interface: trains, exports (lora_te_* keys, clip_l only),
reloads, v-prediction, and the book-chapter command line as written."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from trainer import TrainConfig, train
from tests.conftest import base_diffusers_kohya_images, render, write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sd_pivotal_run_exports_and_reloads(tmp_path, tiny_sd):
    from diffusers import StableDiffusionPipeline

    data = str(tmp_path / "data")
    write_dataset(data)
    out = tmp_path / "sd-run"
    res = train(TrainConfig.from_sources(pretrained_model_name_or_path="tiny-sd", instance_data_dir=data,
                                         output_dir=str(out), train_text_encoder_ti=True, optimizer="adamw",
                                         learning_rate=5e-2, text_encoder_lr=5e-2, max_train_steps=12, rank=4))
    emb = load_file(res.artifacts["embeddings"])
    assert set(emb) == {"clip_l"} and emb["clip_l"].shape == (2, 32)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    base, a, b = base_diffusers_kohya_images(pipe, out, "sd-run.safetensors")
    assert np.abs(a - base).max() > 1e-3 and np.abs(a - b).max() < 1e-4
    pipe.load_textual_inversion(emb["clip_l"], token=["<s0>", "<s1>"], text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    assert np.abs(render(pipe, "a photo of <s0><s1>") - render(pipe, "a photo of")).max() > 1e-4


def test_sd_text_encoder_lora_uses_lora_te_keys(tmp_path, tiny_sd):
    data = str(tmp_path / "data")
    write_dataset(data)
    res = train(TrainConfig.from_sources(pretrained_model_name_or_path="tiny-sd", instance_data_dir=data,
                                         output_dir=str(tmp_path / "te"), train_text_encoder=True,
                                         train_text_encoder_frac=0.5, max_train_steps=6, rank=4))
    kohya = load_file(res.artifacts["kohya"])
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya), list(kohya)[:5]
    assert any(k.startswith("lora_unet_") for k in kohya)
    assert not any(k.startswith(("lora_te1_", "lora_te2_")) for k in kohya)
    assert "embeddings" not in res.artifacts
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(res.run_dir)
    a = render(pipe, "a photo of TOK")
    pipe.unload_lora_weights()
    pipe.load_lora_weights(res.run_dir, weight_name="te.safetensors")
    b = render(pipe, "a photo of TOK")
    assert np.abs(a - b).max() < 1e-4  # text-encoder LoRA included in both files


def test_v_prediction_family_member_trains(tmp_path):
    data = str(tmp_path / "data")
    write_dataset(data)
    cfg = TrainConfig.from_sources(pretrained_model_name_or_path="tiny-sd2-v", instance_data_dir=data,
                                   output_dir=str(tmp_path / "v"), max_train_steps=4, snr_gamma=5.0)
    from trainer.training.trainer import Trainer

    t = Trainer(cfg).open()
    t.setup()
    assert t.family.name == "sd" and t.comps.prediction_type == "v_prediction"
    res = t.train_steps(0, t.total)
    assert res.step == 4 and np.isfinite(res.final_loss)
    # the base version comes from the model (linear projections, v-prediction), not from its name: A1111 shows an
    # SD 2 LoRA on its SD 2 tab, Forge reads the ModelSpec architecture
    from safetensors import safe_open

    with safe_open(res.artifacts["kohya"], "pt") as f:
        meta = f.metadata()
    assert (meta["ss_v2"], meta["ss_v_parameterization"], meta["ss_base_model_version"]) == ("True", "True", "sd_v2_v")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v"


def test_unsupported_model_is_a_clear_error(tmp_path):
    from trainer.families import ModelLoadError, detect_family

    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelLoadError, match="FluxPipeline.*supports Stable Diffusion XL"):
        detect_family(str(folder))
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline"):
        detect_family(str(tmp_path))


def test_book_chapter_command_line_runs(tmp_path, tiny_sd):
    """The book's SD 2 recipe, verbatim but for the model (tiny SD) and the data (a small ImageFolder)."""
    folder = tmp_path / "misato"
    write_dataset(str(folder), sizes=[(512, 512)] * 4, sidecars=False)
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"file_name": f"img{i}.png", "prompt": f"(lora-misato-token) picture {i}"}) + "\n")
    out = tmp_path / "lm-misato-lora"
    cmd = [sys.executable, "-m", "trainer", "--pretrained_model_name_or_path", tiny_sd,
           f"--dataset_name={folder}", "--caption_column=prompt", "--resolution=512", "--random_flip",
           "--train_batch_size=1", "--num_train_epochs=2", "--checkpointing_steps=5", "--learning_rate=1e-04",
           "--lr_scheduler=constant", "--lr_warmup_steps=0", "--seed=42", f"--output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: 8/8 steps" in proc.stdout
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert (out / "checkpoints" / "step-5").is_dir()
    cfg = json.load(open(out / "config.json"))
    assert cfg["resolution"] == 512 and cfg["random_flip"] is True and cfg["caption_column"] == "prompt"


def test_v_prediction_target_is_the_velocity_and_min_snr_divides_by_snr_plus_one(tmp_path):
    """On the v-prediction tiny SD 2 the training target is ``scheduler.get_velocity`` (= sqrt(acp) * noise -
    sqrt(1 - acp) * x0, written out here) and min-SNR weighs by min(snr, gamma) / (snr + 1), not / snr."""
    import torch

    from trainer.training.loss import diffusion_loss, per_sample_mse, target_for
    from trainer.training.trainer import Trainer

    data = str(tmp_path / "data")
    write_dataset(data)
    t = Trainer(TrainConfig.from_sources(pretrained_model_name_or_path="tiny-sd2-v", instance_data_dir=data,
                                         output_dir=str(tmp_path / "v"), max_train_steps=2, snr_gamma=5.0)).open()
    t.setup()
    sched = t.comps.noise_scheduler
    assert sched.config.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    steps = torch.tensor([5, 100, 500, 990])
    acp = sched.alphas_cumprod[steps].view(-1, 1, 1, 1)
    target = target_for(sched, x0, noise, steps)
    torch.testing.assert_close(target, acp.sqrt() * noise - (1 - acp).sqrt() * x0)
    torch.testing.assert_close(target, sched.get_velocity(x0, noise, steps))
    pred = torch.randn(4, 4, 8, 8, generator=g)
    snr = (acp / (1 - acp)).flatten()
    loss, _ = diffusion_loss(pred, target, steps, sched, snr_gamma=5.0)
    mse = per_sample_mse(pred, target)
    torch.testing.assert_close(loss, (mse * torch.clamp(snr, max=5.0) / (snr + 1)).mean())
    assert not torch.allclose(loss, (mse * torch.clamp(snr, max=5.0) / snr).mean())  # the epsilon formula differs
