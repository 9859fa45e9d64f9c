"""A Prometheus that accepts connections but never answers (stopped with SIGSTOP, overloaded)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from rollout.metrics.prometheus import PrometheusMetrics, envoy_preset
from tests.fakes.server import hung_port


@pytest.fixture
def hung_url() -> Iterator[str]:
    # The client connects, then waits for an answer that never comes — as with a SIGSTOPped
    # Prometheus on the live stack.
    with hung_port() as port:
        yield f"http://127.0.0.1:{port}"


def test_a_hung_prometheus_is_a_timeout_not_unreachable(hung_url: str) -> None:
    # Was "Prometheus at URL is unreachable: ConnectionError": the operator found the port open.
    metrics = PrometheusMetrics(hung_url, preset=envoy_preset(), timeout_s=0.3)
    started = time.monotonic()
    obs = metrics.observe(time.time() - 10, time.time())
    assert obs.error == f"Prometheus at {hung_url} did not answer within 0.3 s (metrics.timeout_s)"
    assert time.monotonic() - started < 5


def test_a_closed_port_is_still_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"  # bound, not listening: refused
        obs = PrometheusMetrics(url, preset=envoy_preset(), timeout_s=0.3).observe(
            time.time() - 10, time.time()
        )
    assert obs.error == f"Prometheus at {url} is unreachable: connection refused"
