"""Shared fixtures: the real bottle data, an isolated MLflow store per test session, one real fit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("ADREG_PROGRESS", "0")

from adreg.data import default_data_root  # noqa: E402

DATA_ROOT = default_data_root()
BOTTLE = DATA_ROOT / "mvtec_ad" / "bottle"


@pytest.fixture(scope="session")
def bottle_dir() -> Path:
    if not (BOTTLE / "train" / "good").is_dir():
        pytest.fail(f"the real MVTec bottle data is expected at {BOTTLE} (set ADREG_DATA_ROOT)")
    return BOTTLE


@pytest.fixture()
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh sqlite tracking + registry store for one test."""
    from adreg import tracking

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

    from adreg import registry, tracking

    store = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    tracking.configure(uri)
    logged = tracking.log_fit(bottle_fit)
    version = registry.register(logged.model_uri, logged.run_id, "bottle", bottle_fit.metrics())
    registry.promote("bottle", version, "production")
    yield {"uri": uri, "version": version, "logged": logged, "result": bottle_fit}
    mlflow.set_tracking_uri(None)


@pytest.fixture()
def use_registered(registered_bottle, monkeypatch):
    """Point this test's MLflow client (and subprocesses) at the session's registered store."""
    from adreg import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered_bottle["uri"])
    tracking.configure(registered_bottle["uri"])
    return registered_bottle
