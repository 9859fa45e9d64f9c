"""No other process can take a port of the local stack between its choice and its bind.

Was: `free_port()` bound port 0, closed it, and a child bound the port a moment later; with two
pytest-xdist workers, another worker's server took it in between, and a fresh-clone CI run
failed its e2e setup with "green not ready after 60 s (HTTP 404)" and an empty log: something
else answered on the scoring server's port. `Squatter` plays that other server: it binds the
port a child is about to serve on, if it still can (`tests.squatter`).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rollout.core.types import Colour
from rollout.errors import LocalStackError
from rollout.local import envoy as envoy_module
from rollout.local.envoy import EnvoyProcess
from rollout.local.process import wait_ready
from rollout.local.prometheus import PrometheusProcess
from rollout.local.workloads import ScoringProcesses
from tests.local.conftest import MakeRelease
from tests.squatter import Squatter, squat_first_start


@pytest.fixture
def squatter() -> Iterator[Squatter]:
    found = Squatter()
    yield found
    found.close()


@pytest.fixture
def squat_at_start(squatter: Squatter, monkeypatch: pytest.MonkeyPatch) -> Squatter:
    return squat_first_start(squatter, monkeypatch)


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
    make_release: MakeRelease, tmp_path: Path, squat_at_start: Squatter
) -> None:
    workloads = ScoringProcesses(tmp_path / "workloads", ready_timeout_s=30)
    try:
        endpoint = workloads.start(Colour.GREEN, make_release("1"))
        assert len(squat_at_start.tried) == 1 and squat_at_start.servers == []  # tried, failed
        ready = httpx.get(f"http://127.0.0.1:{endpoint.port}/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["version"] == "1"
    finally:
        workloads.stop_all()


@pytest.mark.slow
def test_envoy_binds_ports_nobody_could_take_first(
    tmp_path: Path, squat_at_start: Squatter
) -> None:
    with EnvoyProcess(tmp_path / "envoy") as envoy:
        assert squat_at_start.servers == []
        assert envoy.port and envoy.admin_port and envoy.port != envoy.admin_port
        assert httpx.get(f"{envoy.admin_url}/ready", timeout=5).text.strip() == "LIVE"
        assert "no healthy upstream" in httpx.get(f"{envoy.url}/score", timeout=5).text


@pytest.mark.slow
def test_a_given_envoy_port_another_envoy_holds_fails_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: the second Envoy started too (SO_REUSEPORT), and took part of the first's connections.
    with EnvoyProcess(tmp_path / "first") as first:
        # The port is taken after the check that it is free, before Envoy binds it.
        monkeypatch.setattr(envoy_module, "port_is_free", lambda port: True)
        second = EnvoyProcess(tmp_path / "second", port=first.port)
        message = f"listener port 127.0.0.1:{first.port} is already in use"
        with pytest.raises(LocalStackError, match=message):
            second.start()
        assert second.pid is None
        assert httpx.get(f"{first.admin_url}/ready", timeout=5).status_code == 200


def _prometheus(workdir: Path, port: int | None = None) -> PrometheusProcess:
    return PrometheusProcess(
        workdir, envoy_admin="127.0.0.1:9", targets_file=workdir / "targets.json", port=port
    )


def _flags(url: str) -> dict[str, str]:
    data: dict[str, str] = httpx.get(f"{url}/api/v1/status/flags", timeout=5).json()["data"]
    return data


@pytest.mark.slow
@pytest.mark.parametrize("status", [404, 200], ids=["answers-404", "answers-ready"])
def test_prometheus_moves_off_a_port_another_server_took(
    tmp_path: Path, squat_at_start: Squatter, status: int
) -> None:
    # A server answering 200 everywhere stands for another Prometheus: /-/ready alone passes.
    squat_at_start.status = status
    prometheus = _prometheus(tmp_path)
    taken = prometheus.port
    prometheus.start(ready_timeout_s=10)
    try:
        assert squat_at_start.tried[0] == taken and len(squat_at_start.servers) == 1
        assert prometheus.port != taken
        assert _flags(prometheus.url)["config.file"] == str(prometheus.config_path)
    finally:
        prometheus.stop()


@pytest.mark.slow
def test_prometheus_on_a_given_port_another_server_holds_says_so(
    tmp_path: Path, squatter: Squatter
) -> None:
    squatter.status = 200
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert squatter.take(port)
    prometheus = _prometheus(tmp_path, port=port)
    started = time.monotonic()
    with pytest.raises(
        LocalStackError, match=f"listen on 127.0.0.1:{port}: the port is held by another"
    ):
        prometheus.start(ready_timeout_s=10)
    assert prometheus.pid is None and prometheus.port == port
    assert time.monotonic() - started < 5
