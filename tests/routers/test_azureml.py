"""The Azure ML endpoint router: Azure's traffic rules as pure functions, then the contract
through the real azure-ai-ml SDK against the fake ARM server (real serialisation and LRO polling).
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from rollout.api import run_rollout
from rollout.azure_credential import managed_identity
from rollout.config import AzureMLRouterConfig, load_spec, spec_from_dict
from rollout.controller import FakeClock
from rollout.core.status import Command, Status
from rollout.core.types import Colour, Phase, Release, Weights
from rollout.errors import (
    ConfigError,
    DeployFailed,
    RouterError,
    RouterRefused,
    StateError,
    WeightsUnsettled,
)
from rollout.routers.azureml import (
    AzureMLRouter,
    check_mirror,
    plan_traffic,
    weights_from_traffic,
)
from rollout.routers.factory import make_router as make_router_from
from rollout.state.file import FileStateStore
from tests.fakes.arm import FakeArm, StaticCredential, iter_calls
from tests.fakes.identity import AZURE_CREDENTIAL_ENV, FakeIdentityEndpoint
from tests.routers.contract import V1, V2, RouterContract, identity

NAMES = {Colour.BLUE: "blue", Colour.GREEN: "green"}


@pytest.mark.parametrize(
    ("current", "mirror", "blue", "shadow", "traffic", "new_mirror"),
    [
        pytest.param({}, {}, 0, 0, {"green": 100}, {}, id="first-traffic-green-only"),
        pytest.param({"green": 100}, {}, 10, 0, {"green": 90, "blue": 10}, {}, id="canary-step"),
        pytest.param(
            {"green": 100, "blue": 0}, {}, 0, 20, {"green": 100}, {"blue": 20},
            id="shadow-step-mirrors-blue",
        ),
        pytest.param(
            {"green": 100}, {"blue": 5}, 0, 20, {"green": 100}, {"blue": 20},
            id="shadow-percent-changed",
        ),
        pytest.param(
            {"green": 100}, {"blue": 20}, 10, 0, {"green": 90, "blue": 10}, {},
            id="live-traffic-ends-the-shadow",
        ),
        pytest.param(
            {"green": 90, "blue": 10}, {}, 0, 0, {"green": 100}, {},
            id="rollback-no-shadow",
        ),
        pytest.param(
            {"green": 100}, {"blue": 20}, 0, 0, {"green": 100}, {},
            id="weight-0-mirror-0-ends-the-shadow",
        ),
        pytest.param(
            {"green": 100}, {"green": 10}, 0, 5, {"green": 100}, {"blue": 5},
            id="a-shadow-of-our-green-is-not-kept",
        ),
        pytest.param(
            {"green": 100, "old": 0}, {}, 100, 0, {"blue": 100}, {},
            id="zero-entries-left-out-as-the-sdk-does",
        ),
        pytest.param(
            {"green": 100}, {"other": 10}, 50, 0, {"green": 50, "blue": 50}, {"other": 10},
            id="foreign-shadow-kept",
        ),
        pytest.param(
            {"green": 100}, {"other": 10}, 0, 0, {"green": 100}, {"other": 10},
            id="foreign-shadow-kept-at-0",
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
    weights = Weights.blue_at(blue, mirror=shadow)
    assert plan_traffic(current, mirror, NAMES, weights) == (traffic, new_mirror)


@pytest.mark.parametrize(
    ("current", "mirror", "blue", "shadow", "message"),
    [
        pytest.param({"green": 60, "old": 40}, {}, 10, 0, "does not manage", id="foreign-live"),
        pytest.param({"green": 100}, {"other": 10}, 0, 10, "one deployment", id="two-shadows"),
        pytest.param({"green": 100}, {}, 0, 51, r"must be 1\.\.50 %, got 51", id="over-50"),
        pytest.param({"green": 100}, {}, 0, 100, r"must be 1\.\.50 %", id="all-mirrored"),
    ],
)
def test_plan_traffic_refuses_what_azure_would(
    current: dict[str, int], mirror: dict[str, int], blue: int, shadow: int, message: str
) -> None:
    with pytest.raises(RouterRefused, match=message):
        plan_traffic(current, mirror, NAMES, Weights.blue_at(blue, mirror=shadow))


@pytest.mark.parametrize(
    ("mirror", "traffic", "message"),
    [
        pytest.param({"blue": 51}, {"green": 100}, "1..50 %", id="over-50"),
        pytest.param({"blue": 10}, {"green": 90, "blue": 10}, "cannot also be mirrored", id="live"),
        pytest.param({"a": 10, "b": 10}, {"green": 100}, "one deployment only", id="two"),
    ],
)
def test_check_mirror(mirror: dict[str, int], traffic: dict[str, int], message: str) -> None:
    with pytest.raises(RouterRefused, match=message):
        check_mirror(mirror, traffic)


@given(
    blue=st.integers(0, 100),
    shadow=st.sampled_from([0, 1, 10, 50]),
    before=st.sampled_from([{}, {"blue": 20}, {"green": 5}]),
    foreign=st.dictionaries(st.sampled_from(["old", "x"]), st.just(0), max_size=2),
)
def test_planned_traffic_always_obeys_azure_and_round_trips(
    blue: int, shadow: int, before: dict[str, int], foreign: dict[str, int]
) -> None:
    weights = Weights.blue_at(blue, mirror=0 if blue else shadow)
    traffic, mirror = plan_traffic({"green": 100, **foreign}, before, NAMES, weights)
    assert sum(traffic.values()) == 100
    check_mirror(mirror, traffic)
    assert weights_from_traffic(traffic, NAMES, mirror) == weights


@pytest.mark.parametrize(
    "traffic",
    [pytest.param({}, id="no-traffic-yet"), pytest.param({"green": 50, "x": 50}, id="foreign")],
)
def test_weights_from_traffic_refuses_a_split_that_is_not_ours(traffic: dict[str, Any]) -> None:
    with pytest.raises(RouterError, match="does not split 100 %"):
        weights_from_traffic(traffic, NAMES)


@pytest.mark.parametrize(
    ("traffic", "says"),
    [
        pytest.param({}, "(no traffic set yet?)", id="no-traffic-yet"),
        pytest.param(
            {"green": 50, "x": 50},
            "(deployments aml-rollout does not manage take live traffic: {'x': 50})",
            id="foreign",
        ),
    ],
)
def test_a_split_that_is_not_ours_says_why(traffic: dict[str, int], says: str) -> None:
    """Traffic moved to another deployment (in the portal, say) was asked "no traffic set
    yet?", which sent the operator looking for a rollout that never started."""
    with pytest.raises(RouterError) as caught:
        weights_from_traffic(traffic, NAMES)
    assert str(caught.value) == (
        f"endpoint traffic {traffic} does not split 100 % between 'blue' and 'green' {says}"
    )


@pytest.mark.parametrize(
    ("traffic", "mirror", "weights"),
    [
        pytest.param({"green": 100}, {"blue": 5}, Weights.blue_at(0, mirror=5), id="shadow"),
        pytest.param({"green": 100}, {"other": 5}, Weights.blue_at(0), id="foreign-shadow"),
        pytest.param({"green": 100}, {"green": 5}, Weights.blue_at(0), id="green-shadow"),
        pytest.param({"green": 100}, {"blue": 0}, Weights.blue_at(0), id="zero-entry"),
    ],
)
def test_weights_from_traffic_reads_blues_mirror_only(
    traffic: dict[str, int], mirror: dict[str, int], weights: Weights
) -> None:
    assert weights_from_traffic(traffic, NAMES, mirror) == weights


def test_a_mirror_to_a_live_blue_reads_as_a_router_error_not_a_crash() -> None:
    """Azure refuses to write that state, so one read back is not what serves: say so (the
    controller then sets the weights again), neither crash in Weights nor hide the mirror."""
    with pytest.raises(RouterError) as caught:
        weights_from_traffic({"green": 90, "blue": 10}, NAMES, {"blue": 20})
    assert str(caught.value).startswith(
        "endpoint mirrors 20 % to 'blue', which also takes 10 % of live traffic: Azure refuses"
    )


# ---- the router through the real SDK against the fake ARM ------------------------------------
SUB, RG, WS = "00000000-0000-0000-0000-000000000001", "ml-rg", "ml-ws"
WORKSPACE = (
    f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.MachineLearningServices"
    f"/workspaces/{WS}"
)


@contextmanager
def running_arm(polls: int = 1) -> Iterator[FakeArm]:
    with FakeArm() as server:
        server.add_workspace(SUB, RG, WS)
        # Endpoint and deployment writes are long-running operations, as in Azure: the SDK's
        # poller follows Azure-AsyncOperation until it reports Succeeded (after `polls` polls
        # answered InProgress).
        server.lro(r"/onlineEndpoints/[^/]+(/deployments/[^/]+)?$", polls=polls)
        # What the service fills in on a deployment and azure-ai-ml needs to read it back.
        server.defaults(
            r"/onlineEndpoints/[^/]+/deployments/[^/]+$",
            {"scaleSettings": {"scaleType": "Default"}},
        )
        yield server


def client_of(arm: FakeArm) -> Any:
    from azure.ai.ml import MLClient

    return MLClient(StaticCredential(), SUB, RG, WS, transport=arm.transport())


@pytest.fixture(scope="module")
def arm() -> Iterator[FakeArm]:
    with running_arm() as server:
        yield server


@pytest.fixture(scope="module")
def ml_client(arm: FakeArm) -> Any:
    return client_of(arm)


_endpoints = itertools.count()


def make_router(ml_client: Any, **kwargs: Any) -> AzureMLRouter:
    """A router on a fresh endpoint (one module-wide fake ARM, a new endpoint per router)."""
    kwargs.setdefault("environment", "azureml:diabetes-env:1")
    return AzureMLRouter(ml_client, f"ep-{next(_endpoints)}", **kwargs)


def endpoint(arm: FakeArm, router: AzureMLRouter) -> dict[str, Any]:
    found = arm.get(f"{WORKSPACE}/onlineEndpoints/{router.endpoint}")
    assert found is not None
    return found


class TestAzureMLRouterContract(RouterContract):
    @pytest.fixture(autouse=True)
    def _client(self, ml_client: Any) -> None:
        self.ml_client = ml_client

    @pytest.fixture
    def router(self, ml_client: Any) -> AzureMLRouter:
        return make_router(ml_client)

    @contextmanager
    def fresh_router(self) -> Iterator[AzureMLRouter]:
        yield make_router(self.ml_client)


def test_deploy_sends_the_registered_model_and_the_release_tags(
    arm: FakeArm, ml_client: Any
) -> None:
    router = make_router(ml_client, instance_type="Standard_F4s_v2", instance_count=2)
    router.deploy(Colour.BLUE, V2)
    dep = arm.get(f"{WORKSPACE}/onlineEndpoints/{router.endpoint}/deployments/blue")
    assert dep is not None
    props = dep["properties"]
    assert props["model"].endswith("/models/diabetes/versions/2")
    assert props["environmentId"].endswith("/environments/diabetes-env/versions/1")
    assert props["instanceType"] == "Standard_F4s_v2"
    assert dep["sku"]["capacity"] == 2
    assert dep["tags"]["aml-rollout.version"] == "2"
    # Was none: the registered model folder has no package.json, so score.py answered version
    # "0" for every release and blue and green could not be told apart in their answers.
    assert props["environmentVariables"] == {
        "AML_ROLLOUT_MODEL_VERSION": "2",
        "AML_ROLLOUT_COLOUR": "blue",
    }
    assert endpoint(arm, router)["properties"]["authMode"] == "Key"
    release = router.release(Colour.BLUE)
    assert release is not None and release.deployment == "blue"


def test_weights_are_the_endpoint_traffic(arm: FakeArm, ml_client: Any) -> None:
    router = make_router(ml_client)
    RouterContract.live(router, Weights.blue_at(25))
    assert endpoint(arm, router)["properties"]["traffic"] == {"green": 75, "blue": 25}


def _served(arm: FakeArm, router: AzureMLRouter) -> tuple[Any, Any]:
    props = endpoint(arm, router)["properties"]
    return props["traffic"], props.get("mirrorTraffic", {})


@pytest.mark.parametrize(
    ("after", "traffic"),
    [
        pytest.param(Weights.blue_at(10), {"green": 90, "blue": 10}, id="live-traffic-ends-it"),
        pytest.param(Weights.blue_at(0), {"green": 100}, id="rollback-ends-it"),
    ],
)
def test_the_shadow_step_mirrors_blue_and_any_other_weights_end_it(
    arm: FakeArm, ml_client: Any, after: Weights, traffic: dict[str, int]
) -> None:
    router = make_router(ml_client)
    RouterContract.live(router)
    router.deploy(Colour.BLUE, V2)
    router.set_weights(Weights.blue_at(0))
    assert _served(arm, router) == ({"green": 100}, {})  # weight 0, mirror 0: no shadow

    shadow = Weights.blue_at(0, mirror=5)
    router.set_weights(shadow)
    assert _served(arm, router) == ({"green": 100}, {"blue": 5})
    assert router.get_weights() == shadow  # what the controller checks after set_weights

    router.set_weights(after)
    assert _served(arm, router) == (traffic, {})
    assert router.get_weights() == after


def test_a_rolled_back_blue_stays_unshadowed(arm: FakeArm, ml_client: Any) -> None:
    """The old router shadowed any deployed blue at 0 %, a rolled-back candidate included."""
    router = make_router(ml_client)
    RouterContract.live(router)
    router.deploy(Colour.BLUE, V2)
    for weights in (Weights.blue_at(0, mirror=20), Weights.blue_at(25), Weights.blue_at(0)):
        router.set_weights(weights)
    assert _served(arm, router) == ({"green": 100}, {})
    assert router.get_weights() == Weights.blue_at(0)
    router.remove(Colour.BLUE)
    assert router.release(Colour.BLUE) is None


def test_remove_drops_the_shadow_before_deleting(arm: FakeArm, ml_client: Any) -> None:
    router = make_router(ml_client)
    RouterContract.live(router)
    router.deploy(Colour.BLUE, V2)
    router.set_weights(Weights.blue_at(0, mirror=20))
    router.remove(Colour.BLUE)  # Azure refuses to delete a deployment still mirrored to
    assert _served(arm, router) == ({"green": 100}, {})
    assert router.release(Colour.BLUE) is None


def test_mirroring_a_blue_that_is_not_deployed_is_refused(arm: FakeArm, ml_client: Any) -> None:
    router = make_router(ml_client)
    RouterContract.live(router)
    before = len(list(iter_calls(arm, "PUT", f"/onlineEndpoints/{router.endpoint}$")))
    with pytest.raises(
        RouterError, match=rf"^cannot mirror 5 % to blue: deployment {router.endpoint}/blue "
    ):
        router.set_weights(Weights.blue_at(0, mirror=5))
    assert len(list(iter_calls(arm, "PUT", f"/onlineEndpoints/{router.endpoint}$"))) == before
    assert router.get_weights() == Weights.blue_at(0)


def test_a_mirror_over_50_is_refused_before_azure_is_asked(arm: FakeArm, ml_client: Any) -> None:
    router = make_router(ml_client)
    RouterContract.live(router)
    router.deploy(Colour.BLUE, V2)
    before = len(list(iter_calls(arm, "PUT", f"/onlineEndpoints/{router.endpoint}$")))
    with pytest.raises(RouterError, match=r"mirror traffic to 'blue' must be 1\.\.50 %, got 60"):
        router.set_weights(Weights.blue_at(0, mirror=60))
    assert len(list(iter_calls(arm, "PUT", f"/onlineEndpoints/{router.endpoint}$"))) == before
    assert router.get_weights() == Weights.blue_at(0)


def test_get_weights_reads_a_mirror_to_a_live_blue_as_one_line(
    arm: FakeArm, ml_client: Any
) -> None:
    """An endpoint showing what Azure forbids (a change that failed, another writer) is not
    what serves; set_weights then writes a plan Azure accepts."""
    router = make_router(ml_client)
    RouterContract.live(router, Weights.blue_at(10))
    shown = endpoint(arm, router)
    shown["properties"]["mirrorTraffic"] = {"blue": 20}
    arm.resources[f"{WORKSPACE}/onlineEndpoints/{router.endpoint}".lower()] = shown
    with pytest.raises(RouterError, match="mirrors 20 % to 'blue', which also takes 10 %"):
        router.get_weights()
    router.set_weights(Weights.blue_at(10))
    assert _served(arm, router) == ({"green": 90, "blue": 10}, {})
    assert router.get_weights() == Weights.blue_at(10)


def test_setting_the_served_weights_writes_nothing(arm: FakeArm, ml_client: Any) -> None:
    router = make_router(ml_client)
    RouterContract.live(router, Weights.blue_at(10))
    before = len(arm.calls)
    router.set_weights(Weights.blue_at(10))
    assert [c[0] for c in arm.calls[before:]] == ["GET"] * (len(arm.calls) - before)


def test_deployment_names_with_capitals_read_back_the_traffic_azure_ai_ml_lower_cased(
    arm: FakeArm, ml_client: Any
) -> None:
    """The spec takes `Ep-2` as a deployment name, as Azure does; azure-ai-ml lower-cases the
    keys of `traffic` and `mirror_traffic` it sends, so the endpoint keeps `ep-2`. Reading that
    back as no traffic of ours stalled the rollout at its first step."""
    names = {Colour.BLUE: "Cand-V2", Colour.GREEN: "Prod"}
    router = make_router(ml_client, deployments=names)
    RouterContract.live(router, Weights.blue_at(0))
    router.deploy(Colour.BLUE, V2)
    router.set_weights(Weights.blue_at(0, mirror=5))
    assert _served(arm, router) == ({"prod": 100}, {"cand-v2": 5})
    assert router.get_weights() == Weights.blue_at(0, mirror=5)
    for weights in (Weights.blue_at(25), Weights.blue_at(25), Weights.blue_at(0)):
        router.set_weights(weights)
        assert router.get_weights() == weights
    router.remove(Colour.BLUE)
    assert router.release(Colour.BLUE) is None
    assert identity(router.release(Colour.GREEN)) == identity(V1)


def test_azure_errors_are_router_errors_naming_the_resource(arm: FakeArm, ml_client: Any) -> None:
    router = make_router(ml_client)
    RouterContract.live(router)
    router.deploy(Colour.BLUE, V2)
    arm.fail("PUT", f"/onlineEndpoints/{router.endpoint}$", 400, "BadArgument")
    with pytest.raises(RouterError, match=rf"update endpoint {router.endpoint} traffic: HTTP 400"):
        router.set_weights(Weights.blue_at(10))
    assert router.get_weights() == Weights.blue_at(0)


@pytest.mark.parametrize(
    ("traffic", "mirror", "weights", "message"),
    [
        pytest.param(
            {"green": 90, "old": 10}, {}, Weights.blue_at(10),
            "deployments aml-rollout does not manage take live traffic: {'old': 10}; set them "
            "to 0 first",
            id="foreign-live-traffic",
        ),
        pytest.param(
            {"green": 100}, {"old": 10}, Weights.blue_at(0, mirror=5),
            "mirror traffic may go to one deployment only, got {'old': 10, 'blue': 5}",
            id="foreign-shadow-and-ours",
        ),
    ],
)  # fmt: skip
def test_a_plan_azure_would_refuse_names_the_endpoint(
    arm: FakeArm,
    ml_client: Any,
    traffic: dict[str, int],
    mirror: dict[str, int],
    weights: Weights,
    message: str,
) -> None:
    router = make_router(ml_client)
    RouterContract.live(router)
    router.deploy(Colour.BLUE, V2)
    found = endpoint(arm, router)
    found["properties"].update(traffic=traffic, mirrorTraffic=mirror)
    arm.resources[f"{WORKSPACE}/onlineEndpoints/{router.endpoint}".lower()] = found
    with pytest.raises(RouterRefused) as caught:  # not ours to move: the controller won't retry
        router.set_weights(weights)
    assert str(caught.value) == f"update endpoint {router.endpoint} traffic: {message}"


def test_traffic_held_by_a_deployment_not_ours_stops_the_rollout_at_once(
    arm: FakeArm, ml_client: Any, tmp_path: Path
) -> None:
    """Was: retried 4 times, 1 + 2 + 4 s apart, then "failed 4 times: ...": another deployment's
    live traffic is an operator's to move, not a blip."""
    router = make_router(ml_client)
    router.deploy(Colour.GREEN, V1)
    found = endpoint(arm, router)
    found["properties"].update(traffic={"green": 90, "old": 10})
    arm.resources[f"{WORKSPACE}/onlineEndpoints/{router.endpoint}".lower()] = found
    spec = spec_from_dict({
        "name": "diabetes",
        "router": {"kind": "azureml", "subscription_id": SUB, "resource_group": RG,
                   "workspace": WS, "endpoint": router.endpoint},
        "metrics": {"kind": "static"},
        "steps": [10, 100],
        "state": {"dir": str(tmp_path / "state")},
    })  # fmt: skip
    endpoint_puts = f"/onlineEndpoints/{router.endpoint}$"
    before = len(list(iter_calls(arm, "PUT", endpoint_puts)))
    clock = FakeClock(1_000.0)
    with pytest.raises(RouterRefused, match=r"take live traffic: \{'old': 10\}; set them to 0"):
        run_rollout(spec, candidate=V2, router=router, clock=clock)
    assert clock.now() == 1_000.0  # no pause
    assert len(list(iter_calls(arm, "PUT", endpoint_puts))) == before  # the traffic untouched


@pytest.mark.parametrize(
    ("resource", "call", "message"),
    [
        pytest.param(
            "/deployments/blue", lambda r: r.deploy(Colour.BLUE, V2),
            r"^deploy ep-\d+/blue: HTTP 404 ResourceNotFound: injected failure on PUT ",
            id="deploy",
        ),
        pytest.param(
            "", lambda r: r.set_weights(Weights.blue_at(10)),
            r"^update endpoint ep-\d+ traffic: HTTP 404 ResourceNotFound: injected failure ",
            id="traffic-update",
        ),
    ],
)  # fmt: skip
def test_a_404_on_a_write_says_what_azure_answered(
    arm: FakeArm, ml_client: Any, resource: str, call: Any, message: str
) -> None:
    """Only reads take 404 for "absent"; a write's 404 was a bare "deploy ep/blue" before."""
    router = make_router(ml_client)
    RouterContract.live(router)
    router.deploy(Colour.BLUE, V1)
    arm.fail("PUT", f"/onlineEndpoints/{router.endpoint}{resource}$", 404, "ResourceNotFound")
    with pytest.raises(RouterError, match=message):
        call(router)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        pytest.param(429, "TooManyRequests", id="throttled"),
        pytest.param(500, "InternalServerError", id="500"),
        pytest.param(503, "ServiceUnavailable", id="503"),
    ],
)
def test_arm_throttling_and_5xx_are_retried_then_one_line(
    arm: FakeArm, ml_client: Any, status: int, code: str
) -> None:
    """azure-core retries 408/429/5xx three times (docs/azureml-endpoint.md says so)."""
    router = make_router(ml_client)
    RouterContract.live(router)
    router.deploy(Colour.BLUE, V1)
    endpoint_path = f"/onlineEndpoints/{router.endpoint}$"

    arm.fail("GET", endpoint_path, status, code, times=2)
    arm.fail("PUT", endpoint_path, status, code, times=2)
    router.set_weights(Weights.blue_at(10))  # two failures each: retried through
    assert router.get_weights() == Weights.blue_at(10)

    arm.fail("GET", endpoint_path, status, code, times=100)
    before = len(list(iter_calls(arm, "GET", endpoint_path)))
    with pytest.raises(RouterError) as caught:
        router.get_weights()
    assert str(caught.value).startswith(f"endpoint {router.endpoint}: HTTP {status} {code}: ")
    assert "\n" not in str(caught.value)
    assert len(list(iter_calls(arm, "GET", endpoint_path))) - before == 4  # 1 + 3 retries


@pytest.mark.parametrize(
    ("where", "call"),
    [
        pytest.param((SUB, RG, "no-ws"), lambda r: r.release(Colour.GREEN), id="release"),
        pytest.param((SUB, "no-rg", WS), lambda r: r.get_weights(), id="get-weights"),
        pytest.param(
            ("99999999-0000-0000-0000-000000000000", RG, WS), lambda r: r.deploy(Colour.GREEN, V1),
            id="deploy",
        ),
    ],
)  # fmt: skip
def test_a_workspace_not_found_is_not_an_absent_endpoint(
    arm: FakeArm, where: tuple[str, str, str], call: Any
) -> None:
    """Under a wrong subscription, resource group or workspace every read is a 404: said so,
    naming the fields, not read as "green serves nothing" (advice to bootstrap the endpoint)."""
    from azure.ai.ml import MLClient

    client = MLClient(StaticCredential(), *where, transport=arm.transport())
    with pytest.raises(RouterError) as caught:
        call(AzureMLRouter(client, "diabetes-ep"))
    sub, rg, ws = where
    assert str(caught.value).startswith(
        f"workspace {ws} (resource group {rg}, subscription {sub}): HTTP 404 ResourceNotFound: "
    )
    assert str(caught.value).endswith(
        "check router.subscription_id, router.resource_group and router.workspace"
    )


def test_get_weights_without_an_endpoint_says_so(ml_client: Any) -> None:
    with pytest.raises(RouterError, match=r"endpoint ep-\d+ does not exist"):
        make_router(ml_client).get_weights()


def test_sdk_validation_errors_are_one_line(ml_client: Any) -> None:
    router = AzureMLRouter(ml_client, "ep")  # Azure wants 3..32 characters
    with pytest.raises(RouterRefused) as caught:  # nothing a retry changes
        router.deploy(Colour.GREEN, V1)
    assert "\n" not in str(caught.value)
    assert "at least 3 and at most 32 characters" in str(caught.value)


def test_an_asset_the_workspace_lacks_is_one_plain_line(ml_client: Any) -> None:
    """azure-ai-ml colours this text with terminal escapes (its first line black): none of them
    reaches the error line, which a terminal, a log and the ledger show."""
    router = make_router(ml_client, environment="azureml:no-such-env@latest")
    with pytest.raises(RouterRefused) as caught:
        router.deploy(Colour.GREEN, V1)
    assert str(caught.value) == (
        f"deploy {router.endpoint}/green: 1) Resource was not found. Details: "
        "(x) Asset azureml:no-such-env does not exist in workspace ml-ws."
    )


def test_a_deployment_aml_rollout_did_not_make_says_how_to_adopt_it(
    arm: FakeArm, ml_client: Any
) -> None:
    """An endpoint made by hand: its deployment is refused as green, saying what would adopt it."""
    router = make_router(ml_client)
    router.deploy(Colour.GREEN, V1)
    path = f"{WORKSPACE}/onlineEndpoints/{router.endpoint}/deployments/green"
    shown = arm.get(path)
    assert shown is not None
    shown["tags"] = {"owner": "ops"}
    arm.resources[path.lower()] = shown
    with pytest.raises(RouterRefused) as caught:
        router.release(Colour.GREEN)
    assert str(caught.value) == (
        f"deployment {router.endpoint}/green has no aml-rollout.model/version tags: it was not "
        "deployed by aml-rollout (to adopt it, tag it with the registered model and version it "
        "serves, aml-rollout.model and aml-rollout.version; or name other deployments in "
        "router.deployments)"
    )


def test_from_config_through_the_factory() -> None:
    cfg = AzureMLRouterConfig(
        subscription_id=SUB, resource_group=RG, workspace=WS, endpoint="diabetes-ep",
        deployments={"blue": "cand", "green": "prod"},
    )  # fmt: skip
    router = make_router_from(cfg)
    assert isinstance(router, AzureMLRouter)
    assert (router.endpoint, router.names) == (
        "diabetes-ep",
        {Colour.BLUE: "cand", Colour.GREEN: "prod"},
    )


def azure_spec_file(tmp_path: Path, router: dict[str, Any], top: dict[str, Any]) -> Path:
    """A spec file with an azureml router (plus `router` keys) and `top` keys at the top."""
    base = {"kind": "azureml", "subscription_id": SUB, "resource_group": RG, "workspace": WS}
    spec = {"name": "diabetes", "router": {**base, "endpoint": "diabetes-ep", **router}, **top}
    path = tmp_path / "rollout.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("router", "top", "message"),
    [
        pytest.param(
            {"mirror_percent": 10}, {},
            r"router: .*mirror_percent moved to the top of the spec",
            id="router-mirror-percent-moved",
        ),
        pytest.param(
            {}, {"mirror_percent": 60},
            r"rollout\.yaml: mirror_percent: Azure ML mirrors at most 50 %",
            id="over-azures-50",
        ),
    ],
)  # fmt: skip
def test_the_spec_refuses_a_mirror_azure_cannot_take(
    tmp_path: Path, router: dict[str, Any], top: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_spec(azure_spec_file(tmp_path, router, top))


@pytest.mark.parametrize(
    ("router", "message"),
    [
        pytest.param(
            {"subscription_id": "my-subscription"},
            r"router\.subscription_id: .*'my-subscription' is not an Azure subscription "
            r"ID, a GUID",
            id="subscription-not-a-guid",
        ),
        pytest.param(
            {"endpoint": "ep"},
            r"router\.endpoint: .*'ep' is not an Azure ML endpoint or deployment name: "
            r"3 to 32 letters",
            id="endpoint-too-short",
        ),
        pytest.param(
            {"endpoint": "diabetes_ep"},
            r"router\.endpoint: .*'diabetes_ep' is not an Azure ML endpoint",
            id="endpoint-underscore",
        ),
        pytest.param(
            {"endpoint": "e" * 33}, r"router\.endpoint: ", id="endpoint-too-long"
        ),
        pytest.param(
            {"deployments": {"blue": "blue-", "green": "green"}},
            r"router\.deployments: .*'blue-' is not an Azure ML endpoint or deployment",
            id="deployment-ends-with-a-hyphen",
        ),
        pytest.param(
            {"deployments": {"blue": "pr"}},
            r"router\.deployments: .*'pr' is not an Azure ML",
            id="deployment-too-short",
        ),
        pytest.param(
            {"deployments": {"blue": "green"}},
            r"router\.deployments: .*blue and green need two deployments, both are "
            r"'green'",
            id="one-deployment-for-both-colours",
        ),
        pytest.param(
            {"deployments": {"blue": "Prod", "green": "prod"}},
            r"router\.deployments: .*blue and green need two deployments, and 'Prod' "
            r"and 'prod' are one: Azure ML names ignore case",
            id="one-deployment-in-two-cases",
        ),
        pytest.param(
            {"workspace": ""}, r"router\.workspace: ", id="empty-workspace"
        ),
    ],
)  # fmt: skip
def test_the_spec_refuses_names_azure_would_refuse(
    tmp_path: Path, router: dict[str, Any], message: str
) -> None:
    """What azure-ai-ml checks only when it writes (or Azure when it answers) is refused by
    `rollout validate`, at the field: not at the rollout's first deploy."""
    with pytest.raises(ConfigError, match=message):
        load_spec(azure_spec_file(tmp_path, router, {}))


ARM = "/subscriptions/s/resourceGroups/r/providers/Microsoft.MachineLearningServices/workspaces/w"
REGISTRY = "azureml://registries/azureml"

#: (kind, reference, azure-ai-ml takes it): the table both `azure_ml_asset` and azure-ai-ml's
#: own resolution of a deployment's dependencies are held to.
ASSET_REFERENCES = [
    ("environments", "azureml:diabetes-env:1", True),
    ("environments", "diabetes-env:1", True),
    ("environments", "diabetes-env@latest", True),
    ("environments", "azureml:diabetes-env@latest", True),
    ("environments", "azureml:AzureML-sklearn-1.0-ubuntu20.04-py38-cpu", True),
    ("environments", "AzureML-sklearn-1.0-ubuntu20.04-py38-cpu@latest", True),
    ("environments", f"{ARM}/environments/diabetes-env/versions/1", True),
    ("environments", f"{REGISTRY}/environments/sklearn/versions/3", True),
    ("environments", f"{REGISTRY}/environments/sklearn/labels/latest", True),
    ("environments", "azureml:diabetes-env", False),
    ("environments", "diabetes-env", False),
    ("environments", "azureml:diabetes-env:", False),
    ("environments", "diabetes-env@", False),
    ("environments", "diabetes-env@prod", False),
    ("environments", "mcr.microsoft.com/azureml/minimal-py39-inference:latest", False),
    ("environments", f"azureml:{ARM}/environments/diabetes-env/versions/1", False),
    ("codes", "azureml:diabetes-score:1", True),
    ("codes", f"azureml:{ARM}/codes/diabetes-score/versions/1", True),
    ("codes", f"{ARM}/codes/diabetes-score/versions/1", True),
    ("codes", f"{REGISTRY}/codes/score/versions/1", True),
    ("codes", "./score", True),
    ("codes", "score", True),
    ("codes", "azureml:diabetes-score", False),
    ("codes", "azureml:diabetes-score@latest", False),
    ("codes", "azureml:diabetes/score:1", False),
    ("codes", f"azureml:{ARM}/codes/diabetes-score", True),  # an ARM id: Azure's to answer
    ("codes", "azureml:/diabetes-score", False),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "ref", "taken"), ASSET_REFERENCES)
def test_the_asset_references_the_spec_takes_are_those_azure_ai_ml_takes(
    kind: str, ref: str, taken: bool, tmp_path: Path
) -> None:
    """azure-ai-ml's `upload_dependencies` (what `begin_create_or_update` runs before it sends
    the deployment) against a workspace of fakes: a label resolves to version 7, a local
    folder is "uploaded". What it refuses, the spec refuses; what it takes, the spec takes, and
    what the spec sends on names, in a label, an asset a workspace can hold. Was: the spec sent
    `azureml:name@latest` as written, which azure-ai-ml resolves as an asset named
    `azureml:name` (no workspace holds one: a 404 at blue's deploy)."""
    from types import SimpleNamespace

    from azure.ai.ml._scope_dependent_operations import OperationConfig, OperationScope
    from azure.ai.ml._utils._endpoint_utils import upload_dependencies
    from azure.ai.ml.exceptions import AssetException, ValidationException
    from azure.ai.ml.operations._operation_orchestrator import OperationOrchestrator

    class Uploaded(Exception):
        pass

    def upload(*_: Any, **__: Any) -> None:
        raise Uploaded

    resolved: list[str] = []
    latest = {"latest": lambda name: resolved.append(name) or SimpleNamespace(version="7")}
    operations = {
        "environments": SimpleNamespace(_registry_name=None, _managed_label_resolver=latest),
        "codes": SimpleNamespace(create_or_update=upload, _registry_name=None),
    }
    orchestrator = OperationOrchestrator(
        SimpleNamespace(all_operations=operations),
        OperationScope(SUB, RG, WS),
        OperationConfig(show_progress=False, enable_telemetry=False),
    )
    (tmp_path / "score").mkdir()
    field = "environment" if kind == "environments" else "code"
    spec = azure_spec_file(tmp_path, {field: ref}, {})
    sent = getattr(load_spec(spec).router, field) if taken else ref
    environment, code = (sent, None) if kind == "environments" else (None, sent)
    deployment = SimpleNamespace(
        name="blue",
        environment=environment,
        model=None,
        code_configuration=code and SimpleNamespace(code=code, scoring_script="score.py"),
        _base_path=str(tmp_path),
    )
    try:
        upload_dependencies(deployment, orchestrator)  # type: ignore[arg-type]
        sdk_takes = True
    except ValidationException:
        sdk_takes = False
    except AssetException as exc:  # azure-ai-ml wraps what the upload raised
        assert isinstance(exc.__cause__ or exc.__context__, Uploaded), exc
        sdk_takes = True
    assert sdk_takes is taken
    assert all(":" not in name for name in resolved), resolved
    if not taken:
        with pytest.raises(ConfigError) as refused:  # one line, naming the field
            load_spec(spec)
        assert str(refused.value).startswith(f"{spec}: router.{field}: ")
        assert f"{ref!r}: " in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("name", ["diabetes-ep", "abc", "Ep-2", "a" + "b" * 30 + "9"])
def test_the_spec_takes_the_names_azure_takes(tmp_path: Path, name: str) -> None:
    spec = load_spec(
        azure_spec_file(tmp_path, {"endpoint": name, "deployments": {"blue": name}}, {})
    )
    assert isinstance(spec.router, AzureMLRouterConfig)
    assert (spec.router.endpoint, spec.router.deployments.blue) == (name, name)


@pytest.mark.parametrize(
    ("top", "shadow"),
    [
        pytest.param({}, 5, id="default-plan-shadows-5"),
        pytest.param({"mirror_percent": 50}, 50, id="azures-most"),
        pytest.param({"mirror_percent": 0}, 0, id="no-shadow"),
    ],
)
def test_the_spec_decides_the_shadow_on_an_endpoint(
    tmp_path: Path, top: dict[str, Any], shadow: int
) -> None:
    assert load_spec(azure_spec_file(tmp_path, {}, top)).shadow_percent == shadow


# ---- identity: the rule the pipelines use too (rollout.azure_credential) --------------------
CLIENT_ID = "11111111-2222-3333-4444-555555555555"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, {}, id="system-assigned"),
        pytest.param(
            {"DEFAULT_IDENTITY_CLIENT_ID": CLIENT_ID},
            {"managed_identity_client_id": CLIENT_ID},
            id="azure-ml-user-assigned",
        ),
        pytest.param(
            {"AZURE_CLIENT_ID": "a", "DEFAULT_IDENTITY_CLIENT_ID": "b"},
            {},
            id="azure-client-id-wins-defaultazurecredential-reads-it",
        ),
        pytest.param(
            {"AZURE_CLIENT_ID": "", "DEFAULT_IDENTITY_CLIENT_ID": CLIENT_ID},
            {"managed_identity_client_id": CLIENT_ID},
            id="empty-azure-client-id-is-unset",
        ),
    ],
)
def test_managed_identity_keywords(env: dict[str, str], expected: dict[str, str]) -> None:
    assert managed_identity(env) == expected


@pytest.mark.parametrize(
    ("variable", "client_ids"),
    [
        pytest.param("DEFAULT_IDENTITY_CLIENT_ID", [CLIENT_ID], id="azure-ml-user-assigned"),
        pytest.param("AZURE_CLIENT_ID", [CLIENT_ID], id="azure-client-id"),
        pytest.param(None, [None], id="system-assigned"),
    ],
)
def test_the_router_moves_traffic_as_the_computes_user_assigned_identity(
    monkeypatch: pytest.MonkeyPatch, variable: str | None, client_ids: list[str | None]
) -> None:
    """from_config inside an Azure ML job: the token comes from the identity the job names.

    Azure ML sets MSI_ENDPOINT/MSI_SECRET in a job and, for a compute's user-assigned identity,
    DEFAULT_IDENTITY_CLIENT_ID; a bare DefaultAzureCredential asked for the system-assigned one.
    """
    for name in AZURE_CREDENTIAL_ENV:
        monkeypatch.delenv(name, raising=False)
    with running_arm() as arm, FakeIdentityEndpoint() as identity:
        seeded = AzureMLRouter(client_of(arm), "ep-identity", environment="azureml:env:1")
        seeded.deploy(Colour.GREEN, V1)
        seeded.set_weights(Weights.blue_at(0))
        monkeypatch.setenv("MSI_ENDPOINT", identity.url)
        monkeypatch.setenv("MSI_SECRET", "s")
        if variable:
            monkeypatch.setenv(variable, CLIENT_ID)
        cfg = AzureMLRouterConfig(
            subscription_id=SUB, resource_group=RG, workspace=WS, endpoint="ep-identity"
        )
        router = AzureMLRouter.from_config(cfg, transport=arm.transport())
        before = len(arm.calls)
        assert router.get_weights() == Weights.blue_at(0)
    assert identity.client_ids() == client_ids
    assert arm.calls[before:], "the router's request reached ARM with that token"


def test_no_usable_credentials_is_one_line_naming_the_endpoint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The real DefaultAzureCredential finding no identity: its many-line text, on one line."""
    for name in AZURE_CREDENTIAL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached az / token-cache accounts
    monkeypatch.setenv("PATH", "/nonexistent")  # no az, pwsh or azd to ask
    # developer credentials only: never probe a managed-identity endpoint (CI runs on cloud VMs)
    monkeypatch.setenv("AZURE_TOKEN_CREDENTIALS", "dev")
    with running_arm() as arm:
        cfg = AzureMLRouterConfig(
            subscription_id=SUB, resource_group=RG, workspace=WS, endpoint="ep-nobody"
        )
        router = AzureMLRouter.from_config(cfg, transport=arm.transport())
        with pytest.raises(RouterError) as caught:
            router.get_weights()
    text = str(caught.value)
    assert text.startswith("endpoint ep-nobody: no usable Azure credentials (")
    assert "AzureCliCredential" in text  # what each credential said is kept
    assert "\n" not in text and "To mitigate" not in text


@pytest.mark.parametrize("command", ["bootstrap", "run"])
def test_no_usable_credentials_is_one_line_at_the_cli_too(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    command: str,
) -> None:
    """DefaultAzureCredential also logs what each credential said, a dozen WARNING lines before
    the error line that already carries it: the command prints the one line only."""
    from typer.testing import CliRunner

    from rollout.cli import app

    for name in AZURE_CREDENTIAL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("AZURE_TOKEN_CREDENTIALS", "dev")
    spec = azure_spec_file(tmp_path, {}, {"state": {"dir": str(tmp_path / "state")}})
    option = "--release" if command == "bootstrap" else "--candidate"
    # (The levels the command sets are restored by tests/conftest.py.)
    result = CliRunner().invoke(app, ["rollout", command, str(spec), option, "diabetes:2"])
    assert result.exit_code == 2, result.output
    assert "diabetes-ep/green: no usable Azure credentials (" in result.output
    assert [r.getMessage() for r in caplog.records if r.name.startswith("azure.identity")] == []


def test_credentials_azure_rejects_are_one_line(arm: FakeArm, ml_client: Any) -> None:
    router = make_router(ml_client)
    RouterContract.live(router)
    arm.fail("GET", f"/onlineEndpoints/{router.endpoint}$", 401, "InvalidAuthenticationToken")
    with pytest.raises(RouterError) as caught:
        router.get_weights()
    assert str(caught.value).startswith(
        f"endpoint {router.endpoint}: Azure rejected the credentials "
        "(HTTP 401 InvalidAuthenticationToken: injected failure on GET "
    )
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("status", "code", "refused", "said"),
    [
        pytest.param(
            401, "InvalidAuthenticationTokenTenant", True,
            "Azure rejected the credentials (HTTP 401 InvalidAuthenticationTokenTenant: injected "
            "failure on PUT {path}): sign in as an identity of the subscription's tenant",
            id="401-refused",
        ),
        pytest.param(
            403, "AuthorizationFailed", True,
            "HTTP 403 AuthorizationFailed: injected failure on PUT {path}: the identity needs a "
            "role on the workspace that may read and write its online endpoints",
            id="403-refused",
        ),
        pytest.param(
            400, "BadArgument", False, "HTTP 400 BadArgument: injected failure on PUT {path}",
            id="400-retried",
        ),
        pytest.param(
            409, "Conflict", False, "HTTP 409 Conflict: injected failure on PUT {path}",
            id="409-retried",
        ),
    ],
)  # fmt: skip
@pytest.mark.parametrize(
    ("resource", "call"),
    [
        pytest.param("", lambda r: r.set_weights(Weights.blue_at(10)), id="traffic"),
        pytest.param("/deployments/blue", lambda r: r.deploy(Colour.BLUE, V2), id="deploy"),
    ],
)
def test_what_arm_refuses_for_good_is_a_refusal(
    arm: FakeArm,
    ml_client: Any,
    status: int,
    code: str,
    refused: bool,
    said: str,
    resource: str,
    call: Any,
) -> None:
    """Was: a 401 or a 403 was a plain RouterError, so the controller sent again 3 times over
    7 s a write ARM had refused to this identity (azure-core renews tokens before they expire
    and answers claims challenges itself: a 401 that reaches us is no stale token)."""
    router = make_router(ml_client)
    RouterContract.live(router)
    router.deploy(Colour.BLUE, V1)
    path = f"{WORKSPACE}/onlineEndpoints/{router.endpoint}{resource}"
    arm.fail("PUT", f"{path}$", status, code, times=100)  # this endpoint's only
    with pytest.raises(RouterError) as caught:
        call(router)
    assert isinstance(caught.value, RouterRefused) is refused
    assert said.format(path=path) in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("weights", "said"),
    [
        pytest.param(Weights.blue_at(10), "cannot send 10 % to blue", id="live"),
        pytest.param(Weights.blue_at(0, mirror=5), "cannot mirror 5 % to blue", id="mirror"),
    ],
)
def test_traffic_to_a_deployment_that_does_not_exist_is_refused(
    ml_client: Any, weights: Weights, said: str
) -> None:
    router = make_router(ml_client)
    RouterContract.live(router)  # green only
    with pytest.raises(RouterRefused) as caught:  # no retry deploys it
        router.set_weights(weights)
    assert str(caught.value).startswith(
        f"{said}: deployment {router.endpoint}/blue does not exist (deleted, or never deployed: "
        "no retry brings it back; "
    )


def _endpoint_spec(router: AzureMLRouter, tmp_path: Path) -> Any:
    return spec_from_dict({
        "name": "diabetes",
        "router": {"kind": "azureml", "subscription_id": SUB, "resource_group": RG,
                   "workspace": WS, "endpoint": router.endpoint},
        "metrics": {"kind": "static"},
        "steps": [10, 100],
        "state": {"dir": str(tmp_path / "state")},
    })  # fmt: skip


@pytest.mark.parametrize(
    ("status", "code", "puts", "paused"),
    [
        pytest.param(403, "AuthorizationFailed", 1, 0, id="403-once"),
        pytest.param(401, "InvalidAuthenticationToken", 1, 0, id="401-once"),
        pytest.param(400, "BadArgument", 4, 1 + 2 + 4, id="400-four-times"),
    ],
)
def test_the_controller_sends_a_traffic_change_arm_refused_once(
    arm: FakeArm, ml_client: Any, tmp_path: Path, status: int, code: str, puts: int, paused: int
) -> None:
    """At the wire: the fake ARM sees one PUT of the endpoint, not four, and no pause."""
    router = make_router(ml_client)
    RouterContract.live(router)
    endpoint_puts = f"/onlineEndpoints/{router.endpoint}$"
    arm.fail("PUT", endpoint_puts, status, code, times=100)
    before = len(list(iter_calls(arm, "PUT", endpoint_puts)))
    clock = FakeClock(1_000.0)
    with pytest.raises(RouterError) as caught:
        run_rollout(_endpoint_spec(router, tmp_path), candidate=V2, router=router, clock=clock)
    assert len(list(iter_calls(arm, "PUT", endpoint_puts))) - before == puts
    assert clock.now() == 1_000.0 + paused
    assert isinstance(caught.value, RouterRefused) is (puts == 1)


def test_the_controller_does_not_retry_traffic_to_a_deployment_that_is_gone(
    arm: FakeArm, ml_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    router = make_router(ml_client)
    RouterContract.live(router)
    green = f"{WORKSPACE}/onlineEndpoints/{router.endpoint}/deployments/green"
    deploy, reads = router.deploy, []

    def deploy_then_lose_green(colour: Colour, release: Release) -> None:
        deploy(colour, release)
        arm.delete(green)  # as another client would, once blue is up
        reads.append(len(list(iter_calls(arm, "GET", f"{green}$"))))

    router.deploy = deploy_then_lose_green  # type: ignore[method-assign]
    clock = FakeClock(1_000.0)
    with pytest.raises(RouterRefused, match=f"deployment {router.endpoint}/green does not exist"):
        run_rollout(_endpoint_spec(router, tmp_path), candidate=V2, router=router, clock=clock)
    assert clock.now() == 1_000.0  # no pause
    assert len(list(iter_calls(arm, "GET", f"{green}$"))) - reads[0] == 1  # asked once, not 4
    assert "retrying" not in caplog.text


def test_the_controller_does_not_retry_a_deploy_azure_ai_ml_refuses(
    ml_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """azure-ai-ml's validation (here: an asset the workspace lacks) refuses before sending."""
    router = make_router(ml_client)
    RouterContract.live(router)
    refusing = AzureMLRouter(ml_client, router.endpoint, environment="azureml:no-such-env@latest")
    clock = FakeClock(1_000.0)
    with pytest.raises(RouterRefused, match="Asset azureml:no-such-env does not exist"):
        run_rollout(_endpoint_spec(router, tmp_path), candidate=V2, router=refusing, clock=clock)
    assert clock.now() == 1_000.0
    assert "retrying" not in caplog.text


@pytest.mark.parametrize(
    ("canary_error_rate", "phase", "green", "after_shadow"),
    [
        pytest.param(
            0.01, Phase.SUCCEEDED, V2, {"green": 90, "blue": 10},
            id="healthy-candidate-promoted",
        ),
        pytest.param(  # refused by the shadow step: no user ever saw its answers
            0.2, Phase.ROLLED_BACK, V1, {"green": 100},
            id="faulty-candidate-rolled-back",
        ),
    ],
)  # fmt: skip
def test_the_engine_drives_an_endpoint_end_to_end(
    arm: FakeArm, ml_client: Any, tmp_path: Path, canary_error_rate: float, phase: Phase,
    green: Release, after_shadow: dict[str, int],
) -> None:  # fmt: skip
    router = make_router(ml_client)
    router.deploy(Colour.GREEN, V1)
    router.set_weights(Weights.blue_at(0))
    spec = spec_from_dict({
        "name": "diabetes",
        "router": {"kind": "azureml", "subscription_id": SUB, "resource_group": RG,
                   "workspace": WS, "endpoint": router.endpoint},
        "metrics": {"kind": "simulated", "seed": 3, "rps": 500,
                    "baseline": {"error_rate": 0.01}, "canary": {"error_rate": canary_error_rate}},
        "steps": [0, 10, 50, 100],
        "mirror_percent": 20,  # the shadow step: 20 % of live traffic copied to blue
        "analysis": {"interval_s": 10, "min_requests": 50, "latency": {"enabled": False}},
        "state": {"dir": str(tmp_path / "state")},
    })  # fmt: skip
    result = run_rollout(spec, candidate=V2, router=router, clock=FakeClock(1_000.0))

    assert result.phase is phase, result.reason
    assert _served(arm, router) == ({"green": 100}, {})  # promoted or rolled back: no shadow
    assert identity(router.release(Colour.GREEN)) == identity(green)
    writes = [
        (body["properties"]["traffic"], body["properties"].get("mirrorTraffic", {}))
        for _, body in iter_calls(arm, "PUT", f"/onlineEndpoints/{router.endpoint}$")
    ]
    # It really moved the endpoint: the shadow step, then the next step or the rollback, and
    # either one ended the shadow.
    shadow = writes.index(({"green": 100}, {"blue": 20}))
    assert writes[shadow + 1] == (after_shadow, {})


#: What an operator tuned on green: variables its score script reads, probes for a slow start,
#: a request timeout and a queue wait Azure holds to the millisecond, App Insights.
GREEN_SERVES_UNDER = {
    "environmentVariables": {"WORKERS": "4", "MODEL_CACHE": "/tmp/cache"},
    "livenessProbe": {
        "failureThreshold": 5,
        "successThreshold": 1,
        "timeout": "PT2.5S",
        "period": "PT20S",
        "initialDelay": "PT40S",
    },
    "readinessProbe": {
        "failureThreshold": 3,
        "successThreshold": 1,
        "timeout": "PT3S",
        "period": "PT10S",
        "initialDelay": "PT15S",
    },
    "requestSettings": {
        "requestTimeout": "PT1.5S",
        "maxQueueWait": "PT0.5S",
        "maxConcurrentRequestsPerInstance": 4,
    },
    "appInsightsEnabled": True,
}


def _tune(arm: FakeArm, path: str, properties: dict[str, Any]) -> None:
    """Set `properties` on the deployment at `path`, environment variables added to its own."""
    found = arm.get(path)
    assert found is not None
    variables = found["properties"].get("environmentVariables") or {}
    found["properties"].update(properties)
    found["properties"]["environmentVariables"] = {
        **variables,
        **properties.get("environmentVariables", {}),
    }
    arm.put(path, found)


def _serves_under(body: dict[str, Any]) -> dict[str, Any]:
    return {key: body["properties"].get(key) for key in GREEN_SERVES_UNDER}


@pytest.mark.parametrize(
    ("blue_before", "release", "writes", "kept"),
    [
        pytest.param(None, V2, True, {}, id="new-blue"),
        # Left by an earlier rollout (rolled back): what it lacks is green's, what it has its
        # own (an operator may have given the candidate a longer timeout on purpose).
        pytest.param(
            {"requestSettings": {"requestTimeout": "PT5S"}},
            V1,
            True,
            # App Insights is a flag the SDK always holds (false unless set): blue's own.
            {"requestSettings": {"requestTimeout": "PT5S"}, "appInsightsEnabled": False},
            id="leftover-blue",
        ),
        # The same candidate again (a rollout re-run after a rollback): its release is there,
        # green's variables are not.
        pytest.param(
            {"environmentVariables": {"OLD_FLAG": "1"}, "appInsightsEnabled": False},
            V2,
            True,
            {"environmentVariables": {"OLD_FLAG": "1"}, "appInsightsEnabled": False},
            id="leftover-blue-same-release-missing-green-s",
        ),
        # ... and with all of green's already, its own kept: nothing to write (was: green's
        # replaced its own, and every instance restarted for it).
        pytest.param(
            {**GREEN_SERVES_UNDER, "requestSettings": {"requestTimeout": "PT9S"},
             "environmentVariables": {
                **GREEN_SERVES_UNDER["environmentVariables"], "NEW_FLAG": "1"}},
            V2,
            False,
            {},
            id="leftover-blue-same-release-own-settings",
        ),
    ],
)  # fmt: skip
def test_a_candidate_serves_under_greens_settings(
    arm: FakeArm,
    ml_client: Any,
    blue_before: dict[str, Any] | None,
    release: Release,
    writes: bool,
    kept: dict[str, Any],
) -> None:
    """Blue runs with green's environment variables, probes, request settings (to the
    millisecond) and App Insights — a new one all of them, one left by an earlier rollout
    what it lacks — with its own release variables on top: was green's request settings only
    (and cut to whole seconds), so blue ran without a variable green's score script reads
    (5xx blamed on its model), restarted under default probes, and timed out where green did
    not."""
    router = make_router(ml_client)
    router.deploy(Colour.GREEN, V1)
    path = f"{WORKSPACE}/onlineEndpoints/{router.endpoint}/deployments"
    if blue_before is not None:
        router.deploy(Colour.BLUE, release)
        blue = arm.get(f"{path}/blue")
        assert blue is not None
        blue["sku"]["capacity"] = 3  # an operator scaled it: capacity is blue's own
        arm.put(f"{path}/blue", blue)
        _tune(arm, f"{path}/blue", blue_before)
    _tune(arm, f"{path}/green", GREEN_SERVES_UNDER)
    before = _deploy_puts(arm, router, Colour.BLUE)

    router.deploy(Colour.BLUE, V2)

    assert _deploy_puts(arm, router, Colour.BLUE) == before + writes
    if writes:
        _, sent = list(iter_calls(arm, "PUT", "/deployments/blue$"))[-1]
        assert _serves_under(sent) == {
            **GREEN_SERVES_UNDER,
            **kept,
            "environmentVariables": {
                **GREEN_SERVES_UNDER["environmentVariables"],
                **kept.get("environmentVariables", {}),
                "AML_ROLLOUT_MODEL_VERSION": "2",
                "AML_ROLLOUT_COLOUR": "blue",
            },
        }
        if blue_before is not None:
            assert sent["sku"]["capacity"] == 3
    assert identity(router.release(Colour.BLUE)) == identity(V2)
    # A retry (a deploy that timed out while Azure finished it) finds it all held: no PUT.
    router.deploy(Colour.BLUE, V2)
    assert _deploy_puts(arm, router, Colour.BLUE) == before + writes


def test_redeploy_keeps_what_an_operator_set_on_the_deployment(
    arm: FakeArm, ml_client: Any
) -> None:
    router = make_router(ml_client, instance_count=1, environment="azureml:diabetes-env:2")
    router.deploy(Colour.GREEN, V1)
    path = f"{WORKSPACE}/onlineEndpoints/{router.endpoint}/deployments/green"
    dep = arm.get(path)
    assert dep is not None
    dep["sku"]["capacity"] = 8  # scaled up for production load
    dep["tags"]["owner"] = "ml-platform"
    dep["properties"]["environmentVariables"] = {"WORKERS": "4"}
    # Held to the millisecond (was: read in whole seconds, so sent back as PT1S and none).
    dep["properties"]["requestSettings"] = {"requestTimeout": "PT1.5S", "maxQueueWait": "PT0.5S"}
    dep["properties"]["livenessProbe"] = {"timeout": "PT2.5S", "period": "PT30S"}
    dep["properties"]["appInsightsEnabled"] = True
    # Where its custom container looks for the model (was: azure-ai-ml's read drops it, so the
    # redeploy moved the model back to Azure's default path, out of the container's sight).
    dep["properties"]["modelMountPath"] = "/var/models/diabetes"
    dep["properties"]["environmentId"] = dep["properties"]["environmentId"].replace("/2", "/1")
    arm.put(path, dep)

    router.deploy(Colour.GREEN, V2)  # e.g. the Blue_Green step of a promotion

    after = arm.get(path)
    assert after is not None
    props = after["properties"]
    assert after["sku"]["capacity"] == 8
    assert props["environmentVariables"] == {
        "WORKERS": "4",
        "AML_ROLLOUT_MODEL_VERSION": "2",  # the release's, for score.py's answers
        "AML_ROLLOUT_COLOUR": "green",
    }
    assert props["requestSettings"] == {"requestTimeout": "PT1.5S", "maxQueueWait": "PT0.5S"}
    assert props["livenessProbe"] == {"timeout": "PT2.5S", "period": "PT30S"}
    assert props["appInsightsEnabled"] is True
    assert props["modelMountPath"] == "/var/models/diabetes"
    assert props["model"].endswith("/models/diabetes/versions/2")
    assert props["environmentId"].endswith("/environments/diabetes-env/versions/2")  # configured
    assert after["tags"]["owner"] == "ml-platform"
    assert after["tags"]["aml-rollout.version"] == "2"


def _collect_and_isolate(
    ml_client: Any, router: AzureMLRouter, colour: Colour, *, named: bool, egress: str
) -> None:
    """Deployment `colour` as an operator sets it up through azure-ai-ml: model data collection
    (model inputs to Azure's default data asset; with `named`, model outputs to a data asset
    of their own, as a team's monitor reads it) and the legacy network isolation's egress flag."""
    from azure.ai.ml.entities import (
        DataAsset,
        DataCollector,
        DeploymentCollection,
        RequestLogging,
    )

    name = router.names[colour]
    deployment = ml_client.online_deployments.get(name=name, endpoint_name=router.endpoint)
    collections = {"model_inputs": DeploymentCollection(enabled="true")}
    if named:
        collections["model_outputs"] = DeploymentCollection(
            enabled="true",
            data=DataAsset(
                name="prod-outputs",
                version="3",
                path="azureml://datastores/workspaceblobstore/paths/prod/outputs",
            ),
        )
    deployment.data_collector = DataCollector(
        collections,
        sampling_rate=0.25 if named else 1.0,
        rolling_rate="Hour",
        request_logging=RequestLogging(capture_headers=["x-request-id"]) if named else None,
    )
    deployment.egress_public_network_access = egress
    ml_client.online_deployments.begin_create_or_update(deployment).result()


def _collects(router: AzureMLRouter, name: str, *, named: bool) -> dict[str, Any]:
    """The dataCollector of `_collect_and_isolate(named=...)` as the PUT of deployment `name`
    carries it: model inputs to `name`'s own default data asset, named outputs to theirs."""
    sampled = 0.25 if named else 1.0
    inputs = f"{WORKSPACE}/data/{router.endpoint}-{name}-model_inputs/versions/1"
    collections = {
        "model_inputs": {"dataCollectionMode": "enabled", "dataId": inputs, "samplingRate": sampled}
    }
    if named:
        collections["model_outputs"] = {
            "dataCollectionMode": "enabled",
            "dataId": f"{WORKSPACE}/data/prod-outputs/versions/3",
            "samplingRate": sampled,
        }
    return {
        "collections": collections,
        "rollingRate": "Hour",
        **({"requestLogging": {"captureHeaders": ["x-request-id"]}} if named else {}),
    }


@pytest.mark.parametrize(
    "blue_before", [None, "/opt/blue-models"], ids=["new-blue", "leftover-blue"]
)
def test_a_candidate_finds_its_model_where_greens_container_looks(
    arm: FakeArm, ml_client: Any, blue_before: str | None
) -> None:
    """Both colours run the router's environment: a new blue mounts its model where green's
    (custom) container looks for it (was: Azure's default path, a container that never found
    its model, its failure blamed on the candidate); a leftover blue keeps its own."""
    router = make_router(ml_client, environment="azureml:diabetes-env:2")
    router.deploy(Colour.GREEN, V1)
    if blue_before is not None:
        router.deploy(Colour.BLUE, V1)
        _tune(
            arm,
            f"{WORKSPACE}/onlineEndpoints/{router.endpoint}/deployments/blue",
            {"modelMountPath": blue_before},
        )
    _tune(
        arm,
        f"{WORKSPACE}/onlineEndpoints/{router.endpoint}/deployments/green",
        {"modelMountPath": "/var/models/diabetes"},
    )
    router.deploy(Colour.BLUE, V2)
    _, sent = list(iter_calls(arm, "PUT", "/deployments/blue$"))[-1]
    assert sent["properties"]["modelMountPath"] == (blue_before or "/var/models/diabetes")
    puts = _deploy_puts(arm, router, Colour.BLUE)
    router.deploy(Colour.BLUE, V2)  # a retry finds it held: no PUT
    assert _deploy_puts(arm, router, Colour.BLUE) == puts


@pytest.mark.parametrize(
    ("blue_before", "collects_as"),
    [
        pytest.param(None, "green", id="new-blue"),
        # Made before green collected (or by a release of aml-rollout that did not copy it),
        # with Azure's default egress: green's collection, and the network isolation green has.
        pytest.param({"egress": "Enabled"}, "green", id="leftover-blue-without-either"),
        # Its own collection is kept (as every setting it has); an egress open where green's is
        # closed is not a setting but a breach of the isolation: closed.
        pytest.param(
            {"egress": "Enabled", "collects": True}, "blue", id="leftover-blue-collecting"
        ),
    ],
)
def test_a_candidate_collects_data_and_stays_isolated_as_green_does(
    arm: FakeArm, ml_client: Any, blue_before: dict[str, Any] | None, collects_as: str
) -> None:
    """Blue collects its production inputs and outputs as green does (the same collections,
    sampling, rolling and headers; to its own default data asset where green writes to green's,
    to the data asset green names where it names one) and keeps green's closed egress. Was: a
    new blue went without either — its answers missing from the team's monitoring while it
    served, and its egress open on an endpoint whose isolation policy closes it."""
    router = make_router(ml_client)
    router.deploy(Colour.GREEN, V1)
    if blue_before is not None:
        router.deploy(Colour.BLUE, V1)
        if blue_before.get("collects"):
            _collect_and_isolate(
                ml_client, router, Colour.BLUE, named=False, egress=blue_before["egress"]
            )
        else:
            _tune(
                arm,
                f"{WORKSPACE}/onlineEndpoints/{router.endpoint}/deployments/blue",
                {"egressPublicNetworkAccess": blue_before["egress"]},
            )
    _collect_and_isolate(ml_client, router, Colour.GREEN, named=True, egress="Disabled")
    before = _deploy_puts(arm, router, Colour.BLUE)

    router.deploy(Colour.BLUE, V2)

    _, sent = list(iter_calls(arm, "PUT", "/deployments/blue$"))[-1]
    assert sent["properties"]["egressPublicNetworkAccess"] == "Disabled"
    assert sent["properties"]["dataCollector"] == _collects(
        router, "blue", named=collects_as == "green"
    )
    assert _deploy_puts(arm, router, Colour.BLUE) == before + 1
    # A retry (a deploy that timed out while Azure finished it) finds it all held: no PUT.
    router.deploy(Colour.BLUE, V2)
    assert _deploy_puts(arm, router, Colour.BLUE) == before + 1


def test_a_redeploy_keeps_the_deployments_data_collection(arm: FakeArm, ml_client: Any) -> None:
    """Green collecting data is redeployed (a promotion's Blue_Green step) with its own
    collection and egress as they were. Was: azure-ai-ml's PUT took the data asset Azure
    answers (an ARM id) for one it registers, and failed on it: AttributeError, a traceback."""
    router = make_router(ml_client)
    router.deploy(Colour.GREEN, V1)
    _collect_and_isolate(ml_client, router, Colour.GREEN, named=True, egress="Disabled")

    router.deploy(Colour.GREEN, V2)

    _, sent = list(iter_calls(arm, "PUT", "/deployments/green$"))[-1]
    assert sent["properties"]["dataCollector"] == _collects(router, "green", named=True)
    assert sent["properties"]["egressPublicNetworkAccess"] == "Disabled"
    assert identity(router.release(Colour.GREEN)) == identity(V2)


def test_an_sdk_without_its_private_read_falls_back_to_the_public_get(
    arm: FakeArm, ml_client: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The exact read uses two private names of azure-ai-ml: an SDK release without them
    reads whole seconds, says so, and still deploys (was: an AttributeError on every read)."""
    router = make_router(ml_client, instance_count=1)
    router.deploy(Colour.GREEN, V1)
    operations = ml_client.online_deployments

    class PublicOnly:
        def __getattr__(self, name: str) -> Any:
            if name == "_online_deployment":
                raise AttributeError(name)
            return getattr(operations, name)

    monkeypatch.setattr(type(ml_client), "online_deployments", property(lambda _: PublicOnly()))
    router.deploy(Colour.GREEN, V2)
    assert identity(router.release(Colour.GREEN)) == identity(V2)
    assert "public get only" in caplog.text


def _failing_operations(arm: FakeArm, path: str) -> None:
    """Deployment operations end Failed, and the deployment says so, as Azure does."""

    def failed(arm_: FakeArm, match: Any, body: Any, query: Any) -> tuple[int, Any, Any]:
        dep = arm_.get(path)
        if dep is not None:
            dep["properties"]["provisioningState"] = "Failed"
            arm_.resources[path.lower()] = dep
        error = {"code": "ImageBuildFailure", "message": "Image build failed:\n conda env"}
        return 200, {"status": "Failed", "error": error}, {}

    arm.on("GET", r"^/_operations/", failed)


def test_a_failed_deployment_is_one_clear_line_and_not_a_release() -> None:
    with running_arm() as arm:
        router = AzureMLRouter(client_of(arm), "ep-failing", environment="azureml:env:1")
        router.deploy(Colour.GREEN, V1)
        router.set_weights(Weights.blue_at(0))
        _failing_operations(arm, f"{WORKSPACE}/onlineEndpoints/ep-failing/deployments/blue")
        # DeployFailed: the controller fails the rollout at once instead of trying again.
        with pytest.raises(DeployFailed) as caught:
            router.deploy(Colour.BLUE, V2)
        assert str(caught.value) == (
            "deploy ep-failing/blue: the operation failed: "
            "ImageBuildFailure: Image build failed: conda env"
        )
        with pytest.raises(RouterError, match="blue is in provisioning state Failed"):
            router.release(Colour.BLUE)
        with pytest.raises(RouterError, match="provisioning state Failed"):
            router.set_weights(Weights.blue_at(10))
        with pytest.raises(RouterError, match="provisioning state Failed"):
            router.set_weights(Weights.blue_at(0, mirror=5))  # no shadow to it either
        router.set_weights(Weights.blue_at(0))  # a rollback or abort: never refused
        assert router.get_weights() == Weights.blue_at(0)
        # Blue read Failed before this PUT too: Azure's operation ending Failed says it is ours.
        with pytest.raises(DeployFailed, match="the operation failed: ImageBuildFailure"):
            router.deploy(Colour.BLUE, V2)


@pytest.mark.parametrize(
    ("status", "code", "refused"),
    [
        pytest.param(403, "AuthorizationFailed", True, id="403-fix-the-role"),
        pytest.param(409, "Conflict", False, id="409-mid-change-retried"),
        pytest.param(400, "BadArgument", False, id="400-retried"),
    ],
)
def test_a_put_refused_over_a_blue_left_failed_is_not_the_candidate_failing(
    arm: FakeArm, ml_client: Any, status: int, code: str, refused: bool
) -> None:
    """A blue left Failed by an earlier rollout reads Failed before this PUT is even accepted.
    Was: any error of the PUT then became DeployFailed (the new candidate failed at once, exit
    5), a 403 included (exit 2: fix the role). Only Azure's operation ending Failed says so."""
    router = _deployed(ml_client)
    _show_state(arm, router, Colour.BLUE, "Failed")
    path = f"{WORKSPACE}/onlineEndpoints/{router.endpoint}/deployments/blue"
    arm.fail("PUT", f"{path}$", status, code, times=100)  # this endpoint's only
    with pytest.raises(RouterError) as caught:
        router.deploy(Colour.BLUE, V1)
    assert not isinstance(caught.value, DeployFailed)
    assert isinstance(caught.value, RouterRefused) is refused
    assert f"HTTP {status} {code}: injected failure on PUT {path}" in str(caught.value)


def _show_state(arm: FakeArm, router: AzureMLRouter, colour: Colour, state: str) -> None:
    path = f"{WORKSPACE}/onlineEndpoints/{router.endpoint}/deployments/{colour.value}"
    shown = arm.get(path)
    assert shown is not None
    shown["properties"]["provisioningState"] = state
    arm.resources[path.lower()] = shown


@pytest.mark.parametrize(
    ("state", "a_release", "takes_traffic"),
    [
        pytest.param("Succeeded", True, True, id="succeeded"),
        pytest.param("Scaling", True, True, id="scaling-changes-the-instance-count-only"),
        # The PUT's tags are stored at once, the change rolls out (or fails) over minutes: the
        # tags name the release asked for, not the one serving. It still serves.
        pytest.param("Updating", False, True, id="updating-tags-name-what-was-asked-for"),
        pytest.param("Failed", False, False, id="failed"),
        pytest.param("Canceled", False, False, id="canceled"),
        pytest.param("Creating", False, False, id="creating"),
        pytest.param("Deleting", False, False, id="deleting"),
    ],
)
def test_which_provisioning_states_hold_a_release_and_which_take_traffic(
    arm: FakeArm, ml_client: Any, state: str, a_release: bool, takes_traffic: bool
) -> None:
    router = _deployed(ml_client)
    _show_state(arm, router, Colour.BLUE, state)
    if a_release:
        assert identity(router.release(Colour.BLUE)) == identity(V2)
    else:
        with pytest.raises(RouterError, match=f"blue is in provisioning state {state}: "):
            router.release(Colour.BLUE)
    if takes_traffic:
        router.set_weights(Weights.blue_at(10))
        assert router.get_weights() == Weights.blue_at(10)
    else:
        with pytest.raises(RouterError, match=f"provisioning state {state}"):
            router.set_weights(Weights.blue_at(10))
    router.set_weights(Weights.blue_at(0))  # a rollback: never refused


def test_a_green_left_failed_by_an_update_refuses_the_rollback_toward_it(
    arm: FakeArm, ml_client: Any
) -> None:
    """As docs/azureml-endpoint.md says (a known limit, not a choice): whether Azure serves
    from a deployment whose update Failed is not known here, so traffic to it is refused, a
    rollback's included, and the candidate keeps its share until green reads Succeeded."""
    router = _deployed(ml_client)
    router.set_weights(Weights.blue_at(10))
    _show_state(arm, router, Colour.GREEN, "Failed")  # e.g. an operator's scale-out failed
    with pytest.raises(
        RouterRefused, match=r"green is in provisioning state Failed: deploy it again, or delete"
    ):
        router.set_weights(Weights.blue_at(0))
    assert router.get_weights() == Weights.blue_at(10)


def test_a_blue_whose_update_fails_while_the_endpoint_settles_takes_no_traffic(
    arm: FakeArm, ml_client: Any
) -> None:
    """set_weights waits for the endpoint's change in progress (up to traffic_timeout_s) before
    it writes. Was: blue checked before that wait, so an update of blue that Failed meanwhile
    (an older model still running there) was sent 10 % of live traffic."""
    failed: list[bool] = []

    def blue_fails_meanwhile(seconds: float) -> None:
        if not failed:  # Azure ends the endpoint's change; blue's update has Failed
            _show_state(arm, router, Colour.BLUE, "Failed")
            _endpoint_showing(arm, router, "Succeeded", {"green": 100})
            failed.append(True)

    router = _deployed(ml_client, sleep=blue_fails_meanwhile)
    _endpoint_showing(arm, router, "Updating", {"green": 100})
    with pytest.raises(
        RouterRefused, match=r"blue is in provisioning state Failed: deploy it again, or delete"
    ):
        router.set_weights(Weights.blue_at(10))
    assert failed
    assert router.get_weights() == Weights.blue_at(0)


def test_a_redeploy_azure_is_still_rolling_out_is_not_yet_its_release() -> None:
    """A redeploy of blue (V1 -> V2) that timed out: Azure shows Updating with V2's tags while
    V1 still serves. release() refuses it (was: V2, which a resumed controller took for the
    candidate serving); once Azure finishes, V2 is the release."""
    with running_arm() as arm:
        # Set up with the default bounds: 0.05 s is for the redeploy Azure never finishes, not
        # for ones it does (a loaded machine takes longer than that to finish them).
        ready = AzureMLRouter(client_of(arm), "ep-rolling", environment="azureml:env:1")
        ready.deploy(Colour.GREEN, V1)
        ready.deploy(Colour.BLUE, V1)
        ready.set_weights(Weights.blue_at(10))
        router = AzureMLRouter(
            client_of(arm), "ep-rolling", environment="azureml:env:1",
            deploy_timeout_s=0.05, poll_s=0.01,
        )  # fmt: skip
        with operations_stuck_in_progress(arm) as azure_finishes:
            with pytest.raises(RouterError, match=r"deploy ep-rolling/blue: .*deploy_timeout_s"):
                router.deploy(Colour.BLUE, V2)
            path = f"{WORKSPACE}/onlineEndpoints/ep-rolling/deployments/blue"
            assert _state_of(arm, path) == "Updating"
            with pytest.raises(RouterError, match="blue is in provisioning state Updating"):
                router.release(Colour.BLUE)
            azure_finishes.set()
            patient = AzureMLRouter(
                client_of(arm), "ep-rolling", environment="azureml:env:1", poll_s=0.01
            )
            patient.deploy(Colour.BLUE, V2)  # waits for Azure, finds V2 there
        assert identity(patient.release(Colour.BLUE)) == identity(V2)


def test_a_rollback_goes_through_while_an_operator_scales_green(
    arm: FakeArm, ml_client: Any
) -> None:
    router = _deployed(ml_client)
    router.set_weights(Weights.blue_at(25))
    _show_state(arm, router, Colour.GREEN, "Updating")  # `--set instance_count=5`, say
    router.set_weights(Weights.blue_at(0))
    assert router.get_weights() == Weights.blue_at(0)


@contextmanager
def operations_stuck_in_progress(arm: FakeArm) -> Iterator[threading.Event]:
    """Every long-running operation reports InProgress until the block ends (or the event it
    yields is set: Azure finishes), then goes on as the fake ARM's own do.

    Meanwhile the resource shows what ARM shows: Creating, Updating or Deleting.
    """
    finished = threading.Event()

    def in_progress(arm_: FakeArm, match: Any, body: Any, query: Any) -> tuple[int, Any, Any]:
        if finished.is_set():
            return arm_._operation(match.string)  # the SDK's pollers finish it
        return 200, {"status": "InProgress"}, {"Retry-After": "0"}

    arm.on("GET", r"^/_operations/", in_progress)
    try:
        yield finished
    finally:
        finished.set()  # lets the SDK's poller threads end


def test_deploy_gives_up_waiting_at_its_timeout() -> None:
    with running_arm() as arm, operations_stuck_in_progress(arm):
        router = AzureMLRouter(
            client_of(arm), "ep-slow", environment="azureml:env:1", deploy_timeout_s=0.05
        )
        with pytest.raises(
            RouterError,
            match=r"create endpoint ep-slow: .* after 0.05 s \(router.deploy_timeout_s\)",
        ):
            router.deploy(Colour.GREEN, V1)


@pytest.mark.parametrize(
    ("mirror", "call", "message"),
    [
        pytest.param(
            0, lambda r: r.set_weights(Weights.blue_at(10)),
            r"update endpoint ep-stuck traffic: Azure has not finished after 0.05 s "
            r"\(router.traffic_timeout_s\)",
            id="traffic-update-bounded-by-traffic-timeout",
        ),
        pytest.param(
            0, lambda r: r.set_weights(Weights.blue_at(0, mirror=20)),
            r"update endpoint ep-stuck traffic: .* after 0.05 s \(router.traffic_timeout_s\)",
            id="shadow-starting-bounded-by-traffic-timeout",
        ),
        pytest.param(
            20, lambda r: r.set_weights(Weights.blue_at(10)),  # also ends the shadow
            r"update endpoint ep-stuck traffic: .* after 0.05 s \(router.traffic_timeout_s\)",
            id="shadow-ending-bounded-by-traffic-timeout",
        ),
        pytest.param(
            20, lambda r: r.set_weights(Weights.blue_at(0)),  # a rollback from the shadow step
            r"update endpoint ep-stuck traffic: .* after 0.05 s \(router.traffic_timeout_s\)",
            id="shadow-rollback-bounded-by-traffic-timeout",
        ),
        pytest.param(
            20, lambda r: r.remove(Colour.BLUE),  # drops the shadow first
            r"update endpoint ep-stuck traffic: .* after 0.05 s \(router.traffic_timeout_s\)",
            id="remove-dropping-the-shadow-bounded-by-traffic-timeout",
        ),
        pytest.param(
            0, lambda r: r.remove(Colour.BLUE),
            r"delete deployment ep-stuck/blue: Azure has not finished after 0.07 s "
            r"\(router.deploy_timeout_s\)",
            id="delete-bounded-by-deploy-timeout",
        ),
        pytest.param(
            0, lambda r: r.deploy(Colour.BLUE, V1),
            r"deploy ep-stuck/blue: .* after 0.07 s \(router.deploy_timeout_s\)",
            id="redeploy-bounded-by-deploy-timeout",
        ),
    ],
)  # fmt: skip
def test_an_operation_azure_leaves_in_progress_fails_at_its_bound(
    mirror: int, call: Any, message: str
) -> None:
    """No wait on Azure is unbounded: each write fails at the timeout that governs it."""
    with running_arm() as arm:
        ready = AzureMLRouter(client_of(arm), "ep-stuck", environment="azureml:env:1")
        ready.deploy(Colour.GREEN, V1)
        ready.deploy(Colour.BLUE, V2)
        ready.set_weights(Weights.blue_at(0, mirror=mirror))
        # The same endpoint, with short bounds that tell the two timeouts apart.
        router = AzureMLRouter(
            client_of(arm), "ep-stuck", environment="azureml:env:1",
            deploy_timeout_s=0.07, traffic_timeout_s=0.05,
        )  # fmt: skip
        with operations_stuck_in_progress(arm):
            started = time.monotonic()
            with pytest.raises(RouterError, match=message):
                call(router)
            assert time.monotonic() - started < 10  # at its bound, not when Azure finishes


@pytest.mark.parametrize(
    ("retry_after", "expected_s"),
    [
        pytest.param(None, 5, id="no-retry-after-polls-every-5-s"),
        pytest.param("0", 5, id="retry-after-0-is-none"),
        pytest.param("2", 2, id="a-shorter-retry-after-is-honoured"),
    ],
)
def test_a_traffic_change_is_polled_every_few_seconds_not_every_30(
    monkeypatch: pytest.MonkeyPatch, retry_after: str | None, expected_s: float
) -> None:
    """How long the router waits between polls of Azure's operation, as the poller asks the
    transport to sleep. azure-ai-ml gives an endpoint update (and a deployment deletion) its
    service client's default, 30 s when ARM sends no Retry-After: a rollback would be seen
    done up to 30 s after Azure finished it. The router's client polls every 5 s."""
    monkeypatch.setattr("rollout.routers.azureml.default_credential", StaticCredential)
    with running_arm(polls=2) as arm:
        arm.retry_after = retry_after
        cfg = AzureMLRouterConfig(
            subscription_id=SUB, resource_group=RG, workspace=WS, endpoint="ep-polled",
            environment="azureml:env:1",
        )  # fmt: skip
        transport = arm.transport()
        router = AzureMLRouter.from_config(cfg, transport=transport)
        router.deploy(Colour.GREEN, V1)
        router.deploy(Colour.BLUE, V2)
        router.set_weights(Weights.blue_at(0, mirror=5))
        waits: dict[str, list[float]] = {}
        for what, call in [
            ("canary step", lambda: router.set_weights(Weights.blue_at(10))),
            ("rollback", lambda: router.set_weights(Weights.blue_at(0))),
            ("redeploy", lambda: router.deploy(Colour.BLUE, V1)),
            ("delete", lambda: router.remove(Colour.BLUE)),
        ]:
            transport.sleeps.clear()
            before = len(arm.calls)
            call()
            polls = [c for c in arm.calls[before:] if c[1].startswith("/_operations/")]
            assert len(polls) == 3, what  # InProgress twice, then Succeeded
            waits[what] = transport.sleeps[:]
    assert waits == {what: [expected_s, expected_s] for what in waits}


def _endpoint_showing(
    arm: FakeArm, router: AzureMLRouter, state: str, traffic: dict[str, int]
) -> str:
    """The endpoint as Azure shows it after a traffic change it has not (yet) carried out."""
    path = f"{WORKSPACE}/onlineEndpoints/{router.endpoint}"
    shown = endpoint(arm, router)
    shown["properties"]["traffic"] = traffic
    shown["properties"]["provisioningState"] = state
    arm.resources[path.lower()] = shown
    return path


@contextmanager
def _finished_later(arm: FakeArm, router: AzureMLRouter, path: str) -> Iterator[None]:
    """Azure finishes the endpoint's change 0.3 s after the block begins."""

    def finish() -> None:
        time.sleep(0.3)
        done = endpoint(arm, router)
        done["properties"]["provisioningState"] = "Succeeded"
        arm.resources[path.lower()] = done

    finisher = threading.Thread(target=finish)
    finisher.start()
    try:
        yield
    finally:
        finisher.join()


def _deployed(ml_client: Any, **kwargs: Any) -> AzureMLRouter:
    router = make_router(ml_client, poll_s=0.02, **kwargs)
    router.deploy(Colour.GREEN, V1)
    router.deploy(Colour.BLUE, V2)
    router.set_weights(Weights.blue_at(0))
    return router


def test_a_change_still_in_progress_is_waited_for_not_taken_as_served(
    arm: FakeArm, ml_client: Any
) -> None:
    """After a traffic update timed out, Azure's endpoint shows the traffic asked for while it
    is still Updating: the retry waits for Azure to finish instead of taking it for done."""
    router = _deployed(ml_client)
    path = _endpoint_showing(arm, router, "Updating", {"green": 90, "blue": 10})

    started = time.monotonic()
    with _finished_later(arm, router, path):
        router.set_weights(Weights.blue_at(10))  # waits, then finds it served: nothing to write
        waited = time.monotonic() - started  # inside the block: leaving it joins the finisher
    assert waited >= 0.3
    assert router.get_weights() == Weights.blue_at(10)


def test_a_change_that_never_finishes_fails_at_the_traffic_timeout(
    arm: FakeArm, ml_client: Any
) -> None:
    router = _deployed(ml_client, traffic_timeout_s=0.2)
    _endpoint_showing(arm, router, "Updating", {"green": 90, "blue": 10})
    with pytest.raises(
        RouterError, match=r"still Updating after 0.2 s \(router.traffic_timeout_s\)"
    ):
        router.set_weights(Weights.blue_at(10))


def _state_of(arm: FakeArm, path: str) -> str:
    found = arm.get(path)
    assert found is not None
    return str(found["properties"]["provisioningState"])


def test_a_deploy_azure_is_still_carrying_out_is_waited_for_not_written_over() -> None:
    """After a deploy timed out, Azure goes on: the deployment shows Creating, serves nothing,
    and refuses another write (409) until it is done. Its retry waits for Azure, at most
    `deploy_timeout_s`; meanwhile it is no release (no traffic, not a candidate)."""
    with running_arm() as arm:
        path = f"{WORKSPACE}/onlineEndpoints/ep-slow-blue/deployments/blue"
        ready = AzureMLRouter(client_of(arm), "ep-slow-blue", environment="azureml:env:1")
        ready.deploy(Colour.GREEN, V1)  # default bounds: a loaded machine takes > 0.05 s
        ready.set_weights(Weights.blue_at(0))
        hasty = AzureMLRouter(
            client_of(arm), "ep-slow-blue", environment="azureml:env:1",
            deploy_timeout_s=0.05, poll_s=0.01,
        )  # fmt: skip
        with operations_stuck_in_progress(arm) as azure_finishes:
            with pytest.raises(RouterError, match=r"deploy ep-slow-blue/blue: .*deploy_timeout_s"):
                hasty.deploy(Colour.BLUE, V2)
            assert _state_of(arm, path) == "Creating"
            with pytest.raises(RouterError, match="blue is in provisioning state Creating"):
                hasty.release(Colour.BLUE)
            with pytest.raises(RouterError, match="provisioning state Creating"):
                hasty.set_weights(Weights.blue_at(10))
            with pytest.raises(
                RouterError,
                match=r"deployment ep-slow-blue/blue is still Creating after 0.05 s "
                r"\(router.deploy_timeout_s\)",
            ):
                hasty.deploy(Colour.BLUE, V2)  # bounded, and no write Azure would refuse
            threading.Timer(0.3, azure_finishes.set).start()
            patient = AzureMLRouter(
                client_of(arm), "ep-slow-blue", environment="azureml:env:1", poll_s=0.01
            )
            patient.deploy(Colour.BLUE, V2)  # was: HTTP 409 Conflict
        assert _state_of(arm, path) == "Succeeded"
        assert identity(patient.release(Colour.BLUE)) == identity(V2)
        # Azure finished the first deploy: the retry found V2 there and wrote nothing (was: a
        # second PUT, which rolls every instance again).
        assert len(list(iter_calls(arm, "PUT", "/deployments/blue$"))) == 1


def _deploy_puts(arm: FakeArm, router: AzureMLRouter, colour: Colour) -> int:
    deployment = f"/onlineEndpoints/{router.endpoint}/deployments/{colour.value}$"
    return len(list(iter_calls(arm, "PUT", deployment)))


@pytest.mark.parametrize(
    ("change", "writes"),
    [
        pytest.param({}, False, id="same-release-same-config"),
        pytest.param({"release": V1}, True, id="another-release"),
        pytest.param({"environment": "azureml:diabetes-env:2"}, True, id="another-environment"),
        pytest.param({"code": "azureml:score-code:1"}, True, id="code-configured-now"),
        pytest.param({"state": "Failed"}, True, id="failed-deployment"),
        pytest.param({"tag": "other-sha"}, True, id="release-tags-differ"),
        # made before deployments said which release they serve: score.py answers version "0"
        pytest.param({"env": {"WORKERS": "4"}}, True, id="made-without-the-release-variables"),
        pytest.param(
            {"env": {"AML_ROLLOUT_MODEL_VERSION": "2", "AML_ROLLOUT_COLOUR": "green"}},
            True,
            id="release-variables-differ",
        ),
        # `name@latest`: the label resolved (one read) and compared with the version held
        pytest.param({"latest": "1"}, False, id="latest-still-the-environment-held"),
        pytest.param({"latest": "2"}, True, id="newer-environment-registered-since"),
        pytest.param(
            {"latest": "1", "environment": "azureml:{name}@latest"}, False, id="latest-prefixed"
        ),
        pytest.param({"latest": "1", "release": V1}, True, id="latest-and-another-release"),
    ],
)
def test_deploying_what_a_deployment_already_serves_writes_nothing(
    arm: FakeArm, ml_client: Any, change: dict[str, Any], writes: bool
) -> None:
    name = _registered_environment(ml_client) if "latest" in change else "diabetes-env"
    environment = f"{name}@latest" if "latest" in change else "azureml:diabetes-env:1"
    router = make_router(ml_client, environment=environment)
    router.deploy(Colour.BLUE, V2)
    if change.get("latest") == "2":
        _register_environment(ml_client, name, "2")
    path = f"{WORKSPACE}/onlineEndpoints/{router.endpoint}/deployments/blue"
    if "state" in change or "tag" in change or "env" in change:
        shown = arm.get(path)
        assert shown is not None
        shown["properties"]["provisioningState"] = change.get("state", "Succeeded")
        shown["tags"]["aml-rollout.sha256"] = change.get("tag", shown["tags"]["aml-rollout.sha256"])
        if "env" in change:
            shown["properties"]["environmentVariables"] = change["env"]
        arm.resources[path.lower()] = shown
    again = AzureMLRouter(
        ml_client,
        router.endpoint,
        environment=change.get("environment", environment).format(name=name),
        code=change.get("code"),
    )
    before = _deploy_puts(arm, router, Colour.BLUE)
    calls = len(arm.calls)
    again.deploy(Colour.BLUE, change.get("release", V2))
    assert _deploy_puts(arm, router, Colour.BLUE) == before + writes
    assert identity(again.release(Colour.BLUE)) == identity(change.get("release", V2))
    if "latest" in change:
        # The label is read (the PUT's own resolution aside) only when all else is held.
        listed = [c for c in arm.calls[calls:] if c[0] == "GET" and c[1].endswith("/versions")]
        assert len(listed) == writes + (
            "release" not in change
        )  # the version the label names now is held: nothing more to write
        held = arm.get(path)
        assert held is not None
        assert held["properties"]["environmentId"].endswith(
            f"/environments/{name}/versions/{change['latest']}"
        )
        again.deploy(Colour.BLUE, change.get("release", V2))
        assert _deploy_puts(arm, router, Colour.BLUE) == before + writes


_environments = itertools.count()


def _register_environment(ml_client: Any, name: str, version: str) -> None:
    from azure.ai.ml.entities import Environment

    image = "mcr.microsoft.com/azureml/minimal-ubuntu22.04-py39-cpu-inference:latest"
    ml_client.environments.create_or_update(Environment(name=name, version=version, image=image))


def _registered_environment(ml_client: Any) -> str:
    """A new environment of the workspace, with version 1 (`@latest` lists its versions)."""
    name = f"scoring-env-{next(_environments)}"
    _register_environment(ml_client, name, "1")
    return name


@pytest.mark.parametrize(
    "environment",
    [
        pytest.param("azureml:diabetes-env:1", id="prefixed"),
        pytest.param("diabetes-env:1", id="name-version-without-prefix"),
        pytest.param("AzureML-sklearn-1.0-ubuntu20.04-py38-cpu:1", id="curated-short-form"),
        # was: a label could not be compared with the version Azure answers, so deployed again
        pytest.param("{registered}@latest", id="latest-label"),
    ],
)
def test_an_identical_redeploy_writes_nothing_however_the_environment_is_written(
    arm: FakeArm, ml_client: Any, environment: str
) -> None:
    """Was: an environment written `name:version` (no `azureml:`, which the spec takes) was
    never the one deployed, so a deploy retried after a timeout rolled every instance again."""
    if "{registered}" in environment:
        environment = environment.format(registered=_registered_environment(ml_client))
    router = make_router(ml_client, environment=environment)
    router.deploy(Colour.BLUE, V2)
    before = _deploy_puts(arm, router, Colour.BLUE)
    router.deploy(Colour.BLUE, V2)
    assert _deploy_puts(arm, router, Colour.BLUE) == before


@pytest.mark.parametrize(
    ("status", "times", "refused"),
    [
        pytest.param(404, 1, False, id="not-found"),
        # one read: the first try and the three retries azure-core makes of a 503
        pytest.param(503, 4, False, id="unavailable"),
        pytest.param(403, 1, True, id="forbidden"),
        pytest.param(401, 1, True, id="credentials-rejected"),
    ],
)
def test_a_latest_label_that_cannot_be_read_is_deployed_again(
    arm: FakeArm, ml_client: Any, status: int, times: int, refused: bool
) -> None:
    """Whether the deployment holds what `@latest` names is unknown then: the PUT goes (its
    own resolution of the label, and Azure's answer, speak), but rejected credentials raise
    as every other call does, rather than becoming a PUT."""
    name = _registered_environment(ml_client)
    router = make_router(ml_client, environment=f"{name}@latest")
    router.deploy(Colour.BLUE, V2)
    before = _deploy_puts(arm, router, Colour.BLUE)
    arm.fail("GET", f"/environments/{name}/versions$", status, "Injected", times=times)
    if refused:
        with pytest.raises(RouterRefused, match=f"environment {name}@latest: .*HTTP {status} "):
            router.deploy(Colour.BLUE, V2)
    else:
        router.deploy(Colour.BLUE, V2)
    assert _deploy_puts(arm, router, Colour.BLUE) == before + (not refused)


def test_a_latest_label_naming_no_version_is_the_deploys_own_refusal(
    arm: FakeArm, ml_client: Any
) -> None:
    """Every version archived since: `@latest` names none. That is azure-ai-ml's refusal of
    the deploy (its resolution of the label for the PUT), not one of the check before it."""
    name = _registered_environment(ml_client)
    router = make_router(ml_client, environment=f"{name}@latest")
    router.deploy(Colour.BLUE, V2)
    version = f"{WORKSPACE}/environments/{name}/versions/1"
    archived = arm.get(version)
    assert archived is not None
    archived["properties"]["isArchived"] = True
    arm.resources[version.lower()] = archived
    with pytest.raises(RouterRefused, match=f"deploy {router.endpoint}/blue: .*does not exist"):
        router.deploy(Colour.BLUE, V2)


def test_a_deploy_waits_for_the_endpoints_change_to_finish(arm: FakeArm, ml_client: Any) -> None:
    """Azure ML refuses to write a deployment while its endpoint is Updating (a traffic change
    that timed out, or someone else's): deploy waits for it, as set_weights does."""
    router = _deployed(ml_client)
    path = _endpoint_showing(arm, router, "Updating", {"green": 100})

    with _finished_later(arm, router, path):
        router.deploy(Colour.GREEN, V2)  # was: HTTP 409 Conflict
    assert identity(router.release(Colour.GREEN)) == identity(V2)


@pytest.mark.parametrize("state", ["Updating", "Deleting"])
def test_remove_waits_for_a_change_of_the_deployment_to_finish(
    arm: FakeArm, ml_client: Any, state: str
) -> None:
    """Blue mid-change (a redeploy, or our own delete, that timed out): Azure refuses to delete
    it meanwhile (409). remove waits for Azure to finish; a deletion that finishes is enough."""
    router = _deployed(ml_client)
    path = f"{WORKSPACE}/onlineEndpoints/{router.endpoint}/deployments/blue"
    shown = arm.get(path)
    assert shown is not None
    shown["properties"]["provisioningState"] = state
    arm.resources[path.lower()] = shown

    def azure_finishes() -> None:
        time.sleep(0.3)
        if state == "Deleting":
            del arm.resources[path.lower()]
        else:
            done = arm.get(path)
            assert done is not None
            done["properties"]["provisioningState"] = "Succeeded"
            arm.resources[path.lower()] = done

    finisher = threading.Thread(target=azure_finishes)
    finisher.start()
    try:
        router.remove(Colour.BLUE)  # was: HTTP 409 Conflict
    finally:
        finisher.join()
    assert arm.get(path) is None


def test_remove_waits_for_the_endpoints_change_to_finish(arm: FakeArm, ml_client: Any) -> None:
    """A rollback whose traffic write timed out: the Updating endpoint shows blue at 0 %, but
    blue still serves until Azure finishes. remove waits for that before deleting blue."""
    router = _deployed(ml_client)
    router.set_weights(Weights.blue_at(10))
    path = _endpoint_showing(arm, router, "Updating", {"green": 100})
    started = time.monotonic()
    with _finished_later(arm, router, path):
        router.remove(Colour.BLUE)
        waited = time.monotonic() - started
    assert waited >= 0.3
    assert arm.get(f"{path}/deployments/blue") is None


def test_a_lost_lease_stops_the_writes_inside_an_action(arm: FakeArm, ml_client: Any) -> None:
    """An action reads before it writes (and may wait for Azure to settle): the router checks
    the controller's lease right before each write, not only before the action."""
    router = _deployed(ml_client)
    router.set_weights(Weights.blue_at(10))
    puts = len(arm.calls)

    def lease_lost() -> None:
        raise StateError("lost the lease of rollout 'x': another controller may drive it")

    router.fence = lease_lost
    for call in (
        lambda: router.set_weights(Weights.blue_at(50)),
        lambda: router.deploy(Colour.BLUE, V1),
        lambda: router.set_weights(Weights.blue_at(0)),
    ):
        with pytest.raises(StateError, match="lost the lease"):
            call()
    writes = [c for c in arm.calls[puts:] if c[0] in ("PUT", "PATCH", "DELETE", "POST")]
    assert writes == []  # reads only
    assert router.get_weights() == Weights.blue_at(10)


def test_traffic_shown_by_a_failed_endpoint_is_written_again(arm: FakeArm, ml_client: Any) -> None:
    """A change that Failed may leave the traffic asked for on show: not what serves."""
    router = _deployed(ml_client)
    _endpoint_showing(arm, router, "Failed", {"green": 90, "blue": 10})
    before = len(list(iter_calls(arm, "PUT", f"/onlineEndpoints/{router.endpoint}$")))
    router.set_weights(Weights.blue_at(10))
    after = list(iter_calls(arm, "PUT", f"/onlineEndpoints/{router.endpoint}$"))
    assert len(after) == before + 1
    assert after[-1][1]["properties"]["traffic"] == {"green": 90, "blue": 10}
    assert router.get_weights() == Weights.blue_at(10)  # Succeeded: what it shows serves


@pytest.mark.parametrize(
    ("state", "why"),
    [
        pytest.param("Failed", "its last change did not apply", id="failed"),
        pytest.param("Canceled", "its last change did not apply", id="canceled"),
        pytest.param("Updating", "a change is in progress", id="updating"),
        pytest.param("Creating", "a change is in progress", id="creating"),
        pytest.param("Deleting", "a change is in progress", id="deleting"),
    ],
)
def test_traffic_an_endpoint_shows_but_may_not_serve_is_not_read_as_served(
    arm: FakeArm, ml_client: Any, state: str, why: str
) -> None:
    """Was: get_weights read `traffic` whatever the endpoint's state (base.py: "the weights the
    data plane serves now, not what was written"): a rollback whose operation Failed read back
    as blue 0 % applied, to the controller's check, to `status` and on resume."""
    router = _deployed(ml_client)
    _endpoint_showing(arm, router, state, {"green": 50, "blue": 50})
    with pytest.raises(RouterError) as unread:
        router.get_weights()
    assert str(unread.value).startswith(
        f"endpoint {router.endpoint} is in provisioning state {state}: {why}"
    )
    assert str(unread.value).endswith("it shows traffic {'green': 50, 'blue': 50}")
    assert not isinstance(unread.value, RouterRefused)  # retried: the controller writes again
    # What it shows is someone's: a new rollout's check that none drives the endpoint reads it.
    assert isinstance(unread.value, WeightsUnsettled)
    assert unread.value.shown == Weights.blue_at(50)


@pytest.mark.parametrize("field", ["deploy_timeout_s", "traffic_timeout_s"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0])
def test_a_timeout_must_be_a_finite_positive_number(field: str, value: float) -> None:
    """An infinite wait is what the bounds are for (and `.inf` crashed the poller's join)."""
    from pydantic import ValidationError

    base = {"subscription_id": SUB, "resource_group": RG, "workspace": WS, "endpoint": "ep-1"}
    with pytest.raises(ValidationError, match=field):
        AzureMLRouterConfig.model_validate({"kind": "azureml", **base, field: value})


def azure_spec(router: AzureMLRouter, tmp_path: Path) -> Any:
    return spec_from_dict({
        "name": "diabetes",
        "router": {"kind": "azureml", "subscription_id": SUB, "resource_group": RG,
                   "workspace": WS, "endpoint": router.endpoint},
        "metrics": {"kind": "simulated", "seed": 5, "rps": 500,
                    "baseline": {"error_rate": 0.01}, "canary": {"error_rate": 0.01}},
        "steps": [0, 10, 100],
        "mirror_percent": 5,
        "analysis": {"interval_s": 10, "min_requests": 50, "latency": {"enabled": False}},
        "state": {"dir": str(tmp_path / "state")},
    })  # fmt: skip


def test_a_rollout_through_the_endpoint_reads_back_what_it_set_at_every_tick(
    arm: FakeArm, ml_client: Any, tmp_path: Path
) -> None:
    """The controller compares what the endpoint serves with its status at every tick (tags,
    traffic, mirror traffic read back through the SDK): the same, or every rollout would hold."""
    router = make_router(ml_client)
    router.deploy(Colour.GREEN, V1)
    router.set_weights(Weights.blue_at(0))
    result = run_rollout(azure_spec(router, tmp_path), candidate=V2, router=router,
                         clock=FakeClock(1_000.0))  # fmt: skip
    assert result.phase is Phase.SUCCEEDED, result.reason
    assert "drift" not in result.ledger_path.read_text()


def test_traffic_moved_in_the_portal_mid_rollout_holds_it(
    arm: FakeArm, ml_client: Any, tmp_path: Path
) -> None:
    router = make_router(ml_client)
    router.deploy(Colour.GREEN, V1)
    router.set_weights(Weights.blue_at(0))

    def portal(status: Any, record: dict[str, Any]) -> None:
        if status.blue_weight == 10 and status.phase is Phase.PROGRESSING:
            found = endpoint(arm, router)
            found["properties"].update(traffic={"green": 50, "blue": 50})
            arm.resources[f"{WORKSPACE}/onlineEndpoints/{router.endpoint}".lower()] = found

    result = run_rollout(azure_spec(router, tmp_path), candidate=V2, router=router,
                         clock=FakeClock(1_000.0), on_tick=portal,
                         stop_when_paused=True)  # fmt: skip
    assert result.phase is Phase.PAUSED
    assert "it sends blue 50 %, not blue 10 %" in result.reason
    assert router.get_weights() == Weights.blue_at(50)  # not fought over


def _throttle(retry_after: str) -> Any:
    def answer(arm: Any, method: str, body: Any, query: Any) -> Any:
        error = {"error": {"code": "TooManyRequests", "message": "throttled"}}
        return 429, error, {"Retry-After": retry_after}

    return answer


@pytest.mark.parametrize(
    ("method", "call", "expected"),
    [
        pytest.param(
            "PUT", lambda r: r.set_weights(Weights.blue_at(0)), "traffic: HTTP 429",
            id="rollback-put-retry-after-900",
        ),
        pytest.param(
            "GET", lambda r: r.get_weights(), "HTTP 429", id="read-retry-after-a-day"
        ),
    ],
)  # fmt: skip
def test_a_throttled_request_is_not_waited_for_beyond_the_traffic_bound(
    monkeypatch: pytest.MonkeyPatch, method: str, call: Any, expected: str
) -> None:
    """azure-core sleeps each Retry-After as sent, 3 times: a rollback whose PUT ARM throttles
    for 900 s took 2700 s, a read throttled for a day 3 days. The router's client keeps a
    request and its retries within traffic_timeout_s: a longer Retry-After fails at once."""
    monkeypatch.setattr("rollout.routers.azureml.default_credential", StaticCredential)
    with running_arm() as arm:
        cfg = AzureMLRouterConfig(
            subscription_id=SUB, resource_group=RG, workspace=WS, endpoint="ep-throttled",
            environment="azureml:env:1", traffic_timeout_s=300,
        )  # fmt: skip
        transport = arm.transport()
        router = AzureMLRouter.from_config(cfg, transport=transport)
        router.deploy(Colour.GREEN, V1)
        router.deploy(Colour.BLUE, V2)
        router.set_weights(Weights.blue_at(50))
        retry_after = "900" if method == "PUT" else "86400"
        arm._routes.insert(
            0, (method, re.compile(r"/onlineEndpoints/ep-throttled$", re.I), _throttle(retry_after))
        )
        transport.sleeps.clear()
        with pytest.raises(RouterError, match=expected):
            call(router)
        assert sum(transport.sleeps) <= 300


def test_a_hung_request_ends_within_the_budget() -> None:
    """azure-core gives each attempt a 300 s read timeout and retries a GET 3 times: a read
    ARM never answers blocked a rollback 20 min. The bounded policy cuts the read timeout to
    what remains of the budget and starts no retry once it is spent."""
    from azure.ai.ml import MLClient

    from rollout.azure_retry import bounded_retry_policy

    release = threading.Event()
    with running_arm() as arm:
        client = MLClient(
            StaticCredential(), SUB, RG, WS, transport=arm.transport(),
            retry_policy=bounded_retry_policy(0.5),
        )  # fmt: skip
        router = AzureMLRouter(
            client, "ep-hung", environment="azureml:env:1", traffic_timeout_s=0.5
        )
        router.deploy(Colour.GREEN, V1)

        def hang(arm: Any, method: str, body: Any, query: Any) -> Any:
            release.wait(30)
            return 200, {}, {}

        arm._routes.insert(0, ("GET", re.compile(r"/onlineEndpoints/ep-hung$", re.I), hang))
        started = time.monotonic()
        try:
            with pytest.raises(RouterError) as raised:
                router.get_weights()
        finally:
            release.set()
        assert time.monotonic() - started < 5
    assert str(raised.value) == (
        "endpoint ep-hung: no answer from Azure within 0.5 s (router.traffic_timeout_s)"
    )


AZUREML_ROUTER = {
    "kind": "azureml", "subscription_id": SUB, "resource_group": RG, "workspace": WS,
    "endpoint": "diabetes-ep",
}  # fmt: skip


@pytest.mark.parametrize(
    ("header", "refused"),
    [
        pytest.param("x-colour", True, id="another-header-refused"),
        pytest.param("azureml-model-deployment", True, id="azures-own-name-is-not-ours-to-set"),
        pytest.param("x-api-version", False, id="the-default-spelled-out"),
        pytest.param("X-Api-Version", False, id="the-default-in-any-case"),
    ],
)
def test_a_pinning_header_is_refused_with_the_azureml_router(header: str, refused: bool) -> None:
    """A top-level `header` configures the istio and envoy routes; on Azure ML it did nothing
    (pinning is Azure's `azureml-model-deployment`) and was accepted silently."""
    spec = {"name": "d", "header": header, "router": AZUREML_ROUTER}
    if not refused:
        assert isinstance(spec_from_dict(spec).router, AzureMLRouterConfig)
        return
    with pytest.raises(ConfigError, match=r"header.*azureml-model-deployment"):
        spec_from_dict(spec)


def test_the_sdks_progress_dots_do_not_reach_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    """azure-ai-ml prints a "." per poll of every operation on stdout, where `rollout run`
    writes its tick lines: they read "..RouterError ..." glued together."""
    with running_arm(polls=2) as arm:
        router = AzureMLRouter(client_of(arm), "ep-quiet", environment="azureml:env:1")
        capfd.readouterr()
        router.deploy(Colour.GREEN, V1)
        router.deploy(Colour.BLUE, V2)
        router.set_weights(Weights.blue_at(10))
        router.set_weights(Weights.blue_at(0))
        router.remove(Colour.BLUE)
        assert capfd.readouterr().out == ""


def test_an_abort_of_a_promotion_whose_deploy_left_green_failed_deploys_the_stable_release(
    tmp_path: Path,
) -> None:
    """Was: the abort of a Finalising rollout whose Blue_Green failed for good (no quota)
    stopped at reading green (provisioning state Failed: RouterRefused), exit 2 every `run`,
    blue at 100 % for ever. Green gets the stable release again, then all traffic."""
    with running_arm() as arm:
        router = AzureMLRouter(client_of(arm), "ep-fin", environment="azureml:env:1")
        RouterContract.live(router)
        spec = _endpoint_spec(router, tmp_path)
        store = FileStateStore(tmp_path / "state", "diabetes")
        green = f"{WORKSPACE}/onlineEndpoints/ep-fin/deployments/green"
        no_quota = [False]

        def operation(arm_: FakeArm, match: Any, body: Any, query: Any) -> tuple[int, Any, Any]:
            if not no_quota[0]:
                return arm_._operation(match.string)
            dep = arm_.get(green)
            assert dep is not None
            dep["properties"]["provisioningState"] = "Failed"
            arm_.resources[green.lower()] = dep
            error = {"code": "QuotaExceeded", "message": "no quota for the candidate"}
            return 200, {"status": "Failed", "error": error}, {}

        arm.on("GET", r"^/_operations/", operation)

        def promote_then_fail_green(status: Status, _: Any) -> None:
            if status.phase is Phase.PROGRESSING and not store.commands():
                store.push_command(Command(id="p", kind="promote", by="ann", rollout=status.id))
            no_quota[0] = status.phase in (Phase.PROMOTING, Phase.FINALISING)

        with pytest.raises(DeployFailed, match="no quota"):
            run_rollout(spec, candidate=V2, router=router, clock=FakeClock(1_000.0),
                        on_tick=promote_then_fail_green)  # fmt: skip
        stuck = store.load()
        assert stuck is not None and stuck.phase is Phase.FINALISING
        with pytest.raises(RouterRefused, match="green is in provisioning state Failed"):
            router.release(Colour.GREEN)
        no_quota[0] = False
        store.push_command(Command(id="a", kind="abort", by="ann", rollout=stuck.id))
        final = run_rollout(spec, candidate=V2, router=router, clock=FakeClock(2_000.0))
        assert final.phase is Phase.ROLLED_BACK, final.reason
        assert router.get_weights() == Weights.blue_at(0)
        served = router.release(Colour.GREEN)
        assert served is not None and not V1.unlike(served)


def test_a_scoring_script_missing_on_this_machine_is_refused_not_retried(
    ml_client: Any, tmp_path: Path
) -> None:
    # Was: azure-ai-ml's "Failed to open scoring script" (an MlException from the OSError) was
    # a plain RouterError: the controller retried blue's deploy 4 times over 7 s for a file
    # that no retry makes appear, then failed with the same error.
    live = make_router(ml_client)
    RouterContract.live(live)
    typo = str(tmp_path / "scoring-code-typo")
    router = AzureMLRouter(
        ml_client, live.endpoint, environment="azureml:diabetes-env:1", code=typo
    )
    with pytest.raises(RouterRefused, match=r"Failed to open scoring script .*router\.code"):
        router.deploy(Colour.BLUE, V2)


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        pytest.param({"code": "./scoring-code-typo"},
                     "router.code: no folder ./scoring-code-typo, read from the current "
                     "directory", id="no-code-folder"),
        pytest.param({"code": "./code", "scoring_script": "scor.py"},
                     "router.scoring_script: scor.py is not a file of router.code ./code",
                     id="no-script-in-it"),
        pytest.param({"code": "azureml:score:1", "scoring_script": ""},
                     "router.scoring_script: String should have at least 1 character",
                     id="empty-script"),
        pytest.param({"instance_type": ""},
                     "router.instance_type: String should have at least 1 character",
                     id="empty-instance-type"),
    ],
)  # fmt: skip
def test_validate_refuses_router_files_and_values_azure_ml_refuses_at_blue_s_deploy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, str], said: str
) -> None:
    # Was: `validate` said ok; the rollout then failed at blue's deploy (retried 4 times as a
    # blip for the missing folder), after green's traffic had been read and the ledger begun.
    from typer.testing import CliRunner

    from rollout.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "score.py").write_text("def init(): ...\n")
    router = {"kind": "azureml", "subscription_id": SUB, "resource_group": RG, "workspace": WS,
              "endpoint": "diabetes-ep", "environment": "azureml:env:1"}  # fmt: skip
    spec = tmp_path / "rollout.yaml"
    spec.write_text(yaml.safe_dump({"name": "d", "router": {**router, **extra},
                                    "metrics": {"kind": "static"}}))  # fmt: skip
    result = CliRunner().invoke(app, ["rollout", "validate", str(spec)], terminal_width=400)
    assert result.exit_code == 2, result.output
    assert said in " ".join(result.output.split())
    spec.write_text(yaml.safe_dump({"name": "d", "router": {**router, "code": "./code"},
                                    "metrics": {"kind": "static"}}))  # fmt: skip
    result = CliRunner().invoke(app, ["rollout", "validate", str(spec)], terminal_width=400)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "code",
    [
        pytest.param(f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/"
                     f"Microsoft.MachineLearningServices/workspaces/{WS}/codes/score/versions/1",
                     id="arm-id"),
        pytest.param("azureml:score:1", id="asset"),
        pytest.param("azureml://registries/shared/codes/score/versions/1", id="registry"),
    ],
)  # fmt: skip
def test_a_code_asset_is_not_looked_for_on_this_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    # Was (the first folder check): a bare ARM id was taken for a local folder, "router.code:
    # no folder /subscriptions/...", and validate and run refused a spec Azure takes.
    from typer.testing import CliRunner

    from rollout.cli import app

    monkeypatch.chdir(tmp_path)
    router = {"kind": "azureml", "subscription_id": SUB, "resource_group": RG, "workspace": WS,
              "endpoint": "diabetes-ep", "environment": "azureml:env:1", "code": code}  # fmt: skip
    spec = tmp_path / "rollout.yaml"
    spec.write_text(yaml.safe_dump({"name": "d", "router": router, "metrics": {"kind": "static"}}))
    result = CliRunner().invoke(app, ["rollout", "validate", str(spec)], terminal_width=400)
    assert result.exit_code == 0, result.output
