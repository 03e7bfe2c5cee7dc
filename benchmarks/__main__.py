"""``python -m benchmarks NAME [args]``: run one benchmark; ``python -m benchmarks`` lists them."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

from benchmarks import BENCHMARKS


def summary(module: str) -> str:
    """The first paragraph of a benchmark's docstring on one line, read from its source (nothing imported)."""
    tree = ast.parse((Path(__file__).parent / f"{module}.py").read_text())
    first = (ast.get_docstring(tree) or "").split("\n\n")[0]
    return " ".join(first.split()).replace("``", "`")


def listing() -> str:
    width = max(map(len, BENCHMARKS))
    lines = ["usage: python -m benchmarks NAME [args]   (NAME --help: its options)", "", "benchmarks:"]
    lines += [f"  {name:<{width}}  {summary(module)}" for name, module in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(listing())
        return 0
    name, rest = argv[0], argv[1:]
    module = BENCHMARKS.get(name) or BENCHMARKS.get(name.replace("_", "-"))
    if module is None:
        print(f"unknown benchmark {name!r}\n\n{listing()}", file=sys.stderr)
        return 2
    sys.argv = [f"benchmarks {name}", *rest]  # what argparse shows as the program
    return importlib.import_module(f"benchmarks.{module}").main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
