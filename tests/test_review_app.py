"""The browser review queue (adreg.review) driven in a real headless Chromium: MVTec bottle captures written by the
real Capture class and judged by a real registered version; labels, a drawn defect region, a second reviewer,
path traversal, a changed file, a corrupt capture, the store going down and coming back, an overlay failure
that goes away."""

from __future__ import annotations

import base64
import builtins
import contextlib
import io
import json
import threading
import time
from pathlib import Path

import pytest
import requests

from adreg.images import file_to_b64, load_image
from adreg.integrity import sha256_file
from adreg.pyfunc.capture import Capture
from adreg.registry import labels, tracking
from adreg.review import queue as rq
from adreg.review.app import build_app
from adreg.review.selection import REASONS
from serving.process import free_port
from tests.conftest import registered_copy

CHROMIUM = Path("/usr/bin/chromium")
SOURCES = {"g0": "good/000.png", "g1": "good/001.png", "g2": "good/002.png",
           "b0": "broken_large/000.png", "b1": "broken_large/001.png", "s0": "broken_small/000.png"}
CORRUPT = b"\x89PNG\r\n\x1a\n" + b"this is not the rest of a png " * 20


# -- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def review_store(registered_bottle, tmp_path_factory):
    """A copy of the session store (its registered bottle version; labels written here reach no other test)."""
    with registered_copy(registered_bottle, tmp_path_factory.mktemp("review-store")) as uri:
        yield {"uri": uri, "version": str(registered_bottle["version"]), "detector": registered_bottle["result"].detector}


@pytest.fixture(scope="module")
def captures(review_store, bottle_dir, tmp_path_factory):
    """A capture folder written by the real Capture class: six bottle test images scored by the registered
    version, and one corrupt capture; {key: relative path} (keys of SOURCES, and 'bad')."""
    folder = tmp_path_factory.mktemp("captures")
    det = review_store["detector"]
    paths = {k: bottle_dir / "test" / v for k, v in SOURCES.items()}
    scores = det.predict([load_image(p) for p in paths.values()]).scores
    thr = float(det.threshold.value)
    cap = Capture(folder, rate=1.0, max_mib=500)
    row = {"model_name": "adreg-bottle", "model_version": review_store["version"], "model_alias": "production",
           "threshold": thr}
    for path, score in zip(paths.values(), scores):
        cap.offer(file_to_b64(path), {**row, "score": float(score), "is_anomaly": bool(score > thr)})
        time.sleep(0.002)
    cap.offer(base64.b64encode(CORRUPT).decode(), {**row, "score": 2 * thr, "is_anomaly": True})
    deadline = time.monotonic() + 30
    while len(list((folder / "bottle").rglob("*.json"))) < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    by_sha = {sha256_file(p): k for k, p in paths.items()}
    rels = {}
    for img in (folder / "bottle").rglob("*.png"):
        key = "bad" if img.read_bytes() == CORRUPT else by_sha[sha256_file(img)]
        rels[key] = img.relative_to(folder / "bottle").as_posix()
    assert len(rels) == 7
    return {"dir": folder, "rels": rels}


@contextlib.contextmanager
def serve(app):
    """The app under uvicorn in a thread on a free 127.0.0.1 port; stopped on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the review server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def review(captures, review_store):
    # no random slice: which labels evaluate must not depend on the capture names' random part here
    app = build_app(["bottle"], captures["dir"], sample_rate=1.0, tracking_uri=review_store["uri"], retry_s=0.5,
                    random_share=0.0)
    with serve(app) as url:
        yield {"url": url, "app": app, **captures}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"the review page is tested in Debian's chromium, expected at {CHROMIUM}: apt-get install chromium "
                    "(.ci/run does)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


# -- helpers -------------------------------------------------------------------------------------------
def open_page(browser, url, reviewer=None, context=None):
    context = context or browser.new_context()
    page = context.new_page()
    page.set_default_timeout(90_000)  # the first overlay loads the model: slow on a busy 2-core machine
    page.goto(url)
    page.wait_for_selector(".entry")
    if reviewer is not None:
        page.fill("#reviewer", reviewer)
    return page


def select(page, rel, loaded=True):
    """Show the capture ``rel``; wait until its image is drawn (and its overlay computed, or refused)."""
    page.click(f'.entry[data-rel="{rel}"]')
    if loaded:
        page.wait_for_function("""(rel) => { const i = document.getElementById('image');
            return i.src.includes(encodeURIComponent(rel)) && i.complete && i.naturalWidth > 0
                   && document.getElementById('draw').width === i.naturalWidth; }""", arg=rel)
    page.wait_for_function("() => !document.getElementById('overlay-note').textContent.startsWith('computing')")


def message(page, contains):
    page.wait_for_function("(t) => document.getElementById('message').textContent.includes(t)", arg=contains)
    return page.text_content("#message")


def row_label(page, rel):
    return page.text_content(f'.entry[data-rel="{rel}"] .labelled')


def labels_of(rel_path: Path) -> list[labels.Label]:
    return [lab for lab in labels.read_labels("bottle") if lab.path == str(rel_path.resolve())]


# -- the queue, without a browser ------------------------------------------------------------------------
def test_queue_orders_samples_deterministically_and_lists_without_reading_files(tmp_path, monkeypatch):
    root = tmp_path / "cap" / "bottle"
    for verdict, n in (("flagged", 30), ("ok", 2000)):
        for day in ("20261130", "20261201"):
            d = root / verdict / day
            d.mkdir(parents=True)
            for i in range(n // 2):
                (d / f"{i // 1000:02d}{i % 1000 // 100:02d}{i % 100:02d}-000000-v{1 + i % 2}-ab12.png").touch()
    (root / "ok" / "20261201" / "notes.txt").touch()
    (root / "flagged" / "20261201" / "escape.png").symlink_to("/etc/passwd")
    q = rq.ReviewQueue(tmp_path / "cap", "bottle", sample_rate=0.1, seed=0, strategy="newest", random_share=0.0)

    def no_reading(*args, **kwargs):
        raise AssertionError("listing the queue opened a file")

    with monkeypatch.context() as m:  # listing only reads directory entries
        m.setattr(builtins, "open", no_reading)
        m.setattr(io, "open", no_reading)
        first = q.page(rq.Filters(), 0, 40)
        flagged_v2 = q.page(rq.Filters.parse(version="2", verdict="flagged", day="20261130"), 0, 100)
    assert first.total == rq.ReviewQueue(tmp_path / "cap", "bottle", 0.1, 0, "newest", 0.0).page(rq.Filters(), 0, 1).total
    assert 30 + 150 <= first.total <= 30 + 250  # every flagged one, about 10% of the 2000 passed ones
    assert [e.verdict for e in first.entries[:30]] == ["flagged"] * 30 and first.entries[30].verdict == "ok"
    assert [e.day for e in first.entries[:15]] == ["20261201"] * 15  # newest first
    assert first.versions == ["1", "2"] and first.days == ["20261201", "20261130"]
    assert flagged_v2.total == 7 and {(e.version, e.day, e.verdict) for e in flagged_v2.entries} == \
        {("2", "20261130", "flagged")}
    again = rq.ReviewQueue(tmp_path / "cap", "bottle", 0.1, 0, "newest", 0.0).entries()[0]
    assert [e.rel for e in again] == [e.rel for e in q.entries()[0]]  # the same sample in another instance
    other_seed = {e.rel for e in rq.ReviewQueue(tmp_path / "cap", "bottle", 0.1, 1, "newest", 0.0).entries()[0]}
    assert other_seed != {e.rel for e in again}
    assert not any(e.rel.endswith(("escape.png", "notes.txt")) for e in again)
    with pytest.raises(PermissionError):
        q.find("flagged/20261201/escape.png")
    with pytest.raises(PermissionError):
        q.find("../../../etc/passwd")
    with pytest.raises(rq.DataError):
        rq.Filters.parse(day="2026-12-01")


# -- the page in a real browser ---------------------------------------------------------------------------
def test_label_goods_and_defects_with_a_drawn_region_and_a_second_reviewer(review, browser):
    url, rels, root = review["url"], review["rels"], review["dir"] / "bottle"
    page = open_page(browser, url, reviewer="alice")
    assert page.text_content("#progress") == "0 of 7 labelled"
    assert page.locator(".entry").count() == 7
    assert page.locator(".entry .flagged").count() >= 1
    whys = page.locator(".entry .why").all_text_contents()  # every tile says why it is where it is
    assert len(whys) == 7 and set(whys) <= set(REASONS.values()) and whys[0] == "near the threshold"
    select(page, rels["g0"])
    meta = page.text_content("#meta")
    assert "by version" in meta and "threshold" in meta and "UTC" in meta
    assert whys[[e.get_attribute("data-rel") for e in page.locator(".entry").all()].index(rels["g0"])] in meta
    assert page.text_content("#overlay-note").startswith("anomaly map of version")
    assert page.is_visible("#overlay")
    page.keyboard.press("g")
    message(page, f"labelled {rels['g0']} good")

    select(page, rels["b0"])
    box = page.locator("#draw").bounding_box()
    x, y, w, h = box["x"], box["y"], box["width"], box["height"]
    page.mouse.move(x + 0.3 * w, y + 0.3 * h)
    page.mouse.down()
    for i in range(1, 11):
        page.mouse.move(x + (0.3 + 0.03 * i) * w, y + (0.3 + 0.02 * i) * h)
    page.mouse.up()
    assert "region drawn" in page.text_content("#drawn-note")
    page.keyboard.press("d")
    message(page, f"labelled {rels['b0']} defect with a region")

    select(page, rels["b1"])
    page.click("#defect")
    message(page, f"labelled {rels['b1']} defect")
    page.wait_for_function("() => document.getElementById('progress').textContent === '3 of 7 labelled'")

    page.reload()
    page.wait_for_selector(".entry")
    assert page.input_value("#reviewer") == "alice"  # kept in localStorage
    assert page.text_content("#progress") == "3 of 7 labelled"
    assert [row_label(page, rels[k]) for k in ("g0", "b0", "b1", "s0")] == ["good", "defect", "defect", ""]
    select(page, rels["b0"])
    assert page.text_content("#others") == "labels: alice: defect (region)"

    bob = open_page(browser, url, reviewer="bob")  # another browser context: another reviewer
    assert row_label(bob, rels["g0"]) == "good"
    select(bob, rels["g0"])
    assert bob.text_content("#others") == "labels: alice: good"
    bob.click("#meta")  # keys go to the page, not the name field
    bob.keyboard.press("d")
    message(bob, f"labelled {rels['g0']} defect")
    select(bob, rels["g0"])
    assert bob.text_content("#others") == "labels: alice: good, bob: defect (disputed)"
    assert row_label(bob, rels["g0"]) == "disputed"
    bob.context.close()

    by_key = {k: labels_of(root / rels[k]) for k in ("g0", "b0", "b1")}
    assert [(lab.user, lab.verdict, lab.mask) for lab in by_key["g0"]] == [("alice", "good", False),
                                                                          ("bob", "defect", False)]
    assert [(lab.user, lab.verdict, lab.mask, lab.source) for lab in by_key["b0"]] == \
        [("alice", "defect", True, "review")]
    assert [(lab.verdict, lab.mask) for lab in by_key["b1"]] == [("defect", False)]
    b0 = by_key["b0"][0]
    assert b0.judged_version == review["app"].state.review.queues["bottle"].entry(rels["b0"]).version
    assert b0.sha256 == sha256_file(root / rels["b0"]) and b0.identity == labels.REVIEWER_IDENTITY
    assert b0.selection in ("threshold", "novel", "duplicate") and b0.random_share == 0.0  # how the queue chose it
    drawn = [s for s in labels.production_set("bottle").samples if s.mask_path is not None]
    assert len(drawn) == 1 and load_image(drawn[0].mask_path).size == load_image(root / rels["b0"]).size
    page.context.close()


def test_traversal_a_changed_file_and_a_corrupt_capture(review, browser):
    url, rels, root = review["url"], review["rels"], review["dir"] / "bottle"
    for rel in ("../../../../etc/passwd", "/etc/passwd", "..%2F..%2Fetc%2Fpasswd", f"{rels['g1']}/../../../x.png",
                rels["g1"].replace(".png", ".json")):
        r = requests.get(f"{url}/api/image", params={"category": "bottle", "rel": rel}, timeout=10)
        assert r.status_code in (403, 404) and b"root:" not in r.content, (rel, r.status_code)
    (root / "flagged").mkdir(exist_ok=True)
    link = root / "flagged" / "out.png"
    link.symlink_to("/etc/passwd")
    try:
        r = requests.get(f"{url}/api/image", params={"category": "bottle", "rel": "flagged/out.png"}, timeout=10)
        assert r.status_code == 403
    finally:
        link.unlink()
    assert requests.get(f"{url}/api/image", params={"category": "..", "rel": rels["g1"]}, timeout=10).status_code == 404
    ok = requests.get(f"{url}/api/image", params={"category": "bottle", "rel": rels["g1"]}, timeout=10)
    assert ok.status_code == 200 and ok.content == (root / rels["g1"]).read_bytes()

    page = open_page(browser, url, reviewer="alice")
    select(page, rels["bad"], loaded=False)  # the corrupt capture: an error tile, no map
    page.wait_for_selector("#error-tile:not([hidden])")
    assert "cannot be shown" in page.text_content("#error-tile")
    assert "cannot be decoded" in page.text_content("#overlay-note")
    select(page, rels["s0"])  # the rest of the queue works
    assert not page.is_visible("#error-tile") and page.is_visible("#overlay")

    select(page, rels["g1"])
    target = root / rels["g1"]
    original = target.read_bytes()
    target.write_bytes((root / rels["g2"]).read_bytes())  # the file changes after the page showed it
    try:
        page.keyboard.press("g")
        text = message(page, "changed since it was shown")
        assert "reload it and label again" in text and "error" in page.get_attribute("#message", "class")
        assert labels_of(target) == []
    finally:
        target.write_bytes(original)
    r = requests.post(f"{url}/api/label", json={"category": "bottle", "rel": rels["g1"], "verdict": "maybe",
                                                "sha256": "0" * 64}, timeout=10)
    assert r.status_code == 400 and "good, defect, skip" in r.json()["detail"]
    page.context.close()


def test_store_down_journals_labels_and_replays_them_when_it_is_back(review, browser):
    url, rels, root, state = review["url"], review["rels"], review["dir"] / "bottle", review["app"].state.review
    good_uri = state.tracking_uri
    state.tracking_uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    try:
        page = open_page(browser, url, reviewer="carol")
        banner = page.text_content("#store-banner")
        assert page.is_visible("#store-banner") and "is not reachable" in banner and "127.0.0.1" in banner
        assert page.locator(".banner:not([hidden])").count() == 1  # one message
        select(page, rels["g2"])
        page.keyboard.press("g")
        message(page, "the store is down")
        page.wait_for_selector("#pending:not([hidden])")
        assert page.text_content("#pending") == "1 label waiting for the store"
        pending = state.journal.pending()
        assert len(pending) == 1
        entry = json.loads(pending[0].read_text())
        assert (entry["verdict"], entry["reviewer"], entry["sha256"]) == ("good", "carol",
                                                                         sha256_file(root / rels["g2"]))
    finally:
        state.tracking_uri = good_uri  # the store is back
    page.wait_for_selector("#pending", state="hidden", timeout=30_000)
    assert not page.is_visible("#store-banner")
    assert state.journal.pending() == [] and state.journal.failed() == 0
    got = labels_of(root / rels["g2"])
    assert [(lab.user, lab.verdict, lab.at) for lab in got] == [("carol", "good", entry["at"])]
    page.wait_for_function("(rel) => document.querySelector(`.entry[data-rel='${rel}'] .labelled`).textContent"
                           " === 'good'", arg=rels["g2"])
    page.context.close()


def test_an_overlay_that_failed_is_drawn_once_its_version_is_there(review_store, registered_bottle, bottle_dir,
                                                                   tmp_path):
    """A capture judged by a version this store does not hold yet: the overlay is a 404 saying so (not a 422),
    and the failure does not stick: once the version is registered, the same request draws its map."""
    from PIL import Image

    from adreg.registry import versions

    coming = str(int(review_store["version"]) + 1)
    day = tmp_path / "bottle" / "flagged" / "20261201"
    day.mkdir(parents=True)
    img = day / f"120000-000000-v{coming}-0001.png"
    img.write_bytes((bottle_dir / "test" / "broken_large" / "002.png").read_bytes())
    img.with_suffix(".json").write_text(json.dumps({"score": 1.0, "threshold": 0.5, "is_anomaly": True,
                                                    "model": "adreg-bottle", "version": coming}))
    params = {"category": "bottle", "rel": img.relative_to(tmp_path / "bottle").as_posix()}
    with serve(build_app(["bottle"], tmp_path, tracking_uri=review_store["uri"])) as url:
        r = requests.get(f"{url}/api/overlay", params=params, timeout=120)
        assert r.status_code == 404 and f"version {coming} cannot be loaded" in r.json()["detail"]
        assert f"has no version '{coming}'" in r.json()["detail"]
        tracking.configure(review_store["uri"])
        logged = registered_bottle["logged"]
        assert versions.register(logged.model_uri, logged.run_id, "bottle") == coming
        r = requests.get(f"{url}/api/overlay", params=params, timeout=120)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        assert Image.open(io.BytesIO(r.content)).size == (768, 768)  # the 900 px capture, at the overlay's side
