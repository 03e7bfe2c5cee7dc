"""The multi-category router: one served model for many categories, one backbone per backbone config.

Serving each category with its own ``mlflow models serve`` loads its own copy of the backbone. The
router loads the detectors of every bundled category at start, sharing one backbone instance among
those with the same backbone spec, and routes each request row by its ``category`` column. Rows of
one request that share a backbone go through it in one batched pass; each category then scores its
own rows. Unknown categories and undecodable images are per-row errors; the other rows are scored.

With ``follow_alias`` set (``adreg serve router`` sets it) each category follows its own alias
(``models:/adreg-<category>@<alias>``, the alias the bundle was built from) independently: promoting or
rolling back one category swaps only that category's head (``adreg.pyfunc.follow``). The set of
categories is the bundle's; a new set is a new router version.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pandas as pd

from adreg.names import model_name
from adreg.pyfunc.follow import load_served
from adreg.pyfunc.served import ServedModelBase

CATEGORY_COLUMN = "category"
MANIFEST = "router.json"


class CategoryRouterModel(ServedModelBase):
    def load_context(self, context) -> None:
        from adreg.pyfunc.follow import Slot

        cfg = self._read_config(context)
        root = Path(context.artifacts["detectors"])
        self.manifest = json.loads((root / MANIFEST).read_text())
        self.backbones: dict = {}
        follow = str(cfg["follow_alias"])
        alias = self.manifest.get("alias", "production") if follow else ""
        self.slots = {}
        for category, entry in self.manifest["categories"].items():
            served = load_served(root / entry["dir"], cfg, self.backbones, model_name(category),
                                 str(entry.get("version", "")), alias or self.manifest.get("alias", ""))
            self.slots[category] = Slot(served.name, alias, served)
        self._start_services(list(self.slots.values()), self.backbones)

    @property
    def detectors(self) -> dict:
        return {c: s.current.detector for c, s in self.slots.items()}

    def _predict_frame(self, model_input) -> pd.DataFrame:
        frame, rows, images = self._decode_rows(model_input, (CATEGORY_COLUMN, "image"))
        categories = [str(c) for c in frame[CATEGORY_COLUMN].tolist()]
        served = {c: s.current for c, s in self.slots.items()}  # one read per request
        by_category: dict[str, list[int]] = defaultdict(list)
        for i, category in enumerate(categories):
            if category not in served:
                rows[i]["error"] = (f"row {i}: unknown category {category!r}; this router serves "
                                    f"{', '.join(sorted(served))}")
                continue
            self._name_rows(rows, [i], served[category])
            if i in images:
                by_category[category].append(i)
        self._run(self._score_groups, rows, images, by_category, served)
        self._after(frame, rows)
        return self._frame(rows)

    def _score_groups(self, rows, images, by_category, served) -> None:
        """One backbone pass per backbone instance over all rows of its categories, then each category."""
        import torch

        groups: dict[int, list[str]] = defaultdict(list)
        for category, s in served.items():
            groups[id(s.detector.backbone)].append(category)
        with torch.inference_mode():
            for members in groups.values():
                index = [i for c in members for i in by_category.get(c, [])]
                if not index:
                    continue
                # one backbone pass over every row of the group (one image at a time on the CPU)
                feats = served[members[0]].detector.extract([images[i] for i in index])
                position = {i: j for j, i in enumerate(index)}
                for category in members:
                    rows_of = by_category.get(category, [])
                    if rows_of:
                        self._score_chunks(self.slots[category], served[category], rows, images, rows_of,
                                           feats[[position[i] for i in rows_of]])

    def categories(self) -> list[str]:
        return sorted(self.slots)
