"""In-process metrics sources: scripted (`static`) and simulated (`simulated`).

- `StaticMetrics` returns scripted observations in order (the last one repeats): tests and dry
  runs that need exact counts, outages (`error`) and no-traffic periods.
- `SimulatedMetrics` generates seeded synthetic traffic split by the weights the router actually
  serves, one vectorised draw per elapsed interval (Poisson arrivals, binomial split and errors,
  multinomial latency histogram from a lognormal) — never one request at a time, so the benchmark
  runs thousands of rollouts in minutes. It honours the MetricsProvider contract: cumulative
  counts between `since` and `now`, only default-route traffic.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from scipy.special import ndtr

from rollout.config import (
    ENVOY_BUCKETS_MS,
    SimulatedMetricsConfig,
    StaticMetricsConfig,
    StaticTick,
    TickCounts,
    TrafficModel,
)
from rollout.core.types import ColourCounts, Observation
from rollout.routers.base import TrafficRouter


def _counts(counts: TickCounts) -> ColourCounts:
    return ColourCounts(
        requests=counts.requests,
        errors=counts.errors,
        latency_buckets=tuple(counts.latency_buckets),
    )


class StaticMetrics:
    """Scripted observations, one per `observe` call; the last repeats forever."""

    def __init__(self, ticks: list[StaticTick], history: StaticTick | None = None) -> None:
        self._ticks = ticks
        self._history = history
        self._next = 0
        self.calls = 0

    @classmethod
    def from_config(
        cls, cfg: StaticMetricsConfig, router: TrafficRouter | None = None
    ) -> StaticMetrics:
        """Build from the spec's metrics section (the router is not needed)."""
        return cls(list(cfg.ticks), cfg.history)

    def observe(self, since: float, now: float) -> Observation:
        """The next scripted observation (an empty one when nothing is scripted)."""
        self.calls += 1
        if not self._ticks:
            return Observation(since=since, at=now)
        tick = self._ticks[min(self._next, len(self._ticks) - 1)]
        self._next += 1
        return _observation(tick, since, now)

    def history(self, since: float, now: float) -> Observation:
        """The scripted counts before the rollout (an empty observation when none)."""
        if self._history is None:
            return Observation(since=since, at=now)
        return _observation(self._history, since, now)

    def probe(self) -> None:
        """Nothing to reach: no tick is handed out (a scripted outage is one of the ticks)."""


def _observation(tick: StaticTick, since: float, now: float) -> Observation:
    return Observation(
        since=since, at=now, blue=_counts(tick.blue), green=_counts(tick.green), error=tick.error
    )


class TrafficBehaviour:
    """Per-request probabilities of one traffic model: error rate and latency bucket masses."""

    def __init__(self, model: TrafficModel, bounds_s: NDArray[np.float64]) -> None:
        self.error_rate = model.error_rate
        median_s = model.latency_ms.median / 1000.0
        sigma = model.latency_ms.sigma
        if sigma > 0:
            cdf = ndtr((np.log(bounds_s) - np.log(median_s)) / sigma)
        else:
            cdf = (bounds_s >= median_s).astype(float)
        self.cdf = np.asarray(cdf, dtype=float)
        # Mass of each (previous bound, bound] interval, plus the tail above the last bound.
        self.masses = np.diff(np.concatenate(([0.0], self.cdf, [1.0])))
        self.masses = np.clip(self.masses, 0.0, 1.0)
        self.masses /= self.masses.sum()


def rate_profile(rps: float | Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """A constant rate, or [t_seconds, rps] points, as a sorted step profile."""
    return [(0.0, float(rps))] if isinstance(rps, int | float) else sorted(rps)


def rate_at(profile: Sequence[tuple[float, float]], t: float) -> float:
    """The rate of a sorted step profile at `t` (before its first point: the first point's)."""
    i = bisect.bisect_right([point[0] for point in profile], t) - 1
    return float(profile[max(i, 0)][1])


def expected_requests(
    rps: float | Sequence[tuple[float, float]], t0: float, t1: float, *, origin: float = 0.0
) -> float:
    """Requests expected between `t0` and `t1`: the rate integrated, so a step inside counts.
    The profile's times count from `origin`."""
    profile = rate_profile(rps)
    edges = [t0, *(origin + t for t, _ in profile if t0 < origin + t < t1), t1]
    # Each piece at its midpoint's rate: `origin + t - origin` need not give `t` back exactly.
    return sum(
        rate_at(profile, (a + b) / 2 - origin) * max(b - a, 0.0)
        for a, b in itertools.pairwise(edges)
    )


class SimulatedMetrics:
    """Synthetic traffic generated lazily up to each `observe(since, now)`."""

    def __init__(
        self,
        cfg: SimulatedMetricsConfig,
        router: TrafficRouter,
        *,
        start: float | None = None,
        seed: int | None = None,
    ) -> None:
        self._router = router
        self._seed = cfg.seed if seed is None else seed
        self._rng = np.random.default_rng(self._seed)
        self._profile = rate_profile(cfg.rps)
        self.bounds_s = np.asarray(cfg.buckets_ms or ENVOY_BUCKETS_MS, dtype=float) / 1000.0
        self._baseline = TrafficBehaviour(cfg.baseline, self.bounds_s)
        canary = cfg.canary or cfg.baseline
        self._canary = TrafficBehaviour(canary, self.bounds_s)
        self._canary_from = canary.from_s
        # Traffic starts at `start`, or at the first observation when not given.
        self._start = start
        width = 2 + len(self.bounds_s)  # requests, errors, cumulative bucket counts
        # Cumulative counts per colour at each generated time point (row 0 = start).
        self._times: list[float] = [] if start is None else [start]
        self._cum: list[tuple[NDArray[np.int64], NDArray[np.int64]]] = [
            (np.zeros(width, dtype=np.int64), np.zeros(width, dtype=np.int64))
        ]
        self.canary_bad = 0  # errors served by blue so far (for the benchmark's harm measure)
        self.mirrored_bad = 0  # errors blue answered to mirrored copies (never served)

    @classmethod
    def from_config(
        cls, cfg: SimulatedMetricsConfig, router: TrafficRouter | None = None
    ) -> SimulatedMetrics:
        """Build from the spec; the simulation needs the router to split traffic by weight."""
        if router is None:
            raise ValueError("the simulated metrics source needs the router")
        return cls(cfg, router)

    def reseed(self, stream: int) -> None:
        """Draw from stream `stream` of the seed (0 is the seed itself), reproducibly."""
        self._rng = np.random.default_rng([self._seed, stream] if stream else self._seed)

    def rps_at(self, t: float) -> float:
        """Total request rate at simulated time `t` (seconds since start)."""
        return rate_at(self._profile, t)

    def _draw(self, n: int, behaviour: TrafficBehaviour) -> NDArray[np.int64]:
        out = np.zeros(2 + len(self.bounds_s), dtype=np.int64)
        if n <= 0:
            return out
        out[0] = n
        out[1] = self._rng.binomial(n, behaviour.error_rate)
        per_bucket = self._rng.multinomial(n, behaviour.masses)
        out[2:] = np.cumsum(per_bucket[:-1])
        return out

    def advance(self, now: float) -> None:
        """Generate traffic from the last generated point up to `now` at the served weights."""
        if self._start is None:
            self._start = now
            self._times.append(now)
            return
        last = self._times[-1]
        if now <= last:
            return
        t_rel = last - self._start
        # The profile integrated over the tick, as Flagger's simulation draws its intervals.
        expected = expected_requests(self._profile, last, now, origin=self._start)
        total = int(self._rng.poisson(expected))
        weights = self._router.get_weights()
        n_blue = int(self._rng.binomial(total, weights.blue / 100.0)) if total else 0
        # A shadow: blue also answers a copy of `mirror` % of the requests; nobody sees those.
        n_mirror = (
            int(self._rng.binomial(total, weights.mirror / 100.0))
            if total and weights.mirror
            else 0
        )
        canary = self._canary if t_rel >= self._canary_from else self._baseline
        blue = self._draw(n_blue, canary)
        green = self._draw(total - n_blue, self._baseline)
        self.canary_bad += int(blue[1])
        if n_mirror:
            mirrored = self._draw(n_mirror, canary)
            self.mirrored_bad += int(mirrored[1])
            blue = blue + mirrored
        cum_b, cum_g = self._cum[-1]
        self._times.append(now)
        self._cum.append((cum_b + blue, cum_g + green))

    def _at(self, t: float) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        # Before the first point there was no traffic: row 0 holds zeros.
        i = bisect.bisect_right(self._times, t) - 1
        return self._cum[max(i, 0)]

    def _colour(self, row: NDArray[np.int64]) -> ColourCounts:
        buckets = tuple(zip(self.bounds_s.tolist(), row[2:].tolist(), strict=True))
        return ColourCounts(requests=int(row[0]), errors=int(row[1]), latency_buckets=buckets)

    def observe(self, since: float, now: float) -> Observation:
        """Counts per colour between `since` and `now`.

        Without a `start`, traffic flows from the first window's start, drawn afresh in this
        process: the first observation says so (`fresh_series`), so a rollout resumed mid-step
        does not take its counts for an increase over counts another process drew.
        """
        fresh = self._start is None
        if fresh:
            self.advance(since)
        self.advance(now)
        b0, g0 = self._at(since)
        b1, g1 = self._at(now)
        return Observation(
            since=since,
            at=now,
            blue=self._colour(b1 - b0),
            green=self._colour(g1 - g0),
            fresh_series=fresh,
        )

    def history(self, since: float, now: float) -> Observation:
        """Traffic before the rollout: green alone, at the profile's first rate, drawn afresh."""
        if self._start is not None:
            now = min(now, self._start)
        total = int(self._rng.poisson(self.rps_at(0.0) * max(now - since, 0.0)))
        return Observation(
            since=since, at=now, green=self._colour(self._draw(total, self._baseline))
        )

    def probe(self) -> None:
        """Nothing to reach; draws nothing, so a seeded run's traffic stays the same."""
