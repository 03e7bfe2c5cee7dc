"""Review labels as records, and what they feed: the production set, the gate on it, update from reviews,
the threshold from the line and production quality. Real bottle images, a real sqlite store, real fits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import adreg
from adreg.errors import ConflictError, DataError


def _adreg(uri: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adreg.cli", "--tracking-uri", uri, *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def _capture(detector, version: str, paths: list[Path], root: Path) -> list[Path]:
    """Copy images into the capture layout with the sidecars the served model would write (really scored)."""
    from adreg.images import load_image

    pred = detector.predict([load_image(p) for p in paths])
    out = []
    for i, (p, score) in enumerate(zip(paths, pred.scores)):
        flagged = bool(score > detector.threshold.value)
        folder = root / "widget" / ("flagged" if flagged else "ok") / "20261201"
        folder.mkdir(parents=True, exist_ok=True)
        dst = folder / f"1200{i:02d}-000000-v{version}-{i:04x}.png"
        shutil.copyfile(p, dst)
        dst.with_suffix(".json").write_text(json.dumps({
            "score": float(score), "threshold": detector.threshold.value, "is_anomaly": flagged,
            "model": "adreg-widget", "version": version, "alias": "production", "at": "2026-12-01T12:00:00+00:00"}))
        out.append(dst)
    return out


@pytest.fixture(scope="module")
def widget(bottle_fit, bottle_dir, tmp_path_factory):
    """A product with good images only (no test folder): the session's 1-shot bottle fit logged as category
    'widget' without its evaluation, registered (not promoted: nothing to gate on yet), and a capture folder
    of real bottle images it judged."""
    import dataclasses

    from adreg.registry import derive, tracking

    base = tmp_path_factory.mktemp("widget")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    old = os.environ.get("ADREG_HOME")
    os.environ["ADREG_HOME"] = str(base / "home")
    fit = dataclasses.replace(bottle_fit, evaluation=None,
                              options=dataclasses.replace(bottle_fit.options, category="widget", test_dir=None),
                              data=dataclasses.replace(bottle_fit.data, test=[]))
    tracking.configure(uri)
    logged = derive.log_fit(fit)
    version = derive.register_version(logged, "widget", fit.metrics()).version
    defects = sorted((bottle_dir / "test").glob("broken_*/*.png"))[:12]
    line_goods = sorted((bottle_dir / "train" / "good").glob("*.png"))[100:152]
    captured = _capture(fit.detector, version, defects + line_goods, base / "capture")
    yield {"uri": uri, "version": version, "defects": captured[:12], "goods": captured[12:], "base": base,
           "mask_of": {c: bottle_dir / "ground_truth" / d.parent.name / f"{d.stem}_mask.png"
                       for c, d in zip(captured[:12], defects)}}
    if old is None:
        os.environ.pop("ADREG_HOME", None)
    else:
        os.environ["ADREG_HOME"] = old
    import mlflow

    mlflow.set_tracking_uri(None)


def test_promote_without_test_set_or_reviews_is_refused_with_the_way_forward(widget):
    with pytest.raises(DataError, match="review captured images"):
        adreg.promote("widget", widget["version"], "production", tracking_uri=widget["uri"])


def test_labels_are_records_that_survive_a_restart_and_concurrent_reviewers(widget, tmp_path):
    uri = widget["uri"]
    goods = widget["goods"]
    # two reviewers at once, each in its own process, labelling 6 images each (3 the same)
    procs = [subprocess.Popen([sys.executable, "-m", "adreg.cli", "--tracking-uri", uri, "label", "widget",
                               *map(str, files), "--as", "good", "--reviewer", who, "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "ADREG_HOME": str(widget["base"] / "home")})
             for who, files in (("alice", goods[0:6]), ("bob", goods[3:9]))]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outs]
    assert all(len(json.loads(o[0])) == 6 for o in outs)
    # bob disagrees on one image: visible, not overwritten
    adreg.label("widget", goods[3], "defect", reviewer="bob", tracking_uri=uri)
    # a fresh process reads them all (the store, not this process's memory, holds them)
    res = _adreg(uri, "labels", "widget", "--json")
    assert res.returncode == 0, res.stderr[-1000:]
    doc = json.loads(res.stdout)
    mine = [lab for lab in doc["labels"] if lab["user"] in ("alice", "bob")]
    assert len(mine) == 13
    assert {lab["identity"] for lab in mine} == {"label (review page)"}
    sha3 = next(lab["sha256"] for lab in mine if lab["verdict"] == "defect")
    assert doc["images"][sha3] == {"verdict": "disputed", "by": {"alice": "good", "bob": "defect"}}
    assert sum(1 for v in doc["images"].values() if v["verdict"] == "good") == 8
    judged = next(lab for lab in mine if lab["sha256"] != sha3)
    assert judged["judged_version"] == widget["version"] and judged["judged_score"] is not None


def test_a_label_for_changed_bytes_or_a_bad_verdict_is_refused(widget, tmp_path):
    from adreg.integrity import sha256_file
    from adreg.registry.labels import record_label

    img = tmp_path / "part.png"
    shutil.copyfile(widget["goods"][-1], img)
    seen = sha256_file(img)
    with open(img, "ab") as f:
        f.write(b"\0")
    adreg.api._store(widget["uri"])
    with pytest.raises(ConflictError, match="changed since it was shown"):
        record_label("widget", img, "good", expected_sha256=seen)
    with pytest.raises(DataError, match="one of good, defect, skip"):
        adreg.label("widget", [img], "maybe", tracking_uri=widget["uri"])
    with pytest.raises(DataError, match="only drawn on a defect"):
        record_label("widget", img, "good", mask=np.ones((4, 4)))


def test_reviewed_defects_let_the_gate_judge_on_the_production_set_alone(widget):
    uri = widget["uri"]
    for d in widget["defects"][:6]:
        adreg.label("widget", d, "defect", mask=str(widget["mask_of"][d]), tracking_uri=uri)
    adreg.label("widget", widget["defects"][6:], "defect", tracking_uri=uri)
    adreg.label("widget", widget["goods"][9:40], "good", tracking_uri=uri)
    prod = adreg.production_set("widget", tracking_uri=uri)
    assert prod.n_defective == 12 and prod.n_masks == 6
    assert prod.n_good >= 5 and len(prod.grow) >= 5
    assert not {str(s.path) for s in prod.samples} & {str(p) for p in prod.grow}  # never both
    out = adreg.promote("widget", widget["version"], "production", tracking_uri=uri)
    gate = out.gate
    assert [p.kind for p in gate.sets] == ["production"]
    assert gate.decision.n_defective == 12 and gate.decision.n_good == prod.n_good
    assert "pixel_auroc" in gate.candidate  # masks where drawn: pixel metrics on those
    assert out.promoted == gate.passed
    assert "production set" in gate.eval_set
    events = adreg.history("widget", tracking_uri=uri)
    assert events[-1]["gate_set"] == "production" and events[-1]["production_labels"] == prod.digest


def test_update_from_reviews_grows_on_the_grow_side_only_and_skips_what_it_holds(widget):
    import mlflow

    uri = widget["uri"]
    prod = adreg.production_set("widget", tracking_uri=uri)
    up = adreg.update("widget", from_reviews=True, from_version=widget["version"], register=True, holdout=2,
                      device="cpu", tracking_uri=uri, show_progress=False)
    took = {str(p) for p in up.result.added} | {str(p) for p in up.result.calibration_images}
    held = {d["path"] for d in up.result.duplicates}  # reviewed goods the parent was fitted or calibrated on
    assert took and took | held == {str(p) for p in prod.grow} and not took & held
    assert not took & {str(s.path) for s in prod.samples}
    tags = mlflow.MlflowClient().get_run(up.run_id).data.tags
    assert tags["adreg.lineage.review_labels"] == prod.digest
    with pytest.raises(DataError, match="nothing new"):
        adreg.update("widget", from_reviews=True, from_version=up.version, device="cpu", tracking_uri=uri,
                     show_progress=False)


def test_threshold_from_the_line_and_quality_per_version(widget):
    from adreg.review.threshold import MIN_DEFECTS

    uri = widget["uri"]
    prod = adreg.production_set("widget", tracking_uri=uri)
    assert prod.n_defective >= MIN_DEFECTS
    if prod.n_good < 20:  # review more goods until the evaluation side holds 20
        adreg.label("widget", widget["goods"][40:], "good", tracking_uri=uri)
        prod = adreg.production_set("widget", tracking_uri=uri)
    if prod.n_good < 20:
        with pytest.raises(DataError, match="at least 10 reviewed defects and 20"):
            adreg.threshold("widget", from_version=widget["version"], tracking_uri=uri)
        return
    # a threshold that would flag far more reviewed goods than the parent does is refused, nothing logged
    with pytest.raises(DataError, match="refused"):
        adreg.threshold("widget", from_version=widget["version"], target_false_alarm_rate=0.6, device="cpu",
                        tracking_uri=uri)
    out = adreg.threshold("widget", from_version=widget["version"], device="cpu", tracking_uri=uri)
    assert out.rule == "target_false_alarm" and out.version
    assert out.details["production_labels"] == prod.digest
    before, after = out.details["before"], out.details["after"]
    # by default: no more false alarms on the reviewed goods than the parent, all the recall that allows
    assert after["false_alarm_rate"] <= before["false_alarm_rate"] + 1e-9
    assert after["recall"] >= before["recall"] - 1e-9
    assert out.details["target_rate"] == pytest.approx(before["false_alarm_rate"])
    det = adreg.load("widget", version=out.version, device="cpu", tracking_uri=uri)
    assert det.threshold.value == pytest.approx(out.threshold) and det.threshold.value != out.parent_threshold
    q = adreg.quality("widget", tracking_uri=uri)
    fig = q["versions"][str(widget["version"])]
    assert fig.reviewed >= 40 and fig.flags_reviewed + fig.passes_reviewed == fig.reviewed
    assert 0 <= fig.flag_precision <= 1 and q["run_id"]
    status = adreg.status("widget", tracking_uri=uri)
    assert status["quality"][str(widget["version"])]["flags_reviewed"] == fig.flags_reviewed
