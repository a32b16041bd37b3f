"""One table of bad inputs, driven through three channels: the app's API, the CLI and the library.

Issue: "each yields its message, the server keeps answering, and the good files of the same upload are kept".
Every row builds its bad input in a temporary folder and says what must happen: rejected with a message that
contains a fragment (and the library code), or accepted with a note.

* API (one running app): the bad file (or a zip holding it) is uploaded together with two good PNGs through
  ``/upload_images``; the reply names the file and what is wrong, the good files are in ``/list_dataset``; then
  ``/clear_dataset``. After all rows the server still answers.
* CLI: ONE ``python -m trainer`` run over a folder holding the bad files of a subset of rows plus 3 good images:
  exit 0, every bad file named in stderr ("skipped <file>: ..."), ``started.num_images == 3``. The other folder
  rows go through ``trainer.data.sources.load_items`` (what the CLI calls) in-process.
* Library: ``load_image`` / ``safe_extract_zip`` / ``read_metadata_jsonl`` / ``collect_folder`` for every row.
"""
from __future__ import annotations

import io
import json
import os
import stat
import struct
import subprocess
import sys
import time
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
from PIL import Image

from app_fixtures import OFFLINE_ENV, REPO, start_app, stop_app
from trainer.data.images import ImageProblem, load_image
from trainer.data.folders import collect_dataset
from uploads import safe_extract_zip

# ----- builders ---------------------------------------------------------------------------------------------------


def noise(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)


def png_bytes(seed: int, size=(96, 96)) -> bytes:
    buf = io.BytesIO()
    noise(*size, seed).save(buf, "PNG")
    return buf.getvalue()


def raw_png(w: int, h: int) -> bytes:
    """A PNG whose header claims ``w`` x ``h`` (no real pixel data): bombs and zero sizes."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def write(folder: Path, name: str, data: bytes) -> Path:
    p = folder / name
    p.write_bytes(data)
    return p


def truncated(fmt: str, keep: float):
    def build(folder: Path, name: str) -> None:
        buf = io.BytesIO()
        noise(96, 96, 7).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        data = buf.getvalue()
        write(folder, name, data[: int(len(data) * keep)])
    return build


def saved(make: Callable[[], Image.Image], fmt: str, **kw):
    def build(folder: Path, name: str) -> None:
        make().save(folder / name, fmt, **kw)
    return build


def sixteen_bit() -> Image.Image:
    arr = (np.add.outer(np.arange(80), np.arange(96)) * 300 % 65535).astype(np.uint16)
    return Image.fromarray(arr)  # uint16 -> "I;16"


def palette_alpha() -> Image.Image:
    im = noise(96, 96, 3).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    im.info["transparency"] = 0
    return im


def animated_gif(folder: Path, name: str) -> None:
    frames = [noise(96, 96, s).convert("P") for s in (11, 12, 13)]
    frames[0].save(folder / name, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated(folder: Path, name: str) -> None:
    im = noise(128, 96, 21)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(folder / name, "JPEG", exif=exif.tobytes(), quality=90)


def good_copy(seed: int):
    def build(folder: Path, name: str) -> None:
        write(folder, name, png_bytes(seed))
    return build


def make_zip(entries: list) -> bytes:
    """``entries``: (name, data) or (ZipInfo, data); always adds one good image, 'zipped_ok.png'."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zipped_ok.png", png_bytes(31))
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def zipped(entries_fn: Callable[[], list]):
    def build(folder: Path, name: str) -> None:
        write(folder, name, make_zip(entries_fn()))
    return build


def symlink_entry():
    info = zipfile.ZipInfo("link.png")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return [(info, "/etc/passwd")]


def crc_broken_zip(folder: Path, name: str) -> None:
    payload = png_bytes(41)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zipped_ok.png", png_bytes(31))
        zf.writestr(zipfile.ZipInfo("crc.png"), payload, compress_type=zipfile.ZIP_STORED)
    data = bytearray(buf.getvalue())
    i = data.find(payload)
    data[i + len(payload) // 2] ^= 0xFF
    write(folder, name, bytes(data))


# metadata / folder rows: the folder already holds good_0..2.png with .txt captions.
def meta_lines(bad_line: str):
    def build(folder: Path, name: str) -> None:
        lines = [json.dumps({"file_name": f"good_{i}.png", "text": f"a photo of TOK {i}"}) for i in range(3)]
        (folder / "metadata.jsonl").write_text("\n".join(lines[:1] + [bad_line] + lines[1:]) + "\n")
    return build


def meta_symlink(folder: Path, name: str) -> None:
    outside = folder.parent / f"outside_{folder.name}.png"
    outside.write_bytes(png_bytes(51))
    os.symlink(outside, folder / name)
    meta_lines(json.dumps({"file_name": name, "text": "a photo of TOK"}))(folder, name)


def folder_symlink(folder: Path, name: str) -> None:
    outside = folder.parent / f"outside_{folder.name}.png"
    outside.write_bytes(png_bytes(52))
    os.symlink(outside, folder / name)


def latin1_caption(folder: Path, name: str) -> None:
    write(folder, Path(name).stem + ".png", png_bytes(61))
    (folder / name).write_bytes("a photo of TOK in a café, façade".encode("cp1252"))


# ----- the table --------------------------------------------------------------------------------------------------

@dataclass
class Row:
    id: str
    kind: str          # "image" (one file), "zip" (an archive), "meta" / "folder" (a dataset folder)
    name: str          # the bad file's name; what the message must mention
    build: Callable[[Path, str], None]
    accept: bool       # False: rejected (file skipped); True: accepted with a note
    fragment: str      # part of the message (rejected) or the note (accepted)
    code: str          # the library's code ("" for accepted images without a problem)
    api: bool = True   # uploadable through the app
    cli: bool = False  # in the one real CLI run

    def __str__(self):
        return self.id


LONG = "very_long_name_" + "x" * 200 + ".png"
UNI = "фото café 😀 ß.png"

ROWS = [
    Row("empty", "image", "empty.png", lambda f, n: write(f, n, b""), False, "empty (0 bytes)", "empty", cli=True),
    Row("truncated_png", "image", "cut.png", truncated("PNG", 0.6), False, "truncated", "truncated", cli=True),
    Row("truncated_jpeg", "image", "cut.jpg", truncated("JPEG", 0.5), False, "truncated", "truncated", cli=True),
    Row("text_as_jpg", "image", "notes.jpg", lambda f, n: write(f, n, b"shopping list: milk, eggs\n" * 20), False,
        "is not an image", "not_an_image", cli=True),
    Row("decompression_bomb", "image", "bomb.png", lambda f, n: write(f, n, raw_png(100_000, 100_000)), False,
        "too large to open safely", "decompression_bomb", cli=True),
    Row("zero_width", "image", "zero.png", lambda f, n: write(f, n, raw_png(0, 64)), False,
        "zero width or height", "not_an_image", cli=True),
    Row("huge_dimensions", "image", "strip.png", saved(lambda: Image.new("L", (40_000, 2)), "PNG"), False,
        "a side longer than 30,000", "too_large_dimensions", cli=True),
    Row("ico", "image", "icon.ico", saved(lambda: noise(32, 32, 4), "ICO"), False, "not supported",
        "unsupported_format"),
    Row("psd", "image", "layers.psd", lambda f, n: write(f, n, b"8BPS\x00\x01" + b"\x00" * 40), False,
        "not supported", "unsupported_format"),
    Row("heic", "image", "phone.heic", lambda f, n: write(f, n, b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"
                                                           + bytes(range(256))), False,
        "not supported", "unsupported_format"),
    Row("svg", "image", "logo.svg", lambda f, n: write(f, n, b"<svg xmlns='http://www.w3.org/2000/svg'/>"), False,
        "not supported", "unsupported_format"),
    Row("sixteen_bit_png", "image", "deep.png", saved(sixteen_bit, "PNG"), True, "16-bit image scaled to 8-bit", ""),
    Row("cmyk_jpeg", "image", "print.jpg", saved(lambda: noise(96, 96, 5, "CMYK"), "JPEG"), True,
        "CMYK converted to RGB", ""),
    Row("palette_transparency", "image", "pal.png", saved(palette_alpha, "PNG"), True,
        "transparency composited on white", ""),
    Row("animated_gif", "image", "anim.gif", animated_gif, True, "animated: first frame used", ""),
    Row("exif_rotated", "image", "rotated.jpg", exif_rotated, True, "EXIF orientation 6 applied", ""),
    Row("unicode_name", "image", UNI, good_copy(71), True, "", ""),
    Row("very_long_name", "image", LONG, good_copy(72), True, "saved as", ""),
    Row("zip_slip", "zip", "slip.zip", zipped(lambda: [("../evil.png", png_bytes(81))]), False,
        "points outside the upload folder", "unsafe_path"),
    Row("zip_absolute", "zip", "abs.zip", zipped(lambda: [("/tmp/abs_evil.png", png_bytes(82))]), False,
        "points outside the upload folder", "unsafe_path"),
    Row("zip_bomb", "zip", "bomb.zip", zipped(lambda: [("big.png", b"\0" * (24 << 20))]), False,
        "looks like a zip bomb", "zip_bomb"),
    Row("zip_symlink", "zip", "link.zip", zipped(symlink_entry), False, "is a symbolic link", "symlink"),
    Row("zip_crc_error", "zip", "crc.zip", crc_broken_zip, False, "is damaged", "bad_entry"),
    Row("zip_unsupported_entry", "zip", "heic.zip", zipped(lambda: [("phone.heic", b"ftypheic" * 8)]), False,
        "not supported", "unsupported_format"),
    Row("not_a_zip", "zip", "archive.zip", lambda f, n: write(f, n, b"PK? no, just text\n" * 10), False,
        "is not a valid zip archive", "bad_zip"),
    Row("meta_bad_json", "meta", "metadata.jsonl line 2", meta_lines('{"file_name": "good_9.png", "text": '), False,
        "is not valid JSON", "bad_json"),
    Row("meta_missing_file_name", "meta", "metadata.jsonl line 2", meta_lines('{"text": "a photo of TOK"}'), False,
        "has no 'file_name'", "missing_file_name"),
    Row("meta_path_outside", "meta", "../outside.png",
        meta_lines(json.dumps({"file_name": "../outside.png", "text": "x"})), False,
        "points outside the dataset folder", "unsafe_path"),
    Row("meta_absolute_path", "meta", "/etc/passwd", meta_lines(json.dumps({"file_name": "/etc/passwd"})), False,
        "points outside the dataset folder", "unsafe_path"),
    Row("meta_missing_file", "meta", "ghost.png", meta_lines(json.dumps({"file_name": "ghost.png", "text": "x"})),
        False, "does not exist", "missing_file"),
    Row("meta_symlink_out", "meta", "link_out.png", meta_symlink, False, "outside the dataset folder",
        "symlink_outside", api=False),
    Row("folder_symlink_out", "folder", "escape.png", folder_symlink, False, "link to a file outside",
        "symlink_outside", api=False, cli=True),
    Row("caption_not_utf8", "folder", "latin.txt", latin1_caption, True, "is not UTF-8", "caption_not_utf8"),
]
assert len(ROWS) >= 25 and len({r.id for r in ROWS}) == len(ROWS)


def good_folder(folder: Path, n: int = 3, prefix: str = "good") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write(folder, f"{prefix}_{i}.png", png_bytes(100 + i))
        (folder / f"{prefix}_{i}.txt").write_text(f"a photo of TOK, picture {i}")
    return folder


def row_folder(row: Row, base: Path) -> Path:
    """A dataset folder: 3 good images with captions + the row's bad input."""
    folder = good_folder(base / row.id)
    row.build(folder, row.name)
    return folder


# ----- (c) library: every row ------------------------------------------------------------------------------------

@pytest.mark.parametrize("row", ROWS, ids=str)
def test_library(row, tmp_path):
    folder = row_folder(row, tmp_path)
    if row.kind == "image":
        path = folder / row.name
        if row.accept:
            loaded = load_image(path)
            assert loaded.image.mode == "RGB"
            if row.fragment and row.fragment != "saved as":
                assert any(row.fragment in n for n in loaded.notes), loaded.notes
            if row.id == "exif_rotated":
                assert loaded.image.size == (96, 128)
            if row.id == "animated_gif":
                assert np.array_equal(np.asarray(loaded.image), np.asarray(noise(96, 96, 11).convert("P")
                                                                           .convert("RGB")))
        else:
            with pytest.raises(ImageProblem) as ei:
                load_image(path)
            assert ei.value.code == row.code and row.fragment in ei.value.message and row.name in ei.value.message
    elif row.kind == "zip":
        res = safe_extract_zip(folder / row.name, tmp_path / "out")
        probs = [(p.code, p.file, p.message) for p in res.problems]
        assert any(c == row.code and row.fragment in m for c, _f, m in probs), probs
        names = sorted(os.path.basename(p) for p in res.extracted)
        assert names == ([] if row.code == "bad_zip" else ["zipped_ok.png"]), names
        assert not (tmp_path / "evil.png").exists() and not os.path.exists("/tmp/abs_evil.png")
    else:  # a dataset folder: metadata.jsonl (read_metadata_jsonl) or sidecars (collect_folder)
        records, problems = collect_dataset(folder)
        good = sorted(os.path.basename(r.path) for r in records)
        expect = [f"good_{i}.png" for i in range(3)] + ([row.name.replace(".txt", ".png")] if row.accept else [])
        assert good == sorted(expect), good
        hit = [p for p in problems if p.code == row.code]
        assert hit and row.fragment in hit[0].message and row.name in f"{hit[0].file} {hit[0].message}", problems
        if row.id == "caption_not_utf8":
            cap = next(r.caption for r in records if r.path.endswith("latin.png"))
            assert cap == "a photo of TOK in a café, façade"


# ----- (b) load_items for the folder rows outside the CLI run, then the CLI run --------------------------------

def _cfg(folder: Path, out: Path):
    from trainer.config import TrainConfig

    return TrainConfig.from_dict({"pretrained_model_name_or_path": "tiny-sdxl", "instance_data_dir": str(folder),
                                  "output_dir": str(out), "max_train_steps": 2})


@pytest.mark.parametrize("row", [r for r in ROWS if r.kind != "zip" and not r.cli], ids=str)
def test_load_items(row, tmp_path):
    from trainer.data.sources import load_items

    folder = row_folder(row, tmp_path)
    items, problems = load_items(_cfg(folder, tmp_path / "out"))
    assert len(items) == 3 + (1 if row.accept and row.kind == "image" or row.id == "caption_not_utf8" else 0)
    named = [p for p in problems if row.name in p.file or row.name in p.message]
    if row.kind == "image" and row.accept:
        assert not named
        item = next(i for i in items if i.name == row.name)
        if row.fragment and row.fragment != "saved as":
            assert any(row.fragment in n for n in item.notes)
    else:
        assert named and row.fragment in named[0].message, problems


def test_cli_skips_bad_files_and_trains_on_the_good_ones(tmp_path):
    rows = [r for r in ROWS if r.cli]
    assert len(rows) >= 8
    folder = good_folder(tmp_path / "data")
    for r in rows:
        r.build(folder, r.name)
    out = tmp_path / "out"
    env = dict(os.environ, **OFFLINE_ENV, OMP_NUM_THREADS="1")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "trainer", "--pretrained_model_name_or_path", "tiny-sdxl",
                           "--instance_data_dir", str(folder), "--output_dir", str(out), "--max_train_steps", "2",
                           "--checkpointing_steps", "1000"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    print(f"CLI run: {time.time() - t0:.1f}s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in rows:
        lines = [ln for ln in proc.stderr.splitlines() if f"skipped {r.name}:" in ln]
        assert lines and r.fragment in lines[0], (r.id, proc.stderr[-3000:])
    events = [json.loads(ln) for ln in (out / "events.jsonl").read_text().splitlines() if ln.strip()]
    started = [e for e in events if e["type"] == "started"]
    assert started and started[0]["num_images"] == 3
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors")


# ----- (a) the app's API: every uploadable row against ONE running app --------------------------------------------

@pytest.fixture(scope="module")
def app(tmp_path_factory):
    server = start_app(str(tmp_path_factory.mktemp("bad_inputs_app")))
    yield server
    stop_app(server)


def _rows_of(table) -> list:
    return table["data"] if isinstance(table, dict) else table


def _upload_input(row: Row, base: Path) -> tuple[Path, list[str]]:
    """(what to upload, names of the good images it adds). Folder rows are zipped (images + metadata/captions)."""
    if row.kind in ("image", "zip"):
        folder = base / row.id
        folder.mkdir(parents=True)
        row.build(folder, row.name)
        extra = ["zipped_ok.png"] if row.kind == "zip" and row.code != "bad_zip" else []
        return folder / row.name, extra
    folder = row_folder(row, base / "src")
    zpath = base / f"{row.id}.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, p.name)
    extra = [f"good_{i}.png" for i in range(3)] + (["latin.png"] if row.id == "caption_not_utf8" else [])
    return zpath, extra


API_ROWS = [r for r in ROWS if r.api]


def test_api_uploads(app, tmp_path):
    from gradio_client import Client, handle_file

    c = Client(app.url, verbose=False)
    goods = [write(tmp_path, "upload_a.png", png_bytes(201)), write(tmp_path, "upload_b.png", png_bytes(202))]
    failures, timings = [], {}
    for row in API_ROWS:
        t0 = time.time()
        bad, extra = _upload_input(row, tmp_path / "rows")
        try:
            _f, _gal, table, msg, problems = c.predict([handle_file(str(bad))] + [handle_file(str(g)) for g in goods],
                                                       api_name="/upload_images")
            _gal, table = c.predict(api_name="/list_dataset")
            names = sorted(r[0] for r in _rows_of(table))
            exp = ["upload_a.png", "upload_b.png"] + extra
            if row.kind == "image" and row.accept:
                stored = row.name if row.id != "very_long_name" else next(
                    (n for n in names if n.startswith("very_long_name_")), "?")
                exp.append(stored)
            checks = {
                "good files kept": names == sorted(exp),
                # (gradio itself shortens very long upload names a little; an accepted plain image needs no message)
                "file named in message": (row.name[:100] if row.id == "very_long_name" else row.name) in msg
                if row.id != "unicode_name" else True,
                "what is wrong": row.fragment in msg,
            }
            if not row.accept:
                assert_rows = _rows_of(problems)
                checks["problems table"] = any(row.name in str(p[0]) + str(p[2]) for p in assert_rows)
                checks["says skipped"] = "skipped" in msg
            if row.id == "unicode_name":
                checks["unicode name kept"] = UNI in names
            if row.id == "very_long_name":
                checks["long name shortened"] = all(len(n.encode()) <= 200 for n in names)
            if row.id == "caption_not_utf8":
                caps = {r[0]: r[1] for r in _rows_of(table)}
                checks["caption decoded"] = caps.get("latin.png") == "a photo of TOK in a café, façade"
            if row.kind == "meta" and row.code != "unsafe_path":
                caps = {r[0]: r[1] for r in _rows_of(table)}
                checks["metadata captions used"] = caps.get("good_0.png") == "a photo of TOK 0"
            bad_checks = [k for k, ok in checks.items() if not ok]
            if bad_checks:
                failures.append(f"{row.id}: {bad_checks}\n  names={names}\n  msg={msg[:800]}")
        finally:
            out = c.predict(api_name="/clear_dataset")
            assert "cleared" in out[2]
        timings[row.id] = round(time.time() - t0, 2)
    print("API rows:", len(API_ROWS), "timings:", timings)
    assert not failures, "\n".join(failures)
    # The server keeps answering after all of it.
    assert c.predict(api_name="/training_status")["state"] == "none"
    with urllib.request.urlopen(app.url + "/gradio_api/info", timeout=10) as r:
        assert r.status == 200 and "upload_images" in r.read().decode()
    assert app.proc.poll() is None
    sessions = Path(app.root, "sessions")
    assert not list(sessions.glob("*/uploads/.zip-*")), "staging folders left behind"
    assert not Path("/tmp/abs_evil.png").exists() and not list(sessions.glob("*/evil.png"))
