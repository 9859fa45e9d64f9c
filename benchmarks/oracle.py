"""The oracle reference: the sequential test that is told the answer.

Wald's E[N] (`rollout.core.stats.wald_expected_n`) is an approximation for an SPRT that knows both
rates and may also stop early *accepting* "no regression" (β = 0.2). A rollout judge cannot: it
must keep looking until it rolls back (power one), at level α over the whole rollout. The oracle
here is the best such test when everything is known: the likelihood-ratio test of the canary's
true bad rate against the baseline's, both given, fed every canary request one by one (no ticks,
no baseline traffic to learn from, no other check sharing α), rolling back when the ratio reaches
1/α — a mixture SPRT whose mixture is a single point at the truth.

Its E[N] / Wald is what the benchmark's `EN/Wald` column would read for a perfect judge of this
kind; ours is compared against both. Runs per request in closed form: the log ratio rises only at
bad requests, so it can first reach 1/α only at one, and the gaps between bad requests are
geometric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Give up after this many canary requests (never reached by the default scenarios).
MAX_REQUESTS = 10**8


@dataclass(frozen=True)
class OracleRun:
    canary_requests: int  # canary requests served until the oracle rolls back (or gives up)
    bad: int  # bad events (errors, or slow requests for a latency regression) among them
    rolled_back: bool  # False only when MAX_REQUESTS ran out first


def simulate(
    base_rate: float, canary_rate: float, rng: np.random.Generator, *, alpha: float = 0.05
) -> OracleRun:
    """One power-one SPRT of `canary_rate` against `base_rate`, both known, per request."""
    if not 0 < base_rate < canary_rate < 1:
        raise ValueError(f"the oracle needs 0 < base {base_rate} < canary {canary_rate} < 1")
    up = math.log(canary_rate / base_rate)  # a bad request
    down = math.log1p(-canary_rate) - math.log1p(-base_rate)  # a good one (< 0)
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
