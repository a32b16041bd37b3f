"""Data parallel: two CPU ranks under torchrun (accelerate MULTI_CPU, gloo) equal one process at double batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from tests.conftest import write_dataset

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
