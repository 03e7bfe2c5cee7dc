"""What a running server serves, visible from the registry side.

A following server writes one JSON tag ``adreg.server.<server-id>`` on each registered model it serves
(a router: on each of its categories), at every change and at least every ``heartbeat_seconds``:
version, alias, since when, last swap, last failed swap with its reason, shadow, heartbeat time,
host/port/pid. Readers (``adreg status``, ``adreg models``) mark a report whose heartbeat is older
than ``STALE_AFTER`` heartbeat intervals as stale: that server stopped without saying so (a server
that stops cleanly reports ``state: stopped``).
"""

from __future__ import annotations

import json
import os
import re
import socket
from datetime import datetime, timezone

TAG_PREFIX = "adreg.server."
STALE_AFTER = 3  # heartbeat intervals (plus a few seconds of slack)


def default_server_id(host: str = "", port: int | str = 0) -> str:
    """``<host>-<port>`` when known (a restart on the same port replaces its entry), else host-pid."""
    if host and port:
        base = f"{socket.gethostname()}-{host}-{port}" if host in ("0.0.0.0", "127.0.0.1", "localhost") else \
            f"{host}-{port}"
    else:
        base = f"{socket.gethostname()}-pid{os.getpid()}"
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", base)[:200]


class StatusReporter:
    def __init__(self, client, cfg: dict, heartbeat_seconds: float):
        self.client = client
        self.heartbeat_seconds = heartbeat_seconds
        self.server_id = str(cfg.get("server_id") or "") or default_server_id(str(cfg.get("server_host") or ""),
                                                                               cfg.get("server_port") or 0)
        self.info = {"server": self.server_id, "host": str(cfg.get("server_host") or socket.gethostname()),
                     "port": int(cfg.get("server_port") or 0), "pid": os.getpid()}

    def entry(self, slot, state: str) -> dict:
        cur = slot.current
        return {**self.info, "state": state, "model": slot.name, "alias": slot.alias or None,
                "version": cur.version or None, "since": cur.since, "last_swap": slot.last_swap,
                "last_failure": slot.last_failure, "registry_error": slot.registry_error,
                "shadow": None if slot.shadow is None else {"alias": slot.shadow.alias, "version": slot.shadow.version},
                "heartbeat": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "interval_s": self.heartbeat_seconds}

    def report(self, slots, state: str = "serving") -> None:
        for slot in slots:
            if slot.name:
                value = json.dumps(self.entry(slot, state), sort_keys=True)[:4900]
                self.client.set_registered_model_tag(slot.name, TAG_PREFIX + self.server_id, value)


def _age_seconds(entry: dict, now: datetime) -> float:
    try:
        beat = datetime.fromisoformat(entry["heartbeat"])
    except (KeyError, TypeError, ValueError):
        return float("inf")
    return (now - beat).total_seconds()


def servers(model) -> list[dict]:
    """Status entries of a registered model (an ``mlflow`` RegisteredModel), each with ``age_s`` and
    ``stale`` added; live ones first."""
    now = datetime.now(timezone.utc)
    out = []
    for key, value in (model.tags or {}).items():
        if not key.startswith(TAG_PREFIX):
            continue
        try:
            entry = json.loads(value)
        except ValueError:
            continue
        entry["age_s"] = _age_seconds(entry, now)
        interval = float(entry.get("interval_s") or 10.0)
        entry["stale"] = entry.get("state") == "stopped" or entry["age_s"] > STALE_AFTER * interval + 5
        out.append(entry)
    return sorted(out, key=lambda e: (e["stale"], e.get("server", "")))


def serving_by_version(model) -> dict[str, list[str]]:
    """version -> ids of live (not stale) servers serving it."""
    out: dict[str, list[str]] = {}
    for e in servers(model):
        if not e["stale"] and e.get("version"):
            out.setdefault(str(e["version"]), []).append(e["server"])
    return out


def describe(entry: dict, aliases: dict) -> str:
    """One sentence about a server entry, naming a mismatch with the alias it follows."""
    state = "STALE (no heartbeat for %.0f s)" % entry["age_s"] if entry["stale"] and entry.get("state") != "stopped" \
        else ("stopped" if entry.get("state") == "stopped" else "live")
    text = f"{entry.get('server')}: {state}, serves version {entry.get('version')}"
    alias = entry.get("alias")
    if alias:
        text += f" (follows @{alias}"
        target = aliases.get(alias)
        if target is not None and str(target) != str(entry.get("version")) and not entry["stale"]:
            failure = entry.get("last_failure") or {}
            if str(failure.get("version")) == str(target):
                text += f" = {target}, but version {target} was refused: {failure.get('reason')}"
            else:
                text += f" = {target}, not picked up yet"
        text += ")"
    return text


def annotate_rows(rows: list[dict]) -> None:
    """Add ``serving`` (live server ids, comma-separated) to ``adreg models`` rows (category, version)."""
    import mlflow

    from adreg.names import model_name

    client = mlflow.MlflowClient()
    cache: dict[str, dict] = {}
    for row in rows:
        category = row.get("category")
        if category not in cache:
            try:
                cache[category] = serving_by_version(client.get_registered_model(model_name(category)))
            except Exception:  # a model deleted meanwhile: no column value, no failure
                cache[category] = {}
        row["serving"] = ",".join(cache[category].get(str(row.get("version")), []))
