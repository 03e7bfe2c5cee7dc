"""The browser review queue (``adreg review``): label what the line's served model scored, in a web page.

An ASGI app (FastAPI) over a capture folder written by ``adreg serve --capture`` and the tracking store that
keeps the labels (``adreg.registry.labels``). One static page (``static/review.html``) talks to a small JSON
API; the server binds 127.0.0.1 unless told otherwise.

Routes (every one behind HTTP Basic credentials where the store authenticates):

* ``GET /``: the page;
* ``GET /api/status``: categories, whether the store is reachable (its one-line message when not), labels
  waiting in the journal, whether the store authenticates and who the user is;
* ``GET /api/queue?category=&version=&day=&verdict=&offset=&limit=``: one page of the queue
  (``adreg.review.queue``) with each entry's sha256 and the labels of other reviewers, "n of m labelled";
* ``GET /api/image?category=&rel=``: a captured file, only from inside the category's capture folder;
* ``GET /api/overlay?category=&rel=``: the image with its anomaly map blended in, computed by the version that
  judged it (loaded once per version); a JSON error saying why when that version cannot be loaded;
* ``POST /api/label``: ``{category, rel, verdict, sha256, mask?, reviewer?}``; refused with 409 when the file's
  bytes are not the ``sha256`` the page showed, 403 without EDIT; journaled (202) while the store is down.

Store down: a label is written to ``<capture_dir>/.adreg-review/pending/`` (one JSON file per label and its
mask PNG, each written atomically) and replayed with its original time by a background thread, or on the next
request, once the store answers; a journaled label the store refuses (file changed, permission) moves to
``failed/`` with the reason. Credentials: each store call runs with the request's credentials set in
``MLFLOW_TRACKING_USERNAME/PASSWORD`` under one process-wide lock (MLflow reads them from the environment);
a journaled label of an authenticated user is replayed with that user's credentials, held in memory only.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import numpy as np
import requests
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from adreg import store
from adreg.errors import (AdregError, ConflictError, DataError, ImageDecodeError, NotFoundError,
                          PermissionDenied, StoreUnreachable)
from adreg.images import load_image
from adreg.integrity import sha256_file
from adreg.names import check_category
from adreg.registry import labels as labels_mod
from adreg.review.queue import Filters, ReviewQueue, label_view, labelled_paths

_log = logging.getLogger("adreg.review")
STATIC = Path(__file__).parent / "static"
JOURNAL_DIR = ".adreg-review"
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_MASK_BYTES = 16 * 2 ** 20
MAX_REVIEWER = 64
OVERLAY_MAX_SIDE = 768
AUTH_TTL_S = 60
DOWN_RECHECK_S = 1.0
REALM = 'Basic realm="adreg review", charset="UTF-8"'
_STORE_LOCK = threading.RLock()  # MLflow's tracking URI and credentials are process-wide
_CREDS_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


# -- the store, with a request's credentials --------------------------------------------------------------
@contextlib.contextmanager
def store_session(uri: str, creds: tuple[str, str] | None):
    """Run store calls against ``uri`` with exactly ``creds`` (none: no credentials) in the environment,
    holding the process-wide store lock; the environment is restored afterwards."""
    with _STORE_LOCK:
        saved = {k: os.environ.get(k) for k in _CREDS_ENV}
        try:
            for k, v in zip(_CREDS_ENV, creds or (None, None)):
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if mlflow.get_tracking_uri() != uri:
                mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# -- the journal of labels made while the store was down ---------------------------------------------------
def _write_atomic(path: Path, data: bytes) -> None:
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
        if not self.pending_dir.is_dir():
            return []
        return sorted(p for p in self.pending_dir.glob("*.json") if not p.name.startswith("."))

    def count(self) -> int:
        return len(self.pending())

    def failed(self) -> int:
        return len([p for p in self.failed_dir.glob("*.json")]) if self.failed_dir.is_dir() else 0

    def replay(self, record, blocking: bool = False) -> int:
        """Hand each journaled label, oldest first, to ``record(entry, mask_bytes)``; stop at the first
        ``StoreUnreachable``; move a refused one to ``failed/``. Returns how many were recorded."""
        if not self._lock.acquire(blocking=blocking):
            return 0  # another thread is replaying
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
                        continue  # not replayable yet (its user's credentials are not known)
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


# -- overlays --------------------------------------------------------------------------------------------
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


class Overlays:
    """Anomaly-map overlays by the judging version: one detector per (category, version), loaded on first
    use; a version that cannot be loaded is remembered with its reason (a store that is down is not)."""

    def __init__(self, device: str = "cpu", cache_size: int = 64):
        self.device = device
        self._detectors: dict[tuple[str, str], object] = {}
        self._errors: dict[tuple[str, str], str] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()
        self._png: OrderedDict[tuple, bytes] = OrderedDict()
        self._cache_size = cache_size

    def _lock(self, key) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def detector(self, category: str, version: str, session):
        """The detector of ``category`` version ``version``; an ``AdregError`` saying why it cannot be had."""
        from adreg.registry.resolve import load_detector, resolve

        key = (category, version)
        with self._lock(key):
            if key in self._detectors:
                return self._detectors[key]
            if key in self._errors:
                raise DataError(self._errors[key])
            try:
                with session():
                    det = load_detector(resolve(category, version), device=self.device)
            except StoreUnreachable:
                raise
            except Exception as exc:  # noqa: BLE001 - any reason the version cannot be had is shown on the page
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self._errors[key] = f"version {version} cannot be loaded: {reason}"
                _log.warning("adreg review: %s", self._errors[key])
                raise DataError(self._errors[key]) from exc
            self._detectors[key] = det
            return det

    def loaded(self, category: str, version: str) -> bool:
        """Whether the detector of the version is at hand (or known not to load): no store call needed."""
        return (category, version) in self._detectors or (category, version) in self._errors

    def overlay(self, category: str, version: str, path: Path, sha: str, session) -> bytes:
        """PNG overlay of one capture (cached by its sha256 and version)."""
        key = (category, version, sha)
        with self._guard:
            if key in self._png:
                self._png.move_to_end(key)
                return self._png[key]
        image = load_image(path)  # ImageDecodeError for a corrupt capture
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


# -- request bodies --------------------------------------------------------------------------------------
class LabelIn(BaseModel):
    category: str
    rel: str
    verdict: str
    sha256: str
    mask: str | None = None  # a PNG as a data URL or base64
    reviewer: str | None = None


def decode_mask(value: str | None) -> bytes | None:
    """PNG bytes of a mask sent as a data URL / base64; ``DataError`` when it is not a PNG."""
    if value is None or value == "":
        return None
    text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DataError("the defect region is not valid base64") from None
    if len(raw) > MAX_MASK_BYTES or not raw.startswith(b"\x89PNG\r\n\x1a\n"):
        raise DataError("the defect region must be a PNG image of at most 16 MiB")
    return raw


def clean_reviewer(value: str | None) -> str | None:
    """A reviewer name typed on the page: stripped, 1-64 printable characters, or None."""
    name = (value or "").strip()
    if not name:
        return None
    if len(name) > MAX_REVIEWER or not name.isprintable():
        raise DataError(f"a reviewer name is 1-{MAX_REVIEWER} printable characters")
    return name


def _parse_basic(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return (user, password) if sep and user else None


# -- the app's state -------------------------------------------------------------------------------------
class ReviewState:
    """What the app works on: categories and their queues, the tracking store (``tracking_uri`` may be
    reassigned while running), the journal, the overlays and the credentials the store accepted."""

    def __init__(self, categories: list[str], capture_dir: Path, sample_rate: float, seed: int, device: str,
                 tracking_uri: str | None, retry_s: float):
        if not categories:
            raise DataError("give at least one category to review")
        for c in categories:
            check_category(c)
        self.capture_dir = Path(capture_dir).resolve()
        if not self.capture_dir.is_dir():
            raise DataError(f"{capture_dir}: no such capture folder (adreg serve --capture DIR writes one)")
        self.categories = list(dict.fromkeys(categories))
        self.queues = {c: ReviewQueue(self.capture_dir, c, sample_rate, seed) for c in self.categories}
        self.journal = Journal(self.capture_dir / JOURNAL_DIR)
        self.overlays = Overlays(device)
        self.retry_s = float(retry_s)
        self._uri = tracking_uri or mlflow.get_tracking_uri()
        self._auth: bool | None = None
        self._verified: dict[str, tuple[str, float]] = {}  # sha256(user, password) -> (user, verified at)
        self._known: dict[str, tuple[str, str]] = {}  # user -> credentials, for replaying journaled labels
        self._down: tuple[float, str | None] = (0.0, None)  # (checked at, message) of a store found down
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if store.is_server(self._uri):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

    @property
    def tracking_uri(self) -> str:
        return self._uri

    @tracking_uri.setter
    def tracking_uri(self, uri: str) -> None:
        self._uri, self._auth, self._down = uri, None, (0.0, None)
        self._verified.clear()

    def session(self, creds: tuple[str, str] | None = None):
        return store_session(self._uri, creds)

    def queue(self, category: str) -> ReviewQueue:
        if category not in self.queues:
            raise HTTPException(404, f"category {category!r} is not reviewed here "
                                     f"(reviewed: {', '.join(self.categories)})")
        return self.queues[category]

    # -- the store ---------------------------------------------------------------------------------------
    def store_problem(self) -> str | None:
        """The store's one-line ``StoreUnreachable`` message, or None when it answers (a store found down is
        not asked again for ``DOWN_RECHECK_S``: a database that does not answer takes seconds to say so)."""
        checked, message = self._down
        if message is not None and time.monotonic() - checked < DOWN_RECHECK_S:
            return message
        try:
            store.check_reachable(self._uri)
        except StoreUnreachable as exc:
            self._down = (time.monotonic(), str(exc))
            return str(exc)
        self._down = (0.0, None)
        return None

    def auth_required(self) -> bool | None:
        """Whether the store authenticates users (an MLflow server with the auth app); None while unknown
        (the store is down)."""
        if self._auth is not None:
            return self._auth
        if not store.is_server(self._uri):
            self._auth = False
            return False
        try:
            resp = requests.get(self._uri.rstrip("/") + "/api/2.0/mlflow/users/current", timeout=10)
        except requests.RequestException:
            return None
        self._auth = resp.status_code == 401
        return self._auth

    def authenticate(self, request: Request) -> tuple[str, str] | None:
        """The request's credentials where the store authenticates (checked against the store, cached for a
        minute); None where it has no users. 401 asks the browser for a login."""
        if not self.auth_required():
            return None
        creds = _parse_basic(request.headers.get("authorization", ""))
        if creds is None:
            raise HTTPException(401, "the tracking store requires a login", headers={"WWW-Authenticate": REALM})
        key = hashlib.sha256(f"{creds[0]}\x00{creds[1]}".encode()).hexdigest()
        cached = self._verified.get(key)
        if cached and time.monotonic() - cached[1] < AUTH_TTL_S:
            return creds
        try:
            resp = requests.get(self._uri.rstrip("/") + "/api/2.0/mlflow/users/current", auth=creds, timeout=10)
        except requests.RequestException:
            if cached:  # the store went down: a login it accepted before still counts
                return creds
            raise HTTPException(503, self.store_problem() or "the tracking store does not answer") from None
        if resp.status_code != 200:
            raise HTTPException(401, f"the tracking store refused the login of {creds[0]!r}",
                                headers={"WWW-Authenticate": REALM})
        self._verified[key] = (creds[0], time.monotonic())
        self._known[creds[0]] = creds  # for replaying this user's journaled labels
        return creds

    def user_of(self, creds) -> str | None:
        return None if creds is None else creds[0]

    # -- labels ------------------------------------------------------------------------------------------
    def verdicts(self, category: str, creds) -> dict:
        with self.session(creds):
            return labels_mod.consensus(labels_mod.read_labels(category))

    def record(self, category: str, path: Path, verdict: str, sha: str, mask: bytes | None,
               reviewer: str | None, at: str, creds):
        with self.session(creds):
            return labels_mod.record_label(category, path, verdict, mask=mask, expected_sha256=sha, source="review",
                                           at=at, reviewer=None if creds else reviewer)

    def replay_entry(self, entry: dict, mask: bytes | None):
        """Record one journaled label; False when its authenticated user's credentials are not known yet."""
        user = entry.get("auth_user")
        creds = self._known.get(user) if user else None
        if user and creds is None:
            return False
        problem = self.store_problem()
        if problem:
            raise StoreUnreachable(problem)
        category = entry["category"]
        if category not in self.queues:
            raise DataError(f"category {category!r} is not reviewed here")
        path = Path(entry["path"])
        if not path.resolve().is_relative_to(self.queues[category].root):
            raise DataError(f"{path} is not inside the capture folder")
        self.record(category, path, entry["verdict"], entry["sha256"], mask, entry.get("reviewer"), entry["at"],
                    creds)
        return True

    def replay(self, blocking: bool = False) -> int:
        """Replay the journal when it holds labels and the store answers."""
        if not self.journal.pending() or self.store_problem():
            return 0
        return self.journal.replay(self.replay_entry, blocking=blocking)

    def start(self) -> None:
        """The background retry of journaled labels, every ``retry_s``."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop():
            while not self._stop.wait(self.retry_s):
                try:
                    self.replay(blocking=True)
                except Exception as exc:  # noqa: BLE001 - keep retrying; the page shows what waits
                    _log.warning("adreg review: replaying journaled labels failed: %s", exc)

        self._thread = threading.Thread(target=loop, name="adreg-review-retry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


def _status(state: ReviewState, creds, problem: str | None) -> dict:
    return {"store": {"ok": problem is None, "message": problem}, "pending": state.journal.count(),
            "failed": state.journal.failed(), "auth": bool(state.auth_required()), "user": state.user_of(creds)}


def _http_error(exc: AdregError) -> HTTPException:
    """The HTTP answer of a typed error: 409 conflict, 403 permission, 503 store down, 404, 422 bad input."""
    if isinstance(exc, ConflictError):
        return HTTPException(409, str(exc))
    if isinstance(exc, PermissionDenied):
        return HTTPException(403, str(exc).splitlines()[0])
    if isinstance(exc, StoreUnreachable):
        return HTTPException(503, str(exc))
    if isinstance(exc, NotFoundError):
        return HTTPException(404, str(exc))
    return HTTPException(422, str(exc))


def _find(state: ReviewState, category: str, rel: str) -> Path:
    """The capture ``rel`` of ``category``: 404 when not there, 403 when outside the capture folder."""
    q = state.queue(category)
    try:
        return q.find(rel)
    except PermissionError as exc:
        raise HTTPException(403, str(exc)) from None
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from None


def build_app(categories: list[str], capture_dir: Path, *, sample_rate: float = 0.1, seed: int = 0,
              device: str = "cpu", tracking_uri: str | None = None, retry_s: float = 5.0) -> FastAPI:
    """The review app over ``capture_dir`` for ``categories``; labels go to ``tracking_uri`` (default: the
    store MLflow is pointed at). ``app.state.review`` is the ``ReviewState``."""
    state = ReviewState(categories, capture_dir, sample_rate, seed, device, tracking_uri, retry_s)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        state.start()
        try:
            yield
        finally:
            state.stop()

    def authenticate(request: Request) -> None:
        request.state.creds = state.authenticate(request)

    app = FastAPI(title="adreg review", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(authenticate)])
    app.state.review = state

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' blob: data:; "
                                    "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'")
        return response

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse((STATIC / "review.html").read_text(encoding="utf-8"))

    @app.get("/api/status")
    def status(request: Request):
        creds = request.state.creds
        state.replay()
        return {"categories": state.categories, **_status(state, creds, state.store_problem())}

    @app.get("/api/queue")
    def queue(request: Request, category: str, version: str | None = None, day: str | None = None,
              verdict: str | None = None, offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500)):
        creds = request.state.creds
        q = state.queue(category)
        try:
            filters = Filters.parse(version, day, verdict)
        except DataError as exc:
            raise HTTPException(400, str(exc)) from None
        state.replay()
        problem, verdicts = state.store_problem(), {}
        if problem is None:
            try:
                verdicts = state.verdicts(category, creds)
            except StoreUnreachable as exc:
                problem = str(exc)
            except AdregError as exc:
                raise _http_error(exc) from None
        page_ = q.page(filters, offset, limit, None if problem else labelled_paths(verdicts))
        entries = []
        for e in page_.entries:
            sha = e.sha256
            entries.append({**e.summary(), "sha256": sha, **label_view(verdicts.get(sha) if sha else None)})
        return {"category": category, "total": page_.total, "offset": page_.offset, "limit": page_.limit,
                "labelled": page_.labelled, "versions": page_.versions, "days": page_.days, "entries": entries,
                **_status(state, creds, problem)}

    @app.get("/api/image")
    def image(category: str, rel: str):
        path = _find(state, category, rel)
        return FileResponse(path, media_type="image/png" if path.suffix.lower() == ".png" else "image/jpeg")

    @app.get("/api/overlay")
    def overlay(request: Request, category: str, rel: str):
        path = _find(state, category, rel)
        entry = state.queue(category).entry(rel)
        version = entry.summary()["version"]
        if not version:
            raise HTTPException(422, "the capture does not say which version judged it")
        sha = sha256_file(path)
        creds = request.state.creds
        if not state.overlays.loaded(category, version):
            problem = state.store_problem()
            if problem:
                raise HTTPException(503, problem)
        try:
            png = state.overlays.overlay(category, version, path, sha, lambda: state.session(creds))
        except ImageDecodeError as exc:
            raise HTTPException(422, f"this capture cannot be decoded: {exc}") from None
        except AdregError as exc:
            raise _http_error(exc) from None
        return Response(png, media_type="image/png")

    @app.post("/api/label")
    def label(request: Request, body: LabelIn):
        creds = request.state.creds
        path = _find(state, body.category, body.rel)
        try:
            if body.verdict not in labels_mod.VERDICTS:
                raise DataError(f"a label is one of {', '.join(labels_mod.VERDICTS)}, got {body.verdict!r}")
            if not SHA_RE.match(body.sha256 or ""):
                raise DataError("the label must carry the sha256 of the image the page showed")
            mask = decode_mask(body.mask)
            reviewer = clean_reviewer(body.reviewer)
        except DataError as exc:
            raise HTTPException(400, str(exc)) from None
        at = _now()
        problem = state.store_problem()
        if problem is None:
            try:
                lab = state.record(body.category, path, body.verdict, body.sha256, mask, reviewer, at, creds)
            except StoreUnreachable as exc:
                problem = str(exc)
            except AdregError as exc:
                raise _http_error(exc) from None
            else:
                try:
                    view = label_view(state.verdicts(body.category, creds).get(lab.sha256))
                except AdregError:
                    view = label_view(None)
                return {"recorded": True, "label": lab.as_dict(), **view, **_status(state, creds, None)}
        # the store is down: check here what the store would check, then journal the label
        try:
            if sha256_file(path) != body.sha256:
                raise ConflictError(f"{path.name} changed since it was shown; reload it and label again")
            if body.verdict != "skip" or mask is not None:
                size = load_image(path).size
                if mask is not None:
                    if body.verdict != "defect":
                        raise DataError("a defect region is only drawn on a defect")
                    labels_mod.mask_png(mask, size)
        except AdregError as exc:
            raise _http_error(exc) from None
        state.journal.add({"category": body.category, "path": str(path), "rel": body.rel, "verdict": body.verdict,
                           "sha256": body.sha256, "reviewer": reviewer, "auth_user": state.user_of(creds),
                           "at": at}, mask)
        return JSONResponse({"recorded": False, "journaled": True, **_status(state, creds, problem)}, status_code=202)

    return app


def run(categories: list[str], capture_dir: Path, host: str = "127.0.0.1", port: int = 8765, *,
        sample_rate: float = 0.1, seed: int = 0, device: str = "cpu", tracking_uri: str | None = None,
        log_level: str = "warning") -> None:
    """Serve the review page on ``host:port`` (uvicorn) until interrupted."""
    import uvicorn

    app = build_app(categories, capture_dir, sample_rate=sample_rate, seed=seed, device=device,
                    tracking_uri=tracking_uri)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
