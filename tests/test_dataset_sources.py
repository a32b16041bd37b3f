"""Every data source a user can point --dataset_name at trains end to end on tiny-sdxl and exports: a ``datasets``
dataset saved with ``save_to_disk`` (in-memory PIL images, no path), a parquet file, and a local ImageFolder with
``metadata.csv`` (read as ``datasets``' imagefolder reads it); --caption_column picks the captions."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from trainer import TrainConfig, train

BASE = dict(pretrained_model_name_or_path="tiny-sdxl", max_train_steps=2, rank=4, seed=1,
            train_text_encoder_ti=True, instance_prompt="a photo of TOK")
SIZES = [(96, 64), (64, 96), (80, 80), (128, 64)]


def _images(seed=0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def _captions(word: str) -> list[str]:
    return [f"a photo of TOK, {word} {i}" for i in range(len(SIZES))]


def _trained_captions(res) -> dict:
    """The captions the run trained on, as the kohya file's ss_tag_frequency records them."""
    with safe_open(res.artifacts["kohya"], "pt") as f:
        freq = json.loads(f.metadata()["ss_tag_frequency"])
    return next(iter(freq.values()))


def _train(tmp_path, **kw):
    cfg = TrainConfig.from_sources(**{**BASE, "output_dir": str(tmp_path / "run"), **kw})
    res = train(cfg)
    assert res.step == 2 and res.final_loss == res.final_loss
    for key in ("diffusers", "kohya", "embeddings"):
        assert os.path.getsize(res.artifacts[key]) > 0
    return res


def test_saved_datasets_dataset_trains_with_its_caption_column(tmp_path, tiny_sdxl):
    """In-memory images (no file path) pass the dataset check (it used to count 0 usable images)."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string"),
                                  "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": _images(), "prompt": _captions("zebra"),
                                     "text": _captions("giraffe")}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    res = _train(tmp_path, dataset_name=str(tmp_path / "saved"), caption_column="prompt")
    tags = _trained_captions(res)
    assert {f"zebra {i}" for i in range(4)} <= set(tags) and not any("giraffe" in t for t in tags)
    assert not os.path.exists(tmp_path / "saved" / ".latent_cache")  # nothing written into the saved dataset


def test_parquet_file_trains(tmp_path, tiny_sdxl):
    import datasets

    ds = datasets.Dataset.from_dict({"image": _images(1), "caption": _captions("okapi")},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "caption": datasets.Value("string")}))
    ds.to_parquet(str(tmp_path / "train.parquet"))
    res = _train(tmp_path, dataset_name=str(tmp_path / "train.parquet"), caption_column="caption")
    assert {f"okapi {i}" for i in range(4)} <= set(_trained_captions(res))


def test_small_in_memory_images_are_checked(tmp_path, tiny_sdxl):
    """The checks now see in-memory images: too few usable ones are refused, naming each skipped row."""
    import datasets

    from trainer.training.errors import TrainingError

    tiny = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(3)] + _images()[:1]
    ds = datasets.Dataset.from_dict({"image": tiny, "text": _captions("x")},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(TrainingError, match=r"(?s)row 0.*only 8x8"):
        train(TrainConfig.from_sources(**{**BASE, "dataset_name": str(tmp_path / "saved"), "caption_column": "text",
                                          "output_dir": str(tmp_path / "run")}))


def _imagefolder_csv(folder) -> list[str]:
    os.makedirs(folder)
    captions = _captions("tapir")
    with open(os.path.join(folder, "metadata.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text", "other"])
        for i, img in enumerate(_images(2)):
            img.save(os.path.join(folder, f"p{i}.png"))
            w.writerow([f"p{i}.png", captions[i], f"unused, {i}"])
    return captions


def test_imagefolder_metadata_csv_captions_match_datasets(tmp_path):
    """metadata.csv gives the captions ``load_dataset("imagefolder")`` gives (they used to be silently ignored)."""
    import datasets

    from trainer.data.sources import load_items

    folder = str(tmp_path / "folder")
    captions = _imagefolder_csv(folder)
    reference = datasets.load_dataset("imagefolder", data_dir=folder, split="train")
    cfg = TrainConfig.from_sources(**{**BASE, "dataset_name": folder, "output_dir": str(tmp_path / "o")})
    items, problems = load_items(cfg)
    assert not problems
    assert [it.caption for it in items] == list(reference["text"]) == captions
    assert [it.size for it in items] == [im.size for im in reference["image"]]
    items, _ = load_items(cfg.replace(caption_column="other"))  # --caption_column picks another column
    assert [it.caption for it in items] == [f"unused, {i}" for i in range(4)]


def test_imagefolder_metadata_csv_trains(tmp_path, tiny_sdxl):
    folder = str(tmp_path / "folder")
    _imagefolder_csv(folder)
    res = _train(tmp_path, dataset_name=folder)
    assert {f"tapir {i}" for i in range(4)} <= set(_trained_captions(res))


def test_bad_metadata_csv_rows_are_named(tmp_path):
    from trainer.data.folders import read_metadata_csv

    folder = tmp_path / "f"
    folder.mkdir()
    _images()[0].save(folder / "a.png")
    (folder / "metadata.csv").write_text("file_name,text\na.png,TOK one\n../x.png,TOK two\nmissing.png,TOK\n")
    records, problems = read_metadata_csv(folder)
    assert [r.caption for r in records] == ["TOK one"]
    assert [(p.code, p.file) for p in problems] == [("unsafe_path", "../x.png"), ("missing_file", "missing.png")]
    assert "metadata.csv line 3" in problems[0].message
