"""Growth benchmark: start from a few shots and grow the model with updates, side by side with full refits.

    python -m benchmarks growth --dataset mtd --methods rad,subspace,knn --steps 8,16,32,64,128,256 \
        --seeds 0,1,2 --contamination 0.05 --out bench-results/growth --update-docs

Per seed the good training images are shuffled once; the model is fitted on the first ``steps[0]``
and then updated (``AnomalyMethod.update``) with the next images at every step, as ``adreg update``
does. At every step: image / pixel AUROC and AUPRO on the full test set, state MiB, ms/image (backbone
+ method scoring + post-processing), the update's seconds and, on the same union of images, the
seconds of a full refit. Feature seconds of both are the measured backbone time per view x the views
each has to extract (the update: the new images' views; the refit: all of them), so the two columns
compare like with like whether or not the feature cache was hit.

Contamination rows (``--contamination 0.05``): the same growth with 5% defective test images mixed into
every batch of added goods (those images leave the test set of every condition of that seed), once
taken in blindly and once through the product's contamination guard (``adreg.fitting.contamination_guard``,
what ``adreg update`` runs: the current model scores the batch; what it scores above its threshold, calibrated
on the validation goods by the product's rule, ``adreg.thresholds.calibrate`` at the 0.99 quantile, is held
out; ``adreg update``'s second look at the suspects is not modelled here);
``--guard-quantiles 0.99,0.9`` adds a guarded row per stricter quantile.

Scoring goes through the product's ``AnomalyDetector.predict_features`` (method scores, maps, image scores)
on cached features; fits and updates call the methods' own ``fit`` / ``update`` on cached features, since
comparing those two paths on the same features is the point (``adreg update`` runs the same ``update``
through ``AnomalyDetector.update``). Writes results.csv / results.md to --out and, with --update-docs, the
page docs/benchmarks/growth.md whole.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from adreg.augment import augment_shots, parse_augmentations
from adreg.backbones import build_backbone
from adreg.backbones.base import Features
from adreg.data import default_category_dir, load_mask, resolve_dataset
from adreg.detector import AnomalyDetector
from adreg.feature_cache import cached_features
from adreg.fitting import contamination_guard
from adreg.images import load_image
from adreg.methods import build_method
from adreg.metrics import evaluate_scores
from adreg.thresholds import calibrate
from benchmarks.harness import (DATASET_SETTINGS, GENERIC_SETTINGS, command_line, ints, machine_line, write_csv,
                                write_page, write_results)

ABOUT = (
    "A model grown by updates against full refits, on the dataset named under the table (MTD: its bundled seeded "
    "split). Per seed the good training "
    "images are shuffled once; the model is fitted on the first goods and updated (`AnomalyMethod.update`, what "
    "`adreg update` runs) with the next ones at every step. At every step: image AUROC, pixel AUROC, AUPRO to "
    "FPR 0.3 divided by 0.3 on the test split, state MiB (the fitted arrays), `ms/image` = the measured warm "
    "backbone time per view + the method's scoring and post-processing (`AnomalyDetector.predict_features`) "
    "per test image, `of which method` = the latter; `update s` = the update's seconds and `full refit s` = a "
    "full refit's on the same union of images, both with feature seconds = the measured backbone time per "
    "view x the views each has to extract (the update: the new images' views; the refit: all of them). "
    "Contamination rows: defective test images (the given fraction of every added batch) mixed into the added "
    "goods (they leave that seed's test set for every condition), taken in blindly or through the product's "
    "guard (`adreg.fitting.contamination_guard`, what `adreg update` runs: the current model scores the batch; "
    "what it scores above its threshold, the given quantile of the calibration goods' scores, is held out; the "
    "second look of `adreg update` is not modelled); `guard held out (defects)` = images held out (of which "
    "defects, of the defects added). Values are mean ± std over seeds."
)
REPORTED = ["image_auroc", "pixel_auroc", "aupro", "state_mib", "ms_per_image", "method_ms_per_image",
            "update_seconds", "refit_seconds"]


class Views:
    """Backbone features of the augmented views of image batches, cached on disk, with their count."""

    def __init__(self, backbone, kinds, aug_count: int, batch_size: int, cache: bool):
        self.backbone, self.kinds, self.aug_count = backbone, kinds, aug_count
        self.batch_size, self.cache = batch_size, cache

    def of(self, paths: list[Path], seed: int) -> Features:
        feats, _ = cached_features(
            self.backbone, paths,
            lambda: augment_shots([load_image(p) for p in paths], self.kinds, self.aug_count, seed),
            {"augment": list(self.kinds), "aug_count": self.aug_count, "seed": seed, "kind": "growth"},
            self.batch_size, self.cache)
        return feats

    def rows_of(self, keep: list[int], n: int) -> list[int]:
        """Rows of the views of images ``keep`` among ``n``: originals first, then each one's copies."""
        a = self.aug_count if self.kinds else 0
        return list(keep) + [n + i * a + j for i in keep for j in range(a)]


def score_features(method, feats, backbone, sigma: float, top: float, batch: int = 8):
    """Image scores and maps of pre-extracted features through the product's scoring
    (``AnomalyDetector.predict_features``), ``batch`` images at a time as ``predict`` runs them."""
    det = AnomalyDetector(backbone, method, sigma=sigma, top_fraction=top, batch_size=batch)
    parts = [det.predict_features(feats[i:i + batch]) for i in range(0, len(feats), batch)]
    return np.concatenate([p.scores for p in parts]), np.concatenate([p.maps for p in parts])


def evaluate(method, test_feats, labels, masks, backbone, sigma, top) -> dict:
    score_features(method, test_feats[:16], backbone, sigma, top)  # warm-up: the timing starts warm at every step
    t0 = time.perf_counter()
    scores, maps = score_features(method, test_feats, backbone, sigma, top)
    method_ms = (time.perf_counter() - t0) / len(labels) * 1000
    return {**evaluate_scores(labels, scores, masks, maps), "method_ms": method_ms}


def grow(name, params, batches, views, seed, backbone_ms, test, size, sigma, top, refit: bool, guard=None,
         log=print, condition="clean") -> list[dict]:
    """Fit on batches[0], update with each next batch; a row per step. ``guard`` = (calibration features,
    q): drop what the current model scores above its threshold before each update."""
    test_feats, labels, masks = test
    method = build_method(name, **params)
    union: list[Features] = []
    rows, seen, held, caught = [], 0, 0, 0
    for step, (paths, is_defect) in enumerate(batches):
        feats = views.of(paths, seed * 1000 + step)
        if guard is not None and step > 0:
            originals = feats[: len(paths)]  # augment_shots keeps the originals first
            cal_feats, q = guard
            cal_scores, _ = score_features(method, cal_feats, views.backbone, sigma, top)
            threshold = calibrate(cal_scores, q=q).value  # the product's rule for a threshold from goods
            scores, _ = score_features(method, originals, views.backbone, sigma, top)
            keep, suspects = contamination_guard(scores, threshold)  # what adreg update holds out
            held += len(suspects)
            caught += sum(1 for i in suspects if is_defect[i])
            feats = feats[views.rows_of(keep, len(paths))] if keep else None
            paths = [paths[i] for i in keep]
        n_views = 0 if feats is None else len(feats)
        t0 = time.perf_counter()
        if step == 0:
            method.fit(feats)
        elif feats is not None:
            method.update(feats)
        method_s = time.perf_counter() - t0
        if feats is not None:
            union.append(feats)
        seen += len(paths)
        row = {"method": name, "condition": condition, "seed": seed, "step": step, "goods": seen,
               "n_views": sum(len(f) for f in union), "update_seconds": n_views * backbone_ms / 1000 + method_s,
               "refit_seconds": float("nan"), "state_mib": method.state_nbytes() / 2 ** 20,
               "held_out": held, "defects_caught": caught, "defects_added": 0}
        if refit and step > 0:
            all_feats = Features.cat(union)
            t0 = time.perf_counter()
            build_method(name, **params).fit(all_feats)
            row["refit_seconds"] = len(all_feats) * backbone_ms / 1000 + time.perf_counter() - t0
            del all_feats
        metrics = evaluate(method, test_feats, labels, masks, views.backbone, sigma, top)
        row.update(metrics)
        row["method_ms_per_image"] = metrics.pop("method_ms")
        row["ms_per_image"] = backbone_ms + row["method_ms_per_image"]
        rows.append(row)
        log(f"{condition:18s} {name:9s} seed {seed} goods {seen:4d} img {row['image_auroc']:.4f} "
            f"pix {row['pixel_auroc']:.4f} pro {row['aupro']:.4f} state {row['state_mib']:.1f} MiB "
            f"{row['ms_per_image']:.1f} ms/img update {row['update_seconds']:.1f}s refit {row['refit_seconds']:.1f}s"
            + (f" held out {held} (defects caught {caught})" if guard is not None else ""))
    return rows


def parse_row(row: dict) -> dict:
    """A CSV row back to numbers."""
    out = {}
    for k, v in row.items():
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return out


def merge_runs(runs: list[list[dict]]) -> list[dict]:
    """Rows of several runs as one: a later run's row replaces an earlier one of the same method,
    condition, seed and step (a re-measured method or seed overrides the old figures)."""
    merged: dict[tuple, dict] = {}
    for rows in runs:
        for r in rows:
            merged[(r["method"], r["condition"], r["seed"], r["step"])] = r
    return list(merged.values())


def run(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    own = DATASET_SETTINGS.get(args.dataset, GENERIC_SETTINGS)
    augment = args.augment or own["augment"]
    aug_count = args.aug_count if args.aug_count is not None else own["aug_count"]
    layers = ints(args.layers or own["layers"] or "") or None
    top_arg = args.top_fraction if args.top_fraction is not None else own["top_fraction"]
    data = resolve_dataset(args.data or default_category_dir(args.dataset))
    backbone = build_backbone(args.backbone, layers=layers, image_size=args.image_size)
    size = backbone.image_size
    views = Views(backbone, parse_augmentations(augment), aug_count, args.batch_size, not args.no_cache)
    probe = [load_image(p) for p in data.train[:16]]
    backbone.extract(probe[:2], 1)  # warm-up: the first call allocates and picks kernels
    t0 = time.perf_counter()
    backbone.extract(probe, 1)  # one image per pass, as AnomalyDetector runs the backbone on the CPU
    backbone_ms = (time.perf_counter() - t0) / 16 * 1000
    print(f"{args.dataset}: {len(data.train)} train goods, {len(data.test)} test images; backbone "
          f"{backbone.spec()} {backbone_ms:.1f} ms/view; augment {augment} x{aug_count}", flush=True)
    method_params = json.loads(args.method_params)
    steps = ints(args.steps)
    rows = []
    for seed in ints(args.seeds):
        order = list(data.train)
        random.Random(seed).shuffle(order)
        if data.val:
            calibration = [s.path for s in data.val if s.label == 0]
        else:  # no validation set: 20 goods that are never added calibrate the guard
            calibration, order = order[-20:], order[:-20]
        usable = [k for k in steps if k <= len(order)]
        test = list(data.test)
        all_test_feats, _ = cached_features(backbone, [s.path for s in test],
                                            lambda: [load_image(s.path) for s in test],
                                            {"kind": "test"}, args.batch_size, not args.no_cache)
        defect_pool = []
        if args.contamination:
            rng = random.Random(seed + 17)
            bad = [s for s in test if s.label == 1]
            need = sum(math.ceil(args.contamination * (b - a)) for a, b in zip(usable, usable[1:]))
            defect_pool = rng.sample(bad, min(need, len(bad)))
        kept = [i for i, s in enumerate(test) if s not in set(defect_pool)]
        test = [test[i] for i in kept]
        test_feats = all_test_feats[kept]
        labels = np.array([s.label for s in test])
        masks = np.stack([load_mask(s, (size, size)) for s in test])
        evalset = (test_feats, labels, masks)
        clean = [(order[:usable[0]], [False] * usable[0])]
        clean += [(order[a:b], [False] * (b - a)) for a, b in zip(usable, usable[1:])]
        for name in [m for m in args.methods.split(",") if m]:
            params = method_params.get(name, {})
            top = top_arg if top_arg is not None else build_method(name).default_top_fraction
            rows += grow(name, params, clean, views, seed, backbone_ms, evalset, size, args.sigma, top,
                         refit=not args.no_refit, condition="clean")
            write_csv(Path(args.out) / "partial.csv", rows)  # a long run killed later keeps what it measured
            if name in args.full_bank.split(","):  # the same first step with no bank budget
                rows += grow(name, {**params, "bank_budget": 0}, clean[:1], views, seed, backbone_ms, evalset, size,
                             args.sigma, top, refit=False, condition="full bank")
        if args.contamination:
            dirty, it = [clean[0]], iter(defect_pool)
            for paths, flags in clean[1:]:
                extra = [s.path for s in (next(it, None) for _ in range(math.ceil(args.contamination * len(paths))))
                         if s is not None]
                dirty.append((paths + extra, flags + [True] * len(extra)))
            cal_feats = backbone.extract([load_image(p) for p in calibration], args.batch_size)
            for name in [m for m in args.contamination_methods.split(",") if m]:
                params = method_params.get(name, {})
                top = top_arg if top_arg is not None else build_method(name).default_top_fraction
                guards = [("5% defects", None)] + [
                    ("5% defects + guard" + ("" if q == 0.99 else f" q{q:g}"), (cal_feats, q))
                    for q in (float(x) for x in args.guard_quantiles.split(",") if x.strip())]
                for cond, guard in guards:
                    cond = cond.replace("5%", f"{args.contamination:.0%}")
                    out = grow(name, params, dirty, views, seed, backbone_ms, evalset, size, args.sigma, top,
                               refit=False, guard=guard, condition=cond)
                    added = 0
                    for row, (_, flags) in zip(out, dirty):
                        added += sum(flags)
                        row["defects_added"] = added
                    rows += out
                    write_csv(Path(args.out) / "partial.csv", rows)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["condition"], r["step"]), []).append(r)
    out = []
    for (method, condition, step), rs in groups.items():
        entry = {"method": method, "condition": condition, "goods": rs[0]["goods"], "seeds": len(rs),
                 "held_out": statistics.mean(r["held_out"] for r in rs),
                 "defects_caught": statistics.mean(r["defects_caught"] for r in rs),
                 "defects_added": statistics.mean(r["defects_added"] for r in rs)}
        for key in REPORTED:
            vals = [r[key] for r in rs if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
            entry[key] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0) if vals else None
        out.append(entry)
    order = {"clean": 0, "full bank": 1}
    return sorted(out, key=lambda e: (e["method"], order.get(e["condition"], 2), e["condition"], e["goods"]))


def markdown(summary: list[dict], args, backbone_note: str) -> str:
    head = ("| method | condition | goods | seeds | image AUROC | pixel AUROC | AUPRO@0.3 | state MiB | ms/image "
            "| of which method | update s | full refit s | guard held out (defects) |\n" + "|---" * 13 + "|\n")
    lines = []
    for e in summary:
        fmt = lambda key, spec=".4f": "-" if e[key] is None else (  # noqa: E731
            f"{e[key][0]:{spec}} ± {e[key][1]:{spec}}" if e["seeds"] > 1 else f"{e[key][0]:{spec}}")
        guard = "-"
        if "guard" in e["condition"]:
            guard = f"{e['held_out']:.0f} ({e['defects_caught']:.0f} of {e['defects_added']:.0f})"
        elif "defects" in e["condition"]:
            guard = f"none ({e['defects_added']:.0f} defects taken in)"
        lines.append(f"| {e['method']} | {e['condition']} | {e['goods']} | {e['seeds']} | {fmt('image_auroc')} | "
                     f"{fmt('pixel_auroc')} | {fmt('aupro')} | {e['state_mib'][0]:.2f} | {e['ms_per_image'][0]:.1f} | "
                     f"{'-' if e['method_ms_per_image'] is None else format(e['method_ms_per_image'][0], '.1f')} | "
                     f"{e['update_seconds'][0]:.1f} | "
                     f"{'-' if e['refit_seconds'] is None else format(e['refit_seconds'][0], '.1f')} | {guard} |")
    note = f"\n{backbone_note}; seeds {args.seeds}; method params {args.method_params}; device cpu.\n"
    return head + "\n".join(lines) + "\n" + note


def top_note(top: float | None) -> str:
    return "the method default" if top is None else f"top {top:g}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mtd", help="bundled category: mtd or bottle (or --data)")
    p.add_argument("--data", help="a category folder instead of the bundled one")
    p.add_argument("--methods", default="rad,subspace,knn",
                   help="methods that get the clean rows ('' = none: only the contamination rows)")
    p.add_argument("--method-params", default="{}", help='JSON per method, e.g. {"rad": {"bank_budget": 256}}')
    p.add_argument("--steps", default="8,16,32,64,128,256", help="goods after each step (first = the fit)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--contamination", type=float, default=0.05, help="defective fraction mixed in (0 = no rows)")
    p.add_argument("--contamination-methods", default="rad", help="methods that get the contamination rows")
    p.add_argument("--guard-quantiles", default="0.99",
                   help="guard thresholds to compare: quantiles of the calibration goods' scores (0.99 = the "
                        "threshold rule adreg update's guard uses; lower ones hold out more)")
    p.add_argument("--full-bank", default="knn", help="methods also run at the first step with bank_budget=0")
    p.add_argument("--no-refit", action="store_true", help="skip the full refits (no 'full refit s' column)")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--layers", help="comma list (default: the dataset's, see benchmarks.harness.DATASET_SETTINGS)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--augment")
    p.add_argument("--aug-count", type=int)
    p.add_argument("--top-fraction", type=float)
    p.add_argument("--sigma", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--out", default="bench-results/growth")
    p.add_argument("--update-docs", action="store_true", help="write docs/benchmarks/growth.md")
    p.add_argument("--from-csv", help="comma list of results/partial CSVs of earlier runs: no run, one table of them (a later "
                        "file's row replaces an earlier one of the same method, condition, seed and step)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_csv:
        rows = merge_runs([[parse_row(r) for r in csv.DictReader(open(f))] for f in args.from_csv.split(",")])
    else:
        rows = run(args)
    own = DATASET_SETTINGS.get(args.dataset, GENERIC_SETTINGS)
    note = (f"{args.dataset}; backbone {args.backbone}, blocks {args.layers or own['layers'] or 'default'}, "
            f"augment {args.augment or own['augment']} x{own['aug_count'] if args.aug_count is None else args.aug_count}, "
            f"image score {top_note(args.top_fraction if args.top_fraction is not None else own['top_fraction'])}")
    table, command, machine = markdown(summarise(rows), args, note), command_line("growth", argv), machine_line()
    write_results(out, rows, table, command, machine)
    if args.update_docs:
        print(f"wrote {write_page('growth', 'Growth: updates vs full refits', ABOUT, table, command, machine=machine)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
