"""The e-processes: exact martingale property, growth under regressions, flat without data."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import binom, multinomial

from rollout.core.stats import (
    LOW_FRACTIONS,
    LOW_PRIOR,
    OK_FRACTIONS,
    WORSE_PRIOR,
    WORSE_THETAS,
    Evidence,
    binomial_llr,
    log_e_above,
    log_e_below,
    log_mean_e,
    log_mixture,
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


@pytest.mark.parametrize("n", [1, 50, 2000])
@pytest.mark.parametrize("delta", [0.0001, 0.001, 0.05])
@pytest.mark.parametrize("excess", [1.0, 1.5, 10.0])
def test_negligible_ratios_are_supermartingales_at_or_above_delta(
    n: int, delta: float, excess: float
) -> None:
    # E[LR] over the exact Binomial(n, p) law of a tick's canary errors: = 1 at p = δ, < 1 above.
    k = np.arange(n + 1)
    weights = binom.pmf(k, n, delta * excess)
    for p in LOW_FRACTIONS * delta:
        lr = np.exp([binomial_llr(int(i), n, np.array([p]), delta)[0] for i in k])
        mean = float(weights @ lr)
        assert mean <= 1.0 + 1e-9
        if excess == 1.0:
            assert mean == pytest.approx(1.0, rel=1e-9)


def test_prior_weights_sum_to_one() -> None:
    assert WORSE_PRIOR.sum() == pytest.approx(1.0)
    assert len(WORSE_PRIOR) == len(WORSE_THETAS)
    assert LOW_PRIOR.sum() == pytest.approx(1.0)
    assert len(LOW_PRIOR) == len(LOW_FRACTIONS)


def test_not_worse_is_the_mean_of_the_ratio_and_negligible_e_values() -> None:
    ev = Evidence()
    for _ in range(30):
        ev = ev.update(kc=1, kb=1, nc=1000, nb=1000, margin=2.0, negligible=0.001)
    assert ev.log_e_ok() == pytest.approx(log_mean_e(ev.log_e_ratio(), ev.log_e_low()))
    assert math.exp(ev.log_e_ok()) == pytest.approx(
        (math.exp(ev.log_e_ratio()) + math.exp(ev.log_e_low())) / 2
    )


def test_without_a_negligible_rate_not_worse_is_the_ratio_test_alone() -> None:
    ev = Evidence()
    for _ in range(10):
        ev = ev.update(kc=0, kb=0, nc=1000, nb=1000, margin=2.0)
    assert ev.log_e_ok() == ev.log_e_ratio() == ev.log_e_low() == 0.0


def test_clean_canary_requests_build_negligible_evidence_without_baseline_traffic() -> None:
    ev = Evidence()
    for _ in range(50):
        ev = ev.update(kc=0, kb=0, nc=100, nb=0, margin=2.0, negligible=0.001)
    # 5,000 clean requests: the prior-weighted mean of ((1 − f δ)/(1 − δ))^5000 over the grid.
    growth = ((1 - LOW_FRACTIONS * 0.001) / (1 - 0.001)) ** 5000
    assert math.exp(ev.log_e_low()) == pytest.approx(float(LOW_PRIOR @ growth), rel=1e-9)
    assert ev.log_e_ratio() == 0.0


def test_a_canary_at_twice_delta_never_shows_a_negligible_rate() -> None:
    ev = Evidence()
    for _ in range(200):  # 200,000 canary requests at 0.2 %, no baseline errors at all
        ev = ev.update(kc=2, kb=0, nc=1000, nb=1000, margin=2.0, negligible=0.001)
    assert ev.log_e_low() < -50


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


@pytest.mark.parametrize("canary_share", [0.001, 0.01, 0.05, 0.25, 0.5])
def test_a_single_canary_error_is_never_enough_to_roll_back(canary_share: float) -> None:
    # One stray error must not abort a rollout at alpha 0.05 whatever the weight: the mixture
    # rises at most to sum(prior x theta) = 19.85 < 20 (docs/engine.md, the 50x floor).
    nc = round(1_000_000 * canary_share)
    ev = Evidence().update(kc=1, kb=0, nc=nc, nb=1_000_000 - nc, margin=2.0)
    assert 1 < math.exp(ev.log_e_worse()) < float(WORSE_PRIOR @ WORSE_THETAS) < 1 / 0.05


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


@pytest.mark.parametrize("limit", [0.001, 0.1, 0.6])
@pytest.mark.parametrize("n", [1, 20, 300])
def test_the_guard_e_value_has_mean_at_most_one_within_the_limit(limit: float, n: int) -> None:
    k = np.arange(n + 1)
    e = np.exp([log_e_above(int(i), n, limit) for i in k])
    assert float(binom.pmf(k, n, limit) @ e) == pytest.approx(1.0, rel=1e-9)
    assert float(binom.pmf(k, n, limit / 2) @ e) < 1.0


def test_a_canary_at_the_limit_trips_the_guard_at_most_alpha_over_every_look() -> None:
    """Exact: the chance of ever reaching 1/0.001, looking after each of 2,000 requests."""
    limit, threshold, n_max = 0.1, math.log(1000.0), 2000
    alive = np.array([1.0])  # P(k bad so far, never tripped), k = 0..n
    tripped, k = 0.0, 0
    for n in range(1, n_max + 1):
        alive = np.append(alive * (1 - limit), 0.0) + np.append(0.0, alive * limit)
        # The e-value grows with k: find the least k that trips (it moves slowly with n).
        k = max(k - 2, 0)
        while k > 0 and log_e_above(k - 1, n, limit) >= threshold:
            k -= 1
        while k <= n and log_e_above(k, n, limit) < threshold:
            k += 1
        tripped += float(alive[k:].sum())
        alive[k:] = 0.0
    assert tripped <= 0.001
    assert tripped > 0.0001  # not vacuous: the guard does get close to its level


def test_a_clear_breach_of_a_limit_trips_the_guard_within_a_few_dozen_requests() -> None:
    # 50 % errors against a 10 % limit.
    first = next(n for n in range(1, 200) if log_e_above(n // 2, n, 0.1) >= math.log(1000.0))
    assert first <= 30
    assert log_e_above(0, 0, 0.1) == 0.0


@pytest.mark.parametrize(("bad", "n", "limit"), [(12, 10, 1.0), (10, 10, 1.0), (12, 10, 0.5)])
def test_the_above_e_value_is_finite_with_more_bad_events_than_requests(
    bad: int, n: int, limit: float
) -> None:
    # Nothing is above 100 %; more bad events than requests counts as all of them bad.
    log_e = log_e_above(bad, n, limit)
    assert math.isfinite(log_e)
    assert log_e == log_e_above(min(bad, n), n, limit)
    if limit >= 1.0:
        assert log_e == 0.0


@pytest.mark.parametrize("limit", [0.001, 0.1, 0.6])
@pytest.mark.parametrize("n", [1, 20, 300])
def test_the_below_e_value_has_mean_at_most_one_at_or_above_the_limit(limit: float, n: int) -> None:
    k = np.arange(n + 1)
    e = np.exp([log_e_below(int(i), n, limit) for i in k])
    assert float(binom.pmf(k, n, limit) @ e) == pytest.approx(1.0, rel=1e-9)
    assert float(binom.pmf(k, n, min(2 * limit, 0.9)) @ e) < 1.0


def test_a_release_at_the_limit_is_shown_below_it_at_most_alpha_over_every_look() -> None:
    """Exact: the chance of ever reaching 1/0.05 "below 10 %" at a 10 % error rate, looking
    after each of 2,000 requests (the first release's check asks every tick)."""
    limit, threshold, n_max = 0.1, math.log(20.0), 2000
    alive = np.array([1.0])  # P(k bad so far, never shown below), k = 0..n
    shown, k = 0.0, 0
    for n in range(1, n_max + 1):
        alive = np.append(alive * (1 - limit), 0.0) + np.append(0.0, alive * limit)
        # The e-value falls as k grows: find the least k not shown (it moves slowly with n).
        k = max(k - 2, 0)
        while k <= n and log_e_below(k, n, limit) >= threshold:
            k += 1
        while k > 0 and log_e_below(k - 1, n, limit) < threshold:
            k -= 1
        shown += float(alive[:k].sum())
        alive[:k] = 0.0
    assert shown <= 0.05
    assert shown > 0.005  # not vacuous


def test_a_clean_release_is_shown_below_a_10_percent_limit_within_a_few_dozen_requests() -> None:
    first = next(n for n in range(1, 200) if log_e_below(0, n, 0.1) >= math.log(20.0))
    assert first <= 40
    assert log_e_below(0, 0, 0.1) == 0.0
    assert log_e_below(5, 3, 0.1) == log_e_below(3, 3, 0.1)  # more errors than requests: all bad


def test_a_rate_is_shown_below_a_limit_of_one_by_one_good_request() -> None:
    # Was NaN (log 0 - log 0) with a RuntimeWarning: `max_rate: 1.0` is a valid setting.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (log_e_below(0, 10, 1.0), log_e_below(9, 10, 1.0)) == (math.inf, math.inf)
        assert log_e_below(10, 10, 1.0) == 0.0  # every request bad: as a rate of 1 would do


@pytest.mark.parametrize(
    "log_lr", [[0.0, 0.0, 0.0], [-800.0, 3.0, 1.0], [900.0, 899.0, -5.0], [-1e3, -1e3, -1e3]]
)
def test_log_mixture_is_scipys_logsumexp_without_overflow(log_lr: list[float]) -> None:
    prior = np.array([0.6, 0.25, 0.15])
    expected = float(logsumexp(np.array(log_lr), b=prior))
    assert log_mixture(np.array(log_lr), prior) == pytest.approx(expected, rel=1e-12)
    assert log_mean_e(*log_lr) == pytest.approx(float(logsumexp(log_lr) - math.log(3)), 1e-12)


@pytest.mark.parametrize("mirror", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("poison", [0, 1, 4])
@pytest.mark.parametrize("random_rate", [0.0, 0.02])
def test_worse_ratios_stay_supermartingales_when_mirrored_copies_fail_with_their_originals(
    mirror: float, poison: int, random_rate: float
) -> None:
    # The shadow step: blue answers copies of `mirror` × green's requests. A request that fails
    # whatever model answers it (a poison input) fails on both colours, so the two counts are no
    # longer independent. With the canary as good as the baseline: of green's `poison` failures
    # each original was copied with probability `mirror` (c_d ~ Bin(poison, mirror)), and both
    # colours also fail at random at `random_rate`. The judge still sees a mean LR <= 1 per tick:
    # E = [(1 + q)(1 - q + 2θq) / (1 + θq)²]^poison × 1 for the pure copies, <= 1 since the
    # difference is q²(θ - 1)² >= 0.
    nb = 60
    nc = round(nb * mirror)
    p0 = nc / (nc + nb)
    green_random = binom.pmf(np.arange(nb + 1), nb, random_rate)
    blue_random = binom.pmf(np.arange(nc + 1), nc, random_rate)
    copied = binom.pmf(np.arange(poison + 1), poison, mirror)
    # Every (green random, blue random, copied) outcome at once: blue's bad events k and the
    # tick's total n, with their joint probability.
    gi, ci, cd = np.meshgrid(
        np.arange(nb + 1), np.arange(nc + 1), np.arange(poison + 1), indexing="ij"
    )
    weight = green_random[gi] * blue_random[ci] * copied[cd]
    k, n = ci + cd, poison + gi + ci + cd
    for p in share(WORSE_THETAS, p0):
        llr = binomial_llr(k, n, np.asarray(p), p0)  # elementwise over every outcome
        assert float((weight * np.exp(llr)).sum()) <= 1.0 + 1e-9


@pytest.mark.parametrize("mirror", [0.1, 0.5])
@pytest.mark.parametrize("poison", [0.0, 0.005, 0.02])
def test_not_worse_ratios_stay_supermartingales_on_copies_of_a_canary_at_the_margin(
    mirror: float, poison: float
) -> None:
    # Promotion's evidence accrues in the shadow step too. Its null: the canary fails at least
    # `margin` times as often as the baseline. Each original request is poison with probability
    # `poison` (fails on both colours), else fails at random: on green at 0.4 %, on blue's copy
    # at the rate that puts blue's total at margin x green's. Copied pairs are
    # (both, green only, blue only, neither); uncopied originals fail on green alone.
    margin, nb = 2.0, 40
    nc = round(nb * mirror)
    p0 = nc / (nc + nb)
    rb = 0.004
    green = poison + (1 - poison) * rb
    rc = (margin * green - poison) / (1 - poison)
    pair = np.array(
        [
            poison + (1 - poison) * rb * rc,
            (1 - poison) * rb * (1 - rc),
            (1 - poison) * (1 - rb) * rc,
        ]
    )
    uncopied = binom.pmf(np.arange(nb - nc + 1), nb - nc, green)
    p_margin = float(share(margin, p0))
    means = np.zeros(len(OK_FRACTIONS))
    for both in range(nc + 1):
        for g_only in range(nc + 1 - both):
            for b_only in range(nc + 1 - both - g_only):
                counts = [both, g_only, b_only, nc - both - g_only - b_only]
                prob = multinomial.pmf(counts, nc, [*pair, 1 - pair.sum()])
                k = both + b_only
                n = 2 * both + g_only + b_only + np.arange(nb - nc + 1)
                for i, p in enumerate(share(OK_FRACTIONS * margin, p0)):
                    llr = binomial_llr(k, n, np.asarray(p), p_margin)
                    means[i] += prob * float(uncopied @ np.exp(llr))
    assert means.max() <= 1.0 + 1e-9
