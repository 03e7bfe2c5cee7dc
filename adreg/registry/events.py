"""Lifecycle events of a category: every promotion, refusal and rollback is one run of the category's lifecycle
experiment ``adreg-<category>/lifecycle`` (searchable and comparable in the MLflow UI), so concurrent writers never
overwrite each other. Written by ``record_event``, read back oldest first by ``read_events``."""

from __future__ import annotations

import contextlib
import json
import sys
import time
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
    experiment: core fields and the gate summary as params, gate metrics as metrics, tags linking the
    registered model version. Each event is its own run, so concurrent writers never overwrite each other.
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
        metrics = [Metric(f"{prefix}_{k}", float(v), ms, 0)
                   for prefix, key in (("candidate", "candidate_metrics"), ("baseline", "baseline_metrics"))
                   for k, v in (details.get(key) or {}).items()]
        for prefix, key in (("candidate", "candidate_intervals"), ("baseline", "baseline_intervals")):
            for k, bounds in (details.get(key) or {}).items():  # candidate_image_auroc_low / _high, ...
                metrics += [Metric(f"{prefix}_{k}_{end}", float(v), ms, 0)
                            for end, v in zip(("low", "high"), bounds) if v is not None]
        for k, test in (details.get("paired") or {}).items():  # paired_image_auroc_diff / _low / _high / _p
            metrics += [Metric(f"paired_{k}_{end}", float(test[end]), ms, 0)
                        for end in ("diff", "low", "high", "p") if test.get(end) is not None]
        for part in details.get("sets") or []:  # a gate over several sets: each set's figures (fit-time_..., production_...)
            metrics += [Metric(f"{part['set']}_{who}_{k}", float(v), ms, 0)
                        for who in ("candidate", "baseline") for k, v in (part.get(f"{who}_metrics") or {}).items()]
            metrics += [Metric(f"{part['set']}_n_{k}", float(part[f"n_{k}"]), ms, 0) for k in ("good", "defective")]
        for k in ("n_good", "n_defective"):
            if details.get(k) is not None:
                metrics.append(Metric(f"gate_{k}", float(details[k]), ms, 0))
        if "gate_passed" in details:
            metrics.append(Metric("gate_passed", float(bool(details["gate_passed"])), ms, 0))
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
