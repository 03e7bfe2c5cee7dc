"""Benchmark methods x shots x seeds on real categories, one backbone, all in one run, through the product.

    python -m benchmarks accuracy --datasets bottle,mtd --methods subspace,rad,knn --shots 1,2,4,8

Every row is one ``adreg.fitting.fit_category`` (what ``adreg fit`` runs: data -> shots -> augmentation ->
features -> method fit -> threshold calibration -> ``adreg.evaluation.evaluate`` on the test set) with the
product's defaults. The backbone it is given is wrapped in ``adreg.feature_cache.CachingBackbone``: each
image's features are cached (memory + disk) by backbone and pixels, so the test set seen by every method and
seed, and the same augmented views seen again, go through the backbone once, and a re-run skips it. Fit
seconds and ms/image are the product's own measures, with the images served from the cache counted at the
backbone's measured warm per-image time instead of the cache read. Writes results.csv, results.md and report
pictures (first seed) to --out, logs one MLflow run per (dataset, method, k, seed) with --log-mlflow
(pictures as artifacts), and with --update-docs writes the page docs/benchmarks/accuracy.md whole.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from adreg.backbones import build_backbone
from adreg.data import default_category_dir, resolve_dataset
from adreg.detector import CHUNK_VIEWS, AnomalyDetector, resolve_device
from adreg.feature_cache import CachingBackbone, honest_seconds, split_calls
from adreg.fitting import FitOptions, fit_category
from adreg.images import load_image
from adreg.methods import build_method
from adreg.reports import save_report
from benchmarks.harness import DOCS, command_line, dataset_args, ints, machine_line, write_page, write_results

REPORTED = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "fit_seconds", "ms_per_image", "state_mib"]

ABOUT = (
    "Every row is one fit by the product's own code, `adreg.fitting.fit_category` (what `adreg fit` runs), "
    "with its defaults: k good shots drawn with the seed from the training images (20 other good training "
    "images are held out for threshold calibration, none where the dataset has a validation folder, as MTD "
    "has), augmented, backbone features, method fit, threshold calibration, then `adreg.evaluation.evaluate` "
    "on the full test set. The backbone runs behind a per-image feature cache "
    "(`adreg.feature_cache.CachingBackbone`, keyed by backbone and pixels; on the CPU its features are those "
    "of an uncached extraction bit for bit, tested), so each test image and augmented view goes through the "
    "backbone at most once, and a re-run not at all. Columns: image AUROC, pixel AUROC, AUPRO to FPR 0.3 "
    "divided by 0.3 (8-connected regions, all test images), image F1-max, as mean ± std over seeds; `fit s` = "
    "the detector's fit (augmentation + feature extraction + method fit, `fit_info.fit_seconds`); `ms/image` "
    "= the prediction time per test image in `evaluate` (resize, backbone, method, post-processing; image "
    "decoding excluded). In both, an image served from the cache counts the backbone's measured warm "
    "per-image time (median of 3 passes over test images spread over the test set, their number under the "
    "table) instead of the cache read; images that missed the cache count their measured backbone time. "
    "`state MiB` = the fitted arrays the model saves. SPG is zero-shot: one row at k = 0, learned on the "
    "other dataset (the product still draws one shot, which SPG does not use). Each dataset has its own "
    "settings (`DATASET_SETTINGS` in `benchmarks/harness.py`; flags override them), given under the table "
    "(why MTD's: [Magnetic-Tile-Defect](../guides/data.md#magnetic-tile-defect))."
)


def seeds_of(args: argparse.Namespace, method: str) -> list[int]:
    """The seeds ``method`` runs with: --seeds, or its own list from --method-seeds."""
    own = json.loads(args.method_seeds).get(method)
    return ints(str(own)) if own is not None else ints(args.seeds)


def shots_of(args: argparse.Namespace, method: str) -> list[int]:
    """The shot counts ``method`` runs with: its own list from --method-shots, else 0 for a zero-shot
    method (it never sees the target's images, so one row says it all), else --shots."""
    own = json.loads(args.method_shots).get(method)
    if own is not None:
        return ints(str(own))
    return [0] if build_method(method).needs_auxiliary else ints(args.shots)


def state_mib(method) -> float:
    return sum(t.numel() * t.element_size() for t in method.state_tensors().values()) / 2 ** 20


def warm_backbone_ms(backbone, batch_size: int, images: list, rounds: int = 3) -> float:
    """Median ms/image of the (uncached) backbone on ``images``, run as ``AnomalyDetector`` runs it
    (``backbone_batch`` images per pass: one on the CPU), after a warm-up pass."""
    probe = AnomalyDetector(backbone, build_method("subspace"), batch_size=batch_size)
    probe.extract(images[:2])
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        probe.extract(images)
        times.append((time.perf_counter() - t0) / len(images) * 1000)
    return statistics.median(times)


def fit_options(args, dataset: str, data_dir: str, name: str, k: int, seed: int) -> FitOptions:
    """The FitOptions of one row: ``args`` already holds the dataset's settings; a zero-shot method gets
    the other dataset as its auxiliary one and the seed, and the one shot the product requires."""
    params = dict(json.loads(args.method_params).get(name, {}))
    if build_method(name).needs_auxiliary:
        params = {"aux": "mtd" if dataset != "mtd" else "bottle", "seed": seed, **params}
    return FitOptions(category=dataset, method=name, train_dir=data_dir, k_shot=max(k, 1), seed=seed,
                      backbone=args.backbone, layers=ints(args.layers) if args.layers else None,
                      image_size=args.image_size, augment=args.augment, aug_count=args.aug_count, sigma=args.sigma,
                      top_fraction=args.top_fraction, batch_size=args.batch_size, device=args.device,
                      method_params=params)


def _batches(n: int, size: int) -> list[int]:
    """The sizes of ``n`` images taken ``size`` at a time (the last batch holds the rest)."""
    return [min(size, n - start) for start in range(0, n, size)]


def phase_calls(calls: list, detector, n_test: int, n_calibration: int | None = None) -> tuple[list, list]:
    """The backbone calls of one ``fit_category``, split into those of ``AnomalyDetector.fit`` (the first)
    and those of ``evaluate`` (the last); the calibration's lie between.

    The fit's views (``fit_info["n_train_images"]``) go ``detector.chunk_views`` (``CHUNK_VIEWS``) at a time
    when the method streams its fit (``AnomalyDetector._chunks``: one call per chunk); otherwise in one call,
    followed by one for their CutPaste copies when the method synthesises and one for the auxiliary dataset
    when it needs one. Calibration (``n_calibration`` images, when given) and evaluation (``n_test``) are
    scored ``batch_size`` images per call. Raises ``RuntimeError`` when the calls do not have these sizes."""
    method = detector.method
    n_views = int(detector.fit_info["n_train_images"])
    if detector._streams_fit():
        fit_sizes = _batches(n_views, getattr(detector, "chunk_views", CHUNK_VIEWS))
    else:
        fit_sizes = [n_views] * (1 + (method.synthesis == "cutpaste"))
    n_fit = len(fit_sizes) + bool(method.needs_auxiliary)  # the auxiliary set: one call, its own size
    eval_sizes = _batches(n_test, detector.batch_size)
    n_eval = len(eval_sizes)
    sizes = [c.n_images for c in calls]
    between = sizes[n_fit:len(sizes) - n_eval]
    cal_ok = (between == _batches(n_calibration, detector.batch_size) if n_calibration is not None
              else bool(between) and all(0 < n <= detector.batch_size for n in between))
    if (len(sizes) < n_fit + n_eval or sizes[:len(fit_sizes)] != fit_sizes
            or sizes[len(sizes) - n_eval:] != eval_sizes or not cal_ok):
        raise RuntimeError(f"fit_category's backbone calls ({sizes}) no longer match the "
                           "fit -> calibration -> evaluation order benchmarks.accuracy.phase_calls expects")
    return calls[:n_fit], calls[len(calls) - n_eval:]


def run_dataset(args, dataset: str, out: Path) -> list[dict]:
    """Every (method, k, seed) of one dataset; ``args`` already holds the dataset's settings."""
    data_dir = args.data if args.data else default_category_dir(dataset)
    if data_dir is None:
        raise SystemExit(f"no bundled data for {dataset!r}; pass --data")
    data_dir = str(data_dir)
    data = resolve_dataset(data_dir)
    device = resolve_device(args.device)
    raw = build_backbone(args.backbone, layers=ints(args.layers) if args.layers else None,
                         image_size=args.image_size).to(device)
    backbone = CachingBackbone(raw, enabled=not args.no_cache)
    test = data.test
    if not test:
        raise SystemExit(f"{dataset}: no test images to evaluate on")
    n = max(1, min(args.timing_images, len(test)))
    sample = test[::max(1, len(test) // n)][:n]  # spread over the test set's defect types
    backbone_ms = warm_backbone_ms(raw, args.batch_size, [load_image(s.path) for s in sample])
    n_bad = sum(s.label for s in test)
    print(f"{dataset}: {len(data.train)} train / {len(data.val)} val / {len(test)} test images ({n_bad} defective), "
          f"backbone {raw.spec()} on {device.type}: {backbone_ms:.1f} ms/image warm", flush=True)
    holdout = 0 if data.val else FitOptions.holdout
    methods = args.methods.split(",")
    rows = []
    all_shots = sorted({k for name in methods for k in shots_of(args, name)})
    all_seeds = sorted({seed for name in methods for seed in seeds_of(args, name)})
    for k in all_shots:
        for seed in all_seeds:
            seed_methods = [m for m in methods if seed in seeds_of(args, m) and k in shots_of(args, m)]
            if not seed_methods:
                continue
            if k == 0 and not all(build_method(m).needs_auxiliary for m in seed_methods):
                raise SystemExit("--shots/--method-shots 0 is for zero-shot methods only (spg)")
            k_fit = min(k, len(data.train) - holdout)
            if k_fit != k:
                print(f"{dataset}: k={k} leaves no held-out calibration images; fitting k={k_fit}", flush=True)
            for name in seed_methods:
                opts = fit_options(args, dataset, data_dir, name, k_fit, seed)
                first = len(backbone.calls)
                result = fit_category(opts, show_progress=False, backbone=backbone)
                det, ev = result.detector, result.evaluation
                fit_calls, eval_calls = phase_calls(backbone.calls[first:], det, len(test),
                                                    len(result.calibration))
                fit_s = honest_seconds(det.fit_info["fit_seconds"], fit_calls, backbone_ms)
                eval_s = ev.metrics["latency_ms_per_image"] * len(test) / 1000
                ms = honest_seconds(eval_s, eval_calls, backbone_ms) / len(test) * 1000
                used = split_calls(backbone.calls[first:])
                metrics = {m: v for m, v in ev.metrics.items() if m != "latency_ms_per_image"}
                row = {"dataset": dataset, "method": name, "k_shot": k_fit, "seed": seed,
                       "n_train_images": det.fit_info["n_train_images"], "fit_seconds": fit_s, "ms_per_image": ms,
                       "state_mib": state_mib(det.method), "threshold": det.threshold.value,
                       "calibration": result.calibration_source, "features_extracted": used["images"] - used["hits"],
                       "features_cached": used["hits"], "backbone_ms_warm": backbone_ms,
                       "cached_ms_per_image": ev.metrics["latency_ms_per_image"], **metrics}
                row.update(augment=args.augment, aug_count=args.aug_count,
                           layers=",".join(map(str, raw.spec()["layers"])), image_size=raw.image_size,
                           top_fraction=det.top_fraction)
                rows.append(row)
                print(f"{dataset} k={k_fit} seed={seed} {name:9s} img {metrics['image_auroc']:.4f} "
                      f"pix {metrics.get('pixel_auroc', float('nan')):.4f} pro {metrics.get('aupro', float('nan')):.4f} "
                      f"fit {fit_s:.1f}s {ms:.1f} ms/img (features: {row['features_extracted']} extracted, "
                      f"{row['features_cached']} from cache)", flush=True)
                if seed == seeds_of(args, name)[0] and not args.no_pictures:
                    folder = out / "pictures" / f"{dataset}-{name}-k{k_fit}"
                    save_report(folder, ev.samples, ev.scores, ev.maps, det.threshold.value, ev.masks,
                                n_examples=12, title=f"{dataset} {name} k={k_fit}")
                    row["pictures"] = str(folder)
                del result, det, ev
    return rows


def run(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for dataset in args.datasets.split(","):
        rows += run_dataset(dataset_args(args, dataset), dataset, Path(args.out))
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["method"], r["k_shot"]), []).append(r)
    out = []
    for (dataset, method, k), rs in groups.items():
        entry = {"dataset": dataset, "method": method, "k_shot": k, "seeds": len(rs)}
        for key in REPORTED:
            vals = [r.get(key, float("nan")) for r in rs]
            entry[key] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        out.append(entry)
    return out


def settings_note(args) -> str:
    """The settings of a run, one line (under the table)."""
    settings = "; ".join(
        f"{d}: blocks {own.layers or 'default'}, augment {own.augment} x{own.aug_count}, image score "
        f"{'top ' + format(own.top_fraction, 'g') if own.top_fraction is not None else 'the method default'}"
        for d in args.datasets.split(",") for own in [dataset_args(args, d)])
    per_method = "".join(f" ({what} per method: {value})" for what, value in
                         (("seeds", args.method_seeds), ("shots", args.method_shots)) if value != "{}")
    params = f"; method params {args.method_params}" if args.method_params != "{}" else ""
    cache = "no feature cache" if args.no_cache else f"warm backbone time on {args.timing_images} test images"
    return (f"Backbone {args.backbone} ({args.image_size or 'default'} px), device "
            f"{resolve_device(args.device).type}; {settings}; seeds {args.seeds}{per_method}{params}; {cache}.")


def markdown(summary: list[dict], args) -> str:
    head = ("| data | method | k | seeds | image AUROC | pixel AUROC | AUPRO@0.3 | image F1-max | fit s | ms/image "
            "| state MiB |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for e in summary:
        cells = [f"{e[k][0]:.4f} ± {e[k][1]:.4f}" for k in REPORTED[:4]]
        cells += [f"{e['fit_seconds'][0]:.1f}", f"{e['ms_per_image'][0]:.1f}", f"{e['state_mib'][0]:.2f}"]
        lines.append(f"| {e['dataset']} | {e['method']} | {e['k_shot']} | {e['seeds']} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n\n" + settings_note(args) + "\n"


def log_to_mlflow(rows: list[dict]) -> None:
    import mlflow

    from adreg.registry import tracking

    tracking.configure()
    exp = tracking.fit_experiment_id("benchmark")
    params = ("dataset", "method", "k_shot", "seed", "augment", "aug_count", "layers", "image_size", "top_fraction",
              "calibration")
    for r in rows:
        with mlflow.start_run(experiment_id=exp, run_name=f"{r['dataset']}-{r['method']}-k{r['k_shot']}-seed{r['seed']}"):
            mlflow.log_params({k: r[k] for k in params if k in r})
            mlflow.log_metrics({k: float(v) for k, v in r.items() if isinstance(v, (int, float)) and k not in params})
            if r.get("pictures"):
                mlflow.log_artifacts(r["pictures"], "report")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="bottle", help="comma list of bundled categories: bottle, mtd")
    p.add_argument("--data", help="a category folder instead of the bundled one (with a single dataset)")
    p.add_argument("--methods", default="subspace,rad,knn")
    p.add_argument("--method-params", default="{}", help='JSON per method, e.g. {"rad": {"radius": 2}}')
    p.add_argument("--shots", default="1")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--method-seeds", default="{}",
                   help='JSON: fewer seeds for costly methods, e.g. {"foundad": "0"} (CPU: 7 min per fit)')
    p.add_argument("--method-shots", default="{}", help='JSON: other shot counts per method, e.g. {"foundad": "1,8"}')
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--layers", help="comma list of backbone layers (default: the dataset's, see DATASET_SETTINGS)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--augment", help="augmentations of the shots (default: the dataset's)")
    p.add_argument("--aug-count", type=int, help="augmented copies per shot (default: the dataset's)")
    p.add_argument("--sigma", type=float, default=4.0)
    p.add_argument("--top-fraction", type=float, help="image score: mean of this top fraction of pixels "
                                                      "(default: the dataset's, else each method's own)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (as adreg fit)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--timing-images", type=int, default=16,
                   help="test images the warm backbone time is measured on (what a cached image counts)")
    p.add_argument("--out", default="bench-results")
    p.add_argument("--log-mlflow", action="store_true")
    p.add_argument("--no-cache", action="store_true", help="run the backbone on every image (no feature cache)")
    p.add_argument("--no-pictures", action="store_true")
    p.add_argument("--update-docs", action="store_true", help=f"write {DOCS.relative_to(DOCS.parents[1])}/accuracy.md")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = command_line("accuracy", argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = run(args)
    table = markdown(summarise(rows), args)
    machine = machine_line(resolve_device(args.device).type)
    write_results(out, rows, table, command, machine)
    if args.update_docs:
        path = write_page("accuracy", "Accuracy: methods x shots x seeds", ABOUT, table, command, machine=machine)
        print(f"wrote {path}")
    if args.log_mlflow:
        log_to_mlflow(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
