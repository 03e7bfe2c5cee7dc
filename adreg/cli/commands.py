"""The ``adreg`` commands: each calls ``adreg.api`` with the parsed arguments and prints what it returns."""

from __future__ import annotations

import json
import shlex

from adreg.errors import EXIT_REFUSED

KEY_ORDER = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "threshold",
             "fit_seconds", "latency_ms_per_image")


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


def _policy(args):
    """The ``GatePolicy`` of the parsed gate flags (one per field, ``adreg.options``)."""
    from adreg.options import GatePolicy

    return GatePolicy(**{f.name: getattr(args, f.name) for f in GatePolicy.cli_fields()})


# -- fit ---------------------------------------------------------------------------------------------
def _fit_settings(args, options=None) -> dict:
    """``adreg.api.fit`` keywords from the parsed ``adreg fit`` flags: every ``FitOptions`` field the command
    line sets (``adreg.options``) but the category, and the method's hyper-parameters."""
    from adreg.options import FitOptions

    params = dict(args.param)
    if args.pca_ev is not None:
        params["pca_ev"] = args.pca_ev
    out = {f.name: getattr(args, f.name) for f in (options or FitOptions).cli_fields() if f.name != "category"}
    out["params"] = params
    return out


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
                     tracking_uri=args.tracking_uri, settings_from=args.settings_from, **_fit_settings(args))
    _print_fit(out, args.promote)
    return EXIT_REFUSED if out.promoted is False else 0


def _sigterm_as_interrupt() -> None:
    """SIGTERM stops a long command the way Ctrl-C does (what it finished is kept, nothing half-registered)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def cmd_tune(args) -> int:
    _sigterm_as_interrupt()
    out = _api().tune(args.category, train_dir=args.train_dir, val_dir=args.val_dir, test_dir=args.test_dir,
                      evidence_dir=args.evidence_dir, k_shot=args.k_shot, seed=args.seed, space=args.space,
                      trials=args.trials, time_budget=args.time_budget, storage=args.storage, study=args.study,
                      selection_goods=args.selection_goods, pruning=args.pruning, holdout=args.holdout,
                      review_seed=args.review_seed, aug_views=args.aug_views,
                      threshold_quantile=args.threshold_quantile,
                      device=args.device, batch_size=args.batch_size, register=args.register,
                      promote=args.promote, export=args.export, tracking_uri=args.tracking_uri)
    s = out.search
    if args.json:
        _json_out({"parent_run_id": out.run_id, "leader": s.leader, "chosen": out.chosen, "fallback": out.fallback,
                   "evidence": s.evidence, "stopped": s.stopped, "seconds": s.seconds, "n_here": s.n_here,
                   "versus_default": s.versus_default, "leaderboard": out.leaderboard(),
                   "version": out.version, "promoted": out.promoted})
        return EXIT_REFUSED if out.promoted is False else 0
    if not s.leader:
        print(f"joined search {s.study_name!r}: ran {s.n_here} candidate(s) under run {out.run_id}; "
              "the worker that started it chooses and registers")
        return 0
    ev = s.evidence
    print(f"evidence ({ev['kind']}): {ev['n_good']} good, {ev['n_defective']} defective images, never the test folder")
    if out.fallback:
        print(f"too little evidence to choose: {out.fallback}; fitted the defaults")
    else:
        rows = [r for r in out.leaderboard() if r["rank"] != ""][:10]
        columns = ["rank", "candidate", "top_fraction", "selection_image_auroc", "interval", "selection_pixel_auroc",
                   "fit_seconds"]
        _print_table(rows, columns)
        n_other = len(s.candidates) - len(rows)
        states = {}
        for c in s.candidates:
            states[c.state] = states.get(c.state, 0) + 1
        print(f"{len(s.candidates)} candidates ({', '.join(f'{n} {k}' for k, n in sorted(states.items()))})"
              f"{f'; {n_other} more in the leaderboard' if n_other > 0 else ''}; {s.seconds:.0f} s"
              + (f"; stopped: {s.stopped}" if s.stopped else ""))
        vd = s.versus_default
        if vd:
            print(f"chosen - default on the selection set: {vd['diff']:+.4f} [{vd['low']:+.3f}, {vd['high']:+.3f}], "
                  f"p = {vd['p_value']:.3g} ({vd['method']})")
        print(f"chosen: {s.chosen.label} / top {s.chosen.settings.get('top_fraction')}")
    _print_fit(out, args.promote)
    print(f"leaderboard: tune/leaderboard.csv and tune/leaderboard.png on run {out.run_id}; "
          f"reuse the choice: adreg fit --category {args.category} --settings-from {out.run_id}")
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
             (f"adreg serve {args.category} --port 5001", f"REST: models:/{out.registered_name}@production")]
    width = max(len(cmd) for cmd, _ in steps)
    print("\nnext:")
    for cmd, what in steps:
        print(f"  {cmd.ljust(width)}  # {what}")
    return 0


# -- registry ----------------------------------------------------------------------------------------
def _print_gate_set(part, args, policy) -> None:
    """One set's gate table: each metric with its interval, floor, the paired difference, the verdict."""
    from adreg.statistics import GATED

    dec = part.decision
    res = dec.resampling
    base = f"v{part.baseline_version}" if part.baseline is not None else None
    masked = f" ({dec.n_masked} with masks)" if dec.n_masked is not None else ""
    where = part.eval_set if part.kind == "production" else f"the fit-time set, {part.eval_set}"
    print(f"gate on {where}: {dec.n_good} good, {dec.n_defective} defective images{masked}")
    pixel = (f"; pixel metrics {res.pixel_resamples}" + (f" at {res.pixel_size[0]}x{res.pixel_size[1]}"
                                                          if res.pixel_size else "")) if res.pixel_resamples else ""
    print(f"  {dec.level:.0%} intervals: stratified bootstrap, {res.n_resamples} resamples{pixel} (seed {res.seed}); "
          f"floors: image {policy.min_image_auroc}, pixel {policy.min_pixel_auroc}; at least {policy.min_per_class} "
          f"good and {policy.min_per_class} defective")
    cand_col, base_col = f"v{args.version} (candidate)", f"{base} (current {args.alias})"
    diff_col = f"v{args.version} - {base} [{dec.level:.0%}]"
    rows = []
    for key in GATED:
        v = dec.metrics.get(key)
        if v is None:
            continue
        row = {"metric": key, cand_col: v.candidate.text(), "floor": "" if v.floor is None else f"{v.floor:g}",
               "verdict": v.verdict}
        if v.baseline is not None:
            row[base_col] = v.baseline.text()
        if v.paired is not None:
            t = v.paired
            row.update({diff_col: t.text(), "p": f"{t.p_value:.3g}", "test": t.method})
        rows.append(row)
    columns = ["metric", cand_col, "floor"] + ([base_col, diff_col, "p", "test"] if base else []) + ["verdict"]
    _print_table(rows, columns)
    vs = f" against {base} (current {args.alias})" if base else f" (no baseline: {args.alias!r} is a new alias)"
    print(f"{part.kind} set verdict: {dec.verdict}{vs}; {res.seconds:.1f} s for intervals and paired tests")


def cmd_promote(args) -> int:
    out = _api().promote(args.category, args.version, args.alias, force=args.force, reason=args.reason or "",
                         eval_dir=args.eval_dir, policy=_policy(args), device=args.device,
                         production=args.production, tracking_uri=args.tracking_uri)
    report, promo, policy = out.gate, out.promotion, out.policy
    if args.json:
        _json_out({"category": args.category, "alias": args.alias, "version": str(args.version),
                   "promoted": out.promoted, "forced": out.forced,
                   **{k: getattr(promo, k, None) for k in ("previous", "model_uri", "by", "identity", "event_run")},
                   "gate": {**report.summary(), "floors": policy.floors(), "level": policy.level,
                            "min_per_class": policy.min_per_class}})
        return 0 if out.promoted else EXIT_REFUSED
    for part in report.sets:
        _print_gate_set(part, args, policy)
    dec = report.decision
    if len(report.sets) > 1:
        print(f"verdict: {'promote' if report.passed else dec.verdict} (every set with enough evidence must pass)")
    from adreg.pyfunc.shadow import describe_latest

    print(describe_latest(args.category, args.version) or "", end="")
    for failure in report.failures:
        print(f"  gate: {failure}")
    if not out.promoted:
        print(f"REFUSED ({dec.verdict}): version {args.version} stays out of {args.alias!r} "
              "(use --force to override, recorded)")
        return EXIT_REFUSED
    was = f"(was version {promo.previous})" if promo.previous else "(new alias)"
    forced = " FORCED past a failed gate" if out.forced else ""
    print(f"{promo.alias} -> {promo.model_uri.split('@')[0][len('models:/'):]} version {promo.version} {was}{forced}")
    print(f"model URI: {promo.model_uri} (by {promo.by}, {promo.identity})")
    return 0


def cmd_rollback(args) -> int:
    promo = _api().rollback(args.category, args.alias, reason=args.reason or "",
                            tracking_uri=args.tracking_uri).promotion
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
    from adreg.cli.render import HISTORY_COLUMNS, history_rows

    _print_table(history_rows(events), HISTORY_COLUMNS)
    return 0


def cmd_compare(args) -> int:
    from adreg.cli.render import compare_rows

    rows = compare_rows(_api().compare(args.category, args.v1, args.v2, tracking_uri=args.tracking_uri))
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
        columns = ["category", "version", "aliases", "method", "image_auroc", "pixel_auroc", "aupro",
                   "image_f1_max", "threshold", "created", "serving"]
        if any("on_line" in r for r in rows):
            columns.insert(-2, "on_line")
        _print_table(rows, columns)
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
                          tracking_uri=args.tracking_uri, protocol=args.protocol, grpc_port=args.grpc_port)
    print(f"serving {server.description} on {server.endpoint} (device {args.device}, "
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
    for version, q in out["quality"].items():
        print(f"  on the line, version {version}: {_quality_text(q)}")
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
             "normal_percentile": "" if r["normal_percentile"] is None else f"{r['normal_percentile']:.1f}",
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
    out = _api().bundle(args.categories, args.alias, args.promote, tracking_uri=args.tracking_uri)
    promo = out.promotion
    print(f"registered {out.registered_name} version {out.version}: categories {', '.join(args.categories)} "
          f"(each at @{args.alias})")
    print(f"{promo.alias} -> version {promo.version}: serve it with `adreg serve router` ({promo.model_uri}); "
          "requests carry a 'category' column beside 'image'")
    return 0


def cmd_export(args) -> int:
    out = _api().export(args.category, args.version, args.runtime, tracking_uri=args.tracking_uri)
    served = "openvino" if args.runtime == "openvino-int8" else args.runtime  # INT8: the OpenVINO path
    print(f"registered {out.registered_name} version {out.version}: version {args.version} with its "
          f"backbone on {args.runtime} (served with runtime {served} unless model_config overrides it)")
    print(f"run: {out.run_id}; promote it with `adreg promote {args.category} --version {out.version}`")
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
def _print_update(out) -> None:
    r = out.result
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
            again = f", {s['second_score']:.4g} under the grown model" if "second_score" in s else ""
            print(f"    {s['path']}  score {s['score']:.4g}{again}")
    if r.cleared:
        print(f"  {len(r.cleared)} more suspect(s) cleared on a second look (the grown model scores them at or "
              "below its own threshold) and learned from (--no-second-look holds them out)")
    print(f"  {r.options.method}: {r.method_report.get('what', 'updated')}")
    print(f"  training images {r.n_parent_training} -> {r.n_parent_training + len(r.added)} (+{len(r.added)}); "
          f"threshold {r.parent_threshold:.4g} -> {r.detector.threshold.value:.4g} ({r.detector.threshold.rule}, "
          f"from {r.calibration_source})")
    keys = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "threshold"]
    new = r.metrics()
    rows = [{"model": f"v{r.parent_version} (parent)", **{k: f"{r.parent_metrics[k]:.4f}" for k in keys
                                                           if k in r.parent_metrics}},
            {"model": "update", **{k: f"{new[k]:.4f}" for k in keys if k in new}}]
    if r.evaluation is not None:
        print(f"evaluated on version {r.parent_version}'s evaluation set ({r.data.source}):")
        _print_table(rows, ["model", *keys])
    else:
        print(f"  not evaluated: version {r.parent_version} has no evaluation set (the gate can judge on reviewed "
              "images: adreg review, adreg promote)")
    print(f"run: {out.run_id} ({r.seconds:.1f} s)")


def cmd_update(args) -> int:
    out = _api().update(args.category, args.add_good, from_reviews=args.from_reviews, review_seed=args.review_seed,
                        covered_from=args.covered_from,
                        from_alias=args.from_alias, from_version=args.from_version,
                        include_suspects=args.include_suspects, second_look=args.second_look,
                        holdout=args.holdout,
                        min_calibration=args.min_calibration, seed=args.seed, register=args.register,
                        promote=args.promote, reason=args.reason or "", policy=_policy(args), device=args.device,
                        tracking_uri=args.tracking_uri)
    _print_update(out)
    if args.covered_from:
        print(f"  learned without review: {out.result.sources.get('covered_goods', 0)} passed capture(s) of "
              f"{args.covered_from} that version {out.result.parent_version} scored below its median normal image")
    if out.version:
        print(f"registered {out.registered_name} version {out.version} (parent: version {out.result.parent_version})")
    if out.gate is not None:
        for failure in out.gate.failures:
            print(f"  gate: {failure}")
        if out.promoted:
            print(f"promoted version {out.version} to {args.promote!r}: models:/{out.registered_name}@{args.promote}")
        else:
            print(f"not promoted to {args.promote!r} (gate failed; `adreg promote --force` overrides, recorded)")
    return EXIT_REFUSED if out.promoted is False else 0


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
                  {"what": "median score", "production": f"{rep.score_median:.4g} "
                                                          f"(normal percentile {rep.median_normal_percentile:.0f})",
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


# -- reviews ---------------------------------------------------------------------------------------------------
def _pct(x) -> str:
    return "-" if x is None or x != x else f"{100 * x:.0f}%"


def _quality_text(q: dict) -> str:
    return (f"flag precision {_pct(q['flag_precision'])} ({q['flags_confirmed']}/{q['flags_reviewed']} reviewed "
            f"flags were defects), false alarms {_pct(q['false_alarm_rate'])} ({q['false_alarms']}/"
            f"{q['goods_reviewed']} reviewed goods flagged), misses {q['misses']}/{q['passes_reviewed']} "
            "reviewed passes")


def cmd_review(args) -> int:
    print(f"review queue for {', '.join(args.categories)} on http://127.0.0.1:{args.port} (Ctrl-C stops it)",
          flush=True)
    _api().review(args.categories, args.capture, port=args.port, sample_rate=args.sample_rate, seed=args.seed,
                  device=args.device, tracking_uri=args.tracking_uri, strategy=args.strategy,
                  random_share=args.random_share)
    return 0


def cmd_label(args) -> int:
    done = _api().label(args.category, args.files, args.verdict, mask=args.mask, reviewer=args.reviewer,
                        tracking_uri=args.tracking_uri)
    if args.json:
        _json_out([lab.as_dict() for lab in done])
        return 0
    for lab in done:
        judged = f" (judged by v{lab.judged_version}: score {lab.judged_score:.4g}, " \
                 f"{'flagged' if lab.flagged else 'passed'})" if lab.judged_version else ""
        mask = ", with its region" if lab.mask else ""
        print(f"labelled {lab.path} {lab.verdict}{mask} by {lab.user} ({lab.identity}){judged}")
    return 0


def cmd_labels(args) -> int:
    from adreg.registry.labels import consensus

    api = _api()
    labs = api.labels(args.category, tracking_uri=args.tracking_uri)
    verdicts = consensus(labs)
    prod = api.production_set(args.category, seed=args.seed) if labs else None
    if args.json:
        _json_out({"category": args.category, "labels": [lab.as_dict() for lab in labs],
                   "images": {sha: {"verdict": v.verdict, "by": {x.user: x.verdict for x in v.labels}}
                              for sha, v in verdicts.items()},
                   "production_set": None if prod is None else {
                       "digest": prod.digest, "n_good": prod.n_good, "n_defective": prod.n_defective,
                       "n_masks": prod.n_masks, "n_grow": len(prod.grow), "n_disputed": prod.n_disputed,
                       "seed": prod.seed, "evaluation": [str(s.path) for s in prod.samples],
                       "grow": [str(p) for p in prod.grow]}})
        return 0
    if not labs:
        print(f"no labels for {args.category!r} yet: `adreg review {args.category} --capture DIR` or `adreg label`")
        return 0
    rows = []
    for sha, v in sorted(verdicts.items(), key=lambda kv: kv[1].latest.at):
        lab = v.latest
        rows.append({"image": lab.path.rsplit("/", 1)[-1], "verdict": v.verdict,
                     "by": ", ".join(f"{x.user}: {x.verdict}" for x in v.labels),
                     "judged": f"v{lab.judged_version} {'flagged' if lab.flagged else 'passed'}"
                               if lab.judged_version else "", "region": "yes" if any(x.mask for x in v.labels) else "",
                     "at": lab.at[:19], "sha256": sha[:12]})
    _print_table(rows, ["image", "verdict", "by", "judged", "region", "at", "sha256"])
    print(f"{len(labs)} label(s) of {len(verdicts)} image(s); {prod.describe()}; {len(prod.grow)} reviewed goods on "
          f"the grow side (seed {prod.seed}); {prod.n_disputed} disputed")
    return 0


def cmd_quality(args) -> int:
    out = _api().quality(args.category, log=not args.no_log, tracking_uri=args.tracking_uri)
    figures = {v: q.as_dict() for v, q in out["versions"].items()}
    if args.json:
        _json_out({"category": args.category, "run_id": out["run_id"], "versions": figures})
        return 0
    if not figures:
        print(f"no reviewed captures of {args.category!r} yet (adreg review)")
    for version, q in figures.items():
        print(f"version {version}: {_quality_text(q)}")
    if out["run_id"]:
        print(f"monitoring run: {out['run_id']}")
    return 0


def cmd_threshold(args) -> int:
    out = _api().threshold(args.category, from_alias=args.from_alias, from_version=args.from_version,
                           target_false_alarm_rate=args.target_false_alarm, rule=args.rule,
                           review_seed=args.review_seed, promote=args.promote, reason=args.reason or "", policy=_policy(args), device=args.device,
                           tracking_uri=args.tracking_uri)
    if args.json:
        _json_out({"category": args.category, "parent_version": out.parent_version, "version": out.version,
                   "run_id": out.run_id, "threshold": out.threshold, "parent_threshold": out.parent_threshold,
                   "rule": out.rule, "details": out.details, "promoted": out.promoted,
                   "gate": None if out.gate is None else out.gate.summary()})
        return 0 if out.promoted is not False else EXIT_REFUSED
    b, a = out.before, out.after
    print(f"threshold from the line ({out.rule}) on the {out.production.describe()}")
    _print_table([{"threshold": f"v{out.parent_version}: {out.parent_threshold:.4g}", "recall": _pct(b["recall"]),
                   "false alarms": _pct(b["false_alarm_rate"]), "precision": _pct(b["precision"])},
                  {"threshold": f"new: {out.threshold:.4g}", "recall": _pct(a["recall"]),
                   "false alarms": _pct(a["false_alarm_rate"]), "precision": _pct(a["precision"])}],
                 ["threshold", "recall", "false alarms", "precision"])
    print(f"registered {out.registered_name} version {out.version} (parent: version "
          f"{out.parent_version}, run {out.run_id})")
    if out.gate is not None:
        for failure in out.gate.failures:
            print(f"  gate: {failure}")
        print(f"promoted version {out.version} to {args.promote!r}" if out.promoted else
              f"not promoted to {args.promote!r} (gate failed; `adreg promote --force` overrides, recorded)")
    return EXIT_REFUSED if out.promoted is False else 0
