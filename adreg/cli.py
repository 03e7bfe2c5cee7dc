"""The ``adreg`` command line: fit, promote, rollback, history, compare, models, serve, predict, quickstart."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from adreg.errors import AdregError  # noqa: E402

KEY_ORDER = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "threshold",
             "fit_seconds", "latency_ms_per_image")


def _parse_param(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _print_table(rows: list[dict], columns: list[str]) -> None:
    if not rows:
        return
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


# -- fit ---------------------------------------------------------------------------------------------
def add_fit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--category", required=True, help="product category, e.g. bottle (model name adreg-<category>)")
    p.add_argument("--method", default="subspace", help="anomaly method (default: subspace)")
    p.add_argument("--train-dir", help="MVTec category folder or folder of good images "
                                       "(default: the bundled data for --category)")
    p.add_argument("--val-dir", help="validation folder: good/ and optional defect sub-folders")
    p.add_argument("--test-dir", help="test folder: good/ and defect sub-folders (MVTec layout)")
    p.add_argument("--k-shot", type=int, default=1, help="number of good images to fit on (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shot selection and augmentation")
    p.add_argument("--backbone", default="efficientnet-lite0",
                   help="efficientnet-lite0 (offline default), efficientnet-lite2, or hf:<hub id or local dir>")
    p.add_argument("--layers", type=int, nargs="+", help="backbone layers (Lite0 blocks, default 4 10; "
                                                          "HF hidden_states indices, default -4 -5)")
    p.add_argument("--image-size", type=int, help="square input size (default 320 for CNNs, 448 for ViTs)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="backbone precision on CUDA")
    p.add_argument("--augment", default="rotate", help="comma list of none,rotate,hflip,vflip,affine,color")
    p.add_argument("--aug-count", type=int, default=30, help="augmented copies per shot (default 30)")
    p.add_argument("--top-fraction", type=float,
                   help="image score = mean of this top fraction of map pixels (default 0.01; 0 = maximum; "
                        "small defects on large parts want less, e.g. 0.001 on magnetic tiles)")
    p.add_argument("--sigma", type=float, default=4.0, help="Gaussian smoothing of anomaly maps, pixels (default 4)")
    p.add_argument("--pca-ev", type=float, help="SubspaceAD explained-variance ratio to keep (default 0.99)")
    p.add_argument("--param", type=_parse_param, action="append", default=[], metavar="KEY=VALUE",
                   help="other method hyper-parameter, repeatable")
    p.add_argument("--threshold-quantile", type=float, default=0.99,
                   help="quantile of good validation scores used as threshold (default 0.99)")
    p.add_argument("--holdout", type=int, default=20,
                   help="good training images held out to calibrate the threshold when there is no --val-dir")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--register", action="store_true", help="register the model as a new version of adreg-<category>")
    p.add_argument("--promote", metavar="ALIAS", help="after registering, point ALIAS (e.g. staging) at it")
    p.add_argument("--export", choices=["onnx", "onnxruntime", "openvino"],
                   help="also export the backbone and serve the model through this CPU runtime (onnx = onnxruntime)")


def fit_options_from_args(args):
    from adreg.fitting import FitOptions

    method_params = dict(args.param)
    if args.pca_ev is not None:
        method_params["pca_ev"] = args.pca_ev
    return FitOptions(
        category=args.category, method=args.method, train_dir=args.train_dir, val_dir=args.val_dir,
        test_dir=args.test_dir, k_shot=args.k_shot, seed=args.seed, backbone=args.backbone, layers=args.layers,
        image_size=args.image_size, precision=args.precision, augment=args.augment, aug_count=args.aug_count,
        top_fraction=args.top_fraction, sigma=args.sigma, threshold_quantile=args.threshold_quantile,
        holdout=args.holdout, batch_size=args.batch_size, device=args.device, method_params=method_params)


def run_fit(opts, register: bool, promote_alias: str | None = None, tracking_uri: str | None = None,
            export: str | None = None):
    """Fit, log, optionally register and promote; prints a summary; returns (result, logged)."""
    from adreg.fitting import fit_category
    from adreg.registry import tracking, versions

    uri = tracking.configure(tracking_uri)
    result = fit_category(opts)
    logged = tracking.log_fit(result, export=export)
    metrics = result.metrics()
    print(f"\nfitted {opts.method} for {opts.category!r}: {len(result.shots)} shot(s), "
          f"threshold {result.detector.threshold.value:.4g} ({result.detector.threshold.rule}, "
          f"from {result.calibration_source})")
    _print_table([{k: f"{metrics[k]:.4f}" for k in KEY_ORDER if k in metrics}],
                 [k for k in KEY_ORDER if k in metrics])
    print(f"run: {logged.run_id} (tracking: {uri})")
    if register or promote_alias:
        logged.version = versions.register(logged.model_uri, logged.run_id, opts.category, metrics)
        logged.registered_name = versions.model_name(opts.category)
        print(f"registered {logged.registered_name} version {logged.version}")
        if promote_alias:
            from adreg.registry import lifecycle

            if result.evaluation is None:
                raise AdregError("--promote needs a test set to run the promotion gate on; give --test-dir")
            promo, report = lifecycle.promote_gated(opts.category, logged.version, promote_alias,
                                                    reason="fit --promote", device=opts.device,
                                                    candidate_metrics=result.evaluation.metrics)
            if promo is None:
                print(f"not promoted to {promote_alias!r}: " + "; ".join(report.failures))
                logged.promoted = False
            else:
                print(f"promoted version {promo.version} to {promo.alias!r}: {promo.model_uri}")
                logged.promoted = True
    return result, logged


def cmd_fit(args) -> int:
    _, logged = run_fit(fit_options_from_args(args), args.register, args.promote, args.tracking_uri,
                        export=getattr(args, "export", None))
    return 1 if logged.promoted is False else 0


# -- registry ----------------------------------------------------------------------------------------
def _json_out(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def cmd_promote(args) -> int:
    from adreg.registry import lifecycle, tracking, versions

    tracking.configure(args.tracking_uri)
    policy = lifecycle.GatePolicy(args.min_image_auroc, args.min_pixel_auroc, args.tolerance)
    promo, report = lifecycle.promote_gated(args.category, args.version, args.alias, policy, force=args.force,
                                            reason=args.reason or "", eval_dir=args.eval_dir, device=args.device)
    if args.json:
        _json_out({"category": args.category, "alias": args.alias, "version": str(args.version),
                   "promoted": promo is not None, "forced": promo is not None and not report.passed,
                   "previous": None if promo is None else promo.previous,
                   "model_uri": None if promo is None else promo.model_uri,
                   "by": None if promo is None else promo.by, "identity": None if promo is None else promo.identity,
                   "event_run": None if promo is None else promo.event_run,
                   "gate": {**report.summary(), "floors": policy.floors(), "tolerance": policy.tolerance}})
        return 0 if promo is not None else 1
    rows = [{"model": f"v{args.version} (candidate)", **{k: f"{report.candidate.get(k, float('nan')):.4f}"
                                                         for k in lifecycle.COMPARED}}]
    if report.baseline is not None:
        rows.append({"model": f"v{report.baseline_version} (current {args.alias})",
                     **{k: f"{report.baseline.get(k, float('nan')):.4f}" for k in lifecycle.COMPARED}})
    print(f"gate on {report.eval_set} (floors: image {policy.min_image_auroc}, pixel {policy.min_pixel_auroc}; "
          f"tolerance {policy.tolerance})")
    _print_table(rows, ["model", *lifecycle.COMPARED])
    from adreg.pyfunc.shadow import describe_latest

    print(describe_latest(args.category, args.version) or "", end="")
    for failure in report.failures:
        print(f"  gate: {failure}")
    if promo is None:
        print(f"REFUSED: version {args.version} stays out of {args.alias!r} (use --force to override, recorded)")
        return 1
    was = f"(was version {promo.previous})" if promo.previous else "(new alias)"
    forced = " FORCED past a failed gate" if not report.passed else ""
    print(f"{promo.alias} -> {versions.model_name(args.category)} version {promo.version} {was}{forced}")
    print(f"model URI: {promo.model_uri} (by {promo.by}, {promo.identity})")
    return 0


def cmd_rollback(args) -> int:
    from adreg.registry import lifecycle, tracking

    tracking.configure(args.tracking_uri)
    promo = lifecycle.rollback(args.category, args.alias, reason=args.reason or "")
    if args.json:
        _json_out({"category": args.category, "alias": promo.alias, "version": promo.version,
                   "previous": promo.previous, "model_uri": promo.model_uri, "by": promo.by,
                   "identity": promo.identity, "event_run": promo.event_run})
        return 0
    print(f"rolled back {promo.alias}: version {promo.previous} -> version {promo.version} ({promo.model_uri})")
    return 0


def cmd_history(args) -> int:
    from adreg.registry import lifecycle, tracking, versions

    tracking.configure(args.tracking_uri)
    if args.json:
        _json_out(versions.history(args.category))
        return 0
    rows = lifecycle.history_rows(args.category)
    if not rows:
        print(f"no promotions recorded for {args.category!r}")
        return 0
    _print_table(rows, ["at", "action", "alias", "version", "from", "by", "identity", "reason", "gate"])
    return 0


def cmd_compare(args) -> int:
    from adreg.registry import lifecycle, tracking

    tracking.configure(args.tracking_uri)
    rows = lifecycle.compare(args.category, args.v1, args.v2)
    if args.json:
        _json_out(rows)
        return 0
    _print_table(rows, list(rows[0]))
    return 0


def cmd_models(args) -> int:
    from adreg.registry import tracking, versions

    tracking.configure(args.tracking_uri)
    rows = versions.list_versions()
    from adreg.pyfunc.status import annotate_rows

    annotate_rows(rows)  # "serving": live servers per version (adreg status CATEGORY for details)
    if args.json:
        _json_out(rows)
        return 0
    if not rows:
        print("no models registered yet; run `adreg fit --category NAME --register`")
        return 0
    _print_table(rows, ["category", "version", "aliases", "method", "image_auroc", "pixel_auroc", "aupro",
                        "image_f1_max", "threshold", "created", "serving"])
    return 0


# -- governance: grants (admins), identity -------------------------------------------------------------
def cmd_grant(args) -> int:
    from adreg.registry import governance, tracking

    tracking.configure(args.tracking_uri)
    done = governance.grant(args.category, args.user, args.level)
    if args.json:
        _json_out(done)
        return 0
    for g in done:
        print(f"granted {g['permission']} on {g['resource_type']} {g['resource']} to {g['user']}")
    return 0


def cmd_whoami(args) -> int:
    from adreg.registry import governance, tracking

    tracking.configure(args.tracking_uri)
    ident = governance.identity()
    out = {"user": ident.user, "identity": ident.kind, "is_admin": ident.is_admin, "server": ident.server}
    if args.category:
        out["permission"] = governance.permission("registered_model", governance.model_name(args.category))
    if args.json:
        _json_out(out)
    else:
        print(" ".join(f"{k}={v}" for k, v in out.items() if v is not None))
    return 0


def _add_governance_commands(sub) -> None:
    p = sub.add_parser("grant", help="admins: give a user a role on a category (READ reader, EDIT editor, "
                                     "MANAGE manager) on an authenticated MLflow server")
    p.add_argument("category")
    p.add_argument("user")
    p.add_argument("level", type=str.upper, choices=["READ", "EDIT", "MANAGE"])
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_grant)
    p = sub.add_parser("whoami", help="the acting user and what kind of identity it is (authenticated or label)")
    p.add_argument("--category", help="also show the permission on this category")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_whoami)


# -- serving and prediction --------------------------------------------------------------------------
def serve_command(model_uri: str, host: str, port: int, workers: int = 1) -> list[str]:
    mlflow_bin = shutil.which("mlflow") or "mlflow"
    return [mlflow_bin, "models", "serve", "-m", model_uri, "--env-manager", "local",
            "--host", host, "--port", str(port), "--workers", str(workers)]


def serve_env(tracking_uri: str, device: str, return_map: bool, precision: str = "fp32", **config) -> dict:
    """Environment of `mlflow models serve`: the store, and SERVING_MODEL_CONFIG (keys of the served
    model's DEFAULT_MODEL_CONFIG: follow_alias, poll_seconds, shadow_alias, capture_*, max_*, ...)."""
    model_config = {"device": device, "return_map": return_map, "precision": precision, **config}
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_DISABLE_TELEMETRY="true",
               SERVING_MODEL_CONFIG=json.dumps(model_config))
    # uvicorn must be on PATH for `mlflow models serve`; it sits beside this interpreter.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def check_port_free(host: str, port: int) -> None:
    """A one-line error (exit 2) when something already listens on host:port."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise AdregError(f"cannot serve on host {host!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is not "in use"
        try:
            s.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AdregError(f"port {port} on {host} is already in use; stop what listens there "
                                 f"(`adreg status CATEGORY` lists running adreg servers) or pick another --port") from None
            raise AdregError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def run_server(cmd: list[str], env: dict) -> int:
    """Run MLflow's server in its own process group and hand SIGTERM/SIGINT/SIGHUP on to the whole group
    (mlflow and its uvicorn worker): stopping `adreg serve` stops serving. Whatever is left of the group
    after the child exits gets SIGKILL after a grace period."""
    import signal
    import time

    proc = subprocess.Popen(cmd, env=env, process_group=0)
    stopping = []

    def forward(signum, _frame):
        stopping.append(signum)
        try:
            os.killpg(proc.pid, signum if signum != signal.SIGHUP else signal.SIGTERM)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        rc = proc.wait()
    finally:
        # the uvicorn worker may outlive mlflow by a moment (it finishes requests and reports itself
        # stopped); give it a grace period, then never leave it behind
        if not stopping:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        while True:
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stopping else rc


def cmd_serve(args) -> int:
    from adreg.pyfunc.status import default_server_id
    from adreg.registry import tracking, versions

    uri = tracking.configure(args.tracking_uri)
    check_port_free(args.host, args.port)
    pin = args.pin or args.version
    config = {"poll_seconds": args.poll_seconds, "max_request_mib": args.max_request_mib, "max_rows": args.max_rows,
              "server_host": args.host, "server_port": args.port,
              "server_id": args.server_id or default_server_id(args.host, args.port)}
    if args.category == "router":  # each bundled category follows its own alias (adreg.pyfunc.router)
        model_uri = versions.model_uri(args.category, args.alias, pin)
        config.update(follow_alias="" if pin else args.alias)
        what = f"{model_uri}, each category following @{args.alias}" if not pin else model_uri
    else:
        name = versions.model_name(args.category)
        if pin:
            version = versions.model_uri(args.category, None, pin).rsplit("/", 1)[1]
            what = f"{name} version {version} (pinned)"
        else:
            versions.model_uri(args.category, args.alias)  # a helpful error when the alias is missing
            import mlflow

            version = str(mlflow.MlflowClient().get_model_version_by_alias(name, args.alias).version)
            what = f"{name}@{args.alias} (now version {version}; follows the alias every {args.poll_seconds:g} s)"
        model_uri = f"models:/{name}/{version}"
        config.update(follow_alias="" if pin else args.alias, registered_model=name, model_version=version)
    if args.shadow:
        config["shadow_alias"] = args.shadow
        what += f", shadowing @{args.shadow}"
    if args.capture:
        config.update(capture_dir=str(Path(args.capture).resolve()), capture_rate=args.capture_rate,
                      capture_max_mib=args.capture_max_mib)
        what += f", capturing {args.capture_rate:g} of images into {args.capture} (<= {args.capture_max_mib:g} MiB)"
    cmd = serve_command(model_uri, args.host, args.port, args.workers)
    print(f"serving {what} on http://{args.host}:{args.port}/invocations (device {args.device}, "
          f"server id {config['server_id']})")
    print("$ " + shlex.join(cmd), flush=True)
    return run_server(cmd, serve_env(uri, args.device, args.return_map, args.precision, **config))


def cmd_status(args) -> int:
    import mlflow

    from adreg.pyfunc import status as server_status
    from adreg.registry import tracking, versions

    tracking.configure(args.tracking_uri)
    name = versions.model_name(args.category) if args.category != "router" else "adreg-router"
    try:
        model = mlflow.MlflowClient().get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        raise AdregError(f"unknown category {args.category!r}; `adreg models` lists the registered ones") from None
    aliases = {a: str(v) for a, v in sorted(model.aliases.items())}
    entries = server_status.servers(model)
    if args.json:
        _json_out({"model": name, "aliases": aliases, "servers": entries})
        return 0
    print(f"{name}: " + (", ".join(f"{a} = {v}" for a, v in aliases.items()) or "no aliases"))
    if not entries:
        print("no server has reported serving it (servers started by `adreg serve` report here)")
        return 0
    rows = []
    for e in entries:
        swap = e.get("last_swap") or {}
        fail = e.get("last_failure") or {}
        rows.append({"server": e.get("server"), "state": "stale" if e["stale"] else "live",
                     "version": e.get("version"), "alias": e.get("alias") or "(pinned)", "since": e.get("since", "")[:19],
                     "last swap": f"{swap.get('from')} -> {swap.get('to')} at {swap.get('at', '')[11:19]}" if swap else "",
                     "last failure": f"v{fail.get('version')}: {fail.get('reason', '')[:60]}" if fail else "",
                     "shadow": f"{e['shadow']['alias']} = {e['shadow']['version']}" if e.get("shadow") else "",
                     "heartbeat": f"{e['age_s']:.0f} s ago"})
    _print_table(rows, list(rows[0]))
    for e in entries:
        print("  " + server_status.describe(e, aliases))
    return 0


def _add_serve_arguments(p) -> None:
    from adreg.pyfunc import DEFAULT_MAX_REQUEST_MIB, DEFAULT_MAX_ROWS, DEFAULT_POLL_SECONDS

    p.add_argument("--pin", metavar="VERSION", help="serve this version and do not follow the alias")
    p.add_argument("--poll-seconds", type=float, default=DEFAULT_POLL_SECONDS,
                   help=f"how often the server checks the alias (default {DEFAULT_POLL_SECONDS:g})")
    p.add_argument("--shadow", metavar="ALIAS", help="also score every request with this alias (e.g. staging), "
                                                     "off the response path; comparisons logged to MLflow")
    p.add_argument("--capture", metavar="DIR", help="write a sample of scored images (with score, verdict, "
                                                    "version) into DIR/<category>/{ok,flagged}/<date>/")
    p.add_argument("--capture-rate", type=float, default=0.05, help="fraction of images captured (default 0.05)")
    p.add_argument("--capture-max-mib", type=float, default=1024,
                   help="disk budget of the capture folder; oldest dropped first (default 1024)")
    p.add_argument("--max-request-mib", type=float, default=DEFAULT_MAX_REQUEST_MIB,
                   help=f"refuse requests with more image data (413; default {DEFAULT_MAX_REQUEST_MIB})")
    p.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS,
                   help=f"refuse requests with more rows (400; default {DEFAULT_MAX_ROWS})")
    p.add_argument("--server-id", help="name in status reports (default <hostname>-<host>-<port>)")


def _add_status_commands(sub) -> None:
    p = sub.add_parser("status", help="aliases of a category and the running servers serving it (stale marked)")
    p.add_argument("category")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_status)


def cmd_predict(args) -> int:
    import mlflow
    import pandas as pd

    from adreg.images import file_to_b64
    from adreg.registry import tracking, versions

    tracking.configure(args.tracking_uri)
    model_uri = versions.model_uri(args.category, args.alias, args.version)
    model = mlflow.pyfunc.load_model(model_uri, model_config={"device": args.device,
                                                              "return_map": bool(args.save_maps)})
    paths = [Path(p) for p in args.images]
    payload, read_errors = [], {}
    for i, p in enumerate(paths):
        try:
            payload.append(file_to_b64(p))
        except OSError as exc:
            payload.append("")
            read_errors[i] = f"{p}: {exc.strerror or exc}"
    out = model.predict(pd.DataFrame({"image": payload}))
    rows = []
    for i, (p, (_, r)) in enumerate(zip(paths, out.iterrows())):
        error = read_errors.get(i) or r["error"].replace(f"row {i}", str(p), 1)
        row = {"image": str(p), "score": "" if error else f"{r['score']:.5g}",
               "anomalous": "" if error else ("YES" if r["is_anomaly"] else "no"), "error": error}
        if args.save_maps and not error:
            import base64

            target = Path(args.save_maps) / f"{i:03d}_{p.parent.name}_{p.stem}_map.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(r["anomaly_map"]))
            row["map"] = str(target)
        rows.append(row)
    print(f"{model_uri} (threshold {out['threshold'].iloc[0]:.4g})")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows, list(rows[0]))
    return 1 if any(r["error"] for r in rows) else 0


def cmd_serve_bundle(args) -> int:
    from adreg.registry import bundle, tracking, versions

    tracking.configure(args.tracking_uri)
    logged = bundle.build_router(args.categories, args.alias)
    print(f"registered {logged.registered_name} version {logged.version}: categories {', '.join(args.categories)} "
          f"(each at @{args.alias})")
    promo = versions.promote(bundle.ROUTER, logged.version, args.promote, reason="serve-bundle")
    print(f"{promo.alias} -> version {promo.version}: serve it with `adreg serve router` ({promo.model_uri}); "
          "requests carry a 'category' column beside 'image'")
    return 0


# -- export (ONNX Runtime / OpenVINO backbone) --------------------------------------------------------
def cmd_export(args) -> int:
    from adreg.registry import tracking
    from adreg.registry.export import export_version

    tracking.configure(args.tracking_uri)
    logged = export_version(args.category, args.version, args.runtime)
    print(f"registered {logged.registered_name} version {logged.version}: version {args.version} with its "
          f"backbone on {args.runtime} (served with runtime {args.runtime} unless model_config overrides it)")
    print(f"run: {logged.run_id}; promote it with `adreg promote {args.category} --version {logged.version}`")
    return 0


def _add_export_commands(sub) -> None:
    p = sub.add_parser("export", help="register a new version whose backbone runs on ONNX Runtime or OpenVINO (CPU)")
    p.add_argument("category")
    p.add_argument("--version", required=True, help="the registered version to export")
    p.add_argument("--runtime", default="openvino", choices=["onnxruntime", "openvino"],
                   help="CPU runtime of the exported backbone (default openvino)")
    p.set_defaults(func=cmd_export)


# -- batch scoring (in-process or Spark) --------------------------------------------------------------
def cmd_score(args) -> int:
    from adreg.batch import resolve_model, score_images
    from adreg.registry import tracking

    tracking.configure(args.tracking_uri)
    ref = resolve_model(args.category, None if args.version else args.alias, args.version)  # before anything heavy
    if args.engine == "spark":
        if args.save_maps:
            raise AdregError("--save-maps works with the in-process engine only; drop it or use --engine inprocess")
        from adreg.batch.spark import score_with_spark

        res = score_with_spark(args.category, args.inputs, args.output, master=args.master,
                               batch_size=args.batch_size, task_cpus=args.task_cpus, partitions=args.partitions,
                               resume=args.resume, device=args.device, env_manager=args.env_manager, model=ref,
                               **({"glob": args.glob} if args.glob else {}))
    else:
        res = score_images(args.category, args.inputs, args.output, batch_size=args.batch_size,
                           save_maps=args.save_maps, resume=args.resume, device=args.device, model=ref)
    alias = f" (@{ref.alias})" if ref.alias else ""
    print(f"{ref.name} version {ref.version}{alias}: scored {res.scored} image(s), {res.failed} failed, "
          f"{res.skipped} skipped (already in output), {res.seconds:.1f} s ({res.images_per_s:.1f} img/s)")
    print(f"output: {res.output} ({res.output_rows} rows, {res.output_failed} with an error)")
    return 1 if res.output_failed else 0


def _add_score_commands(sub) -> None:
    p = sub.add_parser("score", help="batch-score image files/folders/globs into a parquet dataset "
                                      "(in-process or on Apache Spark)")
    p.add_argument("category")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--output", "-o", required=True, help="output parquet dataset (a folder of part files)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--alias", default="production", help="alias resolved to ONE version for the whole job")
    which.add_argument("--version", help="a version number instead of the alias")
    p.add_argument("--engine", choices=["inprocess", "spark"], default="inprocess",
                   help="inprocess: this process (default); spark: mlflow.pyfunc.spark_udf on --master")
    p.add_argument("--master", help="Spark master: local[N], spark://host:7077, yarn, ... "
                                    "(default: spark-submit's --master, else local[2])")
    p.add_argument("--env-manager", default="local", choices=["local", "virtualenv", "uv", "conda"],
                   help="Spark: how executors get the model's Python environment (mlflow spark_udf; default local)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per model call (Spark: Arrow records per batch) (default 16)")
    p.add_argument("--task-cpus", type=int, default=1, help="Spark: cores (torch threads) per task (default 1)")
    p.add_argument("--partitions", type=int, help="Spark: number of tasks (default: one per core in local mode)")
    p.add_argument("--glob", help="Spark: file-name filter inside folders (default: image extensions)")
    p.add_argument("--save-maps", metavar="DIR", help="in-process: write anomaly maps as PNGs into DIR")
    p.add_argument("--resume", action="store_true", help="skip inputs already in --output and append the rest")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.set_defaults(func=cmd_score)


# -- update and drift: grow a version from production images; watch production for drift ------------
def _print_update(result, logged) -> None:
    r = result
    print(f"\nupdate of {r.parent_model} version {r.parent_version} (run {r.parent_run_id}), "
          f"method {r.options.method}")
    if r.duplicates:
        print(f"  skipped {len(r.duplicates)} duplicate(s) (same sha256 as an image the parent learned from or "
              "calibrated on, or as an earlier one here):")
        for d in r.duplicates:
            print(f"    {d['path']}  = {d['duplicate_of']}")
    if r.unreadable:
        print(f"  skipped {len(r.unreadable)} unreadable file(s):")
        for u in r.unreadable:
            print(f"    {u['path']}: {u['error']}")
    if r.suspects:
        what = "TAKEN IN (--include-suspects)" if r.include_suspects else \
            "held out (check them; --include-suspects takes them in)"
        print(f"  {len(r.suspects)} suspect(s) score above version {r.parent_version}'s threshold "
              f"{r.parent_threshold:.4g}: {what}")
        for s in r.suspects:
            print(f"    {s['path']}  score {s['score']:.4g}")
    print(f"  {r.options.method}: {r.method_report.get('what', 'updated')}")
    print(f"  training images {r.n_parent_training} -> {r.n_parent_training + len(r.added)} (+{len(r.added)}); "
          f"threshold {r.parent_threshold:.4g} -> {r.detector.threshold.value:.4g} ({r.detector.threshold.rule}, "
          f"from {r.calibration_source})")
    keys = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "threshold"]
    new = r.metrics()
    rows = [{"model": f"v{r.parent_version} (parent)", **{k: f"{r.parent_metrics[k]:.4f}" for k in keys
                                                           if k in r.parent_metrics}},
            {"model": "update", **{k: f"{new[k]:.4f}" for k in keys if k in new}}]
    print(f"evaluated on version {r.parent_version}'s evaluation set ({r.data.source}):")
    _print_table(rows, ["model", *keys])
    print(f"run: {logged.run_id} ({r.seconds:.1f} s)")


def cmd_update(args) -> int:
    from adreg.registry import lifecycle, tracking
    from adreg.registry.update import UpdateOptions, update_version

    tracking.configure(args.tracking_uri)
    opts = UpdateOptions(category=args.category, add_good=args.add_good, from_alias=args.from_alias,
                         from_version=args.from_version, include_suspects=args.include_suspects,
                         holdout=args.holdout, min_calibration=args.min_calibration, seed=args.seed,
                         device=args.device)
    policy = lifecycle.GatePolicy(args.min_image_auroc, args.min_pixel_auroc, args.tolerance)
    out = update_version(opts, register=args.register, promote_alias=args.promote, policy=policy,
                         reason=args.reason or "")
    _print_update(out.result, out.logged)
    logged = out.logged
    if logged.version:
        print(f"registered {logged.registered_name} version {logged.version} "
              f"(parent: version {out.result.parent_version})")
    if out.gate is not None:
        for failure in out.gate.failures:
            print(f"  gate: {failure}")
        if logged.promoted:
            print(f"promoted version {logged.version} to {args.promote!r}: models:/{logged.registered_name}@{args.promote}")
        else:
            print(f"not promoted to {args.promote!r} (gate failed; `adreg promote --force` overrides, recorded)")
    return 1 if logged.promoted is False else 0


def cmd_drift(args) -> int:
    from adreg.monitoring.drift import DriftPolicy, check_drift
    from adreg.registry import tracking

    tracking.configure(args.tracking_uri)
    rep = check_drift(args.category, args.folders, alias=args.alias, version=args.version,
                      policy=DriftPolicy(args.max_alarm_ratio, args.p_value), device=args.device,
                      log=not args.no_log)
    which = f"@{rep.alias} = version {rep.version}" if rep.alias else f"version {rep.version}"
    print(f"{rep.model_name} {which}: {rep.n_images} image(s) against {rep.n_reference} reference good "
          f"score(s) ({rep.reference_source})")
    for u in rep.unreadable:
        print(f"  skipped unreadable {u['path']}: {u['error']}")
    _print_table([{"what": "above threshold", "production": f"{rep.alarm_rate:.1%}",
                   "expected": f"{rep.expected_alarm_rate:.1%}", "test": f"binomial p = {rep.binomial_p:.3g} "
                                                                         f"(ratio {rep.alarm_ratio:.2f}x)"},
                  {"what": "median score", "production": f"{rep.score_median:.4g}",
                   "expected": f"{rep.reference_median:.4g}",
                   "test": f"KS D = {rep.ks_statistic:.3f}, p = {rep.ks_p:.3g}; Mann-Whitney p = {rep.mannwhitney_p:.3g}"}],
                 ["what", "production", "expected", "test"])
    for reason in rep.reasons:
        print(f"  drift: {reason}")
    if rep.monitoring_run_id:
        print(f"monitoring run: {rep.monitoring_run_id} (experiment adreg-{rep.category}-monitoring)")
    if rep.drift:
        print(f"DRIFT: production images no longer look like version {rep.version}'s reference goods; "
              f"review them, then grow a version: adreg update {rep.category} --add-good DIR --register")
        return 1
    print("no drift")
    return 0


def _add_update_commands(sub) -> None:
    p = sub.add_parser("update", help="grow a registered version with more good images into a new version "
                                      "(lineage, duplicates skipped, suspects held out)")
    p.add_argument("category")
    p.add_argument("--add-good", nargs="+", required=True, metavar="DIR",
                   help="folders of good images, read recursively (e.g. the server's capture folder)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--from", dest="from_alias", default="production", metavar="ALIAS",
                       help="grow the version this alias points at (default production)")
    which.add_argument("--from-version", help="grow this version instead")
    p.add_argument("--include-suspects", action="store_true",
                   help="also learn from new images the parent scores above its threshold (held out by default)")
    p.add_argument("--holdout", type=int, default=20,
                   help="new good images held out to recalibrate the threshold (at most half; default 20)")
    p.add_argument("--min-calibration", type=int, default=20,
                   help="below this many held-out new goods the parent's calibration images join (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hold-out split")
    p.add_argument("--register", action="store_true", help="register the result as a new version")
    p.add_argument("--promote", metavar="ALIAS", help="register, then promote through the gate (like fit)")
    p.add_argument("--reason", help="recorded with the promotion")
    p.add_argument("--min-image-auroc", type=float, default=0.90, help="gate floor (default 0.90)")
    p.add_argument("--min-pixel-auroc", type=float, default=0.90, help="gate floor (default 0.90)")
    p.add_argument("--tolerance", type=float, default=0.01, help="gate: allowed drop (default 0.01)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_update)

    p = sub.add_parser("drift", help="compare recent production images with the reference goods logged at fit; "
                                     "exit 1 on drift")
    p.add_argument("category")
    p.add_argument("folders", nargs="+", metavar="DIR", help="recent production images, read recursively")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--alias", default="production")
    which.add_argument("--version", help="a version number instead of the alias")
    p.add_argument("--max-alarm-ratio", type=float, default=3.0,
                   help="drift when the alarm rate exceeds this many times the expected false-alarm rate "
                        "(and significantly) (default 3)")
    p.add_argument("--p-value", type=float, default=0.01, help="significance of the tests (default 0.01)")
    p.add_argument("--no-log", action="store_true", help="do not log a monitoring run")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_drift)


# -- quickstart ---------------------------------------------------------------------------------------
def cmd_quickstart(args) -> int:
    from adreg.fitting import FitOptions

    opts = FitOptions(category=args.category, k_shot=args.k_shot, seed=args.seed, train_dir=args.train_dir)
    result, logged = run_fit(opts, register=True, promote_alias="production", tracking_uri=args.tracking_uri)
    from adreg.registry import tracking

    if not logged.promoted:
        return 1
    uri = tracking.configure(args.tracking_uri)
    steps = [(f"mlflow ui --backend-store-uri {uri}", "browse runs and the registry"),
             ("adreg models", "versions, aliases, metrics"),
             (f"adreg predict {args.category} IMAGE...", "score images in-process"),
             (f"adreg serve {args.category} --port 5000", f"REST: models:/adreg-{args.category}@production")]
    width = max(len(cmd) for cmd, _ in steps)
    print("\nnext:")
    for cmd, what in steps:
        print(f"  {cmd.ljust(width)}  # {what}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adreg", description=__doc__)
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default $MLFLOW_TRACKING_URI, "
                                               "else sqlite in $ADREG_HOME or ./adreg-store)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fit, evaluate and log a detector for one category")
    add_fit_arguments(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("promote", help="gate-checked: point an alias (staging, production) at a registered version")
    p.add_argument("category")
    p.add_argument("--version", required=True)
    p.add_argument("--alias", default="production")
    p.add_argument("--reason", help="recorded in the history and on the version's tags")
    p.add_argument("--min-image-auroc", type=float, default=0.90, help="gate floor (default 0.90)")
    p.add_argument("--min-pixel-auroc", type=float, default=0.90, help="gate floor (default 0.90)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="allowed drop against the alias's current version on the same images (default 0.01)")
    p.add_argument("--eval-dir", help="evaluate on this labelled folder instead of the set logged with the version")
    p.add_argument("--force", action="store_true", help="promote even if the gate fails (recorded)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="point an alias back at the version it held before")
    p.add_argument("category")
    p.add_argument("--alias", default="production")
    p.add_argument("--reason")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("history", help="promotions and rollbacks of a category: who, when, why, gate results")
    p.add_argument("category")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("compare", help="metrics and differing parameters of two versions side by side")
    p.add_argument("category")
    p.add_argument("v1")
    p.add_argument("v2")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("models", help="table of registered categories, versions, aliases and metrics")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)

    for name, helptext in (("serve", "serve a registered model over REST with `mlflow models serve`"),
                           ("predict", "score image files in-process with a registered model")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("category")
        if name == "predict":
            p.add_argument("images", nargs="+", help="image files")
            p.add_argument("--save-maps", metavar="DIR", help="write anomaly maps as PNGs into DIR")
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.add_argument("--alias", default="production")
        p.add_argument("--version", help="a version number instead of the alias")
        p.add_argument("--device", default="auto", help="auto, cpu or cuda")
        if name == "serve":
            p.add_argument("--host", default="127.0.0.1")
            p.add_argument("--port", type=int, default=5000)
            p.add_argument("--workers", type=int, default=1)
            p.add_argument("--return-map", action="store_true", help="include anomaly maps in responses")
            p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                           help="backbone precision on CUDA")
            _add_serve_arguments(p)
        p.set_defaults(func=cmd_serve if name == "serve" else cmd_predict)

    p = sub.add_parser("serve-bundle", help="bundle several categories into one router model (one backbone "
                                             "per backbone config), register it as adreg-router")
    p.add_argument("categories", nargs="+")
    p.add_argument("--alias", default="production", help="which version of each category to bundle")
    p.add_argument("--promote", default="production", help="alias to point at the new router version")
    p.set_defaults(func=cmd_serve_bundle)

    _add_export_commands(sub)

    _add_score_commands(sub)

    _add_governance_commands(sub)

    _add_status_commands(sub)

    _add_update_commands(sub)

    p = sub.add_parser("quickstart", help="fit 1-shot bottle on the bundled data, register, promote to production")
    p.add_argument("--category", default="bottle")
    p.add_argument("--train-dir")
    p.add_argument("--k-shot", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_quickstart)
    return parser


EXIT_DONE, EXIT_REFUSED, EXIT_BAD_INPUT = 0, 1, 2  # refused: by a gate, a permission or a tamper check


def _fail(args, message: str, code: int) -> int:
    print(f"adreg: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        _json_out({"error": message, "exit_code": code})
    return code


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 1 refused (gate, permission, tampered model); 2 bad input (argparse too)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AdregError as exc:
        return _fail(args, str(exc), getattr(exc, "exit_code", EXIT_BAD_INPUT))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a server refusing the user is a refusal, not a crash
        from adreg.registry import governance

        if type(exc).__name__ in ("MlflowException", "RestException") and governance.is_refusal(exc):
            return _fail(args, str(governance.refusal(exc, f"`adreg {args.command}`")), EXIT_REFUSED)
        if type(exc).__name__ == "MlflowException" and "Max retries exceeded" in str(exc):
            import mlflow

            return _fail(args, f"the tracking store {mlflow.get_tracking_uri()} is not reachable (is the server "
                               "running? check --tracking-uri / $MLFLOW_TRACKING_URI)", EXIT_BAD_INPUT)
        raise


if __name__ == "__main__":
    sys.exit(main())
