"""A Prometheus (or a proxy before it) that drips its answer: each byte within the read timeout.

requests' timeout bounds each read of the socket, not the answer: a query whose bytes kept
trickling in never timed out, and held the tick (the rollback it might decide included) for as
long as the answer dripped. `metrics.timeout_s` bounds the whole query now.
"""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from rollout.errors import ProviderUnavailable
from rollout.metrics.prometheus import PrometheusMetrics, envoy_preset
from tests.fakes.server import LocalServer

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
