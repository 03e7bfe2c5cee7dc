"""Training-image manifests: which images a model was fitted on, identified by content (sha256).

Every logged fit carries one (``training/manifest.json``): per image the path as given, its sha256,
its role (``train``: learned from; ``calibration``: held out to set the threshold) and which fit or
update added it. ``adreg update`` extends the parent's manifest, skips images whose hash
is already in it, and the manifest's digest is the MLflow dataset digest of the run's training input.
Also here: finding the image files of folders recursively (capture folders nest them by day).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

from adreg.errors import DataError
from adreg.images import list_images
from adreg.integrity import sha256_file

MANIFEST_ARTIFACT = "training/manifest.json"
SKIPPED_DIRS = ("ground_truth",)  # MVTec masks live there


def find_images(folders: Sequence[str | Path], what: str = "folder") -> list[Path]:
    """Image files under each folder, recursively (sorted; hidden folders, ``ground_truth`` and masks
    skipped; JSON sidecars and other files ignored). A missing folder is an error."""
    out: list[Path] = []
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            raise DataError(f"{what} {folder} does not exist")
        if not folder.is_dir():
            raise DataError(f"{what} {folder} is not a folder")
        for root, dirs, _ in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS)
            out.extend(list_images(root))
    return out


def entry(path: str | Path, added_by: str, run_id: str | None = None, sha256: str | None = None,
          role: str = "train") -> dict:
    """One manifest record; ``sha256`` is computed when not given (None when the file is not here).
    ``role``: ``train`` (learned from), ``calibration`` (held out to set the threshold) or ``selection``
    (ranked the settings of a tune)."""
    if sha256 is None and Path(path).is_file():
        sha256 = sha256_file(path)
    return {"path": str(path), "sha256": sha256, "role": role, "added_by": added_by, "run_id": run_id}


def training(entries: Iterable[dict]) -> list[dict]:
    """The records of images learned from (manifests older than roles hold only those)."""
    return [e for e in entries if e.get("role", "train") == "train"]


def seen(entries: Iterable[dict]) -> list[dict]:
    """The records of images a model learned from or was chosen on (``selection``: the reviewed defects an
    ``adreg tune`` ranked its candidates with): the gate leaves both out of the production set it judges on."""
    return [e for e in entries if e.get("role", "train") in ("train", "selection")]


def digest(entries: Iterable[dict]) -> str:
    """Order-independent digest of a manifest's image hashes (32 hex chars: MLflow's dataset digest)."""
    hashes = sorted(e["sha256"] or f"missing:{e['path']}" for e in entries)
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:32]


def document(category: str, entries: list[dict], run_id: str | None = None) -> dict:
    """The JSON logged as ``training/manifest.json``; records without a run id get ``run_id``."""
    images = [{**e, "run_id": e.get("run_id") or run_id} for e in entries]
    added: dict[str, int] = {}
    for e in images:
        key = f"{e['added_by']}/{e.get('role', 'train')}"
        added[key] = added.get(key, 0) + 1
    return {"category": category, "digest": digest(images), "n_images": len(images),
            "n_training_images": len(training(images)), "counts": added, "images": images}
