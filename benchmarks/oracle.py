"""The references a judge is measured against: Wald's SPRT, and the test that is told the answer.

**Wald's SPRT** (`sprt_expected_n`): the two-sided sequential probability ratio test of the
canary's bad rate against the baseline's, both known, at α = 0.05 and β = 0.2, fed every canary
request. Its expected number of canary requests under the regression is the benchmark's `Wald`:
18, 186, 583 and 5,408 for 50×, 10×, 5× and 2× on a 0.1 % base rate, the numbers ANCHORS.md
quotes (it says 187 and 5,420). Computed exactly (the law of the undecided paths, from bad request
to bad request), not with Wald's approximation (`rollout.core.stats.wald_expected_n`: 13, 136, 470,
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
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray
from scipy.special import betainc

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


def _binomials(y: NDArray[np.float64], degree: int, p: float) -> NDArray[np.float64]:
    """b_k(y) = p^k C(y + k, k) for k = 0..degree, one row per k (y whole numbers >= 0)."""
    out = np.empty((degree + 1, *y.shape))
    out[0] = 1.0
    for k in range(1, degree + 1):
        out[k] = out[k - 1] * p * (y + k) / k
    return out


@lru_cache(maxsize=64)
def sprt_expected_n(
    base_rate: float, canary_rate: float, *, alpha: float = 0.05, beta: float = 0.2
) -> float:
    """Exact E[N] (canary requests) of Wald's SPRT when the canary's bad rate is `canary_rate`.

    Boundaries log((1-β)/α) and log(β/(1-α)) on the log-likelihood ratio of `canary_rate`
    against `base_rate`. E[N] = Σ_n P(N > n), carried from bad request to bad request: the log
    ratio can cross the upper boundary only at a bad request and the lower one only at a good
    one, so the undecided paths at the j-th bad request are those whose good-request count g
    lies in an interval (the law of g there: h_j), and the good requests between two bad ones
    are geometric. Over the whole numbers of that interval h_j is, piece by piece, q^g times a
    polynomial in g (q = 1 - canary_rate; kept in the basis p^k C(g - start + k, k), whose
    coefficients stay >= 0: no cancellation), and every sum over g is in closed form. The cost
    depends on θ = canary / base (the pieces and their degree), not on the base rate: request by
    request it was ~0.3 s at a 0.1 % base and 30 s at 0.001 %. Until < 1e-15 of the paths remain.
    """
    up, down = log_steps(base_rate, canary_rate)
    upper, lower = math.log((1 - beta) / alpha), math.log(beta / (1 - alpha))
    p, log_q = canary_rate, math.log1p(-canary_rate)

    def llr(bad: int, good: int) -> float:  # as the SPRT computes it: ties fall the same way
        return bad * up + good * down

    def most_good(bad: int) -> int:
        """The most good requests with `bad` bad ones that leave the ratio above `lower`."""
        good = max(math.floor((bad * up - lower) / -down), 0)
        while good >= 0 and not llr(bad, good) > lower:
            good -= 1
        while llr(bad, good + 1) > lower:
            good += 1
        return good

    def fewest_good(bad: int) -> int:
        """The fewest good requests with `bad` bad ones that leave the ratio below `upper`."""
        good = max(math.ceil((bad * up - upper) / -down), 0)
        while good > 0 and llr(bad, good - 1) < upper:
            good -= 1
        while not llr(bad, good) < upper:
            good += 1
        return good

    # Pieces of h_j, contiguous, in order: good counts first..last, and h_j(g) =
    # q^(g - first) Σ_k coef[k] b_k(g - first). Before any request: all the mass at g = 0.
    first, last, coef = np.array([0]), np.array([0]), np.ones((1, 1))
    expected, bad = 0.0, 0
    while len(first):
        top = most_good(bad)  # past it, the next good request decides (lower boundary)
        width = (last - first).astype(float)
        degree = coef.shape[1]
        # Σ_g h_j(g) q^(first - g) over each piece, and Σ_g h_j(g) (its undecided mass)
        undiscounted = (coef * _binomials(width, degree, p)[1:].T).sum(axis=1) / p
        ks = np.arange(degree)
        mass = (coef * betainc(ks + 1, width[:, None] + 1, p)).sum(axis=1) / p
        # each path at g serves Σ_{i <= top - g} q^i = (1 - q^(top - g + 1)) / p more requests
        # (counting its own) while no bad request comes
        tail = np.exp((top - first + 1) * log_q) * undiscounted
        expected += float(mass.sum() - tail.sum()) / p
        if mass.sum() < 1e-15:
            break
        # The next bad request after i more good ones (probability p q^i), at g <= top: h_{j+1}
        # on each piece is p times the running sum, plus what earlier pieces carried into it.
        carried = np.empty(len(first))
        running = 0.0
        for i in range(len(first)):
            carried[i] = running
            running = math.exp((width[i] + 1) * log_q) * (running + undiscounted[i])
        coef = np.hstack([p * carried[:, None], coef])
        if top > last[-1]:  # good counts no path at bad request j had: only carried mass
            first, last = np.append(first, last[-1] + 1), np.append(last, top)
            coef = np.vstack([coef, np.zeros(coef.shape[1])])
            coef[-1, 0] = p * running
        bad += 1
        low = fewest_good(bad)  # fewer good ones: this bad request crossed `upper`
        keep = last >= low
        first, last, coef = first[keep], last[keep], coef[keep]
        if len(first) and first[0] < low:  # re-based at `low`: b_d(y + δ) = Σ b_i(y) b_(d-i)(δ-1)
            shift = low - int(first[0])
            b = _binomials(np.array(shift - 1.0), coef.shape[1] - 1, p)
            row = coef[0]
            coef[0] = math.exp(shift * log_q) * np.convolve(row[::-1], b)[: len(row)][::-1]
            first[0] = low
        used = np.flatnonzero(coef.any(axis=0))  # the oldest piece, once gone, took its degrees
        coef = coef[:, : used[-1] + 1] if len(used) else coef[:, :1]
    return expected
