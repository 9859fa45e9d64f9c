"""The Prometheus provider against the real thing: Debian's Prometheus scraping a real Envoy.

Tiny upstreams answer behind Envoy (blue fails every 10th request); the provider's counts for a
window must equal, exactly, what Envoy itself counted on the weighted clusters over that window —
and the header-pinned requests sent meanwhile must not appear in them. Stopping Prometheus turns
the next observation into an error naming its URL. A step that begins while a failed scrape has
marked Envoy's series stale counts only its own traffic, not the counters' whole history; so
does one during which Prometheus started on empty storage.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest

from rollout.config import PromQueries
from rollout.core.types import Colour, Weights
from rollout.errors import MetricsError
from rollout.local.envoy import EnvoyProcess
from rollout.local.prometheus import PrometheusProcess
from rollout.metrics import prometheus
from rollout.metrics.prometheus import PrometheusMetrics, envoy_preset
from rollout.routers.envoy import EnvoyRouter
from tests.fakes.server import LocalServer
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
        with pytest.raises(MetricsError, match="is unreachable: connection refused"):
            rig.provider.probe()
    finally:
        rig.prometheus.start()
    rig.provider.probe()


class ScrapeTarget:
    """Envoy-named counters at /stats/prometheus, set by the test; `failing` answers 500."""

    def __init__(self, counters: dict[str, int]) -> None:
        self.counters = counters
        self.failing = threading.Event()
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if target.failing.is_set():
                    self.send_response(500)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                body = "".join(f"{k} {v}\n" for k, v in target.counters.items()).encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain; version=0.0.4")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = LocalServer(Handler)

    @property
    def address(self) -> str:
        return self.server.url.removeprefix("http://")


def wait_until(query: str, accept: Callable[[float], bool], provider: PrometheusMetrics) -> None:
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        result = provider._query(query, None)
        if result and accept(float(result[0]["value"][1])):
            return
        time.sleep(0.1)
    raise AssertionError(f"Prometheus never answered {query!r} as wanted")


@contextmanager
def scraping(
    tmp_path: Path, counters: dict[str, int]
) -> Iterator[tuple[ScrapeTarget, PrometheusMetrics]]:
    """A real Prometheus scraping a ScrapeTarget with `counters`, up; yields it and a provider."""
    target = ScrapeTarget(counters)
    target.server.start()
    prometheus = PrometheusProcess(
        tmp_path, envoy_admin=target.address, targets_file=tmp_path / "targets.json"
    )
    provider = PrometheusMetrics(prometheus.url, preset=envoy_preset())
    try:
        prometheus.start()
        wait_until('up{job="envoy"}', lambda up: up == 1, provider)
        yield target, provider
    finally:
        provider.close()
        prometheus.stop()
        target.server.stop()


REQUESTS = 'envoy_cluster_upstream_rq_completed{envoy_cluster_name="blue"}'
ERRORS = 'envoy_cluster_upstream_rq_xx{envoy_cluster_name="blue",envoy_response_code_class="5"}'


def scraped_after(moment: float, provider: PrometheusMetrics) -> None:
    """Wait for a scrape of blue's requests after `moment`."""
    # (timestamp() of a selector, not of an expression: only a selector keeps the sample's)
    wait_until(f"timestamp({REQUESTS})", lambda t: t > moment, provider)


#: The same counters through the custom preset, as a spec would write them.
CUSTOM = PromQueries(
    requests='envoy_cluster_upstream_rq_completed{envoy_cluster_name="{colour}"}',
    errors='envoy_cluster_upstream_rq_xx{envoy_cluster_name="{colour}",envoy_response_code_class="5"}',
)


def reading(provider: PrometheusMetrics, preset: str) -> PrometheusMetrics:
    """`provider`, or one reading its Prometheus through the custom preset's CUSTOM queries."""
    return provider if preset == "envoy" else PrometheusMetrics(provider.url, queries=CUSTOM)


def failing_across_a_step_start(
    target: ScrapeTarget, provider: PrometheusMetrics, preset: str, failing_s: float
) -> tuple[int, int]:
    """Blue's (requests, errors) over a step that begins while Envoy's scrapes have failed for
    `failing_s` (at least one scrape) and ends after 10 requests of its own."""
    target.failing.set()
    wait_until('up{job="envoy"}', lambda up: up == 0, provider)  # series marked stale
    time.sleep(failing_s)
    since = time.time()
    target.failing.clear()
    scraped_after(since, provider)
    target.counters[REQUESTS] += 10  # the step's own traffic, after its first scrape
    scraped_after(time.time(), provider)
    observation = reading(provider, preset).observe(since, time.time())
    assert observation.error is None
    return observation.blue.requests, observation.blue.errors


@pytest.mark.parametrize("preset", ["envoy", "custom"])
def test_a_failed_scrape_as_the_step_begins_counts_only_the_steps_traffic(
    tmp_path: Path, preset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Envoy's counters after a previous rollout whose canary failed.
    with scraping(tmp_path, {REQUESTS: 50_000, ERRORS: 9_000}) as (target, provider):
        assert failing_across_a_step_start(target, provider, preset, 0) == (10, 0)
        # Scrapes failing for all of the lookback (5 minutes, shrunk to 2 s here): no sample of
        # Envoy's series there, only `up` 0. They are not new: counted from 0, each charged
        # the step with its whole history (50 020 requests and 9 000 errors).
        monkeypatch.setattr(prometheus, "LOOKBACK_S", 2)
        assert failing_across_a_step_start(target, provider, preset, 3) == (10, 0)


@pytest.mark.parametrize("preset", ["envoy", "custom"])
def test_a_failed_scrape_at_the_tick_keeps_the_steps_counts(tmp_path: Path, preset: str) -> None:
    with scraping(tmp_path, {REQUESTS: 50_000}) as (target, provider):
        since = time.time()
        scraped_after(since, provider)
        target.counters[REQUESTS] += 10
        scraped_after(time.time(), provider)
        target.failing.set()
        wait_until('up{job="envoy"}', lambda up: up == 0, provider)  # series marked stale
        observation = reading(provider, preset).observe(since, time.time())

    assert observation.error is None
    assert observation.blue.requests == 10


def test_a_prometheus_started_empty_during_the_step_counts_only_the_steps_traffic(
    tmp_path: Path,
) -> None:
    # Prometheus restarted on empty storage after the step began (an emptyDir): it holds nothing
    # from before `since`, while Envoy's counters hold the previous rollout's failed canary.
    since = time.time()
    with scraping(tmp_path, {REQUESTS: 50_000, ERRORS: 9_000}) as (target, provider):
        target.counters[REQUESTS] += 10  # after the first scrape: the step's own traffic
        scraped_after(time.time(), provider)
        observation = provider.observe(since, time.time())

    assert observation.error is None
    assert (observation.blue.requests, observation.blue.errors) == (10, 0)


BUCKET = 'envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name="blue",le="{le}"}}'


def test_a_counter_restarted_mid_step_is_summed_piece_by_piece(tmp_path: Path) -> None:
    # The custom preset compared `since` with `now` only: 110 → 10 → 150 read as 50 (or, below
    # the base, dropped the traffic before the restart). The probe, on the same Prometheus,
    # refuses a query it cannot parse and an SLO between two bucket bounds.
    buckets = {BUCKET.format(le=le): 0 for le in ("250", "500", "+Inf")}
    with scraping(tmp_path, {REQUESTS: 100, **buckets}) as (target, provider):
        since = time.time()
        for value in (110, 10, 150):  # +10, restarted with 10 served, +140
            for _ in range(2):  # two scrapes: a point of the subquery's 1 s grid sees it
                scraped_after(time.time(), provider)
            target.counters[REQUESTS] = value
        for _ in range(2):
            scraped_after(time.time(), provider)
        now = time.time()
        observations = {p: reading(provider, p).observe(since, now) for p in ("envoy", "custom")}
        slo = PrometheusMetrics(provider.url, preset=envoy_preset(), slo_ms=300)
        with pytest.raises(MetricsError, match="set slo_ms to 250 or 500"):
            slo.probe()
        typo = PromQueries(
            requests='envoy_cluster_upstream_rq_completed{x="{colour}"', errors='y{x="{colour}"}'
        )
        with pytest.raises(MetricsError, match=r"answered HTTP 400 .* parse error"):
            PrometheusMetrics(provider.url, queries=typo).probe()

    for observation in observations.values():
        assert observation.error is None
        assert observation.blue.requests == 10 + 10 + 140
