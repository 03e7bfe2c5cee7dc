"""Measurement behind the growth defaults: synthetic copies per real good, RAD's bank budget, layer weights.

    python -m pipelines.growth_aug --out bench-results/growth-aug

MTD (bundled seeded split), RAD on Lite0 blocks 7+10 (MTD's settings). Every good training tile is
extracted once as itself and as ``--max-copies`` flip copies (one fixed RNG per tile), so a condition
is a subset of views: the 8-shot fit's views (the first 8 goods, 8 copies each, as a fit gets them) plus,
for every further good, its original and its first ``c`` copies. The bank is then selected from that
union (budget, k-center over layout descriptors) and scored on the full test split through the
product's ``predict_features``. Image AUROC (and views) per (goods, copies per added good, budget,
layer weights): what ``adreg update``'s adaptive augmentation (``AnomalyDetector.aug_copies``) and RAD's
defaults were chosen from (docs/benchmarks/growth.md, "Choosing the defaults").
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from adreg.augment import augment_once
from adreg.backbones import build_backbone
from adreg.backbones.base import Features
from adreg.data import default_category_dir, load_mask, resolve_dataset
from adreg.images import load_image
from adreg.methods import build_method
from adreg.metrics import evaluate_scores
from pipelines.growth import score_features


def extract_half(backbone, images) -> Features:
    """Features of ``images`` kept in float16 (halves the memory of thousands of views)."""
    f = backbone.extract(images, 1)
    return Features([p.half() for p in f.patches], [g.half() for g in f.globals])


def extract_all(backbone, goods, test, kinds, args):
    """Per good: its own features and those of its copies (8 for the fit's first 8 goods, ``max_copies``
    for the rest; one RNG per good, so copy j is the same whatever c); the test split's features."""
    origin, copies = [], []
    for i, path in enumerate(goods):
        img = load_image(path)
        rng = random.Random(10_007 * (i + 1) + args.seed)
        n = 8 if i < 8 else args.max_copies
        origin.append(extract_half(backbone, [img]))
        copies.append(extract_half(backbone, [augment_once(img, kinds, rng) for _ in range(n)]) if n else None)
    test_feats = Features.cat([extract_half(backbone, [load_image(s.path)]) for s in test])
    return origin, copies, test_feats


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--goods", default="64,256,832")
    p.add_argument("--copies", default="0,1,3")
    p.add_argument("--budgets", default="256,1024")
    p.add_argument("--weights", default="[1,1]")
    p.add_argument("--k-image", default="16")
    p.add_argument("--max-copies", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench-results/growth-aug")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = resolve_dataset(default_category_dir("mtd"))
    goods = list(data.train)
    random.Random(args.seed).shuffle(goods)
    backbone = build_backbone("efficientnet-lite0", layers=[7, 10])
    kinds = ("hflip", "vflip")
    t0 = time.perf_counter()
    goods = goods[:max(int(x) for x in args.goods.split(","))]  # only the goods some condition uses
    cache = out / f"features-seed{args.seed}-{len(goods)}-{args.max_copies}.pt"  # bench-results/ (ignored) only
    if cache.is_file():
        origin, copies, test_feats = torch.load(cache)
    else:
        origin, copies, test_feats = extract_all(backbone, goods, data.test, kinds, args)
        torch.save((origin, copies, test_feats), cache)
    test_feats = test_feats.to(torch.float32)
    labels = np.array([s.label for s in data.test])
    masks = np.stack([load_mask(s, (backbone.image_size,) * 2) for s in data.test])
    print(f"features: {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for n_goods in [int(x) for x in args.goods.split(",")]:
        for c in [int(x) for x in args.copies.split(",")]:
            parts = [origin[i] for i in range(8)] + [copies[i] for i in range(8)]
            parts += [origin[i] for i in range(8, n_goods)]
            if c:
                parts += [copies[i][:c] for i in range(8, n_goods)]
            feats = Features.cat(parts).to(torch.float32)
            for budget in [int(x) for x in args.budgets.split(",")]:
                for weights in json.loads(f"[{args.weights}]"):
                    for k_image in [int(x) for x in args.k_image.split(",")]:
                        method = build_method("rad", bank_budget=budget, layer_weights=weights,
                                              k_image=k_image).fit(feats)
                        scores, maps = score_features(method, test_feats, backbone, 4.0, 0.001)
                        m = evaluate_scores(labels, scores, masks, maps)
                        row = {"goods": n_goods, "copies": c, "views": len(feats), "budget": budget,
                               "weights": json.dumps(weights), "k_image": k_image,
                               "image_auroc": round(m["image_auroc"], 4), "pixel_auroc": round(m["pixel_auroc"], 4)}
                        rows.append(row)
                        print(row, flush=True)
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
