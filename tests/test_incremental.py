"""Incremental fitting (``AnomalyMethod.update`` / ``AnomalyDetector.update``) on real bottle images.

SubspaceAD keeps its PCA statistics, so fit(A) + update(B) must equal fit(A u B): compared on the
same augmented views at the method level, and end to end through the detector with augmentation off.
Tolerance: float64 statistics summed in a different order differ by ~1e-12 relative; the scores
(float32 arithmetic on the float64 subspace) are compared at rtol 1e-5.
"""

import json

import numpy as np
import pytest
import torch

from adreg.backbones import build_backbone
from adreg.backbones.base import Features
from adreg.detector import AnomalyDetector
from adreg.errors import ConfigError
from adreg.images import load_image
from adreg.methods import build_method

SIZE = 192  # a small input keeps the features cheap (24 x 24 grid)


@pytest.fixture(scope="module")
def real(bottle_dir):
    """Lite0 features of real bottle images: two sets of augmented good views and a few test images."""
    torch.set_num_threads(2)
    from adreg.augment import augment_shots

    backbone = build_backbone("efficientnet-lite0", image_size=SIZE)
    goods = [load_image(bottle_dir / "train" / "good" / f"{i:03d}.png") for i in range(6)]
    tests = [load_image(bottle_dir / "test" / d / "000.png") for d in ("good", "broken_large", "contamination")]
    a = backbone.extract(augment_shots(goods[:3], ["rotate"], 2, 0))
    b = backbone.extract(augment_shots(goods[3:], ["rotate"], 2, 1))
    return {"backbone": backbone, "goods": goods, "tests": tests, "a": a, "b": b,
            "probe": backbone.extract(tests)}


def _projector(m):
    c = m.components
    return c @ c.T


def test_subspace_update_equals_refit_on_the_union(real):
    a, b = real["a"], real["b"]
    refit = build_method("subspace").fit(Features.cat([a, b]))
    grown = build_method("subspace").fit(a)
    before = grown.components.shape[1]
    report = grown.update(b)
    assert report["method"] == "subspace" and "identical to a refit" in report["what"]
    assert report["patches_after"] == report["patches_before"] + len(b) * SIZE // 8 * SIZE // 8
    assert report["n_components_before"] == before
    assert grown.components.shape == refit.components.shape
    torch.testing.assert_close(grown.mean, refit.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(grown.eigenvalues, refit.eigenvalues, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(_projector(grown), _projector(refit), rtol=0, atol=1e-8)
    torch.testing.assert_close(grown.score_patches(real["probe"]), refit.score_patches(real["probe"]),
                               rtol=1e-5, atol=1e-6)
    # the update changed the model: the union's subspace is not the first set's
    first = build_method("subspace").fit(a)
    assert not torch.allclose(first.mean, refit.mean, atol=1e-6)
    # state: the statistics travel with the model (float64) and are counted in its size
    state = grown.state_tensors()
    assert state["stat_scatter"].dtype == torch.float64 and state["stat_count"].item() == report["patches_after"]
    assert grown.state_nbytes() == sum(t.numel() * t.element_size() for t in state.values())


def test_detector_update_equals_refit_and_records_counts(real, tmp_path):
    bb, goods = real["backbone"], real["goods"]
    full = AnomalyDetector(bb, build_method("subspace"), augment="none", seed=0).fit(goods, show_progress=False)
    grown = AnomalyDetector(bb, build_method("subspace"), augment="none", seed=0).fit(goods[:4], show_progress=False)
    seed_before = grown.update_seed()
    report = grown.update(goods[4:], show_progress=False)
    assert report["n_images"] == 2 and report["seconds"] > 0 and report["method"] == "subspace"
    assert grown.fit_info["n_shots"] == 6 and grown.fit_info["n_train_images"] == 6
    assert grown.fit_info["update_seconds"] >= grown.fit_info["update_feature_seconds"] > 0
    assert grown.update_seed() != seed_before != grown.seed  # every update augments with a seed of its own
    np.testing.assert_allclose(grown.predict(real["tests"]).scores, full.predict(real["tests"]).scores, rtol=1e-5)
    # saved and loaded, the grown model keeps growing the same way as in memory
    grown.save(tmp_path / "grown", bundle_backbone=False)
    again = AnomalyDetector.load(tmp_path / "grown", device="cpu")
    more = real["goods"][:1]  # any good image; the same one on both sides
    again.update(more, show_progress=False)
    grown.update(more, show_progress=False)
    np.testing.assert_allclose(again.predict(real["tests"][:1]).scores, grown.predict(real["tests"][:1]).scores,
                               rtol=1e-6)
    with pytest.raises(ConfigError, match="no images"):
        grown.update([], show_progress=False)



@pytest.mark.parametrize("name", ["knn", "rad"])
def test_old_bank_models_load_with_default_params(real, tmp_path, name):
    """kNN/RAD models saved before bank budgets (their params lack the new keys) load and score the same."""
    det = AnomalyDetector(real["backbone"], build_method(name), augment="none").fit(real["goods"][:2],
                                                                                  show_progress=False)
    folder = det.save(tmp_path / name, bundle_backbone=False)
    cfg = json.loads((folder / "config.json").read_text())
    new_keys = {"bank_budget", "coreset_dim", "coreset_grid", "chunk_images", "seed"}
    cfg["method_params"] = {k: v for k, v in cfg["method_params"].items() if k not in new_keys}
    (folder / "config.json").write_text(json.dumps(cfg))
    old = AnomalyDetector.load(folder, device="cpu")
    np.testing.assert_allclose(old.predict(real["tests"]).scores, det.predict(real["tests"]).scores, rtol=1e-6)
    assert old.method.get_params()["bank_budget"] == build_method(name).params["bank_budget"]


@pytest.mark.parametrize("name,budget,key", [("knn", 3000, "bank_patches_after"), ("rad", 7, "bank_views_after")])
def test_bank_update_stays_within_budget(real, name, budget, key):
    a, b = real["a"], real["b"]  # 9 + 9 views, 576 patches each
    method = build_method(name, bank_budget=budget).fit(a)
    nbytes = method.state_nbytes()
    report = method.update(b)
    assert report[key] == budget and report["bank_budget"] == budget
    assert method.state_nbytes() == nbytes  # memory stays flat as goods grow
    assert report["coverage_radius"] > 0 and report["what"].startswith("added")
    # a bank made from the union directly has the same size; the grown bank scores the probe sensibly
    scores = method.score_patches(real["probe"]).mean((1, 2))
    assert scores[0] < scores[1] and scores[0] < scores[2]  # the good test image scores lowest


def test_knn_coreset_applies_at_fit(real):
    feats = Features.cat([real["a"], real["b"]])
    n = len(feats) * (SIZE // 8) ** 2
    full = build_method("knn", bank_budget=0).fit(feats)
    core = build_method("knn", bank_budget=2000).fit(feats)
    assert full.bank.shape[0] == n and core.bank.shape[0] == 2000
    assert core.summary()["bank_mib"] < full.summary()["bank_mib"] / 5
    # every kept row is one of the original normalised patches
    kept = (core.bank @ full.bank.T).max(1).values
    assert (kept > 1 - 1e-5).all()
    # scores with the coreset bank are close to the full bank's, never below (fewer neighbours)
    s_full, s_core = full.score_patches(real["probe"]), core.score_patches(real["probe"])
    assert (s_core >= s_full - 1e-5).all()
    assert torch.corrcoef(torch.stack([s_full.flatten(), s_core.flatten()]))[0, 1] > 0.95
