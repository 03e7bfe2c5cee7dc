"""Grow a registered version into a new one with more good images (``adreg update``).

The parent (``--from production`` or ``--from-version N``) keeps its backbone, layers, method,
parameters and post-processing; only its fitted state grows (``AnomalyDetector.update``: what that
means is the method's business, and its report says so). On the way:

* **duplicates**: images whose sha256 is already in the parent's training manifest (or twice among
  the new ones) are skipped and listed;
* **unreadable files** are skipped and listed; no image at all, or nothing new, is an error;
* **contamination guard**: the parent scores the new images; those above its threshold are suspects,
  held out and listed unless ``include_suspects``; with ``second_look`` (the default) the grown model
  scores them again and learns from those it scores at or below its own threshold (``cleared``);
* the threshold is recalibrated with the parent's rule on held-out new good images (plus the parent's
  own calibration images when fewer than ``min_calibration`` new ones are held out);
* the new detector is evaluated on the parent's logged evaluation set, so the promotion gate compares
  like with like; then it is logged and registered through the same ``adreg.registry.derive`` as a fit,
  with its lineage.

Everything before logging is computation on an in-memory copy: a failure registers nothing and never
touches the parent version.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow

from adreg.data import CategoryData
from adreg.errors import DataError, ImageDecodeError
from adreg.fitting import FitOptions, FitResult, grow_detector
from adreg.images import load_image
from adreg.integrity import sha256_file
from adreg.registry import derive, lifecycle, lineage, manifest
from adreg.registry.resolve import load_detector, model_version, resolve


@dataclass
class UpdateOptions:
    category: str
    add_good: list[str]
    add_files: list[str] = field(default_factory=list)  # single image files (e.g. reviewed goods), beside the folders
    lineage_extra: dict = field(default_factory=dict)  # extra lineage facts (e.g. the review labels' digest)
    from_alias: str = "production"
    from_version: str | None = None  # wins over from_alias
    include_suspects: bool = False
    second_look: bool = True  # the grown model judges the suspects again and learns from those it clears
    holdout: int = 20  # new good images held out to recalibrate the threshold (at most half of them)
    min_calibration: int = 20  # below this many held-out new goods, the parent's calibration images join
    seed: int = 0
    device: str = "auto"


@dataclass
class UpdateResult(FitResult):
    """A ``FitResult`` (so ``derive.log_fit`` logs it like a fit) plus what the update did."""

    parent_model: str = ""
    parent_version: str = ""
    parent_run_id: str = ""
    parent_threshold: float = float("nan")
    parent_metrics: dict = field(default_factory=dict)
    added: list[Path] = field(default_factory=list)  # new training images
    calibration_images: list[Path] = field(default_factory=list)  # held-out new goods
    duplicates: list[dict] = field(default_factory=list)  # path, duplicate_of
    unreadable: list[dict] = field(default_factory=list)  # path, error
    suspects: list[dict] = field(default_factory=list)  # held out: path, score (parent), second_score (grown)
    cleared: list[dict] = field(default_factory=list)  # suspects the grown model cleared (learned from)
    include_suspects: bool = False
    method_report: dict = field(default_factory=dict)
    manifest_entries: list[dict] = field(default_factory=list)  # read by adreg.registry.lineage
    n_parent_training: int = 0
    seconds: float = 0.0
    sources: dict = field(default_factory=dict)  # where the new goods came from (UpdateOptions.lineage_extra)

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        out.update({"n_images_duplicate": float(len(self.duplicates)),
                    "n_images_unreadable": float(len(self.unreadable)),
                    "n_images_suspect": float(len(self.suspects)),
                    "n_suspects_included": float(len(self.suspects) if self.include_suspects else 0),
                    "n_suspects_cleared": float(len(self.cleared)),
                    "n_calibration_images": float(len(self.calibration)), "update_total_seconds": self.seconds})
        return out

    def report(self) -> dict:
        """What the update did, as logged (``update/report.json``) and printed."""
        return {"parent": {"model": self.parent_model, "version": self.parent_version, "run_id": self.parent_run_id,
                           "threshold": self.parent_threshold},
                "added": [str(p) for p in self.added],
                "calibration_images": [str(p) for p in self.calibration_images],
                "duplicates": self.duplicates, "unreadable": self.unreadable,
                "suspects": self.suspects, "suspects_included": self.include_suspects, "cleared": self.cleared,
                "method": self.method_report,
                "threshold": {"value": self.detector.threshold.value, "rule": self.detector.threshold.rule,
                              "source": self.calibration_source},
                "training_images": {"parent": self.n_parent_training,
                                    "new": self.n_parent_training + len(self.added)}}


def parent_fit_options(category: str, detector, params: dict, n_training: int, device: str, holdout: int = 20,
                       threshold_quantile: float = 0.99) -> FitOptions:
    """The ``FitOptions`` a model derived from a parent run is logged with: the parent detector's settings."""
    spec = detector.backbone.spec()
    return FitOptions(
        category=category, method=detector.method.name, train_dir=params.get("train_dir") or None,
        val_dir=None, test_dir=None, k_shot=n_training, seed=detector.seed, backbone=str(spec.get("name")),
        layers=spec.get("layers"), image_size=spec.get("image_size"), precision=spec.get("precision", "fp32"),
        augment=",".join(detector.augment) or "none", aug_count=detector.aug_count, aug_views=detector.aug_views,
        sigma=detector.sigma,
        top_fraction=detector.top_fraction, threshold_quantile=threshold_quantile, holdout=holdout,
        batch_size=detector.batch_size, device=device, method_params=detector.method.get_params())


def _read_new_images(folders: list[str], known: dict[str, str], files: list[str] = ()):
    """(paths, hashes, duplicates, unreadable) of the new files: hashed, de-duplicated, checked to decode.

    Each image is decoded once to check it and dropped: the update decodes them again a chunk at a time
    (``adreg.fitting.grow_detector``), so memory does not grow with the number of new images."""
    paths = manifest.find_images(folders, "--add-good folder") + [Path(f) for f in files]
    if not paths:
        raise DataError(f"no images found under {', '.join(map(str, folders))} (looked recursively for "
                        "png, jpg, bmp, tif, webp); nothing to add, nothing registered")
    seen = dict(known)
    kept, hashes, duplicates, unreadable = [], [], [], []
    for p in paths:
        try:
            digest = sha256_file(p)
        except OSError as exc:
            unreadable.append({"path": str(p), "error": exc.strerror or str(exc)})
            continue
        if digest in seen:
            duplicates.append({"path": str(p), "duplicate_of": seen[digest]})
            continue
        try:
            load_image(p).close()
        except ImageDecodeError as exc:
            unreadable.append({"path": str(p), "error": str(exc).removeprefix(f"{p}: ")})
            continue
        seen[digest] = str(p)
        kept.append(p)
        hashes.append(digest)
    return kept, hashes, duplicates, unreadable


def prepare_update(opts: UpdateOptions, show_progress: bool = True) -> UpdateResult:
    """Everything of an update but logging: resolve the parent, read and de-duplicate the new images, then
    grow (``adreg.fitting.grow_detector``: guard, grow, recalibrate, evaluate) an in-memory copy."""
    t_start = time.perf_counter()
    if not opts.add_good and not opts.add_files:
        raise DataError("give at least one --add-good folder of good images")
    ref = resolve(opts.category, opts.from_version, opts.from_alias)
    version, mv = ref.version, model_version(ref)
    name = ref.name
    parent_run = mlflow.MlflowClient().get_run(mv.run_id)
    parent_entries = lineage.run_manifest(mv.run_id)["images"]
    parent_training = manifest.training(parent_entries)
    # training AND calibration images of the lineage count as seen; held-out suspects do not (a reviewed
    # suspect can be taken in later with include_suspects)
    known = {e["sha256"]: e["path"] for e in parent_entries if e.get("sha256")}

    paths, hashes, duplicates, unreadable = _read_new_images(opts.add_good, known, opts.add_files)
    if not paths:
        why = []
        if duplicates:
            why.append(f"{len(duplicates)} duplicate(s) of images version {version} already learned from or "
                       "calibrated on")
        if unreadable:
            why.append(f"{len(unreadable)} unreadable file(s)")
        raise DataError(f"nothing new to add to {name} version {version}: {' and '.join(why)}; nothing registered")

    # the gate compares like with like: the parent's evaluation set (checked before any heavy work)
    eval_samples, eval_source = lifecycle.logged_eval_set(opts.category, version, required=False)
    detector = load_detector(ref, opts.device)
    params = parent_run.data.params
    grown = grow_detector(detector, paths, include_suspects=opts.include_suspects, second_look=opts.second_look,
                          holdout=opts.holdout,
                          min_calibration=opts.min_calibration, seed=opts.seed,
                          parent_calibration=lineage.run_reference(mv.run_id)["images"],
                          parent_label=f"{name} version {version}",
                          threshold_quantile=float(params.get("threshold_quantile", 0.99)),
                          eval_samples=eval_samples, show_progress=show_progress)
    train_idx, cal_idx = grown.train_index, grown.calibration_index

    # the new run's id is filled in by adreg.registry.manifest.document when it is logged
    entries = [dict(e) for e in parent_entries]
    entries += [manifest.entry(paths[i], "update", None, sha256=hashes[i]) for i in train_idx]
    entries += [manifest.entry(paths[i], "update", None, sha256=hashes[i], role="calibration") for i in cal_idx]
    training_entries = manifest.training(entries)
    fit_opts = parent_fit_options(opts.category, detector, params, len(training_entries), opts.device,
                                  holdout=opts.holdout, threshold_quantile=grown.threshold_quantile)
    data = CategoryData(train=[Path(e["path"]) for e in training_entries], test=list(eval_samples),
                        source=eval_source)
    return UpdateResult(
        sources=dict(opts.lineage_extra), options=fit_opts, detector=detector, data=data, shots=[Path(e["path"]) for e in training_entries],
        calibration_source=grown.calibration_source, evaluation=grown.evaluation, calibration=grown.calibration,
        parent_model=name, parent_version=version, parent_run_id=mv.run_id, parent_threshold=grown.parent_threshold,
        parent_metrics=dict(parent_run.data.metrics), added=[paths[i] for i in train_idx],
        calibration_images=[paths[i] for i in cal_idx], duplicates=duplicates, unreadable=unreadable,
        suspects=grown.suspects, cleared=grown.cleared, include_suspects=opts.include_suspects, method_report=grown.method_report,
        manifest_entries=entries, n_parent_training=len(parent_training), seconds=time.perf_counter() - t_start)


@dataclass(kw_only=True)
class UpdateOutcome(derive.VersionOutcome):
    """What ``update`` did: the grown version's run (and version, promotion, gate: ``VersionOutcome``) and the
    update itself (``result``: the parent, what was added, skipped as duplicate or unreadable, held out as
    suspect or cleared on a second look, the recalibrated threshold, the evaluation).

    Examples:
        ```python
        out = adreg.update("bottle", ["captures/ok"], from_alias="production", register=True)
        print(out.version, out.result.parent_version, len(out.result.added), len(out.result.suspects))
        print(out.result.report()["threshold"])        # value, rule, source
        ```
    """

    result: UpdateResult


def update_version(opts: UpdateOptions, register: bool = False, promote: str | None = None,
                   policy: lifecycle.GatePolicy | None = None, reason: str = "",
                   show_progress: bool = True) -> UpdateOutcome:
    """Grow the parent into a new run (+ version with ``register``, + gated alias with ``promote``)."""
    result = prepare_update(opts, show_progress)
    k, added = len(result.shots), len(result.added)
    logged = derive.log_fit(
        result, run_name=f"update-{result.options.method}-{opts.category}-v{result.parent_version}-k{k}",
        lineage={"parent_model": result.parent_model, "parent_version": result.parent_version,
                 "parent_run_id": result.parent_run_id, "report": result.report(),
                 "what": result.method_report.get("what", ""), **opts.lineage_extra})
    return derive.register_version(
        UpdateOutcome.of(logged, result=result), opts.category, result.metrics(), register=register,
        tags={"adreg.lineage": "update", "adreg.parent.version": result.parent_version,
              "adreg.parent.run_id": result.parent_run_id, "adreg.training_images": str(k),
              "adreg.images_added": str(added)},
        description=(f"Grown from {result.parent_model} version {result.parent_version} "
                     f"(run {result.parent_run_id}) with {added} new good image(s) by `adreg update`: "
                     f"{result.method_report.get('what', '')}"),
        promote=promote, policy=policy, reason=reason or f"update of version {result.parent_version}",
        device=opts.device, candidate_eval=result.evaluation)
