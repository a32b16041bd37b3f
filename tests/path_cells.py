"""One user path, end to end on the tiny models: train a few steps (in this process, or as 2 ranks under torchrun),
export, reload the written files, and generate one image with them through the Generate engine. Shared by the
path matrix (tests/test_path_matrix.py) and the floors check (tests/test_floors.py)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_MODES = {
    "pivotal": dict(train_text_encoder_ti=True, train_text_encoder_ti_frac=0.5),
    "te-lora": dict(train_text_encoder=True, train_text_encoder_frac=0.5),
    "none": {},
}


def cell_config(data: dict, out: str, *, precision: str = "no", text: str = "pivotal", prior: Optional[str] = None,
                steps: int = 4, **extra) -> dict:
    """The TrainConfig fields of one cell (64 px, rank 2, AdamW, a checkpoint every step). ``data``: the data
    source's own fields (instance_data_dir / dataset_name, caption_column, ...); ``prior``: a class-image folder
    for prior preservation."""
    cfg = dict(pretrained_model_name_or_path="tiny-sdxl", output_dir=out, instance_prompt="a photo of TOK",
               optimizer="adamw", learning_rate=1e-3, text_encoder_lr=1e-2, max_train_steps=steps,
               checkpointing_steps=1, seed=3, resolution=64, rank=2, mixed_precision=precision,
               train_batch_size=1, **data, **TEXT_MODES[text])
    if prior:
        cfg.update(with_prior_preservation=True, class_data_dir=prior, class_prompt="a photo of a dog",
                   num_class_images=2)
    cfg.update(extra)
    return cfg


def free_port() -> str:
    """A free local port for torchrun's rendezvous (port 0 is not accepted by torchrun)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def train_cell(cfg: dict, processes: int = 1) -> None:
    """Trains ``cfg``: in this process, or as ``processes`` CPU ranks (gloo) under torchrun with ``--config``."""
    if processes == 1:
        from trainer import TrainConfig, train

        train(TrainConfig.from_sources(**cfg))
        return
    os.makedirs(cfg["output_dir"], exist_ok=True)
    path = os.path.join(os.path.dirname(cfg["output_dir"]), os.path.basename(cfg["output_dir"]) + ".json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                           "--master_addr", "127.0.0.1", "--master_port", free_port(), "-m", "trainer",
                           "--config", path], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def copy_checkpoint(src_run: str, dst_run: str, step: int) -> None:
    """A new run folder holding only ``src_run``'s checkpoint ``step-<step>`` (what a crash there leaves)."""
    os.makedirs(os.path.join(dst_run, "checkpoints"))
    shutil.copytree(os.path.join(src_run, "checkpoints", f"step-{step}"),
                    os.path.join(dst_run, "checkpoints", f"step-{step}"))


def reload_and_generate(run_dir: str, engine) -> np.ndarray:
    """Reloads the run's files (diffusers and kohya LoRA, embeddings when present; every value finite) and
    generates one 64 px image with them through ``engine``; returns the image as an array."""
    from generation import request_from_run

    name = os.path.basename(run_dir.rstrip("/"))
    files = ["pytorch_lora_weights.safetensors", f"{name}.safetensors"]
    if os.path.exists(os.path.join(run_dir, f"{name}_emb.safetensors")):
        files.append(f"{name}_emb.safetensors")
    for fname in files:
        sd = load_file(os.path.join(run_dir, fname))
        assert sd and all(torch.isfinite(v.float()).all() for v in sd.values()), fname
    result = engine.generate(request_from_run(run_dir, prompt="a photo of TOK", steps=2, width=64, height=64,
                                              seed=1))
    image = np.asarray(result.images[0])
    assert image.shape == (64, 64, 3) and image.std() > 0
    return image


def assert_same_lora(run_a: str, run_b: str, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """The two runs wrote the same diffusers LoRA (a resumed run ends where the straight run ends)."""
    a = load_file(os.path.join(run_a, "pytorch_lora_weights.safetensors"))
    b = load_file(os.path.join(run_b, "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=rtol, atol=atol, msg=k)
