import numpy as np
import pytest

from adreg.errors import DataError
from adreg.thresholds import calibrate, f1_optimal, good_quantile


def test_good_quantile_rule():
    good = np.arange(1, 101, dtype=float)
    t = good_quantile(good, q=0.99)
    assert t.rule == "good_quantile"
    assert t.value == pytest.approx(np.quantile(good, 0.99))
    assert (good > t.value).sum() == 1  # ~1% false alarms on the calibration images


def test_f1_optimal_separates_when_possible():
    good, bad = [1.0, 2.0, 3.0], [5.0, 6.0]
    t = f1_optimal(good, bad)
    assert t.rule == "f1_optimal" and t.details["f1"] == 1.0
    assert 3.0 < t.value < 5.0


def test_f1_optimal_with_overlap_reaches_best_f1():
    rng = np.random.default_rng(0)
    good, bad = rng.normal(0, 1, 50), rng.normal(2, 1, 20)
    t = f1_optimal(good, bad)
    pred_bad, pred_good = bad > t.value, good > t.value
    tp, fp = pred_bad.sum(), pred_good.sum()
    assert 2 * tp / (tp + fp + len(bad)) == pytest.approx(t.details["f1"])


def test_calibrate_picks_rule_by_data():
    assert calibrate([1, 2, 3]).rule == "good_quantile"
    assert calibrate([1, 2, 3], [9]).rule == "f1_optimal"
    with pytest.raises(DataError):
        calibrate([])
