"""A new rollout (or a first release's check) whose metrics cannot be read deploys nothing.

Was: a spec with a wrong Prometheus URL deployed blue, sent it traffic, and only after
`max_consecutive_errors` unreadable looks held for a human (exit 4). Now the controller probes
the metrics before its first router action and stops with one line (exit 2), as it does for a
router nobody runs. A resumed rollout is not probed: it keeps guarding with its metrics down.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rollout.api import run_rollout
from rollout.commands.rollout import EXIT_ERROR
from rollout.config import PrometheusMetricsConfig, RolloutSpec
from rollout.controller import Controller, FakeClock
from rollout.core.types import Colour, Phase, Release, Weights
from rollout.errors import MetricsError
from rollout.ledger import Ledger
from rollout.metrics.prometheus import PrometheusMetrics, envoy_preset
from rollout.metrics.static import StaticMetrics
from rollout.routers.memory import MemoryRouter
from rollout.state.memory import MemoryStateStore
from tests.cli import run_cli
from tests.core.helpers import V1, V2, make_spec
from tests.engine.specs import write_spec
from tests.fakes.server import Answering, closed_port_url
from tests.metrics.fake_prometheus import FakePrometheus

STILL = " (check the spec's `metrics:`, or bring the backend up, and run again)"


@pytest.fixture
def prom() -> Iterator[FakePrometheus]:
    with FakePrometheus() as fake:
        yield fake


@pytest.fixture
def html_server() -> Iterator[str]:
    """A web server that is not Prometheus: a page for every GET."""
    with Answering(200, b"<html><body>welcome</body></html>") as url:
        yield url


#: Each case: the metrics URL (from the fixtures), and what the line says after "Prometheus at URL".
Case = Callable[[FakePrometheus, str], str]
WRONG_URLS: list[object] = [
    pytest.param(
        lambda prom, html: closed_port_url(),
        " is unreachable: connection refused",
        id="closed-port",
    ),
    pytest.param(
        lambda prom, html: f"{prom.url}/prometheus",
        " answered HTTP 404 (not found): no Prometheus query API at {url}/api/v1/query "
        "(metrics.url names the server's root)",
        id="wrong-path-404",
    ),
    pytest.param(
        lambda prom, html: html,
        ": not a Prometheus API answer to 'vector(1)' (not JSON)",
        id="not-prometheus",
    ),
]


def controller(
    url: str, router: MemoryRouter, store: MemoryStateStore, ledger: Ledger | None = None
) -> Controller:
    metrics = PrometheusMetrics(url, preset=envoy_preset(), timeout_s=1)
    return Controller(make_spec(), router, metrics, store, ledger=ledger, clock=FakeClock(100.0))


@pytest.mark.parametrize(
    "green", [pytest.param(None, id="fresh"), pytest.param(V1, id="green-serves")]
)
@pytest.mark.parametrize(("where", "says"), WRONG_URLS)
def test_a_new_rollout_with_unreadable_metrics_deploys_nothing(
    prom: FakePrometheus,
    html_server: str,
    tmp_path: Path,
    where: Case,
    says: str,
    green: Release | None,
) -> None:
    url = where(prom, html_server)
    router = MemoryRouter(releases={Colour.GREEN: green} if green else {})
    weights_before = router.get_weights() if green else None
    store = MemoryStateStore()
    ledger = Ledger(tmp_path / "ledger.jsonl")
    with pytest.raises(MetricsError) as refused:
        controller(url, router, store, ledger).run(stop_when_paused=True, max_ticks=20)
    assert str(refused.value) == (
        f"metrics unreadable, nothing deployed: Prometheus at {url}{says.format(url=url)}{STILL}"
    )
    assert (router.release(Colour.GREEN), router.release(Colour.BLUE)) == (green, None)
    if green:
        assert router.get_weights() == weights_before
    assert store.load() is None  # no rollout begun: the next `run` starts afresh
    assert not (tmp_path / "ledger.jsonl").exists()


def test_a_rollout_resumed_with_its_metrics_down_keeps_guarding(tmp_path: Path) -> None:
    # The probe is for beginning only: a running rollout must still hold, and roll back, when
    # Prometheus goes away under it.
    router = MemoryRouter(releases={Colour.GREEN: V1})
    store = MemoryStateStore()
    spec = make_spec(analysis={"max_consecutive_errors": 2, "on_inconclusive": "rollback"})
    started = Controller(spec, router, StaticMetrics([]), store, clock=FakeClock(100.0))
    status = started.run(max_ticks=1)
    assert (status.phase, router.release(Colour.BLUE)) == (Phase.PROGRESSING, V2)
    down = PrometheusMetrics(closed_port_url(), preset=envoy_preset(), timeout_s=1)
    resumed = Controller(spec, router, down, store, clock=FakeClock(200.0))
    status = resumed.run(max_ticks=20)
    assert status.phase is Phase.ROLLED_BACK
    assert "is unreachable: connection refused" in status.reason
    assert router.get_weights() == Weights.blue_at(0)


def test_a_reachable_prometheus_starts_the_rollout_after_one_trivial_query(
    prom: FakePrometheus,
) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    status = controller(prom.url, router, MemoryStateStore()).run(max_ticks=1)
    assert status.phase is Phase.PROGRESSING and router.release(Colour.BLUE) == V2
    assert prom.queries[0][0] == "vector(1)"
    assert all(query != "vector(1)" for query, _ in prom.queries[1:])


def test_a_first_release_check_with_unreadable_metrics_deploys_nothing(tmp_path: Path) -> None:
    url = closed_port_url()
    router = MemoryRouter()
    spec = make_spec(analysis={"errors": {"max_rate": 0.05}})
    metrics = PrometheusMetrics(url, preset=envoy_preset(), timeout_s=1)
    first = Controller(spec, router, metrics, MemoryStateStore(), clock=FakeClock(100.0))
    with pytest.raises(
        MetricsError, match=f"^metrics unreadable, nothing deployed: Prometheus at {url} is"
    ):
        first.bootstrap_checked(V1)
    assert router.release(Colour.GREEN) is None


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["run"], id="run"),
        pytest.param(["bootstrap", "--check", "--release", "m:1"], id="bootstrap-check"),
    ],
)
def test_the_cli_says_it_in_one_line_and_exits_2(
    prom: FakePrometheus, tmp_path: Path, command: list[str]
) -> None:
    url = f"{prom.url}/prometheus"
    routes = tmp_path / "routes.json"
    spec = write_spec(
        tmp_path,
        router={"kind": "memory", "state_file": str(routes)},
        metrics={"kind": "prometheus", "url": url, "timeout_s": 2},
        analysis={"min_requests": 100, "errors": {"max_rate": 0.05}},
    )
    done = run_cli("rollout", command[0], str(spec), *command[1:])
    assert done.returncode == EXIT_ERROR, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"error: metrics unreadable, nothing deployed: Prometheus at {url} answered HTTP 404 "
        f"(not found): no Prometheus query API at {url}/api/v1/query (metrics.url names the "
        f"server's root){STILL}"
    ]
    assert not routes.exists()  # the memory router never wrote a release or a weight
    # No rollout status (cli.status.json) nor ledger (cli.ledger.jsonl): only the lease lock.
    assert not list((tmp_path / "state").glob("*.json*"))


def test_specs_sharing_one_prometheus_config_each_probe_their_own_slo(
    prom: FakePrometheus, tmp_path: Path
) -> None:
    """Was: the SLO was written into the metrics config, which specs built from one config
    object share: the last spec's SLO was probed for all of them (a 300 ms SLO between two
    bounds passed; a spec measuring no SLO was refused for another's)."""
    t0 = time.time() - 10  # the probe reads the bounds of the last 5 minutes
    for colour in ("blue", "green"):
        for le in ("250", "500", "+Inf"):
            prom.add(
                "envoy_cluster_upstream_rq_time_bucket",
                {"envoy_cluster_name": colour, "le": le},
                [(t0, 0), (t0 + 1, 10)],
            )
    shared = PrometheusMetricsConfig(url=prom.url)

    def spec_measuring(slo_ms: float | None) -> RolloutSpec:
        latency = {"threshold": "slo", "slo_ms": slo_ms} if slo_ms else {"enabled": False}
        return make_spec(metrics=shared, analysis={"latency": latency})

    between, bound, none = spec_measuring(300), spec_measuring(250), spec_measuring(None)
    for spec, refused in ((between, True), (bound, False), (none, False)):
        router = MemoryRouter(releases={Colour.GREEN: V1})
        if refused:
            with pytest.raises(MetricsError, match="300 ms is no bound of the latency histogram"):
                run_rollout(spec, router=router, state_dir=tmp_path, max_ticks=1)
            assert router.release(Colour.BLUE) is None
        else:
            status = run_rollout(spec, router=router, state_dir=tmp_path, max_ticks=1).status
            assert status.phase is Phase.PROGRESSING, spec.analysis.latency
