"""The references a judge is measured against: Wald's SPRT, and the test that is told the answer.

**Wald's SPRT** (`sprt_expected_n`): the two-sided sequential probability ratio test of the
canary's bad rate against the baseline's, both known, at α = 0.05 and β = 0.2, fed every canary
request. Its expected number of canary requests under the regression is the benchmark's `Wald`:
18, 186, 583 and 5,408 for 50×, 10×, 5× and 2× on a 0.1 % base rate, the numbers ANCHORS.md
quotes (it says 187 and 5,420). Computed exactly (the law of the undecided paths, request by
request), not with Wald's approximation (`rollout.core.stats.wald_expected_n`: 13, 136, 470,
4,929), which assumes the log ratio lands exactly on a boundary. Here a bad request moves it by
ln θ — 3.9 nats at 50×, more than the upper boundary's ln 16 = 2.8 — so the real test
overshoots, and needs more.

**The oracle** (`simulate`): Wald's SPRT may stop early *accepting* "no regression" (β = 0.2); a
rollout judge cannot: it must keep looking until it rolls back (power one), at level α over the
whole rollout. The oracle is the best such test when everything is known: the likelihood-ratio
test of the canary's true bad rate against the baseline's, both given, fed every canary request
one by one (no ticks, no baseline traffic to learn from, no other check sharing α), rolling back
when the ratio reaches 1/α — a mixture SPRT whose mixture is a single point at the truth. Its
E[N] / Wald is what the benchmark's `EN/Wald` column would read for a perfect judge of this
kind. Runs per request in closed form: the log ratio rises only at bad requests, so it can first
reach 1/α only at one, and the gaps between bad requests are geometric.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

#: Give up after this many canary requests (never reached by the default scenarios).
MAX_REQUESTS = 10**8


@dataclass(frozen=True)
class OracleRun:
    canary_requests: int  # canary requests served until the oracle rolls back (or gives up)
    bad: int  # bad events (errors, or slow requests for a latency regression) among them
    rolled_back: bool  # False only when MAX_REQUESTS ran out first


def log_steps(base_rate: float, canary_rate: float) -> tuple[float, float]:
    """How one bad request (up) and one good request (down, < 0) move the log-likelihood ratio
    of `canary_rate` against `base_rate`."""
    if not 0 < base_rate < canary_rate < 1:
        raise ValueError(f"the SPRT needs 0 < base {base_rate} < canary {canary_rate} < 1")
    return math.log(canary_rate / base_rate), math.log1p(-canary_rate) - math.log1p(-base_rate)


def simulate(
    base_rate: float, canary_rate: float, rng: np.random.Generator, *, alpha: float = 0.05
) -> OracleRun:
    """One power-one SPRT of `canary_rate` against `base_rate`, both known, per request."""
    up, down = log_steps(base_rate, canary_rate)
    threshold = math.log(1.0 / alpha)
    llr, served, bad = 0.0, 0, 0
    while served < MAX_REQUESTS:
        gap = int(rng.geometric(canary_rate))  # requests up to and including the next bad one
        served += gap
        bad += 1
        llr += (gap - 1) * down + up
        if llr >= threshold:
            return OracleRun(served, bad, rolled_back=True)
    return OracleRun(served, bad, rolled_back=False)


@lru_cache(maxsize=64)
def sprt_expected_n(
    base_rate: float, canary_rate: float, *, alpha: float = 0.05, beta: float = 0.2
) -> float:
    """Exact E[N] (canary requests) of Wald's SPRT when the canary's bad rate is `canary_rate`.

    Boundaries log((1-β)/α) and log(β/(1-α)) on the log-likelihood ratio of `canary_rate`
    against `base_rate`. E[N] = Σ_n P(N > n), carried forward request by request over the
    undecided paths (a handful of bad-request counts at any n), until < 1e-12 of them remain.
    """
    up, down = log_steps(base_rate, canary_rate)
    upper, lower = math.log((1 - beta) / alpha), math.log(beta / (1 - alpha))
    undecided = {0: 1.0}  # bad requests seen -> probability, over the paths still running
    expected, served = 0.0, 0
    while (alive := sum(undecided.values())) > 1e-12:
        expected += alive  # P(N > served)
        served += 1
        moved: defaultdict[int, float] = defaultdict(float)
        for bad, p in undecided.items():
            moved[bad + 1] += p * canary_rate
            moved[bad] += p * (1.0 - canary_rate)
        undecided = {
            bad: p for bad, p in moved.items() if lower < bad * up + (served - bad) * down < upper
        }
    return expected
