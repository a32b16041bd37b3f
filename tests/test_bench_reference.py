"""``bench/train_speed.py --compare-reference``: the launcher, the step-rate reader and the torchvision stand-in,
driven with a stand-in reference script that behaves like diffusers' (tqdm ``k/N [`` counter on stderr, image
transforms from torchvision, relative --output_dir). The real diffusers script cannot be fetched in CI (it is
not on PyPI); set LORA_STUDIO_DIFFUSERS_SRC to a diffusers checkout to run it too (last test)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDIN = os.path.join(ROOT, "tests", "fixtures", "torchvision_standin")
sys.path.insert(0, os.path.join(ROOT, "bench"))
import train_speed  # noqa: E402

# A reference script: same flags as diffusers' advanced script, steps of `FAKE_STEP_S` seconds, a 64 MiB buffer.
FAKE_REFERENCE = open(os.path.join(ROOT, "tests", "fixtures", "fake_reference.py"), encoding="utf-8").read()


def _args(**kw):
    base = dict(warmup=2, steps=12, batch=2, resolution=64, rank=32, no_gradient_checkpointing=False)
    base.update(kw)
    return argparse.Namespace(**base)


def _standin_env(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="0",
               LORA_STUDIO_TORCHVISION_STANDIN=STANDIN, **extra)
    return env


def test_reference_env_stands_in_only_where_torchvision_does_not_import():
    env, note = train_speed.reference_env()
    assert env["TQDM_MININTERVAL"] == "0"
    real = subprocess.run([sys.executable, "-c", "import torchvision.transforms"], capture_output=True).returncode == 0
    if real:
        assert note is None and "LORA_STUDIO_TORCHVISION_STANDIN" not in env
    else:
        assert "torchvision_standin" in note and env["LORA_STUDIO_TORCHVISION_STANDIN"] == STANDIN


def test_step_rate_and_peak_are_read_from_the_reference_progress_bar(tmp_path):
    script = tmp_path / "fake_reference.py"
    script.write_text(FAKE_REFERENCE)
    # This process's own peak RSS must not leak into the reference's (getrusage's ru_maxrss carries it over
    # fork + exec): raise it well above what the stand-in script uses.
    big = bytearray(1536 * 1024 ** 2)
    for i in range(0, len(big), 4096):
        big[i] = 1
    res = train_speed.run_reference(_args(), str(script), "model", str(tmp_path),
                                    _standin_env(FAKE_STEP_S="0.05", FAKE_AFTER_MB="256"))
    assert "error" not in res, res
    # 0.05 s per step -> 20 steps/s at most; sleeping overshoots a little, the 1 s save after the loop is left out
    assert 14.0 < res["steps_per_s"] <= 20.5, res
    assert res["images_per_s"] == pytest.approx(2 * res["steps_per_s"])
    assert res["measured_steps"] == 12
    MiB = 1024 ** 2
    assert res["peak_bytes"] > (64 + 256) * MiB  # the subprocess's peak RSS on CPU, the whole run
    # read when the counter hit 14/14: the buffer allocated after the training loop is not in it
    assert 64 * MiB < res["peak_to_last_step_bytes"] < res["peak_bytes"] - 200 * MiB
    assert res["peak_bytes"] < 1536 * MiB, res  # the script's own peak, not this process's
    del big


def test_reference_failure_is_reported_with_its_last_lines(tmp_path):
    script = tmp_path / "fake_reference.py"
    script.write_text(FAKE_REFERENCE)
    res = train_speed.run_reference(_args(), str(script), "model", str(tmp_path),
                                    _standin_env(FAKE_STEP_S="0.01", FAKE_FAIL="before"))
    assert res["error"].startswith("exit 3:") and "something broke" in res["error"]


def test_a_reference_that_fails_after_its_last_step_keeps_its_timing_and_says_so(tmp_path):
    # e.g. on a CPU machine the script's final pipeline load (a second fp32 SDXL UNet) is killed for memory
    script = tmp_path / "fake_reference.py"
    script.write_text(FAKE_REFERENCE)
    res = train_speed.run_reference(_args(), str(script), "model", str(tmp_path),
                                    _standin_env(FAKE_STEP_S="0.05", FAKE_FAIL="after"))
    assert "error" not in res and 14.0 < res["steps_per_s"] <= 20.5, res
    assert "finished its 14 steps, then failed: exit 9" in res["after_training"]


def test_torchvision_standin_follows_torchvision_semantics():
    code = textwrap.dedent('''
        import random, torch
        from PIL import Image
        from torchvision import transforms
        from torchvision.transforms.functional import crop
        T = transforms
        im = Image.new("RGB", (100, 60), (255, 0, 0))
        assert T.Resize(32, interpolation=T.InterpolationMode.LANCZOS)(im).size == (53, 32)   # shorter side
        assert T.Resize((20, 40))(im).size == (40, 20)                                          # (h, w)
        assert T.CenterCrop(40)(im).size == (40, 40)
        assert crop(im, 5, 10, 20, 30).size == (30, 20)                                         # top, left, h, w
        torch.manual_seed(0)
        for _ in range(50):
            top, left, h, w = T.RandomCrop(32).get_params(im, (32, 40))
            assert 0 <= top <= 60 - 32 and 0 <= left <= 100 - 40 and (h, w) == (32, 40)
        px = Image.new("RGB", (2, 1)); px.putpixel((0, 0), (255, 255, 255))
        assert T.RandomHorizontalFlip(p=1.0)(px).getpixel((1, 0)) == (255, 255, 255)
        t = T.Compose([T.ToTensor(), T.Normalize([0.5], [0.5])])(im)
        assert t.shape == (3, 60, 100) and t.dtype == torch.float32
        assert torch.allclose(t[0], torch.ones(60, 100)) and torch.allclose(t[1], -torch.ones(60, 100))
        assert [m.name.lower() for m in T.InterpolationMode].count("lanczos") == 1
        print("ok")
    ''')
    env = dict(os.environ, PYTHONPATH=STANDIN)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_compare_reference_cli_prints_both_rows_and_the_ratios(tiny_sdxl, tmp_path):
    script = tmp_path / "fake_reference.py"
    script.write_text(FAKE_REFERENCE)
    out = tmp_path / "cmp.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", FAKE_STEP_S="0.02")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_speed.py"), "--model", "tiny-sdxl",
                           "--steps", "3", "--warmup", "1", "--images", "3", "--compare-reference", str(script),
                           "--json", str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(l.startswith("| ours") for l in lines) and any(l.startswith("| reference") for l in lines)
    data = json.loads(out.read_text())
    ours, ref = data["runs"]
    assert "error" not in ours and "error" not in ref, data["runs"]
    assert data["ratios"]["steps_per_s ours/reference"] == pytest.approx(ours["steps_per_s"] / ref["steps_per_s"])
    assert data["ratios"]["peak_memory ours/reference"] == pytest.approx(ours["peak_bytes"] / ref["peak_bytes"])
    assert data["ratios"]["peak_memory_to_last_step ours/reference"] == pytest.approx(
        ours["peak_to_last_step_bytes"] / ref["peak_to_last_step_bytes"])
    assert 0 < ours["peak_to_last_step_bytes"] <= ours["peak_bytes"] + 2 ** 20  # VmHWM lags ~100 KiB
    assert "peak memory up to the last training step" in proc.stdout
    assert 25 < ref["steps_per_s"] <= 55  # sleeps 0.02 s a step; tqdm's smoothed rate reads up to a few % high


def test_a_run_that_cannot_train_is_an_error_row_with_its_reason(tiny_sdxl):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_speed.py"), "--model", "tiny-sdxl",
                           "--steps", "1", "--warmup", "1", "--images", "2"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert any(l.startswith("| caches on") and "| error" in l for l in proc.stdout.splitlines())
    assert "at least 3 are needed" in proc.stdout and "Traceback" not in proc.stderr


def test_missing_reference_is_explained_and_ours_still_runs(tiny_sdxl, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_speed.py"), "--model", "tiny-sdxl",
                           "--steps", "1", "--warmup", "1", "--images", "3", "--compare-reference",
                           str(tmp_path / "no-diffusers")], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not found; pass the root of a diffusers checkout" in proc.stdout
    assert any(l.startswith("| ours") for l in proc.stdout.splitlines())


@pytest.mark.skipif(not os.environ.get("LORA_STUDIO_DIFFUSERS_SRC"),
                    reason="set LORA_STUDIO_DIFFUSERS_SRC to a diffusers checkout to run the real reference script")
def test_real_reference_script_runs_on_the_tiny_model(tiny_sdxl, tmp_path):
    out = tmp_path / "cmp.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_speed.py"), "--model", "tiny-sdxl",
                           "--steps", "6", "--warmup", "2", "--images", "3", "--compare-reference",
                           os.environ["LORA_STUDIO_DIFFUSERS_SRC"], "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert all("error" not in r for r in data["runs"]), data["runs"]
    assert data["ratios"]["steps_per_s ours/reference"] > 0


def test_relative_script_model_and_vae_paths_work_from_the_reference_run_folder(tmp_path, monkeypatch):
    # the reference runs with a temp folder as its cwd: relative paths given on the command line must still work
    (tmp_path / "fake_reference.py").write_text(FAKE_REFERENCE)
    (tmp_path / "vae-fp16-fix").mkdir()
    (tmp_path / "vae-fp16-fix" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    res = train_speed.run_reference(_args(vae="vae-fp16-fix"), "fake_reference.py", "model", ".",
                                    _standin_env(FAKE_STEP_S="0.01", FAKE_SAVE_S="0"))
    assert "error" not in res, res


def test_a_failure_names_the_error_not_the_interpreter_shutdown_noise_after_it():
    tail = ["Traceback (most recent call last):", '  File "<frozen runpy>", line 254, in _get_code_from_file',
            "FileNotFoundError: [Errno 2] No such file or directory: 'train.py'", "__BENCH_PEAK__ 253612032"]
    tail += ["Exception ignored in: <finalize object at 0x7ff8; dead>", "Traceback (most recent call last):",
             '  File "/usr/lib/python3.11/weakref.py", line 590, in __call__',
             "TypeError: 'NoneType' object is not callable"] * 3
    lines = train_speed.failure_lines(tail)
    assert lines[-1].startswith("FileNotFoundError") and not any("NoneType" in l or "__BENCH" in l for l in lines)
