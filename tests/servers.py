"""Starting and stopping real `adreg serve` processes on 127.0.0.1 for the tests."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def adreg_server(tracking_uri: str, category: str, log_path, *extra: str):
    """`adreg serve CATEGORY` on a free port; yields its URL; always stops the whole process group."""
    port = free_port()
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "adreg.cli", "--tracking-uri", tracking_uri, "serve", category,
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail("server exited early:\n" + open(log_path).read()[-3000:])
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not come up:\n" + open(log_path).read()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        stop_process_group(proc)
        log.close()


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's whole process group (CLI, mlflow, uvicorn worker); SIGKILL after 30 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
