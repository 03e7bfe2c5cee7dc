"""The model registry side: one registered model ``adreg-<category>`` per category, promoted with aliases.

Stages are deprecated in MLflow 3, so promotion moves a registered-model alias (``production``,
``staging``) and records who/when/from-which-version as tags on the promoted version.
"""

from __future__ import annotations

import getpass
import re
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
    return sorted(m.name[len(PREFIX):] for m in models)


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
        return _client().get_model_version(name, str(int(version))).version
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
    mv = client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags)
    deadline = time.monotonic() + timeout_s
    while mv.status == "PENDING_REGISTRATION" and time.monotonic() < deadline:
        time.sleep(0.2)
        mv = client.get_model_version(name, mv.version)
    if mv.status != "READY":
        raise RegistryError(f"{name} version {mv.version} did not become ready ({mv.status})")
    return mv.version


@dataclass
class Promotion:
    category: str
    alias: str
    version: str
    previous: str | None
    model_uri: str


def promote(category: str, version, alias: str = "production", reason: str = "") -> Promotion:
    """Point ``alias`` at ``version`` and record the promotion on the version's tags."""
    if not ALIAS_RE.match(alias):
        raise RegistryError(f"alias {alias!r} must be lowercase letters, digits, '_' or '-'")
    model = _get_model(category)
    version = _check_version(category, version)
    previous = model.aliases.get(alias)
    client = _client()
    client.set_registered_model_alias(model.name, alias, version)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for key, value in {"at": stamp, "by": getpass.getuser(), "from_version": previous or "none",
                       "reason": reason or "manual"}.items():
        client.set_model_version_tag(model.name, version, f"adreg.promoted.{alias}.{key}", value)
    return Promotion(category, alias, version, previous, f"models:/{model.name}@{alias}")


def model_uri(category: str, alias: str | None = "production", version=None) -> str:
    """``models:/adreg-<category>@alias`` (or ``/version``), checked to exist, with a helpful error."""
    model = _get_model(category)
    if version is not None:
        return f"models:/{model.name}/{_check_version(category, version)}"
    if alias not in model.aliases:
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
