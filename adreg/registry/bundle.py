"""Building the multi-category router: the aliased version of each category, bundled into one pyfunc
model registered as ``adreg-router`` (served like any other: ``adreg serve router``). The bundle is the
starting point: served with ``follow_alias`` set (``adreg serve router`` does), each category follows its
own alias, the one the bundle was built from (``adreg.pyfunc.router``), so a promotion or rollback of one
category reaches the running router without a new bundle."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image

from adreg import store
from adreg.errors import ConfigError
from adreg.names import ROUTER
from adreg.pyfunc.router import CATEGORY_COLUMN, MANIFEST
from adreg.registry import derive, tracking
from adreg.registry.resolve import resolve


def router_signature() -> ModelSignature:
    out = derive.signature().outputs
    # both columns optional for MLflow's schema check: the model answers a missing one with a plain 400
    return ModelSignature(inputs=Schema([ColSpec("string", CATEGORY_COLUMN, required=False),
                                         ColSpec("string", "image", required=False)]), outputs=out)


def build_router(categories: list[str], alias: str = "production") -> derive.VersionOutcome:
    """Bundle ``categories`` (each at ``alias``) into one router model, log it and register it as a new version
    of ``adreg-router``; returns its run, model URI and version."""
    from adreg.images import encode_png_b64
    from adreg.pyfunc.served import DEFAULT_MODEL_CONFIG

    if not categories:
        raise ConfigError("name at least one category to bundle")
    if len(set(categories)) != len(categories):
        raise ConfigError("a category is named twice")
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "detectors"
        root.mkdir()
        manifest = {"alias": alias, "categories": {}}
        for category in categories:
            ref = resolve(category, None, alias)
            detector_dir = store.download_detector(ref.name, ref.version, Path(tmp) / "download" / category, client)
            shutil.copytree(detector_dir, root / category)
            manifest["categories"][category] = {"dir": category, "version": ref.version, "source": ref.alias_uri}
        (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
        example = pd.DataFrame({CATEGORY_COLUMN: [categories[0]],
                                "image": [encode_png_b64(Image.new("RGB", (64, 64), "gray"))]})
        run_name = "router-" + "-".join(categories)
        with mlflow.start_run(experiment_id=tracking.fit_experiment_id(ROUTER), run_name=run_name):
            mlflow.set_tags({"adreg.kind": "router", "adreg.categories": ",".join(categories)})
            mlflow.log_dict(manifest, "router_manifest.json")
            logged = derive.log_pyfunc("_router_code.py", {"detectors": str(root)}, example,
                                       model_config=dict(DEFAULT_MODEL_CONFIG),
                                       metadata={"adreg_categories": categories}, model_signature=router_signature())
    return derive.register_version(logged, ROUTER)
