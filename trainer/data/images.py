"""Safe loading of untrusted user images.

Everything a stranger can upload goes through :func:`load_image`. It never lets a Pillow exception escape: every
failure becomes an :class:`ImageProblem` with a short ``code``, a ``message`` naming the file and a ``fix`` telling
the user what to do. Guarantees:

* the pixel count is checked from the header *before* any pixel is decoded (decompression bombs), without touching
  Pillow's global ``Image.MAX_IMAGE_PIXELS`` or ``ImageFile.LOAD_TRUNCATED_IMAGES``;
* only the accepted formats are decoded (the plugin list passed to ``Image.open`` is restricted, so exotic decoders
  such as EPS/Ghostscript are never run on user data);
* the image is fully decoded inside the function, so truncated files fail here and not later in training;
* EXIF orientation is applied and every colour mode ends up as 8-bit RGB (16-bit and float data are rescaled,
  alpha is composited on white, animations give their first frame).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ACCEPTED_FORMATS",
    "IMAGE_EXTENSIONS",
    "UNSUPPORTED_IMAGE_EXTENSIONS",
    "ImageProblem",
    "LoadedImage",
    "load_image",
    "is_image_name",
    "is_unsupported_image_name",
    "to_rgb",
]

#: Pillow format names that are decoded. Everything else is refused with ``unsupported_format``.
ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO")
_ACCEPTED_TEXT = "JPEG, PNG, WebP, BMP, GIF, TIFF"

#: File extensions (lower case, with dot) treated as images when collecting a folder or a zip.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".dib", ".gif", ".tif", ".tiff", ".mpo"}
)
#: Extensions of image formats people commonly have but that are not accepted; used to give a useful message
#: ("convert it") instead of silently ignoring the file.
UNSUPPORTED_IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".heic", ".heif", ".avif", ".psd", ".psb", ".ico", ".icns", ".cur", ".svg", ".svgz", ".eps", ".ai",
     ".raw", ".cr2", ".cr3", ".nef", ".arw", ".dng", ".orf", ".rw2", ".raf", ".jxl", ".jp2", ".j2k", ".tga",
     ".xcf", ".kra", ".exr", ".hdr", ".dds", ".pcx", ".ppm", ".pgm", ".pbm", ".qoi", ".sgi"}
)

#: Default cap on the longest side; an absurdly thin image (e.g. 100000x10) is cheap in pixels but useless.
DEFAULT_MAX_SIDE = 30_000


class ImageProblem(Exception):
    """A user-facing problem with one image file. ``str()`` gives ``"<message> Fix: <fix>"``."""

    def __init__(self, code: str, message: str, fix: str, path: Union[str, os.PathLike, None] = None):
        self.code = code
        self.message = message
        self.fix = fix
        self.path = None if path is None else str(path)
        super().__init__(f"{message} Fix: {fix}")

    def __str__(self) -> str:  # keep the exact format even if args are changed by someone
        return f"{self.message} Fix: {self.fix}"


@dataclass
class LoadedImage:
    image: Image.Image  # always mode "RGB", fully loaded, detached from the file
    notes: list[str] = field(default_factory=list)
    original_size: tuple[int, int] = (0, 0)  # (width, height) after EXIF transpose
    format: str = ""  # Pillow format name, e.g. "JPEG"
    original_mode: str = ""  # Pillow mode before conversion, e.g. "I;16"


def _ext(name: Union[str, os.PathLike]) -> str:
    return os.path.splitext(os.fspath(name))[1].lower()


def is_image_name(name: Union[str, os.PathLike]) -> bool:
    """True when the file name has an accepted image extension (case-insensitive)."""
    return _ext(name) in IMAGE_EXTENSIONS


def is_unsupported_image_name(name: Union[str, os.PathLike]) -> bool:
    """True when the name looks like an image format we do not accept (HEIC, PSD, ICO, RAW...)."""
    return _ext(name) in UNSUPPORTED_IMAGE_EXTENSIONS


# --------------------------------------------------------------------------------------------------------------
# helpers

def _display(path: Union[str, os.PathLike]) -> str:
    return os.path.basename(os.fspath(path)) or os.fspath(path)


def _unsupported(name: str, what: str, path) -> ImageProblem:
    return ImageProblem(
        "unsupported_format",
        f"'{name}' is {what}, which is not supported.",
        f"Convert it to one of the accepted formats ({_ACCEPTED_TEXT}) and upload it again.",
        path,
    )


def _identify_other_format(path: str) -> Optional[str]:
    """Name of the format when the file is an image Pillow knows but we do not accept (header parse only)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                return im.format
    except BaseException as e:  # noqa: BLE001 - any failure just means "unknown"
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return None


def _sixteen_bit_to_8(im: Image.Image, notes: list[str]) -> Image.Image:
    """Scale integer / float single-channel data to 8-bit "L" without clipping."""
    mode = im.mode
    arr = np.asarray(im)
    if mode.startswith("I;16"):
        out = arr.astype(np.float64) / 257.0  # 0..65535 -> 0..255
        notes.append("16-bit image scaled to 8-bit")
    elif mode == "I":
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo >= 0 and hi <= 255:
            out = arr.astype(np.float64)
        elif lo >= 0 and hi <= 65535:
            out = arr.astype(np.float64) / 257.0
            notes.append("16-bit image scaled to 8-bit")
        else:
            out = (arr.astype(np.float64) - lo) * (255.0 / max(hi - lo, 1))
            notes.append("32-bit integer image rescaled from its value range to 8-bit")
    else:  # "F"
        a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            out = a * 255.0
            notes.append("floating-point image (0..1) scaled to 8-bit")
        elif lo >= 0.0 and hi <= 255.0:
            out = a
            notes.append("floating-point image converted to 8-bit")
        else:
            out = (a - lo) * (255.0 / (hi - lo if hi > lo else 1.0))
            notes.append("floating-point image rescaled from its value range to 8-bit")
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def _flatten_alpha(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    background.alpha_composite(rgba)
    return background.convert("RGB")


def to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    """Any PIL image -> 8-bit RGB: transparency composited on white, 16-bit/float rescaled without clipping;
    each conversion is noted in ``notes``. The one conversion rule (training, checks, captioning)."""
    mode = im.mode
    if mode == "RGB":
        if "transparency" in im.info:
            notes.append("transparent colour composited on white")
            return _flatten_alpha(im)
        return im.copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _sixteen_bit_to_8(im, notes).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        notes.append("transparency composited on white")
        return _flatten_alpha(im)
    if mode == "P":
        if "transparency" in im.info or (im.palette is not None and im.palette.mode == "RGBA"):
            notes.append("transparency composited on white")
            return _flatten_alpha(im)
        return im.convert("RGB")
    if mode in ("L", "1") and "transparency" in im.info:
        notes.append("transparent colour composited on white")
        return _flatten_alpha(im)
    if mode == "CMYK":
        notes.append("CMYK converted to RGB")
    return im.convert("RGB")  # "1", "L", "CMYK", "YCbCr", "HSV", "RGBX", ... (LAB raises -> handled by caller)


def _header_dims(path: str) -> Optional[tuple[int, int]]:
    """(width, height) read from a PNG or GIF header without Pillow (which refuses zero sizes), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError:
        return None
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    return None


def _open_formats() -> list[str]:
    """Accepted formats that have their own opener (MPO files are opened by the JPEG plugin)."""
    Image.init()
    return [f for f in ACCEPTED_FORMATS if f in Image.OPEN]


# --------------------------------------------------------------------------------------------------------------

def load_image(
    path: Union[str, os.PathLike],
    max_pixels: int = 64_000_000,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
) -> LoadedImage:
    """Open, validate and fully decode one untrusted image into 8-bit RGB.

    Raises :class:`ImageProblem` (never anything else for a bad file) with one of the codes:
    ``not_found``, ``empty``, ``not_an_image``, ``unsupported_format``, ``decompression_bomb``,
    ``too_large_dimensions`` (a side longer than ``max_side``), ``truncated`` (header fine, pixel data cut or
    damaged), ``unsupported_mode``.
    """
    path = os.fspath(path)
    name = _display(path)
    notes: list[str] = []

    try:
        st = os.stat(path)
    except OSError:
        raise ImageProblem("not_found", f"'{name}' could not be found or read.",
                           "Check that the file was uploaded completely and upload it again.", path) from None
    if not os.path.isfile(path):
        raise ImageProblem("not_an_image", f"'{name}' is not a regular file.",
                           "Upload the image file itself, not a folder or a link.", path)
    if st.st_size == 0:
        raise ImageProblem("empty", f"'{name}' is empty (0 bytes).",
                           "The upload or copy failed; upload the original image again.", path)

    bomb = ImageProblem(
        "decompression_bomb",
        f"'{name}' claims to be too large to open safely (more than {max_pixels:,} pixels).",
        f"Resize the image to at most {max_pixels // 1_000_000} megapixels (e.g. 2048 px on the long side) "
        "and upload it again.",
        path,
    )

    with warnings.catch_warnings():
        # Local only: turn Pillow's bomb warning into an exception inside this block (and silence Pillow's noise
        # about corrupt metadata); Image.MAX_IMAGE_PIXELS and LOAD_TRUNCATED_IMAGES are never touched.
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(path, formats=_open_formats())
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise bomb from None
        except UnidentifiedImageError:
            dims = _header_dims(path)
            if dims is not None and 0 in dims:
                raise ImageProblem("not_an_image", f"'{name}' has no pixels: its header says {dims[0]}x{dims[1]} "
                                   "(zero width or height).", "Replace it with a real image.", path) from None
            other = _identify_other_format(path)
            if other:
                raise _unsupported(name, f"a {other} file", path) from None
            if is_unsupported_image_name(path):
                raise _unsupported(name, f"a {_ext(path)[1:].upper()} file", path) from None
            raise ImageProblem(
                "not_an_image", f"'{name}' is not an image (its contents are not a readable picture).",
                f"Remove it from the dataset or replace it with a real image ({_ACCEPTED_TEXT}).", path) from None
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError, RuntimeError, TypeError,
                IndexError, KeyError, ZeroDivisionError, OverflowError) as e:
            # Header parse failed after the format was recognised (e.g. cut right after the signature).
            raise ImageProblem(
                "truncated", f"'{name}' is truncated or damaged and cannot be read ({type(e).__name__}).",
                "Re-export or re-download the original image and upload it again.", path) from None

        try:
            fmt = im.format or ""
            w, h = im.size
            if w <= 0 or h <= 0:
                raise ImageProblem("not_an_image", f"'{name}' has no pixels ({w}x{h}).",
                                   "Replace it with a real image.", path)
            if w * h > max_pixels:
                raise bomb
            if max(w, h) > max_side:
                raise ImageProblem(
                    "too_large_dimensions",
                    f"'{name}' is {w}x{h} pixels; a side longer than {max_side:,} pixels is not accepted.",
                    "Crop or resize the image so that both sides are at most a few thousand pixels.", path)
            original_mode = im.mode

            try:
                animated = bool(getattr(im, "is_animated", False))
                if animated:
                    im.seek(0)
                    notes.append("animated: first frame used")
                im.load()  # full decode now: truncated data fails here
                orientation = 1
                try:
                    orientation = int(im.getexif().get(0x0112, 1) or 1)
                except Exception:  # noqa: BLE001 - broken EXIF must not break loading
                    orientation = 1
                if orientation in (2, 3, 4, 5, 6, 7, 8):
                    try:
                        transposed = ImageOps.exif_transpose(im)
                        if transposed is not None:
                            im_t = transposed
                            notes.append(f"EXIF orientation {orientation} applied")
                        else:
                            im_t = im
                    except Exception:  # noqa: BLE001
                        im_t = im
                        notes.append("EXIF orientation could not be applied; image used as stored")
                else:
                    im_t = im
                try:
                    rgb = to_rgb(im_t, notes)
                except ValueError:
                    raise ImageProblem(
                        "unsupported_mode", f"'{name}' uses the colour mode {original_mode}, which cannot be "
                        "converted to RGB.", "Re-save it as an 8-bit RGB image (JPEG or PNG).", path) from None
                rgb.load()
            except ImageProblem:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise bomb from None
            except MemoryError:
                raise ImageProblem("too_large_dimensions", f"'{name}' is too large to decode in memory.",
                                   "Resize the image to a few megapixels and upload it again.", path) from None
            except Exception as e:  # noqa: BLE001 - decoder failures come in many types (OSError, SyntaxError, zlib)
                raise ImageProblem(
                    "truncated",
                    f"'{name}' is truncated or damaged: its pixel data could not be decoded ({e}).",
                    "Re-export or re-download the original image and upload it again.", path) from None
        finally:
            try:
                im.close()
            except Exception:  # noqa: BLE001
                pass

    return LoadedImage(image=rgb, notes=notes, original_size=rgb.size, format=fmt, original_mode=original_mode)
