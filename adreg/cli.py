"""The ``adreg`` command line: fit, promote, rollback, history, compare, models, serve, predict, quickstart.

Argument parsing and printing only: every command calls ``adreg.api`` and prints what it returns.
Exit codes: 0 done; 1 refused (a gate, a permission, a tampered model, drift found); 2 bad input, unknown
names, an unreachable store (argparse too); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys

from adreg.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_REFUSED, AdregError

KEY_ORDER = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "threshold",
             "fit_seconds", "latency_ms_per_image")
COMPARED = ("image_auroc", "pixel_auroc", "aupro")


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


def _json_out(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _api():
    from adreg import api

    return api


def _gate_args(p) -> None:
    p.add_argument("--min-image-auroc", type=float, default=0.90, help="gate floor (default 0.90)")
    p.add_argument("--min-pixel-auroc", type=float, default=0.90, help="gate floor (default 0.90)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="allowed drop against the alias's current version on the same images (default 0.01)")


def _policy(args):
    from adreg.registry.lifecycle import GatePolicy

    return GatePolicy(args.min_image_auroc, args.min_pixel_auroc, args.tolerance)


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


def _fit_settings(args) -> dict:
    params = dict(args.param)
    if args.pca_ev is not None:
        params["pca_ev"] = args.pca_ev
    return dict(train_dir=args.train_dir, val_dir=args.val_dir, test_dir=args.test_dir, method=args.method,
                k_shot=args.k_shot, seed=args.seed, params=params, backbone=args.backbone, layers=args.layers,
                image_size=args.image_size, precision=args.precision, augment=args.augment,
                aug_count=args.aug_count, top_fraction=args.top_fraction, sigma=args.sigma,
                threshold_quantile=args.threshold_quantile, holdout=args.holdout, batch_size=args.batch_size,
                device=args.device)


def _print_fit(out, alias: str | None) -> None:
    r, det = out.result, out.result.detector
    metrics = out.metrics
    print(f"\nfitted {r.options.method} for {r.options.category!r}: {len(r.shots)} shot(s), "
          f"threshold {det.threshold.value:.4g} ({det.threshold.rule}, from {r.calibration_source})")
    _print_table([{k: f"{metrics[k]:.4f}" for k in KEY_ORDER if k in metrics}], [k for k in KEY_ORDER if k in metrics])
    print(f"run: {out.run_id} (tracking: {out.tracking_uri})")
    if out.version:
        print(f"registered {out.registered_name} version {out.version}")
    if out.promoted is False:
        print(f"not promoted to {alias!r}: " + "; ".join(out.gate.failures))
    elif out.promoted:
        print(f"promoted version {out.promotion.version} to {out.promotion.alias!r}: {out.promotion.model_uri}")


def cmd_fit(args) -> int:
    out = _api().fit(args.category, register=args.register, promote=args.promote, export=args.export,
                     tracking_uri=args.tracking_uri, **_fit_settings(args))
    _print_fit(out, args.promote)
    return EXIT_REFUSED if out.promoted is False else 0


def cmd_quickstart(args) -> int:
    out = _api().fit(args.category, train_dir=args.train_dir, k_shot=args.k_shot, seed=args.seed, register=True,
                     promote="production", tracking_uri=args.tracking_uri)
    _print_fit(out, "production")
    if not out.promoted:
        return EXIT_REFUSED
    steps = [(f"mlflow ui --backend-store-uri {out.tracking_uri}", "browse runs and the registry"),
             ("adreg models", "versions, aliases, metrics"),
             (f"adreg predict {args.category} IMAGE...", "score images in-process"),
             (f"adreg serve {args.category} --port 5000", f"REST: models:/{out.registered_name}@production")]
    width = max(len(cmd) for cmd, _ in steps)
    print("\nnext:")
    for cmd, what in steps:
        print(f"  {cmd.ljust(width)}  # {what}")
    return 0


# -- registry ----------------------------------------------------------------------------------------
def cmd_promote(args) -> int:
    out = _api().promote(args.category, args.version, args.alias, force=args.force, reason=args.reason or "",
                         eval_dir=args.eval_dir, policy=_policy(args), device=args.device,
                         tracking_uri=args.tracking_uri)
    report, promo, policy = out.gate, out.promotion, out.policy
    if args.json:
        _json_out({"category": args.category, "alias": args.alias, "version": str(args.version),
                   "promoted": out.promoted, "forced": out.forced,
                   **{k: getattr(promo, k, None) for k in ("previous", "model_uri", "by", "identity", "event_run")},
                   "gate": {**report.summary(), "floors": policy.floors(), "tolerance": policy.tolerance}})
        return 0 if out.promoted else EXIT_REFUSED
    rows = [{"model": f"v{args.version} (candidate)", **{k: f"{report.candidate.get(k, float('nan')):.4f}"
                                                         for k in COMPARED}}]
    if report.baseline is not None:
        rows.append({"model": f"v{report.baseline_version} (current {args.alias})",
                     **{k: f"{report.baseline.get(k, float('nan')):.4f}" for k in COMPARED}})
    print(f"gate on {report.eval_set} (floors: image {policy.min_image_auroc}, pixel {policy.min_pixel_auroc}; "
          f"tolerance {policy.tolerance})")
    _print_table(rows, ["model", *COMPARED])
    from adreg.pyfunc.shadow import describe_latest

    print(describe_latest(args.category, args.version) or "", end="")
    for failure in report.failures:
        print(f"  gate: {failure}")
    if not out.promoted:
        print(f"REFUSED: version {args.version} stays out of {args.alias!r} (use --force to override, recorded)")
        return EXIT_REFUSED
    was = f"(was version {promo.previous})" if promo.previous else "(new alias)"
    forced = " FORCED past a failed gate" if out.forced else ""
    print(f"{promo.alias} -> {promo.model_uri.split('@')[0][len('models:/'):]} version {promo.version} {was}{forced}")
    print(f"model URI: {promo.model_uri} (by {promo.by}, {promo.identity})")
    return 0


def cmd_rollback(args) -> int:
    promo = _api().rollback(args.category, args.alias, reason=args.reason or "", tracking_uri=args.tracking_uri)
    if args.json:
        _json_out({"category": args.category, **{k: getattr(promo, k) for k in (
            "alias", "version", "previous", "model_uri", "by", "identity", "event_run")}})
        return 0
    print(f"rolled back {promo.alias}: version {promo.previous} -> version {promo.version} ({promo.model_uri})")
    return 0


def cmd_history(args) -> int:
    events = _api().history(args.category, tracking_uri=args.tracking_uri)
    if args.json:
        _json_out(events)
        return 0
    if not events:
        print(f"no promotions recorded for {args.category!r}")
        return 0
    from adreg.registry.lifecycle import history_rows

    _print_table(history_rows(events), ["at", "action", "alias", "version", "from", "by", "identity", "reason", "gate"])
    return 0


def cmd_compare(args) -> int:
    rows = _api().compare(args.category, args.v1, args.v2, tracking_uri=args.tracking_uri)
    if args.json:
        _json_out(rows)
    else:
        _print_table(rows, list(rows[0]))
    return 0


def cmd_models(args) -> int:
    rows = _api().models(tracking_uri=args.tracking_uri)
    if args.json:
        _json_out(rows)
    elif not rows:
        print("no models registered yet; run `adreg fit --category NAME --register`")
    else:
        _print_table(rows, ["category", "version", "aliases", "method", "image_auroc", "pixel_auroc", "aupro",
                            "image_f1_max", "threshold", "created", "serving"])
    return 0


def cmd_grant(args) -> int:
    done = _api().grant(args.category, args.user, args.level, tracking_uri=args.tracking_uri)
    if args.json:
        _json_out(done)
        return 0
    for g in done:
        print(f"granted {g['permission']} on {g['resource_type']} {g['resource']} to {g['user']}")
    return 0


def cmd_whoami(args) -> int:
    out = _api().whoami(args.category, tracking_uri=args.tracking_uri)
    if args.json:
        _json_out(out)
    else:
        print(" ".join(f"{k}={v}" for k, v in out.items() if v is not None))
    return 0


# -- serving and prediction --------------------------------------------------------------------------
def cmd_serve(args) -> int:
    server = _api().serve(args.category, alias=args.alias, version=args.pin or args.version, host=args.host,
                          port=args.port, workers=args.workers, device=args.device, precision=args.precision,
                          return_map=args.return_map, poll_seconds=args.poll_seconds, shadow=args.shadow,
                          capture=args.capture, capture_rate=args.capture_rate, capture_max_mib=args.capture_max_mib,
                          max_request_mib=args.max_request_mib, max_rows=args.max_rows, server_id=args.server_id,
                          tracking_uri=args.tracking_uri)
    print(f"serving {server.description} on {server.url}/invocations (device {args.device}, "
          f"server id {server.model_config['server_id']})")
    print("$ " + shlex.join(server.command), flush=True)
    return server.run()


def cmd_status(args) -> int:
    from adreg.pyfunc import status as server_status

    out = _api().status(args.category, tracking_uri=args.tracking_uri)
    if args.json:
        _json_out(out)
        return 0
    aliases, entries = out["aliases"], out["servers"]
    print(f"{out['model']}: " + (", ".join(f"{a} = {v}" for a, v in aliases.items()) or "no aliases"))
    if not entries:
        print("no server has reported serving it (servers started by `adreg serve` report here)")
        return 0
    rows = []
    for e in entries:
        swap, fail = e.get("last_swap") or {}, e.get("last_failure") or {}
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


def cmd_predict(args) -> int:
    out = _api().predict(args.category, args.images, version=args.version, alias=args.alias, device=args.device,
                         save_maps=args.save_maps, tracking_uri=args.tracking_uri)
    rows = [{"image": r["path"], "score": "" if r["error"] else f"{r['score']:.5g}",
             "anomalous": "" if r["error"] else ("YES" if r["is_anomaly"] else "no"), "error": r["error"] or "",
             **({"map": r.get("map", "")} if args.save_maps else {})} for r in out.rows]
    threshold = out.threshold
    print(f"{out.model.describe()} (threshold {'n/a' if threshold is None else f'{threshold:.4g}'})")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows, list(rows[0]))
    return 1 if out.failed else 0


def cmd_serve_bundle(args) -> int:
    logged, promo = _api().bundle(args.categories, args.alias, args.promote, tracking_uri=args.tracking_uri)
    print(f"registered {logged.registered_name} version {logged.version}: categories {', '.join(args.categories)} "
          f"(each at @{args.alias})")
    print(f"{promo.alias} -> version {promo.version}: serve it with `adreg serve router` ({promo.model_uri}); "
          "requests carry a 'category' column beside 'image'")
    return 0


def cmd_export(args) -> int:
    logged = _api().export(args.category, args.version, args.runtime, tracking_uri=args.tracking_uri)
    print(f"registered {logged.registered_name} version {logged.version}: version {args.version} with its "
          f"backbone on {args.runtime} (served with runtime {args.runtime} unless model_config overrides it)")
    print(f"run: {logged.run_id}; promote it with `adreg promote {args.category} --version {logged.version}`")
    return 0


def cmd_score(args) -> int:
    res = _api().score(args.category, args.inputs, args.output, version=args.version, alias=args.alias,
                       engine=args.engine, batch_size=args.batch_size, save_maps=args.save_maps, resume=args.resume,
                       device=args.device, tracking_uri=args.tracking_uri, master=args.master,
                       task_cpus=args.task_cpus, partitions=args.partitions, env_manager=args.env_manager,
                       glob=args.glob)
    ref = res.model
    alias = f" (@{ref.alias})" if ref.alias else ""
    print(f"{ref.name} version {ref.version}{alias}: scored {res.scored} image(s), {res.failed} failed, "
          f"{res.skipped} skipped (already in output), {res.seconds:.1f} s ({res.images_per_s:.1f} img/s)")
    print(f"output: {res.output} ({res.output_rows} rows, {res.output_failed} with an error)")
    return 1 if res.output_failed else 0


# -- update and drift --------------------------------------------------------------------------------
def _print_update(r, logged) -> None:
    print(f"\nupdate of {r.parent_model} version {r.parent_version} (run {r.parent_run_id}), method {r.options.method}")
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
    out = _api().update(args.category, args.add_good, from_alias=args.from_alias, from_version=args.from_version,
                        include_suspects=args.include_suspects, holdout=args.holdout,
                        min_calibration=args.min_calibration, seed=args.seed, register=args.register,
                        promote=args.promote, reason=args.reason or "", policy=_policy(args), device=args.device,
                        tracking_uri=args.tracking_uri)
    logged = out.logged
    _print_update(out.result, logged)
    if logged.version:
        print(f"registered {logged.registered_name} version {logged.version} (parent: version {out.result.parent_version})")
    if out.gate is not None:
        for failure in out.gate.failures:
            print(f"  gate: {failure}")
        if logged.promoted:
            print(f"promoted version {logged.version} to {args.promote!r}: models:/{logged.registered_name}@{args.promote}")
        else:
            print(f"not promoted to {args.promote!r} (gate failed; `adreg promote --force` overrides, recorded)")
    return EXIT_REFUSED if logged.promoted is False else 0


def cmd_drift(args) -> int:
    rep = _api().drift(args.category, args.folders, alias=args.alias, version=args.version,
                       max_alarm_ratio=args.max_alarm_ratio, p_value=args.p_value, device=args.device,
                       log=not args.no_log, tracking_uri=args.tracking_uri)
    which = f"@{rep.alias} = version {rep.version}" if rep.alias else f"version {rep.version}"
    print(f"{rep.model_name} {which}: {rep.n_images} image(s) against {rep.n_reference} reference good "
          f"score(s) ({rep.reference_source})")
    for u in rep.unreadable:
        print(f"  skipped unreadable {u['path']}: {u['error']}")
    _print_table([{"what": "above threshold", "production": f"{rep.alarm_rate:.1%}",
                   "expected": f"{rep.expected_alarm_rate:.1%}",
                   "test": f"binomial p = {rep.binomial_p:.3g} (ratio {rep.alarm_ratio:.2f}x)"},
                  {"what": "median score", "production": f"{rep.score_median:.4g}",
                   "expected": f"{rep.reference_median:.4g}",
                   "test": f"KS D = {rep.ks_statistic:.3f}, p = {rep.ks_p:.3g}; Mann-Whitney p = {rep.mannwhitney_p:.3g}"}],
                 ["what", "production", "expected", "test"])
    for reason in rep.reasons:
        print(f"  drift: {reason}")
    if rep.monitoring_run_id:
        print(f"monitoring run: {rep.monitoring_run_id} (experiment {rep.model_name}-monitoring)")
    if rep.drift:
        print(f"DRIFT: production images no longer look like version {rep.version}'s reference goods; "
              f"review them, then grow a version: adreg update {rep.category} --add-good DIR --register")
        return EXIT_REFUSED
    print("no drift")
    return 0


# -- the parser --------------------------------------------------------------------------------------
def _json_flag(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _which_version(p, alias_help: str = "alias resolved to ONE version (default production)") -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--alias", default="production", help=alias_help)
    which.add_argument("--version", help="a version number instead of the alias")


def _add_lifecycle_commands(sub) -> None:
    p = sub.add_parser("promote", help="gate-checked: point an alias (staging, production) at a registered version")
    p.add_argument("category")
    p.add_argument("--version", required=True)
    p.add_argument("--alias", default="production")
    p.add_argument("--reason", help="recorded in the history and on the version's tags")
    _gate_args(p)
    p.add_argument("--eval-dir", help="evaluate on this labelled folder instead of the set logged with the version")
    p.add_argument("--force", action="store_true", help="promote even if the gate fails (recorded)")
    p.add_argument("--device", default="auto")
    _json_flag(p)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="point an alias back at the version it held before")
    p.add_argument("category")
    p.add_argument("--alias", default="production")
    p.add_argument("--reason")
    _json_flag(p)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("history", help="promotions and rollbacks of a category: who, when, why, gate results")
    p.add_argument("category")
    _json_flag(p)
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("compare", help="metrics and differing parameters of two versions side by side")
    p.add_argument("category")
    p.add_argument("v1")
    p.add_argument("v2")
    _json_flag(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("models", help="table of registered categories, versions, aliases and metrics")
    _json_flag(p)
    p.set_defaults(func=cmd_models)


def _add_serve_commands(sub) -> None:
    from adreg.pyfunc import DEFAULT_MAX_REQUEST_MIB, DEFAULT_MAX_ROWS, DEFAULT_POLL_SECONDS

    p = sub.add_parser("serve", help="serve a registered model over REST with `mlflow models serve`")
    p.add_argument("category")
    _which_version(p, "alias to serve and follow (default production)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--return-map", action="store_true", help="include anomaly maps in responses")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="backbone precision on CUDA")
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
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("predict", help="score image files in-process with a registered model")
    p.add_argument("category")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--save-maps", metavar="DIR", help="write anomaly maps as PNGs into DIR")
    _json_flag(p)
    _which_version(p)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve-bundle", help="bundle several categories into one router model (one backbone "
                                             "per backbone config), register it as adreg-router")
    p.add_argument("categories", nargs="+")
    p.add_argument("--alias", default="production", help="which version of each category to bundle")
    p.add_argument("--promote", default="production", help="alias to point at the new router version")
    p.set_defaults(func=cmd_serve_bundle)

    p = sub.add_parser("export", help="register a new version whose backbone runs on ONNX Runtime or OpenVINO (CPU)")
    p.add_argument("category")
    p.add_argument("--version", required=True, help="the registered version to export")
    p.add_argument("--runtime", default="openvino", choices=["onnxruntime", "openvino"],
                   help="CPU runtime of the exported backbone (default openvino)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("score", help="batch-score image files/folders/globs into a parquet dataset "
                                      "(in-process or on Apache Spark)")
    p.add_argument("category")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--output", "-o", required=True, help="output parquet dataset (a folder of part files)")
    _which_version(p, "alias resolved to ONE version for the whole job")
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

    p = sub.add_parser("status", help="aliases of a category and the running servers serving it (stale marked)")
    p.add_argument("category")
    _json_flag(p)
    p.set_defaults(func=cmd_status)


def _add_governance_commands(sub) -> None:
    p = sub.add_parser("grant", help="admins: give a user a role on a category (READ reader, EDIT editor, "
                                     "MANAGE manager) on an authenticated MLflow server")
    p.add_argument("category")
    p.add_argument("user")
    p.add_argument("level", type=str.upper, choices=["READ", "EDIT", "MANAGE"])
    _json_flag(p)
    p.set_defaults(func=cmd_grant)
    p = sub.add_parser("whoami", help="the acting user and what kind of identity it is (authenticated or label)")
    p.add_argument("--category", help="also show the permission on this category")
    _json_flag(p)
    p.set_defaults(func=cmd_whoami)


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
    _gate_args(p)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_update)

    p = sub.add_parser("drift", help="compare recent production images with the reference goods logged at fit; "
                                     "exit 1 on drift")
    p.add_argument("category")
    p.add_argument("folders", nargs="+", metavar="DIR", help="recent production images, read recursively")
    _which_version(p)
    p.add_argument("--max-alarm-ratio", type=float, default=3.0,
                   help="drift when the alarm rate exceeds this many times the expected false-alarm rate "
                        "(and significantly) (default 3)")
    p.add_argument("--p-value", type=float, default=0.01, help="significance of the tests (default 0.01)")
    p.add_argument("--no-log", action="store_true", help="do not log a monitoring run")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_drift)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adreg", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default $MLFLOW_TRACKING_URI, "
                                               "else sqlite in $ADREG_HOME or ./adreg-store)")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show MLflow's log lines and download bars, and the cause of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fit", help="fit, evaluate and log a detector for one category")
    add_fit_arguments(p)
    p.set_defaults(func=cmd_fit)
    _add_lifecycle_commands(sub)
    _add_serve_commands(sub)
    _add_governance_commands(sub)
    _add_update_commands(sub)
    p = sub.add_parser("quickstart", help="fit 1-shot bottle on the bundled data, register, promote to production")
    p.add_argument("--category", default="bottle")
    p.add_argument("--train-dir")
    p.add_argument("--k-shot", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_quickstart)
    return parser


def quiet_mlflow(verbose: bool) -> None:
    """adreg's own output: MLflow's INFO log lines and "Downloading artifacts" bars only with --verbose."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if verbose:
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _fail(args, exc: AdregError) -> int:
    code = getattr(exc, "exit_code", EXIT_BAD_INPUT)
    print(f"adreg: error: {exc}", file=sys.stderr)
    if getattr(args, "verbose", False) and exc.__cause__ is not None:
        cause = exc.__cause__
        print(f"  caused by {type(cause).__module__}.{type(cause).__name__}: {cause}", file=sys.stderr)
    if getattr(args, "json", False):
        _json_out({"error": str(exc), "exit_code": code})
    return code


def main(argv: list[str] | None = None) -> int:
    """Run one ``adreg`` command; returns its exit code (see the module doc)."""
    args = build_parser().parse_args(argv)
    quiet_mlflow(args.verbose)
    try:
        return args.func(args)
    except AdregError as exc:
        return _fail(args, exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - store errors by type; anything else is a bug and surfaces
        from adreg.store import translate

        typed = translate(exc, f"running `adreg {args.command}`")
        if typed is None:
            raise
        typed.__cause__ = exc
        return _fail(args, typed)


if __name__ == "__main__":
    sys.exit(main())
