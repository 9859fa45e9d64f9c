"""Tiny real HTTP upstreams for router and metrics tests: not a model, just status codes.

`Upstream` is a threaded http.server answering every request with JSON naming its colour and
release, and with status 500 for a configurable share of requests (deterministic: every k-th).
`ThreadUpstreams` implements the Envoy router's `Workloads` protocol with them, so the router's
deploy/remove path runs for real (EDS files, Envoy serving them) without model servers.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rollout.core.types import Colour, Release
from rollout.routers.envoy import Endpoint


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the stock 5 overflows under load and Envoy answers 503

    def __init__(self, colour: str, version: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.colour = colour
        self.version = version
        self.error_every = 0  # 0: never fail; k: every k-th request answers 500
        self.served = 0
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        with self.server.lock:
            self.server.served += 1
            n = self.server.served
        fail = self.server.error_every and n % self.server.error_every == 0
        body = json.dumps(
            {"colour": self.server.colour, "model": "tiny", "version": self.server.version}
        ).encode()
        self.send_response(500 if fail else 200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


class Upstream:
    """One tiny server on a free port, in a thread."""

    def __init__(self, colour: str, version: str = "0") -> None:
        self.server = _Server(colour, version)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def fail_every(self, k: int) -> None:
        """Answer 500 to every k-th request from now on (0 = never)."""
        self.server.error_every = k

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ThreadUpstreams:
    """The router's Workloads, as tiny in-process servers."""

    def __init__(self) -> None:
        self.servers: dict[str, Upstream] = {}

    def start(self, colour: Colour, release: Release) -> Endpoint:
        upstream = Upstream(colour.value, release.version)
        ref = f"{colour.value}-{upstream.port}"
        self.servers[ref] = upstream
        return Endpoint("127.0.0.1", upstream.port, ref)

    def stop(self, endpoint: Endpoint) -> None:
        upstream = self.servers.pop(endpoint.ref, None)
        if upstream is not None:
            upstream.close()

    def alive(self, endpoint: Endpoint) -> bool:
        return endpoint.ref in self.servers

    def of(self, colour: Colour) -> Upstream:
        """The newest server of a colour."""
        return [u for ref, u in self.servers.items() if ref.startswith(colour.value)][-1]

    def close(self) -> None:
        for upstream in self.servers.values():
            upstream.close()
        self.servers.clear()
