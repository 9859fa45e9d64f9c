"""`aml-rollout manifests`: valid Istio objects, an RBAC Role that is exactly what the router uses,
and a bootstrap the router adopts without re-creating anything.

Istio objects are checked against the real CRD schemas (istio_schemas/, closed against unknown
fields under `spec`, see its README). The Role is checked against a recorded router run on the
fake apiserver: every request the router made is granted, and every grant was used.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, ClassVar

import jsonschema
import pytest
import yaml
from kubernetes import client as k8s
from typer.testing import CliRunner

from rollout import kubenames
from rollout.cli import app
from rollout.config import spec_from_dict
from rollout.core.types import Colour, Release, Weights
from rollout.errors import ConfigError, DeployFailed
from rollout.routers import istio_manifests as m
from rollout.routers.base import UPSTREAM_IDLE_S
from rollout.routers.istio import IstioRouter
from scoring.cli import KEEP_ALIVE_S
from tests.fakes.kube_apiserver import FakeKubeApiServer
from tests.routers.contract import V1, V2, identity
from tests.state.helpers import exercise as exercise_state_store

SCHEMAS = Path(__file__).parent / "istio_schemas"
RESOURCES = {  # kind → (group, plural) for applying rendered objects to the fake apiserver
    "Namespace": ("", "namespaces"),
    "ServiceAccount": ("", "serviceaccounts"),
    "Service": ("", "services"),
    "Role": ("rbac.authorization.k8s.io", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io", "rolebindings"),
    "Deployment": ("apps", "deployments"),
    "DestinationRule": (m.ISTIO_GROUP, "destinationrules"),
    "Gateway": (m.ISTIO_GROUP, "gateways"),
    "VirtualService": (m.ISTIO_GROUP, "virtualservices"),
}


def strictify(node: Any) -> None:
    """Close every object schema against unknown fields, as `kubectl --validate=strict` does."""
    if isinstance(node, dict):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for value in node.values():
            strictify(value)
    elif isinstance(node, list):
        for value in node:
            strictify(value)


def validator(kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / f"{kind.lower()}-v1.json").read_text())
    strictify(schema["properties"]["spec"])  # the root stays open: metadata is not described
    return jsonschema.Draft7Validator(schema)


def render(*args: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(app, ["manifests", *args])
    assert result.exit_code == 0, result.output
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def errors(doc: dict[str, Any]) -> list[str]:
    return [
        "/".join(map(str, e.absolute_path)) + ": " + e.message
        for e in validator(doc["kind"]).iter_errors(doc)
    ]


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([], id="defaults"),
        pytest.param(["-n", "ml", "--app", "diabetes", "--green-image", "r.io/d:1"], id="green"),
        pytest.param(
            [
                "--green-image",
                "r.io/d:1",
                "--blue-image",
                "r.io/d:2",
                "--host",
                "a.example.com",
                "--host",
                "b.example.com",
                "--header",
                "x-colour",
                "--port",
                "8080",
            ],
            id="both-colours-custom-hosts",
        ),
    ],
)
def test_every_istio_object_validates_against_the_crd_schema(args: list[str]) -> None:
    docs = render(*args)
    istio = [d for d in docs if d["apiVersion"].startswith(m.ISTIO_GROUP)]
    kinds = ["DestinationRule"] * 4 + ["Gateway", "VirtualService"]
    assert sorted(d["kind"] for d in istio) == kinds
    for doc in istio:
        assert errors(doc) == [], doc


def test_the_proxies_close_idle_connections_before_the_scoring_server_does() -> None:
    # Istio keeps an idle upstream connection 1 h by default (the gateway's, and the sidecar's
    # in front of the scoring server, which applies the host's DestinationRule too), uvicorn
    # KEEP_ALIVE_S: a request sent on a connection the server has just closed is a 503.
    rules = [d for d in render("--app", "diabetes") if d["kind"] == "DestinationRule"]
    services = [s["metadata"]["name"] for s in m.services(m.IstioLayout("default", "diabetes"))]
    assert [r["metadata"]["name"] for r in rules] == services
    assert [r["spec"]["host"] for r in rules] == services
    for rule in rules:
        http = {"idleTimeout": f"{UPSTREAM_IDLE_S}s"}  # the local Envoy's, shared
        assert rule["spec"]["trafficPolicy"] == {"connectionPool": {"http": http}}
    assert UPSTREAM_IDLE_S < KEEP_ALIVE_S


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("60s", 60.0, id="seconds"),
        pytest.param("1h", 3600.0, id="hour"),
        pytest.param("1m15s", 75.0, id="minutes-and-seconds"),
        pytest.param("500ms", 0.5, id="milliseconds"),
        pytest.param("1.5h", 5400.0, id="fraction"),
        pytest.param("60", None, id="no-unit"),
        pytest.param("1 h", None, id="space"),
        pytest.param("soon", None, id="words"),
    ],
)
def test_durations_are_read_as_istio_takes_them(text: str, seconds: float | None) -> None:
    assert m.duration_s(text) == seconds


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        pytest.param("idleTimeout", 60, "is not of type 'string'", id="seconds-as-number"),
        pytest.param("idleTimout", "60s", "'idleTimout' was unexpected", id="typo"),
    ],
)
def test_the_schema_check_catches_broken_destination_rules(
    field: str, value: Any, expected: str
) -> None:
    rule = copy.deepcopy(m.destination_rules(m.IstioLayout("ml", "d"))[0])
    rule["spec"]["trafficPolicy"]["connectionPool"]["http"] = {field: value}
    assert any(expected in e for e in errors(rule)), errors(rule)


SHADOW = Weights.blue_at(0, mirror=5)


@pytest.mark.parametrize(
    "weights",
    [
        pytest.param(SHADOW, id="shadow-step"),
        pytest.param(Weights.blue_at(0, mirror=100), id="everything-mirrored"),
        pytest.param(Weights.blue_at(25), id="live-step"),
    ],
)
def test_the_virtual_service_of_every_step_validates(weights: Weights) -> None:
    for layout in (m.IstioLayout("ml", "diabetes"), m.IstioLayout("ml", "d", port=8080)):
        vs = m.virtual_service(layout, weights)
        assert errors(vs) == [], vs


def test_the_virtual_service_the_router_leaves_validates_through_a_shadow_step() -> None:
    layout = m.IstioLayout(namespace="ml", app="diabetes")
    with FakeKubeApiServer() as api:
        api.seed(m.namespace(layout), "namespaces")
        router = router_on(api, layout)
        router.deploy(Colour.GREEN, V1)
        router.deploy(Colour.BLUE, V2)
        for weights in (SHADOW, Weights.blue_at(5), Weights.blue_at(0)):
            router.set_weights(weights)
            stored = api.get("virtualservices", "diabetes", "ml", m.ISTIO_GROUP)
            assert errors(stored) == [], stored
            assert ("mirror" in stored["spec"]["http"][2]) is bool(weights.mirror)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        pytest.param(
            ("http", 2, "route", 0, "weight"), "ten", "is not of type 'integer'", id="weight"
        ),
        pytest.param(
            ("http", 2, "mirrorPercentage", "value"),
            "5%",
            "is not of type 'number'",
            id="mirror-percentage",
        ),
        pytest.param(
            ("http", 2, "mirror", "weight"), 5, "'weight' was unexpected", id="mirror-weight"
        ),
        pytest.param(
            ("http", 2, "route", 0, "destination", "bogusField"),
            1,
            "'bogusField' was unexpected",
            id="unknown-field",
        ),
        pytest.param(
            ("http", 0, "match", 0, "headers", "x-api-version", "prefix"),
            "b",
            "is valid under each of",
            id="exact-and-prefix",
        ),
    ],
)
def test_the_schema_check_catches_broken_virtual_services(
    path: tuple[Any, ...], value: Any, expected: str
) -> None:
    # The validation above means something only if it can fail.
    # (The default route carries a mirror, so the mirror fields are checked too.)
    vs = copy.deepcopy(m.virtual_service(m.IstioLayout(namespace="ml", app="d"), SHADOW))
    node = vs["spec"]
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    assert any(expected in e for e in errors(vs)), errors(vs)


def test_the_yaml_has_no_anchors_or_aliases() -> None:
    # Was: the Deployment's selector and pod labels, one dict, came out as `&id001` / `*id001`.
    result = CliRunner().invoke(
        app, ["manifests", "--app", "diabetes", "--green-image", "acr.example.io/diabetes:1"]
    )
    assert result.exit_code == 0, result.output
    assert "&id" not in result.stdout and "*id" not in result.stdout
    assert "matchLabels:\n      app: diabetes" in result.stdout


def test_bootstrap_order_and_contents() -> None:
    docs = render("-n", "ml", "--app", "diabetes", "--green-image", "r.io/diabetes:3")
    assert [d["kind"] for d in docs] == [
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Service",
        "Service",
        "Service",
        "Service",
        "DestinationRule",
        "DestinationRule",
        "DestinationRule",
        "DestinationRule",
        "Deployment",
        "Gateway",
        "VirtualService",
    ]
    assert all(d["metadata"].get("namespace", "ml") == "ml" for d in docs)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["metadata"]["name"] == "diabetes-green"
    assert deployment["metadata"]["annotations"]["aml-rollout.io/version"] == "3"
    vs = docs[-1]
    assert m.weights_from_routes(vs["spec"]["http"], m.IstioLayout("ml", "diabetes")) == (
        Weights.blue_at(0)
    )
    binding = docs[3]
    assert binding["roleRef"]["name"] == docs[2]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == docs[1]["metadata"]["name"]


def granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def router_on(api: FakeKubeApiServer, layout: m.IstioLayout) -> IstioRouter:
    configuration = k8s.Configuration()
    configuration.host = api.url
    return IstioRouter(layout, k8s.ApiClient(configuration), sleep=lambda _s: None)


def exercise(router: IstioRouter) -> None:
    """Everything a rollout does: a shadow step, the seed's promotion, a redeploy, a rollback,
    reads."""
    router.deploy(Colour.GREEN, V1)
    router.deploy(Colour.BLUE, V2)
    router.deploy(Colour.BLUE, V2)
    router.set_weights(Weights.blue_at(0, mirror=5))
    router.get_weights()
    for blue in (10, 50, 100):
        router.set_weights(Weights.blue_at(blue))
    router.deploy(Colour.GREEN, V2)
    router.set_weights(Weights.blue_at(0))
    router.get_weights()
    router.release(Colour.GREEN)
    router.remove(Colour.BLUE)
    router.remove(Colour.BLUE)


def deploy_that_never_gets_ready(api: FakeKubeApiServer, router: IstioRouter) -> None:
    """A deploy whose Deployment is past its progress deadline: the router reads its pods to
    say why."""
    key = ("deployments", "diabetes-green", "ml", "apps")
    api.ready_deployments = False
    deadline = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
    generation = api.get(*key)["metadata"]["generation"]
    api.set_status(*key, {"observedGeneration": generation, "conditions": [deadline]})
    with pytest.raises(DeployFailed, match="pods: none that is not ready"):
        router.deploy(Colour.GREEN, V2)


def test_the_role_grants_exactly_what_the_router_and_the_state_store_use() -> None:
    docs = render("-n", "ml", "--app", "diabetes")
    role = next(d for d in docs if d["kind"] == "Role")
    layout = m.IstioLayout(namespace="ml", app="diabetes")
    with FakeKubeApiServer() as api:
        api.seed(m.namespace(layout), "namespaces")
        # One of the user's, without an idle timeout: the router adds its own (a patch).
        user_rule = m.destination_rules(layout)[0]
        del user_rule["spec"]["trafficPolicy"]
        api.seed(user_rule, "destinationrules", m.ISTIO_GROUP)
        exercise(router_on(api, layout))
        deploy_that_never_gets_ready(api, router_on(api, layout))
        exercise_state_store(api)  # a controller in the cluster keeps its state there
        used = api.verbs_used()
    assert used <= granted(role), f"controller used verbs the Role lacks: {used - granted(role)}"
    assert granted(role) <= used, f"Role grants verbs nothing uses: {granted(role) - used}"


def test_the_router_adopts_a_bootstrapped_namespace(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "package.json").write_text(
        json.dumps({"model": "diabetes", "version": "1", "sha256": V1.sha256, "image": V1.image})
    )
    out = tmp_path / "k8s.yaml"
    CliRunner().invoke(
        app,
        [
            "manifests",
            "-n",
            "ml",
            "--app",
            "diabetes",
            "--green-package",
            str(package),
            "-o",
            str(out),
        ],
    )
    docs = [d for d in yaml.safe_load_all(out.read_text()) if d]
    layout = m.IstioLayout(namespace="ml", app="diabetes")
    with FakeKubeApiServer() as api:
        for doc in docs:  # what `kubectl apply -f k8s.yaml` does
            group, plural = RESOURCES[doc["kind"]]
            api.seed(doc, plural, group)
        router = router_on(api, layout)
        assert router.get_weights() == Weights.blue_at(0)
        assert identity(router.release(Colour.GREEN)) == identity(V1)
        router.deploy(Colour.BLUE, V2)
        router.set_weights(Weights.blue_at(10))
        creates = [(r.resource, r.name) for r in api.requests if r.verb == "create"]
    assert creates == [("deployments", "diabetes-blue")]


def test_settings_come_from_a_spec_and_options_win(tmp_path: Path) -> None:
    spec = tmp_path / "rollout.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "router": {
                    "kind": "istio",
                    "namespace": "prod",
                    "app": "churn",
                    "hosts": ["churn.example.com"],
                    "header": "x-colour",
                    "port": 8080,
                }
            }
        )
    )
    docs = render("--spec", str(spec), "--app", "churn2")
    vs = docs[-1]
    assert vs["metadata"] == {**vs["metadata"], "namespace": "prod", "name": "churn2"}
    assert vs["spec"]["hosts"] == ["churn.example.com"]
    assert vs["spec"]["http"][0]["match"][0]["headers"] == {"x-colour": {"exact": "blue"}}
    assert vs["spec"]["http"][2]["route"][0]["destination"]["port"] == {"number": 8080}


def test_aks_istio_add_on_gateway_and_revision(tmp_path: Path) -> None:
    """AKS's Istio add-on labels its ingress gateways `istio: aks-istio-ingressgateway-external`
    and injects sidecars by revision label only. Was: the Gateway always selected
    `istio: ingressgateway` (binding no pod there) and the Namespace was labelled
    `istio-injection: enabled` (ignored there: pods without sidecars), with no way to say
    otherwise to `manifests`, nor to the router that creates a missing Gateway."""
    gateway = "aks-istio-ingressgateway-external"
    docs = render("-n", "ml", "--ingress-gateway", gateway, "--istio-revision", "asm-1-23")
    kinds = {d["kind"]: d for d in docs}
    assert kinds["Namespace"]["metadata"]["labels"] == {"istio.io/rev": "asm-1-23"}
    assert kinds["Gateway"]["spec"]["selector"] == {"istio": gateway}
    assert errors(kinds["Gateway"]) == []
    spec = tmp_path / "rollout.yaml"
    spec.write_text(yaml.safe_dump({"router": {"kind": "istio", "ingress_gateway": gateway}}))
    from_spec = {d["kind"]: d for d in render("--spec", str(spec))}
    assert from_spec["Gateway"]["spec"]["selector"] == {"istio": gateway}
    assert from_spec["Namespace"]["metadata"]["labels"] == {"istio-injection": "enabled"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["--ingress-gateway", "aks istio"],
            "--ingress-gateway: 'aks istio' is not a label value",
            id="gateway-label-with-a-space",
        ),
        pytest.param(
            ["--istio-revision", "asm-1-23-"],
            "--istio-revision: 'asm-1-23-' is not a label value",
            id="revision-ending-in-a-dash",
        ),
        pytest.param(
            ["--green-image", "diabetes"],
            "expected <registry>/<model>:<version>",
            id="image-without-tag",
        ),
        pytest.param(
            ["--green-image", "acr.io/team/diabetes@sha256:" + "a" * 64],
            "a digest alone names no model version",
            id="digest-without-tag",
        ),
        pytest.param(
            ["--green-image", "acr.io/team/diabetes:3@md5:abc"],
            "expected <registry>/<model>:<version>",
            id="not-a-sha256-digest",
        ),
        pytest.param(
            ["--green-package", "/nonexistent"], "package.json: not found", id="missing-package"
        ),
        pytest.param(
            ["--app", "bad_name"],
            "--app: 'bad_name' is not a DNS-1035 label",
            id="bad-app-name",
        ),
        pytest.param(
            # Service 3d-scorer-blue would be refused by the API server (RFC 1035).
            ["--app", "3d-scorer"],
            "--app: '3d-scorer' must start with a letter",
            id="app-name-starting-with-a-digit",
        ),
        pytest.param(
            ["--app", "a" * 51], "at most 50 characters", id="app-name-too-long-for-its-services"
        ),
        pytest.param(["-n", "Prod"], "--namespace: 'Prod' is not a DNS-1123", id="bad-ns"),
        pytest.param(["--port", "0"], "--port: 0 is not a TCP port", id="port-0"),
        pytest.param(
            ["--container-port", "70000"],
            "--container-port: 70000 is not a TCP port",
            id="container-port-too-high",
        ),
        pytest.param(["--replicas", "-1"], "--replicas: -1 must be >= 1", id="negative-replicas"),
        # Was rendered: a colour with no pod, its share of traffic answered 503 (and the spec's
        # router.replicas, which `manifests --spec` reads, refuses 0).
        pytest.param(["--replicas", "0"], "--replicas: 0 must be >= 1", id="no-replicas"),
        pytest.param(
            ["--green-image", "r/d:1", "--green-package", "."],
            "exclude each other",
            id="image-and-package",
        ),
        pytest.param(
            ["-o", "/nonexistent/k8s.yaml"],
            "-o /nonexistent/k8s.yaml: cannot write it: No such file or directory",
            id="output-in-a-missing-folder",
        ),
        pytest.param(
            # Was rendered: Istio's validation refuses the Gateway and the VirtualService.
            ["--host", "https://diabetes.example.com/"],
            "--host: 'https://diabetes.example.com/' is not a host name",
            id="host-as-a-url",
        ),
        pytest.param(
            ["--host", "diabetes.example.com:443"], "is not a host name", id="host-with-a-port"
        ),
        pytest.param(
            # Was rendered: a VirtualService match no request can carry.
            ["--header", "bad header"],
            "--header: not a valid HTTP header name: 'bad header'",
            id="header-with-a-space",
        ),
    ],
)
def test_bad_input_is_one_config_error(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["manifests", *args])
    assert isinstance(result.exception, ConfigError)
    assert message in str(result.exception)


@pytest.mark.parametrize(
    ("router", "args", "message"),
    [
        pytest.param(
            "{kind: istio, app: diabetes}",
            ["--host", "diabetes.example.com:443"],
            "--host: 'diabetes.example.com:443' is not a host name",
            id="bad-option-next-to-a-good-spec",
        ),
        pytest.param(
            "{kind: istio, app: diabetes_v2}",
            [],
            "router.app: 'diabetes_v2' is not a DNS-1035 label",
            id="bad-spec-field",
        ),
    ],
)
def test_an_error_names_what_the_user_typed_option_or_spec_field(
    tmp_path: Path, router: str, args: list[str], message: str
) -> None:
    # Was: `router.hosts: ...` for a value given with --host, a spec field the user never wrote.
    spec = tmp_path / "rollout.yaml"
    spec.write_text(f"name: d\nrouter: {router}\n")
    result = CliRunner().invoke(app, ["manifests", "--spec", str(spec), *args])
    assert isinstance(result.exception, ConfigError)
    assert message in str(result.exception)


def test_a_package_json_without_its_image_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "package.json").write_text('{"model": "diabetes", "version": "3"}')
    result = CliRunner().invoke(app, ["manifests", "--green-package", str(tmp_path)])
    assert isinstance(result.exception, ConfigError)
    # Was: "unreadable package manifest (KeyError('image'))".
    assert f"{tmp_path}/package.json: no 'image' (a package's package.json names" in str(
        result.exception
    )


def test_a_non_istio_spec_is_refused(tmp_path: Path) -> None:
    spec = tmp_path / "rollout.yaml"
    spec.write_text("router: {kind: memory}\n")
    result = CliRunner().invoke(app, ["manifests", "--spec", str(spec)])
    assert isinstance(result.exception, ConfigError)
    assert "router.kind is 'memory'" in str(result.exception)


def test_the_spec_top_level_header_is_the_one_the_routes_match(tmp_path: Path) -> None:
    """docs/engine.md documents `header:` at the top level (README's spec sets it): it was read
    by nothing, and the VirtualService kept matching x-api-version."""
    spec = tmp_path / "rollout.yaml"
    spec.write_text("name: d\nheader: X-Colour\nrouter: {kind: istio, namespace: ml, app: d}\n")
    rendered = {d["kind"]: d for d in render("--spec", str(spec))}
    pin = rendered["VirtualService"]["spec"]["http"][0]
    assert pin["match"] == [
        {
            "headers": {"x-colour": {"exact": "blue"}},
            "withoutHeaders": {"x-colour": {"exact": "green"}},
        }
    ]

    spec.write_text("name: d\nheader: x-colour\nrouter: {kind: istio, header: x-api-version}\n")
    result = CliRunner().invoke(app, ["rollout", "validate", str(spec)])
    assert result.exit_code == 2
    assert "header 'x-colour' and router.header 'x-api-version' differ" in result.output


@pytest.mark.parametrize(
    ("router", "message"),
    [
        pytest.param(
            "namespace: Prod", "router.namespace: 'Prod' is not a Kubernetes",
            id="bad-namespace",
        ),
        pytest.param(
            "app: churn_model", "router.app: 'churn_model' is not a DNS-1035",
            id="bad-app",
        ),
        pytest.param(
            "app: 3d-scorer", "router.app: '3d-scorer' must start with a letter",
            id="app-starting-with-a-digit",
        ),
        pytest.param(
            "hosts: ['http://diabetes.example.com']",
            "router.hosts: 'http://diabetes.example.com' is not a host name",
            id="host-as-a-url",
        ),
        pytest.param("hosts: []", "needs at least one host", id="no-host"),
        pytest.param(
            "ingress_gateway: 'aks gw'",
            "router.ingress_gateway: 'aks gw' is not a label value",
            id="gateway-label-with-a-space",
        ),
    ],
)  # fmt: skip
def test_rollout_validate_refuses_what_the_router_would(
    tmp_path: Path, router: str, message: str
) -> None:
    # `validate` said ok to these; `run` then failed at its first step, `manifests --spec` too.
    spec = tmp_path / "rollout.yaml"
    spec.write_text(f"name: diabetes\nrouter: {{kind: istio, {router}}}\n")
    result = CliRunner().invoke(app, ["rollout", "validate", str(spec)])
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        pytest.param("diabetes.example.com", None, id="fqdn"),
        pytest.param("*", None, id="any-host"),
        pytest.param("*.example.com", None, id="wildcard-first-label"),
        pytest.param("diabetes.example.com.", None, id="trailing-dot"),
        pytest.param("10.0.0.7", None, id="ip-address"),
        pytest.param("::1", "an IPv6 address", id="ipv6-loopback"),
        pytest.param("2001:db8::1", "an IPv6 address", id="ipv6"),
        pytest.param("fe80::1%eth0", "an IPv6 address", id="ipv6-with-a-zone"),
        pytest.param("http://diabetes.example.com", "no scheme", id="scheme"),
        pytest.param("diabetes.example.com:80", "no port", id="port"),
        pytest.param("diabetes.example.com/score", "no path", id="path"),
        pytest.param("Diabetes.example.com", "lower case only", id="upper-case"),
        pytest.param("diabetes", "a short name", id="short-name"),
        pytest.param("*diabetes.example.com", "a partial wildcard", id="partial-wildcard"),
        pytest.param("diabetes.*.example.com", "`*` only as the whole first label",
                     id="wildcard-inside"),
        pytest.param("*.", "label '' is no DNS-1123 label", id="wildcard-of-nothing"),
        pytest.param("-diabetes.example.com", "label '-diabetes' is no DNS-1123 label",
                     id="label-starting-with-a-dash"),
        pytest.param("a" * 64 + ".example.com", "is no DNS-1123 label", id="label-too-long"),
        pytest.param("diabetes.example.123", "top-level domain '123' is all digits",
                     id="numeric-top-level-domain"),
        pytest.param("x." * 127 + "com", "257 characters, not 1 to at most 255", id="too-long"),
    ],
)  # fmt: skip
def test_router_hosts_are_checked_as_istio_checks_them_at_spec_load(
    host: str, problem: str | None
) -> None:
    """Was: upper case, a short name, a partial wildcard, a numeric top-level domain, an IPv6
    address (no dot: Istio's short-name rule comes before its IP waiver) taken; the
    Gateway (or the VirtualService) was then refused by Istio's webhook at the first deploy, or
    (upper case) served no request."""
    raw = {"name": "diabetes", "router": {"kind": "istio", "hosts": ["churn.example.com", host]}}
    if problem is None:
        assert spec_from_dict(raw).router.hosts[-1] == host  # type: ignore[union-attr]
        return
    with pytest.raises(ConfigError) as caught:
        spec_from_dict(raw)
    said = str(caught.value)
    assert f"router.hosts: {host!r} is not a host name Istio takes: " in said
    assert problem in said


# ---- the Helm chart ---------------------------------------------------------------------------
# helm is not installable here, so the chart keeps to a small subset of Go templates (values,
# integers, "strings", `quote`, `required`, `fail`, `if`, `not`, `and`, `ne`, `add`, `lt`, `int`,
# `contains`, `index`, `range`)
# that this renderer implements, and must
# render to exactly the objects the Python builders make: chart, `manifests` and router cannot
# drift apart.
CHART = Path(__file__).parents[2] / "charts" / "aml-rollout"
_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


class RequiredValueError(Exception):
    """What `helm template` reports (and exits on) when a `required` value is missing."""


class ChartFailError(Exception):
    """What `helm template` reports (and exits on) when a template calls `fail`."""


def _words(expr: str) -> list[str]:
    """A template call's words: `ne (add .a .b) 100` -> ["ne", "(add .a .b)", "100"]."""
    words, depth, quoted, start = [], 0, False, 0
    for i, char in enumerate(expr + " "):
        if char == '"':
            quoted = not quoted
        elif not quoted and char in "()":
            depth += 1 if char == "(" else -1
        elif char == " " and not quoted and depth == 0:
            if expr[start:i]:
                words.append(expr[start:i])
            start = i + 1
    return words


def render_template(text: str, root: dict[str, Any]) -> str:
    tokens: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for match in _ACTION.finditer(text):
        literal = text[pos : match.start()]
        literal = literal.lstrip() if trim_next else literal
        tokens.append(("text", literal.rstrip() if match.group(1) else literal))
        tokens.append(("action", match.group(2)))
        pos, trim_next = match.end(), bool(match.group(3))
    tail = text[pos:]
    tokens.append(("text", tail.lstrip() if trim_next else tail))

    def value(expr: str, dot: Any) -> Any:
        if expr.startswith("not "):
            return not value(expr.removeprefix("not ").strip(), dot)
        if expr.startswith("(") and expr.endswith(")"):
            return value(expr[1:-1].strip(), dot)
        if expr.startswith("contains "):  # contains "substring" .Values.x (sprig's order)
            quoted, _, subject = expr.removeprefix("contains ").partition(" ")
            return json.loads(quoted) in str(value(subject.strip(), dot))
        if re.fullmatch(r"-?\d+", expr):
            return int(expr)
        if re.fullmatch(r'"[^"]*"', expr):
            return json.loads(expr)
        words = _words(expr)
        if words[0] == "index" and len(words) == 3:  # index .Values.list 0
            return value(words[1], dot)[value(words[2], dot)]
        if words[0] == "fail":  # fail "message"
            raise ChartFailError(json.loads(words[1]))
        if words[0] == "and":  # true when every argument is (Go's empty values are false)
            return all(value(word, dot) for word in words[1:])
        if words[0] == "int" and len(words) == 2:  # sprig's int (Helm reads numbers as floats)
            return int(value(words[1], dot))
        if words[0] in ("ne", "add") and len(words) == 3:  # Go's rules: any int type, strings
            left, right = (value(word, dot) for word in words[1:])
            return left != right if words[0] == "ne" else int(left) + int(right)
        if words[0] == "lt" and len(words) == 3:  # both of one type, as Go's lt needs
            left, right = (value(word, dot) for word in words[1:])
            assert type(left) is type(right), f"lt of {left!r} and {right!r}"
            return left < right
        head, *filters = (part.strip() for part in expr.split("|"))
        message = None
        if head.startswith("required "):  # required "message" .Values.x
            quoted, _, head = head.removeprefix("required ").rpartition(" ")
            message = json.loads(quoted)
        if head.startswith("toYaml "):  # toYaml .Values.x: block YAML, no trailing new line
            subject = value(head.removeprefix("toYaml ").strip(), dot)
            node = yaml.safe_dump(subject, default_flow_style=False, sort_keys=False).rstrip()
        else:
            node = root if head.startswith("$") else dot
            for key in head.lstrip("$").split(".")[1:]:
                node = node[key] if key else node
        if message is not None and node in (None, ""):  # Helm's rule: nil or empty fails
            raise RequiredValueError(message)
        for name in filters:
            if name.startswith("nindent "):  # a new line, then every line indented
                pad = " " * int(name.removeprefix("nindent "))
                node = "".join(f"\n{pad}{line}" for line in str(node).splitlines())
                continue
            assert name == "quote", f"template function {name!r} not supported by this renderer"
            node = json.dumps(str(node))
        return node

    def run(i: int, dot: Any, out: list[str], live: bool = True) -> int:
        """Render from token i to its `end`; not `live`: only find that end (evaluate nothing)."""
        while i < len(tokens):
            kind, body = tokens[i]
            if kind == "text":
                out.append(body)
            elif body == "end":
                return i
            elif body.startswith(("if ", "range ", "with ")):
                keyword, expr = body.split(" ", 1)
                end = run(i + 1, dot, [], live=False)  # find the matching end
                if live:
                    subject = value(expr, dot)
                    items = (
                        list(subject)
                        if keyword == "range"
                        else [(dot if keyword == "if" else subject)]
                        if subject
                        else []
                    )
                    for item in items:
                        run(i + 1, item, out)
                i = end
            elif live:
                rendered = value(body, dot)
                out.append(str(rendered).lower() if isinstance(rendered, bool) else str(rendered))
            i += 1
        return i

    out: list[str] = []
    run(0, root, out)
    return "".join(out)


class HelmYamlLoader(yaml.SafeLoader):
    """YAML as Helm reads a rendered chart (go-yaml v2's YAML 1.1): PyYAML's, plus y / Y / n / N
    as booleans, which PyYAML leaves strings."""

    bool_values: ClassVar[dict[str, bool]] = {
        **yaml.SafeLoader.bool_values,
        "y": True,
        "n": False,
    }


HelmYamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile("^[yYnN]$"), list("yYnN"))


def render_chart(values: dict[str, Any], namespace: str) -> list[dict[str, Any]]:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    root = {"Values": {**defaults, **values}, "Release": {"Namespace": namespace}}
    docs = []
    for template in sorted((CHART / "templates").glob("*.yaml")):
        rendered = render_template(template.read_text(), root)
        docs += [d for d in yaml.load_all(rendered, Loader=HelmYamlLoader) if d]
    return docs


def by_name(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] != "Namespace"}


@pytest.mark.parametrize(
    ("values", "releases"),
    [
        pytest.param({}, {}, id="defaults"),
        pytest.param(
            {
                "app": "diabetes",
                "hosts": ["a.example.com", "b.example.com"],
                "port": 8080,
                "header": "x-colour",
                "green": {
                    "image": V1.image,
                    "model": V1.model,
                    "version": V1.version,
                    "sha256": V1.sha256,
                },
            },
            {Colour.GREEN: V1},
            id="green-deployed-custom",
        ),
        pytest.param(
            {"ingressGateway": "aks-istio-ingressgateway-external"}, {}, id="aks-istio-add-on"
        ),
    ],
)
def test_the_chart_renders_what_the_router_builds(
    values: dict[str, Any], releases: dict[Colour, Any]
) -> None:
    layout = m.IstioLayout(
        namespace="ml",
        app=values.get("app", "model"),
        hosts=tuple(values.get("hosts", ["*"])),
        port=values.get("port", 80),
        header=values.get("header", "x-api-version"),
        ingress_selector=(("istio", values.get("ingressGateway", "ingressgateway")),),
    )
    chart = by_name(render_chart(values, "ml"))
    assert chart == by_name(m.bootstrap(layout, releases))
    for doc in chart.values():
        if doc["apiVersion"].startswith(m.ISTIO_GROUP):
            assert errors(doc) == []


# Words YAML 1.1 (Helm's parser, HelmYamlLoader) reads as booleans or null; all valid DNS labels.
@pytest.mark.parametrize("word", ["on", "off", "yes", "no", "true", "null", "y", "n"])
def test_the_chart_renders_yaml_1_1_words_as_the_strings_they_are(word: str) -> None:
    """Was: `--set app=on` rendered `app: on` in labels and selectors, which Helm's YAML
    parser reads as true: a label that is no string, refused by the API server, and a chart
    that no longer matched `aml-rollout manifests --app on` (which quotes it)."""
    values = {
        "app": word,
        "header": word,
        "ingressGateway": word,
        "green": {"image": V1.image, "model": word, "version": word, "sha256": V1.sha256},
    }
    layout = m.IstioLayout(
        namespace=word, app=word, header=word, ingress_selector=(("istio", word),)
    )
    green = Release(model=word, version=word, sha256=V1.sha256, image=V1.image)
    assert by_name(render_chart(values, word)) == by_name(
        m.bootstrap(layout, {Colour.GREEN: green})
    )
    accounts = [
        d for d in render_chart({"serviceAccount": word}, "ml") if d["kind"] == "ServiceAccount"
    ]
    assert [a["metadata"]["name"] for a in accounts] == [word]


def test_the_chart_renderer_is_not_vacuous() -> None:
    text = (
        "a: {{ .Values.x | quote }}\n{{- if .Values.on }}\nb: 1\n{{- end }}\n"
        "l:\n{{- range .Values.l }}\n- {{ . }}\n{{- end }}\n"
        '{{- if not (contains "@" .Values.i) }}\nc: 1\n{{- end }}\n'
        '{{- if contains "@" .Values.i }}\nd: 1\n{{- end }}\n'
    )
    root = {"Values": {"x": 3, "on": False, "l": [1, 2], "i": "r/m@sha256:0"}}
    assert yaml.safe_load(render_template(text, root)) == {"a": "3", "l": [1, 2], "d": 1}
    sums = '{{- if ne (add .Values.a .Values.b) 100 }}{{ fail "not 100" }}{{- end }}ok'
    assert render_template(sums, {"Values": {"a": 60, "b": 40}}) == "ok"
    with pytest.raises(ChartFailError, match="not 100"):
        render_template(sums, {"Values": {"a": 60, "b": 60}})
    both = "{{- if and .Values.a (not .Values.b) }}yes{{- end }}"
    assert [
        render_template(both, {"Values": {"a": a, "b": b}})
        for a, b in [(1, ""), (0, ""), (1, "x"), (0, "x")]
    ] == ["yes", "", "", ""]
    first = '{{ if ne (index .Values.l 0) "*" }}{{ index .Values.l 0 }}{{ end }}'
    assert [render_template(first, {"Values": {"l": hosts}}) for hosts in (["*"], ["a", "*"])] == [
        "",
        "a",
    ]


@pytest.mark.parametrize(
    ("hosts", "curl"),
    [
        pytest.param(["*"], "curl ", id="any-host"),
        pytest.param(
            ["churn.example.com", "churn.internal"], "curl -H 'Host: churn.example.com' ",
            id="hosts-set",
        ),
    ],
)  # fmt: skip
def test_the_chart_notes_curl_the_host_the_gateway_serves(hosts: list[str], curl: str) -> None:
    """Was: always `curl http://$INGRESS_IP/score`: with `hosts` set (as the docs tell a second
    model to) a request to the IP matches none of its hosts: Envoy answers 404, or the first
    model's `*` answers it."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    root = {"Values": {**defaults, "hosts": hosts}, "Release": {"Namespace": "ml"}}
    notes = render_template((CHART / "templates" / "NOTES.txt").read_text(), root)
    lines = [line.strip() for line in notes.splitlines() if line.strip().startswith("curl ")]
    assert [line.partition("#")[0].rstrip() for line in lines] == [
        f"{curl}http://$INGRESS_IP/score",
        f"{curl}-H 'x-api-version: blue' http://$INGRESS_IP/score",
    ]


@pytest.mark.parametrize(("green", "blue"), [(60, 60), (100, 10), (50, 0)])
def test_the_chart_refuses_weights_that_do_not_sum_to_100(green: int, blue: int) -> None:
    # Was rendered, and the router refused the route at `run` ("invalid weights").
    with pytest.raises(ChartFailError, match=r"weights.green \+ weights.blue must be 100"):
        render_chart({"weights": {"green": green, "blue": blue}}, "ml")
    assert render_chart({"weights": {"green": 90, "blue": 10}}, "ml")


@pytest.mark.parametrize("replicas", [0, -1])
def test_the_chart_refuses_a_colour_without_pods(replicas: int) -> None:
    # Was rendered: `replicas: 0` Deployments, and Istio's 503 for every request they were
    # weighted for; the spec (router.replicas) and `manifests --replicas` refuse it.
    with pytest.raises(ChartFailError, match=r"replicas must be at least 1"):
        render_chart({"replicas": replicas}, "ml")
    assert render_chart({"replicas": 1}, "ml")


def _colour(image: str) -> dict[str, str]:
    return {"image": image, "model": "diabetes", "version": "1", "sha256": ""}


@pytest.mark.parametrize(
    ("values", "refused"),
    [
        pytest.param(
            {"green": _colour("r/diabetes:1"), "weights": {"green": 50, "blue": 50}},
            "blue",
            id="weight-to-a-blue-with-no-image",
        ),
        pytest.param(
            {"blue": _colour("r/diabetes:2")}, "green", id="the-default-weight-to-a-green-with-none"
        ),
    ],
)
def test_the_chart_refuses_traffic_to_a_colour_it_deploys_no_pod_for(
    values: dict[str, Any], refused: str
) -> None:
    # Rendered, and half the users got Istio's 503 (no endpoints behind <app>-blue) right after
    # `helm install`: what the router itself refuses ("Deployment does not exist").
    with pytest.raises(ChartFailError, match=rf"weights.{refused} .* {refused}.image is empty"):
        render_chart(values, "ml")


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(
            {"green": _colour("r/diabetes:1"), "blue": _colour("r/diabetes:2")}, id="both-deployed"
        ),
        pytest.param(
            {"blue": _colour("r/diabetes:2"), "weights": {"green": 0, "blue": 100}},
            id="blue-only-with-all-the-traffic",
        ),
        # Nothing served yet (as `manifests` with no release, and `helm lint`'s defaults).
        pytest.param({"weights": {"green": 50, "blue": 50}}, id="no-image-at-all"),
    ],
)
def test_the_chart_renders_traffic_to_deployed_colours(values: dict[str, Any]) -> None:
    assert render_chart(values, "ml")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_real_kubectl_applies_the_manifests_and_the_router_takes_over(tmp_path: Path) -> None:
    out = tmp_path / "k8s.yaml"
    CliRunner().invoke(
        app, ["manifests", "-n", "ml", "--app", "diabetes", "--green-image", V1.image or "",
              "-o", str(out)],
    )  # fmt: skip
    env = {**os.environ, "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none")}
    layout = m.IstioLayout(namespace="ml", app="diabetes")
    with FakeKubeApiServer() as api:

        def kubectl(*args: str) -> str:
            done = subprocess.run(
                ["kubectl", "--server", api.url, *args],
                capture_output=True, text=True, env=env, timeout=60, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            return done.stdout

        applied = kubectl("apply", "--validate=false", "-f", str(out))
        assert applied.count(" created") == 15, applied
        router = router_on(api, layout)
        assert router.get_weights() == Weights.blue_at(0)
        router.deploy(Colour.BLUE, V2)
        router.set_weights(Weights.blue_at(50))
        assert "diabetes-blue" in kubectl("-n", "ml", "get", "deployments", "-o", "name")
        # Re-applying the bootstrap mid-rollout is a rollback, not a no-op: kubectl's three-way
        # merge patch replaces `spec.http` (a list) with the file's. docs/kubernetes.md says so.
        kubectl("apply", "--validate=false", "-f", str(out))
        assert router.get_weights() == Weights.blue_at(0)


@pytest.mark.parametrize(
    ("image", "model", "version"),
    [
        pytest.param("acr.io/team/diabetes:3", "diabetes", "3", id="tag"),
        pytest.param("localhost:5000/diabetes:3", "diabetes", "3", id="registry-port"),
        pytest.param(
            "acr.io/team/diabetes:3@sha256:" + "a" * 64, "diabetes", "3", id="tag-and-digest"
        ),
    ],
)
def test_release_from_image(image: str, model: str, version: str) -> None:
    from rollout.commands.manifests import release_from_image

    release = release_from_image(image)
    assert (release.model, release.version, release.image) == (model, version, image)


@pytest.mark.parametrize("colour", ["green", "blue"])
@pytest.mark.parametrize("missing", ["model", "version"])
def test_the_chart_refuses_an_image_without_its_release_identity(colour: str, missing: str) -> None:
    block = {"image": V1.image, "model": V1.model, "version": V1.version, "sha256": V1.sha256}
    with pytest.raises(RequiredValueError, match=rf"{colour}\.{missing} is required"):
        render_chart({colour: {**block, missing: ""}}, "ml")


def restricted_violations(deployment: dict[str, Any]) -> list[str]:
    """What Kubernetes' "restricted" Pod Security Standard refuses in `deployment`'s pods
    (the checks a pod of a plain image can fail: kubernetes.io/docs/concepts/security/
    pod-security-standards)."""
    pod = deployment["spec"]["template"]["spec"]
    pod_ctx = pod.get("securityContext") or {}
    found = []
    for c in pod["containers"]:
        ctx = c.get("securityContext") or {}
        if not (ctx.get("runAsNonRoot") or pod_ctx.get("runAsNonRoot")):
            found.append(f"{c['name']}: runAsNonRoot")
        if ctx.get("allowPrivilegeEscalation") is not False:
            found.append(f"{c['name']}: allowPrivilegeEscalation")
        if (ctx.get("capabilities") or {}).get("drop") != ["ALL"]:
            found.append(f"{c['name']}: capabilities.drop")
        seccomp = ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{c['name']}: seccompProfile")
    return found


def test_the_pods_pass_the_restricted_pod_security_standard() -> None:
    # Were refused in a namespace labelled pod-security.kubernetes.io/enforce=restricted (AKS
    # and most hardened clusters): the Deployment existed, no pod was ever created. The
    # package's image runs as uid 10001, so it meets the standard as it is.
    deployment = m.deployment(m.IstioLayout(namespace="ml", app="d"), Colour.BLUE, V1)
    assert restricted_violations(deployment) == []
    values = {"green": {"image": V1.image, "model": V1.model, "version": V1.version, "sha256": ""}}
    chart = by_name(render_chart(values, "ml"))
    assert restricted_violations(chart[("Deployment", "model-green")]) == []
    bare = copy.deepcopy(deployment)
    bare["spec"]["template"]["spec"].pop("securityContext", None)
    bare["spec"]["template"]["spec"]["containers"][0].pop("securityContext", None)
    assert len(restricted_violations(bare)) == 4  # the check is not vacuous


def test_a_scoring_container_that_dies_leaves_its_log_tail_as_its_termination_message() -> None:
    # The package image exits 3 on a model it cannot load, its reason in the log; with the
    # default terminationMessagePolicy (File, which the image never writes) a crash-looping
    # pod's `message` was empty and the deploy's error said only "exit 3: Error".
    deployment = m.deployment(m.IstioLayout(namespace="ml", app="d"), Colour.BLUE, V1)
    values = {"green": {"image": V1.image, "model": V1.model, "version": V1.version, "sha256": ""}}
    chart = by_name(render_chart(values, "ml"))[("Deployment", "model-green")]
    for built in (deployment, chart):
        (container,) = built["spec"]["template"]["spec"]["containers"]
        assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_the_chart_takes_the_scoring_container_s_resources() -> None:
    # An HPA on CPU needs requests, and pods without any are evicted first under memory
    # pressure: there was no way to give them but to edit the chart.
    resources = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}}
    values = {"green": {"image": V1.image, "model": V1.model, "version": V1.version, "sha256": ""}}
    for given in ({"resources": resources}, {}):
        chart = by_name(render_chart({**values, **given}, "ml"))
        container = chart[("Deployment", "model-green")]["spec"]["template"]["spec"]
        assert container["containers"][0].get("resources") == given.get("resources")


def test_the_help_names_the_namespace_and_app_used_when_none_is_given() -> None:
    """Without -n/--app the objects go to namespace `default` as app `model` (a Namespace
    object labelled for injection included): the help said neither, unlike every other default."""
    objects = render()
    assert {o["metadata"].get("namespace", o["metadata"]["name"]) for o in objects} == {"default"}
    assert any(o["metadata"]["name"] == "model-green" for o in objects)
    result = CliRunner().invoke(app, ["manifests", "--help"], env={"COLUMNS": "200"})
    flat = " ".join(result.stdout.split())
    assert "Namespace of every object (default)." in flat
    assert "objects are <app>-blue, <app>-gateway... (model)." in flat


@pytest.mark.parametrize(
    "version",
    ["1e3", "1E5", "1e-3", "+1e3", "0o17", "0b101", ".5", "1_000", "7", "1.10", "0x1F", "y", "N"],
)
def test_a_version_a_yaml_parser_reads_as_no_string_is_quoted(tmp_path: Path, version: str) -> None:
    # PyYAML quotes what YAML 1.1 reads as a number, not `1e3` or `0o17`, which kubectl's YAML
    # reads as numbers: "cannot unmarshal number into ... annotations of type string".
    result = CliRunner().invoke(
        app, ["manifests", "-n", "ml", "--app", "d", "--green-image", f"acr.io/d:{version}"]
    )
    assert result.exit_code == 0, result.output
    written = re.findall(r"aml-rollout\.io/version: (.*)", result.stdout)
    assert written and set(written) == {f"'{version}'"}
    if shutil.which("kubectl") is not None:
        out = tmp_path / "k8s.yaml"
        out.write_text(result.stdout, encoding="utf-8")
        decoded = subprocess.run(
            ["kubectl", "label", "--local", "-f", str(out), "x=y", "-o", "json"],
            capture_output=True, text=True, check=False, timeout=30,
        )  # fmt: skip
        assert decoded.returncode == 0, decoded.stderr


# ---- an API key from a Secret ------------------------------------------------------------------
# The scoring server requires `Authorization: Bearer <key>` on /score when AML_ROLLOUT_API_KEY is
# set (scoring/auth.py). Was: neither the chart nor `manifests` could set it, so an authenticated
# model service on Kubernetes meant hand-editing both Deployments.
SECRET = {"name": "diabetes-api-key", "key": "token"}
KEY_FROM_SECRET = {
    "name": "AML_ROLLOUT_API_KEY",
    "valueFrom": {"secretKeyRef": {"name": "diabetes-api-key", "key": "token"}},
}


def _env(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    container = m.scoring_container(deployment)
    assert container is not None
    return list(container.get("env") or [])


def _both_colours() -> dict[str, Any]:
    return {
        colour: {"image": r.image, "model": r.model, "version": r.version, "sha256": r.sha256}
        for colour, r in (("green", V1), ("blue", V2))
    }


def test_manifests_give_both_colours_the_api_key_from_a_secret() -> None:
    both = [
        "-n",
        "ml",
        "--app",
        "diabetes",
        "--green-image",
        "r.io/d:1",
        "--blue-image",
        "r.io/d:2",
    ]
    keyed = render(*both, "--api-key-secret", SECRET["name"], "--api-key-secret-key", "token")
    deployments = [d for d in keyed if d["kind"] == "Deployment"]
    assert [d["metadata"]["name"] for d in deployments] == ["diabetes-green", "diabetes-blue"]
    for deployment in deployments:
        colour = deployment["metadata"]["labels"]["version"]
        assert _env(deployment) == [{"name": m.COLOUR_ENV, "value": colour}, KEY_FROM_SECRET]
        assert restricted_violations(deployment) == []
    # The key defaults to `api-key`; with no Secret, no variable: no auth, as before.
    (default_key,) = {
        json.dumps(_env(d)[1]["valueFrom"])
        for d in render(*both, "--api-key-secret", "s")
        if d["kind"] == "Deployment"
    }
    assert json.loads(default_key) == {"secretKeyRef": {"name": "s", "key": "api-key"}}
    for deployment in (d for d in render(*both) if d["kind"] == "Deployment"):
        assert [e["name"] for e in _env(deployment)] == [m.COLOUR_ENV]


# Words YAML 1.1 reads as no string: valid Secret names and keys, which must stay strings.
@pytest.mark.parametrize(
    "secret",
    [
        pytest.param(SECRET, id="named"),
        pytest.param({"name": "on", "key": "y"}, id="yaml-1-1-words"),
        pytest.param({"name": "1e3", "key": "0o17"}, id="numbers-to-go-yaml"),
    ],
)
def test_the_chart_renders_the_api_key_secret_as_manifests_do(secret: dict[str, str]) -> None:
    layout = m.IstioLayout(
        namespace="ml", app="model", api_key_secret=secret["name"], api_key_secret_key=secret["key"]
    )
    chart = by_name(render_chart({**_both_colours(), "apiKeySecret": secret}, "ml"))
    assert chart == by_name(m.bootstrap(layout, {Colour.GREEN: V1, Colour.BLUE: V2}))
    for colour in ("green", "blue"):
        ref = _env(chart[("Deployment", f"model-{colour}")])[1]["valueFrom"]["secretKeyRef"]
        assert ref == secret  # strings, as given
    # The default: no Secret, no variable (the chart's values.yaml as shipped).
    plain = by_name(render_chart(_both_colours(), "ml"))
    assert [e["name"] for e in _env(plain[("Deployment", "model-blue")])] == [m.COLOUR_ENV]


def test_the_router_keeps_the_api_key_in_deployments_it_patches_and_sets_it_in_new_ones() -> None:
    """The controller changes a Deployment's image, colour and release by a merge patch of what
    differs; a merge patch replaces a list whole (`containers`, `env`), so the variable must be
    in what it sends. A blue it creates (the usual case: blue is deleted after each promotion)
    is built from the layout."""
    layout = m.IstioLayout(namespace="ml", app="diabetes", api_key_secret=SECRET["name"],
                           api_key_secret_key=SECRET["key"])  # fmt: skip
    chart = render_chart({"app": "diabetes", "green": _both_colours()["green"],
                          "apiKeySecret": SECRET}, "ml")  # fmt: skip
    with FakeKubeApiServer() as api:
        api.seed(m.namespace(layout), "namespaces")
        for doc in chart:  # what `helm install` does
            group, plural = RESOURCES[doc["kind"]]
            api.seed(doc, plural, group)
        plain = router_on(api, m.IstioLayout(namespace="ml", app="diabetes"))
        plain.deploy(Colour.GREEN, V2)  # a patch: image, release; the env list sent whole
        green = api.get("deployments", "diabetes-green", "ml", "apps")
        assert _env(green) == [{"name": m.COLOUR_ENV, "value": "green"}, KEY_FROM_SECRET]
        assert identity(plain.release(Colour.GREEN)) == identity(V2)
        patches = [r for r in api.requests if r.verb == "patch" and r.resource == "deployments"]
        assert len(patches) == 1
        router = router_on(api, layout)
        router.deploy(Colour.BLUE, V1)  # created
        blue = api.get("deployments", "diabetes-blue", "ml", "apps")
        assert _env(blue) == [{"name": m.COLOUR_ENV, "value": "blue"}, KEY_FROM_SECRET]
        router.set_weights(Weights.blue_at(100))
        router.deploy(Colour.GREEN, V1)  # the seed's Blue_Green: green takes blue's release
        router.set_weights(Weights.blue_at(0))
        router.remove(Colour.BLUE)
        green = api.get("deployments", "diabetes-green", "ml", "apps")
        assert _env(green) == [{"name": m.COLOUR_ENV, "value": "green"}, KEY_FROM_SECRET]
        assert identity(router.release(Colour.GREEN)) == identity(V1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["--api-key-secret", "Diabetes_Key"],
            "--api-key-secret: 'Diabetes_Key' is not a Secret name (a DNS-1123 subdomain",
            id="secret-name-with-capitals-and-underscore",
        ),
        pytest.param(
            ["--api-key-secret", "key-"], "--api-key-secret: 'key-' is not a Secret name",
            id="secret-name-ending-in-a-dash",
        ),
        pytest.param(
            ["--api-key-secret", "k" * 254], "is not a Secret name", id="secret-name-too-long"
        ),
        pytest.param(
            ["--api-key-secret", "s", "--api-key-secret-key", "api key"],
            "--api-key-secret-key: 'api key' is not a key of a Secret",
            id="key-with-a-space",
        ),
        pytest.param(
            ["--api-key-secret", "s", "--api-key-secret-key", "..token"],
            "--api-key-secret-key: '..token' is not a key of a Secret",
            id="key-starting-with-two-dots",
        ),
        pytest.param(
            ["--api-key-secret", "s", "--api-key-secret-key", ""],
            "--api-key-secret-key: '' is not a key of a Secret",
            id="empty-key",
        ),
        pytest.param(
            ["--api-key-secret-key", "token"],
            "--api-key-secret-key needs --api-key-secret",
            id="key-without-a-secret",
        ),
        pytest.param(
            # An unset shell variable: rendered, the service would have run without auth.
            ["--api-key-secret", ""], "--api-key-secret: '' is not a Secret name",
            id="empty-secret-name",
        ),
    ],
)  # fmt: skip
def test_a_bad_api_key_secret_is_one_config_error(args: list[str], message: str) -> None:
    # Rendered, the API server would refuse each Deployment (422), after `kubectl apply` had
    # created everything else.
    result = CliRunner().invoke(app, ["manifests", "--green-image", "r.io/d:1", *args])
    assert isinstance(result.exception, ConfigError), result.output
    assert message in str(result.exception)


def chart_schema_errors(values: dict[str, Any]) -> list[str]:
    """What Helm's values.schema.json check (install, upgrade, template, lint) reports for the
    chart's values.yaml overridden by `values`, as `<path>: <message>`."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    merged = {**defaults, **values}
    found = jsonschema.Draft7Validator(schema).iter_errors(merged)
    return [".".join(map(str, e.absolute_path)) + ": " + e.message for e in found]


@pytest.mark.parametrize(
    ("secret", "error"),
    [
        pytest.param({"name": "", "key": "api-key"}, None, id="default-no-auth"),
        pytest.param(SECRET, None, id="named"),
        pytest.param({"name": "a.b-c", "key": "A_b.c-1"}, None, id="dots-and-dashes"),
        pytest.param({"name": "Diabetes_Key", "key": "k"}, "apiKeySecret.name", id="bad-name"),
        pytest.param({"name": "k" * 254, "key": "k"}, "apiKeySecret.name", id="name-too-long"),
        pytest.param({"name": "s", "key": "api key"}, "apiKeySecret.key", id="key-with-a-space"),
        pytest.param({"name": "s", "key": ".."}, "apiKeySecret.key", id="key-dot-dot"),
        pytest.param({"name": "s", "key": ""}, "apiKeySecret.key", id="empty-key"),
        pytest.param({"name": True, "key": "k"}, "apiKeySecret.name", id="yaml-1-1-on-unquoted"),
        pytest.param({"name": "s"}, "apiKeySecret", id="key-dropped"),
    ],
)  # fmt: skip
def test_the_chart_refuses_an_api_key_secret_the_api_server_would(
    secret: dict[str, Any], error: str | None
) -> None:
    found = chart_schema_errors({"apiKeySecret": secret})
    if error is None:
        assert found == []
        assert render_chart({**_both_colours(), "apiKeySecret": secret}, "ml")
    else:
        assert found and all(e.startswith(f"{error}:") for e in found), found


@pytest.mark.parametrize(
    ("values", "error"),
    [
        pytest.param({}, None, id="the-defaults"),
        pytest.param({"header": "x-colour"}, None, id="a-header-of-yours"),
        pytest.param({"global": {"imageRegistry": "r.io"}}, None, id="a-parent-chart-s-global"),
        pytest.param({"header": "X-Colour"}, "header: 'X-Colour' does not match",
                     id="header-not-lower-case"),
        pytest.param({"header": "x colour"}, "header: 'x colour' does not match",
                     id="header-with-a-space"),
        pytest.param({"header": ""}, "header: '' does not match", id="empty-header"),
        pytest.param({"hots": ["churn.example.com"]},
                     ": Additional properties are not allowed ('hots' was unexpected)",
                     id="a-misspelt-value"),
        pytest.param({"replica": 3},
                     ": Additional properties are not allowed ('replica' was unexpected)",
                     id="a-singular-for-a-plural"),
    ],
)  # fmt: skip
def test_the_chart_refuses_values_it_does_not_know_and_a_header_istio_would_not_match(
    values: dict[str, Any], error: str | None
) -> None:
    """Was taken: a misspelt value silently kept its default (`hots:` served `*`), and an
    upper-case header rendered a VirtualService match whose key Istio's API asks to be lower
    case (the spec's `header` is lower-cased, the chart's was not)."""
    found = chart_schema_errors(values)
    if error is None:
        assert found == []
    else:
        assert len(found) == 1 and error in found[0], found


@pytest.mark.parametrize(
    "host",
    [
        "*", "churn.example.com", "*.example.com", "churn.example.com.", "10.0.0.7",
        "a.b-1", "x." * 126 + "com",
    ],
)  # fmt: skip
def test_the_chart_takes_the_hosts_the_spec_takes(host: str) -> None:
    assert kubenames.host_problem(host) is None
    assert chart_schema_errors({"hosts": ["churn.example.com", host]}) == []


@pytest.mark.parametrize(
    "host",
    [
        "diabetes", "Diabetes.Example.com", "http://diabetes.example.com/x",
        "diabetes.example.com:80", "diabetes.example.com/score", "*diabetes.example.com",
        "diabetes.*.example.com", "*.", "diabetes.", "-diabetes.example.com",
        "a" * 64 + ".example.com", "diabetes.example.123", "::1", "010.0.0.1", "256.0.0.1",
        "x." * 127 + "com", "",
    ],
)  # fmt: skip
def test_the_chart_refuses_the_hosts_the_spec_refuses(host: str) -> None:
    """Was taken: `helm install --set hosts={diabetes}` (or a URL) was then refused by Istio's
    webhook mid-install, and a mixed-case host matched no request, while `manifests` and the
    spec's router.hosts refused them (`kubenames.host_problem`, which the schema follows)."""
    assert kubenames.host_problem(host) is not None
    found = chart_schema_errors({"hosts": ["churn.example.com", host]})
    assert len(found) == 1 and found[0].startswith("hosts.1: "), found


@pytest.mark.parametrize(
    ("values", "error"),
    [
        pytest.param({"hosts": []}, "hosts: [] should be non-empty", id="no-host"),
        pytest.param({"green": {"imgae": "r.io/diabetes:1"}},
                     "green: Additional properties are not allowed ('imgae' was unexpected)",
                     id="green-image-misspelt"),
        pytest.param({"blue": {"image": "", "modle": "m"}},
                     "blue: Additional properties are not allowed ('modle' was unexpected)",
                     id="blue-model-misspelt"),
        pytest.param({"weights": {"green": 100, "bleu": 0}},
                     "weights: Additional properties are not allowed ('bleu' was unexpected)",
                     id="weights-blue-misspelt"),
        pytest.param({"apiKeySecret": {"name": "", "key": "k", "nmae": "s"}},
                     "apiKeySecret: Additional properties are not allowed ('nmae' was unexpected)",
                     id="api-key-secret-name-misspelt"),
    ],
)  # fmt: skip
def test_the_chart_refuses_no_host_and_a_misspelt_value_inside_a_block(
    values: dict[str, Any], error: str
) -> None:
    """Was taken: `green.imgae` was ignored, and green got no Deployment (an empty image); no
    host failed in a template (`index .Values.hosts 0`)."""
    found = chart_schema_errors(values)
    assert found == [error], found


def test_the_spec_gives_the_blue_the_router_creates_the_api_key(tmp_path: Path) -> None:
    # Was: no field for it: the blue each rollout creates (a promotion deletes blue) served
    # /score without auth beside a green that asked for a key.
    from rollout.config import IstioRouterConfig

    cfg = IstioRouterConfig(
        namespace="ml", app="diabetes", api_url="http://127.0.0.1:1",
        api_key_secret=SECRET["name"], api_key_secret_key=SECRET["key"],
    )  # fmt: skip
    layout = IstioRouter.from_config(cfg).layout
    blue = m.deployment(layout, Colour.BLUE, V1)
    assert _env(blue) == [{"name": m.COLOUR_ENV, "value": "blue"}, KEY_FROM_SECRET]
    spec = tmp_path / "rollout.yaml"
    spec.write_text(yaml.safe_dump({"router": cfg.model_dump(include={"kind", "namespace",
        "app", "api_key_secret", "api_key_secret_key"})}))  # fmt: skip
    docs = render("--spec", str(spec), "--green-image", "registry/diabetes:1")
    (green,) = [d for d in docs if d["kind"] == "Deployment"]
    assert _env(green)[-1] == KEY_FROM_SECRET  # manifests --spec takes it from the spec
    docs = render("--spec", str(spec), "--green-image", "registry/diabetes:1",
                  "--api-key-secret-key", "other")  # fmt: skip
    (green,) = [d for d in docs if d["kind"] == "Deployment"]
    assert _env(green)[-1]["valueFrom"]["secretKeyRef"] == {"name": SECRET["name"], "key": "other"}


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        pytest.param("api_key_secret", "Bad_Name", "is not a Secret name", id="name"),
        pytest.param("api_key_secret_key", "..key", "is not a key of a Secret", id="key"),
    ],
)
def test_the_spec_refuses_an_api_key_secret_the_api_server_would(
    field: str, value: str, said: str
) -> None:
    from rollout.config import spec_from_dict

    router = {"kind": "istio", "api_url": "http://127.0.0.1:1", field: value}
    with pytest.raises(ConfigError, match=rf"router.*{field}.*{said}"):
        spec_from_dict({"name": "x", "router": router, "metrics": {"kind": "static"}})
