"""The path matrix: precision x text training x prior preservation x data source x resume point x processes, as a
pairwise-covering set (tests/pairwise.py: every value of each factor meets every value of every other factor in
some cell; 14 cells instead of the 432 of the full product). Each cell trains 4 steps of tiny-sdxl at 64 px,
exports, reloads the written files and generates one image with them through the Generate engine.

Resume cells copy the straight run's checkpoint at the pivot - 1, the pivot or the pivot + 1 (step 1, 2 or 3 of
4; "pivot" is the text boundary, int(0.5 x 4)) into a new run folder, resume there, and must end with the straight
run's LoRA. For 2 processes the straight run is one process at twice the batch (the same global batch), so the
cell also resumes a checkpoint under another number of processes.

On CPU, ``fp16`` and ``bf16`` run what the trainer does there: the frozen weights (UNet, text encoders) in that
dtype and the LoRA weights in fp32; with bf16 under accelerate's CPU autocast (matmuls in bf16), with fp16 without
one (accelerate has no fp16 autocast on CPU: the UNet computes in its fp16 weights) and without a GradScaler
(accelerate makes one on a GPU only; the scaler path has its own test in test_precision_paths.py).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import write_dataset
from tests.pairwise import all_pairs, pairs_of, pairwise
from tests.path_cells import (assert_same_lora, cell_config, copy_checkpoint, reload_and_generate, train_cell)

torch.set_flush_denormal(True)
STEPS = 4
PIVOT = 2  # int(0.5 * STEPS): the text boundary of pivotal tuning and of the text-encoder LoRA
FACTORS = {  # in this order the greedy set needs 4 two-process cells (the fewest: one per resume point)
    "processes": [1, 2],
    "data": ["folder", "imagefolder", "datasets"],
    "resume": ["none", "pivot-1", "pivot", "pivot+1"],
    "precision": ["no", "bf16", "fp16"],
    "text": ["pivotal", "te-lora", "none"],
    "prior": [False, True],
}
CELLS = pairwise(FACTORS)
RESUME_AT = {"pivot-1": PIVOT - 1, "pivot": PIVOT, "pivot+1": PIVOT + 1}


def cell_id(c: dict) -> str:
    return (f"p{c['processes']}-{c['data']}-{c['resume']}-{c['precision']}-{c['text']}"
            f"{'-prior' if c['prior'] else ''}")


def test_the_cells_cover_every_pair():
    covered = set().union(*(pairs_of(c, list(FACTORS)) for c in CELLS))
    assert covered == all_pairs(FACTORS)
    assert len(CELLS) <= 16  # far below the full product (432)
    # the check can fail: without its last cell the set leaves a pair uncovered
    assert set().union(*(pairs_of(c, list(FACTORS)) for c in CELLS[:-1])) != all_pairs(FACTORS)


def _images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_sdxl) -> dict:
    """The data sources (3 images each) and a class-image folder, made once for every cell."""
    import datasets

    root = tmp_path_factory.mktemp("matrix-data")
    folder = str(root / "folder")
    write_dataset(folder, sizes=((64, 64),) * 3)
    imagefolder = root / "imagefolder"  # an ImageFolder: metadata.jsonl (file_name, text)
    os.makedirs(imagefolder)
    with open(imagefolder / "metadata.jsonl", "w") as f:
        for i, im in enumerate(_images(3, 1)):
            im.save(imagefolder / f"p{i}.png")
            f.write(json.dumps({"file_name": f"p{i}.png", "text": f"a photo of TOK, jsonl {i}"}) + "\n")
    ds = datasets.Dataset.from_dict({"image": _images(3, 2), "text": [f"a photo of TOK, row {i}" for i in range(3)]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Value("string")}))
    ds.save_to_disk(str(root / "saved"))
    classes = root / "classes"  # enough class images already there: none is generated
    os.makedirs(classes)
    for i, im in enumerate(_images(2, 3)):
        im.save(classes / f"c{i}.png")
    return {"folder": {"instance_data_dir": folder},
            "imagefolder": {"dataset_name": str(imagefolder)},
            "datasets": {"dataset_name": str(root / "saved"), "caption_column": "text"},
            "classes": str(classes)}


@pytest.fixture(scope="module")
def engine():
    from generation import Engine

    eng = Engine()
    yield eng
    eng.release()


@pytest.mark.parametrize("cell", CELLS, ids=[cell_id(c) for c in CELLS])
def test_cell_trains_exports_reloads_and_generates(cell, sources, engine, tmp_path):
    n = cell["processes"]
    prior = sources["classes"] if cell["prior"] else None
    kw = dict(precision=cell["precision"], text=cell["text"], prior=prior, steps=STEPS)
    data = sources[cell["data"]]
    run = str(tmp_path / "run")
    if cell["resume"] == "none":
        train_cell(cell_config(data, run, checkpointing_steps=1000, **kw), processes=n)
    else:
        # the straight run (one process, the same global batch), then a resume from its checkpoint at the boundary
        straight = str(tmp_path / "straight")
        at = RESUME_AT[cell["resume"]]  # checkpoints only where the resume needs one
        train_cell(cell_config(data, straight, train_batch_size=n, checkpointing_steps=at, **kw), processes=1)
        copy_checkpoint(straight, run, at)
        train_cell(cell_config(data, run, resume_from_checkpoint="latest", **kw), processes=n)
        # half-precision forwards or another batch split round differently: within a few AdamW steps (lr 1e-3)
        loose = cell["precision"] != "no" or n > 1
        assert_same_lora(straight, run, **(dict(rtol=5e-2, atol=5e-3) if loose else {}))
    reload_and_generate(run, engine)
