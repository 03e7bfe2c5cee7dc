"""The ``adreg`` argument parser: every sub-command, its arguments and help (the docs' CLI reference is
generated from ``build_parser``)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from adreg.cli.commands import (cmd_compare, cmd_drift, cmd_export, cmd_fit, cmd_grant, cmd_history, cmd_label,
                                cmd_labels, cmd_models, cmd_predict, cmd_promote, cmd_quality, cmd_quickstart,
                                cmd_review, cmd_rollback, cmd_score, cmd_serve, cmd_serve_bundle, cmd_status,
                                cmd_threshold, cmd_tune, cmd_update, cmd_whoami)
from adreg.review.selection import DEFAULT_RANDOM_SHARE, DEFAULT_STRATEGY, STRATEGIES

DESCRIPTION = "The adreg command line"  # build_parser adds every command's name


#: help of the arguments many commands share, given where a command does not say more
COMMON_HELP = {
    "category": "product category (registered model adreg-<category>)",
    "categories": "product categories",
    "version": "a registered version number",
    "alias": "alias of the category (default production)",
    "device": "auto, cpu or cuda (default auto)",
    "reason": "recorded in the history and on the version's tags",
    "host": "address to bind (default 127.0.0.1)",
    "port": "port to listen on",
    "workers": "server worker processes",
    "v1": "first version to compare",
    "v2": "second version to compare",
    "user": "the user's login",
    "level": "READ, EDIT or MANAGE",
    "files": "image files",
}


def _fill_help(parser: argparse.ArgumentParser) -> None:
    """Every argument of every command gets a help text: its own, else ``COMMON_HELP``'s."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _fill_help(sub)
        elif action.help is None and action.dest in COMMON_HELP:
            action.help = COMMON_HELP[action.dest]


def _budget(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected minutes or 'auto', got {text!r}") from None


def _parse_param(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _gate_args(p) -> None:
    """The gate's flags, one per ``GatePolicy`` field the command line sets (``adreg.options``)."""
    from adreg.options import GatePolicy

    add_option_arguments(p, options=GatePolicy)


def add_option_arguments(p: argparse.ArgumentParser, names=None, options=None, helps: dict | None = None) -> None:
    """One flag per field of ``options`` (``FitOptions`` by default, or ``GatePolicy``; all of them, or
    ``names``): name, default, help and type from the field (``adreg.options``); ``helps`` replaces a
    field's help where a command means more by it."""
    from adreg.options import FitOptions

    fields = {f.name: f for f in (options or FitOptions).cli_fields()}
    for name in names or list(fields):
        f = fields[name]
        flag = f.metadata.get("flag") or f.name
        kw = dict(f.metadata["cli"])
        default = None if f.default is dataclasses.MISSING else f.default
        if not kw.get("required"):
            kw["default"] = default
        if "type" not in kw and isinstance(default, (int, float)) and not isinstance(default, bool):
            kw["type"] = type(default)
        kw["help"] = (helps or {}).get(name, f.metadata["help"]).format(default=default)
        p.add_argument("--" + flag.replace("_", "-"), dest=f.name, **kw)


def add_fit_arguments(p: argparse.ArgumentParser, options=None) -> None:
    """The ``adreg fit`` flags: one per ``FitOptions`` field (name, default, help and type from the field,
    ``adreg.options``), then the method's hyper-parameters and what to do with the fit. ``options``: a
    ``FitOptions`` subclass with fields of its own."""
    add_option_arguments(p, options=options)
    p.add_argument("--pca-ev", type=float, help="SubspaceAD explained-variance ratio to keep (default 0.99)")
    p.add_argument("--param", type=_parse_param, action="append", default=[], metavar="KEY=VALUE",
                   help="other method hyper-parameter, repeatable")
    p.add_argument("--register", action="store_true", help="register the model as a new version of adreg-<category>")
    p.add_argument("--promote", metavar="ALIAS", help="after registering, point ALIAS (e.g. staging) at it")
    p.add_argument("--export", choices=["onnx", "onnxruntime", "openvino"],
                   help="also export the backbone and serve the model through this CPU runtime (onnx = onnxruntime)")
    p.add_argument("--settings-from", metavar="RUN_ID",
                   help="reuse the settings an `adreg tune` search chose (its parent run): method, backbone, layers, "
                        "input size, augmentation and image-score aggregation replace those flags")


def _add_tune_command(sub) -> None:
    p = sub.add_parser("tune", help="search methods and settings on held-out evidence, log every candidate, "
                                    "fit the winner")
    p.add_argument("category", help="product category (model name adreg-<category>)")
    add_option_arguments(p, ["train_dir", "val_dir", "test_dir"], helps={
        "train_dir": "the product's good images, or an MVTec / MTD / ELPV folder (default: the bundled data)",
        "val_dir": "validation folder: good/ and optional defect sub-folders (its defects rank too)",
        "test_dir": "test folder: used only after the choice, for the evaluation and the gate"})
    p.add_argument("--evidence-dir", help="labelled images for the choice only (good/ and defect sub-folders), "
                                          "never the test folder; default: synthetic defects on held-out goods")
    add_option_arguments(p, ["k_shot", "seed"], helps={"seed": "seed of the shots, augmentation and evidence"})
    p.add_argument("--space", metavar="FILE", help="search space, YAML or JSON (default: adreg.tuning.DEFAULT_SPACE; "
                                                   "python -m adreg.tuning prints it)")
    p.add_argument("--trials", type=int, help="fits at most, all workers together (default: the whole space)")
    p.add_argument("--time-budget", type=_budget, metavar="MIN",
                   help="minutes this worker searches; a running candidate finishes; auto = 8x the first "
                        "candidate's time (default: the whole space)")
    p.add_argument("--storage", help="Optuna storage shared by several workers, e.g. postgresql://host/db "
                                     "(default: in memory, one worker)")
    p.add_argument("--study", help="study name the workers share (default: derived from category, shots, seed, "
                                   "evidence and space)")
    p.add_argument("--review-seed", type=int, default=0,
                   help="seed of the split of reviewed production defects: half rank the candidates, the rest "
                        "stay for the gate")
    p.add_argument("--selection-goods", type=int, default=30,
                   help="held-out good images in the selection set (default 30)")
    p.add_argument("--no-pruning", dest="pruning", action="store_false",
                   help="score every candidate on the whole selection set")
    add_option_arguments(p, ["holdout", "aug_views", "threshold_quantile", "device", "batch_size"])
    p.add_argument("--register", action="store_true", help="register the winner as a new version of adreg-<category>")
    p.add_argument("--promote", metavar="ALIAS", help="after registering, point ALIAS (e.g. staging) at it")
    p.add_argument("--export", choices=["onnx", "onnxruntime", "openvino"],
                   help="also export the winner's backbone and serve it through this CPU runtime")
    p.add_argument("--json", action="store_true", help="print the leaderboard and outcome as JSON")
    p.set_defaults(func=cmd_tune)


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
    sets = p.add_mutually_exclusive_group()
    sets.add_argument("--production-set", dest="production", action="store_const", const=True, default=None,
                      help="also judge on the reviewed production set, and fail when there is none (default: "
                           "whenever reviews exist)")
    sets.add_argument("--no-production-set", dest="production", action="store_const", const=False,
                      help="judge on the fit-time set only")
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

    p = sub.add_parser("serve", help="serve a registered model over REST with `mlflow models serve` (or the Open "
                                     "Inference Protocol, --protocol v2)")
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
    p.add_argument("--protocol", choices=["mlflow", "v2"], default="mlflow",
                   help="mlflow: MLflow's /invocations (default); v2: the Open Inference Protocol (KServe, Seldon, "
                        "Triton clients) on KServe's model server, /v2/models/adreg-CATEGORY/infer "
                        "(pip install 'adreg[serve-v2]')")
    p.add_argument("--grpc-port", type=int, metavar="PORT", help="with --protocol v2: also serve V2 over gRPC here")
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

    p = sub.add_parser("export", help="register a new version whose backbone runs on ONNX Runtime or OpenVINO (CPU), "
                                       "f32 or INT8")
    p.add_argument("category")
    p.add_argument("--version", required=True, help="the registered version to export")
    p.add_argument("--runtime", default="openvino", choices=["onnxruntime", "openvino", "openvino-int8"],
                   help="CPU runtime of the exported backbone (default openvino); openvino-int8: OpenVINO with the "
                        "backbone quantized by NNCF, calibrated on the version's own training images, its threshold "
                        "re-derived and the version re-evaluated (served with runtime openvino)")
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
    p.add_argument("--add-good", nargs="+", default=[], metavar="DIR",
                   help="folders of good images, read recursively (e.g. the server's capture folder)")
    p.add_argument("--from-reviews", action="store_true",
                   help="also grow with the reviewed goods (false alarms included) on the grow side of the "
                        "production set's seeded split; the labels' digest goes into the lineage")
    p.add_argument("--review-seed", type=int, default=0,
                   help="seed of the split of reviewed goods into grown-on and evaluated-on, and of the review "
                        "queue's random slice (default 0)")
    p.add_argument("--covered-from", metavar="DIR",
                   help="a capture folder: also grow with its unreviewed passed captures that the parent scored "
                        "below its median normal image (goods it already covers; never the random slice)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--from", dest="from_alias", default="production", metavar="ALIAS",
                       help="grow the version this alias points at (default production)")
    which.add_argument("--from-version", help="grow this version instead")
    p.add_argument("--include-suspects", action="store_true",
                   help="also learn from new images the parent scores above its threshold (held out by default)")
    p.add_argument("--no-second-look", dest="second_look", action="store_false",
                   help="hold out every suspect; by default the grown model judges them again and learns from "
                        "those it scores at or below its own threshold")
    p.add_argument("--holdout", type=int,
                   help="new good images held out to recalibrate the threshold (at most half; default 20, and 0 "
                        "with --from-reviews alone: the parent's calibration images recalibrate it)")
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


def _add_review_commands(sub) -> None:
    p = sub.add_parser("review", help="the browser review queue of captured images (127.0.0.1): label flags and "
                                      "passes good or defect, draw defect regions")
    p.add_argument("categories", nargs="+", metavar="CATEGORY")
    p.add_argument("--capture", required=True, metavar="DIR", help="the folder `adreg serve --capture` writes")
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765)")
    p.add_argument("--strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY,
                   help="which captures come first: informative (default: flags nearest the threshold and the passes "
                        "least like anything learned, near-duplicates once), newest (flags newest first, then a "
                        "sample of passes) or random")
    p.add_argument("--random-share", type=float, default=DEFAULT_RANDOM_SHARE,
                   help="share of all captures kept as the random slice, every strategy mixes it in; the gate, "
                        "`adreg quality` and `adreg threshold --from-reviews` evaluate on its labels (default %(default)s)")
    p.add_argument("--sample-rate", type=float, default=0.1,
                   help="share of passed captures the newest strategy queues after the flags (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random slice and the samples")
    p.add_argument("--device", default="cpu", help="device for the anomaly-map overlays (default cpu)")
    p.set_defaults(func=cmd_review)

    p = sub.add_parser("label", help="record review labels for image files (scriptable; the same records as the "
                                     "review page)")
    p.add_argument("category")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--as", dest="verdict", required=True, choices=["good", "defect", "skip"],
                   help="the verdict recorded for every file")
    p.add_argument("--mask", help="defect region image (white = defect) for one defect")
    p.add_argument("--reviewer", help="reviewer name where the store has no users (default $ADREG_USER / login)")
    _json_flag(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("labels", help="the review labels of a category, who said what, and the production set")
    p.add_argument("category")
    p.add_argument("--seed", type=int, default=0, help="seed of the grown-on / evaluated-on split of goods")
    _json_flag(p)
    p.set_defaults(func=cmd_labels)

    p = sub.add_parser("quality", help="production quality per version from the reviews (flag precision, false "
                                       "alarms, misses); logged as a monitoring run")
    p.add_argument("category")
    p.add_argument("--no-log", action="store_true", help="do not log a monitoring run")
    _json_flag(p)
    p.set_defaults(func=cmd_quality)

    p = sub.add_parser("threshold", help="a new version whose threshold is chosen on the reviewed production set")
    p.add_argument("category")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--from", dest="from_alias", default="production", metavar="ALIAS",
                       help="start from the version this alias points at (default production)")
    which.add_argument("--from-version", help="start from this version")
    p.add_argument("--target-false-alarm", type=float, metavar="RATE",
                   help="the lowest threshold flagging at most this share of reviewed goods (default: the parent's "
                        "own share there)")
    p.add_argument("--rule", choices=["false_alarm", "f1"], default="false_alarm",
                   help="false_alarm (default: at --target-false-alarm) or f1 (the F1 optimum); either is refused "
                        "when it flags more reviewed goods than the parent's 95%% interval allows")
    p.add_argument("--review-seed", type=int, default=0, help="seed of the reviewed goods' split (default 0)")
    p.add_argument("--promote", metavar="ALIAS", help="promote the new version through the gate")
    p.add_argument("--reason", help="recorded with the promotion")
    _gate_args(p)
    p.add_argument("--device", default="auto")
    _json_flag(p)
    p.set_defaults(func=cmd_threshold)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adreg", description=DESCRIPTION)
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default $MLFLOW_TRACKING_URI, "
                                               "else sqlite in $ADREG_HOME or ./adreg-store)")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show MLflow's log lines and download bars, and the cause of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fit", help="fit, evaluate and log a detector for one category")
    add_fit_arguments(p)
    p.set_defaults(func=cmd_fit)
    _add_tune_command(sub)
    _add_lifecycle_commands(sub)
    _add_serve_commands(sub)
    _add_governance_commands(sub)
    _add_update_commands(sub)
    _add_review_commands(sub)
    p = sub.add_parser("quickstart", help="fit 1-shot bottle on the bundled data, register, promote to production")
    p.add_argument("--category", default="bottle", help="a bundled category (default bottle)")
    p.add_argument("--train-dir", help="its folder (default: the bundled data)")
    p.add_argument("--k-shot", type=int, default=1, help="good images to fit on (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shot selection")
    p.set_defaults(func=cmd_quickstart)
    parser.description = f"{DESCRIPTION}: {', '.join(sub.choices)} (adreg COMMAND --help for each)."
    _fill_help(parser)
    return parser
