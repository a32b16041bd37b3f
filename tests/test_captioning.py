"""Tests of the captioning package, run against the offline tiny BLIP (real model, random weights)."""
from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import captioning
from captioning import CaptionerLoadError, apply_trigger, caption, release_all
from captioning.base import clean_caption, load_image, resolve_dtype
from captioning.tiny import TINY_BLIP_ID, build_tiny_blip, tiny_blip_path

MAX_TOKENS = 8  # keeps generation fast; the tiny model happily emits words until the limit


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-studio-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_STUDIO_CACHE", str(root))
        yield root
    release_all()


@pytest.fixture(autouse=True)
def _isolated_cache(cache_dir, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_CACHE", str(cache_dir))
    yield


@pytest.fixture(scope="session")
def tiny_path(cache_dir):
    return tiny_blip_path()


def _images(tmp_path: Path) -> list:
    rng = np.random.default_rng(0)
    rgb_small = Image.fromarray((rng.random((24, 40, 3)) * 255).astype("uint8"), "RGB")
    rgb_big = Image.fromarray((rng.random((97, 61, 3)) * 255).astype("uint8"), "RGB")
    rgba = Image.new("RGBA", (50, 30), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (10, 10, 30, 20))
    gray = Image.fromarray((rng.random((33, 33)) * 255).astype("uint8"), "L")
    path = tmp_path / "palette.png"
    Image.fromarray((rng.random((16, 64, 3)) * 255).astype("uint8"), "RGB").convert("P").save(path)
    return [rgb_small, rgba, gray, str(path), rgb_big]


# ------------------------------------------------------------------------------------------ tiny model


def test_tiny_blip_is_small_cached_and_atomic(tiny_path, cache_dir):
    p = Path(tiny_path)
    assert p == cache_dir / TINY_BLIP_ID
    assert (p / "config.json").is_file() and (p / "vocab.txt").is_file()
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    assert size < 3 * 1024 * 1024, size
    mtime = (p / "model.safetensors").stat().st_mtime_ns
    assert tiny_blip_path() == str(p)  # second call: no rebuild
    assert (p / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(x.name for x in cache_dir.iterdir()) == [TINY_BLIP_ID]  # no temp dirs left behind
    config = json.loads((p / "config.json").read_text())
    assert config["model_type"] == "blip"
    vocab = (p / "vocab.txt").read_text().split("\n")
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocab) > 200
    assert config["text_config"]["bos_token_id"] == len([v for v in vocab if v])  # [DEC] appended after the vocab


def test_tiny_blip_build_is_deterministic(tiny_path, tmp_path):
    other = build_tiny_blip(tmp_path / "again")
    a = (Path(tiny_path) / "model.safetensors").read_bytes()
    b = (Path(other) / "model.safetensors").read_bytes()
    assert a == b


# ------------------------------------------------------------------------------------ end to end


def test_caption_batches_mixed_images_with_progress(tiny_path, tmp_path):
    images = _images(tmp_path)
    calls = []
    out = caption(
        images, model=TINY_BLIP_ID, concept="object", trigger="TOK", batch_size=2,
        max_new_tokens=MAX_TOKENS, on_progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert len(out) == 5
    for text in out:
        assert isinstance(text, str)
        assert text.startswith("a photo of TOK, ")
        body = text[len("a photo of TOK, "):]
        assert body.strip() and body == " ".join(body.split())
        assert len(body.split()) <= MAX_TOKENS


def test_batching_does_not_change_captions(tiny_path, tmp_path):
    images = _images(tmp_path)
    one = caption(images, model=TINY_BLIP_ID, batch_size=1, max_new_tokens=MAX_TOKENS)
    five = caption(images, model=TINY_BLIP_ID, batch_size=5, max_new_tokens=MAX_TOKENS)
    assert one == five


@pytest.mark.parametrize("concept", ["face", "object", "character"])
def test_subject_concepts_put_trigger_first(tiny_path, tmp_path, concept):
    out = caption(_images(tmp_path)[:2], model=TINY_BLIP_ID, concept=concept, trigger="ohwx",
                  max_new_tokens=MAX_TOKENS)
    assert all(t.startswith("a photo of ohwx, ") and len(t) > len("a photo of ohwx, ") for t in out)


def test_style_concept_puts_trigger_last(tiny_path, tmp_path):
    out = caption(_images(tmp_path)[:3], model=TINY_BLIP_ID, concept="style", trigger="TOK",
                  max_new_tokens=MAX_TOKENS)
    for t in out:
        assert t.endswith(", in the style of TOK")
        assert t[: -len(", in the style of TOK")].strip()


def test_custom_template_prefix_suffix(tiny_path, tmp_path):
    raw = caption(_images(tmp_path)[:2], model=TINY_BLIP_ID, trigger="", max_new_tokens=MAX_TOKENS)
    out = caption(_images(tmp_path)[:2], model=TINY_BLIP_ID, trigger="sks", template="{trigger} art, {caption}",
                  prefix="pre ", suffix=" post", max_new_tokens=MAX_TOKENS)
    assert out == [f"sks art, pre {r} post" for r in raw]


def test_captioner_class_and_cache_reuse(tiny_path, tmp_path):
    release_all()
    cap = captioning.Captioner(TINY_BLIP_ID, device="cpu")
    assert not cap.loaded
    assert cap.load() is cap and cap.loaded and cap.dtype == torch.float32
    texts = cap.caption_batch(_images(tmp_path)[:3], max_new_tokens=MAX_TOKENS)
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
    cap.release()
    assert not cap.loaded and cap.model is None and cap.processor is None

    caption(_images(tmp_path)[:1], model=TINY_BLIP_ID, max_new_tokens=MAX_TOKENS)
    first = captioning.loaded_captioners()
    caption(_images(tmp_path)[:1], model=TINY_BLIP_ID, max_new_tokens=MAX_TOKENS)
    assert captioning.loaded_captioners() == first and len(first) == 1
    assert captioning.get_captioner(TINY_BLIP_ID).model is first[0].model


def test_release_all_frees_the_model(tiny_path, tmp_path):
    caption(_images(tmp_path)[:1], model=TINY_BLIP_ID, max_new_tokens=MAX_TOKENS)
    caps = captioning.loaded_captioners()
    assert caps and caps[0].loaded
    model_ref = weakref.ref(caps[0].model)
    del caps
    assert release_all() >= 1
    assert captioning.loaded_captioners() == []
    assert model_ref() is None  # nothing keeps the weights alive
    assert release_all() == 0


def test_empty_input_loads_nothing(cache_dir):
    release_all()
    assert caption([], model="no-such/model-anywhere") == []
    assert captioning.loaded_captioners() == []


# ------------------------------------------------------------------------------------- loading rules


def test_offline_unknown_hub_id_raises_helpful_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_id = "lora-studio-tests/definitely-not-a-real-captioner"
    with pytest.raises(CaptionerLoadError) as info:
        caption([Image.new("RGB", (8, 8))], model=model_id)
    err = info.value
    assert isinstance(err, RuntimeError)
    msg = str(err)
    assert "Hub could not be reached" in msg
    assert model_id in msg
    assert "local folder" in msg and "tiny-blip" in msg
    assert err.hub_unreachable and err.model_id == model_id
    assert all(c.model_id != model_id for c in captioning.loaded_captioners())  # a failed load is not cached


def test_missing_local_folder_raises(tmp_path):
    with pytest.raises(CaptionerLoadError, match="does not exist"):
        captioning.Captioner(str(tmp_path / "nope" / "blip")).load()


def test_loader_never_trusts_remote_code(tiny_path, tmp_path, monkeypatch):
    import transformers

    seen = []

    def spy(owner):
        original = owner.from_pretrained  # bound classmethod

        def from_pretrained(cls, *args, **kwargs):
            seen.append((owner.__name__, kwargs.get("trust_remote_code", "absent")))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, "from_pretrained", classmethod(from_pretrained))

    for owner in (transformers.AutoConfig, transformers.AutoProcessor, transformers.BlipForConditionalGeneration,
                  transformers.AutoModelForImageTextToText):
        spy(owner)

    # A folder whose config asks for custom code: the code must never run.
    evil = tmp_path / "evil-blip"
    shutil.copytree(tiny_path, evil)
    marker = tmp_path / "code-was-executed"
    (evil / "evil_config.py").write_text(
        f"open({str(marker)!r}, 'w').write('pwned')\n"
        "from transformers import BlipConfig\n"
        "class EvilConfig(BlipConfig):\n    pass\n"
    )
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_config.EvilConfig"}
    (evil / "config.json").write_text(json.dumps(config))

    cap = captioning.Captioner(str(evil), device="cpu").load()
    assert cap.caption_batch([Image.new("RGB", (40, 40), "white")], max_new_tokens=MAX_TOKENS)[0]
    cap.release()
    assert not marker.exists()
    names = [n for n, _ in seen]
    assert "AutoConfig" in names and "AutoProcessor" in names and "BlipForConditionalGeneration" in names
    assert all(value is False for _, value in seen), seen


# ------------------------------------------------------------------------------------------ templates


@pytest.mark.parametrize("concept", ["face", "object", "character", " Object "])
def test_apply_trigger_subject(concept):
    assert apply_trigger("a man in a red hat", concept) == "a photo of TOK, a man in a red hat"
    assert apply_trigger("  a man \n in a hat. ", concept, trigger="ohwx") == "a photo of ohwx, a man in a hat"


def test_apply_trigger_style():
    assert apply_trigger("a castle on a hill", "style") == "a castle on a hill, in the style of TOK"
    assert apply_trigger("a castle on a hill.", "style", trigger="sks") == "a castle on a hill, in the style of sks"


def test_apply_trigger_empty_caption():
    assert apply_trigger("", "object") == "a photo of TOK"
    assert apply_trigger("   ", "face", trigger="ohwx") == "a photo of ohwx"
    assert apply_trigger("", "style") == "in the style of TOK"
    assert apply_trigger("", "object", template="{trigger}, {caption}") == "TOK"
    assert apply_trigger("", "style", template="{caption}, {trigger} style") == "TOK style"


def test_apply_trigger_custom_template():
    assert apply_trigger("a dog", "object", "sks", template="{trigger} {caption}, best quality") == \
        "sks a dog, best quality"
    assert apply_trigger("a {weird} dog", "style", "sks", template="{caption} | art by {trigger}") == \
        "a {weird} dog | art by sks"
    with pytest.raises(ValueError, match="placeholder"):
        apply_trigger("a dog", "object", template="no placeholders here")


def test_apply_trigger_leaves_caption_with_trigger_alone():
    for concept in ("object", "style"):
        assert apply_trigger("TOK sitting on a chair", concept) == "TOK sitting on a chair"
        assert apply_trigger("a portrait of TOK.", concept, template="{trigger}: {caption}") == "a portrait of TOK."
    # only whole words count
    assert apply_trigger("TOKEN on a table", "object") == "a photo of TOK, TOKEN on a table"


def test_unknown_concept_is_rejected_before_loading():
    with pytest.raises(ValueError) as info:
        apply_trigger("a dog", "landscape")
    for name in ("face", "object", "character", "style"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="style"):
        caption([Image.new("RGB", (8, 8))], model="no-such/model-anywhere", concept="pose")
    assert all(c.model_id != "no-such/model-anywhere" for c in captioning.loaded_captioners())


# -------------------------------------------------------------------------------------------- helpers


def test_clean_caption():
    assert clean_caption("  arafed man   in a hat \n") == "man in a hat"
    assert clean_caption("araffe woman , with a woman ' s hat") == "woman, with a woman's hat"
    assert clean_caption("there is a dog on the grass") == "a dog on the grass"
    assert clean_caption("arafed") == "arafed"  # never cleaned down to nothing
    assert clean_caption("") == ""


def test_load_image_modes(tmp_path):
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert load_image(clear).mode == "RGB" and load_image(clear).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert load_image(deep).getpixel((0, 0)) == (255, 255, 255)
    p = tmp_path / "g.png"
    Image.new("L", (5, 7), 128).save(p)
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (5, 7)
    with pytest.raises(TypeError):
        load_image(42)


def test_dtype_choice():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) in (torch.float16, torch.bfloat16)
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError):
        resolve_dtype("int3", torch.device("cpu"))


def test_caption_in_half_precision_as_on_a_gpu(tiny_path, tmp_path):
    """CUDA captions in bf16 (or fp16): the same half-precision path, run on CPU in bf16."""
    cap = captioning.get_captioner(TINY_BLIP_ID, device="cpu", dtype="bf16")
    try:
        assert cap.dtype == torch.bfloat16 and next(cap.model.parameters()).dtype == torch.bfloat16
        out = caption(_images(tmp_path), model=TINY_BLIP_ID, device="cpu", dtype="bf16", batch_size=2,
                      max_new_tokens=MAX_TOKENS)
        assert len(out) == 5 and all(t.startswith("a photo of TOK, ") and len(t) > len("a photo of TOK, ")
                                     for t in out)
    finally:
        release_all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_caption_on_cuda_uses_half_precision(tiny_path, tmp_path):
    cap = captioning.get_captioner(TINY_BLIP_ID, device="cuda")
    assert cap.dtype in (torch.float16, torch.bfloat16)
    assert next(cap.model.parameters()).dtype == cap.dtype
    out = caption(_images(tmp_path), model=TINY_BLIP_ID, device="cuda", batch_size=2, max_new_tokens=MAX_TOKENS)
    assert len(out) == 5 and all(t.startswith("a photo of TOK, ") for t in out)
    release_all()
    assert torch.cuda.memory_allocated() < 1024 * 1024
