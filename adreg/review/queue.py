"""The review queue of one category: what ``adreg serve --capture`` kept, in the order a reviewer sees it.

A capture folder holds ``<capture_dir>/<category>/{flagged,ok}/<YYYYMMDD>/<HHMMSS-micro>-v<version>-<rand>.png``
(``adreg.pyfunc.capture``). The order is the queue's strategy (``adreg.review.selection``: ``informative`` by
default, ``newest``, ``random``), each entry with the reason it is where it is, and the same on every reload and in
every process. The ``newest`` and ``random`` orders come from directory entries only; ``informative`` also reads
the captures' small JSON sidecars (once per capture: cached), never image bytes; an entry's sha256 is read for the
page asked for, never for the whole queue.

Which entries are labelled comes from the tracking store's labels (``adreg.registry.labels``): joined by sha256
for the entries of a page (authoritative: a file whose bytes changed is not the image that was labelled), and
by the labelled file's path for the queue's "n of m labelled" count (no hashing of the whole queue).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from adreg.errors import DataError
from adreg.integrity import sha256_file
from adreg.registry.labels import Verdict, read_sidecar
from adreg.review.cache import BoundedCache
from adreg.review.selection import (DEFAULT_RANDOM_SHARE, DEFAULT_STRATEGY, REASONS, check_share, check_strategy,
                                    covered_goods, in_random_slice, order, similar)

VERDICT_FOLDERS = ("flagged", "ok")  # flagged first
IMAGE_SUFFIXES = (".png", ".jpg")
DAY_RE = re.compile(r"^\d{8}$")
NAME_RE = re.compile(r"^(?P<time>\d{6}-\d{6})-v(?P<version>[^-]+)-[0-9A-Za-z]+$")
VERSION_RE = re.compile(r"^[0-9A-Za-z_.]{1,32}$")
MAX_LIMIT = 500


@dataclass
class Entry:
    """One capture: where it is, what the line's model said (``verdict`` flagged / ok, ``version``), when.

    ``score``, ``threshold``, ``at`` and ``alias`` come from the sidecar (read by ``load_sidecar``); ``sha256``
    is computed on first use and cached per (path, size, mtime)."""

    path: Path
    rel: str  # relative to the category's capture folder, posix
    verdict: str
    day: str
    time: str  # HHMMSS-micro from the name ('' when the name is not a capture name)
    version: str | None
    sidecar: dict | None = field(default=None, repr=False)
    reason: str = ""  # why the queue put it where it is (adreg.review.selection.REASONS)

    @property
    def sort_key(self) -> tuple[str, str, str]:
        return self.day, self.time, self.rel

    def load_sidecar(self) -> dict:
        if self.sidecar is None:
            self.sidecar = read_sidecar(self.path)
        return self.sidecar

    @property
    def sha256(self) -> str | None:
        """Hex sha256 of the file's bytes; None when it cannot be read (deleted by rotation meanwhile)."""
        return file_sha256(self.path)

    def summary(self) -> dict:
        """What the page shows of the entry (reads the sidecar)."""
        side = self.load_sidecar()
        version = side.get("version")
        return {"rel": self.rel, "verdict": self.verdict, "day": self.day,
                "version": self.version if version is None else str(version),
                "score": _number(side.get("score")), "threshold": _number(side.get("threshold")),
                "alias": side.get("alias"), "at": side.get("at") or _name_time(self.day, self.time),
                "normal_percentile": _number(side.get("normal_percentile")),
                "reason": self.reason, "why": REASONS.get(self.reason, "")}


def _number(value) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _name_time(day: str, hms: str) -> str | None:
    if not DAY_RE.match(day) or not hms:
        return None
    return f"{day[:4]}-{day[4:6]}-{day[6:]}T{hms[:2]}:{hms[2:4]}:{hms[4:6]}.{hms[7:10]}+00:00"


_sha_cache: BoundedCache[str] = BoundedCache()


def file_sha256(path: Path) -> str | None:
    """sha256 of a file, cached by (path, size, mtime_ns); None when it is gone or unreadable."""
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        return _sha_cache.get(key) or _sha_cache.put(key, sha256_file(path))
    except OSError:
        return None


def _dirs(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return [e for e in it if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def scan(category_dir: Path) -> list[Entry]:
    """Every capture under one category's folder (flagged and ok), from directory entries only. Symlinks and
    names that are not images are left out; a file whose name is not a capture name has no version or time."""
    root = Path(category_dir)
    out: list[Entry] = []
    for verdict in VERDICT_FOLDERS:
        for day in _dirs(root / verdict):
            try:
                with os.scandir(day.path) as it:
                    files = [e for e in it if e.is_file(follow_symlinks=False)]
            except OSError:
                continue
            for f in files:
                stem, suffix = os.path.splitext(f.name)
                if suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                m = NAME_RE.match(stem)
                version = m["version"] if m and m["version"] != "x" else None
                out.append(Entry(Path(f.path), f"{verdict}/{day.name}/{f.name}", verdict, day.name,
                                 m["time"] if m else "", version))
    return out


@dataclass(frozen=True)
class Filters:
    """What the reviewer narrowed the queue to (None: everything)."""

    version: str | None = None
    day: str | None = None
    verdict: str | None = None

    @classmethod
    def parse(cls, version: str | None = None, day: str | None = None, verdict: str | None = None) -> "Filters":
        """Validated filters from request parameters ('' counts as not given); ``DataError`` on a bad value."""
        version, day, verdict = (v.strip() if isinstance(v, str) and v.strip() else None
                                 for v in (version, day, verdict))
        if version is not None and not VERSION_RE.match(version):
            raise DataError(f"version filter {version!r} is not a version number")
        if day is not None and not DAY_RE.match(day):
            raise DataError(f"date filter {day!r} is not a day as YYYYMMDD")
        if verdict is not None and verdict not in VERDICT_FOLDERS:
            raise DataError(f"verdict filter {verdict!r} is one of {', '.join(VERDICT_FOLDERS)}")
        return cls(version, day, verdict)

    def keep(self, e: Entry) -> bool:
        return ((self.version is None or e.version == self.version) and (self.day is None or e.day == self.day)
                and (self.verdict is None or e.verdict == self.verdict))


@dataclass
class Page:
    """One page of the queue: ``entries`` (offset..offset+limit of ``total``), the queue's versions and days
    (for the filters), and how many of the filtered queue are labelled."""

    entries: list[Entry]
    total: int
    offset: int
    limit: int
    versions: list[str]
    days: list[str]
    labelled: int | None = None


class ReviewQueue:
    """The queue of one category under ``capture_dir``; rescanned on each ``page`` call (directory listing only)."""

    def __init__(self, capture_dir: Path, category: str, sample_rate: float = 0.1, seed: int = 0,
                 strategy: str = DEFAULT_STRATEGY, random_share: float = DEFAULT_RANDOM_SHARE):
        if not 0.0 <= float(sample_rate) <= 1.0:
            raise DataError(f"sample rate {sample_rate} is not between 0 and 1")
        self.capture_dir = Path(capture_dir).resolve()
        self.category = category
        self.root = self.capture_dir / category
        self.sample_rate = float(sample_rate)
        self.seed = int(seed)
        self.strategy = check_strategy(strategy)
        self.random_share = check_share(random_share)

    def entries(self, filters: Filters = Filters()) -> tuple[list[Entry], list[Entry]]:
        """(the whole queue in review order, each entry with its ``reason``; the part ``filters`` keeps)."""
        queue = []
        for e, reason in order(scan(self.root), self.strategy, sample_rate=self.sample_rate, seed=self.seed,
                               random_share=self.random_share):
            e.reason = reason
            queue.append(e)
        return queue, [e for e in queue if filters.keep(e)]

    def covered(self, version: str) -> list[Entry]:
        """The passed captures ``version`` already covers (``adreg.review.selection.covered_goods``)."""
        return covered_goods(scan(self.root), version, seed=self.seed, random_share=self.random_share)

    def similar(self, entry: Entry, exclude: set[str] = frozenset()) -> list[Entry]:
        """The "same as this" group of ``entry`` (``adreg.review.selection.similar``); ``exclude``: resolved
        paths of labelled captures."""
        return similar(scan(self.root), entry, seed=self.seed, random_share=self.random_share, exclude=exclude)

    def selection(self, entry: Entry, reason: str | None = None) -> dict:
        """What a label of ``entry`` records about how it was chosen: ``selection`` (``random`` for the random
        slice, decided here from the capture's path and the seed; else the ``reason`` the page showed) and
        ``random_share`` (the slice's share: its inclusion probability)."""
        if in_random_slice(entry.rel, self.random_share, self.seed):
            return {"selection": "random", "random_share": self.random_share}
        reason = reason or entry.reason or "manual"
        if reason == "random" or (reason not in REASONS and reason not in ("group", "manual")):
            raise DataError(f"{reason!r} is not a reason the queue gives ({', '.join(REASONS)}) ")
        return {"selection": reason, "random_share": self.random_share}

    def page(self, filters: Filters = Filters(), offset: int = 0, limit: int = 50,
             labelled_paths: set[str] | None = None) -> Page:
        """Entries ``offset`` .. ``offset + limit`` of the filtered queue; ``labelled_paths`` (resolved paths of
        labelled files) counts the labelled part of the filtered queue."""
        if offset < 0 or not 1 <= limit <= MAX_LIMIT:
            raise DataError(f"offset must be >= 0 and limit 1..{MAX_LIMIT}, got {offset} and {limit}")
        queue, kept = self.entries(filters)
        labelled = None if labelled_paths is None else sum(1 for e in kept if str(e.path) in labelled_paths)
        return Page(kept[offset:offset + limit], len(kept), offset, limit,
                    sorted({e.version for e in queue if e.version}, key=_version_key),
                    sorted({e.day for e in queue}, reverse=True), labelled)

    def find(self, rel: str) -> Path:
        """The capture file ``rel`` names, checked to lie inside this category's folder (``LookupError``:
        not there; ``PermissionError``: outside the folder, a symlink out, or not a capture image)."""
        if not isinstance(rel, str) or not rel or "\x00" in rel:
            raise LookupError("no capture named")
        candidate = Path(rel)
        if candidate.is_absolute() or ".." in candidate.parts:
            raise PermissionError(f"{rel!r} is not a path inside the capture folder")
        full = (self.root / candidate).resolve()
        if not full.is_relative_to(self.root.resolve()):
            raise PermissionError(f"{rel!r} leads outside the capture folder")
        if full.suffix.lower() not in IMAGE_SUFFIXES:
            raise PermissionError(f"{rel!r} is not a captured image")
        if not full.is_file():
            raise LookupError(f"no capture {rel!r} (rotated out?)")
        return full

    def entry(self, rel: str) -> Entry:
        """The entry of one capture (validated like ``find``)."""
        path = self.find(rel)
        rel_posix = path.relative_to(self.root.resolve()).as_posix()
        parts = rel_posix.split("/")
        verdict = parts[0] if len(parts) == 3 and parts[0] in VERDICT_FOLDERS else "ok"
        day = parts[1] if len(parts) == 3 else ""
        m = NAME_RE.match(path.stem)
        return Entry(path, rel_posix, verdict, day, m["time"] if m else "",
                     m["version"] if m and m["version"] != "x" else None)


def _version_key(v: str):
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


def label_view(verdict: Verdict | None) -> dict:
    """The labels of one image as the page shows them: consensus verdict and each reviewer's latest label."""
    if verdict is None:
        return {"consensus": None, "labels": []}
    return {"consensus": verdict.verdict,
            "labels": [{"user": lab.user, "verdict": lab.verdict, "at": lab.at, "mask": lab.mask,
                        "identity": lab.identity} for lab in verdict.labels]}


def labelled_paths(verdicts: dict[str, Verdict]) -> set[str]:
    """Resolved paths of the files behind the labelled images (for the queue's labelled count)."""
    return {lab.path for v in verdicts.values() for lab in v.labels}
