"""Shared fixtures: the real bottle data, an isolated MLflow store per test session, one real fit."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("ADREG_PROGRESS", "0")
# a test that names no store never writes to ./adreg-store of the checkout (or to another pytest worker's)
os.environ.setdefault("ADREG_HOME", tempfile.mkdtemp(prefix="adreg-test-home-"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one torch thread each (and in the processes they start), not four threads
    # spinning for two cores; a module that needs more sets them itself
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from adreg.data import default_data_root  # noqa: E402

DATA_ROOT = default_data_root()
#: the modules that take a minute or more (serial seconds on 2 cores, 2026-12-07), longest first: CI runs the
#: suite on two workers a module at a time (`-n 2 --dist loadfile`), and starting the long ones first keeps one
#: worker from finishing minutes after the other
LONG_MODULES = ("test_lifecycle.py",   # 278
                "test_follow.py",      # 154
                "test_tutorial.py",    # 141
                "test_tune.py",        # 120
                "test_serving_v2.py",  # new: about 100 alone
                "test_review_selection.py",  # new: about 90 alone
                "test_int8.py",        # new: about 92 alone
                "test_api.py",         # 96
                "test_governance.py",  # 92
                "test_reviews.py",     # 71
                "test_benchmark.py",   # 69
                "test_cli.py",         # 62
                "test_update.py",      # 60
                "test_mlflow_server.py")  # 58


def pytest_collection_modifyitems(items):
    """Long modules first (a stable sort: the order inside a module is kept)."""
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
BOTTLE = DATA_ROOT / "mvtec_ad" / "bottle"
MTD = DATA_ROOT / "mtd"


@pytest.fixture(scope="session")
def bottle_dir() -> Path:
    if not (BOTTLE / "train" / "good").is_dir():
        pytest.fail(f"the real MVTec bottle data is expected at {BOTTLE} (set ADREG_DATA_ROOT)")
    return BOTTLE


@pytest.fixture(scope="session")
def mtd_dir() -> Path:
    if not (MTD / "MT_Free" / "Imgs").is_dir():
        pytest.fail(f"the real Magnetic-Tile-Defect data is expected at {MTD} (set ADREG_DATA_ROOT)")
    return MTD


@pytest.fixture()
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh sqlite tracking + registry store for one test."""
    from adreg.registry import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.configure(uri)
    return uri


@pytest.fixture(scope="session")
def bottle_fit(bottle_dir):
    """One real 1-shot SubspaceAD fit on bottle (seed 0), evaluated on the full test set."""
    from adreg.fitting import FitOptions, fit_category

    return fit_category(FitOptions(category="bottle", train_dir=str(bottle_dir), k_shot=1, seed=0, device="cpu"),
                        show_progress=False)


@pytest.fixture(scope="session")
def registered_bottle(bottle_fit, tmp_path_factory):
    """``bottle_fit`` logged, registered and promoted to production in a session store."""
    import mlflow

    from adreg.registry import derive, tracking, versions

    store = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    tracking.configure(uri)
    logged = derive.log_fit(bottle_fit)
    version = derive.register_version(logged, "bottle", bottle_fit.metrics()).version
    versions.promote("bottle", version, "production")
    yield {"uri": uri, "version": version, "logged": logged, "result": bottle_fit}
    mlflow.set_tracking_uri(None)


@contextlib.contextmanager
def registered_copy(registered_bottle, folder: Path):
    """A copy of the session store in ``folder`` (its registered bottle version), this process pointed at it:
    labels and aliases written there reach no other test. Yields the copy's tracking URI."""
    import sqlite3

    import mlflow

    from adreg.registry import tracking

    src = sqlite3.connect(registered_bottle["uri"][len("sqlite:///"):])
    dst = sqlite3.connect(folder / "mlflow.db")
    src.backup(dst)
    src.close()
    dst.close()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("ADREG_HOME", str(folder / "home"))
    mp.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    tracking.configure(uri)
    try:
        yield uri
    finally:
        mp.undo()
        mlflow.set_tracking_uri(None)


@pytest.fixture()
def use_registered(registered_bottle, monkeypatch):
    """Point this test's MLflow client (and subprocesses) at the session's registered store."""
    from adreg.registry import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered_bottle["uri"])
    tracking.configure(registered_bottle["uri"])
    return registered_bottle


# -- stores: sqlite and a real PostgreSQL server -------------------------------------------------------
def _start_postgres(base: Path):
    """Start a throwaway PostgreSQL cluster on 127.0.0.1 (as the postgres user when running as root)."""
    import glob
    import pwd
    import shutil
    import subprocess

    from serving.process import free_port

    initdbs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or ([shutil.which("initdb")] if shutil.which("initdb") else [])
    if not initdbs:
        return None
    bindir = Path(initdbs[-1]).parent
    prefix: list[str] = []
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = base / "data"
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-o",
                    f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c max_connections=200", "start"],
                   check=True, capture_output=True)
    stop = [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]
    return f"postgresql://postgres@127.0.0.1:{port}", stop


@pytest.fixture(scope="session")
def postgres_server():
    """Base URI of a PostgreSQL server: $ADREG_TEST_POSTGRES_URI, or one started here for the session."""
    import subprocess
    import tempfile

    if os.environ.get("ADREG_TEST_POSTGRES_URI"):
        yield os.environ["ADREG_TEST_POSTGRES_URI"].rstrip("/")
        return
    started = _start_postgres(Path(tempfile.mkdtemp(prefix="adreg-pg-")))
    if started is None:
        if os.environ.get("ADREG_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL server binaries not found (apt-get install postgresql)")
        pytest.skip("PostgreSQL server binaries not installed (.ci/run installs them)")
    uri, stop = started
    yield uri
    subprocess.run(stop, capture_output=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_uri(request, tmp_path, monkeypatch):
    """A fresh, empty MLflow tracking + registry store on each backend."""
    from adreg.registry import tracking

    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    else:
        import uuid

        import psycopg

        base = request.getfixturevalue("postgres_server")
        name = f"adreg_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        uri = f"{base}/{name}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("ADREG_HOME", str(tmp_path / "home"))
    tracking.configure(uri)
    return uri
