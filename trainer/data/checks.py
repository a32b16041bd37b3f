"""Dataset checks shared by the CLI and the UI.

:func:`check_dataset` returns a list of :class:`Problem` (empty for a clean dataset). Severities:

* ``error``: training should not start (unreadable files, decompression bombs, images below half the training
  resolution on the short side, fewer than ``min_images`` usable images);
* ``warning``: training works but the result may suffer (image smaller than the resolution on the short side ->
  it will be upscaled; exact or near duplicates; caption without the trigger word; caption longer than the text
  encoder reads).

Size rule: short side < ``resolution / 2`` -> error ``too_small``; short side < ``resolution`` -> warning
``small_image`` ("will be upscaled").

Duplicates: exact duplicates have the same decoded pixels (sha256 over size + RGB bytes, so a re-saved copy with
different metadata is still caught); near duplicates have 64-bit dHashes within ``near_duplicate_threshold`` bits
*and* similar average colours (so two flat images of different colours are not reported).

Caption length: counted with ``tokenizer(caption)["input_ids"]`` when a tokenizer is given (BOS/EOS included, as
HF tokenizers add them), otherwise estimated as words + punctuation marks + 2; the limit includes BOS/EOS.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
from PIL import Image

from ..training.placeholders import placeholder_pattern
from .images import ImageProblem, load_image
from .problems import ProblemText

__all__ = ["Problem", "ImageFacts", "check_dataset", "check_facts", "image_facts", "pixel_sha256", "summarize", "has_errors", "dhash", "count_caption_tokens"]

ERROR = "error"
WARNING = "warning"
_NEAR_DUP_MAX_COLOR_DIFF = 24.0  # mean abs difference (0..255) of 8x8 RGB thumbnails for a near duplicate


@dataclass
class Problem(ProblemText):
    file: str  # "" for dataset-level problems
    code: str
    severity: str  # "error" | "warning"
    message: str
    fix: str



# --------------------------------------------------------------------------------------------------------------

def dhash(image: Image.Image) -> int:
    """64-bit difference hash: 9x8 grayscale thumbnail, one bit per horizontal neighbour comparison."""
    small = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    value = 0
    for b in bits:
        value = (value << 1) | int(b)
    return value


def _thumb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.resize((8, 8), Image.Resampling.BOX), dtype=np.float32)


def pixel_sha256(image: Image.Image) -> str:
    """sha256 of the decoded pixels (size, mode and RGB bytes): the same for a re-saved copy of the image."""
    h = hashlib.sha256()
    h.update(f"{image.size[0]}x{image.size[1]}:{image.mode}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


_WORD_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def count_caption_tokens(caption: str, tokenizer: Optional[Callable] = None) -> tuple[int, bool]:
    """(token count including BOS/EOS, exact?). Uses the tokenizer when given and working, else an estimate."""
    if tokenizer is not None:
        try:
            out: Any = tokenizer(caption)
            ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else getattr(out, "input_ids",
                                                                                               out)
            if hasattr(ids, "tolist"):
                ids = ids.tolist()
            if ids and isinstance(ids[0], (list, tuple)):
                ids = ids[0]
            return len(ids), True
        except Exception:  # noqa: BLE001 - a broken tokenizer must not break the checks
            pass
    return len(_WORD_RE.findall(caption)) + 2, False


def _attrs(rec: Any) -> tuple[str, Optional[str], str]:
    if isinstance(rec, (str, os.PathLike)):
        path = os.fspath(rec)
        return path, None, os.path.basename(path)
    path = os.fspath(getattr(rec, "path"))
    caption = getattr(rec, "caption", None)
    name = getattr(rec, "source_name", "") or os.path.basename(path)
    return path, caption, name


@dataclass
class ImageFacts:
    """What the checks need of one decoded image: its size, pixel hash (exact duplicates, and the latent cache's
    content key), difference hash and colour thumbnail (near duplicates)."""

    name: str
    size: tuple[int, int]  # (width, height)
    sha: str
    dhash: int
    thumb: np.ndarray


def image_facts(name: str, image: Image.Image) -> ImageFacts:
    """The facts of one decoded image (computed once, from the decode that also gives its size and latent)."""
    return ImageFacts(name=name, size=image.size, sha=pixel_sha256(image), dhash=dhash(image), thumb=_thumb(image))


def size_problems(name: str, size: tuple[int, int], resolution: int) -> list[Problem]:
    """``too_small`` (error) or ``small_image`` (warning) for an image of ``size`` at ``resolution``."""
    w, h = size
    short = min(w, h)
    if short * 2 < resolution:
        return [Problem(
            name, "too_small", ERROR,
            f"'{name}' is only {w}x{h}; its short side is below half the training resolution "
            f"({resolution} px), so it would be upscaled more than 2x and look blurry.",
            f"Use a larger original (at least {resolution} px on the short side), remove it, or train at "
            f"a lower resolution (at most {max(64, (2 * short) // 64 * 64)} px).",
        )]
    if short < resolution:
        return [Problem(
            name, "small_image", WARNING,
            f"'{name}' is {w}x{h}; its short side is smaller than the training resolution "
            f"({resolution} px), so it will be upscaled and may look soft.",
            f"Use a larger original (at least {resolution} px on the short side) if you have one.",
        )]
    return []


def caption_problems(name: str, caption: Optional[str], trigger: Optional[str] = "TOK",
                     max_caption_tokens: int = 77, tokenizer: Optional[Callable] = None) -> list[Problem]:
    """``missing_trigger`` and ``caption_too_long`` warnings of one caption (None: no caption, no problem)."""
    problems: list[Problem] = []
    if caption is None:
        return problems
    trig = (trigger or "").strip()
    # As the text encoder reads a plain trigger (CLIP lower-cases): the one whole-word rule of placeholders.py.
    trig_re = placeholder_pattern(trig, ignore_case=True) if trig else None
    if trig_re is not None and not trig_re.search(caption):
        problems.append(Problem(
            name, "missing_trigger", WARNING,
            f"The caption of '{name}' does not contain the trigger word '{trig}'"
            + (" (the caption is empty)." if not caption.strip() else "."),
            f"Add '{trig}' to the caption (e.g. 'a photo of {trig}, ...') so the LoRA learns to respond "
            "to it.",
        ))
    n, exact = count_caption_tokens(caption, tokenizer)
    if n > max_caption_tokens:
        about = "" if exact else "about "
        problems.append(Problem(
            name, "caption_too_long", WARNING,
            f"The caption of '{name}' has {about}{n} tokens; the text encoder reads at most "
            f"{max_caption_tokens} (including start/end tokens), so the end of the caption is ignored.",
            f"Shorten the caption to at most {max_caption_tokens - 2} tokens (roughly "
            f"{max(1, (max_caption_tokens - 2) * 3 // 4)} words); put the trigger word first.",
        ))
    return problems


def check_facts(entries: Iterable[tuple[str, Optional[str], Union[ImageFacts, Problem]]], resolution: int = 1024,
                trigger: Optional[str] = "TOK", min_images: int = 3, max_caption_tokens: int = 77,
                tokenizer: Optional[Callable] = None, near_duplicate_threshold: int = 4) -> list[Problem]:
    """The checks of :func:`check_dataset` on images that were already decoded: ``entries`` are
    ``(name, caption, facts)``, or ``(name, caption, problem)`` for an unreadable image. No image is opened."""
    problems: list[Problem] = []
    good: list[ImageFacts] = []  # usable images
    for name, caption, facts in entries:
        if isinstance(facts, Problem):
            problems.append(facts)
        else:
            sized = size_problems(name, facts.size, resolution)
            problems += sized
            if not any(p.code == "too_small" for p in sized):
                good.append(facts)
        problems += caption_problems(name, caption, trigger, max_caption_tokens, tokenizer)
    return problems + dataset_problems(good, min_images, near_duplicate_threshold)


def dataset_problems(good: list[ImageFacts], min_images: int = 3,
                     near_duplicate_threshold: int = 4) -> list[Problem]:
    """Exact and near duplicates among the usable images, and ``too_few_images``."""
    problems: list[Problem] = []
    first_by_sha: dict[str, str] = {}
    unique: list[tuple[str, int, np.ndarray]] = []
    for f in good:
        name = f.name
        if f.sha in first_by_sha:
            other = first_by_sha[f.sha]
            problems.append(Problem(
                name, "duplicate", WARNING,
                f"'{name}' is an exact duplicate of '{other}' (same pixels).",
                f"Remove '{name}' or '{other}'; duplicates make the LoRA over-learn that picture.",
            ))
        else:
            first_by_sha[f.sha] = name
            unique.append((name, f.dhash, f.thumb))
    if len(unique) > 1 and near_duplicate_threshold >= 0:
        hashes = np.array([u[1] for u in unique], dtype=np.uint64)
        for i in range(len(unique) - 1):
            x = np.bitwise_xor(hashes[i + 1:], hashes[i])
            dist = _popcount(x)
            for k in np.nonzero(dist <= near_duplicate_threshold)[0]:
                j = i + 1 + int(k)
                color_diff = float(np.abs(unique[i][2] - unique[j][2]).mean())
                if color_diff > _NEAR_DUP_MAX_COLOR_DIFF:
                    continue
                a, b = unique[i][0], unique[j][0]
                problems.append(Problem(
                    b, "near_duplicate", WARNING,
                    f"'{b}' looks almost the same as '{a}' (hash distance {int(dist[k])} of 64).",
                    f"Keep only one of '{a}' and '{b}' unless they differ in a way you want the LoRA to learn.",
                ))
    n_good = len(unique)
    if n_good < min_images:
        problems.append(Problem(
            "", "too_few_images", ERROR,
            f"The dataset has {n_good} usable image{'s' if n_good != 1 else ''}; at least {min_images} are needed.",
            "Add more images (10-30 varied images work well) or fix the unusable ones (each is named with its "
            "reason).",
        ))
    return problems


def check_dataset(
    records: Iterable[Any],
    resolution: int = 1024,
    trigger: Optional[str] = "TOK",
    min_images: int = 3,
    max_caption_tokens: int = 77,
    tokenizer: Optional[Callable] = None,
    near_duplicate_threshold: int = 4,
    max_pixels: int = 64_000_000,
) -> list[Problem]:
    """Check a dataset; ``records`` are ``Record``-like objects (``path``, ``caption``, ``source_name``) or paths.

    Returns ``[]`` for a clean set. Codes: the :class:`ImageProblem` codes of unreadable files (``empty``,
    ``truncated``, ``not_an_image``, ``decompression_bomb``, ``unsupported_format``, ...), ``too_small``,
    ``small_image``, ``duplicate``, ``near_duplicate``, ``missing_trigger``, ``caption_too_long``,
    ``too_few_images``. Each image is decoded once; :func:`check_facts` does the rest.
    """
    def entries():
        for rec in records:
            path, caption, name = _attrs(rec)
            try:
                loaded = load_image(path, max_pixels=max_pixels)
            except ImageProblem as e:
                yield name, caption, Problem(name, e.code, ERROR, e.message.replace(
                    f"'{os.path.basename(path)}'", f"'{name}'"), e.fix)
                continue
            facts = image_facts(name, loaded.image)
            loaded.image.close()
            yield name, caption, facts

    return check_facts(entries(), resolution=resolution, trigger=trigger, min_images=min_images,
                       max_caption_tokens=max_caption_tokens, tokenizer=tokenizer,
                       near_duplicate_threshold=near_duplicate_threshold)


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return np.array([bin(int(v)).count("1") for v in x], dtype=np.int64)  # pragma: no cover - numpy < 2


def has_errors(problems: Iterable[Problem]) -> bool:
    return any(p.severity == ERROR for p in problems)


def summarize(problems: list[Problem]) -> str:
    """Human-readable report for the CLI: a count line, then errors before warnings, each with its fix."""
    if not problems:
        return "Dataset check: no problems found."
    errors = [p for p in problems if p.severity == ERROR]
    warns = [p for p in problems if p.severity != ERROR]
    lines = [f"Dataset check: {len(errors)} error{'s' if len(errors) != 1 else ''}, "
             f"{len(warns)} warning{'s' if len(warns) != 1 else ''}."]
    for p in errors + warns:
        lines.append(f"{p.severity.upper():7} [{p.code}] {p.message}")
        lines.append(f"        Fix: {p.fix}")
    if errors:
        lines.append("Fix the errors before training.")
    return "\n".join(lines)
