"""Lifecycle events of a category: every promotion, refusal and rollback is one run of the category's lifecycle
experiment ``adreg-<category>/lifecycle`` (searchable and comparable in the MLflow UI), so concurrent writers never
overwrite each other. Written by ``record_event``, read back oldest first by ``read_events``; the gate recorded with
an event (``adreg.registry.lifecycle.GateReport.summary``) reads back typed as a ``GateRecord``."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import mlflow
from mlflow.exceptions import MlflowException

from adreg import store
from adreg.names import lifecycle_experiment_name, model_name
from adreg.registry import governance


def _client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


EVENT_TAG = "adreg.lifecycle_event"
EVENT_PARAMS = ("at", "seq", "action", "alias", "version", "previous", "user", "identity", "reason")
DETAIL_PARAMS = ("gate_passed", "eval_set", "gate_set", "baseline_version", "gate_failures", "production_labels")
PARAM_MAX = 6000


@dataclass(frozen=True)
class PairedRecord:
    """A recorded paired test, candidate - baseline: the difference, its interval and the two-sided p (each None
    where it was not finite), and the test that gave them."""

    diff: float | None
    low: float | None
    high: float | None
    p: float | None
    method: str


@dataclass(frozen=True)
class SetRecord:
    """One set's figures in a gate recorded over several sets (the summary's ``sets``)."""

    kind: str
    eval_set: str
    verdict: str
    passed: bool
    n_good: int
    n_defective: int
    candidate: dict[str, float]
    baseline: dict[str, float]


Bounds = tuple[float | None, float | None]


@dataclass(frozen=True)
class GateRecord:
    """A promotion gate as recorded with a lifecycle event (``adreg.registry.lifecycle.GateReport.summary``), read
    back typed: the event run's metrics, ``adreg history`` and ``adreg compare`` are made from it. ``kind``: the
    set it judged on (fit-time / production); ``baseline``, ``baseline_intervals``, ``paired``: empty without a
    baseline; ``sets``: each set's figures when it judged several."""

    passed: bool
    verdict: str
    kind: str
    eval_set: str
    n_good: int
    n_defective: int
    level: float
    baseline_version: str | None
    candidate: dict[str, float]
    baseline: dict[str, float]
    intervals: dict[str, Bounds]
    baseline_intervals: dict[str, Bounds]
    paired: dict[str, PairedRecord]
    failures: tuple[str, ...]
    sets: tuple[SetRecord, ...] = ()

    @classmethod
    def of(cls, event: dict) -> "GateRecord | None":
        """The gate recorded with ``event`` (the summary's keys among the event's); None for an event without
        one (a rollback, a promotion that skipped the gate)."""
        if "gate_passed" not in event:
            return None
        bounds = lambda ivs: {k: (lo, hi) for k, (lo, hi) in ivs.items()}  # noqa: E731 - JSON lists to pairs
        return cls(bool(event["gate_passed"]), event["verdict"], event["gate_set"], event["eval_set"],
                   int(event["n_good"]), int(event["n_defective"]), float(event["level"]), event["baseline_version"],
                   event["candidate_metrics"], event["baseline_metrics"] or {}, bounds(event["candidate_intervals"]),
                   bounds(event["baseline_intervals"]),
                   {k: PairedRecord(t["diff"], t["low"], t["high"], t["p"], t["method"])
                    for k, t in event["paired"].items()}, tuple(event["gate_failures"]),
                   tuple(SetRecord(s["set"], s["eval_set"], s["verdict"], bool(s["gate_passed"]), int(s["n_good"]),
                                   int(s["n_defective"]), s["candidate_metrics"], s["baseline_metrics"] or {})
                         for s in event.get("sets", ())))

    def metrics(self) -> dict[str, float]:
        """The event run's metrics: ``candidate_<metric>``, ``baseline_<metric>``, their intervals ``..._low`` /
        ``..._high``, the paired tests ``paired_<metric>_diff`` / ``_low`` / ``_high`` / ``_p``, ``gate_n_good``,
        ``gate_n_defective``, ``gate_passed``, and per set ``<set>_candidate_<metric>``, ``<set>_n_good``, ..."""
        out: dict[str, float | None] = {}
        for who, values, intervals in (("candidate", self.candidate, self.intervals),
                                       ("baseline", self.baseline, self.baseline_intervals)):
            out.update({f"{who}_{k}": v for k, v in values.items()})
            out.update({f"{who}_{k}_{end}": v for k, bounds in intervals.items()
                        for end, v in zip(("low", "high"), bounds)})
        for k, t in self.paired.items():
            out.update({f"paired_{k}_diff": t.diff, f"paired_{k}_low": t.low, f"paired_{k}_high": t.high,
                        f"paired_{k}_p": t.p})
        for part in self.sets:
            out.update({f"{part.kind}_{who}_{k}": v for who, values in (("candidate", part.candidate),
                                                                        ("baseline", part.baseline))
                        for k, v in values.items()})
            out.update({f"{part.kind}_n_good": part.n_good, f"{part.kind}_n_defective": part.n_defective})
        out.update({"gate_n_good": self.n_good, "gate_n_defective": self.n_defective, "gate_passed": self.passed})
        return {k: float(v) for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class GateEvent:
    """A lifecycle event that ran the gate (promote, force, refused): what was done to which alias, when (ISO
    8601, UTC), and the gate as recorded."""

    action: str
    alias: str
    version: str
    at: str
    gate: GateRecord

    @classmethod
    def of(cls, event: dict) -> "GateEvent | None":
        """``event`` with its gate; None for an event without one."""
        gate = GateRecord.of(event)
        return None if gate is None else cls(event["action"], event["alias"], str(event["version"]), event["at"], gate)


def lifecycle_experiment_id(category: str, create: bool = True) -> str | None:
    """The category's lifecycle experiment (``adreg-<category>/lifecycle``): one run per event."""
    return store.experiment_id(lifecycle_experiment_name(category), create=create,
                               tags={"adreg.category": category, "adreg.kind": "lifecycle",
                                     "mlflow.note.content": f"Lifecycle events of {model_name(category)}: "
                                                            "one run per promotion, refusal, rollback."})


def _param(value) -> str:
    text = "-" if value is None or value == "" else str(value)
    return text if len(text) <= PARAM_MAX else text[:PARAM_MAX - 3] + "..."


def record_event(category: str, event: dict) -> dict:
    """Record one lifecycle event (promote, force, refused, rollback) as a run of the category's lifecycle
    experiment: core fields and the gate summary as params, the gate's figures as metrics (``GateRecord.metrics``),
    tags linking the registered model version. Each event is its own run, so concurrent writers never overwrite
    each other.
    The user is the one the server authenticated, else ``$ADREG_USER`` / the login as a label."""
    from mlflow.entities import Metric, Param, RunTag

    ident = governance.identity()
    now_ns = time.time_ns()
    event = {"at": datetime.fromtimestamp(now_ns / 1e9, timezone.utc).isoformat(timespec="milliseconds"),
             "by": ident.user, "identity": ident.kind, **event}
    name = model_name(category)
    client = _client()
    try:
        exp_id = lifecycle_experiment_id(category)
        run = client.create_run(exp_id, start_time=now_ns // 1_000_000, run_name=(
            f"{event['action']} {event['alias']} v{event['version']} by {ident.user}"),
            tags={EVENT_TAG: "true", "adreg.category": category, "adreg.model_name": name,
                  "adreg.model_version": str(event["version"]), "adreg.alias": event["alias"],
                  "adreg.action": event["action"]})
        core = {"at": event["at"], "seq": str(now_ns), "action": event["action"], "alias": event["alias"],
                "version": event["version"], "previous": event.get("previous"), "user": ident.user,
                "identity": ident.kind, "reason": event.get("reason", "")}
        details = {k: v for k, v in event.items() if k not in core and k not in ("by",)}
        params = [Param(k, _param(v)) for k, v in core.items()]
        for key in DETAIL_PARAMS:
            if key in details:
                value = details[key]
                params.append(Param(key, _param(json.dumps(value) if isinstance(value, (list, dict)) else value)))
        params.append(Param("details", _param(json.dumps(details, sort_keys=True))))
        ms = now_ns // 1_000_000
        gate = GateRecord.of(details)
        metrics = [Metric(k, v, ms, 0) for k, v in (gate.metrics() if gate else {}).items()]
        client.log_batch(run.info.run_id, metrics=metrics, params=params,
                         tags=[RunTag("mlflow.note.content", f"{event['action']} {name}@{event['alias']} -> "
                                                            f"v{event['version']} by {ident.user} ({ident.kind}): "
                                                            f"{event.get('reason', '')}"[:5000])])
        with contextlib.redirect_stdout(sys.stderr):  # MLflow prints the run's URL; stdout may carry --json
            client.set_terminated(run.info.run_id)
    except MlflowException as exc:
        if governance.is_refusal(exc):
            raise governance.refusal(exc, f"recording the event in {lifecycle_experiment_name(category)}"
                                     ) from None
        raise
    event["run_id"] = run.info.run_id
    try:  # the registered model keeps a few tags only: where the history is, and the latest event
        client.set_registered_model_tag(name, "adreg.lifecycle_experiment", lifecycle_experiment_name(category))
        client.set_registered_model_tag(name, "adreg.last_event", f"{event['at']} {event['action']} {event['alias']} "
                                                                  f"v{event['version']} by {ident.user}")
    except MlflowException:
        pass  # a convenience copy; the event itself is recorded
    return event


def _run_event(run) -> dict | None:
    p = run.data.params
    if "action" not in p or "seq" not in p:
        return None  # a run whose params never arrived (writer died): no event
    event = {"at": p["at"], "by": p["user"], "identity": p["identity"], "action": p["action"], "alias": p["alias"],
             "version": p["version"], "previous": None if p["previous"] == "-" else p["previous"],
             "reason": "" if p["reason"] == "-" else p["reason"], "seq": int(p["seq"]), "run_id": run.info.run_id}
    try:
        details = json.loads(p.get("details", "{}"))
    except ValueError:
        details = {}
    for key, value in details.items():
        event.setdefault(key, value)
    return event


def read_events(category: str) -> list[dict]:
    """The recorded events of ``category`` (empty when none was ever recorded), oldest first."""
    events = []
    exp_id = lifecycle_experiment_id(category, create=False)
    if exp_id is not None:
        client, token = _client(), None
        while True:
            page = client.search_runs([exp_id], filter_string=f"tags.`{EVENT_TAG}` = 'true'", max_results=1000,
                                      page_token=token)
            events.extend(e for e in map(_run_event, page) if e is not None)
            token = page.token
            if not token:
                break
    return sorted(events, key=lambda e: (e["at"], e.get("seq", 0)))
