"""The model registry side: one registered model ``adreg-<category>`` per category, promoted with aliases.

Stages are deprecated in MLflow 3, so promotion moves a registered-model alias (``production``,
``staging``) and records who/when/from-which-version as tags on the promoted version. Every lifecycle
event is recorded by ``adreg.registry.events``; who may move which alias is ``adreg.registry.governance``'s
business; names resolve through ``adreg.registry.resolve``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from adreg import store
from adreg.errors import ConfigError, RegistryError
from adreg.integrity import DIGEST_TAG
from adreg.names import model_name
from adreg.registry import governance
from adreg.registry.events import read_events, record_event
from adreg.registry.resolve import categories, check_version, get_model
from adreg.statistics import GATED

ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
KEY_METRICS = (*GATED, "image_f1_max", "threshold")


def _client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def register(model_uri: str, run_id: str, category: str, metrics: dict | None = None, timeout_s: float = 60,
             tags: dict | None = None, description: str | None = None) -> str:
    """Create a new version of ``adreg-<category>`` from a completely logged run; returns the version.
    ``tags`` / ``description`` go on the version (an update's parent version and run)."""
    client = _client()
    run = client.get_run(run_id)
    if run.data.tags.get(store.MODEL_COMPLETE_TAG) != "true":
        raise RegistryError(f"run {run_id} has no completely logged model; refusing to register it")
    name = model_name(category)
    try:
        client.create_registered_model(name, tags={"adreg.category": category},
                                       description=f"adreg anomaly detector for category {category!r}")
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    version_tags = {f"metric.{k}": f"{v:.6g}" for k, v in (metrics or {}).items() if k in KEY_METRICS}
    version_tags.update({"adreg.method": run.data.tags.get("adreg.method", ""),
                         "adreg.backbone": run.data.tags.get("adreg.backbone", "")})
    if run.data.tags.get(DIGEST_TAG):  # tamper evidence: the artifacts' manifest digest travels with the version
        version_tags[DIGEST_TAG] = run.data.tags[DIGEST_TAG]
    version_tags.update({k: str(v) for k, v in (tags or {}).items()})
    model_id = model_uri.split("/", 1)[1] if model_uri.startswith("models:/m-") else None  # a LoggedModel
    mv = client.create_model_version(name, source=model_uri, run_id=run_id, tags=version_tags, model_id=model_id,
                                     description=description)
    deadline = time.monotonic() + timeout_s
    while mv.status == "PENDING_REGISTRATION" and time.monotonic() < deadline:
        time.sleep(0.2)
        mv = client.get_model_version(name, mv.version)
    if mv.status != "READY":
        raise RegistryError(f"{name} version {mv.version} did not become ready ({mv.status})")
    return str(mv.version)


@dataclass
class Promotion:
    category: str
    alias: str
    version: str
    previous: str | None
    model_uri: str
    by: str = ""
    identity: str = ""
    event_run: str | None = None


def history(category: str) -> list[dict]:
    """All recorded promotion / refusal / rollback events of a category (the lifecycle experiment's runs),
    oldest first: dicts of typed values (``adreg.registry.events.GateEvent.of`` reads an event's gate)."""
    get_model(category)
    return read_events(category)


def _write(call, doing: str, attempts: int = 5) -> None:
    """One registry write; a server refusal becomes PermissionDenied. Two writers setting the same alias or
    the same version tag at once can collide in the store (sqlite: UNIQUE constraint on the row, as MLflow
    reads before it inserts): retried, last writer wins."""
    import random

    for attempt in range(attempts):
        try:
            call()
            return
        except MlflowException as exc:
            if governance.is_refusal(exc):
                raise governance.refusal(exc, doing) from None
            if attempt == attempts - 1:
                raise
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy IntegrityError / OperationalError from the store
            if attempt == attempts - 1 or type(exc).__module__.split(".")[0] != "sqlalchemy":
                raise
        time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))


def _set_alias(client, name: str, alias: str, version: str, doing: str) -> None:
    _write(lambda: client.set_registered_model_alias(name, alias, version), doing)


def promote(category: str, version, alias: str = "production", reason: str = "", action: str = "promote",
            details: dict | None = None) -> Promotion:
    """Point ``alias`` at ``version``; record it in the category history and on the version's tags.

    Permission is checked first (``production`` needs MANAGE, other aliases EDIT); if recording the event
    fails, the alias is put back, so a refused or failed promotion changes nothing."""
    if not ALIAS_RE.match(alias):
        raise ConfigError(f"alias {alias!r} must be lowercase letters, digits, '_' or '-'")
    model = get_model(category)
    version = check_version(category, version)
    doing = f"{'rolling back' if action == 'rollback' else 'moving'} alias {alias!r}"
    governance.require(category, governance.needed_for_alias(alias), doing)
    previous = None if model.aliases.get(alias) is None else str(model.aliases[alias])
    client = _client()
    _set_alias(client, model.name, alias, version, doing)
    try:
        event = record_event(category, {"action": action, "alias": alias, "version": version,
                                        "previous": previous, "reason": reason or action, **(details or {})})
    except BaseException:
        if previous is not None:  # nothing half-done: the alias goes back where it was
            _set_alias(client, model.name, alias, previous, doing)
        else:
            client.delete_registered_model_alias(model.name, alias)
        raise
    tags = {"at": event["at"], "by": event["by"], "identity": event["identity"], "reason": event["reason"],
            "from_version": previous or "none", "action": action, "event_run": event["run_id"]}
    if details:
        tags["details"] = json.dumps(details, sort_keys=True)[:4900]
    for key, value in tags.items():
        tag = f"adreg.promoted.{alias}.{key}"
        _write(lambda tag=tag, value=value: client.set_model_version_tag(model.name, version, tag, str(value)), doing)
    return Promotion(category, alias, version, previous, f"models:/{model.name}@{alias}", event["by"],
                     event["identity"], event["run_id"])


def list_versions() -> list[dict]:
    """One row per registered version of every adreg category, with aliases and key metrics."""
    client = _client()
    rows = []
    for category in categories():
        model = client.get_registered_model(model_name(category))
        by_version: dict[str, list[str]] = {}
        for alias, v in model.aliases.items():
            by_version.setdefault(str(v), []).append(alias)
        for mv in client.search_model_versions(f"name='{model.name}'"):
            row = {"category": category, "version": int(mv.version),
                   "aliases": ",".join(sorted(by_version.get(str(mv.version), []))),
                   "method": mv.tags.get("adreg.method", ""),
                   "created": datetime.fromtimestamp(mv.creation_timestamp / 1000).strftime("%Y-%m-%d %H:%M")}
            for key in KEY_METRICS:
                row[key] = mv.tags.get(f"metric.{key}", "")
            rows.append(row)
    return sorted(rows, key=lambda r: (r["category"], r["version"]))
