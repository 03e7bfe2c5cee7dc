"""Benchmark of ``adreg tune`` against the default fit and the space's oracle, on the untouched test split.

    python -m benchmarks tune --datasets bottle,mtd,elpv --seeds 0,1,2 --shots 8 --update-docs

Per dataset and seed, all through the product's API on a throwaway sqlite store:

* ``default``: ``adreg.api.fit`` with the product's defaults (what ``adreg fit`` does);
* ``tuned (synthetic)``: ``adreg.api.tune`` with the default space and budget; defects synthetic;
* ``tuned (25 labelled)``: ``adreg.api.tune`` with 25 defects drawn (seeded) from the test split as
  ``--evidence-dir``: those 25 are removed from the test split that every row is evaluated on;
* ``oracle``: the candidate of the synthetic search with the best test image AUROC (every fit at every
  aggregation, scored on the test split after the search: the benchmark's own evaluation, outside the timing);
* ``ensemble (synthetic)``: whether an ensemble candidate would pay. The best candidate of each method on the
  synthetic selection set, each score put on its candidate's normal scale (``(s - median) / IQR`` of the
  selection goods' scores), averaged over every pair and the triple; the ensemble with the best selection AUROC
  is scored on the test split. Computed from the candidates' own scores, no extra fit.

Reported: image / pixel AUROC of each, the tuned choice's regret to the oracle, Spearman's rank correlation
between selection and test image AUROC over all candidates, and the tune's wall time over one default fit's
(both measured in this run, uncached, the oracle's test scoring excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from adreg.data import default_category_dir, resolve_dataset
from benchmarks.harness import command_line, ints, machine_line, quiet, write_csv, write_page

TARGETS = {"mtd": {"synthetic": 0.85, "labelled": 0.88}, "elpv": {"synthetic": 0.95, "labelled": 0.95}}
ABOUT = (
    "Every row runs the product's API on a throwaway sqlite store: `default` is `adreg.api.fit` with the "
    "defaults; `tuned (synthetic)` is `adreg.api.tune` with the default space (`adreg.tuning.DEFAULT_SPACE`) and "
    "budget, its defects synthetic; `tuned (25 labelled)` gives the search 25 defects drawn from the test split "
    "(seeded) as `--evidence-dir`, removed from the test split every row is evaluated on. The `oracle` is the "
    "candidate of the synthetic search (any fit at any aggregation) with the best test image AUROC, scored on the "
    "test split by the benchmark after each candidate, outside the timing. `regret` = oracle - tuned test image "
    "AUROC. `rank corr.` = Spearman's correlation between selection and test image AUROC over every candidate fit "
    "at every aggregation. `time` = the synthetic tune's wall seconds (search, winner's fit, logging) over one "
    "default `adreg.api.fit`'s, both in the same run, each backbone pass real (the synthetic search writes its "
    "features to a disk cache; the labelled search, run second on the same shots, reads them, so its time is not "
    "reported).")


def _split_test(data, n_labelled: int, seed: int):
    """(25 labelled defects for the choice, the rest of the test split)."""
    defects = [s for s in data.test if s.label == 1]
    rng = random.Random(seed + 31)
    chosen = set(map(str, (s.path for s in rng.sample(defects, min(n_labelled, len(defects))))))
    return ([s for s in data.test if str(s.path) in chosen], [s for s in data.test if str(s.path) not in chosen])


def _link_folder(samples, root: Path) -> Path:
    """A labelled folder of symlinks (good/, <defect>/, masks as <stem>_mask.png beside each image)."""
    for s in samples:
        sub = root / ("good" if s.label == 0 else s.defect)
        sub.mkdir(parents=True, exist_ok=True)
        name = f"{s.defect}_{s.path.name}"
        (sub / name).symlink_to(Path(s.path).resolve())
        if s.mask_path is not None:
            (sub / f"{Path(name).stem}_mask.png").symlink_to(Path(s.mask_path).resolve())
    return root


def _test_metrics(det, samples, aggregation, top_fraction: float) -> dict:
    """Test image AUROC of a fitted candidate at each aggregation (and pixel AUROC, one map per image); its
    test image scores at ``top_fraction`` (``scores``)."""
    import torch

    from adreg.evaluation import evaluate
    from adreg.metrics import auroc
    from adreg.postprocess import image_scores

    ev = evaluate(det, samples, None, show_progress=False)
    labels = np.array([s.label for s in samples])
    t = torch.from_numpy(ev.maps)
    out = {f"image_auroc@{tf}": float(auroc(labels, image_scores(t, tf).numpy())) for tf in aggregation}
    out["scores"] = image_scores(t, top_fraction).numpy()
    if "pixel_auroc" in ev.metrics:
        out["pixel_auroc"] = float(ev.metrics["pixel_auroc"])
    return out


def run_one(dataset: str, seed: int, shots: int, work: Path, n_labelled: int) -> tuple[list[dict], list[dict]]:
    import mlflow

    from adreg import api
    from adreg.tuning import DEFAULT_SPACE

    root = default_category_dir(dataset)
    data = resolve_dataset(root)
    labelled, test = _split_test(data, n_labelled, seed)
    case = work / f"{dataset}-{seed}"
    test_dir = _link_folder(test, case / "test")
    evidence_dir = _link_folder(labelled, case / "evidence")
    store = f"sqlite:///{case / 'mlflow.db'}"
    os.environ["ADREG_HOME"] = str(case / "home")
    mlflow.set_tracking_uri(store)
    common = dict(train_dir=str(root), test_dir=str(test_dir), k_shot=shots, seed=seed, tracking_uri=store,
                  show_progress=False)
    rows = []

    t0 = time.perf_counter()
    fit = api.fit(dataset, **common)
    fit_s = time.perf_counter() - t0
    rows.append({"dataset": dataset, "seed": seed, "variant": "default", "seconds": fit_s,
                 **{k: fit.metrics.get(k) for k in ("image_auroc", "pixel_auroc")}, "choice": "defaults"})

    aggregation = DEFAULT_SPACE["aggregation"]
    cands: list[dict] = []
    scored_fits: list[dict] = []  # complete candidates: selection and test image scores at their aggregation
    oracle_s = [0.0]

    def on_candidate(cand, det):
        if det is None or cand.state == "failed":
            return
        t = time.perf_counter()
        m = _test_metrics(det, test, aggregation, cand.settings.get("top_fraction", det.top_fraction))
        if cand.state == "complete" and cand.scores is not None:
            scored_fits.append({"method": cand.settings.get("method"), "label": cand.label, "value": cand.value,
                                "selection": np.asarray(cand.scores), "test": m["scores"]})
        oracle_s[0] += time.perf_counter() - t
        for tf in aggregation:
            cands.append({"dataset": dataset, "seed": seed, "number": cand.number, "candidate": cand.label,
                          "state": cand.state, "top_fraction": tf,
                          "selection_image_auroc": cand.by_aggregation.get(str(tf)),
                          "test_image_auroc": m[f"image_auroc@{tf}"], "test_pixel_auroc": m.get("pixel_auroc")})

    ensemble = None
    cache = str(case / "features")  # the labelled search fits the same candidates: their features on disk
    for variant, extra in (("tuned (synthetic)", {"on_candidate": on_candidate, "feature_cache": cache}),
                           ("tuned (25 labelled)", {"evidence_dir": str(evidence_dir), "feature_cache": cache})):
        oracle_s[0] = 0.0
        t0 = time.perf_counter()
        out = api.tune(dataset, **common, **extra)
        seconds = time.perf_counter() - t0 - oracle_s[0]
        if variant == "tuned (synthetic)":
            ensemble = _ensemble(scored_fits, out.search.evidence["labels"], [s.label for s in test])
        m = out.fit.metrics
        rows.append({"dataset": dataset, "seed": seed, "variant": variant, "seconds": seconds,
                     "image_auroc": m.get("image_auroc"), "pixel_auroc": m.get("pixel_auroc"),
                     "choice": f"{out.search.chosen.label} / top {out.chosen.get('top_fraction')}"
                     if out.search.chosen else f"defaults ({out.fallback})",
                     "evidence": out.search.evidence["kind"], "n_candidates": len(out.search.candidates)})
    if ensemble is not None:
        rows.append({"dataset": dataset, "seed": seed, "variant": "ensemble (synthetic)", **ensemble})
    scored = [c for c in cands if c["selection_image_auroc"] is not None]
    best = max(cands, key=lambda c: c["test_image_auroc"])
    rows.append({"dataset": dataset, "seed": seed, "variant": "oracle", "image_auroc": best["test_image_auroc"],
                 "pixel_auroc": best["test_pixel_auroc"], "choice": f"{best['candidate']} / top {best['top_fraction']}"})
    if len(scored) > 2:
        from scipy.stats import spearmanr

        rho = spearmanr([c["selection_image_auroc"] for c in scored], [c["test_image_auroc"] for c in scored])
        rows[-1]["rank_corr"] = float(rho.statistic)
    return rows, cands


def _normal_scale(scores: np.ndarray, goods: np.ndarray) -> np.ndarray:
    """Scores on one candidate's normal scale: (s - median) / IQR of its selection goods' scores."""
    q25, q50, q75 = np.percentile(goods, [25, 50, 75])
    return (scores - q50) / max(q75 - q25, 1e-12)


def _ensemble(fits: list[dict], selection_labels: list[int], test_labels: list[int]) -> dict | None:
    """The best candidate of each method, combined (mean on each one's normal scale) in every pair and the
    triple; the combination with the best selection AUROC, its test AUROC, and whether the selection set would
    prefer it to the best single candidate."""
    from itertools import combinations

    from adreg.metrics import auroc

    y_sel, y_test = np.asarray(selection_labels), np.asarray(test_labels)
    best: dict[str, dict] = {}
    for f in fits:
        if f["method"] not in best or f["value"] > best[f["method"]]["value"]:
            best[f["method"]] = f
    if len(best) < 2:
        return None
    single = max(best.values(), key=lambda f: f["value"])
    combos = []
    for k in range(2, len(best) + 1):
        for group in combinations(sorted(best), k):
            parts = [best[m] for m in group]
            goods = [p["selection"][y_sel == 0] for p in parts]
            sel = np.mean([_normal_scale(p["selection"], g) for p, g in zip(parts, goods)], axis=0)
            tst = np.mean([_normal_scale(p["test"], g) for p, g in zip(parts, goods)], axis=0)
            combos.append({"group": "+".join(group), "selection": float(auroc(y_sel, sel)),
                           "test": float(auroc(y_test, tst))})
    top = max(combos, key=lambda c: c["selection"])
    return {"image_auroc": top["test"], "choice": f"{top['group']} (selection {top['selection']:.3f} vs best "
            f"single {single['value']:.3f}: {'ensemble' if top['selection'] > single['value'] else 'single'} chosen)",
            "selection_auroc": top["selection"], "single_selection_auroc": single["value"],
            "single_test_auroc": float(auroc(y_test, single["test"]))}


def _mean(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def summarise(rows: list[dict], timing: bool = True) -> str:
    out = []
    variants = ["default", "tuned (synthetic)", "tuned (25 labelled)", "oracle", "ensemble (synthetic)"]
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == ds]
        seeds = sorted({r["seed"] for r in rs})
        fit_s = {r["seed"]: r["seconds"] for r in rs if r["variant"] == "default"}
        oracle = {r["seed"]: r["image_auroc"] for r in rs if r["variant"] == "oracle"}
        out.append(f"\n## {ds} (8 shots, seeds {', '.join(map(str, seeds))})\n")
        out.append("| variant | image AUROC | pixel AUROC | regret to oracle | time vs one fit | choices |")
        out.append("|---|---|---|---|---|---|")
        for v in variants:
            vr = [r for r in rs if r["variant"] == v]
            regret = [oracle[r["seed"]] - r["image_auroc"] for r in vr] if v.startswith("tuned") else []
            ratio = [r["seconds"] / fit_s[r["seed"]] for r in vr] if v == "tuned (synthetic)" and timing else []
            out.append(f"| {v} | {_mean([r['image_auroc'] for r in vr])} | {_mean([r.get('pixel_auroc') for r in vr])} "
                       f"| {_mean(regret)} | {(_mean(ratio) + 'x') if ratio else ''} "
                       f"| {'; '.join(str(r.get('choice', '')) for r in vr)} |")
        corr = [r.get("rank_corr") for r in rs if r["variant"] == "oracle"]
        out.append(f"\nRank correlation, selection vs test image AUROC (synthetic evidence): {_mean(corr)}.")
    return "\n".join(out)


def judge(rows: list[dict], timing: bool = True) -> str:
    lines = ["\n## Targets\n", "| target | figure | |", "|---|---|---|"]

    def mean(ds, v, key="image_auroc"):
        vals = [r[key] for r in rows if r["dataset"] == ds and r["variant"] == v and r.get(key) is not None]
        return statistics.mean(vals) if vals else None

    regrets, ratios = [], []
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        d = mean(ds, "default")
        for v in ("tuned (synthetic)", "tuned (25 labelled)"):
            t = mean(ds, v)
            if d is not None and t is not None:
                ok = t >= d - 0.005
                lines.append(f"| {ds}: {v} >= default - 0.005 | {t:.3f} vs {d:.3f} | {'met' if ok else 'missed'} |")
        for kind, v in (("synthetic", "tuned (synthetic)"), ("labelled", "tuned (25 labelled)")):
            goal = TARGETS.get(ds, {}).get(kind)
            t = mean(ds, v)
            if goal is not None and t is not None:
                lines.append(f"| {ds}: {v} >= {goal} | {t:.3f} | {'met' if t >= goal else f'missed by {goal - t:.3f}'} |")
        fit_s = {r["seed"]: r["seconds"] for r in rows if r["dataset"] == ds and r["variant"] == "default"}
        oracle = {r["seed"]: r["image_auroc"] for r in rows if r["dataset"] == ds and r["variant"] == "oracle"}
        for r in rows:
            if r["dataset"] == ds and r["variant"].startswith("tuned"):
                regrets.append(oracle[r["seed"]] - r["image_auroc"])
                if r["variant"] == "tuned (synthetic)" and timing:
                    ratios.append(r["seconds"] / fit_s[r["seed"]])
    if regrets:
        m = statistics.mean(regrets)
        lines.append(f"| mean regret to the oracle <= 0.02 | {m:.3f} | {'met' if m <= 0.02 else f'missed by {m - 0.02:.3f}'} |")
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        e, t = mean(ds, "ensemble (synthetic)"), mean(ds, "tuned (synthetic)")
        if e is not None and t is not None:
            lines.append(f"| {ds}: an ensemble candidate pays (ensemble > tuned single, synthetic evidence) "
                         f"| {e:.3f} vs {t:.3f} | {'yes' if e > t + 0.005 else 'no'} |")
    if ratios:
        worst = max(ratios)
        lines.append(f"| tune <= 10x one fit (worst case) | {worst:.1f}x | {'met' if worst <= 10 else 'missed'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="bottle,mtd,elpv")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--labelled", type=int, default=25)
    p.add_argument("--out", default="benchmark-results/tune")
    p.add_argument("--merge", action="append", default=[], help="rows of an earlier run (results.csv) to add")
    p.add_argument("--update-docs", action="store_true")
    p.add_argument("--no-timing", action="store_true",
                   help="leave the time column and target out (rows measured while the machine ran other work)")
    args = p.parse_args(argv)
    quiet()
    out = Path(args.out)
    rows, cands = [], []
    for path in args.merge:
        import csv

        with open(path) as f:
            for r in csv.DictReader(f):
                rows.append({k: (float(v) if k in ("image_auroc", "pixel_auroc", "seconds", "rank_corr") and v != ""
                                 else (int(v) if k == "seed" else (None if v == "" else v))) for k, v in r.items()})
    with tempfile.TemporaryDirectory(prefix="adreg-tune-bench-") as tmp:
        for ds in [d for d in args.datasets.split(",") if d]:
            for seed in ints(args.seeds):
                r, c = run_one(ds, seed, args.shots, Path(tmp), args.labelled)
                rows += r
                cands += c
                write_csv(out / "results.csv", rows)
                write_csv(out / f"candidates-{ds}-{seed}.csv", c)
                print(json.dumps(r, default=str), flush=True)
    body = summarise(rows, not args.no_timing) + "\n" + judge(rows, not args.no_timing)
    print(body)
    if args.update_docs:
        path = write_page("tune", "Tuning: the chosen detector against the default and the oracle", ABOUT, body,
                          command_line("tune", argv), machine=machine_line())
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
