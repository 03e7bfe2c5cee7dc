import shutil

import numpy as np
import pytest
from PIL import Image

from adreg.data import load_mask, read_labelled_folder, resolve_dataset, split_shots
from adreg.errors import DataError, ImageDecodeError
from adreg.images import decode_image_b64, file_to_b64, load_image


def test_mvtec_layout(bottle_dir):
    d = resolve_dataset(bottle_dir)
    assert len(d.train) == 209 and d.val == []
    assert len(d.test) == 83
    defective = [s for s in d.test if s.label == 1]
    assert len(defective) == 63 and all(s.mask_path is not None for s in defective)
    assert {s.defect for s in defective} == {"broken_large", "broken_small", "contamination"}
    mask = load_mask(defective[0], (320, 320))
    assert mask.shape == (320, 320) and mask.any() and not mask.all()


def test_custom_layout_with_val_beside_it(bottle_dir, tmp_path):
    good = sorted((bottle_dir / "train" / "good").iterdir())[:4]
    (tmp_path / "good").mkdir()
    for p in good:
        shutil.copy(p, tmp_path / "good" / p.name)
    (tmp_path / "val" / "good").mkdir(parents=True)
    (tmp_path / "val" / "defect").mkdir(parents=True)
    shutil.copy(bottle_dir / "test" / "good" / "000.png", tmp_path / "val" / "good")
    shutil.copy(bottle_dir / "test" / "contamination" / "000.png", tmp_path / "val" / "defect")
    d = resolve_dataset(tmp_path / "good")
    assert len(d.train) == 4
    assert sorted((s.label, s.defect) for s in d.val) == [(0, "good"), (1, "defect")]
    assert d.test == []


def test_split_is_seeded_and_disjoint(bottle_dir):
    train = resolve_dataset(bottle_dir).train
    a = split_shots(train, 2, 7, 20)
    assert a == split_shots(train, 2, 7, 20)
    assert a != split_shots(train, 2, 8, 20)
    assert not set(a[0]) & set(a[1]) and len(a[1]) == 20


def test_clear_errors_for_bad_folders(tmp_path, bottle_dir):
    with pytest.raises(DataError, match="does not exist"):
        resolve_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        resolve_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="larger than the 209"):
        split_shots(resolve_dataset(bottle_dir).train, 500, 0, 0)
    with pytest.raises(DataError, match="holds no images"):
        read_labelled_folder(tmp_path / "empty")


def test_corrupt_tiny_and_truncated_images(tmp_path, bottle_dir):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        load_image(bad)
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes((bottle_dir / "train" / "good" / "000.png").read_bytes()[:5000])
    with pytest.raises(ImageDecodeError, match="trunc.png"):
        load_image(truncated)
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (8, 8)).save(tiny)
    with pytest.raises(ImageDecodeError, match="smaller than"):
        load_image(tiny)
    with pytest.raises(ImageDecodeError, match="base64"):
        decode_image_b64("%%% not base64 %%%")
    with pytest.raises(ImageDecodeError, match="exceeds"):
        decode_image_b64(file_to_b64(bottle_dir / "train" / "good" / "000.png"), max_pixels=1000)
    gray = tmp_path / "gray.png"
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(gray)
    assert load_image(gray).mode == "RGB" and load_image(gray).size == (50, 40)


def test_every_kind_of_png_decodes_to_the_pixels_pillow_gives(bottle_dir):
    """8-bit RGB / grayscale PNGs take libpng (imagecodecs) on the request path, the rest Pillow: same pixels."""
    import io

    from adreg.images import _fast_png, decode_image_bytes

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)

    def png(img, **kw):
        buf = io.BytesIO()
        img.save(buf, format="PNG", **kw)
        return buf.getvalue()

    kinds = {
        "bottle": (bottle_dir / "test" / "broken_large" / "000.png").read_bytes(),
        "rgb": png(Image.fromarray(rgb)),
        "gray": png(Image.fromarray(rgb[..., 0])),
        "gray with transparency": png(Image.fromarray(rgb[..., 0]), transparency=7),
        "rgb with transparency": png(Image.fromarray(rgb), transparency=(1, 2, 3)),
        "rgba": png(Image.fromarray(np.dstack([rgb, rgb[..., :1]]))),
        "palette": png(Image.fromarray(rgb).quantize(16)),
        "gray 16-bit": png(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)),
    }
    for kind, data in kinds.items():
        want = Image.open(io.BytesIO(data))
        want = np.asarray(want.convert("RGB"))
        got = decode_image_bytes(data, kind)
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), want), kind
    # the fast path is taken where it should be (else the request path silently slows down)
    assert _fast_png(kinds["bottle"], 10 ** 8) is not None
    assert _fast_png(kinds["gray"], 10 ** 8) is not None
    assert _fast_png(kinds["palette"], 10 ** 8) is None
    assert _fast_png(kinds["bottle"], 1000) is None  # over the pixel limit: Pillow's message


def test_mask_of_wrong_size_is_reported(tmp_path, bottle_dir):
    (tmp_path / "test" / "crack").mkdir(parents=True)
    (tmp_path / "test" / "good").mkdir()
    shutil.copy(bottle_dir / "test" / "good" / "000.png", tmp_path / "test" / "good")
    img = tmp_path / "test" / "crack" / "a.png"
    Image.new("RGB", (64, 64)).save(img)
    Image.new("L", (32, 32), 255).save(tmp_path / "test" / "crack" / "a_mask.png")
    samples = read_labelled_folder(tmp_path / "test")
    crack = next(s for s in samples if s.label == 1)
    with pytest.raises(DataError, match="is \\(32, 32\\), its image"):
        load_mask(crack, (16, 16))
