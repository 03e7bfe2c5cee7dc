"""The MLflow pyfunc model: base64 images in, score / decision / optional anomaly map out.

Request: a DataFrame with an ``image`` column of base64-encoded PNG/JPEG bytes (MLflow only decodes
base64 for some input formats, so decoding happens here, for all of them). Response: one row per
image with ``score``, ``is_anomaly``, ``threshold``, ``anomaly_map`` (base64 PNG at the image's aspect
when ``return_map`` is on, else empty) and ``error`` (empty when the row was scored). A bad row gets
its own error and does not fail the others.

``model_config`` keys (overridable at serve time with SERVING_MODEL_CONFIG): ``device`` auto/cpu/cuda,
``precision`` fp32/fp16/bf16 (backbone autocast on CUDA), ``return_map`` bool, ``map_max_side`` (longest side of returned maps, px), ``max_image_pixels``.
Map pixels are uint8 with 128 at the decision threshold (value = clip(128 * map / threshold, 0, 255)).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
import pandas as pd
from PIL import Image

from adreg.errors import AdregError
from adreg.images import DEFAULT_MAX_PIXELS, decode_image_b64, encode_png_b64

class BadRequest(MlflowException, AdregError):
    """A request the model cannot take at all: MLflow's server answers 400 with this message and no
    stack trace (other exceptions come back with one)."""

    def __init__(self, message: str):
        MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)


IMAGE_COLUMN = "image"
OUTPUT_COLUMNS = ["score", "is_anomaly", "threshold", "anomaly_map", "error"]
DEFAULT_MODEL_CONFIG = {"device": "auto", "precision": "fp32", "return_map": False, "map_max_side": 512,
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


class ServedModelBase(mlflow.pyfunc.PythonModel):
    """What the single-category model and the multi-category router share: config, decoding, output."""

    def _read_config(self, context) -> dict:
        cfg = {**DEFAULT_MODEL_CONFIG, **(context.model_config or {})}
        self.return_map = as_bool(cfg["return_map"])
        self.map_max_side = int(cfg["map_max_side"])
        self.max_image_pixels = int(cfg["max_image_pixels"])
        # MLflow's server calls predict from a pool of threads. Inference runs on ONE dedicated thread:
        # that serialises it (the backbone and our batching are not re-entrant) and keeps torch/oneDNN's
        # per-thread kernel caches warm; a cold pool thread made the first requests of each batch
        # shape several times slower.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adreg-inference")
        return cfg

    def _run(self, fn, *args):
        """Run ``fn(*args)`` on the inference thread and wait for it."""
        return self._executor.submit(fn, *args).result()

    def _decode_rows(self, model_input, columns: tuple[str, ...] = (IMAGE_COLUMN,)):
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        missing = [c for c in columns if not isinstance(model_input, pd.DataFrame) or c not in model_input.columns]
        if missing:
            raise BadRequest(f"input must be a table with column(s) {', '.join(columns)}; "
                             f"missing: {', '.join(missing)}")
        if len(model_input) == 0:
            raise BadRequest("empty request: send at least one row")
        rows = [{"score": None, "is_anomaly": None, "threshold": None, "anomaly_map": "", "error": ""}
                for _ in range(len(model_input))]
        images: dict[int, Image.Image] = {}
        for i, value in enumerate(model_input[IMAGE_COLUMN].tolist()):
            try:
                images[i] = decode_image_b64(value, f"row {i}", self.max_image_pixels)
            except AdregError as exc:
                rows[i]["error"] = str(exc)
        return model_input, rows, images

    def _fill(self, row: dict, score: float, threshold: float, amap: np.ndarray, size) -> None:
        row.update(score=score, is_anomaly=bool(score > threshold), threshold=threshold)
        if self.return_map:
            row["anomaly_map"] = encode_map(amap, threshold, size, self.map_max_side)

    @staticmethod
    def _frame(rows: list[dict]) -> pd.DataFrame:
        out = pd.DataFrame(rows, columns=OUTPUT_COLUMNS)
        # keep failed rows' values as None (JSON null), not NaN (invalid JSON)
        for col in ("score", "is_anomaly", "threshold"):
            out[col] = out[col].astype(object).where(out[col].notna(), None)
        return out


class AnomalyDetectorModel(ServedModelBase):
    """Wraps ``adreg.detector.AnomalyDetector`` loaded from the ``detector`` artifact."""

    def load_context(self, context) -> None:
        from adreg.detector import AnomalyDetector

        cfg = self._read_config(context)
        self.detector = AnomalyDetector.load(context.artifacts["detector"], device=str(cfg["device"]),
                                             precision=str(cfg["precision"]))
        if self.detector.threshold is None:
            raise AdregError("the saved detector has no threshold; it was not calibrated")

    # pd.DataFrame hints tell MLflow to keep using the logged signature (no type-hint schema inference)
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        _, rows, images = self._decode_rows(model_input)
        threshold = float(self.detector.threshold.value)
        for row in rows:
            row["threshold"] = threshold
        if images:
            index = list(images)
            pred = self._run(self.detector.predict, [images[i] for i in index])
            for j, i in enumerate(index):
                self._fill(rows[i], float(pred.scores[j]), threshold, pred.maps[j], images[i].size)
        return self._frame(rows)
