"""The MLflow evaluator plugin: mlflow.models.evaluate(..., evaluators="adreg") on real bottle images."""

import mlflow
import pandas as pd
import pytest

from adreg.images import file_to_b64


def test_mlflow_evaluate_with_the_adreg_evaluator(use_registered, bottle_dir):
    from adreg.evaluation import evaluate as adreg_evaluate

    test = bottle_dir / "test"
    goods = sorted((test / "good").glob("*.png"))[:8]
    bads = sorted((test / "broken_large").glob("*.png"))[:6]
    masks = [bottle_dir / "ground_truth" / "broken_large" / f"{p.stem}_mask.png" for p in bads]
    data = pd.DataFrame({"image": [str(p) for p in goods] + [file_to_b64(p) for p in bads],  # paths and base64
                         "label": [0] * len(goods) + [1] * len(bads),
                         "mask": [None] * len(goods) + [str(m) for m in masks]})
    uri = f"models:/adreg-bottle/{use_registered['version']}"
    from adreg import store

    # an experiment of its own: its artifacts beside the session's sqlite store, not in ./mlruns
    with mlflow.start_run(experiment_id=store.experiment_id("evaluator-test")) as run:
        result = mlflow.models.evaluate(uri, data, targets="label", model_type="anomaly_detection",
                                        evaluators="adreg", evaluator_config={"n_resamples": 200, "pixel_resamples": 50})
    m = result.metrics
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert m[f"{key}_low"] <= m[key] <= m[f"{key}_high"], key
    assert (m["n_good"], m["n_defective"]) == (8, 6)
    # the same figures as adreg's own evaluation of the registered detector on the same images
    from adreg.data import Sample
    from adreg.registry.resolve import load_detector, resolve

    det = load_detector(resolve("bottle", use_registered["version"]), "cpu")
    samples = [Sample(p, 0, "good") for p in goods] + [Sample(p, 1, "broken_large", k) for p, k in zip(bads, masks)]
    own = adreg_evaluate(det, samples, det.threshold.value, show_progress=False).metrics
    assert m["image_auroc"] == pytest.approx(own["image_auroc"]) and m["aupro"] == pytest.approx(own["aupro"], abs=1e-6)
    logged = mlflow.MlflowClient().get_run(run.info.run_id)
    assert logged.data.metrics["image_auroc"] == pytest.approx(m["image_auroc"])
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/roc.png", "evaluation/scores.png", "evaluation/examples.png"} <= names
