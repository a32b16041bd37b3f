"""Shared test setup: offline environment, one tiny-model cache per checkout, small generated datasets."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("LORA_STUDIO_CACHE", os.path.join(ROOT, ".cache", "lora-studio"))
for k, v in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False",
             "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "GRADIO_SSR_MODE": "False",
             "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ[k] = v

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sdxl() -> str:
    from trainer.tiny import tiny_model_path

    return tiny_model_path("tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd() -> str:
    from trainer.tiny import tiny_model_path

    return tiny_model_path("tiny-sd")


def write_dataset(folder, sizes=((96, 64), (64, 96), (80, 80), (128, 64)), captions=None, seed=0,
                  sidecars=True) -> list[str]:
    """Random-noise PNGs of the given (w, h) sizes with '.txt' captions that contain TOK."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = os.path.join(folder, f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        if sidecars:
            cap = captions[i] if captions else f"a photo of TOK, picture {i}"
            with open(os.path.join(folder, f"img{i}.txt"), "w") as f:
                f.write(cap)
        paths.append(path)
    return paths


@pytest.fixture
def dataset(tmp_path) -> str:
    folder = str(tmp_path / "data")
    write_dataset(folder)
    return folder


def render(pipe, prompt: str, seed: int = 0) -> np.ndarray:
    """One 64 px image in 3 steps from a fixed seed, as floats in [0, 1]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return np.asarray(pipe(prompt, num_inference_steps=3, height=64, width=64, generator=g,
                           output_type="np").images[0])


def base_diffusers_kohya_images(pipe, run_dir, kohya_name: str, prompt: str = "a photo of a dog"):
    """(without LoRA, with the run's diffusers file, with its kohya file ``kohya_name``), same prompt and seed;
    the kohya LoRA stays loaded."""
    base = render(pipe, prompt)
    pipe.load_lora_weights(str(run_dir))
    with_diffusers = render(pipe, prompt)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(run_dir), weight_name=kohya_name)
    return base, with_diffusers, render(pipe, prompt)


def pytest_terminal_summary(terminalreporter):
    """A skipped browser suite is said loudly at the end of the run, not hidden in the skip count."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "test_app_browser" in r.nodeid]
    if skipped:
        terminalreporter.write_sep("!", f"BROWSER SUITE SKIPPED: {len(skipped)} browser test(s) did not run "
                                   "(Chromium missing); CI sets REQUIRE_BROWSER=1 to fail instead", red=True,
                                   bold=True)
