"""The benchmark pipeline as a CI smoke run (1 method, 1 seed, the real bottle test set) and its cache."""

import csv
import os
import shutil

import torch

from adreg.backbones import build_backbone
from adreg.feature_cache import cache_key, cached_features
from adreg.images import load_image
from pipelines import benchmark


def test_smoke_run_writes_tables_pictures_and_reuses_cached_features(tmp_path, monkeypatch, bottle_dir, capsys):
    monkeypatch.setenv("ADREG_CACHE", str(tmp_path / "cache"))
    argv = ["--datasets", "bottle", "--methods", "subspace", "--shots", "1", "--seeds", "0", "--aug-count", "2",
            "--out", str(tmp_path / "out")]
    assert benchmark.main(argv) == 0
    first = capsys.readouterr().out
    assert "cache miss" in first
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert len(rows) == 1 and rows[0]["method"] == "subspace" and float(rows[0]["image_auroc"]) > 0.9
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| bottle | subspace | 1 | 1 |" in table
    pictures = tmp_path / "out" / "pictures" / "bottle-subspace-k1"
    assert {p.name for p in pictures.iterdir()} == {"roc.png", "scores.png", "examples.png"}
    assert benchmark.main(argv) == 0
    assert "cache hit" in capsys.readouterr().out
    again = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert again[0]["image_auroc"] == rows[0]["image_auroc"] and again[0]["aupro"] == rows[0]["aupro"]


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
