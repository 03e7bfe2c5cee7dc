"""Growth that scales: chunked fits and updates equal one pass where the method promises it, memory stays
bounded on a 200-good update, augmentation adapts to the number of real goods.

Synthetic features and small images keep the file cheap; one subprocess measures peak RSS.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from adreg.augment import adaptive_copies, augment_shots, iter_views
from adreg.backbones.base import Features
from adreg.detector import AnomalyDetector
from adreg.errors import ConfigError
from adreg.methods import build_method
from benchmarks.harness import run_child


def features(n: int, seed: int, grid: int = 4, widths=(8, 12)) -> Features:
    """Random two-layer features of ``n`` views."""
    gen = torch.Generator().manual_seed(seed)
    patches = [torch.randn(n, c, grid, grid, generator=gen) for c in widths]
    return Features(patches, [p.mean((2, 3)) for p in patches])


def split(feats: Features, sizes) -> list[Features]:
    out, start = [], 0
    for s in sizes:
        out.append(feats[start:start + s])
        start += s
    return out


class TinyBackbone:
    """A stand-in backbone: features are a fixed function of the pixels (mean colour per 8x8 cell), so
    chunked and one-pass extraction agree exactly; records the largest extraction call."""

    image_size = 32
    device = torch.device("cpu")

    def __init__(self):
        self.largest_call = 0

    def extract(self, images, batch_size=1, progress=None):
        self.largest_call = max(self.largest_call, len(images))
        x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.float32))
                         for im in images]).permute(0, 3, 1, 2) / 255.0
        a = torch.nn.functional.avg_pool2d(x, 8)  # (B, 3, 4, 4)
        b = torch.cat([a, a ** 2], 1)
        if progress is not None:
            progress(len(images))
        return Features([a, b], [a.mean((2, 3)), b.mean((2, 3))])

    def to(self, device):
        return self

    def spec(self):
        return {"name": "tiny"}


def goods(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


# -- methods: chunks == one pass ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["knn", "rad"])
def test_bank_without_budget_is_identical_chunked_or_in_one_pass(name):
    a, b = features(10, 0), features(13, 1)
    one = build_method(name, bank_budget=0).fit(a)
    one.update(b)
    chunked = build_method(name, bank_budget=0).fit_chunks(split(a, [3, 3, 4]))
    report = chunked.update_chunks(split(b, [5, 1, 7]))
    for key, value in one.state_tensors().items():  # the same rows in the same order (normalised per chunk:
        torch.testing.assert_close(chunked.state_tensors()[key], value, rtol=0, atol=1e-6)  # 1-ulp rounding)
    assert report["what"].startswith("added") and "kept them all" in report["what"]


def test_subspace_statistics_equal_chunked_or_in_one_pass():
    a, b = features(10, 0), features(13, 1)
    one = build_method("subspace").fit(a)
    one.update(b)
    chunked = build_method("subspace").fit_chunks(split(a, [4, 6]))
    report = chunked.update_chunks(split(b, [2, 2, 9]))
    assert report["patches_after"] == (10 + 13) * 16 and chunked.stats.n == one.stats.n
    for key in ("stat_sum", "stat_scatter", "mean", "eigenvalues"):
        torch.testing.assert_close(chunked.state_tensors()[key], one.state_tensors()[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,key", [("knn", "bank_patches_after"), ("rad", "bank_views_after")])
def test_budgeted_chunked_update_keeps_the_budget(name, key):
    budget = 60 if name == "knn" else 6
    m = build_method(name, bank_budget=budget).fit(features(8, 0))
    nbytes = m.state_nbytes()
    report = m.update_chunks(split(features(40, 1), [10] * 4))
    assert report[key] == budget and m.state_nbytes() == nbytes
    with pytest.raises(ConfigError, match="no features"):
        m.update_chunks([])


def test_rad_budget_drops_synthetic_copies_before_real_views():
    real, copies = features(6, 0), features(12, 1)
    copies = Features([p * 5.0 + 3.0 for p in copies.patches], [g * 5.0 for g in copies.globals])  # far apart
    union = Features.cat([real, copies])
    union.real = torch.tensor([True] * 6 + [False] * 12)
    some = build_method("rad", bank_budget=8).fit(union)  # every real view, then 2 of the copies
    assert some.real_views.tolist() == [True] * 6 + [False] * 2
    kept = {tuple(v.flatten()[:4].tolist()) for v in some.patch_banks[0].float()}
    assert all(tuple(torch.nn.functional.normalize(v, dim=0).flatten()[:4].half().float().tolist()) in kept
               for v in real.patches[0])  # the real views themselves
    only = build_method("rad", bank_budget=4).fit(union)  # fewer slots than real views: real ones only
    assert only.real_views.tolist() == [True] * 4
    equal = build_method("rad", bank_budget=8).fit(Features.cat([real, copies]))  # no flags: all count as real
    assert int(equal.real_views.sum()) == 8
    # chunked like the detector feeds it: the same rule at every merge
    chunked = build_method("rad", bank_budget=8).fit_chunks(split(union, [5, 5, 8]))
    assert chunked.real_views.tolist() == [True] * 6 + [False] * 2
    restored = build_method("rad")
    restored.load_state_tensors(chunked.state_tensors())
    assert restored.real_views.tolist() == chunked.real_views.tolist()


def test_detector_marks_copies_as_synthetic():
    det = AnomalyDetector(TinyBackbone(), build_method("rad", bank_budget=0), augment="hflip", aug_count=2,
                          aug_views=0)
    det.chunk_views = 4
    det.fit(goods(3, 0), show_progress=False)
    assert det.method.real_views.tolist() == [True, False, False] * 3
    det.update(goods(2, 1), show_progress=False)
    assert det.method.real_views.tolist() == [True, False, False] * 5


# -- augmentation ------------------------------------------------------------------------------------------
def test_adaptive_copies_rule():
    assert adaptive_copies(30, 256, 1) == 30 and adaptive_copies(30, 256, 8) == 30  # few shots: unchanged
    assert adaptive_copies(8, 256, 64) == 3 and adaptive_copies(8, 256, 128) == 1
    assert adaptive_copies(8, 256, 256) == 0 and adaptive_copies(8, 256, 832) == 0
    assert adaptive_copies(8, 0, 832) == 8  # 0 = always aug_count
    with pytest.raises(ConfigError):
        adaptive_copies(-1, 256, 4)


def test_views_stream_in_the_same_draws_as_augment_shots():
    images = goods(3)
    streamed = list(iter_views(images, ("hflip", "vflip"), 2, 5))
    batch = augment_shots(images, ("hflip", "vflip"), 2, 5)
    # augment_shots: originals first, then each image's copies; the stream: each image, then its copies
    order = [0, 3, 4, 1, 5, 6, 2, 7, 8]
    assert [np.asarray(v).tobytes() for v in streamed] == [np.asarray(batch[i]).tobytes() for i in order]


# -- the detector feeds chunks -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["knn", "rad", "subspace"])
def test_detector_chunked_update_equals_one_pass(name):
    params = {} if name == "subspace" else {"bank_budget": 0}
    dets = []
    for chunk in (4, 1000):
        bb = TinyBackbone()
        det = AnomalyDetector(bb, build_method(name, **params), augment="hflip", aug_count=2, aug_views=0)
        det.chunk_views = chunk
        det.fit(goods(5, 0), show_progress=False)
        report = det.update(goods(9, 1), show_progress=False)
        assert report["n_views"] == 27 and report["aug_copies"] == 2
        assert bb.largest_call <= chunk
        dets.append(det)
    for key, value in dets[1].method.state_tensors().items():
        torch.testing.assert_close(dets[0].method.state_tensors()[key], value, rtol=1e-5, atol=1e-6)


def test_update_copies_adapt_to_the_goods_held():
    det = AnomalyDetector(TinyBackbone(), build_method("rad"), augment="hflip", aug_count=8, aug_views=16)
    det.fit(goods(2, 0), show_progress=False)
    assert det.fit_info["aug_copies"] == 7 and det.fit_info["n_train_images"] == 16
    report = det.update(goods(6, 1), show_progress=False)  # 8 goods held: ceil(16 / 8) - 1 = 1 copy each
    assert report["aug_copies"] == 1 and report["n_views"] == 12
    assert det.fit_info["n_train_images"] == 28 and det.fit_info["update_aug_copies"] == 1


def test_update_accepts_paths_decoded_lazily(tmp_path):
    paths = []
    for i, img in enumerate(goods(4, 2)):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    det = AnomalyDetector(TinyBackbone(), build_method("knn", bank_budget=0), augment="none")
    det.fit(paths[:2], show_progress=False)
    det.update(paths[2:], show_progress=False)
    ref = AnomalyDetector(TinyBackbone(), build_method("knn", bank_budget=0), augment="none")
    ref.fit(goods(4, 2), show_progress=False)
    torch.testing.assert_close(det.method.bank, ref.method.bank, rtol=0, atol=1e-6)
    np.testing.assert_allclose(det.predict(paths).scores, ref.predict(goods(4, 2)).scores)


# -- memory: a 200-good update in a subprocess --------------------------------------------------------------
CHILD = textwrap.dedent("""
    import sys
    import numpy as np, torch
    from PIL import Image
    from adreg.backbones.base import Features
    from adreg.detector import AnomalyDetector
    from adreg.methods import build_method
    from benchmarks.harness import child_result, proc_status, status_bytes

    torch.set_num_threads(1)

    class Fat:
        # 1 MiB of features per view (64 channels x 64 x 64 float32): 200 goods x 2 views = 400 MiB in one pass
        image_size, device = 256, torch.device("cpu")
        def extract(self, images, batch_size=1, progress=None):
            n = len(images)
            p = torch.rand(n, 64, 64, 64)
            return Features([p], [p.mean((2, 3))])
        def to(self, device): return self

    det = AnomalyDetector(Fat(), build_method(sys.argv[1], bank_budget=int(sys.argv[2])), augment="hflip",
                          aug_count=1, aug_views=0)
    det.chunk_views = int(sys.argv[3])
    rng = np.random.default_rng(0)
    det.fit([Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(4)],
            show_progress=False)
    images = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(200)]
    base = status_bytes(proc_status(), "VmRSS") / 2 ** 20
    report = det.update(images, show_progress=False)
    child_result({"base": base, "views": report["n_views"]})  # with its own peak RSS (VmHWM)
""")


def _update_rss(name: str, budget: int, chunk: int) -> dict:
    """The child's RSS before the update (``base``) and its peak (``peak``), MiB, and the views it learned."""
    res = run_child(["-c", CHILD, name, str(budget), str(chunk)], timeout=120)
    res["peak"] = res.pop("peak_rss_mib")
    assert res["views"] == 400
    return res


def test_memory_of_a_200_good_update_is_bounded_by_budget_and_chunk():
    """RAD (32-view budget), 200 goods x 2 views x 1 MiB of features: in chunks of 16 views the update's
    peak RSS growth is the bank + a chunk and its merge, a fraction of one pass over all 400 views."""
    chunked = _update_rss("rad", 32, 16)
    one_pass = _update_rss("rad", 32, 100_000)
    grown, grown_one = chunked["peak"] - chunked["base"], one_pass["peak"] - one_pass["base"]
    assert grown_one > 800, one_pass  # the features of all views at once
    assert grown < 300 and grown < 0.3 * grown_one, (chunked, one_pass)
