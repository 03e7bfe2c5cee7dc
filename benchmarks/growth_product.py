"""Growth through the product path: ``adreg.api.fit`` then ``adreg.api.update`` steps, each in its own process.

    python -m benchmarks growth-product --methods rad,knn --steps 64,256,832 --seeds 0 --tall rad \
        --out bench-results/growth-product --update-docs

MTD (the bundled seeded split): per seed the good training tiles are shuffled; ``adreg.api.fit`` fits
8 of them (MTD's settings: blocks 7+10, flips x8, top 0.1%; every other setting the product's default),
registers version 1 in a temporary sqlite store, then every step offers the next goods up to the step's
count to ``adreg.api.update`` (from the previous version, registered): the product's own guard (images
the parent scores above its threshold are suspects; the grown model's second look learns from those it
clears, the rest are held out), holdout (20 new goods recalibrate), adaptive augmentation and chunked
growth, evaluated on the parent's logged evaluation set (the MTD test split).
The added goods are symlinked into a temporary folder per step.

Tall product (``--tall``): bottle's goods and test images stretched to 500 x 1263 px in a temporary
folder (MVTec layout, masks too), an 8-shot fit (bottle's defaults: rotate x30, 20 goods held out for
calibration), then one update with 150 goods.

Every fit and update runs in a child process; its peak RSS is that child's, never the parent's (the
child's own high-water mark, VmHWM, as it ends). Per step: goods offered / learned (real goods the model
holds) / flagged by the parent / cleared by the second look / held out / held out to calibrate, views extracted and
synthetic copies per good, the bank's views after the step (RAD), peak RSS and its ratio to the 8-shot
fit's, the detector's update seconds (decode + augmentation + features + chunked merge, both updates when
the second look learns; ``fit_info.update_seconds``) per learned good and per view, image AUROC on the
test split, and ms/image: ``detector.predict`` on the paths of the first 32 test images (decoding
included) after one warm-up image, best of two passes, and its ratio to the 8-shot model's.
``--update-docs`` replaces the product-path section of
docs/benchmarks/growth.md (between its markers), keeping the rest of the page.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tempfile
from pathlib import Path

from benchmarks.harness import (DOCS, child_result, command_line, fit_settings, ints, link_files, machine_line,
                                replace_section, run_child, run_lines, today, write_csv)

PAGE = DOCS / "growth.md"
BEGIN, END = "<!-- growth-product:begin -->", "<!-- growth-product:end -->"
MTD_SETTINGS = fit_settings("mtd")  # blocks 7+10, flips x8, top 0.1%
TALL_SIZE = (500, 1263)  # width x height


# -- the child: one fit or one update through adreg.api ----------------------------------------------------
LATENCY_IMAGES = 32  # test images timed for ms/image (after one warm-up image), best of two passes


def latency_ms(detector, samples) -> float:
    """Milliseconds per image of ``detector.predict`` (decode + backbone + method + post-processing) on the
    first ``LATENCY_IMAGES`` evaluation images: one warm-up image, then the best of two passes."""
    import time

    paths = [s.path for s in samples[:LATENCY_IMAGES]]
    detector.predict(paths[:1])
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        detector.predict(paths)
        best = min(best, time.perf_counter() - t0)
    return 1000.0 * best / len(paths)


def child(spec: dict) -> dict:
    """Run one ``adreg.api.fit`` or ``adreg.api.update`` as ``spec`` says; what it did, as JSON-able."""
    import torch

    import adreg.api as api

    torch.set_num_threads(spec.get("threads", 2))
    if spec["kind"] == "fit":
        out = api.fit(spec["category"], train_dir=spec["train_dir"], method=spec["method"], k_shot=spec["k_shot"],
                      seed=spec["seed"], register=True, tracking_uri=spec["uri"], show_progress=False,
                      device="cpu", **spec.get("settings", {}))
        m, info = out.metrics, out.detector.fit_info
        return {"version": out.version, "image_auroc": m.get("image_auroc"),
                "latency_ms": latency_ms(out.detector, out.result.data.test),
                "eval_latency_ms": m["latency_ms_per_image"],
                "goods_learned": info["n_shots"], "views": info["n_train_images"], "aug_copies": info["aug_copies"],
                "seconds": info["fit_seconds"], "held_out": 0, "cleared": 0, "calibration": 0}
    out = api.update(spec["category"], spec["folders"], from_version=spec["from_version"], register=True,
                     tracking_uri=spec["uri"], show_progress=False, device="cpu", seed=spec["seed"],
                     **spec.get("update", {}))
    r = out.result
    m, info = r.metrics(), r.detector.fit_info
    return {"version": out.version, "image_auroc": m.get("image_auroc"),
            "latency_ms": latency_ms(r.detector, r.data.test), "eval_latency_ms": m["latency_ms_per_image"],
            "goods_learned": len(r.added), "views": r.method_report["n_views"],
            "aug_copies": r.method_report["aug_copies"], "seconds": info["update_seconds"],
            "total_seconds": r.seconds, "held_out": len(r.suspects), "cleared": len(r.cleared),
            "calibration": len(r.calibration_images), "goods_total": info["n_shots"],
            "bank_views": r.method_report.get("bank_views_after")}


def in_child(spec: dict) -> dict:
    """``child(spec)`` in a fresh process, with its peak RSS (``peak_rss_mib``: that process's own high-water
    mark, VmHWM, read by the child as it ends, so neither the parent nor earlier children count)."""
    return run_child(["-m", "benchmarks.growth_product", "--child", json.dumps(spec)])


# -- scenarios -----------------------------------------------------------------------------------------------

CONDITIONS = {"guard": {}, "suspects included": {"include_suspects": True}}


def grow_mtd(method: str, seed: int, steps: list[int], work: Path, log=print, condition: str = "guard") -> list[dict]:
    """8-shot fit + updates to each of ``steps`` goods offered, on MTD; a row per process. ``condition``:
    ``guard`` (the product's default) or ``suspects included`` (``include_suspects``: every offered good
    is learned from, as after a person confirmed the suspects)."""
    from adreg.data import default_category_dir, resolve_dataset, split_shots

    root = default_category_dir("mtd")
    data = resolve_dataset(root)
    shots, _ = split_shots(data.train, 8, seed, 0)  # what api.fit draws (MTD has a validation split)
    rest = [p for p in data.train if p not in set(shots)]
    random.Random(seed).shuffle(rest)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    base = {"category": "mtd", "method": method, "seed": seed, "uri": uri}
    rows = [{"step": "fit", "goods_offered": 8,
             **in_child({**base, "kind": "fit", "train_dir": str(root), "k_shot": 8, "settings": MTD_SETTINGS})}]
    log(rows[-1])
    offered = 8
    for target in steps:
        batch = rest[offered - 8:target - 8]
        folder = str(link_files(batch, work / f"add-{target}"))
        rows.append({"step": f"update to {target}", "goods_offered": target,
                     **in_child({**base, "kind": "update", "folders": [folder], "update": CONDITIONS[condition],
                                  "from_version": rows[-1]["version"]})})
        log(rows[-1])
        offered = target
    return rows


def tall_product(folder: Path, n_update: int) -> tuple[Path, list[Path]]:
    """Bottle stretched to 500 x 1263 px in an MVTec-layout ``folder``; returns it and the update goods."""
    from PIL import Image

    from adreg.data import default_category_dir

    src = default_category_dir("bottle")
    goods = sorted((src / "train" / "good").glob("*.png"))
    fit_goods, update_goods = goods[:len(goods) - n_update], goods[len(goods) - n_update:]

    def put(path: Path, dest: Path, mask: bool = False):
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).resize(TALL_SIZE, Image.NEAREST if mask else Image.BILINEAR).save(dest)

    for p in fit_goods:
        put(p, folder / "train" / "good" / p.name)
    for p in update_goods:
        put(p, folder / "new" / p.name)
    for p in (src / "test").rglob("*.png"):
        put(p, folder / "test" / p.parent.name / p.name)
    for p in (src / "ground_truth").rglob("*.png"):
        put(p, folder / "ground_truth" / p.parent.name / p.name, mask=True)
    return folder, sorted((folder / "new").glob("*.png"))


def grow_tall(method: str, seed: int, n_update: int, work: Path, log=print) -> list[dict]:
    folder, new = tall_product(work / "tall", n_update)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    base = {"category": "tall", "method": method, "seed": seed, "uri": uri}
    rows = [{"step": "fit", "goods_offered": 8,
             **in_child({**base, "kind": "fit", "train_dir": str(folder), "k_shot": 8})}]
    log(rows[-1])
    rows.append({"step": f"update +{n_update}", "goods_offered": 8 + n_update,
                 **in_child({**base, "kind": "update", "folders": [str(folder / "new")],
                              "from_version": rows[-1]["version"]})})
    log(rows[-1])
    return rows


# -- report --------------------------------------------------------------------------------------------------
COLUMNS = ["product", "method", "condition", "seed", "step", "goods_offered", "goods_learned", "held_out", "calibration",
           "views", "aug_copies", "peak_rss_mib", "rss_vs_fit", "seconds", "s_per_good", "s_per_view",
           "image_auroc", "latency_ms", "latency_vs_fit"]


def derive(rows: list[dict]) -> list[dict]:
    """Ratios against the run's 8-shot fit, seconds per learned good and per view."""
    fit = rows[0]
    for r in rows:
        r["rss_vs_fit"] = r["peak_rss_mib"] / fit["peak_rss_mib"]
        r["latency_vs_fit"] = r["latency_ms"] / fit["latency_ms"]
        r["s_per_good"] = r["seconds"] / max(r["goods_learned"], 1)
        r["s_per_view"] = r["seconds"] / max(r["views"], 1)
    return rows


def fmt(v) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if v < 1.5 and v > 0 and not v.is_integer() else f"{v:.3g}" if v < 100 else f"{v:.0f}"
    return str(v)


def table(rows: list[dict]) -> str:
    heads = ["product", "method", "condition", "seed", "step", "goods offered", "learned (model total)",
             "flagged by the parent", "cleared", "held out", "calibration", "views", "copies/good", "bank views", "peak RSS MiB", "RSS vs fit", "update s", "s/good", "s/view",
             "image AUROC", "ms/image", "latency vs fit"]
    out = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        learned = f"{r['goods_learned']}" + (f" ({r['goods_total']})" if r.get("goods_total") else "")
        included = r.get("condition") == "suspects included"  # the suspects were flagged, then learned from
        flagged = r["held_out"] + (0 if included else r.get("cleared") or 0)
        vals = [r["product"], r["method"], r.get("condition") or "guard", r["seed"], r["step"], r["goods_offered"], learned,
                flagged, "-" if included else r.get("cleared", "-"), 0 if included else r["held_out"], r["calibration"], r["views"], r["aug_copies"], r.get("bank_views") or "-",
                f"{r['peak_rss_mib']:.0f}",
                f"{r['rss_vs_fit']:.2f}", f"{r['seconds']:.1f}", f"{r['s_per_good']:.3f}", f"{r['s_per_view']:.3f}",
                "-" if r["image_auroc"] is None else f"{r['image_auroc']:.4f}", f"{r['latency_ms']:.1f}",
                f"{r['latency_vs_fit']:.2f}"]
        out.append("| " + " | ".join(map(str, vals)) + " |")
    return "\n".join(out)


def summary(rows: list[dict]) -> str:
    """Mean ± std over seeds per (product, method, condition, step): what the targets are judged on."""
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["product"], r["method"], r.get("condition") or "guard", r["step"]), []).append(r)
    heads = ["product", "method", "condition", "step", "seeds", "learned (model total)", "held out", "RSS vs fit",
             "s/good", "s/view", "image AUROC", "latency vs fit"]
    out = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]

    def ms(values, digits):
        v = np.array([float(x) for x in values if x is not None], dtype=float)
        if not v.size:
            return "-"
        return f"{v.mean():.{digits}f}" + (f" ± {v.std(ddof=1):.{digits}f}" if v.size > 1 else "")

    for (product, method, condition, step), g in groups.items():
        total = ms([r.get("goods_total") or r["goods_learned"] for r in g], 0)
        out.append("| " + " | ".join(map(str, [
            product, method, condition, step, len(g), f"{ms([r['goods_learned'] for r in g], 0)} ({total})",
            "0" if condition == "suspects included" else ms([r["held_out"] for r in g], 0),
            ms([r["rss_vs_fit"] for r in g], 2), ms([r["s_per_good"] for r in g], 3), ms([r["s_per_view"] for r in g], 3),
            ms([r["image_auroc"] for r in g], 4), ms([r["latency_vs_fit"] for r in g], 2)])) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--methods", default="rad,knn")
    p.add_argument("--steps", default="64,256,832")
    p.add_argument("--seeds", default="0")
    p.add_argument("--tall", default="rad", help="methods of the tall-image product ('' = none)")
    p.add_argument("--tall-seeds", default="0", help="seeds of the tall-image product")
    p.add_argument("--condition", default="guard", choices=sorted(CONDITIONS))
    p.add_argument("--tall-update", type=int, default=150)
    p.add_argument("--from-csv", help="re-render from a results.csv instead of running")
    p.add_argument("--out", default="bench-results/growth-product")
    p.add_argument("--update-docs", action="store_true")
    p.add_argument("--date", default=today())
    args = p.parse_args(argv)
    if args.child:
        return child_result(child(json.loads(args.child)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if args.from_csv:
        for path in args.from_csv.split(","):  # several runs' rows, in the order given
            with open(path) as fh:
                rows += [{k: (json.loads(v) if v not in ("",) and k not in ("product", "method", "step", "condition")
                              else v) for k, v in r.items()} for r in csv.DictReader(fh)]
    else:
        steps = ints(args.steps)
        for seed in ints(args.seeds):
            for method in [m for m in args.methods.split(",") if m]:
                with tempfile.TemporaryDirectory(prefix="adreg-growth-") as tmp:
                    rows += [{"product": "mtd", "method": method, "condition": args.condition, "seed": seed, **r}
                             for r in derive(grow_mtd(method, seed, steps, Path(tmp), condition=args.condition))]
                write_rows(rows, out)
            if str(seed) not in args.tall_seeds.split(","):
                continue
            for method in [m for m in args.tall.split(",") if m]:
                with tempfile.TemporaryDirectory(prefix="adreg-tall-") as tmp:
                    rows += [{"product": "tall 500x1263", "method": method, "condition": "guard", "seed": seed, **r}
                             for r in derive(grow_tall(method, seed, args.tall_update, Path(tmp)))]
                write_rows(rows, out)
    write_rows(rows, out)
    md = "Mean over seeds:\n\n" + summary(rows) + "\n\nEvery run:\n\n" + table(rows)
    (out / "results.md").write_text(md + "\n")
    print(md)
    if args.update_docs:
        notes = (out / "notes.md").read_text() if (out / "notes.md").is_file() else ""
        replace_section(PAGE, BEGIN, END, f"## Product path: `adreg.api.fit` + `adreg.api.update`\n\n"
                        f"{__doc__.split(chr(10) * 2, 2)[2]}\n"
                        + run_lines(machine_line("cpu"), command_line("growth-product", argv), args.date)
                        + f"\n{md}\n\n{notes}", "Growth")


def write_rows(rows: list[dict], out: Path) -> None:
    """``out``/results.csv: every row, each value as JSON (strings as they are), columns in first-seen order."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    write_csv(out / "results.csv", [{k: json.dumps(r.get(k)) if not isinstance(r.get(k), str) else r.get(k)
                                     for k in keys} for r in rows], keys)


if __name__ == "__main__":
    main()
