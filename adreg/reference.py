"""Reference images kept inside a saved detector folder: small copies of a few images and the scores the
detector gave them when it was fitted.

Written at fit (and update) time beside the detector's state (``write_reference``); read when a server swaps
a version in (``adreg.pyfunc.follow.verify``): a version that loads but does not reproduce these scores
within ``REFERENCE_RTOL`` is refused. The folder also names the category the detector belongs to.
"""

from __future__ import annotations

import json
from pathlib import Path

REFERENCE_DIR = "reference"
REFERENCE_FILE = "reference.json"
REFERENCE_RTOL = 1e-2  # CPU/GPU and thread-count differences stay far below this; a wrong state does not
REFERENCE_SIDE = 160   # reference images are stored small: enough to exercise backbone + head


def reference_paths(shots, test_samples=(), n_test: int = 2) -> list[Path]:
    """A fit's reference images: its first shot and up to ``n_test`` test images (a good and a defective
    one when there are both). Files that are not on this machine (an update's parent shots) are skipped."""
    paths = [Path(p) for p in shots if Path(p).is_file()][:1]
    test = [s for s in (test_samples or []) if Path(s.path).is_file()]
    good = [s for s in test if not s.label]
    bad = [s for s in test if s.label]
    for s in (good[:1] + bad[:1] + good[1:] + bad[1:])[:n_test]:
        paths.append(Path(s.path))
    return paths


def write_reference(det, directory: Path, category: str, paths: list[Path]) -> None:
    """Small copies of ``paths`` and the scores ``det`` gives them, into ``directory/reference``."""
    from PIL import Image

    from adreg.images import load_image

    ref = Path(directory) / REFERENCE_DIR
    ref.mkdir(parents=True, exist_ok=True)
    files = []
    for i, path in enumerate(paths):
        img = load_image(path)
        img.thumbnail((REFERENCE_SIDE, REFERENCE_SIDE), Image.BILINEAR)
        name = f"ref_{i}.png"
        img.save(ref / name)
        files.append(name)
    # score the stored files (decoded again), so the check at serve time sees exactly these pixels
    images = [load_image(ref / f) for f in files]
    scores = det.predict(images).scores.tolist() if images else []
    (ref / REFERENCE_FILE).write_text(json.dumps({
        "category": category, "rtol": REFERENCE_RTOL,
        "images": [{"file": f, "score": float(s), "source": str(p)} for f, s, p in zip(files, scores, paths)]},
        indent=2))


def read_reference(directory: Path) -> dict:
    """The reference document of a detector folder ({} when it has none)."""
    path = Path(directory) / REFERENCE_DIR / REFERENCE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
