"""Real `adreg serve` processes on 127.0.0.1 for the tests (the load test's Server, failing the test
instead of raising)."""

import contextlib

import pytest

from serving.process import Server


@contextlib.contextmanager
def adreg_server(tracking_uri: str, category: str, log_path, *extra: str):
    """`adreg serve CATEGORY` on a free port; yields its URL; always stops the whole process group."""
    server = Server(tracking_uri, category, log_path, *extra)
    try:
        try:
            server.wait(180)
        except RuntimeError as exc:
            pytest.fail(str(exc))
        yield server.url
    finally:
        server.stop()
