"""A threaded HTTP server on 127.0.0.1 at a free port, started and stopped by a test fake.

The fakes (ARM, kube-apiserver, identity endpoint, Prometheus) differ in what they answer, not in
how they run: each holds one `LocalServer` for its handler and delegates `url`, `start`, `stop`.
With an `ssl_context` (tests.fakes.tls makes one from a CA of the test's own) it serves HTTPS.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client refusing the certificate (what the TLS tests want) is not the fake's error.
        if not isinstance(sys.exc_info()[1], ssl.SSLError):
            super().handle_error(request, client_address)


class LocalServer:
    """`handler` served on a daemon thread; `stop()` returns at once (short poll interval)."""

    def __init__(
        self, handler: type[BaseHTTPRequestHandler], ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._server = _Server(("127.0.0.1", 0), handler)
        self._scheme = "http"
        if ssl_context is not None:
            # The handshake runs in the handler's thread, so a client that gives up on the
            # certificate never stalls the accept loop.
            self._server.socket = ssl_context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
            self._scheme = "https"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        """`http://127.0.0.1:<port>` (https with an ssl_context)."""
        host, port = self._server.server_address[:2]
        return f"{self._scheme}://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Answering:
    """A server that is not the one a test's client wants (a web page, a bare 404, a login
    page): every GET gets `status` and `body`. `with Answering(404, b"...") as url:`."""

    def __init__(self, status: int, body: bytes, content_type: str | None = None) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(status)
                if content_type is not None:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = LocalServer(Handler)

    def __enter__(self) -> str:
        self._server.start()
        return self._server.url

    def __exit__(self, *exc: object) -> None:
        self._server.stop()


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 that refuses connections: its port was bound, never listened
    on, and is released again."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))  # bound, not listening: refused
        return f"http://127.0.0.1:{bound.getsockname()[1]}"


@contextmanager
def hung_port() -> Iterator[int]:
    """A port on 127.0.0.1 that connects and never answers, as a SIGSTOPped or overloaded server:
    listening, never accepting (the kernel completes the handshake from the backlog)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]
