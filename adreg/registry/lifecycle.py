"""Quality-gated promotion, rollback, history and comparison of registered versions.

Alias scheme: ``staging`` for a candidate under trial, ``production`` for what serves. Promoting to an
alias runs a gate: the candidate is evaluated on the evaluation set logged with it (or ``eval_dir``);
it must meet absolute floors and must not regress beyond ``tolerance`` against the version the alias
points at now, evaluated on the same images. ``force`` overrides a failed gate and is recorded.
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

from adreg import store
from adreg.data import Sample, read_labelled_folder
from adreg.detector import AnomalyDetector
from adreg.errors import DataError, RegistryError
from adreg.evaluation import evaluate
from adreg.registry import events, governance, versions
from adreg.registry.resolve import check_version, existing_versions, get_model, load_detector, model_version, resolve

COMPARED = ("image_auroc", "pixel_auroc", "aupro")


@dataclass
class GatePolicy:
    min_image_auroc: float = 0.90
    min_pixel_auroc: float = 0.90
    tolerance: float = 0.01

    def floors(self) -> dict[str, float]:
        return {"image_auroc": self.min_image_auroc, "pixel_auroc": self.min_pixel_auroc}


@dataclass
class GateReport:
    passed: bool
    candidate: dict[str, float]
    baseline: dict[str, float] | None = None
    baseline_version: str | None = None
    failures: list[str] = field(default_factory=list)
    eval_set: str = ""

    def summary(self) -> dict:
        keep = lambda m: None if m is None else {k: round(m[k], 5) for k in COMPARED if k in m}  # noqa: E731
        return {"gate_passed": self.passed, "candidate_metrics": keep(self.candidate),
                "baseline_version": self.baseline_version, "baseline_metrics": keep(self.baseline),
                "gate_failures": self.failures, "eval_set": self.eval_set}


def check_gate(candidate: dict, baseline: dict | None, policy: GatePolicy) -> list[str]:
    """Reasons the candidate fails (empty list = passes). Floors on metrics the evaluation set cannot
    measure (pixel AUROC without masks) do not apply."""
    failures = []
    floors = policy.floors()
    if not any(key in candidate for key in floors):
        failures.append(f"the evaluation set measures none of {', '.join(floors)} (it needs good and defective images)")
    for key, floor in floors.items():
        # a floor the set cannot measure (pixel AUROC without masks) is skipped, not failed
        if key in candidate and candidate[key] < floor:
            failures.append(f"{key} {candidate[key]:.4f} is below the floor {floor:.4f}")
    if baseline is not None:
        for key in COMPARED:
            if key in candidate and key in baseline and candidate[key] < baseline[key] - policy.tolerance:
                failures.append(f"{key} {candidate[key]:.4f} regresses from {baseline[key]:.4f} "
                                f"(tolerance {policy.tolerance})")
    return failures


def load_version_detector(category: str, version, device: str = "auto") -> AnomalyDetector:
    """A registered version's detector, downloaded and verified (``adreg.registry.resolve.load_detector``)."""
    return load_detector(resolve(category, version), device)


def logged_eval_set(category: str, version) -> tuple[list[Sample], str]:
    """The evaluation set logged with a version's run."""
    from adreg.registry.tracking import EVAL_MANIFEST

    mv = model_version(resolve(category, version))
    manifest = store.load_run_dict(mv.run_id, EVAL_MANIFEST)
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


def evaluate_version(category: str, version, samples: list[Sample], device: str = "auto") -> dict[str, float]:
    detector = load_version_detector(category, version, device)
    return evaluate(detector, samples, detector.threshold.value, show_progress=False).metrics


def run_gate(category: str, version, alias: str, policy: GatePolicy, eval_dir: str | None = None,
             device: str = "auto", candidate_metrics: dict | None = None) -> GateReport:
    """Evaluate candidate and current alias holder on the same images; ``candidate_metrics`` may be
    given when they were just measured on the version's logged evaluation set (right after a fit)."""
    version = str(version)
    if eval_dir:
        samples, eval_set = read_labelled_folder(eval_dir, "evaluation folder"), str(eval_dir)
        candidate_metrics = None
    else:
        samples, eval_set = logged_eval_set(category, version)
    candidate = candidate_metrics or evaluate_version(category, version, samples, device)
    current = get_model(category).aliases.get(alias)
    current = None if current is None else str(current)
    baseline = None
    if current is not None and str(current) != version:
        baseline = evaluate_version(category, current, samples, device)
    failures = check_gate(candidate, baseline, policy)
    return GateReport(not failures, candidate, baseline, None if baseline is None else str(current), failures,
                      eval_set)


def promote_gated(category: str, version, alias: str = "production", policy: GatePolicy | None = None,
                  force: bool = False, reason: str = "", eval_dir: str | None = None,
                  device: str = "auto", candidate_metrics: dict | None = None
                  ) -> tuple[versions.Promotion | None, GateReport]:
    """Run the gate and promote when it passes (or when forced); returns (promotion or None, report).
    The user's permission for the alias (and for ``force``) is checked first: refused, nothing runs."""
    version = check_version(category, version)
    governance.require(category, governance.needed_for_alias(alias), f"moving alias {alias!r}")
    if force:
        governance.require(category, "MANAGE", "forcing a promotion past the gate")
    report = run_gate(category, version, alias, policy or GatePolicy(), eval_dir, device, candidate_metrics)
    if not report.passed and not force:
        events.record_event(category, {"action": "refused", "alias": alias, "version": str(version),
                                         "previous": report.baseline_version, "reason": reason or "gate failed",
                                         **report.summary()})
        return None, report
    action = "promote" if report.passed else "force"
    promo = versions.promote(category, version, alias, reason=reason or action, action=action,
                             details=report.summary())
    return promo, report


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


def compare(category: str, v1, v2) -> list[dict]:
    """Rows of (what, v1, v2, delta) from the two versions' runs: key metrics, then differing params."""
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
    return rows


def history_rows(events: list[dict]) -> list[dict]:
    """Printable rows of history events (``versions.history``)."""
    rows = []
    for e in events:
        gate = ""
        if "gate_passed" in e:
            cand = e.get("candidate_metrics") or {}
            gate = ("passed" if e["gate_passed"] else "FAILED") + " " + json.dumps(cand)
        rows.append({"at": e["at"], "action": e["action"], "alias": e["alias"], "version": e["version"],
                     "from": e.get("previous") or "-", "by": e.get("by", ""), "identity": e.get("identity", ""),
                     "reason": e.get("reason", ""), "gate": gate})
    return rows
