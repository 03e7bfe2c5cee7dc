"""The model registry side: one registered model ``adreg-<category>`` per category, promoted with aliases.

Stages are deprecated in MLflow 3, so promotion moves a registered-model alias (``production``,
``staging``) and records who/when/from-which-version as tags on the promoted version.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from adreg.errors import RegistryError
from adreg.fitting import check_category

PREFIX = "adreg-"
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
KEY_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "threshold")


def model_name(category: str) -> str:
    return PREFIX + check_category(category)


def _client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def categories() -> list[str]:
    models = _client().search_registered_models(filter_string=f"name LIKE '{PREFIX}%'")
    return sorted(m.name[len(PREFIX):] for m in models if m.name != PREFIX + "router")


def _get_model(category: str):
    name = model_name(category)
    try:
        return _client().get_registered_model(name)
    except MlflowException:
        known = categories()
        hint = f"registered categories: {', '.join(known)}" if known else "no category is registered yet"
        raise RegistryError(f"unknown category {category!r} ({hint}); fit one with `adreg fit --register`") from None


def _check_version(category: str, version) -> str:
    name = model_name(category)
    try:
        return str(_client().get_model_version(name, str(int(version))).version)
    except (MlflowException, ValueError):
        versions = sorted(int(v.version) for v in _client().search_model_versions(f"name='{name}'"))
        raise RegistryError(f"{name} has no version {version!r}; versions: {versions or 'none'}") from None


def register(model_uri: str, run_id: str, category: str, metrics: dict | None = None, timeout_s: float = 60) -> str:
    """Create a new version of ``adreg-<category>`` from a completely logged run; returns the version."""
    client = _client()
    run = client.get_run(run_id)
    if run.data.tags.get("adreg.model_complete") != "true":
        raise RegistryError(f"run {run_id} has no completely logged model; refusing to register it")
    name = model_name(category)
    try:
        client.create_registered_model(name, tags={"adreg.category": category},
                                       description=f"adreg anomaly detector for category {category!r}")
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    tags = {f"metric.{k}": f"{v:.6g}" for k, v in (metrics or {}).items() if k in KEY_METRICS}
    tags.update({"adreg.method": run.data.tags.get("adreg.method", ""),
                 "adreg.backbone": run.data.tags.get("adreg.backbone", "")})
    model_id = model_uri.split("/", 1)[1] if model_uri.startswith("models:/m-") else None  # a LoggedModel
    mv = client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags, model_id=model_id)
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


HISTORY_PREFIX = "adreg.history."


def _user() -> str:
    return os.environ.get("ADREG_USER") or getpass.getuser()


def record_event(category: str, event: dict) -> dict:
    """Append an event to the category's history, kept as registered-model tags.

    Keys sort chronologically (ms timestamp) and carry a random suffix, so two concurrent writers
    never overwrite each other's event.
    """
    event = {"at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "by": _user(), **event}
    key = f"{HISTORY_PREFIX}{time.time_ns() // 1_000_000:013d}.{secrets.token_hex(3)}"
    _client().set_registered_model_tag(model_name(category), key, json.dumps(event, sort_keys=True))
    return event


def history(category: str) -> list[dict]:
    """All recorded promotion / rollback events of a category, oldest first."""
    model = _get_model(category)
    return [json.loads(model.tags[k]) for k in sorted(model.tags) if k.startswith(HISTORY_PREFIX)]


def promote(category: str, version, alias: str = "production", reason: str = "", action: str = "promote",
            details: dict | None = None) -> Promotion:
    """Point ``alias`` at ``version``; record it on the version's tags and in the category history."""
    if not ALIAS_RE.match(alias):
        raise RegistryError(f"alias {alias!r} must be lowercase letters, digits, '_' or '-'")
    model = _get_model(category)
    version = _check_version(category, version)
    previous = None if model.aliases.get(alias) is None else str(model.aliases[alias])
    client = _client()
    client.set_registered_model_alias(model.name, alias, version)
    event = record_event(category, {"action": action, "alias": alias, "version": version,
                                    "previous": previous, "reason": reason or action, **(details or {})})
    for key in ("at", "by", "reason"):
        client.set_model_version_tag(model.name, version, f"adreg.promoted.{alias}.{key}", str(event[key]))
    client.set_model_version_tag(model.name, version, f"adreg.promoted.{alias}.from_version", previous or "none")
    client.set_model_version_tag(model.name, version, f"adreg.promoted.{alias}.action", action)
    if details:
        client.set_model_version_tag(model.name, version, f"adreg.promoted.{alias}.details",
                                     json.dumps(details, sort_keys=True)[:4900])
    return Promotion(category, alias, version, previous, f"models:/{model.name}@{alias}")


def existing_versions(category: str) -> set[str]:
    return {str(v.version) for v in _client().search_model_versions(f"name='{model_name(category)}'")}


def model_uri(category: str, alias: str | None = "production", version=None) -> str:
    """``models:/adreg-<category>@alias`` (or ``/version``), checked to exist, with a helpful error."""
    model = _get_model(category)
    if version is not None:
        return f"models:/{model.name}/{_check_version(category, version)}"
    if alias not in model.aliases:
        last = next((e for e in reversed(history(category)) if e.get("alias") == alias), None)
        if last is not None and str(last["version"]) not in existing_versions(category):
            raise RegistryError(f"{model.name}@{alias} pointed at version {last['version']}, which has been deleted; "
                                f"promote another version or run `adreg rollback {category} --alias {alias}`")
        have = ", ".join(f"{a} -> v{v}" for a, v in sorted(model.aliases.items())) or "none"
        raise RegistryError(f"{model.name} has no alias {alias!r} (aliases: {have}); "
                            f"promote a version with `adreg promote {category} --version N --alias {alias}`")
    _check_version(category, model.aliases[alias])
    return f"models:/{model.name}@{alias}"


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
