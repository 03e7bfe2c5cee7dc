"""`adreg drift`: production goods pass, defects are drift (exit 1), a monitoring run is logged and linked.

Uses the session's registered 1-shot bottle model (``use_registered``): its reference good scores are the
20 held-out training images logged at fit.
"""

from __future__ import annotations

import shutil

import mlflow
import pytest

from adreg.cli import main as cli_main
from adreg.registry import lineage


@pytest.fixture()
def unseen_goods(use_registered, bottle_dir, tmp_path):
    """12 good training images the model neither learned from nor calibrated on, as a capture folder."""
    result = use_registered["result"]
    reference = mlflow.artifacts.load_dict(f"runs:/{use_registered['logged'].run_id}/{lineage.REFERENCE_ARTIFACT}")
    used = {str(p) for p in result.shots} | {r["path"] for r in reference["images"]}
    goods = [p for p in sorted((bottle_dir / "train" / "good").glob("*.png")) if str(p) not in used][-12:]
    day = tmp_path / "capture" / "bottle" / "ok" / "20261125"
    day.mkdir(parents=True)
    for p in goods:
        shutil.copy(p, day / p.name)
        (day / f"{p.stem}.json").write_text("{}")  # sidecars are ignored
    return tmp_path / "capture"


def test_goods_are_no_drift_and_the_run_is_linked(use_registered, unseen_goods, capsys):
    assert cli_main(["drift", "bottle", str(unseen_goods)]) == 0
    out = capsys.readouterr().out
    assert "no drift" in out and "12 image(s) against 20 reference good score(s)" in out
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name("adreg-bottle-monitoring")
    run = client.search_runs([exp.experiment_id], order_by=["start_time DESC"], max_results=1)[0]
    assert run.data.tags["adreg.model_name"] == "adreg-bottle"
    assert run.data.tags["adreg.model_version"] == use_registered["version"]
    assert run.data.tags["adreg.model_run_id"] == use_registered["logged"].run_id
    assert run.data.tags["adreg.drift.verdict"] == "no drift" and run.data.metrics["drift"] == 0
    assert run.data.metrics["n_images"] == 12
    assert {a.path for a in client.list_artifacts(run.info.run_id, "drift")} >= {
        "drift/histogram.png", "drift/report.json", "drift/scores.csv"}
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["bottle-production"]
    last = client.get_model_version("adreg-bottle", use_registered["version"]).tags["adreg.drift.last"]
    assert run.info.run_id in last


def test_defects_are_drift_exit_1(use_registered, bottle_dir, tmp_path, capsys):
    folder = tmp_path / "recent"
    folder.mkdir()
    for p in sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:10]:
        shutil.copy(p, folder / p.name)
    (folder / "torn.png").write_bytes(b"not an image")
    assert cli_main(["drift", "bottle", str(folder), "--no-log"]) == 1
    out = capsys.readouterr().out
    assert "DRIFT" in out and "above the threshold" in out and "skipped unreadable" in out
    assert "adreg update bottle" in out  # what to do next


def test_drift_bad_inputs(use_registered, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["drift", "bottle", str(tmp_path / "empty")]) == 2
    assert "no images found" in capsys.readouterr().err
    assert cli_main(["drift", "bottle", str(tmp_path), "--alias", "nope"]) == 2
    assert "no alias 'nope'" in capsys.readouterr().err
    assert cli_main(["drift", "bottle", str(tmp_path), "--p-value", "2"]) == 2
