"""The Istio router against a fake kube-apiserver over real HTTP (kubernetes client unchanged).

The shared contract runs first; then what only Istio has: optimistic concurrency (409 → re-read
→ retry, bounded), routes the user added surviving every write, no write when nothing changes,
readiness waiting, and API errors becoming RouterError with context.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.client import IncompleteRead, RemoteDisconnected
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from urllib3.connection import HTTPConnection
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from rollout import kubeapi
from rollout.config import IstioRouterConfig, KubeApiConfig, KubernetesStateConfig
from rollout.core.status import Status
from rollout.core.types import Colour, Phase, Release, Weights
from rollout.errors import (
    ConfigError,
    ConflictError,
    DeployFailed,
    RouterError,
    RouterRefused,
    RouterUnavailable,
    StateError,
)
from rollout.routers import istio_manifests as m
from rollout.routers.base import UPSTREAM_IDLE_S
from rollout.routers.factory import make_router
from rollout.routers.istio import IstioRouter
from rollout.state.kubernetes import KubernetesStateStore
from rollout.state.kubernetes_objects import StateObjects
from tests.fakes.kube_apiserver import ApiError, FakeKubeApiServer
from tests.fakes.server import Answering
from tests.routers.contract import V1, V2, RouterContract, identity
from tests.routers.test_manifests import errors as schema_errors
from tests.state.helpers import InstantTime

LAYOUT = m.IstioLayout(namespace="ml", app="diabetes")
VS = ("virtualservices", "diabetes", "ml", m.ISTIO_GROUP)
DEPLOYMENT_BLUE = ("deployments", "diabetes-blue", "ml", "apps")
DEPLOYMENT_GREEN = ("deployments", "diabetes-green", "ml", "apps")

USER_ROUTE = {
    "name": "team-debug",
    "match": [{"uri": {"prefix": "/debug"}}],
    "route": [{"destination": {"host": "debug-svc"}}],
}


@pytest.fixture
def api() -> Iterator[FakeKubeApiServer]:
    with FakeKubeApiServer() as server:
        server.seed(m.namespace(LAYOUT), "namespaces")
        yield server


def make(api: FakeKubeApiServer, layout: m.IstioLayout = LAYOUT, **kwargs: Any) -> IstioRouter:
    configuration = k8s.Configuration()
    configuration.host = api.url
    kwargs.setdefault("sleep", lambda _s: None)
    return IstioRouter(layout, k8s.ApiClient(configuration), **kwargs)


def http_routes(api: FakeKubeApiServer) -> list[dict[str, Any]]:
    routes: list[dict[str, Any]] = api.get(*VS)["spec"]["http"]
    return routes


class TestIstioRouterContract(RouterContract):
    @pytest.fixture
    def router(self, api: FakeKubeApiServer) -> IstioRouter:
        return make(api)

    def pinned_routes(self, router: Any) -> Any:
        vs = router._read_virtual_service()
        return [r for r in vs["spec"]["http"] if r["name"] != m.DEFAULT_ROUTE]

    @contextmanager
    def fresh_router(self) -> Iterator[IstioRouter]:
        with FakeKubeApiServer() as server:
            server.seed(m.namespace(LAYOUT), "namespaces")
            yield make(server)


def test_from_config_through_the_factory(api: FakeKubeApiServer) -> None:
    cfg = IstioRouterConfig(namespace="ml", app="diabetes", api_url=api.url)
    router = make_router(cfg)
    assert isinstance(router, IstioRouter)
    router.deploy(Colour.GREEN, V1)
    assert identity(router.release(Colour.GREEN)) == identity(V1)


def test_the_gateway_a_deploy_creates_binds_the_ingress_gateway_of_the_spec(
    api: FakeKubeApiServer,
) -> None:
    # AKS's Istio add-on: its gateway pods are not `istio: ingressgateway`.
    cfg = IstioRouterConfig(
        namespace="ml",
        app="diabetes",
        api_url=api.url,
        ingress_gateway="aks-istio-ingressgateway-internal",
    )
    make_router(cfg).deploy(Colour.GREEN, V1)
    gateway = api.get("gateways", "diabetes-gateway", "ml", m.ISTIO_GROUP)
    assert gateway["spec"]["selector"] == {"istio": "aks-istio-ingressgateway-internal"}


def test_deploy_creates_the_objects_the_manifests_describe(api: FakeKubeApiServer) -> None:
    make(api).deploy(Colour.GREEN, V1)
    for obj in m.services(LAYOUT):
        assert api.get("services", obj["metadata"]["name"], "ml")["spec"] == obj["spec"]
    assert (
        api.get("gateways", "diabetes-gateway", "ml", m.ISTIO_GROUP)["spec"]
        == (m.gateway(LAYOUT)["spec"])
    )
    dep = api.get("deployments", "diabetes-green", "ml", "apps")
    # Through the client's typed model and back: the pull policy and the pod template's
    # release annotations included.
    assert dep["spec"] == m.deployment(LAYOUT, Colour.GREEN, V1)["spec"]
    assert [r["name"] for r in http_routes(api)] == [
        "aml-rollout-pin-blue",
        "aml-rollout-pin-green",
        "aml-rollout-default",
    ]


# ---- idle upstream connections: a DestinationRule per Service -------------------------------
SERVICES = ("diabetes-green", "diabetes-green-pinned", "diabetes-blue", "diabetes-blue-pinned")
OURS = {"connectionPool": {"http": {"idleTimeout": f"{UPSTREAM_IDLE_S}s"}}}


def destination_rule(api: FakeKubeApiServer, name: str) -> dict[str, Any]:
    return api.get("destinationrules", name, "ml", m.ISTIO_GROUP)


def test_deploy_bounds_the_idle_connections_of_every_service(api: FakeKubeApiServer) -> None:
    make(api).deploy(Colour.GREEN, V1)
    for name in SERVICES:
        rule = destination_rule(api, name)
        assert rule["spec"] == {"host": name, "trafficPolicy": OURS}
        assert schema_errors(rule) == []


#: A DestinationRule of the user's for blue's Service, without an idle timeout.
USERS_RULE = {
    "apiVersion": f"{m.ISTIO_GROUP}/{m.ISTIO_VERSION}",
    "kind": "DestinationRule",
    "metadata": {"name": "diabetes-blue", "namespace": "ml", "labels": {"team": "ml"}},
    "spec": {
        "host": "diabetes-blue",
        "trafficPolicy": {
            "connectionPool": {
                "tcp": {"maxConnections": 100},
                "http": {"http1MaxPendingRequests": 64},
            },
            "outlierDetection": {"consecutive5xxErrors": 7, "interval": "10s"},
        },
    },
}


@pytest.mark.parametrize(
    ("theirs", "patched", "warned"),
    [
        pytest.param(None, True, False, id="none-ours-added"),
        pytest.param("30s", False, False, id="shorter-kept"),
        pytest.param("1h", False, True, id="too-long-kept-and-said"),
        pytest.param("1m15s", False, True, id="the-keep-alive-itself-is-too-long"),
    ],
)
def test_a_destination_rule_of_yours_keeps_every_field_of_yours(
    api: FakeKubeApiServer, caplog: Any, theirs: str | None, patched: bool, warned: bool
) -> None:
    # As with the VirtualService, a field of yours is never overwritten: only a missing idle
    # timeout is added; one of yours stays, and one the scoring server outlives is said.
    rule = copy.deepcopy(USERS_RULE)
    if theirs is not None:
        rule["spec"]["trafficPolicy"]["connectionPool"]["http"]["idleTimeout"] = theirs
    api.seed(rule, "destinationrules", m.ISTIO_GROUP)
    before = len(api.requests)
    make(api).deploy(Colour.BLUE, V2)
    found = destination_rule(api, "diabetes-blue")
    wanted = copy.deepcopy(rule["spec"])
    wanted["trafficPolicy"]["connectionPool"]["http"]["idleTimeout"] = theirs or "60s"
    assert found["spec"] == wanted
    assert found["metadata"]["labels"] == {"team": "ml"}
    assert schema_errors(found) == []
    writes = [
        r.verb
        for r in api.requests[before:]
        if r.name == "diabetes-blue" and r.resource == "destinationrules" and r.verb != "get"
    ]
    assert writes == (["patch"] if patched else [])
    assert ("the scoring server closes idle connections after 75 s" in caplog.text) is warned


def test_a_concurrent_write_to_your_destination_rule_is_retried(api: FakeKubeApiServer) -> None:
    api.seed(copy.deepcopy(USERS_RULE), "destinationrules", m.ISTIO_GROUP)

    def their_edit(obj: dict[str, Any]) -> None:
        obj["spec"]["trafficPolicy"]["outlierDetection"]["interval"] = "5s"

    api.before_next_write("destinationrules", "diabetes-blue", their_edit)
    make(api).deploy(Colour.BLUE, V2)
    policy = destination_rule(api, "diabetes-blue")["spec"]["trafficPolicy"]
    assert policy["outlierDetection"]["interval"] == "5s"
    assert policy["connectionPool"]["http"]["idleTimeout"] == "60s"


def test_a_role_from_before_destination_rules_does_not_stop_a_deploy(
    api: FakeKubeApiServer, caplog: Any
) -> None:
    # An upgrade with the Role of an older chart: say what to re-apply, and carry on.
    handle = api.handle

    def forbid(method: str, path: str, *args: Any) -> Any:
        if "/destinationrules" in path:
            raise ApiError(403, "Forbidden", 'cannot get resource "destinationrules"')
        return handle(method, path, *args)

    api.handle = forbid  # type: ignore[method-assign]
    router = make(api)
    router.deploy(Colour.GREEN, V1)
    assert router.release(Colour.GREEN) == V1
    assert "re-apply the Role" in caplog.text
    assert not api.exists("destinationrules", "diabetes-green", "ml", m.ISTIO_GROUP)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda r: r.deploy(Colour.BLUE, V2), id="deploy"),
        # A resumed controller's first call may be a weights change, with no deploy before it.
        pytest.param(lambda r: r.set_weights(Weights.blue_at(0)), id="set-weights"),
    ],
)
def test_a_service_port_other_than_the_spec_s_is_refused_before_any_route_uses_it(
    api: FakeKubeApiServer, call: Any
) -> None:
    """Installed with the chart's port 80, run with `router.port: 8000` (the scoring server's
    port, typed as the Service's): the routes would send every request, green's too, to a port
    no Service has (Envoy answers 503), from the first weights change on."""
    make(api).deploy(Colour.GREEN, V1)
    routes = http_routes(api)
    router = make(api, dataclasses.replace(LAYOUT, port=8000))
    with pytest.raises(RouterRefused, match=(
        r"Service ml/diabetes-green exposes port 80, not router.port 8000: routes to it "
        r"would fail every request; set router.port: 80"
    )):  # fmt: skip
        call(router)
    assert http_routes(api) == routes
    assert not api.exists("deployments", "diabetes-blue", "ml", "apps")


def test_header_routes_come_first_and_pin_to_their_colour(api: FakeKubeApiServer) -> None:
    router = make(api)
    router.deploy(Colour.GREEN, V1)
    router.deploy(Colour.BLUE, V2)
    router.set_weights(Weights.blue_at(10))
    pin_blue, pin_green, default = http_routes(api)
    # A request naming both colours pins neither (it follows the weights), as on the local Envoy.
    assert pin_blue["match"] == [
        {
            "headers": {"x-api-version": {"exact": "blue"}},
            "withoutHeaders": {"x-api-version": {"exact": "green"}},
        }
    ]
    assert pin_green["match"][0]["withoutHeaders"] == {"x-api-version": {"exact": "blue"}}
    assert pin_blue["route"][0]["destination"]["host"] == "diabetes-blue-pinned"
    assert pin_green["route"][0]["destination"]["host"] == "diabetes-green-pinned"
    assert {d["destination"]["host"]: d["weight"] for d in default["route"]} == {
        "diabetes-green": 90,
        "diabetes-blue": 10,
    }


def test_pin_routes_of_before_take_the_both_colours_rule_at_the_next_write(
    api: FakeKubeApiServer,
) -> None:
    vs = m.virtual_service(LAYOUT, Weights.blue_at(10))
    for route in vs["spec"]["http"][:2]:  # as written before: no withoutHeaders
        del route["match"][0]["withoutHeaders"]
    api.seed(vs, "virtualservices", m.ISTIO_GROUP)
    router = make(api)
    router.deploy(Colour.GREEN, V1)
    router.deploy(Colour.BLUE, V2)
    router.set_weights(Weights.blue_at(20))
    assert [r["match"] for r in http_routes(api)[:2]] == [
        r["match"] for r in m.managed_routes(LAYOUT, Weights.blue_at(20))[:2]
    ]
    assert "withoutHeaders" in http_routes(api)[0]["match"][0]


def test_a_concurrent_write_between_read_and_patch_is_retried(api: FakeKubeApiServer) -> None:
    router = make(api)
    router.deploy(Colour.GREEN, V1)
    router.deploy(Colour.BLUE, V2)

    def someone_else(vs: dict[str, Any]) -> None:  # e.g. a GitOps agent touching a label
        vs["metadata"].setdefault("labels", {})["touched-by"] = "argocd"

    api.before_next_write("virtualservices", "diabetes", someone_else)
    router.set_weights(Weights.blue_at(50))

    patches = [r.status for r in api.requests if r.verb == "patch"]
    assert patches == [409, 200]
    assert router.get_weights() == Weights.blue_at(50)
    assert api.get(*VS)["metadata"]["labels"]["touched-by"] == "argocd"  # their write survived


def test_conflicts_that_never_end_raise_conflict_error(api: FakeKubeApiServer) -> None:
    router = make(api, max_conflict_retries=3)
    router.deploy(Colour.GREEN, V1)
    router.deploy(Colour.BLUE, V2)

    def keep_writing(vs: dict[str, Any]) -> None:
        vs["metadata"].setdefault("annotations", {})["n"] = str(len(api.requests))
        api.before_next_write("virtualservices", "diabetes", keep_writing)

    api.before_next_write("virtualservices", "diabetes", keep_writing)
    with pytest.raises(ConflictError, match="3 attempts"):
        router.set_weights(Weights.blue_at(50))
    assert [r.status for r in api.requests if r.verb == "patch"] == [409, 409, 409]


def test_a_stale_deployment_patch_is_retried_and_their_change_survives(
    api: FakeKubeApiServer,
) -> None:
    router = make(api)
    router.deploy(Colour.BLUE, V1)

    def someone_else(dep: dict[str, Any]) -> None:  # `kubectl scale` + `kubectl label`
        dep["metadata"]["labels"]["x"] = "y"
        dep["spec"]["replicas"] = 4

    api.before_next_write("deployments", "diabetes-blue", someone_else)
    router.deploy(Colour.BLUE, V2)
    assert [
        r.status for r in api.requests if r.resource == "deployments" and r.verb == "patch"
    ] == [
        409,
        200,
    ]
    assert identity(router.release(Colour.BLUE)) == identity(V2)
    dep = api.get(*DEPLOYMENT_BLUE)
    assert (dep["metadata"]["labels"]["x"], dep["spec"]["replicas"]) == ("y", 4)


def helm_and_platform_owned(dep: dict[str, Any]) -> dict[str, Any]:
    """`dep` as `helm install`, an HPA and a platform team leave it."""
    dep["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "Helm"
    dep["metadata"]["annotations"]["meta.helm.sh/release-name"] = "diabetes"
    dep["spec"]["replicas"] = 6
    dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] = "true"
    pod = dep["spec"]["template"]["spec"]
    pod["imagePullSecrets"] = [{"name": "acr"}]
    pod["containers"][0]["resources"] = {"requests": {"cpu": "500m"}, "limits": {"memory": "2Gi"}}
    pod["containers"][0]["env"].insert(0, {"name": "WORKERS", "value": "4"})
    pod["containers"].append({"name": "sidecar", "image": "logger:1"})
    return dep


def test_redeploy_changes_only_what_the_router_owns(api: FakeKubeApiServer) -> None:
    seeded = api.seed(
        helm_and_platform_owned(m.deployment(LAYOUT, Colour.GREEN, V1)), "deployments", "apps"
    )
    make(api).deploy(Colour.GREEN, V2)

    after = api.get(*DEPLOYMENT_GREEN)
    expected = seeded
    expected["metadata"]["annotations"].update(m.release_annotations(V2))
    expected["spec"]["template"]["metadata"]["annotations"].update(m.release_annotations(V2))
    expected["spec"]["template"]["spec"]["containers"][0]["image"] = V2.image
    for volatile in ("resourceVersion", "generation"):
        expected["metadata"].pop(volatile), after["metadata"].pop(volatile)
    expected.pop("status"), after.pop("status")
    assert after == expected  # Helm's metadata, the HPA's 6 replicas, resources... all kept
    assert [r.verb for r in api.requests if r.resource == "deployments"].count("patch") == 1


def with_containers(*names: str) -> dict[str, Any]:
    """Green's Deployment as `m.deployment` makes it, its pod's containers renamed `names`: the
    scoring server is the one named `diabetes` (or `scoring`); the others log shippers."""
    dep = m.deployment(LAYOUT, Colour.GREEN, V1)
    scoring = dep["spec"]["template"]["spec"]["containers"][0]
    dep["spec"]["template"]["spec"]["containers"] = [
        {**scoring, "name": name}
        if name in ("diabetes", m.SCORING_CONTAINER)
        else {"name": name, "image": "fluent/fluent-bit:3.0"}
        for name in names
    ]
    return dep


@pytest.mark.parametrize(
    ("containers", "changed"),
    [
        pytest.param(("log-shipper", "scoring"), "scoring", id="the-one-named-scoring"),
        pytest.param(("diabetes",), "diabetes", id="the-only-one-whatever-its-name"),
    ],
)
def test_the_container_a_deploy_changes(
    api: FakeKubeApiServer, containers: tuple[str, ...], changed: str
) -> None:
    api.seed(with_containers(*containers), "deployments", "apps")
    router = make(api)
    router.deploy(Colour.GREEN, V2)
    images = {
        c["name"]: c["image"]
        for c in api.get(*DEPLOYMENT_GREEN)["spec"]["template"]["spec"]["containers"]
    }
    assert images == {
        name: V2.image if name == changed else "fluent/fluent-bit:3.0" for name in containers
    }
    assert identity(router.release(Colour.GREEN)) == identity(V2)


def test_several_containers_and_none_named_scoring_are_refused_not_guessed(
    api: FakeKubeApiServer,
) -> None:
    """Was: the first container was taken for the scoring one: the log shipper got the new
    model's image and AML_ROLLOUT_COLOUR, `diabetes` went on serving v1, and the annotations
    (and `release()`) said v2: the judge would have tested v1 and promoted v2."""
    seeded = api.seed(with_containers("log-shipper", "diabetes"), "deployments", "apps")
    router = make(api)
    said = (
        "Deployment ml/diabetes-green has 2 containers (log-shipper, diabetes) and none named "
        "`scoring`"
    )
    with pytest.raises(RouterRefused, match=re.escape(said)) as refused:
        router.deploy(Colour.GREEN, V2)
    assert "name the scoring server's container `scoring`" in str(refused.value)
    assert api.get(*DEPLOYMENT_GREEN) == seeded  # nothing written
    with pytest.raises(RouterRefused, match=re.escape(said)):
        router.release(Colour.GREEN)


def _mislabelled(labels: dict[str, str], ports: list[dict[str, Any]]) -> dict[str, Any]:
    dep = m.deployment(LAYOUT, Colour.GREEN, V1)
    dep["spec"]["selector"] = {"matchLabels": labels}
    dep["spec"]["template"]["metadata"]["labels"] = labels
    dep["spec"]["template"]["spec"]["containers"][0]["ports"] = ports
    return dep


@pytest.mark.parametrize(
    ("labels", "ports", "has"),
    [
        pytest.param(
            {"app": "diabetes"},
            [{"name": "http", "containerPort": 8000}],
            "labels app=diabetes and ports http=8000",
            id="no-version-label",
        ),
        pytest.param(
            {"app": "diabetes", "version": "blue"},
            [{"name": "http", "containerPort": 8000}],
            "labels app=diabetes, version=blue and ports http=8000",
            id="the-other-colour",
        ),
        pytest.param(
            {"app": "diabetes", "version": "green"},
            [{"containerPort": 8000}],
            "labels app=diabetes, version=green and ports 8000",
            id="port-not-named-http",
        ),
        pytest.param({}, [], "labels (none) and ports (none)", id="neither"),
    ],
)
def test_a_deployment_the_services_would_not_select_is_refused(
    api: FakeKubeApiServer, labels: dict[str, str], ports: list[dict[str, Any]], has: str
) -> None:
    """Was: a Deployment of one's own named `<app>-<colour>` was deployed over and sent its
    share though its Service selected none of its pods (or named no port `http`, its
    targetPort): Istio answered 503 for that share while deploy, get_weights and release all
    read back fine."""
    seeded = api.seed(_mislabelled(labels, ports), "deployments", "apps")
    said = (
        "Deployment ml/diabetes-green is not what Services diabetes-green and "
        "diabetes-green-pinned send to: they select pods labelled app=diabetes, version=green "
        f"and send to their container port named `http`; the pod template has {has} on "
        "container `scoring`"
    )
    with pytest.raises(RouterRefused, match=re.escape(said)):
        make(api).deploy(Colour.GREEN, V2)
    assert api.get(*DEPLOYMENT_GREEN) == seeded  # nothing written


def test_a_release_pushed_again_under_its_tag_rolls_the_pods_and_pulls_it(
    api: FakeKubeApiServer,
) -> None:
    """The package step names an image `<registry>/<model>:<version>`: a model re-packaged
    under its version (new bits, a new sha256) is pushed under the same tag. Was: the deploy
    changed only the Deployment's annotations, so no new pod template, no new pods: the old
    bits went on serving while `release()` reported the new ones (and new pods, taking the
    tag's default IfNotPresent, ran the old image wherever a node had it)."""
    router = make(api)
    router.deploy(Colour.GREEN, V1)
    generation = api.get(*DEPLOYMENT_GREEN)["metadata"]["generation"]
    rebuilt = dataclasses.replace(V1, sha256="3" * 64)
    router.deploy(Colour.GREEN, rebuilt)
    after = api.get(*DEPLOYMENT_GREEN)
    assert after["metadata"]["generation"] == generation + 1  # a new pod template: pods roll
    template = after["spec"]["template"]
    assert template["metadata"]["annotations"] == m.release_annotations(rebuilt)
    assert template["spec"]["containers"][0]["imagePullPolicy"] == "Always"
    assert identity(router.release(Colour.GREEN)) == identity(rebuilt)


@pytest.mark.parametrize(
    ("image", "policy"),
    [
        pytest.param("registry.local/diabetes:1", "Always", id="tag-pulled-at-every-start"),
        pytest.param("registry.local/diabetes:1@sha256:" + "a" * 64, None, id="digest-default"),
    ],
)
def test_an_image_named_by_tag_is_pulled_again_one_named_by_digest_is_not(
    api: FakeKubeApiServer, image: str, policy: str | None
) -> None:
    # A Deployment made elsewhere (IfNotPresent set by hand) is adopted the same way.
    dep = m.deployment(LAYOUT, Colour.BLUE, V2)
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "IfNotPresent"
    api.seed(dep, "deployments", "apps")
    make(api).deploy(Colour.BLUE, dataclasses.replace(V1, image=image))
    container = api.get(*DEPLOYMENT_BLUE)["spec"]["template"]["spec"]["containers"][0]
    assert container["imagePullPolicy"] == (policy or "IfNotPresent")
    created = m.deployment(LAYOUT, Colour.GREEN, dataclasses.replace(V1, image=image))
    assert created["spec"]["template"]["spec"]["containers"][0].get("imagePullPolicy") == policy


def test_redeploy_keeps_fields_the_client_does_not_know(api: FakeKubeApiServer) -> None:
    """A cluster newer than the kubernetes client serves fields its typed models refuse
    (pydantic `extra_forbidden`): a PUT of the object as read would fail before sending."""
    dep = m.deployment(LAYOUT, Colour.GREEN, V1)
    dep["spec"]["template"]["spec"]["futurePodField"] = {"enabled": True}
    api.seed(dep, "deployments", "apps")
    make(api).deploy(Colour.GREEN, V2)
    after = api.get(*DEPLOYMENT_GREEN)["spec"]["template"]["spec"]
    assert after["futurePodField"] == {"enabled": True}
    assert after["containers"][0]["image"] == V2.image


@pytest.mark.parametrize(
    ("current", "wanted", "patch"),
    [
        pytest.param({"a": 1, "b": 2}, {"a": 1, "b": 3}, {"b": 3}, id="changed-scalar"),
        pytest.param({"a": 1}, {}, {"a": None}, id="removed-key"),
        pytest.param(
            {"m": {"x": 1, "y": 2}}, {"m": {"x": 1, "y": 5}}, {"m": {"y": 5}}, id="nested"
        ),
        pytest.param({"l": [1, 2]}, {"l": [1, 3]}, {"l": [1, 3]}, id="list-sent-whole"),
        pytest.param({"a": 1}, {"a": 1}, {}, id="unchanged"),
    ],
)
def test_merge_patch(
    current: dict[str, Any], wanted: dict[str, Any], patch: dict[str, Any]
) -> None:
    """Only what differs, and always the resourceVersion read (the API server's precondition)."""
    meta = {"name": "d", "resourceVersion": "7"}
    got = m.merge_patch({"metadata": meta, **current}, {"metadata": meta, **wanted})
    assert got == {"metadata": {"resourceVersion": "7"}, **patch}


def test_merge_patch_refuses_an_object_without_its_resource_version() -> None:
    with pytest.raises(RouterError, match="resourceVersion"):
        m.merge_patch({"spec": {"r": 1}}, {"spec": {"r": 2}})


def test_only_a_new_deployment_gets_the_layout_replicas(api: FakeKubeApiServer) -> None:
    router = make(api, layout=m.IstioLayout(namespace="ml", app="diabetes", replicas=3))
    router.deploy(Colour.BLUE, V1)
    assert api.get(*DEPLOYMENT_BLUE)["spec"]["replicas"] == 3
    # an HPA scales it between our read and our write (409, re-read, and its 5 is kept)
    api.before_next_write("deployments", "diabetes-blue", lambda d: d["spec"].update(replicas=5))
    router.deploy(Colour.BLUE, V2)
    assert api.get(*DEPLOYMENT_BLUE)["spec"]["replicas"] == 5


def test_deploying_the_served_release_again_writes_nothing(api: FakeKubeApiServer) -> None:
    router = make(api)
    router.deploy(Colour.GREEN, V1)
    version = api.get(*DEPLOYMENT_GREEN)["metadata"]["resourceVersion"]
    router.deploy(Colour.GREEN, V1)
    assert api.get(*DEPLOYMENT_GREEN)["metadata"]["resourceVersion"] == version


def test_user_routes_survive_every_write_in_place(api: FakeKubeApiServer) -> None:
    vs = m.virtual_service(LAYOUT, Weights.blue_at(0))
    http = vs["spec"]["http"]
    vs["spec"]["http"] = [http[0], http[1], USER_ROUTE, http[2]]
    api.seed(vs, "virtualservices", m.ISTIO_GROUP)
    router = make(api)
    router.deploy(Colour.GREEN, V1)
    router.deploy(Colour.BLUE, V2)
    for blue in (10, 50, 100, 0):
        router.set_weights(Weights.blue_at(blue))
        assert http_routes(api)[2] == USER_ROUTE
    assert [r["name"] for r in http_routes(api)] == [
        "aml-rollout-pin-blue",
        "aml-rollout-pin-green",
        "team-debug",
        "aml-rollout-default",
    ]


_PIN_BLUE, _PIN_GREEN = m.pin_route(Colour.BLUE), m.pin_route(Colour.GREEN)


@pytest.mark.parametrize(
    ("order", "written"),
    [
        pytest.param(
            [m.DEFAULT_ROUTE, _PIN_BLUE, _PIN_GREEN],
            [_PIN_BLUE, _PIN_GREEN, m.DEFAULT_ROUTE],
            id="default-first",
        ),
        pytest.param(
            [USER_ROUTE["name"], m.DEFAULT_ROUTE, _PIN_BLUE, _PIN_GREEN],
            [_PIN_BLUE, _PIN_GREEN, USER_ROUTE["name"], m.DEFAULT_ROUTE],
            id="user-route-stays-between",
        ),
        pytest.param(
            [_PIN_BLUE, m.DEFAULT_ROUTE, _PIN_GREEN],
            [_PIN_GREEN, _PIN_BLUE, m.DEFAULT_ROUTE],
            id="one-pin-below",
        ),
    ],
)
def test_pin_routes_below_our_default_route_are_moved_back_first(
    api: FakeKubeApiServer, order: list[str], written: list[str], caplog: Any
) -> None:
    """Was: a VirtualService whose `aml-rollout-default` sat above the pins (reordered by hand,
    adopted) sent every pinned request by the weights; get_weights and set_weights said nothing
    and never fixed the order. The pins keep what else is set on them (a timeout)."""
    router = both_deployed(api)
    router.set_weights(Weights.blue_at(10))
    vs = api.get(*VS)
    by_name = {r["name"]: r for r in [*vs["spec"]["http"], USER_ROUTE]}
    by_name[_PIN_GREEN]["timeout"] = "30s"
    vs["spec"]["http"] = [by_name[name] for name in order]
    api.seed(vs, "virtualservices", m.ISTIO_GROUP)  # a hand edit
    with caplog.at_level(logging.WARNING, logger="rollout.routers.istio"):
        router.set_weights(Weights.blue_at(10))  # the weights served already: a write anyway
    assert [r["name"] for r in http_routes(api)] == written
    assert f"came after route '{m.DEFAULT_ROUTE}'" in caplog.text
    pins = {r["name"]: r for r in http_routes(api) if r["name"] in (_PIN_BLUE, _PIN_GREEN)}
    wanted = {r["name"]: r for r in m.managed_routes(LAYOUT, Weights.blue_at(10))}
    assert pins == {
        _PIN_BLUE: wanted[_PIN_BLUE],
        _PIN_GREEN: {**wanted[_PIN_GREEN], "timeout": "30s"},
    }
    assert router.get_weights() == Weights.blue_at(10)


def test_settings_of_yours_on_our_routes_survive_every_write(api: FakeKubeApiServer) -> None:
    """A timeout or retries set on our routes (a slow model) are not ours to drop: each weights
    change used to write the route whole, silently back to Istio's defaults. What is ours (the
    match, the destinations and their weights, the mirror) is still written as we want it."""
    vs = m.virtual_service(LAYOUT, Weights.blue_at(0))
    yours = {"timeout": "30s", "retries": {"attempts": 3, "perTryTimeout": "10s"}}
    for route in vs["spec"]["http"]:
        route.update(yours)
    vs["spec"]["http"][-1]["match"] = [{"uri": {"prefix": "/v1"}}]  # ours: it takes everything
    api.seed(vs, "virtualservices", m.ISTIO_GROUP)
    router = make(api)
    router.deploy(Colour.GREEN, V1)
    router.deploy(Colour.BLUE, V2)
    for weights in (Weights.blue_at(0, mirror=5), Weights.blue_at(10), Weights.blue_at(0)):
        router.set_weights(weights)
        assert router.get_weights() == weights
        for route, wanted in zip(http_routes(api), m.managed_routes(LAYOUT, weights), strict=True):
            assert route == {**yours, **wanted}


def test_a_user_made_virtual_service_gets_our_routes_around_theirs(
    api: FakeKubeApiServer,
) -> None:
    vs = m.virtual_service(LAYOUT, Weights.blue_at(0))
    vs["spec"]["http"] = [USER_ROUTE]
    api.seed(vs, "virtualservices", m.ISTIO_GROUP)
    router = make(api)
    router.deploy(Colour.GREEN, V1)
    router.set_weights(Weights.blue_at(0))
    names = [r["name"] for r in http_routes(api)]
    assert names == [
        "aml-rollout-pin-blue",
        "aml-rollout-pin-green",
        "team-debug",
        "aml-rollout-default",
    ]


def test_setting_the_served_weights_writes_nothing(api: FakeKubeApiServer) -> None:
    router = make(api)
    router.deploy(Colour.GREEN, V1)
    router.deploy(Colour.BLUE, V2)
    router.set_weights(Weights.blue_at(20))
    version = api.get(*VS)["metadata"]["resourceVersion"]
    router.set_weights(Weights.blue_at(20))
    assert api.get(*VS)["metadata"]["resourceVersion"] == version


def test_fqdn_hosts_written_by_hand_are_read(api: FakeKubeApiServer) -> None:
    vs = m.virtual_service(LAYOUT, Weights.blue_at(30))
    for dest in vs["spec"]["http"][2]["route"]:
        dest["destination"]["host"] += ".ml.svc.cluster.local"
    api.seed(vs, "virtualservices", m.ISTIO_GROUP)
    assert make(api).get_weights() == Weights.blue_at(30)


def test_deploy_waits_for_available_pods_and_gives_up_at_the_deadline() -> None:
    with FakeKubeApiServer(ready_deployments=False) as api:
        api.seed(m.namespace(LAYOUT), "namespaces")
        clock = [0.0]
        router = make(
            api,
            ready_timeout_s=30,
            poll_s=5,
            monotonic=lambda: clock[0],
            sleep=lambda s: clock.__setitem__(0, clock[0] + s),
        )
        with pytest.raises(
            RouterError,
            match=r"not available after 30 s \(router.ready_timeout_s\), waiting for the dep",
        ):
            router.deploy(Colour.GREEN, V1)
        assert clock[0] == 30


def _rollout(generation: int, replicas: int, updated: int, available: int) -> dict[str, Any]:
    return {
        "observedGeneration": generation,
        "replicas": replicas,
        "updatedReplicas": updated,
        "availableReplicas": available,
    }


_DEADLINE = {
    "type": "Progressing",
    "status": "False",
    "reason": "ProgressDeadlineExceeded",
    "message": 'ReplicaSet "diabetes-blue-7d9" has timed out progressing.',
}


@pytest.mark.parametrize(
    ("statuses", "polls", "error"),
    [
        pytest.param(
            # RollingUpdate, maxSurge 1: the old pod stays available while the new one starts.
            [_rollout(0, 2, 1, 1), _rollout(0, 1, 1, 0), _rollout(0, 1, 1, 1)],
            3, None, id="old-pods-available-do-not-count",
        ),
        pytest.param(
            [_rollout(-1, 1, 1, 1), _rollout(0, 1, 1, 1)],
            2, None, id="new-generation-not-yet-observed",
        ),
        pytest.param(
            [{**_rollout(-1, 1, 1, 1), "conditions": [_DEADLINE]}, _rollout(0, 1, 1, 1)],
            2, None, id="a-stale-deadline-of-the-previous-generation-is-no-failure",
        ),
        pytest.param(
            [{**_rollout(0, 2, 1, 1), "conditions": [_DEADLINE]}],
            1, "exceeded its progress deadline; Progressing=False ProgressDeadlineExceeded: "
            "ReplicaSet .* timed out", id="deadline-fails-fast",
        ),
    ],
)  # fmt: skip
def test_deploy_waits_until_the_rollout_is_complete(
    api: FakeKubeApiServer, statuses: list[dict[str, Any]], polls: int, error: str | None
) -> None:
    clock = [0.0]
    script = iter(statuses)

    def controller_step(seconds: float) -> None:  # the deployment controller between polls
        clock[0] += seconds
        generation = api.get(*DEPLOYMENT_BLUE)["metadata"]["generation"]
        status = dict(next(script))
        status["observedGeneration"] += generation
        api.set_status(*DEPLOYMENT_BLUE, status)

    router = make(api, poll_s=5, monotonic=lambda: clock[0], sleep=controller_step)
    router.deploy(Colour.BLUE, V1)
    api.ready_deployments = False
    if error is None:
        router.deploy(Colour.BLUE, V2)
    else:
        with pytest.raises(DeployFailed, match=error):
            router.deploy(Colour.BLUE, V2)
    assert clock[0] == polls * 5


@pytest.mark.parametrize(
    ("after_write", "error"),
    [
        pytest.param(_DEADLINE, None, id="the-same-condition-is-the-old-rollout-s"),
        pytest.param(
            {**_DEADLINE, "lastUpdateTime": "2026-01-01T10:10:00Z"},
            "exceeded its progress deadline", id="a-deadline-set-since-is-this-rollout-s",
        ),
    ],
)  # fmt: skip
def test_a_progress_deadline_left_from_the_rollout_before_is_no_failure(
    api: FakeKubeApiServer, after_write: dict[str, Any], error: str | None
) -> None:
    """Was DeployFailed at the first poll: a Deployment whose last rollout timed out keeps that
    condition into the next one until the deployment controller sees progress (it does not
    rewrite a condition of the same reason), so a fixed release was failed for the old one's
    deadline. Only a deadline that is not the one read before our write is this rollout's."""
    clock = [0.0]
    stale = {**_DEADLINE, "lastUpdateTime": "2026-01-01T10:00:00Z"}
    after = {
        **after_write,
        "lastUpdateTime": after_write.get("lastUpdateTime", stale["lastUpdateTime"]),
    }
    script = iter([
        {**_rollout(2, 1, 1, 0), "conditions": [after]},  # seen, no pod available yet
        {**_rollout(2, 1, 1, 1), "conditions": [after]},  # complete: it serves
    ])  # fmt: skip

    def controller_step(seconds: float) -> None:
        clock[0] += seconds
        api.set_status(*DEPLOYMENT_BLUE, next(script))

    router = make(api, poll_s=5, monotonic=lambda: clock[0], sleep=controller_step)
    router.deploy(Colour.BLUE, V1)
    api.ready_deployments = False
    api.set_status(*DEPLOYMENT_BLUE, {**_rollout(1, 1, 1, 0), "conditions": [stale]})
    if error is None:
        router.deploy(Colour.BLUE, V2)
        assert clock[0] == 10
    else:
        with pytest.raises(DeployFailed, match=error):
            router.deploy(Colour.BLUE, V2)
        assert clock[0] == 5


def _pod(name: str, colour: str = "blue", **status: Any) -> dict[str, Any]:
    labels = {"app": "diabetes", "version": colour}
    meta = {"name": name, "namespace": "ml", "labels": labels}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": status}


def _scoring(state: dict[str, Any], **more: Any) -> list[dict[str, Any]]:
    return [{"name": "scoring", "ready": False, "state": state, **more}]


PULL = {"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "r/d:2"'}}
CRASH = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting"}}
EXITED = {"terminated": {"exitCode": 1, "reason": "Error"}}
NO_CPU = {
    "type": "PodScheduled",
    "status": "False",
    "reason": "Unschedulable",
    "message": "0/3 nodes are available: 3 Insufficient cpu.",
}
NOT_READY_PODS = [
    _pod("diabetes-blue-1", phase="Pending", containerStatuses=_scoring(PULL)),
    _pod("diabetes-blue-2", phase="Pending", containerStatuses=_scoring(PULL)),
    _pod("diabetes-blue-3", phase="Running", containerStatuses=_scoring(CRASH, lastState=EXITED)),
    _pod("diabetes-blue-4", phase="Pending", conditions=[NO_CPU]),
    _pod("diabetes-blue-5", phase="Running", containerStatuses=_scoring({"running": {}})),
    _pod("diabetes-blue-old", phase="Running", conditions=[{"type": "Ready", "status": "True"}]),
    _pod("diabetes-green-1", "green", phase="Pending", containerStatuses=_scoring(PULL)),
]
NOT_READY_STATUS = {
    "observedGeneration": 1,
    "replicas": 5,
    "updatedReplicas": 5,
    "availableReplicas": 0,
    "conditions": [
        {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"},
        {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable",
         "message": "Deployment does not have minimum availability."},
        {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
         "message": 'pods "diabetes-blue-6" is forbidden: exceeded quota: ml-quota'},
    ],
}  # fmt: skip


def never_ready(
    api: FakeKubeApiServer, clock: list[float], ready_timeout_s: float = 300
) -> IstioRouter:
    """A router on an API server whose blue pods never become ready, with a fake clock."""
    api.ready_deployments = False
    for pod in NOT_READY_PODS:
        api.seed(pod, "pods")

    def poll(seconds: float) -> None:  # the deployment controller reports, between polls
        clock[0] += seconds
        api.set_status(*DEPLOYMENT_BLUE, NOT_READY_STATUS)

    return make(
        api, ready_timeout_s=ready_timeout_s, poll_s=5, monotonic=lambda: clock[0], sleep=poll
    )


def test_a_deployment_that_never_becomes_ready_says_why(api: FakeKubeApiServer) -> None:
    """Was: 'not available after 300 s (waiting for 0 of 5 updated replicas available)' and no
    more; the why was left to `kubectl describe` on every pod."""
    clock = [0.0]
    with pytest.raises(DeployFailed) as failed:
        never_ready(api, clock).deploy(Colour.BLUE, V2)
    assert clock[0] == 300
    assert str(failed.value) == (
        "Deployment ml/diabetes-blue not available after 300 s (router.ready_timeout_s), "
        "waiting for 0 of 5 updated replicas available; Available=False "
        "MinimumReplicasUnavailable: Deployment does not "
        'have minimum availability.; ReplicaFailure=True FailedCreate: pods "diabetes-blue-6" is '
        "forbidden: exceeded quota: ml-quota; pods: container scoring ImagePullBackOff: Back-off "
        'pulling image "r/d:2" (2 pods); container scoring CrashLoopBackOff: '
        "back-off 40s restarting (last exit 1: Error); not scheduled, "
        "Unschedulable: 0/3 nodes are available: 3 Insufficient cpu.; container scoring "
        "running, not ready (its readiness probe fails); "
        "see `kubectl -n ml describe deployment diabetes-blue`"
    )
    assert ("", "pods", "list") in api.verbs_used()


def test_pods_that_cannot_be_read_do_not_hide_why_a_deploy_failed(
    api: FakeKubeApiServer,
) -> None:
    """A Role from before `pods: list` (or one without it) answers 403: the deploy still fails
    with what the Deployment says, and says the pods were not readable."""
    handle = api.handle

    def forbid_pods(method: str, path: str, *args: Any) -> tuple[int, dict[str, Any]]:
        if path.endswith("/pods"):
            raise ApiError(403, "Forbidden", 'pods is forbidden: User "x" cannot list resource')
        return handle(method, path, *args)

    api.handle = forbid_pods  # type: ignore[method-assign]
    with pytest.raises(DeployFailed, match=r"exceeded quota: ml-quota; pods: not readable "
                       r"\(HTTP 403 pods is forbidden: .*\); see `kubectl"):  # fmt: skip
        never_ready(api, [0.0]).deploy(Colour.BLUE, V2)


def _release_pod(
    name: str, release: Release, *containers: dict[str, Any], ready: bool = False, **spec: Any
) -> dict[str, Any]:
    """A blue pod of `release` (its pod template's annotations), with containers' statuses."""
    pod = _pod(
        name,
        phase="Running",
        conditions=[{"type": "Ready", "status": "True" if ready else "False"}],
        containerStatuses=list(containers),
    )
    pod["metadata"]["annotations"] = m.release_annotations(release)
    pod["spec"] = {"restartPolicy": "Always", **spec}
    return pod


def _container(state: dict[str, Any], restarts: int, **more: Any) -> dict[str, Any]:
    return {"name": "scoring", "ready": False, "state": state, "restartCount": restarts, **more}


LOAD_FAILED = {
    "terminated": {
        "exitCode": 3,
        "reason": "Error",
        "message": "model diabetes:2 cannot load: No module named 'xgboost'",
    }
}
CRASH_LOOP = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s restarting"}}
ROLLING = _rollout(0, 2, 1, 0)  # one new pod not available, the old one still there
DONE = _rollout(0, 1, 1, 1)


RUNNING = _container({"running": {}}, 0)


def _looping(restarts: int) -> dict[str, Any]:
    return _container(CRASH_LOOP, restarts, lastState=LOAD_FAILED)


@pytest.mark.parametrize(
    ("polls", "seconds", "error"),
    [
        pytest.param(
            [(ROLLING, [_release_pod("new", V2, _looping(2))])],
            5, r"^Deployment ml/diabetes-blue: pod new of release diabetes:2 will not become ready"
            r" \(container scoring crash-loops, 2 restarts\); .*pods: container scoring "
            r"CrashLoopBackOff: back-off 20s restarting \(last exit 3: Error: model diabetes:2 "
            r"cannot load: No module named 'xgboost'\); see `kubectl",
            id="a-crash-looping-new-pod-fails-at-once",
        ),
        pytest.param(
            [(ROLLING, [_release_pod("new", V2, _looping(1))]),
             (ROLLING, [_release_pod("new", V2, _looping(2))])],
            10, r"crash-loops, 2 restarts", id="one-restart-is-not-yet-a-loop",
        ),
        pytest.param(
            [(ROLLING, [_release_pod("old", V1, _looping(9)), _release_pod("new", V2, RUNNING)]),
             (DONE, [_release_pod("new", V2, RUNNING, ready=True)])],
            10, None, id="an-old-release-s-crash-looping-pod-does-not-count",
        ),
        pytest.param(
            [(ROLLING, [_release_pod("new", V2, {**_looping(1), "state": {"running": {}}},
                                     ready=True)]),
             (DONE, [_release_pod("new", V2, {**RUNNING, "restartCount": 1}, ready=True)])],
            10, None, id="a-pod-that-restarted-once-then-became-ready",
        ),
        pytest.param(
            [(ROLLING, [_release_pod("new", V2, _container(LOAD_FAILED, 0),
                                     restartPolicy="Never")])],
            5, r"pod new of release diabetes:2 will not become ready \(container scoring "
            r"terminated, and restartPolicy Never does not restart it\); .*terminated, exit 3: "
            r"Error: model diabetes:2 cannot load",
            id="a-terminated-container-that-will-not-restart",
        ),
    ],
)  # fmt: skip
def test_new_pods_that_will_not_heal_fail_the_deploy_at_once(
    api: FakeKubeApiServer,
    polls: list[tuple[dict[str, Any], list[dict[str, Any]]]],
    seconds: float,
    error: str | None,
) -> None:
    """Was: a model that cannot load (the image exits 3 at once, CrashLoopBackOff within
    seconds) failed the deploy only after `ready_timeout_s` (300 s), or the progress deadline."""
    clock = [0.0]
    script = iter(polls)
    seeded: list[str] = []

    def kubernetes_between_polls(seconds: float) -> None:
        clock[0] += seconds
        status, pods = next(script)
        while seeded:
            api.delete("pods", seeded.pop(), "ml")
        for pod in pods:
            seeded.append(api.seed(copy.deepcopy(pod), "pods")["metadata"]["name"])
        generation = api.get(*DEPLOYMENT_BLUE)["metadata"]["generation"]
        api.set_status(*DEPLOYMENT_BLUE, {**status, "observedGeneration": generation})

    router = make(api, poll_s=5, monotonic=lambda: clock[0], sleep=kubernetes_between_polls)
    router.deploy(Colour.BLUE, V1)
    api.ready_deployments = False
    if error is None:
        router.deploy(Colour.BLUE, V2)
    else:
        with pytest.raises(DeployFailed, match=error):
            router.deploy(Colour.BLUE, V2)
    assert clock[0] == seconds
    # At most one pods list per poll (the deploy of V1, complete at once, listed none).
    polls_made = sum(r.resource == "deployments" and r.verb == "get" for r in api.requests)
    assert sum(r.resource == "pods" for r in api.requests) <= polls_made - 2


def test_a_complete_deployment_lists_no_pods(api: FakeKubeApiServer) -> None:
    """The pods are read only while waiting: a deploy found complete costs no pods list."""
    make(api).deploy(Colour.BLUE, V1)
    assert ("", "pods", "list") not in api.verbs_used()


def test_a_candidate_that_never_becomes_ready_fails_the_rollout_once(
    api: FakeKubeApiServer, tmp_path: Path
) -> None:
    """A readiness timeout is an answer: was, the controller retried the deploy 3 more times,
    each waiting `ready_timeout_s` again (20 min for the default 300 s, then the same again
    after every restart of the controller's Job). Now the rollout Fails, blue at 0 %."""
    from rollout.config import spec_from_dict
    from rollout.controller import Controller, FakeClock
    from rollout.metrics.static import StaticMetrics
    from rollout.state.memory import MemoryStateStore

    make(api).deploy(Colour.GREEN, V1)
    clock = [0.0]
    router = never_ready(api, clock)
    spec = spec_from_dict({
        "name": "diabetes",
        "router": {"kind": "istio", "namespace": "ml", "app": "diabetes", "api_url": api.url},
        "metrics": {"kind": "static"},
        "steps": [10, 100],
    })  # fmt: skip
    ctl = Controller(
        spec, router, StaticMetrics([]), MemoryStateStore(), clock=FakeClock(1_000.0), candidate=V2
    )
    final = ctl.run(max_ticks=3)
    assert final.phase is Phase.FAILED
    assert "diabetes:2 could not be deployed to blue" in final.reason
    assert "diabetes-blue not available after 300 s" in final.reason
    assert clock[0] == 300  # one wait, not four
    assert router.get_weights() == Weights.blue_at(0)


def test_a_ready_timeout_too_short_is_named_where_the_rollout_fails(
    api: FakeKubeApiServer,
) -> None:
    """Was: 'Deployment ml/diabetes-blue not available after 30 s (waiting for ...)': the
    rollout Failed as if the model were at fault, and nothing said the wait is a setting."""
    from rollout.config import spec_from_dict
    from rollout.controller import Controller, FakeClock
    from rollout.metrics.static import StaticMetrics
    from rollout.state.memory import MemoryStateStore

    make(api).deploy(Colour.GREEN, V1)
    clock = [0.0]
    spec = spec_from_dict({
        "name": "diabetes",
        "router": {"kind": "istio", "namespace": "ml", "app": "diabetes", "api_url": api.url,
                   "ready_timeout_s": 30},
        "metrics": {"kind": "static"},
        "steps": [10, 100],
    })  # fmt: skip
    assert isinstance(spec.router, IstioRouterConfig)
    router = never_ready(api, clock, ready_timeout_s=spec.router.ready_timeout_s)
    ctl = Controller(
        spec, router, StaticMetrics([]), MemoryStateStore(), clock=FakeClock(1_000.0), candidate=V2
    )
    final = ctl.run(max_ticks=3)
    assert final.phase is Phase.FAILED
    assert "diabetes-blue not available after 30 s (router.ready_timeout_s), waiting" in (
        final.reason
    )


@pytest.mark.parametrize(
    ("setup", "call", "message"),
    [
        pytest.param(
            lambda api: None,
            lambda r: r.get_weights(),
            "VirtualService ml/diabetes does not exist",
            id="no-virtual-service",
        ),
        pytest.param(
            lambda api: None,
            lambda r: r.deploy(Colour.GREEN, Release(model="m", version="1")),
            "has no container image",
            id="release-without-image",
        ),
        pytest.param(
            lambda api: api.seed(
                {
                    **m.deployment(LAYOUT, Colour.GREEN, V1),
                    "metadata": {"name": "diabetes-green", "namespace": "ml"},
                },
                "deployments",
                "apps",
            ),
            lambda r: r.release(Colour.GREEN),
            "not deployed by aml-rollout",
            id="foreign-deployment",
        ),
    ],
)
def test_errors_name_the_object(
    api: FakeKubeApiServer, setup: Any, call: Any, message: str
) -> None:
    setup(api)
    with pytest.raises(RouterError, match=message):
        call(make(api))


PROXY_PAGE = b"<html><body><h1>502 Bad Gateway</h1>nginx</body></html>"


@pytest.mark.parametrize(
    ("body", "content_type", "said"),
    [
        pytest.param(PROXY_PAGE, "text/html", "text/html, 55 bytes: '<html><body><h1>502 Bad "
                     "Gateway</h1>nginx</body></html>'): a proxy", id="a-proxy-s-page"),
        pytest.param(b'{"kind": "Deployment", "metadata": {"na', "application/json",
                     "application/json, 39 bytes: '{\"kind\": \"Deployment\"", id="cut-short"),
    ],
)  # fmt: skip
@pytest.mark.parametrize(
    ("resource", "call", "what"),
    [
        pytest.param("deployments", lambda r: r.release(Colour.GREEN),
                     "Deployment ml/diabetes-green", id="release"),
        pytest.param("virtualservices", lambda r: r.get_weights(), "VirtualService ml/diabetes",
                     id="get-weights"),
        pytest.param("services", lambda r: r.set_weights(Weights.blue_at(10)),
                     "Service ml/diabetes-blue", id="set-weights"),
        pytest.param("destinationrules", lambda r: r.deploy(Colour.GREEN, V1),
                     "DestinationRule ml/diabetes-green", id="deploy"),
    ],
)  # fmt: skip
def test_an_answer_that_is_not_json_is_a_router_error_naming_the_object(
    api: FakeKubeApiServer,
    body: bytes,
    content_type: str,
    said: str,
    resource: str,
    call: Any,
    what: str,
) -> None:
    """Was a JSONDecodeError (a traceback) for a Deployment, and for the others an object read
    from a string: an AttributeError, or a Service said to expose no port."""
    router = both_deployed(api)
    api.answer_raw_next(resource, "get", body, content_type=content_type)
    with pytest.raises(RouterError) as caught:
        call(router)
    assert not isinstance(caught.value, RouterRefused)  # a proxy's blip: worth a retry
    message = str(caught.value)
    assert message.startswith(f"{what}: HTTP 200 with no JSON ({said}")
    assert message.endswith(f"[{api.url}]")


@pytest.mark.parametrize(
    ("namespace", "stable", "message"),
    [
        pytest.param(
            False, {"model": "diabetes", "version": "1", "image": "acr.io/diabetes:1"},
            "create Service ml/diabetes-green: HTTP 404 namespaces \"ml\" not found (namespace "
            "'ml' does not exist",
            id="no-namespace",
        ),
        pytest.param(
            True, None,
            "release diabetes:1 has no container image, and the istio router deploys images",
            id="release-without-image",
        ),
    ],
)  # fmt: skip
def test_bootstrap_refused_for_good_says_so_at_once(
    tmp_path: Path, namespace: bool, stable: dict[str, Any] | None, message: str
) -> None:
    """Was: three "retrying in 1/2/4 s" warnings, then "failed 4 times: ...", 7 s later: no
    retry creates the namespace or gives the release an image (RouterRefused)."""
    from typer.testing import CliRunner

    from rollout.cli import app

    with FakeKubeApiServer() as api:
        if namespace:
            api.seed(m.namespace(LAYOUT), "namespaces")
        spec = tmp_path / "rollout.yaml"
        spec.write_text(json.dumps({
            "name": "diabetes",
            "router": {"kind": "istio", "namespace": "ml", "app": "diabetes", "api_url": api.url},
            "metrics": {"kind": "static"},
            "steps": [10, 100],
            "state": {"dir": str(tmp_path / "state")},
            **({"stable": stable} if stable else {}),
        }))  # fmt: skip
        result = CliRunner().invoke(
            app, ["rollout", "bootstrap", str(spec), "--release", "diabetes:1"]
        )
        assert result.exit_code == 2
        assert "retrying" not in result.output
        assert result.output.startswith(f"error: {message}")
        assert len(result.output.strip().splitlines()) == 1
        assert not api.exists(*DEPLOYMENT_GREEN)


def test_a_missing_namespace_is_a_clear_router_error() -> None:
    # RouterRefused: no retry creates the namespace (the controller does not retry it).
    with (
        FakeKubeApiServer() as api,
        pytest.raises(RouterRefused, match=r'HTTP 404 namespaces "ml"'),
    ):
        make(api).deploy(Colour.GREEN, V1)
    with FakeKubeApiServer() as api, pytest.raises(RouterError) as refused:
        make(api).deploy(Colour.GREEN, V1)
    # What to do about it, as the state store says for state.namespace.
    assert "(namespace 'ml' does not exist: create it, e.g. with `aml-rollout manifests`, or " in (
        str(refused.value)
    )


@pytest.mark.parametrize(
    "versions",
    [pytest.param(("v1beta1",), id="istio-before-1.22"), pytest.param(("",), id="no-istio")],
)
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda r: r.get_weights(), id="get_weights"),
        pytest.param(lambda r: r.deploy(Colour.GREEN, V1), id="deploy"),
        pytest.param(lambda r: r.remove(Colour.BLUE), id="remove"),
    ],
)
def test_an_api_server_without_istio_v1_says_so(versions: tuple[str, ...], call: Any) -> None:
    """A 404 for the resource type is not a missing object: without networking.istio.io/v1
    (Istio before 1.22, or none) get_weights said the VirtualService did not exist and to apply
    the manifests, deploy answered 'HTTP 404 the server could not find the requested resource'
    and remove deleted the Deployment without reading the traffic it takes."""
    with FakeKubeApiServer(istio_versions=versions) as api:
        api.seed(m.namespace(LAYOUT), "namespaces")
        api.seed(m.deployment(LAYOUT, Colour.BLUE, V1), "deployments", "apps")
        # RouterRefused: installing Istio is what changes the answer, not asking again.
        with pytest.raises(RouterRefused) as refused:
            call(make(api))
        assert api.exists(*DEPLOYMENT_BLUE[:3], group="apps")
    assert re.fullmatch(
        r"(create |write )?(VirtualService ml/diabetes|Gateway ml/diabetes-gateway|"
        r"DestinationRule ml/diabetes-green): the API "
        r"server at http://\S+ does not serve this resource type \(HTTP 404 naming no object\); "
        r"the router needs networking\.istio\.io/v1, served by Istio 1\.22 or later: is Istio "
        r"installed, and recent enough\? \(`kubectl api-versions \| grep networking\.istio\.io`\)",
        str(refused.value),
    )


def test_the_controller_does_not_retry_an_api_server_without_istio(
    api: FakeKubeApiServer, caplog: Any
) -> None:
    """Istio uninstalled (or never there): one GET of the VirtualService, no pause, and the
    line that says so, not 'failed 4 times' after 1 + 2 + 4 s of asking again."""
    ctl, clock = _controller(api)
    api.istio_versions = ("",)
    handle, asked = api.handle, []

    def recorded(method: str, path: str, *args: Any) -> Any:
        if m.ISTIO_GROUP in path:  # not in api.requests: a path no API serves is not recorded
            asked.append(method)
        return handle(method, path, *args)

    api.handle = recorded  # type: ignore[method-assign]
    with pytest.raises(RouterRefused, match="is Istio installed"):
        ctl.run(max_ticks=5)
    assert clock.now() == 1_000.0
    assert asked == ["GET"]
    assert "retrying" not in caplog.text


def test_an_api_url_that_is_no_api_server_is_not_taken_for_istio_missing() -> None:
    """Any HTTP server that is not an API server: `404 page not found` for every path."""
    with Answering(404, b"404 page not found\n", "text/plain") as url:
        configuration = k8s.Configuration()
        configuration.host = url
        with pytest.raises(RouterRefused) as refused:
            IstioRouter(LAYOUT, k8s.ApiClient(configuration)).deploy(Colour.GREEN, V1)
    assert str(refused.value) == (
        f"Deployment ml/diabetes-green: the API server at {url} does not serve this resource "
        "type (HTTP 404 naming no object); is it a Kubernetes API server? (check router.api_url "
        "or the kubeconfig)"
    )


def refuse_everything(api: FakeKubeApiServer, code: int) -> None:
    """The API server answers every request `code` (401: who are you; 403: not allowed)."""
    reason = {401: "Unauthorized", 403: "Forbidden"}[code]
    message = {401: "Unauthorized", 403: 'User "ann" cannot get resource "configmaps"'}[code]

    def refuse(*_args: Any) -> tuple[int, dict[str, Any]]:
        raise ApiError(code, reason, message)

    api.handle = refuse  # type: ignore[method-assign]


def kubeconfig_for(api: FakeKubeApiServer, tmp_path: Path) -> Path:
    path = tmp_path / "config"
    path.write_text(
        json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "other",
            "clusters": [{"name": "c", "cluster": {"server": api.url}}],
            "users": [{"name": "ann", "user": {"token": "t"}}],
            "contexts": [{"name": "aks-ml", "context": {"cluster": "c", "user": "ann"}}],
        })
    )  # fmt: skip
    return path


@pytest.mark.parametrize("code", [401, 403])
@pytest.mark.parametrize("source", ["api_url", "kubeconfig"])
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda cfg: make_router(IstioRouterConfig(**cfg)).get_weights(), id="router"),
        pytest.param(
            lambda cfg: KubernetesStateStore.from_config(
                KubernetesStateConfig(**cfg), "diabetes"
            ).load(),
            id="state-store",
        ),
    ],
)
def test_a_refusal_names_the_credentials_actually_used(
    api: FakeKubeApiServer, tmp_path: Path, code: int, source: str, call: Any
) -> None:
    """Was: every 401 said 'check the kubeconfig/context' and every 403 'the kubeconfig's
    user, or in a pod its ServiceAccount', also to a spec with api_url, which sends no
    credentials at all."""
    cfg: dict[str, Any] = {"namespace": "ml"}
    if source == "api_url":
        cfg["api_url"] = api.url
        expected = {401: "requests to api_url " + api.url, 403: "api_url " + api.url}[code]
    else:
        cfg.update(kubeconfig=kubeconfig_for(api, tmp_path), context="aks-ml")
        expected = f"kubeconfig {tmp_path / 'config'}, context aks-ml"
    refuse_everything(api, code)
    with pytest.raises((RouterError, StateError)) as refused:
        call(cfg)
    message = str(refused.value)
    assert f"HTTP {code} " in message
    assert expected in message
    if source == "api_url":
        assert "check kubeconfig" not in message and "user of kubeconfig" not in message


@pytest.mark.parametrize(
    ("credentials", "code", "expected"),
    [
        pytest.param(
            kubeapi.Credentials("in_cluster"), 401,
            "the pod's ServiceAccount token (in_cluster) was refused", id="in-cluster-401",
        ),
        pytest.param(
            kubeapi.Credentials("in_cluster"), 403,
            "the pod's ServiceAccount (in_cluster) needs the Role", id="in-cluster-403",
        ),
        pytest.param(None, 403, "the identity this runs as needs the Role", id="unknown-403"),
        pytest.param(kubeapi.Credentials("in_cluster"), 500, "", id="no-hint-for-a-500"),
    ],
)  # fmt: skip
def test_the_hint_for_each_source_of_credentials(
    credentials: kubeapi.Credentials | None, code: int, expected: str
) -> None:
    exc = k8s.ApiException(status=code, reason="x")
    described = kubeapi.describe(exc, credentials)
    assert expected in described
    assert described.endswith(")") is bool(expected)


def test_the_credentials_follow_the_rule_api_client_uses(monkeypatch: Any) -> None:
    monkeypatch.setenv("KUBECONFIG", "/etc/kube/ci.yaml")
    assert kubeapi.Credentials.of(KubeApiConfig(api_url="http://p:8001", in_cluster=True)) == (
        kubeapi.Credentials("api_url", "http://p:8001")
    )
    assert kubeapi.Credentials.of(KubeApiConfig(in_cluster=True)).source == "in_cluster"
    assert kubeapi.Credentials.of(KubeApiConfig()).detail == (
        "kubeconfig /etc/kube/ci.yaml, its current context"
    )


def test_a_spec_without_in_cluster_in_a_pod_is_told_to_set_it(
    monkeypatch: Any, tmp_path: Path
) -> None:
    """A controller Job whose spec forgot `in_cluster: true` found no kubeconfig and said only
    'Invalid kube-config file. No configuration found.'"""
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match=r"runs in a pod: `router.in_cluster: true` uses its"):
        make_router(IstioRouterConfig(namespace="ml"))
    with pytest.raises(ConfigError, match=r"`state.in_cluster: true`"):
        KubernetesStateStore.from_config(KubernetesStateConfig(namespace="ml"), "diabetes")


@pytest.mark.parametrize(
    ("fields", "environ", "message"),
    [
        pytest.param(
            {"kubeconfig": "{tmp}/kc.yaml"}, {},
            "router: cannot load Kubernetes credentials: `router.kubeconfig`: no file "
            "{tmp}/kc.yaml",
            id="kubeconfig-not-there",
        ),
        pytest.param(
            {}, {},
            "no kubeconfig (~/.kube/config does not exist): set `router.kubeconfig`, "
            "`router.api_url` or `router.in_cluster`",
            id="no-default-kubeconfig",
        ),
        pytest.param(
            {}, {"KUBECONFIG": "{tmp}/a"},
            "no kubeconfig ({tmp}/a does not exist)",
            id="KUBECONFIG-not-there",
        ),
        pytest.param(
            {"kubeconfig": "{tmp}/config", "context": "aks-prod"}, {},
            "`router.context`: no context 'aks-prod' in {tmp}/config (it has aks-dev)",
            id="context-not-in-the-kubeconfig",
        ),
        pytest.param(
            {"in_cluster": True}, {},
            "`router.in_cluster: true`, but this does not run in a pod "
            "(no KUBERNETES_SERVICE_HOST)",
            id="in-cluster-on-a-laptop",
        ),
    ],
)  # fmt: skip
def test_unloadable_credentials_say_what_is_missing(
    monkeypatch: Any, tmp_path: Path, fields: dict[str, Any], environ: dict[str, str], message: str
) -> None:
    """Was: "Invalid kube-config file. No configuration found." for a kubeconfig path with a
    typo, or none at all, and "Service host/port is not set." for in_cluster off a cluster."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    for key, value in environ.items():
        monkeypatch.setenv(key, value.format(tmp=tmp_path))
    (tmp_path / "config").write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: aks-dev\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: aks-dev, context: {cluster: c, user: u}}]\n"
    )
    cfg = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in fields.items()}
    with pytest.raises(ConfigError) as refused:
        make_router(IstioRouterConfig(namespace="ml", **cfg))
    assert message.format(tmp=tmp_path) in str(refused.value)


@pytest.mark.parametrize(
    ("text", "kubeconfig"),
    [
        pytest.param("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln\n", True, id="a-token-file"),
        pytest.param("apiVersion: v1\nclusters: [\n", True, id="truncated-yaml"),
        pytest.param("clusters: 5\ncurrent-context: x\n", True, id="clusters-a-number"),
        pytest.param("apiVersion: v1\nclusters: [\n", False, id="KUBECONFIG-truncated"),
    ],
)
def test_a_file_that_is_no_kubeconfig_is_one_line_naming_it(
    monkeypatch: Any, tmp_path: Path, text: str, kubeconfig: bool
) -> None:
    """Was a traceback (TypeError, yaml's ParserError), exit 1: the client parses the file with
    no check of its shape."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "kc").write_text(text)
    fields, where = {"kubeconfig": str(tmp_path / "kc")}, "`router.kubeconfig`"
    if not kubeconfig:
        fields = {}
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kc"))
    with pytest.raises(ConfigError) as refused:
        make_router(IstioRouterConfig(namespace="ml", **fields))
    said = str(refused.value)
    assert said.startswith("router: cannot load Kubernetes credentials: ")
    assert f"{tmp_path / 'kc'} is not a kubeconfig (" in said and "\n" not in said
    assert where in said or not kubeconfig
    with pytest.raises(ConfigError, match=r"^state: cannot load Kubernetes credentials"):
        KubernetesStateStore.from_config(
            KubernetesStateConfig(namespace="ml", **fields), "diabetes"
        )


_REASONS = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 409: "Conflict", 422: "Invalid",
    429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
}  # fmt: skip


def answer_writes_of(api: FakeKubeApiServer, resource: str, code: int) -> list[str]:
    """Every later write (POST, PUT, PATCH) to `resource` is answered `code`; the returned list
    records each such request (the fake's own log sees none of them)."""
    handle, seen = api.handle, []

    def answer(method: str, path: str, *args: Any) -> tuple[int, dict[str, Any]]:
        if method in ("POST", "PUT", "PATCH") and f"/{resource}" in path:
            seen.append(method)
            raise ApiError(code, _REASONS[code], f"injected {code} on {method} {path}")
        return handle(method, path, *args)

    api.handle = answer  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize(
    ("code", "refused", "hint"),
    [
        pytest.param(401, True, "credentials rejected", id="401-credentials"),
        pytest.param(403, True, "forbidden: the identity this runs as needs the Role", id="403"),
        pytest.param(400, True, "refused as invalid, and sent again it would be again", id="400"),
        pytest.param(422, True, "refused as invalid, and sent again it would be again", id="422"),
        pytest.param(409, False, "still conflicting after 5 attempts", id="409-retried"),
        pytest.param(429, False, "HTTP 429", id="429-retried"),
        pytest.param(500, False, "HTTP 500", id="500-retried"),
        pytest.param(503, False, "HTTP 503", id="503-retried"),
    ],
)
@pytest.mark.parametrize(
    ("resource", "call"),
    [
        pytest.param("virtualservices", lambda r: r.set_weights(Weights.blue_at(10)), id="weights"),
        pytest.param("deployments", lambda r: r.deploy(Colour.BLUE, V1), id="deploy"),
    ],
)
def test_answers_no_retry_changes_are_refusals(
    api: FakeKubeApiServer, code: int, refused: bool, hint: str, resource: str, call: Any
) -> None:
    """Was: every answer but a 404 from a POST was a plain RouterError, so the controller sent a
    write the API server had refused for credentials, RBAC or validity 3 more times, 7 s."""
    router = make(api)
    router.deploy(Colour.GREEN, V1)
    router.deploy(Colour.BLUE, V2)
    router.set_weights(Weights.blue_at(0))
    answer_writes_of(api, resource, code)
    with pytest.raises(RouterError, match=re.escape(hint)) as caught:
        call(router)
    assert isinstance(caught.value, RouterRefused) is refused
    assert "\n" not in str(caught.value)


def test_traffic_to_a_deployment_that_is_gone_is_refused(api: FakeKubeApiServer) -> None:
    router = make(api)
    router.deploy(Colour.GREEN, V1)
    router.deploy(Colour.BLUE, V2)
    router.set_weights(Weights.blue_at(10))
    api.delete(*DEPLOYMENT_GREEN)
    with pytest.raises(RouterRefused) as caught:  # a rollback toward a green that is gone
        router.set_weights(Weights.blue_at(0))
    assert str(caught.value).startswith(
        "cannot send 100 % to green: Deployment ml/diabetes-green does not exist (deleted, or "
        "never deployed: no retry brings it back; "
    )
    assert router.get_weights() == Weights.blue_at(10)


@pytest.mark.parametrize(
    ("deleted", "weights", "sending"),
    [
        pytest.param("diabetes-blue", Weights.blue_at(50), "send 50 % to blue", id="step-up"),
        pytest.param("diabetes-green", Weights.blue_at(0), "send 100 % to green", id="rollback"),
        pytest.param(
            "diabetes-blue", Weights.blue_at(0, mirror=5), "mirror 5 % to blue", id="shadow"
        ),
    ],
)
def test_traffic_to_a_service_that_is_gone_is_refused_before_any_write(
    api: FakeKubeApiServer, deleted: str, weights: Weights, sending: str
) -> None:
    # Was written: Istio answers 503 for the share sent to a host no Service backs, and the
    # judge charged those to the model.
    router = make(api)
    router.deploy(Colour.GREEN, V1)
    router.deploy(Colour.BLUE, V2)
    router.set_weights(Weights.blue_at(10))
    api.delete("services", deleted, "ml")
    with pytest.raises(RouterRefused) as caught:
        router.set_weights(weights)
    assert str(caught.value).startswith(
        f"cannot {sending}: Service ml/{deleted} does not exist: Istio would answer 503"
    )
    assert router.get_weights() == Weights.blue_at(10)


def test_a_colour_that_takes_no_traffic_needs_no_service(api: FakeKubeApiServer) -> None:
    router = make(api)
    router.deploy(Colour.GREEN, V1)
    router.deploy(Colour.BLUE, V2)
    router.set_weights(Weights.blue_at(10))
    api.delete("services", "diabetes-blue", "ml")
    router.set_weights(Weights.blue_at(0))  # the rollback away from it is never refused
    assert router.get_weights() == Weights.blue_at(0)


def _controller(api: FakeKubeApiServer, **router: Any) -> tuple[Any, Any]:
    """A controller rolling V2 out over green V1 on `api`, with a fake clock at 1000 s; `router`
    are the IstioRouter's keyword arguments."""
    from rollout.config import spec_from_dict
    from rollout.controller import Controller, FakeClock
    from rollout.metrics.static import StaticMetrics
    from rollout.state.memory import MemoryStateStore

    router = make(api, **router)
    router.deploy(Colour.GREEN, V1)
    router.set_weights(Weights.blue_at(0))
    spec = spec_from_dict({
        "name": "diabetes",
        "router": {"kind": "istio", "namespace": "ml", "app": "diabetes", "api_url": api.url},
        "metrics": {"kind": "static"},
        "steps": [10, 100],
    })  # fmt: skip
    clock = FakeClock(1_000.0)
    store = MemoryStateStore()
    return Controller(spec, router, StaticMetrics([]), store, clock=clock, candidate=V2), clock


def test_a_slow_answer_to_a_runs_first_deploy_is_retried(api: FakeKubeApiServer) -> None:
    """Was: RouterUnavailable ("no answer from the Kubernetes API ... within 10 s (reached, but
    slow ...)"), which the controller raises at once on a deploy before the router ever
    answered it (a spec pointing at no API server): one slow admission webhook on blue's
    Deployment failed the whole `run`, though the write landed and docs/kubernetes.md says a
    timeout is retried."""
    ctl, clock = _controller(api, request_timeout_s=0.1)
    handle, slow = api.handle, [True]

    def webhook_taking_its_time(method: str, path: str, *args: Any) -> Any:
        if method == "POST" and path.endswith("/deployments") and slow:
            slow.clear()
            time.sleep(0.3)  # then the write is made, the client long gone
        return handle(method, path, *args)

    api.handle = webhook_taking_its_time  # type: ignore[method-assign]
    ctl.run(max_ticks=1)
    assert not slow  # the slow answer happened
    assert clock.now() >= 1_001.0  # the controller paused and deployed again
    assert identity(make(api).release(Colour.BLUE)) == identity(V2)


@pytest.mark.parametrize(
    ("code", "writes", "paused"),
    [
        pytest.param(403, 1, 0, id="403-once"),
        pytest.param(401, 1, 0, id="401-once"),
        pytest.param(422, 1, 0, id="422-once"),
        pytest.param(503, 4, 1 + 2 + 4, id="503-four-times"),
    ],
)
def test_the_controller_sends_a_refused_weight_change_once(
    api: FakeKubeApiServer, code: int, writes: int, paused: float, caplog: Any
) -> None:
    """At the wire: the fake API server sees one PATCH of the VirtualService, not four, and the
    controller pauses 0 s, not 1 + 2 + 4."""
    ctl, clock = _controller(api)
    seen = answer_writes_of(api, "virtualservices", code)
    with pytest.raises(RouterError) as caught:
        ctl.run(max_ticks=5)
    assert seen == ["PATCH"] * writes
    assert clock.now() == 1_000.0 + paused
    assert isinstance(caught.value, RouterRefused) is (writes == 1)
    assert ("retrying" in caplog.text) is (writes > 1)


def test_the_controller_does_not_retry_traffic_to_a_deployment_that_is_gone(
    api: FakeKubeApiServer,
) -> None:
    ctl, clock = _controller(api)
    handle, before = api.handle, len(api.requests)

    def green_deleted_with_blue_created(method: str, path: str, *args: Any) -> Any:
        answered = handle(method, path, *args)
        if method == "POST" and path.endswith("/deployments"):  # blue, by the controller
            api.delete(*DEPLOYMENT_GREEN)
        return answered

    api.handle = green_deleted_with_blue_created  # type: ignore[method-assign]
    with pytest.raises(RouterRefused, match="Deployment ml/diabetes-green does not exist"):
        ctl.run(max_ticks=5)
    assert clock.now() == 1_000.0  # no pause
    after = api.requests[before:]
    green = [r.status for r in after if r.resource == "deployments" and r.name == "diabetes-green"]
    assert green.count(404) == 1  # asked once, not four times
    assert not [r for r in after if r.resource == "virtualservices" and r.verb == "patch"]


def test_an_unreachable_api_server_is_a_router_error_with_its_url() -> None:
    with FakeKubeApiServer() as api:
        url = api.url
    configuration = k8s.Configuration()
    configuration.host = url
    configuration.retries = 0
    router = IstioRouter(LAYOUT, k8s.ApiClient(configuration))
    # RouterUnavailable (errors.py: nothing answers at the router's control plane), as the envoy
    # router: the controller fails a first deploy at once instead of retrying a dead URL.
    with pytest.raises(RouterUnavailable, match="cannot reach the Kubernetes API at " + url):
        router.get_weights()
    with pytest.raises(RouterUnavailable, match="cannot reach the Kubernetes API at " + url) as e:
        router.deploy(Colour.GREEN, V1)
    # urllib3's reason, without its "Max retries exceeded with url: ... (Caused by ...)".
    assert str(e.value).endswith(f"{url}: Failed to establish a new connection: [Errno 111] "
                                 "Connection refused")  # fmt: skip


def _weights_too_late(api: FakeKubeApiServer) -> None:
    both_deployed(api)
    make(api, request_timeout_s=0.1).set_weights(Weights.blue_at(10))


def _status_too_late(api: FakeKubeApiServer) -> None:
    cfg = KubernetesStateConfig(namespace="ml", api_url=api.url)
    objects = StateObjects(namespace="ml", rollout="diabetes")
    client = kubeapi.api_client(cfg, "state")
    # Held by no controller, a save is tried for CLI_OUTAGE_S (outage_s binds a lease holder
    # only): a minute of real pauses, in no time on a clock its sleep advances.
    instant = InstantTime()
    store = KubernetesStateStore(
        objects, client, request_timeout_s=0.1, monotonic=instant.monotonic, sleep=instant.sleep
    )
    store.save(Status(name="diabetes", phase=Phase.PROGRESSING))


@pytest.mark.parametrize(
    ("resource", "verb", "call", "error"),
    [
        pytest.param("virtualservices", "patch", _weights_too_late, RouterError, id="router"),
        pytest.param("configmaps", "create", _status_too_late, StateError, id="state-store"),
    ],
)
def test_an_api_server_that_answers_too_late_is_not_said_unreachable(
    api: FakeKubeApiServer, resource: str, verb: str, call: Any, error: type[Exception]
) -> None:
    """Was: "cannot reach the Kubernetes API at ...: Read timed out. (read timeout=0.0999...)"
    for an API server that was reached and is slow (overloaded, or waiting on an admission
    webhook: Istio's validation is one). Nor is it RouterUnavailable, which fails a run's first
    deploy at once: it is there, and the controller retries."""
    api.delay(resource, verb, 0.5)
    with pytest.raises(error) as late:
        call(api)
    assert f"no answer from the Kubernetes API at {api.url} within 0.1 s" in str(late.value)
    assert "cannot reach" not in str(late.value)
    assert not isinstance(late.value, RouterUnavailable)


@pytest.mark.parametrize(
    ("resource", "verb", "call"),
    [
        pytest.param("deployments", "get", lambda r: r.release(Colour.BLUE), id="release"),
        pytest.param(
            "deployments", "get", lambda r: r.set_weights(Weights.blue_at(0)), id="rollback"
        ),
        pytest.param("deployments", "get", lambda r: r.deploy(Colour.BLUE, V1), id="deploy"),
        pytest.param("virtualservices", "get", lambda r: r.get_weights(), id="get-weights"),
    ],
)
def test_an_answer_broken_off_mid_body_is_a_router_error_the_controller_retries(
    api: FakeKubeApiServer, resource: str, verb: str, call: Any
) -> None:
    """Was: urllib3's ProtocolError from reading a Deployment's body (`_preload_content=False`)
    outside the try that maps urllib3's errors: the controller's retry, a rollback's included,
    never ran, and it died with a traceback (exit 1). Then RouterUnavailable, which fails a
    run's first deploy at once, though the API server was there and answered."""
    router = both_deployed(api)
    api.cut_off(resource, verb)
    with pytest.raises(RouterError) as broken:
        call(router)
    assert not isinstance(broken.value, RouterUnavailable)
    assert f"the answer of the Kubernetes API at {api.url} broke off: " in str(broken.value)
    assert "IncompleteRead(" in str(broken.value)


def _as_urllib3_raises(reason: Exception) -> Exception:
    """What the client raises after its retries (configuration.retries): the last failure."""
    return MaxRetryError(None, "/api/v1/namespaces/ml/configmaps/x", reason)  # type: ignore[arg-type]


_CONN = HTTPConnection("10.0.0.1", 443)


@pytest.mark.parametrize(
    ("exc", "said"),
    [
        # A private cluster's API server from outside its network: packets dropped, not refused
        # (urllib3 raises ConnectTimeoutError(conn, message), whose str is a tuple's repr).
        pytest.param(
            _as_urllib3_raises(ConnectTimeoutError(
                _CONN, "Connection to 10.0.0.1 timed out. (connect timeout=9.999871)"
            )),
            "cannot reach the Kubernetes API at https://10.0.0.1: Connection to 10.0.0.1 timed "
            "out. (connect timeout=10)",
            id="connect-timeout",
        ),
        pytest.param(
            _as_urllib3_raises(NewConnectionError(
                _CONN, "Failed to establish a new connection: [Errno 111] Connection refused"
            )),
            "cannot reach the Kubernetes API at https://10.0.0.1: Failed to establish a new "
            "connection: [Errno 111] Connection refused",
            id="refused",
        ),
        pytest.param(
            ReadTimeoutError(None, "/x", "Read timed out. (read timeout=9.99967)"),  # type: ignore[arg-type]
            "no answer from the Kubernetes API at https://10.0.0.1 within 10 s (reached, but "
            "slow: overloaded, or waiting on an admission webhook)",
            id="read-timeout",
        ),
        pytest.param(  # as urllib3 raises it from reading a body the server cut short
            ProtocolError(
                "Connection broken: IncompleteRead(42 bytes read, 458 more expected)",
                IncompleteRead(b"x" * 42, 458),
            ),
            "the answer of the Kubernetes API at https://10.0.0.1 broke off: IncompleteRead(42 "
            "bytes read, 458 more expected)",
            id="broken-off-mid-body",
        ),
        pytest.param(  # before any answer: the server closed the connection on the request
            ProtocolError(
                "Connection aborted.",
                RemoteDisconnected("Remote end closed connection without response"),
            ),
            "cannot reach the Kubernetes API at https://10.0.0.1: ('Connection aborted.', "
            "RemoteDisconnected('Remote end closed connection without response'))",
            id="aborted",
        ),
    ],
)  # fmt: skip
def test_no_answer_says_why_in_words(exc: Exception, said: str) -> None:
    assert kubeapi.no_answer(exc, "https://10.0.0.1") == said


def _slow(api: FakeKubeApiServer) -> None:
    api.delay("virtualservices", "get", 0.3)


def _retry_after(code: int) -> Any:
    def answer(api: FakeKubeApiServer) -> None:
        handle = api.handle

        def busy(method: str, path: str, *args: Any) -> tuple[int, dict[str, Any]]:
            if method == "GET" and "/virtualservices/" in path:
                raise ApiError(
                    code, _REASONS[code], "try again later", headers={"Retry-After": "0"}
                )
            return handle(method, path, *args)

        api.handle = busy  # type: ignore[method-assign]

    return answer


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        pytest.param(_slow, "within 0.1 s", id="read-timeout"),
        pytest.param(_retry_after(429), "HTTP 429", id="429-retry-after"),
        pytest.param(_retry_after(503), "HTTP 503", id="503-retry-after"),
    ],
)
def test_the_client_sends_a_request_the_api_server_took_once(
    api: FakeKubeApiServer, fault: Any, error: str
) -> None:
    """Was (`configuration.retries = 2`): urllib3 sent a timed-out GET twice more (a GET
    answered after 12 s raised after 30 s, saying "within 10 s"), and slept a 429's or 503's
    Retry-After before each retry, uncapped (300 s: 10 minutes inside one get_weights). The
    caller's own retry decides when to ask again."""
    both_deployed(api)
    client = kubeapi.api_client(KubeApiConfig(api_url=api.url), "router")
    router = IstioRouter(LAYOUT, client, request_timeout_s=0.1)
    fault(api)
    handle, sent = api.handle, []

    def count(method: str, path: str, *args: Any) -> tuple[int, dict[str, Any]]:
        if method == "GET" and "/virtualservices/" in path:
            sent.append(path)  # on arrival: a slow answer is recorded by the fake only after
        return handle(method, path, *args)

    api.handle = count  # type: ignore[method-assign]
    with pytest.raises(RouterError, match=error):
        router.get_weights()
    assert len(sent) == 1


@pytest.mark.parametrize(
    ("method", "error", "retried"),
    [
        pytest.param(
            "GET",
            ProtocolError("Connection aborted.", RemoteDisconnected("closed without response")),
            True,
            id="pooled-connection-closed",
        ),
        pytest.param("GET", NewConnectionError(_CONN, "Connection refused"), True, id="refused"),
        pytest.param(
            "GET",
            ConnectTimeoutError(_CONN, "timed out"),
            False,
            id="connect-timeout",  # was 3 x the timeout: 30 s for the router's 10 s
        ),
        pytest.param(
            "GET",
            ReadTimeoutError(None, "/x", "Read timed out."),
            False,
            id="read-timeout",  # type: ignore[arg-type]
        ),
        pytest.param(
            "PUT",
            ReadTimeoutError(None, "/x", "Read timed out."),
            False,
            id="put-read-timeout",  # type: ignore[arg-type]
        ),
    ],
)
def test_the_client_retries_only_a_request_nothing_answered(
    method: str, error: Exception, retried: bool
) -> None:
    retries = kubeapi.api_client(KubeApiConfig(api_url="http://127.0.0.1:9"), "router")
    policy = retries.configuration.retries
    assert isinstance(policy, kubeapi.Retries)
    if retried:
        assert policy.increment(method, "/x", error=error).total == 1
    else:
        with pytest.raises(type(error)):
            policy.increment(method, "/x", error=error)


def test_run_against_a_dead_api_server_says_so_in_one_line(tmp_path: Path) -> None:
    """Was: two urllib3 warnings of its retries before the error line."""
    import subprocess
    import sys

    with FakeKubeApiServer() as gone:
        url = gone.url
    spec = tmp_path / "rollout.yaml"
    spec.write_text(json.dumps({
        "name": "diabetes",
        "router": {"kind": "istio", "namespace": "ml", "app": "diabetes", "api_url": url},
        "state": {"dir": str(tmp_path / "state")},
        "candidate": dataclasses.asdict(V2),
    }))  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "rollout.cli", "rollout", "run", str(spec)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: Deployment ml/diabetes-green: cannot reach the Kubernetes API at {url}: Failed "
        "to establish a new connection: [Errno 111] Connection refused"
    ]


class LeaseLost:
    """A fence (the controller's lease check) that passes `allowed` times, then raises."""

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls > self.allowed:
            raise StateError("lost the lease of rollout 'x': another controller may drive it")


@pytest.mark.parametrize(
    ("blue", "call"),
    [
        pytest.param(10, lambda r: r.set_weights(Weights.blue_at(50)), id="set-weights"),
        pytest.param(10, lambda r: r.deploy(Colour.BLUE, V1), id="redeploy"),
        pytest.param(0, lambda r: r.remove(Colour.BLUE), id="remove"),
    ],
)
def test_a_lost_lease_stops_the_writes_inside_an_action(
    api: FakeKubeApiServer, blue: int, call: Any
) -> None:
    """The controller checks its lease before each action; on a slow API server an action
    (reads, then a write) can outlast the lease, so the router checks it before each write too.
    Was: the write went out after the lease was lost, over the next controller's."""
    router = both_deployed(api)
    router.set_weights(Weights.blue_at(blue))
    before = (api.get(*VS), api.get("deployments", "diabetes-blue", "ml", "apps"))
    fence = LeaseLost(allowed=0)
    router.fence = fence
    with pytest.raises(StateError, match="lost the lease"):
        call(router)
    assert fence.calls == 1  # checked right before the write, which never went out
    assert (api.get(*VS), api.get("deployments", "diabetes-blue", "ml", "apps")) == before


def test_pods_know_their_colour_even_when_serving_the_other_release(
    api: FakeKubeApiServer,
) -> None:
    # Blue_Green: green's pods run blue's release; their metrics must still say green.
    router = make(api)
    router.deploy(Colour.GREEN, V2)
    container = api.get("deployments", "diabetes-green", "ml", "apps")["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert {"name": "AML_ROLLOUT_COLOUR", "value": "green"} in container["env"]


@pytest.mark.parametrize(
    ("canary_error_rate", "phase", "green", "blue"),
    [
        pytest.param(0.01, Phase.SUCCEEDED, V2, None, id="healthy-candidate-promoted"),
        pytest.param(0.2, Phase.ROLLED_BACK, V1, V2, id="faulty-candidate-rolled-back"),
    ],
)
def test_the_engine_drives_istio_end_to_end(
    api: FakeKubeApiServer,
    tmp_path: Path,
    canary_error_rate: float,
    phase: Phase,
    green: Release,
    blue: Release | None,
) -> None:
    from rollout.api import run_rollout
    from rollout.config import spec_from_dict
    from rollout.controller import FakeClock

    make(api).deploy(Colour.GREEN, V1)  # production, as `aml-rollout manifests` would leave it
    spec = spec_from_dict({
        "name": "diabetes",
        "router": {"kind": "istio", "namespace": "ml", "app": "diabetes", "api_url": api.url},
        "metrics": {"kind": "simulated", "seed": 3, "rps": 500,
                    "baseline": {"error_rate": 0.01}, "canary": {"error_rate": canary_error_rate}},
        "steps": [10, 50, 100],
        "analysis": {"interval_s": 10, "min_requests": 50, "latency": {"enabled": False}},
        "state": {"dir": str(tmp_path / "state")},
    })  # fmt: skip
    result = run_rollout(spec, candidate=V2, clock=FakeClock(1_000.0))

    assert result.phase is phase, result.reason
    router = make(api)
    assert router.get_weights() == Weights.blue_at(0)
    assert identity(router.release(Colour.GREEN)) == identity(green)
    assert identity(router.release(Colour.BLUE)) == identity(blue)
    weights_written = [r for r in api.requests if r.verb == "patch" and r.status == 200]
    assert len(weights_written) >= 2  # it really moved traffic through the VirtualService


def _cli_spec(api: FakeKubeApiServer, tmp_path: Path, candidate: dict[str, Any]) -> Path:
    spec = tmp_path / "rollout.yaml"
    spec.write_text(json.dumps({
        "name": "diabetes",
        "router": {"kind": "istio", "namespace": "ml", "app": "diabetes", "api_url": api.url},
        "metrics": {"kind": "simulated", "seed": 3, "rps": 500,
                    "baseline": {"error_rate": 0.01}, "canary": {"error_rate": 0.01}},
        "steps": [10, 100],
        "analysis": {"interval_s": 10, "min_requests": 50, "latency": {"enabled": False}},
        "state": {"dir": str(tmp_path / "state")},
        "candidate": candidate,
    }))  # fmt: skip
    return spec


def test_run_candidate_takes_the_image_of_the_spec_candidate_it_names(
    api: FakeKubeApiServer, tmp_path: Path
) -> None:
    """docs/kubernetes.md's Job runs `rollout run SPEC --candidate diabetes:2`: was, the option
    replaced the spec's candidate by one without its image, which the router cannot deploy."""
    from typer.testing import CliRunner

    from rollout.cli import app

    make(api).deploy(Colour.GREEN, V1)
    spec = _cli_spec(api, tmp_path, dataclasses.asdict(V2))
    args = ["rollout", "run", str(spec), "--candidate", V2.ref, "--simulated-time", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    green = api.get("deployments", "diabetes-green", "ml", "apps")
    assert m.scoring_container(green)["image"] == V2.image  # type: ignore[index]


def test_an_empty_green_names_the_namespace_it_looked_in(
    api: FakeKubeApiServer, tmp_path: Path
) -> None:
    """A spec with a namespace typo read only "green serves nothing"."""
    from typer.testing import CliRunner

    from rollout.cli import app

    spec = _cli_spec(api, tmp_path, dataclasses.asdict(V2))
    spec.write_text(spec.read_text().replace('"namespace": "ml"', '"namespace": "ml-prod"'))
    result = CliRunner().invoke(app, ["rollout", "run", str(spec), "--simulated-time"])
    assert result.exit_code == 2
    assert "green serves nothing on istio ml-prod/diabetes:" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("candidate", "option", "where"),
    [
        pytest.param({"model": "diabetes", "version": "2"}, [], "candidate", id="spec"),
        pytest.param(dataclasses.asdict(V2), ["--candidate", "diabetes:3"], "--candidate",
                     id="option-naming-another-release"),
    ],
)  # fmt: skip
def test_run_refuses_a_candidate_without_image_before_starting(
    api: FakeKubeApiServer, tmp_path: Path, candidate: dict[str, Any], option: list[str], where: str
) -> None:
    """Was: retried 4 times, then stored the rollout with that candidate, so that every later
    `run` (the spec fixed) resumed it and failed the same way."""
    from typer.testing import CliRunner

    from rollout.cli import app

    make(api).deploy(Colour.GREEN, V1)
    spec = _cli_spec(api, tmp_path, candidate)
    result = CliRunner().invoke(app, ["rollout", "run", str(spec), *option, "--simulated-time"])
    assert result.exit_code == 2
    assert f"{where}: diabetes:" in result.output
    assert "names no container image, and the istio router deploys images" in result.output
    assert not (tmp_path / "state" / "diabetes.status.json").exists()
    assert not api.exists("deployments", "diabetes-blue", "ml", "apps")


def test_the_api_refuses_a_candidate_without_image_before_storing_anything(
    api: FakeKubeApiServer, tmp_path: Path
) -> None:
    """Was: `run_rollout` skipped the CLI's check, stored a Progressing rollout with that
    candidate and raised the router's refusal at its deploy, the same at every resume."""
    from rollout.api import open_store, run_rollout
    from rollout.controller import FakeClock
    from rollout.errors import ConfigError

    make(api).deploy(Colour.GREEN, V1)
    spec = _cli_spec(api, tmp_path, dataclasses.asdict(V2))
    with pytest.raises(ConfigError, match="candidate: diabetes:3 names no container image"):
        run_rollout(spec, candidate=Release("diabetes", "3"), clock=FakeClock(0.0))
    assert open_store(spec).load() is None
    assert not (tmp_path / "state" / "diabetes.ledger.jsonl").exists()
    assert not api.exists("deployments", "diabetes-blue", "ml", "apps")


def _user(name: str, *match: dict[str, Any]) -> dict[str, Any]:
    route: dict[str, Any] = {"name": name, "route": [{"destination": {"host": "legacy"}}]}
    if match:
        route["match"] = list(match)
    return route


@pytest.mark.parametrize(
    ("user_route", "shadows"),
    [
        pytest.param(_user("legacy"), True, id="no-match"),
        pytest.param(_user("legacy", {"uri": {"prefix": "/"}}), True, id="prefix-slash"),
        pytest.param(_user("legacy", {"uri": {"regex": ".*"}}), True, id="regex-dot-star"),
        pytest.param(_user("legacy", {"name": "all"}), True, id="named-empty-match"),
        pytest.param(
            _user("legacy", {"uri": {"prefix": "/v1"}}, {"uri": {"prefix": "/"}}), True,
            id="one-match-all-entry-of-two",
        ),
        pytest.param(_user("legacy", {"uri": {"prefix": "/debug"}}), False, id="narrow-prefix"),
        pytest.param(
            _user("legacy", {"uri": {"prefix": "/"}, "headers": {"x-team": {"exact": "a"}}}),
            False, id="prefix-slash-and-a-header",
        ),
        pytest.param(
            _user("legacy", {"uri": {"prefix": "/"}, "gateways": ["mesh"]}), False,
            id="only-from-the-mesh",
        ),
        # Our routes serve what comes through our Gateway, on its one port (80): a match on
        # that Gateway or that port narrows nothing there (a VirtualService bound to the mesh
        # and the Gateway splits its routes so).
        pytest.param(
            _user("legacy", {"gateways": ["diabetes-gateway"]}), True, id="our-gateway",
        ),
        pytest.param(
            _user("legacy", {"uri": {"prefix": "/"}, "gateways": ["mesh", "ml/diabetes-gateway"]}),
            True, id="the-mesh-and-our-gateway-by-namespace",
        ),
        pytest.param(_user("legacy", {"port": 80}), True, id="our-gateway-port"),
        pytest.param(
            _user("legacy", {"gateways": ["other/diabetes-gateway"]}), False,
            id="a-gateway-of-that-name-in-another-namespace",
        ),
        pytest.param(_user("legacy", {"port": 8080}), False, id="another-port"),
    ],
)  # fmt: skip
def test_a_user_catch_all_before_our_default_route_is_refused(
    user_route: dict[str, Any], shadows: bool
) -> None:
    # Adopting a VirtualService: our default route would be appended after the user's routes.
    if shadows:
        with pytest.raises(RouterError, match="route 'legacy' matches every request"):
            m.merge_routes([user_route], LAYOUT, Weights.blue_at(50))
    else:
        merged = m.merge_routes([user_route], LAYOUT, Weights.blue_at(50))
        assert [r["name"] for r in merged][-2:] == ["legacy", m.DEFAULT_ROUTE]


def test_a_shadowed_default_route_is_neither_written_nor_reported(api: FakeKubeApiServer) -> None:
    vs = m.virtual_service(LAYOUT, Weights.blue_at(0))
    vs["spec"]["http"] = [_user("legacy")]
    api.seed(vs, "virtualservices", m.ISTIO_GROUP)
    router = make(api)
    router.deploy(Colour.GREEN, V1)
    router.deploy(Colour.BLUE, V2)
    with pytest.raises(RouterError, match=r"'legacy' matches every request.*'aml-rollout-default'"):
        router.set_weights(Weights.blue_at(50))
    assert [r.verb for r in api.requests if r.resource == "virtualservices"].count("patch") == 0

    # A catch-all someone puts above our routes later: get_weights refuses to report the split.
    vs = m.virtual_service(LAYOUT, Weights.blue_at(30))
    vs["spec"]["http"].insert(0, _user("legacy", {"uri": {"prefix": "/"}}))
    api.seed(vs, "virtualservices", m.ISTIO_GROUP)
    with pytest.raises(RouterError, match="would never be reached"):
        router.get_weights()


@pytest.mark.parametrize(
    "match",
    [
        pytest.param(None, id="no-match"),
        pytest.param([], id="an-empty-match-list"),
        pytest.param([{}], id="one-empty-match-entry"),
        pytest.param([{"uri": {"prefix": "/"}}], id="uri-prefix-slash"),
    ],
)
@pytest.mark.parametrize(
    ("name", "pins"),
    [
        pytest.param(m.DEFAULT_ROUTE, True, id="ours"),
        pytest.param(None, False, id="unnamed-in-a-virtual-service-made-by-hand"),
    ],
)
def test_every_match_all_form_of_the_weighted_route_is_the_default_route(
    api: FakeKubeApiServer, match: list[Any] | None, name: str | None, pins: bool
) -> None:
    """No `match`, `match: []`, `match: [{}]` and a uri prefix "/" all match every request.
    Was: ours written so was rewritten at every change of nothing (a new resourceVersion for
    every watcher); one made by hand, sending only to our weighted Services, read as no default
    route, and our default route appended after it was refused as shadowed."""
    vs = m.virtual_service(LAYOUT, Weights.blue_at(30))
    weighted = vs["spec"]["http"][-1]
    if name == m.DEFAULT_ROUTE:
        weighted["timeout"] = "5s"  # a field of theirs on ours, kept
    if match is not None:
        weighted["match"] = match
    if name is None:
        del weighted["name"]
    else:
        weighted["name"] = name
    vs["spec"]["http"] = [*vs["spec"]["http"][:-1], weighted] if pins else [weighted]
    api.seed(vs, "virtualservices", m.ISTIO_GROUP)
    router = both_deployed(api)
    assert router.get_weights() == Weights.blue_at(30)

    version = api.get(*VS)["metadata"]["resourceVersion"]
    router.set_weights(Weights.blue_at(30))
    if name == m.DEFAULT_ROUTE:
        assert api.get(*VS)["metadata"]["resourceVersion"] == version  # nothing to write
    router.set_weights(Weights.blue_at(50))
    routes = http_routes(api)
    assert [r.get("name") for r in routes] == [
        "aml-rollout-pin-blue",
        "aml-rollout-pin-green",
        m.DEFAULT_ROUTE,
    ]
    assert routes[-1].get("timeout") == ("5s" if name == m.DEFAULT_ROUTE else None)
    assert router.get_weights() == Weights.blue_at(50)


_GREEN_ONLY = [{"destination": {"host": "diabetes-green", "port": {"number": 80}}, "weight": 100}]


@pytest.mark.parametrize(
    ("route", "fields"),
    [
        pytest.param(
            {"route": _GREEN_ONLY, "mirror": {"host": "traffic-recorder.observability"},
             "mirrorPercentage": {"value": 100.0}},
            "mirror, mirrorPercentage", id="a-mirror-of-theirs",
        ),
        pytest.param({"route": _GREEN_ONLY, "timeout": "5s"}, "timeout", id="a-timeout"),
        pytest.param({"name": "main", "route": _GREEN_ONLY}, "name", id="a-name"),
        pytest.param(
            {"route": [{**_GREEN_ONLY[0], "headers": {"request": {"set": {"x-a": "1"}}}}]},
            "route[0].headers", id="a-destination-header",
        ),
    ],
)  # fmt: skip
def test_a_weighted_catch_all_with_fields_of_its_own_is_refused_not_taken_over(
    api: FakeKubeApiServer, route: dict[str, Any], fields: str
) -> None:
    """Was taken over as our default route: renamed, and its mirror to the user's own service
    dropped with no word. Only a bare one (match-all, and destinations at blue's and green's
    weighted Services) is ours in all but name."""
    vs = m.virtual_service(LAYOUT, Weights.blue_at(0))
    vs["spec"]["http"] = [route]
    api.seed(vs, "virtualservices", m.ISTIO_GROUP)
    router = both_deployed(api)
    said = rf"route .* sends only to blue's and green's weighted Services but sets {fields}"
    with pytest.raises(RouterRefused, match=said.replace("[", r"\[").replace("]", r"\]")):
        router.set_weights(Weights.blue_at(10))
    with pytest.raises(RouterRefused, match="sends only to blue's and green's"):
        router.get_weights()
    assert http_routes(api) == [route]


def test_a_deployment_past_its_progress_deadline_with_no_pod_gets_no_traffic(
    api: FakeKubeApiServer,
) -> None:
    router = make(api)
    router.deploy(Colour.GREEN, V1)
    router.deploy(Colour.BLUE, V2)
    router.set_weights(Weights.blue_at(10))
    api.set_status(*DEPLOYMENT_BLUE, {"observedGeneration": 1, "conditions": [_DEADLINE]})
    assert router.release(Colour.BLUE) == V2  # what it was asked to serve
    with pytest.raises(RouterError, match=r"has no available pod \(past its progress deadline"):
        router.set_weights(Weights.blue_at(50))
    router.set_weights(Weights.blue_at(0))  # the rollback is never refused
    assert router.get_weights() == Weights.blue_at(0)


@pytest.mark.parametrize(
    ("status", "weights", "said"),
    [
        pytest.param(
            {"observedGeneration": 1, "replicas": 0}, Weights.blue_at(50),
            "cannot send 50 % to blue: Deployment ml/diabetes-blue has no available pod "
            "(spec.replicas 0: scaled to 0)", id="scaled-to-zero",
        ),
        pytest.param(
            {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1,
             "unavailableReplicas": 1},
            Weights.blue_at(50),
            "cannot send 50 % to blue: Deployment ml/diabetes-blue has no available pod "
            "(0 of 1 available: crashed, or not ready yet): every request of that share would "
            "fail (503)", id="every-pod-crashed",
        ),
        pytest.param(
            {"observedGeneration": 1, "replicas": 1, "unavailableReplicas": 1},
            Weights.blue_at(0, mirror=5),
            "cannot mirror 5 % to blue: Deployment ml/diabetes-blue has no available pod",
            id="shadow",
        ),
    ],
)  # fmt: skip
def test_traffic_to_a_colour_with_no_available_pod_is_refused_before_any_write(
    api: FakeKubeApiServer, status: dict[str, Any], weights: Weights, said: str
) -> None:
    """Was written: every request routed to a colour with no pod available fails (503), and
    the judge charged them to its model."""
    router = both_deployed(api)
    router.set_weights(Weights.blue_at(10))
    if status.get("replicas") == 0:  # `kubectl scale --replicas=0`, or an autoscaler
        scaled = api.get(*DEPLOYMENT_BLUE)
        scaled["spec"]["replicas"] = 0
        api.seed(scaled, "deployments", "apps")
    api.set_status(*DEPLOYMENT_BLUE, status)
    patches = sum(r.verb == "patch" for r in api.requests)
    with pytest.raises(RouterError) as caught:
        router.set_weights(weights)
    assert not isinstance(caught.value, RouterRefused)  # a pod may come up: the next try
    assert str(caught.value).startswith(said)
    assert sum(r.verb == "patch" for r in api.requests) == patches
    assert router.get_weights() == Weights.blue_at(10)
    router.set_weights(Weights.blue_at(0))  # the rollback away from it is never refused
    assert router.get_weights() == Weights.blue_at(0)


def test_a_deploy_to_a_deployment_scaled_to_zero_fails_before_any_write(
    api: FakeKubeApiServer,
) -> None:
    """Was "deployed": a rollout of no pod is complete at once, and the weights then sent to
    the colour met no pod (503)."""
    router = make(api)
    router.deploy(Colour.BLUE, V1)
    scaled = api.get(*DEPLOYMENT_BLUE)
    scaled["spec"]["replicas"] = 0  # `kubectl scale --replicas=0`, or an autoscaler
    api.seed(scaled, "deployments", "apps")
    api.delete(*VS)  # was re-created (with the Gateway and the Services) before the refusal
    writes = sum(r.verb in ("create", "patch", "update", "delete") for r in api.requests)
    with pytest.raises(DeployFailed) as caught:
        router.deploy(Colour.BLUE, V2)
    assert str(caught.value).startswith(
        "Deployment ml/diabetes-blue is scaled to 0 (spec.replicas 0): it would serve diabetes:2 "
        "with no pod; scale it up (`kubectl -n ml scale deployment diabetes-blue --replicas=1`)"
    )
    assert sum(r.verb in ("create", "patch", "update", "delete") for r in api.requests) == writes
    assert router.release(Colour.BLUE) == V1


def test_a_stalled_scale_up_of_green_does_not_block_a_rollback(api: FakeKubeApiServer) -> None:
    # e.g. an HPA asked for 6 pods and 3 fit: past the deadline, yet green serves.
    router = make(api)
    router.deploy(Colour.GREEN, V1)
    router.deploy(Colour.BLUE, V2)
    router.set_weights(Weights.blue_at(10))
    api.set_status(
        *DEPLOYMENT_GREEN,
        {"observedGeneration": 1, "availableReplicas": 3, "conditions": [_DEADLINE]},
    )
    assert router.release(Colour.GREEN) == V1
    router.set_weights(Weights.blue_at(0))
    assert router.get_weights() == Weights.blue_at(0)


_CRASHED = {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "unavailableReplicas": 1}


@pytest.mark.parametrize(
    ("before", "after"),
    [
        pytest.param(Weights.blue_at(0, mirror=10), Weights.blue_at(0), id="shadow-abort"),
        pytest.param(Weights.blue_at(10), Weights.blue_at(50), id="step-green-shrinks"),
        pytest.param(Weights.blue_at(0), Weights.blue_at(10), id="off-green"),
    ],
)
def test_traffic_off_a_green_with_no_available_pod_is_written(
    api: FakeKubeApiServer, before: Weights, after: Weights
) -> None:
    """Was refused (retried 10 min for a rollback, then the run failed): green's share, the
    one failing, does not grow, so refusing only kept users on it (and a mirror on blue)."""
    router = both_deployed(api)
    router.set_weights(before)
    api.set_status(*DEPLOYMENT_GREEN, _CRASHED)  # its one pod crashed, or was evicted
    router.set_weights(after)
    assert router.get_weights() == after


def test_a_rollback_to_a_green_with_no_available_pod_is_written_with_a_warning(
    api: FakeKubeApiServer, caplog: Any
) -> None:
    """Green's share grows, but the weights send blue nothing: the operator asked to leave
    blue, and green is the stable release; refusing would keep the run on blue for 10 min."""
    router = both_deployed(api)
    router.set_weights(Weights.blue_at(50))
    api.set_status(*DEPLOYMENT_GREEN, _CRASHED)
    router.set_weights(Weights.blue_at(0))
    assert router.get_weights() == Weights.blue_at(0)
    assert "Deployment ml/diabetes-green has no available pod" in caplog.text


@pytest.mark.parametrize(
    ("before", "crashed", "after", "refused"),
    [
        pytest.param(50, (DEPLOYMENT_GREEN,), 20,
                     "cannot send 80 % to green: Deployment ml/diabetes", id="green-grows"),
        pytest.param(10, (DEPLOYMENT_BLUE, DEPLOYMENT_GREEN), 50,
                     "cannot send 50 % to blue: Deployment ml/diabetes-blue",
                     id="blue-grows-even-from-a-green-with-none"),
    ],
)  # fmt: skip
def test_a_step_growing_a_colour_with_no_available_pod_is_refused(
    api: FakeKubeApiServer,
    before: int,
    crashed: tuple[tuple[str, ...], ...],
    after: int,
    refused: str,
) -> None:
    router = both_deployed(api)
    router.set_weights(Weights.blue_at(before))
    for deployment in crashed:
        api.set_status(*deployment, _CRASHED)
    with pytest.raises(RouterError, match=refused):
        router.set_weights(Weights.blue_at(after))
    assert router.get_weights() == Weights.blue_at(before)


# ---- the shadow step: Istio's request mirroring on our default route ------------------------
SHADOW = Weights.blue_at(0, mirror=5)
BLUE_HOST = {"host": "diabetes-blue", "port": {"number": 80}}


def default_route(api: FakeKubeApiServer) -> dict[str, Any]:
    route = http_routes(api)[-1]
    assert route["name"] == m.DEFAULT_ROUTE
    return route


def both_deployed(api: FakeKubeApiServer, **kwargs: Any) -> IstioRouter:
    router = make(api, **kwargs)
    router.deploy(Colour.GREEN, V1)
    router.deploy(Colour.BLUE, V2)
    return router


def test_a_shadow_step_mirrors_the_default_route_to_blue(api: FakeKubeApiServer) -> None:
    router = both_deployed(api)
    pinned_before = http_routes(api)[:2]
    router.set_weights(SHADOW)

    route = default_route(api)
    assert route["mirror"] == BLUE_HOST  # blue's weighted Service, on the port the route uses
    assert route["mirrorPercentage"] == {"value": 5.0}
    assert {d["destination"]["host"]: d["weight"] for d in route["route"]} == {
        "diabetes-green": 100,
        "diabetes-blue": 0,
    }
    assert http_routes(api)[:2] == pinned_before  # pinned requests are never mirrored
    assert router.get_weights() == SHADOW


@pytest.mark.parametrize(
    "after",
    [
        pytest.param(Weights.blue_at(5), id="first-live-step"),
        pytest.param(Weights.blue_at(0), id="rollback"),
        pytest.param(Weights.blue_at(0, mirror=20), id="another-share"),
        pytest.param(Weights.blue_at(100), id="promote"),
    ],
)
def test_the_next_weights_change_sets_or_removes_the_mirror(
    api: FakeKubeApiServer, after: Weights
) -> None:
    router = both_deployed(api)
    router.set_weights(SHADOW)
    router.set_weights(after)

    route = default_route(api)  # as the API server stores it, after the merge patch
    if after.mirror:
        assert (route["mirror"], route["mirrorPercentage"]) == (BLUE_HOST, {"value": 20.0})
    else:
        assert "mirror" not in route and "mirrorPercentage" not in route
    assert router.get_weights() == after
    assert all("mirror" not in r for r in http_routes(api)[:2])


def test_setting_the_served_shadow_writes_nothing(api: FakeKubeApiServer) -> None:
    router = both_deployed(api)
    router.set_weights(SHADOW)
    version = api.get(*VS)["metadata"]["resourceVersion"]
    router.set_weights(SHADOW)
    assert api.get(*VS)["metadata"]["resourceVersion"] == version


@pytest.mark.parametrize(
    ("first", "then"),
    [
        pytest.param(Weights.blue_at(0), SHADOW, id="adding-the-mirror"),
        pytest.param(SHADOW, Weights.blue_at(5), id="removing-the-mirror"),
    ],
)
def test_a_concurrent_write_during_a_mirror_change_is_retried(
    api: FakeKubeApiServer, first: Weights, then: Weights
) -> None:
    router = both_deployed(api)
    router.set_weights(first)

    def someone_else(vs: dict[str, Any]) -> None:
        vs["metadata"].setdefault("labels", {})["touched-by"] = "argocd"

    api.before_next_write("virtualservices", "diabetes", someone_else)
    patches_before = sum(r.verb == "patch" for r in api.requests)
    router.set_weights(then)

    patches = [r.status for r in api.requests if r.verb == "patch"][patches_before:]
    assert patches == [409, 200]
    assert router.get_weights() == then
    assert api.get(*VS)["metadata"]["labels"]["touched-by"] == "argocd"


def test_nothing_is_mirrored_to_a_blue_that_is_not_there(api: FakeKubeApiServer) -> None:
    router = make(api)
    router.deploy(Colour.GREEN, V1)
    with pytest.raises(RouterError, match="cannot mirror 5 % to blue: Deployment ml/diabetes-blue"):
        router.set_weights(SHADOW)
    assert not any(r.verb == "patch" for r in api.requests)
    assert router.get_weights() == Weights.blue_at(0)


def test_nothing_is_mirrored_to_a_blue_past_its_deadline_with_no_pod(
    api: FakeKubeApiServer,
) -> None:
    router = both_deployed(api)
    api.set_status(*DEPLOYMENT_BLUE, {"observedGeneration": 1, "conditions": [_DEADLINE]})
    with pytest.raises(RouterError, match=r"cannot mirror 5 % to blue: .* no available pod"):
        router.set_weights(SHADOW)
    assert router.get_weights() == Weights.blue_at(0)


def _default_with(blue: int = 0, **fields: Any) -> list[dict[str, Any]]:
    http = m.managed_routes(LAYOUT, Weights.blue_at(blue))
    http[-1].update(fields)
    return http


@pytest.mark.parametrize(
    ("fields", "mirror"),
    [
        pytest.param({"mirror": {"host": "diabetes-blue"}}, 100, id="no-percentage-is-all"),
        pytest.param(
            {
                "mirror": {"host": "diabetes-blue.ml.svc.cluster.local"},
                "mirrorPercentage": {"value": 5},  # the API server may send 5.0 back as 5
            },
            5,
            id="fqdn",
        ),
        pytest.param(
            {"mirror": {"host": "diabetes-blue"}, "mirrorPercentage": {"value": 0.0}},
            0,
            id="zero-percent-mirrors-nothing",
        ),
        pytest.param(
            {"mirror": {"host": "diabetes-blue"}, "mirrorPercent": 7}, 7, id="deprecated-integer"
        ),
        pytest.param(
            {"mirrors": [{"destination": {"host": "diabetes-blue"}, "percentage": {"value": 3}}]},
            3,
            id="mirrors-list",
        ),
        pytest.param(
            {"mirror": {"host": "shadow-logger"}, "mirrorPercentage": {"value": 50.0}},
            0,
            id="another-host-is-not-ours",
        ),
        pytest.param(
            {"mirror": {"host": "diabetes-blue-pinned"}}, 0, id="blue-pinned-is-not-judged"
        ),
        pytest.param(
            {"mirror": {"host": "diabetes-blue.staging.svc.cluster.local"}},
            0,
            id="same-name-other-namespace",
        ),
    ],
)
def test_the_mirror_read_back_counts_only_blue_s_weighted_service(
    fields: dict[str, Any], mirror: int
) -> None:
    assert m.weights_from_routes(_default_with(**fields), LAYOUT) == Weights.blue_at(0, mirror)


@pytest.mark.parametrize(
    ("blue", "fields", "message"),
    [
        pytest.param(
            0,
            {"mirror": {"host": "diabetes-blue"}, "mirrorPercentage": {"value": 2.5}},
            "mirrors 2.5 % to 'diabetes-blue'; aml-rollout mirrors whole percents only",
            id="fraction-of-a-percent",
        ),
        pytest.param(
            30,
            {"mirror": {"host": "diabetes-blue"}, "mirrorPercentage": {"value": 5.0}},
            "invalid weights: blue is mirrored only while it serves no live traffic",
            id="mirrored-while-serving",
        ),
        pytest.param(
            0,
            {
                "mirror": {"host": "diabetes-blue"},
                "mirrors": [{"destination": {"host": "diabetes-blue"}}],
            },
            "mirrors to 'diabetes-blue' twice",
            id="twice",
        ),
    ],
)
def test_a_mirror_weights_cannot_hold_is_a_router_error(
    blue: int, fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(RouterError, match=re.escape(message)):
        m.weights_from_routes(_default_with(blue, **fields), LAYOUT)


def _weighted(*destinations: tuple[str, int | None]) -> list[dict[str, Any]]:
    """Our routes, the default one sending to `(host, weight)`s (None: no `weight` field)."""
    http = m.managed_routes(LAYOUT, Weights.blue_at(0))
    http[-1]["route"] = [
        {"destination": {"host": host}} | ({} if weight is None else {"weight": weight})
        for host, weight in destinations
    ]
    return http


@pytest.mark.parametrize(
    ("destinations", "served"),
    [
        # Istio (pilot's route translation): with several destinations, one whose weight is 0
        # or absent gets nothing; a lone destination gets everything, whatever its weight.
        # Go clients that omit zero values (`weight,omitempty`) write blue at 0 % so.
        pytest.param(
            [("diabetes-green", 100), ("diabetes-blue", None)], 0, id="absent-weight-is-zero"
        ),
        pytest.param([("diabetes-blue", None)], 100, id="lone-destination-without-weight"),
        pytest.param([("diabetes-blue", 0)], 100, id="lone-destination-at-zero-takes-all"),
        pytest.param([("diabetes-green", 30)], 0, id="lone-destination-at-30-takes-all"),
        # Weights are relative: each destination gets weight / sum.
        pytest.param([("diabetes-green", 1), ("diabetes-blue", 1)], 50, id="relative-one-one"),
        pytest.param([("diabetes-green", 30), ("diabetes-blue", 10)], 25, id="relative-thirty-ten"),
    ],
)
def test_weights_are_read_as_istio_serves_them(
    destinations: list[tuple[str, int | None]], served: int
) -> None:
    assert m.weights_from_routes(_weighted(*destinations), LAYOUT) == Weights.blue_at(served)


@pytest.mark.parametrize(
    ("destinations", "message"),
    [
        pytest.param(
            [("diabetes-green", 2), ("diabetes-blue", 1)],
            "sends 1/3 of its traffic to blue, not a whole percent",
            id="not-a-whole-percent",
        ),
        pytest.param(
            [("diabetes-green", 0), ("diabetes-blue", None)],
            "no destination with a weight",
            id="all-at-zero",
        ),
    ],
)
def test_weights_istio_serves_but_weights_cannot_hold_are_a_router_error(
    destinations: list[tuple[str, int | None]], message: str
) -> None:
    with pytest.raises(RouterError, match=re.escape(message)):
        m.weights_from_routes(_weighted(*destinations), LAYOUT)


def test_a_destination_in_another_namespace_is_not_ours() -> None:
    http = m.managed_routes(LAYOUT, Weights.blue_at(30))
    http[-1]["route"][1]["destination"]["host"] = "diabetes-blue.staging.svc.cluster.local"
    with pytest.raises(RouterError, match=r"unknown 'diabetes-blue\.staging"):
        m.weights_from_routes(http, LAYOUT)


def test_someone_else_s_mirror_on_our_route_is_dropped_by_the_next_write_and_said(
    api: FakeKubeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    router = both_deployed(api)
    router.set_weights(Weights.blue_at(0))
    vs = api.get(*VS)
    vs["spec"]["http"][-1]["mirror"] = {"host": "shadow-logger"}
    api.seed(vs, "virtualservices", m.ISTIO_GROUP)  # a hand edit of our route
    assert router.get_weights() == Weights.blue_at(0)  # it copies nothing to blue

    with caplog.at_level(logging.WARNING, logger="rollout.routers.istio"):
        router.set_weights(SHADOW)
    assert "its mirror to shadow-logger (not blue's weighted Service) is dropped" in caplog.text
    assert default_route(api)["mirror"] == BLUE_HOST
    assert router.get_weights() == SHADOW


def test_someone_else_s_destination_on_our_route_is_dropped_by_the_next_write_and_said(
    api: FakeKubeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Was dropped, with its share of live traffic, without a word (a mirror was said)."""
    router = both_deployed(api)
    router.set_weights(Weights.blue_at(10))
    vs = api.get(*VS)
    vs["spec"]["http"][-1]["route"][0]["weight"] = 80
    vs["spec"]["http"][-1]["route"].append(
        {"destination": {"host": "diabetes-legacy", "port": {"number": 80}}, "weight": 10}
    )
    api.seed(vs, "virtualservices", m.ISTIO_GROUP)  # a hand edit of our route
    with pytest.raises(RouterError, match="sends traffic to unknown 'diabetes-legacy'"):
        router.get_weights()

    with caplog.at_level(logging.WARNING, logger="rollout.routers.istio"):
        router.set_weights(Weights.blue_at(25))
    assert (
        f"route '{m.DEFAULT_ROUTE}' are aml-rollout's: its traffic to diabetes-legacy (not "
        "blue's or green's weighted Service) is dropped by this write"
    ) in caplog.text
    assert router.get_weights() == Weights.blue_at(25)


@pytest.mark.parametrize(
    ("canary_error_rate", "phase", "blue_served"),
    [
        pytest.param(0.01, Phase.SUCCEEDED, True, id="healthy-candidate-promoted"),
        pytest.param(0.3, Phase.ROLLED_BACK, False, id="faulty-candidate-stopped-in-the-shadow"),
    ],
)
def test_the_engine_runs_a_shadow_step_through_the_virtual_service(
    api: FakeKubeApiServer,
    tmp_path: Path,
    canary_error_rate: float,
    phase: Phase,
    blue_served: bool,
) -> None:
    from rollout.api import run_rollout
    from rollout.config import spec_from_dict
    from rollout.controller import FakeClock

    make(api).deploy(Colour.GREEN, V1)
    spec = spec_from_dict({
        "name": "diabetes",
        "router": {"kind": "istio", "namespace": "ml", "app": "diabetes", "api_url": api.url},
        # The simulated traffic reads the weights back from the VirtualService each tick, so
        # blue is judged only on what the mirror there copies to it.
        "metrics": {"kind": "simulated", "seed": 3, "rps": 2000,
                    "baseline": {"error_rate": 0.01}, "canary": {"error_rate": canary_error_rate}},
        "steps": [0, 10, 50, 100],
        "mirror_percent": 5,
        "analysis": {"interval_s": 10, "min_requests": 50, "latency": {"enabled": False}},
        "state": {"dir": str(tmp_path / "state")},
    })  # fmt: skip
    seen: list[tuple[int, dict[str, Any] | None, dict[str, Any] | None]] = []

    def read_vs(status: Any, record: dict[str, Any]) -> None:
        route = default_route(api)
        seen.append((status.blue_weight, route.get("mirror"), route.get("mirrorPercentage")))

    result = run_rollout(spec, candidate=V2, clock=FakeClock(1_000.0), on_tick=read_vs)

    assert result.phase is phase, result.reason
    assert (0, BLUE_HOST, {"value": 5.0}) in seen  # the shadow step, as the VirtualService held it
    assert all(mirror is None for blue, mirror, _ in seen if blue > 0)  # never with live traffic
    assert any(blue > 0 for blue, _, _ in seen) is blue_served
    assert make(api).get_weights() == Weights.blue_at(0)
    assert "mirror" not in default_route(api)
