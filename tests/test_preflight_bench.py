"""Preflight (measure, predict, fit), the training-speed benchmark, the real-architecture configs and the FLOP
counter. Fast: one real tiny measurement, one benchmark subprocess, everything else on the meta device or fake."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from trainer import TrainConfig
from trainer.preflight import measure as pf_measure
from trainer.preflight import plan as pf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024 ** 3


def _cfg(dataset, tmp_path, **kw):
    base = dict(pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=dataset,
                output_dir=str(tmp_path / "run"), train_text_encoder_ti=True, max_train_steps=200)
    base.update(kw)
    return TrainConfig.from_dict(base).validate()


# ---------------------------------------------------------------------------------------------------------
def test_preflight_real_measurement_fits_with_big_budget(tiny_sdxl, dataset, tmp_path):
    events = []
    plan = pf.preflight(_cfg(dataset, tmp_path), measure_steps=3, budget_bytes=512 * GiB, on_event=events.append)
    assert plan.fits and plan.changes == []
    assert plan.measured_s_per_it > 0
    assert plan.predicted_peak_bytes is not None and plan.predicted_peak_bytes > 0
    assert plan.total_steps == 200
    # whole run >= its steps at the measured rate; overheads (load, cache, export) come on top
    assert plan.predicted_seconds >= 0.5 * 200 * min(plan.measured_s_per_it, plan.attempts[0]["s_per_it"])
    assert "Fits as configured" in plan.message and "estimated time" in plan.message
    assert any(e.type == "status" and e.phase == "preflight" for e in events)
    assert plan.config.max_train_steps == 200  # the returned config is the user's, not the measured copy
    assert not os.path.exists(str(tmp_path / "run"))  # measurements ran in a temp folder


def _fake_measure(calls):
    """Peak falls with each fix: checkpointing /2, batch linear, 8-bit Adam -10 %, resolution quadratic."""

    def measure(cfg):
        calls.append(cfg)
        peak = 4000.0 * (0.5 if cfg.gradient_checkpointing else 1.0) * cfg.train_batch_size / 4
        peak *= 0.9 if cfg.optimizer.value == "adamw8bit" else 1.0
        peak *= ((cfg.resolution or 1024) / 1024) ** 2
        return int(peak), 0.5 * cfg.train_batch_size

    return measure


def test_preflight_applies_fixes_in_documented_order_cpu(tiny_sdxl, dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(pf, "_cuda", lambda: False)
    calls = []
    cfg = _cfg(dataset, tmp_path, resolution=1024, train_batch_size=4, gradient_accumulation_steps=1)
    plan = pf.preflight(cfg, budget_bytes=300, measure=_fake_measure(calls))
    # 4000 -> ckpt 2000 -> b2 1000 -> b1 500 -> 896px 383 -> 768px 281 (fits); adamw8bit skipped on CPU
    assert plan.changes == [
        "gradient checkpointing on",
        "batch size 4 -> 2 with gradient accumulation 1 -> 2 (same effective batch 4)",
        "batch size 2 -> 1 with gradient accumulation 2 -> 4 (same effective batch 4)",
        "resolution 1024 -> 896 px",
        "resolution 896 -> 768 px",
    ]
    assert plan.fits and plan.predicted_peak_bytes == 281
    c = plan.config
    assert (c.gradient_checkpointing, c.train_batch_size, c.gradient_accumulation_steps, c.resolution) == \
        (True, 1, 4, 768)
    assert c.optimizer.value == "adamw"
    assert len(calls) == 6 and len(plan.attempts) == 6
    assert any("adamw8bit skipped" in n for n in plan.notes)
    assert "Fits after" in plan.message and "resolution 896 -> 768 px" in plan.message
    assert plan.predicted_seconds == pytest.approx(200 * 0.5)


def test_preflight_uses_adamw8bit_before_resolution_on_cuda(tiny_sdxl, dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(pf, "_cuda", lambda: True)
    monkeypatch.setattr(pf, "_bnb_ok", lambda: True)
    calls = []
    cfg = _cfg(dataset, tmp_path, resolution=1024, train_batch_size=2)
    plan = pf.preflight(cfg, budget_bytes=460, measure=_fake_measure(calls))
    # 2000 -> ckpt 1000 -> b1 500 -> 8bit 450 (fits, resolution untouched)
    assert plan.changes[-1] == "optimizer adamw -> adamw8bit"
    assert len(plan.changes) == 3 and plan.fits
    assert plan.config.resolution == 1024 and plan.config.optimizer.value == "adamw8bit"


def test_preflight_never_swaps_prodigy_and_reports_no_fit(tiny_sdxl, dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(pf, "_cuda", lambda: True)
    monkeypatch.setattr(pf, "_bnb_ok", lambda: True)
    oom_until = {"n": 0}

    def measure(cfg):  # every measurement runs out of memory
        oom_until["n"] += 1
        return None, 1.0

    cfg = _cfg(dataset, tmp_path, resolution=768, optimizer="prodigy", learning_rate=1.0)
    plan = pf.preflight(cfg, budget_bytes=10, measure=measure, min_resolution=512)
    assert not plan.fits
    assert plan.changes == ["gradient checkpointing on", "resolution 768 -> 640 px", "resolution 640 -> 512 px"]
    assert plan.config.optimizer.value == "prodigy"
    assert "Does not fit" in plan.message and "out of memory" in plan.message
    assert any("Prodigy" in n for n in plan.notes)


def test_summarize_events_skips_warmup_and_splits_phases():
    evs = [{"type": "started", "time": 100.0, "total_steps": 5}]
    times = [105.0, 106.0, 107.0, 107.5, 108.0]  # first step 5 s (warm-up), text steps 1 s, frozen 0.5 s
    for i, t in enumerate(times):
        evs.append({"type": "step", "time": t, "step": i + 1, "s_per_it": 0.0, "text_trainable": i < 3})
    m = pf_measure.summarize_events(evs, warmup=1)
    assert m.step_durations == [5.0, 1.0, 1.0, 0.5, 0.5]
    assert m.s_per_it == pytest.approx(0.75)
    assert m.text_s_per_it == pytest.approx(1.0) and m.frozen_s_per_it == pytest.approx(0.5)
    assert m.total_steps == 5


# ---------------------------------------------------------------------------------------------------------
def test_benchmark_cli_prints_table_and_cache_ratio(tiny_sdxl, tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_speed.py"), "--model", "tiny-sdxl",
                           "--steps", "2", "--warmup", "1", "--images", "3", "--compare-caches", "--json", str(out)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(l for l in lines if l.startswith("| run"))
    for col in ("model", "device", "steps/s", "images/s", "peak memory", "FLOPs/step", "MFU"):
        assert col in header
    assert any(l.startswith("| caches on") for l in lines) and any(l.startswith("| caches off") for l in lines)
    assert "ratio steps_per_s caches on/off:" in proc.stdout
    data = json.loads(out.read_text())
    assert data["flops_per_step"] > 0 and data["ratios"]["steps_per_s caches on/off"] > 0
    assert all(r["steps_per_s"] > 0 and r["peak_bytes"] > 0 for r in data["runs"])
    # read at the last step, before the export; Linux batches per-thread RSS counts, so VmHWM may lag ~100 KiB
    assert all(0 < r["peak_to_last_step_bytes"] <= r["peak_bytes"] + 2 ** 20 for r in data["runs"]), data["runs"]
    assert data["peak_bf16_flops"] is None  # CPU: MFU n/a


def test_peak_table():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import train_speed

    assert train_speed.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert train_speed.peak_flops("NVIDIA H200") == 989e12
    assert train_speed.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert train_speed.peak_flops("NVIDIA L4") == 121e12
    assert train_speed.peak_flops("NVIDIA A10G") == 125e12
    assert train_speed.peak_flops("NVIDIA GeForce RTX 4090") == 165e12
    assert train_speed.peak_flops("cpu") is None


def test_flop_counter_tiny_unet(tiny_sdxl):
    import torch
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import train_speed

    meta = train_speed.unet_train_flops(tiny_sdxl, batch=1, resolution=64, rank=4)
    assert meta > 0
    # the same step with real CPU tensors: the same convolutions and matmuls; the CPU flash-attention kernel
    # is not in FlopCounterMode's table, so the CPU count lacks the attention matmuls that meta counts
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    unet.requires_grad_(False)
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    for n, p in unet.named_parameters():
        p.requires_grad_("lora_" in n)
    torch.manual_seed(0)
    cpu = train_speed.count_unet_step_flops(unet, 1, 64, device="cpu")
    assert 0.9 * meta <= cpu <= meta
    assert train_speed.unet_train_flops(tiny_sdxl, batch=2, resolution=64, rank=4) == pytest.approx(2 * meta,
                                                                                                    rel=0.02)


# ---------------------------------------------------------------------------------------------------------
def test_realarch_sdxl_configs_are_the_real_sizes():
    from bench import realarch

    unet = realarch.meta_model("sdxl_unet")
    assert realarch.count_params(unet) == realarch.KNOWN_PARAMS["sdxl_unet"] == 2_567_463_684
    c = unet.config
    assert tuple(c.block_out_channels) == (320, 640, 1280)
    assert tuple(c.transformer_layers_per_block) == (1, 2, 10)
    assert c.cross_attention_dim == 2048 and c.projection_class_embeddings_input_dim == 2816
    assert c.addition_embed_type == "text_time"
    te1, te2 = realarch.meta_model("clip_l"), realarch.meta_model("clip_bigg")
    assert te1.config.hidden_size == 768 and te2.config.hidden_size == 1280
    assert te2.config.projection_dim == 1280
    assert te1.config.vocab_size == te2.config.vocab_size == 49408
    assert te1.get_input_embeddings().weight.shape == (49408, 768)
    assert realarch.count_params(te1) == realarch.KNOWN_PARAMS["clip_l"]
    assert realarch.count_params(te2) == realarch.KNOWN_PARAMS["clip_bigg_projection"]
    assert realarch.count_params(realarch.meta_model("sdxl_vae")) == realarch.KNOWN_PARAMS["vae"]
    assert realarch.count_params(realarch.meta_model("sd15_unet")) == realarch.KNOWN_PARAMS["sd15_unet"]
    # SD 2.1: stabilityai/stable-diffusion-2-1's U-Net and its 23-layer OpenCLIP-H text encoder
    assert realarch.count_params(realarch.meta_model("sd21_unet")) == realarch.KNOWN_PARAMS["sd21_unet"]
    assert realarch.count_params(realarch.meta_model("clip_h")) == realarch.KNOWN_PARAMS["clip_h"]
    assert 768 + 1280 == c.cross_attention_dim
    assert 1280 + 6 * c.addition_time_embed_dim == c.projection_class_embeddings_input_dim


def test_realarch_tokenizer_has_the_real_vocab_size(tmp_path):
    from bench import realarch

    tok = realarch._write_tokenizer(str(tmp_path / "tok"), str(tmp_path))
    assert len(tok) == 49408
    assert tok.convert_tokens_to_ids("<|startoftext|>") == 49406
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 49407
    ids = tok("a photo of TOK").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and max(ids) == 49407  # pooled output = argmax(ids) = EOS


def test_realarch_materialize_small_component():
    import torch

    from bench import realarch

    te = realarch.materialize("clip_l", torch.bfloat16, seed=0)
    assert te.dtype == torch.bfloat16 and not any(p.is_meta for p in te.parameters())
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 3])
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
    assert out.hidden_states[-2].shape == (1, 7, 768)
    assert torch.isfinite(out.last_hidden_state.float()).all()


def test_auto_fit_runs_preflight_then_trains_with_its_plan(tmp_path, tiny_sdxl):
    from tests.conftest import write_dataset
    from trainer import TrainConfig, read_events, train

    data = str(tmp_path / "data")
    write_dataset(data)
    cfg = TrainConfig.from_sources(pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=data,
                                   output_dir=str(tmp_path / "run"), max_train_steps=4, auto_fit=True,
                                   train_text_encoder_ti=True)
    seen = []
    res = train(cfg, on_event=seen.append)
    assert res.step == 4
    assert any(e.type == "status" and e.phase == "preflight" for e in seen)
    started = [e for e in read_events(str(tmp_path / "run" / "events.jsonl")) if e["type"] == "started"][0]
    assert any(n.startswith("auto-fit: Fits") for n in started["notes"])


def test_stop_during_the_preflight_trains_nothing(tmp_path, tiny_sdxl):
    import threading

    from tests.conftest import write_dataset
    from trainer import TrainConfig, train

    data = str(tmp_path / "data")
    write_dataset(data)
    stop = threading.Event()

    def on_event(ev):
        if ev.type == "status" and ev.phase == "preflight":
            stop.set()

    cfg = TrainConfig.from_sources(pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=data,
                                   output_dir=str(tmp_path / "run"), max_train_steps=50, auto_fit=True)
    res = train(cfg, on_event=on_event, stop=stop)
    assert res.stopped and res.step == 0
    assert not os.path.exists(tmp_path / "run" / "pytorch_lora_weights.safetensors")
