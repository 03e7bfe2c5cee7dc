"""Exported backbone runtimes (ONNX Runtime, OpenVINO): same features and scores as torch, dynamic batch,
clear errors, and ``adreg export`` / ``fit --export`` versions served through ``mlflow.pyfunc``."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from adreg.backbones.export import ExportedBackbone, export_backbone, read_manifest
from adreg.detector import AnomalyDetector
from adreg.errors import BackboneError, ConfigError
from adreg.images import load_image

#: scores of an exported runtime vs torch: relative tolerance (features differ by ~2e-6 relative)
SCORE_RTOL = 1e-4


def _images(result, n_good=3, n_bad=4):
    good = [s for s in result.data.test if s.label == 0][:n_good]
    bad = [s for s in result.data.test if s.label == 1][:n_bad]
    return [load_image(s.path) for s in good + bad]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """``threads`` sets torch's thread count process-wide (as a server wants); give the others theirs back."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported_dir(bottle_fit, tmp_path_factory):
    """bottle_fit's detector saved with its backbone exported (ONNX + OpenVINO IR)."""
    folder = bottle_fit.detector.save(tmp_path_factory.mktemp("exported") / "detector")
    assert export_backbone(bottle_fit.detector.backbone, folder, "openvino") == "openvino"
    return folder


@pytest.fixture(scope="module")
def images(bottle_fit):
    return _images(bottle_fit)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_exported_runtime_matches_torch(exported_dir, bottle_fit, images, runtime):
    manifest = read_manifest(exported_dir)
    assert manifest["runtime"] == "openvino" and manifest["max_relative_error"] < 1e-4
    torch_det = AnomalyDetector.load(exported_dir, device="cpu", runtime="torch")
    det = AnomalyDetector.load(exported_dir, runtime=runtime, threads=2)
    assert isinstance(det.backbone, ExportedBackbone) and det.backbone.runtime == runtime
    assert det.backbone.spec() == torch_det.backbone.spec() and det.backbone.image_size == 320
    # features: batch 5 through the exported graph equals torch, and equals batch 1 (dynamic batch)
    want = torch_det.backbone.extract(images[:5], batch_size=5)
    got5 = det.backbone.extract(images[:5], batch_size=5)
    got1 = det.backbone.extract(images[:5], batch_size=1)
    assert got5.grid == want.grid
    for a, b, c in zip(got5.patches + got5.globals, got1.patches + got1.globals, want.patches + want.globals):
        scale = float(c.abs().max())
        assert float((a - c).abs().max()) / scale < 1e-4
        assert float((a - b).abs().max()) / scale < 1e-5
    # scores and maps: what the served model returns
    ref = torch_det.predict(images)
    pred = det.predict(images)
    np.testing.assert_allclose(pred.scores, ref.scores, rtol=SCORE_RTOL)
    np.testing.assert_allclose(pred.maps, ref.maps, rtol=0, atol=SCORE_RTOL * float(np.abs(ref.maps).max()))
    assert (pred.scores > det.threshold.value).tolist() == (ref.scores > det.threshold.value).tolist()
    # the folder's default runtime is the one it was exported for; saving keeps the export
    assert isinstance(AnomalyDetector.load(exported_dir).backbone, ExportedBackbone)
    resaved = det.save(exported_dir.parent / f"resaved-{runtime}")
    assert read_manifest(resaved)["runtime"] == "openvino"
    np.testing.assert_allclose(AnomalyDetector.load(resaved, runtime=runtime).predict(images[:2]).scores,
                               ref.scores[:2], rtol=SCORE_RTOL)


def test_served_loader_shares_one_exported_backbone(exported_dir, images):
    """The router's loader (``load_served`` with one ``backbones`` dict): categories on the same backbone
    share one runtime instance, and the model_config ``runtime``/``threads`` reach it."""
    from adreg.pyfunc.follow import load_served
    from adreg.pyfunc.served import DEFAULT_MODEL_CONFIG

    cfg = {**DEFAULT_MODEL_CONFIG, "runtime": "openvino", "threads": 2}
    backbones: dict = {}
    a, b = (load_served(exported_dir, cfg, backbones, f"adreg-c{i}") for i in range(2))
    assert a.detector.backbone is b.detector.backbone and len(backbones) == 1
    assert a.detector.backbone.runtime == "openvino" and a.detector.backbone.threads == 2
    torch_one = load_served(exported_dir, {**cfg, "runtime": "torch"}, backbones, "adreg-c3")
    assert not isinstance(torch_one.detector.backbone, ExportedBackbone) and len(backbones) == 2


def test_runtime_errors_are_clear(exported_dir, bottle_fit, tmp_path, monkeypatch):
    plain = bottle_fit.detector.save(tmp_path / "plain")
    with pytest.raises(ConfigError, match="no.*exported backbone.*adreg export"):
        AnomalyDetector.load(plain, runtime="openvino")
    with pytest.raises(ConfigError, match="runtime must be one of"):
        AnomalyDetector.load(exported_dir, runtime="tensorrt")
    with pytest.raises(ConfigError, match="runs on the CPU"):
        AnomalyDetector.load(exported_dir, runtime="onnxruntime", device="cuda")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the package were not installed
    with pytest.raises(BackboneError, match="'onnxruntime' is not installed.*pip install onnxruntime"):
        AnomalyDetector.load(exported_dir, runtime="onnxruntime")
    from adreg.cli import main

    assert main(["--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "export", "bottle", "--version", "1",
                 "--runtime", "onnxruntime"]) == 2


def test_export_command_registers_a_lineage_version(bottle_fit, tracking_uri, tmp_path, capsys):
    import mlflow
    import pandas as pd

    from adreg.cli import main
    from adreg.images import file_to_b64
    from adreg.registry import derive, lifecycle

    logged = derive.log_fit(bottle_fit)
    v1 = derive.register_version(logged, "bottle", bottle_fit.metrics()).version
    assert main(["--tracking-uri", tracking_uri, "export", "bottle", "--version", v1, "--runtime", "openvino"]) == 0
    assert "version 2" in capsys.readouterr().out
    client = mlflow.MlflowClient()
    mv = client.get_model_version("adreg-bottle", "2")
    assert mv.tags["adreg.source.version"] == v1 and mv.tags["adreg.source.run_id"] == logged.run_id
    assert mv.tags["adreg.runtime"] == "openvino"
    run = client.get_run(mv.run_id)
    assert run.data.tags["adreg.source.version"] == v1 and run.data.params["runtime"] == "openvino"
    # fit --export: the exported backbone is logged with the fit itself
    fitted = derive.log_fit(bottle_fit, export="onnx")
    v3 = derive.register_version(fitted, "bottle", bottle_fit.metrics()).version

    test = bottle_fit.data.test
    samples = [s for s in test if s.label == 1][:2] + [s for s in test if s.label == 0][:1]
    frame = pd.DataFrame({"image": [file_to_b64(s.path) for s in samples]})
    base = mlflow.pyfunc.load_model(f"models:/adreg-bottle/{v1}").predict(frame)
    assert (base["error"] == "").all()
    for version, config, runtime in (("2", None, "openvino"), ("2", {"runtime": "onnxruntime", "threads": 2},
                                                                "onnxruntime"), (v3, None, "onnxruntime")):
        model = mlflow.pyfunc.load_model(f"models:/adreg-bottle/{version}", model_config=config)
        assert model.unwrap_python_model().detector.backbone.runtime == runtime
        out = model.predict(frame)
        np.testing.assert_allclose(out["score"].astype(float), base["score"].astype(float), rtol=SCORE_RTOL)
        assert out["is_anomaly"].tolist() == base["is_anomaly"].tolist()
    # requirements name the runtime only where it is used
    reqs = {v: open(mlflow.artifacts.download_artifacts(f"models:/adreg-bottle/{v}/requirements.txt")).read()
            for v in (v1, "2", v3)}
    assert "openvino" not in reqs[v1] and "onnxruntime" not in reqs[v1]
    assert "openvino==" in reqs["2"] and "onnxruntime==" in reqs[v3]
    # the gate's loader evaluates the exported version through its runtime, on the source's evaluation set
    assert isinstance(lifecycle.load_version_detector("bottle", "2").backbone, ExportedBackbone)
    samples, _ = lifecycle.logged_eval_set("bottle", "2")
    assert len(samples) == len(bottle_fit.data.test)
