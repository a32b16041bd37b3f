"""Untrusted images, zips, folders and metadata.jsonl: every bad file is crafted here in code."""
from __future__ import annotations

import io
import json
import os
import stat
import struct
import time
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from trainer.data.images import ImageProblem, LoadedImage, is_image_name, load_image
from trainer.data.folders import collect_dataset, collect_folder, read_metadata_jsonl, write_metadata_jsonl
from trainer.data.problems import IngestProblem, Record
from uploads import ExtractResult, safe_extract_zip, safe_filename


# ------------------------------------------------------------------------------------------------ helpers

def noise(size=(64, 48), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def png_bytes(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG", **kw)
    return b.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A tiny PNG whose IHDR claims width x height (8-bit RGB); the pixel data is a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def problem_of(path, **kw) -> ImageProblem:
    with pytest.raises(ImageProblem) as ei:
        load_image(path, **kw)
    e = ei.value
    assert os.path.basename(str(path)) in e.message, e.message
    assert e.fix and str(e) == f"{e.message} Fix: {e.fix}"
    return e


# ------------------------------------------------------------------------------------------------ load_image: bad

def test_empty_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    assert problem_of(p).code == "empty"


def test_missing_file(tmp_path):
    assert problem_of(tmp_path / "nope.png").code == "not_found"


def test_text_renamed_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("hello, this is not a picture\n" * 20)
    assert problem_of(p).code == "not_an_image"


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated(tmp_path, fmt, ext):
    b = io.BytesIO()
    noise((128, 128)).save(b, fmt)
    data = b.getvalue()
    p = tmp_path / f"cut.{ext}"
    p.write_bytes(data[: len(data) // 2])
    assert problem_of(p).code == "truncated"
    from PIL import ImageFile
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never changed globally


def test_decompression_bomb_header_only(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(bomb_png())
    assert p.stat().st_size < 200
    before = Image.MAX_IMAGE_PIXELS
    t = time.time()
    assert problem_of(p).code == "decompression_bomb"
    assert time.time() - t < 2
    assert Image.MAX_IMAGE_PIXELS == before


def test_bomb_below_pillow_limit_but_above_ours(tmp_path):
    p = tmp_path / "big.png"
    p.write_bytes(bomb_png(9000, 9000))  # 81 MP < Pillow's 89 MP warning threshold, > our 64 MP default
    assert problem_of(p).code == "decompression_bomb"
    p2 = tmp_path / "smallish.png"
    noise((100, 100)).save(p2)
    assert problem_of(p2, max_pixels=5000).code == "decompression_bomb"


def test_too_large_dimensions(tmp_path):
    p = tmp_path / "banner.png"
    p.write_bytes(bomb_png(50_000, 2))
    assert problem_of(p).code == "too_large_dimensions"


def test_unsupported_formats(tmp_path):
    ico = tmp_path / "icon.ico"
    Image.new("RGB", (32, 32), "red").save(ico)
    e = problem_of(ico)
    assert e.code == "unsupported_format" and "PNG" in e.fix and "JPEG" in e.fix
    psd = tmp_path / "layers.psd"
    psd.write_bytes(b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03" + struct.pack(">II", 10, 10) + b"\x00\x08\x00\x03"
                    + b"\x00" * 40)
    assert problem_of(psd).code == "unsupported_format"
    heic = tmp_path / "phone.heic"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 100)
    assert problem_of(heic).code == "unsupported_format"


# ------------------------------------------------------------------------------------------------ load_image: good

def test_exif_rotation_swaps_size(tmp_path):
    p = tmp_path / "rotated.jpg"
    img = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(p, exif=exif.tobytes())
    li = load_image(p)
    assert isinstance(li, LoadedImage)
    assert li.original_size == (20, 40) and li.image.size == (20, 40)
    assert any("EXIF orientation 6" in n for n in li.notes)
    assert li.format == "JPEG" and li.image.mode == "RGB"


def test_16bit_gray_is_mid_gray(tmp_path):
    p = tmp_path / "gray16.png"
    Image.new("I;16", (16, 16), 32768).save(p)
    li = load_image(p)
    px = li.image.getpixel((3, 3))
    assert all(abs(c - 128) <= 1 for c in px), px
    assert li.original_mode.startswith("I")


def test_32bit_int_and_float_tiff(tmp_path):
    p = tmp_path / "int32.tif"
    Image.fromarray(np.full((8, 8), 65535, dtype=np.int32)).save(p)
    assert load_image(p).image.getpixel((0, 0)) == (255, 255, 255)
    f = tmp_path / "float.tif"
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(f)
    px = load_image(f).image.getpixel((0, 0))
    assert all(abs(c - 128) <= 1 for c in px), px


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(p, quality=95)
    r, g, b = load_image(p).image.getpixel((16, 16))
    assert r > 200 and g < 60 and b < 60


def test_palette_with_transparency_on_white(tmp_path):
    p = tmp_path / "pal.png"
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((5, 5), 1)
    img.save(p, transparency=0)
    li = load_image(p)
    assert li.image.getpixel((0, 0)) == (255, 255, 255)
    assert li.image.getpixel((5, 5)) == (255, 0, 0)
    p2 = tmp_path / "pal_opaque.gif"
    img2 = Image.new("P", (10, 10), 1)
    img2.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img2.save(p2)
    assert load_image(p2).image.getpixel((1, 1)) == (0, 0, 255)


@pytest.mark.parametrize("mode,color,expected", [
    ("RGBA", (255, 0, 0, 0), (255, 255, 255)),
    ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
    ("LA", (0, 0), (255, 255, 255)),
    ("LA", (0, 255), (0, 0, 0)),
    ("L", 77, (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
])
def test_modes_to_rgb(tmp_path, mode, color, expected):
    p = tmp_path / f"m_{mode}.png"
    Image.new(mode, (8, 8), color).save(p)
    li = load_image(p)
    assert li.image.mode == "RGB" and li.image.getpixel((2, 2)) == expected


def test_pa_mode(tmp_path):
    img = Image.new("PA", (4, 4))
    img.putpalette([10, 20, 30] * 256)
    img.putdata([(0, 0)] * 16)
    p = tmp_path / "pa.webp"
    img.convert("RGBA").save(p, lossless=True)  # WebP cannot store PA; check the conversion path directly too
    assert load_image(p).image.getpixel((0, 0)) == (255, 255, 255)
    from trainer.data.images import to_rgb as _to_rgb
    assert _to_rgb(img, []).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("ext,kw", [("gif", {}), ("webp", {"lossless": True}), ("png", {})])
def test_animated_first_frame(tmp_path, ext, kw):
    p = tmp_path / f"anim.{ext}"
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    li = load_image(p)
    r, g, b = li.image.getpixel((8, 8))
    assert r > 200 and b < 50, (r, g, b)
    assert "animated: first frame used" in li.notes


def test_unicode_and_long_names_load(tmp_path):
    p = tmp_path / "café_日本語_Ωmega.png"
    noise().save(p)
    assert load_image(p).image.size == (64, 48)
    long = tmp_path / ("x" * 200 + ".bmp")
    noise().save(long)
    assert load_image(long).format == "BMP"


def test_is_image_name():
    assert is_image_name("a.JPG") and is_image_name("b.webp") and is_image_name("x.tiff")
    assert not is_image_name("a.txt") and not is_image_name("a.heic") and not is_image_name("png")


# ------------------------------------------------------------------------------------------------ safe_filename

def test_safe_filename_rules():
    assert safe_filename("café 日本.png") == "café 日本.png"
    assert safe_filename("a/b\\c.png") == "a_b_c.png"
    assert safe_filename("bad\x00\x07name.jpg") == "bad__name.jpg"
    assert safe_filename("...hidden.png") == "hidden.png"
    assert safe_filename("..") == "file"
    assert safe_filename("CON.txt") == "_CON.txt"
    long = safe_filename("é" * 500 + ".jpeg")
    assert long.endswith(".jpeg") and len(long) <= 120 and len(long.encode()) <= 200
    taken: set = set()
    names = [safe_filename("img.png", taken=taken) for _ in range(3)]
    assert names == ["img.png", "img-1.png", "img-2.png"]
    assert safe_filename("IMG.png", taken=taken) == "IMG-3.png"  # case-insensitive collisions


# ------------------------------------------------------------------------------------------------ zips

def _zip(path, entries):
    """entries: list of (name, bytes) or (ZipInfo, bytes)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)


def _codes(problems):
    return {p.code for p in problems}


def test_zip_slip_and_junk(tmp_path):
    good = png_bytes(noise())
    link = zipfile.ZipInfo("link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    z = tmp_path / "up.zip"
    _zip(z, [
        ("good.png", good),
        ("good.txt", "a photo of TOK"),
        ("../evil.png", good),
        ("/abs.png", good),
        ("..\\win_evil.png", good),
        ("sub/../../evil2.png", good),
        ("sub/deep.png", good),
        (link, "/etc/passwd"),
        ("__MACOSX/._good.png", b"junk"),
        (".DS_Store", b"junk"),
        ("sub/", b""),
        ("readme.pdf", b"%PDF"),
        ("photo.HEIC", b"xx"),
        ("café_日本.png", good),
        ("n" * 300 + ".png", good),
    ])
    dest = tmp_path / "out"
    res = safe_extract_zip(z, dest)
    assert isinstance(res, ExtractResult)
    names = sorted(os.path.relpath(p, dest) for p in res.extracted)
    assert "good.png" in names and "good.txt" in names and os.path.join("sub", "deep.png") in names
    assert "café_日本.png" in names
    longs = [n for n in names if n.startswith("nnn")]
    assert len(longs) == 1 and longs[0].endswith(".png") and len(longs[0]) <= 120
    # nothing escaped
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "evil2.png").exists()
    assert not os.path.exists("/abs.png")
    for p in res.extracted:
        assert os.path.realpath(p).startswith(os.path.realpath(dest) + os.sep)
        assert not os.path.islink(p)
    by_file = {p.file: p for p in res.problems}
    for bad in ("../evil.png", "/abs.png", "..\\win_evil.png", "sub/../../evil2.png"):
        assert by_file[bad].code == "unsafe_path" and bad in by_file[bad].message
    assert by_file["link.png"].code == "symlink" and "link.png" in by_file["link.png"].message
    assert by_file["readme.pdf"].code == "skipped_file"
    assert by_file["photo.HEIC"].code == "unsupported_format"
    assert not any("MACOSX" in p.file or "DS_Store" in p.file for p in res.problems)
    assert all(isinstance(p, IngestProblem) and p.fix for p in res.problems)
    # the extracted folder is a usable dataset
    records, problems = collect_folder(dest)
    caps = {r.source_name: r.caption for r in records}
    assert caps["good.png"] == "a photo of TOK" and caps["sub/deep.png"] is None


def test_zip_bomb_ratio(tmp_path):
    z = tmp_path / "bomb.zip"
    t = time.time()
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("ok.png", png_bytes(noise()))
        with zf.open("zeros.png", "w", force_zip64=True) as f:
            block = bytes(16 * 1024 * 1024)
            for _ in range(200 // 16):
                f.write(block)
    assert z.stat().st_size < 2 * 1024 * 1024
    res = safe_extract_zip(z, tmp_path / "out")
    assert time.time() - t < 15
    assert [os.path.basename(p) for p in res.extracted] == ["ok.png"]
    (bomb,) = [p for p in res.problems if p.file == "zeros.png"]
    assert bomb.code == "zip_bomb" and "zeros.png" in bomb.message
    assert not (tmp_path / "out" / "zeros.png").exists()


def test_zip_declared_total_and_count_limits(tmp_path):
    z = tmp_path / "many.zip"
    _zip(z, [(f"img{i}.png", png_bytes(noise(seed=i))) for i in range(5)])
    res = safe_extract_zip(z, tmp_path / "o1", max_total_bytes=1000)
    assert res.extracted == [] and _codes(res.problems) == {"too_large"}
    res = safe_extract_zip(z, tmp_path / "o2", max_files=3)
    assert res.extracted == [] and _codes(res.problems) == {"too_many_files"}
    assert "many.zip" in res.problems[0].message
    res = safe_extract_zip(z, tmp_path / "o3")
    assert len(res.extracted) == 5 and res.problems == []


def test_zip_lying_header_cannot_fill_disk(tmp_path):
    z = tmp_path / "liar.zip"
    payload = np.random.default_rng(1).integers(0, 256, 3 * 1024 * 1024, dtype=np.uint8).tobytes()
    _zip(z, [("ok.png", png_bytes(noise())), ("liar.png", payload)])
    raw = bytearray(z.read_bytes())
    # declare 1000 bytes for liar.png in the local header and the central directory
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (i := raw.find(sig, start)) != -1:
            name_off = 30 if sig == b"PK\x03\x04" else 46
            n = struct.unpack_from("<H", raw, i + (26 if sig == b"PK\x03\x04" else 28))[0]
            if bytes(raw[i + name_off:i + name_off + n]) == b"liar.png":
                struct.pack_into("<I", raw, i + off, 1000)
            start = i + 4
    z.write_bytes(bytes(raw))
    out = tmp_path / "out"
    res = safe_extract_zip(z, out)
    assert [os.path.basename(p) for p in res.extracted] == ["ok.png"]
    (p,) = [p for p in res.problems if p.file == "liar.png"]
    assert p.code in ("zip_bomb", "bad_entry") and "liar.png" in p.message
    total = sum(f.stat().st_size for f in out.rglob("*"))
    assert total < 100_000  # no leftovers / partial files
    assert not any(f.name.endswith(".part") for f in out.rglob("*"))


def test_zip_stream_counted_even_if_reader_ignores_header(tmp_path, monkeypatch):
    """Our own byte counter stops an entry that yields more than declared, whatever the zip reader does."""
    z = tmp_path / "liar2.zip"
    _zip(z, [("ok.png", png_bytes(noise())), ("liar.png", b"x" * 1000)])
    real_open = zipfile.ZipFile.open

    def lying_open(self, name, *a, **k):
        n = name.filename if isinstance(name, zipfile.ZipInfo) else name
        if n == "liar.png":
            return io.BytesIO(b"x" * 10_000_000)
        return real_open(self, name, *a, **k)

    monkeypatch.setattr(zipfile.ZipFile, "open", lying_open)
    out = tmp_path / "out"
    res = safe_extract_zip(z, out)
    assert [os.path.basename(p) for p in res.extracted] == ["ok.png"]
    (p,) = [p for p in res.problems if p.file == "liar.png"]
    assert p.code == "zip_bomb" and "liar.png" in p.message
    assert sum(f.stat().st_size for f in out.rglob("*")) < 100_000


def test_zip_not_a_zip_and_collisions(tmp_path):
    bad = tmp_path / "fake.zip"
    bad.write_text("not a zip")
    res = safe_extract_zip(bad, tmp_path / "o")
    assert res.extracted == [] and res.problems[0].code == "bad_zip" and "fake.zip" in res.problems[0].message
    z = tmp_path / "dup.zip"
    _zip(z, [("a.png", png_bytes(noise(seed=1))), ("a.txt", "TOK one"),
             ("A.png", png_bytes(noise(seed=2))), ("A.txt", "TOK two")])
    out = tmp_path / "out"
    safe_extract_zip(z, out)
    res2 = safe_extract_zip(z, out)  # same upload again: nothing overwritten, pairs kept
    # names are compared case-insensitively (uploads may end up on such file systems)
    assert sorted(os.path.basename(p) for p in res2.extracted) == ["A-3.png", "A-3.txt", "a-2.png", "a-2.txt"]
    records, _ = collect_folder(out)
    by_name = {r.source_name: r.caption for r in records}
    assert by_name == {"a.png": "TOK one", "A-1.png": "TOK two", "a-2.png": "TOK one", "A-3.png": "TOK two"}


# ------------------------------------------------------------------------------------------------ folders

def test_collect_folder(tmp_path):
    ds = tmp_path / "ds"
    (ds / "sub").mkdir(parents=True)
    noise(seed=1).save(ds / "b.png")
    (ds / "b.txt").write_text("\ufeff TOK b \n", encoding="utf-8")
    noise(seed=2).save(ds / "a.jpg")
    noise(seed=3).save(ds / "sub" / "c.webp")
    (ds / "sub" / "c.txt").write_text("TOK c")
    noise(seed=4).save(ds / ".hidden.png")
    (ds / "notes.md").write_text("x")
    (ds / "phone.heic").write_bytes(b"x")
    outside = tmp_path / "secret.png"
    noise(seed=5).save(outside)
    os.symlink(outside, ds / "link_out.png")
    os.symlink(ds / "a.jpg", ds / "link_in.jpg")
    os.symlink(tmp_path, ds / "linkdir")
    records, problems = collect_folder(ds)
    assert [r.source_name for r in records] == ["a.jpg", "b.png", "link_in.jpg", "sub/c.webp"]
    assert all(isinstance(r, Record) and os.path.isabs(r.path) for r in records)
    caps = {r.source_name: r.caption for r in records}
    assert caps == {"a.jpg": None, "b.png": "TOK b", "link_in.jpg": None, "sub/c.webp": "TOK c"}
    by_file = {p.file: p for p in problems}
    assert by_file["link_out.png"].code == "symlink_outside" and "link_out.png" in by_file["link_out.png"].message
    assert by_file["linkdir"].code == "symlink_outside"
    assert by_file["phone.heic"].code == "unsupported_format"


# ------------------------------------------------------------------------------------------------ metadata.jsonl

def test_read_metadata_jsonl(tmp_path):
    ds = tmp_path / "ds"
    (ds / "img").mkdir(parents=True)
    noise(seed=1).save(ds / "img" / "a.png")
    noise(seed=2).save(ds / "b.png")
    outside = tmp_path / "secret.png"
    noise(seed=3).save(outside)
    os.symlink(outside, ds / "link.png")
    lines = [
        json.dumps({"file_name": "img/a.png", "text": "TOK a"}),
        "{bad json",
        json.dumps({"text": "no file"}),
        json.dumps({"file_name": "../secret.png", "text": "x"}),
        json.dumps({"file_name": "/etc/passwd", "text": "x"}),
        json.dumps({"file_name": "link.png", "text": "x"}),
        json.dumps({"file_name": "missing.png", "text": "x"}),
        json.dumps({"file_name": "b.png", "caption": "TOK b", "score": 1}),
        "",
        "[1, 2]",
        json.dumps({"file_name": "img/a.png", "text": "again"}),
    ]
    (ds / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    records, problems = read_metadata_jsonl(ds)
    assert [(r.source_name, r.caption) for r in records] == [("img/a.png", "TOK a"), ("b.png", None)]
    assert all(os.path.isfile(r.path) for r in records)
    got = [(p.file, p.code) for p in problems]
    assert ("metadata.jsonl line 2", "bad_json") in got
    assert ("metadata.jsonl line 3", "missing_file_name") in got
    assert ("../secret.png", "unsafe_path") in got
    assert ("/etc/passwd", "unsafe_path") in got
    assert ("link.png", "symlink_outside") in got
    assert ("missing.png", "missing_file") in got
    assert ("b.png", "missing_caption_column") in got
    assert ("metadata.jsonl line 10", "bad_json") in got
    assert ("img/a.png", "duplicate_entry") in got
    assert "line 2" in [p for p in problems if p.code == "bad_json"][0].message
    miss_col = [p for p in problems if p.code == "missing_caption_column"][0]
    assert "caption" in miss_col.message and "file_name" in miss_col.message and "score" in miss_col.message
    for p in problems:
        assert p.fix
    # caption column choice
    records2, _ = read_metadata_jsonl(ds, caption_column="caption")
    assert ("b.png", "TOK b") in [(r.source_name, r.caption) for r in records2]
    # collect_dataset prefers metadata.jsonl
    assert [r.source_name for r in collect_dataset(ds)[0]] == ["img/a.png", "b.png"]


def test_missing_metadata(tmp_path):
    records, problems = read_metadata_jsonl(tmp_path)
    assert records == [] and problems[0].code == "missing_metadata"


def test_write_metadata_roundtrip(tmp_path):
    ds = tmp_path / "ds"
    (ds / "sub").mkdir(parents=True)
    noise(seed=1).save(ds / "sub" / "é.png")
    noise(seed=2).save(ds / "b.png")
    recs = [Record(str(ds / "sub" / "é.png"), "TOK \"quoted\"\nline", "sub/é.png"),
            Record(str(ds / "b.png"), None, "b.png")]
    target = write_metadata_jsonl(ds, recs)
    assert os.path.basename(target) == "metadata.jsonl"
    rows = [json.loads(l) for l in (ds / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows == [{"file_name": "sub/é.png", "text": "TOK \"quoted\"\nline"}, {"file_name": "b.png", "text": ""}]
    assert [f for f in os.listdir(ds) if f.endswith(".tmp")] == []
    back, problems = read_metadata_jsonl(ds)
    assert problems == [] and [r.caption for r in back] == ["TOK \"quoted\"\nline", ""]
    with pytest.raises(ValueError):
        write_metadata_jsonl(ds, [Record(str(tmp_path / "x.png"), "x", "x.png")])
    assert json.loads((ds / "metadata.jsonl").read_text(encoding="utf-8").splitlines()[0])["file_name"] == \
        "sub/é.png"  # failed write left the old file intact
