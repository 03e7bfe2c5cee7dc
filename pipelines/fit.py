"""MLproject ``fit`` entry point: ``adreg fit`` with MLproject-friendly values (empty strings mean "not given")."""

from __future__ import annotations

import sys

from adreg.cli import main as cli_main


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


def to_cli(argv: list[str]) -> list[str]:
    """``adreg`` arguments for the entry point's: the store option goes before the sub-command."""
    argv = drop_empty_options(argv)
    head = []
    if "--tracking-uri" in argv:
        i = argv.index("--tracking-uri")
        head, argv = argv[i:i + 2], argv[:i] + argv[i + 2:]
    return [*head, "fit", *argv]


def main(argv=None) -> int:
    return cli_main(to_cli(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(main())
