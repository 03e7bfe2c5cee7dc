"""What each choice buys on Magnetic-Tile-Defect, and how many shots RAD needs to reach 0.90.

    python -m benchmarks mtd-study --out bench-results/mtd-study

The benchmark's MTD settings (RAD, Lite0 blocks 7+10, 320 px square resize, flips x8, image score =
mean of the top 0.1%) are the baseline; each variant changes one thing, on the same seeded split and
shots. Image AUROC is also reported per defect type (each type's tiles against the good test tiles),
which shows where the misses are. Variants the product can run (the baseline, another method, other
blocks, the shot curve) are fitted and evaluated by it (``adreg.fitting.fit_category`` over a
``CachingBackbone``, as the benchmark runs); variants that need preprocessing or scoring the library does
not ship (aspect-preserving resize, intensity normalisation, self-similarity fusion) are implemented here,
on the same features, split and shots.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from adreg.augment import augment_shots, parse_augmentations
from adreg.backbones import build_backbone
from adreg.backbones.base import Features
from adreg.data import default_category_dir, load_mask, resolve_dataset, split_shots
from adreg.feature_cache import CachingBackbone, cached_features
from adreg.fitting import FitOptions, fit_category
from adreg.images import load_image
from adreg.methods import build_method
from adreg.metrics import auroc, evaluate_scores
from adreg.postprocess import anomaly_maps, image_scores
from benchmarks.harness import fit_settings, ints, write_csv

MTD = fit_settings("mtd")  # the benchmarks' MTD settings: blocks 7+10, flips x8, top 0.1%
LAYERS, TOP, AUGMENT, AUG_COUNT = tuple(MTD["layers"]), MTD["top_fraction"], MTD["augment"], MTD["aug_count"]
SIZE, SIGMA = 320, 4.0

# name -> (what it changes, settings); every unnamed setting is the baseline's
VARIANTS = {
    "baseline": ("320x320 square resize, RAD", {}),
    "aspect-1x": ("aspect-preserving resize at native scale (the CNN sees each tile's true texture scale; "
                  "feature maps resampled to the square input's grid)", {"scale": 1.0}),
    "aspect-2x": ("aspect-preserving resize at 2x (as tiling at 2x: small defects cover 4x the pixels)",
                  {"scale": 2.0}),
    "standardise": ("per-image intensity standardisation (mean 128, std 40) before the backbone",
                    {"photometric": "standardise"}),
    "equalise": ("per-image histogram equalisation before the backbone", {"photometric": "equalise"}),
    "self-similarity": ("RAD score + within-image self-dissimilarity (16-NN outside a 5x5 window), z-summed",
                        {"fuse_self": True}),
    "knn": ("patch 1-NN over all views instead of RAD", {"method": "knn"}),
    "blocks-4-7-10": ("three blocks 4+7+10", {"layers": (4, 7, 10)}),
    "blocks-10-14": ("blocks 10+14 (stride 16 + 32)", {"layers": (10, 14)}),
}


def photometric(img: Image.Image, kind: str | None) -> Image.Image:
    if kind is None:
        return img
    gray = img.convert("L")
    if kind == "equalise":
        gray = ImageOps.equalize(gray)
    elif kind == "standardise":
        a = np.asarray(gray, dtype=np.float32)
        a = (a - a.mean()) / (a.std() + 1e-6) * 40.0 + 128.0
        gray = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return gray.convert("RGB")


def scaled_extract(backbone, images, scale: float, grid: tuple[int, int]) -> Features:
    """Features of each image resized by ``scale`` keeping its aspect ratio (one image per forward pass,
    sizes differ), resampled (area-weighted) onto ``grid`` so every method and metric works unchanged."""
    parts = []
    with torch.inference_mode():
        for img in images:
            w, h = img.size
            size = (max(32, round(w * scale)), max(32, round(h * scale)))
            f = backbone.forward_features(backbone.normalise([img.resize(size, Image.BILINEAR)]))
            parts.append(Features([F.interpolate(p, size=grid, mode="bilinear", antialias=True, align_corners=False)
                                   for p in f.patches], f.globals))
    return Features.cat(parts)


def self_dissimilarity(feats: Features, k: int = 16, exclude: int = 2) -> torch.Tensor:
    """1 - mean cosine of each patch's k most similar patches of the same image outside its own window:
    a texture defect is unlike the rest of its tile even when no shot shows that tile's texture."""
    fmap = feats.combined()
    b, _, h, w = fmap.shape
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    near = ((yy[:, None] - yy[None]).abs() <= exclude) & ((xx[:, None] - xx[None]).abs() <= exclude)
    out = []
    for i in range(b):
        f = F.normalize(fmap[i].flatten(1).T, dim=1)
        sims = (f @ f.T).masked_fill_(near, -2.0)
        out.append(1.0 - sims.topk(k, dim=1).values.mean(1).reshape(h, w))
    return torch.stack(out)


def zscore(t: torch.Tensor) -> torch.Tensor:
    return (t - t.mean()) / t.std()


def features(backbone, paths, make_images, derivation, settings, no_cache: bool) -> Features:
    scale, kind = settings.get("scale"), settings.get("photometric")
    extract = None
    if scale is not None:
        with torch.inference_mode():  # the grid a square SIZE input gives, so every variant scores alike
            grid = backbone.forward_features(torch.zeros(1, 3, SIZE, SIZE)).grid
        extract = lambda images: scaled_extract(backbone, images, scale, grid)  # noqa: E731
    derivation = {**derivation, "study": {"scale": scale, "photometric": kind}}
    feats, _ = cached_features(backbone, paths, lambda: [photometric(i, kind) for i in make_images()], derivation,
                               enabled=not no_cache, extract=extract)
    return feats


@dataclass
class TestSet:
    """The test tiles with their labels, defect types and masks, loaded once for every variant."""

    samples: list
    labels: np.ndarray
    defects: np.ndarray
    masks: np.ndarray

    @classmethod
    def of(cls, data) -> TestSet:
        test = data.test
        return cls(test, np.array([s.label for s in test]), np.array([s.defect for s in test]),
                   np.stack([load_mask(s, (SIZE, SIZE)) for s in test]))


#: settings only this study implements (the product has no such preprocessing or score fusion)
OWN_PATH = ("scale", "photometric", "fuse_self")


def per_defect_auroc(scores: np.ndarray, labels: np.ndarray, defects: np.ndarray) -> dict:
    """Image AUROC of each defect type's images against the good test images."""
    good = scores[labels == 0]
    return {f"auroc_{d}": auroc(np.r_[np.zeros(len(good)), np.ones((defects == d).sum())],
                                np.r_[good, scores[defects == d]])
            for d in sorted(set(defects[labels == 1]))}


def product_variant(name, settings, data, k, seed, aug_count, backbone) -> dict:
    """A variant the product can run: ``fit_category`` on the bundled MTD data (its validation images
    calibrate; no training image is held out, so the shots are the study's) over the caching ``backbone``."""
    t0 = time.perf_counter()
    opts = FitOptions(category="mtd", method=settings.get("method", "rad"), train_dir=str(data.root), k_shot=k,
                      seed=seed, layers=list(settings.get("layers", LAYERS)), image_size=SIZE, augment=AUGMENT,
                      aug_count=aug_count, sigma=SIGMA, top_fraction=TOP, device="cpu")
    ev = fit_category(opts, show_progress=False, backbone=backbone).evaluation
    labels = np.array([s.label for s in ev.samples])
    defects = np.array([s.defect for s in ev.samples])
    return {"variant": name, "k_shot": k, "seed": seed, "aug_count": aug_count,
            "image_auroc": ev.metrics["image_auroc"], "pixel_auroc": ev.metrics["pixel_auroc"],
            **per_defect_auroc(ev.scores, labels, defects), "seconds": time.perf_counter() - t0}


def evaluate_variant(name, settings, data, testset: TestSet, k, seed, aug_count, no_cache, backbones) -> dict:
    layers = tuple(settings.get("layers", LAYERS))
    if layers not in backbones:
        backbones[layers] = CachingBackbone(build_backbone("efficientnet-lite0", layers=list(layers), image_size=SIZE),
                                            enabled=not no_cache)
    if not any(key in settings for key in OWN_PATH):
        return product_variant(name, settings, data, k, seed, aug_count, backbones[layers])
    backbone = backbones[layers].inner
    test, labels, defects, masks = testset.samples, testset.labels, testset.defects, testset.masks
    t0 = time.perf_counter()
    test_feats = features(backbone, [s.path for s in test], lambda: [load_image(s.path) for s in test],
                          {"kind": "test"}, settings, no_cache)
    shots, _ = split_shots(data.train, k, seed, 0)
    kinds = parse_augmentations(AUGMENT) if aug_count else ()
    train_feats = features(backbone, shots, lambda: augment_shots([load_image(p) for p in shots], kinds, aug_count, seed),
                           {"augment": list(kinds), "aug_count": aug_count, "seed": seed}, settings, no_cache)
    method = build_method(settings.get("method", "rad")).fit(train_feats)
    patch = torch.cat([method.score_patches(test_feats[i:i + 16]) for i in range(0, len(test_feats), 16)])
    if settings.get("fuse_self"):
        patch = zscore(patch) + zscore(self_dissimilarity(test_feats))
    maps = anomaly_maps(patch, SIZE, SIGMA)
    scores = image_scores(maps, TOP).numpy()
    metrics = evaluate_scores(labels, scores, masks, maps.numpy())
    per_defect = per_defect_auroc(scores, labels, defects)
    return {"variant": name, "k_shot": k, "seed": seed, "aug_count": aug_count,
            "image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"], **per_defect,
            "seconds": time.perf_counter() - t0}


def markdown(rows: list[dict]) -> str:
    defects = sorted(k for k in rows[0] if k.startswith("auroc_"))
    head = ("| variant | what changes | k | image AUROC | " + " | ".join(d[6:] for d in defects)
            + " | pixel AUROC |\n|" + "---|" * (5 + len(defects)) + "\n")
    lines = []
    for r in rows:
        what = VARIANTS.get(r["variant"], (f"{r['k_shot']} shots, no augmentation",))[0]
        cells = [f"{r['image_auroc']:.3f}", *(f"{r[d]:.3f}" for d in defects), f"{r['pixel_auroc']:.3f}"]
        lines.append(f"| {r['variant']} | {what} | {r['k_shot']} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--shots-curve", default="8,16,32,64,128,256,832",
                   help="shot counts for the baseline without augmentation (832 = every training tile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--out", default="bench-results/mtd-study")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    data = resolve_dataset(default_category_dir("mtd"))
    testset = TestSet.of(data)
    backbones: dict = {}
    rows = []
    jobs = [(v, VARIANTS[v][1], 8, AUG_COUNT) for v in args.variants.split(",") if v]
    jobs += [(f"shots-{k}", {}, k, 0) for k in ints(args.shots_curve)]
    for name, settings, k, aug_count in jobs:
        row = evaluate_variant(name, settings, data, testset, min(k, len(data.train)), args.seed, aug_count,
                               args.no_cache, backbones)
        rows.append(row)
        print(f"{name:16s} k={row['k_shot']:<4d} img {row['image_auroc']:.4f} pix {row['pixel_auroc']:.4f} "
              + " ".join(f"{key[6:]} {v:.3f}" for key, v in row.items() if key.startswith("auroc_"))
              + f" ({row['seconds']:.0f}s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "study.csv", rows, list(rows[0]))
    table = markdown(rows)
    (out / "study.md").write_text(table)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
