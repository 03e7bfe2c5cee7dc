"""The model work of a fit and of an update, in one place: data -> shots -> detector -> grow -> threshold ->
evaluation.

Pure computation, no MLflow: ``adreg.registry.tracking`` logs what ``fit_category`` returns, and
``adreg.registry.update`` resolves and downloads a parent, then hands it to ``grow_detector``. Keeping them
apart lets the benchmarks fit many models through the same code without logging each, and keeps this
testable on its own. Every result carries the calibration images with the scores they got
(``calibration``), so nothing is scored twice to be logged.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adreg.backbones import build_backbone
from adreg.data import CategoryData, default_category_dir, resolve_dataset, split_shots
from adreg.detector import AnomalyDetector, resolve_device
from adreg.errors import ConfigError, DataError
from adreg.evaluation import EvalResult, evaluate, score_samples
from adreg.methods import build_method
from adreg.names import ROUTER, check_category
from adreg.options import FitOptions  # noqa: F401 - re-exported: adreg.fitting.FitOptions
from adreg.thresholds import calibrate

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    options: FitOptions
    detector: AnomalyDetector
    data: CategoryData
    shots: list[Path]
    calibration_source: str
    evaluation: EvalResult | None
    calibration: list[dict] = field(default_factory=list)  # path, label, score (+ origin) of each calibration image

    def metrics(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.detector.fit_info.items() if isinstance(v, (int, float))}
        out.update(self.detector.method.summary())
        out["threshold"] = self.detector.threshold.value
        if self.evaluation is not None:
            out.update(self.evaluation.metrics)
        return out


def load_category_data(opts: FitOptions) -> CategoryData:
    train_dir = opts.train_dir
    if train_dir is None:
        default = default_category_dir(opts.category)
        if default is None:
            raise DataError(f"no --train-dir given and no bundled data for category {opts.category!r}; "
                            "point --train-dir at a folder of good images or an MVTec category folder")
        train_dir = str(default)
    return resolve_dataset(train_dir, opts.val_dir, opts.test_dir)


def fit_category(opts: FitOptions, show_progress: bool = True, backbone=None) -> FitResult:
    """Fit, calibrate and (when a test set exists) evaluate one detector.

    ``backbone``: an already built backbone to use instead of building ``opts.backbone`` (the benchmarks
    pass one with a feature cache below it; it must match ``opts``' backbone, layers and image size)."""
    check_category(opts.category)
    if opts.category == ROUTER:
        raise ConfigError("'router' is reserved for the multi-category router model; choose another category name")
    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    data = load_category_data(opts)
    holdout = 0 if data.val else opts.holdout
    shots, held_out = split_shots(data.train, opts.k_shot, opts.seed, holdout)
    if backbone is None:
        backbone = build_backbone(opts.backbone, layers=opts.layers, image_size=opts.image_size,
                                  precision=opts.precision)
    backbone = backbone.to(device)
    method = build_method(opts.method, **opts.method_params)
    opts.method_params = method.get_params()  # record the defaults too
    if opts.top_fraction is None:
        opts.top_fraction = method.default_top_fraction
    if method.needs_auxiliary:
        from adreg.detector import resolve_auxiliary_dir

        if resolve_auxiliary_dir(method.params["aux"]).resolve() == data.root.resolve():
            raise ConfigError(f"{opts.method} is zero-shot: its auxiliary dataset must not be the target category")
    detector = AnomalyDetector(backbone, method, sigma=opts.sigma, top_fraction=opts.top_fraction,
                               augment=opts.augment, aug_count=opts.aug_count, seed=opts.seed,
                               batch_size=opts.batch_size, aug_views=opts.aug_views)
    detector.fit(list(shots), show_progress=show_progress)  # paths: decoded a chunk at a time

    if data.val:
        source = "validation folder"
        scores, _, _ = score_samples(detector, data.val, show_progress)
        calibration = [{"path": str(x.path), "label": int(x.label), "score": float(s)} for s, x in zip(scores, data.val)]
    elif held_out:
        source = f"{len(held_out)} held-out good training images"
        scores = detector.predict(list(held_out), show_progress=show_progress).scores
        calibration = [{"path": str(p), "label": 0, "score": float(s)} for p, s in zip(held_out, scores)]
    else:
        raise DataError(f"no validation images: all {len(data.train)} training images are shots; "
                        "give --val-dir, or use a smaller --k-shot so some good images can be held out")
    good = [c["score"] for c in calibration if c["label"] == 0]
    bad = [c["score"] for c in calibration if c["label"] == 1]
    detector.threshold = calibrate(good, bad, q=opts.threshold_quantile)
    detector.threshold.details["source"] = source
    detector.set_normal_scores(good)
    evaluation = None
    if data.test:
        evaluation = evaluate(detector, data.test, detector.threshold.value, show_progress)
    return FitResult(opts, detector, data, shots, source, evaluation, calibration)


# -- growing a fitted detector (adreg update) ---------------------------------------------------------------
@dataclass
class GrowResult:
    """What ``grow_detector`` did to a detector: the indices (into the images it was given) it learned from
    and calibrated on, the suspects it held out and those a second look cleared, the method's report, the
    new calibration and evaluation."""

    train_index: list[int]
    calibration_index: list[int]
    suspects: list[dict]          # held out: path, score (parent), second_score / second_threshold (grown model)
    parent_threshold: float
    method_report: dict
    calibration: list[dict]       # path, label, score, origin
    calibration_source: str
    threshold_quantile: float
    evaluation: EvalResult | None
    cleared: list[dict] = field(default_factory=list)  # suspects the grown model cleared, then learned from


#: report keys of ``AnomalyDetector.update`` (and the methods' reports) that count what one update did
ADDITIVE_REPORT_KEYS = ("n_images", "n_views", "seconds", "views_added", "patches_added", "n_views_added",
                        "update_steps")
#: ``fit_info`` timings that ``AnomalyDetector.update`` sets for the last update only
UPDATE_TIMINGS = ("update_seconds", "update_feature_seconds", "update_method_seconds")


def _merge_reports(first: dict, second: dict) -> dict:
    """One report for two successive ``AnomalyDetector.update`` calls (the second look's): counts and seconds
    add up, the state before is the first's (``*_before``, copies per good), after it the second's, the
    method's words are both."""
    out = {**first, **second}
    for key in ADDITIVE_REPORT_KEYS:
        if key in first and key in second:
            out[key] = first[key] + second[key]
    for key in first:
        if key.endswith("_before") or key == "aug_copies":
            out[key] = first[key]
    if first.get("what") or second.get("what"):
        out["what"] = f"{first.get('what', '')}; then, for the suspects cleared on a second look, {second.get('what', '')}"
    return out


def _recalibrate(detector: AnomalyDetector, paths: list[Path], cal_idx: list[int], learned: set[str], q: float,
                 min_calibration: int, parent_calibration, parent_label: str, show_progress: bool):
    """Recalibrate ``detector``'s threshold by its own rule (see ``grow_detector``); (calibration, source)."""
    calibration: list[dict] = []
    if cal_idx:
        scores = detector.predict([paths[i] for i in cal_idx], show_progress=show_progress).scores
        calibration = [{"path": str(paths[i]), "label": 0, "score": float(s), "origin": "held-out new good"}
                       for i, s in zip(cal_idx, scores)]
    n_new_cal = len(calibration)
    rule = detector.threshold.rule
    used_parent = 0
    if n_new_cal < min_calibration or rule == "f1_optimal":
        refs = [r for r in parent_calibration if r["path"] not in learned and Path(r["path"]).is_file()
                and (rule == "f1_optimal" or int(r["label"]) == 0)]
        if refs:
            scores = detector.predict([Path(r["path"]) for r in refs], show_progress=show_progress).scores
            calibration += [{"path": r["path"], "label": int(r["label"]), "score": float(s),
                             "origin": f"{parent_label} calibration"} for r, s in zip(refs, scores)]
            used_parent = len(refs)
    good = [c["score"] for c in calibration if c["label"] == 0]
    bad = [c["score"] for c in calibration if c["label"] == 1]
    if not good:
        raise DataError(f"no good images left to recalibrate the threshold on ({parent_label}'s calibration "
                        "images are not on this machine and too few new ones were given); add more good images")
    detector.threshold = calibrate(good, bad if rule == "f1_optimal" else None, q=q)
    detector.set_normal_scores(good)
    parts = [f"{n_new_cal} held-out new good images"] if n_new_cal else []
    if used_parent:
        parts.append(f"{used_parent} of {parent_label}'s calibration images")
    source = " + ".join(parts)
    detector.threshold.details["source"] = source
    return calibration, source


def contamination_guard(scores, threshold: float, include_suspects: bool = False) -> tuple[list[int], list[int]]:
    """The guard of an update: (indices kept, indices suspect) of new good images scored by the current model.
    A suspect scores above ``threshold`` (the model's own); it is kept only with ``include_suspects``."""
    suspects = [i for i, s in enumerate(scores) if s > threshold]
    keep = [i for i, s in enumerate(scores) if include_suspects or s <= threshold]
    return keep, suspects


def grow_detector(detector: AnomalyDetector, paths: list[Path], *, include_suspects: bool = False,
                  second_look: bool = True, holdout: int = 20, min_calibration: int = 20, seed: int = 0,
                  parent_calibration: list[dict] = (), parent_label: str = "the parent",
                  threshold_quantile: float = 0.99, eval_samples: list | None = None,
                  show_progress: bool = True) -> GrowResult:
    """Grow a fitted, calibrated ``detector`` (in place) with the new good images at ``paths``.

    Images are decoded lazily, a batch (scoring) or a chunk (learning) at a time, never all at once, so
    memory is bounded by the model, a chunk and the evaluation set, not by the number of new goods.

    * contamination guard (``contamination_guard``): images the detector itself scores above its threshold
      are suspects, held out unless ``include_suspects``;
    * of the accepted images, ``holdout`` (at most half) are held out, the rest are learned from
      (``AnomalyDetector.update``);
    * the threshold is recalibrated by the detector's own rule on the held-out new goods, plus the parent's
      calibration images (``parent_calibration``: path, label; those on this machine and not learned from)
      when fewer than ``min_calibration`` new ones are held out or the rule needs defects (f1_optimal);
    * ``second_look``: the grown, recalibrated detector scores the held-out suspects again; those it
      scores at or below its own threshold are cleared and learned from (a second update), and the
      threshold is recalibrated once more. The parent judged with less variety than the grown model
      holds: on MTD (seed 0) a 214-good RAD parent flagged 117 of 576 new goods, the second look cleared
      45 (docs/benchmarks/growth.md). A suspect the grown model still scores above its threshold stays
      held out and listed;
    * ``eval_samples`` (the parent's evaluation set) evaluate the grown detector.
    Raises ``DataError`` when nothing is left to learn from or to calibrate on."""
    if detector.threshold is None:
        raise ConfigError("the detector has no calibrated threshold; refit it")
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("no new images to grow with; nothing registered")
    parent_threshold = float(detector.threshold.value)
    parent_scores = detector.predict(paths, show_progress=show_progress).scores
    keep, suspect_idx = contamination_guard(parent_scores, parent_threshold, include_suspects)
    if not keep:
        raise DataError(f"all {len(paths)} new image(s) score above {parent_label}'s threshold "
                        f"{parent_threshold:.4g} (suspected defects); check them, or pass --include-suspects "
                        "to take them in; nothing registered")
    order = list(keep)
    random.Random(seed).shuffle(order)
    n_cal = min(max(holdout, 0), len(order) // 2)
    cal_idx, train_idx = sorted(order[:n_cal]), sorted(order[n_cal:])
    method_report = detector.update([paths[i] for i in train_idx], show_progress=show_progress)

    q = float(detector.threshold.details.get("q") or threshold_quantile)

    def recalibrate():
        return _recalibrate(detector, paths, cal_idx, {str(paths[i]) for i in train_idx}, q, min_calibration,
                            parent_calibration, parent_label, show_progress)

    calibration, source = recalibrate()
    second: dict[int, float] = {}
    grown_threshold = float("nan")
    if second_look and not include_suspects and suspect_idx:
        scores = detector.predict([paths[i] for i in suspect_idx], show_progress=show_progress).scores
        second = {i: float(s) for i, s in zip(suspect_idx, scores)}
        grown_threshold = float(detector.threshold.value)
        cleared_idx = [i for i in suspect_idx if second[i] <= grown_threshold]
        if cleared_idx:
            first = {k: detector.fit_info[k] for k in UPDATE_TIMINGS}
            method_report = _merge_reports(method_report, detector.update([paths[i] for i in cleared_idx],
                                                                           show_progress=show_progress))
            for key in UPDATE_TIMINGS:  # the fit_info of both updates, as the merged report
                detector.fit_info[key] += first[key]
            train_idx = sorted(train_idx + cleared_idx)
            calibration, source = recalibrate()

    def looked(i: int) -> dict:
        return {"second_score": second[i], "second_threshold": grown_threshold} if i in second else {}

    cleared = [{"path": str(paths[i]), "score": float(parent_scores[i]), **looked(i)}
               for i in suspect_idx if i in second and i in train_idx]
    suspects = [{"path": str(paths[i]), "score": float(parent_scores[i]), **looked(i)}
                for i in suspect_idx if i not in train_idx and i not in cal_idx]
    if include_suspects:  # taken in: listed as suspects all the same (the report says they were included)
        suspects = [{"path": str(paths[i]), "score": float(parent_scores[i])} for i in suspect_idx]
    evaluation = evaluate(detector, eval_samples, detector.threshold.value, show_progress) if eval_samples else None
    return GrowResult(train_idx, cal_idx, suspects, parent_threshold, method_report, calibration, source, q,
                      evaluation, cleared)
