"""A Prometheus (or a proxy before it) that drips its answer: each byte within the read timeout.

requests' timeout bounds each read of the socket, not the answer: a query whose bytes kept
trickling in never timed out, and held the tick (the rollback it might decide included) for as
long as the answer dripped. `metrics.timeout_s` bounds the whole query now: its body, and its
status line, headers, a chunk's size line and a gzip header too (these were read a socket read
at a time, each bounded alone, after the body's deadline was in place).
"""

from __future__ import annotations

import gzip
import io
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from rollout.errors import ProviderUnavailable
from rollout.metrics.prometheus import DEADLINE_THREAD, PrometheusMetrics, envoy_preset
from tests.fakes.server import LocalServer
from tests.fakes.tls import make_pki

T0 = 1_700_000_000.0
#: `vector(1)`'s answer, as the probe wants it.
ANSWER = json.dumps(
    {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": {}, "value": [T0, "1"]}]},
    }
).encode()


class Dripping:
    """Answers every query with `body`, `piece` bytes at a time, `pause` s apart, as one body of
    known length or in chunks (one per piece); `finished` is set once the last byte went out.
    """

    def __init__(
        self, body: bytes, *, piece: int, pause: float, chunked: bool, gzipped: bool = False
    ) -> None:
        self.finished = threading.Event()
        self.stopping = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # (chunked transfer encoding)

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if gzipped:
                    self.send_header("Content-Encoding", "gzip")
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for at in range(0, len(body), piece):
                        if at and fake.stopping.wait(pause):
                            return
                        data = body[at : at + piece]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                        self.wfile.flush()
                    if chunked:
                        self.wfile.write(b"0\r\n\r\n")
                    fake.finished.set()
                except OSError:
                    return  # the client gave up (what the deadline tests want)

            def log_message(self, *args: object) -> None:
                pass

        self._server = LocalServer(Handler)

    def __enter__(self) -> str:
        self._server.start()
        return self._server.url

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._server.stop()


@pytest.fixture(params=[False, True], ids=["content-length", "chunked"])
def chunked(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def dripping(chunked: bool) -> Iterator[tuple[Dripping, str]]:
    # 240 bytes, one every 50 ms: 12 s to the last, each read answered well within timeout_s.
    server = Dripping(b" " * (240 - len(ANSWER)) + ANSWER, piece=1, pause=0.05, chunked=chunked)
    with server as url:
        yield server, url


def test_a_query_dripping_its_answer_ends_at_timeout_s(dripping: tuple[Dripping, str]) -> None:
    server, url = dripping
    metrics = PrometheusMetrics(url, preset=envoy_preset(), timeout_s=0.5)
    observation = metrics.observe(T0 - 60, T0)
    # An Error tick, as for a hung Prometheus: a metrics outage, never counts read in part.
    assert (
        observation.error == f"Prometheus at {url} did not answer within 0.5 s (metrics.timeout_s)"
    )
    with pytest.raises(ProviderUnavailable, match=r"did not answer within 0\.5 s"):
        metrics.probe()
    assert not server.finished.is_set()  # given up on before its answer came whole
    metrics.close()


@pytest.mark.parametrize(
    "gzipped", [pytest.param(False, id="plain"), pytest.param(True, id="gzip")]
)
def test_an_answer_read_in_many_pieces_within_timeout_s_is_read_whole(
    chunked: bool, gzipped: bool
) -> None:
    body = gzip.compress(ANSWER) if gzipped else ANSWER
    server = Dripping(body, piece=7, pause=0.001, chunked=chunked, gzipped=gzipped)
    with server as url:
        metrics = PrometheusMetrics(url, preset=envoy_preset(), timeout_s=30)
        metrics.probe()  # vector(1) read back whole (and decoded): JSON cut short fails it
        metrics.close()


#: How long each dripped byte of an answer's head waits: 70 bytes of it take 7 s.
PAUSE_S = 0.1
#: A pad long enough that the drip far outlasts timeout_s (1 s).
PAD = b"a" * 60


def _gzipped_with_name(data: bytes) -> bytes:
    """`data` gzipped, its header carrying a long file name (FNAME): 70-odd bytes of header."""
    out = io.BytesIO()
    with gzip.GzipFile(filename=PAD.decode() + ".json", mode="wb", fileobj=out, mtime=0) as f:
        f.write(data)
    return out.getvalue()


_GZIPPED = _gzipped_with_name(ANSWER)
_HEADER_LEN = 10 + len(PAD) + len(".json") + 1  # gzip's fixed header, FNAME and its NUL

#: (sent at once, dripped a byte at a time, sent at once once the drip is done) per case: the
#: parts of an answer's head, and a body whose end only the connection's close says (cut off,
#: it ends there too: read whole, short).
DRIPS = [
    pytest.param(
        b"",
        b"HTTP/1.1 200 O" + b"K" * len(PAD) + b"\r\n",
        b"Content-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER),
        id="status-line",
    ),
    pytest.param(
        b"HTTP/1.1 200 OK\r\n",
        b"X-Pad: " + PAD + b"\r\n",
        b"Content-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER),
        id="headers",
    ),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"%x;pad=%s\r\n" % (len(ANSWER), PAD),
        ANSWER + b"\r\n0\r\n\r\n",
        id="chunk-size-line",
    ),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(_GZIPPED),
        _GZIPPED[:_HEADER_LEN],
        _GZIPPED[_HEADER_LEN:],
        id="gzip-header",
    ),
    pytest.param(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
        b" " * len(PAD),
        ANSWER,
        id="body-till-close",
    ),
]


class DrippingHead:
    """Answers its first query with `before` at once, `drip` a byte at a time `pause` s apart and
    then `after` at once; every later query (on any connection) gets `vector(1)`'s answer whole.
    `dripped` is set just before the drip's last byte goes out: a query that ended with it unset
    ended before it could have read what was dripped. `connections` counts the connections made.
    """

    def __init__(
        self,
        before: bytes,
        drip: bytes,
        after: bytes,
        *,
        pause: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.dripped = threading.Event()
        self.stopping = threading.Event()
        self.connections = 0
        self.queries = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                fake.connections += 1

            def do_GET(self) -> None:
                fake.queries += 1
                if fake.queries > 1:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(ANSWER)))
                    self.end_headers()
                    self.wfile.write(ANSWER)
                    return
                try:
                    self.wfile.write(before)
                    self.wfile.flush()
                    for at in range(len(drip)):
                        if fake.stopping.wait(pause):
                            return
                        if at == len(drip) - 1:
                            fake.dripped.set()
                        self.wfile.write(drip[at : at + 1])
                        self.wfile.flush()
                    self.wfile.write(after)
                    self.wfile.flush()
                except OSError:
                    self.close_connection = True  # the client gave up (what the tests want)

            def log_message(self, *args: object) -> None:
                pass

        self._server = LocalServer(Handler, tls)

    def __enter__(self) -> str:
        self._server.start()
        return self._server.url

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._server.stop()


def _deadline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == DEADLINE_THREAD]


@pytest.mark.parametrize(("before", "drip", "after"), DRIPS)
def test_a_query_dripping_its_head_ends_at_timeout_s(
    before: bytes, drip: bytes, after: bytes
) -> None:
    # Before: the head was read a socket read at a time, each within timeout_s, so the query
    # lasted as long as the drip (7 s here), and only its body was held to timeout_s. (A body
    # till the close was: the case checks that a body read to the end the cut made is refused.)
    server = DrippingHead(before, drip, after, pause=PAUSE_S)
    with server as url:
        metrics = PrometheusMetrics(url, preset=envoy_preset(), timeout_s=1)
        with pytest.raises(ProviderUnavailable, match=r"did not answer within 1 s"):
            metrics.probe()
        assert not server.dripped.is_set()  # given up on before the drip was done
        assert _deadline_threads() == []  # the thread that cut it off is gone with it
        # The connection cut off is never used again: the next query gets a new one.
        metrics.probe()
        assert server.connections == 2
        metrics.close()


@pytest.mark.parametrize(
    "client_cert", [pytest.param(False, id="tls"), pytest.param(True, id="mutual-tls")]
)
def test_a_query_over_tls_dripping_its_head_ends_at_timeout_s(
    tmp_path: Path, client_cert: bool
) -> None:
    # A TLS socket shut down under the read blocked in it: the read ends too (a client
    # certificate takes another transport, prometheus_auth.NoPassphraseAdapter).
    pki = make_pki(tmp_path)
    tls = pki.server_context(require_client_cert=client_cert)
    before, drip, after = DRIPS[0].values
    assert isinstance(before, bytes) and isinstance(drip, bytes) and isinstance(after, bytes)
    server = DrippingHead(before, drip, after, pause=PAUSE_S, tls=tls)
    cert = (str(pki.client_cert_file), str(pki.client_key_file)) if client_cert else None
    with server as url:
        metrics = PrometheusMetrics(
            url, preset=envoy_preset(), timeout_s=1, verify=str(pki.ca_file), cert=cert
        )
        with pytest.raises(ProviderUnavailable, match=r"did not answer within 1 s"):
            metrics.probe()
        assert not server.dripped.is_set()
        assert _deadline_threads() == []
        metrics.probe()
        assert server.connections == 2
        metrics.close()


def test_a_query_answered_in_time_leaves_no_thread_and_keeps_its_connection() -> None:
    server = DrippingHead(b"", b"", b"", pause=0)
    server.queries = 1  # every query answered whole, at once
    with server as url:
        metrics = PrometheusMetrics(url, preset=envoy_preset(), timeout_s=1)
        for _ in range(3):
            metrics.probe()
            assert _deadline_threads() == []  # cancelled and gone as the query returned
        assert (server.queries, server.connections) == (4, 1)  # one connection, kept
        metrics.close()
