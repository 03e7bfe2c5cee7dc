"""``adreg export``: a new registered version of a category whose backbone runs on ONNX Runtime or OpenVINO.

The source version's model is downloaded, its backbone exported into the detector folder
(``adreg.backbones.export``), and the result logged as a new run and pyfunc model the way ``adreg.registry.derive``
logs a fit: same signature, code and requirements (plus the runtime's package), the source run's
parameters, metrics and artifacts (evaluation set, lineage, reference scores), a fresh integrity manifest,
and ``model_config`` ``runtime`` set to the exported runtime, so serving it needs no configuration. The new
version's tags name the source version and run (``adreg.source.*``). Nothing is registered when the
export or its check against torch fails.

``openvino-int8``: the OpenVINO IR is then quantized to INT8 (``adreg.backbones.export.quantize_export``: NNCF
post-training quantization) calibrated on the version's own good training views only: the images of its run's
training manifest that are on this machine with their recorded sha256, with the augmented copies the detector
makes of them (its augmentation settings and seed); when none is, the small copies of training images stored in
the model (``reference/``), and the run, the version's description and stderr say so. Quantization moves the
scores, so the version is made whole again with the source's own images and rules: the threshold is
re-derived with the source's rule from its calibration images re-scored (and the normal scores with them), the
reference scores the server checks on a swap are re-scored, and the version is re-evaluated on the source's
logged evaluation set (its metrics, scores and report replace the source's). Served with runtime ``openvino``
(the manifest's ``precision`` says int8); promoted through the gate like any version.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.models import Model

from adreg import integrity, store
from adreg.backbones.export import (EXPORT_DIR, INT8, _import_runtime, check_export_target, export_into,
                                    import_nncf, quantize_export, read_manifest)
from adreg.errors import ConfigError, DataError
from adreg.registry import derive, tracking
from adreg.registry.resolve import resolve

COPIED_RUN_TAGS = ("adreg.category", "adreg.method", "adreg.backbone", "adreg.data_source")
#: at most this many calibration views, evenly spaced over the training views (memory: ~1.2 MiB each)
MAX_CALIBRATION_VIEWS = 128
#: run artifacts that hold scores: an INT8 version logs its own instead of copying the source's
SCORE_ARTIFACTS = ("evaluation/test_scores.csv", "report", "reference/calibration_scores.json",
                   "fit/shots_and_threshold.json")


def _copy_run_artifacts(source_run_id: str, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Log the source run's artifacts (evaluation set, report, lineage, ...) into the active run; not its model
    nor the top-level entries in ``skip``."""
    client = mlflow.MlflowClient()
    for entry in client.list_artifacts(source_run_id):
        if entry.path == derive.MODEL_NAME_IN_RUN:
            continue
        if entry.is_dir and any(s.startswith(entry.path + "/") for s in skip):
            for sub in client.list_artifacts(source_run_id, entry.path):
                if sub.path not in skip:
                    local = mlflow.artifacts.download_artifacts(run_id=source_run_id, artifact_path=sub.path,
                                                                dst_path=str(dst))
                    (mlflow.log_artifacts(local, sub.path) if sub.is_dir else mlflow.log_artifact(local, entry.path))
            continue
        if entry.path in skip:
            continue
        local = mlflow.artifacts.download_artifacts(run_id=source_run_id, artifact_path=entry.path,
                                                    dst_path=str(dst))
        if entry.is_dir:
            mlflow.log_artifacts(local, entry.path)
        else:
            parent = str(Path(entry.path).parent)
            mlflow.log_artifact(local, None if parent == "." else parent)


# -- INT8 --------------------------------------------------------------------------------------------------
def training_views(paths: list, detector_dir: Path, n_training: int | None = None) -> list:
    """The views the fit of the detector in ``detector_dir`` made of the good images ``paths``: each image, then
    the augmented copies its augmentation settings and seed make (copies per image as for a model holding
    ``n_training`` goods, default ``len(paths)``), at most ``MAX_CALIBRATION_VIEWS`` evenly spaced, each resized
    to the backbone's input size (what preprocessing does first), so memory stays small."""
    from PIL import Image

    from adreg.augment import adaptive_copies, iter_views, parse_augmentations
    from adreg.detector import decode

    cfg = json.loads((Path(detector_dir) / "config.json").read_text())
    aug = cfg["augmentation"]
    kinds = parse_augmentations(aug["augment"])
    copies = adaptive_copies(aug["aug_count"], aug["aug_views"], n_training or len(paths)) if kinds else 0
    total = len(paths) * (1 + copies)
    step = max(1.0, total / MAX_CALIBRATION_VIEWS)
    keep = {int(i * step) for i in range(min(total, MAX_CALIBRATION_VIEWS))}
    side = int(cfg["backbone"]["image_size"])
    return [v.resize((side, side), Image.BILINEAR)
            for k, v in enumerate(iter_views(paths, kinds, copies, aug["seed"], decode)) if k in keep]


def calibration_views(run_id: str, detector_dir: Path) -> tuple[list, str]:
    """The version's own good training views to calibrate INT8 on, and a sentence saying where they came from.

    The run's training manifest (role ``train``) names the images; those on this machine whose sha256 is the
    recorded one are used (``training_views``). When none is, the small copies of training images stored in the
    model's ``reference/`` folder are used instead (and the sentence says so); when there are none either, a
    DataError: no other data is ever used."""
    from adreg.integrity import sha256_file
    from adreg.reference import REFERENCE_DIR, read_reference
    from adreg.registry import lineage, manifest

    entries = manifest.training(lineage.run_manifest(run_id)["images"])
    found = [Path(e["path"]) for e in entries
             if Path(e["path"]).is_file() and (not e.get("sha256") or sha256_file(e["path"]) == e["sha256"])]
    if found:
        source = (f"{len(found)} training image(s) of the version" +
                  (f" ({len(entries) - len(found)} of its {len(entries)} not on this machine or changed)"
                   if len(found) < len(entries) else ""))
    else:
        train_paths = {str(e["path"]) for e in entries}
        stored = [Path(detector_dir) / REFERENCE_DIR / r["file"] for r in read_reference(detector_dir).get("images", [])
                  if str(r.get("source")) in train_paths]
        if not stored:
            raise DataError(f"none of the version's {len(entries)} training images is on this machine (e.g. "
                            f"{entries[0]['path'] if entries else '?'}) and its model stores no copy of one; INT8 "
                            "calibrates on the version's own good images only: run the export where they are")
        found = stored
        source = (f"{len(stored)} stored reference copy(ies) (160 px) of the version's training images: its "
                  f"{len(entries)} training image(s) are not on this machine")
        print(f"adreg export: INT8 calibrated on {source}", file=sys.stderr)
    views = training_views(found, detector_dir, len(entries) or len(found))
    return views, f"{len(views)} views of {source}"


def _rethreshold(detector_dir: Path, run_id: str):
    """Re-derive the threshold of the quantized detector in ``detector_dir`` with the source's rule on the
    source's calibration images re-scored, set its normal scores, re-score its stored reference images; write
    them into its config. Returns (the reference document to log, the detector)."""
    from adreg import thresholds
    from adreg.detector import AnomalyDetector
    from adreg.images import load_image
    from adreg.reference import REFERENCE_DIR, REFERENCE_FILE, read_reference
    from adreg.registry import lineage

    ref = lineage.run_reference(run_id)
    images = [c for c in ref["images"] if Path(c["path"]).is_file()]
    if len(images) < len(ref["images"]):
        raise DataError(f"{len(ref['images']) - len(images)} of the {len(ref['images'])} images the source's "
                        f"threshold was calibrated on are not on this machine (e.g. "
                        f"{next(c['path'] for c in ref['images'] if not Path(c['path']).is_file())}); INT8 moves "
                        "the scores, so the threshold is re-derived on them: run the export where they are")
    det = AnomalyDetector.load(detector_dir, device="cpu", runtime="openvino", verified=True)
    scores = det.predict([load_image(c["path"]) for c in images]).scores if images else []
    rescored = [{**c, "score": float(s), "f32_score": c["score"]} for c, s in zip(images, scores)]
    good = [c["score"] for c in rescored if not c.get("label")]
    bad = [c["score"] for c in rescored if c.get("label")]
    rule, details = ref.get("rule"), dict(ref.get("details") or {})
    if rule == "good_quantile":
        new = thresholds.good_quantile(good, details.get("q", 0.99))
    elif rule == "f1_optimal":
        new = thresholds.f1_optimal(good, bad)
    elif rule == "target_false_alarm":
        new = thresholds.target_false_alarm(good, bad, details["target_rate"])
    else:
        raise ConfigError(f"the source's threshold rule {rule!r} cannot be re-derived for INT8")
    new.details = {**{k: v for k, v in details.items() if k not in new.details}, **new.details,
                   "f32_threshold": ref["threshold"]}
    cfg_path = Path(detector_dir) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["threshold"] = vars(new)
    cfg["normal_scores"] = [float(v) for v in good] or cfg.get("normal_scores")
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    # the scores a server checks when it swaps this version in
    det = AnomalyDetector.load(detector_dir, device="cpu", runtime="openvino", verified=True)
    doc = read_reference(detector_dir)
    if doc.get("images"):
        stored = det.predict([load_image(Path(detector_dir) / REFERENCE_DIR / r["file"]) for r in doc["images"]])
        for r, sc in zip(doc["images"], stored.scores):
            r["score"] = float(sc)
        (Path(detector_dir) / REFERENCE_DIR / REFERENCE_FILE).write_text(json.dumps(doc, indent=2))
    return {**ref, "threshold": new.value, "rule": new.rule, "details": new.details, "images": rescored}, det


def _log_evaluation(det, samples, title: str) -> dict:
    """Evaluate the INT8 detector on the source's evaluation set; log its scores and report; its metrics."""
    from adreg.evaluation import evaluate
    from adreg.reports import save_report

    ev = evaluate(det, samples, det.threshold.value, show_progress=False)
    rows = ev.rows(det.threshold.value)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    mlflow.log_text(buf.getvalue(), "evaluation/test_scores.csv")
    with tempfile.TemporaryDirectory() as tmp:
        save_report(Path(tmp) / "report", ev.samples, ev.scores, ev.maps, det.threshold.value, ev.masks, title=title)
        mlflow.log_artifacts(str(Path(tmp) / "report"), "report")
    return ev.metrics


def export_version(category: str, version, runtime: str = "openvino") -> derive.VersionOutcome:
    """Register a new version of ``adreg-<category>`` = version ``version`` with its backbone exported for
    ``runtime`` (onnxruntime, openvino, or openvino-int8: quantized, re-thresholded and re-evaluated); returns
    its run, model URI and version."""
    from adreg.pyfunc.served import DEFAULT_MODEL_CONFIG

    target = check_export_target(runtime)
    int8 = target == INT8
    runtime = "openvino" if int8 else target
    _import_runtime(runtime)  # fail before downloading anything
    if int8:
        import_nncf()
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
        int8_metrics, reference, eval_samples = {}, None, []
        if int8:
            from adreg.registry import lifecycle

            # every input first: nothing is logged when an image the export needs is missing
            eval_samples, _ = lifecycle.logged_eval_set(category, version, required=False)
            t0 = time.perf_counter()
            views, calibration = calibration_views(mv.run_id, detector_dir)
            f32_error = check["max_relative_error"]
            check = quantize_export(detector_dir, views, calibration)
            check["max_relative_error"] = f32_error  # the f32 export's check against torch
            reference, int8_det = _rethreshold(detector_dir, mv.run_id)
            int8_metrics = {"threshold": int8_det.threshold.value, "int8_calibration_views": float(len(views)),
                            "int8_feature_relative_error": check["int8_relative_error"],
                            "int8_quantize_seconds": time.perf_counter() - t0}
        mlmodel = Model.load(str(local))
        source_config = dict((mlmodel.flavors.get("python_function") or {}).get("model_config") or {})
        example = mlmodel.load_input_example(str(local))
        backbone = source_run.data.tags.get("adreg.backbone", "")
        extra = (["transformers"] if backbone.startswith("hf:") else []) + [runtime]
        run_name = f"{source_run.info.run_name or 'v' + version}-{target}"
        metrics = {**source_run.data.metrics, **int8_metrics, "export_max_relative_error": check["max_relative_error"]}
        with mlflow.start_run(experiment_id=tracking.fit_experiment_id(category), run_name=run_name):
            what = f"backbone on {runtime}" + (f", INT8 (NNCF, calibrated on {calibration})" if int8 else "")
            lineage = {"adreg.source.model": name, "adreg.source.version": version,
                       "adreg.source.run_id": mv.run_id, "adreg.runtime": runtime,
                       **({"adreg.precision": "int8"} if int8 else {}),
                       "adreg.exported_from": f"{name} version {version} (run {mv.run_id}), {what}"}
            mlflow.set_tags({**{k: source_run.data.tags[k] for k in COPIED_RUN_TAGS if k in source_run.data.tags},
                             **lineage, **({"adreg.int8.calibration": calibration} if int8 else {})})
            params = dict(source_run.data.params)
            params.update({"runtime": runtime, "source_version": version})
            if int8:
                params.update({"precision": "int8", "int8_calibration": calibration[:500]})
            for start in range(0, len(params), 100):
                mlflow.log_params(dict(list(params.items())[start:start + 100]))
            _copy_run_artifacts(mv.run_id, Path(tmp) / "run-artifacts", SCORE_ARTIFACTS if int8 else ())
            if int8:
                if eval_samples:
                    metrics.update(_log_evaluation(int8_det, eval_samples, f"{category} v{version} INT8"))
                mlflow.log_dict(reference, "reference/calibration_scores.json")
                shots = (store.load_run_dict(mv.run_id, "fit/shots_and_threshold.json") or {}).get("shots")
                mlflow.log_dict({"shots": shots, "threshold": vars(int8_det.threshold)},
                                "fit/shots_and_threshold.json")
            mlflow.log_metrics(metrics)
            mlflow.log_dict(check, "export/export.json")
            mlflow.set_tag(integrity.DIGEST_TAG, integrity.write_manifest(detector_dir))
            logged = derive.log_pyfunc(
                "_model_code.py", {"detector": str(detector_dir)}, example,
                model_config={**DEFAULT_MODEL_CONFIG,
                              **{k: v for k, v in source_config.items() if k in DEFAULT_MODEL_CONFIG},
                              "runtime": runtime},
                metadata={**(mlmodel.metadata or {}), "adreg_source_version": version, "adreg_runtime": runtime,
                          **({"adreg_precision": "int8"} if int8 else {})},
                requirements=extra)
    return derive.register_version(logged, category, metrics, tags=lineage,
                                   description=lineage["adreg.exported_from"])
