"""What the review app works on: the categories and their queues, the tracking store (reachability, logins,
labels) with a request's credentials, the offline journal (``adreg.review.journal``) and the overlays
(``adreg.review.overlays``).

Credentials: each store call runs with the request's credentials set in ``MLFLOW_TRACKING_USERNAME/PASSWORD``
under one process-wide lock (MLflow reads them from the environment). A login is checked by the store itself
(``adreg.registry.governance.login``, asked again after ``AUTH_TTL_S``); a journaled label of an authenticated
user is replayed with that user's credentials, held in memory only.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import mlflow

from adreg import store
from adreg.errors import DataError, NotFoundError, PermissionDenied, StoreUnreachable
from adreg.names import check_category
from adreg.registry import governance
from adreg.registry import labels as labels_mod
from adreg.review.journal import JOURNAL_DIR, Journal, RetryLoop
from adreg.review.overlays import Overlays
from adreg.review.queue import ReviewQueue
from adreg.review.selection import DEFAULT_RANDOM_SHARE, DEFAULT_STRATEGY

AUTH_TTL_S = 60
DOWN_RECHECK_S = 1.0
_STORE_LOCK = threading.RLock()  # MLflow's tracking URI and credentials are process-wide
_CREDS_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


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


class ReviewState:
    """The categories and their queues, the tracking store (``tracking_uri`` may be reassigned while running),
    the journal and its retry loop, the overlays and the credentials the store accepted."""

    def __init__(self, categories: list[str], capture_dir: Path, sample_rate: float, seed: int, device: str,
                 tracking_uri: str | None, retry_s: float, strategy: str = DEFAULT_STRATEGY,
                 random_share: float = DEFAULT_RANDOM_SHARE):
        if not categories:
            raise DataError("give at least one category to review")
        for c in categories:
            check_category(c)
        self.capture_dir = Path(capture_dir).resolve()
        if not self.capture_dir.is_dir():
            raise DataError(f"{capture_dir}: no such capture folder (adreg serve --capture DIR writes one)")
        self.categories = list(dict.fromkeys(categories))
        self.queues = {c: ReviewQueue(self.capture_dir, c, sample_rate, seed, strategy, random_share)
                       for c in self.categories}
        self.journal = Journal(self.capture_dir / JOURNAL_DIR)
        self.overlays = Overlays(device)
        self.retry = RetryLoop(lambda: self.replay(blocking=True), retry_s)
        self._uri = tracking_uri or mlflow.get_tracking_uri()
        self._auth: bool | None = None
        self._known: dict[str, tuple[str, str]] = {}  # user -> credentials, for replaying journaled labels
        self._down: tuple[float, str | None] = (0.0, None)  # (checked at, message) of a store found down
        if store.is_server(self._uri):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

    @property
    def tracking_uri(self) -> str:
        return self._uri

    @tracking_uri.setter
    def tracking_uri(self, uri: str) -> None:
        self._uri, self._auth, self._down = uri, None, (0.0, None)

    def session(self, creds: tuple[str, str] | None = None):
        return store_session(self._uri, creds)

    def queue(self, category: str) -> ReviewQueue:
        """The queue of ``category``; ``NotFoundError`` for a category not reviewed here."""
        if category not in self.queues:
            raise NotFoundError(f"category {category!r} is not reviewed here (reviewed: {', '.join(self.categories)})")
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
        if self._auth is None:
            try:
                self._auth = store.is_server(self._uri) and governance.authenticates(self._uri)
            except StoreUnreachable:
                return None
        return self._auth

    def login(self, creds: tuple[str, str]) -> None:
        """Check ``creds`` with the store (``governance.login``): ``PermissionDenied`` when it refuses them,
        ``StoreUnreachable`` when it does not answer and never accepted them; remembered for the journal."""
        if governance.login(self._uri, creds, max_age=AUTH_TTL_S) is None:
            raise PermissionDenied(f"the tracking store at {self._uri} did not accept the login of {creds[0]!r}")
        self._known[creds[0]] = creds

    @staticmethod
    def user_of(creds) -> str | None:
        return None if creds is None else creds[0]

    # -- labels ------------------------------------------------------------------------------------------
    def verdicts(self, category: str, creds) -> dict:
        with self.session(creds):
            return labels_mod.consensus(labels_mod.read_labels(category))

    def record(self, category: str, path: Path, verdict: str, sha: str, mask: bytes | None,
               reviewer: str | None, at: str, creds, selection: dict | None = None):
        """Record one label; ``selection``: how the queue chose the image (``ReviewQueue.selection``)."""
        with self.session(creds):
            return labels_mod.record_label(category, path, verdict, mask=mask, expected_sha256=sha, source="review",
                                           at=at, reviewer=None if creds else reviewer, **(selection or {}))

    def replay_entry(self, entry: dict, mask: bytes | None) -> bool:
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
                    creds, entry.get("selection"))
        return True

    def replay(self, blocking: bool = False) -> int:
        """Replay the journal when it holds labels and the store answers."""
        if not self.journal.pending() or self.store_problem():
            return 0
        return self.journal.replay(self.replay_entry, blocking=blocking)

    def start(self) -> None:
        """The background retry of journaled labels, every ``retry_s``."""
        self.retry.start()

    def stop(self) -> None:
        self.retry.stop()
