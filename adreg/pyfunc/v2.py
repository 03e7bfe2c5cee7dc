"""The served model over the Open Inference Protocol ("V2": what KServe, Seldon Core v2, Triton and MLServer
speak), on KServe's Python model server (``kserve`` 0.21, the ``serve-v2`` extra).

Not a second model: ``V2Model`` loads the same MLflow pyfunc that ``mlflow models serve`` serves
(``mlflow.pyfunc.load_model(uri, model_config=SERVING_MODEL_CONFIG)``), so following the alias, shadow,
capture and status reports are the pyfunc's own (``adreg.pyfunc.follow`` ...). KServe does the protocol: the
REST routes (``/v2/health/ready``, ``/v2/models/{name}``, ``/v2/models/{name}/ready``,
``/v2/models/{name}/infer``), JSON and the binary tensor extension, requested outputs, and gRPC on
``--grpc_port`` when ``--enable_grpc true``. This module maps tensors to the pyfunc's table and back, bounds
requests and binds the host it is told (KServe's own server listens on every interface).

Input ``image``: BYTES, shape [-1], one encoded PNG/JPEG per element: raw bytes (binary tensor extension, or
gRPC) or base64 text (JSON). Outputs, each shape [-1], one element per image: ``score`` FP64 (NaN when the
row failed), ``is_anomaly`` BOOL (false when the row failed), ``threshold`` FP64, ``normal_percentile`` FP64
(NaN when failed), ``error`` BYTES (empty, or why the row was not scored), ``model_name``, ``model_version``,
``model_alias`` BYTES, and ``anomaly_map`` BYTES (base64 PNG, 128 = threshold) when the server returns maps.
The response's ``model_version`` is the version that scored the request (one version per request, swaps
happen between requests), its ``parameters`` carry ``model_alias``.

Run by ``adreg serve CATEGORY --protocol v2`` (``adreg.server``), or by hand / in a container::

    SERVING_MODEL_CONFIG='{"follow_alias": "production", "registered_model": "adreg-bottle"}' \\
      python -m adreg.pyfunc.v2 --model_uri models:/adreg-bottle@production --model_name adreg-bottle \\
      --host 0.0.0.0 --http_port 8080 --enable_grpc true --grpc_port 8081
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import sys

import numpy as np

from adreg.pyfunc import DEFAULT_MAX_REQUEST_MIB, DEFAULT_MAX_ROWS
from adreg.pyfunc.served import IMAGE_COLUMN, BadRequest, as_bool, check_bounds

INPUT = {"name": IMAGE_COLUMN, "datatype": "BYTES", "shape": [-1]}
#: output name -> V2 datatype, in response order (anomaly_map only when the server returns maps)
OUTPUTS = {"score": "FP64", "is_anomaly": "BOOL", "threshold": "FP64", "normal_percentile": "FP64",
           "error": "BYTES", "model_name": "BYTES", "model_version": "BYTES", "model_alias": "BYTES",
           "anomaly_map": "BYTES"}
BODY_SLACK_BYTES = 2 ** 20  # JSON framing on top of the image data a request may carry
_log = logging.getLogger("adreg.v2")


def output_types(return_map: bool) -> list[dict]:
    return [{"name": n, "datatype": t, "shape": [-1]} for n, t in OUTPUTS.items()
            if return_map or n != "anomaly_map"]


def _as_text(value) -> str:
    """One BYTES element as the pyfunc's ``image`` string: raw image bytes become base64, text stays."""
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
        if raw[:8] == b"\x89PNG\r\n\x1a\n" or raw[:3] == b"\xff\xd8\xff" or not raw.isascii():
            return base64.b64encode(raw).decode("ascii")
        return raw.decode("ascii")
    return str(value)


def _kserve():
    import kserve
    from kserve.errors import InvalidInput

    return kserve, InvalidInput


kserve, InvalidInput = _kserve()


class RequestTooLarge(InvalidInput):
    """More image data than ``max_request_mib``: HTTP 413 (gRPC: INVALID_ARGUMENT, as any InvalidInput)."""


class V2Model(kserve.Model):
    """One registered adreg model as a KServe model: the pyfunc loaded through MLflow, scored per request."""

    def __init__(self, name: str, model_uri: str, model_config: dict):
        super().__init__(name)
        self.model_uri = model_uri
        self.model_config = dict(model_config)
        self.return_map = as_bool(self.model_config.get("return_map", False))
        self.max_rows = int(self.model_config.get("max_rows") or DEFAULT_MAX_ROWS)
        self.max_request_chars = int(float(self.model_config.get("max_request_mib") or DEFAULT_MAX_REQUEST_MIB)
                                     * 2 ** 20)
        self.pyfunc = None

    def load(self) -> bool:
        import mlflow

        self.pyfunc = mlflow.pyfunc.load_model(self.model_uri, model_config=self.model_config)
        self.ready = True
        return self.ready

    def stop(self) -> None:
        """Unloaded (SIGTERM): a following model reports itself stopped."""
        follower = getattr(self._python_model(), "follower", None)
        if follower is not None:
            follower.stop()
        super().stop()

    def _python_model(self):
        try:
            return self.pyfunc.unwrap_python_model() if self.pyfunc is not None else None
        except Exception:  # noqa: BLE001 - a model without a Python model has no follower
            return None

    def get_input_types(self) -> list[dict]:
        return [dict(INPUT)]

    def get_output_types(self) -> list[dict]:
        return output_types(self.return_map)

    def _images(self, payload) -> list[str]:
        inputs = {i.name: i for i in payload.inputs}
        if IMAGE_COLUMN not in inputs:
            raise InvalidInput(f"the request has no {IMAGE_COLUMN!r} input; send a BYTES tensor "
                               f"'{IMAGE_COLUMN}' of shape [n] (encoded PNG/JPEG: raw bytes or base64 text)")
        tensor = inputs[IMAGE_COLUMN]
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input {IMAGE_COLUMN!r} must be BYTES (encoded PNG/JPEG), not {tensor.datatype}")
        values = tensor.as_numpy().reshape(-1).tolist()
        if not values:
            raise InvalidInput("empty request: send at least one image")
        try:
            check_bounds(values, self.max_rows, self.max_request_chars)
        except BadRequest as exc:
            raise (RequestTooLarge if exc.status == 413 else InvalidInput)(exc.message) from None
        return [_as_text(v) for v in values]

    async def predict(self, payload, headers=None, response_headers=None):
        import pandas as pd
        from kserve import InferOutput, InferResponse

        if not isinstance(payload, kserve.InferRequest):
            raise InvalidInput("this server speaks the Open Inference Protocol: POST /v2/models/"
                               f"{self.name}/infer")
        frame = pd.DataFrame({IMAGE_COLUMN: self._images(payload)})
        # off the event loop: health and metadata keep answering while a request is scored
        out = await asyncio.get_running_loop().run_in_executor(None, self.pyfunc.predict, frame)
        n = len(out)
        tensors = []
        for name, datatype in OUTPUTS.items():
            if name == "anomaly_map" and not self.return_map:
                continue
            column = out[name].tolist()
            if datatype == "FP64":
                data = np.array([np.nan if v is None else float(v) for v in column], dtype=np.float64)
            elif datatype == "BOOL":
                data = np.array([bool(v) if v is not None else False for v in column], dtype=bool)
            else:
                data = np.array([str(v or "").encode("utf-8") for v in column], dtype=np.object_)
            tensor = InferOutput(name=name, shape=[n], datatype=datatype)
            tensor.set_data_from_numpy(data, binary_data=False)
            tensors.append(tensor)
        version = str(out["model_version"].iloc[0]) if n else ""
        alias = str(out["model_alias"].iloc[0]) if n else ""
        return InferResponse(response_id=payload.id or "", model_name=self.name, model_version=version,
                             infer_outputs=tensors, parameters={"model_alias": alias},
                             use_binary_outputs=payload.use_binary_outputs,
                             requested_outputs=payload.request_outputs)


# -- the server: KServe's, bound to one host, with a body limit ------------------------------------------
class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes`` (Content-Length checked before anything is read; a
    chunked body is counted as it arrives)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _sentence(self, size: float) -> str:
        return (f"request too large: {size / 2 ** 20:.1f} MiB body, this server takes at most "
                f"{self.max_bytes / 2 ** 20:g} MiB (max_request_mib plus 1 MiB of framing); send fewer or "
                f"smaller images per request")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            from starlette.responses import JSONResponse

            return await JSONResponse({"error": self._sentence(int(length))}, status_code=413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise RequestTooLarge(self._sentence(seen))
            return message

        return await self.app(scope, counted, send)


async def _too_large(_request, exc):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": str(exc)}, status_code=413)


def serve(model: V2Model, host: str, http_port: int, grpc_port: int | None, body_limit: int) -> None:
    """KServe's ``ModelServer.start`` for one model, its REST (and gRPC) listeners bound to ``host``."""
    from kserve import model_server
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.rest.server import RESTServer

    class HostGRPCServer(GRPCServer):
        """KServe 0.21's ``GRPCServer.start`` listening on ``host`` (KServe's listens on [::])."""

        async def start(self, max_workers):
            from concurrent import futures

            from grpc import aio
            from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
            from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
            from kserve.protocol.grpc.servicer import InferenceServicer

            self._server = aio.server(
                futures.ThreadPoolExecutor(max_workers=max_workers),
                interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
                options=[("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                         ("grpc.max_receive_message_length", body_limit)])
            grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
                InferenceServicer(self._data_plane, self._model_repository_extension), self._server)
            self._server.add_insecure_port(f"{host}:{self._port}")
            await self._server.start()
            await self._server.wait_for_termination()

    class HostModelServer(model_server.ModelServer):
        def start(self, models):
            self._register_and_check_atleast_one_model_is_ready(models)
            self._rest_server = RESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane,
                                           self.model_repository_extension, self.http_port, workers=1,
                                           grace_period=self.grace_period, event_loop=self.event_loop,
                                           timeout_keep_alive=self.timeout_keep_alive)
            self._rest_server.config.host = host
            self.servers.append(self._rest_server.start())
            if self.enable_grpc:
                self._grpc_server = HostGRPCServer(self.grpc_port, self.dataplane, self.model_repository_extension,
                                                   kwargs=vars(model_server.args), grace_period=self.grace_period)
                self.servers.append(self._grpc_server.start(self.max_threads))
            self.setup_event_loop()
            self.register_signal_handler()
            asyncio.run(self._serve())

    app = model_server.app
    app.add_middleware(BodyLimit, max_bytes=body_limit)
    app.add_exception_handler(RequestTooLarge, _too_large)
    server = HostModelServer(http_port=http_port, grpc_port=grpc_port or 8081, workers=1,
                             enable_grpc=bool(grpc_port), enable_latency_logging=False, grace_period=10)
    server.start([model])


def build_parser() -> argparse.ArgumentParser:
    """The server's command line (KServe's own flags, read by KServe from the same line, pass through)."""
    parser = argparse.ArgumentParser(prog="python -m adreg.pyfunc.v2",
                                     description="serve a registered adreg model over the Open Inference Protocol")
    parser.add_argument("--model_uri", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, a folder")
    parser.add_argument("--model_name", required=True, help="the name on the V2 routes (/v2/models/NAME)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http_port", type=int, default=8080)
    parser.add_argument("--grpc_port", type=int, default=8081)
    parser.add_argument("--enable_grpc", default="false", help="true: also serve gRPC on --grpc_port")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, _ = build_parser().parse_known_args(argv)
    config = json.loads(os.environ.get("SERVING_MODEL_CONFIG") or "{}")
    model = V2Model(args.model_name, args.model_uri, config)
    model.load()
    limit = model.max_request_chars + BODY_SLACK_BYTES
    serve(model, args.host, args.http_port, args.grpc_port if as_bool(args.enable_grpc) else None, limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
