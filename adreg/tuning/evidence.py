"""The selection set of ``adreg tune``: evidence the final evaluation never sees.

Goods are training images that are neither shots nor threshold-calibration images (drawn with the fit's own
seed, exactly as ``adreg.fitting.fit_category`` draws them). Defects, in order of preference:

1. reviewed production defects (``adreg review`` / ``adreg label``): the tune side of a seeded split of
   their hashes (``adreg.tuning.reviewed_for_tuning``); the tuned version records them in its manifest
   (role ``selection``), so the gate leaves them out of the production set it judges that version on;
2. labelled defects given for the choice (``--evidence-dir``: a folder of ``good/`` and defect sub-folders,
   never the test folder) and the validation folder's defects;
3. else **synthetic defects** made on the selection goods (``adreg.synthetic``: CutPaste, a Perlin-masked
   blend of another good's texture, a local intensity or structure change), each with its mask, so pixel
   metrics can rank too.

The test folder is never read here: the reported evaluation and the gate stay honest.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from adreg.data import CategoryData, Sample, load_mask, split_shots
from adreg.images import load_image

#: fewer selection goods than this, or fewer defects: the evidence cannot rank settings, tune fits the defaults
MIN_GOODS = 8
MIN_DEFECTS = 8
#: real defects from which the choice rests on them alone (fewer: synthetic defects are added)
MIN_REAL_DEFECTS = 10
DEFAULT_GOODS = 30


@dataclass
class Evidence:
    """Images that rank candidates: ``images`` (paths or PIL images), ``labels`` (0 good, 1 defect), per
    defect a mask (bool array at the image's size, a mask path, or None) and where each came from."""

    images: list
    labels: list[int]
    masks: list
    sources: list[str]
    shots: list[Path] = field(default_factory=list)
    calibration: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_good(self) -> int:
        return sum(1 for y in self.labels if y == 0)

    @property
    def n_defective(self) -> int:
        return sum(1 for y in self.labels if y == 1)

    @property
    def has_masks(self) -> bool:
        return any(m is not None for m in self.masks)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sources:
            out[s] = out.get(s, 0) + 1
        return out

    def describe(self) -> str:
        """One line: which sets chose, and their sizes."""
        parts = [f"{n} {what}" for what, n in sorted(self.counts().items(), key=lambda kv: -kv[1])]
        return ", ".join(parts)

    def summary(self) -> dict:
        """What the parent run and the CLI report: kind, counts per source, goods and defects, and each selection
        image's label and source in the order candidates score them."""
        return {"kind": self.kind(), "counts": self.counts(), "n_good": self.n_good, "n_defective": self.n_defective,
                "labels": [int(y) for y in self.labels], "sources": list(self.sources)}

    def kind(self) -> str:
        """``labelled`` (real defects only), ``synthetic`` or ``mixed``."""
        synth = any(s.startswith("synthetic") for s in self.sources)
        real = any(y == 1 and not s.startswith("synthetic") for y, s in zip(self.labels, self.sources))
        return "mixed" if synth and real else ("synthetic" if synth else "labelled")

    def insufficient(self) -> str | None:
        """Why this evidence cannot rank candidates, or None."""
        if self.n_good < MIN_GOODS:
            return (f"only {self.n_good} good image(s) are neither shots nor calibration images (need {MIN_GOODS}): "
                    "add good images, or use a smaller --k-shot")
        if self.n_defective < MIN_DEFECTS:
            return f"only {self.n_defective} defect(s) to rank on (need {MIN_DEFECTS})"
        return None

    def split_half(self) -> tuple[list[int], list[int]]:
        """Two stratified halves (indices), the first scored before a candidate may be pruned."""
        first, second = [], []
        for label in (0, 1):
            idx = [i for i, y in enumerate(self.labels) if y == label]
            first += idx[: (len(idx) + 1) // 2]
            second += idx[(len(idx) + 1) // 2:]
        return sorted(first), sorted(second)

    def mask_array(self, i: int, size: int) -> np.ndarray:
        """The mask of image ``i`` at ``size`` x ``size`` (all False for goods and mask-less defects)."""
        m = self.masks[i]
        if m is None:
            return np.zeros((size, size), dtype=bool)
        if isinstance(m, (str, Path)):
            return load_mask(Sample(Path(self.images[i]), 1, "defect", Path(m)), (size, size))
        return np.asarray(Image.fromarray(np.asarray(m, dtype=np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127


def selection_goods(data: CategoryData, k_shot: int, seed: int, holdout: int,
                    n_goods: int = DEFAULT_GOODS) -> tuple[list[Path], list[Path], list[Path]]:
    """(shots, calibration images, selection goods): the first two exactly as ``fit_category`` draws them."""
    holdout = 0 if data.val else holdout
    shots, held_out = split_shots(data.train, k_shot, seed, holdout)
    used = {str(p) for p in shots} | {str(p) for p in held_out}
    pool = [p for p in data.train if str(p) not in used]
    random.Random(seed + 104729).shuffle(pool)
    return shots, held_out, sorted(pool[:n_goods])


def build_evidence(data: CategoryData, k_shot: int, seed: int, holdout: int, *, n_goods: int = DEFAULT_GOODS,
                   labelled: list[Sample] = (), reviewed: list[Sample] = (), synthetic: bool = True) -> Evidence:
    """The selection set of a tune (see the module doc). ``reviewed``: reviewed production defects (the
    tune side of their split); ``labelled``: defects (and goods) given for the choice; the validation
    folder's defects join them. Never reads ``data.test``."""
    shots, calibration, goods = selection_goods(data, k_shot, seed, holdout, n_goods)
    images: list = list(goods)
    labels = [0] * len(goods)
    masks: list = [None] * len(goods)
    sources = ["held-out good"] * len(goods)
    for s in reviewed:
        images.append(s.path)
        labels.append(1)
        masks.append(s.mask_path)
        sources.append("reviewed defect")
    real = [s for s in labelled if s.label == 1] + [s for s in data.val if s.label == 1]
    for s in labelled:
        if s.label == 0:
            images.append(s.path)
            labels.append(0)
            masks.append(None)
            sources.append("labelled good")
    for s in real:
        images.append(s.path)
        labels.append(1)
        masks.append(s.mask_path)
        sources.append("labelled defect")
    if synthetic and len(real) + len(reviewed) < MIN_REAL_DEFECTS and goods:
        from adreg.synthetic import synthetic_defects

        for img, mask, kind in synthetic_defects([load_image(p) for p in goods], seed=seed):
            images.append(img)
            labels.append(1)
            masks.append(mask)
            sources.append(f"synthetic {kind}")
    return Evidence(images, labels, masks, sources, list(shots), list(calibration))


#: share of the reviewed defects that rank a tune's candidates; the rest stay for the gate alone
TUNE_FRACTION = 0.5


def reviewed_for_tuning(category: str, seed: int = 0) -> tuple[list[Sample], list[str]]:
    """(samples, sha256) of the reviewed production defects on the tune side of a seeded split of their
    hashes (``TUNE_FRACTION``), empty without reviews. The split is by content, so every reader and every
    later tune splits the same way; the other side is what the gate judges a tuned version on."""
    from adreg.registry.labels import evaluation_side, production_set, read_labels

    if not read_labels(category):
        return [], []
    ps = production_set(category, seed=seed)
    picked = [(s, sha) for s, sha in zip(ps.samples, ps.sample_sha256)
              if s.label == 1 and evaluation_side(sha, seed=seed + 1_000_003, fraction=TUNE_FRACTION)]
    return [s for s, _ in picked], [sha for _, sha in picked]
