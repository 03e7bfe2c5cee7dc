"""The ``adreg`` command line: argument parsing (``adreg.cli.parser``) and printing (``adreg.cli.commands``) over
the public API (``adreg.api``), nothing else.

Exit codes: 0 done; 1 refused (a gate, a permission, a tampered model, drift found); 2 bad input, unknown
names, an unreachable store (argparse too); 130 interrupted.
"""

from __future__ import annotations

import logging
import os
import sys

from adreg.cli.commands import _json_out
from adreg.cli.parser import add_fit_arguments, build_parser
from adreg.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, AdregError

__all__ = ["main", "build_parser", "add_fit_arguments"]


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
