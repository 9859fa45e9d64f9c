"""Invariants of the machine over arbitrary traffic, outages and operator commands (hypothesis).

Drives `step` the way the controller does — cumulative counts since the step began, commands
queued between ticks — and checks after every tick:
- blue's weight, and every weight an action sets, is 0 or a weight of the plan (sums to 100);
- blue is mirrored only in the shadow step (weight 0, Progressing or Paused), at the spec's
  percent, and never once the rollout ends;
- a Failed verdict ends with blue at 0 %, mirror off;
- without canary traffic nothing is ever promoted (unless an operator says so), nor failed;
- the candidate is deployed to green at most once (one promotion).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rollout.core.machine import new_status, step, with_commands
from rollout.core.status import TRANSITIONAL, Command, Deploy, SetWeights
from rollout.core.types import Colour, Phase, Verdict, Weights
from tests.core.helpers import make_spec, obs

PLANS = st.sampled_from(
    [[10, 50, 100], [5, 25, 50, 100], "seed", [1, 100], [0, 1, 100], [0, 10, 50, 100]]
)
MIRRORS = st.sampled_from([0, 5, 20])

tick = st.tuples(
    st.integers(0, 400),  # total requests this tick
    st.floats(0.0, 0.2),  # canary error rate
    st.floats(0.0, 0.02),  # baseline error rate
    st.booleans(),  # metrics outage
    st.sampled_from([None, None, None, None, "pause", "resume", "abort", "promote", "set_weight"]),
    st.integers(0, 100),  # weight for set_weight
)


def drive(
    plan: object,
    ticks: list[tuple[int, float, float, bool, str | None, int]],
    *,
    canary_traffic: bool = True,
    mirror: int = 0,
) -> list[tuple[object, ...]]:
    spec = make_spec(steps=plan, analysis={"min_requests": 50}, mirror_percent=mirror)
    allowed = {0, *spec.plan}
    status = new_status(spec, now=0.0)
    now = 0.0
    counts = {"b": [0, 0], "g": [0, 0]}
    step_index_seen = (status.step_index, status.step_started_at)
    deploys_to_green = 0
    history: list[tuple[object, ...]] = []
    log: list[Command] = []
    for n, rate_b, rate_g, outage, command, weight in ticks:
        if (status.step_index, status.step_started_at) != step_index_seen:
            counts = {"b": [0, 0], "g": [0, 0]}  # observations restart with each step
            step_index_seen = (status.step_index, status.step_started_at)
        if command is not None:  # the store's log only grows
            log.append(Command(id=f"c{len(log)}", kind=command, weight=weight))  # type: ignore[arg-type]
            status = with_commands(status, log)
            queued = [c.id for c in status.commands]  # the new one, none read twice
            assert queued[-1] == log[-1].id and len(set(queued)) == len(queued)
        nb = n * status.blue_weight // 100 if canary_traffic else 0
        copies = n * status.mirror // 100 if canary_traffic else 0  # green serves the originals
        counts["b"][0] += nb + copies
        counts["b"][1] += int((nb + copies) * rate_b)
        counts["g"][0] += n - nb
        counts["g"][1] += int((n - nb) * rate_g)
        observation = None
        if status.phase in (Phase.PROGRESSING, Phase.PAUSED):
            observation = obs(
                blue=tuple(counts["b"]),  # type: ignore[arg-type]
                green=tuple(counts["g"]),  # type: ignore[arg-type]
                at=now,
                since=status.step_started_at,
                error="down" if outage else None,
            )
        decision = step(spec, status, observation, now)
        for action in decision.actions:
            if isinstance(action, SetWeights):
                assert action.blue in allowed
                assert action.mirror in (0, spec.shadow_percent)
                Weights.blue_at(action.blue, action.mirror)  # within 0..100, sum 100, mirror at 0
            if isinstance(action, Deploy) and action.colour is Colour.GREEN:
                deploys_to_green += 1
        status = decision.status
        assert status.blue_weight in allowed
        if status.mirror:
            assert status.mirror == spec.shadow_percent and status.blue_weight == 0
            assert status.phase in (Phase.PROGRESSING, Phase.PAUSED)
        if status.verdict is Verdict.FAILED and status.phase in (
            Phase.ROLLING_BACK,
            Phase.ROLLED_BACK,
        ):
            assert status.blue_weight == 0
        assert deploys_to_green <= 1
        history.append((status.phase, status.verdict, command, decision.actions))
        if status.phase not in TRANSITIONAL:
            now += 10.0
    # Drain transitional phases as the controller would.
    for _ in range(5):
        if status.phase in TRANSITIONAL:
            decision = step(spec, status, None, now)
            status = decision.status
            history.append((status.phase, status.verdict, None, decision.actions))
    if status.phase is Phase.ROLLED_BACK:
        assert status.blue_weight == 0
    if status.terminal:
        assert status.mirror == 0
    return history


@settings(max_examples=150, deadline=None)
@given(plan=PLANS, mirror=MIRRORS, ticks=st.lists(tick, min_size=1, max_size=60))
def test_weights_stay_in_the_plan_and_failures_end_at_zero(
    plan: object, mirror: int, ticks: list[tuple[int, float, float, bool, str | None, int]]
) -> None:
    drive(plan, ticks, mirror=mirror if plan == "seed" or 0 in plan else 0)  # type: ignore[operator]


@settings(max_examples=100, deadline=None)
@given(
    plan=st.sampled_from([[10, 50, 100], [5, 25, 50, 100], [0, 10, 50, 100]]),
    ticks=st.lists(
        tick.map(lambda t: (*t[:4], None, 0)),  # no operator commands
        min_size=1,
        max_size=120,
    ),
)
def test_no_canary_traffic_never_passes_and_never_fails(
    plan: object, ticks: list[tuple[int, float, float, bool, str | None, int]]
) -> None:
    history = drive(plan, ticks, canary_traffic=False, mirror=20 if plan[0] == 0 else 0)  # type: ignore[index]
    phases = {h[0] for h in history}
    verdicts = {h[1] for h in history}
    assert Phase.PROMOTING not in phases and Phase.SUCCEEDED not in phases
    assert Verdict.FAILED not in verdicts
    # The first step never advanced: no SetWeights beyond the first planned weight.
    weights = {a.blue for h in history for a in h[3] if isinstance(a, SetWeights)}
    assert weights <= {plan[0]}  # type: ignore[index]


def test_drive_detects_a_promotion_on_healthy_traffic() -> None:
    # The harness itself can reach Succeeded (so the properties above are not vacuous).
    ticks = [(2000, 0.01, 0.01, False, None, 0)] * 200
    history = drive([10, 50, 100], ticks)
    assert history[-1][0] is Phase.SUCCEEDED
    spec_ticks = [(2000, 0.001, 0.001, False, None, 0)] * 3 + [(0, 0, 0, False, "promote", 0)]
    history = drive([10, 50, 100], spec_ticks)
    assert history[-1][0] is Phase.SUCCEEDED
