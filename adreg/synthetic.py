"""Synthetic defects with masks, for a selection set that ranks detector settings.

A few-shot product rarely has real defects to choose settings with; a set of good images carrying
synthetic defects, each with the mask of the pixels it changed, stands in for them. Three kinds model
three ways a product goes wrong:

* ``cutpaste``: a patch (``normal``, a rectangle) or a thin ``scar`` cut from elsewhere in the image,
  colour-jittered, rotated and pasted on the foreground (``adreg.cutpaste``): foreign material, a
  misplaced part, a scratch. Its sizes are CutPaste's own (normal 2-10% of the image, a scar less).
* ``texture``: DRAEM-style (Zavrtanik et al. 2021): inside a thresholded fractal Perlin noise mask on
  the foreground, the texture of another good image (shifted, rotated by a multiple of 90 degrees,
  flipped, resized to this image) is blended in at an opacity of 0.5-1.0: a region whose surface is
  wrong but made of the product's own material.
* ``intensity``: inside a Perlin mask, a local change of brightness (+-25-60 grey levels), contrast,
  sharpness (gaussian blur) or relief (a sharpened, embossed "dent"), blended softly towards the mask's
  edge: stains, burns, uneven grinding, dents, out-of-focus or inactive regions.

Why the texture-preserving kinds matter: CutPaste alone pastes a patch with a sharp rectangular edge,
and a set of such defects ranks highest the settings that detect pasted edges. Real defects mostly keep
the product's texture and differ in a subtler way (a brightness step, a smear of another surface, a
crack in the same material); a selection set that includes them ranks settings closer to how they rank
on real defects.

Perlin masks cover ``min_fraction``-``max_fraction`` of the image (0.5-8% by default). Every function is
reproducible from its seed or random generator; pixels outside a returned mask are never changed (for
``cutpaste``: outside its pasted region).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from adreg.cutpaste import cutpaste, foreground_mask
from adreg.errors import ConfigError
from adreg.images import load_image

KINDS = ("cutpaste", "texture", "intensity")
INTENSITY_MODES = ("brightness", "contrast", "blur", "dent")
_MASK_TRIES = 20  # fixed-threshold draws before the quantile fallback
_BUMP = 3.0  # height (noise standard deviations) of the bump that localises a Perlin mask
_NOISE_SIDE = 256  # noise is drawn at most this size and resized
_DEFECT_TRIES = 5  # draws of a defect that changed too little before the last one is kept
_MIN_CHANGE = 4.0  # grey levels: a defect whose mean absolute change inside its mask is below is redrawn


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(shape: tuple[int, int], res: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Gradient (Perlin) noise of ``shape`` (H, W) with ``res`` = (cells down, cells across), float32 ~[-1, 1].

    Random unit gradients on the integer lattice, dot products with the offsets to a pixel's four
    corners, blended with the quintic fade curve; ``res`` may be fractional."""
    h, w = shape
    ry, rx = float(res[0]), float(res[1])
    gy = np.linspace(0.0, ry, h, endpoint=False, dtype=np.float32)
    gx = np.linspace(0.0, rx, w, endpoint=False, dtype=np.float32)
    yi, xi = np.floor(gy).astype(np.intp), np.floor(gx).astype(np.intp)
    fy, fx = (gy - yi)[:, None], (gx - xi)[None, :]
    angles = rng.uniform(0.0, 2 * np.pi, (int(math.ceil(ry)) + 2, int(math.ceil(rx)) + 2))
    gcos, gsin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    def corner(dy: int, dx: int) -> np.ndarray:
        iy, ix = (yi + dy)[:, None], (xi + dx)[None, :]
        return gcos[iy, ix] * (fy - dy) + gsin[iy, ix] * (fx - dx)

    u, v = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - v) + corner(0, 1) * v
    bottom = corner(1, 0) * (1 - v) + corner(1, 1) * v
    return (math.sqrt(2.0) * (top * (1 - u) + bottom * u)).astype(np.float32)


def fractal_noise(shape: tuple[int, int], rng: np.random.Generator, octaves: int = 4,
                  base_cells: float | None = None) -> np.ndarray:
    """Sum of ``octaves`` Perlin layers, each at twice the frequency and half the amplitude of the last.

    ``base_cells`` (cells along the shorter side of the first octave; random in [2, 6] when None) sets
    the scale of the blobs; the longer side gets proportionally more cells, so blobs stay round."""
    h, w = shape
    cells = float(rng.uniform(2.0, 6.0)) if base_cells is None else float(base_cells)
    short = min(h, w)
    ry, rx = cells * h / short, cells * w / short
    out = np.zeros((h, w), dtype=np.float32)
    for k in range(octaves):
        out += 0.5 ** k * perlin_noise(shape, (ry * 2 ** k, rx * 2 ** k), rng)
    return out


def _smooth_noise(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """``fractal_noise`` drawn at most ``_NOISE_SIDE`` px on the longer side and resized (bilinear) to
    ``shape``: the noise is smooth at that scale, and a 900x900 image costs a tenth of the time."""
    h, w = shape
    factor = min(1.0, _NOISE_SIDE / max(h, w))
    small = (max(2, round(h * factor)), max(2, round(w * factor)))
    noise = fractal_noise(small, rng)
    if small == (h, w):
        return noise
    return np.asarray(Image.fromarray(noise, "F").resize((w, h), Image.BILINEAR), dtype=np.float32)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, min_fraction: float = 0.005,
                max_fraction: float = 0.08, foreground: np.ndarray | None = None) -> np.ndarray:
    """A non-empty boolean (H, W) mask: fractal Perlin noise above a threshold, inside ``foreground``.

    Each try draws fresh noise at a random scale (standardised on the allowed region), adds a gaussian
    bump of 3 standard deviations around a random allowed pixel (width 5-20% of the shorter side) and
    keeps what lies above the bump's height plus a random -1.0..0.5: an irregular region around that
    pixel, with a few smaller blobs elsewhere now and then. The first mask that covers ``min_fraction``
    to ``max_fraction`` of the image is returned (about 3 tries in 4 are); after a bounded number of
    tries the last field is cut at the quantile that gives a random area within the bounds (its highest
    part, around the bump). A ``foreground`` smaller than ``min_fraction`` of the image (or empty) is
    ignored: the whole image is allowed."""
    h, w = int(shape[0]), int(shape[1])
    if h < 2 or w < 2:
        raise ConfigError(f"perlin_mask needs a shape of at least 2x2, got {h}x{w}")
    if not 0 < min_fraction <= max_fraction <= 1:
        raise ConfigError(f"perlin_mask needs 0 < min_fraction <= max_fraction <= 1, got {min_fraction}, {max_fraction}")
    allowed = np.ones((h, w), dtype=bool)
    if foreground is not None:
        foreground = np.asarray(foreground, dtype=bool)
        if foreground.shape != (h, w):
            raise ConfigError(f"perlin_mask: foreground is {foreground.shape}, the shape asked for is {(h, w)}")
        if foreground.sum() >= min_fraction * h * w:
            allowed = foreground
    lo, hi = min_fraction * h * w, max_fraction * h * w
    ys, xs = np.nonzero(allowed)
    yy, xx = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    for _ in range(_MASK_TRIES):
        noise = _smooth_noise((h, w), rng)
        vals = noise[allowed]
        z = (noise - vals.mean()) / max(float(vals.std()), 1e-6)
        # a bump around a random allowed pixel concentrates the mask there, as most real defects are
        i = int(rng.integers(len(ys)))
        sigma = float(rng.uniform(0.05, 0.2)) * min(h, w)
        bump = np.exp(-((yy - ys[i]) ** 2 + (xx - xs[i]) ** 2) / (2 * sigma * sigma))
        field = z + _BUMP * bump
        mask = (field > _BUMP + rng.uniform(-1.0, 0.5)) & allowed
        if lo <= mask.sum() <= hi:
            return mask
    target = max(1, math.ceil(rng.uniform(min_fraction, max_fraction) * h * w))
    target = min(target, int(allowed.sum()))
    order = np.argsort(np.where(allowed, field, -np.inf), axis=None)[::-1][:target]
    mask = np.zeros(h * w, dtype=bool)
    mask[order] = True
    return mask.reshape(h, w)


def _np_rng(rng: random.Random) -> np.random.Generator:
    return np.random.default_rng(rng.getrandbits(64))


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float32)


def _from_array(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def _mean_change(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(a[mask] - b[mask]).mean()) if mask.any() else 0.0


def _soft_alpha(mask: np.ndarray, rng: random.Random) -> np.ndarray:
    """(H, W, 1) opacity: 1 deep inside ``mask``, falling to ~0.2 at its edge, exactly 0 outside."""
    h, w = mask.shape
    sigma = max(1.0, rng.uniform(0.006, 0.015) * min(h, w))
    blurred = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(sigma))
    b = np.asarray(blurred, dtype=np.float32) / 255.0
    t = np.clip((b - 0.5) / 0.5, 0.0, 1.0)
    alpha = np.where(mask, 0.2 + 0.8 * t * t * (3 - 2 * t), 0.0)
    return alpha.astype(np.float32)[..., None]


def _texture_source(img: Image.Image, donor: Image.Image | None, rng: random.Random) -> np.ndarray:
    """The donor (or ``img`` itself) rotated by a multiple of 90 degrees, maybe flipped, resized to
    ``img`` and circularly shifted, as an (H, W, 3) float array in ``img``'s mode family."""
    src = img if donor is None else donor
    if img.mode == "L" or _gray_rgb(img):
        src = src.convert("L")
    src = src.convert("RGB")
    k = rng.randrange(4)
    if k:
        src = src.transpose((Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)[k - 1])
    if rng.random() < 0.5:
        src = src.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        src = src.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if src.size != img.size:
        src = src.resize(img.size, Image.BILINEAR)
    w, h = img.size
    # without a donor the shift is at least a quarter of the image, so the blended texture is not in place
    lo = 0.25 if donor is None else 0.0
    dy = int(rng.uniform(lo, 1 - lo) * h)
    dx = int(rng.uniform(lo, 1 - lo) * w)
    return np.roll(np.asarray(src, dtype=np.float32), (dy, dx), axis=(0, 1))


def _gray_rgb(img: Image.Image) -> bool:
    """An RGB image whose channels are equal (a grayscale image decoded as RGB, as load_image does)."""
    if img.mode != "RGB":
        return False
    small = np.asarray(img.resize((min(64, img.size[0]), min(64, img.size[1]))), dtype=np.int16)
    return bool(np.abs(small[..., 0] - small[..., 1]).max() <= 1 and np.abs(small[..., 1] - small[..., 2]).max() <= 1)


def _texture(img: Image.Image, rng: random.Random, donor: Image.Image | None) -> tuple[Image.Image, np.ndarray]:
    arr = _to_rgb_array(img)
    mask = perlin_mask(arr.shape[:2], _np_rng(rng), foreground=foreground_mask(img))
    best = None
    for _ in range(_DEFECT_TRIES):
        texture = _texture_source(img, donor, rng)
        beta = rng.uniform(0.5, 1.0)
        out = np.where(mask[..., None], (1 - beta) * arr + beta * texture, arr)
        change = _mean_change(out, arr, mask)
        if best is None or change > best[0]:
            best = (change, out)
        if change >= _MIN_CHANGE:
            break
    return _from_array(best[1]), mask


def _intensity_mode(arr: np.ndarray, mask: np.ndarray, alpha: np.ndarray, mode: str,
                    rng: random.Random, img: Image.Image) -> np.ndarray:
    h, w = mask.shape
    scale = max(1.0, min(h, w) / 300.0)
    if mode == "brightness":
        inside = float(arr[mask].mean())
        sign = -1 if inside > 255 - 60 else 1 if inside < 60 else rng.choice((-1, 1))
        return arr + alpha * sign * rng.uniform(25, 60)
    if mode == "contrast":
        mean = arr[mask].mean(axis=0)
        factor = rng.uniform(0.25, 0.6) if rng.random() < 0.5 else rng.uniform(1.6, 2.5)
        return arr + alpha * (mean + (arr - mean) * factor - arr)
    if mode == "blur":
        blurred = _to_rgb_array(img.convert("RGB").filter(ImageFilter.GaussianBlur(rng.uniform(2.0, 5.0) * scale)))
        return arr + alpha * (blurred - arr)
    # dent: a sharpened region whose relief is lit from one side (one rim brighter, the other darker)
    sharp = _to_rgb_array(img.convert("RGB").filter(
        ImageFilter.UnsharpMask(radius=2 * scale, percent=rng.randint(150, 300), threshold=0)))
    height = alpha[..., 0] * (1 if rng.random() < 0.5 else -1)
    gy, gx = np.gradient(height)
    theta = rng.uniform(0, 2 * np.pi)
    shade = gx * math.cos(theta) + gy * math.sin(theta)
    shade = np.where(mask, shade, 0.0) / max(float(np.abs(shade).max()), 1e-6)
    return arr + alpha * (sharp - arr) + (rng.uniform(20, 45) * shade)[..., None]


def _intensity(img: Image.Image, rng: random.Random) -> tuple[Image.Image, np.ndarray]:
    arr = _to_rgb_array(img)
    mask = perlin_mask(arr.shape[:2], _np_rng(rng), foreground=foreground_mask(img))
    alpha = _soft_alpha(mask, rng)
    mode = rng.choice(INTENSITY_MODES)
    out = np.clip(_intensity_mode(arr, mask, alpha, mode, rng, img), 0, 255)
    if _mean_change(out, arr, mask) < _MIN_CHANGE and mode != "brightness":
        # contrast or blur on a flat region changes nothing visible: a brightness change instead
        out = np.clip(_intensity_mode(arr, mask, alpha, "brightness", rng, img), 0, 255)
    out = np.where(mask[..., None], out, arr)
    return _from_array(out), mask


def _cutpaste(img: Image.Image, rng: random.Random, variant: str | None) -> tuple[Image.Image, np.ndarray]:
    rgb = img.convert("RGB")
    arr = _to_rgb_array(rgb)
    fg = foreground_mask(rgb)
    variant = variant or rng.choice(("normal", "scar"))
    best = None
    for _ in range(_DEFECT_TRIES):
        out, region = cutpaste(rgb, rng, kind=variant, mask=fg)
        change = _mean_change(_to_rgb_array(out), arr, region) if region.any() else -1.0
        if best is None or change > best[0]:
            best = (change, out, region)
        if change >= _MIN_CHANGE:
            break
    return best[1], best[2]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"unknown synthetic defect kind {kind!r}; known kinds: {', '.join(KINDS)}")


def _synthesize(img: Image.Image, kind: str, rng: random.Random, donor: Image.Image | None,
                variant: str | None = None) -> tuple[Image.Image, np.ndarray]:
    _check_kind(kind)
    if kind == "cutpaste":
        return _cutpaste(img, rng, variant)
    if kind == "texture":
        return _texture(img, rng, donor)
    return _intensity(img, rng)


def synthesize_defect(img: Image.Image, kind: str, rng: random.Random,
                      donor: Image.Image | None = None) -> tuple[Image.Image, np.ndarray]:
    """One synthetic defect of ``kind`` (see ``KINDS``) on ``img``: (RGB image of the same size, boolean
    (H, W) mask of the changed region, never empty). ``donor`` is the good image whose texture the
    ``texture`` kind blends in (``img`` itself, shifted, without one); the other kinds ignore it. A
    grayscale image stays gray (its three RGB channels equal)."""
    return _synthesize(img, kind, rng, donor)


def _load(item: str | Path | Image.Image) -> Image.Image:
    return item if isinstance(item, Image.Image) else load_image(item)


def synthetic_defects(goods: Sequence[str | Path | Image.Image], seed: int,
                      kinds: Sequence[str] = KINDS) -> list[tuple[Image.Image, np.ndarray, str]]:
    """One synthetic defect per good image: [(image, mask, kind)], in the order of ``goods``.

    Kinds are cycled in the order given; the ``cutpaste`` ones alternate ``normal`` and ``scar``; the
    donor of good ``i`` is good ``i + 1`` (the first for the last; none for a single good). Paths are
    decoded with ``adreg.images.load_image``, two images at a time. The result depends only on the
    goods, ``seed`` and ``kinds``: defect ``i`` is drawn from its own generator of (seed, i)."""
    kinds = tuple(kinds)
    if not kinds:
        raise ConfigError(f"synthetic_defects needs at least one kind; known kinds: {', '.join(KINDS)}")
    for kind in kinds:
        _check_kind(kind)
    goods = list(goods)
    n = len(goods)
    if n == 0:
        return []
    first = current = _load(goods[0])
    results: list[tuple[Image.Image, np.ndarray, str]] = []
    n_cutpaste = 0
    for i in range(n):
        nxt = None if n == 1 else (first if i + 1 == n else _load(goods[i + 1]))
        kind = kinds[i % len(kinds)]
        variant = None
        if kind == "cutpaste":
            variant = ("normal", "scar")[n_cutpaste % 2]
            n_cutpaste += 1
        rng = random.Random(f"adreg.synthetic:{seed}:{i}")
        image, mask = _synthesize(current, kind, rng, nxt, variant)
        results.append((image, mask, kind))
        current = nxt
    return results
