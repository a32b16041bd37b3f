"""Faults lose at most one checkpoint: SIGKILL at named fault points (mid-steps, mid-write, the pivot), a kill
during a checkpoint write, a full disk, an out-of-memory error and a NaN loss each stop cleanly and leave the
previous checkpoint intact."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_dataset
from trainer import TrainConfig, read_events, train
from trainer.checkpoint import latest_checkpoint, load_checkpoint
from trainer.training.errors import TrainingError
from trainer.training.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 60


def args(data, out, *extra):
    return ["--pretrained_model_name_or_path", "tiny-sdxl", "--instance_data_dir", data, "--output_dir", out,
            "--train_text_encoder_ti", "--train_text_encoder_ti_frac", "0.5", "--optimizer", "prodigy",
            "--learning_rate", "1.0", "--rank", "4", "--max_train_steps", str(STEPS), "--checkpointing_steps", "4",
            "--seed", "11", *extra]


def assert_same_result(a_dir, b_dir):
    a = load_file(os.path.join(a_dir, "pytorch_lora_weights.safetensors"))
    b = load_file(os.path.join(b_dir, "pytorch_lora_weights.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    ea = load_file(os.path.join(a_dir, os.path.basename(a_dir) + "_emb.safetensors"))
    eb = load_file(os.path.join(b_dir, os.path.basename(b_dir) + "_emb.safetensors"))
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=1e-5, atol=1e-6)


def steps_logged(out) -> int:
    ev = read_events(os.path.join(out, "events.jsonl"))
    return len([e for e in ev if e["type"] == "step"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_sdxl):
    root = tmp_path_factory.mktemp("straight")
    data = str(root / "data")
    write_dataset(data)
    out = str(root / "run")
    proc = subprocess.run([sys.executable, "-m", "trainer", *args(data, out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return data, out


KILL_AT = r"""
import os, signal, sys
from trainer import TrainConfig, train
data, out, point, nth, resume = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
cfg_args = dict(pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=data, output_dir=out,
                train_text_encoder_ti=True, optimizer="prodigy", learning_rate=1.0, rank=4, max_train_steps=%d,
                checkpointing_steps=4, seed=11, resume_from_checkpoint=resume or None)
seen = {"n": 0}
def hook(where):
    if where == point:
        seen["n"] += 1
        if seen["n"] == nth:   # the named fault point, its nth time: SIGKILL, nothing flushed or cleaned up
            os.kill(os.getpid(), signal.SIGKILL)
train(TrainConfig.from_sources(**cfg_args), fault_hook=hook)
""" % STEPS

# (fault point, its nth occurrence, resume): mid-steps between two checkpoints (step 7, after step-4), inside the
# second checkpoint write after resuming (step-12: weights written, optimizer not yet), and at the pivot step
# (30 of 60, after step-28). Each run resumes from what the one before left.
KILLS = [("before-optimizer-step:6", 1, ""), ("mid-write", 2, "latest"), ("before-optimizer-step:30", 1, "latest")]


def test_sigkill_at_named_points_then_resume_equals_an_uninterrupted_run(straight, tmp_path):
    data, reference = straight
    out = str(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    latest = []
    for point, nth, resume in KILLS:
        proc = subprocess.run([sys.executable, "-c", KILL_AT, data, out, point, str(nth), resume], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        latest.append(os.path.basename(latest_checkpoint(os.path.join(out, "checkpoints"))))
    assert latest == ["step-4", "step-8", "step-28"]  # each kill lost at most the steps since the last checkpoint
    final = subprocess.run([sys.executable, "-m", "trainer", *args(data, out, "--resume_from_checkpoint", "latest")],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert_same_result(reference, out)


KILL_DURING_WRITE = r"""
import os, signal, sys
from trainer import TrainConfig, train
cfg_args = dict(pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=sys.argv[1], output_dir=sys.argv[2],
                train_text_encoder_ti=True, optimizer="prodigy", learning_rate=1.0, rank=4, max_train_steps=%d,
                checkpointing_steps=4, seed=11)
state = {"writes": 0}
def hook(where):
    if where == "mid-write":
        state["writes"] += 1
        if state["writes"] == 3:   # the step-12 checkpoint: weights written, optimizer not yet
            os.kill(os.getpid(), signal.SIGKILL)
train(TrainConfig.from_sources(**cfg_args), fault_hook=hook)
""" % STEPS


def test_kill_during_checkpoint_write_never_leaves_a_broken_latest(straight, tmp_path):
    data, reference = straight
    out = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, data, out], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    ckdir = os.path.join(out, "checkpoints")
    names = sorted(os.listdir(ckdir))
    assert "step-12" not in names and any(n.startswith("step-12.tmp-") for n in names)
    assert latest_checkpoint(ckdir).endswith("step-8")
    load_checkpoint(latest_checkpoint(ckdir))  # complete and loadable
    final = subprocess.run([sys.executable, "-m", "trainer", *args(data, out, "--resume_from_checkpoint", "latest")],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert not any(".tmp-" in n for n in os.listdir(ckdir))  # swept on the next save
    assert_same_result(reference, out)


def _small_cfg(data, out, **kw):
    base = dict(pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=data, output_dir=out,
                train_text_encoder_ti=True, optimizer="adamw", learning_rate=1e-3, rank=4, max_train_steps=20,
                checkpointing_steps=5, seed=3)
    base.update(kw)
    return TrainConfig.from_sources(**base)


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs when this machine lets us mount one (root in CI does), else None."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    yield str(mnt) if ok else None
    if ok:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_stops_with_a_message_and_keeps_the_previous_checkpoint(tmp_path, tmpfs, tiny_sdxl):
    data = str(tmp_path / "data")
    write_dataset(data)
    root = tmpfs or str(tmp_path / "disk")
    out = os.path.join(root, "run")
    events = []
    hook = None

    def on_event(ev):
        events.append(ev)
        if ev.type == "checkpoint" and ev.step == 5 and tmpfs:
            # fill the rest of the tmpfs: the next checkpoint cannot be written
            with open(os.path.join(root, "filler"), "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError:
                    pass

    if not tmpfs:  # no mount allowed here: the same OSError, injected
        def hook(where):
            if where == "mid-write" and any(e.type == "checkpoint" for e in events):
                raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(TrainingError) as err:
        train(_small_cfg(data, out), on_event=on_event, fault_hook=hook)
    assert "disk is full" in str(err.value)
    failed = [e for e in events if e.type == "failed"]
    assert failed and "disk is full" in failed[0].error
    ck = os.path.join(out, "checkpoints")
    assert latest_checkpoint(ck).endswith("step-5")
    load_checkpoint(os.path.join(ck, "step-5"))
    assert not any(".tmp-" in n for n in os.listdir(ck))


def test_out_of_memory_is_reported_with_advice_and_keeps_the_checkpoint(tmp_path, tiny_sdxl):
    data = str(tmp_path / "data")
    write_dataset(data)
    out = str(tmp_path / "run")

    def hook(where):
        if where == "before-optimizer-step:7":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(TrainingError) as err:
        train(_small_cfg(data, out), fault_hook=hook)
    assert "out of memory" in str(err.value) and "gradient_checkpointing" in err.value.advice
    failed = [e for e in read_events(os.path.join(out, "events.jsonl")) if e["type"] == "failed"][0]
    assert "--train_batch_size" in failed["advice"] and failed["step"] == 7
    assert latest_checkpoint(os.path.join(out, "checkpoints")).endswith("step-5")


def test_nan_loss_stops_without_saving_a_broken_lora(tmp_path, tiny_sdxl):
    data = str(tmp_path / "data")
    write_dataset(data)
    out = str(tmp_path / "run")
    holder = {}

    def hook(where):
        if where == "before-optimizer-step:6":
            with torch.no_grad():
                for p in holder["t"].optimizer.param_groups[0]["params"]:
                    p.fill_(float("nan"))

    t = Trainer(_small_cfg(data, out), fault_hook=hook)
    holder["t"] = t
    with pytest.raises(TrainingError) as err:
        t.run()
    assert "nan" in str(err.value).lower()
    assert not os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors"))
    ck = os.path.join(out, "checkpoints")
    assert latest_checkpoint(ck).endswith("step-5")
    sd = load_checkpoint(os.path.join(ck, "step-5"))["tensors"]["lora_unet"]
    assert all(torch.isfinite(v).all() for v in sd.values())
