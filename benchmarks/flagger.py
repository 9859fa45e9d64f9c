"""A Flagger-equivalent canary policy, simulated on the same traffic model as our engine.

Flagger's built-in checks as its docs configure them: every `interval` (60 s) it evaluates the
canary over the last window — request success rate >= 99 % and P99 latency <= 500 ms (estimated
from the histogram like PromQL's `histogram_quantile`). A failing check (including "no values",
i.e. no canary traffic) increments a failure counter that never resets; at `threshold` (5) it
rolls back. Passing checks advance the weight by `step` (10 %) up to `max_weight` (50 %), after
which a passing check promotes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from rollout.config import SimulatedMetricsConfig, TrafficModel
from rollout.metrics.static import TrafficBehaviour, expected_requests


@dataclass(frozen=True)
class FlaggerPolicy:
    interval_s: float = 60.0
    threshold: int = 5
    min_success: float = 0.99
    max_p99_ms: float = 500.0
    step: int = 10
    max_weight: int = 50


@dataclass(frozen=True)
class Outcome:
    decision: str  # "rollback" | "promote" | "none"
    decided_at: float | None
    canary_requests: int  # canary requests served from the regression's onset to the decision
    bad_canary: float  # canary errors served within the horizon (see analysis.py)
    mirrored_bad: int = 0  # canary errors answered to mirrored copies, never served


def errors_after(
    rps: float | list[tuple[float, float]],
    baseline: TrafficModel,
    canary: TrafficModel,
    t: float,
    horizon: float,
) -> float:
    """The candidate's errors expected from a promotion at `t` to the horizon, serving all
    traffic: at the baseline's rate until the regression's onset (`from_s`), its own after."""
    onset = min(max(t, canary.from_s), horizon)
    before = expected_requests(rps, t, onset) * baseline.error_rate
    return before + expected_requests(rps, onset, horizon) * canary.error_rate


def _p99_ms(bounds_ms: NDArray[np.float64], per_bucket: NDArray[np.int64]) -> float:
    """histogram_quantile(0.99) with linear interpolation inside the bucket."""
    total = per_bucket.sum()
    if total == 0:
        return float("nan")
    cum = np.cumsum(per_bucket)
    rank = 0.99 * total
    i = int(np.searchsorted(cum, rank))
    if i >= len(bounds_ms):
        return float(bounds_ms[-1])
    lo = 0.0 if i == 0 else bounds_ms[i - 1]
    below = 0 if i == 0 else cum[i - 1]
    inside = per_bucket[i]
    return float(lo + (bounds_ms[i] - lo) * (rank - below) / inside) if inside else float(lo)


def simulate(
    cfg: SimulatedMetricsConfig,
    duration_s: float,
    rng: np.random.Generator,
    policy: FlaggerPolicy = FlaggerPolicy(),
) -> Outcome:
    """One Flagger rollout on synthetic traffic; counts drawn per interval, never per request."""
    bounds_s = np.asarray(cfg.buckets_ms, dtype=float) / 1000.0
    bounds_ms = np.asarray(cfg.buckets_ms, dtype=float)
    base = TrafficBehaviour(cfg.baseline, bounds_s)
    canary_model = cfg.canary or cfg.baseline
    canary = TrafficBehaviour(canary_model, bounds_s)
    weight, failed, t = policy.step, 0, 0.0
    served, bad = 0, 0
    while t + policy.interval_s <= duration_s:
        behaviour = canary if t >= canary_model.from_s else base
        # The interval's expected requests: the profile integrated (a step inside it counts).
        expected = expected_requests(cfg.rps, t, t + policy.interval_s)
        n = int(rng.poisson(expected * weight / 100.0))
        errors = int(rng.binomial(n, behaviour.error_rate)) if n else 0
        served += n if behaviour is canary else 0  # the sample of the regression, from its onset
        bad += errors
        t += policy.interval_s
        ok = n > 0
        if ok:
            per_bucket = rng.multinomial(n, behaviour.masses)[:-1]
            per_bucket = np.append(per_bucket, n - per_bucket.sum())
            ok = (1 - errors / n) >= policy.min_success and _p99_ms(
                np.append(bounds_ms, np.inf), per_bucket
            ) <= policy.max_p99_ms
        if not ok:
            failed += 1
            if failed >= policy.threshold:
                return Outcome("rollback", t, served, float(bad))
            continue
        if weight >= policy.max_weight:
            after = errors_after(cfg.rps, cfg.baseline, canary_model, t, duration_s)
            return Outcome("promote", t, served, bad + after)
        weight += policy.step
    return Outcome("none", None, served, float(bad))
