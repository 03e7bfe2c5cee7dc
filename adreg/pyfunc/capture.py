"""Opt-in capture of scored images: a sample of what the line sends, with verdict and version.

Layout (what ``adreg update --add-good`` and ``adreg drift`` read as plain image folders, recursively,
ignoring the ``.json`` sidecars)::

    <capture_dir>/<category>/ok/<YYYYMMDD>/<HHMMSS-micro>-v<version>-<rand>.png
    <capture_dir>/<category>/flagged/<YYYYMMDD>/...png      # judged anomalous: kept apart for review

each image ``<file>.png`` with a sidecar ``<file>.json``: {score, threshold, is_anomaly, normal_percentile, model,
version, alias, at, novelty, embedding}. ``novelty`` (the mean of the image's anomaly map: how far the whole image
lies from what the version learned, in score units) and ``embedding`` (the backbone's pooled features, unit
length, float16 as base64: ``decode_embedding``) are what the review queue ranks and de-duplicates by
(``adreg.review.selection``); both come from the scoring pass, nothing is computed again. The image is
written as it was sent (PNG, or JPEG as ``.jpg``; nothing is re-encoded). Sampling is deterministic: with
rate r, exactly floor(n * r) of the first n scored rows are kept. The folder is held under
``max_mib`` by deleting the oldest captures first. Writes happen on a background thread fed by a
bounded queue; when the queue is full the sample is dropped, so capture never blocks or fails a request.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import queue
import secrets
import threading
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

from adreg.names import category_of

_log = logging.getLogger("adreg.capture")
IMAGE_SUFFIXES = (".png", ".jpg")
SIGNALS_KEY = "_capture"  # a scored row's review signals (review_signals): into the sidecar, not the response


def review_signals(maps, feats, rows=None) -> list[dict]:
    """Per image of a scored batch: ``novelty`` (mean of its anomaly map) and ``embedding`` (each backbone
    layer's pooled features scaled to unit length, concatenated and scaled to unit length again; float16 base64).

    ``maps`` are the maps of the images wanted; ``rows`` their positions in ``feats`` (all of them when None)."""
    import numpy as np

    novelty = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1).mean(axis=1)
    layers = []
    for g in feats.globals:
        g = g if rows is None else g[list(rows)]
        g = g.float().cpu().numpy().reshape(len(g), -1)
        layers.append(g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12))
    emb = np.concatenate(layers, axis=1) / np.sqrt(len(layers))
    return [{"novelty": float(n), "embedding": base64.b64encode(e.astype(np.float16).tobytes()).decode("ascii")}
            for n, e in zip(novelty, emb)]


def decode_embedding(text) -> "np.ndarray | None":
    """A sidecar's ``embedding`` as float32 (None when missing or unreadable)."""
    import numpy as np

    if not isinstance(text, str) or not text:
        return None
    try:
        return np.frombuffer(base64.b64decode(text, validate=True), dtype=np.float16).astype(np.float32)
    except (binascii.Error, ValueError):
        return None


def _suffix(raw: bytes) -> str | None:
    if raw.startswith(b"\x89PNG"):
        return ".png"
    if raw.startswith(b"\xff\xd8"):
        return ".jpg"
    return None


class Capture:
    def __init__(self, directory: Path, rate: float, max_mib: float, queue_size: int = 64):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rate = min(1.0, max(0.0, float(rate)))
        self.max_bytes = int(float(max_mib) * 2 ** 20)
        self._seen = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.written = self.dropped = self.deleted = 0
        self._files: deque = deque()  # (image path, bytes incl. sidecar), oldest first
        self._bytes = 0
        self._scan()
        threading.Thread(target=self._writer, name="adreg-capture", daemon=True).start()

    def _scan(self) -> None:
        found = []
        for path in self.directory.rglob("*"):
            if path.suffix in IMAGE_SUFFIXES and path.is_file():
                side = path.with_suffix(".json")
                size = path.stat().st_size + (side.stat().st_size if side.is_file() else 0)
                found.append((path.stat().st_mtime, path, size))
        for _, path, size in sorted(found):
            self._files.append((path, size))
            self._bytes += size

    def take(self) -> bool:
        """Whether the next scored row is sampled (exactly floor(n * rate) of n)."""
        with self._lock:
            self._seen += 1
            n = self._seen
        return math.floor(n * self.rate) > math.floor((n - 1) * self.rate)

    def offer(self, image_b64, row: dict) -> None:
        """Queue one scored row for writing if sampled (``take``); never blocks, never raises."""
        if self.take():
            self.keep(image_b64, row)

    def keep(self, image_b64, row: dict) -> None:
        """Queue one row already sampled for writing; never blocks, never raises (a full queue drops it)."""
        try:
            self._queue.put_nowait((image_b64, dict(row), datetime.now(timezone.utc)))
        except queue.Full:
            self.dropped += 1
        except Exception:  # capture must never fail a request
            self.dropped += 1

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            try:
                self._write(*item)
            except Exception as exc:
                self.dropped += 1
                _log.warning("adreg: capture write failed: %s", exc)

    def _write(self, image_b64, row: dict, at: datetime) -> None:
        if isinstance(image_b64, (bytes, bytearray)):
            raw = bytes(image_b64)
            if _suffix(raw) is None:
                image_b64 = raw.decode("ascii", errors="replace")
        if isinstance(image_b64, str):
            text = image_b64.strip()
            if text.startswith("data:") and "," in text:
                text = text.split(",", 1)[1]
            try:
                raw = base64.b64decode("".join(text.split()), validate=True)
            except (binascii.Error, ValueError):
                return
        suffix = _suffix(raw)
        if suffix is None:  # another format the decoder took: store it as PNG
            import io

            from PIL import Image

            buf = io.BytesIO()
            Image.open(io.BytesIO(raw)).save(buf, format="PNG")
            raw, suffix = buf.getvalue(), ".png"
        name = str(row.get("model_name") or "")
        category = category_of(name) or name or "unknown"
        verdict = "flagged" if row.get("is_anomaly") else "ok"
        folder = self.directory / category / verdict / at.strftime("%Y%m%d")
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{at.strftime('%H%M%S-%f')}-v{row.get('model_version') or 'x'}-{secrets.token_hex(2)}"
        path = folder / (stem + suffix)
        sidecar = {"score": row.get("score"), "threshold": row.get("threshold"), "is_anomaly": row.get("is_anomaly"),
                   "normal_percentile": row.get("normal_percentile"), "model": name,
                   "version": row.get("model_version"), "alias": row.get("model_alias"),
                   "at": at.isoformat(timespec="milliseconds"), **(row.get(SIGNALS_KEY) or {})}
        path.write_bytes(raw)
        text = json.dumps(sidecar)
        path.with_suffix(".json").write_text(text)
        size = len(raw) + len(text)
        self._files.append((path, size))
        self._bytes += size
        self.written += 1
        while self._bytes > self.max_bytes and self._files:
            old, old_size = self._files.popleft()
            for p in (old, old.with_suffix(".json")):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
            self._bytes -= old_size
            self.deleted += 1
            try:
                old.parent.rmdir()  # an emptied day folder
            except OSError:
                pass

    def flush(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until queued samples are written (tests, shutdown)."""
        import time

        deadline = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
