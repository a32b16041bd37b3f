"""Resume works from a checkpoint at every step around the text boundaries (the pivot of pivotal tuning and
``te_stop_step`` of the text-encoder LoRA): before, at and after each, the resumed run ends where the straight
run ends."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from trainer import TrainConfig, train

torch.set_flush_denormal(True)


def _cfg(dataset, out, **kw) -> TrainConfig:
    base = dict(pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=dataset, output_dir=out,
                optimizer="adamw", learning_rate=1e-3, text_encoder_lr=5e-2, max_train_steps=6,
                checkpointing_steps=1, seed=7, resolution=64, rank=2)
    base.update(kw)
    return TrainConfig.from_sources(**base)


@pytest.mark.parametrize("text", [dict(train_text_encoder_ti=True, train_text_encoder_ti_frac=0.5),
                                  dict(train_text_encoder=True, train_text_encoder_frac=0.5)],
                         ids=["pivotal", "te-lora"])
def test_resume_from_each_step_around_the_boundary(dataset, tmp_path, tiny_sdxl, text):
    boundary = 3  # int(0.5 * 6)
    straight = train(_cfg(dataset, str(tmp_path / "straight"), **text))
    want = load_file(straight.artifacts["diffusers"])
    for at in (boundary - 1, boundary, boundary + 1):
        run = tmp_path / f"from-{at}"
        os.makedirs(run / "checkpoints")
        shutil.copytree(tmp_path / "straight" / "checkpoints" / f"step-{at}", run / "checkpoints" / f"step-{at}")
        resumed = train(_cfg(dataset, str(run), resume_from_checkpoint="latest", **text))
        assert resumed.step == 6 and not resumed.stopped, at
        got = load_file(resumed.artifacts["diffusers"])
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"resumed at {at}: {k}")
