"""Data parallel: two CPU ranks under torchrun (accelerate MULTI_CPU, gloo) equal one process at double batch;
a step counts global batches; rank 0 alone reports; a NaN seen by one rank stops them all; the auto-fit plan is
the same on every rank; gradients are averaged in buckets (all-reduces per step counted)."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from tests.conftest import write_dataset
from trainer.data.sampler import compute_total_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_ranks_match_one_process_at_double_batch(tmp_path, tiny_sdxl):
    data = str(tmp_path / "data")
    write_dataset(data)
    common = ["--pretrained_model_name_or_path", "tiny-sdxl", "--instance_data_dir", data, "--train_text_encoder_ti",
              "--optimizer", "adamw", "--learning_rate", "1e-3", "--text_encoder_lr", "1e-2",
              "--max_train_steps", "6", "--seed", "5", "--random_flip", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port for the rendezvous (port 0 is not accepted by torchrun)
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", port, "-m", "trainer", *common, "--train_batch_size", "1",
                          "--output_dir", str(tmp_path / "two")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "trainer", *common, "--train_batch_size", "2",
                          "--output_dir", str(tmp_path / "one")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "two" / "pytorch_lora_weights.safetensors"))
    init_gap = 0.0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
        init_gap = max(init_gap, a[k].abs().max().item())
    assert init_gap > 0
    ea = load_file(str(tmp_path / "one" / "one_emb.safetensors"))
    eb = load_file(str(tmp_path / "two" / "two_emb.safetensors"))
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=1e-3, atol=1e-4)
    # only rank 0 wrote the run folder's events (one line per step, not two)
    steps = [line for line in open(tmp_path / "two" / "events.jsonl") if '"type": "step"' in line]
    assert len(steps) == 6
    # rank 0 alone prints: one set of notes, one bar, one summary (torchrun relays both ranks' output)
    assert two.stdout.count("done:") == 1, two.stdout
    for line in ("[model] loading tiny-sdxl", "training:   0%"):  # a status line, the bar's first draw
        assert two.stderr.count(line) == one.stderr.count(line) == 1, (line, two.stderr[-2000:])


def _worker(tmp_path, mode: str, cfg: dict, timeout: int = 240) -> list[dict]:
    """Runs tests/mp_worker.py MODE on 2 CPU ranks under torchrun; the two ranks' records."""
    out = tmp_path / mode
    os.makedirs(out)
    path = tmp_path / f"{mode}.json"
    path.write_text(json.dumps({**cfg, "output_dir": str(out / "run")}))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", port, os.path.join(ROOT, "tests", "mp_worker.py"), mode,
                           str(path), str(out)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=timeout)
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1) if (out / f"rank{r}.json").exists()]
    assert len(records) == 2, proc.stderr[-3000:]
    return records


def _base(data: str, **kw) -> dict:
    return {**dict(pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=data, optimizer="adamw",
                   learning_rate=1e-3, text_encoder_lr=1e-2, seed=5, resolution=64, rank=2, train_batch_size=1,
                   checkpointing_steps=1000, log_every=1000), **kw}


def test_steps_per_image_counts_global_batches():
    cfg = SimpleNamespace(max_train_steps=None, steps_per_image=120, train_batch_size=2,
                          gradient_accumulation_steps=1, num_train_epochs=1)
    one, _ = compute_total_steps(cfg, 10, 5)
    four, _ = compute_total_steps(cfg, 10, 2, world=4)
    assert one == 600 and four == 150  # 1,200 images seen either way


def test_two_ranks_average_gradients_in_buckets_and_count_global_steps(tmp_path, tiny_sdxl):
    data = str(tmp_path / "data")
    write_dataset(data, sizes=((64, 64),) * 4)
    # text-encoder LoRA: three modules' LoRA tensors, averaged every step
    ranks = _worker(tmp_path, "count", _base(data, steps_per_image=2, train_text_encoder=True,
                                             train_text_encoder_frac=1.0))
    for rec in ranks:
        assert rec.get("error") is None, rec
        # steps_per_image 2 x 4 images / (2 ranks x batch 1) = 4 global steps (8 on one process at batch 1)
        assert rec["total"] == rec["step"] == math.ceil(2 * 4 / 2) == 4
        per_step = [b - a for a, b in zip(rec["marks"], rec["marks"][1:])]
        # one all-reduce per bucket (all of the tiny LoRA fits one 25 MB bucket), not one per tensor
        assert per_step == [1] * 3, (per_step, rec["tensors"])
        assert min(rec["tensors"]) > 50


def test_a_nan_on_rank_0_at_a_checkpoint_stops_every_rank(tmp_path, tiny_sdxl):
    data = str(tmp_path / "data")
    write_dataset(data, sizes=((64, 64),) * 4)
    ranks = _worker(tmp_path, "nan", _base(data, max_train_steps=4, checkpointing_steps=2), timeout=180)
    for rec in ranks:  # both ranks came back (none left waiting in wait_for_everyone) with the same error
        assert "NaN/inf at step 2" in rec.get("error", ""), rec
    assert not os.path.exists(tmp_path / "nan" / "run" / "checkpoints" / "step-2")


def test_auto_fit_plans_once_for_every_rank(tmp_path, tiny_sdxl):
    data = str(tmp_path / "data")
    write_dataset(data, sizes=((64, 64),) * 4)
    ranks = _worker(tmp_path, "autofit", _base(data, max_train_steps=3, auto_fit=True), timeout=240)
    # rank 1's budget (1 byte) is everyone's budget: both ranks measured the same settings and took the same plan
    assert ranks[0]["plan"] == ranks[1]["plan"], ranks
    assert ranks[0]["plan"]["attempts"] >= 2 and ranks[0]["plan"]["gradient_checkpointing"] is True
    assert all("does not fit" in r.get("error", "") for r in ranks), ranks
