"""Who is acting and what they may change: identity, the role model, permission checks, grants.

Role model (on an MLflow server started with authentication, ``mlflow server --app-name adreg-auth``):

* reader  (READ on ``adreg-<category>``, the server's ``default_permission``): list, load, predict, serve;
* editor  (EDIT): fit, register, promote to ``staging`` (or any alias but ``production``);
* manager (MANAGE): move or roll back ``production``, force a promotion past a failed gate.

The server enforces what it can: writes need EDIT, and the ``adreg-auth`` app (``adreg.registry.auth_app``) refuses
any change of the ``production`` alias without MANAGE, and gives the creator of a category EDIT, not
MANAGE. adreg checks the rest (``--force``, the role of an action) with ``require`` BEFORE changing
anything. Without an authenticated server there are no users: ``$ADREG_USER`` (else the login) is only
a label, and the history says so.

A login is checked in one place, ``login``: by asking the server who the credentials are (the acting user's
from ``MLFLOW_TRACKING_USERNAME/PASSWORD``, or a review page request's).
"""

from __future__ import annotations

import getpass
import hashlib
import os
import time
from dataclasses import dataclass

import mlflow
import requests

from adreg import store
from adreg.errors import AdregError, ConfigError, NotFoundError, PermissionDenied, StoreUnreachable, first_line
from adreg.names import fit_experiment_name, lifecycle_experiment_name, model_name, reviews_experiment_name

__all__ = ["PermissionDenied", "Identity", "identity", "login", "authenticates", "permission", "needed_for_alias",
           "require", "grant", "is_refusal", "refusal", "model_name", "lifecycle_experiment_name",
           "fit_experiment_name"]

LEVELS = ("READ", "EDIT", "MANAGE")
RANK = {"NO_PERMISSIONS": 0, "DENY": 0, "READ": 1, "USE": 1, "EDIT": 2, "MANAGE": 3}
PROTECTED_ALIASES = ("production",)
AUTHENTICATED, LABEL_ENV, LABEL_LOGIN = "authenticated", "label ($ADREG_USER)", "label (login)"
TIMEOUT_S = 30  # read timeout; a server that is down fails at connect, at once
CURRENT_USER = "/api/2.0/mlflow/users/current"


@dataclass(frozen=True)
class Identity:
    user: str
    kind: str  # AUTHENTICATED, LABEL_ENV or LABEL_LOGIN
    is_admin: bool = False
    server: str | None = None

    @property
    def authenticated(self) -> bool:
        return self.kind == AUTHENTICATED


def server_url() -> str | None:
    uri = mlflow.get_tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def _credentials() -> tuple[str, str] | None:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    return (user, os.environ.get("MLFLOW_TRACKING_PASSWORD", "")) if user else None


def _get(url: str, path: str, params: dict | None = None,
         creds: tuple[str, str] | None = None) -> requests.Response:
    try:
        return requests.get(url + path, params=params, auth=creds, timeout=TIMEOUT_S)
    except requests.RequestException as exc:
        raise StoreUnreachable(f"cannot reach the MLflow server at {url} ({type(exc).__name__}); "
                               "check --tracking-uri / MLFLOW_TRACKING_URI") from exc


def authenticates(url: str) -> bool:
    """Whether the MLflow server at ``url`` has users: it asks a request without a login for one (401).
    ``StoreUnreachable`` when it does not answer."""
    return _get(url.rstrip("/"), CURRENT_USER).status_code == 401


_logins: dict[tuple[str, str, str], tuple[Identity, float]] = {}  # (url, user, sha256(password)) -> (who, when)


def login(url: str, creds: tuple[str, str] | None, max_age: float | None = None) -> Identity | None:
    """The user the MLflow server at ``url`` accepts with ``creds`` (user, password), asked from the server
    itself: an authenticated ``Identity``; None where the server has no users (no authentication app).

    ``PermissionDenied`` when it refuses the login (or wants one and ``creds`` is None); ``StoreUnreachable``
    when it does not answer. An accepted login is remembered and asked again after ``max_age`` seconds (None:
    never); while the server does not answer, a login it accepted before still counts."""
    url = url.rstrip("/")
    key = None if creds is None else (url, creds[0], hashlib.sha256(creds[1].encode()).hexdigest())
    known = _logins.get(key) if key else None
    if known and (max_age is None or time.monotonic() - known[1] < max_age):
        return known[0]
    try:
        resp = _get(url, CURRENT_USER, creds=creds)
    except StoreUnreachable:
        if known:
            return known[0]
        raise
    if resp.status_code == 200:
        user = resp.json()["user"]
        ident = Identity(user["username"], AUTHENTICATED, bool(user.get("is_admin")), url)
        if key:
            _logins[key] = (ident, time.monotonic())
        return ident
    if resp.status_code == 401:
        raise PermissionDenied(
            f"the MLflow server at {url} refused the login of user {creds[0]!r} (wrong password?)" if creds else
            f"the MLflow server at {url} requires a login: set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD")
    return None  # any other answer (404: no authentication app): a server without users


def identity() -> Identity:
    """The acting user: the user an authenticated server accepted (``login`` with the credentials in
    ``MLFLOW_TRACKING_USERNAME/PASSWORD``), else a label."""
    url = server_url()
    ident = None if url is None else login(url, _credentials())
    if ident is not None:
        return ident
    label = os.environ.get("ADREG_USER")
    return Identity(label, LABEL_ENV) if label else Identity(getpass.getuser(), LABEL_LOGIN)


def permission(resource_type: str, resource_id: str) -> str | None:
    """The acting user's permission on a resource (READ/EDIT/MANAGE/...), or None without an authenticated
    server (every user may do everything then)."""
    ident = identity()
    if not ident.authenticated:
        return None
    if ident.is_admin:
        return "MANAGE"
    resp = _get(ident.server, "/api/3.0/mlflow/users/permissions/get",
                {"username": ident.user, "resource_type": resource_type, "resource_id": resource_id},
                _credentials())
    if resp.status_code != 200:
        raise PermissionDenied(f"cannot read the permission of {ident.user!r} on {resource_type} {resource_id} "
                               f"(server answered {resp.status_code})")
    return resp.json().get("permission", "NO_PERMISSIONS")


def needed_for_alias(alias: str) -> str:
    return "MANAGE" if alias in PROTECTED_ALIASES else "EDIT"


def require(category: str, needed: str, doing: str) -> Identity:
    """Raise PermissionDenied (one line, naming the missing permission) unless the acting user holds
    ``needed`` on the category's registered model. A no-op without an authenticated server."""
    ident = identity()
    have = permission("registered_model", model_name(category))
    if have is not None and RANK.get(have, 0) < RANK[needed]:
        raise PermissionDenied(f"{doing} needs {needed} permission on registered model {model_name(category)}; "
                               f"user {ident.user!r} has {have} (an admin can run "
                               f"`adreg grant {category} {ident.user} {needed}`)")
    return ident


# -- grants (admins) -----------------------------------------------------------------------------------
def experiment_levels(level: str) -> str:
    """What a category role needs on the category's experiments (fit runs, lifecycle events)."""
    return "READ" if level == "READ" else "EDIT"


def grant(category: str, user: str, level: str) -> list[dict]:
    """Give ``user`` a role on a category: ``level`` on ``adreg-<category>``, and what the role needs on the
    category's fit, lifecycle and review experiments. Admin (or MANAGE on the resources) only; returns the grants."""
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    level = level.upper()
    if level not in LEVELS:
        raise ConfigError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    ident = identity()
    if not ident.authenticated:
        raise ConfigError("adreg grant needs an MLflow server with authentication (mlflow server --app-name "
                          "adreg-auth) and MLFLOW_TRACKING_USERNAME/PASSWORD of an admin; this store has no users")
    name = model_name(category)
    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise store.translate(exc, f"reading {name}") or exc from exc
        raise NotFoundError(f"unknown category {category!r}: register a version first (adreg fit --register)") from None
    if not ident.is_admin and RANK.get(permission("registered_model", name) or "", 0) < RANK["MANAGE"]:
        # refused before anything is touched: creating a missing experiment here would make this user its owner
        raise PermissionDenied(f"granting permissions on {name} needs an admin (or MANAGE on it); "
                               f"user {ident.user!r} is neither")
    targets = [("registered_model", name, level, name)]
    for exp_name in (fit_experiment_name(category), lifecycle_experiment_name(category),
                     reviews_experiment_name(category)):
        targets.append(("experiment", store.experiment_id(exp_name), experiment_levels(level), exp_name))
    auth = get_app_client("basic-auth", tracking_uri=ident.server)
    done = []
    for rtype, rid, perm, label in targets:
        try:
            try:
                auth.grant_user_permission(user, rtype, rid, perm)
            except MlflowException as exc:
                if "already exists" not in str(exc):
                    raise
                auth.revoke_user_permission(user, rtype, rid)
                auth.grant_user_permission(user, rtype, rid, perm)
        except MlflowException as exc:
            if store.is_refusal(exc):
                raise PermissionDenied(f"granting permissions on {name} needs an admin (or MANAGE on it); "
                                       f"user {ident.user!r} is neither") from exc
            if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or exc.get_http_status_code() == 404:
                raise NotFoundError(f"the server has no user {user!r}; an admin creates it first") from exc
            raise store.translate(exc, f"granting {perm} on {label}") or exc from exc
        done.append({"resource_type": rtype, "resource": label, "user": user, "permission": perm})
    return done


is_refusal = store.is_refusal


def refusal(exc: Exception, doing: str) -> PermissionDenied:
    """One line for a server refusal: what was being done, the user, the server's reason."""
    text = first_line(exc)
    try:
        who = identity().user
    except AdregError:
        who = os.environ.get("MLFLOW_TRACKING_USERNAME", "?")
    return PermissionDenied(f"the server refused {doing} for user {who!r}: {text}")
