"""The promotion gate's statistics (``adreg.statistics``) on synthetic scores: weighted resamples equal adreg's
metrics on replicated images, interval coverage, DeLong and paired bootstrap, and the decision rules."""

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.stats import norm

from adreg import metrics, statistics as st

FLOORS = {"image_auroc": 0.90, "pixel_auroc": 0.90}


def _image_set(n_good, n_defective, delta, rng):
    labels = np.r_[np.zeros(n_good), np.ones(n_defective)].astype(int)
    return labels, rng.normal(size=labels.size) + delta * labels


def _pixel_set(n_good=8, n_defective=10, size=16, rng=None, noise=0.0):
    """Maps where defect regions score higher; ``noise`` blurs that."""
    rng = rng or np.random.default_rng(0)
    labels = np.r_[np.zeros(n_good), np.ones(n_defective)].astype(int)
    masks = np.zeros((labels.size, size, size), dtype=bool)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, size - 5, 2)
        masks[i, y:y + 4, x:x + 5] = True
        if i % 3 == 0:
            masks[i, 1:3, 1:3] = True  # a second, small region
    maps = rng.random(masks.shape) + 0.8 * masks + noise * rng.normal(size=masks.shape)
    scores = maps.reshape(len(labels), -1).max(axis=1)
    return labels, scores, maps, masks


def test_weighted_resamples_equal_adreg_metrics_on_replicated_images():
    """A resample evaluated with weights (image drawn k times = weight k) is adreg.metrics on the images
    concatenated k times: image AUROC with ties, pixel AUROC, AUPRO with regions counted per copy."""
    rng = np.random.default_rng(3)
    labels, scores, maps, masks = _pixel_set(rng=rng)
    scores = np.round(scores, 1)  # ties
    maps = np.round(maps, 2)
    counts = st._resample_counts(labels, 6, rng)
    assert (counts[:, labels == 0].sum(axis=1) == (labels == 0).sum()).all()  # stratified
    assert (counts[:, labels == 1].sum(axis=1) == (labels == 1).sum()).all()
    images = st._PairAUROC(labels, scores, np.arange(labels.size), labels.size)
    pixels, pro, _ = st._pixel_curves(st.ScoreSet(labels, scores, maps, masks), None)
    assert pro.owner.size < maps.size  # pixels below any resample's FPR 0.3 threshold are dropped
    extremes = np.ones((labels.size, labels.size))  # every good (or defective) weight on one image
    for i in range(labels.size):
        extremes[i, labels == labels[i]] = 0
        extremes[i, i] = (labels == labels[i]).sum()
    for row in np.r_[counts, np.ones((1, labels.size)), extremes]:
        idx = np.repeat(np.arange(labels.size), row.astype(int))
        assert images.auroc(row)[0] == pytest.approx(metrics.auroc(labels[idx], scores[idx]), abs=1e-12)
        assert pixels.auroc(row)[0] == pytest.approx(metrics.auroc(masks[idx], maps[idx]), abs=1e-12)
        assert pro.aupro(row)[0] == pytest.approx(metrics.aupro(masks[idx], maps[idx]), abs=1e-12)


def test_point_values_are_adregs_metrics_and_pixel_intervals_need_masks():
    labels, scores, maps, masks = _pixel_set(size=128)
    with_masks = st.ScoreSet(labels, scores, maps, masks)
    want = metrics.evaluate_scores(labels, scores, masks, maps)
    ivs = st.bootstrap_intervals(with_masks, n_resamples=200, pixel_resamples=50)
    assert set(ivs) == {"image_auroc", "pixel_auroc", "aupro"}
    for key, iv in ivs.items():
        assert iv.value == pytest.approx(want[key], abs=1e-12)  # the point is the full-resolution metric
        assert 0 <= iv.low <= iv.value <= iv.high <= 1
    assert "64x64" in ivs["aupro"].method  # 128 -> 64: the resamples are downsampled, said so
    image_only = st.bootstrap_intervals(st.ScoreSet(labels, scores), n_resamples=200)
    assert set(image_only) == {"image_auroc"}
    assert image_only["image_auroc"].low == ivs["image_auroc"].low  # same seed, same image resamples
    no_defect_masks = st.ScoreSet(labels, scores, maps, np.zeros_like(masks))
    assert not no_defect_masks.has_pixels and set(st.bootstrap_intervals(no_defect_masks, n_resamples=50)) == {
        "image_auroc"}
    decision = st.evaluate_gate(st.ScoreSet(labels, scores), None, FLOORS, n_resamples=100)
    assert set(decision.metrics) == {"image_auroc"} and decision.n_masked is None  # no pixel verdict


def test_from_evaluation_matches_how_evaluate_builds_pixel_metrics():
    """Good images get all-zero masks; defective images without a mask stay out of the pixel metrics."""
    labels, scores, maps, masks = _pixel_set(n_good=6, n_defective=7)
    samples = [SimpleNamespace(label=int(y)) for y in labels]
    kept = [i for i in range(len(labels)) if labels[i] == 0 or i != 10]  # image 10: defective, no mask
    result = SimpleNamespace(samples=samples, scores=scores, maps=maps, metrics={"image_auroc": 0.5},
                             masks={i: masks[i] for i in kept if labels[i] == 1})
    s = st.from_evaluation(result)
    assert list(s.pixel_index) == kept and s.n_masked == 6 and s.n_defective == 7
    assert s.point_values()["image_auroc"] == 0.5  # measured values are taken as they were reported
    assert s.point_values()["aupro"] == pytest.approx(metrics.aupro(masks[kept], maps[kept]))


def test_image_auroc_intervals_cover_the_true_auroc_at_about_the_stated_rate():
    """400 synthetic test sets (30 good, 30 defective; scores N(0,1) and N(1.2,1): true AUROC
    Phi(1.2/sqrt 2) = 0.802): the 90% interval covers the true AUROC about 90% of the time (percentile
    bootstrap runs slightly under, ~0.88, here)."""
    rng = np.random.default_rng(1)
    delta, level, reps = 1.2, 0.90, 400
    true = norm.cdf(delta / np.sqrt(2))
    hits = 0
    for r in range(reps):
        labels, scores = _image_set(30, 30, delta, rng)
        iv = st.bootstrap_intervals(st.ScoreSet(labels, scores), level=level, n_resamples=200, seed=r)["image_auroc"]
        hits += iv.low <= true <= iv.high
    assert abs(hits / reps - level) < 0.05, hits / reps


def test_delong_matches_mann_whitney_and_refuses_a_worse_candidate_not_an_identical_one():
    rng = np.random.default_rng(7)
    labels, base = _image_set(40, 40, 2.0, rng)
    worse = base + rng.normal(scale=1.5, size=base.size)  # the same images, ranking partly destroyed
    t = st.delong_test(labels, worse, base)
    assert t.candidate == pytest.approx(metrics.auroc(labels, worse)) and t.baseline == pytest.approx(
        metrics.auroc(labels, base))
    assert t.diff < 0 and t.p_value < 0.05 and t.high < 0
    same = st.delong_test(labels, base, base)
    assert same.diff == 0 and same.p_value == 1.0

    def gate(cand):
        return st.evaluate_gate(st.ScoreSet(labels, cand), st.ScoreSet(labels, base), FLOORS, n_resamples=200)

    refused = gate(worse)
    assert refused.verdict == st.WORSE and not refused.passed
    assert refused.metrics["image_auroc"].verdict == st.WORSE and "significantly worse" in refused.failures[0]
    identical = gate(base.copy())
    assert identical.verdict == st.PROMOTE and identical.failures == []
    assert identical.metrics["image_auroc"].paired.p_value == 1.0
    better = gate(base + 3 * labels)  # better is never refused, however significant
    assert better.verdict == st.PROMOTE and better.metrics["image_auroc"].paired.diff > 0


def test_paired_bootstrap_of_pixel_metrics():
    rng = np.random.default_rng(5)
    labels, scores, maps, masks = _pixel_set(n_good=10, n_defective=12, size=32, rng=rng)
    base = st.ScoreSet(labels, scores, maps, masks)
    noisy = maps + rng.normal(scale=0.6, size=maps.shape)
    worse = st.ScoreSet(labels, scores, noisy, masks)  # image scores kept: only the maps got worse
    tests = st.paired_tests(worse, base, pixel_resamples=100)
    for key in ("pixel_auroc", "aupro"):
        assert tests[key].diff < 0 and tests[key].p_value < 0.05 and "paired bootstrap" in tests[key].method
        assert tests[key].diff == pytest.approx(metrics.evaluate_scores(labels, scores, masks, noisy)[key]
                                                - metrics.evaluate_scores(labels, scores, masks, maps)[key])
    assert tests["image_auroc"].p_value == 1.0
    measured = st.compare(worse, base, n_resamples=100, pixel_resamples=100)  # named fields, not positions
    assert measured.paired == tests and set(measured.candidate) == set(measured.baseline) == set(tests)
    assert measured.resampling.pixel_resamples == 100 and st.compare(base).baseline is None
    decision = st.evaluate_gate(worse, base, {"image_auroc": 0.5, "pixel_auroc": 0.5}, n_resamples=100,
                                pixel_resamples=100)
    assert decision.verdict == st.WORSE and decision.metrics["image_auroc"].verdict == st.PROMOTE
    same = st.paired_tests(st.ScoreSet(labels, scores, maps.copy(), masks), base, pixel_resamples=50)
    assert all(t.diff == 0 and t.p_value == 1.0 and t.low == t.high == 0 for t in same.values())
    with pytest.raises(ValueError, match="same images"):
        st.compare(st.ScoreSet(labels[::-1], scores), st.ScoreSet(labels, scores))


def test_not_enough_evidence_on_a_tiny_set_is_not_worse():
    rng = np.random.default_rng(2)
    labels, base = _image_set(3, 12, 2.0, rng)
    cand = -base  # clearly worse, but 3 good images cannot tell
    d = st.evaluate_gate(st.ScoreSet(labels, cand), st.ScoreSet(labels, base), FLOORS, n_resamples=100)
    assert d.verdict == st.NOT_ENOUGH and d.verdict != st.WORSE and not d.passed
    assert all(v.verdict == st.NOT_ENOUGH for v in d.metrics.values())
    assert "3 good and 12 defective" in d.failures[0] and "at least 5" in d.failures[0]
    assert d.summary()["n_good"] == 3 and d.summary()["n_defective"] == 12
    d = st.evaluate_gate(st.ScoreSet(labels, base), None, FLOORS, n_resamples=100, min_per_class=3)
    assert d.verdict == st.PROMOTE  # the threshold is a setting
    only_good = st.evaluate_gate(st.ScoreSet(np.zeros(20, int), rng.normal(size=20)), None, FLOORS)
    assert only_good.verdict == st.NOT_ENOUGH and only_good.metrics == {}


def test_below_floor_needs_the_whole_interval_below():
    rng = np.random.default_rng(4)
    labels, scores = _image_set(20, 60, 0.8, rng)  # AUROC ~0.72
    d = st.evaluate_gate(st.ScoreSet(labels, scores), None, FLOORS, n_resamples=300)
    iv = d.metrics["image_auroc"].candidate
    assert iv.high < 0.90 and d.verdict == st.BELOW_FLOOR and "is below the floor" in d.failures[0]
    straddling = st.evaluate_gate(st.ScoreSet(labels, scores), None, {"image_auroc": (iv.value + iv.high) / 2},
                                  n_resamples=300)
    assert straddling.verdict == st.PROMOTE  # point below the floor, interval reaching it: not refused
    cand = st.Interval("image_auroc", 0.7, 0.6, 0.8, 0.95, 100, "x")
    worse = st.PairedTest("image_auroc", 0.7, 0.9, -0.2, -0.3, -0.1, 0.001, 0.95, "DeLong")
    both = st.decide({"image_auroc": cand}, {"image_auroc": worse}, FLOORS, 0.95, 20, 20)
    assert both.verdict == st.BELOW_FLOOR and len(both.failures) == 2  # both reasons listed, floor first


def test_summary_is_compact_json_and_the_module_imports_no_torch_or_mlflow():
    labels, scores, maps, masks = _pixel_set()
    s = st.ScoreSet(labels, scores, maps, masks)
    d = st.evaluate_gate(s, st.ScoreSet(labels, scores + 0.01, maps, masks), FLOORS, n_resamples=100,
                         pixel_resamples=20)
    summary = json.loads(json.dumps(d.summary()))
    assert summary["verdicts"] == {"image_auroc": "promote", "pixel_auroc": "promote", "aupro": "promote"}
    assert set(summary["paired"]["aupro"]) == {"diff", "low", "high", "p", "method"}
    assert summary["candidate_intervals"]["image_auroc"][0] <= summary["candidate_intervals"]["image_auroc"][1]
    assert len(json.dumps(summary)) < 2000
    code = "import sys, adreg.statistics; sys.exit(any(m in sys.modules for m in ('torch', 'mlflow', 'imgad')))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_significant_but_immaterial_drop_is_not_worse():
    """The margin: a refit can be significantly worse on the same images by a tiny amount (0.002 pixel AUROC on
    bottle); the gate refuses only a drop that is both significant and beyond the margin."""
    cand = st.Interval("pixel_auroc", 0.975, 0.97, 0.98, 0.95, 200, "bootstrap")
    tiny = st.PairedTest("pixel_auroc", 0.975, 0.977, -0.002, -0.003, -0.001, 0.005, 0.95, "paired bootstrap")
    assert st.decide({"pixel_auroc": cand}, {"pixel_auroc": tiny}, {}, 0.95, 20, 63).verdict == st.PROMOTE
    strict = st.decide({"pixel_auroc": cand}, {"pixel_auroc": tiny}, {}, 0.95, 20, 63, margin=0.0)
    assert strict.verdict == st.WORSE and "beyond the margin 0" in strict.failures[0]
    big = st.PairedTest("pixel_auroc", 0.95, 0.977, -0.027, -0.035, -0.02, 0.005, 0.95, "paired bootstrap")
    assert st.decide({"pixel_auroc": cand}, {"pixel_auroc": big}, {}, 0.95, 20, 63).verdict == st.WORSE
