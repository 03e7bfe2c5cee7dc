"""Threshold from the line: a new version whose threshold is chosen on the reviewed production set.

The fit sets a threshold on held-out goods alone (a quantile: it has never seen a real defect). Once people
have reviewed what the line produced, ``threshold_from_reviews`` scores the production set's evaluation side
(reviewed defects + evaluation-side reviewed goods, ``adreg.registry.labels.production_set``) with a registered
version and picks the threshold there: F1-optimal (default), or the lowest one whose false-alarm rate on the
reviewed goods is at most ``target_false_alarm``. The detector is otherwise the parent's, bit for bit; the new
run records the parent, the rule and the labels' digest, and goes through the gate like any other version.

How many reviews: at least ``MIN_DEFECTS`` reviewed defects and ``MIN_GOODS`` reviewed goods. With n
defects, moving the threshold past one defect changes recall by 1/n: below 10 a single image moves it by
more than 10 points, so the F1 optimum is decided by one or two parts. And with m goods the finest
false-alarm rate that can be set is 1/m: 20 goods resolve 5%.

The threshold changes no ranking, so AUROC-type figures (what the gate compares) do not move; accuracy,
precision and false-alarm rate at the threshold do, and the gate's report shows them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlflow
import numpy as np

from adreg.data import CategoryData
from adreg.errors import DataError
from adreg.evaluation import evaluate, score_samples
from adreg.metrics import rates_at
from adreg.registry import derive, lifecycle, lineage, manifest
from adreg.registry.labels import ProductionSet, production_set
from adreg.registry.resolve import load_detector, model_version, resolve
from adreg.registry.update import UpdateResult, parent_fit_options
from adreg.thresholds import f1_optimal, target_false_alarm

MIN_DEFECTS = 10
MIN_GOODS = 20


@dataclass(kw_only=True)
class ThresholdOutcome(derive.VersionOutcome):
    """What ``threshold`` did: the new version's run (and version, promotion, gate: ``VersionOutcome``), the
    parent and its threshold, the new threshold (``rule``; ``details``: the rule's figures and the recall,
    false-alarm rate and precision on the reviewed images ``before`` and ``after``) and the production set it
    rests on.

    Examples:
        ```python
        out = adreg.threshold("mtd", from_version=3, promote="production")
        print(f"v{out.parent_version}: {out.parent_threshold:.4g} -> v{out.version}: {out.threshold:.4g}")
        print(out.before["false_alarm_rate"], out.after["false_alarm_rate"], out.promoted)
        ```
    """

    parent_version: str
    parent_threshold: float
    threshold: float
    rule: str
    details: dict
    production: ProductionSet

    @property
    def before(self) -> dict:
        """Recall, false-alarm rate, precision and accuracy of the parent's threshold on the reviewed images."""
        return self.details["before"]

    @property
    def after(self) -> dict:
        """The same figures at the new threshold."""
        return self.details["after"]


RULES = ("false_alarm", "f1")


def choose_threshold(good_scores, defect_scores, target_false_alarm_rate: float | None = None,
                     rule: str = "false_alarm", parent_threshold: float | None = None):
    """The lowest threshold meeting a false-alarm rate on the reviewed goods (``rule="false_alarm"``; the rate
    defaults to the parent's own on them: no more false alarms, all the recall that allows), or the F1
    optimum (``rule="f1"``, on request)."""
    if rule not in RULES:
        raise DataError(f"threshold rule {rule!r} is one of {', '.join(RULES)}")
    if rule == "f1":
        return f1_optimal(good_scores, defect_scores)
    if target_false_alarm_rate is None:
        good = np.asarray(good_scores, dtype=np.float64)
        target_false_alarm_rate = float((good > parent_threshold).mean()) if good.size else 0.0
    return target_false_alarm(good_scores, defect_scores, min(target_false_alarm_rate, 1 - 1e-9))


def false_alarm_bound(flagged: int, goods: int, confidence: float = 0.95) -> float:
    """Upper end of the Wilson interval of a false-alarm rate of ``flagged`` / ``goods`` (scipy): how far the
    parent's rate on the reviewed goods could lie, given how many there are."""
    from scipy.stats import binomtest

    return float(binomtest(int(flagged), int(goods)).proportion_ci(confidence, method="wilson").high)


def threshold_from_reviews(category: str, *, from_alias: str = "production", from_version=None,
                           target_false_alarm_rate: float | None = None, rule: str = "false_alarm",
                           review_seed: int = 0,
                           register: bool = True, promote: str | None = None, policy=None, reason: str = "",
                           device: str = "auto", show_progress: bool = False) -> ThresholdOutcome:
    """Log (and with ``register`` register; with ``promote`` gate and promote) a copy of the parent version
    whose threshold is set on the production set (``choose_threshold``: by default at the parent's false-alarm
    rate on the reviewed goods, or ``target_false_alarm_rate``; ``rule="f1"`` for the F1 optimum). Raises
    ``DataError`` with fewer than ``MIN_DEFECTS`` reviewed defects or ``MIN_GOODS`` reviewed goods on the
    evaluation side, and refuses a threshold whose false-alarm rate on those goods lies above the parent's
    95% interval (``false_alarm_bound``): the line would stop for good parts more often than the evidence
    says it does today."""
    t0 = time.perf_counter()
    ref = resolve(category, from_version, from_alias)
    prod = production_set(category, seed=review_seed)
    if prod.n_defective < MIN_DEFECTS or prod.n_good < MIN_GOODS:
        raise DataError(f"a threshold from the line needs at least {MIN_DEFECTS} reviewed defects and {MIN_GOODS} "
                        f"reviewed goods on the evaluation side; the {prod.describe()} has {prod.n_defective} and "
                        f"{prod.n_good}: review more captures (adreg review)")
    mv = model_version(ref)
    parent_run = mlflow.MlflowClient().get_run(mv.run_id)
    detector = load_detector(ref, device)
    parent_threshold = float(detector.threshold.value)
    scores = score_samples(detector, prod.samples, show_progress)[0]  # image scores only: no pixel metrics needed
    labels = np.array([s.label for s in prod.samples])
    good, bad = scores[labels == 0], scores[labels == 1]
    new = choose_threshold(good, bad, target_false_alarm_rate, rule, parent_threshold)
    flagged_before, flagged_after = int((good > parent_threshold).sum()), int((good > new.value).sum())
    bound = false_alarm_bound(flagged_before, len(good))
    if flagged_after / len(good) > bound:
        raise DataError(f"the {new.rule} threshold {new.value:.4g} flags {flagged_after} of the {len(good)} reviewed "
                        f"goods on the {prod.describe()}, the parent's {parent_threshold:.4g} flags {flagged_before} "
                        f"(its 95% interval reaches {bound:.1%}): refused; set --target-false-alarm at or below "
                        f"{bound:.3f}, or review more")
    new.details.update({"source": prod.describe(), "production_labels": prod.digest,
                        "parent_version": ref.version, "parent_threshold": parent_threshold,
                        "before": rates_at(labels, scores, parent_threshold),
                        "after": rates_at(labels, scores, new.value)})
    detector.threshold = new

    eval_samples, eval_source = lifecycle.logged_eval_set(category, ref.version, required=False)
    evaluation = evaluate(detector, eval_samples, new.value, show_progress) if eval_samples else None
    entries = [dict(e) for e in lineage.run_manifest(mv.run_id)["images"]]
    training = manifest.training(entries)
    params = parent_run.data.params
    opts = parent_fit_options(category, detector, params, len(training), device,
                              threshold_quantile=float(params.get("threshold_quantile", 0.99)))
    calibration = [{"path": str(s.path), "label": int(s.label), "score": float(v), "origin": "reviewed"}
                   for s, v in zip(prod.samples, scores)]
    result = UpdateResult(
        options=opts, detector=detector, data=CategoryData(train=[e["path"] for e in training],
                                                           test=list(eval_samples), source=eval_source),
        shots=[e["path"] for e in training], calibration_source=prod.describe(), evaluation=evaluation,
        calibration=calibration, parent_model=ref.name, parent_version=ref.version, parent_run_id=mv.run_id,
        parent_threshold=parent_threshold, parent_metrics=dict(parent_run.data.metrics),
        method_report={"method": detector.method.name, "what": "threshold set on the production set"},
        manifest_entries=entries, n_parent_training=len(training), seconds=time.perf_counter() - t0)
    what = (f"threshold {parent_threshold:.4g} -> {new.value:.4g} ({new.rule} on the {prod.describe()})")
    logged = derive.log_fit(result, run_name=f"threshold-{category}-v{ref.version}",
                            lineage={"parent_model": ref.name, "parent_version": ref.version,
                                     "parent_run_id": mv.run_id, "report": {"threshold": new.details, "what": what},
                                     "what": what, "threshold_rule": new.rule, "production_labels": prod.digest})
    out = ThresholdOutcome.of(logged, parent_version=ref.version, parent_threshold=parent_threshold,
                              threshold=new.value, rule=new.rule, details=new.details, production=prod)
    return derive.register_version(
        out, category, result.metrics(), register=register,
        tags={"adreg.lineage": "threshold", "adreg.parent.version": ref.version, "adreg.parent.run_id": mv.run_id,
              "adreg.threshold_rule": new.rule, "adreg.production_labels": prod.digest},
        description=f"{ref.name} version {ref.version} with its {what}, by `adreg threshold --from-reviews`",
        promote=promote, policy=policy, reason=reason or f"threshold from the line of version {ref.version}",
        device=device, candidate_eval=evaluation)
