"""The floors of requirements.txt stay true: in a clean venv holding exactly the lowest versions requirements.txt
allows (``scripts/floors.sh`` installs them and sets LORA_STUDIO_FLOORS=1), a short run trains (pivotal tuning
and text-encoder LoRA), exports, and its files load and generate through the Generate engine."""
from __future__ import annotations

import os
import re

import pytest
import torch

from tests.conftest import write_dataset
from tests.path_cells import cell_config, reload_and_generate, train_cell

pytestmark = pytest.mark.floors
in_floors_venv = pytest.mark.skipif(not os.environ.get("LORA_STUDIO_FLOORS"),
                                    reason="the floors check: scripts/floors.sh runs it in a venv of the floor versions")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_flush_denormal(True)


def floors() -> dict[str, str]:
    """{package: lowest allowed version} from requirements.txt (``name>=X`` lines; torch is installed apart)."""
    out = {}
    for line in open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8"):
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;#\s]*)", line)
        if m and m.group(1).lower() != "torch":
            out[m.group(1)] = m.group(2)
    return out


@in_floors_venv
def test_the_venv_holds_the_floors():
    from importlib.metadata import version

    from packaging.version import Version

    wrong = {name: version(name) for name, low in floors().items()
             if name.lower() != "gradio" and Version(version(name)) != Version(low)}
    assert not wrong, f"not at the floor of requirements.txt: {wrong}"


def test_the_engine_loads_the_base_model_in_the_asked_dtype(tiny_sdxl):
    """The Generate engine passes ``torch_dtype`` (``dtype=`` is ignored by older diffusers: fp32 on a GPU)."""
    from generation import Engine

    engine = Engine(device="cpu", dtype=torch.bfloat16)
    try:
        engine._ensure_pipeline("tiny-sdxl")
        assert engine.pipe.unet.dtype == torch.bfloat16
        assert engine.pipe.text_encoder_2.dtype == torch.bfloat16
    finally:
        engine.release()


@in_floors_venv
@pytest.mark.parametrize("text,source", [("pivotal", "folder"), ("te-lora", "folder"), ("pivotal", "datasets")])
def test_train_export_generate_at_the_floors(tmp_path, tiny_sdxl, text, source):
    from generation import Engine

    folder = str(tmp_path / "data")
    paths = write_dataset(folder, sizes=((64, 64),) * 3)
    data = {"instance_data_dir": folder}
    if source == "datasets":  # a `datasets` dataset saved to disk (in-memory images), as --dataset_name reads it
        import datasets
        from PIL import Image

        ds = datasets.Dataset.from_dict({"image": [Image.open(p) for p in paths],
                                         "text": [f"a photo of TOK, row {i}" for i in range(3)]},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "text": datasets.Value("string")}))
        ds.save_to_disk(str(tmp_path / "saved"))
        data = {"dataset_name": str(tmp_path / "saved"), "caption_column": "text"}
    run = str(tmp_path / f"run-{text}-{source}")
    train_cell(cell_config(data, run, text=text, steps=2, checkpointing_steps=1000))
    engine = Engine()
    try:
        reload_and_generate(run, engine)
    finally:
        engine.release()
