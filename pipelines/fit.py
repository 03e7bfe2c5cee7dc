"""MLproject ``fit`` entry point: the same options as ``adreg fit``; empty strings mean "not given"."""

from __future__ import annotations

import argparse
import sys

from adreg.cli import add_fit_arguments, fit_options_from_args, run_fit
from adreg.errors import AdregError


def drop_empty_options(argv: list[str]) -> list[str]:
    """MLproject cannot omit an optional flag, so ``--flag ""`` means the flag was not given."""
    out, i = [], 0
    while i < len(argv):
        if argv[i].startswith("--") and i + 1 < len(argv) and argv[i + 1] == "":
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tracking-uri")
    add_fit_arguments(parser)
    args = parser.parse_args(drop_empty_options(sys.argv[1:] if argv is None else list(argv)))
    try:
        _, logged = run_fit(fit_options_from_args(args), args.register, args.promote, args.tracking_uri)
    except AdregError as exc:
        print(f"adreg: error: {exc}", file=sys.stderr)
        return 2
    return 1 if logged.promoted is False else 0


if __name__ == "__main__":
    sys.exit(main())
