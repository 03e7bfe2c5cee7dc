"""Quality-gated promotion, rollback, history and comparison of registered versions.

Alias scheme: ``staging`` for a candidate under trial, ``production`` for what serves. Promoting to an
alias runs a gate: the candidate is evaluated on the evaluation set logged with it (or ``eval_dir``),
and so is the version the alias points at now, on the same images; bootstrap intervals, paired tests and
the decision rules are ``adreg.statistics``'s (refused: ``not enough evidence``, ``below floor``, ``worse``).
``force`` overrides a failed gate and is recorded.
Every promotion, refusal and rollback is an event in the category's history (one run each in the
lifecycle experiment ``adreg-<category>/lifecycle``),
so ``rollback`` can restore the previous version and ``history`` can show who did what, when and why.
Permissions (``adreg.registry.governance``) are checked before the gate runs: a refusal changes nothing.
"""

from __future__ import annotations

import json
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

COMPARED = ("image_auroc", "pixel_auroc", "aupro")


@dataclass
class GateReport:
    passed: bool
    candidate: dict[str, float]
    baseline: dict[str, float] | None = None
    baseline_version: str | None = None
    failures: list[str] = field(default_factory=list)
    eval_set: str = ""
    decision: statistics.GateDecision | None = None  # intervals, paired tests, verdicts, set size
    eval_paths: list[str] = field(default_factory=list, repr=False)  # the images judged on
    kind: str = "fit-time"  # which set: fit-time (test folder / logged) or production (reviewed images)
    parts: list["GateReport"] = field(default_factory=list, repr=False)  # one report per set when several
    production_digest: str | None = None  # the review labels the production set rests on

    @property
    def verdict(self) -> str:
        return self.decision.verdict if self.decision else (statistics.PROMOTE if self.passed else "refused")

    def summary(self) -> dict:
        keep = lambda m: None if m is None else {k: round(m[k], 5) for k in COMPARED if k in m}  # noqa: E731
        out = {"gate_passed": self.passed, "candidate_metrics": keep(self.candidate),
               "baseline_version": self.baseline_version, "baseline_metrics": keep(self.baseline),
               "gate_failures": self.failures, "eval_set": self.eval_set, "gate_set": self.kind,
               **(self.decision.summary() if self.decision else {})}
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
    report = GateReport(decision.passed, candidate.metrics, None if baseline is None else baseline.metrics,
                        None if baseline is None else str(current), decision.failures, eval_set, decision, kind=kind)
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
    report = GateReport(passed, primary.candidate, primary.baseline, primary.baseline_version, failures,
                        " + ".join(p.eval_set for p in parts), primary.decision, kind=primary.kind, parts=parts)
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


def _latest_gate(events: list[dict], version: str, paired: bool = False) -> dict | None:
    """The latest recorded gate (promote, force, refused) that had ``version`` as its candidate (with
    ``paired``: the latest that compared it with a baseline)."""
    gated = [e for e in events if str(e.get("version")) == version and "gate_passed" in e
             and (not paired or e.get("paired"))]
    return gated[-1] if gated else None


def _gate_rows(category: str, v1: str, v2: str) -> list[dict]:
    """Rows of the latest gate recorded for each version: verdict, set size, intervals, paired tests."""
    try:
        events = versions.history(category)
    except Exception:  # noqa: BLE001 - the history is an extra; compare works without it
        return []
    gates = {v: _latest_gate(events, v) for v in (v1, v2)}
    if not any(gates.values()):
        return []
    cell = {v: {} for v in (v1, v2)}
    for v, e in gates.items():
        if e is None:
            continue
        c = cell[v]
        tested = _latest_gate(events, v, paired=True)
        verdict = e.get("verdict") or ("passed" if e["gate_passed"] else "FAILED")
        c["gate"] = f"{e['action']} {e['alias']}: {verdict} ({e['at'][:16]})"
        if "n_good" in e:
            c["gate set"] = f"{e['n_good']} good, {e['n_defective']} defective; level {e.get('level')}"
        if tested is not None:
            c["gate paired test"] = f"vs v{tested.get('baseline_version')} ({tested['action']} {tested['alias']}, " \
                                    f"{tested['at'][:16]})"
        for key in COMPARED:
            value = (e.get("candidate_metrics") or {}).get(key)
            iv = (e.get("candidate_intervals") or {}).get(key)
            if value is not None:
                c[f"gate {key}"] = f"{value:.4f}" + ("" if not iv or None in iv else f" [{iv[0]:.3f}, {iv[1]:.3f}]")
            t = ((tested or {}).get("paired") or {}).get(key)
            if t and t.get("diff") is not None:
                lo, hi, p = t.get("low"), t.get("high"), t.get("p")
                ci = "" if lo is None or hi is None else f" [{lo:+.3f}, {hi:+.3f}]"
                c[f"gate {key} diff"] = f"{t['diff']:+.4f}{ci} p={'-' if p is None else format(p, '.3g')}"
    whats = list(dict.fromkeys(k for v in (v1, v2) for k in cell[v]))
    return [{"what": w, f"v{v1}": cell[v1].get(w, ""), f"v{v2}": cell[v2].get(w, ""), "delta": ""} for w in whats]


def compare(category: str, v1, v2) -> list[dict]:
    """Rows of (what, v1, v2, delta) from the two versions' runs: key metrics, then differing params, then
    the latest promotion gate recorded for each (verdict, set size, intervals, paired difference and p)."""
    client = mlflow.MlflowClient()
    runs = [client.get_run(model_version(resolve(category, v)).run_id) for v in (v1, v2)]
    rows = []
    keys = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "threshold",
            "test_accuracy", "test_false_alarm_rate", "fit_seconds", "latency_ms_per_image"]
    for key in keys:
        a, b = (r.data.metrics.get(key) for r in runs)
        if a is None and b is None:
            continue
        rows.append({"what": key, f"v{v1}": "" if a is None else f"{a:.4f}", f"v{v2}": "" if b is None else f"{b:.4f}",
                     "delta": "" if a is None or b is None else f"{b - a:+.4f}"})
    p1, p2 = runs[0].data.params, runs[1].data.params
    for key in sorted(set(p1) | set(p2)):
        if p1.get(key) != p2.get(key):
            rows.append({"what": f"param {key}", f"v{v1}": p1.get(key, ""), f"v{v2}": p2.get(key, ""), "delta": ""})
    return rows + _gate_rows(category, str(v1), str(v2))


def history_rows(events: list[dict]) -> list[dict]:
    """Printable rows of history events (``versions.history``)."""
    rows = []
    for e in events:
        gate = ""
        if "gate_passed" in e:
            cand = e.get("candidate_metrics") or {}
            gate = ("passed" if e["gate_passed"] else "FAILED") + " "
            if "verdict" in e:  # gates with intervals: verdict, set size, each figure with its interval and p
                ivs, paired = e.get("candidate_intervals") or {}, e.get("paired") or {}
                parts = []
                for key in COMPARED:
                    if key in cand:
                        iv, t = ivs.get(key), paired.get(key) or {}
                        parts.append(f"{key} {cand[key]:.4f}" + (f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv and None not in iv
                                                                 else "")
                                     + (f" p={t['p']:.2g}" if t.get("p") is not None else ""))
                gate += f"{e['verdict']} ({e.get('n_good')} good/{e.get('n_defective')} defective): " + "; ".join(parts)
            else:
                gate += json.dumps(cand)
        rows.append({"at": e["at"], "action": e["action"], "alias": e["alias"], "version": e["version"],
                     "from": e.get("previous") or "-", "by": e.get("by", ""), "identity": e.get("identity", ""),
                     "reason": e.get("reason", ""), "gate": gate})
    return rows
