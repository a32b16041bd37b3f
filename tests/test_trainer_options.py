"""Options that must really do something: optimizers, schedules, noise offset, DoRA, checkpoint limits,
trackers, Hub datasets; and secrets that must never be written."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from trainer import TrainConfig, read_events, train
from trainer.training.errors import TrainingError
from trainer.training.trainer import Trainer

BASE = dict(pretrained_model_name_or_path="tiny-sdxl", max_train_steps=4, rank=4, seed=1)


def cfg(dataset, out, **kw):
    return TrainConfig.from_sources(**{**BASE, "instance_data_dir": dataset, "output_dir": out, **kw})


@pytest.mark.parametrize("optimizer,lr", [("adafactor", 1e-3), ("prodigy", 1.0), ("adamw", 1e-3)])
def test_optimizers_train(dataset, tmp_path, tiny_sdxl, optimizer, lr):
    t = Trainer(cfg(dataset, str(tmp_path / "r"), optimizer=optimizer, learning_rate=lr)).open()
    t.setup()
    before = {n: p.detach().clone() for n, p in t.comps.unet.named_parameters() if p.requires_grad}
    t.train_steps(0, t.total)
    after = dict(t.comps.unet.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_adamw8bit_without_cuda_says_so(dataset, tmp_path, tiny_sdxl):
    with pytest.raises(TrainingError, match="adamw8bit"):
        train(cfg(dataset, str(tmp_path / "r"), optimizer="adamw8bit"))


@pytest.mark.parametrize("sched", ["constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                   "polynomial"])
def test_lr_schedules_follow_their_shape(dataset, tmp_path, tiny_sdxl, sched):
    res = train(cfg(dataset, str(tmp_path / "r"), lr_scheduler=sched, lr_warmup_steps=2, learning_rate=1e-3,
                    optimizer="adamw", max_train_steps=6, lr_num_cycles=2, lr_power=2.0))
    lrs = [e["lr"] for e in read_events(os.path.join(res.run_dir, "events.jsonl")) if e["type"] == "step"]
    assert lrs[0] < 1e-3  # warm-up
    if sched == "constant_with_warmup":
        assert lrs[-1] == pytest.approx(1e-3)
    else:
        assert lrs[-1] < max(lrs)


def test_pivotal_optimizer_state_is_new_tokens_times_hidden_sizes(dataset, tmp_path, tiny_sdxl):
    t = Trainer(cfg(dataset, str(tmp_path / "r"), train_text_encoder_ti=True, optimizer="adamw",
                    learning_rate=1e-3, max_train_steps=4)).open()
    t.setup()
    t.train_steps(0, 1)  # one step, before the pivot
    text = [g for g in t.optimizer.param_groups if g["name"] == "text"][0]
    trainable = sum(p.numel() for p in text["params"])
    assert trainable == 2 * (32 + 48)  # 2 new tokens x (CLIP-L width + CLIP-G width), not the vocabulary
    state = sum(v.numel() for p in text["params"] for v in t.optimizer.state[p].values() if v.ndim > 0)
    assert state == 2 * trainable  # Adam's two moments, for the new rows only


def test_noise_offset_and_dora_and_snr(dataset, tmp_path, tiny_sdxl):
    res = train(cfg(dataset, str(tmp_path / "r"), noise_offset=0.1, use_dora=True, snr_gamma=5.0))
    sd = load_file(res.artifacts["diffusers"])
    assert any("magnitude" in k or "dora" in k for k in sd), list(sd)[:5]
    # the card states what ComfyUI and A1111 make of this DoRA, measured on the trained layers
    card = open(res.artifacts["model_card"]).read()
    assert "## DoRA in each tool" in card and card.count("measured on this file") == 2


def test_checkpoints_total_limit(dataset, tmp_path, tiny_sdxl):
    res = train(cfg(dataset, str(tmp_path / "r"), max_train_steps=8, checkpointing_steps=2,
                    checkpoints_total_limit=2))
    assert sorted(os.listdir(os.path.join(res.run_dir, "checkpoints"))) == ["step-6", "step-8"]


def test_missing_tracker_package_is_a_clear_error(dataset, tmp_path, tiny_sdxl, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(TrainingError, match="pip install wandb"):
        train(cfg(dataset, str(tmp_path / "r"), report_to="wandb"))


def test_hub_dataset_columns_through_datasets(tmp_path, tiny_sdxl, monkeypatch):
    """The --dataset_name path for Hub datasets (load_dataset is replaced by an in-memory dataset, as the Hub
    is unreachable here): image and caption columns are used, a wrong column is named in the error."""
    import datasets
    from PIL import Image

    from trainer.data.sources import DatasetError, load_items

    rows = {"image": [Image.new("RGB", (64 + 16 * i, 64), (i * 40, 0, 0)) for i in range(3)],
            "prompt": [f"TOK icon {i}" for i in range(3)]}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict(rows))
    c = TrainConfig.from_sources(pretrained_model_name_or_path="tiny-sdxl", dataset_name="someone/icons",
                                 caption_column="prompt", output_dir=str(tmp_path / "o"))
    items, problems = load_items(c)
    assert [it.caption for it in items] == rows["prompt"] and items[2].size == (96, 64) and not problems
    with pytest.raises(DatasetError, match="caption_column 'text'.*columns"):
        load_items(c.replace(caption_column="text"))


def test_hub_token_never_lands_in_the_run_folder(dataset, tmp_path, tiny_sdxl):
    token = "hf_SuperSecretTokenValue1234567890"
    events = []
    with pytest.raises(TrainingError) as err:
        train(cfg(dataset, str(tmp_path / "r"), push_to_hub=True, hub_model_id="someone/lora", hub_token=token),
              on_event=events.append)
    assert "Push to the Hub failed" in str(err.value) and token not in str(err.value)
    assert all(token not in str(e.to_dict()) for e in events)
    for dirpath, _, files in os.walk(tmp_path / "r"):
        for f in files:
            data = open(os.path.join(dirpath, f), "rb").read()
            assert token.encode() not in data, f


def test_final_samples_use_the_learnt_tokens(dataset, tmp_path, tiny_sdxl):
    res = train(cfg(dataset, str(tmp_path / "r"), train_text_encoder_ti=True, validation_prompt="a photo of TOK",
                    num_validation_images=1, validation_inference_steps=2, validation_steps=2))
    samples = [e for e in read_events(os.path.join(res.run_dir, "events.jsonl")) if e["type"] == "sample"]
    assert [s["step"] for s in samples] == [2, 4]  # every validation_steps, plus the final one
    assert all(s["prompt"] == "a photo of <s0><s1>" for s in samples)
    assert all(os.path.exists(p) for s in samples for p in s["images"])
    assert "final-step-4-0.png" in open(res.artifacts["model_card"]).read()


@pytest.mark.parametrize("extra", [{"gradient_checkpointing": True}, {"mixed_precision": "bf16"}])
def test_memory_options_train_finite(dataset, tmp_path, tiny_sdxl, extra):
    res = train(cfg(dataset, str(tmp_path / "r"), train_text_encoder_ti=True, **extra))
    assert res.step == 4 and res.final_loss == res.final_loss
    # the LoRA trains in fp32 under a bf16 base: the checkpoint holds it so; the file is --save_precision (fp16)
    ckpt = os.path.join(res.artifacts["checkpoint"], "lora_unet.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in load_file(ckpt).values())
    sd = load_file(res.artifacts["diffusers"])
    assert all(v.dtype == torch.float16 and torch.isfinite(v).all() for v in sd.values())


def test_text_encoders_leave_the_device_after_the_pivot_and_are_not_called_again(dataset, tmp_path, tiny_sdxl,
                                                                                 monkeypatch):
    """The GPU-only path (every caption encoded once at the pivot, then the encoders move to the CPU) run on CPU:
    after the pivot each encoder runs exactly once (one batch of all captions), and the LoRA and embeddings
    match a run that encodes lazily."""

    def run(offload: bool, out: str):
        if offload:
            monkeypatch.setattr(Trainer, "OFFLOAD_TEXT_ENCODERS_FROM", ("cuda", "cpu"))
        else:
            monkeypatch.setattr(Trainer, "OFFLOAD_TEXT_ENCODERS_FROM", ("cuda",))
        step = [0]
        events = []

        def on_event(ev):
            events.append(ev)
            if getattr(ev, "type", "") == "step":
                step[0] = ev.step

        t = Trainer(cfg(dataset, out, train_text_encoder_ti=True, train_text_encoder_ti_frac=0.5,
                        max_train_steps=6, cache_text_embeddings=True), on_event=on_event)
        t.open()
        t.setup()
        calls = {0: [], 1: []}
        for i, te in enumerate(t.comps.text_encoders):
            te.register_forward_hook(lambda *a, i=i: calls[i].append(step[0]))
        res = t.train_steps(t.step, t.total)
        return t, res, calls, events

    t_off, res_off, calls_off, ev_off = run(True, str(tmp_path / "offload"))
    assert t_off.text.offloaded and t_off.pivot_step == 3
    assert [c for c in calls_off[0] if c >= 3] == [3] and [c for c in calls_off[1] if c >= 3] == [3]
    assert any(getattr(e, "phase", "") == "cache_text" and "moved off" in e.message for e in ev_off)
    assert all(p.device.type == "cpu" for te in t_off.comps.text_encoders for p in te.parameters())

    t_lazy, res_lazy, calls_lazy, _ = run(False, str(tmp_path / "lazy"))
    assert not t_lazy.text.offloaded
    assert len([c for c in calls_lazy[0] if c >= 3]) >= 2  # the check above can tell the two paths apart
    for key in ("diffusers", "embeddings"):
        a, b = load_file(res_off.artifacts[key]), load_file(res_lazy.artifacts[key])
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_compile_unet_really_compiles_and_trains_the_same(tmp_path, tiny_sdxl):
    """--compile_unet runs the UNet through torch.compile (inductor; a C compiler is on the CI machine) and learns
    the same LoRA as eager within float tolerance."""
    import torch._dynamo

    from tests.conftest import write_dataset

    dataset = str(tmp_path / "data")
    write_dataset(dataset, sizes=((64, 64),) * 3)  # one bucket: one graph to compile (each shape is another)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    kw = dict(max_train_steps=3, resolution=64, train_batch_size=1)
    eager = train(cfg(dataset, str(tmp_path / "eager"), **kw))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    compiled = train(cfg(dataset, str(tmp_path / "compiled"), compile_unet=True, **kw))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the UNet really went through dynamo
    torch._dynamo.reset()
    a, b = load_file(eager.artifacts["diffusers"]), load_file(compiled.artifacts["diffusers"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)


def test_log_every_reads_the_mean_loss_since_the_last_read(dataset, tmp_path, tiny_sdxl):
    """--log_every N reads the device loss every N steps and logs the mean of the steps since the last read:
    also after a resume (fewer steps since the read) and at the last step (the remainder)."""

    def losses(log_every: int, out: str, start: int = 0) -> dict:
        seen = {}

        def on_event(ev):
            if getattr(ev, "type", "") == "step":
                seen[ev.step] = ev.loss

        t = Trainer(cfg(dataset, out, max_train_steps=8, optimizer="adamw", learning_rate=1e-3,
                        log_every=log_every), on_event=on_event).open()
        t.setup()
        res = t.train_steps(start, t.total)
        return seen, res

    for start in (0, 4):  # 4: as after resuming at step 4 (steps 5 and 6 before the first read at 6)
        every, res1 = losses(1, str(tmp_path / f"one-{start}"), start)
        sparse, res3 = losses(3, str(tmp_path / f"three-{start}"), start)
        assert sorted(sparse) == list(range(start + 1, 9))
        read = {s: v for s, v in sparse.items() if v is not None}
        assert sorted(read) == sorted({s for s in sparse if s % 3 == 0} | {8})
        last = start
        for s in sorted(read):
            window = [every[k] for k in range(last + 1, s + 1)]
            assert read[s] == pytest.approx(sum(window) / len(window), rel=1e-5), (start, s)
            last = s
        assert res3.final_loss == pytest.approx(read[8]) and res1.final_loss == pytest.approx(every[8])


def test_progress_views_keep_the_last_loss_read_between_reads():
    """With --log_every N most step events carry no loss; the app and the CLI bar show the last one read."""
    import io

    from trainer.events import Started, Step
    from trainer.progress import CliProgress
    from ui.train_tab import summarize

    evs = [{"type": "step", "step": s, "total": 20, "loss": (0.5 if s == 10 else None), "lr": 1e-3}
           for s in range(1, 21)]
    s = summarize({"state": "running", "run": "r", "events": evs, "position": 0})
    assert s["loss"] == 0.5 and s["losses"] == [[10, 0.5]]
    assert s["log"] == ["step 10/20 loss 0.5", "step 20/20 loss 0.5"]

    bar = CliProgress(stream=io.StringIO())
    bar(Started(run_dir="r", total_steps=20, start_step=0, num_images=4, notes=[]))
    for e in evs[:12]:
        bar(Step(step=e["step"], total=20, loss=e["loss"], lr=1e-3, d_lr=None, s_per_it=0.1, eta_s=1.0, epoch=0,
                 text_trainable=False))
    assert bar.bar.postfix and "loss=0.5000" in bar.bar.postfix
    bar.close()


def _lora_after_two_steps(dataset, out, **kw):
    # a batch of 4: the per-sample min-SNR weights change the gradient's direction, which AdamW does not undo
    res = train(cfg(dataset, out, max_train_steps=2, train_batch_size=4, **kw))
    return load_file(res.artifacts["diffusers"])


def test_noise_offset_and_min_snr_each_change_training(dataset, tmp_path, tiny_sdxl):
    """Each option changes the trained weights (the same seed without it gives bit-identical weights), so a loop
    that ignored --noise_offset or --snr_gamma fails here."""
    base = _lora_after_two_steps(dataset, str(tmp_path / "a"))
    again = _lora_after_two_steps(dataset, str(tmp_path / "b"))
    assert all(torch.equal(base[k], again[k]) for k in base)  # deterministic: a difference means the option acted
    for name, extra in (("offset", {"noise_offset": 0.1}), ("snr", {"snr_gamma": 0.05})):
        other = _lora_after_two_steps(dataset, str(tmp_path / name), **extra)
        assert any(not torch.equal(base[k], other[k]) for k in base), f"{extra} changed nothing"
