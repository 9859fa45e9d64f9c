"""No other process can take a port of the local stack between its choice and its bind.

Was: `free_port()` bound port 0, closed it, and a child bound the port a moment later; with two
pytest-xdist workers, another worker's server took it in between, and a fresh-clone CI run
failed its e2e setup with "green not ready after 60 s (HTTP 404)" and an empty log: something
else answered on the scoring server's port. `Squatter` plays that other server: it binds the
port a child is about to serve on, if it still can, and answers 404 to everything.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from rollout.core.types import Colour
from rollout.errors import LocalStackError
from rollout.local import process
from rollout.local.process import wait_ready
from rollout.local.workloads import ScoringProcesses
from tests.local.conftest import MakeRelease


class _NotFound(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class Squatter:
    """Another server on the machine: takes a port when it can, answers 404 there."""

    def __init__(self) -> None:
        self.tried: list[int] = []
        self.servers: list[ThreadingHTTPServer] = []

    def take(self, port: int) -> bool:
        self.tried.append(port)
        try:
            server = ThreadingHTTPServer(("127.0.0.1", port), _NotFound)
        except OSError:
            return False
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers.append(server)
        return True

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def squatter() -> Iterator[Squatter]:
    found = Squatter()
    yield found
    found.close()


def test_a_readiness_probe_answered_404_names_the_other_server_at_once(
    squatter: Squatter,
) -> None:
    # Was: polled the full timeout (60 s for a scoring server), then "not ready ... (HTTP 404)".
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert squatter.take(port)
    started = time.monotonic()
    with pytest.raises(LocalStackError, match=f"something else answers on 127.0.0.1:{port}"):
        wait_ready(f"http://127.0.0.1:{port}/readyz", timeout_s=3.0)
    assert time.monotonic() - started < 1.0


@pytest.mark.slow
def test_a_scoring_server_keeps_its_port_from_another_server(
    make_release: MakeRelease,
    tmp_path: Path,
    squatter: Squatter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_popen = subprocess.Popen

    def popen(argv: list[str], **kwargs: Any) -> Any:
        # The moment between choosing the server's port and its start: another server tries it.
        if "--port" in argv:
            squatter.take(int(argv[argv.index("--port") + 1]))
        for fd in kwargs.get("pass_fds", ()):
            with socket.socket(fileno=os.dup(fd)) as inherited:
                squatter.take(inherited.getsockname()[1])
        return real_popen(argv, **kwargs)

    monkeypatch.setattr(process.subprocess, "Popen", popen)
    workloads = ScoringProcesses(tmp_path / "workloads", ready_timeout_s=30)
    try:
        endpoint = workloads.start(Colour.GREEN, make_release("1"))
        assert len(squatter.tried) == 1 and squatter.servers == []  # it tried, and could not
        ready = httpx.get(f"http://127.0.0.1:{endpoint.port}/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["version"] == "1"
    finally:
        workloads.stop_all()
