"""A small client for a served adreg model (``adreg serve CATEGORY``, i.e. ``mlflow models serve``).

    from serving.client import AdregClient
    client = AdregClient("http://127.0.0.1:5000")
    for result in client.predict(["part1.png", "part2.jpg"]):
        print(result.score, result.is_anomaly, result.error)
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import requests
from PIL import Image

from adreg.images import encode_png_b64, file_to_b64


@dataclass
class Result:
    score: float | None
    is_anomaly: bool | None
    threshold: float
    anomaly_map: Image.Image | None  # uint8, 128 = threshold; None unless the server returns maps
    error: str


def _encode(image) -> str:
    """A PIL image as base64 PNG, a path as its file's bytes in base64."""
    return encode_png_b64(image) if isinstance(image, Image.Image) else file_to_b64(image)


class AdregClient:
    def __init__(self, url: str = "http://127.0.0.1:5000", timeout: float = 120.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()

    def ready(self) -> bool:
        try:
            return self.session.get(f"{self.url}/ping", timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    def predict(self, images) -> list[Result]:
        """Score image paths and/or PIL images in one request; a bad image yields a Result with ``error``."""
        body = {"dataframe_split": {"columns": ["image"], "data": [[_encode(i)] for i in images]}}
        resp = self.session.post(f"{self.url}/invocations", json=body, timeout=self.timeout)
        if resp.status_code != 200:
            raise RuntimeError(f"server answered {resp.status_code}: {resp.text[:500]}")
        out = []
        for row in resp.json()["predictions"]:
            amap = row.get("anomaly_map") or ""
            out.append(Result(row["score"], row["is_anomaly"], row["threshold"],
                              Image.open(io.BytesIO(base64.b64decode(amap))) if amap else None, row["error"]))
        return out
