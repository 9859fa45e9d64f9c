"""benchmarks/e2e_rollback.py refuses arguments it cannot measure with, before any start."""

from __future__ import annotations

import pytest

from benchmarks.e2e_rollback import main


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        pytest.param(["--runs", "2"], "--runs must be at least 3", id="too-few-runs"),
        pytest.param(["--rps", "0"], "--rps must be above 0, not 0", id="no-load"),
        pytest.param(["--rps", "-5"], "--rps must be above 0, not -5", id="negative-load"),
        pytest.param(["--rps", "nan"], "--rps must be above 0, not nan", id="nan-load"),
    ],
)
def test_bad_arguments_exit_2_before_the_stack_starts(
    capsys: pytest.CaptureFixture[str], args: list[str], problem: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert problem in capsys.readouterr().err.splitlines()[-1]
