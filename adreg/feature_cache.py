"""On-disk cache of backbone features, so benchmark re-runs skip the backbone.

The key hashes everything the features depend on: the backbone spec (name, layers, image size,
precision), each source image's path, size and modification time, and how the images were derived
(augmentation kind, count, seed). Changing any of them is a different key; nothing is ever stale.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

from safetensors.torch import load_file, save_file

from adreg.backbones.base import Backbone, Features


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
    tmp = path.with_suffix(".tmp")
    state = {f"patch_{i}": p.contiguous() for i, p in enumerate(feats.patches)}
    state.update({f"global_{i}": g.contiguous() for i, g in enumerate(feats.globals)})
    save_file(state, str(tmp))
    tmp.replace(path)  # atomic: a killed run never leaves a half-written entry
    return feats, False
