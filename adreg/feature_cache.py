"""Caches of backbone features, so benchmark re-runs skip the backbone.

``CachingBackbone`` wraps a backbone and serves ``extract`` image by image from a cache keyed by the
backbone and each image's pixels: the benchmarks run the product's own code (``fit_category``,
``AnomalyDetector``, ``evaluate``) on top of it, and only the backbone's work is cached.

``cached_features`` caches whole feature sets of derived images, for the studies that compare paths of
their own on cached features (benchmarks.growth, the preprocessing variants of benchmarks.mtd_study). Its
key hashes everything the features depend on: the backbone spec (name, layers, image size, precision),
each source image's path, size and modification time, and how the images were derived (augmentation
kind, count, seed). Changing any of them is a different key; nothing is ever stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from adreg.backbones.base import Backbone, Features
from adreg.images import thread_map


def cache_dir() -> Path:
    return Path(os.environ.get("ADREG_CACHE", Path.home() / ".cache" / "adreg" / "features"))


def file_identity(path: Path) -> list:
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def cache_key(backbone: Backbone, sources: Sequence[Path], derivation: dict) -> str:
    payload = {"backbone": backbone.spec(), "sources": [file_identity(p) for p in sources],
               "derivation": derivation, "version": 1}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def cached_features(backbone: Backbone, sources: Sequence[Path], make_images: Callable[[], list],
                    derivation: dict | None = None, batch_size: int = 8, enabled: bool = True,
                    extract: Callable[[list], Features] | None = None) -> tuple[Features, bool]:
    """Features of ``make_images()`` (derived from ``sources``), from the cache when present; (features, hit).
    ``extract`` replaces ``backbone.extract`` (an experiment's own preprocessing: name it in ``derivation``)."""
    extract = extract or (lambda images: backbone.extract(images, batch_size))
    if not enabled:
        return extract(make_images()), False
    path = cache_dir() / f"{cache_key(backbone, sources, derivation or {})}.safetensors"
    if path.is_file():
        state = load_file(str(path))
        n = sum(1 for k in state if k.startswith("patch_"))
        return Features([state[f"patch_{i}"] for i in range(n)], [state[f"global_{i}"] for i in range(n)]), True
    feats = extract(make_images())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two processes may fill the same entry at once
    state = {f"patch_{i}": p.contiguous() for i, p in enumerate(feats.patches)}
    state.update({f"global_{i}": g.contiguous() for i, g in enumerate(feats.globals)})
    save_file(state, str(tmp))
    tmp.replace(path)  # atomic: a killed run never leaves a half-written entry
    return feats, False


# -- a backbone with a per-image feature cache below it -----------------------------------------------------
CACHE_FORMAT = 1


def image_digest(img) -> str:
    """sha256 of a PIL image's pixels, size and mode: the same picture is the same key, whatever file or
    augmentation it came from."""
    h = hashlib.sha256()
    h.update(f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


@dataclass
class ExtractCall:
    """One ``CachingBackbone.extract`` call: images asked for, how many came from the cache, the seconds the
    call took in all (``seconds``) and of it the seconds the real backbone ran on the misses."""

    n_images: int
    hits: int
    seconds: float
    backbone_seconds: float

    @property
    def misses(self) -> int:
        return self.n_images - self.hits


class CachingBackbone:
    """A backbone whose ``extract`` serves each image's features from a cache and runs the wrapped backbone
    only on the images it has not seen.

    It stands in for the wrapped backbone wherever one is used (``AnomalyDetector``, ``fit_category``,
    ``evaluate``): same ``spec()``, ``image_size``, ``device``, ``to()`` and ``extract(images, batch_size,
    progress)``; anything else is the wrapped backbone's. The key of an image is the backbone (its spec, class,
    runtime, device type, torch version) + the sha256 of its pixels (``image_digest``), so a test image seen by
    several methods and seeds, or the same augmented view of a shot, is extracted once. Entries (per layer the
    patch map and the global descriptor of one image, float32) live in memory (an LRU of ``memory_mib``) and on
    disk under ``directory`` (default ``cache_dir()``; ``None`` with ``disk=False``: memory only).

    The misses of a call are extracted together, with the caller's ``batch_size``. On the CPU an image's
    features do not depend on the batch it is extracted in (batch 8 equals batch 1 bit for bit, tested), so the
    features served are those of an uncached ``extract`` bit for bit; on a GPU, where kernels may depend on the
    batch size, they can differ from an uncached batch by float rounding. ``calls`` records every call
    (``ExtractCall``) so a benchmark can tell real backbone seconds from cache reads. ``enabled=False`` passes
    every call through (still recorded)."""

    def __init__(self, backbone, directory: str | Path | None = None, disk: bool = True,
                 memory_mib: float | None = None, enabled: bool = True):
        self.inner = backbone
        self.enabled = enabled
        self.directory = Path(directory) if directory is not None else (cache_dir() / "images" if disk else None)
        if memory_mib is None:
            memory_mib = float(os.environ.get("ADREG_CACHE_MEMORY_MIB", 1024))
        self.memory_bytes = int(memory_mib * 2 ** 20)
        self._memory: OrderedDict[str, tuple[list, list]] = OrderedDict()
        self._memory_used = 0
        self.calls: list[ExtractCall] = []

    # -- the Backbone interface ---------------------------------------------------------------------------
    def __getattr__(self, name):  # only called for what this class does not define itself
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def spec(self) -> dict:
        return self.inner.spec()

    @property
    def image_size(self) -> int:
        return self.inner.image_size

    @property
    def device(self):
        return self.inner.device

    def to(self, *args, **kwargs) -> "CachingBackbone":
        self.inner.to(*args, **kwargs)
        return self

    def extract(self, images: Sequence, batch_size: int = 8, progress: Callable[[int], None] | None = None) -> Features:
        t0 = time.perf_counter()
        if not self.enabled:
            feats = self.inner.extract(images, batch_size, progress=progress)
            elapsed = time.perf_counter() - t0
            self.calls.append(ExtractCall(len(images), 0, elapsed, elapsed))
            return feats
        if not images:
            raise ValueError("no images to extract features from")
        prefix = self._prefix()
        keys = [prefix + d for d in thread_map(image_digest, images)]
        found = {k: e for k in dict.fromkeys(keys) if (e := self._get(k)) is not None}
        missing = list(dict.fromkeys(k for k in keys if k not in found))
        hits = sum(1 for k in keys if k in found)
        if hits and progress is not None:
            progress(hits)
        backbone_s = 0.0
        if missing:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            t1 = time.perf_counter()
            feats = self.inner.extract([images[first[k]] for k in missing], batch_size, progress=progress)
            backbone_s = time.perf_counter() - t1
            for j, k in enumerate(missing):
                entry = ([p[j].clone() for p in feats.patches], [g[j].clone() for g in feats.globals])
                self._put(k, entry, write=True)
                found[k] = entry
        entries = [found[k] for k in keys]
        n_layers = len(entries[0][0])
        out = Features([torch.stack([e[0][i] for e in entries]) for i in range(n_layers)],
                       [torch.stack([e[1][i] for e in entries]) for i in range(n_layers)])
        self.calls.append(ExtractCall(len(images), hits, time.perf_counter() - t0, backbone_s))
        return out

    # -- the cache ---------------------------------------------------------------------------------------
    def _prefix(self) -> str:
        ident = {"spec": self.inner.spec(), "class": type(self.inner).__name__,
                 "runtime": getattr(self.inner, "runtime", "torch"), "device": self.inner.device.type,
                 "torch": torch.__version__, "format": CACHE_FORMAT}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16] + "-"

    def _path(self, key: str) -> Path | None:
        if self.directory is None:
            return None
        prefix, digest = key.split("-", 1)
        return self.directory / prefix / digest[:2] / f"{digest}.safetensors"

    def _get(self, key: str):
        entry = self._memory.get(key)
        if entry is not None:
            self._memory.move_to_end(key)
            return entry
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        state = load_file(str(path))
        n = sum(1 for k in state if k.startswith("patch_"))
        entry = ([state[f"patch_{i}"] for i in range(n)], [state[f"global_{i}"] for i in range(n)])
        self._put(key, entry, write=False)
        return entry

    def _put(self, key: str, entry, write: bool) -> None:
        size = sum(t.numel() * t.element_size() for part in entry for t in part)
        if size <= self.memory_bytes:
            self._memory[key] = entry
            self._memory_used += size
            while self._memory_used > self.memory_bytes:
                _, old = self._memory.popitem(last=False)
                self._memory_used -= sum(t.numel() * t.element_size() for part in old for t in part)
        path = self._path(key)
        if write and path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {f"patch_{i}": p.contiguous() for i, p in enumerate(entry[0])}
            state.update({f"global_{i}": g.contiguous() for i, g in enumerate(entry[1])})
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            save_file(state, str(tmp))
            tmp.replace(path)  # atomic: a killed run never leaves a half-written entry


def split_calls(calls: Sequence[ExtractCall]) -> dict:
    """Totals of some ``ExtractCall``s: images, hits, seconds, backbone seconds."""
    return {"images": sum(c.n_images for c in calls), "hits": sum(c.hits for c in calls),
            "seconds": sum(c.seconds for c in calls), "backbone_seconds": sum(c.backbone_seconds for c in calls)}


def honest_seconds(measured: float, calls: Sequence[ExtractCall], backbone_ms: float) -> float:
    """``measured`` seconds of a stage whose feature extraction went through ``calls``, as if every image had
    been run through the backbone: the calls' own time (cache reads, hashing, writes and the real backbone runs)
    is replaced by the real backbone seconds of the misses + ``backbone_ms`` (a measured warm per-image
    backbone time) per hit."""
    t = split_calls(calls)
    return measured - t["seconds"] + t["backbone_seconds"] + t["hits"] * backbone_ms / 1000.0
