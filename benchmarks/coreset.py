"""Bank budgets (greedy coreset) for kNN and RAD, and RAD's batching, side by side in one run.

    python -m benchmarks coreset --datasets bottle,mtd --shots 8 --threads 2 --update-docs

Per dataset (the benchmarks' per-dataset settings, benchmarks.harness.DATASET_SETTINGS), one
k-shot draw: kNN and RAD fitted by the product's detector (``AnomalyDetector.fit``) with each bank budget
(0 = the full bank, the baseline) and scored by ``adreg.evaluation.evaluate`` on the full test set: image /
pixel AUROC, AUPRO, fit seconds (the method's fit, incl. the coreset selection), ms/image (prediction per
test image: backbone + method + post-processing), bank MiB. The backbone runs behind a per-image feature
cache (``adreg.feature_cache.CachingBackbone``); images served from it count the backbone's measured warm
time at batch 1. Then RAD end to end on real test images at batch 1 and batch 8, before (backbone and head
batched, the earlier path, kept here as the comparison) and after (``AnomalyDetector.predict``: backbone
image by image on the CPU, head ``chunk_images=1``), rounds interleaved, medians; the scores of batch 8 and
batch 1 are checked identical. Writes results.csv / results.md to --out and, with --update-docs, the page
docs/benchmarks/coreset.md whole.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from adreg.backbones import build_backbone
from adreg.data import default_category_dir, resolve_dataset, split_shots
from adreg.detector import AnomalyDetector
from adreg.evaluation import evaluate
from adreg.feature_cache import CachingBackbone, honest_seconds
from adreg.images import load_image
from adreg.methods import build_method
from adreg.postprocess import anomaly_maps, image_scores
from benchmarks.harness import command_line, dataset_args, ints, machine_line, write_page, write_results

ABOUT = (
    "Bank budgets (greedy k-center coreset) for kNN (patches) and RAD (reference views), and RAD's batching. "
    "Per dataset one k-shot draw (seed as given) with the benchmark's per-dataset settings "
    "(`benchmarks.harness.DATASET_SETTINGS`); kNN and RAD fitted by the product's detector "
    "(`AnomalyDetector.fit`) with each bank budget (full = no budget, the baseline) and scored with "
    "`adreg.evaluation.evaluate` on the test set. Columns: bank size and MiB (the fitted bank), image AUROC, "
    "pixel AUROC, AUPRO to FPR 0.3 divided by 0.3; `fit s` = the method's fit incl. the coreset selection "
    "(features excluded); `ms/image` = prediction time per test image (backbone + method + post-processing; "
    "images served from the feature cache count the backbone's measured warm time at batch 1); `method "
    "ms/image` = the same without the backbone. The second table times RAD end to end on decoded test "
    "images at batch 1 and 8: before = backbone and head both run on the whole batch (the earlier path), "
    "after = `AnomalyDetector.predict` (backbone image by image on the CPU, head `chunk_images=1`); rounds "
    "interleaved, medians; batch 8 is asserted to score exactly like batch 1."
)


def backbone_ms(backbone, images, rounds: int = 2) -> float:
    """Median ms/image of the backbone at batch 1 (what the detector runs on the CPU)."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        backbone.extract(images, 1)
        times.append((time.perf_counter() - t0) / len(images) * 1000)
    return statistics.median(times)


def bank_rows(args, dataset, name, budgets, backbone, shots, test, top, bb_ms) -> list[dict]:
    """One product detector per budget, fitted on the same shots (their views are cached after the first) and
    evaluated on ``test``."""
    rows = []
    for budget in budgets:
        det = AnomalyDetector(backbone, build_method(name, bank_budget=budget), sigma=args.sigma, top_fraction=top,
                              augment=args.augment, aug_count=args.aug_count, seed=args.seed)
        det.fit(shots, show_progress=False)
        fit_s = det.fit_info["method_fit_seconds"]
        first = len(backbone.calls)
        ev = evaluate(det, test, show_progress=False)
        calls = backbone.calls[first:]
        eval_s = ev.metrics["latency_ms_per_image"] * len(test) / 1000
        method_ms = (eval_s - sum(c.seconds for c in calls)) / len(test) * 1000
        m = ev.metrics
        summary = det.method.summary()
        row = {"dataset": dataset, "part": "bank", "method": name, "k_shot": args.shots, "seed": args.seed,
               "bank_budget": budget, "bank_size": summary.get("bank_patches", summary.get("bank_images")),
               "bank_mib": det.method.state_nbytes() / 2 ** 20, "fit_seconds": fit_s,
               "ms_per_image": honest_seconds(eval_s, calls, bb_ms) / len(test) * 1000, "method_ms": method_ms,
               "coverage_radius": summary.get("coverage_radius", 0.0),
               **{k: m[k] for k in ("image_auroc", "pixel_auroc", "aupro")}}
        rows.append(row)
        with open(Path(args.out) / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{dataset} {name} budget {budget or 'full'}: img {m['image_auroc']:.4f} pix {m['pixel_auroc']:.4f} "
              f"pro {m['aupro']:.4f} fit {fit_s:.1f}s {row['ms_per_image']:.1f} ms/img {row['bank_mib']:.1f} MiB",
              flush=True)
    return rows


def rad_batching_rows(args, dataset, backbone, fitted, images, size, top) -> list[dict]:
    """RAD (``fitted``, default budget) end to end on ``images`` at batch 1 and 8, the earlier batched path
    (its own loop, kept as the comparison) vs the detector's; ``backbone`` is the uncached one."""

    def before(batch: int) -> np.ndarray:  # backbone and head both run the whole batch at once
        head = build_method("rad", chunk_images=batch)
        head.load_state_tensors(fitted.state_tensors())
        out = []
        for start in range(0, len(images), batch):
            f = backbone.extract(images[start:start + batch], batch)
            out.append(image_scores(anomaly_maps(head.score_patches(f), size, args.sigma), top))
        return torch.cat(out).numpy()

    def after(batch: int) -> np.ndarray:
        det = AnomalyDetector(backbone, fitted, sigma=args.sigma, top_fraction=top, batch_size=batch)
        return det.predict(images).scores

    times: dict[tuple[str, int], list[float]] = {}
    scores = {}
    before(1), after(1)  # warm-up: first calls pay one-off allocation costs
    for _ in range(args.rounds):
        for variant, fn in (("before", before), ("after", after)):
            for batch in (1, 8):
                t0 = time.perf_counter()
                scores[variant, batch] = fn(batch)
                times.setdefault((variant, batch), []).append((time.perf_counter() - t0) / len(images) * 1000)
    assert np.array_equal(scores["after", 1], scores["after", 8]), "batch 8 must score exactly like batch 1"
    np.testing.assert_allclose(scores["before", 8], scores["after", 8], rtol=1e-5)
    rows = []
    for (variant, batch), ts in times.items():
        rows.append({"dataset": dataset, "part": "rad_batching", "method": "rad", "variant": variant,
                     "batch": batch, "ms_per_image": statistics.median(ts), "n_images": len(images),
                     "rounds": len(ts)})
        print(f"{dataset} rad {variant} batch {batch}: {statistics.median(ts):.1f} ms/img", flush=True)
    return rows


def test_subset(test: list, n: int) -> list:
    """All of ``test`` (n = 0), or n images evenly spread over its good and its defective ones (half each)."""
    if not n or n >= len(test):
        return list(test)
    out = []
    for label, want in ((0, n // 2), (1, n - n // 2)):
        group = [s for s in test if s.label == label]
        out += [group[i] for i in np.linspace(0, len(group) - 1, min(want, len(group))).round().astype(int)]
    return out


def run_dataset(args, dataset: str) -> list[dict]:
    own = dataset_args(args, dataset)
    raw = build_backbone(args.backbone, layers=ints(own.layers) if own.layers else None,
                         image_size=args.image_size)
    backbone = CachingBackbone(raw, enabled=not args.no_cache)
    data = resolve_dataset(default_category_dir(dataset))
    size, test = raw.image_size, test_subset(data.test, args.max_test)
    n_bad = sum(s.label for s in test)
    shots = [load_image(p) for p in split_shots(data.train, args.shots, args.seed, 0)[0]]
    sample = [load_image(s.path) for s in test[:args.timing_images]]
    raw.extract(sample[:2], 1)  # warm-up
    bb_ms = backbone_ms(raw, sample)
    top = own.top_fraction if own.top_fraction is not None else 0.01
    print(f"{dataset}: {len(shots)} shots, {len(test)} of {len(data.test)} test images ({n_bad} defective), "
          f"backbone {bb_ms:.1f} ms/image", flush=True)
    rows = bank_rows(own, dataset, "knn", ints(args.knn_budgets), backbone, shots, test, top, bb_ms)
    rows += bank_rows(own, dataset, "rad", ints(args.rad_budgets), backbone, shots, test, top, bb_ms)
    if dataset in args.rad_timing.split(","):
        det = AnomalyDetector(backbone, build_method("rad"), sigma=args.sigma, top_fraction=top, augment=own.augment,
                              aug_count=own.aug_count, seed=args.seed).fit(shots, show_progress=False)
        rows += rad_batching_rows(args, dataset, raw, det.method, sample, size, top)
    return rows


def markdown(rows: list[dict], args) -> str:
    out = ["| data | method | bank budget | bank size | bank MiB | image AUROC | pixel AUROC | AUPRO@0.3 | "
           "fit s | ms/image | method ms/image | vs full bank |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    bank = [r for r in rows if r["part"] == "bank"]
    for r in bank:
        full = next(f for f in bank if f["dataset"] == r["dataset"] and f["method"] == r["method"]
                    and f["bank_budget"] == 0)
        unit = "patches" if r["method"] == "knn" else "views"
        vs = ("baseline" if r["bank_budget"] == 0 else
              f"{r['image_auroc'] - full['image_auroc']:+.4f} img AUROC, "
              f"{full['ms_per_image'] / r['ms_per_image']:.1f}x faster end to end, "
              f"{full['method_ms'] / r['method_ms']:.1f}x the method alone")
        out.append(f"| {r['dataset']} | {r['method']} | {r['bank_budget'] or 'full'} | {int(r['bank_size'])} {unit} | "
                   f"{r['bank_mib']:.1f} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['aupro']:.4f} | "
                   f"{r['fit_seconds']:.1f} | {r['ms_per_image']:.1f} | {r['method_ms']:.1f} | {vs} |")
    timing = [r for r in rows if r["part"] == "rad_batching"]
    if timing:
        out += ["", "| data | RAD end to end | batch 1 ms/image | batch 8 ms/image | batch 8 / batch 1 |",
                "|---|---|---|---|---|"]
        for dataset in dict.fromkeys(r["dataset"] for r in timing):
            for variant, label in (("before", "before (backbone + head batched)"),
                                   ("after", "after (detector: backbone x1, head per image)")):
                t = {r["batch"]: r["ms_per_image"] for r in timing
                     if r["dataset"] == dataset and r["variant"] == variant}
                out.append(f"| {dataset} | {label} | {t[1]:.1f} | {t[8]:.1f} | {t[8] / t[1]:.2f} |")
    subset = f"{args.max_test} test images per dataset (half good, half defective)" if args.max_test else \
        "the full test sets"
    out.append(f"\n{args.shots} shots, seed {args.seed}, {subset}, the benchmark's per-dataset settings; backbone "
               f"{args.backbone}, device cpu.\n")
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="bottle,mtd")
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--knn-budgets", default="0,16384,4096", help="patches; 0 = the full bank")
    p.add_argument("--rad-budgets", default="0,256,64", help="reference views; 0 = the full bank")
    p.add_argument("--rad-timing", default="bottle", help="datasets to time RAD batching on")
    p.add_argument("--timing-images", type=int, default=16)
    p.add_argument("--max-test", type=int, default=0, help="score only this many test images, half good, half "
                                                             "defective (0 = the full test set)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--image-size", type=int)
    p.add_argument("--sigma", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="bench-results/coreset")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--update-docs", action="store_true", help="write docs/benchmarks/coreset.md")
    for key in ("layers", "augment", "aug_count", "top_fraction"):  # dataset_args fills them per dataset
        p.set_defaults(**{key: None})
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for dataset in args.datasets.split(",") for r in run_dataset(args, dataset)]
    table, command, machine = markdown(rows, args), command_line("coreset", argv), machine_line("cpu")
    write_results(out, rows, table, command, machine)
    if args.update_docs:
        print(f"wrote {write_page('coreset', 'Bank budgets (coreset) and RAD batching', ABOUT, table, command, machine=machine)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
