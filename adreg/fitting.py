"""One fit of one category: data -> shots -> detector -> threshold -> evaluation.

Pure computation, no MLflow: ``adreg.registry.tracking`` logs what this returns. Keeping them apart lets the
benchmark fit many models without logging each, and keeps this testable on its own.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from adreg.backbones import DEFAULT_BACKBONE, build_backbone
from adreg.data import CategoryData, default_category_dir, resolve_dataset, split_shots
from adreg.detector import AnomalyDetector, resolve_device
from adreg.errors import ConfigError, DataError
from adreg.evaluation import EvalResult, evaluate, score_samples
from adreg.images import load_image
from adreg.methods import build_method
from adreg.thresholds import calibrate

log = logging.getLogger(__name__)
CATEGORY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def check_category(category: str) -> str:
    if not CATEGORY_RE.match(category or ""):
        raise ConfigError(f"category {category!r} must be 1-63 letters, digits, '_', '-' or '.', starting alphanumeric")
    return category


@dataclass
class FitOptions:
    """Everything that defines a fit; logged verbatim as run parameters."""

    category: str
    method: str = "subspace"
    train_dir: str | None = None
    val_dir: str | None = None
    test_dir: str | None = None
    k_shot: int = 1
    seed: int = 0
    backbone: str = DEFAULT_BACKBONE
    layers: list[int] | None = None
    image_size: int | None = None
    precision: str = "fp32"
    augment: str = "rotate"
    aug_count: int = 30
    sigma: float = 4.0
    top_fraction: float | None = None  # None: the method's default (mean of top 1%, or max for SPG)
    threshold_quantile: float = 0.99
    holdout: int = 20
    batch_size: int = 8
    device: str = "auto"
    method_params: dict = field(default_factory=dict)

    def params(self) -> dict:
        flat = {k: v for k, v in asdict(self).items() if k not in ("method_params", "device")}
        flat["fit_device"] = self.device  # "device" is the served model's model_config key
        flat.update({f"method.{k}": v for k, v in self.method_params.items()})
        return flat


@dataclass
class FitResult:
    options: FitOptions
    detector: AnomalyDetector
    data: CategoryData
    shots: list[Path]
    calibration_source: str
    evaluation: EvalResult | None

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


def fit_category(opts: FitOptions, show_progress: bool = True) -> FitResult:
    """Fit, calibrate and (when a test set exists) evaluate one detector."""
    check_category(opts.category)
    if opts.category == "router":
        raise ConfigError("'router' is reserved for the multi-category router model; choose another category name")
    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    data = load_category_data(opts)
    holdout = 0 if data.val else opts.holdout
    shots, held_out = split_shots(data.train, opts.k_shot, opts.seed, holdout)
    backbone = build_backbone(opts.backbone, layers=opts.layers, image_size=opts.image_size,
                              precision=opts.precision).to(device)
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
                               batch_size=opts.batch_size)
    detector.fit([load_image(p) for p in shots], show_progress=show_progress)

    if data.val:
        source = "validation folder"
        scores, _, _ = score_samples(detector, data.val, show_progress)
        good = [s for s, x in zip(scores, data.val) if x.label == 0]
        bad = [s for s, x in zip(scores, data.val) if x.label == 1]
    elif held_out:
        source = f"{len(held_out)} held-out good training images"
        good = detector.predict([load_image(p) for p in held_out], show_progress=show_progress).scores
        bad = []
    else:
        raise DataError(f"no validation images: all {len(data.train)} training images are shots; "
                        "give --val-dir, or use a smaller --k-shot so some good images can be held out")
    detector.threshold = calibrate(good, bad, q=opts.threshold_quantile)
    detector.threshold.details["source"] = source
    evaluation = None
    if data.test:
        evaluation = evaluate(detector, data.test, detector.threshold.value, show_progress)
    return FitResult(opts, detector, data, shots, source, evaluation)
