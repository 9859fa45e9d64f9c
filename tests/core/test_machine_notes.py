"""The ledger notes of operator commands an abort in the same batch overrides.

An abort read after a promote or a set-weight wins: none of what they queued is applied. Their
notes said what they would have done ("set_weight: weight set to 25 % by ann"), and `explain`
told it as done."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rollout.core.machine import new_status, step, with_commands
from rollout.core.status import Command, SetWeights, Status
from rollout.core.types import Phase
from tests.core.helpers import make_spec, obs

SPEC = make_spec()
DROPPED = "dropped, not acted on: the abort read after it wins"


def _progressing() -> Status:
    return replace(new_status(SPEC, now=0.0), phase=Phase.PROGRESSING, blue_weight=10)


def _cmd(kind: str, ident: str, weight: int | None = None) -> Command:
    return Command(id=ident, kind=kind, weight=weight, by="ann")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("commands", "notes"),
    [
        pytest.param(
            [_cmd("set_weight", "c0", 50), _cmd("abort", "c1")],
            [f"set_weight 50 by ann: {DROPPED}", "abort: aborted by ann: blue back to 0 %"],
            id="set-weight-then-abort",
        ),
        pytest.param(
            [_cmd("promote", "c0"), _cmd("abort", "c1")],
            [f"promote by ann: {DROPPED}", "abort: {reason}"],
            id="promote-then-abort-while-promoting",
        ),
        pytest.param(
            [_cmd("set_weight", "c0", 100), _cmd("abort", "c1")],
            [f"set_weight 100 by ann: {DROPPED}", "abort: {reason}"],
            id="set-weight-100-then-abort",
        ),
        pytest.param(
            [_cmd("set_weight", "c0", 50), _cmd("promote", "c1"), _cmd("abort", "c2")],
            [f"set_weight 50 by ann: {DROPPED}", f"promote by ann: {DROPPED}", "abort: {reason}"],
            id="two-overridden",
        ),
        pytest.param(
            [_cmd("set_weight", "c0", 7), _cmd("abort", "c1")],
            [
                "set_weight 7: ignored, not in the plan [10, 50, 100]",
                "abort: aborted by ann: blue back to 0 %",
            ],
            id="an-ignored-one-stays-ignored",
        ),
        pytest.param(
            [_cmd("pause", "c0"), _cmd("abort", "c1")],
            ["pause: paused by ann", "abort: aborted by ann: blue back to 0 %"],
            id="a-pause-is-not-overridden",
        ),
        pytest.param(
            [_cmd("abort", "c0"), _cmd("set_weight", "c1", 50)],
            ["abort: aborted by ann: blue back to 0 %", "set_weight: ignored in phase RollingBack"],
            id="set-weight-after-the-abort",
        ),
        pytest.param(
            [_cmd("set_weight", "c0", 50)],
            ["set_weight: weight set to 50 % by ann"],
            id="set-weight-alone-acts",
        ),
    ],
)
def test_a_command_an_abort_overrides_is_noted_as_dropped(
    commands: list[Command], notes: list[str]
) -> None:
    decision = step(SPEC, with_commands(_progressing(), commands), obs(at=30.0), 30.0)
    reason = decision.status.reason
    assert decision.record["commands"] == [note.format(reason=reason) for note in notes]
    if commands[-1].kind == "abort":
        assert decision.status.phase is Phase.ROLLING_BACK
        assert decision.actions == (SetWeights(0),)
