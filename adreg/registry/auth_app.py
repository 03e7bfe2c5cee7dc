"""``mlflow server --app-name adreg-auth``: MLflow's basic-auth app plus the rules stock MLflow cannot express.

Stock basic-auth lets any user with EDIT on a registered model move any of its aliases, and makes the
creator of a registered model its MANAGEr. This app (entry point ``mlflow.app: adreg-auth``) wraps
``mlflow.server.auth:create_app`` and adds, server-side:

* a change (set or delete) of a protected alias (``production``) needs MANAGE on the registered model;
* the creator of an ``adreg-*`` registered model or experiment gets EDIT, not MANAGE (a category's
  managers are named by an admin with ``adreg grant CATEGORY USER MANAGE``), so registering the first
  version of a category does not make an editor its production manager;
* a lifecycle event run (experiment ``adreg-<category>/lifecycle``) and a review label run
  (``adreg-<category>/reviews``) may only record the authenticated user as its ``user`` param, with identity
  kind ``authenticated``: the audit trail and the labels cannot be signed with someone else's name.

Configured like basic-auth (``MLFLOW_AUTH_CONFIG_PATH`` ini, ``MLFLOW_FLASK_SERVER_SECRET_KEY``); run it
with one worker or with a secret key shared by the workers.
"""

from __future__ import annotations

import logging

from flask import g, jsonify, make_response, request

from mlflow.server import app as mlflow_app
from mlflow.server import auth

PROTECTED_ALIASES = ("production",)
PREFIX = "adreg-"
LIFECYCLE_SUFFIX = "/lifecycle"
REVIEWS_SUFFIX = "/reviews"
AUTHENTICATED = "authenticated"
_log = logging.getLogger(__name__)


def _forbidden(message: str):
    return make_response(jsonify({"error_code": "PERMISSION_DENIED", "message": message}), 403)


def _body() -> dict:
    return request.get_json(force=True, silent=True) or {}


def _param(name: str):
    return request.args.get(name) if request.method in ("GET", "DELETE") and name in request.args else _body().get(name)


def _user() -> str | None:
    return getattr(g, "mlflow_authenticated_user", None)


def _is_admin(user: str) -> bool:
    try:
        return bool(auth.store.get_user(user).is_admin)
    except Exception:  # noqa: BLE001 - unknown user: not an admin
        return False


def _guard_protected_alias():
    name, alias = _param("name"), _param("alias")
    if alias not in PROTECTED_ALIASES or not name:
        return None
    user = _user()
    if user is None or _is_admin(user):
        return None
    perm = auth._get_registered_model_permission(name)
    if perm.can_manage:
        return None
    return _forbidden(f"changing alias {alias!r} of registered model {name} needs MANAGE permission; "
                      f"user {user!r} has {perm.name}")


def _lifecycle_run(run_id: str) -> bool:
    from mlflow.server.handlers import _get_tracking_store

    store = _get_tracking_store()
    try:
        exp = store.get_experiment(store.get_run(run_id).info.experiment_id)
    except Exception:  # noqa: BLE001 - unknown run: the handler answers that
        return False
    return exp.name.startswith(PREFIX) and exp.name.endswith((LIFECYCLE_SUFFIX, REVIEWS_SUFFIX))


def _guard_event_identity():
    body = _body()
    params = body.get("params") or ([{"key": body.get("key"), "value": body.get("value")}] if "key" in body else [])
    wanted = {"user": _user(), "identity": AUTHENTICATED}
    bad = [p for p in params if p.get("key") in wanted and p.get("value") != wanted[p["key"]]]
    if not bad or _user() is None:
        return None
    run_id = body.get("run_id") or body.get("run_uuid")
    if not run_id or not _lifecycle_run(run_id):
        return None
    return _forbidden(f"a lifecycle event or review label may only record the authenticated user: param {bad[0]['key']!r} must be "
                      f"{wanted[bad[0]['key']]!r}")


def _before_request():
    path, method = request.path, request.method
    if path.endswith("/mlflow/registered-models/alias") and method in ("POST", "DELETE"):
        return _guard_protected_alias()
    if method == "POST" and path.endswith(("/mlflow/runs/log-batch", "/mlflow/runs/log-parameter")):
        return _guard_event_identity()
    return None


def _creator_gets_edit(resp):
    """After basic-auth granted the creator MANAGE: an ``adreg-*`` creator keeps EDIT only."""
    if resp.status_code != 200 or request.method != "POST":
        return resp
    path = request.path
    if path.endswith("/mlflow/registered-models/create"):
        rtype, rid = "registered_model", _body().get("name") or ""
        name = rid
    elif path.endswith("/mlflow/experiments/create"):
        rtype, name = "experiment", _body().get("name") or ""
        rid = (resp.get_json(silent=True) or {}).get("experiment_id")
    else:
        return resp
    user = _user()
    if not name.startswith(PREFIX) or not rid or user is None or _is_admin(user):
        return resp
    try:
        auth.store.revoke_user_resource_permission(user, rtype, str(rid))
        auth.store.grant_user_resource_permission(user, rtype, str(rid), "EDIT")
    except Exception:  # noqa: BLE001 - never fail the creation itself; log it
        _log.exception("could not set EDIT for the creator %s of %s %s", user, rtype, name)
    return resp


def create_app(app=mlflow_app):
    # after_request handlers run in reverse order of registration: registered BEFORE basic-auth's, this
    # one runs AFTER basic-auth has granted the creator MANAGE, and turns that into EDIT.
    app.after_request(_creator_gets_edit)
    wrapped = auth.create_app(app)
    app.before_request(_before_request)  # after basic-auth's: the user is authenticated by then
    return wrapped
