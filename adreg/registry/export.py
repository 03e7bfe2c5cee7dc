"""``adreg export``: a new registered version of a category whose backbone runs on ONNX Runtime or OpenVINO.

The source version's model is downloaded, its backbone exported into the detector folder
(``adreg.backbones.export``), and the result logged as a new run and pyfunc model the way ``adreg.registry.derive``
logs a fit: same signature, code and requirements (plus the runtime's package), the source run's
parameters, metrics and artifacts (evaluation set, lineage, reference scores), a fresh integrity manifest,
and ``model_config`` ``runtime`` set to the exported runtime, so serving it needs no configuration. The new
version's tags name the source version and run (``adreg.source.*``). Nothing is registered when the
export or its check against torch fails.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.models import Model

from adreg import integrity, store
from adreg.backbones.export import EXPORT_DIR, _import_runtime, check_runtime, export_into, read_manifest
from adreg.registry import derive, tracking
from adreg.registry.resolve import resolve

COPIED_RUN_TAGS = ("adreg.category", "adreg.method", "adreg.backbone", "adreg.data_source")


def _copy_run_artifacts(source_run_id: str, dst: Path) -> None:
    """Log the source run's artifacts (evaluation set, report, lineage, ...) into the active run; not its model."""
    client = mlflow.MlflowClient()
    for entry in client.list_artifacts(source_run_id):
        if entry.path == derive.MODEL_NAME_IN_RUN:
            continue
        local = mlflow.artifacts.download_artifacts(run_id=source_run_id, artifact_path=entry.path,
                                                    dst_path=str(dst))
        if entry.is_dir:
            mlflow.log_artifacts(local, entry.path)
        else:
            parent = str(Path(entry.path).parent)
            mlflow.log_artifact(local, None if parent == "." else parent)


def export_version(category: str, version, runtime: str = "openvino") -> derive.VersionOutcome:
    """Register a new version of ``adreg-<category>`` = version ``version`` with its backbone exported for
    ``runtime`` (onnxruntime or openvino); returns its run, model URI and version."""
    from adreg.pyfunc.served import DEFAULT_MODEL_CONFIG

    runtime = check_runtime(runtime, allow_torch=False)
    _import_runtime(runtime)  # fail before downloading anything
    ref = resolve(category, version)
    version, name = ref.version, ref.name
    client = mlflow.MlflowClient()
    mv = client.get_model_version(name, version)
    source_run = client.get_run(mv.run_id)
    with tempfile.TemporaryDirectory() as tmp:
        # export only what was registered: downloaded and verified against the version's digest
        source_dir = store.download_detector(name, version, Path(tmp) / "source", client)
        local = source_dir.parents[1]  # the downloaded model folder (MLmodel, input example)
        detector_dir = Path(tmp) / "detector"
        shutil.copytree(source_dir, detector_dir)
        (detector_dir / integrity.MANIFEST_FILE).unlink(missing_ok=True)
        shutil.rmtree(detector_dir / EXPORT_DIR, ignore_errors=True)  # re-exporting replaces an earlier export
        export_into(detector_dir, runtime)
        check = read_manifest(detector_dir)
        mlmodel = Model.load(str(local))
        source_config = dict((mlmodel.flavors.get("python_function") or {}).get("model_config") or {})
        example = mlmodel.load_input_example(str(local))
        backbone = source_run.data.tags.get("adreg.backbone", "")
        extra = (["transformers"] if backbone.startswith("hf:") else []) + [runtime]
        run_name = f"{source_run.info.run_name or 'v' + version}-{runtime}"
        with mlflow.start_run(experiment_id=tracking.fit_experiment_id(category), run_name=run_name):
            lineage = {"adreg.source.model": name, "adreg.source.version": version,
                       "adreg.source.run_id": mv.run_id, "adreg.runtime": runtime,
                       "adreg.exported_from": f"{name} version {version} (run {mv.run_id}), backbone on {runtime}"}
            mlflow.set_tags({**{k: source_run.data.tags[k] for k in COPIED_RUN_TAGS if k in source_run.data.tags},
                             **lineage})
            params = dict(source_run.data.params)
            params.update({"runtime": runtime, "source_version": version})
            for start in range(0, len(params), 100):
                mlflow.log_params(dict(list(params.items())[start:start + 100]))
            mlflow.log_metrics({**source_run.data.metrics, "export_max_relative_error": check["max_relative_error"]})
            _copy_run_artifacts(mv.run_id, Path(tmp) / "run-artifacts")
            mlflow.log_dict(check, "export/export.json")
            mlflow.set_tag(integrity.DIGEST_TAG, integrity.write_manifest(detector_dir))
            logged = derive.log_pyfunc(
                "_model_code.py", {"detector": str(detector_dir)}, example,
                model_config={**DEFAULT_MODEL_CONFIG,
                              **{k: v for k, v in source_config.items() if k in DEFAULT_MODEL_CONFIG},
                              "runtime": runtime},
                metadata={**(mlmodel.metadata or {}), "adreg_source_version": version, "adreg_runtime": runtime},
                requirements=extra)
    return derive.register_version(logged, category, source_run.data.metrics, tags=lineage,
                                   description=lineage["adreg.exported_from"])
