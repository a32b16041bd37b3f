"""Stop answers within one step, also while sample images are being rendered: the render is interrupted (not
finished) and the run ends at that step with its checkpoint."""
from __future__ import annotations

import os

import torch

from tests.conftest import write_dataset
from trainer import TrainConfig, read_events, train
from trainer.checkpoint import latest_checkpoint
from trainer.training import validation


def test_stop_during_a_sample_render_ends_the_run_at_that_step(tmp_path, tiny_sd, monkeypatch):
    torch.set_flush_denormal(True)
    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    write_dataset(data, sizes=((64, 64),) * 3)
    stop_flag = __import__("threading").Event()
    denoised = []
    real_render = validation.render

    def render(*a, **kw):  # Stop is pressed after the sample's 2nd denoising step
        def on_step(step, total):
            denoised.append(step)
            if step == 2:
                stop_flag.set()
        return real_render(*a, on_step=on_step, **kw)

    monkeypatch.setattr(validation, "render", render)
    cfg = TrainConfig.from_sources(
        pretrained_model_name_or_path="tiny-sd", instance_data_dir=data, output_dir=out, resolution=64, rank=4,
        max_train_steps=20, checkpointing_steps=100, validation_steps=3, validation_inference_steps=40,
        num_validation_images=2, validation_prompt="a photo of TOK", optimizer="adamw", learning_rate=1e-4, seed=1)
    res = train(cfg, stop=stop_flag)
    assert res.stopped and res.step == 3, res
    assert max(denoised) <= 3 and len(denoised) <= 3  # 40 steps x 2 images were asked for
    assert latest_checkpoint(os.path.join(out, "checkpoints")).endswith("step-3")
    events = read_events(os.path.join(out, "events.jsonl"))
    assert not [e for e in events if e["type"] == "sample"]
    assert [e for e in events if e["type"] == "status" and "interrupted by Stop" in e.get("message", "")]
