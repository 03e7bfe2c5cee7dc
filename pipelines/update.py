"""MLproject ``update`` entry point: ``adreg update`` with MLproject-friendly values.

MLproject passes every parameter, so ``--flag ""`` means "not given", ``--add-good`` takes one
comma-separated string, and the switches ``--register`` / ``--include-suspects`` take true/false.
"""

from __future__ import annotations

import sys

from adreg.cli import main as cli_main
from pipelines.fit import drop_empty_options

SWITCHES = ("--register", "--include-suspects")


def to_cli(argv: list[str]) -> list[str]:
    argv = drop_empty_options(argv)
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in SWITCHES and i + 1 < len(argv) and argv[i + 1].lower() in ("true", "false", "1", "0"):
            if argv[i + 1].lower() in ("true", "1"):
                out.append(arg)
            i += 2
            continue
        if arg == "--add-good" and i + 1 < len(argv):
            out += [arg, *(x for x in argv[i + 1].split(",") if x)]
            i += 2
            continue
        out.append(arg)
        i += 1
    if "--from-version" in out and "--from" in out:  # a version wins over the default alias
        j = out.index("--from")
        del out[j:j + 2]
    return out


def main(argv=None) -> int:
    return cli_main(["update", *to_cli(sys.argv[1:] if argv is None else list(argv))])


if __name__ == "__main__":
    sys.exit(main())
