"""Anomaly-map overlays for the review page: a capture with the map of the version that judged it blended in.

One detector per (category, version), loaded from the registry on first use, and the last overlays (by the
image's sha256 and the version) are kept in memory. Only successes are kept: a version that could not be
loaded (store down, permission refused, not registered yet, anything else) is asked for again on the next
request, and the failure keeps its type (``StoreUnreachable``, ``PermissionDenied``, ``NotFoundError``...)
so the page is answered with its own status, not a stale one.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

import numpy as np

from adreg import store
from adreg.errors import AdregError, DataError, first_line
from adreg.images import load_image

_log = logging.getLogger("adreg.review")
OVERLAY_MAX_SIDE = 768


def blend(image, amap: np.ndarray, threshold: float | None, max_side: int = OVERLAY_MAX_SIDE) -> bytes:
    """PNG of ``image`` with ``amap`` as a jet heat overlay (scale 0 .. 2x threshold, as the fit reports)."""
    from matplotlib import colormaps
    from PIL import Image

    img = image.convert("RGB")
    scale = min(1.0, max_side / max(img.size))
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    amap = np.asarray(amap, dtype=np.float32)
    vmax = 2.0 * threshold if threshold else float(amap.max()) or 1.0
    resized = np.asarray(Image.fromarray(amap).resize(img.size, Image.BILINEAR))
    heat = colormaps["jet"](np.clip(resized / vmax, 0.0, 1.0))[..., :3]
    out = (0.55 * np.asarray(img, np.float32) / 255.0 + 0.45 * heat) * 255.0
    buf = io.BytesIO()
    Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _load_error(version: str, exc: Exception) -> AdregError:
    """Why ``version`` cannot be loaded, as the error class it means (``adreg.store.translate``: store down,
    refused, not found...; a ``DataError`` for anything else), one line naming the version."""
    err = store.translate(exc)
    reason = first_line(err or exc)
    return (DataError if err is None else type(err))(f"version {version} cannot be loaded: {reason}")


class Overlays:
    """Overlays by the judging version, with the detectors and the last ``cache_size`` overlays that worked."""

    def __init__(self, device: str = "cpu", cache_size: int = 64):
        self.device = device
        self._detectors: dict[tuple[str, str], object] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()
        self._png: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()
        self._cache_size = cache_size

    def _lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def detector(self, category: str, version: str, session: Callable[[], AbstractContextManager]):
        """The detector of ``category`` version ``version``, loaded inside ``session()`` (the store, with the
        request's credentials) the first time; an ``AdregError`` saying why it cannot be had (not kept)."""
        from adreg.registry.resolve import load_detector, resolve

        key = (category, version)
        with self._lock(key):
            if key not in self._detectors:
                try:
                    with session():
                        self._detectors[key] = load_detector(resolve(category, version), device=self.device)
                except Exception as exc:  # noqa: BLE001 - any reason the version cannot be had is shown on the page
                    err = _load_error(version, exc)
                    _log.warning("adreg review: %s", err)
                    raise err from exc
            return self._detectors[key]

    def loaded(self, category: str, version: str) -> bool:
        """Whether the detector of the version is at hand (no store call needed)."""
        return (category, version) in self._detectors

    def overlay(self, category: str, version: str, path: Path, sha: str,
                session: Callable[[], AbstractContextManager]) -> bytes:
        """PNG overlay of one capture (kept by its sha256 and version); ``ImageDecodeError`` for a corrupt one."""
        key = (category, version, sha)
        with self._guard:
            if key in self._png:
                self._png.move_to_end(key)
                return self._png[key]
        image = load_image(path)
        det = self.detector(category, version, session)
        with self._lock((category, version)):
            amap = det.predict([image]).maps[0]
        threshold = getattr(det.threshold, "value", None) if det.threshold is not None else None
        png = blend(image, amap, threshold)
        with self._guard:
            self._png[key] = png
            while len(self._png) > self._cache_size:
                self._png.popitem(last=False)
        return png
