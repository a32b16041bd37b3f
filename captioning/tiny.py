"""A tiny, randomly initialised BLIP captioning model that is built fully offline.

It exists so that the captioning pipeline (processor -> batched ``generate`` -> decode -> trigger template)
can be exercised end to end on machines that cannot reach the Hugging Face Hub, e.g. CI and the tests. Its
captions are random English words, but the model goes through exactly the same loading code as a real Hub
checkpoint: it is saved with ``save_pretrained`` and loaded back with ``from_pretrained`` on the folder.

Pass the model id :data:`TINY_BLIP_ID` (``"tiny-blip"``) to :func:`captioning.caption` to use it.
"""
from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import threading
from pathlib import Path

TINY_BLIP_ID = "tiny-blip"

# Bump when the recipe changes so that stale folders in users' caches are rebuilt.
_TINY_VERSION = "1"
_MARKER = "tiny_blip_version.txt"

IMAGE_SIZE = 32
SEED = 0

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BOS_TOKEN = "[DEC]"  # BLIP's decoder start token, added after the vocab like in the real checkpoints.

# A few hundred ordinary lowercase English words; the caption vocabulary of the random model.
_WORDS = """
a an the of in on at with and or to from by for over under near behind beside between
is are was sitting standing holding wearing looking walking running lying smiling playing
man woman person people boy girl child baby face portrait hair eyes nose mouth hand hands
arm arms leg legs head shoulder beard glasses hat cap shirt jacket coat dress suit tie
scarf shoes boots bag backpack necklace earrings watch ring uniform costume helmet mask
dog cat bird horse cow sheep fish bear lion tiger elephant rabbit fox deer duck owl
car truck bus bike motorcycle train boat plane ship road street bridge building house
city town village tower castle church window door wall floor roof room kitchen bedroom
table chair sofa couch bed lamp desk shelf book books cup mug bottle glass plate bowl
vase flower flowers plant plants tree trees grass leaf leaves garden park forest field
mountain mountains hill river lake sea ocean beach sand rock rocks stone sky cloud clouds
sun moon star stars snow rain water fire light shadow night day morning evening sunset
red blue green yellow orange purple pink brown black white gray grey gold silver dark
bright colorful small large big tiny little old young new tall short long round square
wooden metal plastic paper cloth leather glass soft hard shiny wet dry hot cold
painting drawing sketch photo photograph picture image illustration poster cartoon anime
character figure statue toy doll robot sword shield guitar piano camera phone computer
screen keyboard clock ball box basket umbrella pillow blanket carpet curtain mirror
food bread cake apple banana orange pizza sandwich coffee tea wine fruit vegetables
close up view front side back top background foreground pattern texture style art
digital oil watercolor pencil ink abstract realistic detailed simple vintage modern
two three four several many some its his her their one group pair couple together
very it that this there
""".split()
_PUNCT = [",", ".", "'", "-"]


def cache_root() -> Path:
    """``$LORA_STUDIO_CACHE`` or ``~/.cache/lora-studio``."""
    env = os.environ.get("LORA_STUDIO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lora-studio"


def vocabulary() -> list[str]:
    """The WordPiece vocab, specials first ([PAD] = 0), duplicates removed, order stable."""
    seen: dict[str, None] = {}
    for tok in SPECIAL_TOKENS + _PUNCT + _WORDS:
        seen.setdefault(tok, None)
    return list(seen)


def _is_built(path: Path) -> bool:
    marker = path / _MARKER
    try:
        return marker.read_text().strip() == _TINY_VERSION and (path / "config.json").is_file()
    except OSError:
        return False


def build_tiny_blip(out_dir: str | os.PathLike) -> str:
    """Write a tiny random BLIP captioner (model + processor) into ``out_dir`` and return it."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    try:  # transformers >= 5 splits image processors by backend; the PIL one never needs torchvision.
        from transformers import BlipImageProcessorPil as _ImageProcessor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import BlipImageProcessor as _ImageProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    vocab = vocabulary()
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")

    # transformers 5 takes the vocab (a file path or a dict) as ``vocab``; 4.x called it ``vocab_file``.
    vocab_kw = "vocab" if "vocab" in inspect.signature(BertTokenizer.__init__).parameters else "vocab_file"
    tokenizer = BertTokenizer(
        **{vocab_kw: str(vocab_file)},
        do_lower_case=True,
        bos_token=BOS_TOKEN,
        model_max_length=64,
    )
    tokenizer.add_special_tokens({"bos_token": BOS_TOKEN})
    dec_id = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    assert dec_id == len(vocab), (dec_id, len(vocab))

    image_processor = _ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
    )
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)

    vision = BlipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
        initializer_range=0.02,  # the default (1e-10) would make every image embed the same
    )
    text = BlipTextConfig(
        vocab_size=len(vocab) + 1,  # + [DEC]
        hidden_size=32,
        encoder_hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        bos_token_id=dec_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = BlipConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=32,
        image_text_hidden_size=32,
    )

    torch.manual_seed(SEED)
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    (out / _MARKER).write_text(_TINY_VERSION + "\n")
    return str(out)


_build_lock = threading.Lock()


def tiny_blip_path(build: bool = True) -> str:
    """Path of the tiny BLIP folder ``<cache>/tiny-blip``; builds it once (atomically) when ``build``.

    With ``build=False`` the path is returned whether or not it exists yet.
    """
    root = cache_root()
    final = root / TINY_BLIP_ID
    if not build or _is_built(final):
        return str(final)
    with _build_lock:
        if _is_built(final):
            return str(final)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_BLIP_ID}-", dir=root))
        try:
            build_tiny_blip(tmp)
            if final.exists():  # stale (other version or half-written by an old crash): replace it
                stale = Path(tempfile.mkdtemp(prefix=f".{TINY_BLIP_ID}-stale-", dir=root))
                os.replace(final, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:
                # Another process won the race; keep theirs if it is complete.
                if not _is_built(final):
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return str(final)
