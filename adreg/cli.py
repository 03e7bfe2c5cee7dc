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


def run_fit(opts, register: bool, promote_alias: str | None = None, tracking_uri: str | None = None):
    """Fit, log, optionally register and promote; prints a summary; returns (result, logged)."""
    from adreg import registry, tracking
    from adreg.fitting import fit_category

    uri = tracking.configure(tracking_uri)
    result = fit_category(opts)
    logged = tracking.log_fit(result)
    metrics = result.metrics()
    print(f"\nfitted {opts.method} for {opts.category!r}: {len(result.shots)} shot(s), "
          f"threshold {result.detector.threshold.value:.4g} ({result.detector.threshold.rule}, "
          f"from {result.calibration_source})")
    _print_table([{k: f"{metrics[k]:.4f}" for k in KEY_ORDER if k in metrics}],
                 [k for k in KEY_ORDER if k in metrics])
    print(f"run: {logged.run_id} (tracking: {uri})")
    if register or promote_alias:
        logged.version = registry.register(logged.model_uri, logged.run_id, opts.category, metrics)
        logged.registered_name = registry.model_name(opts.category)
        print(f"registered {logged.registered_name} version {logged.version}")
        if promote_alias:
            from adreg import lifecycle

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
    _, logged = run_fit(fit_options_from_args(args), args.register, args.promote, args.tracking_uri)
    return 1 if logged.promoted is False else 0


# -- registry ----------------------------------------------------------------------------------------
def cmd_promote(args) -> int:
    from adreg import lifecycle, registry, tracking

    tracking.configure(args.tracking_uri)
    policy = lifecycle.GatePolicy(args.min_image_auroc, args.min_pixel_auroc, args.tolerance)
    promo, report = lifecycle.promote_gated(args.category, args.version, args.alias, policy, force=args.force,
                                            reason=args.reason or "", eval_dir=args.eval_dir, device=args.device)
    rows = [{"model": f"v{args.version} (candidate)", **{k: f"{report.candidate.get(k, float('nan')):.4f}"
                                                         for k in lifecycle.COMPARED}}]
    if report.baseline is not None:
        rows.append({"model": f"v{report.baseline_version} (current {args.alias})",
                     **{k: f"{report.baseline.get(k, float('nan')):.4f}" for k in lifecycle.COMPARED}})
    print(f"gate on {report.eval_set} (floors: image {policy.min_image_auroc}, pixel {policy.min_pixel_auroc}; "
          f"tolerance {policy.tolerance})")
    _print_table(rows, ["model", *lifecycle.COMPARED])
    for failure in report.failures:
        print(f"  gate: {failure}")
    if promo is None:
        print(f"REFUSED: version {args.version} stays out of {args.alias!r} (use --force to override, recorded)")
        return 1
    was = f"(was version {promo.previous})" if promo.previous else "(new alias)"
    forced = " FORCED past a failed gate" if not report.passed else ""
    print(f"{promo.alias} -> {registry.model_name(args.category)} version {promo.version} {was}{forced}")
    print(f"model URI: {promo.model_uri}")
    return 0


def cmd_rollback(args) -> int:
    from adreg import lifecycle, tracking

    tracking.configure(args.tracking_uri)
    promo = lifecycle.rollback(args.category, args.alias, reason=args.reason or "")
    print(f"rolled back {promo.alias}: version {promo.previous} -> version {promo.version} ({promo.model_uri})")
    return 0


def cmd_history(args) -> int:
    from adreg import lifecycle, tracking

    tracking.configure(args.tracking_uri)
    rows = lifecycle.history_rows(args.category)
    if not rows:
        print(f"no promotions recorded for {args.category!r}")
        return 0
    _print_table(rows, ["at", "action", "alias", "version", "from", "by", "reason", "gate"])
    return 0


def cmd_compare(args) -> int:
    from adreg import lifecycle, tracking

    tracking.configure(args.tracking_uri)
    rows = lifecycle.compare(args.category, args.v1, args.v2)
    _print_table(rows, list(rows[0]))
    return 0


def cmd_models(args) -> int:
    from adreg import registry, tracking

    tracking.configure(args.tracking_uri)
    rows = registry.list_versions()
    if not rows:
        print("no models registered yet; run `adreg fit --category NAME --register`")
        return 0
    _print_table(rows, ["category", "version", "aliases", "method", "image_auroc", "pixel_auroc", "aupro",
                        "image_f1_max", "threshold", "created"])
    return 0


# -- serving and prediction --------------------------------------------------------------------------
def serve_command(model_uri: str, host: str, port: int, workers: int = 1) -> list[str]:
    mlflow_bin = shutil.which("mlflow") or "mlflow"
    return [mlflow_bin, "models", "serve", "-m", model_uri, "--env-manager", "local",
            "--host", host, "--port", str(port), "--workers", str(workers)]


def serve_env(tracking_uri: str, device: str, return_map: bool, precision: str = "fp32") -> dict:
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_DISABLE_TELEMETRY="true",
               SERVING_MODEL_CONFIG=json.dumps({"device": device, "return_map": return_map,
                                                "precision": precision}))
    # uvicorn must be on PATH for `mlflow models serve`; it sits beside this interpreter.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def cmd_serve(args) -> int:
    from adreg import registry, tracking

    uri = tracking.configure(args.tracking_uri)
    model_uri = registry.model_uri(args.category, args.alias, args.version)
    cmd = serve_command(model_uri, args.host, args.port, args.workers)
    print(f"serving {model_uri} on http://{args.host}:{args.port}/invocations (device {args.device})")
    print("$ " + shlex.join(cmd), flush=True)
    return subprocess.call(cmd, env=serve_env(uri, args.device, args.return_map, args.precision))


def cmd_predict(args) -> int:
    import mlflow
    import pandas as pd

    from adreg import registry, tracking
    from adreg.images import file_to_b64

    tracking.configure(args.tracking_uri)
    model_uri = registry.model_uri(args.category, args.alias, args.version)
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
    from adreg import bundle, registry, tracking

    tracking.configure(args.tracking_uri)
    logged = bundle.build_router(args.categories, args.alias)
    print(f"registered {logged.registered_name} version {logged.version}: categories {', '.join(args.categories)} "
          f"(each at @{args.alias})")
    promo = registry.promote(bundle.ROUTER, logged.version, args.promote, reason="serve-bundle")
    print(f"{promo.alias} -> version {promo.version}: serve it with `adreg serve router` ({promo.model_uri}); "
          "requests carry a 'category' column beside 'image'")
    return 0


# -- quickstart ---------------------------------------------------------------------------------------
def cmd_quickstart(args) -> int:
    from adreg.fitting import FitOptions

    opts = FitOptions(category=args.category, k_shot=args.k_shot, seed=args.seed, train_dir=args.train_dir)
    result, logged = run_fit(opts, register=True, promote_alias="production", tracking_uri=args.tracking_uri)
    from adreg import tracking

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
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="point an alias back at the version it held before")
    p.add_argument("category")
    p.add_argument("--alias", default="production")
    p.add_argument("--reason")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("history", help="promotions and rollbacks of a category: who, when, why, gate results")
    p.add_argument("category")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("compare", help="metrics and differing parameters of two versions side by side")
    p.add_argument("category")
    p.add_argument("v1")
    p.add_argument("v2")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("models", help="table of registered categories, versions, aliases and metrics")
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
        p.set_defaults(func=cmd_serve if name == "serve" else cmd_predict)

    p = sub.add_parser("serve-bundle", help="bundle several categories into one router model (one backbone "
                                             "per backbone config), register it as adreg-router")
    p.add_argument("categories", nargs="+")
    p.add_argument("--alias", default="production", help="which version of each category to bundle")
    p.add_argument("--promote", default="production", help="alias to point at the new router version")
    p.set_defaults(func=cmd_serve_bundle)

    p = sub.add_parser("quickstart", help="fit 1-shot bottle on the bundled data, register, promote to production")
    p.add_argument("--category", default="bottle")
    p.add_argument("--train-dir")
    p.add_argument("--k-shot", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AdregError as exc:
        print(f"adreg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
