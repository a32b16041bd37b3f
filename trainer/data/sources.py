"""Where training images come from: a folder (captions from .txt sidecars or --instance_prompt), a local
ImageFolder with metadata.jsonl / metadata.csv, or a ``datasets`` dataset (a Hub name, a ``save_to_disk``
folder, a parquet file). Bad files are reported one by one and
skipped; the good ones go on."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from PIL import Image, ImageOps

from .images import ImageProblem, load_image
from .folders import collect_dataset, collect_folder
from .problems import IngestProblem


class DatasetError(ValueError):
    """The dataset cannot be used at all (no usable image, unknown column...)."""


@dataclass
class TrainItem:
    index: int
    name: str                      # shown to the user and used in messages
    caption: str                   # raw caption (may contain the placeholder TOK)
    size: tuple[int, int]          # (width, height) after EXIF rotation
    path: Optional[str] = None     # image file, or None for in-memory (Hub) images
    image: Optional[Image.Image] = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)
    content: Optional[str] = None  # sha256 of the decoded pixels (set when the item was read with facts)

    def load(self) -> Image.Image:
        if self.image is not None:
            return self.image
        return load_image(self.path).image


#: ``on_image(item, image)``: called once per usable image with the image decoded for it (the only decode).
OnImage = Optional[Callable[[TrainItem, Image.Image], None]]


def _from_records(records, instance_prompt: str, problems: list, on_image: OnImage = None) -> list[TrainItem]:
    items = []
    for rec in records:
        try:
            loaded = load_image(rec.path)
        except ImageProblem as exc:
            problems.append(IngestProblem(rec.source_name or os.path.basename(rec.path), exc.code, exc.message,
                                          exc.fix))
            continue
        caption = rec.caption if rec.caption is not None and rec.caption.strip() else instance_prompt
        items.append(TrainItem(index=len(items), name=rec.source_name or os.path.basename(rec.path),
                               caption=caption.strip(), size=loaded.original_size, path=rec.path,
                               notes=loaded.notes))
        if on_image is not None:
            on_image(items[-1], loaded.image)
        loaded.image.close()  # nothing keeps the pixels: memory stays flat as the dataset grows
    return items


#: File endings of data files ``datasets`` reads directly (``--dataset_name data.parquet``).
DATA_FILE_TYPES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def is_saved_dataset(path: str) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def _has_data_files(folder: str) -> bool:
    """A folder of parquet/arrow shards (a Hub dataset downloaded as files) rather than a folder of images."""
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # not the latent cache
        if any(f.endswith((".parquet", ".arrow")) for f in files):
            return True
    return False


def _load_datasets_source(cfg):
    """The train split of ``--dataset_name`` through ``datasets``: a folder from ``save_to_disk``, a data file
    (parquet, arrow...), a folder of parquet shards, or a Hub name."""
    import datasets

    name = cfg.dataset_name
    ext = os.path.splitext(name)[1].lower()
    if os.path.isdir(name) and is_saved_dataset(name):
        ds = datasets.load_from_disk(name)
    elif os.path.isfile(name) and ext in DATA_FILE_TYPES:
        ds = datasets.load_dataset(DATA_FILE_TYPES[ext], data_files=name, cache_dir=cfg.cache_dir)
    else:
        ds = datasets.load_dataset(name, cfg.dataset_config_name, cache_dir=cfg.cache_dir)
    if isinstance(ds, (datasets.DatasetDict, dict)):  # the train split, as diffusers' script takes
        if "train" not in ds:
            raise DatasetError(f"--dataset_name {name!r} has no 'train' split (splits: {list(ds)}).")
        ds = ds["train"]
    return ds


def _from_hub(cfg, problems: list, on_image: OnImage = None) -> list[TrainItem]:
    try:
        ds = _load_datasets_source(cfg)
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(
            f"--dataset_name {cfg.dataset_name!r} could not be loaded ({type(exc).__name__}: {str(exc)[:300]}). "
            "For a local ImageFolder give the folder path; for the Hub check the name and your connection.") from None
    columns = list(ds.column_names)
    if cfg.image_column not in columns:
        raise DatasetError(f"--image_column {cfg.image_column!r} is not in the dataset; columns: {columns}")
    if cfg.caption_column and cfg.caption_column not in columns:
        raise DatasetError(f"--caption_column {cfg.caption_column!r} is not in the dataset; columns: {columns}")
    items = []
    for i, row in enumerate(ds):
        img = row[cfg.image_column]
        if not isinstance(img, Image.Image):
            problems.append(IngestProblem(f"row {i}", "not_an_image", f"row {i}: column {cfg.image_column!r} is "
                                          "not an image", "check --image_column (it must be an Image() column)"))
            continue
        try:
            img.load()  # datasets decodes lazily: a broken row fails here, not in training
            img = ImageOps.exif_transpose(img).convert("RGB")
        except (OSError, ValueError) as exc:
            problems.append(IngestProblem(f"row {i}", "truncated", f"row {i}: the image could not be decoded "
                                          f"({type(exc).__name__}); it was skipped.", "Fix or remove that row."))
            continue
        caption = row[cfg.caption_column] if cfg.caption_column else None
        caption = caption if isinstance(caption, str) and caption.strip() else cfg.instance_prompt
        items.append(TrainItem(index=len(items), name=f"row {i}", caption=caption.strip(), size=img.size,
                               image=img))
        if on_image is not None:
            on_image(items[-1], img)
    return items


def dataset_folder(cfg) -> Optional[str]:
    """The local folder of the training images (``--instance_data_dir``, or an ImageFolder given as
    ``--dataset_name``), or None when ``datasets`` reads the data (a Hub name, a saved dataset, data files)."""
    if cfg.instance_data_dir:
        return cfg.instance_data_dir
    name = cfg.dataset_name
    if name and os.path.isdir(name) and not is_saved_dataset(name) and not _has_data_files(name):
        return name
    return None


def collect_records(cfg) -> Optional[tuple[list, list[IngestProblem]]]:
    """The image records of a local dataset (listing and captions only, nothing decoded), or None for a Hub
    dataset. Raises DatasetError when the folder holds no image at all (before any model is loaded)."""
    folder = dataset_folder(cfg)
    if not folder:
        return None
    image_column = "file_name" if cfg.image_column in ("image", None) else cfg.image_column
    records, problems = collect_dataset(folder, caption_column=cfg.caption_column or "text",
                                        image_column=image_column)
    if not records:
        _no_items(problems)
    return records, problems


def _no_items(problems: list) -> None:
    detail = "; ".join(str(p) for p in problems[:5])
    raise DatasetError(f"no usable training image was found{': ' + detail if detail else ''}. "
                       "Add JPEG/PNG/WebP images to the folder.")


def load_items(cfg, on_image: OnImage = None, collected=None) -> tuple[list[TrainItem], list[IngestProblem]]:
    """The training images of a config, with one problem per file that could not be used. Each image is decoded
    once; ``on_image(item, image)`` sees that decoded image (facts, hashes, latents come from it).
    ``collected``: what :func:`collect_records` returned, when the caller listed the folder already."""
    collected = collected if collected is not None else collect_records(cfg)
    if collected is not None:
        records, problems = collected
        problems = list(problems)
        items = _from_records(records, cfg.instance_prompt, problems, on_image)
    else:
        problems = []
        items = _from_hub(cfg, problems, on_image)
    if not items:
        _no_items(problems)
    return items, problems


def load_class_items(folder: str) -> list[TrainItem]:
    records, _ = collect_folder(folder)
    return _from_records(records, "", [])
