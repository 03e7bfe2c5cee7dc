"""Real `adreg serve` processes on 127.0.0.1 for the tests (the load test's Server, failing the test
instead of raising), and small helpers to talk to them."""

import contextlib
import time

import pytest
import requests

from serving.process import Server


@contextlib.contextmanager
def adreg_server(tracking_uri: str, category: str, log_path, *extra: str, server: bool = False):
    """`adreg serve CATEGORY` on a free port; yields its URL (or the Server with ``server=True``);
    always stops the whole process group."""
    srv = Server(tracking_uri, category, log_path, *extra)
    try:
        try:
            srv.wait(180)
        except RuntimeError as exc:
            pytest.fail(str(exc))
        yield srv if server else srv.url
    finally:
        srv.stop()


def post_images(url: str, images: list[str], columns=("image",), extra: list | None = None, timeout=120):
    """POST base64 images (``extra``: per-row values of the leading columns, e.g. categories)."""
    rows = [[*(extra[i] if extra else []), b] for i, b in enumerate(images)]
    return requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": list(columns), "data": rows}},
                         timeout=timeout)


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; that value, or a test failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
