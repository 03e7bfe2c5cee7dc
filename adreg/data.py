"""Dataset layouts and the few-shot split.

These layouts are understood:

* MVTec AD: ``<root>/train/good``, ``<root>/test/<good|defect>``, ``<root>/ground_truth/<defect>/<stem>_mask.png``.
* Magnetic-Tile-Defect (``MT_*/Imgs``): a seeded split, see ``mtd_split``.
* ELPV solar cells (``images/`` + ``labels.csv``, image labels only): a seeded split, see ``elpv_split``.
* A custom product folder: a folder of good images, with optional ``val/`` and ``test/`` folders beside
  it (or given explicitly) holding ``good/`` and defect sub-folders. Masks are found as MVTec does it,
  as ``<stem>_mask.png`` beside the image, or as ``<stem>.png`` beside a ``.jpg`` image.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from adreg.errors import DataError
from adreg.images import list_images

GOOD_NAMES = ("good", "ok", "normal")


@dataclass(frozen=True)
class Sample:
    """One labelled image: label 0 = good, 1 = defective; ``mask_path`` only for defective ones."""

    path: Path
    label: int
    defect: str
    mask_path: Path | None = None


@dataclass
class CategoryData:
    """The images adreg needs for one category: good training images, and optional val/test sets."""

    train: list[Path]
    val: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)
    source: str = ""
    root: Path | None = None  # the folder the data was resolved from


def repo_root() -> Path | None:
    """The source checkout adreg runs from (the folder holding its pyproject.toml), None when installed."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "adreg" / "__init__.py").is_file() else None


def default_data_root() -> Path | None:
    """Where the bundled real datasets live: ``$ADREG_DATA_ROOT``; else, running from a checkout,
    ``<checkout>/../shared/datasets``; else None (an installed package has no bundled data)."""
    env = os.environ.get("ADREG_DATA_ROOT")
    if env:
        return Path(env)
    root = repo_root()
    return None if root is None else root.parent / "shared" / "datasets"


ELPV_NAMES = ("elpv_mono", "elpv")  # category names of the bundled ELPV folder, elpv_mono


def default_category_dir(category: str) -> Path | None:
    """The bundled folder of ``category`` (MVTec ``mvtec_ad/<category>``, ``mtd``, or ``elpv_mono``, also
    called ``elpv``), if there is one."""
    root = default_data_root()
    if root is None:
        return None
    candidate = root / "mvtec_ad" / category
    if (candidate / "train" / "good").is_dir():
        return candidate
    candidate = root / category
    if is_mtd(candidate) or is_elpv(candidate):
        return candidate
    candidate = root / ELPV_NAMES[0]
    return candidate if category in ELPV_NAMES and is_elpv(candidate) else None


def is_mtd(folder: Path) -> bool:
    return (Path(folder) / "MT_Free" / "Imgs").is_dir()


def mtd_split(root: str | Path, split_seed: int = 0, n_val: int = 20, n_test_good: int = 100) -> CategoryData:
    """Magnetic-Tile-Defect has no official split: a seeded one. Good tiles (MT_Free) are shuffled with
    ``split_seed`` into ``n_test_good`` test, ``n_val`` validation and the rest training images; every
    defective tile is a test image, with its mask (``X.png`` beside ``X.jpg``, anti-aliased: > 127)."""
    root = Path(root)
    good = list_images(root / "MT_Free" / "Imgs")
    random.Random(split_seed).shuffle(good)
    test_good, val_good, train = good[:n_test_good], good[n_test_good:n_test_good + n_val], sorted(good[n_test_good + n_val:])
    test = [Sample(p, 0, "good") for p in sorted(test_good)]
    for defect_dir in sorted(root.glob("MT_*")):
        if defect_dir.name == "MT_Free":
            continue
        defect = defect_dir.name[3:].lower()
        test += [Sample(p, 1, defect, find_mask(p, defect)) for p in list_images(defect_dir / "Imgs")]
    return CategoryData(train=train, val=[Sample(p, 0, "good") for p in sorted(val_good)], test=test,
                        source=f"mtd:{root}:split{split_seed}")


def is_elpv(folder: Path) -> bool:
    """The ELPV layout: ``labels.csv`` and an ``images/`` folder."""
    folder = Path(folder)
    return (folder / "labels.csv").is_file() and (folder / "images").is_dir()


def read_elpv_labels(root: str | Path) -> list[tuple[Path, int]]:
    """(image, label) of every row of ``<root>/labels.csv`` (``image,defect_probability``), in file order:
    probability 0.0 = good (0), 1.0 = defective (1). A missing column or image, or a row that is not one
    of these, is a DataError naming the line."""
    root = Path(root)
    labels = root / "labels.csv"
    try:
        with open(labels, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"image", "defect_probability"} <= set(reader.fieldnames):
                raise DataError(f"{labels}: expected the header image,defect_probability, "
                                f"got {','.join(reader.fieldnames or []) or 'an empty file'}")
            rows = []
            for row in reader:
                line = reader.line_num
                image, value = (row.get("image") or "").strip(), (row.get("defect_probability") or "").strip()
                try:
                    prob = float(value)
                except ValueError:
                    prob = None
                if not image or prob not in (0.0, 1.0):
                    raise DataError(f"{labels} line {line}: expected an image and a defect_probability of "
                                    f"0.0 (good) or 1.0 (defective), got {image!r}, {value!r}")
                path = root / image
                if not path.is_file():
                    raise DataError(f"{labels} line {line}: image {path} does not exist")
                rows.append((path, int(prob)))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{labels}: not readable ({exc})") from None
    if not rows:
        raise DataError(f"{labels} lists no images")
    return rows


def elpv_split(root: str | Path, split_seed: int = 0, n_val: int = 20, n_test_good: int = 150) -> CategoryData:
    """ELPV has no official split: a seeded one, as ``mtd_split`` makes it. Good cells (probability 0.0
    in ``labels.csv``) are shuffled with ``split_seed`` into ``n_test_good`` test, ``n_val`` validation
    and the rest training images; every defective cell (1.0) is a test image (defect ``defective``, no
    mask: ELPV has image labels only)."""
    root = Path(root)
    rows = read_elpv_labels(root)
    good = sorted(p for p, label in rows if label == 0)
    defective = sorted(p for p, label in rows if label == 1)
    random.Random(split_seed).shuffle(good)
    test_good, val_good, train = good[:n_test_good], good[n_test_good:n_test_good + n_val], sorted(good[n_test_good + n_val:])
    if not train:
        raise DataError(f"{root / 'labels.csv'} lists {len(good)} good cells: none is left for training after "
                        f"{n_test_good} test and {n_val} validation ones")
    test = [Sample(p, 0, "good") for p in sorted(test_good)] + [Sample(p, 1, "defective") for p in defective]
    return CategoryData(train=train, val=[Sample(p, 0, "good") for p in sorted(val_good)], test=test,
                        source=f"elpv:{root}:split{split_seed}")


def _require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise DataError(f"{what} {path} is not a folder")
    return path


def find_mask(image: Path, defect: str) -> Path | None:
    """Locate the ground-truth mask of a defective image, or None."""
    folder = image.parent
    candidates = [
        folder.parent.parent / "ground_truth" / defect / f"{image.stem}_mask.png",
        folder / f"{image.stem}_mask.png",
    ]
    if image.suffix.lower() != ".png":
        candidates.append(folder / f"{image.stem}.png")
    return next((c for c in candidates if c.is_file()), None)


def read_labelled_folder(folder: str | Path, what: str = "folder") -> list[Sample]:
    """Samples of a folder with a ``good`` sub-folder and one sub-folder per defect type.

    A folder with images directly inside (no sub-folders) is read as all good.
    """
    folder = _require_dir(Path(folder), what)
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "ground_truth")
    samples: list[Sample] = []
    if not subdirs:
        samples = [Sample(p, 0, "good") for p in list_images(folder)]
    for sub in subdirs:
        label = 0 if sub.name.lower() in GOOD_NAMES else 1
        for p in list_images(sub):
            samples.append(Sample(p, label, "good" if label == 0 else sub.name,
                                  find_mask(p, sub.name) if label else None))
    if not samples:
        raise DataError(f"{what} {folder} holds no images (looked for {', '.join(GOOD_NAMES[:1])}/ and defect sub-folders)")
    return samples


def resolve_dataset(train_dir: str | Path, val_dir: str | Path | None = None,
                    test_dir: str | Path | None = None) -> CategoryData:
    """Read a category's folders; ``train_dir`` is an MVTec category root or a folder of good images."""
    train_dir = _require_dir(Path(train_dir), "training folder")
    if is_mtd(train_dir) or is_elpv(train_dir):
        data = mtd_split(train_dir) if is_mtd(train_dir) else elpv_split(train_dir)
        data.root = train_dir
        data.val = read_labelled_folder(val_dir, "validation folder") if val_dir is not None else data.val
        data.test = read_labelled_folder(test_dir, "test folder") if test_dir is not None else data.test
        return data
    if (train_dir / "train" / "good").is_dir():  # MVTec category root
        good_dir, base = train_dir / "train" / "good", train_dir
        source = f"mvtec:{train_dir}"
    else:
        good_dir, base = train_dir, train_dir.parent
        source = f"folder:{train_dir}"
    train = list_images(good_dir)
    if not train:
        raise DataError(f"training folder {good_dir} holds no images ({', '.join(('png', 'jpg', 'bmp', 'tif'))} ...)")
    if val_dir is None and (base / "val").is_dir():
        val_dir = base / "val"
    if test_dir is None and (base / "test").is_dir():
        test_dir = base / "test"
    val = read_labelled_folder(val_dir, "validation folder") if val_dir is not None else []
    test = read_labelled_folder(test_dir, "test folder") if test_dir is not None else []
    return CategoryData(train=train, val=val, test=test, source=source, root=train_dir)


def split_shots(train: list[Path], k_shot: int, seed: int, holdout: int) -> tuple[list[Path], list[Path]]:
    """Pick ``k_shot`` training images with ``seed``; return them and up to ``holdout`` others.

    The held-out good images calibrate the threshold when no validation folder exists; they are never
    shots, so the threshold is not fitted on the images that define "normal".
    """
    if k_shot < 1:
        raise DataError(f"--k-shot must be at least 1, got {k_shot}")
    if k_shot > len(train):
        raise DataError(f"--k-shot {k_shot} is larger than the {len(train)} training images available")
    order = list(train)
    random.Random(seed).shuffle(order)
    shots, rest = order[:k_shot], order[k_shot:]
    return sorted(shots), sorted(rest[:holdout])


def load_mask(sample: Sample, size: tuple[int, int]) -> np.ndarray:
    """Binary mask (H, W) at ``size`` = (width, height); all zeros for good or mask-less samples."""
    w, h = size
    if sample.mask_path is None:
        return np.zeros((h, w), dtype=bool)
    try:
        mask = Image.open(sample.mask_path).convert("L")
    except OSError as exc:
        raise DataError(f"mask {sample.mask_path}: not readable ({exc})") from None
    with Image.open(sample.path) as img:
        if img.size != mask.size:
            raise DataError(f"mask {sample.mask_path} is {mask.size}, its image {sample.path} is {img.size}")
    mask = mask.resize((w, h), Image.NEAREST)
    return np.asarray(mask) > 127
