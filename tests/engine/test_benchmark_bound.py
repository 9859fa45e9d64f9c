"""The lower bound on E[N]/Wald (benchmarks/bound.py) against tests whose E[N] is known."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from benchmarks.bound import certify, dual_value, main

FIFTY = np.array([50.0])


@pytest.mark.parametrize(
    ("lam", "nu"), list(itertools.product([0.01, 0.1, 0.6, 3.0], [0.05, 0.5, 8.0, 40.0]))
)
def test_no_certificate_against_a_target_a_real_test_meets(lam: float, nu: float) -> None:
    # The power-one SPRT rolling back at likelihood ratio 20 meets X = 1.8 at 50x (it needs 1.6,
    # benchmarks/oracle.py) at level 0.05: weak duality forbids any positive dual there.
    dual = dual_value(1.8, FIFTY, np.array([lam]), np.array([nu]), power=0.999)
    assert dual <= 0


def test_a_target_below_the_known_rates_optimum_is_proven_out_of_reach() -> None:
    # Told the rates, the best power-one test needs ~1.2 x Wald at 50x (its threshold tuned to
    # spend all of alpha); 1.1 is proven impossible, for every test, not just that one.
    assert certify(1.1, [50.0], power=0.999).proven


def test_leaving_regressions_undecided_lowers_the_bound() -> None:
    # A test may roll back only the quick runs and leave 20 % undecided: 1.1 is then not proven.
    assert not certify(1.1, [50.0], power=0.8).proven


def test_cli_prints_the_bound_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    main(["--thetas", "50", "--power", "0.999", "--json"])
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["thetas"] == [50.0]
    assert 1.1 <= payload["en_over_wald_lower_bound"] < 1.8
    assert all(
        c["proven"] == (c["x"] <= payload["en_over_wald_lower_bound"])
        for c in payload["certificates"]
    )


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        pytest.param(["--thetas", "a"], "argument --thetas: not comma-separated", id="theta-nan"),
        pytest.param(["--thetas", "5,,10"], "argument --thetas: not comma", id="empty-theta"),
        pytest.param(["--thetas", "1"], "each θ must be > 1", id="theta-1-is-no-regression"),
        pytest.param(["--thetas", "0.5,10"], "not [0.5]", id="theta-improvement"),
        pytest.param(["--thetas", "1000"], "and < 1000", id="theta-rate-above-1"),
        pytest.param(["--power", "2"], "argument --power: must be above 0", id="power-2"),
        pytest.param(["--power", "0"], "argument --power: must be above 0", id="power-0"),
        pytest.param(["--alpha", "0"], "argument --alpha: must be between 0", id="alpha-0"),
        pytest.param(["--alpha", "1"], "argument --alpha: must be between 0", id="alpha-1"),
    ],
)
def test_bad_arguments_exit_2_naming_the_option(
    capsys: pytest.CaptureFixture[str], args: list[str], problem: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert problem in err.splitlines()[-1]


def test_a_large_theta_next_to_small_ones_still_yields_a_finite_dual() -> None:
    # L_200 after 140 bad requests is 200**140: it overflowed, every dual read -inf and nothing
    # could be proven for --thetas 5,10,200. A θ weighted next to nothing changes next to nothing.
    small = dual_value(1.2, np.array([5.0, 10.0]), np.array([1.0, 1.0]), np.array([1.0, 1.0]))
    with_200 = dual_value(
        1.2, np.array([5.0, 10.0, 200.0]), np.array([1.0, 1.0, 1e-9]), np.array([1.0, 1.0, 1e-9])
    )
    assert math.isfinite(with_200)
    assert with_200 == pytest.approx(small, abs=1e-6)
