"""The MLflow pyfunc model: base64 images in, score / decision / optional anomaly map out.

Request: a DataFrame with an ``image`` column of base64-encoded PNG/JPEG bytes (MLflow only decodes
base64 for some input formats, so decoding happens here, for all of them). Response: one row per
image with ``score``, ``is_anomaly``, ``threshold``, ``normal_percentile`` (0-100: the share of the version's
held-out normal calibration scores below ``score``; the field to build alarms on, its meaning does not change
when a version with another score scale swaps in), ``anomaly_map`` (base64 PNG at the image's aspect
when ``return_map`` is on, else empty), ``error`` (empty when the row was scored) and the
``model_name`` / ``model_version`` / ``model_alias`` that scored it. A bad row gets its own error and
does not fail the others.

``model_config`` keys (overridable at serve time with SERVING_MODEL_CONFIG): ``device`` auto/cpu/cuda,
``precision`` fp32/fp16/bf16 (backbone autocast on CUDA), ``return_map`` bool, ``map_max_side`` (longest
side of returned maps, px), ``max_image_pixels``; bounded requests: ``max_request_mib`` (base64 image
text per request, 413 above it) and ``max_rows`` (400 above it), both checked before any image is
decoded; following the registry (``adreg.pyfunc.follow``): ``follow_alias`` ("" serves the loaded
snapshot), ``registered_model``, ``model_version``, ``tracking_uri``, ``poll_seconds``,
``heartbeat_seconds``, ``server_id``/``server_host``/``server_port`` (status reports), ``shadow_alias``
(``adreg.pyfunc.shadow``), ``capture_dir``/``capture_rate``/``capture_max_mib`` (``adreg.pyfunc.capture``);
``runtime`` torch/onnxruntime/openvino (``adreg.backbones.export``; an exported version logs its own) and
``threads`` (CPU threads, 0 = leave as is).
Map pixels are uint8 with 128 at the decision threshold (value = clip(128 * map / threshold, 0, 255)).

The request bounds protect an HTTP server and apply where MLflow's scoring server loaded the model. A model
loaded in-process (``mlflow.pyfunc.load_model(...).predict(frame)``: a notebook, MLflow's evaluate, Spark's
batches) takes a frame of any length and scores it ``STREAM_ROWS`` rows at a time, so memory is bounded by
the chunk, not by the frame.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
import pandas as pd
from PIL import Image

from adreg.errors import AdregError
from adreg.images import DEFAULT_MAX_PIXELS, decode_image_b64, encode_png_b64, thread_map
from adreg.pyfunc import DEFAULT_MAX_REQUEST_MIB, DEFAULT_MAX_ROWS, DEFAULT_POLL_SECONDS
from adreg.pyfunc.capture import SIGNALS_KEY, review_signals


class BadRequest(MlflowException, AdregError):
    """A request the model cannot take at all: MLflow's server answers ``status`` (400 by default) with
    this one sentence and no stack trace (other exceptions come back with one).

    MLflow's scoring server rewrites an MlflowException's message to ``Failed to predict data '<the
    whole input's repr>'. Error: ...`` before answering; the sender needs the sentence, so the first
    message set is kept and later rewrites are ignored. ``get_http_status_code`` is what the server
    asks for the HTTP status (MLflow maps no error code to 413)."""

    def __init__(self, message: str, status: int = 400):
        self._sentence = None
        MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)
        self.status = int(status)

    @property
    def message(self) -> str:
        return self._sentence

    @message.setter
    def message(self, value: str) -> None:
        if self._sentence is None:
            self._sentence = value

    def get_http_status_code(self) -> int:
        return self.status


IMAGE_COLUMN = "image"
STREAM_ROWS = 64  # rows decoded and scored at a time when the model is used in-process
_SERVER_MODEL_PATH = "__pyfunc_model_path__"  # set by MLflow's scoring server in the process it serves from
MODEL_COLUMNS = ["model_name", "model_version", "model_alias"]
OUTPUT_COLUMNS = ["score", "is_anomaly", "threshold", "anomaly_map", "error", *MODEL_COLUMNS, "normal_percentile"]
DEFAULT_MODEL_CONFIG = {"device": "auto", "precision": "fp32", "return_map": False, "map_max_side": 512,
                        "max_image_pixels": DEFAULT_MAX_PIXELS,
                        "max_request_mib": DEFAULT_MAX_REQUEST_MIB, "max_rows": DEFAULT_MAX_ROWS,
                        "follow_alias": "", "registered_model": "", "model_version": "", "tracking_uri": "",
                        "poll_seconds": DEFAULT_POLL_SECONDS, "heartbeat_seconds": 10.0,
                        "server_id": "", "server_host": "", "server_port": 0,
                        "shadow_alias": "",
                        "capture_dir": "", "capture_rate": 0.0, "capture_max_mib": 1024,
                        "runtime": "torch", "threads": 0}  # backbone runtime (adreg.backbones.export), CPU threads


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


def _renumber(error: str, offset: int) -> str:
    """``row i: ...`` of a chunk as ``row offset+i: ...`` of the whole frame."""
    if not error.startswith("row "):
        return error
    head, sep, rest = error[4:].partition(":")
    return f"row {int(head) + offset}{sep}{rest}" if head.isdigit() else error


def request_size(values) -> int:
    """Characters of image text in a request (what dominates its body), counted without decoding."""
    return sum(len(v) for v in values if isinstance(v, (str, bytes, bytearray)))


def check_bounds(images: list, max_rows: int, max_request_chars: int) -> None:
    """``BadRequest`` (400) for more than ``max_rows`` rows, (413) for more than ``max_request_chars`` of
    image data; nothing is decoded. The bounds of every server front (MLflow's ``/invocations``, V2)."""
    if len(images) > max_rows:
        raise BadRequest(f"too many rows: {len(images)} in one request, this server takes at most "
                         f"{max_rows} (max_rows); split the request")
    size = request_size(images)
    if size > max_request_chars:
        raise BadRequest(f"request too large: {size / 2 ** 20:.1f} MiB of image data, this server takes at most "
                         f"{max_request_chars / 2 ** 20:g} MiB (max_request_mib); send fewer or "
                         f"smaller images per request", status=413)


class ServedModelBase(mlflow.pyfunc.PythonModel):
    """What the single-category model and the multi-category router share: config, bounds, decoding,
    output, following the registry, shadow and capture."""

    follower = None
    shadow = None
    capture = None

    def _read_config(self, context) -> dict:
        cfg = {**DEFAULT_MODEL_CONFIG, **(context.model_config or {})}
        self.cfg = cfg
        self.return_map = as_bool(cfg["return_map"])
        self.map_max_side = int(cfg["map_max_side"])
        self.max_image_pixels = int(cfg["max_image_pixels"])
        self.max_request_chars = int(float(cfg["max_request_mib"]) * 2 ** 20)
        self.max_rows = int(cfg["max_rows"])
        self.bounded = bool(os.environ.get(_SERVER_MODEL_PATH))  # inside MLflow's scoring server
        if int(cfg.get("threads") or 0) > 0:  # asked for in the model config: the serving process's own choice
            import torch

            torch.set_num_threads(int(cfg["threads"]))
        # MLflow's server calls predict from a pool of threads. Inference runs on ONE dedicated thread:
        # that serialises it (the backbone and our batching are not re-entrant) and keeps torch/oneDNN's
        # per-thread kernel caches warm; a cold pool thread made the first requests of each batch
        # shape several times slower.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adreg-inference")
        return cfg

    def _run(self, fn, *args):
        """Run ``fn(*args)`` on the inference thread and wait for it."""
        return self._executor.submit(fn, *args).result()

    def _start_services(self, slots: list, backbones: dict) -> None:
        """Follow / shadow / capture / status as the config asks (nothing runs for a plain snapshot)."""
        from adreg.pyfunc import capture, follow, shadow

        cfg = self.cfg
        if str(cfg["capture_dir"]) and float(cfg["capture_rate"]) > 0:
            self.capture = capture.Capture(Path(str(cfg["capture_dir"])), float(cfg["capture_rate"]),
                                           float(cfg["capture_max_mib"]))
        if str(cfg["follow_alias"]) or str(cfg["shadow_alias"]):
            self.follower = follow.Follower(slots, cfg, backbones, self._run)
        if str(cfg["shadow_alias"]):
            self.shadow = shadow.Shadow(cfg, self._run, client=self.follower.client)
        if self.follower is not None:
            self.follower.start()

    def _check_request(self, model_input, columns: tuple[str, ...]) -> pd.DataFrame:
        """The request's shape and size, before anything is decoded: plain 400/413 sentences."""
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if not isinstance(model_input, pd.DataFrame):
            raise BadRequest(f"input must be a table with column(s) {', '.join(columns)}")
        missing = [c for c in columns if c not in model_input.columns]
        if missing:
            raise BadRequest(f"the request has no {', '.join(repr(c) for c in missing)} column; send a table with "
                             f"column(s) {', '.join(columns)} (base64-encoded images in 'image')")
        if len(model_input) == 0:
            raise BadRequest("empty request: send at least one row")
        if not self.bounded:
            return model_input
        check_bounds(model_input[IMAGE_COLUMN].tolist(), self.max_rows, self.max_request_chars)
        return model_input

    def _decode_rows(self, model_input, columns: tuple[str, ...] = (IMAGE_COLUMN,)):
        model_input = self._check_request(model_input, columns)
        rows = [{"score": None, "is_anomaly": None, "threshold": None, "anomaly_map": "", "error": "",
                 "model_name": "", "model_version": "", "model_alias": "", "normal_percentile": None}
                for _ in range(len(model_input))]

        def decode(item):
            i, value = item
            try:
                return decode_image_b64(value, f"row {i}", self.max_image_pixels)
            except AdregError as exc:
                return exc

        images: dict[int, Image.Image] = {}
        # decoded on all cores (PIL releases the GIL while decoding); one bad row fails alone
        for i, got in enumerate(thread_map(decode, enumerate(model_input[IMAGE_COLUMN].tolist()))):
            if isinstance(got, AdregError):
                rows[i]["error"] = str(got)
            else:
                images[i] = got
        return model_input, rows, images

    @staticmethod
    def _name_rows(rows: list[dict], index, served) -> None:
        for i in index:
            rows[i].update(model_name=served.name, model_version=served.version, model_alias=served.alias,
                           threshold=float(served.detector.threshold.value))

    def _fill(self, row: dict, score: float, threshold: float, amap: np.ndarray, size, percentile: float) -> None:
        row.update(score=score, is_anomaly=bool(score > threshold), threshold=threshold,
                   normal_percentile=None if np.isnan(percentile) else float(percentile))
        if self.return_map:
            row["anomaly_map"] = encode_map(amap, threshold, size, self.map_max_side)

    def _score_slot(self, slot, served, rows, images, index, feats=None) -> None:
        """Score ``index`` rows with ``served`` (on the inference thread); hand the shadow its copy."""
        import torch

        with torch.inference_mode():
            self._score_chunks(slot, served, rows, images, index, feats)

    def _score_chunks(self, slot, served, rows, images, index, feats) -> None:
        det = served.detector
        if feats is None:  # in chunks of the detector's batch size, as AnomalyDetector.predict does
            for start in range(0, len(index), det.batch_size):
                chunk = index[start:start + det.batch_size]
                self._score_chunks(slot, served, rows, images, chunk,
                                 det.extract([images[i] for i in chunk]))
            return
        pred = det.predict_features(feats)
        threshold = float(det.threshold.value)
        percentiles = det.normal_percentile(pred.scores)
        for j, i in enumerate(index):
            self._fill(rows[i], float(pred.scores[j]), threshold, pred.maps[j], images[i].size, percentiles[j])
        if self.capture is not None:  # the sampled rows, with what the review queue ranks them by (off the response)
            taken = [j for j in range(len(index)) if self.capture.take()]
            if taken:
                for j, signals in zip(taken, review_signals(pred.maps[taken], feats, taken)):
                    rows[index[j]][SIGNALS_KEY] = signals
        candidate = slot.shadow
        if self.shadow is not None and candidate is not None:
            self.shadow.offer(served, candidate, feats, [images[i] for i in index], pred.scores)

    def _after(self, frame: pd.DataFrame, rows: list[dict]) -> None:
        """Capture the rows sampled while scoring (never blocks: a full queue drops)."""
        if self.capture is None:
            return
        values = frame[IMAGE_COLUMN].tolist()
        for i, row in enumerate(rows):
            if SIGNALS_KEY in row:
                self.capture.keep(values[i], row)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Score a request (served: bounded, at once) or a frame of any length (in-process: in chunks)."""
        if self.bounded or not isinstance(model_input, pd.DataFrame) or len(model_input) <= STREAM_ROWS:
            return self._predict_frame(model_input)
        parts = []
        for start in range(0, len(model_input), STREAM_ROWS):
            chunk = model_input.iloc[start:start + STREAM_ROWS]
            out = self._predict_frame(chunk)
            if start:  # errors name rows of the whole frame
                out["error"] = [_renumber(e, start) for e in out["error"]]
            parts.append(out)
        return pd.concat(parts, ignore_index=True)

    def _predict_frame(self, model_input) -> pd.DataFrame:
        raise NotImplementedError

    @staticmethod
    def _frame(rows: list[dict]) -> pd.DataFrame:
        out = pd.DataFrame(rows, columns=OUTPUT_COLUMNS)
        # keep failed rows' values as None (JSON null), not NaN (invalid JSON)
        for col in ("score", "is_anomaly", "threshold", "normal_percentile"):
            out[col] = out[col].astype(object).where(out[col].notna(), None)
        return out


class AnomalyDetectorModel(ServedModelBase):
    """Wraps ``adreg.detector.AnomalyDetector`` loaded from the ``detector`` artifact; follows the
    registry when ``follow_alias`` is set (``adreg.pyfunc.follow``)."""

    def load_context(self, context) -> None:
        from adreg.pyfunc.follow import Slot, load_served, snapshot_model_id

        cfg = self._read_config(context)
        self.backbones: dict = {}
        directory = Path(context.artifacts["detector"])
        served = load_served(directory, cfg, self.backbones, str(cfg["registered_model"]), str(cfg["model_version"]),
                             str(cfg["follow_alias"]))
        served.model_id = snapshot_model_id(directory)
        self.slot = Slot(served.name, str(cfg["follow_alias"]), served)
        self._start_services([self.slot], self.backbones)

    @property
    def detector(self):
        return self.slot.current.detector

    def _predict_frame(self, model_input) -> pd.DataFrame:
        frame, rows, images = self._decode_rows(model_input)
        served = self.slot.current  # one read: a swap during this request does not touch it
        self._name_rows(rows, range(len(rows)), served)
        if images:
            self._run(self._score_slot, self.slot, served, rows, images, list(images))
        self._after(frame, rows)
        return self._frame(rows)
