"""End-to-end trainer checks on the tiny SDXL model: CLI run, artifacts, pivotal-tuning invariants,
resume, exports loading in diffusers."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from trainer import TrainConfig, read_events, train
from tests.conftest import base_diffusers_kohya_images, render
from trainer.families.loading import load_parts
from trainer.training.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_for(dataset, out, **kw) -> TrainConfig:
    base = dict(pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=dataset, output_dir=out,
                train_text_encoder_ti=True, optimizer="adamw", learning_rate=1e-3, text_encoder_lr=5e-2,
                max_train_steps=20, checkpointing_steps=1000, seed=7)
    base.update(kw)
    return TrainConfig.from_sources(**base)


def test_cli_30_steps_produces_all_artifacts(dataset, tmp_path, tiny_sdxl):
    out = tmp_path / "runs" / "cli-run"
    cmd = [sys.executable, "-m", "trainer", "--pretrained_model_name_or_path", "tiny-sdxl",
           "--instance_data_dir", dataset, "--instance_prompt", "a photo of TOK", "--train_text_encoder_ti",
           "--optimizer", "prodigy", "--learning_rate", "1.0", "--rank", "4", "--max_train_steps", "30",
           "--checkpointing_steps", "10", "--output_dir", str(out), "--random_flip", "true",
           "--prodigy_safeguard_warmup", "True", "--enable_xformers_memory_efficient_attention"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "has no effect" in proc.stderr  # the ignored flag got its one-line note
    for name in ("pytorch_lora_weights.safetensors", "cli-run.safetensors", "cli-run_emb.safetensors", "README.md",
                 "config.json", "events.jsonl"):
        assert (out / name).exists(), name
    events = read_events(str(out / "events.jsonl"))
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 31))
    assert all(math.isfinite(e["loss"]) for e in steps)
    assert all(e["d_lr"] is not None and e["d_lr"] > 0 for e in steps)  # Prodigy's effective lr is reported
    assert events[-1]["type"] == "finished"
    assert sorted(os.listdir(out / "checkpoints")) == ["step-10", "step-20", "step-30"]
    cfg = json.load(open(out / "config.json"))
    assert cfg["train_text_encoder_ti"] is True and cfg["random_flip"] is True and cfg["rank"] == 4
    emb = load_file(str(out / "cli-run_emb.safetensors"))
    assert emb["clip_l"].shape == (2, 32) and emb["clip_g"].shape == (2, 48)
    card = (out / "README.md").read_text()
    assert "load_textual_inversion" in card and "<s0><s1>" in card and "ComfyUI" in card
    # --save_precision's default: the artifacts in fp16 (alpha stays fp32), the checkpoints in fp32 (exact resume)
    assert {t.dtype for t in emb.values()} == {torch.float16}
    for name in ("pytorch_lora_weights.safetensors", "cli-run.safetensors"):
        assert {v.dtype for k, v in load_file(str(out / name)).items() if not k.endswith(".alpha")} == {torch.float16}
    step30 = out / "checkpoints" / "step-30"
    ckpt = [load_file(str(step30 / n)) for n in os.listdir(step30) if n.endswith(".safetensors")]
    assert ckpt and {v.dtype for sd in ckpt for v in sd.values() if v.is_floating_point()} == {torch.float32}


def test_only_new_token_rows_train_and_freeze_at_the_pivot(dataset, tmp_path, tiny_sdxl):
    from trainer.families import detect_family

    cfg = cfg_for(dataset, str(tmp_path / "run"), max_train_steps=20, train_text_encoder_ti_frac=0.5,
                  checkpointing_steps=5)
    t = Trainer(cfg)
    t.run()
    fam = detect_family(tiny_sdxl)
    base = load_parts(fam, tiny_sdxl)
    for te_base, te_trained in zip(base.text_encoders, t.comps.text_encoders):
        emb = te_trained.get_input_embeddings()
        assert torch.equal(emb.base.weight, te_base.get_input_embeddings().weight)  # bit-identical originals
        # only the new rows are parameters that ever required grad; the big matrix never did
        assert not emb.base.weight.requires_grad
        assert emb.new_rows.shape[0] == 2
    cps = {s: load_file(str(tmp_path / "run" / "checkpoints" / f"step-{s}" / "embeddings.safetensors"))
           for s in (5, 10, 15, 20)}
    for key in ("clip_l", "clip_g"):
        assert not torch.equal(cps[5][key], cps[10][key])  # trained before the pivot (steps 0..9)
        assert torch.equal(cps[10][key], cps[15][key]) and torch.equal(cps[10][key], cps[20][key])
    # after the pivot the optimizer holds state for the UNet LoRA only
    text_group = [g for g in t.optimizer.param_groups if g["name"] == "text"][0]
    assert text_group["params"] == []
    state_numel = sum(v.numel() for st in t.optimizer.state.values() for v in st.values() if torch.is_tensor(v)
                      and v.ndim > 0)
    lora_numel = sum(p.numel() for p in t.optimizer.param_groups[0]["params"])
    assert state_numel == 2 * lora_numel


def test_one_epoch_run_still_trains_the_tokens(dataset, tmp_path, tiny_sdxl):
    from trainer.families import detect_family
    from trainer.training.pivotal import PivotalTokens

    cfg = cfg_for(dataset, str(tmp_path / "run"), max_train_steps=None, num_train_epochs=1,
                  train_text_encoder_ti_frac=0.5)
    res = train(cfg)
    assert res.total_steps == 4  # 4 images, batch 1, 1 epoch
    fam = detect_family(tiny_sdxl)
    comps = load_parts(fam, tiny_sdxl)
    init = PivotalTokens(cfg.tokens_per_abstraction)
    init.install(comps.tokenizers, comps.text_encoders, generator=torch.Generator().manual_seed(cfg.seed))
    start = init.state_dict(fam.embedding_keys)
    final = load_file(res.artifacts["embeddings"])
    for key in ("clip_l", "clip_g"):
        assert not torch.allclose(start[key], final[key].float())  # the file is fp16 (--save_precision)


def test_exports_load_in_diffusers_from_a_nested_output_dir(dataset, tmp_path, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "deep" / "nested" / "folder" / "my-lora"
    res = train(cfg_for(dataset, str(out), max_train_steps=15, learning_rate=5e-2, rank=4, lora_alpha=8))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.set_progress_bar_config(disable=True)
    base, with_diffusers, with_kohya = base_diffusers_kohya_images(pipe, out, "my-lora.safetensors")
    assert np.abs(with_diffusers - base).max() > 1e-3
    assert np.abs(with_diffusers - with_kohya).max() < 1e-4
    kohya = load_file(str(out / "my-lora.safetensors"))
    assert any(k.startswith("lora_unet_") for k in kohya)
    alphas = [v.item() for k, v in kohya.items() if k.endswith(".alpha")]
    assert alphas and all(a == 8 for a in alphas)  # the real alpha, not the rank
    from safetensors import safe_open

    with safe_open(str(out / "my-lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_base_model_version"].startswith("sdxl") and meta["ss_max_train_steps"] == "15"
    # sd-scripts' tag frequency: comma-separated tags, lower-cased, per dataset folder
    assert meta["modelspec.trigger_phrase"] == "<s0><s1>" and "a photo of tok" in meta["ss_tag_frequency"]
    assert any(k.startswith("lora_unet_input_blocks_") for k in kohya)  # sd-scripts' own SDXL layout
    emb = load_file(res.artifacts["embeddings"])
    assert os.path.dirname(res.artifacts["embeddings"]) == str(out)
    pipe.load_textual_inversion(emb["clip_l"], token=["<s0>", "<s1>"], text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(emb["clip_g"], token=["<s0>", "<s1>"], text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    ids = pipe.tokenizer("a photo of <s0><s1>").input_ids
    assert pipe.tokenizer.convert_tokens_to_ids("<s0>") in ids
    learnt = render(pipe, "a photo of <s0><s1>")
    plain = render(pipe, "a photo of")
    assert np.abs(learnt - plain).max() > 1e-4


def _stop_at(step_no, stop):
    def on_event(ev):
        if ev.type == "step" and ev.step == step_no:
            stop.set()
    return on_event


@pytest.mark.parametrize("optimizer,frac", [("prodigy", 0.7), ("adamw", 0.3)])
def test_resume_continues_the_same_run(dataset, tmp_path, tiny_sdxl, optimizer, frac):
    kw = dict(max_train_steps=20, train_text_encoder_ti_frac=frac, optimizer=optimizer,
              learning_rate=1.0 if optimizer == "prodigy" else 1e-3,
              text_encoder_lr=1.0 if optimizer == "prodigy" else 5e-2, random_flip=True, caption_dropout=0.2,
              lr_scheduler="cosine", checkpointing_steps=1000)
    straight = train(cfg_for(dataset, str(tmp_path / "straight"), **kw))
    stop = threading.Event()
    first = train(cfg_for(dataset, str(tmp_path / "resumed"), **kw), on_event=_stop_at(10, stop), stop=stop)
    assert first.stopped and first.step == 10
    assert os.path.isdir(tmp_path / "resumed" / "checkpoints" / "step-10")
    second = train(cfg_for(dataset, str(tmp_path / "resumed"), resume_from_checkpoint="latest", **kw))
    assert second.step == 20 and not second.stopped
    a, b = load_file(straight.artifacts["diffusers"]), load_file(second.artifacts["diffusers"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    ea, eb = load_file(straight.artifacts["embeddings"]), load_file(second.artifacts["embeddings"])
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=1e-5, atol=1e-6)
    steps = [e["step"] for e in read_events(str(tmp_path / "resumed" / "events.jsonl")) if e["type"] == "step"]
    assert steps == list(range(1, 21))


def test_prior_preservation_generates_class_images_and_uses_the_prior_loss(dataset, tmp_path, tiny_sdxl):
    class_dir = tmp_path / "class"
    cfg = cfg_for(dataset, str(tmp_path / "run"), with_prior_preservation=True, class_data_dir=str(class_dir),
                  class_prompt="a photo of a person", num_class_images=3, sample_batch_size=2, max_train_steps=4)
    statuses = []
    t = Trainer(cfg, on_event=lambda e: statuses.append(e) if e.type == "status" else None).open()
    t.setup()
    assert len([f for f in os.listdir(class_dir) if f.endswith(".png")]) == 3
    assert any(e.phase == "class_images" and e.current == 3 and e.total == 3 for e in statuses)
    _, loss = t.forward_loss(0, t.accelerator.device)
    assert set(t.last_parts) == {"instance", "prior"}
    torch.testing.assert_close(loss.detach(), t.last_parts["instance"] + cfg.prior_loss_weight * t.last_parts["prior"])
    # the class half of the batch carries the class prompt
    batch = t.batches.micro_batch(0, t.accelerator.device)
    captions = batch[4]
    assert captions[-1] == "a photo of a person" and "<s0><s1>" in captions[0]
