"""The simulated metrics source: traffic split by the weights the router serves, shadow included."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rollout.config import SimulatedMetricsConfig, StaticTick, TrafficModel
from rollout.core.types import Colour, Observation, Release, Weights
from rollout.metrics.static import SimulatedMetrics, StaticMetrics
from rollout.routers.memory import MemoryRouter

V1, V2 = Release(model="m", version="1"), Release(model="m", version="2")


def simulate(weights: Weights, seconds: float = 1000.0) -> tuple[SimulatedMetrics, Observation]:
    router = MemoryRouter(releases={Colour.GREEN: V1, Colour.BLUE: V2})
    router.set_weights(weights)
    cfg = SimulatedMetricsConfig(
        seed=3, rps=100, baseline=TrafficModel(error_rate=0.0), canary=TrafficModel(error_rate=0.1)
    )
    metrics = SimulatedMetrics(cfg, router, start=0.0)
    return metrics, metrics.observe(0.0, seconds)


def test_a_mirror_copies_requests_to_blue_and_serves_none_of_its_answers() -> None:
    metrics, seen = simulate(Weights.blue_at(0, mirror=20))
    assert seen.green.requests == pytest.approx(100_000, rel=0.02)  # green still serves all
    assert seen.blue.requests == pytest.approx(20_000, rel=0.03)  # and blue answers 20 % copies
    assert seen.blue.errors == pytest.approx(2_000, rel=0.1)  # which the judge sees
    assert metrics.canary_bad == 0  # but no user was served
    assert metrics.mirrored_bad == seen.blue.errors


def test_live_weights_serve_blue_answers() -> None:
    metrics, seen = simulate(Weights.blue_at(20))
    assert seen.green.requests == pytest.approx(80_000, rel=0.02)
    assert metrics.canary_bad == seen.blue.errors > 0
    assert metrics.mirrored_bad == 0


def test_without_a_start_the_first_observation_says_its_series_is_fresh() -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1, Colour.BLUE: V2})
    cfg = SimulatedMetricsConfig(seed=3, rps=100)
    metrics = SimulatedMetrics(cfg, router)
    assert metrics.observe(100.0, 110.0).fresh_series  # drawn afresh in this process
    assert not metrics.observe(100.0, 120.0).fresh_series  # then it goes on
    assert not SimulatedMetrics(cfg, router, start=0.0).observe(0.0, 10.0).fresh_series


def test_a_reseeded_source_draws_other_traffic_reproducibly() -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1, Colour.BLUE: V2})
    cfg = SimulatedMetricsConfig(seed=3, rps=100, baseline=TrafficModel(error_rate=0.05))

    def green_errors(stream: int) -> list[int]:
        metrics = SimulatedMetrics(cfg, router, start=0.0)
        metrics.reseed(stream)
        return [metrics.observe(0.0, t).green.errors for t in (10.0, 20.0, 30.0)]

    assert green_errors(0) == green_errors(0)
    assert green_errors(7) == green_errors(7)
    assert green_errors(7) != green_errors(0)


@pytest.mark.parametrize("rps", [-5, float("inf"), "x", True, [], [[0, -1]], [[0, 5, 1]], [5]])
def test_a_bad_simulated_rate_is_refused_naming_the_field(rps: object) -> None:
    # A negative rate was accepted, and the dry run crashed with a traceback in numpy.
    with pytest.raises(ValidationError, match="expected requests per second"):
        SimulatedMetricsConfig(rps=rps)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rps", "at_90"), [(0, 0.0), (2.5, 2.5), ([[0, 5], [60, 10]], 10.0), ([(0, 5)], 5.0)]
)
def test_simulated_rates_and_profiles_are_accepted(rps: object, at_90: float) -> None:
    cfg = SimulatedMetricsConfig(rps=rps)  # type: ignore[arg-type]
    assert SimulatedMetrics(cfg, MemoryRouter()).rps_at(90.0) == at_90


def test_the_probe_draws_nothing() -> None:
    # The controller probes before a new rollout; the analysis benchmark drives the controller
    # on seeded simulations, whose outcomes must not depend on it.
    router = MemoryRouter(releases={Colour.GREEN: V1, Colour.BLUE: V2})
    router.set_weights(Weights.blue_at(20))
    cfg = SimulatedMetricsConfig(seed=3, rps=100, canary=TrafficModel(error_rate=0.1))
    probed, plain = SimulatedMetrics(cfg, router), SimulatedMetrics(cfg, router)
    probed.probe()
    assert [probed.observe(t, t + 10) for t in (0.0, 10.0)] == [
        plain.observe(t, t + 10) for t in (0.0, 10.0)
    ]
    assert probed.history(-60, 0) == plain.history(-60, 0)


def test_the_probe_hands_out_no_scripted_tick() -> None:
    ticks = [StaticTick(error="down"), StaticTick()]
    metrics = StaticMetrics(ticks)
    metrics.probe()  # a scripted outage is a tick's, not the probe's
    assert metrics.observe(0.0, 1.0).error == "down"
    assert metrics.observe(1.0, 2.0).error is None


@pytest.mark.parametrize(
    ("rps", "expected"),
    [
        # A burst inside a 10 s tick: drawn at the tick's start rate it was lost (615 requests).
        pytest.param(
            [(0, 10), (5, 1000), (9, 10)], 10 * 5 + 1000 * 4 + 10 * 51, id="burst-in-a-tick"
        ),
        pytest.param([(0, 0), (25, 100)], 100 * 35, id="traffic-from-mid-tick"),
    ],
)
def test_each_tick_draws_the_profiles_requests_over_its_interval(
    rps: list[tuple[float, float]], expected: float
) -> None:
    cfg = SimulatedMetricsConfig(seed=1, rps=rps)
    metrics = SimulatedMetrics(cfg, MemoryRouter(releases={Colour.GREEN: V1}), start=0.0)
    for t in range(10, 61, 10):  # the controller's ticks
        metrics.advance(float(t))
    seen = metrics.observe(0.0, 60.0)
    assert seen.green.requests == pytest.approx(expected, rel=0.1)
