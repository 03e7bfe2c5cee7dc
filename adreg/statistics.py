"""Intervals, paired tests and the promotion gate's decision rules (bottom layer: numpy, scipy, ``adreg.metrics``).

The gate compares a candidate with the version an alias points at now, on the same evaluation images. On
bottle's test folder (20 good, 63 defective images) one good image ranking above every defect moves image
AUROC by 0.05, so point figures alone decide inside the noise. This module says how large the noise is.

**Intervals** (``bootstrap_intervals``): stratified percentile bootstrap over *images*: good and defective
images are resampled separately (with replacement, seeded), so every resample has the set's class balance.

* ``image_auroc``: ``n_resamples`` resamples (default 1000) of the per-image scores.
* ``pixel_auroc`` and ``aupro`` (only when the set has defect masks): the *images* are resampled (an image
  drawn twice counts twice, its regions twice), and the pixel metrics are recomputed on the resampled
  images' maps and masks. For speed the resamples use the maps block-averaged and the masks block-max-pooled
  (a low-resolution pixel is defective when any of its pixels is) to about ``pixel_size`` (default 64) pixels a
  side, and ``pixel_resamples`` resamples (default 200). The point value stays the full-resolution metric
  (``adreg.metrics``, what adreg reports); the interval is the low-resolution bootstrap distribution shifted
  by (full-resolution value - low-resolution value), i.e. the spread comes from the resamples, the centre
  from the real metric. A resampled set is evaluated as weights on the images (a duplicated image = weight 2),
  which equals recomputing ``adreg.metrics.auroc`` / ``aupro`` on the concatenated images: AUROC as one
  bilinear form of a pair-count matrix, AUPRO from one sort of the pixels (checked in the tests).

Cost on bottle-sized inputs (83 images, 320x320 maps, 63 masks), measured on a busy 2-core x86_64 CPU:
candidate and baseline intervals plus the paired tests 3.4 to 4.4 s (1000 image / 200 pixel resamples),
the candidate alone (new alias) about 1.5 s; evaluating the two models on the images costs far more. The
64x64 intervals are a little narrower than full-resolution ones and within 0.0011 of them on bottle's
SubspaceAD (200 resamples, same seed): pixel AUROC [0.9724, 0.9811] vs [0.9718, 0.9817], AUPRO
[0.9248, 0.9517] vs [0.9237, 0.9520]; full resolution took 35 s for the candidate alone.

**Paired tests** (``paired_tests``), candidate minus baseline on the same images:

* ``image_auroc``: DeLong's test for two correlated AUROCs (fast DeLong, Sun & Xu 2014, midranks, so ties
  count 1/2 as in ``adreg.metrics.auroc``): difference, its normal ``level`` interval, two-sided p-value.
* ``pixel_auroc``, ``aupro``: paired bootstrap of the difference (the same resampled images for both
  models, as above); percentile interval of the shifted differences and the two-sided bootstrap p-value
  ``min(1, 2 (min(#{d <= 0}, #{d >= 0}) + 1) / (B + 1))`` (the +1 keeps it from 0 and makes it slightly
  conservative next to the percentile interval; the verdict uses p). Identical models give d = 0: p = 1.

**Decision** (``decide``), per metric and overall, at confidence ``level`` (default 0.95):

1. ``not enough evidence`` (refuse): fewer than ``min_per_class`` (default 5) good or defective images in the
   set; the counts are shown. Distinct from ``worse``: nothing says the candidate is bad, the set cannot tell.
2. ``below floor`` (refuse): the candidate's whole interval lies below the floor (image and pixel AUROC;
   AUPRO has no floor).
3. ``worse`` (refuse): materially and significantly worse than the baseline: paired p < 1 - level and the
   difference below ``-margin`` (default 0.01). Both are needed: on 83 images a refit of the same recipe
   can be significantly worse by 0.002 pixel AUROC (real on these images, immaterial), and a drop of 0.05
   can be noise (not significant).
4. ``promote`` otherwise, with the intervals shown. A new alias (no baseline) is judged on 1 and 2 only.

Overall: ``not enough evidence`` if the set is too small, else ``below floor`` if any metric is, else
``worse`` if any metric is, else ``promote``. Pixel metrics get a verdict only where masks exist. The three
metrics are tested separately, without a multiple-comparison correction: refusing on any one of them is the
conservative direction for a gate.

imgad 0.6.0 (``imgad.stats``: ``bootstrap_ci``, ``delong_test``, ``paired_bootstrap_test``) was considered and
not used: ``import imgad.stats`` runs ``imgad/__init__``, which imports its feature extractors and with them torch
and scikit-learn (5 s, ~2500 modules on a 2-core CPU), its wheel requires torch and transformers, its bootstrap
knows image-level metrics only (no pixel AUROC, no AUPRO), and this layer must stay free of torch. DeLong is a
dozen lines (below; checked against imgad's ``delong_test`` while writing it: same difference, interval, p).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.stats import norm, rankdata

from adreg import metrics as _metrics
from adreg.options import (DEFAULT_MARGIN, DEFAULT_MIN_PER_CLASS, DEFAULT_PIXEL_RESAMPLES,  # noqa: F401 - the gate's
                           DEFAULT_PIXEL_SIZE, DEFAULT_RESAMPLES)                           # defaults, read here

#: the metrics the promotion gate judges, in this order: the one definition (the registry and the CLI read it here)
GATED = ("image_auroc", "pixel_auroc", "aupro")
PIXEL_METRICS = GATED[1:]  # those measured on anomaly maps and defect masks

PROMOTE, WORSE, BELOW_FLOOR, NOT_ENOUGH = "promote", "worse", "below floor", "not enough evidence"
VERDICTS = (PROMOTE, WORSE, BELOW_FLOOR, NOT_ENOUGH)

AUPRO_MAX_FPR = 0.3


# -- inputs ---------------------------------------------------------------------------------------------------
@dataclass
class ScoreSet:
    """Per-image results of one model on one evaluation set: labels and image scores of all N images and,
    for pixel metrics, the maps and binary masks of the images ``pixel_index`` (good images and defective
    images with a mask, as ``adreg.evaluation.evaluate`` uses them). ``points``: full-resolution metric values
    already measured (``EvalResult.metrics``); missing ones are computed with ``adreg.metrics``."""

    labels: np.ndarray
    scores: np.ndarray
    maps: np.ndarray | None = None
    masks: np.ndarray | None = None
    pixel_index: np.ndarray | None = None
    points: dict = field(default_factory=dict)

    def __post_init__(self):
        self.labels = np.asarray(self.labels).astype(np.int64).ravel()
        self.scores = np.asarray(self.scores, dtype=np.float64).ravel()
        if self.labels.shape != self.scores.shape:
            raise ValueError(f"labels {self.labels.shape} and scores {self.scores.shape} differ in size")
        if self.maps is None or self.masks is None or not np.asarray(self.masks).any():
            self.maps = self.masks = self.pixel_index = None  # no masks: no pixel metrics (as evaluate_scores)
        else:
            self.maps, self.masks = np.asarray(self.maps), np.asarray(self.masks).astype(bool)
            if self.maps.shape != self.masks.shape or self.maps.ndim != 3:
                raise ValueError(f"maps {self.maps.shape} and masks {self.masks.shape} must both be (M, H, W)")
            idx = np.arange(len(self.labels)) if self.pixel_index is None else np.asarray(self.pixel_index)
            if idx.shape != (self.maps.shape[0],):
                raise ValueError(f"pixel_index {idx.shape} does not match {self.maps.shape[0]} maps")
            self.pixel_index = idx.astype(np.int64)
        self.points = {k: float(v) for k, v in (self.points or {}).items() if k in GATED}

    @property
    def has_pixels(self) -> bool:
        return self.maps is not None

    @property
    def n_good(self) -> int:
        return int((self.labels == 0).sum())

    @property
    def n_defective(self) -> int:
        return int((self.labels == 1).sum())

    @property
    def n_masked(self) -> int:
        """Defective images with a mask (those the pixel metrics see)."""
        return 0 if not self.has_pixels else int((self.labels[self.pixel_index] == 1).sum())

    def point_values(self) -> dict[str, float]:
        """Full-resolution values of the gated metrics the set measures (``adreg.metrics``)."""
        out = {}
        if self.n_good and self.n_defective:
            out["image_auroc"] = self.points.get("image_auroc", _metrics.auroc(self.labels, self.scores))
        if self.has_pixels:
            if all(k in self.points for k in PIXEL_METRICS):
                out.update({k: self.points[k] for k in PIXEL_METRICS})
            else:
                order = _metrics.descending_order(self.maps)
                out["pixel_auroc"] = _metrics.auroc(self.masks, self.maps, order)
                out["aupro"] = _metrics.aupro(self.masks, self.maps, AUPRO_MAX_FPR, order)
        return out


def from_evaluation(result) -> ScoreSet:
    """The ``ScoreSet`` of an ``adreg.evaluation.EvalResult`` (samples, scores, maps, masks of the defective
    images; good images get all-zero masks, exactly as ``evaluate`` computed its pixel metrics)."""
    labels = np.array([s.label for s in result.samples], dtype=np.int64)
    masks = result.masks or {}
    if not masks:
        return ScoreSet(labels, result.scores, points=result.metrics)
    idx = np.array([i for i, s in enumerate(result.samples) if s.label == 0 or i in masks], dtype=np.int64)
    maps = np.asarray(result.maps)[idx]
    zeros = np.zeros(maps.shape[1:], dtype=bool)
    stacked = np.stack([masks.get(int(i), zeros) for i in idx])
    return ScoreSet(labels, result.scores, maps, stacked, idx, points=result.metrics)


# -- weighted metrics: one sort, many resamples ---------------------------------------------------------------
def _resample_counts(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, N) multiplicities of the N images in ``n`` stratified resamples (good and defective separately)."""
    N = labels.size
    draws = [rng.choice(np.flatnonzero(labels == c), (n, int((labels == c).sum())))
             for c in (0, 1) if (labels == c).any()]
    draws = np.concatenate(draws, axis=1)
    flat = (draws + np.arange(n)[:, None] * N).ravel()
    return np.bincount(flat, minlength=n * N).reshape(n, N).astype(np.float64)


class _PairAUROC:
    """AUROC of any resample in one bilinear form. ``A[i, k]`` = pairs (defective element of owner i, normal
    element of owner k) ranked right, ties 1/2; an owner is an image (its score, or its pixels). A resample
    with multiplicities ``w`` has AUROC = w A w / ((w . n_pos) (w . n_neg)), exactly ``adreg.metrics.auroc`` of
    the concatenated resampled images (trapezoid AUROC = Mann-Whitney with ties 1/2)."""

    def __init__(self, y: np.ndarray, score: np.ndarray, owner: np.ndarray, n_owner: int):
        y = np.asarray(y).ravel().astype(bool)
        s = np.asarray(score, dtype=np.float64).ravel()
        owner = np.asarray(owner).ravel()
        pos_s, pos_o = s[y], owner[y]
        neg_s, neg_o = s[~y], owner[~y]
        order = np.lexsort((neg_s, neg_o))
        neg_s, neg_o = neg_s[order], neg_o[order]
        bounds = np.searchsorted(neg_o, np.arange(n_owner + 1))
        self.A = np.zeros((n_owner, n_owner))
        for k in range(n_owner):
            seg = neg_s[bounds[k]:bounds[k + 1]]
            if seg.size and pos_s.size:
                below = np.searchsorted(seg, pos_s, "left")
                ties = np.searchsorted(seg, pos_s, "right") - below
                self.A[:, k] = np.bincount(pos_o, weights=below + 0.5 * ties, minlength=n_owner)
        self.n_pos = np.bincount(pos_o, minlength=n_owner).astype(np.float64)
        self.n_neg = np.diff(bounds).astype(np.float64)

    def auroc(self, w: np.ndarray) -> np.ndarray:
        """AUROC for each row of weights ``w`` (B, n_owners); NaN where a class has zero weight."""
        w = np.atleast_2d(w)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.einsum("bi,ik,bk->b", w, self.A, w) / ((w @ self.n_pos) * (w @ self.n_neg))


class _ProCurve:
    """AUPRO of any resample (as ``adreg.metrics.aupro``): pixels sorted once; a resample weights each pixel by
    its image's multiplicity (an image drawn twice has its regions twice). Only the pixels above the deepest
    threshold any resample can need are kept: where every image's own false-positive rate reaches
    ``max_fpr``, so does every weighted mix of them."""

    def __init__(self, masks: np.ndarray, maps: np.ndarray, max_fpr: float = AUPRO_MAX_FPR):
        n = masks.shape[0]
        region = np.zeros(masks.shape, dtype=np.int64)
        structure, total = np.ones((3, 3), dtype=bool), 0
        regions_per = np.zeros(n)
        for i in range(n):  # 8-connected regions per image, numbered globally (as adreg.metrics.aupro)
            lab, k = ndimage.label(masks[i], structure=structure)
            region[i] = np.where(lab > 0, lab + total, 0)
            total, regions_per[i] = total + k, k
        owner = np.broadcast_to(np.arange(n)[:, None, None], masks.shape).ravel()
        region = region.ravel()
        sizes = np.bincount(region).astype(np.float64)
        order = _metrics.descending_order(maps)
        s = np.asarray(maps, dtype=np.float64).ravel()[order]
        r, o = region[order], owner[order]
        last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
        normal = r == 0
        self.normal_per = np.bincount(owner[region == 0], minlength=n).astype(np.float64)
        self.regions_per, self.max_fpr = regions_per, max_fpr
        # deepest position any resample can need: per image, its ceil(max_fpr * n_k)-th normal pixel
        depth = s.size - 1
        if normal.any():
            pos_n, own_n = np.flatnonzero(normal), o[normal]
            rank = np.empty(pos_n.size, dtype=np.int64)
            starts = np.r_[0, np.cumsum(self.normal_per)[:-1]].astype(np.int64)
            by_owner = np.argsort(own_n, kind="stable")
            rank[by_owner] = np.arange(pos_n.size) - np.repeat(starts, self.normal_per.astype(np.int64))
            need = np.ceil(max_fpr * self.normal_per[own_n] - 1e-9).astype(np.int64) - 1
            hit = rank == need
            depth = int(pos_n[hit].max()) if hit.any() else depth
        end = int(last[np.searchsorted(last, depth)]) + 1  # to the end of that tie group
        self.last = last[last < end]
        self.owner, self.normal = o[:end], normal[:end]
        self.inv_size = np.where(r[:end] > 0, 1.0 / sizes[r[:end]], 0.0)

    def aupro(self, w: np.ndarray) -> np.ndarray:
        w = np.atleast_2d(w)
        out = np.full(len(w), np.nan)
        for b, wb in enumerate(w):
            n_regions, n_normal = float(wb @ self.regions_per), float(wb @ self.normal_per)
            if n_regions <= 0 or n_normal <= 0:
                continue
            wp = wb[self.owner]
            pro = np.r_[0.0, np.cumsum(wp * self.inv_size)[self.last] / n_regions]
            fpr = np.r_[0.0, np.cumsum(wp * self.normal)[self.last] / n_normal]
            cut = int(np.searchsorted(fpr, self.max_fpr, side="right"))
            if cut < fpr.size:
                pro_at = np.interp(self.max_fpr, fpr[cut - 1:cut + 1], pro[cut - 1:cut + 1])
                fpr, pro = np.r_[fpr[:cut], self.max_fpr], np.r_[pro[:cut], pro_at]
            out[b] = np.trapezoid(pro, fpr) / self.max_fpr
        return out


def _downsample(maps: np.ndarray, masks: np.ndarray, size: int | None):
    """Maps block-averaged, masks block-max-pooled by an integer factor to about ``size`` a side."""
    if not size:
        return np.asarray(maps, dtype=np.float64), masks
    n, h, w = maps.shape
    fh, fw = max(1, h // size), max(1, w // size)
    if fh == fw == 1:
        return np.asarray(maps, dtype=np.float64), masks
    h2, w2 = h // fh * fh, w // fw * fw
    small = np.asarray(maps[:, :h2, :w2], dtype=np.float64).reshape(n, h2 // fh, fh, w2 // fw, fw).mean(axis=(2, 4))
    small_masks = masks[:, :h2, :w2].reshape(n, h2 // fh, fh, w2 // fw, fw).any(axis=(2, 4))
    return small, small_masks


def _pixel_curves(s: ScoreSet, size: int | None) -> tuple[_PairAUROC, _ProCurve, tuple[int, int]]:
    maps, masks = _downsample(s.maps, s.masks, size)
    owner = np.broadcast_to(np.arange(maps.shape[0])[:, None, None], maps.shape)
    return _PairAUROC(masks, maps, owner, maps.shape[0]), _ProCurve(masks, maps), maps.shape[1:]


# -- results --------------------------------------------------------------------------------------------------
@dataclass
class Interval:
    """A metric's point value (full resolution) and its bootstrap interval at ``level``."""

    metric: str
    value: float
    low: float
    high: float
    level: float
    n_resamples: int
    method: str

    def text(self, digits: int = 3) -> str:
        return f"{self.value:.4f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass
class PairedTest:
    """Candidate minus baseline on the same images: difference, its interval at ``level``, two-sided p."""

    metric: str
    candidate: float
    baseline: float
    diff: float
    low: float
    high: float
    p_value: float
    level: float
    method: str

    def text(self) -> str:
        return f"{self.diff:+.4f} [{self.low:+.3f}, {self.high:+.3f}]"


@dataclass
class Resampling:
    """How the intervals were drawn (reported with them)."""

    n_resamples: int
    pixel_resamples: int
    pixel_size: tuple[int, int] | None
    seed: int
    seconds: float = 0.0


@dataclass
class Comparison:
    """What ``compare`` measured on one evaluation set: the candidate's intervals, the baseline's (None without
    a baseline), the paired tests candidate - baseline (None without a baseline) and how it resampled."""

    candidate: dict[str, Interval]
    baseline: dict[str, Interval] | None
    paired: dict[str, PairedTest] | None
    resampling: Resampling


def _quantiles(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not values.size:
        return float("nan"), float("nan")
    alpha = 1.0 - level
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _bootstrap_values(sets: list[ScoreSet], n_resamples: int, pixel_resamples: int, seed: int,
                      pixel_size: int | None) -> tuple[dict, dict, tuple[int, int] | None]:
    """Per set: {metric: (full-resolution point, point at resampling resolution, resampled values)}."""
    labels = sets[0].labels
    for s in sets[1:]:
        if not np.array_equal(s.labels, labels) or s.has_pixels != sets[0].has_pixels or (
                s.has_pixels and not np.array_equal(s.pixel_index, sets[0].pixel_index)):
            raise ValueError("the models were not evaluated on the same images (labels or masked images differ)")
    rng = np.random.default_rng(seed)
    counts = _resample_counts(labels, max(n_resamples, pixel_resamples), rng)
    ones = np.ones(labels.size)
    out: list[dict] = []
    low_res = None
    for s in sets:
        points = s.point_values()
        vals: dict = {}
        if "image_auroc" in points:
            pairs = _PairAUROC(s.labels, s.scores, np.arange(labels.size), labels.size)
            vals["image_auroc"] = (points["image_auroc"], points["image_auroc"], pairs.auroc(counts[:n_resamples]))
        if s.has_pixels and pixel_resamples > 0:
            pairs, pro, low_res = _pixel_curves(s, pixel_size)
            w = counts[:pixel_resamples][:, s.pixel_index]
            w1 = ones[s.pixel_index]
            vals["pixel_auroc"] = (points["pixel_auroc"], float(pairs.auroc(w1)[0]), pairs.auroc(w))
            vals["aupro"] = (points["aupro"], float(pro.aupro(w1)[0]), pro.aupro(w))
        out.append(vals)
    return out, counts, low_res


def _interval(metric: str, full: float, low_point: float, boots: np.ndarray, level: float, method: str) -> Interval:
    lo, hi = _quantiles(boots + (full - low_point), level)
    return Interval(metric, float(full), max(0.0, lo), min(1.0, hi), level, int(boots.size), method)


def _methods(res: Resampling) -> dict[str, str]:
    px = "" if res.pixel_size is None else f" at {res.pixel_size[0]}x{res.pixel_size[1]}"
    return {"image_auroc": f"stratified bootstrap ({res.n_resamples})",
            **{m: f"stratified bootstrap ({res.pixel_resamples}{px}, shifted to full resolution)"
               for m in PIXEL_METRICS}}


def bootstrap_intervals(s: ScoreSet, level: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES,
                        pixel_resamples: int = DEFAULT_PIXEL_RESAMPLES, seed: int = 0,
                        pixel_size: int | None = DEFAULT_PIXEL_SIZE) -> dict[str, Interval]:
    """Stratified bootstrap intervals of image AUROC and (with masks) pixel AUROC and AUPRO."""
    return compare(s, None, level, n_resamples, pixel_resamples, seed, pixel_size).candidate


def delong_test(labels, scores_a, scores_b, level: float = 0.95) -> PairedTest:
    """DeLong's test of AUROC(a) - AUROC(b) for two models scored on the same images (fast DeLong, Sun & Xu
    2014): structural components from midranks, their covariance, a normal interval and two-sided p."""
    y = np.asarray(labels).astype(bool).ravel()
    X = np.vstack([np.asarray(scores_a, dtype=np.float64).ravel(), np.asarray(scores_b, dtype=np.float64).ravel()])
    pos, neg = X[:, y], X[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        raise ValueError("DeLong's test needs good and defective images")
    tx, ty = rankdata(pos, axis=1), rankdata(neg, axis=1)
    tz = rankdata(np.hstack([pos, neg]), axis=1)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    diff = float(aucs[0] - aucs[1])
    if m < 2 or n < 2:  # no covariance from one image of a class
        var = float("nan")
    else:
        v01 = (tz[:, :m] - tx) / n          # per defective image: fraction of good images below it
        v10 = 1.0 - (tz[:, m:] - ty) / m    # per good image: fraction of defective images above it
        cov = np.cov(v01) / m + np.cov(v10) / n
        var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    z_level = norm.ppf(0.5 + level / 2)
    if not math.isfinite(var):
        p, lo, hi = float("nan"), float("nan"), float("nan")
    elif var <= 1e-15:  # the same ranking (or both perfect): no variance of the difference
        p, lo, hi = (1.0 if abs(diff) < 1e-12 else 0.0), diff, diff
    else:
        se = math.sqrt(var)
        p = float(2 * norm.sf(abs(diff) / se))
        lo, hi = max(-1.0, diff - z_level * se), min(1.0, diff + z_level * se)
    return PairedTest("image_auroc", float(aucs[0]), float(aucs[1]), diff, lo, hi, p, level, "DeLong")


def _bootstrap_p(d: np.ndarray) -> float:
    d = d[np.isfinite(d)]
    if not d.size:
        return float("nan")
    tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
    return float(min(1.0, 2 * (tail + 1) / (d.size + 1)))


def compare(candidate: ScoreSet, baseline: ScoreSet | None = None, level: float = 0.95,
            n_resamples: int = DEFAULT_RESAMPLES, pixel_resamples: int = DEFAULT_PIXEL_RESAMPLES, seed: int = 0,
            pixel_size: int | None = DEFAULT_PIXEL_SIZE) -> Comparison:
    """Intervals of the candidate (and of the baseline) from the same resampled images, and the paired tests
    candidate - baseline (DeLong for image AUROC, paired bootstrap for the pixel metrics)."""
    t0 = time.perf_counter()
    sets = [candidate] if baseline is None else [candidate, baseline]
    if not (candidate.n_good and candidate.n_defective):
        res = Resampling(n_resamples, pixel_resamples, None, seed, time.perf_counter() - t0)
        return Comparison({}, None if baseline is None else {}, None if baseline is None else {}, res)
    values, _, low_res = _bootstrap_values(sets, n_resamples, pixel_resamples, seed, pixel_size)
    res = Resampling(n_resamples, pixel_resamples if candidate.has_pixels else 0,
                     low_res if low_res and low_res != tuple(candidate.maps.shape[1:]) else None, seed)
    methods = _methods(res)
    intervals = [{k: _interval(k, *v, level, methods[k]) for k, v in vals.items()} for vals in values]
    paired = None
    if baseline is not None:
        paired = {"image_auroc": delong_test(candidate.labels, candidate.scores, baseline.scores, level)}
        # the reported values are adreg's own (trapezoid AUROC = the DeLong/Mann-Whitney AUROC, ties 1/2)
        p = paired["image_auroc"]
        p.candidate, p.baseline = values[0]["image_auroc"][0], values[1]["image_auroc"][0]
        for k in PIXEL_METRICS:
            if k in values[0] and k in values[1]:
                (cf, cl, cb), (bf, bl, bb) = values[0][k], values[1][k]
                d = (cb - bb) + ((cf - bf) - (cl - bl))
                lo, hi = _quantiles(d, level)
                px = "" if res.pixel_size is None else f", {res.pixel_size[0]}x{res.pixel_size[1]}"
                paired[k] = PairedTest(k, cf, bf, cf - bf, lo, hi, _bootstrap_p(d), level,
                                       f"paired bootstrap ({res.pixel_resamples}{px})")
    res.seconds = time.perf_counter() - t0
    return Comparison(intervals[0], None if baseline is None else intervals[1], paired, res)


def paired_tests(candidate: ScoreSet, baseline: ScoreSet, level: float = 0.95,
                 pixel_resamples: int = DEFAULT_PIXEL_RESAMPLES, seed: int = 0,
                 pixel_size: int | None = DEFAULT_PIXEL_SIZE) -> dict[str, PairedTest]:
    """Only the paired tests candidate - baseline (see ``compare``)."""
    return compare(candidate, baseline, level, 0 if candidate.has_pixels else 1, pixel_resamples, seed,
                   pixel_size).paired or {}


# -- the decision ---------------------------------------------------------------------------------------------
@dataclass
class MetricVerdict:
    """One metric's verdict, the evidence it rests on (the candidate's interval, the floor, the baseline's interval,
    the paired test) and the reasons of a refusal."""

    metric: str
    verdict: str
    candidate: Interval
    floor: float | None = None
    baseline: Interval | None = None
    paired: PairedTest | None = None
    reasons: list[str] = field(default_factory=list)


@dataclass
class GateDecision:
    """The gate's verdict per metric and overall, with the evidence it rests on."""

    verdict: str
    metrics: dict[str, MetricVerdict]
    n_good: int
    n_defective: int
    level: float
    min_per_class: int
    failures: list[str] = field(default_factory=list)
    resampling: Resampling | None = None
    n_masked: int | None = None

    @property
    def passed(self) -> bool:
        return self.verdict == PROMOTE

    def summary(self) -> dict:
        """JSON-ready and compact (recorded with every lifecycle event)."""
        r5 = lambda x: None if x is None or not math.isfinite(x) else round(float(x), 5)  # noqa: E731
        res = self.resampling
        out = {"verdict": self.verdict, "verdicts": {k: v.verdict for k, v in self.metrics.items()},
               "n_good": self.n_good, "n_defective": self.n_defective, "level": self.level,
               "min_per_class": self.min_per_class,
               "candidate_intervals": {k: [r5(v.candidate.low), r5(v.candidate.high)] for k, v in self.metrics.items()},
               "baseline_intervals": {k: [r5(v.baseline.low), r5(v.baseline.high)] for k, v in self.metrics.items()
                                      if v.baseline is not None},
               "paired": {k: {"diff": r5(v.paired.diff), "low": r5(v.paired.low), "high": r5(v.paired.high),
                              "p": r5(v.paired.p_value), "method": v.paired.method}
                          for k, v in self.metrics.items() if v.paired is not None}}
        if self.n_masked is not None:
            out["n_masked"] = self.n_masked
        if res is not None:
            out.update({"n_resamples": res.n_resamples, "pixel_resamples": res.pixel_resamples,
                        "pixel_size": None if res.pixel_size is None else f"{res.pixel_size[0]}x{res.pixel_size[1]}",
                        "seed": res.seed, "gate_seconds": round(res.seconds, 2)})
        return out


def decide(candidate: dict[str, Interval], paired: dict[str, PairedTest] | None, floors: dict[str, float],
           level: float, n_good: int, n_defective: int, min_per_class: int = DEFAULT_MIN_PER_CLASS,
           baseline: dict[str, Interval] | None = None, baseline_name: str = "the baseline",
           margin: float = DEFAULT_MARGIN) -> GateDecision:
    """Verdict per metric and overall (rules in the module docstring): ``not enough evidence`` (the set has
    fewer than ``min_per_class`` good or defective images), ``below floor`` (the whole interval under the
    floor), ``worse`` (paired p < 1 - level and difference < -margin), else ``promote``."""
    alpha = 1.0 - level
    small = n_good < max(min_per_class, 1) or n_defective < max(min_per_class, 1)
    failures: list[str] = []
    verdicts: dict[str, MetricVerdict] = {}
    for key in GATED:
        if key not in candidate:
            continue
        c = candidate[key]
        v = MetricVerdict(key, PROMOTE, c, floors.get(key), (baseline or {}).get(key), (paired or {}).get(key))
        if small:
            v.verdict = NOT_ENOUGH
        else:
            if v.floor is not None and c.high < v.floor:
                v.reasons.append(f"{key} {c.text()} is below the floor {v.floor:.4f} (the whole {level:.0%} "
                                 "interval)")
            t = v.paired
            worse = t is not None and math.isfinite(t.p_value) and t.p_value < alpha and t.diff < -margin
            if worse:
                v.reasons.append(f"{key} {t.candidate:.4f} is significantly worse than {baseline_name}'s "
                                 f"{t.baseline:.4f}: difference {t.text()} (beyond the margin {margin:g}), "
                                 f"{t.method} p = {t.p_value:.3g} < {alpha:.3g}")
            v.verdict = BELOW_FLOOR if (v.floor is not None and c.high < v.floor) else WORSE if worse else PROMOTE
        failures.extend(v.reasons)
        verdicts[key] = v
    if small:
        verdict = NOT_ENOUGH
        failures.insert(0, f"not enough evidence: the evaluation set has {n_good} good and {n_defective} defective "
                           f"image(s); the gate needs at least {max(min_per_class, 1)} of each to tell")
    elif not verdicts:
        verdict = NOT_ENOUGH
        failures.append("not enough evidence: the evaluation set measures none of "
                        f"{', '.join(GATED)} (it needs good and defective images)")
    else:
        found = {v.verdict for v in verdicts.values()}
        verdict = BELOW_FLOOR if BELOW_FLOOR in found else WORSE if WORSE in found else PROMOTE
    return GateDecision(verdict, verdicts, n_good, n_defective, level, min_per_class, failures)


def evaluate_gate(candidate: ScoreSet, baseline: ScoreSet | None, floors: dict[str, float], level: float = 0.95,
                  n_resamples: int = DEFAULT_RESAMPLES, pixel_resamples: int = DEFAULT_PIXEL_RESAMPLES,
                  seed: int = 0, min_per_class: int = DEFAULT_MIN_PER_CLASS,
                  pixel_size: int | None = DEFAULT_PIXEL_SIZE, baseline_name: str = "the baseline",
                  margin: float = DEFAULT_MARGIN) -> GateDecision:
    """Intervals, paired tests and the decision in one call (what the promotion gate runs)."""
    measured = compare(candidate, baseline, level, n_resamples, pixel_resamples, seed, pixel_size)
    decision = decide(measured.candidate, measured.paired, floors, level, candidate.n_good, candidate.n_defective,
                      min_per_class, measured.baseline, baseline_name, margin)
    decision.resampling = measured.resampling
    decision.n_masked = candidate.n_masked if candidate.has_pixels else None
    return decision
