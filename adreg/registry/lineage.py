"""Lineage of a logged model: what it was fitted on, what it was grown from, what its threshold saw.

Logged with every fit and update (``adreg.registry.tracking.log_fit`` calls ``log_lineage`` inside the run):

* ``training/manifest.json``: every training image (path as given, sha256, which fit or update added
  it), its digest as an MLflow dataset input (context ``training``) so the UI lists it with the run;
  counts as params and metrics.
* ``reference/calibration_scores.json``: the images the threshold was calibrated on, with their scores
  under this model. ``adreg drift`` compares production scores with the good ones.
* for an update: the parent version and run as tags and params.

Reading them back (``run_manifest``, ``run_reference``) falls back, for runs logged before these
artifacts existed, to what the run's parameters and ``fit/shots_and_threshold.json`` allow.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow

from adreg.data import Sample, resolve_dataset, split_shots
from adreg.errors import DataError
from adreg.images import load_image
from adreg.registry import manifest

REFERENCE_ARTIFACT = "reference/calibration_scores.json"
SHOTS_ARTIFACT = "fit/shots_and_threshold.json"
UPDATE_REPORT_ARTIFACT = "update/report.json"


# -- writing (inside the active run) --------------------------------------------------------------------
def calibration_samples(result) -> list[Sample]:
    """The images a fit's threshold was calibrated on: the validation set, else the held-out goods
    (the same split ``fit_category`` made)."""
    if result.data.val:
        return list(result.data.val)
    opts = result.options
    held_out = split_shots(result.data.train, min(opts.k_shot, len(result.data.train)), opts.seed, opts.holdout)[1]
    return [Sample(Path(p), 0, "good") for p in held_out]


def reference_document(result) -> dict:
    """Calibration images with their scores: carried by the result (updates), else re-scored."""
    det = result.detector
    images = getattr(result, "calibration", None)
    if images is None:
        samples = calibration_samples(result)
        scores = det.predict([load_image(s.path) for s in samples]).scores if samples else []
        images = [{"path": str(s.path), "label": int(s.label), "score": float(v)} for s, v in zip(samples, scores)]
    return {"threshold": det.threshold.value, "rule": det.threshold.rule, "details": det.threshold.details,
            "source": result.calibration_source, "images": images}


def _dataset_source(paths: list[str]) -> str:
    folders = [str(Path(p).resolve().parent) for p in paths]
    try:
        return os.path.commonpath(folders) if folders else "."
    except ValueError:  # different drives
        return folders[0]


def log_lineage(run_id: str, result, lineage: dict | None = None) -> dict:
    """Log the manifest (+ dataset input), the reference scores and, for an update, the parent.
    Returns the manifest document."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    opts = result.options
    reference = reference_document(result)
    entries = getattr(result, "manifest_entries", None)
    if entries is None:
        entries = [manifest.entry(p, "fit") for p in result.shots]
        entries += [manifest.entry(r["path"], "fit", role="calibration") for r in reference["images"]]
    doc = manifest.document(opts.category, entries, run_id)
    mlflow.log_dict(doc, manifest.MANIFEST_ARTIFACT)
    added = sum(1 for e in manifest.training(doc["images"]) if e["run_id"] == run_id)
    mlflow.log_metrics({"n_training_images": float(doc["n_training_images"]), "n_images_added": float(added)})
    params = {"training_images": str(doc["n_training_images"]), "training_manifest_digest": doc["digest"]}
    existing = mlflow.MlflowClient().get_run(run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in existing})
    new_paths = [e["path"] for e in doc["images"] if e["run_id"] == run_id] or [e["path"] for e in doc["images"]]
    new_paths = new_paths or [str(p) for p in result.shots]
    dataset = MetaDataset(LocalArtifactDatasetSource(_dataset_source(new_paths)), name=f"{opts.category}-train",
                          digest=doc["digest"])
    mlflow.log_input(dataset, context="training")
    mlflow.log_dict(reference, REFERENCE_ARTIFACT)
    if lineage:
        mlflow.set_tags({"adreg.lineage": "update",
                         "adreg.parent.model": lineage["parent_model"],
                         "adreg.parent.version": str(lineage["parent_version"]),
                         "adreg.parent.run_id": lineage["parent_run_id"],
                         "adreg.grown_from": f"{lineage['parent_model']} version {lineage['parent_version']} "
                                             f"(run {lineage['parent_run_id']}) + {added} good image(s)"})
        mlflow.log_params({k: str(lineage[k]) for k in ("parent_model", "parent_version", "parent_run_id")
                           if k not in existing})
        if lineage.get("report"):
            mlflow.log_dict(lineage["report"], UPDATE_REPORT_ARTIFACT)
        if lineage.get("what"):
            mlflow.set_tag("adreg.update.what", str(lineage["what"])[:4900])
    return doc


# -- reading (any logged run) ---------------------------------------------------------------------------
def _load_dict(run_id: str, path: str) -> dict | None:
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}")
    except Exception:  # noqa: BLE001 - a missing artifact surfaces as various MLflow errors
        return None


def run_manifest(run_id: str) -> dict:
    """A run's training manifest; for runs logged before manifests existed, built from the logged shots
    list, hashing the files that exist here (the others keep a null hash and cannot be de-duplicated)."""
    doc = _load_dict(run_id, manifest.MANIFEST_ARTIFACT)
    if doc is not None:
        return doc
    shots = _load_dict(run_id, SHOTS_ARTIFACT)
    if shots is None:
        raise DataError(f"run {run_id} logged neither {manifest.MANIFEST_ARTIFACT} nor {SHOTS_ARTIFACT}: "
                        "its training images are unknown; refit with `adreg fit`")
    entries = [manifest.entry(p, "fit", run_id) for p in shots["shots"]]
    return {**manifest.document("", entries, run_id), "rebuilt_from": SHOTS_ARTIFACT}


def run_reference(run_id: str, detector=None) -> dict:
    """A run's calibration images and scores; for runs logged before they were, the calibration images
    are found again from the run's parameters and re-scored with ``detector`` (when they exist here)."""
    doc = _load_dict(run_id, REFERENCE_ARTIFACT)
    if doc is not None:
        return doc
    params = mlflow.MlflowClient().get_run(run_id).data.params
    if detector is None or not params.get("train_dir") or params["train_dir"] == "None":
        raise DataError(f"run {run_id} was logged without reference scores ({REFERENCE_ARTIFACT}) and its "
                        "calibration images cannot be found again; refit or update the model to log them")
    get = lambda k: None if params.get(k) in (None, "", "None") else params[k]  # noqa: E731
    try:
        data = resolve_dataset(get("train_dir"), get("val_dir"), get("test_dir"))
    except DataError as exc:
        raise DataError(f"run {run_id} was logged without reference scores and its calibration images are "
                        f"not here ({exc}); refit or update the model to log them") from None
    if data.val:
        samples = data.val
    else:
        samples = [Sample(Path(p), 0, "good") for p in
                   split_shots(data.train, int(params.get("k_shot", 1)), int(params.get("seed", 0)),
                               int(params.get("holdout", 20)))[1]]
    scores = detector.predict([load_image(s.path) for s in samples]).scores
    return {"threshold": detector.threshold.value, "rule": detector.threshold.rule,
            "details": detector.threshold.details, "source": f"re-scored ({len(samples)} calibration images)",
            "images": [{"path": str(s.path), "label": int(s.label), "score": float(v)}
                       for s, v in zip(samples, scores)], "rebuilt": True}
