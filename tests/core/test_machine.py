"""The state machine, one named case per behaviour: phases, verdicts, actions, commands."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from rollout.config import RolloutSpec
from rollout.core.machine import (
    judge_first,
    new_status,
    p99_bucket,
    resume_refused,
    step,
    with_commands,
)
from rollout.core.stats import Evidence
from rollout.core.status import (
    GUARD_BOUND_UNKNOWN,
    Command,
    Counts,
    Deploy,
    Remove,
    SetWeights,
    Status,
)
from rollout.core.types import Colour, ColourCounts, Phase, Verdict
from tests.core.helpers import V2, make_spec, obs

SPEC = make_spec()


def progressing(step_index: int = 0, weight: int = 10, **fields: Any) -> Status:
    status = new_status(SPEC, now=0.0)
    return replace(
        status, phase=Phase.PROGRESSING, step_index=step_index, blue_weight=weight, **fields
    )


def with_ok_evidence(status: Status) -> Status:
    ev = Evidence()
    for _ in range(60):
        ev = ev.update(kc=2, kb=2, nc=1000, nb=1000, margin=2.0)
    return replace(status, errors=ev)


@pytest.mark.parametrize(
    ("status", "observation", "now", "phase", "verdict", "actions", "reason"),
    [
        pytest.param(
            new_status(SPEC, now=0.0),
            None,
            0.0,
            Phase.PROGRESSING,
            None,
            (Deploy(Colour.BLUE, V2), SetWeights(10)),
            "started",
            id="initializing-deploys-blue-then-first-weight",
        ),
        pytest.param(
            progressing(),
            obs(),
            30.0,
            Phase.PROGRESSING,
            Verdict.INCONCLUSIVE,
            (),
            "no canary traffic",
            id="no-traffic-is-inconclusive-not-a-pass",
        ),
        pytest.param(
            progressing(),
            obs(),
            600.0,
            Phase.PAUSED,
            Verdict.INCONCLUSIVE,
            (),
            "held for a human",
            id="no-traffic-until-max-duration-holds-not-fails",
        ),
        pytest.param(
            progressing(),
            obs(error="prometheus down"),
            30.0,
            Phase.PROGRESSING,
            Verdict.ERROR,
            (),
            "metrics unreadable",
            id="metrics-error-is-an-error-verdict",
        ),
        pytest.param(
            progressing(consecutive_errors=3),
            obs(error="prometheus down"),
            30.0,
            Phase.PAUSED,
            Verdict.INCONCLUSIVE,
            (),
            "4 times in a row",
            id="metrics-errors-in-a-row-follow-the-policy",
        ),
        pytest.param(
            progressing(),
            obs(blue=(200, 12), green=(1800, 2), at=30.0),
            30.0,
            Phase.ROLLING_BACK,
            Verdict.FAILED,
            (SetWeights(0),),
            "e-value",
            id="clear-regression-rolls-back-at-once",
        ),
        pytest.param(
            progressing(),
            obs(blue=(40, 20), green=(360, 0), at=30.0),
            30.0,
            Phase.ROLLING_BACK,
            Verdict.FAILED,
            (SetWeights(0),),
            "rolled back at step 10 %",
            id="half-the-canary-failing-rolls-back",
        ),
        pytest.param(
            progressing(),
            obs(blue=(50, 0), green=(450, 0), at=30.0),
            30.0,
            Phase.PROGRESSING,
            Verdict.INCONCLUSIVE,
            (),
            "50 of 100 canary requests",
            id="too-few-canary-requests-waits",
        ),
        pytest.param(
            progressing(),
            obs(blue=(99, 0), green=(891, 0), at=30.0),
            30.0,
            Phase.PROGRESSING,
            Verdict.INCONCLUSIVE,
            (),
            "99 of 100 canary requests",
            id="one-canary-request-short-of-min-requests-waits",
        ),
        pytest.param(
            progressing(),
            obs(blue=(100, 0), green=(900, 0), at=30.0),
            30.0,
            Phase.PROGRESSING,
            Verdict.SUCCESSFUL,
            (SetWeights(50),),
            "blue to 50 %",
            id="exactly-min-requests-advances",
        ),
        pytest.param(
            progressing(),
            obs(blue=(150, 0), green=(1350, 1), at=5.0),
            5.0,
            Phase.PROGRESSING,
            Verdict.INCONCLUSIVE,
            (),
            "younger than",
            id="step-younger-than-one-interval-waits",
        ),
        pytest.param(
            progressing(),
            obs(blue=(150, 0), green=(1350, 1), at=30.0),
            30.0,
            Phase.PROGRESSING,
            Verdict.SUCCESSFUL,
            (SetWeights(50),),
            "blue to 50 %",
            id="healthy-step-advances-to-the-next-weight",
        ),
        pytest.param(
            progressing(step_index=1, weight=50),
            obs(blue=(500, 0), green=(500, 1), at=30.0),
            30.0,
            Phase.PROGRESSING,
            Verdict.INCONCLUSIVE,
            (),
            "not yet shown",
            id="last-step-needs-not-worse-evidence-not-silence",
        ),
        pytest.param(
            with_ok_evidence(progressing(step_index=1, weight=50)),
            obs(blue=(500, 0), green=(500, 1), at=30.0),
            30.0,
            Phase.PROMOTING,
            Verdict.SUCCESSFUL,
            (SetWeights(100),),
            "not worse",
            id="last-step-with-evidence-promotes-blue-100",
        ),
        pytest.param(
            replace(progressing(), phase=Phase.PROMOTING, blue_weight=100),
            None,
            40.0,
            Phase.FINALISING,
            None,
            (Deploy(Colour.GREEN, V2),),
            "Blue_Green",
            id="promoting-deploys-the-candidate-to-green",
        ),
        pytest.param(
            replace(progressing(), phase=Phase.FINALISING, blue_weight=100),
            None,
            40.0,
            Phase.SUCCEEDED,
            None,
            (SetWeights(0), Remove(Colour.BLUE)),
            "Green_100",
            id="finalising-returns-traffic-to-green-and-removes-blue",
        ),
        pytest.param(
            replace(progressing(), phase=Phase.ROLLING_BACK, blue_weight=0),
            None,
            40.0,
            Phase.ROLLED_BACK,
            None,
            (),
            "",
            id="rolling-back-ends-rolled-back",
        ),
        pytest.param(
            replace(progressing(), phase=Phase.PAUSED, reason="paused by ann"),
            obs(blue=(200, 12), green=(1800, 2), at=30.0),
            30.0,
            Phase.ROLLING_BACK,
            Verdict.FAILED,
            (SetWeights(0),),
            "rolled back",
            id="paused-still-rolls-back-a-clear-regression",
        ),
        pytest.param(
            replace(progressing(), phase=Phase.PAUSED, reason="paused by ann"),
            obs(blue=(150, 0), green=(1350, 1), at=30.0),
            30.0,
            Phase.PAUSED,
            Verdict.SUCCESSFUL,
            (),
            "paused by ann",
            id="paused-never-advances",
        ),
        pytest.param(
            progressing(last_blue=replace(progressing().last_blue, requests=500)),
            obs(blue=(100, 50), green=(900, 0), at=30.0),
            30.0,
            Phase.PROGRESSING,
            Verdict.INCONCLUSIVE,
            (),
            "",
            id="counter-reset-skips-the-tick-instead-of-guessing",
        ),
    ],
)
def test_step(
    status: Status,
    observation: Any,
    now: float,
    phase: Phase,
    verdict: Verdict | None,
    actions: tuple[Any, ...],
    reason: str,
) -> None:
    decision = step(SPEC, status, observation, now)
    assert decision.status.phase is phase
    assert decision.status.verdict == verdict
    assert decision.actions == actions
    assert reason in decision.status.reason
    assert decision.record["tick"] == status.tick + 1


def test_inconclusive_with_rollback_policy_rolls_back() -> None:
    spec = make_spec(analysis={"on_inconclusive": "rollback"})
    decision = step(spec, progressing(), obs(), 600.0)
    assert decision.status.phase is Phase.ROLLING_BACK
    assert decision.actions == (SetWeights(0),)
    assert decision.status.verdict is Verdict.INCONCLUSIVE


def test_absolute_guard_fires_before_the_relative_test() -> None:
    spec = make_spec(analysis={"errors": {"max_rate": 0.05}})
    # No baseline traffic at all: the relative test is blind, the SLO guard is not.
    decision = step(spec, progressing(), obs(blue=(400, 100), green=(0, 0), at=30.0), 30.0)
    assert decision.status.phase is Phase.ROLLING_BACK
    assert "above the limit" in decision.status.reason


def test_a_rollback_both_checks_cross_at_once_states_a_threshold_the_e_value_passed() -> None:
    # Each check's evidence alone past 1/α: the one named "had to reach" (1/α - the other's
    # share) / its weight, which was negative: "e-value 3.1e+35 > -5.89e+23".
    spec = make_spec(
        analysis={
            "latency": {"enabled": True, "threshold": "slo", "slo_ms": 100},
            "errors": {"max_rate": None},
        }
    )
    start = step(spec, new_status(spec, now=0.0), None, 0.0).status
    decision = step(
        spec,
        start,
        obs(
            blue=(200, 40),
            green=(1800, 2),
            at=10.0,
            since=0.0,
            blue_buckets=((0.1, 160), (math.inf, 200)),
            green_buckets=((0.1, 1782), (math.inf, 1800)),
        ),
        10.0,
    )
    assert decision.status.phase is Phase.ROLLING_BACK
    found = re.search(r"e-value (\S+) > (\S+) after", decision.status.reason)
    assert found is not None, decision.status.reason
    assert 0 < float(found.group(2)) <= float(found.group(1)), decision.status.reason


def test_a_canary_no_check_can_judge_is_never_stepped_up_nor_promoted() -> None:
    # Errors off, latency on, a metrics source with no histogram: no check was active, every
    # step "passed: no evidence of a regression", and the last promoted a canary failing half
    # its requests ("canary not worse: latency not judged").
    spec = make_spec(analysis={"errors": {"enabled": False}, "latency": {"enabled": True}})
    status = step(spec, new_status(spec, now=0.0), None, 0.0).status
    for now in range(10, 400, 10):
        w = status.blue_weight
        seen = obs(blue=(now * w, now * w // 2), green=(now * (100 - w), 0), at=now, since=0.0)
        status = step(spec, status, seen, float(now)).status
        assert status.blue_weight == 10 and status.phase is Phase.PROGRESSING, status.reason
    assert status.verdict is Verdict.INCONCLUSIVE
    assert "nothing judges this canary" in status.reason, status.reason


def test_a_guard_at_100_percent_never_fires_on_more_errors_than_requests() -> None:
    # Counts from two series (errors and requests) can disagree by a scrape: 12 errors of 10
    # requests against `max_rate: 1` was "133 % is above the limit 100 % (e-value nan ≥ 1000)".
    spec = make_spec(analysis={"errors": {"max_rate": 1.0}})
    decision = step(spec, progressing(), obs(blue=(10, 12), green=(1000, 1), at=30.0), 30.0)
    assert "above the limit" not in decision.status.reason
    assert decision.status.phase is not Phase.ROLLING_BACK or "nan" not in decision.status.reason


def cmd(kind: str, weight: int | None = None, ident: str = "c1") -> Command:
    return Command(id=ident, kind=kind, weight=weight, by="ann")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("start", "command", "phase", "weight", "actions", "reason"),
    [
        pytest.param(
            progressing(), cmd("pause"), Phase.PAUSED, 10, (), "paused by ann", id="pause"
        ),
        pytest.param(
            replace(progressing(), phase=Phase.PAUSED),
            cmd("resume"),
            Phase.PROGRESSING,
            10,
            (),
            "resumed by ann",
            id="resume",
        ),
        pytest.param(
            progressing(),
            cmd("abort"),
            Phase.ROLLING_BACK,
            0,
            (SetWeights(0),),
            "aborted by ann",
            id="abort-sends-blue-to-zero-at-once",
        ),
        pytest.param(
            progressing(),
            cmd("promote"),
            Phase.PROMOTING,
            100,
            (SetWeights(100),),
            "analysis skipped",
            id="promote-skips-analysis",
        ),
        pytest.param(
            progressing(),
            cmd("set_weight", 50),
            Phase.PROGRESSING,
            50,
            (SetWeights(50),),
            "weight set to 50 %",
            id="set-weight-jumps-to-a-planned-step",
        ),
        pytest.param(
            progressing(),
            cmd("set_weight", 30),
            Phase.PROGRESSING,
            10,
            (),
            "",
            id="set-weight-outside-the-plan-is-ignored",
        ),
        pytest.param(
            progressing(),
            cmd("set_weight", 100),
            Phase.PROMOTING,
            100,
            (SetWeights(100),),
            "promoting",
            id="set-weight-100-promotes",
        ),
        pytest.param(
            new_status(SPEC, now=0.0),
            cmd("abort"),
            Phase.ROLLED_BACK,
            0,
            (),
            "aborted by ann before its first tick: blue was given nothing",
            id="abort-before-the-first-tick-comes-first",
        ),
        pytest.param(
            replace(progressing(), phase=Phase.SUCCEEDED, blue_weight=0),
            cmd("abort"),
            Phase.SUCCEEDED,
            0,
            (),
            "",
            id="commands-after-the-end-are-ignored",
        ),
    ],
)
def test_commands(
    start: Status,
    command: Command,
    phase: Phase,
    weight: int,
    actions: tuple[Any, ...],
    reason: str,
) -> None:
    decision = step(SPEC, with_commands(start, [command]), obs(at=30.0), 30.0)
    assert decision.status.phase is phase
    assert decision.status.blue_weight == weight
    assert decision.actions == actions
    assert reason in decision.status.reason
    assert decision.status.commands == ()
    assert decision.status.commands_read == 1


@pytest.mark.parametrize(
    ("start", "ends"),
    [
        pytest.param(
            replace(progressing(), phase=Phase.FINALISING, blue_weight=100),
            Phase.SUCCEEDED,
            id="queued-while-finalising",
        ),
        pytest.param(
            replace(progressing(), phase=Phase.ROLLING_BACK, blue_weight=0),
            Phase.ROLLED_BACK,
            id="queued-while-rolling-back",
        ),
    ],
)
def test_commands_left_queued_at_the_end_are_dropped_with_a_note(
    start: Status, ends: Phase
) -> None:
    """Phases on their way to an end read no command; once ended, the status keeps none of
    them (`status` showed an abort queued for ever) and the ledger says each was dropped."""
    status = with_commands(start, [cmd("abort"), cmd("promote", ident="c2")])
    notes: list[str] = []
    for t in (30.0, 31.0, 32.0):
        decision = step(SPEC, status, None, t)
        status = decision.status
        notes += decision.record.get("commands", [])
        if status.terminal:
            break
    assert status.phase is ends and status.commands == ()
    assert notes == [
        f"abort by ann: dropped, not acted on: the rollout ended {ends.value} first",
        f"promote by ann: dropped, not acted on: the rollout ended {ends.value} first",
    ]


def test_an_abort_read_while_promoting_rolls_back_to_green() -> None:
    """Was: ignored, then dropped. A promotion whose weights the router refuses for good (its
    namespace or endpoint gone) stopped every `run` in Promoting, and could not be aborted.
    Green still serves the stable release until Finalising: blue to 0 % undoes it."""
    promoting = replace(progressing(), phase=Phase.PROMOTING, blue_weight=100)
    status = with_commands(promoting, [cmd("pause", ident="c0"), cmd("abort")])
    decision = step(SPEC, status, None, 30.0)
    assert decision.status.phase is Phase.ROLLING_BACK
    assert decision.status.blue_weight == 0 and decision.actions == (SetWeights(0),)
    assert decision.status.reason == (
        "aborted by ann while promoting: blue back to 0 %, green keeps serving diabetes:1 "
        "(the promotion of diabetes:2 abandoned)"
    )
    assert decision.record["commands"] == [f"abort: {decision.status.reason}"]
    ended = step(SPEC, decision.status, None, 31.0)
    assert ended.status.phase is Phase.ROLLED_BACK and ended.status.commands == ()
    assert ended.record["commands"] == [
        "pause by ann: dropped, not acted on: the rollout ended RolledBack first"
    ]
    other = with_commands(promoting, [replace(cmd("abort"), rollout="an-earlier-one")])
    assert step(SPEC, other, None, 30.0).status.phase is Phase.FINALISING
    # Read in one batch after a promote: the promotion's weights are never sent.
    both = with_commands(progressing(), [cmd("promote", ident="c0"), cmd("abort")])
    decision = step(SPEC, both, obs(at=30.0), 30.0)
    assert decision.status.phase is Phase.ROLLING_BACK and decision.actions == (SetWeights(0),)
    assert "while promoting" in decision.status.reason


HELD = replace(progressing(), phase=Phase.PAUSED, held=True, reason="held for a human: ...")


@pytest.mark.parametrize(
    ("start", "command"),
    [
        pytest.param(HELD, cmd("promote"), id="promote-of-a-held-rollout"),
        pytest.param(HELD, cmd("set_weight", 50), id="set-weight-of-a-held-rollout"),
        pytest.param(HELD, cmd("resume"), id="resume-of-a-held-rollout"),
        pytest.param(HELD, cmd("pause"), id="pause-of-a-held-rollout"),
        pytest.param(progressing(), cmd("promote"), id="promote-while-progressing"),
        pytest.param(progressing(), cmd("set_weight", 100), id="set-weight-100-promotes"),
        pytest.param(progressing(), cmd("pause"), id="pause-while-progressing"),
    ],
)
def test_counts_that_fail_the_candidate_win_over_the_commands_of_their_tick(
    start: Status, command: Command
) -> None:
    """Was: the commands were obeyed and the tick never judged. A `run` restarted to obey a
    human's answer to a hold folds the whole hold's counts in its first tick: a 50 %-error
    candidate was promoted (or set to 50 %, or resumed and rolled back an interval late)."""
    status = with_commands(start, [command])
    decision = step(SPEC, status, obs(blue=(5000, 2500), green=(45000, 450), at=30.0), 30.0)
    assert decision.status.phase is Phase.ROLLING_BACK, decision.status.reason
    assert decision.actions == (SetWeights(0),)
    assert decision.status.verdict is Verdict.FAILED
    assert decision.status.reason.startswith("rolled back at step 10 %: canary error")
    assert decision.status.commands == ()
    assert decision.record["commands"] == [
        f"{command.kind} by ann: dropped, not acted on: this tick's counts fail the candidate"
    ]


@pytest.mark.parametrize(
    ("reading", "phase"),
    [
        pytest.param(obs(blue=(5000, 2500), green=(45000, 450), at=30.0), Phase.ROLLING_BACK),
        pytest.param(obs(blue=(500, 1), green=(4500, 10), at=30.0), Phase.PROMOTING),
        pytest.param(obs(error="prometheus: connection refused", at=30.0), Phase.PROMOTING),
    ],
    ids=["failed-counts", "clean-counts", "unreadable-metrics"],
)
def test_an_abort_rolls_back_as_before_and_a_promote_acts_unless_the_counts_fail(
    reading: Any, phase: Phase
) -> None:
    aborted = step(SPEC, with_commands(HELD, [cmd("abort")]), reading, 30.0)
    assert aborted.status.phase is Phase.ROLLING_BACK
    assert aborted.status.reason == "aborted by ann: blue back to 0 %"
    promoted = step(SPEC, with_commands(HELD, [cmd("promote")]), reading, 30.0)
    assert promoted.status.phase is phase


def test_a_pause_of_a_held_rollout_makes_it_an_operator_s_pause_that_keeps_why() -> None:
    """Was: still held, its reason overwritten: `run` returned at once (exit 4), and `status`
    no longer said why it had been held."""
    decision = step(SPEC, with_commands(HELD, [cmd("pause")]), obs(at=30.0), 30.0)
    assert decision.status.phase is Phase.PAUSED and not decision.status.held
    assert decision.status.reason == "paused by ann (was held for a human: ...)"


def test_a_command_is_handled_once_even_if_delivered_again() -> None:
    first = step(SPEC, with_commands(progressing(), [cmd("pause")]), obs(at=30.0), 30.0)
    again = with_commands(first.status, [cmd("pause")])
    assert again.commands == ()


def test_a_long_command_log_is_read_once_however_long() -> None:
    """Each command is handled once, also past the 64 ids an earlier version remembered."""
    log = [cmd("set_weight", 25, "w25"), cmd("set_weight", 50, "w50")]
    log += [cmd("resume", ident=f"r{i}") for i in range(100)]
    status = step(SPEC, with_commands(progressing(), log), obs(at=30.0), 30.0).status
    assert status.blue_weight == 50 and status.commands_read == 102
    for t in (40.0, 50.0):
        decision = step(SPEC, with_commands(status, log), obs(at=t), t)
        assert "commands" not in decision.record and decision.status.blue_weight == 50
        status = decision.status


def test_a_command_queued_for_an_earlier_rollout_is_ignored() -> None:
    status = replace(progressing(), id="run-2")
    stale = replace(cmd("promote"), rollout="run-1")
    decision = step(SPEC, with_commands(status, [stale]), obs(at=30.0), 30.0)
    assert decision.status.phase is Phase.PROGRESSING and decision.actions == ()
    assert decision.record["commands"] == [
        "promote by ann: ignored, queued for an earlier rollout of t"
    ]
    aimed = replace(cmd("pause", ident="c2"), rollout="run-2")
    assert (
        step(SPEC, with_commands(status, [aimed]), obs(at=30.0), 30.0).status.phase is Phase.PAUSED
    )


def test_a_new_rollout_does_not_read_the_commands_of_the_previous_one() -> None:
    log = [cmd("promote", ident="old")]
    status = new_status(SPEC, now=0.0, rollout_id="run-2", commands_read=len(log))
    assert with_commands(status, log) is status


def test_a_line_that_is_no_command_is_skipped() -> None:
    """A line this version cannot read (a newer kind, edited by hand) is None in the log."""
    log = [cmd("pause", ident="c1"), None, cmd("resume", ident="c3")]
    status = with_commands(progressing(), log)
    assert [c.id for c in status.commands] == ["c1", "c3"] and status.commands_tail == ("c1", "c3")
    handled = replace(status, commands=())
    assert with_commands(handled, log) is handled


def read(status: Status, log: list[Command | None]) -> list[str]:
    return [c.id for c in with_commands(status, log).commands]


def test_reading_goes_on_after_the_commands_read_whatever_the_log_became() -> None:
    log = [cmd("set_weight", 50, "w50"), cmd("pause", ident="p"), cmd("resume", ident="r")]
    status = replace(with_commands(progressing(), log), commands=())
    assert status.commands_read == 3 and status.commands_tail == ("w50", "p", "r")
    # lines already read deleted or garbled by hand: nothing replayed, the next one read
    assert read(status, [log[0], log[2], cmd("abort", ident="a")]) == ["a"]
    assert read(status, [log[0], log[1]]) == []  # the last one read deleted
    assert read(status, [log[0], log[1], None]) == []  # ... or garbled
    # the log deleted and begun again (its own new commands only), however long it is now
    assert read(status, [cmd("abort", ident="a1")]) == ["a1"]
    again = [cmd("resume", ident=f"n{i}") for i in range(5)]
    assert read(status, again) == [f"n{i}" for i in range(5)]


def test_a_command_pushed_twice_is_read_once() -> None:
    """A push retried after its answer was lost, or a line copied by hand: one command."""
    x, y = cmd("pause", ident="x"), cmd("resume", ident="y")
    both = with_commands(progressing(), [x, y, x])
    assert [c.id for c in both.commands] == ["x", "y"]
    assert with_commands(replace(both, commands=()), [x, y, x]).commands == ()
    first = replace(with_commands(progressing(), [x]), commands=())
    assert read(first, [x, y, x]) == ["y"]  # the copy after y hides nothing


def test_a_status_saved_by_an_earlier_version_reads_on_where_it_stopped() -> None:
    """Its `commands_read` counted only the lines it could read: a torn line before its
    position must not shift it (which would replay a command)."""
    log = [cmd("pause", ident="p"), None, cmd("resume", ident="r"), cmd("abort", ident="a")]
    saved = {**progressing().to_dict(), "commands_read": 2}
    del saved["commands_tail"]
    old = Status.from_dict(saved)
    assert old.commands_tail is None
    assert read(old, log) == ["a"]
    assert read(old, log[:3]) == []


def test_a_command_log_begun_again_is_read_from_its_start() -> None:
    """A log shorter than the position read, with no command read yet, was begun again."""
    status = replace(progressing(), commands_read=5)
    restarted = with_commands(status, [cmd("abort", ident="a1")])
    assert [c.id for c in restarted.commands] == ["a1"] and restarted.commands_read == 1
    assert with_commands(status, []) is status


def test_a_status_file_from_before_commands_read_skips_handled_ids() -> None:
    saved = progressing().to_dict()
    del saved["commands_read"]
    old = Status.from_dict({**saved, "handled": ["c1"]})
    assert old.commands_read == -1
    status = with_commands(old, [cmd("pause", ident="c1"), cmd("abort", ident="c2")])
    assert [c.id for c in status.commands] == ["c2"] and status.commands_read == 2
    assert status.handled == ()


def test_seed_plan_starts_at_zero_and_advances_without_analysis_when_nothing_is_mirrored() -> None:
    spec = make_spec(steps="seed", mirror_percent=0)
    start = step(spec, new_status(spec, now=0.0), None, 0.0)
    assert start.actions == (Deploy(Colour.BLUE, V2), SetWeights(0))
    nxt = step(spec, start.status, obs(green=(100, 0), at=10.0), 10.0)
    assert nxt.actions == (SetWeights(50),)


def test_seed_plan_judges_blue_0_on_mirrored_traffic_by_default() -> None:
    spec = make_spec(steps="seed")
    start = step(spec, new_status(spec, now=0.0), None, 0.0)
    assert start.actions == (Deploy(Colour.BLUE, V2), SetWeights(0, mirror=5))
    waiting = step(spec, start.status, obs(blue=(5, 0), green=(100, 0), at=10.0), 10.0)
    assert waiting.actions == ()


@pytest.mark.parametrize(
    ("buckets", "chosen"),
    [
        pytest.param(((0.025, 700), (0.05, 989), (0.1, 1000)), 0.05, id="near-p99"),
        pytest.param(((0.025, 700), (0.05, 950), (0.1, 1000)), 0.05, id="5 %-above-kept"),
        # A tight baseline (15 ms, sigma 0.1) between the 10 and 25 ms bounds: 10 ms had all of
        # it above, and a candidate at 30 ms (also all above) was promoted every time.
        pytest.param(((0.01, 0), (0.025, 1000), (0.05, 1000)), 0.025, id="tight-all-between"),
        pytest.param(((0.01, 0), (0.025, 999), (0.05, 1000)), 0.025, id="tight-0.1 %-above"),
        pytest.param(((0.01, 850), (0.025, 1000), (0.05, 1000)), 0.025, id="15 %-above"),
        pytest.param(((0.01, 1000), (0.025, 1000)), 0.01, id="none-above-the-first"),
        # Slower than every finite bound: blind whichever is taken (was: the first, and a 3×
        # slower canary was promoted), so none is (`test_green_s_p99_above_every_bound...`).
        pytest.param(((0.01, 0), (0.025, 0), (math.inf, 1000)), None, id="above-every-bound"),
        pytest.param(((0.01, 0), (0.025, 50), (math.inf, 1000)), None, id="95 %-above-the-last"),
        pytest.param(((0.01, 0), (0.025, 250), (math.inf, 1000)), None, id="75 %-above-the-last"),
        # Half to three quarters above: "not worse" cannot be told there (`_vacuous`), but a
        # slower canary still can (was: none taken, a 3× slower canary stepped up unjudged).
        pytest.param(((0.01, 0), (0.025, 260), (math.inf, 1000)), 0.025, id="74 %-above-the-last"),
        pytest.param(((0.01, 0), (0.025, 500), (math.inf, 1000)), 0.025, id="half-above-the-last"),
        # A tail above the last bound that still tells a slower canary: it is judged there.
        pytest.param(((0.01, 0), (0.025, 510), (math.inf, 1000)), 0.025, id="49 %-above-the-last"),
        pytest.param(((0.01, 0), (0.025, 850), (math.inf, 1000)), 0.025, id="15 %-above-the-last"),
        pytest.param(((0.01, 0), (0.025, 950), (math.inf, 1000)), 0.025, id="5 %-above-the-last"),
    ],
)
def test_latency_threshold_is_chosen_near_the_baseline_p99(
    buckets: tuple[tuple[float, int], ...], chosen: float | None
) -> None:
    assert p99_bucket(ColourCounts(requests=1000, latency_buckets=buckets)) == chosen


def test_no_latency_threshold_without_a_finite_bound() -> None:
    assert p99_bucket(ColourCounts(requests=1000)) is None
    only_inf = ColourCounts(requests=1000, latency_buckets=((math.inf, 1000),))
    assert p99_bucket(only_inf) is None  # no bound to count slow requests above


def test_slow_requests_roll_back_a_latency_regression() -> None:
    spec = make_spec(analysis={"latency": {"enabled": True}})
    status = progressing()
    base = ((0.025, 0), (0.05, 0), (0.1, 0))

    def hist(n: int, slow: int) -> tuple[tuple[float, int], ...]:
        return tuple((b, n - slow if b >= 0.05 else 0) for b, _ in base)

    # First tick: 900 baseline requests fix the threshold at the 50 ms bucket.
    status = step(
        spec,
        status,
        obs(
            blue=(100, 0),
            green=(900, 0),
            at=10.0,
            blue_buckets=hist(100, 1),
            green_buckets=hist(900, 9),
        ),
        10.0,
    ).status
    assert status.slow_threshold_s == 0.05
    total_b, total_g, slow_b, slow_g = 100, 900, 1, 9
    decision = None
    for tick in range(2, 30):
        total_b, total_g, slow_b, slow_g = total_b + 100, total_g + 900, slow_b + 6, slow_g + 9
        decision = step(
            spec,
            status,
            obs(
                blue=(total_b, 0),
                green=(total_g, 0),
                at=tick * 2.0,
                blue_buckets=hist(total_b, slow_b),
                green_buckets=hist(total_g, slow_g),
            ),
            tick * 2.0,
        )
        status = decision.status
        if status.phase is Phase.ROLLING_BACK:
            break
    assert decision is not None
    assert status.phase is Phase.ROLLING_BACK
    assert "slow-request rate (> 50 ms)" in status.reason


def test_status_round_trips_through_json() -> None:
    status = with_ok_evidence(progressing())
    status = with_commands(status, [cmd("pause")])
    decision = step(SPEC, status, obs(blue=(150, 0), green=(1350, 1), at=30.0), 30.0)
    saved = replace(decision.status, pending=decision.actions)
    assert Status.from_dict(saved.to_dict()) == saved


@pytest.mark.parametrize(
    ("buckets", "said"),
    [
        pytest.param((), "reports no histogram", id="no-histogram"),
        # Was: +Inf taken for the threshold, the slow count unknown for good, every step held
        # ("not yet shown slow-request rate (> inf ms)").
        pytest.param(((math.inf, 700),), "reports no finite latency bucket", id="only-inf-bucket"),
    ],
)
def test_without_a_histogram_latency_is_said_to_be_unjudged_not_silently_passed(
    buckets: tuple[tuple[float, int], ...], said: str
) -> None:
    spec = make_spec(analysis={"latency": {"enabled": True}})
    status = with_ok_evidence(progressing(step_index=1, weight=50))
    observation = obs(
        blue=(700, 0), green=(700, 1), at=30.0, blue_buckets=buckets, green_buckets=buckets
    )
    decision = step(spec, status, observation, 30.0)
    assert decision.status.phase is Phase.PROMOTING
    assert decision.status.slow_threshold_s is None
    assert f"latency not judged (the metrics source {said})" in decision.status.reason


LATENCY_SPEC = make_spec(analysis={"latency": {"enabled": True}})
#: A histogram with a finite bound and none of its requests above it.
FAST = ((0.05, 700), (0.1, 700))


@pytest.mark.parametrize(
    ("status", "observation", "said"),
    [
        pytest.param(
            # Errors shown not worse, latency judged but not yet shown: one check is not all.
            with_ok_evidence(progressing(step_index=1, weight=50, slow_threshold_s=0.05)),
            obs(blue=(700, 0), green=(700, 1), at=30.0, blue_buckets=FAST, green_buckets=FAST),
            "not yet shown slow-request rate",
            id="errors-shown-latency-not",
        ),
        pytest.param(
            # Green's histogram has bounds but too few requests (< MIN_BASELINE_FOR_P99) for its
            # p99: the threshold is coming, so promotion waits for it instead of skipping it.
            with_ok_evidence(progressing(step_index=1, weight=50)),
            obs(
                blue=(300, 0),
                green=(300, 1),
                at=30.0,
                blue_buckets=((0.05, 300), (0.1, 300)),
                green_buckets=((0.05, 300), (0.1, 300)),
            ),
            "latency threshold not chosen yet",
            id="errors-shown-latency-threshold-not-chosen-yet",
        ),
    ],
)
def test_promotion_needs_not_worse_evidence_on_every_check(
    status: Status, observation: Any, said: str
) -> None:
    decision = step(LATENCY_SPEC, status, observation, 30.0)
    assert decision.status.phase is Phase.PROGRESSING
    assert decision.status.verdict is Verdict.INCONCLUSIVE
    assert "error rate shown" not in decision.status.reason  # "not yet shown" names the missing
    assert said in decision.status.reason
    assert decision.actions == ()


# ------------------------------------------------ "not worse" = < max_ratio × baseline OR below δ


def drive_last_step(
    spec: RolloutSpec, blue: tuple[int, int], green: tuple[int, int], ticks: int
) -> Status:
    """Tick the last step (50 %) with the same (requests, errors) per colour each 10 s tick."""
    status = progressing(step_index=1, weight=50)
    (nb, kb), (ng, kg) = blue, green
    for tick in range(1, ticks + 1):
        at = tick * 10.0
        observation = obs(blue=(nb * tick, kb * tick), green=(ng * tick, kg * tick), at=at)
        status = step(spec, status, observation, at).status
        if status.phase is not Phase.PROGRESSING:
            break
    return status


CLEAN_SPEC = make_spec(analysis={"max_step_duration_s": 36000})
#: ln(2/α)/δ: canary requests a clean canary needs at α = 0.05, δ = 0.1 % (the mean halves e).
CLEAN_N = math.log(2 / 0.05) / 0.001


@pytest.mark.parametrize(
    ("spec", "blue", "green", "phase", "reason"),
    [
        pytest.param(
            CLEAN_SPEC,
            (100, 0),
            (100, 0),
            Phase.PROMOTING,
            "error rate shown < 0.1 % (e-value",
            id="zero-errors-on-both-sides-promotes-on-the-negligible-rate",
        ),
        pytest.param(
            make_spec(analysis={"max_step_duration_s": 3000, "errors": {"negligible_rate": 0}}),
            (100, 0),
            (100, 0),
            Phase.PAUSED,
            "not yet shown error rate < 2× baseline (e-value 1 < 20 after 30,000 canary requests)",
            id="negligible-rate-0-turns-it-off-a-clean-service-is-held",
        ),
        pytest.param(
            CLEAN_SPEC,
            (1000, 2),
            (1000, 0),
            Phase.ROLLING_BACK,
            "rolled back",
            id="canary-errors-above-delta-and-none-on-the-baseline-is-not-promoted",
        ),
        pytest.param(
            make_spec(analysis={"max_step_duration_s": 3000}),
            (1, 0),
            (1, 0),
            Phase.PAUSED,
            "after 300 canary requests",
            id="a-clean-canary-still-needs-its-requests-low-traffic-holds",
        ),
        pytest.param(
            CLEAN_SPEC,
            (5000, 1),
            (5000, 0),
            Phase.PROMOTING,
            "error rate shown < 0.1 %",
            id="a-canary-error-rate-well-below-delta-promotes-though-the-baseline-has-none",
        ),
        pytest.param(
            make_spec(
                analysis={"max_step_duration_s": 36000, "errors": {"negligible_rate": 0.0001}}
            ),
            (5000, 1),
            (5000, 0),
            Phase.ROLLING_BACK,
            "canary error rate 0.02 % vs 0 % baseline",
            id="the-same-canary-above-a-stricter-delta-is-not-promoted",
        ),
    ],
)
def test_negligible_rate(
    spec: RolloutSpec,
    blue: tuple[int, int],
    green: tuple[int, int],
    phase: Phase,
    reason: str,
) -> None:
    status = drive_last_step(spec, blue, green, ticks=400)
    assert status.phase is phase
    assert reason in status.reason


def test_a_clean_canary_promotes_after_about_ln_2_over_alpha_over_delta_requests() -> None:
    status = drive_last_step(CLEAN_SPEC, (50, 0), (50, 0), ticks=400)
    assert status.phase is Phase.PROMOTING
    # The prior's weight on "rate ≈ 0" (0.6) and the grid point at δ/20 cost ~20 % over the bound.
    assert CLEAN_N <= status.errors.canary_requests <= 1.3 * CLEAN_N
    assert f"after {status.errors.canary_requests:,} canary requests" in status.reason


def test_a_status_file_from_before_the_negligible_rate_test_still_loads() -> None:
    status = with_ok_evidence(progressing())
    data = status.to_dict()
    for key in ("low", "log_e_ratio", "log_e_low"):
        del data["errors"][key]
    loaded = Status.from_dict(data)
    assert loaded.errors.log_e_ratio() == status.errors.log_e_ok()
    assert loaded.errors.log_e_low() == 0.0


@pytest.mark.parametrize(
    ("errors_e", "slow_e", "phase", "reason"),
    [
        # 0.75 × 30 + 0.25 × 1 = 22.75 ≥ 20: errors alone needed (20 − 0.25) / 0.75 = 26.3.
        pytest.param(30.0, 1.0, Phase.ROLLING_BACK, "e-value 30 > 26.3", id="errors-weighted-3/4"),
        # Below the rollback threshold but above 1: held at its weight, not stepped up.
        pytest.param(25.0, 1.0, Phase.PROGRESSING, "not stepping up", id="errors-below-share"),
        # 0.25 × 70 + 0.75 × 1 = 18.25 < 20: slow requests alone need (20 − 0.75) / 0.25 = 77.
        pytest.param(1.0, 70.0, Phase.PROGRESSING, "not stepping up", id="latency-below-share"),
        pytest.param(1.0, 80.0, Phase.ROLLING_BACK, "> 77", id="latency-weighted-1/4"),
        pytest.param(20.0, 40.0, Phase.ROLLING_BACK, "e-value 20 > 13.3", id="both-add-up"),
    ],
)
def test_the_worse_e_value_is_a_weighted_mean_of_the_checks(
    errors_e: float, slow_e: float, phase: Phase, reason: str
) -> None:
    spec = make_spec(analysis={"latency": {"enabled": True}})
    status = replace(
        progressing(),
        errors=Evidence(log_e_worse_value=math.log(errors_e)),
        slow=Evidence(log_e_worse_value=math.log(slow_e)),
        slow_threshold_s=0.05,
    )
    decision = step(spec, status, obs(blue=(150, 0), green=(1350, 0), at=30.0), 30.0)
    assert decision.status.phase is phase
    assert reason in decision.status.reason


def test_a_fast_clean_service_with_a_latency_slo_promotes_on_both_negligible_rates() -> None:
    # SLO 250 ms, nobody slower: no slow requests and no errors on either side, so neither
    # ratio test can move; both checks are shown below their negligible rate.
    spec = make_spec(
        analysis={
            "max_step_duration_s": 36000,
            "latency": {"enabled": True, "threshold": "slo", "slo_ms": 250},
        }
    )

    def fast(n: int) -> tuple[tuple[float, int], ...]:
        return ((0.1, n), (0.25, n), (math.inf, n))

    status = progressing(step_index=1, weight=50)
    for tick in range(1, 200):
        n = 50 * tick
        observation = obs(
            blue=(n, 0), green=(n, 0), at=tick * 10.0, blue_buckets=fast(n), green_buckets=fast(n)
        )
        status = step(spec, status, observation, tick * 10.0).status
        if status.phase is not Phase.PROGRESSING:
            break
    assert status.phase is Phase.PROMOTING
    assert "error rate shown < 0.1 %" in status.reason
    assert "slow-request rate (> 250 ms) shown < 0.1 %" in status.reason


@pytest.mark.parametrize(
    ("errors_e", "hold_above_e", "now", "phase", "weight", "reason"),
    [
        pytest.param(
            3.0, 1.0, 30.0, Phase.PROGRESSING, 10, "not stepping up", id="leaning-worse-holds"
        ),
        pytest.param(
            1.0, 1.0, 30.0, Phase.PROGRESSING, 50, "blue to 50 %", id="no-events-e-1-steps-up"
        ),
        pytest.param(0.5, 1.0, 30.0, Phase.PROGRESSING, 50, "blue to 50 %", id="leaning-fine"),
        pytest.param(3.0, 5.0, 30.0, Phase.PROGRESSING, 50, "blue to 50 %", id="looser-hold"),
        pytest.param(15.0, None, 30.0, Phase.PROGRESSING, 50, "blue to 50 %", id="hold-off"),
        pytest.param(
            3.0, 1.0, 600.0, Phase.PAUSED, 10, "inconclusive after 600 s", id="held-until-max"
        ),
    ],
)
def test_a_step_does_not_step_up_while_the_evidence_leans_toward_a_regression(
    errors_e: float,
    hold_above_e: float | None,
    now: float,
    phase: Phase,
    weight: int,
    reason: str,
) -> None:
    spec = make_spec(analysis={"hold_above_e": hold_above_e})
    status = replace(progressing(), errors=Evidence(log_e_worse_value=math.log(errors_e)))
    decision = step(spec, status, obs(blue=(150, 0), green=(1350, 0), at=now), now)
    assert decision.status.phase is phase
    assert decision.status.blue_weight == weight
    assert reason in decision.status.reason


GREEN_BEFORE = obs(
    green=(2000, 0), green_buckets=((0.025, 1900), (0.05, 1980), (0.1, 2000), (math.inf, 2000))
)


@pytest.mark.parametrize(
    ("history", "latency", "threshold"),
    [
        pytest.param(GREEN_BEFORE, {"enabled": True}, 0.05, id="chosen-from-green-before-rollout"),
        pytest.param(
            obs(green=(400, 0), green_buckets=((0.05, 396), (math.inf, 400))),
            {"enabled": True},
            None,
            id="too-little-history-first-step-chooses",
        ),
        pytest.param(obs(error="down"), {"enabled": True}, None, id="unreadable-history"),
        pytest.param(None, {"enabled": True}, None, id="no-history"),
        pytest.param(
            GREEN_BEFORE,
            {"enabled": True, "threshold": "slo", "slo_ms": 250},
            None,
            id="an-slo-needs-no-history",
        ),
        pytest.param(GREEN_BEFORE, {"enabled": False}, None, id="latency-off"),
    ],
)
def test_the_slow_bucket_is_chosen_from_green_before_the_rollout(
    history: Any, latency: dict[str, Any], threshold: float | None
) -> None:
    spec = make_spec(analysis={"latency": latency})
    decision = step(spec, new_status(spec, now=0.0), history, 0.0)
    assert decision.status.phase is Phase.PROGRESSING
    assert decision.status.slow_threshold_s == threshold
    assert ("green's p99 bucket before the rollout" in decision.status.reason) == bool(threshold)


def test_with_the_bucket_chosen_before_the_rollout_the_first_tick_is_judged() -> None:
    spec = make_spec(analysis={"latency": {"enabled": True}})
    started = step(spec, new_status(spec, now=0.0), GREEN_BEFORE, 0.0).status
    buckets = ((0.05, 80), (math.inf, 100))  # 20 of 100 canary requests slower than 50 ms
    green = ((0.05, 891), (math.inf, 900))
    first = obs(blue=(100, 0), green=(900, 0), blue_buckets=buckets, green_buckets=green, at=10.0)
    status = step(spec, started, first, 10.0).status
    assert status.slow.canary_requests == 100 and status.slow.canary_bad == 20


# A plan edited between two runs of the controller: the stored step index is the old plan's.
CLEAN = obs((200, 0), (1800, 0), at=30.0)


def test_a_plan_edited_mid_rollout_goes_on_at_blue_s_weight_in_the_new_plan() -> None:
    """Blue at 10 %, step 0 of [10, 50, 100]; the plan is now [5, 10, 25, 100]: step 1 of it."""
    edited = make_spec(steps=[5, 10, 25, 100])
    decision = step(edited, with_ok_evidence(progressing(0, 10)), CLEAN, 30.0)
    assert decision.status.phase is Phase.PROGRESSING
    assert decision.actions == (SetWeights(25),)  # the new plan's next weight, not 50 nor 100
    assert decision.status.step_index == 2
    assert "now step 2 of [5, 10, 25, 100]" in decision.record["plan_changed"]


def test_a_plan_that_no_longer_has_blue_s_weight_holds_instead_of_promoting() -> None:
    """Blue at 10 % (step 0), the plan now [50, 100]: index 0 + 1 would look like the last step."""
    edited = make_spec(steps=[50, 100])
    decision = step(edited, with_ok_evidence(progressing(0, 10)), CLEAN, 30.0)
    assert decision.status.phase is Phase.PAUSED and decision.status.held
    assert decision.actions == ()
    assert decision.status.blue_weight == 10
    assert "which the plan [50, 100] no longer has" in decision.status.reason
    # the operator answers with a weight of the new plan; the step goes on from there
    moved = step(edited, with_commands(decision.status, [cmd("set_weight", 50)]), CLEAN, 40.0)
    assert moved.actions == (SetWeights(50),) and moved.status.step_index == 0


def test_a_resume_off_the_plan_is_refused_rather_than_held_again_one_tick_later() -> None:
    edited = make_spec(steps=[25, 50, 100])
    held = step(edited, progressing(0, 10), CLEAN, 30.0).status
    assert held.phase is Phase.PAUSED and held.held
    assert resume_refused(held, edited.plan) == resume_refused(held, [25, 50, 100]) != ""
    assert resume_refused(held, SPEC.plan) == ""
    decision = step(edited, with_commands(held, [cmd("resume")]), CLEAN, 40.0)
    assert decision.status.phase is Phase.PAUSED and decision.status.held
    assert decision.status.reason == held.reason
    assert decision.record["commands"] == [
        "resume: ignored, blue is at 10 %, which the plan [25, 50, 100] no longer has (`steps` "
        "changed since this step began): set-weight to a planned weight, promote or abort"
    ]


def test_off_the_plan_the_judge_still_rolls_back_a_regression() -> None:
    edited = make_spec(steps=[50, 100])
    bad = obs((400, 40), (3600, 3), at=30.0)
    decision = step(edited, progressing(0, 10), bad, 30.0)
    assert decision.status.phase is Phase.ROLLING_BACK
    assert decision.actions == (SetWeights(0),)


def test_a_plan_cut_short_below_the_stored_index_does_not_crash() -> None:
    edited = make_spec(steps=[50, 100])
    decision = step(edited, progressing(2, 75), CLEAN, 30.0)  # index 2 is past the new plan
    assert decision.status.phase is Phase.PAUSED and decision.status.blue_weight == 75


def test_counts_of_a_fresh_series_become_the_base_of_a_step_that_counted() -> None:
    """A simulated source redrawn in a new process: its counts are not an increase."""
    counted = step(SPEC, progressing(), obs((50, 0), (450, 0), at=10.0), 10.0).status
    assert counted.last_blue.requests == 50
    fresh = replace(obs((60, 9), (540, 0), at=20.0), fresh_series=True)
    rebased = step(SPEC, counted, fresh, 20.0)
    assert rebased.record["tick_counts"]["blue"] == {"requests": 0, "errors": 0, "slow": 0}
    assert rebased.status.errors.canary_bad == 0 and rebased.status.last_blue.errors == 9
    after = step(SPEC, rebased.status, obs((80, 9), (720, 1), at=30.0), 30.0)
    assert after.record["tick_counts"]["blue"]["requests"] == 20  # from the new base


def test_a_short_green_reading_is_not_counted_and_its_return_counts_only_the_increase() -> None:
    """Green's series missing for a scrape (an empty reading) while blue's grows: the base stays,
    or green's whole count would fold as one tick when it returns (the baseline inflated)."""
    counted = step(SPEC, progressing(), obs((50, 0), (450, 0), at=10.0), 10.0).status
    short = step(SPEC, counted, obs((60, 0), (0, 0), at=20.0), 20.0)
    assert short.record["tick_counts"]["not_counted"] == "a reading below the last one"
    assert short.status.last_green.requests == 450 and short.status.last_blue.requests == 50
    back = step(SPEC, short.status, obs((70, 0), (630, 0), at=30.0), 30.0)
    assert back.record["tick_counts"]["green"]["requests"] == 180
    assert back.record["tick_counts"]["blue"]["requests"] == 20


def test_a_fresh_series_at_a_step_that_counted_nothing_is_folded_in() -> None:
    fresh = replace(obs((200, 1), (1800, 0), at=10.0), fresh_series=True)
    decision = step(SPEC, progressing(), fresh, 10.0)
    assert decision.status.errors.canary_bad == 1


GUARDED = make_spec(
    analysis={
        "max_step_duration_s": 36000,
        "latency": {"enabled": True, "threshold": "slo", "slo_ms": 250, "max_slow_rate": 0.05},
    }
)


def slow_buckets(requests: int, slow: int) -> tuple[tuple[float, int], ...]:
    """A histogram with `slow` of `requests` above 250 ms."""
    return ((0.25, requests - slow), (math.inf, requests))


def guarded_tick(status: Status, tick: int, blue: tuple[int, int]) -> Status:
    """One tick of the GUARDED spec; `blue` = (requests, over 250 ms) since the step began."""
    observation = obs(
        blue=(blue[0], 0),
        green=(blue[0] * 9, 0),
        at=tick * 10.0,
        blue_buckets=slow_buckets(*blue),
        # Green as slow as blue: the relative test stays quiet, only the guard can act.
        green_buckets=slow_buckets(blue[0] * 9, blue[1] * 9),
    )
    return step(GUARDED, status, observation, tick * 10.0).status


def test_the_latency_guard_counts_over_the_rollout_not_afresh_at_each_step() -> None:
    # 10 of 60 canary requests over the SLO (17 % against a 5 % limit): not yet enough for the
    # guard's e-value (12 of 60 would be). Then a new step: 10 of 60 more. Pooled, 20 of 120
    # trip it (18 would); the new step's 60 requests alone would not.
    status = guarded_tick(progressing(slow_threshold_s=0.25), 1, (60, 10))
    assert status.phase is Phase.PROGRESSING and status.canary_over_slo == 10
    status = replace(status, step_index=1, blue_weight=50, last_blue=Counts(), last_green=Counts())
    status = guarded_tick(status, 2, (60, 10))
    assert status.canary_over_slo == 20 and status.errors.canary_requests == 120
    assert status.phase is Phase.ROLLING_BACK
    assert "slower than 250 ms: 17 % is above the limit 5 %" in status.reason
    assert "after 120 canary requests" in status.reason


@pytest.mark.parametrize(
    ("buckets", "slow"),
    [
        pytest.param((), 0, id="no-histogram"),  # the core says UNKNOWN itself, with requests
        pytest.param(((0.1, 50), (0.25, 80), (math.inf, 100)), 20, id="at-a-bound"),
        pytest.param(((0.1, 50), (0.5, 90)), 10, id="between-bounds-the-next-up"),
        pytest.param(((0.001, 0), (0.01, 100)), -1, id="above-every-finite-bound-unknown"),
        pytest.param(((0.001, 0), (0.01, 100), (math.inf, 100)), -1, id="only-inf-above"),
    ],
)
def test_slow_requests_above_a_threshold(buckets: tuple[tuple[float, int], ...], slow: int) -> None:
    # Above every finite bound the histogram cannot say: 0 switched the check and guard off.
    assert ColourCounts(requests=100, latency_buckets=buckets).slow(0.25) == slow


def test_a_threshold_above_every_bound_neither_folds_slow_requests_nor_trips_the_guard() -> None:
    # Every canary request took 2 s, read from a seconds histogram as if in milliseconds.
    ms = ((0.001, 0), (0.0025, 60), (0.01, 60))
    status = progressing(slow_threshold_s=0.25)
    observation = obs(blue=(60, 0), green=(540, 0), at=10.0, blue_buckets=ms, green_buckets=ms)
    decision = step(GUARDED, status, observation, 10.0)
    assert decision.status.last_blue.slow == decision.status.last_blue.over_slo == -1
    assert decision.status.slow.canary_requests == 0  # nothing folded as "0 slow"
    assert decision.status.canary_over_slo == 0


def test_a_status_saved_before_the_guard_counted_does_not_count_the_step_so_far_at_once() -> None:
    status = guarded_tick(progressing(slow_threshold_s=0.25), 1, (60, 10))
    old = status.to_dict()
    del old["canary_over_slo"], old["last_blue"]["over_slo"], old["last_green"]["over_slo"]
    resumed = Status.from_dict(old)
    assert resumed.last_blue.over_slo == -1 and resumed.canary_over_slo == 0
    # The step's slow requests so far cannot be paired with the requests counted: the guard
    # counts from the next tick on (all 20 against this tick's 60 would trip it).
    status = guarded_tick(resumed, 2, (120, 20))
    assert status.canary_over_slo == 0 and status.phase is Phase.PROGRESSING
    assert Status.from_dict(status.to_dict()) == status


def test_requests_of_unknown_latency_are_not_the_latency_guard_s_denominator() -> None:
    """Was: 1,000 canary requests without a histogram (slow count unknown) still counted as
    requests of the guard, diluting 40 of 200 over the SLO (20 %, limit 5 %) to 3 %."""
    spec = make_spec(
        analysis={
            "max_step_duration_s": 36000,
            "min_requests": 100_000,  # (no step up: the counts are the step's since it began)
            "latency": {"enabled": True, "threshold": "slo", "slo_ms": 250, "max_slow_rate": 0.05},
        }
    )

    def tick(status: Status, i: int, blue: int, over: int | None) -> Status:
        buckets = () if over is None else slow_buckets(blue, over)
        seen = obs(
            blue=(blue, 0),
            green=(9 * blue, 0),
            at=10.0 * i,
            blue_buckets=buckets,
            green_buckets=slow_buckets(9 * blue, 9 * (over or 0)),
        )
        return step(spec, status, seen, 10.0 * i).status

    status = tick(progressing(slow_threshold_s=0.25), 1, 1000, None)
    assert status.canary_slo_requests == 0 and status.errors.canary_requests == 1000
    # The histogram's return is the base (measured from a tick without one): counted after it.
    status = tick(status, 2, 1100, 0)
    assert status.canary_slo_requests == 0 and status.phase is Phase.PROGRESSING
    assert status.slow.canary_requests == 0  # nor is the latency check's evidence
    status = tick(status, 3, 1300, 40)
    assert status.canary_slo_requests == 200 and status.canary_over_slo == 40
    assert status.slow.canary_requests == 200
    assert status.phase is Phase.ROLLING_BACK
    assert "slower than 250 ms: 20 % is above the limit 5 %" in status.reason
    assert "after 200 canary requests" in status.reason
    assert Status.from_dict(status.to_dict()) == status
    old = status.to_dict()
    del old["canary_slo_requests"]  # a status file from before: the errors check's requests
    assert Status.from_dict(old).canary_slo_requests == status.errors.canary_requests


# ---- a service's first release, judged on absolute limits alone (`bootstrap --check`)

SLO_GUARD = {"latency": {"enabled": True, "threshold": "slo", "slo_ms": 250, "max_slow_rate": 0.05}}


def green_counts(requests: int, errors: int = 0, slow: int = 0) -> ColourCounts:
    """Green's counts with `slow` of its requests above the 250 ms bucket."""
    return ColourCounts(
        requests=requests, errors=errors, latency_buckets=((0.25, requests - slow), (1.0, requests))
    )


@pytest.mark.parametrize(
    ("analysis", "counts", "verdict", "reason"),
    [
        pytest.param({}, green_counts(0), Verdict.INCONCLUSIVE, "no requests yet", id="no-traffic"),
        pytest.param(
            {},
            green_counts(10),
            Verdict.INCONCLUSIVE,
            "error rate 0 % after 10 requests, not yet shown below the limit 10 % (e-value 2.45 "
            "of 20)",
            id="too-few-to-show-below",
        ),
        pytest.param(
            {},
            green_counts(60),
            Verdict.INCONCLUSIVE,
            "60 of the 100 requests needed",
            id="shown-below-but-min-requests-not-reached",
        ),
        pytest.param(
            {},
            green_counts(120, errors=1),
            Verdict.SUCCESSFUL,
            "error rate 0.83 % is below the limit 10 %",
            id="within-the-limit",
        ),
        pytest.param(
            {},
            green_counts(30, errors=12),
            Verdict.FAILED,
            "error rate 40 % is above the limit 10 % (e-value 3127 ≥ 20) after 30 requests",
            id="breach",
        ),
        pytest.param(
            {},
            green_counts(30, errors=30),
            Verdict.FAILED,
            "error rate 100 % is above the limit 10 %",
            id="every-request-failed",  # was "1e+02 %" (the demo's v3, measured)
        ),
        pytest.param(
            {},
            green_counts(100, errors=15),
            Verdict.INCONCLUSIVE,
            "error rate 15 % after 100 requests, not yet shown above the limit 10 %",
            id="leaning-above-not-shown",
        ),
        pytest.param(
            SLO_GUARD,
            green_counts(400, slow=80),
            Verdict.FAILED,
            "share of requests slower than 250 ms 20 % is above the limit 5 %",
            id="slo-breach",
        ),
        pytest.param(
            SLO_GUARD,
            green_counts(400, slow=2),
            Verdict.SUCCESSFUL,
            # α split between the two limits: each needs 2 / 0.05 = 40.
            "error rate 0 % is below the limit 10 % (e-value",
            id="both-limits-kept",
        ),
        pytest.param(
            {"errors": {"max_rate": None}, **SLO_GUARD},
            green_counts(400, errors=200, slow=2),
            Verdict.SUCCESSFUL,
            "share of requests slower than 250 ms 0.5 % is below the limit 5 %",
            id="errors-unlimited-only-latency-judged",
        ),
        pytest.param(
            SLO_GUARD,
            ColourCounts(requests=400),  # was: 0 of 400 slow, shown below 5 %: a pass on silence
            Verdict.INCONCLUSIVE,
            "share of requests slower than 250 ms unknown after 400 requests: no latency histogram",
            id="slo-with-no-histogram",
        ),
        pytest.param(
            SLO_GUARD,
            # A `_seconds` histogram read as milliseconds: every bound below the SLO. Was "0 %
            # ... is below the limit 5 %" for requests that all took 2 s.
            ColourCounts(requests=400, latency_buckets=((0.001, 0), (0.0025, 400), (0.01, 400))),
            Verdict.INCONCLUSIVE,
            "share of requests slower than 250 ms unknown: the latency histogram has no bound "
            "at or above it",
            id="slo-above-every-bound-is-unknown-not-0",
        ),
        pytest.param(
            {"errors": {"max_rate": 1.0}},
            green_counts(400),
            Verdict.SUCCESSFUL,
            # Was "(e-value nan ≥ 20)", and a RuntimeWarning: a ratio against a rate of 1.
            "error rate 0 % is below the limit 100 % (e-value ∞ ≥ 20) after 400 requests",
            id="a-limit-of-100-percent",
        ),
    ],
)
def test_judge_first(
    analysis: dict[str, Any], counts: ColourCounts, verdict: Verdict, reason: str
) -> None:
    got, why = judge_first(make_spec(analysis=analysis).analysis, counts)
    assert (got, reason in why) == (verdict, True), why


def test_judge_first_splits_alpha_between_its_limits() -> None:
    _, why = judge_first(make_spec(analysis=SLO_GUARD).analysis, green_counts(400, slow=2))
    assert why.count("≥ 40)") == 2 and why.endswith("after 400 requests")


def test_judge_first_needs_an_absolute_limit() -> None:
    analysis = make_spec(analysis={"errors": {"max_rate": None}}).analysis
    with pytest.raises(ValueError, match="no absolute limit"):
        judge_first(analysis, green_counts(100))


@pytest.mark.parametrize(
    ("blue_reads", "counted"),
    [
        # Cumulative blue requests since the step began, one read a tick (green 9× as many).
        pytest.param([30, 60, 0, 90], 90, id="an-empty-read-is-not-a-new-base"),
        pytest.param([30, 60, 45, 90], 90, id="a-short-read-is-not-a-new-base"),
        pytest.param([30, 0, 60, 0, 90], 90, id="every-other-read-empty"),
        pytest.param([30, 60, 0, 0, 90], 90, id="two-empty-reads-in-a-row"),
        # The count itself began anew (a Prometheus that lost its storage): nothing is counted
        # until it passes the last reading, never the part before it twice.
        pytest.param([60, 10, 40, 70, 80], 80, id="a-count-begun-anew-counts-past-the-old-base"),
    ],
)
def test_a_reading_below_the_last_counts_nothing_and_keeps_the_base(
    blue_reads: list[int], counted: int
) -> None:
    # A dip was the new base, so the series' return counted the whole step again: "step 10 %
    # passed: 120 canary requests" with 90 served.
    status = progressing()
    for i, b in enumerate(blue_reads, start=1):
        seen = obs(blue=(b, 0), green=(9 * b, 0), at=10.0 * i)
        status = step(SPEC, status, seen, 10.0 * i).status
        assert status.blue_weight == 10, status.reason
    assert status.step_canary_requests == counted
    assert status.errors.canary_requests == counted
    assert status.errors.baseline_requests == 9 * counted


def test_a_histogram_missing_for_one_tick_does_not_count_slow_requests_twice() -> None:
    spec = make_spec(
        analysis={
            "errors": {"enabled": False},
            "latency": {"enabled": True, "threshold": "slo", "slo_ms": 250},
        }
    )
    status = step(spec, new_status(spec, now=0.0), None, 0.0).status

    def buckets(n: int) -> tuple[tuple[float, int], ...]:
        return ((0.25, n - n // 10), (math.inf, n))

    for i, with_hist in enumerate([True, True, False, True], start=1):
        n = 10 * i
        seen = obs(
            blue=(n, 0),
            green=(9 * n, 0),
            at=10.0 * i,
            blue_buckets=buckets(n) if with_hist else (),
            green_buckets=buckets(9 * n),
        )
        status = step(spec, status, seen, 10.0 * i).status
    # Blue's slow requests at the third read are unknown: the latency check takes neither the
    # tick without a histogram nor the next (measured from it), never the first two again.
    assert status.slow.canary_requests == 20
    assert status.slow.canary_bad == 2
    assert status.errors.canary_requests == 40


def test_a_canary_with_no_latency_histogram_is_never_promoted_as_not_slower() -> None:
    # Blue's requests came without a histogram, so it counted 0 slow requests: "canary not
    # worse: slow-request rate (> 250 ms) shown < 2× baseline ... after 360 canary requests".
    spec = make_spec(
        analysis={
            "errors": {"enabled": False},
            "latency": {"enabled": True, "threshold": "slo", "slo_ms": 250},
        }
    )
    status = step(spec, new_status(spec, now=0.0), None, 0.0).status
    for i in range(1, 80):
        ng = 270 * i
        green = ((0.1, ng * 95 // 100), (0.25, ng * 99 // 100), (1.0, ng))
        seen = obs(blue=(30 * i, 0), green=(ng, 0), at=10.0 * i, green_buckets=green)
        status = step(spec, status, seen, 10.0 * i).status
        assert status.phase is not Phase.PROMOTING, status.reason
    assert status.slow.canary_requests == 0
    assert "blue: no latency histogram" in status.reason, status.reason


def test_a_metrics_error_while_paused_keeps_the_pause_s_reason() -> None:
    paused = replace(progressing(), phase=Phase.PAUSED, reason="paused by ann")
    failed = step(SPEC, paused, obs(error="prometheus: connection refused", at=10.0), 10.0)
    assert failed.status.verdict is Verdict.ERROR
    assert failed.status.reason == "paused by ann"
    assert failed.record["metrics_error"] == "prometheus: connection refused"
    later = step(SPEC, failed.status, obs(blue=(30, 0), green=(270, 0), at=20.0), 20.0)
    assert later.status.phase is Phase.PAUSED and later.status.reason == "paused by ann"


def test_not_worse_evidence_of_an_edited_spec_starts_afresh() -> None:
    """Was: "not worse" sums built against δ 5 % kept counting after the spec was edited to
    δ 0.1 % and the controller restarted; a candidate at 2.5× (0.25 % against 0.1 %) was then
    promoted under "error rate shown < 0.1 %" in 12 of 100 runs (the reviewer's script)."""
    import numpy as np

    def spec(negligible: float) -> RolloutSpec:
        analysis = {
            "errors": {"negligible_rate": negligible},
            "latency": {"enabled": False},
            "hold_above_e": None,
            "min_step_duration_s": 300,
        }
        return RolloutSpec.model_validate(
            {"name": "t", "steps": [5, 50, 100], "analysis": analysis}
        )

    loose, tight = spec(0.05), spec(0.001)
    promoted, said = 0, []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        status = new_status(loose, now=0.0, candidate=V2)
        status = step(loose, status, None, 0.0).status
        blue, green, at = [0, 0], [0, 0], (status.step_index, status.blue_weight)
        for tick in range(1, 400):
            edited = tick >= 20
            if (status.step_index, status.blue_weight) != at:
                blue, green, at = [0, 0], [0, 0], (status.step_index, status.blue_weight)
            n = int(rng.poisson(1000))
            nc = int(rng.binomial(n, status.blue_weight / 100))
            blue[0] += nc
            blue[1] += int(rng.binomial(nc, 0.0025))
            green[0] += n - nc
            green[1] += int(rng.binomial(n - nc, 0.001))
            reading = obs(blue=(blue[0], blue[1]), green=(green[0], green[1]), at=tick * 10.0)
            decision = step(tight if edited else loose, status, reading, tick * 10.0)
            status = decision.status
            if tick == 20 and (
                restarted := decision.record.get("tick_counts", {}).get("evidence_restarted")
            ):
                said.append(restarted)
            if status.phase in (Phase.PROMOTING, Phase.ROLLING_BACK):
                promoted += status.phase is Phase.PROMOTING
                break
    assert promoted == 0
    assert {"errors": ["negligible_rate 0.05 → 0.001"]} in said
    restored = Status.from_dict(status.to_dict())
    assert (restored.errors.margin, restored.errors.negligible) == (2.0, 0.001)


# ------------------------------------------- the latency threshold follows an edited spec


def _latency_spec(**latency: Any) -> RolloutSpec:
    return make_spec(
        analysis={"errors": {"enabled": False}, "latency": {"enabled": True, **latency}}
    )


def _latency_buckets(n: int) -> tuple[tuple[float, int], ...]:
    # 5 % above 250 ms, 0.5 % above 500 ms: green's p99 bucket is 500 ms.
    return ((0.1, n * 90 // 100), (0.25, n * 95 // 100), (0.5, n * 995 // 1000), (math.inf, n))


@pytest.mark.parametrize(
    ("before", "after", "at_edit", "later", "said"),
    [
        pytest.param(
            {"threshold": "slo", "slo_ms": 250},
            {"threshold": "slo", "slo_ms": 500},
            0.5,
            0.5,
            "slow above 250 ms → 500 ms",
            id="slo-ms-edited",
        ),
        pytest.param(
            {"threshold": "slo", "slo_ms": 250},
            {"threshold": "baseline_p99"},
            None,
            0.5,
            "slow above 250 ms (slo_ms) → green's p99 bucket",
            id="slo-to-baseline-p99",
        ),
        pytest.param(
            {"threshold": "baseline_p99"},
            {"threshold": "slo", "slo_ms": 250},
            0.25,
            0.25,
            "slow above 500 ms → 250 ms",
            id="baseline-p99-to-slo",
        ),
    ],
)
def test_an_edited_latency_threshold_is_the_one_judged_and_its_not_worse_evidence_restarts(
    before: dict[str, Any],
    after: dict[str, Any],
    at_edit: float | None,
    later: float,
    said: str,
) -> None:
    """Was: the bound set first kept for good — the judge counting "slow" above 250 ms while
    the edited spec's SLO, the one the metrics source checks as a bucket bound and the guard
    counts against, was 500 ms (or `threshold` was switched to baseline_p99)."""
    old, new = _latency_spec(**before), _latency_spec(**after)
    history = obs(green=(5000, 0), green_buckets=_latency_buckets(5000))
    status = step(old, new_status(old, now=0.0), history, 0.0).status
    decision = None
    for i in range(1, 9):
        n = 10 * i
        reading = obs(
            blue=(n, 0),
            green=(9 * n, 0),
            at=10.0 * i,
            blue_buckets=_latency_buckets(n),
            green_buckets=_latency_buckets(9 * n),
        )
        worse_before = status.slow.log_e_worse()
        if i == 4:
            assert status.slow_threshold_s == (0.25 if before["threshold"] == "slo" else 0.5)
            assert status.slow.log_e_ok() != 0.0  # some "not worse" evidence to restart
        decision = step(old if i < 4 else new, status, reading, 10.0 * i)
        status = decision.status
        if i == 4:
            assert status.slow_threshold_s == at_edit
            restarted = decision.record["tick_counts"]["evidence_restarted"]
            assert restarted == {"slow": [said]}
            assert status.slow.log_e_ok() == 0.0 and status.slow.ok == (0.0,) * 3
            assert status.slow.log_e_worse() == worse_before  # kept: valid at every bound
        assert status.phase is Phase.PROGRESSING, status.reason
    assert status.slow_threshold_s == later
    assert decision is not None and decision.record["checks"]["slow_threshold_ms"] == later * 1000
    restored = Status.from_dict(status.to_dict())
    assert restored.slow_threshold_slo is (after["threshold"] == "slo")
    # Counted from the tick after the bound was set: requests of ticks 5..8 at most.
    assert 0 < status.slow.canary_requests - 30 <= 40


def test_a_status_file_from_before_the_slo_flag_keeps_its_threshold() -> None:
    spec = _latency_spec(threshold="baseline_p99")
    data = replace(progressing(), slow_threshold_s=0.5).to_dict()
    assert "slow_threshold_slo" not in data
    assert Status.from_dict(data).slow_threshold_slo is False
    reading = obs(
        blue=(30, 0),
        green=(270, 0),
        at=20.0,
        blue_buckets=_latency_buckets(30),
        green_buckets=_latency_buckets(270),
    )
    decision = step(spec, Status.from_dict(data), reading, 20.0)
    assert decision.status.slow_threshold_s == 0.5
    assert "evidence_restarted" not in decision.record.get("tick_counts", {})


# ---- the latency guard's bound edited mid-rollout, and a histogram read short


def _edit_spec(**latency: Any) -> RolloutSpec:
    return make_spec(analysis={"latency": {"enabled": True, **latency}})


def _edit_buckets(n: int) -> tuple[tuple[float, int], ...]:
    """30 % of `n` above 100 ms, 0.1 % above 500 ms."""
    return ((0.1, n * 70 // 100), (0.5, n * 999 // 1000), (math.inf, n))


_GUARD_100 = {"threshold": "slo", "slo_ms": 100, "max_slow_rate": 0.5}
_GUARD_500 = {"threshold": "slo", "slo_ms": 500, "max_slow_rate": 0.5}


@pytest.mark.parametrize(
    ("before", "after", "guard", "bound"),
    [
        # Loosened, removed or switched off: the guard's count above the old bound was the base
        # of one above the new bound (or none), a reading "below the last" that dropped every
        # tick, errors included, for the rest of the step: a 50 %-errors canary held, never
        # rolled back.
        pytest.param(_GUARD_100, _GUARD_500, (0, 20), 0.5, id="slo-loosened"),
        pytest.param(
            _GUARD_100, {"threshold": "slo", "slo_ms": 100}, (0, 20), None, id="guard-removed"
        ),
        pytest.param(
            # (Its guard dropped with it: a max_slow_rate the check does not apply is refused.)
            _GUARD_100,
            {"threshold": "slo", "slo_ms": 100, "enabled": False},
            (0, 20),
            None,
            id="latency-disabled",
        ),
        pytest.param(
            {"slo_ms": 100, "max_slow_rate": 0.5},
            {"slo_ms": 500, "max_slow_rate": 0.5},
            (0, 20),
            0.5,
            id="p99-judge-guard-loosened",
        ),
        # Tightened: the counts stand (all above 500 ms are above 100 ms), the requests between
        # the bounds added at the edit's tick: as if 100 ms all along. Was restarted, (6, 20):
        # a canary the guard was about to roll back, promoted after a 1 ms tightening.
        pytest.param(_GUARD_500, _GUARD_100, (24, 80), 0.1, id="slo-tightened"),
        pytest.param(_GUARD_100, _GUARD_100, (24, 80), 0.1, id="no-edit"),
    ],
)
def test_an_edited_latency_guard_still_folds_errors_and_counts_against_its_new_bound(
    before: dict[str, Any], after: dict[str, Any], guard: tuple[int, int], bound: float | None
) -> None:
    old, new = _edit_spec(**before), _edit_spec(**after)
    history = obs(green=(5000, 0), green_buckets=_edit_buckets(5000))
    status = step(old, new_status(old, now=0.0), history, 0.0).status
    for tick in range(1, 5):  # spec edited (controller restarted) before tick 3
        blue, green = 20 * tick, 180 * tick
        errors = 10 if tick == 4 else 0  # then the canary fails half its requests
        reading = obs(
            (blue, errors),
            (green, 0),
            at=10.0 * tick,
            blue_buckets=_edit_buckets(blue),
            green_buckets=_edit_buckets(green),
        )
        decision = step(old if tick < 3 else new, status, reading, 10.0 * tick)
        status = decision.status
        assert "not_counted" not in decision.record["tick_counts"]
    assert status.phase is Phase.ROLLING_BACK and "canary error rate" in status.reason
    assert (status.errors.canary_bad, status.errors.canary_requests) == (10, 80)
    # The guard counts from the edit on, against the spec's bound (rebased, its sums restarted).
    assert (status.canary_over_slo, status.canary_slo_requests) == guard
    assert status.over_slo_bound_s == bound
    assert Status.from_dict(status.to_dict()) == status


def _short_slow_run(errors_at_3: int) -> list[Any]:
    """Ticks 1-5 of a `threshold: slo` (100 ms) rollout, blue's histogram read short at tick 3
    (none of its requests above 100 ms, 12 were at tick 2); the decisions."""
    spec = _edit_spec(threshold="slo", slo_ms=100)
    status = step(spec, new_status(spec, now=0.0), None, 0.0).status
    decisions = []
    for tick in range(1, 6):
        blue, green = 20 * tick, 180 * tick
        short = ((0.1, blue), (math.inf, blue))
        reading = obs(
            (blue, errors_at_3 if tick >= 3 else 0),
            (green, 0),
            at=10.0 * tick,
            blue_buckets=short if tick == 3 else _edit_buckets(blue),
            green_buckets=_edit_buckets(green),
        )
        decisions.append(step(spec, status, reading, 10.0 * tick))
        status = decisions[-1].status
        if status.phase is not Phase.PROGRESSING:
            break
    return decisions


def test_a_histogram_read_short_delays_the_tick_s_evidence_without_losing_any() -> None:
    """Was (per field): the slow count made unknown that tick, so the next tick's increase had
    no base either: two ticks of latency evidence lost on every short read."""
    ticks = _short_slow_run(0)
    after_2, short, back = (d.status for d in ticks[1:4])
    assert ticks[2].record["tick_counts"]["not_counted"] == "a reading below the last one"
    assert (short.errors, short.slow, short.last_blue) == (
        after_2.errors,
        after_2.slow,
        after_2.last_blue,
    )
    # The next full read folds all of its increase over the base: ticks 3 and 4, nothing lost
    # (12 of blue's 40 new requests above 100 ms), and not the step's so far.
    assert back.errors.canary_requests == after_2.errors.canary_requests + 40
    assert back.slow.canary_requests == after_2.slow.canary_requests + 40
    assert back.slow.canary_bad == after_2.slow.canary_bad + 12


def test_a_slow_count_below_the_last_delays_a_failing_canary_s_rollback_by_one_tick() -> None:
    ticks = _short_slow_run(10)
    rolled_back = ticks[-1]
    assert len(ticks) == 4  # the short tick 3 is not counted; tick 4 folds its errors
    assert rolled_back.status.phase is Phase.ROLLING_BACK
    assert "canary error rate" in rolled_back.status.reason
    assert rolled_back.status.errors.canary_bad == 10


def test_a_status_saved_before_the_guard_kept_its_bound_rebases_the_guard_s_count_only() -> None:
    status = guarded_tick(progressing(slow_threshold_s=0.25), 1, (60, 5))
    old = status.to_dict()
    del old["over_slo_bound_s"]  # a status file from before: counted at the spec's bound then
    resumed = Status.from_dict(old)
    assert resumed.over_slo_bound_s == GUARD_BOUND_UNKNOWN
    status = guarded_tick(resumed, 2, (80, 6))
    # The guard's sums are kept; this tick's count is the base (its bound unknown), not folded.
    assert (status.canary_over_slo, status.canary_slo_requests) == (5, 60)
    assert status.over_slo_bound_s == 0.25 and status.errors.canary_requests == 80
    status = guarded_tick(status, 3, (95, 7))
    assert (status.canary_over_slo, status.canary_slo_requests) == (6, 75)
    assert status.phase is Phase.PROGRESSING and status.step_index == 0
    assert Status.from_dict(status.to_dict()) == status


def _drive(
    spec: RolloutSpec,
    status: Status,
    blue_buckets: Callable[[int], tuple[tuple[float, int], ...]],
    green_buckets: Callable[[int], tuple[tuple[float, int], ...]],
    ticks: int = 400,
) -> Status:
    """Tick `status` at 100 rps split by its weights, no errors, each colour's histogram
    `*_buckets(requests)`, until it leaves Progressing (or `ticks` run out)."""
    nb = ng = 0
    for tick in range(1, ticks):
        nb += 10 * status.blue_weight
        ng += 10 * (100 - status.blue_weight)
        reading = obs(
            (nb, 0),
            (ng, 0),
            at=10.0 * tick,
            blue_buckets=blue_buckets(nb),
            green_buckets=green_buckets(ng),
        )
        before = status.blue_weight
        status = step(spec, status, reading, 10.0 * tick).status
        if status.blue_weight != before:
            nb = ng = 0  # a new step: counts since it began
        if status.phase is not Phase.PROGRESSING:
            break
    return status


def _above_every_bound(n: int) -> tuple[tuple[float, int], ...]:
    """Every one of `n` requests slower than the largest finite bound, 1 s."""
    return (*((bound, 0) for bound in (0.1, 0.25, 0.5, 1.0)), (math.inf, n))


@pytest.mark.parametrize(
    ("errors", "held_at"),
    [
        # Latency alone: nothing judges the canary, held at its first step.
        pytest.param(False, 10, id="latency-alone"),
        # With the errors check: steps up on it, but is never promoted on a blind latency check.
        pytest.param(True, 50, id="with-errors"),
    ],
)
def test_green_s_p99_above_every_bound_judges_no_latency_and_promotes_nothing(
    errors: bool, held_at: int
) -> None:
    """Was: the first bound (100 ms) taken, every request of both colours "slow": a canary 3×
    slower promoted on "slow-request rate shown < 2× baseline (e-value 1.1e+58)"."""
    spec = make_spec(
        analysis={"errors": {"enabled": errors}, "latency": {"enabled": True}, "min_requests": 50}
    )
    history = obs(green=(5000, 0), green_buckets=_above_every_bound(5000))
    start = step(spec, new_status(spec, now=0.0), history, 0.0)
    assert start.status.slow_threshold_s is None
    why = "100 % of green's requests are above the histogram's largest finite bound (1000 ms"
    assert why in start.record["history"]["no_threshold"]
    status = _drive(spec, start.status, _above_every_bound, _above_every_bound, ticks=200)
    assert status.phase is Phase.PAUSED and status.held and status.blue_weight == held_at
    assert why in status.reason and "latency_unit" in status.reason
    assert "not yet shown latency" not in status.reason  # (was: "not yet shown latency not …")


def test_a_modest_tail_above_the_last_bound_is_judged_there() -> None:
    """20 % of green above the largest finite bound (1 s): the check still tells a 3× slower
    canary (70 % above) from a healthy one. Was: latency not judged above 10 %, the slower one
    stepped up to 50 % on the errors check alone and held there, never rolled back."""

    def buckets(n: int, above: float) -> tuple[tuple[float, int], ...]:
        return ((0.5, 0), (1.0, n - int(n * above)), (math.inf, n))

    spec = make_spec(analysis={"latency": {"enabled": True}})
    history = obs(green=(5000, 0), green_buckets=buckets(5000, 0.2))
    status = step(spec, new_status(spec, now=0.0), history, 0.0).status
    assert status.slow_threshold_s == 1.0
    reading = obs(
        (100, 0), (900, 0), at=10.0, blue_buckets=buckets(100, 0.7), green_buckets=buckets(900, 0.2)
    )
    decision = step(spec, status, reading, 10.0)
    assert decision.status.phase is Phase.ROLLING_BACK
    assert "slow-request rate (> 1000 ms) 70 % vs 20 % baseline" in decision.status.reason


def _tail_above(n: int, above: float) -> tuple[tuple[float, int], ...]:
    """`n` requests, the share `above` of them slower than the largest finite bound, 1 s."""
    return ((0.5, 0), (1.0, n - round(n * above)), (math.inf, n))


def _drive_tail(spec: RolloutSpec, history: float, green: float, blue: float) -> Status:
    """A rollout whose green had `history` of its requests above 1 s before it began, and has
    `green` during it, against a canary with `blue` above, 100 rps, no errors."""
    start = step(
        spec,
        new_status(spec, now=0.0),
        obs(green=(5000, 0), green_buckets=_tail_above(5000, history)),
        0.0,
    )
    return _drive(
        spec, start.status, lambda n: _tail_above(n, blue), lambda n: _tail_above(n, green)
    )


TAIL_SPEC = make_spec(analysis={"latency": {"enabled": True}, "max_step_duration_s": 3600})


def test_a_canary_slower_than_a_long_tail_baseline_is_rolled_back() -> None:
    """60 % of green above the largest finite bound: a canary with all of it above is rolled
    back at the first step. Was: no bound taken, stepped up to 50 % on the errors check alone."""
    status = _drive_tail(TAIL_SPEC, history=0.6, green=0.6, blue=1.0)
    assert status.phase is Phase.ROLLING_BACK and status.step_index == 0
    assert "slow-request rate (> 1000 ms) 100 % vs 60 % baseline" in status.reason


def test_not_worse_is_never_shown_where_every_canary_is_below_max_ratio() -> None:
    """60 % of green above the bound: every canary has less than 2× that above it, so "shown <
    2× baseline" says nothing: an identical canary is held at the last step, never promoted."""
    status = _drive_tail(TAIL_SPEC, history=0.6, green=0.6, blue=0.6)
    assert status.phase is Phase.PAUSED and status.held and status.blue_weight == 50
    assert status.reason.endswith(
        "slow-request rate (> 1000 ms) cannot be shown < 2× baseline: 60 % of green's requests "
        "are above 1000 ms (is the metrics' `latency_unit` right?), and no canary has more than "
        "all of its"
    )


def test_a_long_tail_before_the_rollout_only_is_judged_on_the_rollout_s_baseline() -> None:
    """Green's history window 60 % above the bound, the rollout's 5 %: "not worse" is judged
    against the baseline the rollout compared with, and an identical canary is promoted."""
    status = _drive_tail(TAIL_SPEC, history=0.6, green=0.05, blue=0.05)
    assert status.phase is Phase.PROMOTING, status.reason


def test_not_worse_on_errors_is_not_shown_while_green_fails_half_its_requests() -> None:
    """ "< 2× baseline" of a baseline failing half its requests holds for any canary."""
    status = drive_last_step(
        make_spec(analysis={"max_step_duration_s": 600, "errors": {"max_rate": None}}),
        (100, 60),
        (100, 60),
        60,
    )
    assert status.phase is Phase.PAUSED
    assert (
        "error rate cannot be shown < 2× baseline: 60 % of green's requests fail" in status.reason
    )


def test_not_judged_latency_is_said_after_what_is_not_yet_shown() -> None:
    """Was: "step 50 %: not yet shown latency not judged: …"."""
    status = progressing(step_index=1, weight=50)
    reading = obs(
        (700, 0),
        (700, 0),
        at=30.0,
        blue_buckets=_above_every_bound(700),
        green_buckets=_above_every_bound(700),
    )
    decision = step(LATENCY_SPEC, status, reading, 30.0)
    assert decision.status.verdict is Verdict.INCONCLUSIVE
    assert decision.status.reason.startswith("step 50 %: not yet shown error rate < 2× baseline")
    assert decision.status.reason.endswith(
        "; latency not judged: 100 % of green's requests are above the histogram's largest "
        "finite bound (1000 ms; is the metrics' `latency_unit` right?)"
    )


def test_a_histogram_read_short_every_other_tick_still_rolls_back_a_slow_canary() -> None:
    """Blue's slow count read short (60 % of its slow requests missing) on every other tick
    from tick 3, requests complete: a canary 4× slower than green is rolled back at tick 4, as
    with no short read at tick 3. Was (per field): every short read cost two ticks of latency
    and guard evidence, the evidence frozen, the canary held at 10 % until the step's limit."""
    spec = _edit_spec(threshold="slo", slo_ms=250, max_slow_rate=0.1)
    status = new_status(spec, now=0.0)

    def buckets(n: int, slow: int) -> tuple[tuple[float, int], ...]:
        return ((0.25, n - slow), (math.inf, n))

    for tick in range(1, 10):
        blue, green = 100 * tick, 900 * tick
        short = tick >= 3 and tick % 2 == 1
        reading = obs(
            (blue, 0),
            (green, 0),
            at=10.0 * tick,
            blue_buckets=buckets(blue, blue * 4 // 100 * (4 if short else 10) // 10),
            green_buckets=buckets(green, green // 100),
        )
        status = step(spec, status, reading, 10.0 * tick).status
        if status.phase is not Phase.PROGRESSING:
            break
    assert (status.phase, tick) == (Phase.ROLLING_BACK, 4)
    assert "slow-request rate (> 250 ms) 4 % vs 1 % baseline" in status.reason
    assert (status.slow.canary_bad, status.slow.canary_requests) == (16, 400)
    assert (status.canary_over_slo, status.canary_slo_requests) == (16, 400)


def test_a_dropped_reading_does_not_say_the_guard_restarted_until_a_tick_keeps_it() -> None:
    """A guard edited at the tick of an empty read: nothing of that tick is kept, so the next
    tick restarts the guard again; it is said there, once (was: said at both)."""
    old, new = _edit_spec(**_GUARD_100), _edit_spec(**_GUARD_500)
    history = obs(green=(5000, 0), green_buckets=_edit_buckets(5000))
    status = step(old, new_status(old, now=0.0), history, 0.0).status
    said = []
    for tick in range(1, 5):
        blue, green = (0, 0) if tick == 3 else (20 * tick, 180 * tick)
        reading = obs(
            (blue, 0),
            (green, 0),
            at=10.0 * tick,
            blue_buckets=_edit_buckets(blue) if blue else (),
            green_buckets=_edit_buckets(green) if green else (),
        )
        decision = step(old if tick < 3 else new, status, reading, 10.0 * tick)
        status = decision.status
        said.append(decision.record["tick_counts"].get("evidence_restarted", {}).get("guard"))
    assert said == [None, None, None, ["slower than 100 ms → slower than 500 ms"]]
    assert status.over_slo_bound_s == 0.5
