"""What the command line says: grouped --help with defaults and examples, the fix first on a typo, one line per
expected error (no traceback), and no library noise."""
from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

from trainer.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def test_help_is_grouped_with_defaults_and_two_examples():
    text = build_parser().format_help()
    heads = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    for title in ("Model:", "Data:", "LoRA:", "Optimizer:", "Schedule and precision:",
                  "Output, checkpoints and samples:", "examples:"):
        assert title in heads, (title, heads)
    assert any(h.startswith("Pivotal tuning") for h in heads)
    assert any(h.startswith("Compatibility") for h in heads)
    order = [heads.index(h) for h in ("Model:", "Data:", "LoRA:", "Optimizer:", "Schedule and precision:")]
    assert order == sorted(order)
    model = text[text.index("\nModel:"):text.index("\nData:")]
    assert "--pretrained_model_name_or_path" in model and "--rank" not in model
    assert "(default: 32)" in text[text.index("\nLoRA:"):]  # --rank's default
    assert "--enable_xformers_memory_efficient_attention" in text and "no effect" in text
    assert text.count("python -m trainer --") >= 2  # two example commands


def test_typo_prints_did_you_mean_first():
    proc = subprocess.run([sys.executable, "-m", "trainer", "--instance_data_dir", ROOT, "--learning_rat", "1e-4"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env=ENV)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: unknown flag --learning_rat; did you mean --learning_rate?"), lines
    assert "1e-4" not in lines[0]  # the value of the misspelled flag is not a second complaint
    assert len(lines) <= 3 and "usage:" not in proc.stderr


def test_model_load_error_prints_once_without_traceback(tmp_path):
    from PIL import Image

    (tmp_path / "data").mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(tmp_path / "data" / f"{i}.png")
    proc = subprocess.run([sys.executable, "-m", "trainer", "--pretrained_model_name_or_path",
                           str(tmp_path / "no-such-model"), "--instance_data_dir", str(tmp_path / "data"),
                           "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, env=ENV)
    assert proc.returncode == 1
    assert proc.stderr.count("neither an existing folder nor a Hub id") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_library_noise_is_filtered_from_the_real_emitters():
    import prodigyopt
    import torch
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    from trainer.cli_help import FilteredStream, quiet_libraries

    old_stdout = sys.stdout
    err = io.StringIO()
    handler = logging.StreamHandler(err)
    try:
        quiet_libraries()
        assert isinstance(sys.stdout, FilteredStream)
        buf = io.StringIO()
        sys.stdout.stream = buf  # what reaches the terminal
        for name in ("diffusers", "transformers"):
            logging.getLogger(name).addHandler(handler)
        prodigyopt.Prodigy([torch.nn.Parameter(torch.zeros(2))], lr=1.0, weight_decay=0.01, decouple=True)
        print("kept line")
        dlog.get_logger("diffusers.models.modeling_utils").warning(
            "There are modules in AutoencoderKL that should be kept in float32: []. Casting directly ...")
        tlog.get_logger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
        dlog.get_logger("diffusers.models.modeling_utils").warning("a real warning stays")
        sys.stdout.flush()
    finally:
        for name in ("diffusers", "transformers"):
            logging.getLogger(name).removeHandler(handler)
        sys.stdout = old_stdout
    assert buf.getvalue() == "kept line\n"
    assert "float32" not in err.getvalue() and "torchvision" not in err.getvalue()
    assert "a real warning stays" in err.getvalue()
