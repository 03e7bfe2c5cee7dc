"""The multi-category router: one served model for many categories, one backbone per backbone config.

Serving each category with its own ``mlflow models serve`` loads its own copy of the backbone. The
router loads the detectors of every bundled category at start, sharing one backbone instance among
those with the same backbone spec, and routes each request row by its ``category`` column. Rows of
one request that share a backbone go through it in one batched pass; each category then scores its
own rows. Unknown categories and undecodable images are per-row errors; the other rows are scored.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pandas as pd

from adreg.pyfunc_model import ServedModelBase

CATEGORY_COLUMN = "category"
MANIFEST = "router.json"


class CategoryRouterModel(ServedModelBase):
    def load_context(self, context) -> None:
        from adreg.detector import AnomalyDetector

        cfg = self._read_config(context)
        root = Path(context.artifacts["detectors"])
        self.manifest = json.loads((root / MANIFEST).read_text())
        self.backbones: dict = {}
        self.detectors = {
            category: AnomalyDetector.load(root / entry["dir"], device=str(cfg["device"]),
                                           precision=str(cfg["precision"]), backbones=self.backbones)
            for category, entry in self.manifest["categories"].items()}
        # detectors grouped by the backbone instance they share
        self.groups: dict[int, list[str]] = defaultdict(list)
        for category, det in self.detectors.items():
            self.groups[id(det.backbone)].append(category)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        frame, rows, images = self._decode_rows(model_input, (CATEGORY_COLUMN, "image"))
        categories = [str(c) for c in frame[CATEGORY_COLUMN].tolist()]
        by_category: dict[str, list[int]] = defaultdict(list)
        for i, category in enumerate(categories):
            if category not in self.detectors:
                rows[i]["error"] = (f"row {i}: unknown category {category!r}; this router serves "
                                    f"{', '.join(sorted(self.detectors))}")
            elif i in images:
                by_category[category].append(i)
        self._run(self._score_groups, rows, images, by_category)
        return self._frame(rows)

    def _score_groups(self, rows, images, by_category) -> None:
        """One backbone pass per backbone instance over all rows of its categories, then each category."""
        for members in self.groups.values():
            index = [i for c in members for i in by_category.get(c, [])]
            if not index:
                continue
            backbone = self.detectors[members[0]].backbone
            feats = backbone.extract([images[i] for i in index], batch_size=max(8, len(index)))
            position = {i: j for j, i in enumerate(index)}
            for category in members:
                rows_of = by_category.get(category, [])
                if not rows_of:
                    continue
                det = self.detectors[category]
                pred = det.predict_features(feats[[position[i] for i in rows_of]])
                threshold = float(det.threshold.value)
                for j, i in enumerate(rows_of):
                    self._fill(rows[i], float(pred.scores[j]), threshold, pred.maps[j], images[i].size)


    def categories(self) -> list[str]:
        return sorted(self.detectors)
