"""Synthetic defects (adreg.synthetic) on real goods: bottle, Magnetic-Tile MT_Free and ELPV cells."""

from __future__ import annotations

import csv
import random

import numpy as np
import pytest
from PIL import Image

from adreg.data import default_data_root
from adreg.errors import ConfigError
from adreg.images import load_image
from adreg.synthetic import KINDS, perlin_mask, synthesize_defect, synthetic_defects

ROOT = default_data_root()
MIN_FRACTION, MAX_FRACTION = 0.005, 0.08  # the Perlin kinds' default area bounds
CUTPASTE_BOUNDS = (0.0002, 0.10)  # adreg.cutpaste's own sizes: a scar is small, a normal patch 2-10%


def _goods() -> dict[str, list]:
    bottle = sorted((ROOT / "mvtec_ad" / "bottle" / "train" / "good").glob("*.png"))[:3]
    mtd = sorted((ROOT / "mtd" / "MT_Free" / "Imgs").glob("*.jpg"))[:3]
    with open(ROOT / "elpv_mono" / "labels.csv", newline="") as f:
        elpv = [ROOT / "elpv_mono" / r["image"] for r in csv.DictReader(f) if float(r["defect_probability"]) == 0.0][:2]
    return {"bottle": bottle, "mtd": mtd, "elpv": elpv}


@pytest.fixture(scope="module")
def goods() -> dict[str, list[Image.Image]]:
    found = _goods()
    if not all(found.values()):
        pytest.fail(f"the bundled bottle, MTD and ELPV data are expected under {ROOT} (set ADREG_DATA_ROOT)")
    return {name: [load_image(p) for p in paths] for name, paths in found.items()}


def _diff(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b.convert("RGB"), dtype=np.int16)).max(axis=2)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_changes_its_mask_only(goods, kind):
    for name, imgs in goods.items():
        for i, img in enumerate(imgs):
            out, mask = synthesize_defect(img, kind, random.Random(i), donor=imgs[(i + 1) % len(imgs)])
            where = f"{name}[{i}] {kind}"
            assert out.mode == "RGB" and out.size == img.size, where
            assert mask.dtype == bool and mask.shape == (img.size[1], img.size[0]), where
            lo, hi = CUTPASTE_BOUNDS if kind == "cutpaste" else (MIN_FRACTION, MAX_FRACTION)
            assert lo <= mask.mean() <= hi, f"{where}: mask covers {mask.mean():.4f}"
            diff = _diff(out, img)
            assert not diff[~mask].any(), f"{where}: pixels outside the mask changed"
            assert diff[mask].mean() > 3.0, f"{where}: mean change inside the mask {diff[mask].mean():.2f}"


def test_grayscale_stays_gray_and_l_mode_input_works(goods):
    cell = goods["elpv"][0].convert("L")
    for kind in KINDS:
        out, mask = synthesize_defect(cell, kind, random.Random(3), donor=goods["elpv"][1])
        arr = np.asarray(out)
        assert out.mode == "RGB" and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all(), kind
        assert mask.any()


def test_texture_without_donor_uses_the_image_itself(goods):
    img = goods["mtd"][0]
    out, mask = synthesize_defect(img, "texture", random.Random(0))
    diff = _diff(out, img)
    assert mask.any() and not diff[~mask].any() and diff[mask].mean() > 3.0


def test_synthetic_defects_cycles_kinds_and_is_reproducible(goods):
    paths = _goods()["mtd"]  # paths are decoded with load_image
    imgs = goods["bottle"] + goods["mtd"]
    a = synthetic_defects(imgs, seed=5)
    assert [k for _, _, k in a] == [KINDS[i % 3] for i in range(len(imgs))]
    b = synthetic_defects(imgs, seed=5)
    for (ia, ma, _), (ib, mb, _) in zip(a, b):
        assert (ma == mb).all() and ia.tobytes() == ib.tobytes()
    c = synthetic_defects(imgs, seed=6)
    assert any(not (ma == mc).all() or ia.tobytes() != ic.tobytes() for (ia, ma, _), (ic, mc, _) in zip(a, c))
    from_paths = synthetic_defects(paths, seed=5, kinds=("intensity", "texture"))
    assert [k for _, _, k in from_paths] == ["intensity", "texture", "intensity"]
    assert all(img.size == good.size for (img, _, _), good in zip(from_paths, goods["mtd"]))
    assert synthetic_defects([], seed=0) == []


def test_perlin_mask_bounds_foreground_and_seed():
    fg = np.zeros((240, 320), dtype=bool)
    fg[60:180, 80:260] = True
    for seed in range(30):
        m = perlin_mask((240, 320), np.random.default_rng(seed), foreground=fg)
        assert m.any() and not (m & ~fg).any() and MIN_FRACTION <= m.mean() <= MAX_FRACTION, seed
    a = perlin_mask((100, 300), np.random.default_rng(1))
    assert (a == perlin_mask((100, 300), np.random.default_rng(1))).all()
    assert (a != perlin_mask((100, 300), np.random.default_rng(2))).any()
    assert perlin_mask((50, 50), np.random.default_rng(0), foreground=np.zeros((50, 50), bool)).any()  # fallback
    tight = perlin_mask((200, 200), np.random.default_rng(0), min_fraction=0.01, max_fraction=0.011)
    assert 0.01 <= tight.mean() <= 0.011  # the quantile fallback when no fixed threshold lands in the bounds


def test_unknown_kind_is_a_config_error(goods):
    img = goods["elpv"][0]
    with pytest.raises(ConfigError, match="cutpaste, texture, intensity"):
        synthesize_defect(img, "scratch", random.Random(0))
    with pytest.raises(ConfigError, match="known kinds"):
        synthetic_defects([img], seed=0, kinds=("texture", "blur"))
