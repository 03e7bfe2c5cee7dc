"""Evaluation metrics, one implementation each (checked against scikit-learn in the tests).

Image AUROC, pixel AUROC, AUPRO integrated to FPR 0.3 and divided by 0.3 (binarised masks, all
test images, 8-connected regions), image and pixel F1-max. Everything is sort + cumulative sums, so
millions of pixels take about a second.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def descending_order(y_score) -> np.ndarray:
    """The permutation every curve here sorts by: stable argsort of the flattened scores, reversed.
    Sorting in the scores' own dtype gives the same permutation as in float64 (the cast is exact and
    monotonic), so ``evaluate_scores`` sorts millions of pixels once for all pixel metrics."""
    return np.argsort(np.asarray(y_score).ravel(), kind="mergesort")[::-1]


def _sorted_counts(y_true: np.ndarray, y_score: np.ndarray, order: np.ndarray | None = None):
    """True/false positive counts at every distinct threshold, descending (sklearn's construction)."""
    y_true = np.asarray(y_true).ravel().astype(bool)
    y_score = np.asarray(y_score, dtype=np.float64).ravel()
    if y_true.shape != y_score.shape:
        raise ValueError(f"labels {y_true.shape} and scores {y_score.shape} differ in size")
    if not np.isfinite(y_score).all():
        raise ValueError("scores contain NaN or infinity")
    order = descending_order(y_score) if order is None else order
    y_score, y_true = y_score[order], y_true[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(y_score)), y_true.size - 1]
    tps = np.cumsum(y_true)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return tps, fps, y_score[last_of_tie]


def _need_both_classes(y_true) -> None:
    y = np.asarray(y_true).ravel().astype(bool)
    if y.all() or not y.any():
        raise ValueError("AUROC needs both positive and negative samples")


def roc_curve(y_true, y_score, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), starting at (0, 0) with threshold +inf."""
    _need_both_classes(y_true)
    tps, fps, thr = _sorted_counts(y_true, y_score, order)
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return fpr, tpr, np.r_[np.inf, thr]


def auroc(y_true, y_score, order: np.ndarray | None = None) -> float:
    fpr, tpr, _ = roc_curve(y_true, y_score, order)
    return float(np.trapezoid(tpr, fpr))


def f1_max(y_true, y_score, order: np.ndarray | None = None) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold reaching it (predict anomalous when score >= it)."""
    tps, fps, thr = _sorted_counts(y_true, y_score, order)
    if tps[-1] == 0:
        raise ValueError("F1 needs at least one positive sample")
    precision = tps / np.maximum(tps + fps, 1)
    recall = tps / tps[-1]
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thr[best])


def aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3, order: np.ndarray | None = None) -> float:
    """Area under the per-region-overlap curve up to ``max_fpr``, divided by ``max_fpr``.

    ``masks`` (N, H, W) binary ground truth, ``maps`` (N, H, W) anomaly scores. Regions are the
    8-connected components of each mask; PRO at a threshold is the mean over regions of the fraction
    of the region above it; FPR is over all normal pixels of all images.
    """
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must both be (N, H, W)")
    labels = np.zeros(masks.shape, dtype=np.int64)
    n_regions = 0
    structure = np.ones((3, 3), dtype=bool)
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=structure)
        labels[i] = np.where(lab > 0, lab + n_regions, 0)
        n_regions += n
    if n_regions == 0:
        raise ValueError("AUPRO needs at least one anomalous region in the masks")
    n_normal = int((~masks).sum())
    if n_normal == 0:
        raise ValueError("AUPRO needs normal pixels")
    region_sizes = np.bincount(labels.ravel(), minlength=n_regions + 1).astype(np.float64)
    flat_labels = labels.ravel()
    # every anomalous pixel adds 1/(n_regions * |its region|) to the mean PRO when it is exceeded
    pro_weight = np.where(flat_labels > 0, 1.0 / (n_regions * region_sizes[flat_labels]), 0.0)
    normal = (flat_labels == 0).astype(np.float64) / n_normal
    order = descending_order(maps) if order is None else order
    scores = maps.ravel()[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    pro = np.r_[0.0, np.cumsum(pro_weight[order])[last_of_tie]]
    fpr = np.r_[0.0, np.cumsum(normal[order])[last_of_tie]]
    # integrate up to max_fpr, interpolating the PRO value exactly at max_fpr
    cut = int(np.searchsorted(fpr, max_fpr, side="right"))
    if cut < fpr.size:
        pro_at = np.interp(max_fpr, fpr[cut - 1:cut + 1], pro[cut - 1:cut + 1])
        fpr_part, pro_part = np.r_[fpr[:cut], max_fpr], np.r_[pro[:cut], pro_at]
    else:
        fpr_part, pro_part = fpr, pro
    return float(np.trapezoid(pro_part, fpr_part) / max_fpr)


def rates_at(labels, scores, threshold: float) -> dict[str, float]:
    """What the strictly-above rule ``score > threshold`` does on labelled images: ``recall`` (defects flagged),
    ``false_alarm_rate`` (goods flagged), ``precision`` (flags that are defects), ``accuracy``; NaN where the
    denominator is empty."""
    labels = np.asarray(labels).astype(bool)
    pred = np.asarray(scores) > threshold
    share = lambda x: float(x.mean()) if x.size else float("nan")  # noqa: E731
    return {"recall": share(pred[labels]), "false_alarm_rate": share(pred[~labels]),
            "precision": share(labels[pred]), "accuracy": share(pred == labels)}


def evaluate_scores(labels, scores, masks=None, maps=None) -> dict[str, float]:
    """All metrics that the given data allows: image metrics need both classes, pixel ones masks."""
    out: dict[str, float] = {}
    labels = np.asarray(labels)
    if labels.size and labels.min() != labels.max():
        out["image_auroc"] = auroc(labels, scores)
        out["image_f1_max"], out["image_f1_threshold"] = f1_max(labels, scores)
    if masks is not None and maps is not None and np.asarray(masks).any():
        order = descending_order(maps)  # one sort of all pixels for the three pixel metrics
        out["pixel_auroc"] = auroc(masks, maps, order)
        out["pixel_f1_max"], _ = f1_max(masks, maps, order)
        out["aupro"] = aupro(masks, maps, order=order)
    return out
