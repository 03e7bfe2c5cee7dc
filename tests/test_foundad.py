"""FoundAD: the trained projector repairs CutPaste defects, its state round-trips, its curve is logged."""

import random
import time

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adreg.backbones import build_backbone
from adreg.cutpaste import cutpaste, foreground_mask
from adreg.detector import AnomalyDetector
from adreg.errors import ConfigError
from adreg.images import load_image
from adreg.methods import build_method
from adreg.methods.foundad import hidden_width

SMALL = {"steps": 60, "depth": 2, "batch_size": 4}


@pytest.fixture(scope="module")
def small_foundad(bottle_dir):
    """A short FoundAD training on one real bottle image (5 rotated views), on Lite0 at 256 px."""
    torch.set_num_threads(2)
    det = AnomalyDetector(build_backbone("efficientnet-lite0", image_size=256), build_method("foundad", **SMALL),
                          aug_count=4, seed=0)
    det.fit([load_image(bottle_dir / "train" / "good" / "000.png")], show_progress=False)
    return det


def _tokens(det, img):
    fmap = det.backbone.extract([img]).combined("concat")
    return det.method._standardise(fmap)  # (1, h*w, C) as the projector sees them


def test_widths_follow_the_backbone():
    assert hidden_width(768) == 384 and hidden_width(152) == 96 and hidden_width(40) == 32


def test_projector_repairs_the_pasted_region(small_foundad, bottle_dir):
    det = small_foundad
    clean = load_image(bottle_dir / "train" / "good" / "000.png")
    corrupted, region = cutpaste(clean, random.Random(123), "normal", foreground_mask(clean))
    grid = det.backbone.image_size // 8
    inside = F.adaptive_avg_pool2d(torch.from_numpy(region.astype(np.float32))[None, None], grid).flatten() > 0.5
    assert inside.sum() >= 4
    x_clean, x_bad = _tokens(det, clean)[0], _tokens(det, corrupted)[0]
    untrained = build_method("foundad", **SMALL)._build(x_clean.shape[-1]).eval()
    with torch.no_grad():
        err_trained = (det.method.projector(x_bad[None])[0] - x_clean).pow(2).mean(-1)
        err_untrained = (untrained(x_bad[None])[0] - x_clean).pow(2).mean(-1)
    # training pulls the pasted region's features back towards the clean image's
    assert err_trained[inside].mean() < 0.5 * err_untrained[inside].mean()
    # and the anomaly score is higher where the defect was pasted than elsewhere
    scores = det.method.score_patches(det.backbone.extract([corrupted]))[0].flatten()
    assert scores[inside].mean() > 2 * scores[~inside].mean()


def test_state_roundtrip_and_loss_curve_logged(small_foundad, tmp_path, tracking_uri, bottle_dir):
    det = small_foundad
    loss = det.method.curves["train_loss"]
    assert len(loss) == SMALL["steps"] and np.mean(loss[-10:]) < np.mean(loss[:10])
    det.save(tmp_path / "det")
    again = AnomalyDetector.load(tmp_path / "det", device="cpu")
    img = [load_image(bottle_dir / "test" / "broken_small" / "001.png")]
    np.testing.assert_allclose(again.predict(img).scores, det.predict(img).scores, rtol=1e-6)
    from adreg.registry.tracking import _log_curves

    with mlflow.start_run() as run:
        _log_curves(run.info.run_id, det.method.curves)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(SMALL["steps"]))


def test_update_continues_training_from_the_parent(small_foundad, bottle_dir):
    """An update starts from the parent's projector (not from scratch), changes it, keeps the parent's
    standardisation, and the grown model still scores good bottles below defective ones."""
    parent = small_foundad
    method = build_method("foundad", **SMALL)
    method.load_state_tensors(parent.method.state_tensors())
    det = AnomalyDetector(parent.backbone, method, aug_count=4, seed=0)
    det.fit_info = dict(parent.fit_info)
    report = det.update([load_image(bottle_dir / "train" / "good" / f"{i:03d}.png") for i in (1, 2)],
                        show_progress=False)
    assert report["method"] == "foundad" and "continued training the parent's projector" in report["what"]
    assert report["update_steps"] == 2 * -(-10 // SMALL["batch_size"]) and report["n_views"] == 10
    assert 0 < report["weight_change_rel"] < 0.5  # moved, but from the parent's weights (not re-initialised)
    grown, old = det.method.state_tensors(), parent.method.state_tensors()
    assert not all(torch.equal(grown[k], old[k]) for k in grown if k.startswith("projector."))
    assert torch.equal(grown["feat_mean"], old["feat_mean"])
    assert det.fit_info["n_shots"] == parent.fit_info["n_shots"] + 2
    good = [load_image(bottle_dir / "test" / "good" / f"{i:03d}.png") for i in range(3)]
    bad = [load_image(bottle_dir / "test" / "broken_large" / f"{i:03d}.png") for i in range(3)]
    scores = det.predict(good + bad).scores
    assert scores[:3].max() < scores[3:].min(), scores


def test_needs_synthetic_views():
    from adreg.backbones.base import Features

    f = Features([torch.randn(2, 8, 4, 4)], [torch.randn(2, 8)])
    with pytest.raises(ConfigError, match="CutPaste"):
        build_method("foundad").fit(f)


@pytest.mark.slow
def test_one_shot_foundad_on_bottle_within_ten_minutes(bottle_dir):
    """Acceptance: default FoundAD, 1 shot, offline backbone at its default size, 2-core CPU."""
    from adreg.fitting import FitOptions, fit_category

    t0 = time.perf_counter()
    result = fit_category(FitOptions(category="bottle", method="foundad", train_dir=str(bottle_dir), k_shot=1,
                                     seed=0, device="cpu"), show_progress=False)
    assert result.detector.fit_info["fit_seconds"] <= 600
    assert result.evaluation.metrics["image_auroc"] >= 0.90
    assert time.perf_counter() - t0 < 900
