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
