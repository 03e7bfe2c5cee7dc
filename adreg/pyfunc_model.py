"""The MLflow pyfunc model: base64 images in, score / decision / optional anomaly map out.

Request: a DataFrame with an ``image`` column of base64-encoded PNG/JPEG bytes (MLflow only decodes
base64 for some input formats, so decoding happens here, for all of them). Response: one row per
image with ``score``, ``is_anomaly``, ``threshold``, ``anomaly_map`` (base64 PNG at the image's aspect
when ``return_map`` is on, else empty) and ``error`` (empty when the row was scored). A bad row gets
its own error and does not fail the others.

``model_config`` keys (overridable at serve time with SERVING_MODEL_CONFIG): ``device`` auto/cpu/cuda,
``return_map`` bool, ``map_max_side`` (longest side of returned maps, px), ``max_image_pixels``.
Map pixels are uint8 with 128 at the decision threshold (value = clip(128 * map / threshold, 0, 255)).
"""

from __future__ import annotations

import threading

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from adreg.errors import AdregError
from adreg.images import DEFAULT_MAX_PIXELS, decode_image_b64, encode_png_b64

IMAGE_COLUMN = "image"
OUTPUT_COLUMNS = ["score", "is_anomaly", "threshold", "anomaly_map", "error"]
DEFAULT_MODEL_CONFIG = {"device": "auto", "return_map": False, "map_max_side": 512,
                        "max_image_pixels": DEFAULT_MAX_PIXELS}


def as_bool(value) -> bool:
    """model_config values arrive as bools or as strings from SERVING_MODEL_CONFIG."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def encode_map(amap: np.ndarray, threshold: float, original_size: tuple[int, int], max_side: int) -> str:
    """uint8 PNG (128 = threshold) resized to the original image's aspect, longest side <= max_side."""
    w, h = original_size
    scale = min(1.0, max_side / max(w, h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    scaled = np.clip(amap / max(threshold, 1e-12) * 128.0, 0, 255).astype(np.uint8)
    return encode_png_b64(Image.fromarray(scaled).resize(size, Image.BILINEAR))


class AnomalyDetectorModel(mlflow.pyfunc.PythonModel):
    """Wraps ``adreg.detector.AnomalyDetector`` loaded from the ``detector`` artifact."""

    def load_context(self, context) -> None:
        from adreg.detector import AnomalyDetector

        cfg = {**DEFAULT_MODEL_CONFIG, **(context.model_config or {})}
        self.return_map = as_bool(cfg["return_map"])
        self.map_max_side = int(cfg["map_max_side"])
        self.max_image_pixels = int(cfg["max_image_pixels"])
        self.detector = AnomalyDetector.load(context.artifacts["detector"], device=str(cfg["device"]))
        if self.detector.threshold is None:
            raise AdregError("the saved detector has no threshold; it was not calibrated")
        # MLflow's server may call predict from several threads; torch modules are not re-entrant
        # with respect to cudnn autotuning state and our batching, so predictions are serialised.
        self._lock = threading.Lock()

    # pd.DataFrame hints tell MLflow to keep using the logged signature (no type-hint schema inference)
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            raise AdregError(f"input must be a table with an '{IMAGE_COLUMN}' column of base64-encoded images")
        threshold = float(self.detector.threshold.value)
        rows = [{"score": None, "is_anomaly": None, "threshold": threshold, "anomaly_map": "", "error": ""}
                for _ in range(len(model_input))]
        images, index = [], []
        for i, value in enumerate(model_input[IMAGE_COLUMN].tolist()):
            try:
                images.append(decode_image_b64(value, f"row {i}", self.max_image_pixels))
                index.append(i)
            except AdregError as exc:
                rows[i]["error"] = str(exc)
        if images:
            with self._lock:
                pred = self.detector.predict(images)
            for j, i in enumerate(index):
                score = float(pred.scores[j])
                rows[i].update(score=score, is_anomaly=bool(score > threshold))
                if self.return_map:
                    rows[i]["anomaly_map"] = encode_map(pred.maps[j], threshold, images[j].size, self.map_max_side)
        out = pd.DataFrame(rows, columns=OUTPUT_COLUMNS)
        # keep failed rows' score/is_anomaly as None (JSON null), not NaN (invalid JSON)
        for col in ("score", "is_anomaly"):
            out[col] = out[col].astype(object).where(out[col].notna(), None)
        return out
