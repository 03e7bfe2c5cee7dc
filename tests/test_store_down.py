"""A store that is down (an http server, a PostgreSQL server, a sqlite path that cannot be created): every
command says so in one line within seconds and exits 2 - no traceback, no minutes of retries."""

import subprocess
import sys
import time

import pytest

from adreg.cli import main
from serving.process import free_port as _closed_port  # nothing listens on it


STORES = {
    "http": lambda: f"http://127.0.0.1:{_closed_port()}",
    "postgresql": lambda: f"postgresql://adreg@127.0.0.1:{_closed_port()}/adreg",
    "sqlite": lambda: "sqlite:////proc/adreg-cannot-create/mlflow.db",
}
COMMANDS = [
    ["models"], ["history", "bottle"], ["compare", "bottle", "1", "2"], ["status", "bottle"],
    ["promote", "bottle", "--version", "1"], ["rollback", "bottle"], ["predict", "bottle", "x.png"],
    ["serve", "bottle", "--port", "1"], ["score", "bottle", "x.png", "-o", "out"], ["export", "bottle", "--version", "1"],
    ["serve-bundle", "bottle"], ["update", "bottle", "--add-good", "."], ["drift", "bottle", "."],
    ["grant", "bottle", "anna", "READ"], ["whoami"], ["fit", "--category", "bottle"], ["quickstart"],
]


@pytest.mark.parametrize("kind", list(STORES))
def test_every_command_fails_fast_in_one_line(kind, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = STORES[kind]()
    for argv in COMMANDS:
        t0 = time.monotonic()
        code = main(["--tracking-uri", uri, *argv])
        seconds = time.monotonic() - t0
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, err)
        assert seconds < 10, (argv, seconds)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert err.startswith("adreg: error: the ") and ("not reachable" in err or "cannot be created" in err), err


def test_a_real_process_gets_one_line_and_exit_2_in_seconds(tmp_path):
    uri = STORES["postgresql"]()
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "adreg.cli", "--tracking-uri", uri, "models"], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and time.monotonic() - t0 < 10
    assert r.stderr.strip().count("\n") == 0 and "is not reachable" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "adreg.cli", "--verbose", "--tracking-uri", uri, "models"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "caused by" in r.stderr  # --verbose shows the original cause
