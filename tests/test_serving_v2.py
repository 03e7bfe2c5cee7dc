"""`adreg serve bottle --protocol v2`: the Open Inference Protocol (KServe's model server) end to end, scored by
independent V2 clients (Triton's `tritonclient.http`, and `tritonclient.grpc` for raw bytes).

ONE real server (`adreg serve` as a child process in its own process group, 127.0.0.1) serves this module's
sqlite store: v1 = the session's bottle fit, v2 = the same logged model registered again (a second version
to promote; its own download, load and verification in the server). In file order:
metadata and readiness, a good and a defective image with a corrupt row, bounded requests, a promotion followed,
and the KServe / Seldon manifests of deploy/ checked against the live server.
"""

import argparse
import base64
import dataclasses
import io
import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from adreg.registry import derive, tracking, versions
from serving.process import Server, free_port
from tests.servers import wait_for

MODEL = "adreg-bottle"
OUTPUTS = {"score": "FP64", "is_anomaly": "BOOL", "threshold": "FP64", "normal_percentile": "FP64",
           "error": "BYTES", "model_name": "BYTES", "model_version": "BYTES", "model_alias": "BYTES",
           "anomaly_map": "BYTES"}
CORRUPT = base64.b64encode(b"not an image")


@pytest.fixture(scope="module")
def store(bottle_fit, tmp_path_factory):
    root = tmp_path_factory.mktemp("v2-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracking.configure(uri)
    logged = derive.log_fit(dataclasses.replace(bottle_fit, evaluation=None))  # no report pictures: faster
    v1 = derive.register_version(logged, "bottle").version
    v2 = derive.register_version(logged, "bottle").version
    versions.promote("bottle", v1, "production")
    yield {"uri": uri, "v1": v1, "v2": v2, "t1": bottle_fit.detector.threshold.value}
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    log = tmp_path_factory.mktemp("v2-server") / "serve.log"
    srv = Server(store["uri"], "bottle", log, "--protocol", "v2", "--return-map", "--poll-seconds", "1",
                 "--max-request-mib", "2", "--max-rows", "8", "--grpc-port", str(free_port()))
    srv.grpc_port = int(srv.proc.args[srv.proc.args.index("--grpc-port") + 1])
    try:
        try:
            srv.wait(180)
        except RuntimeError as exc:
            pytest.fail(str(exc))
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=120.0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def images(bottle_dir):
    good = (bottle_dir / "test" / "good" / "005.png").read_bytes()
    bad = (bottle_dir / "test" / "broken_large" / "004.png").read_bytes()
    return {"good": good, "bad": bad}


def _tensor(values, binary=True, module=triton):
    t = module.InferInput("image", [len(values)], "BYTES")
    if module is triton:
        t.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    else:
        t.set_data_from_numpy(np.array(values, dtype=np.object_))
    return t


def _b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:
                found.add(address)
    return found


def test_metadata_readiness_and_loopback_only(server, client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert not client.is_model_ready("adreg-unknown")
    meta = client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == OUTPUTS  # anomaly_map: served with --return-map
    assert all(o["shape"] == [-1] for o in meta["outputs"])
    # HTTP and gRPC listen on 127.0.0.1 only (KServe's own server listens on every interface)
    assert _listening_addresses(server.port) == {"0100007F"}
    grpc_addresses = _listening_addresses(server.grpc_port)
    assert grpc_addresses and all(a.endswith("0100007F") for a in grpc_addresses), grpc_addresses


def test_good_and_defective_images_with_a_corrupt_row(client, server, store, images):
    result = client.infer(MODEL, [_tensor([_b64(images["good"]), _b64(images["bad"]), CORRUPT])])
    head = result.get_response()
    assert head["model_version"] == store["v1"] and head["parameters"]["model_alias"] == "production"
    score, flagged, error = result.as_numpy("score"), result.as_numpy("is_anomaly"), result.as_numpy("error")
    assert not flagged[0] and flagged[1] and score[1] > score[0] > 0
    assert error[0] == error[1] == b"" and error[2].decode().startswith("row 2: not a readable image")
    assert np.isnan(score[2]) and not flagged[2]
    assert list(result.as_numpy("threshold")) == pytest.approx([store["t1"]] * 3)
    percentile = result.as_numpy("normal_percentile")
    assert 0 <= percentile[0] <= percentile[1] and percentile[1] >= 95 and np.isnan(percentile[2])
    assert [v.decode() for v in result.as_numpy("model_version")] == [store["v1"]] * 3
    assert {v.decode() for v in result.as_numpy("model_name")} == {MODEL}
    maps = result.as_numpy("anomaly_map")
    amap = Image.open(io.BytesIO(base64.b64decode(maps[1])))
    assert amap.mode == "L" and amap.size[0] == amap.size[1] and maps[2] == b""

    # JSON instead of the binary extension, two requested outputs: the same scores
    as_json = client.infer(MODEL, [_tensor([_b64(images["good"]), _b64(images["bad"])], binary=False)],
                           outputs=[triton.InferRequestedOutput("score", binary_data=False),
                                    triton.InferRequestedOutput("is_anomaly", binary_data=False)],
                           headers={"Content-Type": "application/json"})
    assert [o["name"] for o in as_json.get_response()["outputs"]] == ["score", "is_anomaly"]
    assert list(as_json.as_numpy("score")) == pytest.approx(list(score[:2]))

    # gRPC takes the raw PNG bytes (no base64)
    grpc = triton_grpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        over_grpc = grpc.infer(MODEL, [_tensor([images["good"], images["bad"]], module=triton_grpc)])
        assert list(over_grpc.as_numpy("score")) == pytest.approx(list(score[:2]))
        assert over_grpc.get_response().model_version == store["v1"]
    finally:
        grpc.close()


def test_oversized_and_overlong_requests_are_refused(client, server, images):
    big = [_b64(images["bad"])] * 3  # ~2.1 MiB of base64 image data; the server takes 2 MiB
    with pytest.raises(InferenceServerException) as refused:
        client.infer(MODEL, [_tensor(big)])
    assert refused.value.status() == "413" and refused.value.message().startswith("request too large: ")
    assert "MiB of image data, this server takes at most 2 MiB" in refused.value.message()
    # a body over the limit is refused before it is read (Content-Length: 4 MiB)
    resp = requests.post(f"{server.url}/v2/models/{MODEL}/infer", data=b"x" * (4 * 2 ** 20),
                         headers={"Content-Type": "application/json"}, timeout=60)
    assert resp.status_code == 413 and resp.json()["error"].startswith("request too large: 4.0 MiB body")
    with pytest.raises(InferenceServerException) as overlong:
        client.infer(MODEL, [_tensor([CORRUPT] * 9)])
    assert overlong.value.status() == "400" and "too many rows: 9" in overlong.value.message()
    assert client.infer(MODEL, [_tensor([_b64(images["good"])])]).as_numpy("error")[0] == b""  # still serving


def test_a_promotion_is_followed(client, store, images):
    versions.promote("bottle", store["v2"], "production")

    def answer():
        result = client.infer(MODEL, [_tensor([_b64(images["bad"])])])
        return result if result.get_response()["model_version"] == store["v2"] else None

    result = wait_for(answer, 60, interval=0.5, what=f"version {store['v2']} to answer")
    assert result.as_numpy("model_version")[0].decode() == store["v2"]
    assert result.as_numpy("threshold")[0] == pytest.approx(store["t1"])
    assert result.as_numpy("model_alias")[0] == b"production" and result.as_numpy("is_anomaly")[0]


def _server_args(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed by the V2 server's own parser, in a child process (kserve's gRPC protos and
    tritonclient.grpc's share symbol names, so one process cannot import both)."""
    code = ("import json, sys; from adreg.pyfunc.v2 import build_parser; "
            "print(json.dumps(vars(build_parser().parse_args(sys.argv[1:]))))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return argparse.Namespace(**json.loads(out.stdout.strip().splitlines()[-1]))


def _contract(annotation: str) -> dict[str, str]:
    return dict(item.split(":") for item in annotation.split(","))


def test_deployment_manifests_match_the_served_model(client, server, store):
    """deploy/kserve and deploy/seldon (docs/guides/fleet-serving.md) against the live V2 server: no cluster here."""
    from pathlib import Path

    import yaml

    from adreg.pyfunc.served import DEFAULT_MODEL_CONFIG

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    live = client.get_model_metadata(MODEL)
    live_inputs = {i["name"]: i["datatype"] for i in live["inputs"]}
    live_outputs = {o["name"]: o["datatype"] for o in live["outputs"]}

    isvc = yaml.safe_load((deploy / "kserve" / "inferenceservice.yaml").read_text())
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = isvc["spec"]["predictor"]
    assert predictor["protocolVersion"] == "v2"
    (container,) = predictor["containers"]
    assert container["command"] == ["python", "-m", "adreg.pyfunc.v2"]
    args = _server_args(container["args"])  # the flags the server really takes
    env = {e["name"]: e["value"] for e in container["env"]}
    config = json.loads(env["SERVING_MODEL_CONFIG"])
    assert set(config) <= set(DEFAULT_MODEL_CONFIG)
    name = isvc["metadata"]["name"]
    assert name == args.model_name == config["registered_model"] == live["name"] == MODEL
    assert args.model_uri == f"models:/{name}@{config['follow_alias']}" and config["follow_alias"] == "production"
    assert args.host == "0.0.0.0"  # inside a pod, unlike the 127.0.0.1 default
    (port,) = container["ports"]
    assert port["containerPort"] == args.http_port == container["readinessProbe"]["httpGet"]["port"] \
        == container["livenessProbe"]["httpGet"]["port"]
    for probe in ("readinessProbe", "livenessProbe"):  # the probe paths answer on the live server
        path = container[probe]["httpGet"]["path"]
        assert requests.get(server.url + path, timeout=30).status_code == 200, path
    assert container["readinessProbe"]["httpGet"]["path"] == f"/v2/models/{name}/ready"
    notes = isvc["metadata"]["annotations"]
    assert notes["adreg.io/model-name"] == name
    assert _contract(notes["adreg.io/inputs"]) == live_inputs
    served_outputs = {k: v for k, v in live_outputs.items() if k != "anomaly_map" or config.get("return_map")}
    assert _contract(notes["adreg.io/outputs"]) == served_outputs  # this server runs with --return-map

    model = yaml.safe_load((deploy / "seldon" / "model.yaml").read_text())
    assert (model["apiVersion"], model["kind"]) == ("mlops.seldon.io/v1alpha1", "Model")
    notes = model["metadata"]["annotations"]
    version = notes["adreg.io/registered-version"]
    assert model["metadata"]["name"] == notes["adreg.io/model-name"] == live["name"]
    assert model["spec"]["storageUri"].endswith(f"/{live['name']}/{version}/model")
    assert "mlflow" in model["spec"]["requirements"]
    assert _contract(notes["adreg.io/inputs"]) == live_inputs
    assert _contract(notes["adreg.io/outputs"]) == served_outputs
    # Seldon's MLflow runtime exposes the version's signature: the same input and output names
    signature = mlflow.models.get_model_info(f"models:/{MODEL}/{store['v1']}").signature
    assert set(signature.inputs.input_names()) == set(live_inputs)
    assert set(_contract(notes["adreg.io/outputs"])) <= set(signature.outputs.input_names())
