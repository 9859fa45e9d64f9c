"""The rollout spec: one YAML file in, one validated `RolloutSpec` out.

The spec is validated once, here, at the edge; the core and the controller receive models, never
dicts. Backend configurations are discriminated unions on `kind`, so an unknown kind or a field of
the wrong backend is an error that names the field, not a silent fallback.

    name: churn-model
    router:   {kind: envoy, admin_url: "http://127.0.0.1:9901", routes_file: routes.yaml}
    metrics:  {kind: prometheus, url: "http://127.0.0.1:9090", preset: envoy}
    steps: [0, 5, 25, 50, 100]       # or: seed  (Blue_0, Blue_50, Blue_100, Blue_Green, Green_100)
    mirror_percent: 5                # copied to blue during the 0 % step: the shadow step
    analysis:
      interval_s: 10
      alpha: 0.05
      errors:  {max_ratio: 2.0, max_rate: 0.1, negligible_rate: 0.001}
      latency: {threshold: baseline_p99}
      on_inconclusive: hold

Every weight plan ends at 100: reaching it is promotion (blue at 100 %, green replaced by blue's
release, traffic back to green, blue removed), exactly the seed's Blue_100 → Blue_Green → Green_100.
A step of weight 0 (the seed's Blue_0) deploys blue with no default traffic; with `mirror_percent`
it is the shadow step, judged on blue's answers to copies of live requests that no user receives,
and without, it is not analysed.
"""

from __future__ import annotations

import datetime
import difflib
import functools
import itertools
import math
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from rollout.core.types import Colour, ColourCounts, Phase, Release
from rollout.errors import ConfigError
from rollout.kubenames import (
    ROLLOUT_NAME_MAX,
    app_problem,
    hosts_problem,
    label_value_problem,
    namespace_problem,
    rollout_name_problem,
    secret_key_problem,
    secret_name_problem,
)

#: The seed's rollout (MLOpsPython): Blue_0, Blue_50, Blue_100, then Blue_Green and Green_100.
SEED_STEPS: tuple[int, ...] = (0, 50, 100)

#: Default plan. A shadow step first (0 %: blue judged on a mirror of DEFAULT_MIRROR_PERCENT of
#: live traffic, its answers never served) catches big regressions before any user sees one;
#: short early steps at small weight catch the rest while exposing few users; the decisive "not
#: worse" evidence accumulates at 50 %, where the canary/baseline comparison carries the most
#: information per request (p0(1-p0) is largest at p0 = 1/2). See docs/engine.md.
DEFAULT_STEPS: tuple[int, ...] = (0, 5, 25, 50, 100)
DEFAULT_MIRROR_PERCENT = 5
#: The default plan where mirrored requests cannot be counted (the istio preset).
LIVE_STEPS: tuple[int, ...] = (5, 25, 50, 100)

_M = TypeVar("_M", bound=BaseModel)

#: Envoy's default histogram bucket bounds (milliseconds).
ENVOY_BUCKETS_MS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Problem:
    """A cross-field problem of a model: the field at fault (a path in it), its value, why."""

    loc: tuple[str, ...]
    value: Any
    why: str


#: A cross-field check (`_cross_field`): a model's method yielding its problems.
_Check = Callable[[Any], Iterator[_Problem]]
_CHECKS: set[int] = set()  # by id: a class's namespace also holds unhashable values


def _cross_field(check: Callable[[_M], Iterator[_Problem]]) -> Callable[[_M], Iterator[_Problem]]:
    """Mark a method as a cross-field check of its model, run once the fields are valid."""
    _CHECKS.add(id(check))
    return check


@functools.cache
def _checks_of(model: type[BaseModel]) -> list[_Check]:
    """The cross-field checks of `model` and its bases, the bases' first, in definition order."""
    return [
        check
        for cls in reversed(model.__mro__)
        for check in vars(cls).values()
        if id(check) in _CHECKS
    ]


class _Model(BaseModel):
    # No field means anything by .inf or .nan: a timeout or an interval of .inf would reach
    # time.sleep and httpx, a NaN compares false with every bound a validator checks. The one
    # exception, a static tick's +Inf bucket, dumps as .inf (pydantic's default, null, would
    # not load again).
    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, ser_json_inf_nan="constants"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        """No text of a spec holds a NUL byte (`"\\0"` in YAML): no file name, name or URL can,
        and a path with one loaded, then failed `run` with a traceback ("embedded null byte").
        Each section says it of its own fields (a text, a list of them, or a mapping's values:
        `match_labels`; a section within is a model, and says it itself)."""
        if not isinstance(data, dict):
            return data
        texts: list[tuple[tuple[str, ...], Any]] = []  # (where, a value holding texts)
        for key, value in data.items():
            if not isinstance(key, str):
                continue
            field = cls.model_fields.get(key)
            if isinstance(value, dict) and field and typing.get_origin(field.annotation) is dict:
                texts.extend(((key, str(name)), text) for name, text in value.items())
            else:
                texts.append(((key,), value))
        found = [
            InitErrorDetails(
                type=PydanticCustomError(
                    "spec", "holds a NUL byte (\\0), which no path, name or URL can hold"
                ),
                loc=loc,
                input=value,
            )
            for loc, value in texts
            if any(
                isinstance(text, str) and "\0" in text
                for text in (value if isinstance(value, list) else [value])
            )
        ]
        if found:
            raise ValidationError.from_exception_data(cls.__name__, found)
        return data

    @model_validator(mode="after")
    def _cross_fields(self) -> Self:
        """Every problem of every `_cross_field` check, in one ValidationError naming each
        field: raised at the first, a spec with three mistakes took three runs to hear of them."""
        found = [
            InitErrorDetails(
                type=PydanticCustomError("spec", "{problem}", {"problem": problem.why}),
                loc=problem.loc,
                input=problem.value,
            )
            for check in _checks_of(type(self))
            for problem in check(self)
        ]
        if found:
            raise ValidationError.from_exception_data(type(self).__name__, found)
        return self


#: A number of the spec: an int or a float as YAML read it. pydantic's lax mode took `"5"` as 5
#: and `yes` as 1 (while `"5s"` was refused): a number a template quoted, or a value misplaced,
#: loaded as if meant. Strict, it takes neither (an int is still a float); `describe_errors`
#: says why.
Number = Annotated[float, Strict()]
#: A whole number of the spec: an int as YAML read it (not `15.0`, nor text, nor a boolean).
WholeNumber = Annotated[int, Strict()]
#: A switch of the spec: true or false as YAML read it. Lax, pydantic took `"no"` as false and
#: `1` as true: `enabled: "no"` from a template, or a count misplaced, loaded as if meant.
Flag = Annotated[bool, Strict()]


#: An HTTP header name: a token of RFC 9110 (letters, digits and !#$%&'*+-.^_`|~).
_HEADER_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def header_name(header: str) -> str:
    """`header` lower-cased (HTTP/2 and Envoy match names lower-case); ValueError if it is no
    header name — it would render a route no proxy accepts, or one no request ever matches."""
    if not _HEADER_TOKEN.fullmatch(header):
        raise ValueError(f"not a valid HTTP header name: {header!r}")
    return header.lower()


HeaderName = Annotated[str, AfterValidator(header_name)]


def http_url(url: str) -> str:
    """`url`; ValueError unless it is an http:// or https:// URL with a host (and a valid port)."""
    if not url.startswith(("http://", "https://")) or any(
        c.isspace() or not c.isprintable() for c in url
    ):
        raise ValueError(f"must be an http:// or https:// URL, got {url!r}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValueError(f"not a usable URL ({exc}): {url!r}") from None
    if not parts.hostname:
        raise ValueError(f"has no host: {url!r}")
    return url


#: What the spec's clients (httpx, the kubernetes client) are pointed at: `prometheus:9090` or
#: `127.0.0.1:9901` without a scheme loaded, then failed at the first request.
HttpUrl = Annotated[str, AfterValidator(http_url)]


def _refusing(problem: Callable[[Any], str | None]) -> AfterValidator:
    """A validator refusing what `problem` finds wrong with a value (None: nothing)."""

    def check(value: Any) -> Any:
        if (found := problem(value)) is not None:
            raise ValueError(found)
        return value

    return AfterValidator(check)


# What the API server would refuse at the first deploy, said by `rollout validate` instead.
KubeNamespace = Annotated[str, _refusing(namespace_problem)]
KubeApp = Annotated[str, _refusing(app_problem)]
KubeLabelValue = Annotated[str, _refusing(label_value_problem)]
KubeHosts = Annotated[list[str], _refusing(hosts_problem)]
KubeSecretName = Annotated[str, _refusing(lambda name: secret_name_problem(name) if name else None)]
KubeSecretKey = Annotated[str, _refusing(secret_key_problem)]


class ColourNames(_Model):
    """A name per colour (a cluster, a Service, a deployment, a label value)."""

    blue: str = Field(default=Colour.BLUE.value, min_length=1)
    green: str = Field(default=Colour.GREEN.value, min_length=1)

    def of(self, colour: Colour) -> str:
        """The name of one colour."""
        return self.blue if colour is Colour.BLUE else self.green


def _two_names(
    names: ColourNames, what: str, why: str, *, ignore_case: bool = False
) -> ColourNames:
    """`names`, refused when blue and green are one `what` (`why`: what would go wrong)."""
    if names.blue == names.green:
        raise ValueError(f"blue and green name the same {what}, {names.blue!r}: {why}")
    if ignore_case and names.blue.lower() == names.green.lower():
        raise ValueError(
            f"blue and green name the same {what}, {names.blue!r} and {names.green!r} (Azure ML "
            f"names ignore case): {why}"
        )
    return names


#: Why a metrics source reading one name for both colours is refused.
_SELF_COMPARED = "the candidate would be compared with itself"


# --------------------------------------------------------------------------------------- routers


class MemoryRouterConfig(_Model):
    """In-process router for tests and dry runs.

    With `state_file` the routes survive the process (like a real data plane survives a controller
    crash); with `journal` every applied action is appended as one JSON line (for audits and the
    kill/resume test).
    """

    kind: Literal["memory"] = "memory"
    state_file: Path | None = None
    journal: Path | None = None

    @property
    def identity(self) -> str:
        """The data plane this drives, in words (a stored rollout remembers it: RolloutSpec)."""
        return f"memory {self.state_file.resolve()}" if self.state_file else "memory"


#: The longest `timeout_s` of one request to a router's or metrics source's API: ten minutes, the
#: longest a Log Analytics query may run (Prometheus gives up on a query after 2 minutes by
#: default). Unbounded, 1e10 s loaded and then crashed `run` (the socket refuses it).
MAX_REQUEST_TIMEOUT_S = 600


class EnvoyRouterConfig(_Model):
    """Local Envoy: route table from an RDS file replaced atomically; admin API to verify."""

    kind: Literal["envoy"] = "envoy"
    admin_url: HttpUrl = "http://127.0.0.1:9901"
    routes_file: Path
    # Envoy requires a virtual host's name and a domain; a nameless route table is no RDS name.
    route_name: str = Field(default="aml_route", min_length=1)
    virtual_host: str = Field(default="aml", min_length=1)
    domains: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["*"], min_length=1
    )
    clusters: ColourNames = Field(default_factory=ColourNames)
    pinned_clusters: ColourNames = Field(
        default_factory=lambda: ColourNames(blue="blue-pinned", green="green-pinned")
    )
    #: Requests carrying `<header>: blue|green` go to that colour's pinned cluster.
    header: HeaderName = "x-api-version"
    #: Where the router records which release each colour serves (Envoy does not know);
    #: default `releases.json` next to `routes_file`.
    releases_file: Path | None = None
    #: Where the scoring processes started by `deploy` are recorded (default `workloads/` next to
    #: `routes_file`); the local stack stops every process recorded there.
    workloads_dir: Path | None = None
    timeout_s: Number = Field(default=5.0, gt=0, le=MAX_REQUEST_TIMEOUT_S)

    @field_validator("clusters")
    @classmethod
    def _two_clusters(cls, names: ColourNames) -> ColourNames:
        return _two_names(names, "cluster", "Envoy would read one weight for both colours")

    @field_validator("pinned_clusters")
    @classmethod
    def _two_pinned_clusters(cls, names: ColourNames) -> ColourNames:
        return _two_names(names, "cluster", "a pinned request would reach either colour")

    @_cross_field
    def _pinned_apart_from_weighted(self) -> Iterator[_Problem]:
        """Envoy refuses a bootstrap naming a cluster twice."""
        weighted = {self.clusters.of(colour): colour for colour in Colour}
        for colour in Colour:
            name = self.pinned_clusters.of(colour)
            if name in weighted:
                yield _Problem(
                    ("pinned_clusters", colour.value),
                    name,
                    f"{name!r} is a weighted cluster (router.clusters.{weighted[name].value}): "
                    "a pinned cluster needs a name of its own",
                )

    @property
    def identity(self) -> str:
        """The data plane this drives: its route file (the admin port may change between runs)."""
        return f"envoy {self.routes_file.resolve()}"


class KubeApiConfig(_Model):
    """How to reach a Kubernetes API server (the istio router and the kubernetes state store).

    `api_url` (e.g. `kubectl proxy` at http://127.0.0.1:8001), else the in-cluster service
    account (`in_cluster`), else the kubeconfig (`kubeconfig`, default ~/.kube/config, and
    `context`). One rule, in `rollout.kubeapi.api_client`.
    """

    api_url: HttpUrl | None = None
    kubeconfig: Path | None = None
    context: str | None = None
    in_cluster: Flag = False


def _wait_at_least(least: float, wait: str) -> AfterValidator:
    """A wait's floor: a spec error below `least` seconds, the shortest `wait` (in words)."""

    def check(seconds: float) -> float:
        if seconds < least:
            raise PydanticCustomError(
                "spec",
                "{seconds} s is below {least} s, the shortest wait for {wait} (the value is in "
                "seconds)",
                {"seconds": f"{seconds:g}", "least": f"{least:g}", "wait": wait},
            )
        return seconds

    return AfterValidator(check)


#: The shortest `ready_timeout_s`: a new pod is scheduled, starts its container and the scoring
#: server (which loads its model), then passes a readiness probe sent every 5 s
#: (`istio_manifests.deployment`), and the router looks every 2 s; a rolling update of several
#: replicas does this batch by batch. Below this, every candidate's deploy fails as if the model
#: were at fault (0.5 s was accepted).
MIN_READY_TIMEOUT_S = 30.0


class IstioRouterConfig(KubeApiConfig):
    """Istio on Kubernetes: a VirtualService with header routes first, then the weighted route.

    Object names derive from `app` (docs/kubernetes.md): Deployments and Services
    `<app>-blue|green`, pinned Services `<app>-<colour>-pinned`, Gateway `<app>-gateway`,
    VirtualService `<app>`. The API server: see KubeApiConfig.
    """

    kind: Literal["istio"] = "istio"
    namespace: KubeNamespace = "default"
    app: KubeApp = "model"
    hosts: KubeHosts = Field(default_factory=lambda: ["*"])
    #: Requests carrying `<header>: blue|green` go to that colour's pinned Service.
    header: HeaderName = "x-api-version"
    port: WholeNumber = Field(default=80, gt=0, lt=65536)
    container_port: WholeNumber = Field(default=8000, gt=0, lt=65536)
    #: Pods of a Deployment the router creates (at least one: a canary without a pod took its
    #: share of traffic, answered 503, and was rolled back as a bad model).
    replicas: WholeNumber = Field(default=1, ge=1)
    #: How long `deploy` waits for the new pods to be available before failing.
    ready_timeout_s: Annotated[
        Number,
        _wait_at_least(
            MIN_READY_TIMEOUT_S,
            "new pods to be scheduled, start the scoring server and pass its readiness probe "
            "(every 5 s)",
        ),
    ] = 300.0
    #: The `istio:` label of the ingress gateway pods the Gateway binds to: `ingressgateway`
    #: for Istio's own install; AKS's Istio add-on labels its gateways
    #: `aks-istio-ingressgateway-external` / `-internal`.
    ingress_gateway: KubeLabelValue = "ingressgateway"
    #: The Secret whose `api_key_secret_key` the scoring containers of the Deployments the
    #: router creates get as AML_ROLLOUT_API_KEY ("": none, /score without auth), as the
    #: chart's `apiKeySecret` and `manifests --api-key-secret` give the ones they create: blue
    #: is created anew by each rollout (a promotion deletes it), so without this it served
    #: /score without auth where green asked for a key.
    api_key_secret: KubeSecretName = ""
    api_key_secret_key: KubeSecretKey = "api-key"  # noqa: S105 (the key's name, no secret)

    @property
    def identity(self) -> str:
        """The data plane this drives: its objects (not how the API server is reached, which
        differs between a controller in the cluster and an operator's kubeconfig)."""
        return f"istio {self.namespace}/{self.app}"


#: Azure ML's rule for an endpoint's or a deployment's name (azure-ai-ml checks it only when it
#: writes one: a rollout would fail at its first deploy, after `validate` said ok).
_AZURE_ML_NAME = re.compile(r"[a-zA-Z]([-a-zA-Z0-9]{1,30})[a-zA-Z0-9]")
_GUID = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


def azure_ml_name(name: str) -> str:
    """`name`; ValueError unless Azure ML takes it for an endpoint or a deployment."""
    if not _AZURE_ML_NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} is not an Azure ML endpoint or deployment name: 3 to 32 letters, digits "
            "and hyphens, starting with a letter, ending with a letter or digit"
        )
    return name


def guid(text: str, what: str) -> str:
    """`text`; ValueError unless it is a GUID (`what` says which ID is asked for)."""
    if not _GUID.fullmatch(text):
        raise ValueError(
            f"{text!r} is not {what}, a GUID such as 00000000-0000-0000-0000-000000000000"
        )
    return text


#: An ARM id of a workspace asset, as azure-ai-ml matches one (`is_ARM_id_for_resource`).
_ARM_ASSET = (
    r"/subscriptions/.*/resourceGroups/.*/providers/Microsoft\.MachineLearningServices/"
    r"workspaces/.*/{kind}/"
)
_ASSET_FORMS = {
    "environments": "`azureml:<name>:<version>`, `<name>@latest`, a curated "
    "`azureml:AzureML-...`, or an ARM or `azureml://registries/...` id; a container image is "
    "registered as an environment first",
    "codes": "`azureml:<name>:<version>` (no `@latest` for code), an ARM or "
    "`azureml://registries/...` id, or a local folder (uploaded)",
}


def is_local_code(ref: str) -> bool:
    """Whether a deployment's `code` names a folder of this machine (azure-ai-ml uploads it), not
    a code asset (`azureml:...`, an ARM id, a registry id): as `azure_ml_asset` tells them."""
    return not (
        re.match(_ARM_ASSET.format(kind="codes"), ref, re.IGNORECASE)
        or re.match("azureml://registries/", ref, re.IGNORECASE)
        or ref.startswith("azureml:")
    )


def azure_ml_asset(ref: str, kind: Literal["environments", "codes"]) -> str:
    """`ref`; ValueError when azure-ai-ml would refuse it as a deployment's environment or code
    (`upload_dependencies`, `OperationOrchestrator.get_asset_arm_id`), which it checks only when
    it writes the deployment: a rollout would fail at blue's turn, after `validate` said ok.
    What it passes on is taken (whether the asset exists is Azure's answer), in the form that
    names the asset: `azureml:name@latest` is returned as `name@latest`."""
    if re.match(_ARM_ASSET.format(kind=kind), ref, re.IGNORECASE) or re.match(
        "azureml://registries/", ref, re.IGNORECASE
    ):
        return ref
    if kind == "codes":
        if is_local_code(ref):
            return ref  # a local folder, uploaded as a code asset
        parsed = ref.removeprefix("azureml:")  # what azure-ai-ml parses for code
        if re.match(_ARM_ASSET.format(kind=kind), parsed, re.IGNORECASE):
            return ref  # `azureml:` + an ARM id
    else:
        if ref.removeprefix("azureml:").startswith("AzureML-"):
            return ref  # a curated environment, whose short form Azure resolves
        parsed = ref  # azure-ai-ml parses an environment with its `azureml:`
    if "/" in parsed and not parsed.startswith("/"):
        why = "not an asset reference (a container image? a path?)"
    elif kind == "environments" and (label := parsed.rpartition("@")[2]) and "@" in parsed:
        if label == "latest":  # the one label azure-ai-ml resolves (`name@` has no label)
            # Sent without `azureml:`: azure-ai-ml resolves `azureml:name@latest` as an asset
            # named `azureml:name`, which no workspace holds (a 404 at blue's deploy).
            return parsed.removeprefix("azureml:")
        why = f"label {label!r}: azure-ai-ml resolves only @latest"
    elif parsed.removeprefix("azureml:").partition(":")[2]:
        return ref  # `name:version`, `azureml:` or not
    else:
        why = "no version" + (" (code takes no @label)" if "@" in parsed else "")
    raise ValueError(f"{ref!r}: {why}; give {_ASSET_FORMS[kind]}")


#: The shortest `deploy_timeout_s`. Creating or updating a managed online deployment allocates
#: VMs (an update rolls its instances over), pulls the environment's image (or builds it
#: first), starts the scoring server and waits for Azure's readiness probe: minutes even with
#: the image cached; deleting one releases its VMs, creating the endpoint takes a minute or two.
#: azure-ai-ml polls each operation every 5 s. Below this, every deploy timed out (0.05 s was
#: accepted) and the rollout failed as if Azure had.
MIN_DEPLOY_TIMEOUT_S = 300.0
#: The shortest `traffic_timeout_s`. A change of the endpoint's `traffic` moves no VMs, yet Azure
#: applies it in tens of seconds (up to a couple of minutes), polled every 5 s; below this, the
#: common change times out, a rollback's included.
MIN_TRAFFIC_TIMEOUT_S = 60.0


class AzureMLRouterConfig(_Model):
    """Azure ML managed online endpoint: `traffic` (and `mirror_traffic`) per deployment.

    Each colour is a ManagedOnlineDeployment serving the release's registered model
    `azureml:<model>:<version>`; `environment` (an asset id such as `azureml:sklearn-env:1`) and
    `code` + `scoring_script` are what a non-MLflow model needs (docs/azureml-endpoint.md);
    both are checked as azure-ai-ml will check them (`azure_ml_asset`).
    """

    kind: Literal["azureml"] = "azureml"
    subscription_id: Annotated[
        str, AfterValidator(lambda text: guid(text, "an Azure subscription ID"))
    ]
    resource_group: str = Field(min_length=1)
    workspace: str = Field(min_length=1)
    endpoint: Annotated[str, AfterValidator(azure_ml_name)]
    deployments: ColourNames = Field(default_factory=ColourNames)
    instance_type: str = Field(default="Standard_DS3_v2", min_length=1)
    instance_count: WholeNumber = Field(default=1, ge=1)
    environment: str | None = None
    #: A code asset, or a folder of this machine (read from the current directory when
    #: relative) that azure-ai-ml uploads: `check_router_files` checks it holds scoring_script.
    code: str | None = None
    scoring_script: str = Field(default="score.py", min_length=1)
    #: How long `deploy` and `remove` wait for Azure to create, update or delete a deployment
    #: (image build, VMs) or the endpoint before failing; Azure carries on. At least
    #: MIN_DEPLOY_TIMEOUT_S.
    deploy_timeout_s: Annotated[
        Number,
        _wait_at_least(
            MIN_DEPLOY_TIMEOUT_S,
            "Azure to create, update or delete a deployment (VMs allocated, the image pulled or "
            "built, the scoring server started and ready: minutes)",
        ),
    ] = 3600.0
    #: How long a change of the endpoint's traffic (or mirror) may take before failing. No VMs
    #: move, Azure applies it in seconds to a couple of minutes; a rollback waits on it. At least
    #: MIN_TRAFFIC_TIMEOUT_S.
    traffic_timeout_s: Annotated[
        Number,
        _wait_at_least(
            MIN_TRAFFIC_TIMEOUT_S,
            "Azure to apply a change of the endpoint's traffic (tens of seconds, polled every 5 s)",
        ),
    ] = 300.0

    @field_validator("environment")
    @classmethod
    def _environment(cls, ref: str | None) -> str | None:
        return None if ref is None else azure_ml_asset(ref, "environments")

    @field_validator("code")
    @classmethod
    def _code(cls, ref: str | None) -> str | None:
        return None if ref is None else azure_ml_asset(ref, "codes")

    @field_validator("deployments")
    @classmethod
    def _deployment_names(cls, names: ColourNames) -> ColourNames:
        for colour in Colour:
            azure_ml_name(names.of(colour))
        if names.blue == names.green:
            raise ValueError(f"blue and green need two deployments, both are {names.blue!r}")
        if names.blue.lower() == names.green.lower():
            raise ValueError(
                f"blue and green need two deployments, and {names.blue!r} and {names.green!r} "
                "are one: Azure ML names ignore case"
            )
        return names

    @model_validator(mode="before")
    @classmethod
    def _mirror_moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "mirror_percent" in data:
            raise ValueError(
                "mirror_percent moved to the top of the spec (`mirror_percent:` next to `steps:`): "
                "it mirrors live traffic to blue during the plan's 0 % step, the shadow step, "
                "which is now judged on blue's answers; Azure allows at most 50"
            )
        return data

    @property
    def identity(self) -> str:
        """The data plane this drives: the endpoint, by its workspace."""
        return (
            f"azureml {self.subscription_id}/{self.resource_group}/{self.workspace}/{self.endpoint}"
        )


#: Most percent Azure ML mirrors to a deployment (`mirror_traffic`).
AZURE_MAX_MIRROR_PERCENT = 50

RouterConfig = Annotated[
    MemoryRouterConfig | EnvoyRouterConfig | IstioRouterConfig | AzureMLRouterConfig,
    Field(discriminator="kind"),
]


# --------------------------------------------------------------------------------------- metrics


def bucket_bounds(bounds: tuple[float, ...]) -> tuple[float, ...]:
    """`bounds`; ValueError unless they can bound a latency histogram's buckets."""
    if not bounds or any(not 0 < b < math.inf for b in bounds):
        raise ValueError(f"needs positive, finite bounds, got {list(bounds)}")
    if any(b <= a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"bounds must increase strictly, got {list(bounds)}")
    return bounds


BucketBounds = Annotated[tuple[Number, ...], AfterValidator(bucket_bounds)]


class LatencyModel(_Model):
    """Lognormal latency: median in milliseconds and sigma of the underlying normal."""

    median: Number = Field(default=20.0, gt=0)
    sigma: Number = Field(default=0.4, ge=0)


class TrafficModel(_Model):
    """How one colour behaves in simulation."""

    error_rate: Number = Field(default=0.001, ge=0, le=1)
    latency_ms: LatencyModel = Field(default_factory=LatencyModel)
    #: The canary behaves like this from this simulated second on (before: like the baseline).
    from_s: Number = Field(default=0.0, ge=0)


class TickCounts(_Model):
    """One colour's cumulative counts in a scripted observation (`StaticTick`)."""

    requests: WholeNumber = Field(default=0, ge=0)
    errors: WholeNumber = Field(default=0, ge=0)
    #: [upper bound in seconds, cumulative count] per histogram bucket; `.inf` is Prometheus' +Inf.
    latency_buckets: list[
        tuple[
            Annotated[Number, Field(gt=0, allow_inf_nan=True)], Annotated[WholeNumber, Field(ge=0)]
        ]
    ] = Field(default_factory=list)

    @field_validator("errors")
    @classmethod
    def _not_above_requests(cls, errors: int, info: ValidationInfo) -> int:
        """Counts the controller would refuse at every tick ("metrics unusable"): its rule."""
        if "requests" in info.data:  # (else refused itself)
            counts = ColourCounts(requests=info.data["requests"], errors=errors)
            if problem := counts.why_unusable():
                raise ValueError(problem)
        return errors

    @field_validator("latency_buckets")
    @classmethod
    def _cumulative(cls, buckets: list[tuple[float, int]]) -> list[tuple[float, int]]:
        """A cumulative histogram: bounds increase, counts never decrease."""
        for (bound, count), (next_bound, next_count) in itertools.pairwise(buckets):
            if next_bound <= bound or next_count < count:
                raise ValueError(
                    "a cumulative histogram's bounds increase and its counts never decrease, "
                    f"got {[bound, count]} then {[next_bound, next_count]}"
                )
        return buckets


class StaticTick(_Model):
    """One scripted observation: cumulative counts per colour (or an outage)."""

    blue: TickCounts = Field(default_factory=TickCounts)
    green: TickCounts = Field(default_factory=TickCounts)
    error: str | None = None


class StaticMetricsConfig(_Model):
    """Scripted observations, returned in order (the last repeats); for tests and dry runs."""

    kind: Literal["static"] = "static"
    ticks: list[StaticTick] = Field(default_factory=list)
    #: What `history` returns: the counts before the rollout (none when not given).
    history: StaticTick | None = None


#: Most requests per second a simulation draws (and latest t of a profile): numpy's Poisson
#: draw of an interval's requests fails above ~1e19 (`rps: 1e18` loaded, then crashed `run`).
MAX_SIMULATED_RATE = 1e9


class SimulatedMetricsConfig(_Model):
    """Seeded synthetic traffic split by the router's current weights (dry runs, benchmarks)."""

    kind: Literal["simulated"] = "simulated"
    #: numpy's generators take no negative seed (`seed: -1` loaded, then crashed `run`).
    seed: WholeNumber = Field(default=0, ge=0)
    #: Total requests per second, or a step profile of [t_seconds, rps] points.
    rps: float | list[tuple[float, float]] = 10.0
    baseline: TrafficModel = Field(default_factory=TrafficModel)
    canary: TrafficModel | None = None
    buckets_ms: BucketBounds = ENVOY_BUCKETS_MS

    @field_validator("rps", mode="before")
    @classmethod
    def _rates(cls, rps: Any) -> Any:
        # Before pydantic's own checks, whose union of two types would say everything twice.
        def rate(x: Any) -> bool:
            if not isinstance(x, int | float) or isinstance(x, bool):
                return False
            try:
                return 0 <= float(x) <= MAX_SIMULATED_RATE
            except OverflowError:  # a whole number no float holds (10**400)
                return False

        def point(p: Any) -> bool:
            return isinstance(p, list | tuple) and len(p) == 2 and all(map(rate, p))

        if rate(rps) or (isinstance(rps, list) and rps and all(map(point, rps))):
            return rps
        raise ValueError(
            f"expected requests per second (a number from 0 to {MAX_SIMULATED_RATE:.0e}) or a "
            f"profile of [t_seconds, rps] points (numbers in the same range), got {rps!r}"
        )


class PromQueries(_Model):
    """PromQL templates for the `custom` preset.

    `{colour}` is replaced by the colour's label value. Each returns cumulative counters:
    requests, 5xx errors, and for `latency_bucket` the cumulative histogram series with an `le`
    label; the provider computes the step's increase itself. Several series are counted one by
    one and added up (the buckets by `le`), so a query may, and best does, keep one series per
    pod: a `sum(...)` drops when a pod stops being scraped, which reads as a counter restart.
    There is no `{window}`: a range function over the step, evaluated at the step's start as
    every query is, covers the window before the step, and subtracting it gave 0 requests.
    Each template needs `{colour}`: without it blue and green read the same series.
    """

    requests: str = Field(min_length=1)
    errors: str = Field(min_length=1)
    latency_bucket: str | None = Field(default=None, min_length=1)

    @field_validator("requests", "errors", "latency_bucket")
    @classmethod
    def _one_step_per_colour(cls, template: str | None) -> str | None:
        if template is not None and "{window}" in template:
            raise ValueError(
                "no `{window}` placeholder: give raw cumulative counters, not "
                "`increase(...[{window}])` or `rate(...)`; the provider computes the step's "
                "increase, counter restarts included"
            )
        if template is not None and "{colour}" not in template:
            # Without it both colours read the same series: equal counts, and every candidate
            # looked "not worse".
            raise ValueError(
                "needs the `{colour}` placeholder (replaced by each colour's metrics.labels "
                "value): without it blue and green read the same series, and the candidate is "
                "compared with itself"
            )
        return template


class PromBasicAuth(_Model):
    """HTTP basic auth: a username, and the password from an environment variable or a file."""

    username: str = Field(min_length=1)
    password_env: str | None = Field(default=None, min_length=1)
    password_file: Path | None = None

    @_cross_field
    def _one_password(self) -> Iterator[_Problem]:
        if (self.password_env is None) == (self.password_file is None):
            yield _Problem(
                (),
                None,
                "give the password as exactly one of `password_env` or `password_file`",
            )


class PrometheusMetricsConfig(_Model):
    """Prometheus HTTP API; presets for Envoy's cluster stats and Istio's standard telemetry.

    Authentication, at most one: `bearer_token_env` / `bearer_token_file`, `basic_auth`, or
    `azure_auth` (an Entra ID token for Azure Monitor managed Prometheus). The spec names where a
    secret is, never the secret; whether it is there is checked when the provider is built
    (rollout.metrics.prometheus_auth), not here, so operator commands run from a machine without
    the controller's secrets can still load the spec.
    """

    kind: Literal["prometheus"] = "prometheus"
    url: HttpUrl = "http://127.0.0.1:9090"
    preset: Literal["envoy", "istio", "custom"] = "envoy"
    queries: PromQueries | None = None
    #: Label values that identify each colour (Envoy cluster name, Istio destination workload...).
    labels: ColourNames = Field(default_factory=ColourNames)
    #: This Prometheus renames the router's colours (`metric_relabel_configs`, Istio's
    #: Telemetry `tagOverrides`): a preset reading the router's own data plane takes `labels`
    #: as given, not only as the router's names, but for one naming the other colour's
    #: (`RolloutSpec._metrics_read_the_routers_colours`).
    relabelled: Flag = False
    #: For Istio: the namespace of the destination workloads.
    namespace: str | None = None
    #: Extra label matchers (label name: exact value) on every series a preset reads, to keep
    #: another Envoy's or mesh's series out of this rollout's counts on a shared Prometheus
    #: (e.g. `{job: envoy-diabetes}`). Custom queries write their own.
    match_labels: dict[str, str] = Field(default_factory=dict)
    #: The unit of the custom latency histogram's `le` bounds: `ms` (the default), or `s` for a
    #: `_seconds` histogram. The presets know theirs (milliseconds).
    latency_unit: Literal["ms", "s"] = "ms"
    timeout_s: Number = Field(default=5.0, gt=0, le=MAX_REQUEST_TIMEOUT_S)
    #: A bearer token in this environment variable (read once, at start).
    bearer_token_env: str | None = Field(default=None, min_length=1)
    #: A bearer token in this file, read again for every request (a rotated Secret is picked up).
    bearer_token_file: Path | None = None
    basic_auth: PromBasicAuth | None = None
    #: An Entra ID token for Azure Monitor managed Prometheus from `default_credential()` (for
    #: the cloud of the url: prometheus.monitor.azure.com, .azure.us or .azure.cn).
    azure_auth: Flag = False
    #: PEM CA bundle that signed the server's certificate (a private CA).
    ca_file: Path | None = None
    #: Mutual TLS: the client certificate (PEM; may hold the key too) and its private key.
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Accept any certificate: anyone on the path can read and answer the queries. Warned about.
    insecure_skip_verify: Flag = False

    @field_validator("labels")
    @classmethod
    def _two_labels(cls, names: ColourNames) -> ColourNames:
        return _two_names(names, "series", _SELF_COMPARED)

    @_cross_field
    def _custom_needs_queries(self) -> Iterator[_Problem]:
        if self.preset == "custom" and self.queries is None:
            yield _Problem(
                (), None, "preset 'custom' needs `queries` (requests, errors, latency_bucket)"
            )

    @_cross_field
    def _scoping_fields_apply(self) -> Iterator[_Problem]:
        """`namespace` scopes the istio preset only, `match_labels` the presets only: silently
        ignored, either left a user believing the counts were scoped. So with `queries` and
        `latency_unit`, which only the custom preset reads, and `latency_unit` without the
        histogram query it is the unit of (a user believing latency read)."""
        if self.queries is not None and self.preset != "custom":
            yield _Problem(
                ("queries",),
                None,
                f"are read with preset 'custom' only; preset {self.preset!r} ignores them"
                + (
                    ": set `preset: custom` to read them"
                    if "preset" in self.model_fields_set
                    else " (the default preset): add `preset: custom` to read them"
                ),
            )
        if self.latency_unit != "ms" and self.preset != "custom":
            yield _Problem(
                ("latency_unit",),
                self.latency_unit,
                f"is the unit of the custom preset's histogram; preset {self.preset!r} reads "
                "its own (ms)",
            )
        elif (
            # (not "ms", the default, said or not: a dumped spec says every field)
            self.latency_unit != "ms"
            and self.queries is not None
            and self.queries.latency_bucket is None
        ):
            yield _Problem(
                ("latency_unit",),
                self.latency_unit,
                "is the unit of metrics.queries.latency_bucket's `le` bounds, and there is no "
                "latency_bucket query: add it, or drop latency_unit",
            )
        if self.namespace is not None and self.preset != "istio":
            yield _Problem(
                ("namespace",),
                self.namespace,
                f"scopes the istio preset only; preset {self.preset!r} ignores it"
                + (
                    ": scope its series with match_labels (e.g. {job: my-envoy})"
                    if self.preset == "envoy"
                    else ": write the matcher into metrics.queries"
                ),
            )
        if self.match_labels and self.preset == "custom":
            yield _Problem(
                ("match_labels",),
                self.match_labels,
                "applies to the envoy and istio presets; write custom matchers into "
                "metrics.queries",
            )
        for name in self.match_labels:
            if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
                yield _Problem(
                    ("match_labels", name),
                    name,
                    "is no Prometheus label name (letters, digits and '_', not beginning with a "
                    "digit or '__')",
                )
            if name in PRESET_LABELS.get(self.preset, ()):
                hint = {
                    "envoy_cluster_name": " (the colours' values are metrics.labels)",
                    "destination_service_name": " (the colours' values are metrics.labels)",
                    "destination_service_namespace": " (scope it with metrics.namespace)",
                }.get(name, "")
                yield _Problem(
                    ("match_labels", name),
                    name,
                    f"the {self.preset} preset matches this label itself: a second matcher on "
                    f"it selects nothing{hint}",
                )

    @property
    def auth_fields(self) -> list[str]:
        """The authentication fields set (at most one is valid)."""
        values = {
            "bearer_token_env": self.bearer_token_env,
            "bearer_token_file": self.bearer_token_file,
            "basic_auth": self.basic_auth,
            "azure_auth": self.azure_auth or None,
        }
        return [name for name, value in values.items() if value is not None]

    @_cross_field
    def _one_auth_and_tls_over_https(self) -> Iterator[_Problem]:
        chosen = self.auth_fields
        if len(chosen) > 1:
            yield _Problem(
                (chosen[1],),
                None,
                f"only one authentication method at a time; {' and '.join(chosen)} are set",
            )
        parts = urlsplit(self.url)
        if parts.username is not None or parts.password is not None:
            # The url is in every error message and in the ledger's detail.
            yield _Problem(
                ("url",),
                None,
                "holds credentials (user:password@); use basic_auth with password_env or "
                "password_file",
            )
        for mark, what in (("?", "a query string"), ("#", "a fragment")):
            if mark in self.url:
                # Not shown: a query string may carry a token, and errors go to CI logs.
                yield _Problem(
                    ("url",),
                    None,
                    f"holds {what} (`{mark}`): /api/v1/query is appended to the url, and would "
                    "land inside it; give the server's root (with its path prefix, if any)",
                )
        https = parts.scheme == "https"
        # The url as errors show it: no credentials, query string or fragment (a token there
        # would land in CI logs).
        shown = parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="")
        if self.azure_auth and not https:
            # An Entra ID token sent in clear text is anyone's on the path for its lifetime.
            yield _Problem(("url",), shown.geturl(), "azure_auth sends its token only over https")
        for name in ("ca_file", "insecure_skip_verify", "cert_file", "key_file"):
            if getattr(self, name) and not https:
                yield _Problem((name,), None, f"applies to an https url, not {shown.geturl()!r}")
        if self.key_file is not None and self.cert_file is None:
            yield _Problem(("key_file",), None, "needs cert_file (the certificate it signs)")
        if self.ca_file is not None and self.insecure_skip_verify:
            yield _Problem(
                ("insecure_skip_verify",),
                None,
                "excludes ca_file: either verify against the CA or do not verify",
            )


#: A Prometheus label name.
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
#: The labels each Prometheus preset matches itself (rollout.metrics.prometheus), the colour's
#: and the histogram's `le` included: `match_labels` on one adds a second matcher, which
#: selects nothing (or one bucket).
PRESET_LABELS: dict[str, tuple[str, ...]] = {
    "envoy": ("envoy_cluster_name", "envoy_response_code_class", "le"),
    "istio": (
        "reporter",
        "destination_service_name",
        "destination_service_namespace",
        "response_code",
        "le",
    ),
}


def slo_bound_problem(slo_ms: float, bounds_ms: typing.Iterable[float], fix: str = "") -> str:
    """Why an SLO of `slo_ms` cannot be measured on a histogram of these bounds ("" when it is
    one of them, or no finite bound is known). A request is slow only above a bound: an SLO
    between two counted the requests above the next one up (300 ms on 250/500: above 500 ms),
    one above every bound counted none. `fix` ends the text (another field to change)."""
    bounds = sorted(b for b in bounds_ms if math.isfinite(b))
    if not bounds or any(math.isclose(slo_ms, b, rel_tol=1e-9) for b in bounds):
        return ""
    if slo_ms > bounds[-1]:
        return (
            f"{slo_ms:g} ms is above the latency histogram's largest bound, {bounds[-1]:g} ms: "
            f"no request could count as slower{fix}"
        )
    above = min(b for b in bounds if b > slo_ms)
    below = [b for b in bounds if b < slo_ms]
    nearest = f"{below[-1]:g} or {above:g}" if below else f"{above:g}"
    which = "nearest are" if below else "smallest is"
    return (
        f"{slo_ms:g} ms is no bound of the latency histogram, whose {which} {nearest} ms: "
        f"a request counts as slow only above a bound, so it would measure > {above:g} ms; "
        f"set slo_ms to {nearest}{fix}"
    )


#: Latency bucket bounds (ms) counted from the traffic log: the judge's "slow" is above one of
#: them (the SLO's, or the one nearest the baseline's p99).
AZURE_LOG_BUCKETS_MS = (5, 10, 25, 50, 75, 100, 150, 250, 500, 750, 1000, 2500, 5000, 10000, 30000)


class AzureMonitorMetricsConfig(_Model):
    """An Azure ML managed online endpoint's traffic log, in a Log Analytics workspace.

    The endpoint needs a diagnostic setting sending `AmlOnlineEndpointTrafficLog` to the
    workspace. With the azureml router, `endpoint` and `deployments` default to the router's.
    """

    kind: Literal["azuremonitor"] = "azuremonitor"
    #: The Log Analytics workspace ID (a GUID: the workspace's Overview page, "Workspace ID").
    workspace_id: Annotated[
        str, AfterValidator(lambda text: guid(text, "a Log Analytics workspace ID"))
    ]
    endpoint: str = Field(min_length=1)
    deployments: ColourNames = Field(default_factory=ColourNames)
    buckets_ms: BucketBounds = AZURE_LOG_BUCKETS_MS
    #: The Logs query API (sovereign clouds have their own, e.g. https://api.loganalytics.azure.cn).
    logs_url: str = "https://api.loganalytics.io"
    timeout_s: Number = Field(default=30.0, gt=0, le=MAX_REQUEST_TIMEOUT_S)

    @field_validator("deployments")
    @classmethod
    def _two_deployments(cls, names: ColourNames) -> ColourNames:
        return _two_names(names, "deployment", _SELF_COMPARED, ignore_case=True)

    @field_validator("logs_url")
    @classmethod
    def _https(cls, url: str) -> str:
        # The query carries an Entra ID token, which azure-core sends over https only: any
        # other url fails every tick, after blue was deployed (azure-monitor-query adds
        # https:// to a bare host itself).
        parts = urlsplit(url if "://" in url else f"https://{url}")
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"needs an https url (the query carries a token), got {url!r}")
        # The SDK appends `/v1/workspaces/<id>/query` and strips only a `/v1` at the very end:
        # `.../v1/` was sent to `/v1//v1/...`.
        return url.rstrip("/")


MetricsConfig = Annotated[
    StaticMetricsConfig
    | SimulatedMetricsConfig
    | PrometheusMetricsConfig
    | AzureMonitorMetricsConfig,
    Field(discriminator="kind"),
]


# -------------------------------------------------------------------------------------- analysis


#: Largest relative margin: a canary this many times worse is no longer "not worse" in any
#: sense, and far beyond it (1e16) the judge's shares round to 1 and its e-values to NaN.
MAX_RATIO = 1000.0


class ErrorCheck(_Model):
    """5xx responses of the canary against the baseline."""

    enabled: Flag = True
    #: Relative margin: promotion needs evidence that canary rate < max_ratio × baseline rate,
    #: and the sequential test hunts for any ratio > 1.
    max_ratio: Number = Field(default=2.0, gt=1, le=MAX_RATIO)
    #: Absolute guard: roll back at once when the canary's error rate is confidently above this.
    max_rate: Number | None = Field(default=0.1, gt=0, le=1)
    #: An error rate this low is fine whatever the baseline does: promotion needs evidence that
    #: the canary is < max_ratio × baseline OR below this rate (0 turns the second part off).
    #: Without it a service with no errors at all could never show it is not worse.
    negligible_rate: Number = Field(default=0.001, ge=0, lt=1)


class LatencyCheck(_Model):
    """Slow requests (above a histogram bucket) of the canary against the baseline."""

    enabled: Flag = True
    #: `baseline_p99`: slow = above the bucket holding the baseline's p99 (about 1 % of requests);
    #: `slo`: slow = above the bucket bound at `slo_ms`.
    threshold: Literal["baseline_p99", "slo"] = "baseline_p99"
    #: With `baseline_p99`: look this far back before the rollout for green's histogram, so the
    #: bucket is chosen before the first step and the check judges from the first tick (it needs
    #: 500 green requests in the window; otherwise, or with 0, the first step's are used).
    history_s: Number = Field(default=600.0, ge=0)
    slo_ms: Number | None = Field(default=None, gt=0)
    max_ratio: Number = Field(default=2.0, gt=1, le=MAX_RATIO)
    #: Absolute guard on the canary's share of requests above the SLO bucket (needs `slo_ms`).
    max_slow_rate: Number | None = Field(default=None, gt=0, le=1)
    #: A share of slow requests this low is fine whatever the baseline does (as for errors; it
    #: matters with `threshold: slo`, where a fast service has no slow requests at all). 0: off.
    negligible_rate: Number = Field(default=0.001, ge=0, lt=1)

    @property
    def uses_baseline_p99(self) -> bool:
        """True when "slow" is the baseline's p99 bucket (chosen from green's traffic)."""
        return self.enabled and self.threshold == "baseline_p99"

    @property
    def measured_slo_ms(self) -> float | None:
        """The SLO the check or its guard measures against (None: none does). A metrics source
        whose histogram bounds are known only when read is given it, to refuse it if no bound."""
        measured = self.threshold == "slo" or self.max_slow_rate is not None
        if not (self.enabled and measured) or self.slo_ms is None:
            return None
        return float(self.slo_ms)

    @_cross_field
    def _slo_needs_bound(self) -> Iterator[_Problem]:
        if self.threshold == "slo" and self.slo_ms is None:
            yield _Problem((), None, "threshold 'slo' needs `slo_ms`")
        if self.max_slow_rate is not None and self.slo_ms is None:
            yield _Problem(
                (), None, "`max_slow_rate` needs `slo_ms` (the bucket it is measured against)"
            )
        if self.max_slow_rate is not None and not self.enabled:
            # Accepted, it was never measured: a guard the spec shows and nothing applies.
            yield _Problem(
                ("max_slow_rate",),
                None,
                "is not applied while the latency check is off (`enabled: false`): enable it, "
                "or drop max_slow_rate",
            )


#: The shortest tick: each one saves the status and a ledger line, so faster is a busy loop
#: (0.001 wrote a thousand ledger lines a second), whatever the backends.
MIN_INTERVAL_S = 0.01
#: The shortest tick when a tick reaches a service over the network (`RolloutSpec._tick_floor`):
#: Prometheus has nothing new before its next scrape (the local stack's is 1 s, a cluster's
#: commonly 15 s or more), Log Analytics throttles a user at about 200 queries a minute, and the
#: kubernetes store writes a ConfigMap every tick.
MIN_REMOTE_INTERVAL_S = 1.0


class AnalysisConfig(_Model):
    """How each step is judged."""

    interval_s: Number = Field(default=10.0, ge=MIN_INTERVAL_S)
    alpha: Number = Field(default=0.05, gt=0, lt=0.5)
    #: Canary requests a step needs before it may advance (evidence, not mere absence of alarm).
    min_requests: WholeNumber = Field(default=200, ge=0)
    #: A step never advances sooner than this (defaults to one interval).
    min_step_duration_s: Number | None = Field(default=None, ge=0)
    #: A step does not advance while the "worse" e-value is above this: the data favour a
    #: regression, so its exposure does not grow while the evidence builds up (1: any lean
    #: toward "worse"; null: advance regardless). Costs a healthy canary almost nothing (its
    #: e-value drifts below 1) and cuts the bad requests a moderate regression serves.
    hold_above_e: Number | None = Field(default=1.0, ge=1)
    #: A step still inconclusive after this long follows `on_inconclusive`.
    max_step_duration_s: Number = Field(default=10800.0, gt=0)
    #: Consecutive ticks with unreadable metrics before the step counts as inconclusive.
    max_consecutive_errors: WholeNumber = Field(default=4, ge=1)
    errors: ErrorCheck = Field(default_factory=ErrorCheck)
    latency: LatencyCheck = Field(default_factory=LatencyCheck)
    on_inconclusive: Literal["hold", "rollback"] = "hold"

    @property
    def min_step_s(self) -> float:
        """The effective minimum step duration."""
        return self.interval_s if self.min_step_duration_s is None else self.min_step_duration_s

    @_cross_field
    def _durations(self) -> Iterator[_Problem]:
        if self.max_step_duration_s < self.min_step_s:
            yield self._step_too_short()
        if not (self.errors.enabled or self.latency.enabled):
            yield _Problem((), None, "at least one of errors, latency must be enabled")

    def _step_too_short(self) -> _Problem:
        """A step allowed less time than it must last, told at the field the user set: the
        longest, else the shortest (`min_step_duration_s`, else the interval it defaults to)."""
        longest, shortest = self.max_step_duration_s, self.min_step_s
        floor = (
            "analysis.min_step_duration_s"
            if self.min_step_duration_s is not None
            else "analysis.interval_s, as min_step_duration_s is not set"
        )
        if "max_step_duration_s" in self.model_fields_set:
            return _Problem(
                ("max_step_duration_s",),
                longest,
                f"{longest:g} s is shorter than a step's minimum duration, {shortest:g} s "
                f"({floor}): give at least that",
            )
        default = f"max_step_duration_s, {longest:g} s (the default)"
        if self.min_step_duration_s is not None:
            return _Problem(
                ("min_step_duration_s",),
                shortest,
                f"{shortest:g} s is longer than {default}: a step could never last that long; "
                "lower it, or raise max_step_duration_s",
            )
        return _Problem(
            ("interval_s",),
            shortest,
            f"{shortest:g} s is longer than {default}, and a step lasts at least one interval "
            "(min_step_duration_s is not set): lower it, or raise max_step_duration_s",
        )


class ReleaseConfig(_Model):
    """A release as written in a spec (see `rollout.core.types.Release`)."""

    model: str = Field(min_length=1)
    version: str = Field(min_length=1)
    sha256: str = ""
    image: str | None = Field(default=None, min_length=1)
    model_dir: str | None = None
    deployment: str | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _quoted(cls, version: Any) -> Any:
        """Not read as a number: YAML reads `version: 1.10` as 1.1 (and 2024-01-01 as a date)."""
        if isinstance(version, int | float) and not isinstance(version, bool):
            raise PydanticCustomError(
                "spec",
                'read as the number {version}: quote the version (e.g. "2"; unquoted, YAML reads '
                "1.10 as 1.1)",
                {"version": str(version)},
            )
        if isinstance(version, datetime.date):
            raise PydanticCustomError(
                "spec",
                'read as the date {version}: quote the version (e.g. "{version}")',
                {"version": version.isoformat()},
            )
        return version

    def to_release(self) -> Release:
        """The core value type."""
        return Release(**self.model_dump())


class FileStateConfig(_Model):
    """Status, commands, lease and ledger in a local directory: one machine's controllers."""

    kind: Literal["file"] = "file"
    #: Directory for `<name>.status.json`, `<name>.commands.jsonl`, `<name>.lock`,
    #: `<name>.ledger.jsonl`.
    dir: Path = Path(".rollout")
    #: Ignored, kept so that older specs load: the lease is a lock the kernel releases when its
    #: controller dies, so it never needs to expire.
    lease_ttl_s: Number | None = Field(default=None, gt=0)


class MemoryStateConfig(_Model):
    """Status, commands and lease in the process (tests, dry runs); the ledger still in `dir`."""

    kind: Literal["memory"] = "memory"
    dir: Path = Path(".rollout")
    #: Ignored, as for `file`.
    lease_ttl_s: Number | None = Field(default=None, gt=0)


class KubernetesStateConfig(KubeApiConfig):
    """Status and commands in ConfigMaps, the lease a coordination.k8s.io Lease, in `namespace`.

    Unlike a local directory this spans nodes: a rescheduled controller resumes the rollout, and
    two controllers on two nodes cannot both drive it (docs/kubernetes.md). The API server: see
    KubeApiConfig.
    """

    kind: Literal["kubernetes"] = "kubernetes"
    namespace: KubeNamespace
    #: The ledger only (`<namespace>/<name>.ledger.jsonl`, a line per tick: it would outgrow a
    #: ConfigMap). In a pod, mount a volume here or the ledger goes with the pod (status and
    #: commands do not).
    dir: Path = Path(".rollout")
    #: Seconds the lease lasts without renewal (the Lease's `leaseDurationSeconds`; renewed every
    #: third of it). A controller that died is replaced once it has expired and a newcomer has
    #: watched it unchanged for this long again: at least twice this long after its last renewal.
    lease_ttl_s: WholeNumber = Field(default=15, ge=1, le=3600)


def _file_by_default(data: Any) -> Any:
    """`state:` without `kind` is the file store (as before there was a choice)."""
    if isinstance(data, dict) and "kind" not in data:
        return {"kind": "file", **data}
    return data


StateConfig = Annotated[
    FileStateConfig | MemoryStateConfig | KubernetesStateConfig,
    Field(discriminator="kind"),
    BeforeValidator(_file_by_default),
]


class NotifyConfig(_Model):
    """A webhook told when the rollout enters a phase someone should hear about (best effort)."""

    #: Gets a JSON POST: `text` (one line, what Slack-style incoming webhooks show), `rollout`,
    #: `phase`, `reason`, `blue_weight`, `mirror_percent`, `candidate`, `stable`, `at`.
    url: str
    #: Phases to tell (any but Initializing). By default: the rollout ended, or it waits for a
    #: human.
    #: (Not `on`: YAML 1.1 reads a bare `on:` key as the boolean true.)
    phases: list[Phase] = Field(
        default_factory=lambda: [Phase.PAUSED, Phase.SUCCEEDED, Phase.ROLLED_BACK, Phase.FAILED],
        min_length=1,
    )
    #: Per attempt, in all (a body sent slowly included): a failed or slow webhook holds a tick
    #: up for at most two attempts, then a warning in the log.
    timeout_s: Number = Field(default=5.0, gt=0, le=60)

    @field_validator("phases")
    @classmethod
    def _not_initializing(cls, phases: list[Phase]) -> list[Phase]:
        if Phase.INITIALIZING in phases:
            raise ValueError("Initializing is not a phase to tell: nothing has happened yet")
        return phases

    @field_validator("url")
    @classmethod
    def _usable_url(cls, url: str) -> str:
        # http_url's checks, its errors showing the URL by scheme and host only: an incoming
        # webhook's path, query or user info is its token, and an error travels further than
        # the spec (a CI log). rollout.notify.shown_url does the same for the log.
        try:
            return http_url(url)
        except ValueError as exc:
            problem = str(exc)
        found = re.match(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)", url)
        if found is None:
            later = re.search(r"[A-Za-z][A-Za-z0-9+.\-]*://", url)
            pasted = url[: later.start()] if later is not None else ""
            if pasted and all(c.isspace() or not c.isprintable() for c in pasted):
                # A space, a BOM or a zero-width space before it (pasted): the URL looks right.
                raise ValueError(
                    f"must be an http:// or https:// URL: remove the {pasted!r} before its scheme"
                )
            raise ValueError("must be an http:// or https:// URL, got one with no scheme://")
        scheme, netloc = found[1], found[2]
        host = netloc.rpartition("@")[2]
        shown = repr(f"{scheme}://{host}" + ("/…" if found.end() < len(url) else ""))
        if scheme in ("http", "https") and problem.startswith("must be"):
            problem = f"has a space or a control character in it: {shown}"
        raise ValueError(problem.replace(repr(url), shown).replace(netloc, host))


def _per_colour(router_names: Any, given: Any) -> Any:
    """The metrics section's names per colour: each colour it does not name reads the router's
    (naming one colour replaced both, and the other read a series that does not exist)."""
    if isinstance(router_names, dict) and isinstance(given, dict):
        return {**router_names, **given}
    return router_names if given is None else given


def _nul_free(value: Any) -> bool:
    """Whether a raw spec value holds no NUL byte: one that does is told at the router's field,
    not again at each metrics field derived from it."""
    if isinstance(value, str):
        return "\0" not in value
    if isinstance(value, dict):
        return all(_nul_free(k) and _nul_free(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_nul_free(v) for v in value)
    return True


def _raw_sections(
    data: Any, router_kind: str, metrics_kind: str
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A spec document's `router` and `metrics` sections, before validation, when they are of
    these kinds (for defaults one section takes from the other); None otherwise."""
    if not isinstance(data, dict):
        return None
    router, metrics = data.get("router"), data.get("metrics")
    if not (isinstance(router, dict) and isinstance(metrics, dict)):
        return None
    if router.get("kind") != router_kind or metrics.get("kind") != metrics_kind:
        return None
    return router, metrics


def _holds(label: str, name: str) -> bool:
    """Whether a relabelled value keeps a router's name in it (`ml/diabetes-green` holds
    `diabetes-green`), whatever the case: relabelling commonly adds a prefix or a suffix."""
    return name.casefold() in label.casefold()


#: A rollout's name: it names its files, and the kubernetes store's objects (kubenames).
_NAME = re.compile(r"[a-z0-9]([-a-z0-9_.]*[a-z0-9])?")


class RolloutSpec(_Model):
    """A whole rollout: where traffic goes, where metrics come from, and how to judge."""

    name: str = "rollout"
    router: RouterConfig = Field(default_factory=MemoryRouterConfig)
    metrics: MetricsConfig = Field(default_factory=StaticMetricsConfig)
    #: None: DEFAULT_STEPS, or LIVE_STEPS with the istio metrics preset (see `plan`).
    steps: list[int] | Literal["seed"] | None = None
    #: Percent of live traffic copied to blue during a 0 % step, which is then a *shadow step*:
    #: judged like any other on blue's answers to the copies, which no user ever sees. 0: the
    #: 0 % step only deploys blue, reachable by header. None: DEFAULT_MIRROR_PERCENT, or 0 with
    #: the istio metrics preset, which cannot count mirrored requests (see `shadow_percent`).
    mirror_percent: WholeNumber | None = Field(default=None, ge=0, le=100)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    #: Requests carrying `<header>: blue|green` are pinned to that colour and not analysed.
    header: HeaderName = "x-api-version"
    candidate: ReleaseConfig | None = None
    stable: ReleaseConfig | None = None
    state: StateConfig = Field(default_factory=FileStateConfig)
    #: Tell a webhook when the rollout is promoted, rolled back, failed or held for a human.
    notify: NotifyConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _header_goes_to_the_router(cls, data: Any) -> Any:
        """The top-level `header` is the pinning header of the routers that match on one (istio,
        envoy): their section takes it unless it names its own. Else it changed nothing: the
        routes kept matching x-api-version. Two different ones are refused, and so is any but
        the default with the azureml router (Azure pins by azureml-model-deployment)."""
        if not isinstance(data, dict) or "header" not in data:
            return data
        router = data.get("router")
        if (
            isinstance(router, dict)
            and router.get("kind") == "azureml"
            and str(data["header"]).lower() != "x-api-version"
        ):
            # Azure ML pins by its own header, which no setting changes: this one would do nothing.
            raise ValueError(
                f"header {data['header']!r}: the azureml router pins a request by Azure's own "
                "header azureml-model-deployment (docs/azureml-endpoint.md); remove `header`"
            )
        if not isinstance(router, dict) or router.get("kind") not in ("istio", "envoy"):
            return data
        if "header" not in router:
            return {**data, "router": {**router, "header": data["header"]}}
        if str(router["header"]).lower() != str(data["header"]).lower():
            raise ValueError(
                f"header {data['header']!r} and router.header {router['header']!r} differ: the "
                "router pins by one header, set it in one place"
            )
        return data

    @model_validator(mode="before")
    @classmethod
    def _istio_metrics_follow_the_router(cls, data: Any) -> Any:
        """With Istio on both sides, the preset counts the router's weighted Services by default.

        The Services are `<app>-blue` / `<app>-green` in the router's namespace; without this the
        preset would look for Services named `blue` / `green` and never see any traffic.
        """
        sections = _raw_sections(data, "istio", "prometheus")
        if sections is None or sections[1].get("preset") != "istio":
            return data
        router, metrics = sections
        app = router.get("app", IstioRouterConfig.model_fields["app"].default)
        namespace = router.get("namespace", IstioRouterConfig.model_fields["namespace"].default)
        metrics = dict(metrics)
        if _nul_free(app):
            derived = {"blue": f"{app}-blue", "green": f"{app}-green"}
            metrics = {**metrics, "labels": _per_colour(derived, metrics.get("labels"))}
        if _nul_free(namespace):
            metrics.setdefault("namespace", namespace)
        return {**data, "metrics": metrics}

    @model_validator(mode="before")
    @classmethod
    def _envoy_metrics_follow_the_router(cls, data: Any) -> Any:
        """With Envoy on both sides, the preset counts the router's weighted clusters by default:
        with them renamed, it would look for clusters `blue` / `green` and never see traffic."""
        sections = _raw_sections(data, "envoy", "prometheus")
        default = PrometheusMetricsConfig.model_fields["preset"].default
        if sections is None or sections[1].get("preset", default) != "envoy":
            return data
        router, metrics = sections
        if "clusters" not in router or not _nul_free(router["clusters"]):
            return data
        labels = _per_colour(router["clusters"], metrics.get("labels"))
        return {**data, "metrics": {**metrics, "labels": labels}}

    @model_validator(mode="before")
    @classmethod
    def _azure_metrics_follow_the_router(cls, data: Any) -> Any:
        """With the azureml router, the traffic log is read for the router's endpoint and
        deployments unless the metrics section names others."""
        sections = _raw_sections(data, "azureml", "azuremonitor")
        if sections is None:
            return data
        router, metrics = sections
        merged = dict(metrics)
        if "endpoint" not in merged and "endpoint" in router:
            merged["endpoint"] = router["endpoint"]
        names, given = router.get("deployments"), metrics.get("deployments")
        if isinstance(names, dict):
            # Each colour the metrics section does not name reads the router's deployment.
            merged["deployments"] = (
                {**names, **given} if isinstance(given, dict) else given or names
            )
        return {**data, "metrics": merged}

    @field_validator("name")
    @classmethod
    def _file_name(cls, name: str) -> str:
        """It names the rollout's files (`<name>.status.json`, ...): said in words, not a regex."""
        if not _NAME.fullmatch(name):
            raise PydanticCustomError(
                "spec",
                "use lower-case letters, digits, '-', '_' and '.', beginning and ending with a "
                "letter or digit; got {name}",
                {"name": repr(name)},
            )
        if len(name) > ROLLOUT_NAME_MAX:
            raise PydanticCustomError(
                "spec",
                "at most {most} characters, got {length}: it names the rollout's files "
                "(`.<name>.status.<pid>.tmp` the longest), and a file name holds 255 bytes",
                {"most": ROLLOUT_NAME_MAX, "length": len(name)},
            )
        return name

    @field_validator("steps", mode="before")
    @classmethod
    def _plan_shape(cls, steps: Any) -> Any:
        """One line for a plan of the wrong shape (`steps: sed`, `steps: 5, 25, 100`), not the
        union's two ("steps.list[int]: ...; steps.literal['seed']: ...")."""
        if steps is None or steps == "seed":
            return steps
        if isinstance(steps, list | tuple) and all(
            isinstance(w, int) and not isinstance(w, bool) for w in steps
        ):
            return list(steps)
        raise PydanticCustomError(
            "spec",
            "expected a list of whole-number weights ending at 100 (e.g. [0, 5, 25, 50, 100]), "
            "or seed; got {steps}",
            {"steps": repr(steps)},
        )

    @field_validator("steps")
    @classmethod
    def _plan(cls, steps: list[int] | str | None) -> list[int] | str | None:
        if steps is None or isinstance(steps, str):
            return steps
        if not steps:
            raise ValueError("needs at least one weight")
        if any(not 0 <= w <= 100 for w in steps):
            raise ValueError(f"weights must be within 0..100, got {steps}")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"weights must increase strictly, got {steps}")
        if steps[-1] != 100:
            raise ValueError(f"the last weight must be 100 (promotion), got {steps[-1]}")
        if len(steps) < 2 or steps[-2] == 0:
            raise ValueError(
                f"the step before 100 must send the candidate traffic: promotion needs evidence "
                f"from it, got {steps}"
            )
        return steps

    @_cross_field
    def _metrics_read_the_routers_colours(self) -> Iterator[_Problem]:
        """A preset reading the router's own data plane counts each colour by what the router
        weights: Istio's `<app>-<colour>` Services (what `aml-rollout manifests` creates, in the
        router's namespace), Envoy's clusters. Another label counted another Service's requests,
        or none; swapped, each colour was judged on the other's. A Prometheus that renames them
        (`relabelled`) had no way to run a preset: its labels are taken as given then, but for
        one naming the other colour's (the swap, relabelled: `ml/diabetes-green` for blue)."""
        metrics, router = self.metrics, self.router
        if not isinstance(metrics, PrometheusMetricsConfig):
            return
        if isinstance(router, IstioRouterConfig) and metrics.preset == "istio":
            what, where = "Service", f"router.app {router.app}"
            made = ", as `aml-rollout manifests` creates it"
            weighted = ColourNames(blue=f"{router.app}-blue", green=f"{router.app}-green")
            if metrics.namespace is not None and metrics.namespace != router.namespace:
                yield _Problem(
                    ("metrics", "namespace"),
                    metrics.namespace,
                    f"{metrics.namespace!r} is not the router's namespace, {router.namespace!r}, "
                    "where its Services are: the preset would count none of their requests",
                )
        elif isinstance(router, EnvoyRouterConfig) and metrics.preset == "envoy":
            what, where, made, weighted = "cluster", "router.clusters", "", router.clusters
        else:
            if metrics.relabelled:
                yield _Problem(
                    ("metrics", "relabelled"),
                    metrics.relabelled,
                    "lifts the check of metrics.labels against the router's names, made only "
                    "where a preset reads the router's own data plane (istio with the istio "
                    "router, envoy with the envoy router); here metrics.labels are taken as "
                    "given: remove it",
                )
            return
        if metrics.relabelled and metrics.labels == weighted:
            yield _Problem(
                ("metrics", "relabelled"),
                metrics.relabelled,
                f"metrics.labels are the router's own {what}s ({where}): nothing is relabelled; "
                "give the values your Prometheus holds in metrics.labels, or remove relabelled",
            )
        for colour in Colour:
            label, own = metrics.labels.of(colour), weighted.of(colour)
            theirs = weighted.of(colour.other)
            if label == own:
                continue
            other = colour.other.value
            if label == theirs:
                why = (
                    f"is {other}'s {what} ({where}): blue and green swapped? {colour.value}'s "
                    f"weighted {what} is {own!r}"
                )
            elif metrics.relabelled:
                if not _holds(label, theirs) or _holds(label, own):
                    continue  # the user's word: their Prometheus names it so
                why = (
                    f"holds {other}'s {what} name {theirs!r} ({where}), not {colour.value}'s "
                    f"{own!r}: blue and green swapped?"
                )
            else:
                why = (
                    f"is no {what} the router weights ({where}): {colour.value}'s is "
                    f"{own!r}{made}; leave metrics.labels out and the preset reads the router's, "
                    "or, if your Prometheus relabels them, give its values and set "
                    "metrics.relabelled: true"
                )
            yield _Problem(("metrics", "labels", colour.value), label, f"{label!r} {why}")

    @_cross_field
    def _slo_has_a_histogram(self) -> Iterator[_Problem]:
        """An SLO check or guard needs the metrics source's latency histogram: custom queries
        without `latency_bucket` count no slow request, so `threshold: slo` judged nothing (the
        canary held as undecided whatever its latency) and `max_slow_rate` never tripped. So
        do static ticks giving a colour requests without `latency_buckets` in any of them: how
        many were slow is unknown, and the dry run held until max_step_duration_s."""
        lat, metrics = self.analysis.latency, self.metrics
        slo_ms = lat.measured_slo_ms
        if slo_ms is None:
            return
        if isinstance(metrics, PrometheusMetricsConfig):
            if metrics.queries is None or metrics.queries.latency_bucket is not None:
                return  # a preset reads its histogram (custom without queries is refused itself)
            missing = (
                "metrics.queries has no latency_bucket: no request would count as slow. Add "
                "metrics.queries.latency_bucket"
            )
        elif isinstance(metrics, StaticMetricsConfig):
            # Per colour, over the ticks (`history` is green's before the rollout: no tick's).
            # A source scripting no requests of a colour judges none of them, slow or not.
            blind = [
                colour.value
                for colour in Colour
                if any(getattr(tick, colour.value).requests for tick in metrics.ticks)
                and not any(getattr(tick, colour.value).latency_buckets for tick in metrics.ticks)
            ]
            if not blind:
                return
            missing = (
                f"metrics.ticks give {' and '.join(blind)} requests but no latency_buckets: how "
                "many were slow is unknown, so latency is never judged. Add latency_buckets to "
                f"{'its' if len(blind) == 1 else 'their'} counts"
            )
        else:
            return  # simulated and azuremonitor always count a histogram
        field, value = (
            ("threshold", "'slo' measures")
            if lat.threshold == "slo"
            else ("max_slow_rate", "measures")
        )
        yield _Problem(
            ("analysis", "latency", field),
            getattr(lat, field),
            f"{value} requests slower than slo_ms ({slo_ms:g} ms) on the latency histogram, and "
            f"{missing}, or set analysis.latency.enabled to false",
        )

    @_cross_field
    def _slo_is_a_bucket_bound(self) -> Iterator[_Problem]:
        """`latency.slo_ms` must be a bound of the histogram it is measured on: between two, the
        latency check and its guard counted the requests above the next one up while every
        message named the SLO. Refused here where the spec gives the bounds; Prometheus' are
        known only when read, so its provider is given the SLO (`make_metrics(latency=...)`)
        and refuses it then."""
        lat = self.analysis.latency
        slo_ms = lat.measured_slo_ms
        if slo_ms is None:
            return
        metrics = self.metrics
        if isinstance(metrics, SimulatedMetricsConfig | AzureMonitorMetricsConfig):
            bounds: list[float] = list(metrics.buckets_ms)
            fix = f" (or add {slo_ms:g} to metrics.buckets_ms)"
        elif isinstance(metrics, StaticMetricsConfig):
            ticks = [*metrics.ticks, *([metrics.history] if metrics.history else [])]
            bounds = [
                bound * 1000.0
                for tick in ticks
                for counts in (tick.blue, tick.green)
                for bound, _ in counts.latency_buckets
            ]
            fix = ""
        else:
            return
        if problem := slo_bound_problem(slo_ms, bounds, fix):
            yield _Problem(("analysis", "latency", "slo_ms"), lat.slo_ms, problem)

    @_cross_field
    def _mirror_needs_a_shadow_step(self) -> Iterator[_Problem]:
        """An explicit `mirror_percent` needs a 0 % step; the data plane must be able to mirror."""
        loc, value = ("mirror_percent",), self.shadow_percent
        if self.mirror_percent and self._istio_preset:
            # First: "start `steps` with 0" would only lead to this refusal.
            value = self.mirror_percent
        if not value:
            if self.mirror_percent and 0 not in self.plan:  # asked for, with nowhere to go
                yield _Problem(
                    loc,
                    self.mirror_percent,
                    "mirrors traffic only during a 0 % step, and the plan has none: start "
                    f"`steps` with 0 (e.g. {[0, *self.plan]}) or set mirror_percent to 0",
                )
            return
        if isinstance(self.router, AzureMLRouterConfig) and value > AZURE_MAX_MIRROR_PERCENT:
            yield _Problem(
                loc,
                value,
                f"Azure ML mirrors at most {AZURE_MAX_MIRROR_PERCENT} % of an endpoint's traffic",
            )
        if self._istio_preset:
            yield _Problem(
                loc,
                value,
                "the istio metrics preset cannot see a shadow step: Istio's source reporter does "
                "not count mirrored requests (istio/istio#23496). Set mirror_percent to 0 (the "
                "0 % step then only deploys blue) or read blue with `preset: custom` queries",
            )

    @_cross_field
    def _tick_floor(self) -> Iterator[_Problem]:
        """A tick that queries a metrics service or writes to the API server is not sent faster
        than MIN_REMOTE_INTERVAL_S: `interval_s: 0.05` would hammer it for nothing new."""
        remote = [
            f"{section} kind {config.kind}"
            for section, config in (("metrics", self.metrics), ("state", self.state))
            if isinstance(
                config,
                PrometheusMetricsConfig | AzureMonitorMetricsConfig | KubernetesStateConfig,
            )
        ]
        interval = self.analysis.interval_s
        if remote and interval < MIN_REMOTE_INTERVAL_S:
            yield _Problem(
                ("analysis", "interval_s"),
                interval,
                f"{interval:g} s is below {MIN_REMOTE_INTERVAL_S:g} s, the shortest tick with "
                f"{' and '.join(remote)}: each tick reaches {'them' if len(remote) > 1 else 'it'} "
                "over the network (the value is in seconds)",
            )

    @_cross_field
    def _kubernetes_names(self) -> Iterator[_Problem]:
        """With the kubernetes store, the name names ConfigMaps and a Lease: say so at `name`."""
        if isinstance(self.state, KubernetesStateConfig):
            problem = rollout_name_problem(self.name)
            if problem is not None:
                yield _Problem(("name",), self.name, problem)

    @property
    def _istio_preset(self) -> bool:
        """Istio's source reporter does not count mirrored requests (istio/istio#23496)."""
        return isinstance(self.metrics, PrometheusMetricsConfig) and self.metrics.preset == "istio"

    @property
    def plan(self) -> tuple[int, ...]:
        """The weight plan, presets and defaults resolved; always ends at 100."""
        if self.steps is None:
            return LIVE_STEPS if self._istio_preset else DEFAULT_STEPS
        return SEED_STEPS if self.steps == "seed" else tuple(self.steps)

    @property
    def shadow_percent(self) -> int:
        """Percent mirrored to blue in the shadow step (the plan's 0 % step); 0: no shadow step."""
        share = self.mirror_percent
        if share is None:
            share = 0 if self._istio_preset else DEFAULT_MIRROR_PERCENT
        return share if 0 in self.plan else 0

    @field_serializer("steps")
    def _resolved_steps(self, steps: list[int] | str | None) -> list[int] | str:
        """Dump the plan that takes effect (a written-out spec says what it will do)."""
        return list(self.plan) if steps is None else steps

    @field_serializer("mirror_percent")
    def _effective_mirror(self, mirror_percent: int | None) -> int:
        """Dump the share that takes effect: 0 without a 0 % step, so a dumped spec loads again."""
        return self.shadow_percent


def describe_errors(exc: ValidationError, root: type[BaseModel]) -> str:
    """A validation error of `root` in one line: each problem at its field's path, in words a
    YAML author reads (a typo'd key with the nearest known one, `expected a number`)."""
    problems = []
    for err in exc.errors():
        loc = err["loc"]
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = (*loc, "kind")  # the key at fault, not its section
        where = ".".join(map(_loc_part, _written_path(root, loc))) or "(top level)"
        said = (
            _not_a_number(err)
            or _not_text(err)
            or _not_a_flag(err)
            or _unknown_field(err, root)
            or _unknown_kind(err, root)
            or _not_a_mapping(err, root)
            or _value_error(err)
            or err["msg"]
        )
        problems.append(f"{where}: {said}")
    return "; ".join(problems)


def _written_path(root: type[BaseModel], loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """`loc` as the YAML author wrote it: without the tags pydantic puts in for a discriminated
    union's member (`router.istio.namespace` → `router.namespace`); field names, indexes and
    keys stay, and so does whatever follows a part the models do not know."""
    node: Any = root
    parts = list(loc)
    written: list[str | int] = []
    while parts:
        args = [a for a in typing.get_args(node) if a is not type(None)]
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(parts[0]))
            if field is None:
                break
            written.append(parts.pop(0))
            node = field.annotation
        elif typing.get_origin(node) in (list, tuple, dict) and args:
            written.append(parts.pop(0))  # an index or a key
            node = args[-1] if typing.get_origin(node) is dict else args[0]
        elif len(args) == 1 or typing.get_origin(node) is Annotated:
            node = args[0]  # Optional[X], Annotated[X, ...]
        elif args:
            tagged = [a for a in args if _kind(a) == parts[0]]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if tagged:
                parts.pop(0)  # the tag: the user wrote it as `kind:`, not as a key
                node = tagged[0]
            elif len(models) == 1:
                node = models[0]
            else:
                break
        else:
            break
    return (*written, *parts)


def _unknown_kind(err: Any, root: type[BaseModel]) -> str | None:
    """A section's `kind` that names no backend, or none at all, with the kinds there are
    (pydantic says "Unable to extract tag using discriminator 'kind'"); None otherwise."""
    if err["type"] not in ("union_tag_invalid", "union_tag_not_found"):
        return None
    kinds = _kinds_at(root, err["loc"])
    listed = f"one of {', '.join(kinds)}" if kinds else "see docs/engine.md"
    if err["type"] == "union_tag_not_found":
        return f"missing: {listed}"
    tag = str(err["ctx"]["tag"])
    near = difflib.get_close_matches(tag, kinds, n=1, cutoff=0.6)
    if near:
        return f"unknown kind {tag!r}: did you mean {near[0]}? ({listed})"
    return f"unknown kind {tag!r}: {listed}"


def _not_a_mapping(err: Any, root: type[BaseModel]) -> str | None:
    """A section written as a scalar or a list (`candidate: diabetes:2`, as on the command line;
    `router: istio`): what it takes instead; None for any other error."""
    if err["type"] not in ("model_type", "model_attributes_type"):
        return None
    value, loc = err["input"], err["loc"]
    if isinstance(value, str) and loc[-1:] in (("candidate",), ("stable",)):
        model, colon, version = value.partition(":")
        if colon and model and version:
            return (
                f"expected a mapping, got the text {value!r}: write "
                f'{{model: {model}, version: "{version}"}}'
            )
    kinds = _kinds_at(root, loc)
    if value in kinds:
        return f"expected a mapping, got the text {value!r}: write {{kind: {value}, ...}}"
    if isinstance(value, bool):
        got = f"the boolean {str(value).lower()}"
    elif value is None:
        got = "nothing (an empty value)"
    elif isinstance(value, str):
        got = f"the text {value!r}"
    elif isinstance(value, int | float):
        got = f"the number {value!r}"
    else:
        got = "a list" if isinstance(value, list) else f"a {type(value).__name__}"
    if kinds:
        return f"expected a mapping with a kind (one of {', '.join(kinds)}), got {got}"
    fields = _fields_at(root, loc)
    shown = ", ".join([*fields[:3], "..."] if len(fields) > 3 else fields)
    return f"expected a mapping ({shown}), got {got}" if shown else f"expected a mapping, got {got}"


def _kinds_at(root: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """The `kind`s of the discriminated union at `path` (a top-level section such as
    `router`), in the order the union lists them; [] where there is none."""
    node: Any = root
    for part in path:
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return []
        field = node.model_fields.get(str(part))
        if field is None:
            return []
        node = field.annotation
    while typing.get_origin(node) is Annotated:
        node = typing.get_args(node)[0]
    return [kind for member in typing.get_args(node) if (kind := _kind(member)) is not None]


def _value_error(err: Any) -> str | None:
    """A validator's own words, without pydantic's "Value error, " in front of them."""
    if err["type"] != "value_error":
        return None
    return str(err["msg"]).removeprefix("Value error, ")


def _unknown_field(err: Any, root: type[BaseModel]) -> str | None:
    """A key no model here has, with the nearest one the section does have (a typo:
    `intervall_s` → `interval_s`); None for any other error."""
    if err["type"] != "extra_forbidden":
        return None
    known = _fields_at(root, err["loc"][:-1])
    near = difflib.get_close_matches(str(err["loc"][-1]), known, n=1, cutoff=0.6)
    return f"unknown field: did you mean {near[0]}?" if near else "unknown field"


def _fields_at(root: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """The field names of the model at `path` in a validation error's location (a
    discriminated union's tag, `router.istio`, picks its member); [] where none is found."""
    node: Any = root
    parts = list(path)
    while True:
        args = [a for a in typing.get_args(node) if a is not type(None)]
        if isinstance(node, type) and issubclass(node, BaseModel):
            if not parts:
                return [name for name, field in node.model_fields.items() if not field.exclude]
            field = node.model_fields.get(str(parts.pop(0)))
            if field is None:
                return []
            node = field.annotation
        elif typing.get_origin(node) in (list, tuple, dict) and args:
            if not parts:
                return []
            parts.pop(0)  # an index or a key
            node = args[-1] if typing.get_origin(node) is dict else args[0]
        elif len(args) == 1 or typing.get_origin(node) is Annotated:
            node = args[0]  # Optional[X], Annotated[X, ...]
        elif args and parts:
            # A union: a tagged member by its `kind`, else the one model among plain values.
            tagged = [a for a in args if _kind(a) == parts[0]]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if tagged:
                parts.pop(0)
                node = tagged[0]
            elif len(models) == 1:
                node = models[0]
            else:
                return []
        else:
            return []


def _kind(member: Any) -> str | None:
    """A discriminated union member's tag (its `kind` field's default), else None."""
    if not (isinstance(member, type) and issubclass(member, BaseModel)):
        return None
    field = member.model_fields.get("kind")
    return field.default if field is not None and isinstance(field.default, str) else None


def _not_a_number(err: Any) -> str | None:
    """What a Number or WholeNumber refused, said for YAML (pydantic says "Input should be a
    valid number" of `"5"`, which reads as one); None for any other error."""
    if err["type"] not in ("float_type", "int_type"):
        return None
    wanted = "a whole number" if err["type"] == "int_type" else "a number"
    value = err["input"]
    if isinstance(value, bool):  # YAML's true/false/yes/no/on/off
        return f"expected {wanted}, got the boolean {str(value).lower()}"
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:  # "5s", "ten"
            return f"expected {wanted}, got the text {value!r}"
        if not _yaml_reads_a_number(value):
            # Written without quotes already: YAML 1.1 reads 1e1, 1.0e1 (no sign) or inf as text.
            return (
                f"expected {wanted}, got the text {value!r}: YAML reads {value.strip()} as text; "
                f"write {_as_yaml_number(value)}"
            )
        return f"expected {wanted}, got the text {value!r}: write it without quotes"
    if isinstance(value, float):
        return f"expected {wanted}, got {value!r}"
    return None


def _yaml_reads_a_number(text: str) -> bool:
    """Whether YAML reads `text`, written without quotes, as a number."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_yaml_number(text: str) -> str:
    """The number `text` means (float() reads it), every digit kept (`repr`), written as YAML
    1.1 reads a number: a whole number plainly, else with a dot in the mantissa and a signed
    exponent."""
    number = float(text)
    if math.isnan(number):
        return ".nan"
    if math.isinf(number):
        return ".inf" if number > 0 else "-.inf"
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    mantissa, e, exponent = repr(number).partition("e")
    if not e:
        return mantissa  # 0.05: a dot and no exponent
    if "." not in mantissa:
        mantissa += ".0"
    return f"{mantissa}e{int(exponent):+d}"


def _not_text(err: Any) -> str | None:
    """What a text field refused that YAML read as something else (pydantic says "Input should
    be a valid string" of `model: 1.10`, read as the number 1.1): quote it; None for any other
    error."""
    if err["type"] != "string_type":
        return None
    value = err["input"]
    if isinstance(value, bool):
        got = f"the boolean {str(value).lower()}"
        hint = " (unquoted, YAML reads yes, no, on and off as booleans)"
    elif isinstance(value, int | float):
        got, hint = f"the number {value!r}", ""
        if isinstance(value, float):
            hint = " (unquoted, YAML reads 1.10 as the number 1.1)"
    elif isinstance(value, datetime.date):
        got, hint = f"the date {value.isoformat()}", ""
    else:
        return None
    return f"expected text, got {got}: quote it{hint}"


#: What YAML 1.1 reads as a boolean when written without quotes (PyYAML's resolver).
_YAML_BOOLEANS = {
    **dict.fromkeys(("true", "yes", "on"), "true"),
    **dict.fromkeys(("false", "no", "off"), "false"),
}


def _not_a_flag(err: Any) -> str | None:
    """What a Flag refused, said for YAML (pydantic says "Input should be a valid boolean" of
    `"no"`, which reads as one); None for any other error."""
    if err["type"] != "bool_type":
        return None
    wanted = "expected true or false"
    value = err["input"]
    if isinstance(value, str):
        meant = _YAML_BOOLEANS.get(value.lower())
        if meant is None:  # "maybe", "1"
            return f"{wanted}, got the text {value!r}"
        return f"{wanted}, got the text {value!r}: write {meant} without quotes"
    if isinstance(value, int | float):
        return f"{wanted}, got the number {value!r}"
    return None


def _loc_part(part: str | int) -> str:
    """A part of a field path; an unknown key that is no plain word quoted (a key YAML read
    from `? |` holds a newline, which would break the one-line message)."""
    text = str(part)
    return (
        text if text and text.isprintable() and not any(c.isspace() for c in text) else repr(text)
    )


def spec_from_dict(data: Any, *, source: str = "spec") -> RolloutSpec:
    """Validate a parsed document; ConfigError names each bad field (`analysis.alpha: ...`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return RolloutSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_errors(exc, RolloutSpec)}") from None


#: What a YAML file with no document (empty, or blanks and comments only) is said to be; YAML
#: reads it as null, which "expected a mapping at the top level" left to be worked out.
EMPTY_YAML = "the file is empty (no settings in it)"


#: The largest spec file read: a spec is a few kilobytes (a scripted static source more), and
#: a file of gigabytes (a wrong path, a log) was read whole into memory before PyYAML choked.
MAX_SPEC_BYTES = 1024 * 1024


def load_spec(path: str | Path) -> RolloutSpec:
    """Read and validate a YAML spec; relative paths in it stay relative to the caller's cwd."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_SPEC_BYTES + 1)  # no more: the file may be anything
        if len(raw) > MAX_SPEC_BYTES:
            raise ConfigError(
                f"{path}: not a spec: larger than {MAX_SPEC_BYTES:,} bytes, the most a spec may "
                "be (is it the right file?)"
            )
        # New lines as read_text reads them (universal newlines).
        text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read spec: {exc.strerror}") from None
    except UnicodeDecodeError as exc:  # e.g. saved as UTF-16 by Windows tools
        raise ConfigError(
            f"{path}: cannot read spec: not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
            f"offset {exc.start}); save it as UTF-8"
        ) from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{path}: not a spec: collections nested too deeply") from None
    if data is None:
        raise ConfigError(f"{path}: {EMPTY_YAML}")
    where = _boolean_key(data)
    if where is None:
        return spec_from_dict(data, source=str(path))
    problem = (
        f"{path}: {where}: a key YAML reads as a boolean (an unquoted on, off, yes or no); "
        "quote it, or use the field's name"
    )
    try:  # report the rest too, without pydantic's "Keys should be strings" for the same key
        spec_from_dict(_without_boolean_keys(data), source=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{problem}\n{exc}") from None
    raise ConfigError(problem)


#: Values aliases (`*name`) may add to a spec beyond those written: a spec repeats a section or
#: two, a YAML bomb ("billion laughs": nine aliases of nine aliases ...) hundreds of millions.
MAX_ALIASED_VALUES = 100_000


#: What a YAML tag a plain value may resolve to reads as, in words.
_TAG_KINDS = {
    "tag:yaml.org,2002:timestamp": "a date",
    "tag:yaml.org,2002:int": "a whole number",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:bool": "a boolean",
}


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what it would take silently or choke on: a key given twice
    in a mapping (the last would win unseen), an alias inside the value it names (a recursive
    document), aliases expanding a small file into a huge document (billion laughs)."""

    def construct_document(self, node: yaml.Node) -> Any:
        """The document, once its aliases are known to expand to a spec-sized one."""
        written, expanded = _node_counts(node)
        if expanded - written > MAX_ALIASED_VALUES:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"aliases (*name) expand {written:,} values to {expanded:,}: refused, a spec "
                f"repeats at most {MAX_ALIASED_VALUES:,}",
                node.start_mark,
            )
        return super().construct_document(node)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """The node's value; ConstructorError where PyYAML's constructors fail on its text with
        a bare exception (`2024-13-45` looks like a date and is none, `!!int abc`, `0x_`)."""
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, AttributeError, LookupError, ArithmeticError) as exc:
            kind = _TAG_KINDS.get(node.tag, node.tag.rpartition(":")[2])
            text = repr(node.value) if isinstance(node, yaml.ScalarNode) else "this value"
            # Only the date's reason is worth reading ("month must be in 1..12"); the others
            # are PyYAML's internals ("'NoneType' object has no attribute 'groupdict'").
            why = f" ({exc})" if kind == "a date" and isinstance(exc, ValueError) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"{text} is not {kind}{why}; quote it if it is text", node.start_mark
            ) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """The mapping; ConstructorError at the second occurrence of a key."""
        if not isinstance(node, yaml.MappingNode):  # e.g. `!!set [a]`: the base class says so
            return super().construct_mapping(node, deep)
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: the keys given next to it override, on purpose
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, bool):
                continue  # load_spec says which key YAML read as a boolean, in words
            try:
                seen = first.setdefault(key, key_node)
            except TypeError:
                continue  # unhashable: the base class says so
            if seen is not key_node:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {seen.start_mark.line + 1}): "
                    "give it once",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


def _node_counts(root: yaml.Node) -> tuple[int, int]:
    """The values of a composed document: as written, and with every alias expanded.

    Iterative (a bomb's expansion is never walked, each node is counted once); ConstructorError
    for a collection holding itself through an alias, which no spec field can take.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # the collections being counted: the current node's ancestors
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, counted = stack.pop()
        children = _children(node)
        if counted:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
        elif id(node) in open_nodes:
            raise yaml.constructor.ConstructorError(
                None, None, "an alias (*name) inside the value it names", node.start_mark
            )
        elif id(node) not in sizes:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children)
    return len(sizes), sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def parse_yaml(text: str) -> Any:
    """`text` read as a spec is (`_SpecLoader`): a key given twice, a value PyYAML's constructors
    choke on (`2024-13-45`) or an alias bomb is a yaml.YAMLError (see `yaml_problem`), never a
    bare ValueError or a silent last-one-wins. RecursionError for collections nested too deeply."""
    return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: PyYAML's own text spans five, with a caret under a quoted line."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    return f"{where}: {problem}" + (f" ({context})" if context else "")


def _without_boolean_keys(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _without_boolean_keys(v) for k, v in data.items() if not isinstance(k, bool)}
    if isinstance(data, list):
        return [_without_boolean_keys(item) for item in data]
    return data


def _boolean_key(data: Any, where: str = "") -> str | None:
    """Where (a dotted path, "top level" at the root) YAML 1.1 turned a mapping key into a bool."""
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, bool):
                return where or "top level"
            if found := _boolean_key(value, f"{where}.{key}" if where else str(key)):
                return found
    elif isinstance(data, list):
        for index, item in enumerate(data):
            if found := _boolean_key(item, f"{where}.{index}"):
                return found
    return None
