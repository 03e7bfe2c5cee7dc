"""`adreg serve` as a child process on 127.0.0.1: start, wait until ready, measure, stop.

Used by the load test, the benchmarks and the end-to-end tests, so all start and stop servers the same way.
``free_port`` is defined here (only the tools and the tests need one); waiting for HTTP and stopping a process
group are the product's own (``adreg.server.wait_http``, ``adreg.server.stop_process_group``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from adreg.server import stop_process_group, wait_http


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (the OS's pick, released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`adreg serve CATEGORY` on a free port of 127.0.0.1, in its own process group (``--protocol v2`` in
    ``extra``: the Open Inference Protocol server, ready on /v2/health/ready instead of /ping)."""

    def __init__(self, uri: str, category: str, log_path: Path, *extra: str):
        self.port = free_port()
        self.v2 = "v2" in extra and "--protocol" in extra
        self.ready_path = "/v2/health/ready" if self.v2 else "/ping"
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "adreg.cli", "--tracking-uri", uri, "serve", category,
                                      "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", *extra],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 240) -> None:
        """Until /ping (V2: /v2/health/ready) answers; RuntimeError (with the log's tail) if the server exits
        or times out."""
        if wait_http(f"{self.url}{self.ready_path}", timeout, self.proc):
            return
        if self.proc.poll() is not None:
            raise RuntimeError("server exited early:\n" + self.log_tail())
        raise RuntimeError(f"server on {self.url} did not come up:\n" + self.log_tail())

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_text()[-chars:]

    def pids(self) -> list[int]:
        """Every live process of the server's session (CLI, mlflow, uvicorn worker)."""
        out = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if os.getsid(int(pid)) == self.proc.pid:
                    state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        out.append(int(pid))
            except (OSError, ProcessLookupError):
                continue
        return out

    def rss_mib(self, worker_only: bool = False) -> float:
        """Resident memory of the server's processes (``worker_only``: the largest one, the uvicorn
        worker that holds the model)."""
        sizes = []
        for pid in self.pids():
            try:
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("VmRSS:"):
                        sizes.append(int(line.split()[1]))
            except (OSError, ProcessLookupError):
                continue
        return (max(sizes, default=0) if worker_only else sum(sizes)) / 1024

    def listening(self) -> bool:
        """Whether anything accepts connections on the server's port."""
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def terminate_cli(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the `adreg serve` process ONLY (what a service manager does) and wait for it."""
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Stop `adreg serve` (it hands the signal on to MLflow's server and its worker), then make sure
        no process of its session is left."""
        stop_process_group(self.proc)
        deadline = time.monotonic() + 20
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
