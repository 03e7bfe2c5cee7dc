"""Few-shot augmentation of the k normal images (SubspaceAD's recipe, also used by retrieval methods).

Each shot is kept as is and ``aug_count`` randomly transformed copies are added. The default
``rotate`` (a random angle among 0, 15, ..., 345 degrees) suits top-down inspection views; pick
``none`` for products with a fixed orientation.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Iterable, Iterator, Sequence

from PIL import Image, ImageEnhance

from adreg.errors import ConfigError

AUGMENTATIONS = ("none", "rotate", "hflip", "vflip", "affine", "color")


def parse_augmentations(spec: str | Sequence[str]) -> tuple[str, ...]:
    names = tuple(s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip())
    bad = [n for n in names if n not in AUGMENTATIONS]
    if bad:
        raise ConfigError(f"unknown augmentation(s) {bad}; choose from {list(AUGMENTATIONS)}")
    return tuple(n for n in names if n != "none")


def _fill(img: Image.Image):
    """Fill uncovered corners with the image's border colour instead of black."""
    return img.getpixel((0, 0))


def augment_once(img: Image.Image, kinds: Sequence[str], rng: random.Random) -> Image.Image:
    out = img
    for kind in kinds:
        if kind == "rotate":
            out = out.rotate(rng.choice(range(0, 360, 15)), resample=Image.BILINEAR, fillcolor=_fill(out))
        elif kind == "hflip" and rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        elif kind == "vflip" and rng.random() < 0.5:
            out = out.transpose(Image.FLIP_TOP_BOTTOM)
        elif kind == "affine":
            w, h = out.size
            tx, ty = rng.uniform(-0.15, 0.15) * w, rng.uniform(-0.15, 0.15) * h
            out = out.rotate(0, translate=(tx, ty), resample=Image.BILINEAR, fillcolor=_fill(out))
            shear = rng.uniform(-10, 10)
            s = math.tan(math.radians(shear))
            out = out.transform(out.size, Image.AFFINE, (1, s, -s * h / 2, 0, 1, 0),
                                resample=Image.BILINEAR, fillcolor=_fill(out))
        elif kind == "color":
            for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                out = enhancer(out).enhance(rng.uniform(0.8, 1.2))
    return out


def adaptive_copies(aug_count: int, aug_views: int, n_real: int) -> int:
    """Synthetic copies per real good when the model holds ``n_real`` real goods: ``aug_count``, cut so
    that real goods plus copies stay near ``aug_views`` views once there are many real goods,
    ``min(aug_count, max(0, ceil(aug_views / n_real) - 1))``; ``aug_views`` 0 = always ``aug_count``.

    Many real goods need few synthetic copies: on MTD (RAD) 0, 1 or 3 flip copies per added good give the
    same AUROC from 64 goods on, while every copy costs a full backbone pass (docs/benchmarks/growth.md)."""
    if aug_count < 0 or aug_views < 0:
        raise ConfigError(f"aug_count and aug_views must be >= 0, got {aug_count} and {aug_views}")
    if not aug_views or n_real < 1:
        return aug_count
    return min(aug_count, max(0, math.ceil(aug_views / n_real) - 1))


def iter_views(images: Iterable, kinds: Sequence[str], aug_count: int, seed: int,
               decode: Callable = lambda x: x) -> Iterator[Image.Image]:
    """Each image (``decode``d from whatever ``images`` holds, one at a time), then its ``aug_count``
    augmented copies: the views ``augment_shots`` makes, from the same random draws, image by image, so
    a caller can extract and forget them in chunks (only one decoded image is held at a time)."""
    if aug_count < 0:
        raise ConfigError(f"aug_count must be >= 0, got {aug_count}")
    rng = random.Random(seed)
    for item in images:
        img = decode(item)
        yield img
        if kinds and aug_count:
            for _ in range(aug_count):
                yield augment_once(img, kinds, rng)


def augment_shots(images: Sequence[Image.Image], kinds: Sequence[str], aug_count: int, seed: int) -> list[Image.Image]:
    """Originals plus ``aug_count`` augmented copies of each, reproducible from ``seed``."""
    if aug_count < 0:
        raise ConfigError(f"aug_count must be >= 0, got {aug_count}")
    rng = random.Random(seed)
    out = list(images)
    if kinds and aug_count:
        for img in images:
            out.extend(augment_once(img, kinds, rng) for _ in range(aug_count))
    return out
