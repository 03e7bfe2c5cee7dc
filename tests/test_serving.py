"""End to end over REST: a real `mlflow models serve` process on 127.0.0.1, started via `adreg serve`."""

import base64
import io

import pytest
import requests
from PIL import Image

from adreg.images import encode_png_b64, file_to_b64
from tests.servers import adreg_server


@pytest.fixture()
def server(use_registered, tmp_path):
    with adreg_server(use_registered["uri"], "bottle", tmp_path / "serve.log", "--return-map") as url:
        yield url


def _post(url, images):
    body = {"dataframe_split": {"columns": ["image"], "data": [[b] for b in images]}}
    return requests.post(f"{url}/invocations", json=body, timeout=120)


def test_rest_scores_maps_and_errors(server, bottle_dir, use_registered):
    good = file_to_b64(bottle_dir / "test" / "good" / "005.png")
    bad_path = bottle_dir / "test" / "broken_large" / "004.png"
    from serving.client import AdregClient

    client = AdregClient(server)
    assert client.ready()
    via_client = client.predict([bottle_dir / "test" / "good" / "005.png", bad_path])
    wide = Image.open(bad_path).convert("RGB").crop((0, 150, 900, 750))  # 900x600: aspect 3:2
    resp = _post(server, [good, file_to_b64(bad_path), encode_png_b64(wide), "bm90IGFuIGltYWdl"])
    assert resp.status_code == 200, resp.text[:500]
    rows = resp.json()["predictions"]
    assert rows[1]["score"] > rows[0]["score"]
    assert rows[1]["is_anomaly"] is True and rows[0]["is_anomaly"] is False
    square = Image.open(io.BytesIO(base64.b64decode(rows[1]["anomaly_map"])))
    assert square.size[0] == square.size[1] and square.mode == "L"
    wide_map = Image.open(io.BytesIO(base64.b64decode(rows[2]["anomaly_map"])))
    assert wide_map.size[0] / wide_map.size[1] == pytest.approx(1.5, rel=0.01)
    assert [r.score for r in via_client] == pytest.approx([rows[0]["score"], rows[1]["score"]])
    assert via_client[1].anomaly_map.size == square.size and via_client[1].is_anomaly
    assert rows[3]["error"].startswith("row 3: not a readable image") and rows[3]["score"] is None
    # normal_percentile: the score in held-out-good units (100 = above every calibration good)
    assert rows[3]["normal_percentile"] is None and 0 <= rows[0]["normal_percentile"] <= rows[1]["normal_percentile"]
    assert rows[1]["normal_percentile"] >= 95  # flagged: above the 0.99 quantile of the calibration goods
    # every row names the version that scored it (adreg serve follows @production)
    assert {(r["model_name"], r["model_version"], r["model_alias"]) for r in rows} == \
        {("adreg-bottle", use_registered["version"], "production")}
    # a request without the image column is refused with a 4xx, not a 500
    resp = requests.post(f"{server}/invocations", json={"dataframe_split": {"columns": ["img"], "data": [["x"]]}},
                         timeout=60)
    assert resp.status_code == 400 and resp.json()["message"].startswith("the request has no 'image' column")
