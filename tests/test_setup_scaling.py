"""The small version of ``bench/setup_scaling.py`` (issue 16): setup for 3 and 12 images in fresh processes; the
warm runs never run the VAE and the peak RSS does not grow with the images (bound 64 MiB)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_setup_scaling_bench_small(tiny_sdxl, tmp_path):
    out = tmp_path / "scaling.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "setup_scaling.py"), "--images", "3,12",
                           "--resolution", "64", "--json", str(out)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "linearity: per-image setup time" in proc.stdout and ": flat" in proc.stdout
    data = json.loads(out.read_text())
    assert [r["images"] for r in data["rows"]] == [3, 12]
    assert [r["cold_encodes"] for r in data["rows"]] == [6, 24]  # each image and its flip, once
    assert [r["warm_encodes"] for r in data["rows"]] == [0, 0]  # the second run reads the on-disk cache
    assert data["rss_growth_mib"] <= 64
