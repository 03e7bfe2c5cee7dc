"""docs/guides/own-product.md as a user runs it: the page's marked bash blocks, as written, in order, in a
fresh folder with a throwaway sqlite store (the default ./adreg-store of that folder).

A block is marked by the HTML comment on the line before its fence:

* ``<!-- tutorial: run -->``: run with ``bash -e``; it must exit 0 (``<!-- tutorial: run, exit N -->``: N);
* ``<!-- tutorial: server -->``: started in its own process group, waited for on ``/ping``, stopped by the test.

The only change made to a block is the port: the page's 5001 becomes a free port of 127.0.0.1. Blocks
without a mark (the browser review page) are not run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adreg.server import stop_process_group, wait_http
from serving.process import free_port
from tests.conftest import DATA_ROOT

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "guides" / "own-product.md"
PAGE_PORT = "5001"
BLOCK = re.compile(r"^<!-- tutorial: (run|server)(?:, exit (\d+))? -->\n```bash\n(.*?)\n```", re.S | re.M)
RESPONSE_COLUMNS = {"score", "is_anomaly", "threshold", "anomaly_map", "error", "model_name", "model_version",
                    "model_alias", "normal_percentile"}


def tutorial_blocks(text: str) -> list[tuple[str, int, str]]:
    """(kind, expected exit code, bash source) of every marked block of the page, in order."""
    return [(kind, int(code or 0), body) for kind, code, body in BLOCK.findall(text)]


def _env(tmp_path: Path) -> dict:
    """The user's environment in a fresh folder: no store configured (so ./adreg-store), `adreg` and `python`
    on PATH resolving to this interpreter and checkout, one torch thread (the CI machines are shared)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, argv in (("adreg", f'"{sys.executable}" -m adreg.cli'), ("python", f'"{sys.executable}"')):
        shim = bin_dir / name
        shim.write_text(f"#!/bin/sh\nexec {argv} \"$@\"\n")
        shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ADREG_HOME", "MLFLOW_REGISTRY_URI")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(ROOT),
               ADREG_DATA_ROOT=str(Path(DATA_ROOT).resolve()), ADREG_USER="qe-anna", ADREG_PROGRESS="0",
               MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")
    return env


def _run(body: str, cwd: Path, env: dict, expect: int, timeout: float = 600) -> str:
    r = subprocess.run(["bash", "-e", "-c", body], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == expect, f"{body}\nexit {r.returncode} (expected {expect})\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def _page_responses(text: str) -> list[dict]:
    """The responses the page shows (its ```json blocks), in order."""
    return [json.loads(m) for m in re.findall(r"```json\n(.*?)\n```", text, re.S)]


def _same_as_page(shown: dict, rows: list[dict]) -> None:
    """The page shows the columns, versions and verdicts of the live response (scores may move a little)."""
    assert [set(r) for r in shown["predictions"]] == [set(r) for r in rows]
    assert [(r["model_version"], r["is_anomaly"]) for r in shown["predictions"]] == \
        [(r["model_version"], r["is_anomaly"]) for r in rows]
    for a, b in zip(shown["predictions"], rows):
        assert a["score"] == pytest.approx(b["score"], rel=0.01) and a["threshold"] == pytest.approx(b["threshold"], rel=0.01)


def _check_response(out: str, version: str) -> list[dict]:
    rows = json.loads(out)["predictions"]
    assert len(rows) == 2
    for row in rows:
        assert set(row) == RESPONSE_COLUMNS
        assert (row["model_name"], row["model_version"], row["model_alias"]) == ("adreg-widget", version, "production")
        assert row["error"] == "" and row["anomaly_map"] == ""
        assert 0 <= row["normal_percentile"] <= 100
        assert row["is_anomaly"] == (row["score"] > row["threshold"])
    good, broken = rows
    assert good["score"] < broken["score"] and good["normal_percentile"] <= broken["normal_percentile"]
    assert good["threshold"] == broken["threshold"]
    return rows


def _serve(body: str, cwd: Path, env: dict, url: str, log_path: Path) -> subprocess.Popen:
    """Start the server block in its own process group; return once /ping answers."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", "-c", body], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    if wait_http(f"{url}/ping", 240, proc):
        return proc
    if proc.poll() is not None:
        pytest.fail("the server exited:\n" + log_path.read_text()[-3000:])
    stop_process_group(proc)
    pytest.fail("the server did not come up:\n" + log_path.read_text()[-3000:])


def test_tutorial_runs_as_written(tmp_path):
    if not (DATA_ROOT / "mvtec_ad" / "bottle" / "train" / "good").is_dir():
        pytest.fail(f"the real MVTec bottle data is expected under {DATA_ROOT} (set ADREG_DATA_ROOT)")
    text = PAGE.read_text()
    blocks = tutorial_blocks(text)
    assert [kind for kind, _, _ in blocks].count("server") == 1 and len(blocks) >= 10, blocks
    work = tmp_path / "work"
    work.mkdir()
    env = _env(tmp_path)
    port = str(free_port())
    url = f"http://127.0.0.1:{port}"
    out: dict[str, str] = {}  # the first line of each block -> what it printed
    server = None
    try:
        for kind, expect, body in blocks:
            body = body.replace(f"--port {PAGE_PORT}", f"--port {port}").replace(f":{PAGE_PORT}/", f":{port}/")
            first = body.splitlines()[0]
            if kind == "server":
                assert f"--port {port}" in body, body
                server = _serve(body, work, env, url, tmp_path / "serve.log")
                out[first] = (tmp_path / "serve.log").read_text()
                continue
            printed = _run(body, work, env, expect)
            if first.startswith("find capture"):  # captures are written in the background: wait for all 10
                deadline = time.monotonic() + 60
                while len(printed.split()) < 10 and time.monotonic() < deadline:
                    time.sleep(0.5)
                    printed = _run(body, work, env, expect)
            if first.startswith("curl") and "registered adreg-widget version 2" in "".join(out.values()):
                deadline = time.monotonic() + 90  # the server follows the alias: version 2 within seconds
                while json.loads(printed)["predictions"][0]["model_version"] != "2":
                    assert time.monotonic() < deadline, "the server did not swap to version 2:\n" + printed
                    time.sleep(1)
                    printed = _run(body, work, env, expect)
            out[first] = printed
    finally:
        if server is not None:
            stop_process_group(server)

    def step(prefix: str) -> str:
        hits = [v for k, v in out.items() if k.startswith(prefix)]
        assert len(hits) == 1, (prefix, list(out))
        return hits[0]

    # the folder: 30 training goods, 10 + 10 test images with 10 masks, 10 parts for the line
    assert len(list((work / "widget" / "train" / "good").glob("*.png"))) == 30
    assert len(list((work / "widget" / "test" / "broken").glob("*_mask.png"))) == 10
    assert len(list((work / "line").glob("*.png"))) == 10
    fit = step("adreg fit --category widget --train-dir widget --k-shot")
    assert "fitted subspace for 'widget': 1 shot(s)" in fit and "from 20 held-out good training images" in fit
    assert "registered adreg-widget version 1" in fit and (work / "adreg-store" / "mlflow.db").is_file()
    gate = step("adreg promote widget --version 1")
    assert "10 good, 10 defective images (10 with masks)" in gate
    assert "production -> adreg-widget version 1 (new alias)" in gate
    assert "--promote needs evidence for the promotion gate" in step("adreg fit --category widget --train-dir widget/train/good")
    assert "serving adreg-widget@production" in step("adreg serve widget")
    # the response: every column the page shows, the version that answered, the score's scale
    shown = _page_responses(text)
    assert len(shown) == 2
    first = _check_response(step("printf"), "1")
    _same_as_page(shown[0], first)
    captured = step("find capture").split()
    assert len(captured) == 10 and all(p.startswith("capture/widget/") for p in captured)
    assert sum("/flagged/" in p for p in captured) == 1  # the page: broken-001 flagged, broken-000 missed
    labels = step("adreg label widget")
    assert labels.count(" good by qe-anna") == 8 and labels.count(" defect by qe-anna") == 2
    assert "production set (2 reviewed defects, 0 with a drawn region, 4 reviewed goods" in labels
    update = step("adreg update widget --from-reviews")
    assert "training images 1 -> 5 (+4)" in update
    assert "registered adreg-widget version 2 (parent: version 1)" in update
    assert "promoted version 2 to 'production'" in update
    second = _check_response(step("curl"), "2")
    _same_as_page(shown[1], second)
    assert second[0]["score"] != first[0]["score"]  # grown with the reviewed goods: another model answers
    history = step("adreg history widget")
    assert re.search(r"promote\s+production\s+1\s", history) and re.search(r"promote\s+production\s+2\s+1\s", history)
