"""Serving follows the registry: one run, side by side (issue 18's targets).

    python -m benchmarks serving --out bench-results/serving-follow            # full
    python -m benchmarks serving --quick --out /tmp/serving-follow             # reduced check

Prepares its own sqlite store: one 1-shot SubspaceAD bottle fit, logged as version 1 and (threshold x2)
as version 2; then, against real `adreg serve bottle` processes on 127.0.0.1 (default poll interval):

* steady state: latency p50/p99 with 4 clients, one image per request;
* time from the alias move (what `adreg promote` does after its gate) to the first answer by the new
  version, over every swap of the cycles below (target <= 10 s);
* p50/p99 and errors with 4 clients during N promote/rollback cycles (target p99 <= 1.5x steady, 0 errors);
* resident memory of the server after the first swap vs after all 2N swaps (target <= 1.1x);
* latency with a same-backbone shadow (``--shadow staging``, staging = version 2) vs without (<= 1.15x),
  measured alternately on the same server;
* latency with capture on (rate 1.0: every image written) vs off (<= 1.05x), two servers, alternately.

Writes serving_follow.json / .md to --out; --update-docs writes the page docs/benchmarks/serving.md whole.

``--protocols`` instead measures the Open Inference Protocol against MLflow's ``/invocations`` in one run: one
`adreg serve bottle` and one `adreg serve bottle --protocol v2` on the same version, the same images, one image
per request, at 1, 4 and 16 concurrent clients, the wire formats measured in turn within each round (target: V2
p50 within 1.2x of /invocations p50). Writes serving_protocols.json / .md; --update-docs replaces only the page's
protocol section.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from adreg.images import file_to_b64
from benchmarks.harness import (DOCS, command_line, ints, machine_line, quiet, replace_section, run_lines, today,
                                write_page)
from serving.process import Server

ABOUT = (
    "Serving follows the registry: real `adreg serve bottle` processes on 127.0.0.1 (default poll interval) "
    "serving the `production` alias of a store this benchmark prepares itself (sqlite): one 1-shot SubspaceAD "
    "bottle fit by the product (`adreg.fitting.fit_category`), logged as version 1 and, with its threshold "
    "doubled, as version 2. Load: 4 client threads, one image per request (16 bottle test images in turn). "
    "Rows: the time from the alias move (what `adreg promote` does after its gate) to the first answer by the "
    "new version, over every swap of the promote/rollback cycles (target <= 10 s); latency p50 / p99 steady "
    "vs during the cycles (target p99 <= 1.5x steady, 0 errors); the server's resident memory after the first "
    "swap vs after all swaps (<= 1.1x); latency with a same-backbone shadow (`--shadow staging`, staging = "
    "version 2) vs without, alternately on the same server (p50 <= 1.15x); latency with capture at rate 1.0 "
    "(every image written, PNG + JSON) vs off, two servers measured alternately (p50 <= 1.05x)."
)


def prepare(store: Path, quick: bool) -> dict:
    from adreg.data import default_category_dir
    from adreg.detector import Threshold
    from adreg.fitting import FitOptions, fit_category
    from adreg.registry import derive, tracking, versions

    uri = f"sqlite:///{store / 'mlflow.db'}"
    tracking.configure(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    extra = {"aug_count": 2, "holdout": 5} if quick else {}
    result = fit_category(FitOptions(category="bottle", train_dir=str(default_category_dir("bottle")), k_shot=1,
                                     seed=0, device="cpu", **extra), show_progress=False)
    result = dataclasses.replace(result, evaluation=None)
    v1 = derive.register_version(derive.log_fit(result), "bottle").version
    det2 = copy.copy(result.detector)
    det2.threshold = Threshold(result.detector.threshold.value * 2, "bench: doubled")
    v2 = derive.register_version(derive.log_fit(dataclasses.replace(result, detector=det2)), "bottle").version
    versions.promote("bottle", v1, "production", reason="bench")
    return {"uri": uri, "v1": v1, "v2": v2}


class Load:
    """``clients`` threads posting one image per request until stopped; latencies and errors."""

    def __init__(self, url: str, payloads: list[dict], clients: int = 4):
        self.url, self.payloads, self.clients = url, payloads, clients
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(clients)]

    def _run(self, k: int) -> None:
        session = requests.Session()
        i = k
        while not self._stop.is_set():
            payload = self.payloads[i % len(self.payloads)]
            i += self.clients
            t0 = time.perf_counter()
            try:
                resp = session.post(f"{self.url}/invocations", json=payload, timeout=120)
                ok = resp.status_code == 200 and not resp.json()["predictions"][0]["error"]
                err = None if ok else resp.text[:200]
            except Exception as exc:  # noqa: BLE001 - counted
                err = repr(exc)
            with self._lock:
                if err:
                    self.errors.append(err)
                else:
                    self.latencies.append(time.perf_counter() - t0)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        q = statistics.quantiles(lat, n=100) if len(lat) > 1 else lat * 99
        return {"requests": len(lat), "errors": len(self.errors), "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000}


def measure(url: str, payloads: list[dict], requests_n: int, max_seconds: float) -> dict:
    with Load(url, payloads) as load:
        deadline = time.monotonic() + max_seconds
        while len(load.latencies) + len(load.errors) < requests_n and time.monotonic() < deadline:
            time.sleep(0.05)
    return load.summary()


def version_of(url: str, payload: dict) -> str:
    resp = requests.post(f"{url}/invocations", json=payload, timeout=120)
    resp.raise_for_status()
    return resp.json()["predictions"][0]["model_version"]


def swap_to(url: str, payload: dict, version: str, timeout: float = 60) -> float:
    """Move production to ``version``; seconds until the first answer by it."""
    from adreg.registry import versions

    versions.promote("bottle", version, "production", reason="bench cycle")
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if version_of(url, payload) == version:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise RuntimeError(f"version {version} did not answer within {timeout} s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-results/serving-follow")
    p.add_argument("--cycles", type=int, default=20, help="promote/rollback cycles (default 20)")
    p.add_argument("--requests", type=int, default=160, help="requests per latency measurement")
    p.add_argument("--rounds", type=int, default=2, help="alternations for the shadow and capture comparisons")
    p.add_argument("--quick", action="store_true", help="reduced setting: small fit, 3 cycles, 24 requests")
    p.add_argument("--update-docs", action="store_true", help="write docs/benchmarks/serving.md")
    p.add_argument("--protocols", action="store_true",
                   help="only V2 (adreg serve --protocol v2) vs /invocations: p50/p99/throughput at 1, 4, 16 clients")
    p.add_argument("--clients", default="1,4,16", help="--protocols: concurrency levels (default 1,4,16)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.protocols:
        return protocols_main(args, argv)
    if args.quick:
        args.cycles, args.requests, args.rounds = 3, 24, 1
    quiet()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = Path(tempfile.mkdtemp(prefix="adreg-serving-bench-"))
    t0 = time.monotonic()
    prep = prepare(store, args.quick)
    print(f"store ready in {time.monotonic() - t0:.0f} s: {prep}", flush=True)
    from adreg.data import default_category_dir
    from adreg.registry import versions

    test_dir = default_category_dir("bottle") / "test"
    images = [file_to_b64(q) for q in sorted(test_dir.rglob("*.png"))[:16]]
    payloads = [{"dataframe_split": {"columns": ["image"], "data": [[img]]}} for img in images]
    res: dict = {"cycles": args.cycles, "requests": args.requests}
    servers: list[Server] = []
    try:
        main_srv = Server(prep["uri"], "bottle", store / "serve.log", "--shadow", "staging")
        cap_srv = Server(prep["uri"], "bottle", store / "serve-capture.log", "--capture", str(store / "capture"),
                         "--capture-rate", "1.0")
        servers = [main_srv, cap_srv]
        for s in servers:
            s.wait()
        for s in servers:  # warm up
            measure(s.url, payloads, 8, 120)

        res["steady"] = measure(main_srv.url, payloads, args.requests, 600)
        print("steady", res["steady"], flush=True)

        # promote/rollback cycles under 4 clients; every swap timed from the alias move
        swaps, rss = [], {}
        with Load(main_srv.url, payloads) as load:
            for c in range(args.cycles):
                for version in (prep["v2"], prep["v1"]):
                    swaps.append(swap_to(main_srv.url, payloads[0], version))
                    if not rss:
                        time.sleep(1)
                        rss["after_first_swap_mib"] = main_srv.rss_mib()
        res["cycles_load"] = load.summary()
        time.sleep(2)
        rss["after_all_swaps_mib"] = main_srv.rss_mib()
        res["rss"] = rss
        res["swap_s"] = {"n": len(swaps), "median": statistics.median(swaps), "max": max(swaps)}
        print("cycles", res["cycles_load"], res["swap_s"], rss, flush=True)

        # same-backbone shadow vs none, alternately on the same server
        shadow_on, shadow_off = [], []
        for _ in range(args.rounds):
            shadow_off.append(measure(main_srv.url, payloads, args.requests, 600))
            versions.promote("bottle", prep["v2"], "staging", reason="bench shadow")
            time.sleep(6)  # the follower loads the candidate (poll 2 s + load)
            shadow_on.append(measure(main_srv.url, payloads, args.requests, 600))
            import mlflow

            mlflow.MlflowClient().delete_registered_model_alias("adreg-bottle", "staging")
            time.sleep(4)
        res["shadow"] = {"off": shadow_off, "on": shadow_on}
        print("shadow", res["shadow"], flush=True)

        # capture (rate 1.0) vs off: two servers, alternately
        cap_on, cap_off = [], []
        for _ in range(args.rounds):
            cap_off.append(measure(main_srv.url, payloads, args.requests, 600))
            cap_on.append(measure(cap_srv.url, payloads, args.requests, 600))
        res["capture"] = {"off": cap_off, "on": cap_on,
                          "files": len(list((store / "capture").rglob("*.png")))}
        print("capture", res["capture"], flush=True)
    finally:
        for s in servers:
            s.stop()
    (out / "serving_follow.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (out / "serving_follow.md").write_text(md)
    print(md)
    if args.update_docs:
        setting = (f"{'Reduced run (--quick: fit with 2 augmented copies and 5 held-out images)' if args.quick else 'Full run'}: "
                   f"{args.cycles} promote/rollback cycles = {2 * args.cycles} swaps, {args.requests}+ requests per "
                   f"figure, {args.rounds} alternation(s) for shadow and capture.")
        path = write_page("serving", "Serving follows the registry", ABOUT, setting + "\n\n" + md,
                          command_line("serving", argv), machine=machine_line("cpu"))
        print(f"wrote {path}")
    return 0


PROTOCOLS_BEGIN, PROTOCOLS_END = "<!-- protocols: python -m benchmarks serving --protocols -->", "<!-- /protocols -->"
KINDS = {"invocations": "MLflow `/invocations` (dataframe_split JSON)", "v2-json": "V2 REST, JSON (BYTES as base64)",
         "v2-binary": "V2 REST, binary tensor extension"}


def compare_protocols(uri: str, store: Path, images: list[str], clients_levels: list[int], requests_n: int,
                      rounds: int) -> dict:
    """/invocations and V2 servers of the same version; each round measures every wire format in turn."""
    from serving.loadtest import load_kind, protocol_bodies, summarize

    specs = protocol_bodies(images, "adreg-bottle")
    mlflow_srv = Server(uri, "bottle", store / "serve-mlflow.log")
    v2_srv = Server(uri, "bottle", store / "serve-v2.log", "--protocol", "v2")
    servers = [mlflow_srv, v2_srv]
    try:
        for srv in servers:
            srv.wait()
        url = {"invocations": mlflow_srv.url, "v2-json": v2_srv.url, "v2-binary": v2_srv.url}
        for kind, spec in specs.items():  # warm up: every image once, one client
            load_kind(url[kind], kind, spec, 1, len(images), 300)
        runs: dict = {(k, c): [] for k in specs for c in clients_levels}
        for r in range(rounds):
            for clients in clients_levels:
                order = list(specs) if r % 2 == 0 else list(reversed(specs))  # neither always goes first
                for kind in order:
                    run = load_kind(url[kind], kind, specs[kind], clients, requests_n, 600)
                    runs[(kind, clients)].append(run)
                    print(kind, clients, {k: v for k, v in summarize([run]).items()}, flush=True)
        rss = {"invocations_mib": mlflow_srv.rss_mib(), "v2_mib": v2_srv.rss_mib()}
    finally:
        for srv in servers:
            srv.stop()
    rows = [{"kind": k, "clients": c, **summarize(runs[(k, c)])} for c in clients_levels for k in specs]
    return {"rows": rows, "rounds": rounds, "requests_per_run": requests_n, "rss": rss, "images": len(images)}


def protocols_markdown(res: dict) -> str:
    by = {(r["kind"], r["clients"]): r for r in res["rows"]}
    lines = ["| wire format | clients | requests | p50 ms | p99 ms | req/s | p50 vs /invocations | target <= 1.2x |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        base = by[("invocations", r["clients"])]["p50_ms"]
        ratio = r["p50_ms"] / base
        mark = "" if r["kind"] == "invocations" else ("met" if ratio <= 1.2 else "**missed**")
        lines.append(f"| {KINDS[r['kind']]} | {r['clients']} | {r['requests']} | {r['p50_ms']:.0f} | "
                     f"{r['p99_ms']:.0f} | {r['throughput_rps']:.2f} | {ratio:.2f}x | {mark} |")
    errors = sum(r["errors"] for r in res["rows"])
    rss = res["rss"]
    lines += ["", f"{errors} failed requests. Resident memory of the server process groups after the run: "
                  f"/invocations {rss['invocations_mib']:.0f} MiB, V2 {rss['v2_mib']:.0f} MiB."]
    return "\n".join(lines) + "\n"


def protocols_main(args, argv) -> int:
    from adreg.data import default_category_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quiet()
    store = Path(tempfile.mkdtemp(prefix="adreg-protocol-bench-"))
    prep = prepare(store, args.quick)
    test_dir = default_category_dir("bottle") / "test"
    images = [file_to_b64(q) for q in sorted(test_dir.rglob("*.png"))[:16]]
    levels = ints(args.clients)
    res = compare_protocols(prep["uri"], store, images, levels, args.requests, args.rounds)
    (out / "serving_protocols.json").write_text(json.dumps(res, indent=2))
    md = protocols_markdown(res)
    (out / "serving_protocols.md").write_text(md)
    print(md)
    if args.update_docs:
        section = "\n".join([
            "## Open Inference Protocol (V2) vs /invocations", "",
            f"One `adreg serve bottle` (MLflow's scoring server) and one `adreg serve bottle --protocol v2` (KServe "
            f"0.21's model server) serving version {prep['v1']} of the same store, on 127.0.0.1 at once; "
            f"{len(images)} bottle test images in turn, one image per request, base64 in every wire format; "
            f"{args.requests} requests per wire format and concurrency level in each of {args.rounds} rounds, "
            "the formats measured in turn within a round (the order reversed every other round); p50 / p99 over "
            "the pooled latencies of the rounds, throughput = answers / wall time.", "",
            run_lines(machine_line("cpu"), command_line("serving", argv), today()), md])
        path = replace_section(DOCS / "serving.md", PROTOCOLS_BEGIN, PROTOCOLS_END, section, "Serving")
        print(f"wrote {path}")
    return 0


def _p(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def markdown(r: dict) -> str:
    s, c = r["steady"], r["cycles_load"]
    sh_off, sh_on = _p(r["shadow"]["off"], "p50_ms"), _p(r["shadow"]["on"], "p50_ms")
    sh_off99, sh_on99 = _p(r["shadow"]["off"], "p99_ms"), _p(r["shadow"]["on"], "p99_ms")
    cp_off, cp_on = _p(r["capture"]["off"], "p50_ms"), _p(r["capture"]["on"], "p50_ms")
    cp_off99, cp_on99 = _p(r["capture"]["off"], "p99_ms"), _p(r["capture"]["on"], "p99_ms")
    rss = r["rss"]

    def mark(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines = [
        "| measurement | baseline | with | ratio / value | target |",
        "|---|---|---|---|---|",
        f"| promote -> first answer by the new version ({r['swap_s']['n']} swaps) | | median "
        f"{r['swap_s']['median']:.1f} s | max {r['swap_s']['max']:.1f} s | <= 10 s: {mark(r['swap_s']['max'] <= 10)} |",
        f"| latency, 4 clients: steady vs during {r['cycles']} promote/rollback cycles | p50 {s['p50_ms']:.0f} / "
        f"p99 {s['p99_ms']:.0f} ms | p50 {c['p50_ms']:.0f} / p99 {c['p99_ms']:.0f} ms | p99 "
        f"{c['p99_ms'] / s['p99_ms']:.2f}x, {c['errors']} errors in {c['requests'] + c['errors']} requests | "
        f"<= 1.5x, 0 errors: {mark(c['p99_ms'] <= 1.5 * s['p99_ms'] and c['errors'] == 0)} |",
        f"| server RSS: after the first swap vs after {2 * r['cycles']} swaps | {rss['after_first_swap_mib']:.0f} MiB | "
        f"{rss['after_all_swaps_mib']:.0f} MiB | {rss['after_all_swaps_mib'] / rss['after_first_swap_mib']:.2f}x | "
        f"<= 1.1x: {mark(rss['after_all_swaps_mib'] <= 1.1 * rss['after_first_swap_mib'])} |",
        f"| latency, 4 clients: same-backbone shadow off vs on | p50 {sh_off:.0f} / p99 {sh_off99:.0f} ms | "
        f"p50 {sh_on:.0f} / p99 {sh_on99:.0f} ms | p50 {sh_on / sh_off:.2f}x | <= 1.15x: {mark(sh_on <= 1.15 * sh_off)} |",
        f"| latency, 4 clients: capture off vs on (rate 1.0, {r['capture']['files']} files) | p50 {cp_off:.0f} / "
        f"p99 {cp_off99:.0f} ms | p50 {cp_on:.0f} / p99 {cp_on99:.0f} ms | p50 {cp_on / cp_off:.2f}x | "
        f"<= 1.05x: {mark(cp_on <= 1.05 * cp_off)} |",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
