"""CutPaste anomaly synthesis (Li et al. 2021) on a generic foreground estimate.

FoundAD trains its projector to map features of such synthetic defects back to the clean image's
features. The reference code uses per-category foreground rules that raise on unknown categories;
here the foreground is estimated for any image: pixels that differ from the border colour, with the
whole image as the fallback when that estimate is implausibly small or large.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageFilter


def foreground_mask(img: Image.Image, min_fraction: float = 0.05, max_fraction: float = 0.95) -> np.ndarray:
    """Boolean (H, W) foreground estimate: far from the median border colour (blurred); else all True."""
    small = img.convert("RGB").filter(ImageFilter.GaussianBlur(2))
    arr = np.asarray(small, dtype=np.float32)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(arr - bg, axis=2)
    thresh = max(20.0, float(np.percentile(dist, 50)) * 0.5)
    mask = dist > thresh
    frac = mask.mean()
    if not min_fraction <= frac <= max_fraction:
        return np.ones(mask.shape, dtype=bool)
    return mask


def _random_point(mask: np.ndarray, rng: random.Random) -> tuple[int, int]:
    ys, xs = np.nonzero(mask)
    i = rng.randrange(len(ys))
    return int(xs[i]), int(ys[i])


def cutpaste(img: Image.Image, rng: random.Random, kind: str | None = None,
             mask: np.ndarray | None = None) -> tuple[Image.Image, np.ndarray]:
    """Paste a patch (``normal``: a rectangle of 2-10% of the area) or a thin ``scar`` cut from elsewhere in
    the image, colour-jittered and rotated, centred on a foreground pixel. Returns (image, pasted-region mask)."""
    img = img.convert("RGB")
    w, h = img.size
    kind = kind or rng.choice(["normal", "scar"])
    fg = foreground_mask(img) if mask is None else mask
    if kind == "normal":
        area = rng.uniform(0.02, 0.10) * w * h
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
        pw, ph = int(math.sqrt(area * aspect)), int(math.sqrt(area / aspect))
    else:
        pw, ph = rng.randint(max(2, w // 120), max(3, w // 40)), rng.randint(h // 12, h // 5)
    pw, ph = max(2, min(pw, w - 1)), max(2, min(ph, h - 1))
    sx, sy = rng.randint(0, w - pw), rng.randint(0, h - ph)
    patch = img.crop((sx, sy, sx + pw, sy + ph))
    # colour jitter makes the pasted region a plausible but foreign texture
    arr = np.asarray(patch, dtype=np.float32) * rng.uniform(0.7, 1.3) + rng.uniform(-30, 30)
    patch = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    alpha = Image.new("L", patch.size, 255)
    angle = rng.uniform(-45, 45) if kind == "scar" else rng.choice([0, 90, 180, 270])
    patch, alpha = patch.rotate(angle, expand=True), alpha.rotate(angle, expand=True)
    cx, cy = _random_point(fg, rng)
    x0 = min(max(0, cx - patch.size[0] // 2), w - patch.size[0])
    y0 = min(max(0, cy - patch.size[1] // 2), h - patch.size[1])
    out = img.copy()
    out.paste(patch, (max(0, x0), max(0, y0)), alpha)
    region = np.zeros((h, w), dtype=bool)
    a = np.asarray(alpha) > 127
    ys, xs = slice(max(0, y0), max(0, y0) + a.shape[0]), slice(max(0, x0), max(0, x0) + a.shape[1])
    region[ys, xs] = a[: region[ys, xs].shape[0], : region[ys, xs].shape[1]]
    return out, region
