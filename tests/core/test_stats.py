"""The e-processes: exact martingale property, growth under regressions, flat without data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from rollout.core.stats import (
    OK_FRACTIONS,
    WORSE_PRIOR,
    WORSE_THETAS,
    Evidence,
    binomial_llr,
    rate_lower_bound,
    share,
    wald_expected_n,
)


@pytest.mark.parametrize("n", [1, 5, 40])
@pytest.mark.parametrize("p0", [0.05, 0.25, 0.5, 0.9])
def test_worse_ratios_have_mean_one_under_the_null(n: int, p0: float) -> None:
    # E[LR] = 1 under θ = 1 for every grid point: the mixture is a martingale (Ville applies).
    k = np.arange(n + 1)
    weights = binom.pmf(k, n, p0)
    for p in share(WORSE_THETAS, p0):
        lr = np.exp([binomial_llr(int(i), n, np.array([p]), p0)[0] for i in k])
        assert float(weights @ lr) == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("theta", [0.2, 0.5, 0.9])
def test_worse_ratios_are_supermartingales_when_the_canary_is_better(theta: float) -> None:
    n, p0 = 10, 0.3
    k = np.arange(n + 1)
    weights = binom.pmf(k, n, float(share(theta, p0)))
    for p in share(WORSE_THETAS, p0):
        lr = np.exp([binomial_llr(int(i), n, np.array([p]), p0)[0] for i in k])
        assert float(weights @ lr) <= 1.0


@pytest.mark.parametrize("margin", [1.5, 2.0, 3.0])
def test_not_worse_ratios_have_mean_at_most_one_at_or_above_the_margin(margin: float) -> None:
    n, p0 = 12, 0.5
    k = np.arange(n + 1)
    p_margin = float(share(margin, p0))
    for truth in (margin, margin * 2):
        weights = binom.pmf(k, n, float(share(truth, p0)))
        for p in share(OK_FRACTIONS * margin, p0):
            lr = np.exp([binomial_llr(int(i), n, np.array([p]), p_margin)[0] for i in k])
            assert float(weights @ lr) <= 1.0 + 1e-9


def test_prior_weights_sum_to_one() -> None:
    assert WORSE_PRIOR.sum() == pytest.approx(1.0)
    assert len(WORSE_PRIOR) == len(WORSE_THETAS)


@pytest.mark.parametrize(
    ("kc", "kb", "nc", "nb"),
    [
        pytest.param(0, 0, 100, 900, id="no-events"),
        pytest.param(3, 0, 0, 900, id="no-canary-traffic"),
        pytest.param(0, 3, 100, 0, id="no-baseline-traffic"),
    ],
)
def test_ticks_without_information_leave_the_evidence_flat(
    kc: int, kb: int, nc: int, nb: int
) -> None:
    ev = Evidence().update(kc=kc, kb=kb, nc=nc, nb=nb, margin=2.0)
    assert ev.log_e_worse() == 0.0
    assert ev.log_e_ok() == 0.0
    assert ev.canary_requests == nc


def test_a_ten_fold_regression_builds_evidence_quickly() -> None:
    ev = Evidence()
    for _ in range(5):  # 5 ticks: canary 10 % of traffic, 1 error each, baseline 1 per tick
        ev = ev.update(kc=1, kb=1, nc=100, nb=900, margin=2.0)
    assert math.exp(ev.log_e_worse()) > 40
    assert ev.log_e_ok() < 0


def test_an_unchanged_canary_earns_not_worse_evidence() -> None:
    ev = Evidence()
    for _ in range(60):  # canary half the traffic, half the errors
        ev = ev.update(kc=2, kb=2, nc=1000, nb=1000, margin=2.0)
    assert math.exp(ev.log_e_ok()) > 20
    assert ev.log_e_worse() < 0


def test_update_rejects_negative_counts() -> None:
    with pytest.raises(ValueError, match="negative"):
        Evidence().update(kc=-1, kb=0, nc=1, nb=1, margin=2.0)


def test_wald_reference_matches_the_textbook_order_of_magnitude() -> None:
    # ANCHORS.md: tens of requests for 50x, hundreds for 10x, thousands for 2x at 0.1 %.
    assert 10 < wald_expected_n(0.001, 50) < 20
    assert 100 < wald_expected_n(0.001, 10) < 200
    assert 4000 < wald_expected_n(0.001, 2) < 6000


def test_rate_lower_bound() -> None:
    assert rate_lower_bound(0, 100, 0.01) == 0.0
    assert 0.3 < rate_lower_bound(50, 100, 0.01) < 0.5
