"""The public Python API (``import adreg``) end to end, with no CLI involved: fit -> register -> gated promote
-> load -> predict on real bottle images in a real sqlite store; in-process predict of a frame larger than a
served request may be."""

import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

import adreg
from adreg.errors import ConfigError, NotFoundError
from adreg.images import file_to_b64, load_image


def test_import_adreg_is_light_and_documented():
    """``import adreg`` loads neither torch nor mlflow nor matplotlib's pyplot, and sets no environment."""
    code = ("import os, sys; before = dict(os.environ); import adreg; help(adreg.fit); "
            "print(sorted(m for m in ('torch', 'mlflow', 'matplotlib.pyplot') if m in sys.modules)); "
            "print(dict(os.environ) == before)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-2:] == ["[]", "True"]
    assert "Returns:" in r.stdout and "Raises:" in r.stdout and "FitOutcome" in r.stdout


def test_fit_register_promote_load_predict_through_the_api(bottle_dir, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = adreg.fit("bottle", train_dir=str(bottle_dir), k_shot=1, seed=0, device="cpu", register=True,
                    promote="production", tracking_uri=uri, show_progress=False)
    assert (out.version, out.registered_name, out.promoted) == ("1", "adreg-bottle", True)
    assert out.gate.passed and out.promotion.alias == "production"
    assert out.metrics["image_auroc"] > 0.9 and out.tracking_uri == uri
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("adreg-bottle", "production").version) == "1"
    run = client.get_run(out.run_id)
    assert run.data.tags["adreg.model_complete"] == "true"
    # the image sets are MLflow dataset inputs: training, calibration (validation) and evaluation, with digests
    from adreg.registry.lineage import image_set_digest

    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
              for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "evaluation"}
    assert inputs["evaluation"].digest == image_set_digest([s.path for s in out.result.data.test])
    assert inputs["validation"].digest == image_set_digest([c["path"] for c in out.result.calibration])

    # load: the registered detector, verified, scores like the fitted one
    tests = sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:2] + \
        sorted((bottle_dir / "test" / "good").glob("*.png"))[:1]
    det = adreg.load("bottle", tracking_uri=uri)
    want = out.detector.predict([load_image(p) for p in tests]).scores
    np.testing.assert_allclose(det.predict([load_image(p) for p in tests]).scores, want, rtol=1e-5)
    assert adreg.resolve("bottle", tracking_uri=uri).uri == "models:/adreg-bottle/1"

    # predict: the served model in-process, one row per file, a bad file fails alone
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    pred = adreg.predict("bottle", [*tests, bad], save_maps=str(tmp_path / "maps"), tracking_uri=uri)
    assert [r["model_version"] for r in pred.rows] == ["1"] * 4 and pred.failed == 1
    np.testing.assert_allclose([r["score"] for r in pred.rows[:3]], want, rtol=1e-4)
    assert pred.rows[3]["error"] and pred.rows[3]["score"] is None and pred.rows[3]["normal_percentile"] is None
    np.testing.assert_allclose([r["normal_percentile"] for r in pred.rows[:3]], det.normal_percentile(want), atol=1e-9)
    assert all(Path(r["map"]).is_file() for r in pred.rows[:3])

    # promote through the gate: the same version again is a no-op promotion; a refusal is a result
    again = adreg.promote("bottle", "1", "staging", tracking_uri=uri)
    assert again.promoted and not again.forced
    strict = adreg.promote("bottle", "1", "strict", min_pixel_auroc=0.9999, tracking_uri=uri)  # whole interval below
    assert strict.promoted is False and any("below the floor" in f for f in strict.gate.failures)
    events = adreg.history("bottle", tracking_uri=uri)
    assert [e["action"] for e in events] == ["promote", "promote", "refused"]
    # every gate evaluation is the event run's evaluation dataset input, the same digest as the fit's
    gate_input = client.get_run(events[-1]["run_id"]).inputs.dataset_inputs[0]
    assert gate_input.dataset.digest == inputs["evaluation"].digest

    with pytest.raises(NotFoundError, match="no version 7"):
        adreg.load("bottle", version=7, tracking_uri=uri)
    with pytest.raises(ConfigError, match="unknown fit setting"):
        adreg.fit("bottle", k_shots=3, tracking_uri=uri)


def test_in_process_predict_streams_a_frame_larger_than_a_request(use_registered, bottle_dir):
    """The server's 32 MiB / 256-row bounds are for HTTP requests: in-process, a frame of full-size images
    (here ~50 MiB of base64) is scored in chunks, and a bad row keeps its row number in the whole frame."""
    from adreg.pyfunc import DEFAULT_MAX_REQUEST_MIB
    from adreg.pyfunc.served import STREAM_ROWS

    files = sorted((bottle_dir / "test").rglob("*.png"))[:12]
    images = [file_to_b64(p) for p in files]
    frame = [images[i % len(images)] for i in range(STREAM_ROWS + 8)]
    frame[STREAM_ROWS + 3] = "bm90IGFuIGltYWdl"  # "not an image"
    assert sum(map(len, frame)) > DEFAULT_MAX_REQUEST_MIB * 2 ** 20
    model = mlflow.pyfunc.load_model(f"models:/adreg-bottle/{use_registered['version']}",
                                     model_config={"device": "cpu"})
    out = model.predict(pd.DataFrame({"image": frame}))
    assert len(out) == len(frame)
    assert out.loc[STREAM_ROWS + 3, "error"].startswith(f"row {STREAM_ROWS + 3}: ")
    assert (out["error"] == "").sum() == len(frame) - 1
    np.testing.assert_allclose(out.loc[STREAM_ROWS + 4, "score"], out.loc[(STREAM_ROWS + 4) % len(images), "score"],
                               rtol=1e-5)


def test_normal_percentile_is_a_stable_score(bottle_fit, bottle_dir):
    """normal_percentile is 0-100, monotone in the score, computed from the held-out goods the threshold was
    calibrated on, and the same for two versions whose scores differ only in scale."""
    import copy

    det = bottle_fit.detector
    good = [c["score"] for c in bottle_fit.calibration if c["label"] == 0]
    np.testing.assert_array_equal(det.normal_scores, np.sort(good))
    files = sorted((bottle_dir / "test").rglob("*.png"))[::9]
    scores = det.predict([load_image(p) for p in files]).scores
    pct = det.normal_percentile(scores)
    assert ((pct >= 0) & (pct <= 100)).all()
    order = np.argsort(scores)
    assert (np.diff(pct[order]) >= 0).all()
    assert det.normal_percentile([max(good) + 1])[0] == 100 and det.normal_percentile([min(good)])[0] == 0
    scaled = copy.copy(det)
    scaled.set_normal_scores(np.asarray(good) * 37.5)  # another version, scores on another scale
    np.testing.assert_array_equal(scaled.normal_percentile(scores * 37.5), pct)
