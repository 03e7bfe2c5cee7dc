"""adreg against a real `mlflow server` (sqlite backend, proxied artifacts) over http://127.0.0.1."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from adreg.images import file_to_b64, load_image
from adreg.registry import derive, lifecycle, tracking
from adreg.server import stop_process_group, wait_http
from serving.process import free_port


@pytest.fixture()
def mlflow_server(tmp_path, monkeypatch):
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", (tmp_path / "server-artifacts").as_uri(), "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true",
                                     MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))  # adreg runs no server jobs
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_http(f"{url}/health", 120, proc):
            what = "exited" if proc.poll() is not None else "did not come up"
            pytest.fail(f"mlflow server {what}:\n" + (tmp_path / "server.log").read_text()[-3000:])
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        tracking.configure(url)
        yield url, tmp_path / "server-artifacts"
    finally:
        stop_process_group(proc)
        log.close()


def test_fit_register_gate_and_load_through_a_tracking_server(mlflow_server, bottle_fit, bottle_dir):
    url, artifacts = mlflow_server
    logged = derive.log_fit(bottle_fit)
    version = derive.register_version(logged, "bottle", bottle_fit.metrics()).version
    promo, report = lifecycle.promote_gated("bottle", version, "production")  # gate re-evaluates via the server
    assert promo is not None and report.passed
    assert report.candidate["image_auroc"] == pytest.approx(bottle_fit.evaluation.metrics["image_auroc"])
    assert any(p.name == "state.safetensors" for p in Path(artifacts).rglob("*")), "artifacts proxied to the server"
    model = mlflow.pyfunc.load_model("models:/adreg-bottle@production", model_config={"device": "cpu"})
    img = bottle_dir / "test" / "broken_small" / "000.png"
    out = model.predict(pd.DataFrame({"image": [file_to_b64(img)]}))
    expected = bottle_fit.detector.predict([load_image(img)]).scores[0]
    assert out.loc[0, "score"] == pytest.approx(float(expected), rel=1e-5)
