"""Measurement behind the growth defaults: synthetic copies per real good, RAD's bank budget, layer weights.

    python -m benchmarks growth-aug --out bench-results/growth-aug

MTD (bundled seeded split), RAD on Lite0 blocks 7+10 (MTD's settings). Every good training tile is
extracted once as itself and as ``--max-copies`` flip copies (one fixed RNG per tile), so a condition
is a subset of views: the 8-shot fit's views (the first 8 goods, 8 copies each, as a fit gets them) plus,
for every further good, its original and its first ``c`` copies. The bank is then selected from that
union by RAD's budget, either ``real-first`` (the product's rule: synthetic copies are dropped before
real views, ``Features.real``) or ``equal`` (one k-center over every view, the rule before it), fitted
in one pass and scored on the full test split through the product's ``predict_features``. Image AUROC
per (goods, copies per added good, budget, selection): what ``adreg update``'s adaptive augmentation
(``AnomalyDetector.aug_copies``) and RAD's budget rule were chosen from. ``--update-docs`` writes the
table into docs/benchmarks/growth.md (its own section, between markers).
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
from adreg.data import default_category_dir, resolve_dataset
from adreg.images import load_image
from adreg.methods import build_method
from adreg.metrics import evaluate_scores
from benchmarks.growth import score_features
from benchmarks.growth_product import PAGE
from benchmarks.harness import command_line, ints, machine_line, replace_section, run_lines, today, write_csv


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
    p.add_argument("--selection", default="real-first,equal",
                   help="how the budget treats synthetic copies: real-first (the product's: copies go first) or "
                        "equal (one k-center over every view)")
    p.add_argument("--max-copies", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench-results/growth-aug")
    p.add_argument("--update-docs", action="store_true")
    p.add_argument("--date", default=today())
    p.add_argument("--from-csv", help="re-render a results.csv instead of running")
    p.add_argument("--drop-probe", type=int, default=0, metavar="K",
                   help="instead of the sweep: what leaving K goods out costs, the K a 200-good model scores "
                        "highest (what a guard holds out) against K random ones (RAD, every good, no copies)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_csv:
        with open(args.from_csv) as fh:
            return report(list(csv.DictReader(fh)), out, args, argv)
    data = resolve_dataset(default_category_dir("mtd"))
    goods = list(data.train)
    random.Random(args.seed).shuffle(goods)
    backbone = build_backbone("efficientnet-lite0", layers=[7, 10])
    kinds = ("hflip", "vflip")
    t0 = time.perf_counter()
    goods = goods[:max(ints(args.goods))]  # only the goods some condition uses
    cache = out / f"features-seed{args.seed}-{len(goods)}-{args.max_copies}.pt"  # bench-results/ (ignored) only
    if cache.is_file():
        with torch.serialization.safe_globals([Features]):  # our own cache, of Features only
            origin, copies, test_feats = torch.load(cache)
    else:
        origin, copies, test_feats = extract_all(backbone, goods, data.test, kinds, args)
        torch.save((origin, copies, test_feats), cache)
    test_feats = test_feats.to(torch.float32)
    labels = np.array([s.label for s in data.test])
    print(f"features: {time.perf_counter() - t0:.0f} s", flush=True)
    if args.drop_probe:
        return drop_probe(origin, test_feats, labels, backbone, args.drop_probe, ints(args.budgets)[0],
                          args.seed)
    rows = []
    for n_goods in ints(args.goods):
        for c in ints(args.copies):
            parts = [origin[i] for i in range(8)] + [copies[i] for i in range(8)]
            parts += [origin[i] for i in range(8, n_goods)]
            if c:
                parts += [copies[i][:c] for i in range(8, n_goods)]
            feats = Features.cat(parts).to(torch.float32)
            real = torch.cat([torch.ones(8, dtype=torch.bool), torch.zeros(64, dtype=torch.bool),
                              torch.ones(n_goods - 8, dtype=torch.bool),
                              torch.zeros((n_goods - 8) * c, dtype=torch.bool)])
            whole = False  # a budget >= the views was evaluated: larger budgets give the same bank
            for budget, selection in [(b, sel) for b in ints(args.budgets)
                                      for sel in args.selection.split(",")]:
                if len(feats) <= budget and (selection == "equal" or whole):
                    continue  # every view kept: the bank of the row already there
                whole = whole or len(feats) <= budget
                feats.real = real if selection == "real-first" else None
                for weights in json.loads(f"[{args.weights}]"):
                    for k_image in ints(args.k_image):
                        method = build_method("rad", bank_budget=budget, layer_weights=weights,
                                              k_image=k_image).fit(feats)
                        scores, maps = score_features(method, test_feats, backbone, 4.0, 0.001)
                        m = evaluate_scores(labels, scores)
                        row = {"goods": n_goods, "copies": c, "views": len(feats), "budget": budget,
                               "selection": selection, "real_kept": int(method.real_views.sum()),
                               "weights": json.dumps(weights), "k_image": k_image,
                               "image_auroc": round(m["image_auroc"], 4)}
                        rows.append(row)
                        print(row, flush=True)
    write_csv(out / "results.csv", rows, list(rows[0]))
    report(rows, out, args, argv)


def drop_probe(origin, test_feats, labels, backbone, k: int, budget: int, seed: int) -> None:
    """Image AUROC of RAD (``budget`` views) on every good, without the ``k`` goods a model of the first
    200 scores highest (what a guard at any threshold holds out first), and without ``k`` random goods."""
    goods = Features.cat(origin).to(torch.float32)
    n = len(goods)

    def auroc(keep) -> float:
        method = build_method("rad", bank_budget=budget).fit(goods[torch.tensor(sorted(keep))])
        return evaluate_scores(labels, score_features(method, test_feats, backbone, 4.0, 0.001)[0])["image_auroc"]

    judge = build_method("rad", bank_budget=budget).fit(goods[:200])
    rest = list(range(200, n))
    scores = score_features(judge, goods[torch.tensor(rest)], backbone, 4.0, 0.001)[0]
    highest = {rest[i] for i in np.argsort(-scores)[:k]}
    chance = set(random.Random(seed).sample(rest, k))
    for what, out in [("every good", set()), (f"without the {k} a 200-good model scores highest", highest),
                      (f"without {k} random goods", chance)]:
        print(f"{what}: {n - len(out)} goods, image AUROC {auroc([i for i in range(n) if i not in out]):.4f}",
              flush=True)


def report(rows: list[dict], out: Path, args, argv) -> None:
    """results.md (and with ``--update-docs`` the page's section) from the rows."""
    heads = ["goods", "copies per added good", "views", "budget", "selection", "real views kept", "image AUROC"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:  # "equal" tells no copy from a real view: its count of real views kept is not known
        real = "-" if r["selection"] == "equal" else r["real_kept"]
        lines.append(f"| {r['goods']} | {r['copies']} | {r['views']} | {r['budget']} | {r['selection']} | {real} | "
                     f"{float(r['image_auroc']):.4f} |")
    md = "\n".join(lines)
    (out / "results.md").write_text(md + "\n")
    print(md)
    if args.update_docs:
        intro = __doc__.split(chr(10) * 2, 2)[2]
        notes = (out / "notes.md").read_text() if (out / "notes.md").is_file() else ""
        replace_section(PAGE, "<!-- growth-aug:begin -->", "<!-- growth-aug:end -->",
                        f"## Choosing copies and the bank rule: `benchmarks.growth_aug`\n\n{intro}\n"
                        + run_lines(machine_line("cpu"), command_line("growth-aug", argv), args.date)
                        + f"\n{md}\n\n{notes}", "Growth")


if __name__ == "__main__":
    main()
