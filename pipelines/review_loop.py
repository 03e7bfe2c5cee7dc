"""Review-loop benchmark: capture -> review -> update + threshold from the line, round after round, on MTD.

    python -m pipelines.review_loop --rounds 3 --budget 50 --seeds 0 --out bench-results/review-loop --update-docs

The product path throughout, in a temporary sqlite store: ``adreg.fit`` (8-shot RAD, the README's MTD
settings: blocks 7+10, flips x8, top 0.1%), then per round

1. **the line**: the next ``--line`` images of a stream (the seeded MTD split's training goods that are not
   shots, mixed with half of the defective tiles, ``--defect-rate`` of the stream) are scored by the current
   version and written into a capture folder with the sidecars ``adreg serve --capture`` writes;
2. **review**: a budget of ``--budget`` images in the review queue's order (``adreg.review.queue``: flagged
   first, newest first, then a seeded sample, ``--sample-rate``, of the passed ones) is labelled by a simulated reviewer
   who knows the truth (the dataset's labels; a defect's region is its ground-truth mask) through
   ``adreg.label``, the records every reviewer writes;
3. **update + threshold**: ``adreg.update(from_reviews=True)`` grows the version with the reviewed goods on the
   grow side of the seeded split (false alarms included), then ``adreg.threshold`` sets the threshold on the
   production set once it holds 10 reviewed defects and 20 evaluation-side goods.

The control arm grows the same starting version with the same number of goods per round, drawn at random
from the same line images (``adreg.update(add_good=...)``), threshold as the update sets it.

Measured after every round on a fixed evaluation set the loop never sees (the split's 100 test goods and the
other half of the defective tiles): image AUROC, the false-alarm rate at 90% recall (the share of good tiles
scored at or above the score that catches 90% of the defects; threshold-free) and the false-alarm rate and
recall at the version's own threshold. Target (issue #25): after 3 rounds of 50 reviews the false-alarm rate
at 90% recall is at most half the 8-shot model's.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "review-loop.md"
FIT = dict(method="rad", k_shot=8, layers=[7, 10], augment="hflip,vflip", aug_count=8, top_fraction=0.001,
           holdout=20, device="cpu")


def far_at_recall(scores: np.ndarray, labels: np.ndarray, recall: float = 0.9) -> float:
    """Share of good images scored at or above the score that catches ``recall`` of the defective ones."""
    bad = np.sort(scores[labels == 1])[::-1]
    at = bad[max(int(math.ceil(recall * len(bad))) - 1, 0)]
    return float((scores[labels == 0] >= at).mean())


def measure(detector, samples) -> dict:
    from adreg.evaluation import evaluate

    ev = evaluate(detector, samples, detector.threshold.value, show_progress=False)
    labels = np.array([s.label for s in samples])
    return {"image_auroc": ev.metrics["image_auroc"], "far_at_90_recall": far_at_recall(ev.scores, labels),
            "far_at_threshold": ev.metrics["test_false_alarm_rate"],
            "recall_at_threshold": ev.metrics["test_recall"]}


def capture(detector, version: str, paths: list[Path], root: Path, start: int) -> list[tuple[Path, Path, bool]]:
    """Score ``paths`` with the version and write them as captures; returns (capture, original, flagged)."""
    from adreg.images import load_image

    out = []
    for i, p in enumerate(paths):
        score = float(detector.predict([load_image(p)]).scores[0])
        flagged = score > detector.threshold.value
        n = start + i
        folder = root / "mtd" / ("flagged" if flagged else "ok") / "20261201"
        folder.mkdir(parents=True, exist_ok=True)
        dst = folder / f"{n // 3600:02d}{n // 60 % 60:02d}{n % 60:02d}-{n:06d}-v{version}-{n:04x}{p.suffix.lower()}"
        shutil.copyfile(p, dst)
        dst.with_suffix(".json").write_text(json.dumps({
            "score": score, "threshold": detector.threshold.value, "is_anomaly": flagged, "model": "adreg-mtd",
            "version": version, "alias": "production", "at": f"2026-12-01T{n // 3600 % 24:02d}:{n // 60 % 60:02d}:"
                                                              f"{n % 60:02d}+00:00"}))
        out.append((dst, p, flagged))
    return out


def has_region(sample) -> bool:
    """Whether a defect's ground-truth mask marks anything (4 MT_Uneven masks are empty)."""
    from PIL import Image

    return sample.mask_path is not None and bool((np.asarray(Image.open(sample.mask_path).convert("L")) > 127).any())


def review_order(capture_dir: Path, captured, done: set, budget: int, sample_rate: float, seed: int) -> list:
    """The next ``budget`` captures not yet reviewed, in the review page's order (``adreg.review.queue``:
    flagged newest first, then the seeded sample of the passed ones)."""
    from adreg.review.queue import ReviewQueue

    by_path = {str(c[0].resolve()): c for c in captured}
    queue, _ = ReviewQueue(capture_dir, "mtd", sample_rate=sample_rate, seed=seed).entries()
    return [by_path[str(e.path)] for e in queue if str(e.path) in by_path and str(e.path) not in done][:budget]


def run_seed(seed: int, rounds: int, budget: int, line: int, defect_rate: float, sample_rate: float,
             work: Path) -> list[dict]:
    import adreg
    from adreg.data import mtd_split, default_category_dir

    data = mtd_split(default_category_dir("mtd"))
    rng = random.Random(seed)
    goods = list(data.train)
    rng.shuffle(goods)
    shots_dir = work / "goods"
    shots_dir.mkdir()
    for p in goods[:28]:  # 8 shots + 20 held out to calibrate, as a user with 28 good tiles fits
        os.symlink(p, shots_dir / p.name)
    defects = [s for s in data.test if s.label == 1]
    rng.shuffle(defects)
    line_defects, eval_defects = defects[::2], defects[1::2]
    evaluation = [s for s in data.test if s.label == 0] + eval_defects
    stream, pool_goods, pool_defects = [], goods[28:], [s.path for s in line_defects]
    for _ in range(rounds * line):
        take_defect = pool_defects and rng.random() < defect_rate
        stream.append(pool_defects.pop() if take_defect else pool_goods.pop())
    truth = {s.path: s for s in line_defects}
    uri = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["ADREG_HOME"] = str(work / "home")
    t0 = time.perf_counter()
    fit = adreg.fit("mtd", train_dir=str(shots_dir), seed=seed, register=True, tracking_uri=uri,
                    show_progress=False, **FIT)
    rows = [{"seed": seed, "arm": "both", "round": 0, "reviewed": 0, "goods_added": 0, "defects_reviewed": 0,
             "version": fit.version, "seconds": time.perf_counter() - t0, **measure(fit.detector, evaluation)}]
    print(json.dumps(rows[-1]), flush=True)
    loop_v, random_v = str(fit.version), str(fit.version)
    reviewed_total = defects_total = 0
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        det = adreg.load("mtd", version=loop_v, device="cpu", tracking_uri=uri)
        batch = stream[(r - 1) * line:r * line]
        captured = capture(det, loop_v, batch, work / "capture", (r - 1) * line)
        for cap, orig, _ in review_order(work / "capture", captured, set(), budget, sample_rate, seed):
            s = truth.get(orig)
            if s is None:
                adreg.label("mtd", cap, "good", reviewer="sim", tracking_uri=uri)
            else:
                adreg.label("mtd", cap, "defect", mask=str(s.mask_path) if has_region(s) else None, reviewer="sim",
                            tracking_uri=uri)
                defects_total += 1
            reviewed_total += 1
        up = adreg.update("mtd", from_reviews=True, from_version=loop_v, register=True, device="cpu",
                          tracking_uri=uri, show_progress=False)
        loop_v, grown = str(up.version), len(up.result.added) + len(up.result.calibration_images)
        rule = "update"
        try:
            th = adreg.threshold("mtd", from_version=loop_v, tracking_uri=uri, device="cpu")
            loop_v, rule = str(th.version), "threshold from the line"
        except adreg.errors.DataError as exc:
            print(f"round {r}: no threshold from the line yet ({exc})", flush=True)
        det = adreg.load("mtd", version=loop_v, device="cpu", tracking_uri=uri)
        rows.append({"seed": seed, "arm": "review loop", "round": r, "reviewed": reviewed_total,
                     "goods_added": grown, "defects_reviewed": defects_total, "version": loop_v, "rule": rule,
                     "seconds": time.perf_counter() - t0, **measure(det, evaluation)})
        print(json.dumps(rows[-1]), flush=True)

        t0 = time.perf_counter()
        pick = [p for p in batch if p not in truth]
        random.Random(seed * 1000 + r).shuffle(pick)
        folder = work / f"random-{r}"
        folder.mkdir()
        for p in pick[:grown]:
            os.symlink(p, folder / p.name)
        up = adreg.update("mtd", str(folder), from_version=random_v, register=True, device="cpu", tracking_uri=uri,
                          show_progress=False)
        random_v = str(up.version)
        det = adreg.load("mtd", version=random_v, device="cpu", tracking_uri=uri)
        rows.append({"seed": seed, "arm": "random goods", "round": r, "reviewed": 0, "goods_added": grown,
                     "defects_reviewed": 0, "version": random_v, "rule": "update",
                     "seconds": time.perf_counter() - t0, **measure(det, evaluation)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def page(rows: list[dict], args, seconds: float) -> str:
    def agg(arm, r, key):
        vals = [x[key] for x in rows if x["round"] == r and x["arm"] in (arm, "both")]
        if not vals:
            return ""
        mean = statistics.mean(vals)
        return f"{mean:.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "")

    seeds = sorted({x["seed"] for x in rows})
    lines = ["# Review-loop benchmark", "",
             "What reviewing the line's captures buys on a hard product: MTD, 8-shot RAD grown by rounds of "
             "capture -> review -> `adreg update --from-reviews` + `adreg threshold`, against growing the same "
             "version with the same number of random goods. Everything goes through the product's API in a "
             "sqlite store (see `pipelines/review_loop.py` for the protocol).", "",
             f"Command: `python -m pipelines.review_loop --rounds {args.rounds} --budget {args.budget} --line "
             f"{args.line} --defect-rate {args.defect_rate} --sample-rate {args.sample_rate} --seeds {','.join(map(str, seeds))} --update-docs`; "
             f"2-core CPU, no GPU; {date.today().isoformat()}; {seconds / 60:.0f} min.", "",
             f"Evaluation set (never reviewed): the split's 100 test goods + half of the 392 defective tiles. "
             f"Line: {args.line} images per round, {args.defect_rate:.0%} defective (the other half of the "
             f"defects). Review budget: {args.budget} images per round, flagged first.", "",
             "| round | arm | reviewed | goods added | image AUROC | false alarms at 90% recall | false alarms at "
             "threshold | recall at threshold |", "|---|---|---|---|---|---|---|---|"]
    for r in range(args.rounds + 1):
        for arm in (("both",) if r == 0 else ("review loop", "random goods")):
            sel = [x for x in rows if x["round"] == r and x["arm"] == arm]
            if not sel:
                continue
            name = "8-shot fit" if r == 0 else arm
            lines.append(f"| {r} | {name} | {round(statistics.mean(x['reviewed'] for x in sel))} | "
                         f"{round(statistics.mean(x['goods_added'] for x in sel))} | "
                         f"{agg(arm, r, 'image_auroc')} | {agg(arm, r, 'far_at_90_recall')} | "
                         f"{agg(arm, r, 'far_at_threshold')} | {agg(arm, r, 'recall_at_threshold')} |")
    base = statistics.mean(x["far_at_90_recall"] for x in rows if x["round"] == 0)
    last = [x["far_at_90_recall"] for x in rows if x["round"] == args.rounds and x["arm"] == "review loop"]
    if last:
        end = statistics.mean(last)
        met = end <= base / 2
        lines += ["", f"Target: false-alarm rate at 90% recall after {args.rounds} rounds of {args.budget} reviews "
                      f"at most half the 8-shot model's ({base:.3f} -> at most {base / 2:.3f}): "
                      + (f"**met** ({end:.3f})." if met else
                         f"**missed** ({end:.3f}, {end / base:.0%} of the 8-shot figure; the target needs "
                         f"{base / 2:.3f})."), ""]
        grown = sum(x["goods_added"] for x in rows if x["arm"] == "review loop") / len(seeds)
        rand = statistics.mean(x["far_at_90_recall"] for x in rows
                               if x["round"] == args.rounds and x["arm"] == "random goods")
        defects = statistics.mean(x["defects_reviewed"] for x in rows
                                  if x["round"] == args.rounds and x["arm"] == "review loop")
        lines += [f"What the figures say: in {args.rounds} rounds the loop grew the model with {grown:.0f} reviewed "
                  f"goods (of {args.rounds * args.budget} reviews, {defects:.0f} were defects, and half of the reviewed "
                  f"goods stay on the evaluation side of the split); the same number of random goods from the same "
                  f"line brings the false-alarm rate at 90% recall to {rand:.3f}, the loop to {end:.3f}: the reviewed "
                  "goods (false alarms first) teach the model more than as many random ones, and the threshold from "
                  "the line raises recall at the threshold. Halving the false-alarm rate at 90% recall takes more "
                  "goods than three rounds of 50 reviews grow: on MTD the growth benchmark needs about 256 learned "
                  "goods for image AUROC 0.87-0.93 (docs/benchmarks/growth.md), the loop here holds 8 + "
                  f"{grown:.0f}.", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--line", type=int, default=200, help="images the line produces per round")
    ap.add_argument("--defect-rate", type=float, default=0.1)
    ap.add_argument("--sample-rate", type=float, default=0.3,
                    help="share of passed captures the review queue samples after the flags (adreg review --sample-rate)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default="bench-results/review-loop")
    ap.add_argument("--update-docs", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("ADREG_PROGRESS", "0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.perf_counter()
    for seed in (int(s) for s in args.seeds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            rows += run_seed(seed, args.rounds, args.budget, args.line, args.defect_rate, args.sample_rate,
                             Path(tmp))
    keys = sorted({k for r in rows for k in r})
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    text = page(rows, args, time.perf_counter() - t0)
    (out / "results.md").write_text(text)
    if args.update_docs:
        DOC.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
