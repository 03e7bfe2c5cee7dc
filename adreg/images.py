"""Reading and writing images with clear errors: files, raw bytes, base64 strings."""

from __future__ import annotations

import base64
import binascii
import io
import os
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from adreg.errors import ImageDecodeError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MIN_SIDE = 16  # below this no backbone grid has more than one patch
DEFAULT_MAX_PIXELS = 40_000_000  # guards against decompression bombs; ~6300x6300
_POOL = None


def thread_map(fn, items) -> list:
    """``[fn(x) for x in items]``, on a small process-wide thread pool when there is more than one item.

    For image work that releases the GIL (PIL decoding and resampling): a batch of images is decoded or
    resized on all cores (at most 4 threads) instead of one. Results keep the order of ``items``; an
    exception of ``fn`` is raised as it would be in the loop."""
    items = list(items)
    if len(items) < 2 or threading.current_thread().name.startswith("adreg-img"):  # no nesting: no deadlock
        return [fn(x) for x in items]
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="adreg-img")
    return list(_POOL.map(fn, items))


def _open(source, label: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(f"{label}: {w}x{h} image exceeds the limit of {max_pixels} pixels")
            img.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{label}: not a readable image (unknown or corrupt format)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageDecodeError(f"{label}: image is too large (decompression bomb guard)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{label}: not a readable image ({exc})") from None
    if min(img.size) < MIN_SIDE:
        raise ImageDecodeError(f"{label}: image is {img.size[0]}x{img.size[1]}, smaller than {MIN_SIDE} px on a side")
    return img


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file as RGB (grayscale and palette images are converted)."""
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(f"{path}: no such image file")
    return _open(path, str(path), max_pixels).convert("RGB")


def decode_image_bytes(data: bytes, label: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, ...) to RGB."""
    if not data:
        raise ImageDecodeError(f"{label}: empty image payload")
    return _open(io.BytesIO(data), label, max_pixels).convert("RGB")


def decode_image_b64(value, label: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a base64 string (or raw bytes, as MLflow may pass) holding an encoded image."""
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
        # MLflow passes base64 bytes columns through as the base64 text itself in some formats.
        try:
            return decode_image_bytes(raw, label, max_pixels)
        except ImageDecodeError:
            value = raw.decode("ascii", errors="replace")
    if not isinstance(value, str):
        raise ImageDecodeError(f"{label}: expected a base64-encoded image string, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:") and "," in text:  # data URLs from browsers
        text = text.split(",", 1)[1]
    text = "".join(text.split())  # line-wrapped base64 (MIME, Spark's base64() at 76 chars) is valid too
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError(f"{label}: not valid base64") from None
    return decode_image_bytes(raw, label, max_pixels)


def encode_png_b64(img: Image.Image | np.ndarray) -> str:
    """PNG-encode an image (or a uint8 array) and return it as base64 text."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def file_to_b64(path: str | Path) -> str:
    """Base64 text of a file's bytes, the request format of the served model."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name.

    Masks are skipped: ``*_mask.*`` files, and a ``X.png`` beside a ``X.jpg`` (the Magnetic-Tile layout).
    """
    folder = Path(folder)
    files = [p for p in folder.iterdir()
             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.stem.endswith("_mask")]
    non_png_stems = {p.stem for p in files if p.suffix.lower() != ".png"}
    return sorted(p for p in files if not (p.suffix.lower() == ".png" and p.stem in non_png_stems))
