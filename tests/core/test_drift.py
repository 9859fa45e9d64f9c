"""A data plane that no longer serves what the rollout set: held for a human, never fought."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rollout.core.machine import (
    new_status,
    resume_refused,
    steering_refused,
    step,
    with_commands,
)
from rollout.core.status import Command, Deploy, SetWeights, Status
from rollout.core.types import Colour, Phase, Release, Served, Weights
from tests.core.helpers import V1, V2, make_spec, obs

SPEC = make_spec()
V3 = Release(model="diabetes", version="3", sha256="3" * 64)
#: A canary at 50 % errors: any tick the judge saw would roll it back.
REGRESSION = obs(blue=(400, 200), green=(3600, 4), at=60.0)


def at_10() -> Status:
    status = new_status(SPEC, now=0.0, rollout_id="r1")
    return replace(status, phase=Phase.PROGRESSING, step_index=0, blue_weight=10)


def served(blue: int = 10, mirror: int = 0, *, b: Release | None = V2, g: Release | None = V1):
    return Served(weights=Weights.blue_at(blue, mirror), blue=b, green=g)


def resume(status: Status) -> Status:
    return with_commands(status, [Command(id="c1", kind="resume", by="ann")])


def test_a_data_plane_serving_what_the_rollout_set_is_judged_as_before() -> None:
    decision = step(SPEC, at_10(), REGRESSION, 60.0, served())
    assert decision.status.phase is Phase.ROLLING_BACK
    assert decision.actions == (SetWeights(0),)
    assert "drift" not in decision.record


@pytest.mark.parametrize(
    ("now_serving", "said"),
    [
        pytest.param(served(0, 5), "it sends blue 0 % + 5 % mirrored, not blue 10 %", id="weights"),
        pytest.param(served(b=V3), "blue serves diabetes:3, not diabetes:2", id="another-blue"),
        pytest.param(served(b=None), "blue serves nothing, not diabetes:2", id="blue-gone"),
        pytest.param(
            served(b=replace(V2, sha256="f" * 64)),
            "blue serves diabetes:2, not diabetes:2",
            id="same-version-other-bits",
        ),
    ],
)
def test_a_drifted_data_plane_holds_before_the_judge_acts_on_counts_not_this_steps(
    now_serving: Served, said: str
) -> None:
    decision = step(SPEC, at_10(), REGRESSION, 60.0, now_serving)
    assert decision.status.phase is Phase.PAUSED and decision.status.held
    assert decision.actions == ()  # neither a rollback nor a fight over the weights
    assert said in decision.status.reason
    assert "another rollout drives it, a hand edit, or a data plane that lost its state" in (
        decision.status.reason
    )
    assert "resume sets it back" in decision.status.reason
    assert decision.record["drift"] in decision.status.reason


def test_a_release_read_back_without_what_the_router_does_not_record_is_no_drift() -> None:
    """Azure ML's tags carry no image, nor the package folder: the same release all the same."""
    status = replace(at_10(), candidate=replace(V2, image="acr.io/d:2", model_dir="/pkg/2"))
    decision = step(SPEC, status, REGRESSION, 60.0, served(b=V2))
    assert decision.status.phase is Phase.ROLLING_BACK


def test_nothing_read_is_no_drift() -> None:
    assert step(SPEC, at_10(), REGRESSION, 60.0, None).status.phase is Phase.ROLLING_BACK


def test_the_shadow_step_s_mirror_is_part_of_what_is_served() -> None:
    shadow = replace(at_10(), blue_weight=0, mirror=5)
    assert "drift" not in step(SPEC, shadow, obs(at=10.0), 10.0, served(0, 5)).record
    decision = step(SPEC, shadow, obs(at=10.0), 10.0, served(0))
    assert decision.status.held
    assert "it sends blue 0 %, not blue 0 % + 5 % mirrored" in decision.status.reason


def test_resume_sets_a_drifted_data_plane_back_and_restarts_the_step() -> None:
    held = step(SPEC, at_10(), REGRESSION, 60.0, served(0, b=V3)).status
    decision = step(SPEC, resume(held), obs(at=70.0), 70.0, served(0, b=V3))
    assert decision.status.phase is Phase.PROGRESSING
    assert decision.actions == (Deploy(Colour.BLUE, V2), SetWeights(10))
    assert decision.status.step_started_at == 70.0  # the drifted counts are not its evidence
    assert decision.status.reason.startswith("resumed by ann; the data plane set back (")


def test_resume_without_drift_changes_nothing_on_the_data_plane() -> None:
    paused = replace(at_10(), phase=Phase.PAUSED)
    decision = step(SPEC, resume(paused), obs(at=70.0), 70.0, served())
    assert decision.status.phase is Phase.PROGRESSING
    assert decision.actions == ()
    assert decision.status.reason == "resumed by ann"


def test_green_moved_on_is_not_undone_by_resume_only_aborted() -> None:
    held = step(SPEC, at_10(), REGRESSION, 60.0, served(0, g=V3)).status
    assert "green now serves diabetes:3, not diabetes:1" in held.reason
    assert "abort it" in held.reason and "resume sets it back" not in held.reason
    decision = step(SPEC, resume(held), obs(at=70.0), 70.0, served(0, g=V3))
    assert decision.status.phase is Phase.PAUSED and decision.actions == ()
    assert any(
        "resume: ignored, green now serves diabetes:3" in n for n in decision.record["commands"]
    )
    aborted = with_commands(held, [Command(id="c2", kind="abort")])
    decision = step(SPEC, aborted, obs(at=80.0), 80.0, served(0, g=V3))
    assert decision.status.phase is Phase.ROLLING_BACK and decision.actions == (SetWeights(0),)


def test_counts_of_a_drifted_data_plane_are_never_the_candidate_s_evidence() -> None:
    """Measured live: a rollout held while another one's canary took blue 50 % folded that
    canary's requests into its own evidence, at the held tick and at the resume's (whose
    observation spans the whole hold): 706 of diabetes:3's requests judged as diabetes:1's."""
    before = at_10()
    other = served(50, b=V3)
    held = step(SPEC, before, REGRESSION, 60.0, other)
    assert held.status.held
    assert held.record["tick_counts"]["blue"] == {"requests": 400, "errors": 200, "slow": 0}
    assert "not_counted" in held.record
    still = step(SPEC, held.status, obs(blue=(900, 450), green=(8000, 8), at=90.0), 90.0, other)
    assert still.status.held and still.status.last_blue.requests == 900  # the base moves on
    later = obs(blue=(1400, 700), green=(12000, 12), at=120.0)
    resumed = step(SPEC, resume(still.status), later, 120.0, other)
    assert resumed.status.phase is Phase.PROGRESSING
    for status in (held.status, still.status, resumed.status):
        assert status.errors == before.errors and status.slow == before.slow
        assert status.step_canary_requests == 0


def test_resume_takes_blue_s_traffic_off_another_release_before_deploying_over_it() -> None:
    """The other rollout's canary at 50 %: its requests, until the candidate is deployed again,
    would count in the restarted step, and the candidate would take its 50 %, unjudged."""
    held = step(SPEC, at_10(), REGRESSION, 60.0, served(50, b=V3)).status
    decision = step(SPEC, resume(held), obs(at=70.0), 70.0, served(50, b=V3))
    assert decision.actions == (SetWeights(0), Deploy(Colour.BLUE, V2), SetWeights(10))
    mirrored = step(SPEC, resume(held), obs(at=70.0), 70.0, served(0, 5, b=V3))
    assert mirrored.actions == (SetWeights(0), Deploy(Colour.BLUE, V2), SetWeights(10))
    gone = served(50, b=V3, g=None)
    both = step(SPEC, resume(held), obs(at=70.0), 70.0, gone).actions
    assert both == (
        Deploy(Colour.GREEN, V1),
        SetWeights(0),
        Deploy(Colour.BLUE, V2),
        SetWeights(10),
    )


def abort(status: Status) -> Status:
    return with_commands(status, [Command(id="c9", kind="abort", by="ann")])


@pytest.mark.parametrize(
    ("now_serving", "why"),
    [
        pytest.param(
            served(50, b=V3),
            "blue serves diabetes:3, not diabetes:2: another rollout's?",
            id="another-rollout-s-canary",
        ),
        pytest.param(served(0, 5, b=V3), "blue serves diabetes:3", id="another-s-shadow"),
        pytest.param(served(50, b=V3, g=V3), "blue serves diabetes:3", id="green-moved-too"),
    ],
)
def test_abort_leaves_a_blue_that_serves_another_release_as_it_is(
    now_serving: Served, why: str
) -> None:
    """Was: abort set blue to 0 %, taking its traffic off another rollout's canary (which then
    held in turn)."""
    held = step(SPEC, at_10(), REGRESSION, 60.0, now_serving).status
    assert "leaves the data plane as it is" in held.reason  # the advice says what abort does
    assert "sets blue to 0 %" not in held.reason
    decision = step(SPEC, abort(held), obs(at=70.0), 70.0, now_serving)
    assert decision.actions == ()
    assert decision.status.phase is Phase.ROLLED_BACK and not decision.status.held
    assert decision.status.reason.startswith("aborted by ann: the data plane is left as it is (")
    assert why in decision.status.reason
    again = step(SPEC, decision.status, obs(at=80.0), 80.0, now_serving)
    assert again.actions == () and again.status.phase is Phase.ROLLED_BACK


@pytest.mark.parametrize(
    "now_serving",
    [
        pytest.param(served(50), id="weights-edited-by-hand"),
        pytest.param(served(0, 5), id="mirror-edited-by-hand"),
        pytest.param(served(50, g=V3), id="green-moved-on"),
        pytest.param(served(10, b=None), id="blue-serves-nothing"),  # (no one's canary)
    ],
)
def test_abort_sets_blue_to_0_when_blue_serves_this_candidate(now_serving: Served) -> None:
    held = step(SPEC, at_10(), REGRESSION, 60.0, now_serving).status
    assert "sets blue to 0 %" in held.reason
    assert "left as it is" not in held.reason
    decision = step(SPEC, abort(held), obs(at=70.0), 70.0, now_serving)
    assert decision.status.phase is Phase.ROLLING_BACK and decision.actions == (SetWeights(0),)


def test_abort_with_the_data_plane_unread_goes_by_what_the_hold_last_read() -> None:
    """Was: a router blip on the abort's tick set blue to 0 %, another rollout's canary's
    traffic with it."""
    held = step(SPEC, at_10(), REGRESSION, 60.0, served(50, b=V3)).status
    decision = step(SPEC, abort(held), obs(at=70.0), 70.0, None)
    assert decision.actions == ()
    assert decision.status.phase is Phase.ROLLED_BACK
    assert decision.status.reason.startswith("aborted by ann: the data plane is left as it is (")
    never_read = step(SPEC, abort(at_10()), obs(at=70.0), 70.0, None)  # nothing to go by
    assert never_read.status.phase is Phase.ROLLING_BACK
    assert never_read.actions == (SetWeights(0),)


def steer(status: Status, kind: str, weight: int | None = None) -> Status:
    command = Command(id="c7", kind=kind, weight=weight, by="ann")  # type: ignore[arg-type]
    return with_commands(status, [command])


STEERS = [
    pytest.param("promote", None, id="promote"),
    pytest.param("set_weight", 50, id="set-weight"),
    pytest.param("set_weight", 100, id="set-weight-100"),
]


@pytest.mark.parametrize(("kind", "weight"), STEERS)
@pytest.mark.parametrize("read", [True, False], ids=["read", "unread"])
def test_promote_and_set_weight_leave_another_rollout_s_canary_alone(
    kind: str, weight: int | None, read: bool
) -> None:
    """Was: promote sent all users to another rollout's never-judged canary, then removed it;
    set-weight 50 gave it half of them."""
    other = served(20, b=V3)
    held = step(SPEC, at_10(), REGRESSION, 60.0, other).status
    assert steering_refused(Status.from_dict(held.to_dict())).startswith(
        "blue serves diabetes:3, not diabetes:2"
    )
    decision = step(SPEC, steer(held, kind, weight), obs(at=70.0), 70.0, other if read else None)
    assert decision.actions == ()
    assert decision.status.phase is Phase.PAUSED and decision.status.held
    (note,) = decision.record["commands"]
    assert "ignored, blue serves diabetes:3, not diabetes:2" in note
    assert "resume first" in note and "or abort" in note


@pytest.mark.parametrize(("kind", "weight"), STEERS)
def test_promote_and_set_weight_refused_when_green_moved_on(kind: str, weight: int | None) -> None:
    moved = served(0, g=V3)
    held = step(SPEC, at_10(), REGRESSION, 60.0, moved).status
    assert "green now serves diabetes:3" in steering_refused(held)
    decision = step(SPEC, steer(held, kind, weight), obs(at=70.0), 70.0, moved)
    assert decision.actions == () and decision.status.phase is Phase.PAUSED
    assert "ignored, green now serves diabetes:3" in decision.record["commands"][0]


@pytest.mark.parametrize(
    ("kind", "weight", "phase", "weights"),
    [
        pytest.param("promote", None, Phase.PROMOTING, SetWeights(100), id="promote"),
        pytest.param(
            "set_weight", 50, Phase.PROGRESSING, SetWeights(50), id="set-weight"
        ),  # held: goes on from there
        pytest.param("set_weight", 100, Phase.PROMOTING, SetWeights(100), id="set-weight-100"),
    ],
)
def test_promote_and_set_weight_deploy_a_lost_blue_before_its_weights(
    kind: str, weight: int | None, phase: Phase, weights: SetWeights
) -> None:
    """Was: the weights were sent to a blue serving nothing, which the router refuses for good:
    every `run` stopped there, stuck in Promoting (where abort is not read)."""
    lost = served(0, b=None)
    held = step(SPEC, at_10(), REGRESSION, 60.0, lost).status
    assert steering_refused(held) == ""
    decision = step(SPEC, steer(held, kind, weight), obs(at=70.0), 70.0, lost)
    assert decision.actions == (Deploy(Colour.BLUE, V2), weights)
    assert decision.status.phase is phase and decision.status.served is None
    assert "the data plane set back (blue serves nothing, not diabetes:2" in (
        decision.status.reason
    )
    ok = step(SPEC, at_10(), obs(at=70.0), 70.0, served())
    assert steer_actions(ok.status, kind, weight) == (weights,)  # nothing drifted: as ever


@pytest.mark.parametrize(
    ("before", "weight"),
    [
        pytest.param("promote", None, id="promote-then-abort"),
        pytest.param("set_weight", 50, id="set-weight-then-abort"),
    ],
)
@pytest.mark.parametrize("lost_blue", [True, False], ids=["blue-lost", "as-set"])
def test_an_abort_read_after_a_steering_command_wins_over_all_it_queued(
    before: str, weight: int | None, lost_blue: bool
) -> None:
    """Was: only the earlier command's weights were dropped while promoting, none otherwise: a
    set-weight's 50 % was served before the abort's 0 %, and a promote's deploy to a blue that
    lost its release came first (failed, it ended the abort as Failed)."""
    seen = served(0, b=None) if lost_blue else served()
    held = step(SPEC, at_10(), REGRESSION, 60.0, seen).status if lost_blue else at_10()
    both = [
        Command(id="c7", kind=before, weight=weight, by="ann"),  # type: ignore[arg-type]
        Command(id="c8", kind="abort", by="bob"),
    ]
    decision = step(SPEC, with_commands(held, both), obs(at=70.0), 70.0, seen)
    assert decision.status.phase is Phase.ROLLING_BACK
    assert decision.actions == (SetWeights(0),)


def test_a_weight_set_on_a_held_rollout_is_watched_from_there() -> None:
    """Was: kept held at the weight set, so `run` returned at once (exit 4) with blue serving
    it and no one watching. An operator's pause stays paused: its `run` still watches."""
    held = step(SPEC, at_10(), REGRESSION, 60.0, served(0, b=None)).status
    assert held.held and held.phase is Phase.PAUSED
    decision = step(SPEC, steer(held, "set_weight", 50), obs(at=70.0), 70.0, served())
    assert decision.status.phase is Phase.PROGRESSING and not decision.status.held
    assert decision.status.blue_weight == 50
    paused = replace(at_10(), phase=Phase.PAUSED, reason="paused by ann")
    decision = step(SPEC, steer(paused, "set_weight", 50), obs(at=70.0), 70.0, served())
    assert decision.status.phase is Phase.PAUSED and decision.status.blue_weight == 50


def steer_actions(status: Status, kind: str, weight: int | None) -> tuple[object, ...]:
    return step(SPEC, steer(status, kind, weight), obs(at=80.0), 80.0, served()).actions


def test_a_hold_records_what_the_data_plane_served_and_a_resume_forgets_it() -> None:
    other = served(50, b=V3)
    held = step(SPEC, at_10(), REGRESSION, 60.0, other).status
    assert held.served == other
    assert Status.from_dict(held.to_dict()) == held
    assert held.to_dict()["served"] == {
        "weights": {"blue": 50, "green": 50, "mirror": 0},
        "blue": {
            "model": "diabetes",
            "version": "3",
            "sha256": "3" * 64,
            "image": None,
            "model_dir": None,
            "deployment": None,
        },
        "green": {
            "model": "diabetes",
            "version": "1",
            "sha256": "1" * 64,
            "image": None,
            "model_dir": None,
            "deployment": None,
        },
    }
    later = step(SPEC, held, obs(at=70.0), 70.0, served(0, 5, b=V3)).status
    assert later.served == served(0, 5, b=V3)  # the latest read while held
    assert step(SPEC, later, obs(at=80.0), 80.0, None).status.served == later.served  # unread
    resumed = step(SPEC, resume(later), obs(at=90.0), 90.0, served(0, 5, b=V3)).status
    assert resumed.phase is Phase.PROGRESSING and resumed.served is None
    set_back = step(SPEC, later, obs(at=80.0), 80.0, served()).status  # undone by hand
    assert set_back.held and set_back.served is None


def test_a_status_file_from_before_served_was_recorded_still_loads() -> None:
    held = step(SPEC, at_10(), REGRESSION, 60.0, served(50, b=V3)).status
    old = held.to_dict()
    del old["served"]
    assert Status.from_dict(old) == replace(held, served=None)


@pytest.mark.parametrize(
    ("now_serving", "refused"),
    [
        pytest.param(served(50, b=V3), "", id="blue-taken-over"),
        pytest.param(served(50), "", id="weights-edited"),
        pytest.param(
            served(0, g=V3), "green now serves diabetes:3, not diabetes:1", id="green-moved-on"
        ),
    ],
)
def test_whether_a_resume_would_be_refused_is_read_from_the_status(
    now_serving: Served, refused: str
) -> None:
    held = step(SPEC, at_10(), REGRESSION, 60.0, now_serving).status
    said = resume_refused(Status.from_dict(held.to_dict()))
    assert (refused in said and said.endswith("abort it")) if refused else said == ""
    assert resume_refused(at_10()) == ""


@pytest.mark.parametrize(
    ("drifted", "restore"),
    [
        pytest.param(served(50), (SetWeights(10),), id="weights-edited-by-hand"),
        pytest.param(served(0, b=None), (Deploy(Colour.BLUE, V2), SetWeights(10)), id="blue-lost"),
    ],
)
def test_resume_with_the_data_plane_unread_sets_back_what_the_hold_last_read(
    drifted: Served, restore: tuple[object, ...]
) -> None:
    """Was: a router blip on the resume's tick resumed the step on the drifted data plane (blue
    serving nothing, or weights edited by hand), judged on traffic it did not split, and held
    again at the next tick that read it. As abort does, resume goes by `status.served`."""
    held = step(SPEC, at_10(), REGRESSION, 60.0, drifted).status
    decision = step(SPEC, resume(held), obs(at=70.0), 70.0, None)
    assert decision.status.phase is Phase.PROGRESSING and decision.status.served is None
    assert decision.actions == restore
    assert decision.status.reason.startswith("resumed by ann; the data plane set back (")
    moved = step(SPEC, at_10(), REGRESSION, 60.0, served(0, g=V3)).status
    refused = step(SPEC, resume(moved), obs(at=70.0), 70.0, None)
    assert refused.status.phase is Phase.PAUSED and refused.actions == ()
    assert "resume: ignored, green now serves diabetes:3" in refused.record["commands"][0]
