"""``bench/gpu_table.sh --dry-run``: the one-shot GPU script runs end to end on the CPU at tiny sizes, so it is
ready when a GPU is. The expected rows and paths are written out here (not read from bench/gpu_table.py), so a
row or a path check that silently disappears from the script fails this test."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPECTED_ROWS = ["ours", "reference", "ours + gradient checkpointing", "ours + 8-bit AdamW", "ours fp16",
                 "ours + compile_unet"]
EXPECTED_PATHS = ["offload after the pivot", "compile_unet", "bf16 engine + LoRA", "fp16 loss scale", "adamw8bit",
                  "gradient checkpointing"]
NUMBER = re.compile(r"^\d+(\.\d+)?(e[-+]?\d+)?$")


def _table(lines: list[str]) -> dict[str, dict[str, str]]:
    """The printed table as {run: {column: cell}}, in order."""
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines if ln.startswith("|")]
    header, body = rows[0], [r for r in rows[2:]]
    return {r[0]: dict(zip(header, r)) for r in body}


def test_dry_run_prints_every_row_path_and_ratio(tiny_sdxl, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHON=sys.executable)  # the script's python: this one
    env.pop("OUT", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_table.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    stderr_log = (out / "stderr.log").read_text() if (out / "stderr.log").exists() else proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + stderr_log[-3000:]
    lines = proc.stdout.splitlines()

    table = _table(lines)
    assert list(table) == EXPECTED_ROWS, list(table)
    for name in EXPECTED_ROWS:
        cell = table[name]["steps/s"]
        if name == "ours + 8-bit AdamW":  # CUDA only: says why, in the trainer's words
            assert cell == "skipped" and "adamw8bit needs" in table[name]["notes"], table[name]
        else:
            assert NUMBER.match(cell) and float(cell) > 0, (name, table[name])
            assert NUMBER.match(table[name]["images/s"]), table[name]
            assert table[name]["peak memory"].endswith("(RSS)"), table[name]
    assert "fake_reference.py" in table["reference"]["notes"]  # a stand-in is never passed off as diffusers'
    assert table["ours"]["notes"].startswith("median of ") and table["ours"]["notes"].count(",") == 1  # 2 rounds
    assert "loss scale:" in table["ours fp16"]["notes"]
    assert "ours uncompiled after the pivot" in table["ours + compile_unet"]["notes"]

    paths = {m.group(1): m.group(2) for m in (re.match(r"^path (.+?): (.*)$", ln) for ln in lines) if m}
    assert list(paths) == EXPECTED_PATHS, paths
    assert paths["offload after the pivot"].startswith("ok:") and "in 2/2 runs" in paths["offload after the pivot"]
    # dynamo traced the trainer's compiled UNet (eager backend on CPU); without the pivot it never recompiles
    compiled = re.match(r"^ok: backend eager, graphs compiled: (\d+), graph breaks: \d+, recompiles: 0$",
                        paths["compile_unet"])
    assert compiled and int(compiled.group(1)) >= 1, paths["compile_unet"]
    engine = paths["bf16 engine + LoRA"]
    assert engine.startswith("ok: 64x64 image") and "dtype bfloat16" in engine and "LoRA loaded" in engine, engine
    assert paths["gradient checkpointing"] == "ok"
    assert paths["adamw8bit"].startswith("skipped: CUDA only")
    # fp16: every optimizer step of the row through the GradScaler's unscale / step / update (a CPU one standing
    # in for the GPU's), the scale read once at the end
    scaler = re.match(r"^ok: (\d+) optimizer steps through a CPU GradScaler standing in for accelerate's on the "
                      r"CPU, scale 65536 -> [\d.e+]+", paths["fp16 loss scale"])
    assert scaler and int(scaler.group(1)) >= 3, paths["fp16 loss scale"]  # warm-up + measured steps

    ratio = {m.group(1): float(m.group(2)) for m in (re.match(r"^ratio (\S+ ours/reference): ([\d.]+)$", ln)
                                                      for ln in lines) if m}
    assert set(ratio) == {"steps_per_s ours/reference", "peak_memory ours/reference",
                          "peak_memory_to_last_step ours/reference"}, lines[-8:]
    assert all(v > 0 for v in ratio.values())
    goal = [ln for ln in lines if ln.startswith("goal >= 1.5x steps/s")]
    assert goal and "(dry run: the goal is about the real model on a GPU" in goal[0]
    assert any(ln.startswith("MFU: n/a") for ln in lines)  # no GPU peak on a CPU
    # the table and its ratios come last (the device tool returns the end of the output)
    assert lines[-1].startswith("# gpu_table.sh:") and lines[-2] == goal[0]

    data = json.loads((out / "results.json").read_text())
    assert list(data["paths"]) == EXPECTED_PATHS and set(data["rows"]) == set(EXPECTED_ROWS)
    assert len(data["rows"]["ours"]) == 2 and len(data["rows"]["reference"]) == 2  # alternating rounds
    assert (out / "table.md").read_text().strip().splitlines()[-1] == goal[0]


def test_events_find_the_offload_and_a_loss_scale_however_the_trainer_names_it():
    from bench.gpu_checks import Events
    from trainer.events import Started, Status, Step

    def step(n, **extra):
        ev = Step(step=n, total=4, loss=0.1, lr=1.0, d_lr=None, s_per_it=0.1, eta_s=0.0)
        for k, v in extra.items():  # a field the trainer may add (e.g. the fp16 GradScaler's scale)
            setattr(ev, k, v)
        return ev

    plain = Events()
    for ev in (Started(run_dir="r", total_steps=4, num_images=3), step(1), step(2)):
        plain(ev)
    assert plain.offloaded_at is None and plain.loss_scale is None  # nothing is made up

    rec = Events()
    rec(step(1))
    rec(Status(phase="cache_text", message="4 prompt embeddings cached; text encoders moved off the GPU"))
    rec(step(2, loss_scale=65536.0))
    assert rec.offloaded_at == 1 and rec.loss_scale == "loss_scale=65536.0 (step 2)"
    noted = Events()
    noted(Status(phase="fp16", message="GradScaler: loss scale 32768"))
    assert noted.loss_scale.startswith("status fp16: GradScaler: loss scale")


def test_watch_scaler_sees_every_step_and_says_when_there_is_none(tiny_sdxl, tmp_path):
    """The fp16 path check on its own: a run without a scaler is a FAILED line, not a silent pass."""
    import torch

    from bench.gpu_checks import describe_scaler, watch_scaler
    from tests.conftest import write_dataset
    from trainer import TrainConfig, train

    torch.set_flush_denormal(True)
    data = str(tmp_path / "data")
    write_dataset(data)
    cfg = dict(pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=data, resolution=64, rank=2,
               max_train_steps=2, mixed_precision="fp16", optimizer="adamw", learning_rate=1e-4, seed=0)
    with watch_scaler(cpu_standin=False) as none:
        train(TrainConfig.from_sources(output_dir=str(tmp_path / "a"), **cfg))
    assert describe_scaler(none, "the CPU").startswith("FAILED: no GradScaler in 2 fp16 optimizer steps")
    with watch_scaler(cpu_standin=True) as seen:
        train(TrainConfig.from_sources(output_dir=str(tmp_path / "b"), **cfg))
    assert seen["steps"] == 2 and seen["unscaled"] == 0 and seen["init"] == 65536.0
    assert describe_scaler(seen, "the CPU").startswith("ok: 2 optimizer steps through a CPU GradScaler")
    from trainer.training.trainer import Trainer, apply_gradients

    assert Trainer.open.__name__ == "open" and apply_gradients.__name__ == "apply_gradients"  # patches undone


def test_adamw8bit_refusal_is_a_skip_that_says_why_on_either_device():
    from bench.gpu_table import adamw8bit_outcome

    said = ("ValueError: --optimizer adamw8bit needs bitsandbytes and a CUDA GPU (pip install bitsandbytes); "
            "use adamw or prodigy otherwise")
    missing = "ModuleNotFoundError: No module named 'bitsandbytes'"
    cpu = {"run": "ours + 8-bit AdamW", "error": said}
    line = adamw8bit_outcome(cpu, cuda=False, bnb=missing)
    assert line.startswith("skipped: CUDA only (and bitsandbytes is absent: ModuleNotFoundError") and "error" not in cpu
    gpu = {"run": "ours + 8-bit AdamW", "error": said}
    line = adamw8bit_outcome(gpu, cuda=True, bnb=missing)
    assert line.startswith("skipped: bitsandbytes does not import here (ModuleNotFoundError")
    assert "BNB_FULL=1 bash bench/gpu_wheels.sh .whl-full" in line and "--rows 'ours + 8-bit AdamW'" in line
    broken = {"run": "ours + 8-bit AdamW", "error": "RuntimeError: libbitsandbytes_cuda130.so not found"}
    line = adamw8bit_outcome(broken, cuda=True, bnb="RuntimeError: CUDA library missing")
    assert line.startswith("FAILED: RuntimeError") and "BNB_FULL=1" in line  # a real failure stays a failure
    assert adamw8bit_outcome({"run": "x", "steps_per_s": 1.0}, cuda=True, bnb=None) == "ok"


def test_versions_that_differ_from_constraints_are_named(tmp_path):
    import importlib.metadata as md

    from bench.gpu_checks import constraint_mismatches

    pins = tmp_path / "constraints.txt"
    pins.write_text(f"# comment\ndiffusers=={md.version('diffusers')}\npeft==0.0.1  # old\n")
    assert constraint_mismatches(str(pins), ("diffusers", "peft", "prodigyopt")) == [
        f"peft {md.version('peft')} here, constraints.txt pins 0.0.1"]  # unpinned names are not guessed
    assert constraint_mismatches(os.path.join(ROOT, "constraints.txt")) == []  # this CI's own install


def test_carried_wheels_install_first_on_the_path(tmp_path):
    """The GPU branch's install: wheels from a folder, no index, no dependencies, into a folder put first on
    PYTHONPATH, so a carried version wins over the machine's. A one-module wheel made here stands in for
    diffusers & co."""
    import zipfile

    wheels, site = tmp_path / "whl", tmp_path / "site"
    wheels.mkdir()
    dist = "lora_studio_probe-1.2.3.dist-info"
    files = {"lora_studio_probe.py": "VERSION = '1.2.3'\n",
             f"{dist}/METADATA": "Metadata-Version: 2.1\nName: lora_studio_probe\nVersion: 1.2.3\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(wheels / "lora_studio_probe-1.2.3-py3-none-any.whl", "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(f"{dist}/RECORD", "".join(f"{n},,\n" for n in [*files, f"{dist}/RECORD"]))
    env = dict(os.environ, PYTHON=sys.executable, GPU_TABLE_SITE=str(site), PIP_NO_INPUT="1")
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_table.sh"), "--wheels", str(wheels),
                           "--install-only", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"# installed 1 wheels from {wheels}" in proc.stdout
    assert f"# lora_studio_probe 1.2.3 from {site}" in proc.stdout, proc.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_table.sh"), "--wheels", str(empty),
                           "--install-only", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=60, env=env, cwd=ROOT)
    assert proc.returncode == 2 and "no wheels in" in proc.stderr and "gpu_wheels.sh" in proc.stderr
