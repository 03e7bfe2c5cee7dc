"""Following the registry from inside the served model: what ``production`` points at is what answers.

A ``Slot`` is one followed ``models:/<registered model>@<alias>``; its ``current`` (a ``Served``: the
detector plus the name, version and alias that every response row carries) is replaced by one
assignment, so a request that has read it finishes on that object while later requests get the new
one. The ``Follower`` polls the registry with MLflow's own client every ``poll_seconds`` (the tracking
URI comes from the serving config or ``$MLFLOW_TRACKING_URI``); when an alias moves it downloads the new
version in a background thread, loads it sharing the backbone instances by spec (only the head is new
when the backbone is the same), verifies it (it loads, has a threshold, and reproduces within
``REFERENCE_RTOL`` the scores logged at fit for the reference images kept in the detector folder), then
swaps it in. A version that fails to load or verify is not swapped in: the old one keeps serving and
the failure is reported (server log, and the status tag read by ``adreg status``). Old downloads and
backbones no detector uses any more are released after a swap, so memory does not grow with swaps.

The same follower keeps each slot's shadow candidate (``shadow_alias``) loaded for ``adreg.pyfunc.shadow``.
"""

from __future__ import annotations

import atexit
import gc
import logging
import math
import os
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlflow

from adreg import store
from adreg.errors import AdregError
from adreg.names import model_name
from adreg.reference import REFERENCE_DIR, REFERENCE_RTOL, read_reference

_log = logging.getLogger("adreg.follow")

def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Served:
    """One loaded version and what answers carry about it."""

    detector: object
    name: str
    version: str
    alias: str
    directory: Path | None = None
    model_id: str | None = None
    since: str = field(default_factory=now_iso)


@dataclass
class Slot:
    """One followed registered model alias (the router has one per category)."""

    name: str
    alias: str
    current: Served
    shadow: Served | None = None
    last_swap: dict | None = None
    last_failure: dict | None = None
    failed_version: str | None = None
    failed_shadow: str | None = None
    registry_error: str | None = None


class VerifyError(AdregError):
    """A version that loaded but does not reproduce its logged reference scores."""


def verify(served: Served, run) -> None:
    """Raise ``VerifyError`` unless ``served`` reproduces its reference scores (``run`` executes on the
    inference thread)."""
    from adreg.images import load_image

    det = served.detector
    if det.threshold is None or not math.isfinite(float(det.threshold.value)):
        raise VerifyError("it has no usable threshold")
    ref = read_reference(served.directory) if served.directory else {}
    entries = ref.get("images") or []
    if not entries:
        raise VerifyError("its detector folder holds no reference images to verify it against")
    images = [load_image(served.directory / REFERENCE_DIR / e["file"]) for e in entries]
    scores = run(det.predict, images).scores
    rtol = float(ref.get("rtol", REFERENCE_RTOL))
    for e, got in zip(entries, scores):
        want = float(e["score"])
        if not (math.isfinite(float(got)) and math.isclose(float(got), want, rel_tol=rtol, abs_tol=1e-6)):
            raise VerifyError(f"reference image {e['file']} scores {float(got):.6g}, logged at fit {want:.6g} "
                              f"(tolerance {rtol:.0%})")


def snapshot_model_id(directory: Path) -> str | None:
    """The LoggedModel id in the MLmodel file above a loaded model's artifact folder (if any)."""
    import yaml

    for parent in list(Path(directory).parents)[:3]:
        mlmodel = parent / "MLmodel"
        if mlmodel.is_file():
            try:
                return (yaml.safe_load(mlmodel.read_text()) or {}).get("model_id")
            except (OSError, yaml.YAMLError):
                return None
    return None


def _model_id(mv) -> str | None:
    """The LoggedModel id of a model version (its ``model_id``, else from a ``models:/m-...`` source)."""
    source = str(getattr(mv, "source", "") or "")
    return getattr(mv, "model_id", None) or (source[len("models:/"):] if source.startswith("models:/m-") else None)


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:limit]


# -- the follower -----------------------------------------------------------------------------------
class Follower:
    """Polls the registry for each slot's alias (and the shadow alias), loads, verifies and swaps."""

    def __init__(self, slots: list[Slot], cfg: dict, backbones: dict, run):
        from adreg.pyfunc.status import StatusReporter

        self.slots = slots
        self.cfg = cfg
        self.backbones = backbones
        self.run = run
        # its own client: the process-wide tracking URI is left as it is
        uri = str(cfg.get("tracking_uri") or "") or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
        self.uri = uri
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in the server log
        self.client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.poll_seconds = max(0.2, float(cfg.get("poll_seconds") or 2.0))
        self.heartbeat_seconds = max(self.poll_seconds, float(cfg.get("heartbeat_seconds") or 10.0))
        self.shadow_alias = str(cfg.get("shadow_alias") or "")
        self.root = Path(tempfile.mkdtemp(prefix="adreg-follow-"))
        self.status = StatusReporter(self.client, cfg, self.heartbeat_seconds)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_report = 0.0
        self.swaps = 0

    # lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="adreg-follow", daemon=True)
        self._thread.start()
        atexit.register(self.stop)
        self._hook_signals()

    def _hook_signals(self) -> None:
        """Report "stopped" on SIGTERM/SIGINT too. uvicorn shuts down gracefully on them and then re-raises
        the signal with the handler it found at start (this one), so atexit would never run; chain on."""
        import signal

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)

            def handler(signum, frame, previous=previous):
                self.stop()
                if callable(previous):
                    previous(signum, frame)
                elif previous != signal.SIG_IGN:
                    signal.signal(signum, signal.SIG_DFL)
                    signal.raise_signal(signum)

            signal.signal(sig, handler)

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.status.report(self.slots, state="stopped")
        except Exception as exc:  # the store may be gone at shutdown
            _log.warning("adreg: could not report the server as stopped: %s", one_line(exc))
        shutil.rmtree(self.root, ignore_errors=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.poll_seconds)

    # one round
    def poll_once(self) -> None:
        changed = False
        for slot in self.slots:
            try:
                changed |= self._follow(slot)
                slot.registry_error = None
            except Exception as exc:  # store unreachable, locked, ...: keep serving, say so
                slot.registry_error = one_line(exc)
                _log.warning("adreg: registry check of %s failed: %s", slot.name, slot.registry_error)
        if changed or time.monotonic() - self._last_report >= self.heartbeat_seconds:
            try:
                self.status.report(self.slots)
                self._last_report = time.monotonic()
            except Exception as exc:
                _log.warning("adreg: status report failed: %s", one_line(exc))

    def _resolve(self, name: str, alias: str) -> tuple[str, str | None] | None:
        try:
            mv = self.client.get_model_version_by_alias(name, alias)
        except mlflow.exceptions.MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower():
                return None
            raise
        return str(mv.version), _model_id(mv)

    def _follow(self, slot: Slot) -> bool:
        changed = False
        if slot.alias and slot.name:
            target = self._resolve(slot.name, slot.alias)
            if target is not None:
                version, model_id = target
                cur = slot.current
                if not cur.version and cur.model_id and cur.model_id == model_id:
                    cur.version = version  # the snapshot MLflow loaded is this version
                    changed = True
                if slot.failed_version is not None and version != slot.failed_version:
                    slot.failed_version = None  # the alias moved on: a later promotion may retry it
                if version != cur.version and version != slot.failed_version:
                    changed |= self._swap(slot, version)
        if self.shadow_alias and slot.name:
            changed |= self._follow_shadow(slot)
        return changed

    def _follow_shadow(self, slot: Slot) -> bool:
        target = self._resolve(slot.name, self.shadow_alias)
        version = None if target is None else target[0]
        if version is None or version == slot.current.version:
            if slot.shadow is not None:
                slot.shadow = None
                self._release()
                return True
            return False
        if slot.failed_shadow is not None and version != slot.failed_shadow:
            slot.failed_shadow = None
        if (slot.shadow is None or slot.shadow.version != version) and version != slot.failed_shadow:
            try:
                slot.shadow = self.load(slot.name, version, self.shadow_alias)
            except Exception as exc:
                slot.failed_shadow = version
                slot.last_failure = {"at": now_iso(), "version": version, "alias": self.shadow_alias,
                                     "reason": one_line(exc)}
                _log.warning("adreg: shadow %s version %s refused: %s", slot.name, version, one_line(exc))
                return True
            self._release()
            _log.warning("adreg: shadowing %s@%s = version %s", slot.name, self.shadow_alias, version)
            return True
        return False

    def load(self, name: str, version: str, alias: str) -> Served:
        """Download, load (sharing backbones) and verify one version; raises on any failure."""
        mv = self.client.get_model_version(name, version)
        dst = self.root / f"{name}-v{version}-{secrets.token_hex(3)}"
        try:
            directory = store.download_detector(name, version, dst, self.client)
            # a swapped-in version runs the backbone runtime it was exported for (the snapshot's logged
            # "runtime" config key belongs to the snapshot)
            served = load_served(directory, {**self.cfg, "runtime": ""}, self.backbones, name, version, alias)
            served.model_id = _model_id(mv)
            verify(served, self.run)
            return served
        except BaseException:
            shutil.rmtree(dst, ignore_errors=True)
            self._release()
            raise

    def _swap(self, slot: Slot, version: str) -> bool:
        t0 = time.monotonic()
        old = slot.current
        try:
            served = self.load(slot.name, version, slot.alias)
        except Exception as exc:
            slot.failed_version = version
            slot.last_failure = {"at": now_iso(), "version": version, "alias": slot.alias, "reason": one_line(exc)}
            _log.warning("adreg: %s version %s NOT swapped in (still serving version %s): %s", slot.name, version,
                         old.version, one_line(exc))
            return True
        slot.current = served  # the swap: one reference assignment
        self.swaps += 1
        slot.last_swap = {"at": served.since, "from": old.version, "to": version,
                          "seconds": round(time.monotonic() - t0, 2)}
        if slot.shadow is not None and slot.shadow.version == version:
            slot.shadow = None
        self._release()
        _log.warning("adreg: %s@%s now serves version %s (was %s, swap took %.1f s)", slot.name, slot.alias, version,
                     old.version, time.monotonic() - t0)
        return True

    def _release(self) -> None:
        """Drop downloads and backbone instances that no live detector uses (bounded memory)."""
        live = [s for slot in self.slots for s in (slot.current, slot.shadow) if s is not None]
        dirs = {Path(s.directory).resolve() for s in live if s.directory is not None}
        for child in list(self.root.iterdir()) if self.root.is_dir() else []:
            if not any(d.is_relative_to(child.resolve()) for d in dirs):
                shutil.rmtree(child, ignore_errors=True)
        used = {id(s.detector.backbone) for s in live}
        for key in [k for k, b in self.backbones.items() if id(b) not in used]:
            del self.backbones[key]
        gc.collect()


def load_served(directory: Path, cfg: dict, backbones: dict, name: str = "", version: str = "", alias: str = ""):
    """Load a detector folder into a ``follow.Served`` (sharing ``backbones`` by spec)."""
    from adreg.detector import AnomalyDetector

    det = AnomalyDetector.load(directory, device=str(cfg["device"]), precision=str(cfg["precision"]),
                               backbones=backbones, runtime=str(cfg.get("runtime") or "") or None,
                               threads=int(cfg.get("threads") or 0))
    if det.threshold is None:
        raise AdregError(f"the detector in {directory} has no threshold; it was not calibrated")
    if not name:
        category = read_reference(directory).get("category")
        name = model_name(category) if category else ""
    return Served(det, name, str(version or ""), alias, directory)
