"""The MLflow store, as every layer of adreg uses it: reachability, errors by type, experiments, artifacts.

Bottom of the MLflow side: the served runtime (``adreg.pyfunc``) and the registry side (``adreg.registry``)
both get experiments, downloaded detectors and typed errors from here, so each exists once.

* ``check_reachable(uri)``: a database or server store that is down is a ``StoreUnreachable`` in seconds
  (MLflow itself retries a database connection for minutes);
* ``translate(exc, doing)``: an MLflow / HTTP / database exception as the ``adreg.errors`` class it means
  (not found, permission, conflict, unreachable), the cause kept as ``__cause__``; None when it means none;
* ``experiment_id(name)``: get-or-create an experiment, artifacts where the store keeps them;
* ``download_detector(name, version)``: a registered version's detector folder, downloaded and checked
  against the artifact digest recorded on the version.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from adreg.errors import (AdregError, ConflictError, IntegrityError, NotFoundError, PermissionDenied,
                          StoreUnreachable, first_line)

DETECTOR_CONFIG = "config.json"
#: set on a run only once its model is fully logged; the registry refuses runs without it
MODEL_COMPLETE_TAG = "adreg.model_complete"
CONNECT_TIMEOUT_S = 5
_DATABASES = ("postgresql", "mysql", "mssql")


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_reachable(uri: str) -> None:
    """Raise ``StoreUnreachable`` (one line, within ``CONNECT_TIMEOUT_S``) when the store at ``uri`` cannot be
    used: a database that does not answer or refuses the connection, a sqlite file whose folder cannot be
    created or written, a server whose port is closed."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0]
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if not path or path == ":memory:":
            return
        folder = Path(path).expanduser().resolve().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnreachable(f"the sqlite store {uri} cannot be created: {exc.strerror or exc} "
                                   f"({folder}); check --tracking-uri / $MLFLOW_TRACKING_URI") from exc
        if not os.access(folder, os.W_OK):
            raise StoreUnreachable(f"the sqlite store {uri} cannot be written ({folder} is read-only); "
                                   "check --tracking-uri / $MLFLOW_TRACKING_URI")
    elif scheme in _DATABASES:
        import sqlalchemy

        try:
            url = sqlalchemy.engine.make_url(uri)
        except Exception as exc:  # noqa: BLE001 - sqlalchemy.exc.ArgumentError
            raise StoreUnreachable(f"cannot parse the store URI {uri!r}: {exc}") from exc
        connect_args = {"connect_timeout": CONNECT_TIMEOUT_S} if scheme in ("postgresql", "mysql") else {}
        try:
            engine = sqlalchemy.create_engine(url, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
            with engine.connect():
                pass
        except ModuleNotFoundError as exc:
            raise StoreUnreachable(f"the store {url.render_as_string(hide_password=True)} needs the database "
                                   f"driver {exc.name!r}: pip install 'adreg[postgres]'") from exc
        except Exception as exc:  # noqa: BLE001 - OperationalError, InterfaceError, driver errors
            raise StoreUnreachable(f"the tracking store {url.render_as_string(hide_password=True)} is not reachable: "
                                   f"{first_line(exc)}; check --tracking-uri / $MLFLOW_TRACKING_URI") from exc
    elif is_server(uri):
        from urllib.parse import urlsplit

        parts = urlsplit(uri)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise StoreUnreachable(f"the tracking store {uri} is not reachable ({exc.strerror or exc}); is the "
                                   "server running? check --tracking-uri / $MLFLOW_TRACKING_URI") from exc


def _http_status(exc: BaseException) -> int | None:
    try:
        return int(exc.get_http_status_code()) if hasattr(exc, "get_http_status_code") else None
    except (TypeError, ValueError):
        return None


def is_refusal(exc: BaseException) -> bool:
    """Whether an MLflow error is the server refusing the user (401/403), not a bug or bad input."""
    code = getattr(exc, "error_code", "") or ""
    if code in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        return True
    response = getattr(exc, "response", None)  # requests.HTTPError
    status = getattr(response, "status_code", None) if response is not None else None
    if status in (401, 403):
        return True
    # RestException carries the server's error_code; an MlflowException raised for a bare HTTP response
    # carries INTERNAL_ERROR and the status only in its http code
    return _http_status(exc) in (401, 403) and code not in ("INTERNAL_ERROR", "")


def _chain(exc: BaseException, depth: int = 6):
    """``exc`` and the exceptions it was raised from or during (MLflow wraps transport errors)."""
    seen = 0
    while exc is not None and seen < depth:
        yield exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1


def is_unreachable(exc: BaseException) -> bool:
    """Whether an exception means the store could not be reached (connection refused, timed out, DNS): a
    transport error anywhere in its chain, or the database driver's connection failure."""
    import requests

    for e in _chain(exc):
        if isinstance(e, (requests.ConnectionError, requests.Timeout, ConnectionError, socket.timeout)):
            return True
        top = type(e).__module__.split(".")[0]
        if top in ("psycopg", "psycopg2", "pymysql") and type(e).__name__ in ("OperationalError", "InterfaceError"):
            return True  # the driver could not connect (or lost the connection)
        if top == "sqlalchemy" and type(e).__name__ == "OperationalError" and type(getattr(e, "orig", None)).__module__ \
                == "sqlite3" and "unable to open database" in str(e.orig):
            return True  # a sqlite file that cannot be opened
    return False


def translate(exc: BaseException, doing: str = "") -> AdregError | None:
    """The ``adreg.errors`` error an exception from MLflow, requests or the database means, or None when it
    means none of them (then it is a bug and should surface). ``doing`` names the action for the message."""
    if isinstance(exc, AdregError):
        return exc
    what = f" {doing}" if doing else ""
    if is_unreachable(exc):
        import mlflow

        return StoreUnreachable(f"the tracking store {mlflow.get_tracking_uri()} is not reachable{what and ' while' + what}"
                                "; is it running? check --tracking-uri / $MLFLOW_TRACKING_URI")
    code = getattr(exc, "error_code", "") or ""
    if is_refusal(exc):
        return PermissionDenied(f"the server refused{what or ' the request'} for user {_acting_user()!r}: "
                                f"{first_line(exc)}")
    if code == "RESOURCE_DOES_NOT_EXIST" or _http_status(exc) == 404 and code not in ("", "INTERNAL_ERROR"):
        return NotFoundError(f"not found{what and ' while' + what}: {first_line(exc)}")
    if code == "RESOURCE_ALREADY_EXISTS":
        return ConflictError(f"conflict{what and ' while' + what}: {first_line(exc)}")
    return None


def _acting_user() -> str:
    return os.environ.get("MLFLOW_TRACKING_USERNAME") or os.environ.get("ADREG_USER") or "?"


# -- experiments -----------------------------------------------------------------------------------
def artifact_location(uri: str) -> str | None:
    """Where a new experiment's artifacts go for a database store.

    ``$ADREG_ARTIFACT_ROOT`` if set (any MLflow artifact URI: a folder, s3://...); else a sqlite store
    keeps them in ``artifacts/`` beside its file and another database (PostgreSQL, MySQL) in
    ``$ADREG_HOME/artifacts``. An MLflow server (http) decides itself (--artifacts-destination).
    """
    if is_server(uri) or uri.startswith("databricks"):
        return None
    root = os.environ.get("ADREG_ARTIFACT_ROOT")
    if root:
        return root if "://" in root else Path(root).resolve().as_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts").as_uri()
    return (adreg_home() / "artifacts").as_uri()


def adreg_home() -> Path:
    """The embedded store's folder: ``$ADREG_HOME`` or ``./adreg-store``."""
    return Path(os.environ.get("ADREG_HOME", "adreg-store")).expanduser().resolve()


def experiment_id(name: str, tags: dict | None = None, create: bool = True, client=None) -> str | None:
    """The id of experiment ``name``, created (with ``tags``, artifacts at ``artifact_location``) when missing
    and ``create``; None when missing and not ``create``. Safe against a concurrent creator."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = client or mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if not create:
        return None
    try:
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri), tags=tags)
    except MlflowException as exc:
        found = client.get_experiment_by_name(name)  # created concurrently by another writer
        if found is None:
            raise translate(exc, f"creating experiment {name}") or exc from exc
        return found.experiment_id


# -- downloading a version's detector ----------------------------------------------------------------
def find_detector_dir(local: Path, what: str) -> Path:
    """The detector folder inside a downloaded adreg pyfunc model (``artifacts/detector``)."""
    direct = Path(local) / "artifacts" / "detector"
    if (direct / DETECTOR_CONFIG).is_file():
        return direct
    found = next(Path(local).rglob(f"detector/{DETECTOR_CONFIG}"), None)
    if found is None:
        raise NotFoundError(f"{what} holds no adreg detector artifact")
    return found.parent


def download_detector(name: str, version, dst: str | Path | None = None, client=None) -> Path:
    """Download registered model ``name`` version ``version`` and return its detector folder, verified
    against the artifact digest recorded on the version (``IntegrityError`` when a file differs or the
    manifest is gone)."""
    import mlflow

    from adreg import integrity

    client = client or mlflow.MlflowClient()
    version = str(version)
    expected = client.get_model_version(name, version).tags.get(integrity.DIGEST_TAG)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                     dst_path=None if dst is None else str(dst),
                                                     tracking_uri=client.tracking_uri,
                                                     registry_uri=client._registry_uri))
    directory = find_detector_dir(local, f"models:/{name}/{version}")
    if expected:
        if not integrity.has_manifest(directory):
            raise IntegrityError(f"model refused: {name} version {version} was registered with artifact digest "
                                 f"{expected[:12]}... but its integrity manifest is gone")
        integrity.verify(directory, expected)
    return directory


def is_missing(exc: BaseException) -> bool:
    """Whether an exception from the store means "there is no such thing" (and nothing worse)."""
    if isinstance(exc, FileNotFoundError):
        return True
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or _http_status(exc) == 404


def load_run_dict(run_id: str, path: str) -> dict | None:
    """A JSON artifact of a run, or None when the run has no such artifact; any other failure (permission,
    store down) raises its typed error."""
    import mlflow

    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}")
    except Exception as exc:  # noqa: BLE001 - classified below
        if is_missing(exc):
            return None
        raise translate(exc, f"reading {path} of run {run_id}") or exc from exc
