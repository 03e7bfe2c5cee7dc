"""The ELPV layout (images/ + labels.csv) and its seeded split."""

from __future__ import annotations

import shutil

import pytest

from adreg.data import default_category_dir, default_data_root, elpv_split, is_elpv, is_mtd, resolve_dataset
from adreg.errors import DataError

ELPV = default_data_root() / "elpv_mono"


@pytest.fixture(scope="module")
def elpv_dir():
    if not is_elpv(ELPV):
        pytest.fail(f"the bundled ELPV data is expected at {ELPV} (set ADREG_DATA_ROOT)")
    return ELPV


def test_split_sizes_and_disjointness(elpv_dir):
    d = elpv_split(elpv_dir)
    good_test = [s for s in d.test if s.label == 0]
    defective = [s for s in d.test if s.label == 1]
    assert (len(d.train), len(d.val), len(good_test), len(defective)) == (418, 20, 150, 313)
    assert all(s.label == 0 and s.defect == "good" for s in d.val)
    assert all(s.defect == "defective" and s.mask_path is None for s in defective)
    train, val, test = set(d.train), {s.path for s in d.val}, {s.path for s in d.test}
    assert len(train | val | test) == 418 + 20 + 150 + 313 and not (train & val or train & test or val & test)
    assert d.source == f"elpv:{elpv_dir}:split0"


def test_split_is_deterministic_per_seed(elpv_dir):
    a, b, c = elpv_split(elpv_dir, 0), elpv_split(elpv_dir, 0), elpv_split(elpv_dir, 1)
    assert a.train == b.train and a.val == b.val and a.test == b.test
    assert a.train != c.train and {s.path for s in a.test if s.label} == {s.path for s in c.test if s.label}
    assert c.source.endswith(":split1")


def test_resolves_by_category_name(elpv_dir, tmp_path):
    assert default_category_dir("elpv") == default_category_dir("elpv_mono") == elpv_dir
    assert not is_mtd(elpv_dir) and is_elpv(elpv_dir)
    d = resolve_dataset(default_category_dir("elpv"))
    assert d.root == elpv_dir and len(d.train) == 418 and len(d.test) == 463
    (tmp_path / "good").mkdir()
    shutil.copy(elpv_dir / "images" / "cell0004.png", tmp_path / "good")
    d = resolve_dataset(elpv_dir, test_dir=tmp_path)
    assert len(d.train) == 418 and len(d.val) == 20 and [s.path.name for s in d.test] == ["cell0004.png"]


def _folder(tmp_path, rows: str):
    (tmp_path / "images").mkdir()
    shutil.copy(ELPV / "images" / "cell0004.png", tmp_path / "images")
    (tmp_path / "labels.csv").write_text(rows)
    return tmp_path


@pytest.mark.parametrize("rows, message", [
    ("image,defect_probability\nimages/cell0004.png,0.0\nimages/cell9999.png,1.0\n", r"line 3: image .*cell9999.png does not exist"),
    ("image,defect_probability\nimages/cell0004.png,maybe\n", r"line 2: expected .* got 'images/cell0004.png', 'maybe'"),
    ("image,defect_probability\nimages/cell0004.png,0.33\n", r"line 2: expected .*0.0 \(good\) or 1.0"),
    ("name,label\nimages/cell0004.png,0.0\n", "expected the header image,defect_probability"),
    ("", "expected the header"),
])
def test_broken_labels_are_one_line_data_errors(tmp_path, rows, message):
    folder = _folder(tmp_path, rows)
    with pytest.raises(DataError, match=message) as err:
        resolve_dataset(folder)
    assert "\n" not in str(err.value)


def test_too_few_goods_for_the_split(tmp_path):
    folder = _folder(tmp_path, "image,defect_probability\nimages/cell0004.png,0.0\n")
    with pytest.raises(DataError, match="none is left for training"):
        elpv_split(folder)
    assert elpv_split(folder, n_val=0, n_test_good=0).train == [folder / "images" / "cell0004.png"]
