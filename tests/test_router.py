"""The multi-category router: one backbone per backbone config, rows routed by category, per-row errors."""

import dataclasses

import mlflow
import pandas as pd
import pytest
import requests

from adreg.errors import AdregError
from adreg.images import file_to_b64
from adreg.registry import bundle, derive, lifecycle, tracking, versions
from tests.servers import adreg_server, wait_for


@pytest.fixture(scope="module")
def router_store(registered_bottle, bottle_dir, tmp_path_factory):
    """bottle (session fit) + 'cap' (the same fit under another name) + 'vial' (another backbone size),
    each promoted to production, bundled into adreg-router@production."""
    from adreg.fitting import FitOptions, fit_category

    tracking.configure(registered_bottle["uri"])
    cap = dataclasses.replace(registered_bottle["result"], options=dataclasses.replace(
        registered_bottle["result"].options, category="cap"))
    logged = derive.log_fit(cap)
    versions.promote("cap", derive.register_version(logged, "cap").version, "production")
    cap_logged = logged
    vial = fit_category(FitOptions(category="vial", train_dir=str(bottle_dir / "train" / "good"), k_shot=1,
                                   image_size=256, aug_count=2, holdout=5, device="cpu"), show_progress=False)
    logged = derive.log_fit(vial)
    versions.promote("vial", derive.register_version(logged, "vial").version, "production")
    router = bundle.build_router(["bottle", "cap", "vial"])
    versions.promote("router", router.version, "production")
    return {"uri": registered_bottle["uri"], "vial": vial, "cap_logged": cap_logged}


def test_router_shares_backbones_and_matches_single_models(router_store, bottle_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", router_store["uri"])
    tracking.configure(router_store["uri"])
    model = mlflow.pyfunc.load_model("models:/adreg-router@production", model_config={"device": "cpu"})
    router = model.unwrap_python_model()
    assert router.categories() == ["bottle", "cap", "vial"]
    assert len(router.backbones) == 2  # bottle and cap share one Lite0@320; vial has Lite0@256
    assert router.detectors["bottle"].backbone is router.detectors["cap"].backbone
    assert versions.categories() == ["bottle", "cap", "vial"]  # the router is not a category

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


def test_router_over_rest_follows_each_category_and_bounds_requests(router_store, bottle_dir, tmp_path,
                                                                    monkeypatch):
    """One router server: per-row versions, each category following its own alias independently
    (promote and roll back `cap` while `bottle` stays), bounded requests."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", router_store["uri"])
    tracking.configure(router_store["uri"])
    bad, good = bottle_dir / "test" / "broken_large" / "001.png", bottle_dir / "test" / "good" / "001.png"
    body = {"dataframe_split": {"columns": ["category", "image"],
                                "data": [["cap", file_to_b64(bad)], ["vial", file_to_b64(good)],
                                         ["bottle", file_to_b64(bad)]]}}
    client = mlflow.MlflowClient()
    version = {c: str(client.get_model_version_by_alias(f"adreg-{c}", "production").version)
               for c in ("bottle", "cap")}
    with adreg_server(router_store["uri"], "router", tmp_path / "router.log", "--poll-seconds", "1",
                      "--max-rows", "4") as url:
        def rows():
            resp = requests.post(f"{url}/invocations", json=body, timeout=120)
            assert resp.status_code == 200, resp.text[:300]
            return resp.json()["predictions"]

        first = rows()
        assert first[0]["is_anomaly"] is True and all(r["error"] == "" for r in first)
        assert [(r["model_name"], r["model_version"]) for r in first[::2]] == \
            [("adreg-cap", version["cap"]), ("adreg-bottle", version["bottle"])]
        # a new cap version (the same logged model registered again), promoted: only cap's rows change
        logged = router_store["cap_logged"]
        new_cap = derive.register_version(logged, "cap").version
        versions.promote("cap", new_cap, "production")
        wait_for(lambda: rows()[0]["model_version"] == new_cap, 30, what="cap's new version in the router")
        now = rows()
        assert now[2]["model_version"] == version["bottle"] and now[0]["score"] == pytest.approx(first[0]["score"])
        lifecycle.rollback("cap", "production")
        wait_for(lambda: rows()[0]["model_version"] == version["cap"], 30, what="cap rolled back in the router")

        resp = requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["category", "image"],
                                                                              "data": []}}, timeout=60)
        assert 400 <= resp.status_code < 500
        resp = requests.post(f"{url}/invocations", timeout=60, json={"dataframe_split": {
            "columns": ["category", "image"], "data": [["cap", "x"]] * 5}})
        assert resp.status_code == 400 and resp.json()["message"].startswith("too many rows: 5")
        resp = requests.post(f"{url}/invocations", timeout=60, json={"dataframe_split": {
            "columns": ["image"], "data": [[file_to_b64(good)]]}})
        assert resp.status_code == 400 and resp.json()["message"].startswith("the request has no 'category' column")
