"""Tamper evidence for a saved detector folder: a sha256 manifest of every file, written at fit, verified at load.

``write_manifest(folder)`` hashes each file (config, state, reference images, a bundled or exported
backbone, ...) into ``integrity.json`` and returns the manifest's digest (a sha256 of the sorted
file -> sha256 map), which is logged with the run and set on the model version. ``verify(folder)``
re-hashes and refuses, naming the file, when a file was changed, removed or added; it also compares
the digest with an expected one (the model version's tag) when given. Bottom-level: no MLflow here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from adreg.errors import IntegrityError

__all__ = ["IntegrityError", "MANIFEST_FILE", "DIGEST_TAG", "sha256_file", "write_manifest", "has_manifest", "verify",
           "manifest_digest"]

MANIFEST_FILE = "integrity.json"
DIGEST_TAG = "adreg.artifacts_sha256"
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (the one hash adreg uses for files: manifests, duplicates, labels)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_FILE}


def digest_of(files: dict[str, str]) -> str:
    """sha256 of the canonical JSON of a file -> sha256 map (what the run and version tags hold)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(folder: str | Path) -> str:
    """Hash every file under ``folder`` into ``folder/integrity.json``; returns the manifest digest."""
    folder = Path(folder)
    files = {name: sha256_file(path) for name, path in _files(folder).items()}
    digest = digest_of(files)
    (folder / MANIFEST_FILE).write_text(json.dumps({"algorithm": "sha256", "files": files, "digest": digest},
                                                   indent=1, sort_keys=True))
    return digest


def has_manifest(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST_FILE).is_file()


def verify(folder: str | Path, expected_digest: str | None = None) -> str:
    """Check every file of ``folder`` against its manifest; returns the digest, raises IntegrityError naming
    the first file that was modified, removed or added (or a manifest that is not the one registered)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"model refused: its integrity manifest {folder / MANIFEST_FILE} is unreadable "
                             f"({exc}); re-fit or restore the model's artifacts") from None
    digest = digest_of(files)
    if expected_digest and digest != expected_digest:
        raise IntegrityError(f"model refused: integrity manifest {folder / MANIFEST_FILE} has digest "
                             f"{digest[:12]}..., the registered version expects {expected_digest[:12]}...; "
                             "the artifacts were replaced after registration")
    if manifest.get("digest") not in (None, digest):
        raise IntegrityError(f"model refused: integrity manifest {folder / MANIFEST_FILE} was edited "
                             "(its digest does not match its file list)")
    present = _files(folder)
    for name, sha in sorted(files.items()):
        path = present.get(name)
        if path is None:
            raise IntegrityError(f"model refused: artifact file {folder / name} is missing "
                                 "(listed in its integrity manifest)")
        if sha256_file(path) != sha:
            raise IntegrityError(f"model refused: artifact file {folder / name} was modified after fit "
                                 f"(sha256 differs from the integrity manifest)")
    extra = sorted(set(present) - set(files))
    if extra:
        raise IntegrityError(f"model refused: artifact file {folder / extra[0]} was added after fit "
                             "(not in the integrity manifest)")
    return digest


def manifest_digest(folder: str | Path) -> str | None:
    """The digest recorded in a folder's manifest (None without one); no re-hashing."""
    try:
        files = json.loads((Path(folder) / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return digest_of(files)
