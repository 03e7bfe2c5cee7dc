"""The benchmark runs the product's path (fit_category over a caching backbone), on the real bottle data."""

import csv
import datetime
import os
import shutil

import pytest
import torch

from adreg.augment import augment_shots
from adreg.backbones import build_backbone
from adreg.feature_cache import CachingBackbone, ExtractCall, cache_key, cached_features, honest_seconds
from adreg.images import load_image
from benchmarks import accuracy, harness


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One feature cache for the module's benchmark runs (they share the bottle test images)."""
    before = os.environ.get("ADREG_CACHE")
    path = tmp_path_factory.mktemp("feature-cache")
    os.environ["ADREG_CACHE"] = str(path)
    yield path
    if before is None:
        os.environ.pop("ADREG_CACHE", None)
    else:
        os.environ["ADREG_CACHE"] = before


def _rows(out):
    return list(csv.DictReader(open(out / "results.csv")))


def test_benchmark_row_equals_adreg_fit_of_the_same_options(bottle_fit, shared_cache, tmp_path, capsys):
    """bottle, SubspaceAD, 1 shot, seed 0: the benchmark (cold cache, then warm) and the product's fit without
    any cache (``bottle_fit``: fit_category as ``adreg fit`` runs it) give the same metrics."""
    product = bottle_fit.evaluation.metrics
    argv = ["--datasets", "bottle", "--methods", "subspace", "--shots", "1", "--seeds", "0", "--device", "cpu",
            "--timing-images", "2", "--no-pictures", "--out", str(tmp_path / "out")]
    for run in ("cold", "warm"):
        assert accuracy.main(argv) == 0
        printed = capsys.readouterr().out
        (row,) = _rows(tmp_path / "out")
        assert (row["method"], row["k_shot"], row["seed"], row["calibration"]) == (
            "subspace", "1", "0", "20 held-out good training images")
        for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max"):
            assert abs(float(row[key]) - product[key]) <= 1e-6, (run, key, row[key], product[key])
        assert float(row["threshold"]) == pytest.approx(bottle_fit.detector.threshold.value, rel=1e-6)
        if run == "warm":  # every image (31 views, 20 held out, 83 test) came from the cache
            assert "(features: 0 extracted, 134 from cache)" in printed
            assert float(row["fit_seconds"]) > 0 and float(row["ms_per_image"]) > float(row["backbone_ms_warm"]) * 0.5


def test_grid_with_per_method_seeds_and_shots_writes_tables_pictures_and_the_page(shared_cache, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setattr(harness, "DOCS", tmp_path / "docs")
    argv = ["--datasets", "bottle", "--methods", "subspace,rad", "--shots", "1", "--seeds", "0",
            "--method-seeds", '{"rad": "1"}', "--method-shots", '{"rad": "2"}', "--aug-count", "2",
            "--timing-images", "2", "--out", str(tmp_path / "out"), "--update-docs"]
    assert accuracy.main(argv) == 0
    rows = _rows(tmp_path / "out")
    assert [(r["method"], r["k_shot"], r["seed"]) for r in rows] == [
        ("subspace", "1", "0"), ("rad", "2", "1")]
    assert all(float(r["image_auroc"]) > 0.9 for r in rows)
    assert {(r["augment"], r["aug_count"], r["layers"]) for r in rows} == {("rotate", "2", "4,10")}
    assert [r["n_train_images"] for r in rows] == ["3", "6"]
    assert int(rows[1]["features_cached"]) >= 83  # the test set is extracted once
    table = (tmp_path / "out" / "results.md").read_text()
    assert all(row in table for row in ("| bottle | subspace | 1 | 1 |", "| bottle | rad | 2 | 1 |"))
    assert "seeds per method: {\"rad\": \"1\"}" in table and "shots per method: {\"rad\": \"2\"}" in table
    for name, k in (("subspace", 1), ("rad", 2)):
        pictures = tmp_path / "out" / "pictures" / f"bottle-{name}-k{k}"
        assert {p.name for p in pictures.iterdir()} == {"roc.png", "scores.png", "examples.png"}
    page = (tmp_path / "docs" / "accuracy.md").read_text()
    assert page.startswith("# Accuracy")
    assert "fit_category" in page and "| bottle | rad | 2 | 1 |" in page
    assert "Command: `python -m benchmarks accuracy --datasets bottle --methods subspace,rad" in page
    assert f"Date: {datetime.date.today().isoformat()}" in page and f"torch {torch.__version__}" in page


def test_page_writer_writes_the_whole_page_and_no_readme_splicing_is_left(tmp_path):
    assert not hasattr(accuracy, "write_readme_section") and not hasattr(accuracy, "START")
    path = harness.write_page("demo", "Demo", "What is measured.", "| a |\n|---|\n| 1 |", "python -m x --y",
                                docs_dir=tmp_path, machine="2 cores visible, Test CPU", date="2026-01-02")
    assert path == tmp_path / "demo.md"
    assert path.read_text() == ("# Demo\n\nWhat is measured.\n\n- Machine: 2 cores visible, Test CPU\n"
                                "- Command: `python -m x --y`\n- Date: 2026-01-02\n\n| a |\n|---|\n| 1 |\n")
    harness.write_page("demo", "Demo 2", "Other.", "| b |", "python -m x", docs_dir=tmp_path)
    text = path.read_text()
    assert text.startswith("# Demo 2\n") and "| a |" not in text and "Test CPU" not in text
    line = harness.machine_line("cpu")
    assert f"{os.cpu_count()} cores" in line and torch.__version__ in line and "device cpu" in line
    assert harness.command_line("accuracy", ["--seeds", "0", "--method-seeds", '{"a": "0"}']) == \
        "python -m benchmarks accuracy --seeds 0 --method-seeds '{\"a\": \"0\"}'"


def test_every_benchmark_has_update_docs_instead_of_update_readme():
    from benchmarks import batch, coreset, growth, runtime, serving

    for module in (accuracy, coreset, growth, runtime):
        assert module.build_parser().parse_args(["--update-docs"]).update_docs
        with pytest.raises(SystemExit):
            module.build_parser().parse_args(["--update-readme"])
    for module in (serving, batch):
        assert "--update-docs" in module.build_parser().format_help()


def test_caching_backbone_serves_features_bit_identical_to_the_backbone(tmp_path, bottle_dir):
    raw = build_backbone("efficientnet-lite0")
    shots = [load_image(p) for p in sorted((bottle_dir / "train" / "good").glob("*.png"))[:1]]
    images = augment_shots(shots, ("rotate",), 3, seed=0)  # the original + 3 rotated views
    ref = raw.extract(images, 1)
    batched = raw.extract(images, 8)  # what the cache relies on: an image's features do not depend on its batch
    assert all(torch.equal(a, b) for a, b in zip(ref.patches + ref.globals, batched.patches + batched.globals))
    cached = CachingBackbone(raw, directory=tmp_path / "c")
    assert cached.spec() == raw.spec() and cached.image_size == raw.image_size and cached.device == raw.device
    assert cached.to("cpu") is cached and cached.precision == raw.precision
    part = cached.extract(images[1:3], 1)  # misses
    whole = cached.extract(images, 1)  # 2 hits (from memory), 2 misses, in the caller's order
    again = CachingBackbone(raw, directory=tmp_path / "c").extract(images[::-1] + images[:1], 8)  # from disk
    for got, idx in ((part, [1, 2]), (whole, [0, 1, 2, 3]), (again, [3, 2, 1, 0, 0])):
        for a, b in zip(ref.patches + ref.globals, got.patches + got.globals):
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a[idx], b)
    assert [(c.n_images, c.hits) for c in cached.calls] == [(2, 0), (4, 2)]
    seen = []
    memory_only = CachingBackbone(raw, disk=False, memory_mib=0)  # nothing kept: every call extracts
    memory_only.extract(images[:1], 1, progress=seen.append)
    memory_only.extract(images[:1], 1, progress=seen.append)
    assert [c.hits for c in memory_only.calls] == [0, 0] and seen == [1, 1]
    other = CachingBackbone(build_backbone("efficientnet-lite0", image_size=256), directory=tmp_path / "c")
    other.extract(images[:1], 1)
    assert other.calls[0].hits == 0  # another backbone spec is another key
    changed = images[0].copy()
    changed.putpixel((0, 0), (0, 0, 0) if changed.getpixel((0, 0)) != (0, 0, 0) else (1, 1, 1))
    cached.extract([changed], 1)
    assert cached.calls[-1].hits == 0  # one pixel differs: not the same image
    passthrough = CachingBackbone(raw, directory=tmp_path / "c", enabled=False)
    out = passthrough.extract(images[:1], 1)
    assert passthrough.calls[0].hits == 0 and torch.equal(out.patches[0], ref.patches[0][:1])


def test_honest_seconds_replace_cache_reads_by_the_measured_backbone_time():
    calls = [ExtractCall(10, 10, 0.2, 0.0), ExtractCall(4, 1, 1.5, 1.2)]  # 11 hits; 3 misses took 1.2 s
    assert honest_seconds(5.0, calls, backbone_ms=50) == pytest.approx(5.0 - 1.7 + 1.2 + 11 * 0.05)


def test_each_dataset_gets_its_own_settings_unless_a_flag_overrides_them():
    parse = accuracy.build_parser().parse_args
    mtd = accuracy.dataset_args(parse(["--datasets", "bottle,mtd"]), "mtd")
    assert (mtd.augment, mtd.aug_count, mtd.layers, mtd.top_fraction) == ("hflip,vflip", 8, "7,10", 0.001)
    bottle = accuracy.dataset_args(parse(["--aug-count", "3"]), "bottle")
    assert (bottle.augment, bottle.aug_count, bottle.layers) == ("rotate", 3, None)
    own = accuracy.dataset_args(parse(["--layers", "4", "--top-fraction", "0"]), "my-screws")
    assert (own.layers, own.top_fraction, own.augment) == ("4", 0.0, "rotate")
    opts = accuracy.fit_options(mtd, "mtd", "/data/mtd", "spg", 0, 3)
    assert (opts.k_shot, opts.layers, opts.aug_count, opts.method_params) == (1, [7, 10], 8, {"aux": "bottle", "seed": 3})


def test_zero_shot_methods_run_once_at_k0_and_costly_ones_can_run_fewer_seeds_and_shots():
    args = accuracy.build_parser().parse_args(["--shots", "1,8", "--seeds", "0,1,2",
                                                "--method-seeds", '{"foundad": "0"}',
                                                "--method-shots", '{"foundad": "8"}'])
    assert accuracy.shots_of(args, "spg") == [0] and accuracy.shots_of(args, "rad") == [1, 8]
    assert accuracy.shots_of(args, "foundad") == [8] and accuracy.seeds_of(args, "foundad") == [0]
    assert accuracy.seeds_of(args, "spg") == [0, 1, 2]


def test_cache_key_changes_with_backbone_file_and_derivation(tmp_path, monkeypatch, bottle_dir):
    """``cached_features`` (the growth and MTD studies' whole-set cache)."""
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
    from benchmarks.growth import merge_runs, summarise

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


def test_fit_of_more_views_than_one_chunk_splits_into_fit_calibration_and_evaluation(bottle_dir, shared_cache,
                                                                                      tmp_path, monkeypatch):
    """3 bottle shots x (1 + 30 rotations) = 93 views: the fit streams two backbone calls (64 + 29,
    ``CHUNK_VIEWS``), and ``phase_calls`` still tells the fit, the calibration (a 3-image val folder) and the
    evaluation (4 test images) apart, 2 images per call (--batch-size 2); a wrong order still raises."""
    from adreg.detector import CHUNK_VIEWS

    root = tmp_path / "mini-bottle"
    picks = {"train/good": ("train/good", ["000", "001", "002"]), "val/good": ("train/good", ["003", "004", "005"]),
             "test/good": ("test/good", ["000", "001"]), "test/broken_large": ("test/broken_large", ["000", "001"]),
             "ground_truth/broken_large": ("ground_truth/broken_large", ["000_mask", "001_mask"])}
    for dest, (src, stems) in picks.items():
        (root / dest).mkdir(parents=True)
        for stem in stems:
            (root / dest / f"{stem}.png").symlink_to(bottle_dir / src / f"{stem}.png")
    seen = []
    real_phase_calls = accuracy.phase_calls

    def spy(*args):
        fit, evaluation = real_phase_calls(*args)
        seen.append((*args, fit, evaluation))
        return fit, evaluation

    monkeypatch.setattr(accuracy, "phase_calls", spy)
    argv = ["--datasets", "bottle", "--data", str(root), "--methods", "rad,subspace", "--shots", "3", "--seeds", "0",
            "--batch-size", "2", "--device", "cpu", "--timing-images", "2", "--no-pictures",
            "--out", str(tmp_path / "out")]
    assert accuracy.main(argv) == 0
    rows = _rows(tmp_path / "out")
    assert [(r["method"], r["n_train_images"], r["calibration"]) for r in rows] == [
        ("rad", "93", "validation folder"), ("subspace", "93", "validation folder")]
    assert len(seen) == 2
    for calls, det, n_test, n_cal, fit, evaluation in seen:
        assert (det.fit_info["n_train_images"], n_test, n_cal) == (93, 4, 3) and 93 > CHUNK_VIEWS
        between = calls[len(fit):len(calls) - len(evaluation)]
        assert [c.n_images for c in fit] == [64, 29]
        assert [c.n_images for c in between] == [2, 1]
        assert [c.n_images for c in evaluation] == [2, 2]
        assert sum(c.n_images for c in calls) == 93 + 3 + 4 == sum(c.n_images for c in fit + between + evaluation)
        assert real_phase_calls(calls, det, n_test) == (fit, evaluation)  # calibration size not given
        for wrong in (calls[1:], calls[:1] + calls[2:], calls[-2:] + calls[:-2], calls[:2] + calls[3:],
                      calls[:-1]):
            with pytest.raises(RuntimeError, match="no longer match"):
                real_phase_calls(wrong, det, n_test, n_cal)
        with pytest.raises(RuntimeError, match="no longer match"):
            real_phase_calls(calls, det, n_test, n_cal + 1)


def test_python_m_benchmarks_lists_every_benchmark_and_runs_one_by_name():
    import subprocess
    import sys

    from benchmarks import BENCHMARKS

    root = harness.ROOT
    listed = subprocess.run([sys.executable, "-m", "benchmarks"], cwd=root, capture_output=True, text=True)
    assert listed.returncode == 0
    lines = [ln.split()[0] for ln in listed.stdout.splitlines() if ln.startswith("  ")]
    assert lines == list(BENCHMARKS) and len(lines) == 13
    assert {p.stem for p in (root / "benchmarks").glob("*.py")} - {"__init__", "__main__", "harness"} == \
        set(BENCHMARKS.values())
    helped = subprocess.run([sys.executable, "-m", "benchmarks", "growth-product", "--help"], cwd=root,
                            capture_output=True, text=True)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: benchmarks growth-product")
    unknown = subprocess.run([sys.executable, "-m", "benchmarks", "nope"], cwd=root, capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown benchmark 'nope'" in unknown.stderr


def test_harness_sections_int_lists_settings_and_a_measured_child(tmp_path):
    assert harness.ints("1, 2,,4") == [1, 2, 4]
    assert harness.fit_settings("mtd") == {"augment": "hflip,vflip", "aug_count": 8, "layers": [7, 10],
                                           "top_fraction": 0.001}
    assert harness.fit_settings("my-screws") == harness.fit_settings("bottle") == {"augment": "rotate", "aug_count": 30}
    page = tmp_path / "page.md"
    harness.replace_section(page, "<!-- a -->", "<!-- /a -->", "first", "Title")
    assert page.read_text() == "# Title\n\n<!-- a -->\nfirst\n<!-- /a -->\n"
    page.write_text(page.read_text() + "\nkept\n")
    harness.replace_section(page, "<!-- a -->", "<!-- /a -->", "second\n", "Title")
    assert page.read_text() == "# Title\n\n<!-- a -->\nsecond\n<!-- /a -->\n\nkept\n"
    res = harness.run_child(["-c", "from benchmarks.harness import child_result; child_result({'a': 1})"])
    assert res["a"] == 1 and res["peak_rss_mib"] > 1
    with pytest.raises(RuntimeError, match="failed"):
        harness.run_child(["-c", "raise SystemExit(3)"])


def test_the_growth_benchmark_guards_with_the_products_guard():
    from adreg.fitting import contamination_guard
    from benchmarks import growth

    assert growth.contamination_guard is contamination_guard
    assert contamination_guard([0.1, 0.5, 0.2], 0.2) == ([0, 2], [1])
    assert contamination_guard([0.1, 0.5], 0.2, include_suspects=True) == ([0, 1], [1])
