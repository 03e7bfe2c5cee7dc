"""Which captures the review queue shows first (adreg.review.selection) on real bottle captures written by the
registered version's own served model (loaded in-process with capture on), and the random slice that honest
figures rest on: recorded with each label, the production set's evaluation side and ``adreg quality`` read only
it."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from adreg.errors import DataError
from adreg.images import file_to_b64
from adreg.integrity import sha256_file
from adreg.registry import labels
from adreg.review import selection
from adreg.review.quality import production_quality
from adreg.review.queue import ReviewQueue
from tests.conftest import registered_copy

DEFECTS = ["broken_large/000.png", "broken_large/001.png", "contamination/000.png", "contamination/001.png"]


@pytest.fixture(scope="module")
def store(registered_bottle, tmp_path_factory):
    """A copy of the session store (labels written here reach no other test)."""
    with registered_copy(registered_bottle, tmp_path_factory.mktemp("selection-store")) as uri:
        yield {"uri": uri, "version": str(registered_bottle["version"]),
               "shot": Path(registered_bottle["result"].shots[0])}


def _capture(model, paths: list[Path], folder: Path) -> None:
    """Score ``paths`` with the served model (capture on, rate 1) and wait until every capture is written."""
    before = len(list(folder.rglob("*.json")))
    out = model.predict(pd.DataFrame({"image": [file_to_b64(p) for p in paths]}))
    assert (out["error"] == "").all()
    deadline = time.monotonic() + 60
    while len(list(folder.rglob("*.json"))) < before + len(paths) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.01)  # distinct capture times for the next request


@pytest.fixture(scope="module")
def captured(store, bottle_dir, tmp_path_factory):
    """The line as the served model captures it: bottle's 20 test goods (the 1-shot version flags some: false
    alarms), four strong defects, the learned shot three times, then the passed good the version covers least
    sent three more times (a batch of near-duplicates of a novel good). {sha256 -> what it is}."""
    folder = tmp_path_factory.mktemp("captures")
    model = mlflow.pyfunc.load_model("models:/adreg-bottle@production", model_config={
        "device": "cpu", "capture_dir": str(folder), "capture_rate": 1.0, "registered_model": "adreg-bottle",
        "model_version": store["version"]})  # what `adreg serve` tells the model it serves
    goods = sorted((bottle_dir / "test" / "good").glob("*.png"))
    defects = [bottle_dir / "test" / d for d in DEFECTS]
    _capture(model, goods + defects + [store["shot"]] * 3, folder)
    root = folder / "bottle"
    passed = [ReviewQueue(folder, "bottle").entry(p.relative_to(root).as_posix()) for p in (root / "ok").rglob("*.png")]
    novel = max(passed, key=lambda e: e.load_sidecar()["novelty"] / e.load_sidecar()["threshold"])
    _capture(model, [novel.path] * 3, folder)
    what = {sha256_file(p): "good" for p in goods} | {sha256_file(p): "defect" for p in defects}
    what[sha256_file(store["shot"])] = "shot"
    what[sha256_file(novel.path)] = "novel"
    return {"dir": folder, "what": what}


def kinds(entries, what):
    return [what[sha256_file(e.path)] for e in entries]


def test_captures_carry_what_the_queue_ranks_by(captured):
    side = labels.read_sidecar(next((captured["dir"] / "bottle").rglob("*.png")))
    assert {"score", "threshold", "normal_percentile", "novelty", "embedding"} <= set(side)
    emb = selection.signals(ReviewQueue(captured["dir"], "bottle").entry(
        next((captured["dir"] / "bottle").rglob("*.png")).relative_to(captured["dir"] / "bottle").as_posix())).embedding
    assert emb is not None and emb.ndim == 1 and abs(float(np.linalg.norm(emb)) - 1) < 0.01


def test_informative_shows_a_false_alarm_and_a_novel_good_before_near_duplicates(captured):
    what = captured["what"]
    q = ReviewQueue(captured["dir"], "bottle", strategy="informative", random_share=0.0)
    entries, _ = q.entries()
    order = kinds(entries, what)
    flagged = [e for e in entries if e.verdict == "flagged"]
    assert any(what[sha256_file(e.path)] == "good" for e in flagged), "the 1-shot version flags no test good"
    # flags nearest the threshold first: the first is a false alarm, and the order is by |log(score/threshold)|
    closeness = [abs(np.log(selection.signals(e).ratio)) for e in flagged]
    assert closeness == sorted(closeness) and order[0] == "good" and entries[0].reason == "threshold"
    # passes: the novel good once, near the top; its three copies and the shot's copies after every other pass
    passed = [(e, k) for e, k in zip(entries, order) if e.verdict == "ok"]
    assert passed[0][1] == "novel" and passed[0][0].reason == "novel"
    copies = [i for i, (e, k) in enumerate(passed) if k in ("novel", "shot")][1:]
    shot_first = next(i for i, (e, k) in enumerate(passed) if k == "shot")
    later = [i for i in copies if i != shot_first]
    assert len(later) == 5 and min(later) > max(i for i, (e, k) in enumerate(passed) if k == "good")
    assert all(passed[i][0].reason == "duplicate" for i in later)
    assert sum(1 for _, k in passed[:5] if k == "novel") == 1
    # the newest order shows the batch of copies together, one after another
    newest = kinds(ReviewQueue(captured["dir"], "bottle", sample_rate=1.0, strategy="newest",
                               random_share=0.0).entries()[0], what)
    at = [i for i, k in enumerate(newest) if k == "novel"]
    assert len(at) == 4 and at[:3] == list(range(at[0], at[0] + 3))  # the batch of three in a row


def test_the_random_slice_is_mixed_in_recorded_and_the_only_evaluation_side(captured, store):
    what = captured["what"]
    q = ReviewQueue(captured["dir"], "bottle", strategy="informative", random_share=0.25, seed=3)
    entries, _ = q.entries()
    in_slice = [selection.in_random_slice(e.rel, 0.25, 3) for e in entries]
    assert [e.reason == "random" for e in entries] == in_slice
    assert 2 <= sum(in_slice) <= 16
    assert all(entries[i].reason == "random" for i in range(3, len(entries), 4)[:sum(in_slice)])  # every 4th
    assert {e.rel for e, s in zip(entries, in_slice) if s} != {e.rel for e in ReviewQueue(
        captured["dir"], "bottle", random_share=0.25, seed=4).entries()[0] if e.reason == "random"}
    # a reviewer labels the first 16 the queue shows, by the truth
    for e in entries[:16]:
        truth = what[sha256_file(e.path)]
        labels.record_label("bottle", e.path, "defect" if truth == "defect" else "good", reviewer="ann",
                            **q.selection(e, e.reason))
    recorded = {lab.sha256: lab for lab in labels.read_labels("bottle")}
    slice_shas = {sha256_file(e.path) for e, s in zip(entries[:16], in_slice[:16]) if s}
    assert {sha for sha, lab in recorded.items() if lab.selection == "random"} == slice_shas
    assert all(lab.random_share == 0.25 for lab in recorded.values())
    prod = labels.production_set("bottle")
    assert prod.random_slice and set(prod.sample_sha256) == slice_shas
    chosen_goods = {sha for sha, lab in recorded.items() if lab.verdict == "good" and sha not in slice_shas}
    assert set(prod.grow_sha256) == chosen_goods
    chosen_defects = sum(1 for sha, lab in recorded.items() if lab.verdict == "defect" and sha not in slice_shas)
    assert prod.n_chosen_defects == chosen_defects and "random slice" in prod.describe()
    quality = production_quality("bottle")[store["version"]]
    assert quality.random_slice and quality.reviewed == len(slice_shas)
    # a label the page sends with a reason the queue never gives is refused; a random check cannot be claimed
    with pytest.raises(DataError):
        q.selection(next(e for e, s in zip(entries, in_slice) if not s), "random")


def test_goods_the_version_covers_are_learned_without_review_and_counted(captured, store):
    import adreg

    root = captured["dir"] / "bottle"
    covered = [e.path for e in ReviewQueue(captured["dir"], "bottle").covered(store["version"])]
    assert covered, "the version scored no passed capture below its median normal image"
    for p in covered:
        side = labels.read_sidecar(p)
        assert side["normal_percentile"] < 50 and not side["is_anomaly"] and str(side["version"]) == store["version"]
        assert not selection.in_random_slice(p.relative_to(root).as_posix(), selection.DEFAULT_RANDOM_SHARE, 0)
    assert ReviewQueue(captured["dir"], "bottle").covered("999") == []  # judged by another version: not taken
    labelled = {lab.sha256 for lab in labels.read_labels("bottle")}  # what the slice test's reviewer labelled
    assert labelled & {sha256_file(p) for p in covered}, "no covered capture was labelled: nothing to leave out"
    expected = [p for p in covered if sha256_file(p) not in labelled]
    out = adreg.update("bottle", covered_from=captured["dir"], from_version=store["version"], device="cpu",
                       show_progress=False)
    assert out.result.sources["covered_goods"] == len(expected)
    learned = {sha256_file(p) for p in out.result.added + out.result.calibration_images}
    assert not learned & labelled  # a labelled capture (a reviewed defect above all) is never learned unreviewed
    assert len(out.result.added) + len(out.result.duplicates) == len(expected)


def test_a_confirmed_false_alarm_offers_its_look_alikes_as_one_group_in_the_browser(captured, store):
    import asyncio

    import requests

    from adreg.review.app import build_app
    from tests.test_review_app import CHROMIUM, message, open_page, select, serve

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    what, root = captured["what"], captured["dir"] / "bottle"
    false_alarm = next(p for p in sorted((root / "flagged").rglob("*.png")) if what[sha256_file(p)] == "good")
    fa_rel = false_alarm.relative_to(root).as_posix()
    before = {(lab.sha256, lab.run_id) for lab in labels.read_labels("bottle")}
    app = build_app(["bottle"], captured["dir"], tracking_uri=store["uri"], retry_s=0.5, random_share=0.0)
    slow = {"queue_s": 0.0}

    @app.middleware("http")
    async def slow_queue(request, call_next):  # a slow store: the queue's refresh after a label takes 2 s
        if request.url.path == "/api/queue":
            await asyncio.sleep(slow["queue_s"])
        return await call_next(request)

    with serve(app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = open_page(browser, url, reviewer="carl")
            select(page, fa_rel)
            slow["queue_s"] = 2.0
            page.keyboard.press("g")
            message(page, f"labelled {fa_rel} good")
            page.wait_for_selector("#group:not([hidden])")
            group = [img.get_attribute("data-rel") for img in page.locator("#group-tiles img").all()]
            assert 1 <= len(group) <= selection.GROUP_SIZE and "same as this?" in page.text_content("#group-note")
            assert all(rel.startswith("ok/") for rel in group)
            page.keyboard.press("a")  # one key labels the group, even while the queue is still refreshing
            message(page, f"labelled {len(group)} good, the same as {fa_rel}")
            assert page.is_hidden("#group")
            # a group whose bytes changed since the page showed them is refused, nothing recorded
            bad = requests.post(url + "/api/label-group", json={"category": "bottle", "anchor": fa_rel,
                                "rels": group[:1], "sha256s": ["0" * 64], "reviewer": "carl"}, timeout=30)
            assert bad.status_code == 409
        finally:
            browser.close()
    new = [lab for lab in labels.read_labels("bottle") if (lab.sha256, lab.run_id) not in before]
    grouped = {Path(lab.path).relative_to(root.resolve()).as_posix(): lab for lab in new if lab.selection == "group"}
    assert sorted(grouped) == sorted(group)  # one label per image of the group
    assert all(lab.verdict == "good" and lab.user == "carl" and not lab.flagged for lab in grouped.values())
    assert [lab.selection for lab in new if lab.path == str(false_alarm.resolve())] == ["threshold"]


def test_a_capture_whose_sidecar_is_not_written_yet_is_read_again(tmp_path):
    import json

    day = tmp_path / "bottle" / "ok" / "20261207"
    day.mkdir(parents=True)
    img = day / "101500-000001-v1-ab12.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\n")  # the capture writer writes the image, then its sidecar
    q = ReviewQueue(tmp_path, "bottle")
    first = selection.signals(q.entry("ok/20261207/101500-000001-v1-ab12.png"))
    assert np.isnan(first.ratio) and first.embedding is None
    img.with_suffix(".json").write_text(json.dumps({"score": 2.0, "threshold": 4.0, "novelty": 1.0}))
    again = selection.signals(q.entry("ok/20261207/101500-000001-v1-ab12.png"))
    assert again.ratio == 0.5 and again.novelty == 0.25
