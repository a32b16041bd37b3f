"""check_dataset: every check fires on its crafted bad file; a clean set gives []."""
from __future__ import annotations

import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from trainer.data.checks import Problem, check_dataset, count_caption_tokens, dhash, has_errors, summarize
from trainer.data.folders import collect_folder
from trainer.data.problems import Record


def noise(size=256, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def scene(size=256) -> Image.Image:
    """A structured picture (gradient + shapes) whose dHash is stable under small edits."""
    x = np.linspace(0, 255, size, dtype=np.float32)
    arr = np.stack([np.tile(x, (size, 1)), np.tile(x[:, None], (1, size)), np.full((size, size), 90.0)], -1)
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    d.rectangle([40, 60, 120, 200], fill=(250, 30, 30))
    d.ellipse([150, 20, 240, 110], fill=(20, 20, 200))
    return img


def rec(path, caption="a photo of TOK", name=None) -> Record:
    return Record(str(path), caption, name or os.path.basename(str(path)))


def clean_set(tmp_path, n=4):
    out = []
    for i in range(n):
        p = tmp_path / f"clean{i}.png"
        noise(seed=100 + i).save(p)
        out.append(rec(p, f"a photo of TOK, picture {i}"))
    return out


def only(problems, code) -> Problem:
    found = [p for p in problems if p.code == code]
    assert len(found) == 1, (code, problems)
    p = found[0]
    assert p.fix and p.message and p.severity in ("error", "warning")
    return p


def test_clean_set_is_clean(tmp_path):
    problems = check_dataset(clean_set(tmp_path), resolution=256)
    assert problems == []
    assert not has_errors(problems)
    assert "no problems" in summarize(problems)


def test_clean_set_from_folder(tmp_path):
    for i, r in enumerate(clean_set(tmp_path)):
        (tmp_path / f"clean{i}.txt").write_text(r.caption)
    records, ingest_problems = collect_folder(tmp_path)
    assert ingest_problems == [] and len(records) == 4
    assert check_dataset(records, resolution=256) == []
    # plain paths are accepted too (no captions)
    assert check_dataset([r.path for r in records], resolution=256) == []


def test_unreadable_files_are_errors(tmp_path):
    records = clean_set(tmp_path)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    cut = tmp_path / "cut.png"
    data = (tmp_path / "clean0.png").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    bomb = tmp_path / "bomb.png"

    def chunk(k, d):
        return struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d))

    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))
    ico = tmp_path / "icon.ico"
    Image.new("RGB", (32, 32)).save(ico)
    records += [rec(empty), rec(text), rec(cut), rec(bomb, name="uploads/bomb.png"), rec(ico),
                rec(tmp_path / "gone.png")]
    problems = check_dataset(records, resolution=256)
    expected = {"empty.png": "empty", "text.jpg": "not_an_image", "cut.png": "truncated",
                "uploads/bomb.png": "decompression_bomb", "icon.ico": "unsupported_format", "gone.png": "not_found"}
    got = {p.file: p for p in problems}
    assert set(got) == set(expected), problems
    for name, code in expected.items():
        assert got[name].code == code and got[name].severity == "error"
        assert name in got[name].message and got[name].fix
    assert has_errors(problems)


def test_size_rules(tmp_path):
    records = clean_set(tmp_path)
    small = tmp_path / "small.png"
    noise(200, seed=7).save(small)  # 200 < 256 -> warning
    tiny = tmp_path / "tiny.png"
    noise(100, seed=8).save(tiny)  # 100 < 128 -> error
    problems = check_dataset(records + [rec(small), rec(tiny)], resolution=256)
    w = only(problems, "small_image")
    assert w.severity == "warning" and w.file == "small.png" and "upscaled" in w.message and "200x200" in w.message
    e = only(problems, "too_small")
    assert e.severity == "error" and e.file == "tiny.png" and "100x100" in e.message
    assert len(problems) == 2


def test_exact_duplicate_names_both(tmp_path):
    records = clean_set(tmp_path)
    copy = tmp_path / "copy.bmp"  # same pixels, different format
    Image.open(tmp_path / "clean1.png").save(copy)
    problems = check_dataset(records + [rec(copy)], resolution=256)
    p = only(problems, "duplicate")
    assert "copy.bmp" in p.message and "clean1.png" in p.message and p.severity == "warning"
    assert len(problems) == 1


def test_near_duplicate_names_both(tmp_path):
    records = clean_set(tmp_path)
    a = tmp_path / "scene.png"
    scene().save(a)
    b = tmp_path / "scene_edit.jpg"
    ImageEnhance.Brightness(scene()).enhance(1.04).save(b, quality=85)
    assert bin(dhash(Image.open(a)) ^ dhash(Image.open(b).convert("RGB"))).count("1") <= 4
    problems = check_dataset(records + [rec(a), rec(b)], resolution=256)
    p = only(problems, "near_duplicate")
    assert "scene.png" in p.message and "scene_edit.jpg" in p.message
    assert len(problems) == 1
    # with threshold 0 and a clearly different picture nothing fires
    far = check_dataset(records + [rec(a)], resolution=256, near_duplicate_threshold=4)
    assert far == []


def test_flat_images_of_different_colours_are_not_near_duplicates(tmp_path):
    records = []
    for i, c in enumerate(["black", "white", "red", "blue"]):
        p = tmp_path / f"flat{i}.png"
        Image.new("RGB", (256, 256), c).save(p)
        records.append(rec(p))
    assert check_dataset(records, resolution=256) == []


def test_missing_trigger(tmp_path):
    records = clean_set(tmp_path)
    records[0].caption = "a photo of a dog"
    records[1].caption = "TOKEN ring"  # substring is not the trigger word
    records[2].caption = ""  # empty caption
    records[3].caption = None  # no caption at all: not checked
    problems = check_dataset(records, resolution=256)
    missing = [p for p in problems if p.code == "missing_trigger"]
    assert {p.file for p in missing} == {"clean0.png", "clean1.png", "clean2.png"}
    assert all("TOK" in p.message and p.file in p.message and p.severity == "warning" for p in missing)
    assert len(problems) == 3
    assert check_dataset(records, resolution=256, trigger="") == []
    # case-insensitive, multi-word triggers
    records[0].caption = "photo of Ohwx  Man smiling"
    assert not [p for p in check_dataset(records[:1], resolution=256, trigger="ohwx man", min_images=1)
                if p.code == "missing_trigger"]


def test_overlong_caption_estimate(tmp_path):
    records = clean_set(tmp_path)
    records[2].caption = "TOK " + " ".join(f"word{i}" for i in range(100))
    problems = check_dataset(records, resolution=256)
    p = only(problems, "caption_too_long")
    assert p.file == "clean2.png" and "clean2.png" in p.message
    assert "about 103 tokens" in p.message and "77" in p.message
    assert len(problems) == 1
    n, exact = count_caption_tokens("a photo of TOK, smiling.")
    assert (n, exact) == (9, False)


def test_overlong_caption_with_tokenizer(tmp_path):
    calls = []

    def fake_tokenizer(text):
        calls.append(text)
        return {"input_ids": [49406] + [1] * len(text) + [49407]}  # one token per character + BOS/EOS

    records = clean_set(tmp_path)
    records[1].caption = "TOK " + "x" * 80  # 84 chars -> 86 tokens
    problems = check_dataset(records, resolution=256, tokenizer=fake_tokenizer)
    p = only(problems, "caption_too_long")
    assert p.file == "clean1.png" and "86 tokens" in p.message and "about" not in p.message and "77" in p.message
    assert len(problems) == 1 and len(calls) == 4
    assert check_dataset(records, resolution=256, tokenizer=fake_tokenizer, max_caption_tokens=100) == []

    def broken(text):
        raise RuntimeError("boom")

    assert count_caption_tokens("a b c", broken) == (5, False)


def test_too_few_images(tmp_path):
    records = clean_set(tmp_path, n=2)
    problems = check_dataset(records, resolution=256)
    p = only(problems, "too_few_images")
    assert p.severity == "error" and "2 usable images" in p.message and "3" in p.message
    assert check_dataset(records, resolution=256, min_images=2) == []
    # duplicates and unusable images do not count
    shutil.copy(tmp_path / "clean0.png", tmp_path / "dup.png")
    e = tmp_path / "e.png"
    e.write_bytes(b"")
    problems = check_dataset(records + [rec(tmp_path / "dup.png"), rec(e)], resolution=256)
    assert "too_few_images" in {p.code for p in problems}
    assert check_dataset([], resolution=256)[0].code == "too_few_images"


def test_default_resolution_flags_small_images(tmp_path):
    problems = check_dataset(clean_set(tmp_path))  # 256 px at the default 1024 resolution
    assert {p.code for p in problems} == {"too_small", "too_few_images"}


def test_summarize_and_has_errors(tmp_path):
    records = clean_set(tmp_path)
    records[0].caption = "no trigger"
    e = tmp_path / "empty.png"
    e.write_bytes(b"")
    problems = check_dataset(records + [rec(e)], resolution=256)
    text = summarize(problems)
    assert "1 error, 1 warning" in text
    assert text.index("ERROR") < text.index("WARNING")
    assert "empty.png" in text and "Fix:" in text
    assert has_errors(problems)
    assert not has_errors([p for p in problems if p.severity == "warning"])
