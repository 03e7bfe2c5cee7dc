"""Decision thresholds on image scores, each logged with the rule that produced it.

An image is anomalous when its score is strictly above the threshold. Rules:

* ``good_quantile`` (only good validation images): the ``q`` quantile (default 0.99, linear
  interpolation) of their scores, i.e. about 1% false alarms on images like them. With fewer than 100
  images this is close to their maximum.
* ``f1_optimal`` (validation images include defective ones): the threshold maximising F1 on them,
  placed midway between the two scores it separates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from adreg.errors import DataError
from adreg.metrics import f1_max


@dataclass
class Threshold:
    """The decision threshold on image scores and how it was obtained."""

    value: float
    rule: str
    details: dict = field(default_factory=dict)


def good_quantile(good_scores, q: float = 0.99) -> Threshold:
    good = np.asarray(good_scores, dtype=np.float64)
    if good.size == 0:
        raise DataError("no good validation images to calibrate the threshold on")
    value = float(np.quantile(good, q))
    return Threshold(value, "good_quantile", {"q": q, "n_good": int(good.size),
                                              "good_max": float(good.max()), "good_mean": float(good.mean())})


def f1_optimal(good_scores, defect_scores) -> Threshold:
    good = np.asarray(good_scores, dtype=np.float64)
    bad = np.asarray(defect_scores, dtype=np.float64)
    if bad.size == 0:
        raise DataError("no defective validation images for an F1-optimal threshold")
    scores = np.r_[good, bad]
    best_f1, at = f1_max(np.r_[np.zeros(good.size), np.ones(bad.size)], scores)
    below = scores[scores < at]
    lower = below.max() if below.size else at - abs(at) * 1e-6 - 1e-12
    best_value = float((at + lower) / 2)  # strictly-above rule separates the same two groups
    return Threshold(best_value, "f1_optimal", {"f1": best_f1, "n_good": int(good.size), "n_defect": int(bad.size)})


def target_false_alarm(good_scores, defect_scores, rate: float) -> Threshold:
    """The lowest threshold that flags at most ``rate`` of the good images (strictly-above rule), with the
    recall it keeps on the defects."""
    good = np.sort(np.asarray(good_scores, dtype=np.float64))
    bad = np.asarray(defect_scores, dtype=np.float64)
    if not 0 <= rate < 1:
        raise DataError(f"a target false-alarm rate is in [0, 1), got {rate}")
    if good.size == 0:
        raise DataError("no good images to set a false-alarm rate on")
    allowed = int(np.floor(rate * good.size + 1e-9))  # goods that may score above the threshold
    value = float(good[good.size - allowed - 1])
    far = float((good > value).mean())
    recall = float((bad > value).mean()) if bad.size else float("nan")
    return Threshold(value, "target_false_alarm", {"target_rate": rate, "false_alarm_rate": far, "recall": recall,
                                                   "n_good": int(good.size), "n_defect": int(bad.size)})


def calibrate(good_scores, defect_scores=None, q: float = 0.99) -> Threshold:
    """F1-optimal when defective validation scores exist, else the good-score quantile."""
    if defect_scores is not None and len(defect_scores) and len(good_scores):
        return f1_optimal(good_scores, defect_scores)
    return good_quantile(good_scores, q)
