"""MkDocs hook: render the `adreg` command-line reference from the parser itself, at build time.

docs/reference/cli.md holds the placeholder ``<!-- cli-reference -->``; ``on_page_markdown`` replaces it
with the top-level usage and, for every sub-command, its one-line help and ``format_help()`` in a code
block. The text comes from ``adreg.cli.build_parser()``, so the page cannot drift from the code.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PLACEHOLDER = "<!-- cli-reference -->"
PAGE = "reference/cli.md"
WIDTH = "100"  # fixed help width: the same page on every machine and terminal

REPO_ROOT = Path(__file__).resolve().parents[2]


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, sub-parser) of every sub-command, in the order they were added."""
    out = []
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                out.append((name, helps.get(name, ""), sub))
    return out


def _help_text(parser: argparse.ArgumentParser) -> str:
    if hasattr(parser, "color"):  # Python 3.14+: no ANSI colours in the page
        parser.color = False
    return "\n".join(line.rstrip() for line in parser.format_help().strip().splitlines())


def render() -> str:
    os.environ["COLUMNS"] = WIDTH
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from adreg.cli import build_parser

    parser = build_parser()
    parts = ["## adreg", "", "```text", _help_text(parser), "```", ""]
    for name, helptext, sub in _subcommands(parser):
        parts += [f"## adreg {name}", ""]
        if helptext:
            parts += [helptext[0].upper() + helptext[1:] + ("" if helptext.endswith(".") else "."), ""]
        parts += ["```text", _help_text(sub), "```", ""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if PLACEHOLDER not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{PAGE} lost its placeholder {PLACEHOLDER}")
    return markdown.replace(PLACEHOLDER, render())
