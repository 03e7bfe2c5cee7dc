"""adreg's public Python API: everything the ``adreg`` command does, as functions.

```python
import adreg

out = adreg.fit("bottle", k_shot=1, register=True, promote="production")
print(out.version, out.metrics["image_auroc"], out.promoted)
detector = adreg.load("bottle", alias="production")      # a verified AnomalyDetector
rows = adreg.predict("bottle", ["part1.png"]).rows         # score, is_anomaly, threshold, error
with adreg.serve("bottle", port=5001) as server:          # mlflow models serve, supervised
    server.wait_ready()
```

Every function works on the MLflow store given by the keyword ``tracking_uri``, else the one already set
(``mlflow.set_tracking_uri``, ``$MLFLOW_TRACKING_URI``), else the embedded sqlite store in ``$ADREG_HOME``
(``./adreg-store``). A function that reads a registered version takes ``alias="production"`` unless told
otherwise; ``version=N`` wins over the alias. Every function that makes a version (``fit``, ``tune``,
``update``, ``threshold``, ``export``, ``bundle``) returns a ``VersionOutcome`` (``version``, ``run_id``,
``model_uri``, ``promoted``, ``gate``, ``registered_name``, ``tracking_uri``), with its own extras on a
subclass (``FitOutcome``, ``TuneOutcome``, ``UpdateOutcome``, ``ThresholdOutcome``).

Errors are ``adreg.errors`` classes (``NotFoundError``, ``DataError``, ``ConfigError``, ``PermissionDenied``,
``StoreUnreachable``, ``IntegrityError``, ...); a gate that refuses a promotion is not an error but a result
(``promoted`` is False). Nothing here prints; the CLI (``adreg.cli``) prints what these return.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from adreg.errors import ConfigError, DataError
from adreg.registry.derive import VersionOutcome

if TYPE_CHECKING:  # result types, imported where they are made (import adreg.api stays light)
    from adreg.batch.score import BatchResult
    from adreg.monitoring.drift import DriftReport
    from adreg.registry.labels import Label, ProductionSet
    from adreg.registry.resolve import ModelRef

__all__ = ["VersionOutcome", "FitOutcome", "TuneOutcome", "UpdateOutcome", "ThresholdOutcome", "PromoteOutcome",
           "PredictOutcome", "fit", "promote", "rollback", "update", "load", "predict", "score", "serve", "resolve",
           "models", "history", "compare", "export", "bundle", "drift", "status", "grant", "whoami", "label",
           "labels", "production_set", "quality", "threshold", "review", "GatePolicy", "FitOptions", "tune"]


def __getattr__(name):  # classes defined beside torch and mlflow, without importing them at ``import adreg.api``
    if name == "FitOptions":
        from adreg.options import FitOptions

        return FitOptions
    if name == "GatePolicy":
        from adreg.options import GatePolicy

        return GatePolicy
    if name == "UpdateOutcome":
        from adreg.registry.update import UpdateOutcome

        return UpdateOutcome
    if name == "ThresholdOutcome":
        from adreg.review.threshold import ThresholdOutcome

        return ThresholdOutcome
    raise AttributeError(name)


def _store(tracking_uri: str | None) -> str:
    from adreg.registry import tracking

    return tracking.ensure(tracking_uri)


def _policy(policy=None, **keywords):
    """``policy`` with the gate keywords given (None: keep), or a ``GatePolicy`` of them; defaults live in
    ``adreg.options.GatePolicy``."""
    from adreg.options import GatePolicy

    return GatePolicy.from_keywords(policy, **keywords)


# -- fit ----------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class FitOutcome(VersionOutcome):
    """What ``fit`` did: the logged run, the registered version (None unless registered) and the promotion
    (``VersionOutcome``), and the fit itself (``result``: detector, data, shots, evaluation; ``metrics``,
    ``detector``).

    Examples:
        ```python
        out = adreg.fit("bottle", k_shot=1, register=True, promote="staging")
        print(out.run_id, out.version, out.promoted, out.metrics["image_auroc"])
        scores = out.detector.predict(images).scores      # the fitted detector, in memory
        ```
    """

    result: object                      # adreg.fitting.FitResult

    @property
    def metrics(self) -> dict[str, float]:
        """Fit and evaluation metrics, as logged (image_auroc, pixel_auroc, aupro, threshold, ...)."""
        return self.result.metrics()

    @property
    def detector(self):
        """The fitted ``AnomalyDetector``."""
        return self.result.detector


def fit(category: str, *, train_dir: str | None = None, val_dir: str | None = None, test_dir: str | None = None,
        method: str = "subspace", k_shot: int = 1, seed: int = 0, params: dict | None = None,
        register: bool = False, promote: str | None = None, export: str | None = None,
        tracking_uri: str | None = None, show_progress: bool = True, options=None, settings_from: str | None = None,
        **settings) -> FitOutcome:
    """Fit a detector for ``category``, evaluate it, log it to MLflow, and optionally register and promote it.

    Args:
        category: product name; the model is registered as ``adreg-<category>``.
        train_dir: an MVTec category folder or a folder of good images (default: the bundled data of
            ``category``); ``val_dir`` / ``test_dir`` as in ``adreg fit``.
        method: ``subspace``, ``rad``, ``knn``, ``foundad`` or ``spg``; ``params`` its hyper-parameters.
        k_shot, seed: how many good images to fit on, drawn with ``seed``.
        register: register the logged model as a new version of ``adreg-<category>``.
        promote: after registering, move this alias (e.g. ``"staging"``) to it through the quality gate.
        export: also export the backbone for ``onnxruntime`` or ``openvino`` and serve it with that runtime.
        options: an ``adreg.FitOptions`` instead of the keyword settings.
        settings_from: the parent run of an ``adreg tune`` search: its chosen settings (method, backbone,
            layers, input size, augmentation, aggregation) replace those fields.
        **settings: any other ``FitOptions`` field (``backbone``, ``layers``, ``image_size``, ``augment``,
            ``aug_count``, ``top_fraction``, ``sigma``, ``threshold_quantile``, ``holdout``, ``device``, ...).

    Returns:
        ``FitOutcome``: ``version``, ``run_id``, ``model_uri``, ``promoted``, ``gate`` and ``metrics``,
        ``detector``.

    Raises:
        DataError: missing or empty folders, unreadable images, ``k_shot`` larger than the folder.
        ConfigError: an unknown method, backbone or option value; ``promote`` without a test set.
        StoreUnreachable: the store is down.
        PermissionDenied: the store refuses the user.
    """
    from adreg.fitting import FitOptions, fit_category
    from adreg.registry import derive

    if options is None:
        _check_settings(settings)
        options = FitOptions(category=category, method=method, train_dir=train_dir, val_dir=val_dir,
                             test_dir=test_dir, k_shot=k_shot, seed=seed, method_params=dict(params or {}),
                             **settings)
    _store(tracking_uri)
    if settings_from:
        from adreg.tuning.search import options_for
        from adreg.tuning.record import read_choice

        options = options_for(options, read_choice(settings_from))
    _check_promotable(options, promote)
    result = fit_category(options, show_progress=show_progress)
    out = FitOutcome.of(derive.log_fit(result, export=export), result=result)
    return _register_fit(out, register, promote, "fit --promote")


def _check_settings(settings: dict) -> None:
    """``ConfigError`` for a keyword that is no ``FitOptions`` field."""
    from adreg.options import FitOptions

    known = set(FitOptions.__dataclass_fields__)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"unknown fit setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def _check_promotable(options, promote: str | None) -> None:
    """Before any work: a promotion needs something for the gate to judge on."""
    if not promote:
        return
    from adreg.fitting import load_category_data
    from adreg.registry.labels import read_labels

    if not load_category_data(options).test and not read_labels(options.category):
        raise ConfigError("--promote needs evidence for the promotion gate, and this fit has none: give "
                          "--test-dir, or register it, serve it with --capture, review what the line sees "
                          "(adreg review) and promote then; nothing was fitted")


def _register_fit(out: FitOutcome, register: bool, promote: str | None, reason: str) -> FitOutcome:
    """Register a logged fit (``register`` or ``promote``) and move ``promote`` to it through the gate."""
    from adreg.registry import derive

    result = out.result
    return derive.register_version(out, result.options.category, result.metrics(), register=register,
                                   promote=promote, reason=reason, device=result.options.device,
                                   candidate_eval=result.evaluation)


# -- lifecycle ----------------------------------------------------------------------------------------------
@dataclass
class PromoteOutcome:
    """A move of an alias: ``promoted`` (False: refused by the gate, recorded), the ``gate`` report (candidate
    and baseline metrics, failures; None for a rollback, which no gate judges), the ``promotion`` (alias,
    version, previous, model URI, who) when it happened, and ``forced`` when it went past a failed gate.

    Examples:
        ```python
        out = adreg.promote("bottle", 3, alias="production", reason="signed off")
        if not out.promoted:                      # refused: a result, not an error (recorded)
            print(out.gate.failures)
        back = adreg.rollback("bottle", reason="false alarms on line 4")
        print(back.promotion.previous, "->", back.version)
        ```
    """

    category: str
    alias: str
    version: str
    promoted: bool
    gate: object                      # adreg.registry.lifecycle.GateReport
    promotion: object | None = None   # adreg.registry.versions.Promotion
    policy: object | None = None

    @property
    def forced(self) -> bool:
        """Promoted past a gate that failed (``force``)."""
        return self.promoted and self.gate is not None and not self.gate.passed


def promote(category: str, version, alias: str = "production", *, force: bool = False, reason: str = "",
            eval_dir: str | None = None, policy=None, min_image_auroc: float | None = None,
            min_pixel_auroc: float | None = None, level: float | None = None, n_resamples: int | None = None,
            min_per_class: int | None = None, seed: int | None = None, margin: float | None = None,
            production: bool | None = None, device: str = "auto",
            tracking_uri: str | None = None) -> PromoteOutcome:
    """Move ``alias`` to ``version`` of ``adreg-<category>`` if it passes the quality gate.

    The gate evaluates the candidate (and the alias's current version, on the same images) on the evaluation
    set logged with the version, or on ``eval_dir``, with stratified bootstrap intervals (``n_resamples``, ``seed``)
    and paired tests at confidence ``level``, and refuses ``not enough evidence`` (fewer than ``min_per_class``
    good or defective images), ``below floor`` (the whole interval under ``min_image_auroc`` /
    ``min_pixel_auroc``) or ``worse`` (significantly worse than the current version, by more than ``margin``);
    or give a ``GatePolicy``
    (rules: ``adreg.statistics``); a keyword left None keeps the policy's value (its default:
    ``adreg.options.GatePolicy``). ``force`` promotes past a failed gate (needs MANAGE; recorded). Every outcome
    is recorded in the category's history.

    ``production``: also judge on the reviewed production set (``adreg.registry.labels.production_set``):
    None = whenever reviews exist, True = required, False = never. Each set is judged on its own; the gate
    passes when every set with enough evidence passes; without a fit-time set the production set decides alone.

    Returns:
        ``PromoteOutcome`` (``promoted`` False when the gate refused).

    Raises:
        NotFoundError: unknown category or version.
        PermissionDenied: the user may not move the alias.
        DataError: the version has no logged evaluation set, no ``eval_dir`` was given and nothing was reviewed.
    """
    from adreg.registry import lifecycle

    _store(tracking_uri)
    policy = _policy(policy, min_image_auroc=min_image_auroc, min_pixel_auroc=min_pixel_auroc, level=level,
                     n_resamples=n_resamples, min_per_class=min_per_class, seed=seed, margin=margin)
    promo, report = lifecycle.promote_gated(category, version, alias, policy, force=force, reason=reason,
                                            eval_dir=eval_dir, device=device, production=production)
    return PromoteOutcome(category, alias, str(version), promo is not None, report, promo, policy)


def rollback(category: str, alias: str = "production", reason: str = "", *,
             tracking_uri: str | None = None) -> PromoteOutcome:
    """Point ``alias`` back at the version it held before (skipping deleted versions); recorded.

    Returns:
        ``PromoteOutcome``: ``version`` (now), ``promotion.previous`` (before), ``gate`` None.

    Raises:
        RegistryError: there is no earlier version.
        NotFoundError: unknown category.
        PermissionDenied: the user may not move the alias.
    """
    from adreg.registry import lifecycle

    _store(tracking_uri)
    promo = lifecycle.rollback(category, alias, reason=reason)
    return PromoteOutcome(category, promo.alias, promo.version, True, None, promo)


def update(category: str, add_good: Sequence[str] | str = (), *, from_reviews: bool = False, review_seed: int = 0,
           covered_from: str | Path | None = None, from_alias: str = "production", from_version=None,
           include_suspects: bool = False, second_look: bool = True, holdout: int | None = None,
           min_calibration: int = 20, seed: int = 0, register: bool = False, promote: str | None = None, reason: str = "", policy=None,
           device: str = "auto", tracking_uri: str | None = None, show_progress: bool = True) -> UpdateOutcome:
    """Grow a registered version with more good images into a new run (and version, with ``register``).

    The parent (``from_version``, else the version ``from_alias`` points at) keeps its backbone and settings;
    duplicates (sha256) and unreadable files are skipped, images the parent flags are held out unless
    ``include_suspects`` (with ``second_look``, the grown model judges them again and learns from those it
    scores at or below its own threshold), ``holdout`` new goods recalibrate the threshold, and the result is evaluated on the
    parent's evaluation set. ``promote`` registers and promotes through the gate like ``fit``.

    ``from_reviews``: also grow with the reviewed goods on the grow side of the production set's seeded split
    (``review_seed``; false alarms included: a person confirmed them, so the guard does not hold them out;
    the other reviewed goods stay for evaluation), the labels' digest recorded in the lineage. ``holdout``
    defaults to 20 new goods, and to 0 with ``from_reviews`` alone: every reviewed good is learned from and the
    threshold is recalibrated on the parent's calibration images (``adreg threshold`` sets it from the line).

    ``covered_from``: a capture folder (``adreg serve --capture``); also grow with its passed captures that the
    parent judged and scored below its median normal image, unreviewed (``adreg.review.selection.covered_goods``:
    goods the parent already covers; never a labelled image or one of the review queue's random slice, seeded
    by ``review_seed``). How many it took is recorded (``covered_goods`` in the lineage).

    Returns:
        ``UpdateOutcome``: ``version``, ``run_id``, ``model_uri``, ``promoted``, ``gate`` and ``result`` (what
        was added, skipped, held out).

    Raises:
        DataError: no folder, no image, nothing new, every image suspect.
        NotFoundError: unknown parent.
    """
    from adreg.registry.update import UpdateOptions, update_version

    _store(tracking_uri)
    folders = [add_good] if isinstance(add_good, (str, Path)) else list(add_good)
    files, extra = [], {}
    if covered_from is not None:
        files, extra = _covered(category, covered_from, from_version, from_alias, review_seed)
    if from_reviews:
        from adreg.registry.labels import production_set

        prod = production_set(category, seed=review_seed)
        if not prod.grow:
            raise DataError(f"no reviewed goods to grow {category!r} with: the {prod.describe()} puts none on the "
                            "grow side; review more captures (adreg review / adreg label)")
        files += [str(p) for p in prod.grow]
        include_suspects = True  # reviewed goods are confirmed goods, false alarms above all
        extra.update({"review_labels": prod.digest, "review_split_seed": review_seed,
                      "review_goods": len(prod.grow)})
    elif not folders and not files:
        raise DataError("give at least one --add-good folder of good images, --from-reviews or --covered-from")
    if holdout is None:
        holdout = 0 if (from_reviews or covered_from is not None) and not folders else 20
    opts = UpdateOptions(category=category, add_good=[str(f) for f in folders], add_files=files,
                         lineage_extra=extra, from_alias=from_alias,
                         from_version=from_version, include_suspects=include_suspects,
                         second_look=second_look, holdout=holdout,
                         min_calibration=min_calibration, seed=seed, device=device)
    return update_version(opts, register=register, promote=promote, policy=_policy(policy), reason=reason,
                          show_progress=show_progress)


def _covered(category: str, capture_dir, from_version, from_alias: str, seed: int) -> tuple[list[str], dict]:
    """The unreviewed passed captures the parent covers (``update(covered_from=...)``) and what the lineage
    records of them."""
    from adreg.integrity import sha256_file
    from adreg.registry.labels import read_labels
    from adreg.registry.resolve import resolve
    from adreg.review.queue import ReviewQueue

    if not Path(capture_dir).is_dir():
        raise DataError(f"capture folder {capture_dir} does not exist (adreg serve --capture DIR writes it)")
    parent = resolve(category, from_version, from_alias).version
    labelled = {lab.sha256 for lab in read_labels(category)}
    paths = [e.path for e in ReviewQueue(Path(capture_dir), category, seed=seed).covered(parent)
             if sha256_file(e.path) not in labelled]
    return [str(p) for p in paths], {"covered_goods": len(paths), "covered_from": str(Path(capture_dir).resolve())}


def history(category: str, *, tracking_uri: str | None = None) -> list[dict]:
    """Every promotion, refusal and rollback of ``category``, oldest first (who, when, why, gate metrics): dicts
    of typed values; ``adreg.registry.events.GateRecord.of(event)`` reads an event's gate typed."""
    from adreg.registry import versions

    _store(tracking_uri)
    return versions.history(category)


def compare(category: str, v1, v2, *, tracking_uri: str | None = None):
    """Two versions side by side: an ``adreg.registry.lifecycle.VersionComparison`` (their runs' key metrics as
    (v1, v2) numbers, the parameters that differ, and the latest gate recorded for each, typed)."""
    from adreg.registry import lifecycle

    _store(tracking_uri)
    return lifecycle.compare(category, v1, v2)


def models(*, serving: bool = True, tracking_uri: str | None = None) -> list[dict]:
    """One row per registered version of every category: aliases, method, key metrics, created, and (with
    ``serving``) the live servers serving it."""
    from adreg.registry import versions

    _store(tracking_uri)
    rows = versions.list_versions()
    _annotate_quality(rows)
    if serving:
        from adreg.pyfunc.status import annotate_rows

        annotate_rows(rows)
    return rows


def _annotate_quality(rows: list[dict]) -> None:
    """Add each version's production quality from the reviews (``on_line``: flag precision and false alarms
    with their counts; the numbers as ``flag_precision`` / ``false_alarm_rate``)."""
    from adreg.review.quality import production_quality

    per = {c: production_quality(c) for c in {r["category"] for r in rows}}
    for r in rows:
        q = per[r["category"]].get(str(r["version"]))
        if q is not None:
            r.update({"flag_precision": q.flag_precision, "false_alarm_rate": q.false_alarm_rate,
                      "on_line": f"{q.flags_confirmed}/{q.flags_reviewed} flags confirmed, "
                                 f"{q.false_alarms}/{q.goods_reviewed} goods flagged, {q.misses} missed"})


def resolve(category: str, version=None, alias: str = "production", *,
            tracking_uri: str | None = None) -> ModelRef:
    """Pin ``category`` to one registered version: ``version`` when given, else the version ``alias`` points at
    (``production`` by default). Returns an ``adreg.registry.resolve.ModelRef`` (name, version, alias, uri);
    raises ``NotFoundError`` saying what exists."""
    from adreg.registry.resolve import resolve as _resolve

    _store(tracking_uri)
    return _resolve(category, version, alias)


# -- using a model ------------------------------------------------------------------------------------------
def load(category: str, version=None, alias: str = "production", device: str = "auto", *,
         tracking_uri: str | None = None):
    """A registered version's ``AnomalyDetector``: ``version`` when given, else the version ``alias`` points at
    (``production`` by default); downloaded and checked against the artifact digest recorded at registration.

    Raises ``NotFoundError`` (unknown category, version or alias) and ``IntegrityError`` (files changed)."""
    from adreg.registry.resolve import load_detector

    ref = resolve(category, version, alias, tracking_uri=tracking_uri)
    return load_detector(ref, device)


@dataclass
class PredictOutcome:
    """``rows``: one per image (path, score, is_anomaly, threshold, model_name, model_version, model_alias,
    error; ``map`` when a map was saved); ``model``: the pinned version that scored them.

    Examples:
        ```python
        out = adreg.predict("bottle", ["part1.png", "part2.jpg"])
        print(out.model.describe(), out.threshold, out.failed)
        flagged = [r["path"] for r in out.rows if r["is_anomaly"]]
        ```
    """

    model: object                     # adreg.registry.resolve.ModelRef
    rows: list[dict] = field(default_factory=list)

    @property
    def threshold(self) -> float | None:
        """The scoring version's threshold (None when no image could be scored)."""
        return next((r["threshold"] for r in self.rows if r.get("threshold") is not None), None)

    @property
    def failed(self) -> int:
        """How many images got an error instead of a score."""
        return sum(1 for r in self.rows if r["error"])


def predict(category: str, images: Sequence[str | Path], *, version=None, alias: str = "production",
            device: str = "auto", save_maps: str | None = None, batch_size: int = 16,
            tracking_uri: str | None = None) -> PredictOutcome:
    """Score image files in-process with the served model of a registered version (the same pyfunc model
    ``adreg serve`` runs); ``save_maps`` writes each anomaly map as a PNG into that folder. A file that cannot be
    read or decoded gets its own ``error``; the others are scored. ``version`` wins over ``alias``."""
    from adreg.batch.score import iter_scores, load_scoring_model

    if not images:
        raise DataError("give at least one image file")
    ref = resolve(category, version, alias, tracking_uri=tracking_uri)
    loaded = load_scoring_model(ref, device, bool(save_maps))
    out = PredictOutcome(ref)
    for rows in iter_scores(loaded, ref, [str(p) for p in images], batch_size, save_maps):
        out.rows.extend(rows)
    return out


def score(category: str, inputs: Sequence[str], output: str, *, version=None, alias: str = "production",
          engine: str = "inprocess", batch_size: int = 16, save_maps: str | None = None, resume: bool = False,
          device: str = "auto", tracking_uri: str | None = None, **spark) -> BatchResult:
    """Batch-score image files, folders (recursive) or globs into a parquet dataset ``output``, pinned to one
    version for the whole job (``version``, else the one ``alias`` points at); ``engine="spark"`` runs
    ``mlflow.pyfunc.spark_udf`` (``**spark``: master, task_cpus, partitions, env_manager, glob). Returns
    ``adreg.batch.BatchResult`` (counts, seconds)."""
    from adreg.batch import score_images

    ref = resolve(category, version, alias, tracking_uri=tracking_uri)  # before anything heavy
    if engine == "spark":
        if save_maps:
            raise ConfigError("--save-maps works with the in-process engine only; drop it or use --engine inprocess")
        from adreg.batch.spark import score_with_spark

        return score_with_spark(category, list(inputs), output, batch_size=batch_size, resume=resume, device=device,
                                model=ref, **{k: v for k, v in spark.items() if v is not None})
    if engine != "inprocess":
        raise ConfigError(f"engine must be inprocess or spark, got {engine!r}")
    return score_images(category, list(inputs), output, batch_size=batch_size, save_maps=save_maps, resume=resume,
                        device=device, model=ref)


def serve(category: str, *, alias: str = "production", version=None, host: str = "127.0.0.1", port: int = 5000,
          tracking_uri: str | None = None, **options):
    """A supervised ``mlflow models serve`` of ``adreg-<category>`` (``"router"``: the bundled router), not yet
    started: ``.start()``, ``.wait_ready()``, ``.stop()``, ``.run()`` (foreground), or ``with adreg.serve(...)``.

    The server follows ``alias`` (a promotion or rollback reaches it without a restart) unless ``version`` pins
    one. ``**options``: workers, device, precision, return_map, poll_seconds, shadow (an alias scored beside,
    off the response path), capture (a folder), capture_rate, capture_max_mib, max_request_mib, max_rows,
    server_id, protocol (``"mlflow"``: ``/invocations``, the default; ``"v2"``: the Open Inference Protocol on
    KServe's model server, ``/v2/models/adreg-<category>/infer``), grpc_port (v2: gRPC too). Raises
    ``NotFoundError`` (unknown category / alias) and ``ConfigError`` (port in use, KServe not installed)."""
    from adreg.server import build_server

    return build_server(category, alias=alias, version=version, host=host, port=port, tracking_uri=tracking_uri,
                        **options)


def status(category: str, *, tracking_uri: str | None = None) -> dict:
    """Aliases of ``category``, the servers that report serving it and each version's production quality from
    the reviews: {model, aliases, servers, quality}."""
    from adreg.pyfunc import status as server_status
    from adreg.registry.resolve import get_model

    _store(tracking_uri)
    from adreg.review.quality import production_quality

    model = get_model(category)
    return {"model": model.name, "aliases": {a: str(v) for a, v in sorted(model.aliases.items())},
            "servers": server_status.servers(model),
            "quality": {v: q.as_dict() for v, q in production_quality(category).items()}}


# -- exported runtimes, the router, drift, governance -------------------------------------------------------
def export(category: str, version, runtime: str = "openvino", *, tracking_uri: str | None = None) -> VersionOutcome:
    """Register a new version = ``version`` with its backbone exported for ``runtime`` (onnxruntime / openvino /
    openvino-int8). ``openvino-int8`` quantizes the OpenVINO backbone with NNCF, calibrated on the version's own
    good training views only, re-derives the threshold with the source's rule on its calibration images and
    re-evaluates the version on its logged evaluation set (the new metrics go on the version); it is served
    with runtime openvino and promoted through the gate like any version. Needs ``pip install 'adreg[export]'``.

    Returns:
        ``VersionOutcome``: ``version``, ``run_id``, ``model_uri`` (nothing promoted: ``promoted`` None).
    """
    from adreg.registry.export import export_version

    _store(tracking_uri)
    return export_version(category, version, runtime)


def bundle(categories: Sequence[str], alias: str = "production", promote: str | None = "production", *,
           tracking_uri: str | None = None) -> VersionOutcome:
    """Bundle ``categories`` (each at ``alias``) into the router model ``adreg-router``, register it and point
    ``promote`` at it (no gate: each category's version passed its own).

    Returns:
        ``VersionOutcome``: ``version`` of ``adreg-router``, ``run_id``, ``model_uri``, ``promoted`` (None
        without ``promote``) and ``promotion``; ``gate`` None.
    """
    from adreg.names import ROUTER
    from adreg.registry import bundle as router_bundle, versions

    _store(tracking_uri)
    out = router_bundle.build_router(list(categories), alias)
    if promote:
        out.promotion = versions.promote(ROUTER, out.version, promote, reason="serve-bundle")
        out.promoted = True
    return out


def drift(category: str, folders: Sequence[str] | str, *, alias: str = "production", version=None,
          max_alarm_ratio: float = 3.0, p_value: float = 0.01, device: str = "auto", log: bool = True,
          tracking_uri: str | None = None) -> DriftReport:
    """Compare recent production images with the reference goods logged at fit of ``version``, else of the
    version ``alias`` points at (alarm rate, KS and Mann-Whitney tests); logs a monitoring run unless ``log``
    is False. Returns a ``DriftReport``."""
    from adreg.monitoring.drift import DriftPolicy, check_drift

    _store(tracking_uri)
    return check_drift(category, folders, alias=None if version is not None else alias, version=version,
                       policy=DriftPolicy(max_alarm_ratio, p_value), device=device, log=log)


def grant(category: str, user: str, level: str, *, tracking_uri: str | None = None) -> list[dict]:
    """Admins: give ``user`` READ / EDIT / MANAGE on a category (and what the role needs on its experiments)."""
    from adreg.registry import governance

    _store(tracking_uri)
    return governance.grant(category, user, level)


def whoami(category: str | None = None, *, tracking_uri: str | None = None) -> dict:
    """The acting user and what kind of identity it is; with ``category``, the user's permission on it."""
    from adreg.names import model_name
    from adreg.registry import governance

    _store(tracking_uri)
    ident = governance.identity()
    out = {"user": ident.user, "identity": ident.kind, "is_admin": ident.is_admin, "server": ident.server}
    if category:
        out["permission"] = governance.permission("registered_model", model_name(category))
    return out


# -- reviews: labels, the production set, quality, threshold from the line ------------------------------------
def label(category: str, files: Sequence[str] | str, verdict: str, *, mask: str | None = None,
          reviewer: str | None = None, selection: str = "manual", random_share: float | None = None,
          tracking_uri: str | None = None) -> list[Label]:
    """Record a review label (``good``, ``defect`` or ``skip``) for each image file (``mask``: a defect region
    image, for one defect). Each label is its own record in the tracking store (``adreg.registry.labels``);
    a capture's sidecar supplies what the line's model said about the image. ``selection`` / ``random_share``:
    how the image was chosen (``Label.selection``; a script working through ``ReviewQueue`` passes
    ``queue.selection(entry)``, so labels of the random slice evaluate as the review page's do).

    Returns:
        ``adreg.registry.labels.Label`` records, one per file.

    Raises:
        DataError: no such file, an unknown verdict, a mask on a good.
        PermissionDenied: no EDIT where the store authenticates.
    """
    from adreg.names import check_category
    from adreg.registry.labels import record_label

    check_category(category)
    files = [files] if isinstance(files, (str, Path)) else list(files)
    if not files:
        raise DataError("give at least one image file to label")
    if mask is not None and len(files) != 1:
        raise DataError("--mask draws the region of one defect: label one file with it")
    _store(tracking_uri)
    return [record_label(category, f, verdict, mask=mask, reviewer=reviewer, selection=selection,
                         random_share=random_share) for f in files]


def labels(category: str, *, tracking_uri: str | None = None) -> list[Label]:
    """Every review label of ``category``, oldest first (``adreg.registry.labels.Label``; disagreement between
    reviewers is kept: see ``adreg.registry.labels.consensus``)."""
    from adreg.names import check_category
    from adreg.registry.labels import read_labels

    check_category(category)
    _store(tracking_uri)
    return read_labels(category)


def production_set(category: str, seed: int = 0, *, tracking_uri: str | None = None) -> ProductionSet:
    """The reviewed images as evaluation samples (defects, evaluation-side goods) and grow-side goods:
    ``adreg.registry.labels.ProductionSet``."""
    from adreg.registry.labels import production_set as _production_set

    _store(tracking_uri)
    return _production_set(category, seed=seed)


def quality(category: str, log: bool = True, *, tracking_uri: str | None = None) -> dict:
    """Production quality per version from the reviewed captures: flag precision, false-alarm rate, misses,
    each with its counts (``adreg.review.quality``); with ``log``, recorded as a monitoring run.

    Returns:
        ``{"run_id": str | None, "versions": {version: VersionQuality}}``.
    """
    from adreg.review import quality as q

    _store(tracking_uri)
    if log:
        run_id, figures = q.log_quality(category)
    else:
        run_id, figures = None, q.production_quality(category)
    return {"run_id": run_id, "versions": figures}


def threshold(category: str, *, from_alias: str = "production", from_version=None,
              target_false_alarm_rate: float | None = None, rule: str = "false_alarm", review_seed: int = 0,
              register: bool = True, promote: str | None = None, reason: str = "", policy=None,
              device: str = "auto", tracking_uri: str | None = None) -> ThresholdOutcome:
    """A new version = the parent with its threshold chosen on the reviewed production set (the review queue's
    random slice where there is one): the lowest meeting ``target_false_alarm_rate`` on the reviewed goods (by
    default the parent's own rate there: no more false alarms, all the recall that allows), or the F1 optimum
    with ``rule="f1"``; registered with its lineage and, with ``promote``, gated like any other
    (``adreg.review.threshold``).

    Returns:
        ``ThresholdOutcome``: ``version``, ``run_id``, ``model_uri``, ``promoted``, ``gate``, and the parent's and
        the new threshold with the figures ``before`` and ``after`` on the reviewed images.

    Raises:
        DataError: fewer than 10 reviewed defects or 20 evaluation-side reviewed goods; a threshold whose
            false-alarm rate on the reviewed goods lies above the parent's 95% interval.
    """
    from adreg.review.threshold import threshold_from_reviews

    _store(tracking_uri)
    return threshold_from_reviews(category, from_alias=from_alias, from_version=from_version,
                                  target_false_alarm_rate=target_false_alarm_rate, rule=rule,
                                  review_seed=review_seed, register=register, promote=promote, policy=_policy(policy), reason=reason,
                                  device=device)


def review(categories: Sequence[str] | str, capture: str | Path, *, host: str = "127.0.0.1", port: int = 8765,
           tracking_uri: str | None = None, **settings) -> None:
    """Run the browser review queue over a capture folder until interrupted (``adreg.review.app``).

    ``settings``: ``strategy`` (``informative`` by default, ``newest`` or ``random``: which captures come first,
    ``adreg.review.selection``), ``random_share`` (the share of captures kept as the random slice that honest
    figures rest on; default 0.2), ``sample_rate`` (passed captures in the ``newest`` order), ``seed``,
    ``device`` (overlays)."""
    from adreg.names import check_category
    from adreg.review.app import run
    from adreg.review.selection import check_share, check_strategy

    check_strategy(settings.get("strategy", "informative"))
    check_share(settings.get("random_share", 0.0))

    cats = [categories] if isinstance(categories, str) else list(categories)
    for c in cats:
        check_category(c)
    capture = Path(capture)
    if not capture.is_dir():
        raise DataError(f"capture folder {capture} does not exist (adreg serve --capture DIR writes it)")
    _store(tracking_uri)
    run(cats, capture, host=host, port=port, **settings)


# -- tune ---------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class TuneOutcome(FitOutcome):
    """What ``tune`` did: the search (``search``: every candidate, the choice, the evidence; ``chosen``,
    ``leaderboard()``) and, on the worker that led it, the winner's fit logged on the search's parent run
    (``run_id``), registered and promoted as asked (``FitOutcome``). A worker that joined another's search has
    ``result`` None and no model: ``fit`` is None there.

    Examples:
        ```python
        out = adreg.tune("bottle", k_shot=1, register=True)
        print(out.chosen, out.version, out.metrics["image_auroc"])
        for row in out.leaderboard()[:3]:
            print(row["rank"], row["candidate"], row["selection_image_auroc"])
        ```
    """

    search: object                      # adreg.tuning.SearchResult
    fallback: str | None = None         # why the defaults were fitted instead of searching

    @property
    def fit(self) -> FitOutcome | None:
        """The winner's fit (this outcome) on the worker that fitted it; None on a worker that joined."""
        return None if self.result is None else self

    @property
    def chosen(self) -> dict:
        """The chosen settings (FitOptions fields), empty when the defaults were fitted."""
        return {} if self.search.chosen is None else self.search.chosen.fit_settings()

    def leaderboard(self) -> list[dict]:
        """One row per candidate, best first (``adreg.tuning.record.leaderboard``)."""
        from adreg.tuning.record import leaderboard

        return leaderboard(self.search)


def tune(category: str, *, train_dir: str | None = None, val_dir: str | None = None, test_dir: str | None = None,
         evidence_dir: str | None = None, k_shot: int = 1, seed: int = 0, space=None, trials: int | None = None,
         time_budget: float | str | None = None, storage: str | None = None, study: str | None = None,
         selection_goods: int = 30, pruning: bool = True, register: bool = False, promote: str | None = None,
         export: str | None = None, tracking_uri: str | None = None, show_progress: bool = True,
         on_candidate=None, labelled_defects: Sequence = (), feature_cache: str | None = None,
         review_seed: int = 0, **settings) -> TuneOutcome:
    """Search fit settings for ``category`` on evidence the final evaluation never sees, log every candidate as
    a nested run under one parent run, then fit the winner as the parent's model (``adreg.tuning``).

    Args:
        category: product name; the model is registered as ``adreg-<category>``.
        train_dir: the product's good images (or an MVTec / MTD / ELPV folder); ``val_dir``, ``test_dir`` as in
            ``fit``. The test folder is only used after the choice, for the reported evaluation and the gate.
        evidence_dir: labelled images for the choice only (``good/`` and defect sub-folders), never the test
            folder; without it (and without validation defects) the defects are synthetic.
        k_shot, seed: the shots, drawn as ``fit`` draws them.
        space: an ``adreg.tuning.SearchSpace``, its dict form or a YAML / JSON file (default ``DEFAULT_SPACE``).
        trials: fits at most in all; time_budget: minutes per worker (a running candidate finishes; ``"auto"``:
            8x the first candidate's time; None or 0: the whole space).
        storage, study: an Optuna storage URL (``postgresql://...``) and study name shared by several workers.
        selection_goods: held-out goods in the selection set.
        pruning: stop a hopeless candidate after half the selection set.
        register, promote, export: as in ``fit``, for the winner.
        on_candidate: called with each ``CandidateOutcome`` and its fitted detector (benchmarks).
        labelled_defects: ``adreg.data.Sample`` defects (and goods) for the choice, beside ``evidence_dir``'s.
        feature_cache: a folder where the candidates' backbone features are also cached on disk (re-runs).
        review_seed: the seed of the split of reviewed production defects (half rank the candidates, the
            rest stay for the gate; the tuned version's manifest records the first half as ``selection``).
        **settings: other ``FitOptions`` fields every candidate shares (``holdout``, ``device``, ``aug_views``...).

    Returns:
        ``TuneOutcome``: the search, and on the leading worker the winner's fit (``version``, ``run_id``: the
        search's parent run, ``model_uri``, ``promoted``, ``gate``, ``metrics``, ``detector``).

    Raises:
        DataError: missing or empty folders, unreadable images, ``k_shot`` larger than the folder.
        ConfigError: a space with no valid candidate, an evidence folder that is the test folder, a worker
            whose data differ from the search it joins, ``promote`` without evidence for the gate.
        StoreUnreachable: the tracking store or the search storage is down.
        Interrupted: Ctrl-C / SIGTERM; the finished candidates stay logged, nothing is registered.
    """
    import mlflow

    from adreg.data import read_labelled_folder
    from adreg.errors import Interrupted
    from adreg.fitting import FitOptions, fit_category, load_category_data
    from adreg.names import check_category
    from adreg.registry import derive, tracking
    from adreg.tuning import SearchConfig, SearchSpace, build_evidence, run_search
    from adreg.tuning.record import log_search
    from adreg.tuning.search import options_for

    check_category(category)
    _check_settings(settings)
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    if time_budget != "auto" and time_budget is not None and (
            not isinstance(time_budget, (int, float)) or time_budget < 0):
        raise ConfigError(f"--time-budget must be minutes >= 0 (0: no limit) or 'auto', got {time_budget!r}")
    if time_budget == 0:
        time_budget = None
    base = FitOptions(category=category, train_dir=train_dir, val_dir=val_dir, test_dir=test_dir, k_shot=k_shot,
                      seed=seed, **settings)
    if isinstance(space, SearchSpace):
        search_space = space
    elif isinstance(space, dict):
        search_space = SearchSpace.from_dict(space)
    elif space is not None:
        search_space = SearchSpace.load(space)
    else:
        from adreg.tuning import DEFAULT_SPACE

        search_space = SearchSpace.from_dict(DEFAULT_SPACE, source="default")
    uri = _store(tracking_uri)
    _check_promotable(base, promote)
    data = load_category_data(base)
    labelled = list(labelled_defects)
    if evidence_dir is not None:
        ev = Path(evidence_dir).resolve()
        tests = {Path(s.path).resolve().parent.parent for s in data.test} | (
            {Path(test_dir).resolve()} if test_dir else set())
        if ev in tests or any(Path(s.path).resolve().is_relative_to(ev) for s in data.test):
            raise ConfigError(f"--evidence-dir {evidence_dir} holds test images: the choice must not see the test "
                              "folder; give a folder of its own")
        labelled += read_labelled_folder(evidence_dir, "evidence folder")
    from adreg.tuning.evidence import reviewed_for_tuning

    reviewed, reviewed_sha = reviewed_for_tuning(category, review_seed)
    evidence = build_evidence(data, base.k_shot, base.seed, base.holdout, n_goods=selection_goods, labelled=labelled,
                              reviewed=reviewed)
    config = SearchConfig(trials=trials, time_budget=time_budget, storage=storage, study=study, pruning=pruning,
                          feature_cache=feature_cache)
    experiment = tracking.fit_experiment_id(category)
    name = f"tune-{category}-k{base.k_shot}-seed{base.seed}"
    fallback = evidence.insufficient()
    client = mlflow.MlflowClient()
    if fallback:
        from adreg.tuning import SearchResult
        from adreg.tuning.search import TUNE_TAG

        parent = client.create_run(experiment, run_name=name, tags={TUNE_TAG: "parent", "adreg.category": category})
        search = SearchResult(parent.info.run_id, "", True, [], None, evidence.summary(), fallback=fallback)
    else:
        try:
            search = run_search(base, evidence, search_space, config, experiment, name, show_progress, on_candidate)
        except KeyboardInterrupt:
            raise Interrupted(_interrupted_line(client, experiment, name)) from None
        if not search.leader:
            return TuneOutcome(run_id=search.parent_run_id, tracking_uri=uri, result=None, search=search)
        if search.chosen is None:
            fallback = "no candidate completed (every one failed or was pruned); see the nested runs"
            search.fallback = fallback
    title = f"{category} k={base.k_shot} seed={base.seed}"
    try:
        log_search(client, search, search_space, evidence.describe(), title, fallback)
        chosen = options_for(base, search.chosen.fit_settings()) if search.chosen else base
        result = fit_category(chosen, show_progress=show_progress)
        if reviewed and not fallback:  # chosen on them: the gate leaves them out for this version
            from adreg.registry import manifest

            result.selection_entries = [manifest.entry(s.path, "tune", sha256=sha, role="selection")
                                        for s, sha in zip(reviewed, reviewed_sha)]
        logged = derive.log_fit(result, export=export, run_id=search.parent_run_id)
    except KeyboardInterrupt:
        client.set_terminated(search.parent_run_id, "KILLED")
        raise Interrupted(f"interrupted while fitting the winner: the search's candidates stay logged under run "
                          f"{search.parent_run_id}; nothing registered") from None
    out = TuneOutcome.of(logged, result=result, search=search, fallback=fallback)
    return _register_fit(out, register, promote, "tune --promote")


def _interrupted_line(client, experiment: str, name: str) -> str:
    """The one line of an interrupted search: how many candidates stay logged, and under which run."""
    from adreg.tuning.search import TUNE_TAG

    runs = client.search_runs([experiment], f"tags.`{TUNE_TAG}` = 'parent' and attributes.run_name = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return "interrupted before the search started; nothing logged, nothing registered"
    parent = runs[0].info.run_id
    if runs[0].info.status == "RUNNING":
        client.set_terminated(parent, "KILLED")
    n = len(client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000))
    return f"interrupted: {n} candidate run(s) logged under run {parent}; nothing registered"
