"""The latent cache on disk: one small safetensors file per (image content, bucket, flip, VAE, preparation), so a
resume or a second run on the same images never runs the VAE again, and memory stays flat as the dataset grows
(latents are read back from disk when a batch needs them; nothing keeps a whole dataset in RAM).

Keys: the sha256 of the decoded pixels (``data.checks.pixel_sha256``, the hash the duplicate check uses), the
bucket, the flip, the crop rule and resize filter, and the VAE's identity (a hash of its config, dtype and
weights). A file is written to a temporary name and renamed into place, so a crash mid-write leaves no entry; an
entry that cannot be read back (torn, foreign, or for another key) is encoded again, never fatal. Where the folder
cannot be written (read-only dataset, full disk) the latents stay in memory and a note says so.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..data.transforms import prepare_image

#: One cache entry: (latent [4, h, w] fp32 on the CPU, original_size, crop_top_left, target_size).
Entry = tuple
FORMAT = "lora-studio-latent-1"
_STALE_TMP_S = 3600  # temporary files older than this are from a crashed writer and are removed


def vae_fingerprint(vae) -> str:
    """The identity of a VAE: sha256 over its config, dtype and every weight's bytes (computed once per VAE
    object and dtype)."""
    dtype = str(next(vae.parameters()).dtype)
    memo = vae.__dict__.setdefault("_lora_studio_fingerprint", {})
    if dtype not in memo:
        h = hashlib.sha256()
        h.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
        h.update(dtype.encode())
        for name, t in vae.state_dict().items():
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        memo[dtype] = h.hexdigest()
    return memo[dtype]


def default_cache_dir(cfg) -> str:
    """``--latent_cache_dir``, else ``.latent_cache`` inside the dataset folder (hidden: the dataset readers skip
    it), else (a Hub dataset) ``latents`` under the studio's cache folder."""
    if cfg.latent_cache_dir:
        return cfg.latent_cache_dir
    from ..data.sources import dataset_folder

    folder = dataset_folder(cfg)
    if folder:
        return os.path.join(folder, ".latent_cache")
    from ..tiny import cache_root

    return os.path.join(cache_root(), "latents")


class LatentStore:
    """Encodes images with the VAE and keeps the latents, on disk in ``folder`` (None: in memory only).
    ``encodes`` counts VAE encodes, ``hits`` entries read back instead."""

    def __init__(self, vae, folder: Optional[str], *, center_crop: bool, interpolation: str):
        self.vae, self.folder = vae, folder
        self.center_crop, self.interpolation = center_crop, interpolation
        self._vae_id: Optional[str] = None
        self.memory: dict[str, Entry] = {}
        self.encodes = self.hits = self.rewrites = 0
        self.notes: list[str] = []
        if folder is not None:
            try:
                os.makedirs(folder, exist_ok=True)
                self._remove_stale_tmp()
            except OSError as exc:
                self._to_memory(exc)

    # ----- keys and files -----------------------------------------------------------------------------------
    @property
    def vae_id(self) -> str:
        if self._vae_id is None:
            self._vae_id = vae_fingerprint(self.vae)
        return self._vae_id

    def key(self, content: str, bucket, flip: bool, crop_seed: int = 0) -> str:
        crop = "center" if self.center_crop else f"random-{crop_seed}"
        text = f"{FORMAT}|{content}|{tuple(bucket)}|flip={bool(flip)}|{crop}|{self.interpolation}|vae={self.vae_id}"
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, key: str) -> str:
        return os.path.join(self.folder, f"{key}.safetensors")

    def _to_memory(self, exc: OSError) -> None:
        self.notes.append(f"the latent cache folder {self.folder} cannot be written "
                          f"({exc.strerror or type(exc).__name__}); latents are kept in memory for this run")
        self.folder = None

    def _remove_stale_tmp(self) -> None:
        now = time.time()
        for name in os.listdir(self.folder):
            if name.startswith(".tmp-"):
                full = os.path.join(self.folder, name)
                try:
                    if now - os.path.getmtime(full) > _STALE_TMP_S:
                        os.remove(full)
                except OSError:
                    pass

    # ----- read / write -------------------------------------------------------------------------------------
    def load(self, key: str) -> Optional[Entry]:
        """The entry of ``key``, or None when there is none or it cannot be read back (it is then re-encoded)."""
        if key in self.memory:
            return self.memory[key]
        if self.folder is None:
            return None
        path = self.path(key)
        if not os.path.exists(path):
            return None
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != key:
                    raise ValueError("entry of another key")
                latent = f.get_tensor("latent").float()
            entry = (latent, *(tuple(json.loads(meta[k])) for k in ("original_size", "crop", "target_size")))
        except Exception:  # noqa: BLE001 - a torn or foreign file: encode again, never fail the run
            self.rewrites += 1
            return None
        self.hits += 1
        return entry

    def save(self, key: str, entry: Entry) -> None:
        """Writes ``entry`` atomically (a temporary file renamed into place)."""
        if self.folder is None:
            self.memory[key] = entry
            return
        from safetensors.torch import save_file

        latent, original_size, crop, target = entry
        meta = {"key": key, "format": FORMAT, "original_size": json.dumps(list(original_size)),
                "crop": json.dumps(list(crop)), "target_size": json.dumps(list(target))}
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=self.folder)
            os.close(fd)
            save_file({"latent": latent.detach().cpu().contiguous()}, tmp, metadata=meta)
            os.replace(tmp, self.path(key))
            tmp = None
        except OSError as exc:
            self._to_memory(exc)
            self.memory[key] = entry
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)

    # ----- encoding -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        self.encodes += pixels.shape[0]
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        lat = dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((lat - shift) * vae.config.scaling_factor).float()

    def encode(self, image: Image.Image, bucket, flip: bool, crop_seed: int = 0) -> Entry:
        """(latent on the CPU, original_size, crop_top_left, target_size) of one image at one bucket and flip."""
        crop_rng = np.random.default_rng(crop_seed) if not self.center_crop else None
        prep = prepare_image(image, bucket, center_crop=self.center_crop, flip=flip, crop_rng=crop_rng,
                             interpolation=self.interpolation)
        lat = self.encode_pixels(prep.pixels.unsqueeze(0))[0].cpu()
        return lat, prep.original_size, prep.crop_top_left, prep.target_size

    def ensure(self, content: str, image_fn, bucket, flip: bool) -> str:
        """The key of (content, bucket, flip), encoding ``image_fn()`` only when no readable entry exists."""
        key = self.key(content, bucket, flip)
        if self.load(key) is None:
            self.save(key, self.encode(image_fn(), bucket, flip))
        return key
