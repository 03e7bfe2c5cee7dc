"""What every benchmark shares: its docs page, the machine line, CSV rows, int lists, the per-dataset settings,
folders of symlinks, and a child process measured by its own peak RSS.

A page (``docs/benchmarks/<name>.md``) is written whole by ``write_page`` (title, what is measured, machine,
command, date, then the tables); a benchmark that owns one section of a page writes it between two markers
with ``replace_section``. The command on a page is ``python -m benchmarks NAME ARGS`` (``command_line``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
RESULT = "RESULT "  # the line a child process answers with (``child_result``), JSON after it

# How each bundled dataset is benchmarked unless a flag overrides it (docs/benchmarks/accuracy.md says what
# each choice bought): bottle is photographed top-down, so any rotation is a normal view; magnetic tiles have
# vertical grinding streaks (flips only), and their defects cover far less than 1% of a tile (deeper blocks,
# top 0.1%).
DATASET_SETTINGS = {
    "bottle": {"augment": "rotate", "aug_count": 30, "layers": None, "top_fraction": None},
    "mtd": {"augment": "hflip,vflip", "aug_count": 8, "layers": "7,10", "top_fraction": 0.001},
}
GENERIC_SETTINGS = DATASET_SETTINGS["bottle"]


def ints(text) -> list[int]:
    """``"1,2, 4"`` -> ``[1, 2, 4]`` (empty items skipped)."""
    return [int(x) for x in str(text).split(",") if x.strip()]


def fit_settings(dataset: str) -> dict:
    """The dataset's settings (``DATASET_SETTINGS``; another dataset: bottle's) as ``FitOptions`` keywords,
    those that are set only: ``{"augment": "hflip,vflip", "aug_count": 8, "layers": [7, 10], ...}``."""
    own = DATASET_SETTINGS.get(dataset, GENERIC_SETTINGS)
    return {k: (ints(v) if k == "layers" else v) for k, v in own.items() if v is not None}


def dataset_args(args: argparse.Namespace, dataset: str) -> argparse.Namespace:
    """``args`` with the dataset's own settings filled in wherever no flag was given."""
    own = DATASET_SETTINGS.get(dataset, GENERIC_SETTINGS)
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in own.items() if getattr(args, k) is None}})



# -- the machine and the command ---------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: str | None = None) -> str:
    """Cores, CPU model, torch version and threads (and the device, when given) of this machine."""
    import torch

    line = (f"{os.cpu_count()} cores visible, {cpu_model()} ({platform.machine()}), {platform.system()}; torch "
            f"{torch.__version__}, {torch.get_num_threads()} torch threads")
    if device:
        line += f"; device {device}"
        if device.startswith("cuda") and torch.cuda.is_available():
            line += f" ({torch.cuda.get_device_name(0)})"
    return line


def command_line(name: str, argv: list[str] | None) -> str:
    """The command that ran: ``python -m benchmarks NAME`` and its arguments (``argv``, else this process's)."""
    return f"python -m benchmarks {name} {shlex.join(sys.argv[1:] if argv is None else argv)}".rstrip()


def today() -> str:
    return datetime.date.today().isoformat()


# -- pages: docs/benchmarks/<name>.md ----------------------------------------------------------------------
def run_lines(machine: str, command: str, date: str) -> str:
    """The three lines under a page's (or a section's) introduction: machine, command, date."""
    return f"- Machine: {machine}\n- Command: `{command}`\n- Date: {date}\n"


def page_text(title: str, about: str, body: str, command: str, machine: str, date: str) -> str:
    """A benchmark page: title, what is measured (wrapped), machine, command, date, then the table(s)."""
    about = textwrap.fill(" ".join(about.split()), 110, break_long_words=False, break_on_hyphens=False)
    return f"# {title}\n\n{about}\n\n{run_lines(machine, command, date)}\n{body.strip()}\n"


def _write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it (a reader never sees half a page)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_page(name: str, title: str, about: str, body: str, command: str, docs_dir: Path | None = None,
               machine: str | None = None, date: str | None = None) -> Path:
    """Write ``docs/benchmarks/<name>.md`` whole (``--update-docs`` of every benchmark); returns its path."""
    path = Path(docs_dir or DOCS) / f"{name}.md"
    return _write(path, page_text(title, about, body, command, machine or machine_line(), date or today()))


def replace_section(page: Path, begin: str, end: str, section: str, title: str) -> Path:
    """Replace what stands between the markers ``begin`` and ``end`` of ``page`` by ``section`` (the rest of
    the page kept as it is), or append the marked section; a missing page starts as ``# title``."""
    page = Path(page)
    text = page.read_text() if page.is_file() else f"# {title}\n"
    block = f"{begin}\n{section.strip()}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    return _write(page, text)


# -- rows -------------------------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    """Rows as a CSV; columns ``fieldnames``, else the union of the rows' keys (sorted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames or sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)


def write_results(out: Path, rows: list[dict], table: str, command: str = "", machine: str = "") -> None:
    """A benchmark's outputs: ``out``/results.csv (the rows), results.md (the table, the machine and the
    command) and the table printed."""
    write_csv(out / "results.csv", rows)
    tail = "".join(f"\n{label}: {value}\n" for label, value in (("Machine", machine), ("Command", f"`{command}`"))
                   if value and value != "``")
    (out / "results.md").write_text(table + tail)
    print("\n" + table)


def link_files(paths, folder: Path) -> Path:
    """A new ``folder`` of symlinks to ``paths`` (each by its file name); nothing is copied."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    for p in paths:
        (folder / Path(p).name).symlink_to(Path(p).resolve())
    return folder


# -- processes --------------------------------------------------------------------------------------------
def quiet() -> None:
    """No progress bars and no MLflow telemetry in this process and the ones it starts, unless set otherwise."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("ADREG_PROGRESS", "0")


def proc_status(pid: int | str = "self") -> dict[str, str]:
    """``/proc/<pid>/status`` as {field: value} (empty when the process is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = value.strip()
    except OSError:
        pass
    return out


def status_bytes(status: dict[str, str], field: str) -> int:
    """A ``kB`` field of ``proc_status`` (``VmHWM``, ``VmRSS``) in bytes; 0 when absent."""
    value = status.get(field, "")
    return int(value.split()[0]) * 1024 if value else 0


def peak_rss_mib(pid: int | str = "self") -> float:
    """The process's own high-water mark of resident memory (``VmHWM``), MiB. Unlike ``ru_maxrss``, which
    survives exec, it never counts a larger parent's."""
    return status_bytes(proc_status(pid), "VmHWM") / 2 ** 20


def child_result(result: dict) -> None:
    """The answer of a child process started by ``run_child``: ``result`` with the child's own peak RSS
    (``peak_rss_mib``, read as it ends), printed as one ``RESULT`` line."""
    print(RESULT + json.dumps({**result, "peak_rss_mib": peak_rss_mib()}), flush=True)


def run_child(args: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """``python ARGS`` in a fresh process (this working directory, the repository on its path so that
    ``-m benchmarks.NAME`` is found, ``ADREG_PROGRESS=0``, MLflow telemetry off, ``env`` on top); the dict of
    the ``RESULT`` line it printed last (``child_result``). ``RuntimeError`` with the tail of its stderr when
    it fails (``subprocess.TimeoutExpired`` after ``timeout`` s)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "ADREG_PROGRESS": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
           **(env or {})}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
    if proc.returncode or not lines:
        raise RuntimeError(f"{shlex.join(args[:3])} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])
