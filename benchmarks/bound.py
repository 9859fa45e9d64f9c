"""A lower bound on E[N]/Wald for EVERY judge: how far any rollback test could go.

`benchmarks/oracle.py` measures one good test that is told the answer. This module bounds all
tests, for the easiest version of the problem: the baseline's bad rate `p0` is known, and the
judge sees every canary request one by one (no ticks, no second check sharing α). A real judge
knows less, so it can only do worse.

The question: can a test at level α (P(rollback) <= α when θ = 1) that rolls back each of the
regressions θ ∈ Θ with probability >= `power` keep E[canary requests | rollback] <= X × Wald_θ
for every θ ∈ Θ at once? (Wald_θ: E[N] of Wald's SPRT, `benchmarks.oracle.sprt_expected_n`, the
benchmark's reference.) Weak Lagrangian duality answers "no" with a certificate. For multipliers
λ_θ, ν_θ >= 0, every such test has

    J = Σ λ_θ E_θ[(N/W_θ - X); rollback] - Σ ν_θ P_θ(rollback) + P_1(rollback)
      <= α - power × Σ ν_θ,

and J >= V, the least J over ALL stopping rules. Under θ = 1, E_θ[f(N); rollback] =
E_1[f(N) L_θ(N); rollback] with L_θ the likelihood ratio, so V is an optimal-stopping problem
over (requests seen, bad among them), solved exactly by dynamic programming backwards from the
horizon where stopping can no longer pay. If V - α + power × Σ ν_θ > 0 for some multipliers, no
test meets X: the bound is proven. Multipliers are searched with Nelder-Mead (a weak search only
loses tightness, never validity).

    python -m benchmarks.bound [--thetas 5,10,50] [--power 0.95] [--json]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize

from benchmarks.oracle import sprt_expected_n

#: Bad events tracked exactly; beyond, the value is bounded below by optional stopping (the
#: likelihood ratios are martingales under θ = 1), so a small cap costs tightness, not validity.
MAX_BAD = 140


def dual_value(
    x: float,
    thetas: NDArray[np.float64],
    lam: NDArray[np.float64],
    nu: NDArray[np.float64],
    *,
    base_rate: float = 0.001,
    alpha: float = 0.05,
    power: float = 0.95,
) -> float:
    """V - α + power × Σ ν for these multipliers: > 0 proves that no test meets `x` on all θ."""
    wald = np.array([sprt_expected_n(base_rate, float(t) * base_rate, alpha=alpha) for t in thetas])
    # Past this many requests every λ_θ (t / W_θ - X) - ν_θ is >= 0: rolling back only costs.
    horizon = math.ceil(float(np.max(wald * (x + nu / lam)))) + 1
    # Scaled by p^k (p the base rate; a positive factor per state, so the least J is the
    # same): L_θ itself overflows (200**140 after 140 bad requests: every dual read -inf), while
    # p^k L_θ = (θ p)^k (...) <= 1 for θ < 1/p. A state's scaled value is its weight in J at
    # the start: one too deep to matter underflows to 0.
    up = (np.log(thetas) + math.log(base_rate))[:, None]  # a bad request: L_θ × θ, scale × p
    down = (np.log1p(-thetas * base_rate) - math.log1p(-base_rate))[:, None]  # a good one
    # value[k]: the least J-to-go with k bad requests seen, × p^k (one spare slot past the cap).
    value = np.zeros(MAX_BAD + 2)  # at the horizon: never rolling back is optimal, J = 0
    scales = np.power(base_rate, np.arange(MAX_BAD + 1))  # p^k
    for t in range(horizon - 1, -1, -1):
        size = min(t, MAX_BAD) + 1  # states k = 0..min(t, MAX_BAD) bad requests
        k = np.arange(size)
        likelihood = np.exp(up * k + down * (t - k))  # p^k L_θ(t, k), one row per θ
        coefficient = (lam * (t / wald - x) - nu)[:, None]
        # J's integrand (scaled) if we roll back now
        stop = scales[:size] + (likelihood * coefficient).sum(axis=0)
        go_on = (1.0 - base_rate) * value[:size] + value[1 : size + 1]
        new = np.minimum(stop, go_on)
        if size == MAX_BAD + 1:  # the cap: J >= -Σ (ν + λ X) L_θ whatever follows (scaled)
            new[MAX_BAD] = min(stop[MAX_BAD], -float(((nu + lam * x) * likelihood[:, -1]).sum()))
        value = np.zeros(MAX_BAD + 2)
        value[:size] = new
    return float(value[0]) - alpha + power * float(nu.sum())


@dataclass(frozen=True)
class Certificate:
    """The multipliers that prove "no test meets `x`" (`proven`), or the best ones found."""

    x: float
    proven: bool
    dual: float
    lam: list[float]
    nu: list[float]


def certify(
    x: float, thetas: list[float], *, power: float = 0.95, alpha: float = 0.05
) -> Certificate:
    """Search multipliers that make the dual positive for `x` (Nelder-Mead on their logs)."""
    grid = np.asarray(thetas, dtype=float)
    m = len(thetas)

    def negative_dual(z: NDArray[np.float64]) -> float:
        # (clipped: a tiny λ would stretch the horizon; a narrower search costs tightness only)
        lam, nu = np.exp(np.clip(z[:m], -9, 7)), np.exp(np.clip(z[m:], -9, 7))
        return -dual_value(x, grid, lam, nu, alpha=alpha, power=power)

    start = np.full(2 * m, math.log(0.05))
    found = minimize(
        negative_dual, start, method="Nelder-Mead", options={"maxiter": 200 * m, "fatol": 1e-6}
    )
    lam, nu = np.exp(np.clip(found.x[:m], -9, 7)), np.exp(np.clip(found.x[m:], -9, 7))
    dual = -float(found.fun)
    return Certificate(x, dual > 0, dual, lam.tolist(), nu.tolist())


def largest_proven(
    thetas: list[float], *, power: float, alpha: float = 0.05, lo: float = 0.5, hi: float = 3.0
) -> tuple[float | None, list[Certificate]]:
    """Bisect for the largest X (to 0.05) that `certify` proves no test can meet (None: none)."""
    tried, proven = [], None
    while hi - lo > 0.05:
        mid = round((lo + hi) / 2, 3)
        cert = certify(mid, thetas, power=power, alpha=alpha)
        tried.append(cert)
        print(f"X = {mid:.3f}: {'proven' if cert.proven else 'not proven'} (dual {cert.dual:.4f})")
        if cert.proven:
            lo, proven = mid, mid
        else:
            hi = mid
    return proven, tried


def _thetas(text: str) -> list[float]:
    """argparse type: comma-separated regressions, each a rate 1 < θ < 1 / base rate (1,000)."""
    try:
        thetas = [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text!r}") from None
    bad = [t for t in thetas if not 1 < t < 1 / 0.001]
    if bad:
        raise argparse.ArgumentTypeError(f"each θ must be > 1 and < 1000 (0.1 % base), not {bad}")
    return thetas


def _unit(text: str, *, one: bool) -> float:
    """argparse type: a number above 0 and below 1 (with `one`: at most 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if one and not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, not {value:g}")
    if not one and not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), not {value:g}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--thetas", type=_thetas, default="5,10,50", help="regressions θ (comma-separated)"
    )
    parser.add_argument(
        "--power",
        type=functools.partial(_unit, one=True),
        default=0.95,
        help="P(rollback) each θ must reach",
    )
    parser.add_argument(
        "--alpha",
        type=functools.partial(_unit, one=False),
        default=0.05,
        help="P(rollback) allowed when θ = 1",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    thetas = args.thetas
    shown = ",".join(f"{t:g}" for t in thetas)
    started = time.perf_counter()
    bound, tried = largest_proven(thetas, power=args.power, alpha=args.alpha)
    took = f"{time.perf_counter() - started:.0f} s"
    if bound is None:
        print(f"No bound proven above 0.5 x Wald ({took})")
    else:
        print(
            f"No level-{args.alpha:g} test that rolls back each of θ = {shown} with "
            f"probability >= {args.power:g} keeps E[N | rollback] at or below {bound:.2f} x Wald "
            f"on all of them (baseline rate known, every canary request seen; {took})"
        )
    if args.json:
        payload = {
            "thetas": thetas,
            "power": args.power,
            "alpha": args.alpha,
            "en_over_wald_lower_bound": bound,
            "certificates": [asdict(c) for c in tried],
        }
        print(json.dumps(payload))


if __name__ == "__main__":
    main()
