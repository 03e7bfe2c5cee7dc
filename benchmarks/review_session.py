"""The review loop on Magnetic-Tile-Defect, run for real and written down as a transcript with screenshots.

    python -m benchmarks review-session --work /tmp/adreg-review-session --out docs/guides/review-session

A product with good tiles only (28 MTD goods, no test folder): ``adreg fit`` (8-shot RAD, the README's MTD
settings) and register; then three rounds of the line:

1. ``adreg serve`` with ``--capture`` (rate 1) scores ``--line`` tiles of a stream (the seeded split's other
   training goods with 10% of the defective tiles mixed in) sent over REST, and writes them to the capture folder;
2. ``adreg review`` serves the review page; a headless Chromium (Playwright, Debian's chromium) labels
   ``--budget`` captures in the queue's order, pressing ``g`` / ``d`` as a reviewer who knows the dataset's
   truth would, and drawing a box around the ground-truth region of every third defect; screenshots are saved;
3. round 1: ``adreg update --from-reviews``, then ``adreg promote`` of version 1 and of the grown version,
   judged on the production set alone; round 2: ``adreg threshold`` on the production set, promoted;
   round 3: the production-quality figures of every version that judged the line.

Every command's output is written verbatim to ``<out>/transcript.md`` (commands as ``$ adreg ...``) and the
screenshots to ``<out>/*.png``.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from adreg.images import file_to_b64
from adreg.server import stop_process_group, wait_http
from benchmarks.harness import link_files, today
from serving.process import free_port

FIT_ARGS = ["--method", "rad", "--k-shot", "8", "--layers", "7", "10", "--augment", "hflip,vflip", "--aug-count",
            "8", "--top-fraction", "0.001"]
FLOORS = ["--min-image-auroc", "0.7", "--min-pixel-auroc", "0.7"]


class Session:
    def __init__(self, work: Path, out: Path):
        self.work, self.out = work, out
        self.uri = f"sqlite:///{work / 'mlflow.db'}"
        self.env = {**os.environ, "ADREG_HOME": str(work / "home"), "MLFLOW_DISABLE_TELEMETRY": "true",
                    "ADREG_PROGRESS": "0", "ADREG_USER": "qe-anna"}
        self.lines: list[str] = []

    def note(self, text: str) -> None:
        self.lines += ["", text, ""]
        print(text, flush=True)

    def run(self, *args: str, check: bool = True, shown: str | None = None) -> str:
        cmd = ["adreg", "--tracking-uri", self.uri, *args]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=self.work, timeout=3600)
        text = (res.stdout + (res.stderr if res.returncode else "")).rstrip()
        shown = shown or "adreg " + " ".join(shlex.quote(a) for a in args)
        self.lines += ["```", f"$ {shown}", text, f"# exit {res.returncode}, {time.perf_counter() - t0:.0f} s",
                       "```"]
        print(f"$ {shown}\n{text}\n# exit {res.returncode}", flush=True)
        if check and res.returncode not in (0, 1):
            raise SystemExit(f"failed: {shown}\n{res.stderr[-3000:]}")
        return res.stdout

    def background(self, *args: str, log: str) -> subprocess.Popen:
        return subprocess.Popen(["adreg", "--tracking-uri", self.uri, *args], env=self.env, cwd=self.work,
                                stdout=open(self.work / log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGINT (Ctrl-C) to the command's process group, SIGKILL to what is left after 60 s."""
    stop_process_group(proc, grace=60, signum=signal.SIGINT)


def wait_up(url: str, timeout: float = 600) -> None:
    """Until ``url`` answers without a server error; SystemExit after ``timeout`` s."""
    if not wait_http(url, timeout, interval=1, accept=lambda status: status < 500):
        raise SystemExit(f"{url} did not come up")


def serve_round(s: Session, which: list[str], images: list[Path]) -> str:
    """Serve ``which`` (default: follow production, or pin the newest version while there is none)."""
    if not which:
        import adreg

        aliases = adreg.status("mtd", tracking_uri=s.uri)["aliases"]
        if "production" not in aliases:
            newest = max(int(r["version"]) for r in adreg.models(tracking_uri=s.uri, serving=False)
                         if r["category"] == "mtd")
            which = ["--pin", str(newest)]
            s.note(f"No version is in production yet: the line keeps running on version {newest}, pinned.")
    port = free_port()
    s.lines += ["```", f"$ adreg serve mtd {' '.join(which)} --capture capture --capture-rate 1 --port {port} &",
                "```"]
    proc = s.background("serve", "mtd", *which, "--capture", "capture", "--capture-rate", "1", "--port", str(port),
                        "--device", "cpu", log=f"serve-{port}.log")
    try:
        wait_up(f"http://127.0.0.1:{port}/health")
        flagged, versions = 0, set()
        for i in range(0, len(images), 8):
            rows = [{"image": file_to_b64(p)} for p in images[i:i + 8]]
            r = requests.post(f"http://127.0.0.1:{port}/invocations", json={"dataframe_records": rows}, timeout=600)
            r.raise_for_status()
            preds = r.json()["predictions"]
            flagged += sum(bool(p["is_anomaly"]) for p in preds)
            versions |= {p["model_version"] for p in preds}
        time.sleep(2)  # the capture writer drains its queue
        s.note(f"The line sent {len(images)} tiles over REST; version {', '.join(sorted(versions))} flagged {flagged}.")
    finally:
        stop(proc)
    return sorted(versions)[-1]


def review_round(s: Session, truth: dict, budget: int, shot_prefix: str, version: str | None = None) -> dict:
    from playwright.sync_api import sync_playwright

    from adreg.integrity import sha256_file

    port = free_port()
    s.lines += ["```", f"$ adreg review mtd --capture capture --sample-rate 0.3 --port {port} &", "```"]
    proc = s.background("review", "mtd", "--capture", "capture", "--sample-rate", "0.3", "--port", str(port),
                        log=f"review-{port}.log")
    done = {"good": 0, "defect": 0, "regions": 0}
    try:
        wait_up(f"http://127.0.0.1:{port}/api/status")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
            page.set_default_timeout(120_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector(".entry")
            page.fill("#reviewer", "qe-anna")
            if version:  # this round's captures: the version the line ran
                page.select_option("#f-version", version)
                page.wait_for_function("(v) => [...document.querySelectorAll('.entry')].every("
                                       "(e) => e.textContent.includes(' v' + v + ' '))", arg=version)
            page.click("#meta")
            shots = 0
            for _ in range(budget):
                rows = [e for e in page.locator(".entry").all() if not (e.locator(".labelled").text_content() or "")]
                while not rows and page.is_enabled("#page-next"):
                    first = page.locator(".entry").first.get_attribute("data-rel")
                    page.click("#page-next")
                    page.wait_for_function("(r) => document.querySelector('.entry') && "
                                           "document.querySelector('.entry').dataset.rel !== r", arg=first)
                    rows = [e for e in page.locator(".entry").all()
                            if not (e.locator(".labelled").text_content() or "")]
                if not rows:
                    break
                rows[0].click()
                rel = rows[0].get_attribute("data-rel")
                page.wait_for_function("() => !document.getElementById('overlay-note').textContent"
                                       ".startsWith('computing')")
                sha = sha256_file(s.work / "capture" / "mtd" / rel)
                label, mask = truth.get(sha, (0, None))
                if label == 1 and mask is not None and done["defect"] % 3 == 0:
                    m = np.asarray(Image.open(mask).convert("L")) > 127
                    if m.any():
                        ys, xs = np.nonzero(m)
                        page.check("input[name=mode][value=box]")
                        box = page.locator("#draw").bounding_box()
                        h, w = m.shape
                        page.mouse.move(box["x"] + box["width"] * max(xs.min() - 4, 0) / w,
                                        box["y"] + box["height"] * max(ys.min() - 4, 0) / h)
                        page.mouse.down()
                        page.mouse.move(box["x"] + box["width"] * min(xs.max() + 4, w - 1) / w,
                                        box["y"] + box["height"] * min(ys.max() + 4, h - 1) / h, steps=5)
                        page.mouse.up()
                        page.click("#meta")  # keys go to the page, not to the mode's radio button
                        done["regions"] += 1
                        if shots < 1 and shot_prefix == "round1":
                            page.screenshot(path=str(s.out / f"{shot_prefix}-region.png"))
                            shots += 1
                if label == 0 and "flagged" in rel and shot_prefix == "round1" \
                        and not (s.out / f"{shot_prefix}-false-alarm.png").exists():
                    page.screenshot(path=str(s.out / f"{shot_prefix}-false-alarm.png"))
                before = page.text_content("#progress")
                page.keyboard.press("d" if label == 1 else "g")
                page.wait_for_function("(b) => document.getElementById('progress').textContent !== b", arg=before)
                done["defect" if label == 1 else "good"] += 1
            if shot_prefix in ("round1", "round3"):
                page.screenshot(path=str(s.out / f"{shot_prefix}-queue.png"))
            browser.close()
    finally:
        stop(proc)
    s.note(f"In the browser, qe-anna labelled {done['good']} captures good and {done['defect']} defect "
           f"(a box drawn around the region of {done['regions']}).")
    for name, what in (("region", "a flagged defect with its region drawn, before pressing d"),
                       ("false-alarm", "a false alarm: flagged, labelled good"), ("queue", "the queue afterwards")):
        if (s.out / f"{shot_prefix}-{name}.png").exists():
            s.lines += [f"![{what}]({shot_prefix}-{name}.png)", f"*{what}*", ""]
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/adreg-review-session")
    ap.add_argument("--out", default="docs/guides/review-session")
    ap.add_argument("--line", type=int, default=200)
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from adreg.data import default_category_dir, mtd_split
    from adreg.integrity import sha256_file

    work, out = Path(args.work), Path(args.out).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    data = mtd_split(default_category_dir("mtd"))
    rng = random.Random(args.seed)
    goods = list(data.train)
    rng.shuffle(goods)
    link_files(goods[:28], work / "goods")
    defects = [x for x in data.test if x.label == 1]
    rng.shuffle(defects)
    stream, pool_goods, pool_defects = [], goods[28:], list(defects)
    for _ in range(3 * args.line):
        stream.append(pool_defects.pop().path if rng.random() < 0.1 else pool_goods.pop())
    truth = {sha256_file(x.path): (1, x.mask_path) for x in defects}
    s = Session(work, out)
    t0 = time.perf_counter()
    s.note("A new product: 28 good tiles, no test folder. Fit 8 shots and register; nothing to gate on yet.")
    s.run("fit", "--category", "mtd", "--train-dir", "goods", *FIT_ARGS, "--register", "--promote", "production",
          check=False)
    s.run("fit", "--category", "mtd", "--train-dir", "goods", *FIT_ARGS, "--register")
    s.note("Round 1: serve version 1 with capture, the line sends tiles, a quality engineer reviews 50 in the browser.")
    v = serve_round(s, ["--pin", "1"], stream[:args.line])
    review_round(s, truth, args.budget, "round1", v)
    s.run("labels", "mtd", shown="adreg labels mtd | tail -4")
    s.lines[-3] = "\n".join(s.lines[-3].splitlines()[-4:])
    s.run("quality", "mtd")
    s.note("Grow version 1 with the reviewed goods on the grow side (false alarms included), then promote: the gate "
           "judges on the production set alone (floors at what MTD reaches at 8 shots).")
    s.run("update", "mtd", "--from-reviews", "--from-version", "1", "--register")
    s.run("promote", "mtd", "--version", "1", *FLOORS)
    s.run("promote", "mtd", "--version", "2", *FLOORS)
    s.note("Round 2: the server follows production; 50 more reviews; then the threshold from the line.")
    v = serve_round(s, [], stream[args.line:2 * args.line])
    review_round(s, truth, args.budget, "round2", v)
    s.run("threshold", "mtd", "--from-version", v, "--promote", "production", *FLOORS, check=False)
    s.note("Round 3: production quality before and after, from 50 more reviews of what the new version judged.")
    v = serve_round(s, [], stream[2 * args.line:])
    review_round(s, truth, args.budget, "round3", v)
    s.run("quality", "mtd")
    s.run("status", "mtd")
    s.run("history", "mtd")
    head = ["# Review session on MTD", "",
            f"Recorded by `python -m benchmarks review-session` on {today()}, 2-core CPU, no GPU, "
            f"{(time.perf_counter() - t0) / 60:.0f} min in all. The reviewer is a headless Chromium driven by "
            "Playwright that labels each capture with the dataset's truth.", ""]
    (out / "transcript.md").write_text("\n".join(head + s.lines) + "\n")
    for shot in out.glob("*.png"):  # 3/4 size, 128 colours: the docs carry a few hundred KB, not MBs
        im = Image.open(shot).convert("RGB")
        im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.LANCZOS).quantize(128).save(shot, optimize=True)
    print(f"wrote {out / 'transcript.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
