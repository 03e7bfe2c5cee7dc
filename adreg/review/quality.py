"""Production quality per version, from what reviewers said about what each version judged on the line.

For every version that judged reviewed captures (the capture sidecar's version, kept with the label):

* ``flag_precision`` = confirmed defects / reviewed flags (of the images it flagged and a person reviewed,
  the share that were defects);
* ``false_alarm_rate`` = reviewed goods it flagged / reviewed goods it judged;
* ``misses`` = reviewed passes that were defects, ``miss_rate`` = misses / reviewed passes (from the passed
  sample the review queue shows after the flags).

Each figure comes with the counts it rests on. Where reviewers labelled any of the review queue's random slice
(``adreg.review.selection``: a seeded share of all captures, whatever they look like), the figures are computed
on that slice only, so they are the line's own rates; ``VersionQuality.random_slice`` says so. Without one (labels
given with ``adreg label``, or only actively chosen images), the figures are over what people chose to review,
which over-represents flags and hard images. Disputed images (reviewers disagree) count in no figure. ``log_quality`` records the figures as one run of the category's
monitoring experiment (``adreg-<category>-monitoring``), metrics ``v<N>_flag_precision`` and so on.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import mlflow

from adreg import store
from adreg.names import monitoring_experiment_name
from adreg.registry.labels import DISPUTED, Label, consensus, labels_digest, read_labels


@dataclass
class VersionQuality:
    """Counts and rates of one version on the reviewed captures it judged."""

    version: str
    reviewed: int = 0
    flags_reviewed: int = 0
    flags_confirmed: int = 0
    false_alarms: int = 0
    goods_reviewed: int = 0
    passes_reviewed: int = 0
    misses: int = 0
    random_slice: bool = False  # computed on the review queue's random slice only

    @property
    def flag_precision(self) -> float:
        return self.flags_confirmed / self.flags_reviewed if self.flags_reviewed else math.nan

    @property
    def false_alarm_rate(self) -> float:
        return self.false_alarms / self.goods_reviewed if self.goods_reviewed else math.nan

    @property
    def miss_rate(self) -> float:
        return self.misses / self.passes_reviewed if self.passes_reviewed else math.nan

    def as_dict(self) -> dict:
        return {**asdict(self), "flag_precision": self.flag_precision, "false_alarm_rate": self.false_alarm_rate,
                "miss_rate": self.miss_rate}

    def text(self) -> str:
        """One line: each rate with the counts it rests on."""
        def pct(x):
            return "-" if math.isnan(x) else f"{100 * x:.0f}%"
        return (f"flag precision {pct(self.flag_precision)} ({self.flags_confirmed}/{self.flags_reviewed} flags), "
                f"false alarms {pct(self.false_alarm_rate)} ({self.false_alarms}/{self.goods_reviewed} goods), "
                f"misses {self.misses}/{self.passes_reviewed} passes"
                + (" (random slice)" if self.random_slice else " (what people chose to review)"))


def production_quality(category: str, labels: list[Label] | None = None) -> dict[str, VersionQuality]:
    """``{version: VersionQuality}`` over the reviewed captures (labels with the judging version and verdict)."""
    labels = read_labels(category) if labels is None else labels
    verdicts = list(consensus(labels).values())
    sliced = [v for v in verdicts if any(lab.selection == "random" for lab in v.labels)]
    out: dict[str, VersionQuality] = {}
    for v in sliced or verdicts:
        lab = v.latest
        if v.verdict == DISPUTED or lab.judged_version is None or lab.flagged is None:
            continue
        q = out.setdefault(lab.judged_version, VersionQuality(lab.judged_version, random_slice=bool(sliced)))
        q.reviewed += 1
        defect = v.verdict == "defect"
        if lab.flagged:
            q.flags_reviewed += 1
            q.flags_confirmed += defect
        else:
            q.passes_reviewed += 1
            q.misses += defect
        if not defect:
            q.goods_reviewed += 1
            q.false_alarms += bool(lab.flagged)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else kv[0]))


def log_quality(category: str, labels: list[Label] | None = None) -> tuple[str, dict[str, VersionQuality]]:
    """Compute and record the figures as one run of the monitoring experiment; returns (run id, figures)."""
    labels = read_labels(category) if labels is None else labels
    quality = production_quality(category, labels)
    exp = store.experiment_id(monitoring_experiment_name(category))
    at = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    with contextlib.redirect_stdout(sys.stderr):  # MLflow prints the run's URL; stdout may carry --json
        with mlflow.start_run(experiment_id=exp, run_name=f"quality-{category}-{at}") as run:
            mlflow.set_tags({"adreg.category": category, "adreg.kind": "production_quality",
                             "adreg.review_labels": labels_digest(labels)})
            metrics = {}
            for version, q in quality.items():
                for key, value in q.as_dict().items():
                    if key not in ("version", "random_slice") and not (isinstance(value, float) and math.isnan(value)):
                        metrics[f"v{version}_{key}"] = float(value)
            metrics["n_labels"] = float(len(labels))
            mlflow.log_metrics(metrics)
            mlflow.log_dict({v: q.as_dict() for v, q in quality.items()}, "quality.json")
    return run.info.run_id, quality
