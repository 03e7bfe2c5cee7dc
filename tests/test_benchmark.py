"""The benchmark pipeline as a CI smoke run (1 method, 1 seed, the real bottle test set) and its cache."""

import csv

import pytest
import os
import shutil

import torch

from adreg.backbones import build_backbone
from adreg.feature_cache import cache_key, cached_features
from adreg.images import load_image
from pipelines import benchmark


def test_smoke_run_writes_tables_pictures_and_reuses_cached_features(tmp_path, monkeypatch, bottle_dir, capsys):
    monkeypatch.setenv("ADREG_CACHE", str(tmp_path / "cache"))
    argv = ["--datasets", "bottle", "--methods", "subspace,rad", "--shots", "1", "--seeds", "0,1",
            "--method-seeds", '{"rad": "1"}', "--method-shots", '{"rad": "1,2"}', "--aug-count", "2",
            "--out", str(tmp_path / "out")]
    assert benchmark.main(argv) == 0
    first = capsys.readouterr().out
    assert "cache miss" in first
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert [(r["method"], r["k_shot"], r["seed"]) for r in rows] == [
        ("subspace", "1", "0"), ("subspace", "1", "1"), ("rad", "1", "1"), ("rad", "2", "1")]
    assert all(float(r["image_auroc"]) > 0.9 for r in rows)
    assert {(r["augment"], r["aug_count"], r["layers"]) for r in rows} == {("rotate", "2", "4,10")}
    table = (tmp_path / "out" / "results.md").read_text()
    assert all(row in table for row in ("| bottle | subspace | 1 | 2 |", "| bottle | rad | 1 | 1 |",
                                        "| bottle | rad | 2 | 1 |"))
    for name, k in (("subspace", 1), ("rad", 1), ("rad", 2)):
        pictures = tmp_path / "out" / "pictures" / f"bottle-{name}-k{k}"
        assert {p.name for p in pictures.iterdir()} == {"roc.png", "scores.png", "examples.png"}
    assert benchmark.main(argv) == 0
    assert "cache hit" in capsys.readouterr().out
    again = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert again[0]["image_auroc"] == rows[0]["image_auroc"] and again[0]["aupro"] == rows[0]["aupro"]


def test_each_dataset_gets_its_own_settings_unless_a_flag_overrides_them():
    parse = benchmark.build_parser().parse_args
    mtd = benchmark.dataset_args(parse(["--datasets", "bottle,mtd"]), "mtd")
    assert (mtd.augment, mtd.aug_count, mtd.layers, mtd.top_fraction) == ("hflip,vflip", 8, "7,10", 0.001)
    bottle = benchmark.dataset_args(parse(["--aug-count", "3"]), "bottle")
    assert (bottle.augment, bottle.aug_count, bottle.layers) == ("rotate", 3, None)
    own = benchmark.dataset_args(parse(["--layers", "4", "--top-fraction", "0"]), "my-screws")
    assert (own.layers, own.top_fraction, own.augment) == ("4", 0.0, "rotate")


def test_zero_shot_methods_run_once_at_k0_and_costly_ones_can_run_fewer_seeds_and_shots():
    args = benchmark.build_parser().parse_args(["--shots", "1,8", "--seeds", "0,1,2",
                                                "--method-seeds", '{"foundad": "0"}',
                                                "--method-shots", '{"foundad": "8"}'])
    assert benchmark.shots_of(args, "spg") == [0] and benchmark.shots_of(args, "rad") == [1, 8]
    assert benchmark.shots_of(args, "foundad") == [8] and benchmark.seeds_of(args, "foundad") == [0]
    assert benchmark.seeds_of(args, "spg") == [0, 1, 2]


def test_cache_key_changes_with_backbone_file_and_derivation(tmp_path, monkeypatch, bottle_dir):
    monkeypatch.setenv("ADREG_CACHE", str(tmp_path / "cache"))
    img = tmp_path / "a.png"
    shutil.copy(bottle_dir / "train" / "good" / "000.png", img)
    b320 = build_backbone("efficientnet-lite0", image_size=320)
    b256 = build_backbone("efficientnet-lite0", image_size=256)
    k = cache_key(b320, [img], {"kind": "test"})
    assert k != cache_key(b256, [img], {"kind": "test"})
    assert k != cache_key(build_backbone("efficientnet-lite0", layers=[4], image_size=320), [img], {"kind": "test"})
    assert k != cache_key(b320, [img], {"kind": "test", "seed": 1})
    feats, hit = cached_features(b320, [img], lambda: [load_image(img)], {"kind": "test"})
    assert not hit
    cached, hit = cached_features(b320, [img], lambda: [load_image(img)], {"kind": "test"})
    assert hit and all(torch.equal(a, b) for a, b in zip(feats.patches, cached.patches))
    st = os.stat(img)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the image changed: the entry is not reused
    assert cache_key(b320, [img], {"kind": "test"}) != k
    _, hit = cached_features(b320, [img], lambda: [load_image(img)], {"kind": "test"})
    assert not hit


def test_growth_tables_merge_runs_and_a_later_run_replaces_the_same_rows():
    from pipelines.growth import merge_runs, summarise

    def row(method, seed, step, auroc, condition="clean"):
        return {"method": method, "condition": condition, "seed": seed, "step": step, "goods": 8 << step,
                "image_auroc": auroc, "held_out": 0, "defects_caught": 0, "defects_added": 0}

    old = [row("knn", 0, 0, 0.70), row("knn", 0, 1, 0.75), row("rad", 0, 0, 0.77)]
    new = [row("knn", 0, 0, 0.71), row("knn", 1, 0, 0.73)]
    merged = merge_runs([old, new])
    assert len(merged) == 4
    table = {(e["method"], e["goods"]): e for e in summarise(merged)}
    assert table[("knn", 8)]["seeds"] == 2 and table[("knn", 8)]["image_auroc"][0] == pytest.approx(0.72)
    assert table[("knn", 16)]["image_auroc"][0] == pytest.approx(0.75)
    assert table[("rad", 8)]["seeds"] == 1
