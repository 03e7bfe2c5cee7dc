"""Quality-gated promotion, rollback, history and comparison of registered versions.

Alias scheme: ``staging`` for a candidate under trial, ``production`` for what serves. Promoting to an
alias runs a gate: the candidate is evaluated on the evaluation set logged with it (or ``eval_dir``),
and so is the version the alias points at now, on the same images; bootstrap intervals, paired tests and
the decision rules are ``adreg.statistics``'s (refused: ``not enough evidence``, ``below floor``, ``worse``).
``force`` overrides a failed gate and is recorded.
Every promotion, refusal and rollback is an event in the category's history (one run each in the
lifecycle experiment ``adreg-<category>/lifecycle``),
so ``rollback`` can restore the previous version and ``history`` can show who did what, when and why; the gate
recorded with an event reads back typed (``adreg.registry.events.GateRecord``) and ``compare`` returns typed
figures (``VersionComparison``): the command line formats both (``adreg.cli.render``).
Permissions (``adreg.registry.governance``) are checked before the gate runs: a refusal changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlflow

from adreg import statistics, store
from adreg.data import Sample, read_labelled_folder
from adreg.detector import AnomalyDetector
from adreg.errors import DataError, RegistryError
from adreg.evaluation import EvalResult, evaluate
from adreg.options import GatePolicy  # noqa: F401 - re-exported: adreg.registry.lifecycle.GatePolicy
from adreg.registry import events, governance, versions
from adreg.registry.resolve import check_version, existing_versions, get_model, load_detector, model_version, resolve

#: the run metrics ``compare`` puts side by side, in this order
COMPARED_METRICS = (*statistics.GATED, "image_f1_max", "pixel_f1_max", "threshold", "test_accuracy",
                    "test_false_alarm_rate", "fit_seconds", "latency_ms_per_image")


@dataclass
class GateReport:
    """The gate's outcome for one promotion: passed or not, the candidate's (and the baseline's) reported metrics,
    the decision with its evidence (intervals, paired tests, verdicts, set size), the failures, the set judged on
    and, for a gate over several sets, one report per set. ``summary`` is what a lifecycle event records."""

    passed: bool
    candidate: dict[str, float]
    decision: statistics.GateDecision
    baseline: dict[str, float] | None = None
    baseline_version: str | None = None
    failures: list[str] = field(default_factory=list)
    eval_set: str = ""
    eval_paths: list[str] = field(default_factory=list, repr=False)  # the images judged on
    kind: str = "fit-time"  # which set: fit-time (test folder / logged) or production (reviewed images)
    parts: list["GateReport"] = field(default_factory=list, repr=False)  # one report per set when several
    production_digest: str | None = None  # the review labels the production set rests on

    @property
    def verdict(self) -> str:
        return self.decision.verdict

    def summary(self) -> dict:
        """JSON-ready: recorded with the lifecycle event (read back as ``adreg.registry.events.GateRecord``),
        printed by ``adreg promote --json``."""
        keep = lambda m: None if m is None else {k: round(m[k], 5) for k in statistics.GATED if k in m}  # noqa: E731
        out = {"gate_passed": self.passed, "candidate_metrics": keep(self.candidate),
               "baseline_version": self.baseline_version, "baseline_metrics": keep(self.baseline),
               "gate_failures": self.failures, "eval_set": self.eval_set, "gate_set": self.kind,
               **self.decision.summary()}
        if self.parts:
            out["sets"] = [{"set": p.kind, "eval_set": p.eval_set, "verdict": p.verdict, "gate_passed": p.passed,
                            "n_good": p.decision.n_good, "n_defective": p.decision.n_defective,
                            "candidate_metrics": keep(p.candidate), "baseline_metrics": keep(p.baseline)}
                           for p in self.parts]
        if self.production_digest:
            out["production_labels"] = self.production_digest
        return out

    @property
    def sets(self) -> list["GateReport"]:
        """The per-set reports (this one alone when it judged one set)."""
        return self.parts or [self]


def check_gate(candidate: EvalResult, baseline: EvalResult | None, policy: GatePolicy,
               baseline_name: str = "the baseline") -> statistics.GateDecision:
    """The gate's decision on per-image results of the candidate and of the alias's current version (same
    images): bootstrap intervals, paired tests, verdicts (``adreg.statistics.decide``; ``.failures`` empty =
    passes). Floors on metrics the set cannot measure (pixel AUROC without masks) do not apply."""
    return statistics.evaluate_gate(
        statistics.from_evaluation(candidate), None if baseline is None else statistics.from_evaluation(baseline),
        policy.floors(), policy.level, policy.n_resamples, policy.pixel_resamples, policy.seed,
        policy.min_per_class, policy.pixel_size, baseline_name, policy.margin)


def load_version_detector(category: str, version, device: str = "auto") -> AnomalyDetector:
    """A registered version's detector, downloaded and verified (``adreg.registry.resolve.load_detector``)."""
    return load_detector(resolve(category, version), device)


def logged_eval_set(category: str, version, required: bool = True) -> tuple[list[Sample], str]:
    """The evaluation set logged with a version's run (``required`` False: empty when it was fitted without
    one; its images missing from this machine is an error either way)."""
    from adreg.registry.tracking import EVAL_MANIFEST

    mv = model_version(resolve(category, version))
    manifest = store.load_run_dict(mv.run_id, EVAL_MANIFEST)
    if manifest is None and not required:
        return [], ""
    if manifest is None:
        raise DataError(f"version {version} was logged without an evaluation set (fitted without a test folder); "
                        "pass --eval-dir")
    samples = [Sample(Path(r["path"]), r["label"], r["defect"], r["mask_path"] and Path(r["mask_path"]))
               for r in manifest["samples"]]
    missing = [str(s.path) for s in samples if not s.path.is_file()]
    if missing:
        raise DataError(f"{len(missing)} images of version {version}'s evaluation set are not on this machine "
                        f"(e.g. {missing[0]}); pass --eval-dir")
    return samples, manifest.get("source", "logged evaluation set")


def evaluate_version(category: str, version, samples: list[Sample], device: str = "auto") -> EvalResult:
    """A registered version evaluated on ``samples``: metrics and the per-image scores, maps and masks."""
    detector = load_version_detector(category, version, device)
    return evaluate(detector, samples, detector.threshold.value, show_progress=False)


def _gate_on(category: str, version: str, alias: str, samples: list[Sample], eval_set: str, policy: GatePolicy,
             device: str, candidate_eval: EvalResult | None = None, kind: str = "fit-time") -> GateReport:
    """The gate on one set of images: candidate and the alias's current version evaluated and decided."""
    if candidate_eval is not None and [str(s.path) for s in candidate_eval.samples] != [str(s.path) for s in samples]:
        candidate_eval = None  # measured on other images: evaluate again on this set
    candidate = candidate_eval or evaluate_version(category, version, samples, device)
    current = get_model(category).aliases.get(alias)
    current = None if current is None else str(current)
    baseline = None
    if current is not None and str(current) != version:
        baseline = evaluate_version(category, current, samples, device)
    decision = check_gate(candidate, baseline, policy, f"v{current}")
    report = GateReport(decision.passed, candidate.metrics, decision, None if baseline is None else baseline.metrics,
                        None if baseline is None else str(current), decision.failures, eval_set, kind=kind)
    report.eval_paths = [str(s.path) for s in samples]
    return report


def combine_reports(parts: list[GateReport]) -> GateReport:
    """One gate over several sets: it passes when every set with enough evidence passes and at least one has
    enough; a set without enough evidence decides only when no set has enough (then: not enough evidence)."""
    if len(parts) == 1:
        return parts[0]
    decisive = [p for p in parts if p.verdict != statistics.NOT_ENOUGH]
    passed = bool(decisive) and all(p.passed for p in decisive)
    primary = next((p for p in decisive if not p.passed), None) or (decisive or parts)[0]
    failures = [f"{p.kind} set: {f}" for p in (decisive or parts) for f in p.failures]
    report = GateReport(passed, primary.candidate, primary.decision, primary.baseline, primary.baseline_version,
                        failures, " + ".join(p.eval_set for p in parts), kind=primary.kind, parts=parts)
    report.eval_paths = primary.eval_paths
    return report


def _learned(category: str, versions_: list) -> set[str]:
    """sha256 of every image the given versions learned from or were chosen on (their training manifests)."""
    from adreg.registry import lineage, manifest

    out: set[str] = set()
    for v in {str(v) for v in versions_ if v is not None}:
        entries = lineage.run_manifest(model_version(resolve(category, v)).run_id)["images"]
        out |= {e["sha256"] for e in manifest.seen(entries) if e.get("sha256")}
    return out


def run_gate(category: str, version, alias: str, policy: GatePolicy, eval_dir: str | None = None,
             device: str = "auto", candidate_eval: EvalResult | None = None, production: bool | None = None,
             review_seed: int = 0) -> GateReport:
    """Evaluate candidate and current alias holder on the same images and decide (``check_gate``).

    Sets: the fit-time set (``eval_dir``, else the evaluation set logged with the version) and the production
    set (reviewed defects and evaluation-side reviewed goods, ``adreg.registry.labels.production_set``) when
    reviews exist (``production`` None) or when asked (True; False: never). With both, each set is judged
    on its own and ``combine_reports`` decides; with no fit-time set, the production set alone.
    ``candidate_eval`` may be given when the candidate was just evaluated on the version's logged
    evaluation set (right after a fit or an update): used when its images are that set's, in order."""
    from adreg.registry import labels

    version = str(version)
    sets, missing = [], None
    if eval_dir:
        sets.append((read_labelled_folder(eval_dir, "evaluation folder"), str(eval_dir), "fit-time", None))
    else:
        try:
            samples, source = logged_eval_set(category, version)
            sets.append((samples, source, "fit-time", candidate_eval))
        except DataError as exc:
            missing = exc
    prod = None
    if production is not False:
        prod = labels.production_set(category, seed=review_seed)
        if prod.samples:  # never judge a version on reviewed images it (or the version it is compared with) learned
            prod = prod.without(_learned(category, [version, get_model(category).aliases.get(alias)]))
        if prod.samples:
            sets.append((prod.samples, prod.describe(), "production", None))
        elif production:
            raise DataError(f"no reviewed images of {category!r} to build a production set from; review captures "
                            "first (adreg review / adreg label)")
    if not sets:
        raise DataError(f"{missing}, or review captured images so the gate can judge on a production set "
                        "(adreg review / adreg label)")
    parts = [_gate_on(category, version, alias, samples, name, policy, device, cand, kind)
             for samples, name, kind, cand in sets]
    report = combine_reports(parts)
    if prod is not None and prod.samples:
        report.production_digest = prod.digest
    return report


def promote_gated(category: str, version, alias: str = "production", policy: GatePolicy | None = None,
                  force: bool = False, reason: str = "", eval_dir: str | None = None,
                  device: str = "auto", candidate_eval: EvalResult | None = None, production: bool | None = None
                  ) -> tuple[versions.Promotion | None, GateReport]:
    """Run the gate and promote when it passes (or when forced); returns (promotion or None, report).
    The user's permission for the alias (and for ``force``) is checked first: refused, nothing runs."""
    version = check_version(category, version)
    governance.require(category, governance.needed_for_alias(alias), f"moving alias {alias!r}")
    if force:
        governance.require(category, "MANAGE", "forcing a promotion past the gate")
    report = run_gate(category, version, alias, policy or GatePolicy(), eval_dir, device, candidate_eval, production)
    if not report.passed and not force:
        event = events.record_event(category, {"action": "refused", "alias": alias, "version": str(version),
                                               "previous": report.baseline_version,
                                               "reason": reason or f"gate: {report.verdict}",
                                               **report.summary()})
        _log_gate_input(event["run_id"], category, report)
        return None, report
    action = "promote" if report.passed else "force"
    promo = versions.promote(category, version, alias, reason=reason or action, action=action,
                             details=report.summary())
    _log_gate_input(promo.event_run, category, report)
    return promo, report


def _log_gate_input(run_id: str, category: str, report: GateReport) -> None:
    """The images the gate judged on, as the event run's ``evaluation`` dataset inputs (digest over sha256):
    ``<category>-gate`` (the fit-time set) and ``<category>-production`` (reviewed images)."""
    from adreg.registry.lineage import log_image_set

    for part in report.sets:
        name = f"{category}-production" if part.kind == "production" else f"{category}-gate"
        log_image_set(part.eval_paths, name, "evaluation", run_id=run_id)


def production_stack(events: list[dict], alias: str) -> list[str]:
    """Replay the history of ``alias``: promotions push a version, rollbacks pop one."""
    stack: list[str] = []
    for e in events:
        if e.get("alias") != alias or e["action"] == "refused":
            continue
        if e["action"] == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != str(e["version"]):
                stack.append(str(e["version"]))
        elif not stack or stack[-1] != str(e["version"]):
            stack.append(str(e["version"]))
    return stack


def rollback(category: str, alias: str = "production", reason: str = "") -> versions.Promotion:
    """Point ``alias`` back at the version it held before the current one (skipping deleted versions)."""
    model = get_model(category)
    governance.require(category, governance.needed_for_alias(alias), f"rolling back alias {alias!r}")
    current = model.aliases.get(alias)
    stack = production_stack(versions.history(category), alias)
    if current is not None and (not stack or stack[-1] != str(current)):
        stack.append(str(current))  # the alias was moved outside adreg; treat that as the latest promotion
    existing = {str(v) for v in existing_versions(category)}
    skipped = []
    stack.pop() if stack else None
    while stack and stack[-1] not in existing:
        skipped.append(stack.pop())
    if not stack:
        raise RegistryError(f"{model.name}@{alias} has no earlier version to roll back to"
                            + (f" (versions {', '.join(skipped)} were deleted)" if skipped else ""))
    target = stack[-1]
    note = f"; skipped deleted versions {', '.join(skipped)}" if skipped else ""
    return versions.promote(category, target, alias, reason=(reason or "rollback") + note, action="rollback")


@dataclass(frozen=True)
class VersionComparison:
    """Two versions side by side (``compare``): their runs' metrics (``COMPARED_METRICS`` either run has, as
    (first, second), None where one lacks it), the parameters that differ, and per version the latest gate it went
    through (``gates``) and the latest that compared it with a baseline (``tested``: its paired tests); None
    where there is none (or the history could not be read)."""

    versions: tuple[str, str]
    metrics: dict[str, tuple[float | None, float | None]]
    params: dict[str, tuple[str | None, str | None]]
    gates: dict[str, events.GateEvent | None]
    tested: dict[str, events.GateEvent | None]


def _recorded_gates(category: str, versions_: tuple[str, str]) -> tuple[dict, dict]:
    """Per version: the latest recorded gate (promote, force, refused) and the latest with paired tests."""
    try:
        gated = [g for g in map(events.GateEvent.of, versions.history(category)) if g is not None]
    except Exception:  # noqa: BLE001 - the history is an extra; compare works without it
        gated = []
    latest = {v: next((g for g in reversed(gated) if g.version == v), None) for v in versions_}
    tested = {v: next((g for g in reversed(gated) if g.version == v and g.gate.paired), None) for v in versions_}
    return latest, tested


def compare(category: str, v1, v2) -> VersionComparison:
    """The two versions' run metrics, their differing params, and the latest promotion gate recorded for each
    (verdict, set size, intervals, paired difference and p)."""
    client = mlflow.MlflowClient()
    runs = [client.get_run(model_version(resolve(category, v)).run_id) for v in (v1, v2)]
    m1, m2 = runs[0].data.metrics, runs[1].data.metrics
    metrics = {k: (m1.get(k), m2.get(k)) for k in COMPARED_METRICS if k in m1 or k in m2}
    p1, p2 = runs[0].data.params, runs[1].data.params
    params = {k: (p1.get(k), p2.get(k)) for k in sorted(set(p1) | set(p2)) if p1.get(k) != p2.get(k)}
    pair = (str(v1), str(v2))
    return VersionComparison(pair, metrics, params, *_recorded_gates(category, pair))
