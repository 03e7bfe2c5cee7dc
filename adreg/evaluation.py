"""Scoring a labelled image set with a detector and computing every metric it supports."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from adreg.data import Sample, load_mask
from adreg.detector import AnomalyDetector
from adreg.images import load_image
from adreg.metrics import evaluate_scores, rates_at
from adreg.progress import Bar


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: list[Sample]
    scores: np.ndarray
    maps: np.ndarray = field(repr=False)
    masks: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # sample index -> mask (defective)

    def rows(self, threshold: float | None = None) -> list[dict]:
        """Per-image table: path, label, defect type, score (and decision when a threshold is given)."""
        out = []
        for s, score in zip(self.samples, self.scores):
            row = {"path": str(s.path), "label": s.label, "defect": s.defect, "score": float(score)}
            if threshold is not None:
                row["is_anomaly"] = bool(score > threshold)
            out.append(row)
        return out


def score_samples(detector: AnomalyDetector, samples: list[Sample], show_progress: bool = True):
    """Scores and maps of samples; returns (scores, maps, seconds per image).

    Decoded and scored a batch (``detector.batch_size``) at a time, so memory holds one batch of images,
    not the whole set; the seconds are the scoring's only (decoding is not timed)."""
    parts, seconds = [], 0.0
    bar = Bar(len(samples), "scoring", show_progress)
    for start in range(0, len(samples), detector.batch_size):
        images = [load_image(s.path) for s in samples[start:start + detector.batch_size]]
        t0 = time.perf_counter()
        parts.append(detector.predict(images))
        seconds += time.perf_counter() - t0
        bar(len(images))
    bar.close()
    if not parts:
        empty = detector.predict([])
        return empty.scores, empty.maps, 0.0
    return (np.concatenate([p.scores for p in parts]), np.concatenate([p.maps for p in parts]),
            seconds / len(samples))


def evaluate(detector: AnomalyDetector, samples: list[Sample], threshold: float | None = None,
             show_progress: bool = True) -> EvalResult:
    """Image and (where masks exist) pixel metrics of ``detector`` on ``samples``.

    Pixel metrics use the images whose defects have masks plus all good images (all-zero masks), at
    the detector's map resolution; masks are resized with nearest-neighbour.
    """
    scores, maps, sec = score_samples(detector, samples, show_progress)
    labels = np.array([s.label for s in samples])
    metrics = {"latency_ms_per_image": sec * 1000.0, "n_test_images": float(len(samples)),
               "n_test_defective": float(labels.sum())}
    size = (maps.shape[2], maps.shape[1])
    with_mask = [i for i, s in enumerate(samples) if s.label == 0 or s.mask_path is not None]
    masks: dict[int, np.ndarray] = {}
    if any(samples[i].mask_path is not None for i in with_mask):
        stacked = np.stack([load_mask(samples[i], size) for i in with_mask])
        metrics.update(evaluate_scores(labels, scores, stacked, maps[with_mask]))
        masks = {i: m for i, m in zip(with_mask, stacked) if samples[i].label == 1}
    else:
        metrics.update(evaluate_scores(labels, scores))
    if threshold is not None and labels.size:
        rates = rates_at(labels, scores, threshold)
        metrics.update({f"test_{k}": v for k, v in rates.items()
                        if k in ("accuracy", "recall", "false_alarm_rate") and not np.isnan(v)})
    return EvalResult(metrics, samples, scores, maps, masks)
