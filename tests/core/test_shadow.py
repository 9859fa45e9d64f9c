"""The shadow step: a 0 % step judged on blue's answers to a mirror of live traffic."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rollout.config import (
    DEFAULT_MIRROR_PERCENT,
    LIVE_STEPS,
    PrometheusMetricsConfig,
    RolloutSpec,
)
from rollout.core.machine import new_status, step, with_commands
from rollout.core.status import (
    Command,
    Deploy,
    SetWeights,
    Status,
    action_from_dict,
    action_to_dict,
)
from rollout.core.types import Colour, Phase, Weights
from rollout.errors import ConfigError
from tests.core.helpers import V2, make_spec, obs

SHADOW = make_spec(steps=[0, 10, 50, 100], mirror_percent=20)


def started(spec: RolloutSpec = SHADOW) -> Status:
    return step(spec, new_status(spec, now=0.0), None, 0.0).status


def test_the_shadow_step_mirrors_live_traffic_to_blue_before_it_serves_any() -> None:
    decision = step(SHADOW, new_status(SHADOW, now=0.0), None, 0.0)
    assert decision.actions == (Deploy(Colour.BLUE, V2), SetWeights(0, mirror=20))
    assert (decision.status.blue_weight, decision.status.mirror) == (0, 20)
    assert "20 % of live traffic mirrored to it" in decision.status.reason
    assert decision.record["mirror"] == 20


def test_a_clean_shadow_step_goes_live_and_ends_the_mirror() -> None:
    # 150 mirrored copies answered without an error, against 750 live requests on green.
    decision = step(SHADOW, started(), obs(blue=(150, 0), green=(750, 1), at=30.0), 30.0)
    assert decision.actions == (SetWeights(10),)
    assert (decision.status.blue_weight, decision.status.mirror) == (10, 0)
    assert decision.status.reason.startswith("the shadow step (20 % mirrored) passed")


def test_a_regression_in_the_shadow_step_rolls_back_before_any_user_saw_blue() -> None:
    decision = step(SHADOW, started(), obs(blue=(100, 12), green=(500, 1), at=30.0), 30.0)
    assert decision.status.phase is Phase.ROLLING_BACK
    assert decision.actions == (SetWeights(0),)  # the mirror ends with the rollback
    assert decision.status.mirror == 0
    assert decision.status.reason.startswith("rolled back at the shadow step (20 % mirrored)")


def test_the_shadow_step_waits_for_its_canary_requests_like_any_step() -> None:
    decision = step(SHADOW, started(), obs(blue=(40, 0), green=(200, 0), at=30.0), 30.0)
    assert decision.actions == ()
    assert "the shadow step (20 % mirrored) has 40 of 100 canary requests" in (
        decision.status.reason
    )


def test_setting_the_weight_back_to_zero_mirrors_again() -> None:
    live = replace(started(), step_index=1, blue_weight=10, mirror=0)
    command = Command(kind="set_weight", id="c1", weight=0)
    decision = step(SHADOW, with_commands(live, [command]), obs(at=10.0), 10.0)
    assert decision.actions == (SetWeights(0, mirror=20),)
    assert decision.status.mirror == 20


def test_without_mirror_percent_the_zero_step_only_deploys_blue() -> None:
    spec = make_spec(steps=[0, 10, 50, 100], mirror_percent=0)
    decision = step(spec, new_status(spec, now=0.0), None, 0.0)
    assert decision.actions == (Deploy(Colour.BLUE, V2), SetWeights(0))
    nxt = step(spec, decision.status, obs(green=(100, 0), at=10.0), 10.0)
    assert nxt.actions == (SetWeights(10),)
    assert "reachable by header only" in nxt.status.reason


def test_the_zero_step_without_mirror_says_how_long_it_waits() -> None:
    """It said "waiting one interval" for the whole of a 30 s `min_step_duration_s`."""
    spec = make_spec(steps=[0, 10, 50, 100], mirror_percent=0, analysis={"min_step_duration_s": 30})
    begun = step(spec, new_status(spec, now=0.0), None, 0.0).status
    decision = step(spec, begun, obs(green=(100, 0), at=10.0), 10.0)
    assert decision.actions == ()
    assert decision.status.reason == "step 0 %: waiting 30 s"


def test_status_and_actions_keep_the_mirror_and_read_older_files() -> None:
    status = started()
    assert Status.from_dict(status.to_dict()) == status
    old = status.to_dict()
    del old["mirror"]
    assert Status.from_dict(old).mirror == 0
    assert action_to_dict(SetWeights(0)) == {"type": "set_weights", "blue": 0}
    assert action_from_dict(action_to_dict(SetWeights(0, 20))) == SetWeights(0, 20)


def test_weights_mirror_only_a_blue_that_serves_nothing() -> None:
    assert str(Weights.blue_at(0, mirror=5)) == "blue 0 % / green 100 %, 5 % mirrored to blue"
    with pytest.raises(ValueError, match="only while it serves no live traffic"):
        Weights.blue_at(10, mirror=5)
    with pytest.raises(ValueError, match=r"within 0\.\.100"):
        Weights.blue_at(0, mirror=101)


def test_the_default_plan_starts_with_a_shadow_step() -> None:
    spec = RolloutSpec()
    assert spec.plan[0] == 0
    assert spec.shadow_percent == DEFAULT_MIRROR_PERCENT
    # A plan of one's own without a 0 % step has none, and the default mirror is no error.
    assert RolloutSpec(steps=[5, 50, 100]).shadow_percent == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(
            {"steps": [5, 50, 100], "mirror_percent": 10},
            "mirror_percent: mirrors traffic only during a 0 % step",
            id="mirror-without-a-zero-step",
        ),
        pytest.param(
            {
                "steps": [0, 10, 50, 100],
                "mirror_percent": 60,
                "router": {
                    "kind": "azureml",
                    "subscription_id": "00000000-0000-0000-0000-000000000000",
                    "resource_group": "g",
                    "workspace": "w",
                    "endpoint": "diabetes-ep",
                },
            },
            "mirror_percent: Azure ML mirrors at most 50 %",
            id="azure-mirrors-at-most-half",
        ),
        pytest.param(
            {
                "steps": [0, 10, 50, 100],
                "mirror_percent": 5,
                "metrics": {"kind": "prometheus", "url": "http://p", "preset": "istio"},
            },
            "mirror_percent: the istio metrics preset cannot see a shadow step",
            id="istio-preset-cannot-count-mirrored-requests",
        ),
        pytest.param(  # was "start `steps` with 0", which only led to the refusal above
            {"mirror_percent": 5, "metrics": {"kind": "prometheus", "preset": "istio"}},
            "mirror_percent: the istio metrics preset cannot see a shadow step",
            id="istio-preset-and-a-mirror-without-a-zero-step",
        ),
        pytest.param({"mirror_percent": 101}, "mirror_percent", id="more-than-everything"),
    ],
)
def test_a_shadow_step_the_data_plane_cannot_serve_is_refused_at_its_field(
    data: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_spec(**data)


def test_the_istio_preset_defaults_to_a_plan_without_a_shadow_step() -> None:
    spec = RolloutSpec.model_validate(
        {"metrics": {"kind": "prometheus", "url": "http://p", "preset": "istio"}}
    )
    assert (spec.plan, spec.shadow_percent) == (LIVE_STEPS, 0)
    seed = RolloutSpec.model_validate(
        {"steps": "seed", "metrics": {"kind": "prometheus", "url": "http://p", "preset": "istio"}}
    )
    assert seed.shadow_percent == 0  # the seed's Blue_0 only deploys blue there


@pytest.mark.parametrize("steps", [[10, 50, 100], [0, 10, 50, 100], "seed"])
def test_a_dumped_spec_loads_again_with_the_same_shadow(steps: object) -> None:
    spec = RolloutSpec.model_validate({"steps": steps})
    again = RolloutSpec.model_validate(spec.model_dump(mode="json"))
    assert (again.plan, again.shadow_percent) == (spec.plan, spec.shadow_percent)


def test_a_spec_built_from_models_gets_the_istio_preset_defaults_too() -> None:
    istio = PrometheusMetricsConfig(url="http://p", preset="istio")
    spec = RolloutSpec(metrics=istio)
    assert (spec.plan, spec.shadow_percent) == (LIVE_STEPS, 0)
    # Following the refusal's advice (mirror_percent: 0) keeps the plan without a 0 % step.
    assert RolloutSpec(metrics=istio, mirror_percent=0).plan == LIVE_STEPS


def paused_in_the_shadow_step() -> Status:
    status = step(SHADOW, with_commands(started(), [Command(kind="pause", id="p")]), obs(), 5.0)
    assert status.status.phase is Phase.PAUSED and status.status.mirror == 20
    return status.status


def test_resuming_in_the_shadow_step_keeps_judging_on_the_mirror() -> None:
    resumed = step(
        SHADOW,
        with_commands(paused_in_the_shadow_step(), [Command(kind="resume", id="r")]),
        obs(),
        10.0,
    ).status
    assert (resumed.phase, resumed.mirror) == (Phase.PROGRESSING, 20)
    # Judged, not passed as a header-only step once min_step_s is over: it wants its copies.
    later = step(SHADOW, resumed, obs(blue=(10, 0), green=(50, 0), at=60.0, since=10.0), 60.0)
    assert later.actions == () and "has 10 of 100 canary requests" in later.status.reason


@pytest.mark.parametrize(
    ("kind", "weight", "phase", "actions"),
    [
        pytest.param("abort", None, Phase.ROLLING_BACK, (SetWeights(0),), id="abort"),
        pytest.param("promote", None, Phase.PROMOTING, (SetWeights(100),), id="promote"),
        pytest.param("set_weight", 10, Phase.PAUSED, (SetWeights(10),), id="set-weight-10"),
    ],
)
def test_leaving_the_shadow_step_by_command_ends_the_mirror(
    kind: str, weight: int | None, phase: Phase, actions: tuple[SetWeights, ...]
) -> None:
    command = Command(kind=kind, id="c", weight=weight)  # type: ignore[arg-type]
    decision = step(SHADOW, with_commands(paused_in_the_shadow_step(), [command]), obs(), 10.0)
    assert (decision.status.phase, decision.actions, decision.status.mirror) == (phase, actions, 0)


@pytest.mark.parametrize(
    ("green", "says"),
    [
        pytest.param(0, "no mirrored copies counted yet in the shadow step (20 % mirrored)",
                     id="no-traffic-yet"),
        pytest.param(45, "no mirrored copies counted yet in the shadow step (20 % mirrored)",
                     id="too-few-live-requests-to-ask"),
        pytest.param(50, "while green counted 50 live requests (~10 copies expected): does the "
                     "metrics source count mirrored requests?", id="asks-once-copies-are-due"),
    ],
)  # fmt: skip
def test_uncounted_copies_are_questioned_only_once_green_traffic_should_have_brought_some(
    green: int, says: str
) -> None:
    """At the first look (a scrape after the step began) no source has counted a copy yet: the
    question about the metrics source would alarm a user for nothing."""
    decision = step(SHADOW, started(), obs(green=(green, 0), at=10.0), 10.0)
    assert decision.actions == ()
    assert decision.status.reason.endswith(says), decision.status.reason
    assert ("?" in decision.status.reason) == (green >= 50)
