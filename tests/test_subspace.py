import numpy as np
import pytest
import torch

from adreg.backbones.base import Features
from adreg.errors import ConfigError
from adreg.methods import build_method


def _features(x: np.ndarray, h=4, w=4) -> Features:
    """(N*h*w, C) rows -> Features with one layer of (N, C, h, w)."""
    t = torch.from_numpy(x).float().reshape(-1, h, w, x.shape[1]).permute(0, 3, 1, 2)
    return Features([t], [t.mean((2, 3))])


def test_pca_recovers_subspace_and_scores_residual():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(10, 3)))[0]  # 3-dim subspace of R^10
    normal = rng.normal(size=(64 * 16, 3)) * [5, 3, 2] @ basis.T + 1.0 + rng.normal(size=(64 * 16, 10)) * 0.01
    method = build_method("subspace", pca_ev=0.99).fit(_features(normal))
    assert method.summary()["n_components"] == 3
    comps = method.components.numpy()
    # the learned components span the same subspace
    np.testing.assert_allclose(np.abs(np.linalg.svd(comps.T @ basis)[1]), 1.0, atol=1e-3)
    inside = rng.normal(size=(16, 3)) @ basis.T + 1.0
    off = inside + 2.0 * np.linalg.qr(np.c_[basis, rng.normal(size=(10, 1))])[0][:, 3]
    s_in = method.score_patches(_features(inside)).flatten()
    s_off = method.score_patches(_features(off)).flatten()
    assert s_in.max() < 1e-3
    np.testing.assert_allclose(s_off.numpy(), 4.0, rtol=1e-3)  # squared distance 2^2


def test_explained_variance_rule_matches_sklearn():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(1)
    x = rng.normal(size=(32 * 16, 12)) * np.linspace(5, 0.1, 12)
    method = build_method("subspace", pca_ev=0.9).fit(_features(x))
    ratios = np.cumsum(PCA().fit(x).explained_variance_ratio_)
    assert method.summary()["n_components"] == int(np.searchsorted(ratios, 0.9) + 1)
    # the features are float32; the mean is accumulated in float64 from exactly those values
    np.testing.assert_allclose(method.mean.numpy(), x.astype(np.float32).astype(np.float64).mean(0), atol=1e-12)


def test_state_roundtrip_gives_identical_scores():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8 * 16, 6))
    a = build_method("subspace").fit(_features(x))
    b = build_method("subspace")
    b.load_state_tensors(a.state_tensors())
    probe = _features(rng.normal(size=(16, 6)))
    assert torch.equal(a.score_patches(probe), b.score_patches(probe))


def test_bad_params():
    with pytest.raises(ConfigError):
        build_method("subspace", pca_ev=1.5)
    with pytest.raises(ConfigError, match="unknown method"):
        build_method("nope")
    with pytest.raises(ConfigError, match="bad parameters"):
        build_method("subspace", bogus=1)


def test_one_shot_bottle_accuracy(bottle_fit):
    """Acceptance: 1-shot SubspaceAD, offline backbone, full bottle test set, seed 0."""
    m = bottle_fit.evaluation.metrics
    assert m["n_test_images"] == 83 and m["n_test_defective"] == 63
    assert m["image_auroc"] >= 0.98
    assert m["pixel_auroc"] >= 0.95
    assert 0.0 < m["aupro"] <= 1.0
    assert bottle_fit.detector.threshold.rule == "good_quantile"
    assert bottle_fit.detector.threshold.details["source"].startswith("20 held-out")
    # shots and calibration images are disjoint
    assert len(bottle_fit.shots) == 1
