"""The browser review queue (``adreg review``): label what the line's served model scored, in a web page.

An ASGI app (FastAPI) over a capture folder written by ``adreg serve --capture`` and the tracking store that
keeps the labels (``adreg.registry.labels``). One static page (``static/review.html``) talks to a small JSON
API; the server binds 127.0.0.1 unless told otherwise. This module holds the routes; what they work on is a
``ReviewState`` (``adreg.review.state``): the queues, the store, the offline journal (``adreg.review.journal``)
and the overlays (``adreg.review.overlays``).

Routes (every one behind HTTP Basic credentials where the store authenticates; the store checks them):

* ``GET /``: the page;
* ``GET /api/status``: categories, whether the store is reachable (its one-line message when not), labels
  waiting in the journal, whether the store authenticates and who the user is;
* ``GET /api/queue?category=&version=&day=&verdict=&offset=&limit=``: one page of the queue
  (``adreg.review.queue``) with each entry's sha256 and the labels of other reviewers, "n of m labelled";
* ``GET /api/image?category=&rel=``: a captured file, only from inside the category's capture folder;
* ``GET /api/overlay?category=&rel=``: the image with its anomaly map blended in, computed by the version that
  judged it; a JSON error saying why when that version cannot be loaded, with the status of the reason (503
  store down, 403 refused, 404 not registered, 422 otherwise), asked again on the next request;
* ``POST /api/label``: ``{category, rel, verdict, sha256, mask?, reviewer?, reason?}``; refused with 409 when
  the file's bytes are not the ``sha256`` the page showed, 403 without EDIT; checked as the store would check
  it and journaled (202) while the store is down; the label records how the queue chose the image;
* ``GET /api/similar?category=&rel=``: the unlabelled passed captures nearest a capture ("same as this",
  ``adreg.review.selection.similar``), offered after a flagged capture is confirmed good;
* ``POST /api/label-group``: ``{category, anchor, rels, sha256s, reviewer?}``: one ``good`` label per image of
  a "same as this" group (selection ``group``), each checked like a single label; never the random slice.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from datetime import datetime, timezone
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from adreg.errors import (AdregError, ConflictError, DataError, ImageDecodeError, NotFoundError,
                          PermissionDenied, StoreUnreachable, first_line)
from adreg.integrity import sha256_file
from adreg.registry import labels as labels_mod
from adreg.review.queue import Filters, label_view, labelled_paths
from adreg.review.selection import DEFAULT_RANDOM_SHARE, DEFAULT_STRATEGY, GROUP_SIZE
from adreg.review.state import ReviewState

STATIC = Path(__file__).parent / "static"
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_MASK_BYTES = 16 * 2 ** 20
MAX_REVIEWER = 64
REALM = 'Basic realm="adreg review", charset="UTF-8"'


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# -- request bodies --------------------------------------------------------------------------------------
class GroupIn(BaseModel):
    category: str
    anchor: str
    rels: list[str]
    sha256s: list[str]
    reviewer: str | None = None


class LabelIn(BaseModel):
    category: str
    rel: str
    verdict: str
    sha256: str
    mask: str | None = None  # a PNG as a data URL or base64
    reviewer: str | None = None
    reason: str | None = None  # the reason the queue gave for the image (adreg.review.selection.REASONS)


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


# -- a request's login, errors and captures -----------------------------------------------------------
def _parse_basic(header: str) -> tuple[str, str] | None:
    """(user, password) of an HTTP Basic ``Authorization`` header; None when it is not one."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return (user, password) if sep and user else None


def _login(state: ReviewState, request: Request) -> tuple[str, str] | None:
    """The request's HTTP Basic credentials where the store authenticates, checked by the store
    (``ReviewState.login``); None where it has no users. 401 asks the browser for a login, 503: the store
    does not answer."""
    if not state.auth_required():
        return None
    creds = _parse_basic(request.headers.get("authorization", ""))
    if creds is None:
        raise HTTPException(401, "the tracking store requires a login", headers={"WWW-Authenticate": REALM})
    try:
        state.login(creds)
    except PermissionDenied:
        raise HTTPException(401, f"the tracking store refused the login of {creds[0]!r}",
                            headers={"WWW-Authenticate": REALM}) from None
    except StoreUnreachable:
        raise HTTPException(503, state.store_problem() or "the tracking store does not answer") from None
    return creds


def _status(state: ReviewState, creds, problem: str | None) -> dict:
    return {"store": {"ok": problem is None, "message": problem}, "pending": state.journal.count(),
            "failed": state.journal.failed(), "auth": bool(state.auth_required()), "user": state.user_of(creds)}


def _http_error(exc: AdregError) -> HTTPException:
    """The HTTP answer of a typed error: 409 conflict, 403 permission, 503 store down, 404, 422 bad input."""
    if isinstance(exc, ConflictError):
        return HTTPException(409, str(exc))
    if isinstance(exc, PermissionDenied):
        return HTTPException(403, first_line(exc))
    if isinstance(exc, StoreUnreachable):
        return HTTPException(503, str(exc))
    if isinstance(exc, NotFoundError):
        return HTTPException(404, str(exc))
    return HTTPException(422, str(exc))


def _queue(state: ReviewState, category: str):
    """The queue of ``category``; 404 for a category not reviewed here."""
    try:
        return state.queue(category)
    except NotFoundError as exc:
        raise HTTPException(404, str(exc)) from None


def _find(state: ReviewState, category: str, rel: str) -> Path:
    """The capture ``rel`` of ``category``: 404 when not there, 403 when outside the capture folder."""
    q = _queue(state, category)
    try:
        return q.find(rel)
    except PermissionError as exc:
        raise HTTPException(403, str(exc)) from None
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from None


def build_app(categories: list[str], capture_dir: Path, *, sample_rate: float = 0.1, seed: int = 0,
              device: str = "cpu", tracking_uri: str | None = None, retry_s: float = 5.0,
              strategy: str = DEFAULT_STRATEGY, random_share: float = DEFAULT_RANDOM_SHARE) -> FastAPI:
    """The review app over ``capture_dir`` for ``categories``; labels go to ``tracking_uri`` (default: the
    store MLflow is pointed at). ``strategy`` / ``random_share``: the queue's order and its random slice
    (``adreg.review.selection``). ``app.state.review`` is the ``ReviewState``."""
    state = ReviewState(categories, capture_dir, sample_rate, seed, device, tracking_uri, retry_s, strategy,
                        random_share)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        state.start()
        try:
            yield
        finally:
            state.stop()

    def authenticate(request: Request) -> None:
        request.state.creds = _login(state, request)

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
        q = _queue(state, category)
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
        entry = _queue(state, category).entry(rel)
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

    @app.get("/api/similar")
    def similar(request: Request, category: str, rel: str):
        creds = request.state.creds
        _find(state, category, rel)
        q = _queue(state, category)
        verdicts = {}
        if state.store_problem() is None:
            with contextlib.suppress(AdregError):
                verdicts = state.verdicts(category, creds)
        group = q.similar(q.entry(rel), labelled_paths(verdicts))
        return {"anchor": rel, "entries": [{**e.summary(), "sha256": e.sha256} for e in group]}

    @app.post("/api/label-group")
    def label_group(request: Request, body: GroupIn):
        creds = request.state.creds
        q = _queue(state, body.category)
        _find(state, body.category, body.anchor)
        try:
            if not body.rels or len(body.rels) != len(body.sha256s) or len(body.rels) > GROUP_SIZE:
                raise DataError(f"a group is 1-{GROUP_SIZE} captures, each with the sha256 the page showed")
            reviewer = clean_reviewer(body.reviewer)
            items = []
            for rel, sha in zip(body.rels, body.sha256s):
                path = _find(state, body.category, rel)
                if not SHA_RE.match(sha or ""):
                    raise DataError("each image of the group must carry the sha256 the page showed")
                selection = q.selection(q.entry(rel), "group")
                if selection["selection"] != "group":
                    raise DataError(f"{rel} is a random check: label it on its own")
                labels_mod.check_label(path, "good", expected_sha256=sha)
                items.append((rel, path, sha, selection))
        except DataError as exc:
            raise HTTPException(400, str(exc)) from None
        except AdregError as exc:
            raise _http_error(exc) from None
        at, done, journaled = _now(), [], 0
        for rel, path, sha, selection in items:
            problem = state.store_problem()
            if problem is None:
                try:
                    done.append(state.record(body.category, path, "good", sha, None, reviewer, at, creds,
                                             selection).as_dict())
                    continue
                except StoreUnreachable:
                    pass
                except AdregError as exc:
                    raise _http_error(exc) from None
            state.journal.add({"category": body.category, "path": str(path), "rel": rel, "verdict": "good",
                               "sha256": sha, "reviewer": reviewer, "auth_user": state.user_of(creds), "at": at,
                               "selection": selection}, None)
            journaled += 1
        return JSONResponse({"recorded": len(done), "journaled": journaled, "labels": done,
                             **_status(state, creds, state.store_problem())}, status_code=202 if journaled else 200)

    @app.post("/api/label")
    def label(request: Request, body: LabelIn):
        creds = request.state.creds
        path = _find(state, body.category, body.rel)
        try:
            labels_mod.check_verdict(body.verdict)
            if not SHA_RE.match(body.sha256 or ""):
                raise DataError("the label must carry the sha256 of the image the page showed")
            mask = decode_mask(body.mask)
            reviewer = clean_reviewer(body.reviewer)
            q = _queue(state, body.category)
            selection = q.selection(q.entry(body.rel), body.reason)
        except DataError as exc:
            raise HTTPException(400, str(exc)) from None
        at = _now()
        problem = state.store_problem()
        if problem is None:
            try:
                lab = state.record(body.category, path, body.verdict, body.sha256, mask, reviewer, at, creds,
                                   selection)
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
        # the store is down: check the label as recording it would, then journal it
        try:
            labels_mod.check_label(path, body.verdict, mask=mask, expected_sha256=body.sha256)
        except AdregError as exc:
            raise _http_error(exc) from None
        state.journal.add({"category": body.category, "path": str(path), "rel": body.rel, "verdict": body.verdict,
                           "sha256": body.sha256, "reviewer": reviewer, "auth_user": state.user_of(creds),
                           "at": at, "selection": selection}, mask)
        return JSONResponse({"recorded": False, "journaled": True, **_status(state, creds, problem)}, status_code=202)

    return app


def run(categories: list[str], capture_dir: Path, host: str = "127.0.0.1", port: int = 8765, *,
        sample_rate: float = 0.1, seed: int = 0, device: str = "cpu", tracking_uri: str | None = None,
        log_level: str = "warning", strategy: str = DEFAULT_STRATEGY,
        random_share: float = DEFAULT_RANDOM_SHARE) -> None:
    """Serve the review page on ``host:port`` (uvicorn) until interrupted."""
    import uvicorn

    app = build_app(categories, capture_dir, sample_rate=sample_rate, seed=seed, device=device,
                    tracking_uri=tracking_uri, strategy=strategy, random_share=random_share)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
