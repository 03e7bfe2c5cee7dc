import numpy as np
import pytest
from sklearn import metrics as skm

from adreg.metrics import aupro, auroc, evaluate_scores, f1_max, roc_curve


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(size=500) + y, 1)  # rounding creates many ties
    assert auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s)
    sk_fpr, sk_tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_f1_max_matches_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    s = rng.normal(size=400) + 1.5 * y
    p, r, _ = skm.precision_recall_curve(y, s)
    expected = np.max(2 * p * r / np.maximum(p + r, 1e-12))
    best, thr = f1_max(y, s)
    assert best == pytest.approx(expected, abs=1e-12)
    assert skm.f1_score(y, s >= thr) == pytest.approx(best, abs=1e-12)


def test_auroc_needs_both_classes():
    with pytest.raises(ValueError, match="both"):
        auroc([1, 1, 1], [0.1, 0.2, 0.3])


def _two_region_case():
    # row 0: A A N B / row 1: N N N B -> regions A (2 px) and B (2 px), 4 normal pixels
    mask = np.array([[[1, 1, 0, 1], [0, 0, 0, 1]]], dtype=bool)
    scores = np.array([[[8, 7, 6, 5], [1, 1, 1, 0.5]]], dtype=float)
    return mask, scores


def test_aupro_hand_computed_case():
    mask, scores = _two_region_case()
    # PRO/FPR steps: (0,.25) (0,.5) (.25,.5) (.25,.75) (1,.75) (1,1)
    assert aupro(mask, scores, max_fpr=1.0) == pytest.approx(0.25 * 0.5 + 0.75 * 0.75)
    # to FPR 0.3: 0.25*0.5 + 0.05*0.75, normalised by 0.3
    assert aupro(mask, scores, max_fpr=0.3) == pytest.approx((0.125 + 0.0375) / 0.3)


def test_aupro_perfect_and_region_averaging():
    mask, _ = _two_region_case()
    assert aupro(mask, mask.astype(float)) == pytest.approx(1.0)
    # 8-connectivity: two diagonal pixels are ONE region; finding one of them gives PRO 0.5 (not 0.5 of
    # two regions averaged with a fully found second one, which 4-connectivity would give: 0.75 at FPR 0)
    diag = np.zeros((1, 4, 4), dtype=bool)
    diag[0, 0, 0] = diag[0, 1, 1] = True
    scores = np.zeros((1, 4, 4))
    scores[0, 0, 0] = 2.0
    scores[0, 1, 1] = -1.0  # below every normal pixel
    # curve: (0, .5) then all 14 normals at 0 -> (1, .5) then (1, 1)
    assert aupro(diag, scores, max_fpr=0.3) == pytest.approx(0.5)


def test_evaluate_scores_skips_what_data_cannot_support():
    out = evaluate_scores([0, 0, 0], [0.1, 0.2, 0.3])
    assert "image_auroc" not in out
    masks = np.zeros((2, 4, 4), bool)
    masks[1, :2, :2] = True
    maps = masks.astype(float) + 0.01
    out = evaluate_scores([0, 1], [0.1, 0.9], masks, maps)
    assert out["image_auroc"] == 1.0 and out["pixel_auroc"] == 1.0 and out["aupro"] == pytest.approx(1.0)


def test_evaluate_scores_sorts_pixels_once_with_identical_results():
    """evaluate_scores shares one float32 sort between the pixel metrics; each metric sorting float64 on
    its own gives exactly the same numbers (ties included)."""
    rng = np.random.default_rng(3)
    masks = np.zeros((6, 32, 32), bool)
    masks[1, 4:12, 5:9] = masks[4, 20:30, 2:30] = masks[5, 0:3, 0:3] = True
    maps = (rng.normal(size=masks.shape) + 1.5 * masks).astype(np.float32).round(1)  # many ties
    labels, scores = np.array([0, 1, 0, 0, 1, 1]), maps.reshape(6, -1).max(1)
    got = evaluate_scores(labels, scores, masks, maps)
    m64 = maps.astype(np.float64)
    assert got["pixel_auroc"] == auroc(masks, m64)
    assert got["pixel_f1_max"] == f1_max(masks, m64)[0]
    assert got["aupro"] == aupro(masks, m64)


@pytest.mark.parametrize("grid,size,sigma", [((20, 20), (320, 320), 4.0), ((16, 24), (224, 300), 2.0),
                                             ((40, 40), (320, 320), 0.0)])
def test_anomaly_maps_equal_upsample_then_blur(grid, size, sigma):
    """The composed per-axis operator gives the maps of bilinear upsampling followed by the reflect-padded
    Gaussian blur (float32 rounding apart), for square and non-square grids and no smoothing."""
    import torch
    import torch.nn.functional as F

    from adreg.postprocess import anomaly_maps, gaussian_kernel1d

    def gaussian_blur(maps, sigma):  # the direct computation: two reflect-padded 1-D convolutions
        if sigma <= 0:
            return maps
        k = gaussian_kernel1d(sigma)
        r = k.numel() // 2
        x = F.conv2d(F.pad(maps.unsqueeze(1), (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1)).squeeze(1)

    scores = torch.from_numpy(np.random.default_rng(0).gamma(2.0, 1.0, (3, *grid)).astype(np.float32))
    up = F.interpolate(scores.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    want = gaussian_blur(up, sigma)
    got = anomaly_maps(scores, size, sigma)
    assert got.shape == want.shape == (3, *size)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    assert not torch.allclose(got, up) or sigma == 0  # the blur did something
