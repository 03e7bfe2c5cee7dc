"""Bounded load test of served models on 127.0.0.1: single-category servers vs the router.

    python -m serving.loadtest --out bench-results/serving        # prepares its own store

It fits one bottle detector, registers it under N category names (bottle-1 ... bottle-8: a stand-in
for a plant with 8 products, all on the same backbone), bundles them into the router, then measures:

* latency p50/p95/p99 and throughput with 1, 4 and 16 concurrent clients (one image per request),
  single-category server vs router (rows spread over the categories);
* REST overhead: one client, batch of 8 images, REST vs in-process ``predict`` of the same model;
* resident memory (whole process group) of N single-category servers vs one router, N = 1, 4, 8.

``protocol_bodies`` / ``load_kind`` / ``summarize`` compare MLflow's ``/invocations`` with the Open Inference
Protocol (``adreg serve --protocol v2``) on the same images: ``python -m benchmarks serving --protocols``.

Every loop is bounded by a request count and a time limit; all servers bind 127.0.0.1 and are stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from adreg.data import default_category_dir
from adreg.images import file_to_b64
from serving.process import Server


def prepare_store(store: Path, n_categories: int) -> tuple[str, list[str]]:
    from adreg.fitting import FitOptions, fit_category
    from adreg.registry import bundle, derive, tracking, versions
    import dataclasses

    uri = f"sqlite:///{store / 'mlflow.db'}"
    tracking.configure(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    result = fit_category(FitOptions(category="bottle-1", train_dir=str(default_category_dir("bottle")), k_shot=1,
                                     seed=0, device="cpu"), show_progress=False)
    names = [f"bottle-{i}" for i in range(1, n_categories + 1)]
    for name in names:
        r = dataclasses.replace(result, options=dataclasses.replace(result.options, category=name))
        versions.promote(name, derive.register_version(derive.log_fit(r), name).version, "production")
    router = bundle.build_router(names)
    versions.promote("router", router.version, "production")
    return uri, names


def drive(send, clients: int, max_requests: int, max_seconds: float) -> dict:
    """Up to ``max_requests`` calls of ``send(session, i)`` from ``clients`` threads, each with its own HTTP
    session (stops at ``max_seconds``). ``send`` returns an error text or None; an exception counts as an
    error. Returns the latencies (s) of the calls without error, the errors and the wall time."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(max_requests))
    deadline = time.monotonic() + max_seconds

    def worker():
        session = requests.Session()
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                err = send(session, i)
            except Exception as exc:  # noqa: BLE001 - counted
                err = repr(exc)
            with lock:
                (errors.append(err) if err else latencies.append(time.perf_counter() - t0))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "errors": errors, "wall_s": time.perf_counter() - t0}


def load(url: str, payloads: list[dict], clients: int, max_requests: int, max_seconds: float) -> dict:
    """Send up to ``max_requests`` requests from ``clients`` threads (stops at ``max_seconds``); a failed
    request fails the measurement."""
    def send(session, i):
        resp = session.post(f"{url}/invocations", json=payloads[i % len(payloads)], timeout=120)
        return None if resp.ok else f"HTTP {resp.status_code}: {resp.text[:200]}"

    run = drive(send, clients, max_requests, max_seconds)
    if run["errors"]:
        raise RuntimeError(f"{len(run['errors'])} requests failed; the first: {run['errors'][0]}")
    latencies = run["latencies"]
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"requests": len(latencies), "p50_ms": q[49] * 1000, "p95_ms": q[94] * 1000, "p99_ms": q[98] * 1000,
            "throughput_rps": len(latencies) / run["wall_s"]}


def rest_overhead(url: str, category: str, batch: list[str], rounds: int = 10) -> dict:
    """Median latency of one batch in-process vs over REST (same model, same images), interleaved so
    that drift of the machine hits both alike; 3 warm-up rounds first."""
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(f"models:/adreg-{category}@production", model_config={"device": "cpu"})
    frame = pd.DataFrame({"image": batch})
    payload = json.dumps(body(["image"], [[b] for b in batch]))
    session = requests.Session()
    inproc, rest = [], []
    for _ in range(rounds + 3):
        t0 = time.perf_counter()
        model.predict(frame)
        inproc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        session.post(f"{url}/invocations", data=payload, headers={"Content-Type": "application/json"},
                     timeout=120).raise_for_status()
        rest.append(time.perf_counter() - t0)
    a, b = statistics.median(inproc[3:]), statistics.median(rest[3:])
    return {"batch": len(batch), "in_process_ms": a * 1000, "rest_p50_ms": b * 1000, "overhead_pct": (b - a) / a * 100,
            "payload_mib": len(payload) / 2 ** 20}


def body(columns: list[str], rows: list[list[str]]) -> dict:
    return {"dataframe_split": {"columns": columns, "data": rows}}


# -- MLflow's /invocations vs the Open Inference Protocol (adreg serve --protocol v2) ------------------------------
JSON = {"Content-Type": "application/json"}


def protocol_bodies(images_b64: list[str], model: str) -> dict[str, dict]:
    """Request bodies, one image each, the same images, per wire format: MLflow's ``/invocations``
    (``dataframe_split`` JSON), V2 JSON (a BYTES tensor of base64 text) and V2 with the binary tensor extension
    (the same base64 text as raw tensor bytes after the JSON header: KServe 0.21 takes only UTF-8 text in a
    BYTES tensor over REST; raw image bytes go over gRPC)."""
    import struct

    v2_path = f"/v2/models/{model}/infer"
    out = {"invocations": {"path": "/invocations", "headers": JSON,
                           "bodies": [json.dumps(body(["image"], [[img]])).encode() for img in images_b64]},
           "v2-json": {"path": v2_path, "headers": JSON,
                       "bodies": [json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                          "data": [img]}]}).encode() for img in images_b64]}}
    binary = []
    for img in images_b64:
        raw = img.encode("ascii")
        head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": 4 + len(raw)}}]}).encode()
        binary.append((head + struct.pack("<I", len(raw)) + raw, len(head)))
    out["v2-binary"] = {"path": v2_path, "bodies": [b for b, _ in binary],
                        "headers": [{"Content-Type": "application/octet-stream",
                                     "Inference-Header-Content-Length": str(n)} for _, n in binary]}
    return out


def row_error(kind: str, resp) -> str | None:
    """None when the answer scored its image, else why not (status, or the row's error)."""
    if resp.status_code != 200:
        return f"HTTP {resp.status_code}: {resp.text[:200]}"
    data = resp.json()
    if kind == "invocations":
        err = data["predictions"][0]["error"]
    else:
        err = next(o["data"][0] for o in data["outputs"] if o["name"] == "error")
    return err or None


def load_kind(url: str, kind: str, spec: dict, clients: int, max_requests: int, max_seconds: float) -> dict:
    """``drive`` for one wire format of ``protocol_bodies``: latencies (s), errors and wall time."""
    bodies, headers = spec["bodies"], spec["headers"]

    def send(session, i):
        h = headers[i % len(bodies)] if isinstance(headers, list) else headers
        return row_error(kind, session.post(url + spec["path"], data=bodies[i % len(bodies)], headers=h, timeout=120))

    return drive(send, clients, max_requests, max_seconds)


def summarize(runs: list[dict]) -> dict:
    """p50 / p99 over the pooled latencies of ``runs``; throughput = answers / wall time."""
    lat = sorted(x for r in runs for x in r["latencies"])
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else lat * 99
    return {"requests": len(lat), "errors": sum(len(r["errors"]) for r in runs), "p50_ms": q[49] * 1000,
            "p99_ms": q[98] * 1000, "throughput_rps": len(lat) / sum(r["wall_s"] for r in runs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-results/serving")
    p.add_argument("--categories", type=int, default=8)
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    p.add_argument("--seconds", type=float, default=90, help="time limit per concurrency level")
    p.add_argument("--parts", default="latency,overhead,memory", help="which measurements to run")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ADREG_PROGRESS", "0")
    store = Path(tempfile.mkdtemp(prefix="adreg-loadtest-"))
    uri, names = prepare_store(store, args.categories)
    test_dir = default_category_dir("bottle") / "test"
    images = [file_to_b64(p) for p in sorted(test_dir.rglob("*.png"))[:32]]
    results: dict = {"latency": [], "overhead": {}, "memory": []}
    servers: list[Server] = []
    try:
        single, router = Server(uri, names[0], store / "single.log"), Server(uri, "router", store / "router.log")
        servers += [single, router]
        single.wait()
        router.wait()
        single_payloads = [body(["image"], [[img]]) for img in images]
        router_payloads = [body(["category", "image"], [[names[i % len(names)], img]]) for i, img in enumerate(images)]
        for url, payloads in ((single.url, single_payloads), (router.url, router_payloads)):  # warm up
            load(url, payloads, 1, 2, 60)
        for clients in ((1, 4, 16) if "latency" in args.parts else ()):
            for kind, url, payloads in (("single", single.url, single_payloads), ("router", router.url, router_payloads)):
                r = load(url, payloads, clients, args.requests, args.seconds)
                results["latency"].append({"server": kind, "clients": clients, **r})
                print(json.dumps(results["latency"][-1]), flush=True)

        if "overhead" in args.parts:
            results["overhead"] = rest_overhead(single.url, names[0], images[:8])
            print(json.dumps(results["overhead"]), flush=True)
        for s in servers:
            s.stop()
        servers = []

        # resident memory: N single-category servers vs one router with N categories
        for n in ((1, 4, 8) if "memory" in args.parts else ()):
            if n > len(names):
                break
            from adreg.registry import bundle, versions

            router_n = bundle.build_router(names[:n])
            versions.promote("router", router_n.version, "production")
            group = [Server(uri, name, store / f"{name}-{n}.log") for name in names[:n]]
            rtr = Server(uri, "router", store / f"router-{n}.log")
            servers = group + [rtr]
            for s in servers:
                s.wait()
            for s in servers:  # one request each, so everything is loaded and touched
                requests.post(f"{s.url}/invocations", timeout=120, json=(
                    router_payloads[0] if s is rtr else single_payloads[0])).raise_for_status()
            singles = sum(s.rss_mib() for s in group)
            results["memory"].append({"categories": n, "single_servers_mib": singles, "router_mib": rtr.rss_mib(),
                                      "one_single_server_mib": group[0].rss_mib()})
            print(json.dumps(results["memory"][-1]), flush=True)
            for s in servers:
                s.stop()
            servers = []
    finally:
        for s in servers:
            s.stop()
    (out / "serving.json").write_text(json.dumps(results, indent=2))
    (out / "serving.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    lines = ["| server | clients | requests | p50 ms | p95 ms | p99 ms | req/s |", "|---|---|---|---|---|---|---|"]
    for r in results["latency"]:
        lines.append(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
                     f"{r['p99_ms']:.0f} | {r['throughput_rps']:.2f} |")
    o = results.get("overhead") or {}
    if o:
        lines += ["", f"REST overhead at batch {o['batch']} ({o['payload_mib']:.1f} MiB of base64 PNGs per request): "
                      f"in-process {o['in_process_ms']:.0f} ms, REST {o['rest_p50_ms']:.0f} ms (medians, interleaved) "
                      f"-> **{o['overhead_pct']:.1f}%**"]
    if results["memory"]:
        lines += ["", "| categories | N single servers MiB | router MiB | router / one single server |",
                  "|---|---|---|---|"]
        for m in results["memory"]:
            lines.append(f"| {m['categories']} | {m['single_servers_mib']:.0f} | {m['router_mib']:.0f} | "
                         f"{m['router_mib'] / m['one_single_server_mib']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
