"""Reading and writing images with clear errors: files, raw bytes, base64 strings.

The served model's request path decodes here, so speed matters: base64 through ``pybase64`` (SIMD), and 8-bit
RGB / grayscale PNGs through ``imagecodecs`` (libpng, with the GIL released, so a batch decodes on all cores;
pixel for pixel what Pillow decodes). Everything else, and every error message, is Pillow's.
"""

from __future__ import annotations

import binascii
import io
import os
import threading
import warnings
from pathlib import Path

import imagecodecs
import numpy as np
import pybase64
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


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file as RGB (grayscale and palette images are converted)."""
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(f"{path}: no such image file")
    if path.suffix.lower() == ".png":
        return decode_image_bytes(path.read_bytes(), str(path), max_pixels)
    return _rgb(_open(path, str(path), max_pixels))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _fast_png(data: bytes, max_pixels: int) -> Image.Image | None:
    """An 8-bit RGB or grayscale PNG decoded by libpng (imagecodecs), None for any other kind of PNG.

    The header is read here (IHDR: width, height, bit depth, colour type), so the pixel limit is checked before
    anything is inflated; a PNG that libpng refuses is left to Pillow, whose message the caller sees."""
    if len(data) < 33 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour = data[24], data[25]
    if depth != 8 or colour not in (0, 2) or w * h > max_pixels or min(w, h) < MIN_SIDE:
        return None  # 16-bit, palette, alpha; oversized or tiny: Pillow's path and its messages
    try:
        arr = imagecodecs.png_decode(data)
    except Exception:  # corrupt or truncated: Pillow says what is wrong
        return None
    if arr.dtype != np.uint8 or arr.shape[:2] != (h, w) or arr.shape[2:] not in ((), (3,)):
        return None  # e.g. a tRNS chunk expanded to alpha
    img = Image.fromarray(arr, "RGB" if arr.ndim == 3 else "L")
    return _rgb(img)


def decode_image_bytes(data: bytes, label: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, ...) to RGB."""
    if not data:
        raise ImageDecodeError(f"{label}: empty image payload")
    fast = _fast_png(data, max_pixels)
    if fast is not None:
        return fast
    return _rgb(_open(io.BytesIO(data), label, max_pixels))


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
    try:
        raw = pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        try:  # line-wrapped base64 (MIME, Spark's base64() at 76 chars) is valid too
            raw = pybase64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ImageDecodeError(f"{label}: not valid base64") from None
    return decode_image_bytes(raw, label, max_pixels)


def encode_png_b64(img: Image.Image | np.ndarray) -> str:
    """PNG-encode an image (or a uint8 array) and return it as base64 text."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return pybase64.b64encode(buf.getvalue()).decode("ascii")


def file_to_b64(path: str | Path) -> str:
    """Base64 text of a file's bytes, the request format of the served model."""
    return pybase64.b64encode(Path(path).read_bytes()).decode("ascii")


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name.

    Masks are skipped: ``*_mask.*`` files, and a ``X.png`` beside a ``X.jpg`` (the Magnetic-Tile layout).
    """
    folder = Path(folder)
    files = [p for p in folder.iterdir()
             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.stem.endswith("_mask")]
    non_png_stems = {p.stem for p in files if p.suffix.lower() != ".png"}
    return sorted(p for p in files if not (p.suffix.lower() == ".png" and p.stem in non_png_stems))
