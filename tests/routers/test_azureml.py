"""The Azure ML endpoint router: Azure's traffic rules as pure functions, then the contract
through the real azure-ai-ml SDK against the fake ARM server (real serialisation and LRO polling).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollout.core.types import Colour, Weights
from rollout.errors import RouterError
from rollout.routers.azureml import check_mirror, plan_traffic, weights_from_traffic

NAMES = {Colour.BLUE: "blue", Colour.GREEN: "green"}


@pytest.mark.parametrize(
    ("current", "mirror", "blue", "shadow", "traffic", "new_mirror"),
    [
        pytest.param({}, {}, 0, 0, {"green": 100}, {}, id="first-traffic-green-only"),
        pytest.param({"green": 100}, {}, 10, 0, {"green": 90, "blue": 10}, {}, id="canary-step"),
        pytest.param(
            {"green": 100, "blue": 0}, {}, 0, 20, {"green": 100, "blue": 0}, {"blue": 20},
            id="blue-at-zero-is-shadowed",
        ),
        pytest.param(
            {"green": 100, "blue": 0}, {"blue": 20}, 10, 20, {"green": 90, "blue": 10}, {},
            id="live-traffic-ends-the-shadow",
        ),
        pytest.param(
            {"green": 100, "old": 0}, {}, 0, 0, {"green": 100, "old": 0}, {},
            id="foreign-deployment-at-zero-kept",
        ),
        pytest.param(
            {"green": 100}, {"other": 10}, 50, 0, {"green": 50, "blue": 50}, {"other": 10},
            id="foreign-shadow-kept",
        ),
    ],
)  # fmt: skip
def test_plan_traffic(
    current: dict[str, int],
    mirror: dict[str, int],
    blue: int,
    shadow: int,
    traffic: dict[str, int],
    new_mirror: dict[str, int],
) -> None:
    assert plan_traffic(current, mirror, NAMES, Weights.blue_at(blue), shadow) == (
        traffic,
        new_mirror,
    )


@pytest.mark.parametrize(
    ("current", "mirror", "blue", "shadow", "message"),
    [
        pytest.param({"green": 60, "old": 40}, {}, 10, 0, "does not manage", id="foreign-live"),
        pytest.param({"green": 100}, {"other": 10}, 0, 10, "one deployment", id="two-shadows"),
    ],
)
def test_plan_traffic_refuses_what_azure_would(
    current: dict[str, int], mirror: dict[str, int], blue: int, shadow: int, message: str
) -> None:
    with pytest.raises(RouterError, match=message):
        plan_traffic(current, mirror, NAMES, Weights.blue_at(blue), shadow)


@pytest.mark.parametrize(
    ("mirror", "traffic", "message"),
    [
        pytest.param({"blue": 51}, {"green": 100}, "1..50 %", id="over-50"),
        pytest.param({"blue": 10}, {"green": 90, "blue": 10}, "cannot also be mirrored", id="live"),
        pytest.param({"a": 10, "b": 10}, {"green": 100}, "one deployment only", id="two"),
    ],
)
def test_check_mirror(mirror: dict[str, int], traffic: dict[str, int], message: str) -> None:
    with pytest.raises(RouterError, match=message):
        check_mirror(mirror, traffic)


@given(
    blue=st.integers(0, 100),
    shadow=st.sampled_from([0, 10, 50]),
    foreign=st.dictionaries(st.sampled_from(["old", "x"]), st.just(0), max_size=2),
)
def test_planned_traffic_always_obeys_azure_and_round_trips(
    blue: int, shadow: int, foreign: dict[str, int]
) -> None:
    traffic, mirror = plan_traffic(
        {"green": 100, **foreign}, {}, NAMES, Weights.blue_at(blue), shadow
    )
    assert sum(traffic.values()) == 100
    check_mirror(mirror, traffic)
    assert weights_from_traffic(traffic, NAMES) == Weights.blue_at(blue)


@pytest.mark.parametrize(
    "traffic",
    [pytest.param({}, id="no-traffic-yet"), pytest.param({"green": 50, "x": 50}, id="foreign")],
)
def test_weights_from_traffic_refuses_a_split_that_is_not_ours(traffic: dict[str, Any]) -> None:
    with pytest.raises(RouterError, match="does not split 100 %"):
        weights_from_traffic(traffic, NAMES)
