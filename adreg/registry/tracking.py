"""MLflow tracking: where runs go by default, and what a fit's run records (``log_record``); the run's pyfunc
model and its registration are ``adreg.registry.derive``'s."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow

from adreg import store
from adreg.names import fit_experiment_name
from adreg.store import adreg_home

if TYPE_CHECKING:  # the registry's listing commands need no torch
    from adreg.fitting import FitResult

EVAL_MANIFEST = "evaluation/manifest.json"


def configure(tracking_uri: str | None = None) -> str:
    """Point MLflow (tracking and registry) at ``tracking_uri``, $MLFLOW_TRACKING_URI or the sqlite default
    (``$ADREG_HOME/mlflow.db``, ``./adreg-store`` by default); returns the URI.

    A store that cannot be used (a database or server that does not answer, a sqlite folder that cannot be
    created) raises ``StoreUnreachable`` here, in seconds. Also switches MLflow's telemetry off and bounds its
    HTTP retries (unless the environment sets them), so that a server that goes down fails in seconds."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{adreg_home() / 'mlflow.db'}"
    if store.is_server(uri):
        # a store that is down fails in seconds, not after MLflow's default 7 retries with exponential backoff
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    store.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def ensure(tracking_uri: str | None = None) -> str:
    """The store the library works on: ``tracking_uri`` when given; else the one already set (by
    ``mlflow.set_tracking_uri``, an earlier ``configure`` or $MLFLOW_TRACKING_URI); else the sqlite default.
    Checked reachable like ``configure``; returns the URI."""
    if tracking_uri:
        return configure(tracking_uri)
    return configure(mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None)


def fit_experiment_id(category: str) -> str:
    """The experiment of a category's fit and update runs (``adreg-<category>``), created when missing."""
    return store.experiment_id(fit_experiment_name(category))


def sample_record(s) -> dict:
    return {"path": str(s.path), "label": s.label, "defect": s.defect,
            "mask_path": None if s.mask_path is None else str(s.mask_path)}


def _scores_csv(result: FitResult) -> str:
    buf = io.StringIO()
    rows = result.evaluation.rows(result.detector.threshold.value)
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _log_curves(run_id: str, curves: dict[str, list[float]]) -> None:
    """Training curves as metric series (one value per step), sent in batches."""
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    for key, values in curves.items():
        metrics = [Metric(key, float(v), now, step) for step, v in enumerate(values)]
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start:start + 1000])


def _without_conflicts(run_id: str, params: dict) -> dict:
    """Params safe to log on ``run_id``: under ``mlflow run`` the project's own parameters are already
    logged (e.g. ``train_dir=''``), so a differing resolved value goes in as ``resolved.<key>``."""
    existing = mlflow.MlflowClient().get_run(run_id).data.params
    out = {}
    for key, value in params.items():
        if key not in existing:
            out[key] = value
        elif existing[key] != value:
            out[f"resolved.{key}"] = value
    return out


def log_record(run_id: str, result: FitResult) -> None:
    """What the run says about the fit: tags, parameters, metrics, training curves, the method's report, the
    per-image test scores, the evaluation set's manifest (the promotion gate re-runs it) and the pictures."""
    opts, det = result.options, result.detector
    mlflow.set_tags({"adreg.category": opts.category, "adreg.method": opts.method,
                     "adreg.backbone": opts.backbone, "adreg.data_source": result.data.source})
    params = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in opts.params().items()}
    params.update({"threshold_rule": det.threshold.rule, "threshold_source": result.calibration_source})
    mlflow.log_params(_without_conflicts(run_id, params))
    mlflow.log_metrics(result.metrics())
    _log_curves(run_id, det.method.curves)
    report = det.method.report()
    if report:
        mlflow.log_dict(report, f"{opts.method}/report.json")
    mlflow.log_dict({"shots": [str(p) for p in result.shots], "threshold": vars(det.threshold)},
                    "fit/shots_and_threshold.json")
    if result.evaluation is None:
        return
    ev = result.evaluation
    mlflow.log_text(_scores_csv(result), "evaluation/test_scores.csv")
    mlflow.log_dict({"source": result.data.source, "samples": [sample_record(s) for s in result.data.test]},
                    EVAL_MANIFEST)
    from adreg.reports import save_report

    with tempfile.TemporaryDirectory() as tmp:
        save_report(Path(tmp) / "report", ev.samples, ev.scores, ev.maps, det.threshold.value, ev.masks,
                    title=f"{opts.category} {opts.method} k={opts.k_shot}")
        mlflow.log_artifacts(str(Path(tmp) / "report"), "report")
