import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from adreg.backbones import build_backbone
from adreg.backbones.base import Features
from adreg.errors import ConfigError
from adreg.images import load_image
from adreg.methods import build_method
from adreg.methods.rad import windowed_max_cosine


def _brute_force(query, refs, radius):
    """The reference code's per-patch loop, for checking the vectorised version."""
    b, k, c, h, w = refs.shape
    out = torch.empty(b, h, w)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                ys = range(max(0, i - radius), min(h, i + radius + 1))
                xs = range(max(0, j - radius), min(w, j + radius + 1))
                cands = torch.stack([refs[n, r, :, y, x] for r in range(k) for y in ys for x in xs])
                out[n, i, j] = (cands @ query[n, :, i, j]).max()
    return out


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_windowed_search_matches_per_patch_loop(radius):
    torch.manual_seed(radius)
    q = F.normalize(torch.randn(2, 8, 5, 6), dim=1)
    refs = F.normalize(torch.randn(2, 3, 8, 5, 6), dim=2)
    torch.testing.assert_close(windowed_max_cosine(q, refs, radius), _brute_force(q, refs, radius))


def _feats(*shapes_seed):
    torch.manual_seed(shapes_seed[0])
    p = [torch.randn(4, 8, 5, 5), torch.randn(4, 6, 5, 5)]
    return Features(p, [x.mean((2, 3)) for x in p])


def test_retrieval_clips_k_and_state_roundtrips_in_fp16():
    bank = _feats(0)
    rad = build_method("rad", k_image=100, radius=1, bank_dtype="fp16").fit(bank)
    assert rad.retrieve(bank).shape == (4, 4)  # clipped to the 4 references
    assert rad.global_bank.dtype == torch.float16
    # a reference image scores ~0 against itself (fp16 rounding only)
    assert rad.score_patches(bank).abs().max() < 2e-3
    other = build_method("rad", k_image=100, radius=1, bank_dtype="fp16")
    other.load_state_tensors(rad.state_tensors())
    probe = _feats(1)
    torch.testing.assert_close(other.score_patches(probe), rad.score_patches(probe))
    with pytest.raises(ConfigError):
        build_method("rad", radius=-2)
    with pytest.raises(ConfigError, match="layer_weights"):
        build_method("rad", layer_weights=[1.0]).fit(bank)


def test_spatial_window_absorbs_misalignment(bottle_dir):
    """A good image shifted by 3 patches looks anomalous to exact-position matching (R=0); a window of
    R >= 3 absorbs the shift, scoring it like whole-image search, while an unshifted image is unaffected."""
    bb = build_backbone("efficientnet-lite0", image_size=320)
    ref = load_image(bottle_dir / "train" / "good" / "000.png")
    shift = round(ref.size[0] * 24 / 320)  # 24 px at 320 px input = 3 patches of stride 8
    shifted = ref.transform(ref.size, Image.AFFINE, (1, 0, -shift, 0, 1, 0), fillcolor=ref.getpixel((0, 0)))
    bank, probe = bb.extract([ref]), bb.extract([ref, shifted])
    mean_score = {r: build_method("rad", radius=r).fit(bank).score_patches(probe).mean((1, 2)) for r in (0, 1, 3, -1)}
    assert mean_score[0][1] > mean_score[1][1] > mean_score[3][1]
    assert mean_score[0][1] > 5 * mean_score[3][1]
    assert mean_score[3][1] < 1.5 * mean_score[-1][1]
    assert mean_score[0][0] < 1e-4 and mean_score[3][0] < 1e-4  # the reference itself: ~0 at any R


def test_knn_baseline_is_nearest_neighbour_distance():
    bank = _feats(2)
    knn = build_method("knn").fit(bank)
    probe = _feats(3)
    q = F.normalize(probe.combined().permute(0, 2, 3, 1).reshape(-1, 14), dim=1)
    b = F.normalize(bank.combined().permute(0, 2, 3, 1).reshape(-1, 14), dim=1)
    expected = 1 - (q @ b.T).max(1).values
    torch.testing.assert_close(knn.score_patches(probe).flatten(), expected)


def test_one_shot_rad_on_bottle_logged_and_loaded(bottle_dir, tracking_uri):
    """Acceptance: 1-shot RAD, offline backbone, full bottle test set; its banks go through the pyfunc model."""
    import mlflow
    import pandas as pd

    from adreg.fitting import FitOptions, fit_category
    from adreg.images import file_to_b64
    from adreg.registry import derive

    result = fit_category(FitOptions(category="bottle", method="rad", train_dir=str(bottle_dir), k_shot=1, seed=0,
                                     device="cpu"), show_progress=False)
    m = result.evaluation.metrics
    assert m["image_auroc"] >= 0.98 and m["pixel_auroc"] >= 0.95
    assert result.detector.method.summary()["bank_images"] == 31  # 1 shot + 30 augmented copies
    logged = derive.log_fit(result)
    model = mlflow.pyfunc.load_model(logged.model_uri, model_config={"device": "cpu"})
    path = result.data.test[-1].path
    out = model.predict(pd.DataFrame({"image": [file_to_b64(path)]}))
    expected = result.detector.predict([load_image(path)]).scores[0]
    assert out.loc[0, "score"] == pytest.approx(float(expected), rel=1e-5)


def test_batch_of_eight_scores_exactly_like_one_at_a_time(bottle_dir):
    """Item 4: the detector scores a batch of 8 image by image (backbone and head), so batch 8 gives
    exactly batch 1's scores; the per-image head equals the former all-at-once head to float tolerance."""
    import numpy as np

    from adreg.detector import AnomalyDetector

    bb = build_backbone("efficientnet-lite0", image_size=192)
    goods = [load_image(bottle_dir / "train" / "good" / f"{i:03d}.png") for i in range(2)]
    det = AnomalyDetector(bb, build_method("rad"), augment="rotate", aug_count=3, batch_size=8).fit(
        goods, show_progress=False)
    images = [load_image(bottle_dir / "test" / d / f"{i:03d}.png") for d in ("good", "broken_large") for i in range(4)]
    s8 = det.predict(images).scores
    det.batch_size = 1
    assert np.array_equal(s8, det.predict(images).scores)
    feats = bb.extract(images, 8)
    per_image = det.method.score_patches(feats)
    assert torch.equal(per_image, torch.cat([det.method.score_patches(feats[i:i + 1]) for i in range(8)]))
    whole = build_method("rad", chunk_images=8)
    whole.load_state_tensors(det.method.state_tensors())
    torch.testing.assert_close(whole.score_patches(feats), per_image)
    assert s8[:4].max() < s8[4:].min()  # and the scores make sense: good < broken
