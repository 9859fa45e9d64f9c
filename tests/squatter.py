"""Another server on the machine, for tests of the free-port race: `Squatter` takes a port
a child is about to serve on, if it still can, and answers 404 (or 200) to everything there.

`squat_first_start` puts it between choosing a child's ports and starting the child, the window
in which a parallel pytest-xdist worker's server once took a scoring server's port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest


class _Answer(BaseHTTPRequestHandler):
    server: _SquatServer

    def do_GET(self) -> None:
        self.send_response(self.server.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.do_GET()

    def log_message(self, *args: Any) -> None:
        pass


class _SquatServer(ThreadingHTTPServer):
    daemon_threads = True
    status = 404


class Squatter:
    """Another server on the machine: takes a port when it can, answers `status` there."""

    def __init__(self) -> None:
        self.status = 404
        self.tried: list[int] = []
        self.servers: list[ThreadingHTTPServer] = []

    def take(self, port: int) -> bool:
        self.tried.append(port)
        try:
            server = _SquatServer(("127.0.0.1", port), _Answer)
        except OSError:
            return False
        server.status = self.status
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        self.servers.append(server)
        return True

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


def ports_to_be_bound(argv: list[str], pass_fds: tuple[int, ...]) -> list[int]:
    """The ports a child is about to serve on, as its command line (or config) names them."""
    ports = []
    for fd in pass_fds:
        with socket.socket(fileno=os.dup(fd)) as inherited:
            ports.append(inherited.getsockname()[1])
    if "--port" in argv:  # aml-rollout serve, uvicorn, azmlinfsrv
        ports.append(int(argv[argv.index("--port") + 1]))
    for arg in argv:  # prometheus
        if arg.startswith("--web.listen-address="):
            ports.append(int(arg.rsplit(":", 1)[1]))
    if "-c" in argv and argv[argv.index("-c") + 1].endswith(".json"):  # envoy's bootstrap
        doc = json.loads(Path(argv[argv.index("-c") + 1]).read_text())
        ports.append(doc["admin"]["address"]["socket_address"]["port_value"])
        for listener in doc["static_resources"]["listeners"]:
            ports.append(listener["address"]["socket_address"]["port_value"])
    return [port for port in ports if port]  # 0: the child's bind picks one


def squat_first_start(squatter: Squatter, monkeypatch: pytest.MonkeyPatch) -> Squatter:
    """Between choosing the first child's ports and its start, another server takes what it
    still can (a second try goes untroubled). Patches `subprocess.Popen` for the test."""
    real_popen = subprocess.Popen
    first = [True]

    def popen(argv: list[str], **kwargs: Any) -> Any:
        if first.pop() if first else False:
            for port in ports_to_be_bound(argv, tuple(kwargs.get("pass_fds", ()))):
                squatter.take(port)
        return real_popen(argv, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    return squatter
