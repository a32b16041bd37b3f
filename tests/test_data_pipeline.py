"""Data integrity: buckets, crops, caches keyed by image and flip, captions and micro-conditioning that
stay with their image through shuffling and repeats."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import TrainConfig
from trainer.data.buckets import bucket_histogram, make_buckets, nearest_bucket
from trainer.data.captions import shuffle_tags, training_caption
from trainer.data.sampler import BucketBatchSampler
from trainer.data.transforms import prepare_image
from trainer.training.trainer import Trainer

SIZES = [(192, 96), (96, 192), (128, 128), (160, 120), (120, 160), (200, 100)]


def tagged_dataset(folder) -> list[str]:
    """Each image a distinct solid colour with its tag in the caption: any mix-up shows."""
    os.makedirs(folder, exist_ok=True)
    captions = []
    for i, (w, h) in enumerate(SIZES):
        color = (40 * i % 255, 255 - 30 * i, 17 * i)
        arr = np.zeros((h, w, 3), np.uint8)
        arr[...] = color
        arr[: h // 4, : w // 4] = 255 - np.array(color, np.uint8)  # an asymmetric mark: flips are visible
        Image.fromarray(arr).save(os.path.join(folder, f"tag{i}.png"))
        cap = f"a photo of TOK, tag{i}, red, blue, green"
        with open(os.path.join(folder, f"tag{i}.txt"), "w") as f:
            f.write(cap)
        captions.append(cap)
    return captions


def test_buckets_cover_aspect_ratios_with_sides_multiple_of_step():
    buckets = make_buckets(1024, 64)
    assert (1024, 1024) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 for w, h in buckets)
    assert nearest_bucket(1920, 1080, buckets)[0] > nearest_bucket(1920, 1080, buckets)[1]
    assert nearest_bucket(1080, 1920, buckets)[0] < nearest_bucket(1080, 1920, buckets)[1]
    hist = bucket_histogram([(1920, 1080), (1080, 1920), (1000, 1000), (1010, 990)], 1024, 64)
    assert sum(hist.values()) == 4 and hist["1024x1024"] == 2


def test_no_crop_beyond_bucket_rounding():
    buckets = make_buckets(128, 16)
    for w, h in SIZES + [(300, 90), (90, 300)]:
        b = nearest_bucket(w, h, buckets)
        prep = prepare_image(Image.new("RGB", (w, h)), b)
        scale = max(b[0] / w, b[1] / h)
        cut_w, cut_h = round(w * scale) - b[0], round(h * scale) - b[1]
        assert cut_w < 16 and cut_h < 16, (w, h, b, cut_w, cut_h)
        assert prep.pixels.shape == (3, b[1], b[0])
        assert prep.original_size == (h, w) and prep.target_size == (b[1], b[0])


def test_batches_are_single_bucket_and_full():
    item_buckets = [(64, 128), (128, 64), (96, 96), (64, 128), (96, 96), (128, 64), (64, 128)]
    s = BucketBatchSampler(item_buckets, repeats=3, batch_size=2, seed=1, random_flip=True)
    seen = []
    for epoch in range(3):
        for batch in s.epoch(epoch):
            assert len(batch) == 2
            assert len({item_buckets[x.item] for x in batch}) == 1
            seen += [x.item for x in batch]
    assert set(seen) == set(range(len(item_buckets)))
    assert s.epoch(1) != s.epoch(2)  # reshuffled per epoch
    assert BucketBatchSampler(item_buckets, repeats=3, batch_size=2, seed=1, random_flip=True).epoch(2) == s.epoch(2)


def test_tag_shuffle_keeps_leading_tokens_and_dropout():
    rng = np.random.default_rng(0)
    outs = {shuffle_tags("TOK, a, b, c, d, e", 1, rng) for _ in range(20)}
    assert all(o.startswith("TOK, ") for o in outs) and len(outs) > 1
    assert training_caption("x, y", dropout=1.0, shuffle=False, keep_tokens=0, rng=rng) == ""


@pytest.mark.parametrize("cache", [True, False])
def test_every_sample_keeps_its_latent_caption_and_conditioning(tmp_path, tiny_sdxl, cache):
    folder = str(tmp_path / "data")
    captions = tagged_dataset(folder)
    cfg = TrainConfig.from_sources(
        pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=folder, output_dir=str(tmp_path / "run"),
        resolution=128, bucket_step=16, repeats=3, train_batch_size=2, random_flip=True, cache_latents=cache,
        shuffle_tags=True, keep_tokens=2, train_text_encoder_ti=True, max_train_steps=30, seed=3)
    t = Trainer(cfg).open()
    t.setup()
    by_name = {it.name: it for it in t.items}
    assert all(it.size == SIZES[int(name[3])] for name, it in by_name.items())
    flips = set()
    for position in range(24):  # > 2 epochs of shuffled, repeated, flipped batches
        epoch, batch = t.sampler.batch_at(position)
        (_, latents, _, _, caps, origs, crops, targets, _) = t.batches.micro_batch(position, t.accelerator.device)
        assert len({tuple(tg) for tg in targets}) == 1  # single bucket
        for j, s in enumerate(batch):
            item = t.items[s.item]
            tag = item.name[:-4]  # "tagN"
            flips.add(s.flip)
            assert caps[j].startswith("a photo of <s0><s1>, " + tag)  # caption of this image (kept tokens)
            assert sorted(caps[j].split(", ")[2:]) == ["blue", "green", "red"]
            assert tuple(origs[j]) == (item.size[1], item.size[0])  # SDXL original_size = (h, w) of this image
            # the latent is this image's, at this flip: re-encode from the file and compare
            prep = prepare_image(Image.open(item.path).convert("RGB"), t.item_buckets[s.item], flip=s.flip)
            expected = t.latents.encode_pixels(prep.pixels.unsqueeze(0))[0]
            torch.testing.assert_close(latents[j].cpu(), expected.cpu(), rtol=1e-4, atol=1e-4)
            assert tuple(crops[j]) == prep.crop_top_left
    assert flips == {True, False}
    if cache:
        assert len(t.latents.entries) == 2 * len(SIZES)  # once per image and flip variant, nothing per step


def test_text_embeddings_are_cached_only_once_text_is_frozen(tmp_path, tiny_sdxl):
    folder = str(tmp_path / "data")
    tagged_dataset(folder)
    cfg = TrainConfig.from_sources(pretrained_model_name_or_path="tiny-sdxl", instance_data_dir=folder,
                                   output_dir=str(tmp_path / "run"), resolution=128, bucket_step=16,
                                   train_text_encoder_ti=True, max_train_steps=4, train_text_encoder_ti_frac=0.5,
                                   optimizer="adamw", learning_rate=1e-3, text_encoder_lr=1e-2)
    t = Trainer(cfg).open()
    t.setup()
    t.forward_loss(0, t.accelerator.device)
    assert t.text_trainable and t.text.cache == {}
    t.freeze_text()
    t.forward_loss(1, t.accelerator.device)
    assert len(t.text.cache) >= 1
    cached_caption = next(iter(t.text.cache))
    emb, pooled = t.text.cache[cached_caption]
    fresh, fresh_pooled = t.family.encode(t.comps, t.family.tokenize(t.comps, [cached_caption]))
    torch.testing.assert_close(emb, fresh[0].detach())


def test_imagefolder_metadata_and_caption_column(tmp_path, tiny_sd):
    from trainer.data.sources import load_items

    folder = tmp_path / "imagefolder"
    tagged_dataset(str(folder))
    for f in folder.glob("*.txt"):
        f.unlink()
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(len(SIZES)):
            f.write(json.dumps({"file_name": f"tag{i}.png", "prompt": f"misato tag{i}"}) + "\n")
        f.write("{not json\n")
    cfg = TrainConfig.from_sources(pretrained_model_name_or_path="tiny-sd", dataset_name=str(folder),
                                   caption_column="prompt", output_dir=str(tmp_path / "o"))
    items, problems = load_items(cfg)
    assert sorted(it.caption for it in items) == sorted(f"misato tag{i}" for i in range(len(SIZES)))
    assert len(problems) == 1 and "line 7" in problems[0].message
