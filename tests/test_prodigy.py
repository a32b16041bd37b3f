"""trainer/prodigy.py: the same parameters as prodigyopt.Prodigy, step for step, with one host read per step
instead of two per parameter."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from prodigyopt import Prodigy

from trainer.training.prodigy import SyncFreeProdigy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))


def _params(n_unet=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet = []
    for i in range(n_unet):
        unet.append(torch.nn.Parameter(torch.randn(8, 4, generator=g)))   # like lora_A
        unet.append(torch.nn.Parameter(torch.zeros(4, 8)))                 # like lora_B (zero init: p0 is a scalar)
    text = [torch.nn.Parameter(torch.randn(2, 16, generator=g))]          # like the new token rows
    return unet, text


def _run(cls, kw, steps=25, text_lr=1.0, n_unet=6, count=None):
    unet, text = _params(n_unet)
    opt = cls([{"params": unet, "name": "unet"}, {"params": text, "name": "text", "lr": text_lr}], lr=1.0, **kw)
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        for p in unet + text:
            p.grad = torch.randn(p.shape, generator=g) * (1 + i % 3)
        if i == 7:
            text[0].grad = None  # a parameter without a gradient this step
        if count is not None and i == steps - 1:
            with count:
                opt.step()
        else:
            opt.step()
    return [p.detach().clone() for p in unet + text], opt


CASES = [
    ({}, 1.0),
    (dict(weight_decay=0.01), 1.0),
    (dict(weight_decay=0.01, decouple=False), 1.0),
    (dict(use_bias_correction=True, safeguard_warmup=True), 1.0),
    (dict(betas=(0.0, 0.99)), 1.0),
    (dict(weight_decay=0.01, betas=(0.9, 0.99)), 0.0),  # a group at lr 0
    (dict(slice_p=3, d_coef=2.0, growth_rate=1.05, beta3=0.9), 1.0),
]


@pytest.mark.parametrize("all_at_once", [False, True], ids=["per-tensor (CPU)", "multi-tensor (CUDA)"])
@pytest.mark.parametrize("kw,text_lr", CASES)
def test_same_parameters_and_d_as_prodigyopt(kw, text_lr, all_at_once, monkeypatch):
    import trainer.training.prodigy

    if all_at_once:  # the grouping used for CUDA tensors, on CPU
        monkeypatch.setattr(trainer.training.prodigy, "_chunks", lambda params: [params] if params else [])
    ref, ref_opt = _run(Prodigy, kw, text_lr=text_lr)
    ours, ours_opt = _run(SyncFreeProdigy, kw, text_lr=text_lr)
    for a, b in zip(ref, ours):
        assert torch.equal(a, b)
    for key in ("d", "d_max", "d_hat", "d_numerator", "d_denom", "k"):
        assert ours_opt.param_groups[0][key] == pytest.approx(ref_opt.param_groups[0][key], rel=1e-12, abs=0)
    # same state layout: checkpoints load into either
    for p_ref, p_ours in zip(ref_opt.state, ours_opt.state):
        assert ref_opt.state[p_ref].keys() == ours_opt.state[p_ours].keys()
    other = Prodigy([{"params": _params()[0]}, {"params": _params()[1], "lr": text_lr}], lr=1.0, **kw)
    other.load_state_dict(ours_opt.state_dict())


def test_one_host_read_per_step_instead_of_two_per_parameter():
    from optimizer_step import HostReads  # bench/optimizer_step.py counts the same way

    n_unet = 50  # 100 LoRA tensors + 1 embedding tensor
    ref_count, ours_count = HostReads(), HostReads()
    _run(Prodigy, {}, steps=3, n_unet=n_unet, count=ref_count)
    _run(SyncFreeProdigy, {}, steps=3, n_unet=n_unet, count=ours_count)
    assert ref_count.n == 2 * (2 * n_unet + 1)
    assert ours_count.n == 1


def test_trainer_uses_it_for_prodigy(tmp_path):
    from trainer import TrainConfig
    from trainer.training.optim import build_optimizer

    cfg = TrainConfig.from_dict(dict(pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=str(tmp_path),
                                     output_dir=str(tmp_path / "o"), optimizer="prodigy", learning_rate=1.0))
    opt = build_optimizer(cfg, [{"params": [torch.nn.Parameter(torch.zeros(2))], "name": "unet"}])
    assert type(opt) is SyncFreeProdigy


def test_optimizer_benchmark_counts_the_reads(tiny_sdxl):
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "bench", "optimizer_step.py"), "--model", "tiny-sdxl",
                           "--steps", "2", "--rounds", "1"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    n = int(lines[0].split(": ")[1].split(" LoRA tensors")[0])
    assert "prodigyopt.prodigy.Prodigy" in lines[1] and f"{2 * n} host reads/step" in lines[1]
    assert "SyncFreeProdigy" in lines[2] and " 1 host reads/step" in lines[2]


def test_prodigy_with_another_text_encoder_lr_trains_with_one_lr(tmp_path, dataset, tiny_sdxl):
    """prodigyopt refuses a second non-zero lr at its first step; like diffusers' script, every group then uses
    --learning_rate, and the run says so (it used to die at step 1 after loading the model)."""
    from trainer import TrainConfig, read_events, train

    cfg = TrainConfig.from_sources(pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=dataset,
                                   output_dir=str(tmp_path / "r"), max_train_steps=2, rank=4, seed=1,
                                   optimizer="prodigy", learning_rate=1.0, text_encoder_lr=0.5,
                                   train_text_encoder_ti=True)
    assert cfg.effective_text_lr == 1.0 and any("--text_encoder_lr 0.5 is ignored" in w for w in cfg.warnings())
    res = train(cfg)
    assert res.step == 2
    notes = [n for e in read_events(os.path.join(res.run_dir, "events.jsonl")) for n in e.get("notes", [])]
    assert any("--text_encoder_lr 0.5 is ignored" in n for n in notes)
    # AdamW keeps its own text lr
    assert cfg.replace(optimizer="adamw", learning_rate=1e-4, text_encoder_lr=3e-4).effective_text_lr == 3e-4


def test_presets_agree_with_prodigy_one_lr():
    """Every preset that chooses Prodigy gives the text parameters the UNet's lr (nothing is silently ignored)."""
    from trainer.config.files import available_presets, load_preset

    for name in available_presets():
        values = load_preset(name)
        if values.get("optimizer") == "prodigy":
            assert values.get("text_encoder_lr") in (None, values["learning_rate"]), name
