"""Lineage of a logged model: what it was fitted on, what it was grown from, what its threshold saw.

Logged with every fit and update (``adreg.registry.derive.log_fit`` calls ``log_lineage`` inside the run):

* ``training/manifest.json``: every training image (path as given, sha256, which fit or update added
  it), its digest as an MLflow dataset input (context ``training``) so the UI lists it with the run;
  counts as params and metrics.
* ``reference/calibration_scores.json``: the images the threshold was calibrated on, with their scores
  under this model. ``adreg drift`` compares production scores with the good ones.
* for an update: the parent version and run as tags and params.

Reading them back: ``run_manifest``, ``run_reference``.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow

from adreg import store
from adreg.errors import DataError
from adreg.registry import manifest

REFERENCE_ARTIFACT = "reference/calibration_scores.json"
UPDATE_REPORT_ARTIFACT = "update/report.json"


# -- writing (inside the active run) --------------------------------------------------------------------
def reference_document(result) -> dict:
    """The calibration images with the scores the fit or update gave them (``FitResult.calibration``)."""
    det = result.detector
    images = result.calibration
    return {"threshold": det.threshold.value, "rule": det.threshold.rule, "details": det.threshold.details,
            "source": result.calibration_source, "images": images}


def _dataset_source(paths: list[str]) -> str:
    folders = [str(Path(p).resolve().parent) for p in paths]
    try:
        return os.path.commonpath(folders) if folders else "."
    except ValueError:  # different drives
        return folders[0]


def image_set_digest(paths) -> str:
    """The digest of a set of image files: order-independent, over their sha256 (32 hex chars, MLflow's
    dataset digest), so two runs fitted or judged on the same images show the same digest."""
    return manifest.digest([manifest.entry(p, "") for p in paths])


def log_image_set(paths, name: str, context: str, digest: str | None = None, run_id: str | None = None) -> str | None:
    """Log a set of image files as an MLflow dataset input (source: their common folder; ``context``: training,
    validation or evaluation) of the active run, or of ``run_id``; returns the digest (None for an empty set)."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    paths = [str(p) for p in paths]
    if not paths:
        return None
    digest = digest or image_set_digest(paths)
    dataset = MetaDataset(LocalArtifactDatasetSource(_dataset_source(paths)), name=name, digest=digest)
    if run_id is None:
        mlflow.log_input(dataset, context=context)
    else:
        mlflow.MlflowClient().log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                                               [InputTag("mlflow.data.context", context)])])
    return digest


def log_lineage(run_id: str, result, lineage: dict | None = None) -> dict:
    """Log the manifest, the reference scores and, for an update, the parent; the training, calibration
    (validation) and evaluation image sets as dataset inputs with their digests. Returns the manifest document."""
    opts = result.options
    reference = reference_document(result)
    entries = getattr(result, "manifest_entries", None)
    if entries is None:
        entries = [manifest.entry(p, "fit") for p in result.shots]
        entries += [manifest.entry(r["path"], "fit", role="calibration") for r in reference["images"]]
        entries += getattr(result, "selection_entries", [])  # a tune's reviewed evidence (role selection)
    doc = manifest.document(opts.category, entries, run_id)
    mlflow.log_dict(doc, manifest.MANIFEST_ARTIFACT)
    added = sum(1 for e in manifest.training(doc["images"]) if e["run_id"] == run_id)
    mlflow.log_metrics({"n_training_images": float(doc["n_training_images"]), "n_images_added": float(added)})
    params = {"training_images": str(doc["n_training_images"]), "training_manifest_digest": doc["digest"]}
    existing = mlflow.MlflowClient().get_run(run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in existing})
    new_paths = [e["path"] for e in doc["images"] if e["run_id"] == run_id] or [e["path"] for e in doc["images"]]
    new_paths = new_paths or [str(p) for p in result.shots]
    log_image_set(new_paths, f"{opts.category}-train", "training", digest=doc["digest"])
    log_image_set([c["path"] for c in result.calibration if Path(c["path"]).is_file()],
                  f"{opts.category}-calibration", "validation")
    if result.evaluation is not None:
        log_image_set([s.path for s in result.data.test], f"{opts.category}-evaluation", "evaluation")
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
        extra = {k: v for k, v in lineage.items()
                 if k not in ("parent_model", "parent_version", "parent_run_id", "report", "what")}
        if extra:  # e.g. the review labels an update grew from: their digest and counts
            mlflow.set_tags({f"adreg.lineage.{k}": str(v)[:4900] for k, v in extra.items()})
    return doc


# -- reading (any logged run) ---------------------------------------------------------------------------
def run_manifest(run_id: str) -> dict:
    """A run's training manifest (``training/manifest.json``)."""
    doc = store.load_run_dict(run_id, manifest.MANIFEST_ARTIFACT)
    if doc is None:
        raise DataError(f"run {run_id} has no {manifest.MANIFEST_ARTIFACT}: it was not logged by adreg")
    return doc


def run_reference(run_id: str) -> dict:
    """A run's calibration images and their scores (``reference/calibration_scores.json``)."""
    doc = store.load_run_dict(run_id, REFERENCE_ARTIFACT)
    if doc is None:
        raise DataError(f"run {run_id} has no {REFERENCE_ARTIFACT}: it was not logged by adreg")
    return doc
