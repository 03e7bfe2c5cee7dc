"""How often does the promotion gate refuse a candidate that is the same model refitted with another seed?

    python -m benchmarks gate --datasets bottle,mtd --seeds 20 --update-docs

For each dataset: a baseline fitted with seed 0 and candidates fitted with seeds 1..N (the same method, shots
count and settings; another draw of the shots and of their augmentation), all through the product's path
(``adreg.fitting.fit_category``, features from a cache below it), evaluated on the same test set. Each
candidate goes through both gate rules against the baseline: the old point rule (refuse when image AUROC,
pixel AUROC or AUPRO drops by more than 0.01) and the statistical gate (``adreg.statistics.evaluate_gate``:
refuse when significantly worse at the 95% level by more than the 0.01 margin, when the whole interval lies below a floor, or when the set is
too small to tell). A refitted model of the same recipe is not worse by construction, so every refusal by the
comparison is a false refusal. Floors (0.90 on image and pixel AUROC) are reported apart. Writes
``docs/benchmarks/gate.md`` with ``--update-docs``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from adreg.backbones import build_backbone
from adreg.feature_cache import CachingBackbone
from adreg.fitting import FitOptions, fit_category
from adreg.statistics import GATED, WORSE, evaluate_gate, from_evaluation
from benchmarks.harness import command_line, fit_settings, machine_line, write_csv, write_page

FLOORS = {"image_auroc": 0.90, "pixel_auroc": 0.90}
# the benchmark's dataset settings (docs/benchmarks/accuracy.md): SubspaceAD, few shots
SETTINGS = {
    "bottle": dict(method="subspace", k_shot=1),
    "mtd": dict(method="subspace", k_shot=8, **fit_settings("mtd")),
}


def old_rule(candidate: dict, baseline: dict, tolerance: float = 0.01) -> bool:
    """The point rule the gate used before: refuse on a drop of more than ``tolerance`` in any compared metric."""
    return any(k in candidate and k in baseline and candidate[k] < baseline[k] - tolerance for k in GATED)


def run_dataset(dataset: str, n_seeds: int, backbone, n_resamples: int, level: float) -> list[dict]:
    def fit(seed: int):
        opts = FitOptions(category=dataset, seed=seed, device="cpu", **SETTINGS[dataset])  # its bundled data
        return fit_category(opts, show_progress=False, backbone=backbone)

    base = fit(0)
    base_set = from_evaluation(base.evaluation)
    rows = []
    for seed in range(1, n_seeds + 1):
        cand = fit(seed)
        t0 = time.perf_counter()
        decision = evaluate_gate(from_evaluation(cand.evaluation), base_set, FLOORS, level=level,
                                 n_resamples=n_resamples, seed=seed)
        gate_s = time.perf_counter() - t0
        c, b = cand.evaluation.metrics, base.evaluation.metrics
        rows.append({"dataset": dataset, "seed": seed, "old_refused": old_rule(c, b),
                     "new_worse": any(v.verdict == WORSE for v in decision.metrics.values()),
                     "new_verdict": decision.verdict, "below_floor": any(c.get(k, 1) < f for k, f in FLOORS.items()),
                     "d_image_auroc": c["image_auroc"] - b["image_auroc"],
                     "d_aupro": c.get("aupro", np.nan) - b.get("aupro", np.nan), "gate_seconds": gate_s,
                     "n_good": decision.n_good, "n_defective": decision.n_defective})
        print(f"{dataset} seed {seed}: d image AUROC {rows[-1]['d_image_auroc']:+.4f}, old rule "
              f"{'REFUSE' if rows[-1]['old_refused'] else 'promote'}, new {decision.verdict} ({gate_s:.1f} s)",
              flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| dataset | candidates | test set (good / defective) | old rule refuses | new gate: worse | "
             "new gate verdicts | mean abs d image AUROC | max abs d image AUROC | gate s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == dataset]
        n = len(rs)
        verdicts = {}
        for r in rs:
            verdicts[r["new_verdict"]] = verdicts.get(r["new_verdict"], 0) + 1
        d = np.abs([r["d_image_auroc"] for r in rs])
        lines.append(f"| {dataset} | {n} | {rs[0]['n_good']} / {rs[0]['n_defective']} | "
                     f"{sum(r['old_refused'] for r in rs)} ({sum(r['old_refused'] for r in rs) / n:.0%}) | "
                     f"{sum(r['new_worse'] for r in rs)} ({sum(r['new_worse'] for r in rs) / n:.0%}) | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(verdicts.items()))} | {d.mean():.4f} | {d.max():.4f} | "
                     f"{np.mean([r['gate_seconds'] for r in rs]):.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="bottle,mtd")
    p.add_argument("--seeds", type=int, default=20, help="candidates per dataset (seeds 1..N; baseline seed 0)")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--level", type=float, default=0.95)
    p.add_argument("--out", default="bench-results/gate")
    p.add_argument("--update-docs", action="store_true", help="write docs/benchmarks/gate.md")
    args = p.parse_args(argv)
    backbone = CachingBackbone(build_backbone("efficientnet-lite0"))
    rows = []
    for dataset in args.datasets.split(","):
        if dataset not in SETTINGS:
            raise SystemExit(f"unknown dataset {dataset!r}; choose from {', '.join(SETTINGS)}")
        rows += run_dataset(dataset, args.seeds, backbone, args.resamples, args.level)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)
    body = table(rows)
    print(body)
    if args.update_docs:
        about = (__doc__.split("\n\n", 2)[2].replace("``", "`") +
                 f" Statistical gate: level {args.level}, {args.resamples} image resamples, the default pixel "
                 "resamples; `old rule refuses` and `new gate: worse` count refusals by the comparison with the "
                 "baseline only; `new gate verdicts` is the overall verdict, floors included.")
        settings = "; ".join(f"{d}: {', '.join(f'{k}={v}' for k, v in s.items())}" for d, s in SETTINGS.items()
                             if d in args.datasets.split(","))
        write_page("gate", "Gate: false refusals of a refitted model", about,
                   f"Settings: {settings}.\n\n{body}", command_line("gate", argv), machine=machine_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
