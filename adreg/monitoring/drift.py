"""Drift check: do recent production images still look like the good images the threshold was set on?

``check_drift`` scores a folder of recent images (read recursively, e.g. the server's capture folder)
with the version an alias points at, in-process, and compares them with the reference good-image
scores logged at fit (``reference/calibration_scores.json``, see ``adreg.registry.lineage``):

* **alarm rate**: the fraction of images above the threshold against the expected false-alarm rate.
  The expected rate is the reference goods' exceedance under exchangeability, (a + 1) / (n + 1) for a
  of n reference goods above the threshold (a threshold at the maximum of 20 goods is exceeded by about
  1 new good in 21). One-sided binomial test; drift when the ratio is above ``max_alarm_ratio`` and the
  excess is significant at ``p_value``.
* **score distribution**: two-sample Kolmogorov-Smirnov test (drift when p < ``p_value``) and a one-sided
  Mann-Whitney U test (production scores larger), reported.

It logs a monitoring run (experiment ``adreg-<category>-monitoring``) linked to the model version by
tags (model name, version, run) and to its LoggedModel by metrics, with a histogram picture, and tags
the version with the last check. ``drift`` is True past a limit: the CLI exits 1, so a scheduled job
can trigger ``adreg update``.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import numpy as np

from adreg.errors import ConfigError, DataError, ImageDecodeError
from adreg.images import load_image
from adreg import store
from adreg.names import monitoring_experiment_name
from adreg.registry import lineage, manifest
from adreg.registry.resolve import load_detector, model_version, resolve


@dataclass
class DriftPolicy:
    max_alarm_ratio: float = 3.0  # observed alarm rate / expected false-alarm rate
    p_value: float = 0.01  # significance of both tests

    def check(self) -> None:
        if self.max_alarm_ratio < 1:
            raise ConfigError(f"--max-alarm-ratio must be >= 1, got {self.max_alarm_ratio}")
        if not 0 < self.p_value < 1:
            raise ConfigError(f"--p-value must be in (0, 1), got {self.p_value}")


@dataclass
class DriftReport:
    """Recent production images against the reference goods logged at fit (``adreg.drift`` returns one).

    Attributes:
        version: the version the images were scored with (``alias`` when resolved from one).
        n_images: production images scored; ``n_reference``: the version's reference goods.
        alarm_rate: share of production images above the threshold; ``expected_alarm_rate``: the
            reference goods' share; ``alarm_ratio``: the first over the second; ``binomial_p``: how likely
            that many alarms are at the expected rate.
        ks_statistic, ks_p, mannwhitney_p: the two-sample tests of production scores against reference scores.
        score_median, reference_median: the two score medians.
        drift: True when the alarm rate (above ``max_alarm_ratio`` times the expected one, binomial p below
            ``p_value``) or the KS test (p below ``p_value``) says so; ``reasons`` says which, in words.
        unreadable: images that could not be read (path and error), left out of the figures.

    Examples:
        ```python
        report = adreg.drift("bottle", ["line/2026-12-07"])
        if report.drift:
            print(report.reasons)   # e.g. ['12/40 images (30.0%) are above the threshold 266, 6.0x the ...']
        print(f"{report.alarm_rate:.3f} vs {report.expected_alarm_rate:.3f}")
        ```
    """

    category: str
    model_name: str
    version: str
    alias: str | None
    run_id: str  # the model version's run
    threshold: float
    n_images: int
    n_reference: int
    alarm_rate: float
    expected_alarm_rate: float
    alarm_ratio: float
    binomial_p: float
    ks_statistic: float
    ks_p: float
    mannwhitney_p: float
    score_median: float
    reference_median: float
    drift: bool
    reasons: list[str] = field(default_factory=list)
    unreadable: list[dict] = field(default_factory=list)
    scores: list[dict] = field(default_factory=list, repr=False)  # path, score, is_anomaly
    reference_source: str = ""
    median_normal_percentile: float = float("nan")  # of the production images (50 = like a median held-out good)
    monitoring_run_id: str | None = None

    def metrics(self) -> dict[str, float]:
        keys = ("n_images", "n_reference", "alarm_rate", "expected_alarm_rate", "alarm_ratio", "binomial_p",
                "ks_statistic", "ks_p", "mannwhitney_p", "score_median", "reference_median", "threshold",
                "median_normal_percentile")
        out = {k: float(getattr(self, k)) for k in keys}
        out.update({"drift": float(self.drift), "n_unreadable": float(len(self.unreadable))})
        return out

    @property
    def verdict(self) -> str:
        return "DRIFT" if self.drift else "no drift"


def compare_scores(scores, reference, threshold: float, policy: DriftPolicy) -> dict:
    """The statistics and verdict of production ``scores`` against ``reference`` good scores."""
    from scipy import stats

    scores, reference = np.asarray(scores, np.float64), np.asarray(reference, np.float64)
    n, m = scores.size, reference.size
    alarms = int((scores > threshold).sum())
    expected = (int((reference > threshold).sum()) + 1) / (m + 1)
    rate = alarms / n
    binom_p = float(stats.binomtest(alarms, n, expected, alternative="greater").pvalue)
    ks = stats.ks_2samp(scores, reference)
    mw_p = float(stats.mannwhitneyu(scores, reference, alternative="greater").pvalue)
    ratio = rate / expected
    reasons = []
    if ratio > policy.max_alarm_ratio and binom_p < policy.p_value:
        reasons.append(f"{alarms}/{n} images ({rate:.1%}) are above the threshold {threshold:.4g}, "
                       f"{ratio:.1f}x the expected false-alarm rate {expected:.1%} (binomial p = {binom_p:.2g})")
    if ks.pvalue < policy.p_value:
        direction = "higher" if np.median(scores) > np.median(reference) else "lower"
        reasons.append(f"the score distribution moved ({direction} scores): KS D = {ks.statistic:.3f}, "
                       f"p = {ks.pvalue:.2g} against {m} reference good images")
    return {"alarm_rate": rate, "expected_alarm_rate": expected, "alarm_ratio": ratio, "binomial_p": binom_p,
            "ks_statistic": float(ks.statistic), "ks_p": float(ks.pvalue), "mannwhitney_p": mw_p,
            "score_median": float(np.median(scores)), "reference_median": float(np.median(reference)),
            "drift": bool(reasons), "reasons": reasons}


def histogram_figure(scores, reference, threshold: float, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.4), dpi=100)
    ax = fig.subplots()
    both = np.r_[scores, reference]
    bins = np.linspace(both.min(), both.max(), 30) if both.size and both.min() < both.max() else 10
    ax.hist(reference, bins=bins, alpha=0.6, density=True, color="tab:green",
            label=f"reference goods at fit ({len(reference)})")
    ax.hist(scores, bins=bins, alpha=0.6, density=True, color="tab:blue", label=f"production ({len(scores)})")
    ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.4g}")
    ax.set(xlabel="image score", ylabel="density", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _score_folder(detector, folders: list[str]):
    paths = manifest.find_images(folders, "drift folder")
    if not paths:
        raise DataError(f"no images found under {', '.join(map(str, folders))} (looked recursively); "
                        "nothing to check")
    images, kept, unreadable = [], [], []
    for p in paths:
        try:
            images.append(load_image(p))
            kept.append(p)
        except ImageDecodeError as exc:
            unreadable.append({"path": str(p), "error": str(exc).removeprefix(f"{p}: ")})
    if not images:
        raise DataError(f"none of the {len(paths)} file(s) under {', '.join(map(str, folders))} is a readable image")
    scores = detector.predict(images).scores
    return kept, scores, unreadable


def check_drift(category: str, folders: list[str] | str, alias: str | None = "production", version=None,
                policy: DriftPolicy | None = None, device: str = "auto", log: bool = True) -> DriftReport:
    """Score ``folders`` with the alias's (or ``version``'s) model and compare with its reference goods."""
    policy = policy or DriftPolicy()
    policy.check()
    folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
    ref = resolve(category, version, alias)
    version, alias, name = ref.version, ref.alias, ref.name
    mv = model_version(ref)
    reference_doc = lineage.run_reference(mv.run_id)
    detector = load_detector(ref, device)
    reference = [r["score"] for r in reference_doc["images"] if r["label"] == 0]
    if len(reference) < 2:
        raise DataError(f"{name} version {version} has {len(reference)} reference good score(s); drift needs "
                        "at least 2 (update or refit it with a validation or hold-out set)")
    threshold = float(detector.threshold.value)
    paths, scores, unreadable = _score_folder(detector, folders)
    stats = compare_scores(scores, reference, threshold, policy)
    percentiles = detector.normal_percentile(scores)
    report = DriftReport(category=category, model_name=name, version=version, alias=alias, run_id=mv.run_id,
                         threshold=threshold, n_images=len(paths), n_reference=len(reference),
                         unreadable=unreadable, reference_source=reference_doc.get("source", ""),
                         scores=[{"path": str(p), "score": float(s), "is_anomaly": bool(s > threshold),
                                  "normal_percentile": float(q)}
                                 for p, s, q in zip(paths, scores, percentiles)],
                         median_normal_percentile=float(np.median(percentiles)), **stats)
    if log:
        model_id = getattr(mv, "model_id", None) or (
            mv.source.split("/", 1)[1] if str(mv.source).startswith("models:/m-") else None)  # its LoggedModel
        report.monitoring_run_id = log_drift(report, folders, policy, reference, model_id)
    return report


def log_drift(report: DriftReport, folders: list[str], policy: DriftPolicy, reference, model_id=None) -> str:
    """One run in ``adreg-<category>-monitoring`` linked to the model version; returns its id."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    exp = store.experiment_id(monitoring_experiment_name(report.category))
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with mlflow.start_run(experiment_id=exp, run_name=f"drift-{report.category}-v{report.version}-{at}") as run:
        mlflow.set_tags({"adreg.category": report.category, "adreg.monitoring": "drift",
                         "adreg.model_name": report.model_name, "adreg.model_version": report.version,
                         "adreg.model_run_id": report.run_id, "adreg.alias": report.alias or "",
                         "adreg.drift.verdict": report.verdict})
        mlflow.log_params({"folders": json.dumps([str(f) for f in folders]), "alias": report.alias or "",
                           "model_version": report.version, "max_alarm_ratio": policy.max_alarm_ratio,
                           "p_value": policy.p_value, "reference_source": report.reference_source[:500]})
        digest = manifest.digest({"sha256": None, "path": s["path"]} for s in report.scores)
        mlflow.log_input(MetaDataset(LocalArtifactDatasetSource(str(Path(folders[0]).resolve())),
                                     name=f"{report.category}-production", digest=digest), context="production")
        metrics = report.metrics()
        mlflow.log_metrics(metrics)
        if model_id:  # the same numbers on the model's own page (its LoggedModel)
            try:
                mlflow.log_metrics({f"drift_{k}": v for k, v in metrics.items()}, model_id=model_id)
            except Exception:  # noqa: BLE001 - a store without LoggedModels: the run tags still link them
                pass
        summary = {k: v for k, v in asdict(report).items() if k != "scores"}
        mlflow.log_dict({**summary, "reference_scores": list(map(float, reference))}, "drift/report.json")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["path", "score", "is_anomaly", "normal_percentile"])
        writer.writeheader()
        writer.writerows(report.scores)
        mlflow.log_text(buf.getvalue(), "drift/scores.csv")
        with tempfile.TemporaryDirectory() as tmp:
            fig = histogram_figure([s["score"] for s in report.scores], reference, report.threshold,
                                   f"{report.model_name} v{report.version}: {report.verdict}")
            fig.savefig(Path(tmp) / "histogram.png")
            mlflow.log_artifact(str(Path(tmp) / "histogram.png"), "drift")
    client = mlflow.MlflowClient()
    client.set_model_version_tag(report.model_name, report.version, "adreg.drift.last",
                                 json.dumps({"at": at, "run_id": run.info.run_id, "verdict": report.verdict,
                                             "alarm_rate": round(report.alarm_rate, 4),
                                             "ks_p": float(f"{report.ks_p:.3g}")}))
    return run.info.run_id
