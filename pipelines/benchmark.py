"""Benchmark methods x shots x seeds on real categories, one backbone, all in one run.

    python -m pipelines.benchmark --datasets bottle,mtd --methods subspace,rad,knn --shots 1,2,4,8

Backbone features of a test set are extracted once and shared by every method and seed (they do
not depend on either); shot features once per (k, seed), shared by the methods; both are cached on
disk (adreg.feature_cache), so a re-run skips the backbone. Per-image latency is measured backbone time
+ the method's scoring + post-processing. Writes results.csv, results.md and report pictures (seed 0)
to --out, logs one MLflow run per (dataset, method, k, seed) with --log-mlflow (pictures as artifacts),
and rewrites the README's benchmark table with --update-readme.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from adreg.augment import augment_shots, parse_augmentations
from adreg.backbones import build_backbone
from adreg.data import default_category_dir, load_mask, resolve_dataset, split_shots
from adreg.detector import load_auxiliary, synthesize_cutpaste
from adreg.feature_cache import cached_features
from adreg.images import load_image
from adreg.methods import build_method
from adreg.metrics import evaluate_scores
from adreg.postprocess import anomaly_maps, image_scores
from adreg.reports import save_report

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"
# How each bundled dataset is benchmarked unless a flag overrides it (the README says what each choice
# bought): bottle is photographed top-down, so any rotation is a normal view; magnetic tiles have vertical
# grinding streaks (flips only), and their defects cover far less than 1% of a tile (deeper blocks, top 0.1%).
DATASET_SETTINGS = {
    "bottle": {"augment": "rotate", "aug_count": 30, "layers": None, "top_fraction": None},
    "mtd": {"augment": "hflip,vflip", "aug_count": 8, "layers": "7,10", "top_fraction": 0.001},
}
GENERIC_SETTINGS = DATASET_SETTINGS["bottle"]
REPORTED = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "fit_seconds", "ms_per_image", "state_mib"]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def dataset_args(args: argparse.Namespace, dataset: str) -> argparse.Namespace:
    """``args`` with the dataset's own settings filled in wherever no flag was given."""
    own = DATASET_SETTINGS.get(dataset, GENERIC_SETTINGS)
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in own.items() if getattr(args, k) is None}})


def seeds_of(args: argparse.Namespace, method: str) -> list[int]:
    """The seeds ``method`` runs with: --seeds, or its own list from --method-seeds."""
    own = json.loads(args.method_seeds).get(method)
    return _ints(str(own)) if own is not None else _ints(args.seeds)


def shots_of(args: argparse.Namespace, method: str) -> list[int]:
    """The shot counts ``method`` runs with: its own list from --method-shots, else 0 for a zero-shot
    method (it never sees the target's images, so one row says it all), else --shots."""
    own = json.loads(args.method_shots).get(method)
    if own is not None:
        return _ints(str(own))
    return [0] if build_method(method).needs_auxiliary else _ints(args.shots)


def extraction_seconds(started: float, hit: bool, n_images: int, backbone_ms: float) -> float:
    """Backbone seconds for ``n_images``: measured, or on a cache hit estimated from the measured
    per-image time, so ``fit s`` means the same whether or not the features came from the cache."""
    return n_images * backbone_ms / 1000 if hit else time.perf_counter() - started


def score_features(method, feats, size: int, sigma: float, top: float, batch: int = 8):
    """Image scores and maps of pre-extracted features, batched like the detector does."""
    scores, maps = [], []
    for start in range(0, len(feats), batch):
        m = anomaly_maps(method.score_patches(feats[start:start + batch]), size, sigma)
        scores.append(image_scores(m, top))
        maps.append(m)
    return torch.cat(scores).numpy(), torch.cat(maps).numpy()


def state_mib(method) -> float:
    return sum(t.numel() * t.element_size() for t in method.state_tensors().values()) / 2 ** 20


def run_dataset(args, dataset: str, backbone, out: Path) -> list[dict]:
    """Every (method, k, seed) of one dataset; ``args`` already holds the dataset's settings."""
    data_dir = args.data if args.data else default_category_dir(dataset)
    if data_dir is None:
        raise SystemExit(f"no bundled data for {dataset!r}; pass --data")
    data = resolve_dataset(data_dir)
    size = backbone.image_size
    test = data.test
    labels = np.array([s.label for s in test])
    masks = np.stack([load_mask(s, (size, size)) for s in test])
    t0 = time.perf_counter()
    test_feats, hit = cached_features(backbone, [s.path for s in test], lambda: [load_image(s.path) for s in test],
                                      {"kind": "test"}, args.batch_size, not args.no_cache)
    if hit:  # time the backbone on a sample so latency is real even on a cache hit
        t0 = time.perf_counter()
        backbone.extract([load_image(s.path) for s in test[:16]], args.batch_size)
        backbone_ms = (time.perf_counter() - t0) / min(16, len(test)) * 1000
    else:
        backbone_ms = (time.perf_counter() - t0) / len(test) * 1000
    print(f"{dataset}: {len(data.train)} train / {len(test)} test images ({labels.sum()} defective), "
          f"backbone {backbone.spec()} {backbone_ms:.1f} ms/image (cache {'hit' if hit else 'miss'})", flush=True)
    kinds = parse_augmentations(args.augment)
    methods = args.methods.split(",")
    zero_shot: dict = {}
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
            shots = split_shots(data.train, min(k, len(data.train)), seed, 0)[0] if k else []
            derivation = {"augment": list(kinds), "aug_count": args.aug_count, "seed": seed}
            views: list = []

            def make_views(shots=shots, seed=seed, views=views):
                """The augmented shots, built once even when the CutPaste features need them too."""
                if not views:
                    views.extend(augment_shots([load_image(p) for p in shots], kinds, args.aug_count, seed))
                return views
            n_views = len(shots) * (1 + args.aug_count if kinds else 1)
            train_feats, feature_s = None, 0.0  # zero-shot methods learn from their auxiliary dataset only
            if shots:
                t0 = time.perf_counter()
                train_feats, shots_hit = cached_features(backbone, shots, make_views, derivation, args.batch_size,
                                                         not args.no_cache)
                feature_s = extraction_seconds(t0, shots_hit, n_views, backbone_ms)
            synthetic, synthetic_s = None, 0.0
            if any(build_method(m).synthesis == "cutpaste" for m in seed_methods):
                t0 = time.perf_counter()
                synthetic, synthetic_hit = cached_features(
                    backbone, shots, lambda seed=seed: synthesize_cutpaste(make_views(), seed),
                    {**derivation, "synthesis": "cutpaste"}, args.batch_size, not args.no_cache)
                synthetic_s = extraction_seconds(t0, synthetic_hit, n_views, backbone_ms)
            for name in seed_methods:
                params = json.loads(args.method_params).get(name, {})
                method = build_method(name, **params)
                if method.needs_auxiliary:  # zero-shot: learned on the other dataset, once per seed
                    params = {"aux": "mtd" if dataset != "mtd" else "bottle", "seed": seed, **params}
                    method = build_method(name, **params)
                torch.manual_seed(seed)
                t1 = time.perf_counter()
                key = (name, seed, json.dumps(params, sort_keys=True))
                if method.needs_auxiliary and key in zero_shot:
                    method, fit_s = zero_shot[key]
                else:
                    auxiliary = None
                    if method.needs_auxiliary:
                        auxiliary = load_auxiliary(params["aux"], backbone, args.batch_size, False)
                    method.fit(train_feats, synthetic=synthetic if method.synthesis else None, auxiliary=auxiliary)
                    own_s = 0.0 if method.needs_auxiliary else feature_s + (synthetic_s if method.synthesis else 0)
                    fit_s = own_s + time.perf_counter() - t1
                    if method.needs_auxiliary:
                        zero_shot[key] = (method, fit_s)
                top = args.top_fraction if args.top_fraction is not None else method.default_top_fraction
                t2 = time.perf_counter()
                scores, maps = score_features(method, test_feats, size, args.sigma, top)
                method_ms = (time.perf_counter() - t2) / len(test) * 1000
                metrics = evaluate_scores(labels, scores, masks, maps)
                row = {"dataset": dataset, "method": name, "k_shot": k, "seed": seed,
                       "n_train_images": n_views, "fit_seconds": fit_s,
                       "ms_per_image": backbone_ms + method_ms, "state_mib": state_mib(method), **metrics}
                layers = ",".join(map(str, backbone.spec()["layers"]))
                row.update(augment=args.augment, aug_count=args.aug_count, layers=layers, image_size=size,
                           top_fraction=top)
                rows.append(row)
                print(f"{dataset} k={k} seed={seed} {name:9s} img {metrics['image_auroc']:.4f} "
                      f"pix {metrics['pixel_auroc']:.4f} pro {metrics['aupro']:.4f} fit {fit_s:.1f}s "
                      f"{row['ms_per_image']:.1f} ms/img", flush=True)
                if seed == seeds_of(args, name)[0] and not args.no_pictures:
                    folder = out / "pictures" / f"{dataset}-{name}-k{k}"
                    mask_of = {i: masks[i] for i in range(len(test)) if test[i].label == 1}
                    save_report(folder, test, scores, maps, None, mask_of, n_examples=12,
                                title=f"{dataset} {name} k={k}")
                    row["pictures"] = str(folder)
    return rows


def run(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for dataset in args.datasets.split(","):
        own = dataset_args(args, dataset)
        backbone = build_backbone(args.backbone, layers=_ints(own.layers) if own.layers else None,
                                  image_size=args.image_size)
        rows += run_dataset(own, dataset, backbone, Path(args.out))
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["method"], r["k_shot"]), []).append(r)
    out = []
    for (dataset, method, k), rs in groups.items():
        entry = {"dataset": dataset, "method": method, "k_shot": k, "seeds": len(rs)}
        for key in REPORTED:
            vals = [r[key] for r in rs]
            entry[key] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        out.append(entry)
    return out


def markdown(summary: list[dict], args) -> str:
    head = ("| data | method | k | seeds | image AUROC | pixel AUROC | AUPRO@0.3 | image F1-max | fit s | ms/image "
            "| state MiB |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for e in summary:
        cells = [f"{e[k][0]:.4f} ± {e[k][1]:.4f}" for k in REPORTED[:4]]
        cells += [f"{e['fit_seconds'][0]:.1f}", f"{e['ms_per_image'][0]:.1f}", f"{e['state_mib'][0]:.2f}"]
        lines.append(f"| {e['dataset']} | {e['method']} | {e['k_shot']} | {e['seeds']} | " + " | ".join(cells) + " |")
    settings = "; ".join(
        f"{d}: blocks {own.layers or 'default'}, augment {own.augment} x{own.aug_count}, image score "
        f"{'top ' + format(own.top_fraction, 'g') if own.top_fraction is not None else 'the method default'}"
        for d in args.datasets.split(",") for own in [dataset_args(args, d)])
    per_method = "".join(f" ({what} per method: {value})" for what, value in
                         (("seeds", args.method_seeds), ("shots", args.method_shots)) if value != "{}")
    note = (f"\nBackbone {args.backbone} ({args.image_size or 'default'} px); {settings}; seeds {args.seeds}"
            f"{per_method}; {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}, device cpu. "
            f"Command: `python -m pipelines.benchmark {shlex.join(sys.argv[1:])}`\n")
    return head + "\n".join(lines) + "\n" + note


def log_to_mlflow(rows: list[dict]) -> None:
    import mlflow

    from adreg.registry import tracking

    tracking.configure()
    exp = tracking.experiment_id("benchmark")
    params = ("dataset", "method", "k_shot", "seed", "augment", "aug_count", "layers", "image_size", "top_fraction")
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
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="bench-results")
    p.add_argument("--log-mlflow", action="store_true")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--no-pictures", action="store_true")
    p.add_argument("--update-readme", action="store_true")
    return p


def write_readme_section(table: str, start: str, end: str, readme: Path | None = None) -> None:
    """Replace what stands between the ``start`` and ``end`` markers of the README with ``table``
    (nothing happens when the markers are missing). Shared by every benchmark's ``--update-readme``."""
    readme = readme or README
    text = readme.read_text()
    if start in text and end in text:
        pre, rest = text.split(start, 1)
        readme.write_text(pre + start + "\n" + table + end + rest.split(end, 1)[1])


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows as a CSV with the union of their keys as columns (sorted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)


def write_results(out: Path, rows: list[dict], table: str, markers: tuple[str, str] | None,
                  readme: Path | None = None) -> None:
    """A benchmark's outputs: ``out``/results.csv (the rows), results.md (the table), the table printed, and
    with ``markers`` (``--update-readme``) the README section between them replaced by the table."""
    write_csv(out / "results.csv", rows)
    (out / "results.md").write_text(table)
    print("\n" + table)
    if markers:
        write_readme_section(table, *markers, readme)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = run(args)
    table = markdown(summarise(rows), args)
    write_results(out, rows, table, (START, END) if args.update_readme else None)
    if args.log_mlflow:
        log_to_mlflow(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
