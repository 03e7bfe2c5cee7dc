"""The review page's offline journal: labels made while the tracking store is down, kept until it is back.

A label is written to ``<capture_dir>/.adreg-review/pending/`` (one JSON file per label and its mask PNG, each
written atomically; the JSON last, so its presence commits the entry) and replayed oldest first, with its
original time, by a background thread (``RetryLoop``) or on the next request, once the store answers; a
journaled label the store refuses (file changed, permission) moves to ``failed/`` with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Callable

from adreg.errors import AdregError, StoreUnreachable

_log = logging.getLogger("adreg.review")
JOURNAL_DIR = ".adreg-review"


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file: readers see the whole file or none."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Journal:
    """Labels waiting for the store: ``pending/<id>.json`` (+ ``<id>.mask.png``); refused ones in ``failed/``."""

    def __init__(self, folder: Path):
        self.pending_dir = Path(folder) / "pending"
        self.failed_dir = Path(folder) / "failed"
        self._lock = threading.Lock()

    def add(self, record: dict, mask: bytes | None) -> Path:
        """Journal one label; the mask is written first, the JSON last (its presence commits the entry)."""
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        ident = f"{time.time_ns()}-{secrets.token_hex(4)}"
        if mask is not None:
            _write_atomic(self.pending_dir / f"{ident}.mask.png", mask)
        path = self.pending_dir / f"{ident}.json"
        _write_atomic(path, json.dumps({**record, "mask": mask is not None}, sort_keys=True).encode())
        return path

    def pending(self) -> list[Path]:
        """The committed entries waiting, oldest first."""
        if not self.pending_dir.is_dir():
            return []
        return sorted(p for p in self.pending_dir.glob("*.json") if not p.name.startswith("."))

    def count(self) -> int:
        return len(self.pending())

    def failed(self) -> int:
        """How many journaled labels the store refused."""
        return len(list(self.failed_dir.glob("*.json"))) if self.failed_dir.is_dir() else 0

    def replay(self, record: Callable[[dict, bytes | None], bool], blocking: bool = False) -> int:
        """Hand each journaled label, oldest first, to ``record(entry, mask_bytes)`` (False: not replayable
        yet, kept); stop at the first ``StoreUnreachable``; move a refused one to ``failed/``. Returns how many
        were recorded; 0 at once when another thread is replaying and ``blocking`` is False."""
        if not self._lock.acquire(blocking=blocking):
            return 0
        done = 0
        try:
            for path in self.pending():
                mask_path = path.with_name(path.stem + ".mask.png")
                try:
                    entry = json.loads(path.read_text())
                    mask = mask_path.read_bytes() if entry.get("mask") else None
                except (OSError, ValueError) as exc:
                    self._fail(path, mask_path, {}, f"unreadable journal entry: {exc}")
                    continue
                try:
                    if record(entry, mask) is False:
                        continue
                except StoreUnreachable:
                    break
                except AdregError as exc:
                    self._fail(path, mask_path, entry, str(exc))
                    continue
                path.unlink(missing_ok=True)
                mask_path.unlink(missing_ok=True)
                done += 1
        finally:
            self._lock.release()
        return done

    def _fail(self, path: Path, mask_path: Path, entry: dict, reason: str) -> None:
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        _log.warning("adreg review: journaled label %s refused: %s", path.name, reason)
        _write_atomic(self.failed_dir / path.name, json.dumps({**entry, "refused": reason}, sort_keys=True).encode())
        if mask_path.is_file():
            os.replace(mask_path, self.failed_dir / mask_path.name)
        path.unlink(missing_ok=True)


class RetryLoop:
    """A daemon thread calling ``attempt()`` every ``every_s`` seconds until ``stop``; a failure is logged and
    tried again next time (the page shows what waits)."""

    def __init__(self, attempt: Callable[[], object], every_s: float):
        self.attempt = attempt
        self.every_s = float(every_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="adreg-review-retry", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.attempt()
            except Exception as exc:  # noqa: BLE001 - keep retrying
                _log.warning("adreg review: replaying journaled labels failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
