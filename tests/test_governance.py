"""Governance against a real `mlflow server --app-name adreg-auth` (basic-auth, sqlite auth DB) on 127.0.0.1:
users and roles, server-enforced production alias, identity in the history, grants, --json and exit codes,
the review page's login and permissions."""

import json
import os
import subprocess
import sys

import mlflow
import pytest
import requests

from adreg import cli
from adreg.registry.resolve import get_model
from adreg.registry import derive, events, governance, lifecycle, tracking, versions
from adreg.registry.governance import PermissionDenied
from adreg.server import stop_process_group, wait_http
from serving.process import free_port

ADMIN = ("admin", "admin-pass-0123456789")
USERS = {"editor": "editor-pass-0123456789", "manager": "manager-pass-0123456789",
         "reader": "reader-pass-0123456789"}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """One authenticated MLflow server for the module: admin + editor + manager + reader."""
    tmp = tmp_path_factory.mktemp("auth-server")
    ini = tmp / "auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{tmp / 'auth.db'}\n"
                   f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   "auth_cache_ttl_seconds = 60\n")  # as the governance guide advises
    port = free_port()
    log = open(tmp / "server.log", "w")
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_AUTH_CONFIG_PATH=str(ini),
               MLFLOW_FLASK_SERVER_SECRET_KEY="adreg-test-secret", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_USERNAME", None)
    env.pop("MLFLOW_TRACKING_PASSWORD", None)
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "adreg-auth",
                             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                             "--artifacts-destination", (tmp / "artifacts").as_uri(),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    mp = pytest.MonkeyPatch()
    try:
        if not wait_http(f"{url}/health", 420, proc):  # a loaded 2-core CI machine starts it slowly
            what = "exited" if proc.poll() is not None else "did not come up"
            pytest.fail(f"mlflow server {what}:\n" + (tmp / "server.log").read_text()[-3000:])
        for user, password in USERS.items():
            r = requests.post(f"{url}/api/2.0/mlflow/users/create", json={"username": user, "password": password},
                              auth=ADMIN, timeout=120)  # password hashing is slow on a loaded CPU
            assert r.status_code == 200, r.text
        mp.setenv("MLFLOW_TRACKING_URI", url)
        tracking.configure(url)
        yield {"url": url, "mp": mp, "tmp": tmp}
    finally:
        mp.undo()
        mlflow.set_tracking_uri(None)
        stop_process_group(proc)
        log.close()


def login(server, user):
    password = ADMIN[1] if user == ADMIN[0] else USERS[user]
    server["mp"].setenv("MLFLOW_TRACKING_USERNAME", user)
    server["mp"].setenv("MLFLOW_TRACKING_PASSWORD", password)
    tracking.configure(server["url"])


@pytest.fixture(scope="module")
def editor_version(auth_server, bottle_fit):
    """The editor fits (logs) and registers the first version of a new category."""
    login(auth_server, "editor")
    logged = derive.log_fit(bottle_fit)
    return derive.register_version(logged, "bottle", bottle_fit.metrics()).version


def _cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_roles_production_is_for_managers_and_history_names_the_users(auth_server, editor_version, capsys):
    v = editor_version
    # the editor created the category, but the server gave the creator EDIT, not MANAGE
    login(auth_server, "editor")
    ident = governance.identity()
    assert (ident.user, ident.kind, ident.is_admin) == ("editor", governance.AUTHENTICATED, False)
    assert governance.permission("registered_model", "adreg-bottle") == "EDIT"

    # editor -> production: refused by adreg before the gate, one line naming the permission, exit 1
    code, out, err = _cli(capsys, "promote", "bottle", "--version", v, "--alias", "production")
    assert code == 1 and out == ""
    assert err.strip().count("\n") == 0 and "needs MANAGE permission on registered model adreg-bottle" in err
    assert "production" not in get_model("bottle").aliases
    # ... and by the server itself when adreg is bypassed
    with pytest.raises(mlflow.exceptions.MlflowException, match="MANAGE"):
        mlflow.MlflowClient().set_registered_model_alias("adreg-bottle", "production", v)
    assert "production" not in get_model("bottle").aliases
    with pytest.raises(PermissionDenied, match="needs MANAGE"):
        lifecycle.rollback("bottle")
    assert versions.history("bottle") == []  # nothing changed, nothing recorded

    # the editor may promote to staging (no gate needed here: the registry call)
    promo = versions.promote("bottle", v, "staging", reason="trial on line 2")
    assert (promo.by, promo.identity) == ("editor", governance.AUTHENTICATED)

    # reader: list and load, but no promotion
    login(auth_server, "reader")
    assert [r["version"] for r in versions.list_versions()] == [int(v)]
    assert lifecycle.load_version_detector("bottle", v, device="cpu").threshold is not None
    with pytest.raises(PermissionDenied, match="needs EDIT permission.*user 'reader' has READ"):
        versions.promote("bottle", v, "staging")
    code, out, err = _cli(capsys, "grant", "bottle", "reader", "MANAGE")
    assert code == 1 and "reader" in err

    # admin grants the manager MANAGE (JSON output), the manager promotes through the gate
    login(auth_server, "admin")
    code, out, err = _cli(capsys, "grant", "bottle", "manager", "MANAGE", "--json")
    assert code == 0, err
    grants = json.loads(out)
    assert {(g["resource_type"], g["permission"]) for g in grants} == {("registered_model", "MANAGE"),
                                                                      ("experiment", "EDIT")}
    login(auth_server, "manager")
    assert governance.permission("registered_model", "adreg-bottle") == "MANAGE"
    code, out, err = _cli(capsys, "promote", "bottle", "--version", v, "--alias", "production", "--json",
                          "--reason", "signed off")
    assert code == 0, err
    result = json.loads(out)
    assert result["promoted"] and result["by"] == "manager" and result["gate"]["gate_passed"]
    assert str(get_model("bottle").aliases["production"]) == v  # str on a server, int on sqlite

    # the history names both users as authenticated identities, in order; --json parses
    code, out, err = _cli(capsys, "history", "bottle", "--json")
    events = json.loads(out)
    assert [(e["action"], e["alias"], e["by"], e["identity"]) for e in events] == [
        ("promote", "staging", "editor", "authenticated"), ("promote", "production", "manager", "authenticated")]
    assert events[1]["reason"] == "signed off" and events[1]["candidate_metrics"]["image_auroc"] > 0.9
    run = mlflow.MlflowClient().get_run(events[1]["run_id"])  # one run per event, searchable in the UI
    assert run.data.params["user"] == "manager" and run.data.tags["adreg.model_version"] == v
    assert run.data.metrics["candidate_image_auroc"] == pytest.approx(events[1]["candidate_metrics"]["image_auroc"])
    code, out, _ = _cli(capsys, "history", "bottle")
    assert "manager" in out and "editor" in out and "authenticated" in out


def test_an_event_cannot_be_signed_with_another_users_name(auth_server, editor_version):
    login(auth_server, "editor")
    versions.promote("bottle", editor_version, "staging", reason="again")
    exp_id = events.lifecycle_experiment_id("bottle")
    client = mlflow.MlflowClient()
    run = client.create_run(exp_id)
    with pytest.raises(mlflow.exceptions.MlflowException, match="authenticated user"):
        client.log_param(run.info.run_id, "user", "manager")
    client.log_param(run.info.run_id, "user", "editor")  # its own name is fine


def test_wrong_password_and_anonymous_are_refused(auth_server, capsys):
    auth_server["mp"].setenv("MLFLOW_TRACKING_USERNAME", "editor")
    auth_server["mp"].setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-000000")
    code, _, err = _cli(capsys, "models")
    assert code == 1 and "adreg: error:" in err and "Traceback" not in err
    with pytest.raises(PermissionDenied, match="refused the login of user 'editor'"):
        governance.identity()


def test_the_review_page_asks_for_the_store_login_and_labels_as_that_user(auth_server, editor_version, tmp_path,
                                                                          bottle_dir):
    """The review app over the authenticated server: a login is required and checked by the server; a label
    is recorded as the logged-in user (EDIT needed: a reader is refused, one line); a forged name is refused."""
    import shutil

    from adreg.integrity import sha256_file
    from adreg.registry import labels
    from adreg.review.app import build_app
    from tests.test_review_app import serve

    day = tmp_path / "bottle" / "flagged" / "20261201"
    day.mkdir(parents=True)
    img = day / f"120000-000000-v{editor_version}-0001.png"
    shutil.copyfile(bottle_dir / "test" / "broken_large" / "000.png", img)
    img.with_suffix(".json").write_text(json.dumps({"score": 1.0, "threshold": 0.5, "is_anomaly": True,
                                                    "model": "adreg-bottle", "version": editor_version}))
    rel = img.relative_to(tmp_path / "bottle").as_posix()
    body = {"category": "bottle", "rel": rel, "verdict": "defect", "sha256": sha256_file(img), "reviewer": "mallory"}
    login(auth_server, "admin")  # an editor's role covers the category's review experiment once granted
    governance.grant("bottle", "editor", "EDIT")
    login(auth_server, "editor")
    app = build_app(["bottle"], tmp_path, tracking_uri=auth_server["url"])
    with serve(app) as url:
        assert requests.get(url + "/", timeout=30).status_code == 401
        assert requests.get(url + "/api/status", auth=("editor", "wrong-password-000000"), timeout=60).status_code == 401
        editor = ("editor", USERS["editor"])
        r = requests.get(url + "/api/status", auth=editor, timeout=60)
        assert r.status_code == 200 and r.json()["user"] == "editor"
        r = requests.post(url + "/api/label", json=body, auth=("reader", USERS["reader"]), timeout=120)
        assert r.status_code == 403 and "needs EDIT" in r.text
        r = requests.post(url + "/api/label", json=body, auth=editor, timeout=120)
        assert r.status_code == 200, r.text
    login(auth_server, "editor")
    got = [lab for lab in labels.read_labels("bottle") if lab.sha256 == body["sha256"]]
    assert [(lab.user, lab.identity, lab.verdict) for lab in got] == [("editor", governance.AUTHENTICATED, "defect")]
    run = mlflow.MlflowClient().create_run(labels.reviews_experiment_id("bottle"))
    with pytest.raises(mlflow.exceptions.MlflowException, match="authenticated user"):
        mlflow.MlflowClient().log_param(run.info.run_id, "user", "manager")


def test_a_refused_overlay_is_drawn_once_the_user_may_read_the_model(auth_server, editor_version, tmp_path,
                                                                     bottle_dir):
    """The review page's overlay for a user the server refuses the model: a 403 naming the user (not a 422),
    and the refusal does not stick: once an admin grants READ, the same user's next request draws the map."""
    import io
    import shutil

    from mlflow.server import get_app_client
    from PIL import Image

    from adreg.review.app import build_app
    from tests.test_review_app import serve

    day = tmp_path / "bottle" / "flagged" / "20261201"
    day.mkdir(parents=True)
    img = day / f"120000-000000-v{editor_version}-0002.png"
    shutil.copyfile(bottle_dir / "test" / "broken_large" / "001.png", img)
    params = {"category": "bottle", "rel": img.relative_to(tmp_path / "bottle").as_posix()}
    auditor = ("auditor", "auditor-pass-0123456789")
    r = requests.post(f"{auth_server['url']}/api/2.0/mlflow/users/create",
                      json={"username": auditor[0], "password": auditor[1]}, auth=ADMIN, timeout=120)
    assert r.status_code == 200, r.text
    login(auth_server, "admin")
    get_app_client("basic-auth", tracking_uri=auth_server["url"]).grant_user_permission(
        auditor[0], "registered_model", "adreg-bottle", "DENY")
    with serve(build_app(["bottle"], tmp_path, tracking_uri=auth_server["url"])) as url:
        r = requests.get(url + "/api/overlay", params=params, auth=auditor, timeout=300)
        assert r.status_code == 403 and "user 'auditor'" in r.json()["detail"], r.text
        login(auth_server, "admin")
        governance.grant("bottle", auditor[0], "READ")
        r = requests.get(url + "/api/overlay", params=params, auth=auditor, timeout=300)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        assert Image.open(io.BytesIO(r.content)).size == (768, 768)
