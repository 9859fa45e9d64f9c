"""The Prometheus provider against the real thing: Debian's Prometheus scraping a real Envoy.

Tiny upstreams answer behind Envoy (blue fails every 10th request); the provider's counts for a
window must equal, exactly, what Envoy itself counted on the weighted clusters over that window —
and the header-pinned requests sent meanwhile must not appear in them. Stopping Prometheus turns
the next observation into an error naming its URL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rollout.core.types import Colour, Weights
from rollout.local.envoy import EnvoyProcess
from rollout.local.prometheus import PrometheusProcess
from rollout.metrics.prometheus import PrometheusMetrics, envoy_preset
from rollout.routers.envoy import EnvoyRouter
from tests.local.upstream import ThreadUpstreams
from tests.routers.contract import RouterContract

pytestmark = pytest.mark.slow


class Rig:
    def __init__(self, workdir: Path) -> None:
        self.envoy = EnvoyProcess(workdir / "envoy").start()
        self.upstreams = ThreadUpstreams()
        self.router = EnvoyRouter(
            admin_url=self.envoy.admin_url,
            files=self.envoy.files,
            releases_file=workdir / "releases.json",
            workloads=self.upstreams,
        )
        self.prometheus = PrometheusProcess(
            workdir / "prometheus",
            envoy_admin=f"127.0.0.1:{self.envoy.admin_port}",
            targets_file=workdir / "targets.json",
        ).start()
        self.provider = PrometheusMetrics(self.prometheus.url, preset=envoy_preset())

    def envoy_counter(self, name: str) -> int:
        text = httpx.get(f"{self.envoy.admin_url}/stats", params={"filter": f"^{name}$"}).text
        return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if ":" in line)

    def close(self) -> None:
        self.provider.close()
        self.router.close()
        self.prometheus.stop()
        self.envoy.stop()
        self.upstreams.close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("live"))
    try:
        yield rig
    finally:
        rig.close()


def scraped_up_to(rig: Rig, moment: float, timeout_s: float = 15.0) -> None:
    """Wait until Prometheus holds an Envoy sample newer than `moment` plus one flush."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = rig.provider._query('timestamp(envoy_server_uptime{job="envoy"})', None)
        if result and float(result[0]["value"][1]) > moment + 1.2:
            return
        time.sleep(0.2)
    raise AssertionError("Prometheus did not scrape Envoy in time")


def test_counts_equal_envoys_own_counters_and_exclude_pinned(rig: Rig) -> None:
    RouterContract.live(rig.router, Weights.blue_at(50))
    rig.upstreams.of(Colour.BLUE).fail_every(10)
    since = time.time()
    # The step's counts start at its first scrape (nothing from before a step ever counts).
    scraped_up_to(rig, since)
    before = {
        c: (
            rig.envoy_counter(f"cluster.{c}.upstream_rq_completed"),
            rig.envoy_counter(f"cluster.{c}.upstream_rq_5xx"),
        )
        for c in ("blue", "green")
    }
    with httpx.Client(base_url=rig.envoy.url) as client:
        for i in range(400):
            client.post("/score", content=b"{}")
            if i % 4 == 0:
                client.post("/score", content=b"{}", headers={"x-api-version": "blue"})
    time.sleep(0.1)
    after = {
        c: (
            rig.envoy_counter(f"cluster.{c}.upstream_rq_completed"),
            rig.envoy_counter(f"cluster.{c}.upstream_rq_5xx"),
        )
        for c in ("blue", "green")
    }
    now = time.time()
    scraped_up_to(rig, now)

    observation = rig.provider.observe(since, now + 1.5)

    assert observation.error is None
    for colour in (Colour.BLUE, Colour.GREEN):
        sent = after[colour.value][0] - before[colour.value][0]
        failed = after[colour.value][1] - before[colour.value][1]
        counts = observation.of(colour)
        assert (counts.requests, counts.errors) == (sent, failed), colour
    assert observation.blue.requests + observation.green.requests == 400
    assert observation.blue.errors > 0 and observation.green.errors == 0
    # the histogram arrived too, in seconds, and covers every request
    assert observation.green.latency_buckets
    assert observation.green.latency_buckets[-1][1] == observation.green.requests


def test_no_traffic_is_zero_counts(rig: Rig) -> None:
    scraped_up_to(rig, time.time())
    now = time.time()
    observation = rig.provider.observe(now - 1, now)
    assert observation.error is None
    assert observation.blue.requests == observation.green.requests == 0


def test_stopped_prometheus_is_an_error_then_recovers(rig: Rig) -> None:
    rig.prometheus.stop()
    try:
        observation = rig.provider.observe(time.time() - 5, time.time())
        assert observation.error is not None and rig.prometheus.url in observation.error
        assert not rig.provider.is_online()
    finally:
        rig.prometheus.start()
    assert rig.provider.is_online()
