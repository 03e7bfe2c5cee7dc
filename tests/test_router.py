"""The multi-category router: one backbone per backbone config, rows routed by category, per-row errors."""

import dataclasses

import mlflow
import pandas as pd
import pytest
import requests

from adreg import bundle, registry, tracking
from adreg.errors import AdregError
from adreg.images import file_to_b64
from tests.servers import adreg_server


@pytest.fixture(scope="module")
def router_store(registered_bottle, bottle_dir, tmp_path_factory):
    """bottle (session fit) + 'cap' (the same fit under another name) + 'vial' (another backbone size),
    each promoted to production, bundled into adreg-router@production."""
    from adreg.fitting import FitOptions, fit_category

    tracking.configure(registered_bottle["uri"])
    cap = dataclasses.replace(registered_bottle["result"], options=dataclasses.replace(
        registered_bottle["result"].options, category="cap"))
    logged = tracking.log_fit(cap)
    registry.promote("cap", registry.register(logged.model_uri, logged.run_id, "cap"), "production")
    vial = fit_category(FitOptions(category="vial", train_dir=str(bottle_dir / "train" / "good"), k_shot=1,
                                   image_size=256, aug_count=2, holdout=5, device="cpu"), show_progress=False)
    logged = tracking.log_fit(vial)
    registry.promote("vial", registry.register(logged.model_uri, logged.run_id, "vial"), "production")
    router = bundle.build_router(["bottle", "cap", "vial"])
    registry.promote("router", router.version, "production")
    return {"uri": registered_bottle["uri"], "vial": vial}


def test_router_shares_backbones_and_matches_single_models(router_store, bottle_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", router_store["uri"])
    tracking.configure(router_store["uri"])
    model = mlflow.pyfunc.load_model("models:/adreg-router@production", model_config={"device": "cpu"})
    router = model.unwrap_python_model()
    assert router.categories() == ["bottle", "cap", "vial"]
    assert len(router.backbones) == 2  # bottle and cap share one Lite0@320; vial has Lite0@256
    assert router.detectors["bottle"].backbone is router.detectors["cap"].backbone
    assert registry.categories() == ["bottle", "cap", "vial"]  # the router is not a category

    good, bad = bottle_dir / "test" / "good" / "003.png", bottle_dir / "test" / "contamination" / "005.png"
    frame = pd.DataFrame({"category": ["bottle", "vial", "nope", "cap", "bottle"],
                          "image": [file_to_b64(bad), file_to_b64(good), file_to_b64(good), file_to_b64(bad),
                                    "bm90IGFuIGltYWdl"]})
    out = model.predict(frame)
    single = mlflow.pyfunc.load_model("models:/adreg-bottle@production", model_config={"device": "cpu"})
    expected = single.predict(pd.DataFrame({"image": [file_to_b64(bad)]}))
    assert out.loc[0, "score"] == pytest.approx(expected.loc[0, "score"], rel=1e-5)
    assert out.loc[3, "score"] == pytest.approx(expected.loc[0, "score"], rel=1e-5)
    vial = router_store["vial"].detector
    from adreg.images import load_image

    assert out.loc[1, "score"] == pytest.approx(float(vial.predict([load_image(good)]).scores[0]), rel=1e-5)
    assert out.loc[1, "threshold"] == pytest.approx(vial.threshold.value)
    assert "unknown category 'nope'" in out.loc[2, "error"] and out.loc[2, "score"] is None
    assert out.loc[4, "error"].startswith("row 4: not a readable image")
    with pytest.raises(AdregError, match="empty request"):
        model.predict(frame.iloc[:0])


def test_router_over_rest(router_store, bottle_dir, tmp_path):
    with adreg_server(router_store["uri"], "router", tmp_path / "router.log") as url:
        body = {"dataframe_split": {"columns": ["category", "image"],
                                    "data": [["cap", file_to_b64(bottle_dir / "test" / "broken_large" / "001.png")],
                                             ["vial", file_to_b64(bottle_dir / "test" / "good" / "001.png")]]}}
        resp = requests.post(f"{url}/invocations", json=body, timeout=120)
        assert resp.status_code == 200, resp.text[:300]
        rows = resp.json()["predictions"]
        assert rows[0]["is_anomaly"] is True and rows[0]["error"] == "" and rows[1]["error"] == ""
        resp = requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["category", "image"],
                                                                              "data": []}}, timeout=60)
        assert 400 <= resp.status_code < 500
