"""A supervised model server: ``mlflow models serve`` for one registered model, as an object.

``Server`` resolves what to serve (a category following its alias, a pinned version, or the router), builds
MLflow's command line and the served model's ``SERVING_MODEL_CONFIG``, checks the port, and runs the server in
its own process group: ``start()`` returns at once, ``wait_ready()`` waits for ``/health``, ``stop()`` stops the
whole group (mlflow and its uvicorn worker; SIGKILL after a grace period) and ``run()`` (what ``adreg serve``
does) serves in the foreground, handing SIGTERM / SIGINT / SIGHUP on to the group. ``protocol="v2"`` serves the
same pyfunc with the same config through the Open Inference Protocol instead (``adreg.pyfunc.v2``, KServe's
model server; ready on ``/v2/models/<name>/ready``). Also a context manager::

    with adreg.serve("bottle", port=5001) as server:
        server.wait_ready()
        requests.post(server.url + "/invocations", json=...)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from adreg.errors import ConfigError
from adreg.names import ROUTER
from adreg.pyfunc import DEFAULT_MAX_REQUEST_MIB, DEFAULT_MAX_ROWS, DEFAULT_POLL_SECONDS

STOP_GRACE_S = 20
PROTOCOLS = ("mlflow", "v2")  # MLflow's /invocations; the Open Inference Protocol (KServe's model server)
V2_INSTALL = "pip install 'adreg[serve-v2]'"


def check_port_free(host: str, port: int) -> None:
    """A one-line ``ConfigError`` (exit 2) when something already listens on host:port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot serve on host {host!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is not "in use"
        try:
            s.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is already in use; stop what listens there "
                                  f"(`adreg status CATEGORY` lists running adreg servers) or pick another --port") from None
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def serve_command(model_uri: str, host: str, port: int, workers: int = 1) -> list[str]:
    """``mlflow models serve`` for ``model_uri`` in this environment (``--env-manager local``)."""
    mlflow_bin = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    return [mlflow_bin, "models", "serve", "-m", model_uri, "--env-manager", "local",
            "--host", host, "--port", str(port), "--workers", str(workers)]


def v2_command(model_uri: str, model_name: str, host: str, port: int, grpc_port: int | None = None) -> list[str]:
    """The Open Inference Protocol server (``python -m adreg.pyfunc.v2``) for ``model_uri`` as ``model_name``."""
    cmd = [sys.executable, "-m", "adreg.pyfunc.v2", "--model_uri", model_uri, "--model_name", model_name,
           "--host", host, "--http_port", str(port)]
    if grpc_port:
        cmd += ["--enable_grpc", "true", "--grpc_port", str(grpc_port)]
    return cmd


def check_v2_installed() -> None:
    """A one-line ``ConfigError`` (exit 2) when KServe's model server is not installed."""
    import importlib.util

    if importlib.util.find_spec("kserve") is None:
        raise ConfigError(f"--protocol v2 needs KServe's model server, which is not installed: {V2_INSTALL}")


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None, interval: float = 0.5,
              accept=lambda status: status == 200) -> bool:
    """Poll ``url`` until it answers a status ``accept`` takes (200 by default): True; False when ``timeout``
    seconds pass first or ``process`` (the server, when given) exits."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            if accept(requests.get(url, timeout=2).status_code):
                return True
        except requests.RequestException:
            pass
        time.sleep(interval)
    return False


def signal_group(process: subprocess.Popen, signum: int) -> None:
    """Send ``signum`` to the process group ``process`` leads (nothing when it is gone)."""
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def reap_group(process: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """Wait for every process of the group ``process`` leads to be gone; SIGKILL what is left after ``grace``
    seconds (a server's worker may outlive its parent by a moment while it finishes requests)."""
    deadline = time.monotonic() + grace
    while True:
        try:
            os.killpg(process.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        if time.monotonic() > deadline:
            signal_group(process, signal.SIGKILL)
            return
        time.sleep(0.2)


def stop_process_group(process: subprocess.Popen, grace: float = STOP_GRACE_S,
                       signum: int = signal.SIGTERM) -> int | None:
    """Stop the process group ``process`` leads (started with ``process_group=0`` or ``start_new_session``):
    ``signum`` (SIGTERM) to the whole group, SIGKILL to what is left after ``grace`` s; the leader's exit code."""
    signal_group(process, signum)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    reap_group(process, grace)
    return process.poll()


def serve_env(tracking_uri: str, model_config: dict) -> dict:
    """Environment of `mlflow models serve`: the store, and SERVING_MODEL_CONFIG (keys of the served
    model's DEFAULT_MODEL_CONFIG: device, follow_alias, poll_seconds, shadow_alias, capture_*, max_*, ...)."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_DISABLE_TELEMETRY="true",
               SERVING_MODEL_CONFIG=json.dumps(model_config))
    # uvicorn must be on PATH for `mlflow models serve`; it sits beside this interpreter.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@dataclass
class Server:
    """One ``mlflow models serve`` process group serving a registered adreg model (see the module doc).

    Build it with ``adreg.serve(...)`` (which resolves the model and checks the port); ``description`` says
    what it serves, ``command`` / ``env`` are what it runs."""

    model_uri: str
    host: str
    port: int
    tracking_uri: str
    model_config: dict
    description: str = ""
    workers: int = 1
    protocol: str = "mlflow"
    model_name: str = ""  # the name on the V2 routes (/v2/models/<model_name>)
    grpc_port: int | None = None  # V2 only: also serve gRPC here
    process: subprocess.Popen | None = field(default=None, repr=False)
    _stopping: list = field(default_factory=list, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        """Where requests go: ``/invocations`` (MLflow) or ``/v2/models/<name>/infer`` (V2)."""
        if self.protocol == "v2":
            return f"{self.url}/v2/models/{self.model_name}/infer"
        return f"{self.url}/invocations"

    @property
    def ready_path(self) -> str:
        return f"/v2/models/{self.model_name}/ready" if self.protocol == "v2" else "/health"

    @property
    def command(self) -> list[str]:
        if self.protocol == "v2":
            return v2_command(self.model_uri, self.model_name, self.host, self.port, self.grpc_port)
        return serve_command(self.model_uri, self.host, self.port, self.workers)

    @property
    def env(self) -> dict:
        return serve_env(self.tracking_uri, self.model_config)

    def start(self) -> "Server":
        """Start the server in its own process group; returns at once (``wait_ready`` waits for it)."""
        if self.process is not None and self.process.poll() is None:
            raise ConfigError(f"the server on {self.url} is already running")
        self.process = subprocess.Popen(self.command, env=self.env, process_group=0)
        return self

    def wait_ready(self, timeout: float = 300.0) -> "Server":
        """Wait until ``/health`` (V2: ``/v2/models/<name>/ready``) answers 200; ``ConfigError`` if the process
        exits or ``timeout`` passes."""
        if self.process is None or not wait_http(self.url + self.ready_path, timeout, self.process):
            if self.process is None or self.process.poll() is not None:
                rc = None if self.process is None else self.process.returncode
                raise ConfigError(f"the server for {self.model_uri} exited (code {rc}) before it was ready")
            raise ConfigError(f"the server for {self.model_uri} was not ready on {self.url} within {timeout:g} s")
        return self

    def stop(self, grace: float = STOP_GRACE_S) -> int | None:
        """SIGTERM the whole process group, SIGKILL it after ``grace`` s; returns the server's exit code."""
        if self.process is None:
            return None
        return stop_process_group(self.process, grace)

    def wait(self) -> int:
        """Wait for the server to exit by itself; returns its exit code (what is left of the group is reaped)."""
        rc = self.process.wait()
        reap_group(self.process)
        return rc

    def run(self) -> int:
        """Serve in the foreground until the server exits or this process gets SIGTERM / SIGINT / SIGHUP, which
        are handed on to the whole group (SIGHUP as SIGTERM). Returns 0 after a signal, else the exit code."""
        self.start()

        def forward(signum, _frame):
            self._stopping.append(signum)
            signal_group(self.process, signum if signum != signal.SIGHUP else signal.SIGTERM)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            rc = self.process.wait()
        finally:
            if not self._stopping:
                signal_group(self.process, signal.SIGTERM)
            reap_group(self.process)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0 if self._stopping else rc

    def __enter__(self) -> "Server":
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def build_server(category: str, *, alias: str = "production", version=None, host: str = "127.0.0.1",
                 port: int = 5000, workers: int = 1, device: str = "auto", precision: str = "fp32",
                 return_map: bool = False, poll_seconds: float = DEFAULT_POLL_SECONDS, shadow: str | None = None,
                 capture: str | None = None, capture_rate: float = 0.05, capture_max_mib: float = 1024,
                 max_request_mib: float = DEFAULT_MAX_REQUEST_MIB, max_rows: int = DEFAULT_MAX_ROWS,
                 server_id: str | None = None, tracking_uri: str | None = None, protocol: str = "mlflow",
                 grpc_port: int | None = None) -> Server:
    """Resolve what to serve and check the port; returns a ``Server`` that is not started yet.

    ``category`` follows ``alias`` (the served model swaps versions as the alias moves) unless ``version``
    pins one; ``"router"`` serves the multi-category router, each category following its own alias.
    ``protocol="v2"``: the Open Inference Protocol (one category, one worker; ``grpc_port`` adds gRPC)."""
    from adreg.pyfunc.status import default_server_id
    from adreg.registry import tracking
    from adreg.registry.resolve import resolve

    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}: one of {', '.join(PROTOCOLS)}")
    if protocol == "v2":
        check_v2_installed()
        if category == ROUTER:
            raise ConfigError("the router is served over MLflow's /invocations only; serve each category with "
                              "`adreg serve CATEGORY --protocol v2`")
        if workers != 1:
            raise ConfigError("--protocol v2 serves with one worker process (scale out with replicas)")
    elif grpc_port:
        raise ConfigError("--grpc-port needs --protocol v2")
    uri = tracking.ensure(tracking_uri)
    check_port_free(host, port)
    if grpc_port:
        if grpc_port == port:
            raise ConfigError(f"--grpc-port {grpc_port} is the HTTP --port; pick another")
        check_port_free(host, grpc_port)
    ref = resolve(category, version, alias)
    config = {"device": device, "return_map": return_map, "precision": precision, "poll_seconds": poll_seconds,
              "max_request_mib": max_request_mib, "max_rows": max_rows, "server_host": host, "server_port": port,
              "server_id": server_id or default_server_id(host, port)}
    pinned = version is not None
    if category == ROUTER:
        config.update(follow_alias="" if pinned else alias)
        what = ref.uri if pinned else f"{ref.uri}, each category following @{alias}"
    else:
        config.update(follow_alias="" if pinned else alias, registered_model=ref.name, model_version=ref.version)
        what = (f"{ref.name} version {ref.version} (pinned)" if pinned else
                f"{ref.name}@{alias} (now version {ref.version}; follows the alias every {poll_seconds:g} s)")
    if shadow:
        config["shadow_alias"] = shadow
        what += f", shadowing @{shadow}"
    if capture:
        config.update(capture_dir=str(Path(capture).resolve()), capture_rate=capture_rate,
                      capture_max_mib=capture_max_mib)
        what += f", capturing {capture_rate:.0%} of images into {capture} (<= {capture_max_mib:g} MiB)"
    if protocol == "v2":
        what += f", over the Open Inference Protocol as /v2/models/{ref.name}" + \
            (f" (gRPC on port {grpc_port})" if grpc_port else "")
    return Server(ref.uri, host, port, uri, config, description=what, workers=workers, protocol=protocol,
                  model_name=ref.name, grpc_port=grpc_port or None)
