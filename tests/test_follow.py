"""Serving follows the registry (issue 18) and bounded requests (issue 15, item 5), end to end.

ONE real `adreg serve bottle` (MLflow's scoring server on 127.0.0.1, a real sqlite store) is shared by
the tests of this module, in file order: capture, bounded requests, promote/rollback, shadow, a broken
version, 4 clients through 10 promote/rollback cycles, and finally a port already taken and SIGTERM to
the `adreg serve` process itself. Versions: v1 = the session's bottle fit, v2 = the same fit with a
doubled threshold (answers differ visibly), v3 = v1's artifacts with a corrupted state file.
"""

import copy
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from adreg.detector import Threshold
from adreg.images import encode_png_b64, file_to_b64
from adreg.pyfunc import status as server_status
from adreg.pyfunc.shadow import latest_summary
from adreg.registry import derive, lifecycle, tracking, versions
from tests.servers import adreg_server, post_images, wait_for

POLL = 1.0
SWAP_TARGET_S = 10.0  # promote -> first answer by the new version (README, issue 18)


os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _log_register(result) -> str:
    logged = derive.log_fit(result)
    return derive.register_version(logged, "bottle").version


def _broken_version(v1: str, tmp: Path) -> str:
    """v1's logged model with its state file overwritten by junk (and no integrity manifest, so it is
    the load itself that fails), logged as a complete run and registered."""
    local = Path(mlflow.artifacts.download_artifacts(f"models:/adreg-bottle/{v1}", dst_path=str(tmp)))
    state = next(local.rglob("detector/state.safetensors"))
    state.write_bytes(b"this is not a safetensors file")
    (state.parent / "integrity.json").unlink(missing_ok=True)
    with mlflow.start_run(experiment_id=tracking.fit_experiment_id("bottle"), run_name="broken-artifact") as run:
        mlflow.log_artifacts(str(local), "model")
        mlflow.set_tag("adreg.model_complete", "true")
    return versions.register(f"runs:/{run.info.run_id}/model", run.info.run_id, "bottle")


@pytest.fixture(scope="module")
def store(bottle_fit, tmp_path_factory):
    root = tmp_path_factory.mktemp("follow-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracking.configure(uri)
    lean = dataclasses.replace(bottle_fit, evaluation=None)  # no report pictures: faster to log
    v1 = _log_register(lean)
    det2 = copy.copy(bottle_fit.detector)
    det2.threshold = Threshold(bottle_fit.detector.threshold.value * 2, "test: doubled")
    v2 = _log_register(dataclasses.replace(lean, detector=det2))
    v3 = _broken_version(v1, root / "broken")
    versions.promote("bottle", v1, "production")
    yield {"uri": uri, "v1": v1, "v2": v2, "v3": v3, "t1": bottle_fit.detector.threshold.value,
           "t2": det2.threshold.value}
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    root = tmp_path_factory.mktemp("follow-server")
    with adreg_server(store["uri"], "bottle", root / "serve.log", "--poll-seconds", str(POLL),
                      "--shadow", "staging", "--capture", str(root / "capture"), "--capture-rate", "0.5",
                      "--capture-max-mib", "1.5", "--max-rows", "24", "--max-request-mib", "8",
                      server=True) as srv:
        srv.capture_dir = root / "capture"
        yield srv


@pytest.fixture(scope="module")
def images(bottle_dir):
    good = [file_to_b64(p) for p in sorted((bottle_dir / "test" / "good").glob("*.png"))[:4]]
    bad = [file_to_b64(p) for p in sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:4]]
    return {"good": good, "bad": bad}


@pytest.fixture()
def client(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    tracking.configure(store["uri"])
    return mlflow.MlflowClient()


def _rows(url, imgs):
    resp = post_images(url, imgs)
    assert resp.status_code == 200, resp.text[:300]
    return resp.json()["predictions"]


def _entry(client) -> dict:
    entries = server_status.servers(client.get_registered_model("adreg-bottle"))
    return entries[0] if entries else {}


def _small_pngs(bottle_dir, n: int) -> list[str]:
    out = []
    for p in sorted((bottle_dir / "train" / "good").glob("*.png"))[:n]:
        img = Image.open(p).convert("RGB")
        img.thumbnail((96, 96))
        out.append(encode_png_b64(img))
    return out


def test_capture_keeps_the_rate_and_the_budget(server, bottle_dir, images):
    """First requests of the server: rate 0.5 keeps exactly half; the 1.5 MiB budget drops the oldest."""
    small = _small_pngs(bottle_dir, 20)
    rows = _rows(server.url, small)
    assert all(r["error"] == "" for r in rows)
    cap = server.capture_dir / "bottle"

    def captured():
        return sorted(p for p in cap.rglob("*.png"))

    wait_for(lambda: len(captured()) == 10, 10, what="10 captured images")
    first = captured()
    sidecar = json.loads(first[0].with_suffix(".json").read_text())
    assert {"score", "threshold", "is_anomaly", "model", "version", "alias", "at"} <= set(sidecar)
    assert sidecar["model"] == "adreg-bottle" and sidecar["alias"] == "production"
    # the review signals are computed for the sampled rows only, each row's own (half of each request here)
    sides = [json.loads(p.with_suffix(".json").read_text()) for p in first]
    assert all({"novelty", "embedding", "normal_percentile"} <= set(x) for x in sides)
    assert len({x["embedding"] for x in sides}) == len(sides)
    assert all(p.parent.parent.name in ("ok", "flagged") for p in first)
    assert (Image.open(first[0]).size[0]) <= 96  # the image as it was sent
    # 8 full-size images (~0.5 MB each): 4 sampled; the budget keeps the newest, oldest (small) go first
    _rows(server.url, images["good"] + images["bad"])
    time.sleep(1.5)
    total = sum(p.stat().st_size for p in cap.rglob("*") if p.is_file())
    assert total <= 1.5 * 2 ** 20
    left = captured()
    assert not set(left) & set(first[:2])  # the oldest were dropped
    assert any(p.stat().st_size > 100_000 for p in left)  # the newest full-size ones kept
    flagged = [json.loads(p.with_suffix(".json").read_text()) for p in cap.glob("flagged/*/*.png")]
    assert all(f["is_anomaly"] for f in flagged)


def test_rows_name_their_version_and_requests_are_bounded(server, store, images):
    rows = _rows(server.url, images["good"][:1] + images["bad"][:1])
    assert [(r["model_name"], r["model_version"], r["model_alias"]) for r in rows] == \
        [("adreg-bottle", store["v1"], "production")] * 2
    assert rows[0]["threshold"] == pytest.approx(store["t1"])
    # too many rows: refused before decoding, with a sentence
    resp = post_images(server.url, ["x"] * 25)
    assert resp.status_code == 400 and "too many rows: 25" in resp.json()["message"]
    # a body over max_request_mib (10 MiB of junk text, limit 8): 413, one sentence, no echo of the input
    resp = post_images(server.url, ["A" * (10 * 2 ** 20)])
    assert resp.status_code == 413, resp.text[:200]
    body = resp.json()
    assert body["message"].startswith("request too large: 10.0 MiB") and len(resp.text) < 500
    # a request without the image column: a plain 400 sentence, no pandas repr
    resp = post_images(server.url, ["x"], columns=("img",))
    assert resp.status_code == 400
    assert resp.json()["message"].startswith("the request has no 'image' column")
    assert "Failed to predict" not in resp.text and "DataFrame" not in resp.text


def test_promote_and_rollback_reach_the_running_server(server, store, images, client):
    before = _rows(server.url, images["bad"][:1])[0]
    versions.promote("bottle", store["v2"], "production", reason="test")
    t0 = time.monotonic()
    after = wait_for(lambda: next((r for r in _rows(server.url, images["bad"][:1])
                                   if r["model_version"] == store["v2"]), None), 30, what="version 2 answering")
    seconds = time.monotonic() - t0
    assert seconds <= SWAP_TARGET_S, f"promote -> first answer by the new version took {seconds:.1f} s"
    assert after["threshold"] == pytest.approx(store["t2"]) and after["score"] == pytest.approx(before["score"])
    entry = wait_for(lambda: (e := _entry(client)).get("version") == store["v2"] and e, 15, what="status v2")
    assert entry["last_swap"]["from"] == store["v1"] and not entry["stale"]
    out = subprocess.run([sys.executable, "-m", "adreg.cli", "--tracking-uri", store["uri"], "status", "bottle"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and f"production = {store['v2']}" in out.stdout and "live" in out.stdout
    lifecycle.rollback("bottle", "production", reason="test rollback")
    t0 = time.monotonic()
    wait_for(lambda: _rows(server.url, images["bad"][:1])[0]["model_version"] == store["v1"], 30,
             what="rollback to version 1 answering")
    assert time.monotonic() - t0 <= SWAP_TARGET_S


def test_shadow_is_logged_and_never_changes_production(server, store, images, client):
    batch = images["good"] + images["bad"]
    without = _rows(server.url, batch)
    versions.promote("bottle", store["v2"], "staging", reason="shadow test")
    wait_for(lambda: (_entry(client).get("shadow") or {}).get("version") == store["v2"], 20, what="shadow loaded")
    with_shadow = []
    for _ in range(4):  # 32 rows: one logged batch
        with_shadow = _rows(server.url, batch)
        assert with_shadow == without  # identical answers, byte for byte after JSON
    summary = wait_for(lambda: (s := latest_summary("bottle", store["v2"], client)) and
                       s.get("shadow_rows", 0) >= 32 and s, 30, what="shadow comparison logged")
    assert summary["production_version"] == store["v1"]
    t1, t2 = store["t1"], store["t2"]
    flags_p = sum(r["score"] > t1 for r in without) / len(without)
    flags_c = sum(r["score"] > t2 for r in without) / len(without)
    assert summary["flag_rate_production"] == pytest.approx(flags_p)
    assert summary["flag_rate_candidate"] == pytest.approx(flags_c)
    assert summary["disagreements"] == 4 * sum(t1 < r["score"] <= t2 for r in without)
    assert summary["score_correlation"] == pytest.approx(1.0)  # same state, other threshold
    run = client.get_run(summary["run_id"])
    assert run.data.tags["adreg.shadow.candidate_version"] == store["v2"]
    assert client.get_model_version("adreg-bottle", store["v2"]).tags["adreg.shadow.candidate_run"] == run.info.run_id
    client.delete_registered_model_alias("adreg-bottle", "staging")
    wait_for(lambda: _entry(client).get("shadow") is None and _entry(client).get("version"), 20, what="shadow off")


def test_a_broken_version_is_refused_and_the_old_one_keeps_answering(server, store, images, client):
    versions.promote("bottle", store["v3"], "production", reason="broken on purpose")
    entry = wait_for(lambda: ((e := _entry(client)).get("last_failure") or {}).get("version") == store["v3"] and e,
                     30, what="the failed swap reported")
    assert entry["version"] == store["v1"] and entry["last_failure"]["reason"]
    assert all(r["model_version"] == store["v1"] for r in _rows(server.url, images["bad"][:2]))
    out = subprocess.run([sys.executable, "-m", "adreg.cli", "--tracking-uri", store["uri"], "status", "bottle"],
                         capture_output=True, text=True, timeout=120)
    assert f"but version {store['v3']} was refused" in out.stdout, out.stdout
    lifecycle.rollback("bottle", "production", reason="back from the broken one")
    assert str(client.get_model_version_by_alias("adreg-bottle", "production").version) == store["v1"]


def test_four_clients_through_ten_promote_rollback_cycles_lose_nothing(server, store, images):
    stop = threading.Event()
    failures, seen, counts = [], set(), [0]
    lock = threading.Lock()

    def client_loop(k):
        import requests

        session = requests.Session()
        body = {"dataframe_split": {"columns": ["image"], "data": [[images["good"][k % 4]]]}}
        while not stop.is_set():
            try:
                resp = session.post(f"{server.url}/invocations", json=body, timeout=60)
                row = resp.json()["predictions"][0] if resp.status_code == 200 else None
                with lock:
                    counts[0] += 1
                    if row is None or row["error"]:
                        failures.append(resp.text[:200])
                    else:
                        seen.add(row["model_version"])
            except Exception as exc:  # noqa: BLE001 - every failure counts
                with lock:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(10):
            for version in (store["v2"], store["v1"]):
                versions.promote("bottle", version, "production", reason="cycle")
                wait_for(lambda: _rows(server.url, images["bad"][:1])[0]["model_version"] == version, 30,
                         interval=0.1, what=f"version {version}")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == [] and counts[0] > 40
    assert seen == {store["v1"], store["v2"]}


def test_port_in_use_and_sigterm_stop_everything(server, store, client):
    """Last: a second server on the same port is a one-line error; SIGTERM to `adreg serve` (its own
    pid, not the group) leaves nothing listening and nothing running."""
    out = subprocess.run([sys.executable, "-m", "adreg.cli", "--tracking-uri", store["uri"], "serve", "bottle",
                          "--port", str(server.port)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and f"port {server.port}" in out.stderr, out.stderr
    assert server.listening() and len(server.pids()) >= 2
    import signal

    server.terminate_cli(signal.SIGTERM)
    wait_for(lambda: not server.listening() and not server.pids(), 30, what="nothing left of the server")
    entry = wait_for(lambda: (e := _entry(client)).get("stale") and e, 10, what="the server reported stopped")
    assert entry["state"] == "stopped"
