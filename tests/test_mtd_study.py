"""The MTD study's own preprocessing and scoring, checked on real magnetic tiles."""

import pytest
import torch
from PIL import Image, ImageDraw

from adreg.backbones import build_backbone
from adreg.images import load_image
from benchmarks import mtd_study


@pytest.fixture(scope="module")
def tiles(mtd_dir):
    return [load_image(p) for p in sorted((mtd_dir / "MT_Free" / "Imgs").glob("*.jpg"))[:3]]


def test_aspect_preserving_extraction_lands_on_the_common_grid_and_equals_square_when_square(tiles):
    backbone = build_backbone("efficientnet-lite0", layers=[7, 10], image_size=320)
    assert len({t.size for t in tiles}) > 1 or tiles[0].size[0] != tiles[0].size[1]
    feats = mtd_study.scaled_extract(backbone, tiles, 1.0, (20, 20))
    assert [tuple(p.shape) for p in feats.patches] == [(3, 80, 20, 20), (3, 112, 20, 20)]
    square = tiles[0].resize((320, 320))
    ours = mtd_study.scaled_extract(backbone, [square], 1.0, (20, 20))
    ref = backbone.extract([square])
    for a, b in zip(ours.patches, ref.patches):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_self_dissimilarity_peaks_on_a_spot_the_rest_of_the_tile_does_not_have(tiles):
    backbone = build_backbone("efficientnet-lite0", layers=[7, 10], image_size=320)
    tile = tiles[0].resize((320, 320))
    ImageDraw.Draw(tile).ellipse((200, 80, 224, 104), fill=(0, 0, 0))  # a blowhole-like dark spot
    scores = mtd_study.self_dissimilarity(backbone.extract([tile]))[0]
    stride = 320 // scores.shape[1]
    y, x = divmod(int(scores.argmax()), scores.shape[1])
    assert 200 // stride - 1 <= x <= 224 // stride + 1 and 80 // stride - 1 <= y <= 104 // stride + 1, (y, x)


def test_photometric_standardisation_removes_a_global_brightness_change(tiles):
    tile = tiles[0]
    brighter = Image.eval(tile, lambda v: min(255, int(v * 0.8) + 30))
    a = mtd_study.photometric(tile, "standardise")
    b = mtd_study.photometric(brighter, "standardise")
    diff = torch.tensor(list(a.convert("L").getdata()), dtype=torch.float32) - \
        torch.tensor(list(b.convert("L").getdata()), dtype=torch.float32)
    assert diff.abs().mean() < 3.0


def test_variants_the_product_can_run_go_through_fit_category_the_others_through_the_study(monkeypatch, mtd_dir):
    """The baseline, other methods, blocks and the shot curve are fitted and evaluated by the product
    (``fit_category`` over a caching backbone); preprocessing and score-fusion variants keep the study's path."""
    import numpy as np
    from types import SimpleNamespace

    from adreg.data import Sample
    from adreg.feature_cache import CachingBackbone

    calls = []
    samples = [Sample(mtd_dir / f"{i}.jpg", label, defect) for i, (label, defect) in
               enumerate([(0, "good"), (0, "good"), (1, "crack"), (1, "fray")])]

    def fake_fit(opts, show_progress=True, backbone=None):
        calls.append((opts, backbone))
        ev = SimpleNamespace(samples=samples, scores=np.array([0.1, 0.5, 0.4, 0.9]),
                             metrics={"image_auroc": 0.75, "pixel_auroc": 0.6})
        return SimpleNamespace(evaluation=ev)

    monkeypatch.setattr(mtd_study, "fit_category", fake_fit)
    data = SimpleNamespace(root=mtd_dir, train=[])
    backbones: dict = {}
    for name, k, aug in (("baseline", 8, 8), ("knn", 8, 8), ("blocks-10-14", 8, 8), ("shots-16", 16, 0)):
        settings = mtd_study.VARIANTS.get(name, ("", {}))[1]
        row = mtd_study.evaluate_variant(name, settings, data, None, k, 0, aug, False, backbones)
        assert row["image_auroc"] == 0.75 and row["auroc_crack"] == 0.5 and row["auroc_fray"] == 1.0
    assert [(o.method, o.layers, o.k_shot, o.aug_count, o.augment, o.top_fraction, o.image_size) for o, _ in calls] == [
        ("rad", [7, 10], 8, 8, "hflip,vflip", 0.001, 320), ("knn", [7, 10], 8, 8, "hflip,vflip", 0.001, 320),
        ("rad", [10, 14], 8, 8, "hflip,vflip", 0.001, 320), ("rad", [7, 10], 16, 0, "hflip,vflip", 0.001, 320)]
    assert all(isinstance(b, CachingBackbone) for _, b in calls) and calls[0][1] is calls[1][1]
    assert all(any(key in mtd_study.VARIANTS[v][1] for key in mtd_study.OWN_PATH)
               for v in ("aspect-1x", "aspect-2x", "standardise", "equalise", "self-similarity"))
