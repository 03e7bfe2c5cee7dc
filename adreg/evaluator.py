"""adreg's MLflow evaluator plugin: ``mlflow.models.evaluate(model, data, model_type="anomaly_detection",
evaluators="adreg")``.

Registered under the entry point group ``mlflow.model_evaluator`` with the name ``adreg`` (pyproject.toml).
MLflow's default evaluator treats every output column of an adreg model as a classifier output and fails;
this one evaluates it as an anomaly detector::

    import mlflow, pandas as pd
    data = pd.DataFrame({"image": paths, "label": labels, "mask": mask_paths})   # mask optional (None: no mask)
    with mlflow.start_run():
        result = mlflow.models.evaluate("models:/adreg-bottle/1", data, targets="label",
                                        model_type="anomaly_detection", evaluators="adreg",
                                        evaluator_config={"n_resamples": 1000, "level": 0.95})
    result.metrics["image_auroc"], result.metrics["image_auroc_low"], result.metrics["image_auroc_high"]

``model_type`` must be ``"anomaly_detection"`` (MLflow asks a model type, or extra metrics without one).
``data``: one row per image; ``image`` holds a file path or base64-encoded image bytes; the ``targets`` column
holds the label (0 good, 1 defective); ``mask`` (optional) the path of a defect mask (pixel metrics need them).
It logs, on the evaluation run: image AUROC, image F1-max, and with masks pixel AUROC, AUPRO and pixel F1-max,
each AUROC / AUPRO with a stratified bootstrap interval (``<metric>_low`` / ``<metric>_high``,
``adreg.statistics``), the set's size, and the ROC curve, the score histogram with the threshold and a grid of
overlays as artifacts (``adreg.reports``). The model is scored by the detector inside the pyfunc model (the
one ``adreg serve`` runs), at full map resolution.

``evaluator_config`` keys: ``image_column`` ("image"), ``mask_column`` ("mask"), ``level`` (0.95),
``n_resamples`` (1000), ``pixel_resamples`` (200), ``seed`` (0), ``pictures`` (True).
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from pathlib import Path

from mlflow.models.evaluation import EvaluationResult, ModelEvaluator

from adreg.errors import ConfigError, DataError

DEFAULT_CONFIG = {"image_column": "image", "mask_column": "mask", "level": 0.95, "n_resamples": 1000,
                  "pixel_resamples": 200, "seed": 0, "pictures": True}


def _detector_of(model):
    """The ``AnomalyDetector`` inside a loaded adreg pyfunc model."""
    try:
        inner = model.unwrap_python_model()
    except Exception as exc:  # noqa: BLE001 - not a python_function model built from a PythonModel
        raise ConfigError(f"the adreg evaluator evaluates adreg models; this one is not ({exc})") from exc
    detector = getattr(inner, "detector", None)
    if detector is None:
        raise ConfigError("the adreg evaluator evaluates single-category adreg models (the router is not one)")
    return detector


def _as_file(value, folder: Path, i: int) -> Path:
    """An image given as a path, or as base64 bytes written to ``folder``."""
    if isinstance(value, (str, Path)) and len(str(value)) < 4096 and Path(str(value)).is_file():
        return Path(str(value))
    try:
        raw = base64.b64decode(str(value), validate=False)
    except (binascii.Error, ValueError) as exc:
        raise DataError(f"row {i}: the image is neither an existing file nor base64 ({exc})") from None
    target = folder / f"row_{i:06d}.img"
    target.write_bytes(raw)
    return target


def samples_from_frame(frame, labels, image_column: str, mask_column: str, folder: Path):
    """``adreg.data.Sample`` objects from an evaluation frame (images as paths or base64, optional masks)."""
    from adreg.data import Sample

    if image_column not in frame.columns:
        raise DataError(f"the evaluation data has no {image_column!r} column (image paths or base64)")
    if labels is None:
        raise DataError("the adreg evaluator needs labels: pass targets='<label column>' (0 good, 1 defective)")
    masks = frame[mask_column].tolist() if mask_column in frame.columns else [None] * len(frame)
    out = []
    for i, (image, label, mask) in enumerate(zip(frame[image_column].tolist(), list(labels), masks)):
        label = int(label)
        if label not in (0, 1):
            raise DataError(f"row {i}: label must be 0 (good) or 1 (defective), got {label}")
        mask_path = Path(str(mask)) if label == 1 and mask is not None and str(mask) not in ("", "nan", "None") else None
        if mask_path is not None and not mask_path.is_file():
            raise DataError(f"row {i}: mask {mask_path} does not exist")
        out.append(Sample(_as_file(image, folder, i), label, "defect" if label else "good", mask_path))
    return out


class AdregEvaluator(ModelEvaluator):
    """Evaluates an adreg pyfunc model on labelled images (see the module doc)."""

    @classmethod
    def can_evaluate(cls, *, model_type=None, evaluator_config=None, **kwargs) -> bool:
        return model_type in (None, "anomaly_detection", "adreg")

    def evaluate(self, *, model_type=None, dataset=None, run_id=None, evaluator_config=None, model=None,
                 extra_metrics=None, custom_artifacts=None, predictions=None, **kwargs) -> EvaluationResult:
        import mlflow

        from adreg.evaluation import evaluate
        from adreg.statistics import bootstrap_intervals, from_evaluation

        cfg = {**DEFAULT_CONFIG, **(evaluator_config or {})}
        if model is None:
            raise ConfigError("the adreg evaluator scores the model itself: pass a model, not predictions")
        detector = _detector_of(model)
        client = mlflow.MlflowClient()
        with tempfile.TemporaryDirectory() as tmp:
            samples = samples_from_frame(dataset.features_data, dataset.labels_data, cfg["image_column"],
                                         cfg["mask_column"], Path(tmp))
            result = evaluate(detector, samples, detector.threshold.value, show_progress=False)
            metrics = {k: float(v) for k, v in result.metrics.items()}
            n_bad = sum(s.label for s in samples)
            metrics.update(n_images=float(len(samples)), n_defective=float(n_bad),
                           n_good=float(len(samples) - n_bad), threshold=float(detector.threshold.value))
            if 0 < n_bad < len(samples):
                intervals = bootstrap_intervals(from_evaluation(result), level=float(cfg["level"]),
                                                n_resamples=int(cfg["n_resamples"]),
                                                pixel_resamples=int(cfg["pixel_resamples"]), seed=int(cfg["seed"]))
                for name, iv in intervals.items():
                    metrics[f"{name}_low"], metrics[f"{name}_high"] = float(iv.low), float(iv.high)
                metrics["interval_level"] = float(cfg["level"])
            client.log_batch(run_id, metrics=_metric_entities(metrics))
            artifacts = {}
            if cfg["pictures"] and 0 < n_bad < len(samples):
                from adreg.reports import save_report

                folder = Path(tmp) / "report"
                save_report(folder, samples, result.scores, result.maps, detector.threshold.value, result.masks,
                            title="adreg evaluation")
                client.log_artifacts(run_id, str(folder), "evaluation")
                from mlflow.models.evaluation.artifacts import ImageEvaluationArtifact

                artifacts = {p.stem: ImageEvaluationArtifact(f"runs:/{run_id}/evaluation/{p.name}")
                             for p in folder.glob("*.png")}
        return EvaluationResult(metrics=metrics, artifacts=artifacts, run_id=run_id)


def _metric_entities(metrics: dict) -> list:
    import math
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, v, now, 0) for k, v in metrics.items() if math.isfinite(v)]
