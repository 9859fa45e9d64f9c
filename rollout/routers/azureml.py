"""Azure ML router: a managed online endpoint's `traffic` (and `mirror_traffic`) per deployment.

The two colours are two deployments of one managed online endpoint (named `blue` and `green`
unless the config says otherwise). Azure ML does the routing; this module speaks azure-ai-ml
(`MLClient.online_endpoints` / `online_deployments`, imported lazily: `import azure.ai.ml` costs
seconds) and keeps Azure's rules in pure functions (`plan_traffic`, `check_mirror`):

- `traffic` sums to 0 or 100 over the endpoint's deployments. Our weights give blue + green
  = 100, so another deployment taking live traffic is refused rather than silently zeroed.
- `mirror_traffic` (shadow) goes to at most one deployment, at most 50 %, and never to a
  deployment that also takes live traffic. Blue is mirrored exactly when the weights ask for it
  (`Weights.mirror`, the spec's `mirror_percent` during the shadow step, the plan's 0 % step):
  it answers real requests, users never see its answers. Any other weights end blue's shadow:
  giving blue live traffic, and a rollback to 0 % (a rolled-back candidate gets no more
  requests). Mirroring a blue that is not deployed (or whose deployment Failed) is refused.
  Shadows of deployments we do not manage are left as they are.
- A request with header `azureml-model-deployment: <deployment>` is pinned to that deployment
  (Azure's equivalent of our `x-api-version`; it bypasses `traffic`).
- Both maps are keyed by deployment names in lower case: azure-ai-ml lower-cases the keys it
  sends (Azure matches deployment names regardless of case), so a deployment the spec names
  `Cand-V2` is `cand-v2` there, and the maps are read and planned in lower case.

`deploy` creates the endpoint when missing (key auth, no traffic), then creates the
ManagedOnlineDeployment with the release's registered model `azureml:<model>:<version>`, the
other colour's environment variables, probes, request settings, App Insights setting, model
data collection and egress flag (so that the judge compares the releases under the same
conditions, and the candidate serves under production's duties: `_serving`) and the release
identity in its tags and in score.py's AML_ROLLOUT_MODEL_VERSION / AML_ROLLOUT_COLOUR
environment variables, or, when it exists, reads it and sends it back with only the model,
those tags and variables and the configured environment/code changed (the PUT replaces the whole
deployment: an operator's capacity, environment variables, request settings stay), and a blue
left by an earlier rollout given green's settings where it has none (`_serving_for`). Durations
are read as Azure holds them, to the millisecond (`_read_deployment`: azure-ai-ml's `get` reads
whole seconds), so what is sent back is what was there; a data collection is sent back as
azure-ai-ml can send it (`_collector_for`). It returns
when Azure reports the operation done; while the endpoint or the deployment is mid-change
(Azure refuses to write it then) it first waits for that change, at most `deploy_timeout_s`.
A deployment that already holds the release as configured (Succeeded, the release's tags,
model and variables, a candidate's settings green's, the configured environment and code
asset; a workspace environment's
`@latest` is resolved for that, by one read) is left as it is: a deploy
retried after a timeout, which Azure went on to finish, does not roll every instance a second
time.
`release` refuses a deployment from which no release serves (its provisioning Failed or was
Canceled, or it is still Creating or Deleting), and one still Updating, whose tags name the
release asked for rather than the one serving; `set_weights` refuses traffic only to the former
(an Updating deployment serves through the change). `get_weights` refuses (RouterError, retried)
to read the traffic of an endpoint whose last change Failed or was Canceled, or is still in
progress: what it shows may be what was asked for, not what serves. `remove` deletes the
deployment, refusing while it takes live traffic; it too first waits for a change of the
endpoint or the deployment.

Every write is an ARM long-running operation, and every one is waited for with a bound
(`_finish`): an operation Azure leaves InProgress must not hang the rollout, or the Azure ML
pipeline step running it, for ever. Creating, updating or deleting a deployment (or creating the
endpoint) moves VMs and may build an image: `deploy_timeout_s` (an hour by default). A change of
the endpoint's `traffic` / `mirror_traffic` moves no VMs and takes seconds to a couple of
minutes: `traffic_timeout_s` (five minutes by default), so that a rollback stuck at Azure fails
loudly in minutes, not after the deploy bound. On expiry the call raises RouterError naming the
operation and the setting; Azure carries on, and the next call reads the state it reached (the
SDK's poller thread, which has no cancel, goes on reading the operation until Azure ends it).
Each single ARM request, azure-core's retries and Retry-After waits included, ends within
`traffic_timeout_s` too (`from_config`'s client, rollout.azure_retry).

What Azure (or this module for it) refuses, and will refuse again however often asked, is
RouterRefused, which the controller does not retry: live traffic held by a deployment we do not
manage, a deployment not deployed by aml-rollout, or one whose provisioning Failed, traffic to a
deployment that does not exist, a mirror Azure would refuse, a 401 or 403 (`_REFUSED`: the
identity or its roles), what azure-ai-ml's validation refuses before sending (`_invalid`). A
change still in progress, a timeout, other HTTP errors (400 included, see `_REFUSED`) and no
credential found at all stay RouterError, retried.

Azure gives no optimistic concurrency on the endpoint through the SDK: two writers of `traffic`
race with last-writer-wins (and `deploy`'s read-modify-write of a deployment loses a change made
between its read and its PUT: no etag, no If-Match), so run one controller per endpoint (the
state store's lease does, among controllers sharing that store).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import io
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from rollout.azure_credential import default_credential
from rollout.azure_retry import bounded_retry_policy
from rollout.azure_text import http_detail, one_line
from rollout.config import AZURE_MAX_MIRROR_PERCENT as MAX_MIRROR_PERCENT
from rollout.core.types import Colour, Release, Weights
from rollout.errors import (
    GONE,
    ConfigError,
    DeployFailed,
    RouterError,
    RouterRefused,
    WeightsUnsettled,
    error_chain,
)
from rollout.routers.base import Fence, no_fence

if TYPE_CHECKING:
    from rollout.config import AzureMLRouterConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

PIN_HEADER = "azureml-model-deployment"
TAG_PREFIX = "aml-rollout."
#: Seconds between two reads while waiting on Azure: of a resource mid-change (`_settled`), and
#: of an ARM operation's status (the SDK's LRO poller, when ARM sends no Retry-After).
POLL_S = 5.0


# ---- Azure's traffic rules, pure ------------------------------------------------------------
def plan_traffic(
    current: Mapping[str, int],
    mirror: Mapping[str, int],
    names: Mapping[Colour, str],
    weights: Weights,
) -> tuple[dict[str, int], dict[str, int]]:
    """The endpoint's new (traffic, mirror_traffic) for `weights` (checked by `check_mirror`).

    Zero entries are left out, as azure-ai-ml strips them before sending anyway, so a plan
    compares equal to what the endpoint reads back. A deployment we do not manage that takes
    live traffic is an error, since blue + green already make 100. Blue is shadowed at
    `weights.mirror` and at nothing else (0: whatever shadow it had ends); shadows of other
    deployments are kept. (The caller checks that blue is deployed when mirrored.)
    """
    ours = set(names.values())
    foreign = {name: pct for name, pct in current.items() if name not in ours and pct}
    if foreign:
        raise RouterRefused(
            f"deployments aml-rollout does not manage take live traffic: {foreign}; "
            "set them to 0 first"
        )
    traffic = {name: weights.of(colour) for colour, name in names.items() if weights.of(colour)}
    new_mirror = {name: pct for name, pct in mirror.items() if name not in ours and pct}
    if weights.mirror:
        new_mirror[names[Colour.BLUE]] = weights.mirror
    check_mirror(new_mirror, traffic)
    return traffic, new_mirror


def nonzero(shares: Mapping[str, int]) -> dict[str, int]:
    """A traffic map as Azure keeps it: without zero entries, names in lower case (as
    azure-ai-ml sends them)."""
    return {name.lower(): int(pct) for name, pct in shares.items() if pct}


def check_mirror(mirror: Mapping[str, int], traffic: Mapping[str, int]) -> None:
    """Raise RouterRefused when `mirror_traffic` breaks Azure's rules."""
    shadowed = {name: pct for name, pct in mirror.items() if pct}
    if len(shadowed) > 1:
        raise RouterRefused(f"mirror traffic may go to one deployment only, got {shadowed}")
    for name, pct in shadowed.items():
        if not 0 < pct <= MAX_MIRROR_PERCENT:
            raise RouterRefused(
                f"mirror traffic to {name!r} must be 1..{MAX_MIRROR_PERCENT} %, got {pct}"
            )
        if traffic.get(name):
            raise RouterRefused(
                f"deployment {name!r} takes live traffic; it cannot also be mirrored"
            )


def weights_from_traffic(
    traffic: Mapping[str, int], names: Mapping[Colour, str], mirror: Mapping[str, int] | None = None
) -> Weights:
    """Our weights as the endpoint's `traffic` and `mirror_traffic` hold them.

    A mirror to blue while blue takes live traffic is a state Azure refuses to write, so one
    read back is not what serves (a change shown after it failed, or a writer that is not us):
    a RouterError saying so rather than weights that hide it (the controller then sets the
    weights again, and `set_weights` writes a plan Azure accepts).
    """
    blue_name, green_name = names[Colour.BLUE], names[Colour.GREEN]
    blue, green = int(traffic.get(blue_name, 0)), int(traffic.get(green_name, 0))
    shadow = int((mirror or {}).get(blue_name, 0))
    if shadow and blue:
        raise RouterError(
            f"endpoint mirrors {shadow} % to {blue_name!r}, which also takes {blue} % of live "
            "traffic: Azure refuses that, so it is not what serves (a change that failed, or "
            "another writer?)"
        )
    try:
        return Weights(blue=blue, green=green, mirror=shadow)  # Azure caps the mirror at 50
    except ValueError as exc:
        foreign = {n: pct for n, pct in traffic.items() if n not in names.values() and pct}
        why = (
            f"deployments aml-rollout does not manage take live traffic: {foreign}"
            if foreign
            else "no traffic set yet?"
        )
        raise RouterError(
            f"endpoint traffic {dict(traffic)} does not split 100 % between "
            f"{blue_name!r} and {green_name!r} ({why})"
        ) from exc


def release_tags(release: Release) -> dict[str, str]:
    """The release identity, stored as deployment tags."""
    return {
        f"{TAG_PREFIX}model": release.model,
        f"{TAG_PREFIX}version": release.version,
        f"{TAG_PREFIX}sha256": release.sha256,
    }


def _failed(deployment: Any) -> str:
    """The deployment's provisioning state when it is Failed or Canceled, else ""."""
    state = _state(deployment)
    return state if state.lower() in ("failed", "canceled") else ""


def _unserved(deployment: Any) -> str:
    """The deployment's provisioning state when it must take no traffic, else "".

    Failed or Canceled, or Creating (not up yet) or Deleting (going away). Updating and Scaling
    are not: the deployment serves through them (an operator scaling green must not block a
    rollback).
    """
    state = _state(deployment)
    return state if state.lower() in ("failed", "canceled", "creating", "deleting") else ""


def _unsettled(deployment: Any) -> str:
    """The deployment's provisioning state when its tags may not name the release it serves.

    `_unserved`, and Updating: Azure stores a PUT's tags (and model) at once, while the change
    rolls out over minutes (Azure ML keeps extra capacity for such upgrades) or fails, so the
    tags of an Updating deployment name the release asked for, not the one serving. Scaling is
    not: it changes the instance count only.
    """
    state = _state(deployment)
    return state if _unserved(deployment) or state.lower() == "updating" else ""


def _state(resource: Any) -> str:
    """A resource's provisioning state as Azure spells it ("" when it has none)."""
    state = getattr(resource.provisioning_state, "value", resource.provisioning_state)
    return str(state or "")


def _is_asset(held: Any, kind: str, ref: str) -> bool:
    """Whether `held` (as Azure answers it: an ARM id) is the asset `ref` (`azureml:name:version`)
    names; `kind` is the ARM collection: models, environments, codes. An environment may be
    written `name:version` (a curated one's short form too): azure-ai-ml sends it as
    `azureml:name:version`."""
    parts = ref.split(":")
    if kind == "environments" and len(parts) == 2 and parts[0] != "azureml":
        ref, parts = f"azureml:{ref}", ["azureml", *parts]
    text = str(held or "")
    if text == ref:
        return True
    if len(parts) != 3 or parts[0] != "azureml":  # azureml:name@latest, a local folder, ...
        return False
    return text.lower().endswith(f"/{kind}/{parts[1]}/versions/{parts[2]}".lower())


#: azure-ai-ml's mark of a curated environment (its CURATED_ENV_PREFIX, case-sensitive).
_CURATED = "AzureML-"


def _labelled_latest(ref: str) -> str | None:
    """The workspace environment `ref` names by its label, when written `[azureml:]name@latest`
    (the one label azure-ai-ml resolves, to the version created last); else None. Not a curated
    `AzureML-...` one: azure-ai-ml sends that as written and Azure resolves it, from the azureml
    registry; nor a registry's `.../labels/latest` (a path)."""
    name, at, label = ref.removeprefix("azureml:").rpartition("@")
    if not at or label != "latest" or not name or "/" in name or ":" in name:
        return None
    return None if name.startswith(_CURATED) else name


#: States of an endpoint or a deployment whose last change Azure is still carrying out.
_IN_PROGRESS = ("creating", "updating", "scaling", "deleting")


# ---- the router -----------------------------------------------------------------------------


def _served_as(colour: Colour, release: Release) -> dict[str, str]:
    """What scoring/score.py answers with: the registered model folder holds no package.json,
    so without these every release said version "0" (and the colour was the deployment name,
    which router.deployments may set to anything)."""
    return {"AML_ROLLOUT_MODEL_VERSION": str(release.version), "AML_ROLLOUT_COLOUR": colour.value}


def _serving(source: Any, served_as: Mapping[str, str]) -> dict[str, Any]:
    """What deployment `source` serves under, besides its model and code, as the keywords of
    ManagedOnlineDeployment: a candidate takes the stable colour's, so that the judge compares
    the releases, not their settings, and so that it serves under production's duties. Its
    environment variables (a variable the score script needs missing: 5xx blamed on the
    model), probes (Azure's defaults: restarts of a model slow to load), request settings
    (timeout and requests per instance: 408s and 429s where green answers), App Insights,
    model data collection (as Azure reads it: `_collector_for` makes it one to send), the
    egress flag (legacy network isolation) and the model's mount path (both colours run the
    router's environment: a custom container looks for the model where green's finds it); with
    `served_as`, the release's own variables, on top.

    ManagedOnlineDeployment's other fields, and why they do not follow green (see
    docs/azureml-endpoint.md, `deploy`): model, environment, code_configuration (and
    code_path, scoring_script): the candidate's own, what the rollout compares; name, tags,
    description, properties: the deployment's identity, not how it serves; instance_type and
    instance_count: the router's configuration when it creates one, its own after (an operator
    scales the candidate, and the docs say to size blue as green); scale_settings: a managed
    deployment takes DefaultScaleSettings only, nothing to copy (autoscale is an Azure Monitor
    resource of its own).
    """
    return {
        "environment_variables": {**(source.environment_variables or {}), **served_as},
        "liveness_probe": source.liveness_probe,
        "readiness_probe": source.readiness_probe,
        "request_settings": source.request_settings,
        "app_insights_enabled": source.app_insights_enabled,
        "data_collector": source.data_collector,
        "egress_public_network_access": source.egress_public_network_access,
        "model_mount_path": getattr(source, "model_mount_path", None),
    }


#: A collection's data asset as Azure answers it (an ARM id) or as written (`azureml:name:v`).
_DATA_ASSET = re.compile(
    r"(?:/data/|^azureml:)(?P<name>[^/:]+)(?:/versions/|:)(?P<version>[^/:]+)$", re.IGNORECASE
)


def _data_asset(held: Any, endpoint: str, deployment: str, collection: str) -> tuple[str, str]:
    """(name, version) of the data asset a collection writes to; ("", "") for the deployment's
    own default one, which azure-ai-ml registers as `<endpoint>-<deployment>-<collection>`,
    version 1, when a collection names none (as it does for the deployment it is sent for)."""
    if held is None:
        return "", ""
    if isinstance(held, str):
        found = _DATA_ASSET.search(held)
        if found is None:
            raise RouterRefused(
                f"deployment {endpoint}/{deployment}: data collection {collection!r} writes to "
                f"{held!r}, which names no workspace data asset aml-rollout can send back"
            )
        name, version = found["name"], found["version"]
    else:  # a DataAsset, as `_collector_for` makes them
        name, version = str(held.name or ""), str(held.version or "")
    own = f"{endpoint}-{deployment}-{collection}".lower()
    return ("", "") if (name.lower(), version) in ((own, "1"), ("", "")) else (name, version)


def _collection_view(collector: Any, endpoint: str, deployment: str) -> Any:
    """Deployment `deployment`'s model data collection in a form `==` compares (azure-ai-ml's
    classes compare by identity): its own default data asset whatever Azure calls it."""
    if collector is None:
        return None
    requests = collector.request_logging
    headers = getattr(requests, "capture_headers", None) if requests is not None else None
    return (
        sorted(
            (
                key,
                str(collection.enabled).lower() == "true",
                _data_asset(collection.data, endpoint, deployment, key),
                collection.client_id,
            )
            for key, collection in (collector.collections or {}).items()
        ),
        getattr(collector, "sampling_rate", None),  # azure-ai-ml deletes it when sending
        str(getattr(collector.rolling_rate, "value", collector.rolling_rate) or "").lower(),
        sorted(headers or ()),
    )


def _egress_closed(flag: Any) -> bool:
    """Whether a deployment's `egress_public_network_access` closes its egress (Azure's
    default, when unset, is Enabled; read back, an enum whose str() is its class's name)."""
    return str(getattr(flag, "value", flag) or "").lower() == "disabled"


def _same_setting(field: str, held: Any, wanted: Any, endpoint: str, deployment: str) -> bool:
    """Whether deployment `deployment` holds setting `field` (a keyword of `_serving`) as
    `wanted`."""
    if field == "data_collector":
        return bool(
            _collection_view(held, endpoint, deployment)
            == _collection_view(wanted, endpoint, deployment)
        )
    if field == "egress_public_network_access":
        return _egress_closed(held) == _egress_closed(wanted)
    # `==` only: azure-ai-ml's settings classes answer `!=` None with NotImplemented.
    return bool(held == wanted)


def _read_deployment(ml_client: Any, endpoint: str, name: str) -> Any:
    """Deployment `name` of `endpoint` as `online_deployments.get` reads it, but with the
    durations Azure holds, to the millisecond.

    azure-ai-ml reads every duration in whole seconds (its from_iso_duration_format
    truncates): a request timeout of PT1.5S reads 1000 ms, a queue wait of PT0.5S none at
    all. Sent back, by a redeploy's PUT or to a candidate taking green's settings, that is
    another setting: an operator's timeout cut at every promotion, blue timing out where green
    does not. So this reads through the REST operation `get` itself calls, and takes the
    durations from what that parsed (timedeltas, exact); ManagedOnlineDeployment writes
    fractional seconds and milliseconds exactly. What else the SDK reads short of what Azure
    holds is mended from the same answer: the model's mount path (not read at all) and a data
    collection's mode (read as off unless spelt "Enabled"). Those are two private names of
    azure-ai-ml (the ones its `get` uses, at environment.yml's pin): an SDK without them gets
    the public `get`, whole seconds and all, and a warning, rather than a router that cannot
    read.
    """
    from azure.ai.ml.entities import OnlineDeployment

    operations = ml_client.online_deployments
    rest_get = getattr(getattr(operations, "_online_deployment", None), "get", None)
    if rest_get is None or not hasattr(OnlineDeployment, "_from_rest_object"):
        _warn_whole_seconds()
        return operations.get(name=name, endpoint_name=endpoint)
    rest = rest_get(
        endpoint_name=endpoint,
        deployment_name=name,
        resource_group_name=ml_client.resource_group_name,
        workspace_name=ml_client.workspace_name,
    )
    deployment: Any = OnlineDeployment._from_rest_object(rest)  # (typed as the REST model)
    deployment.endpoint_name = endpoint
    held = rest.properties
    settings = deployment.request_settings
    if held.request_settings is not None and settings is not None:
        settings.request_timeout_ms = _exactly(
            held.request_settings.request_timeout, _MS, settings.request_timeout_ms
        )
        settings.max_queue_wait_ms = _exactly(
            held.request_settings.max_queue_wait, _MS, settings.max_queue_wait_ms
        )
    for field in ("liveness_probe", "readiness_probe"):
        read, probe = getattr(held, field, None), getattr(deployment, field, None)
        if read is not None and probe is not None:
            probe.timeout = _exactly(read.timeout, _S, probe.timeout)
            probe.period = _exactly(read.period, _S, probe.period)
            probe.initial_delay = _exactly(read.initial_delay, _S, probe.initial_delay)
    # azure-ai-ml's read drops the model's mount path (its write sends it): sent back without
    # it, a redeploy moved the model to Azure's default path, out of a custom container's sight.
    if getattr(deployment, "model_mount_path", None) is None:
        deployment.model_mount_path = getattr(held, "model_mount_path", None)
    # azure-ai-ml sends a collection's mode as "enabled" and reads it back as on only when
    # spelt "Enabled": Azure's own spelling, whatever it answers, is the one that holds.
    collected = getattr(held, "data_collector", None)
    if collected is not None and deployment.data_collector is not None:
        for key, collection in (collected.collections or {}).items():
            mode = getattr(
                collection.data_collection_mode, "value", collection.data_collection_mode
            )
            if key in deployment.data_collector.collections:
                enabled = str(mode).lower() == "enabled"
                deployment.data_collector.collections[key].enabled = str(enabled).lower()
    return deployment


_MS, _S = dt.timedelta(milliseconds=1), dt.timedelta(seconds=1)


@functools.cache
def _warn_whole_seconds() -> None:
    log.warning(
        "this azure-ai-ml reads deployments through its public get only: request timeouts and "
        "probe durations are read, and sent back, in whole seconds"
    )


def _exactly(duration: object, unit: dt.timedelta, read: float | None) -> float | None:
    """`duration` (as the REST model parsed it) in `unit`s, a whole number as an int (as
    azure-ai-ml holds it); `read`, the SDK's own value, when it is no timedelta."""
    if not isinstance(duration, dt.timedelta):
        return read
    amount = duration / unit
    return int(amount) if amount.is_integer() else amount


class AzureMLRouter:
    """A TrafficRouter over one Azure ML managed online endpoint."""

    def __init__(
        self,
        ml_client: Any,
        endpoint: str,
        *,
        deployments: Mapping[Colour, str] | None = None,
        instance_type: str = "Standard_DS3_v2",
        instance_count: int = 1,
        environment: str | None = None,
        code: str | None = None,
        scoring_script: str = "score.py",
        deploy_timeout_s: float = 3600.0,
        traffic_timeout_s: float = 300.0,
        poll_s: float = POLL_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._ml = ml_client
        self.endpoint = endpoint
        self.names: dict[Colour, str] = dict(deployments or {c: c.value for c in Colour})
        #: The colours' keys in the endpoint's traffic maps (see `nonzero`).
        self._keys = {colour: name.lower() for colour, name in self.names.items()}
        if len(set(self._keys.values())) != 2:
            raise ConfigError(
                f"router.deployments: blue and green need two names, got {self.names}"
            )
        self._instance_type = instance_type
        self._instance_count = instance_count
        self._environment = environment
        self._code = code
        self._scoring_script = scoring_script
        self._deploy_timeout_s = deploy_timeout_s
        self._traffic_timeout_s = traffic_timeout_s
        self._poll_s = poll_s
        self._sleep = sleep
        #: Checked before every write (see routers.base.Fence): the controller's lease check.
        self.fence: Fence = no_fence
        self._workspace_found = False  # see _check_workspace

    @classmethod
    def from_config(cls, cfg: AzureMLRouterConfig, **client_kwargs: Any) -> AzureMLRouter:
        """Build with an MLClient on `default_credential()` (az login, managed identity, ...).

        The credential follows the pipelines' rule (rollout.azure_credential): inside an Azure
        ML job on a compute with a user-assigned identity, that identity moves the traffic.
        `client_kwargs` go to MLClient (tests pass `transport=`).

        The client's ARM operations are polled every `POLL_S` when ARM sends no Retry-After (a
        shorter or longer one is honoured as sent). azure-ai-ml polls a deployment's creation
        every 5 s, but an endpoint update (every traffic change) and a deployment's deletion
        at its service clients' default, 30 s. Azure applies the change when it does either
        way; the controller would see it done, and take its next step, up to 30 s later.
        `polling_interval` is that default (MLClient hands its keywords to those clients).

        Each single ARM request (a read, a write's first request, a poll), azure-core's retries
        and the Retry-After waits they honour included, ends within `traffic_timeout_s`
        (rollout.azure_retry): a throttled or hung request must not outlast the bound on the
        operation it belongs to.
        """
        from azure.ai.ml import MLClient

        client = MLClient(
            default_credential(),
            cfg.subscription_id,
            cfg.resource_group,
            cfg.workspace,
            **{
                "polling_interval": POLL_S,
                "retry_policy": bounded_retry_policy(cfg.traffic_timeout_s),
                **client_kwargs,
            },
        )
        return cls(
            client,
            cfg.endpoint,
            deployments={c: cfg.deployments.of(c) for c in Colour},
            instance_type=cfg.instance_type,
            instance_count=cfg.instance_count,
            environment=cfg.environment,
            code=cfg.code,
            scoring_script=cfg.scoring_script,
            deploy_timeout_s=cfg.deploy_timeout_s,
            traffic_timeout_s=cfg.traffic_timeout_s,
        )

    # ---------------------------------------------------------------- TrafficRouter protocol
    def deploy(self, colour: Colour, release: Release) -> None:
        """Create or update deployment `colour` with the release's registered model."""
        from azure.ai.ml.entities import CodeConfiguration, ManagedOnlineDeployment

        self._ensure_endpoint()
        name = self.names[colour]
        served_as = _served_as(colour, release)
        code = (
            CodeConfiguration(code=self._code, scoring_script=self._scoring_script)
            if self._code
            else None
        )
        # Azure refuses to write a deployment while it, or its endpoint, is mid-change (ours that
        # timed out, or someone else's): wait for that change to end, as set_weights does.
        self._settled_endpoint_for_write()
        existing = self._settled_deployment(name)
        was_failed = existing is not None and _state(existing).lower() == "failed"
        serving = self._serving_for(colour, existing, served_as)
        if existing is not None and self._holds(existing, colour, release, serving):
            # A retry of a deploy that timed out while Azure went on and finished it: a second
            # PUT would roll every instance again, for nothing.
            log.info("%s/%s already serves %s: nothing to deploy", self.endpoint, name, release.ref)
            return
        if existing is None:
            deployment = ManagedOnlineDeployment(
                name=name,
                endpoint_name=self.endpoint,
                model=f"azureml:{release.ref}",
                environment=self._environment,
                code_configuration=code,
                instance_type=self._instance_type,
                instance_count=self._instance_count,
                tags=release_tags(release),
                **(serving or {"environment_variables": served_as}),
            )
        else:
            # The PUT is a full replace: send back what Azure holds (capacity an operator
            # scaled, environment variables, request settings, probes, App Insights...) with
            # only what the router owns changed, and a leftover blue given green's settings
            # where it has none.
            deployment = existing
            deployment.model = f"azureml:{release.ref}"
            deployment.tags = {**(existing.tags or {}), **release_tags(release)}
            deployment.environment_variables = {
                **(existing.environment_variables or {}),
                **served_as,
            }
            if "data_collector" not in (serving or {}):  # a green, or a blue with no green
                deployment.data_collector = self._collector_for(existing.data_collector, name, name)
            for field, value in (serving or {}).items():
                setattr(deployment, field, value)
            if self._environment:
                deployment.environment = self._environment
            if code is not None:
                deployment.code_configuration = code
        what = f"deploy {self.endpoint}/{name}"
        self.fence()
        try:
            self._call(
                what,
                lambda: self._finish_deploy(
                    what, self._ml.online_deployments.begin_create_or_update(deployment)
                ),
            )
        except RouterError as exc:
            # Azure carried the deployment out and it Failed (an image that does not build, a
            # container that never answers its probes): an answer, not a blip. Another PUT
            # would fail the same way, up to `deploy_timeout_s` later. Said by the operation's
            # own end, or by a deployment that turned Failed: one left Failed by an earlier
            # rollout reads so before Azure even accepted this PUT (a 503, a 409 mid-change, a
            # 403 stay what they are for a healthy deployment).
            if _operation_failed(exc.__cause__):
                raise DeployFailed(str(exc)) from exc
            if not was_failed:
                failed = self._get_deployment(name)
                if failed is not None and _state(failed).lower() == "failed":
                    raise DeployFailed(str(exc)) from exc
            raise
        log.info("deployed %s:%s as %s/%s", release.model, release.version, self.endpoint, name)

    def release(self, colour: Colour) -> Release | None:
        """The release deployment `colour` serves (from its tags), or None when it is absent.

        Refused (RouterError) while its tags may not name what serves (`_unsettled`): the
        controller must not take a release Azure is still rolling out, or failed to, for the
        candidate or the stable one.
        """
        name = self.names[colour]
        found = self._get_deployment(name)
        return None if found is None else self._release_of(name, found, _unsettled)

    def _release_of(self, name: str, found: Any, refused: Callable[[Any], str]) -> Release:
        """The release in the tags of deployment `name` (`found`, as read); RouterError when
        `refused(found)` names a provisioning state, or the tags are not ours."""
        if state := refused(found):
            what = (
                "deploy it again, or delete it"
                if _failed(found)
                else "Azure has not finished that change; try again when it has"
            )
            # Failed or Canceled stays so until someone deploys again (RouterRefused); a change
            # in progress ends by itself (RouterError: the controller retries).
            error = RouterRefused if _failed(found) else RouterError
            raise error(
                f"deployment {self.endpoint}/{name} is in provisioning state {state}: {what}"
            )
        tags = found.tags or {}
        model, version = tags.get(f"{TAG_PREFIX}model"), tags.get(f"{TAG_PREFIX}version")
        if not model or version is None:
            raise RouterRefused(
                f"deployment {self.endpoint}/{name} has no {TAG_PREFIX}model/version tags: "
                "it was not deployed by aml-rollout (to adopt it, tag it with the registered "
                f"model and version it serves, {TAG_PREFIX}model and {TAG_PREFIX}version; or "
                "name other deployments in router.deployments)"
            )
        return Release(
            model=model,
            version=version,
            sha256=tags.get(f"{TAG_PREFIX}sha256", ""),
            deployment=name,
        )

    def set_weights(self, weights: Weights) -> None:
        """Set the endpoint's `traffic`, and its `mirror_traffic` to blue at `weights.mirror`.

        Header-pinned requests are unaffected (Azure's rule). Blue's shadow is exactly
        `weights.mirror`: 0 (a live step, a rollback) ends it.
        """
        # The endpoint first: its wait may last minutes, in which a deployment's update may
        # end Failed; the deployments are read after it, right before the write.
        endpoint = self._settled(
            f"endpoint {self.endpoint}",
            self._endpoint,
            self._traffic_timeout_s,
            "traffic_timeout_s",
        )
        # Only colours that take traffic, live or mirrored, are checked: a rollback (blue 0 %,
        # no mirror) must work whatever state blue is in, a failed image build included; a
        # failed blue takes no traffic, so it is mirrored no more than served.
        for colour in Colour:
            share, verb = weights.of(colour), "send"
            if colour is Colour.BLUE and weights.mirror:  # blue is at 0 %: Weights' invariant
                share, verb = weights.mirror, "mirror"
            if not share:
                continue
            found = self._get_deployment(self.names[colour])
            if found is None:
                # (`_get` found the workspace, so this is the deployment's own 404.)
                raise RouterRefused(
                    f"cannot {verb} {share} % to {colour.value}: deployment "
                    f"{self.endpoint}/{self.names[colour]} does not exist{GONE}"
                )
            # Updating is not refused here (unlike in release()): the deployment serves through
            # it, and an operator scaling green, or blue out of 429s, must not stop the rollout.
            self._release_of(self.names[colour], found, _unserved)
        current, mirror = nonzero(endpoint.traffic or {}), nonzero(endpoint.mirror_traffic or {})
        try:
            traffic, new_mirror = plan_traffic(current, mirror, self._keys, weights)
        except RouterRefused as exc:  # a plan Azure would refuse: say which endpoint's
            raise RouterRefused(f"update endpoint {self.endpoint} traffic: {exc}") from exc
        # After a change that Failed (or was Canceled) the `traffic` read may be what was asked
        # for, not what serves: write it again rather than take it for applied.
        if (traffic, new_mirror) == (current, mirror) and not _failed(endpoint):
            return
        self._update_endpoint(endpoint, traffic, new_mirror)
        log.info("endpoint %s: traffic %s mirror %s", self.endpoint, traffic, new_mirror)

    def _serving_for(
        self, colour: Colour, existing: Any, served_as: Mapping[str, str]
    ) -> dict[str, Any] | None:
        """The settings deployment `colour` must serve under (see `_serving`), or None when it
        keeps its own.

        A new deployment takes the other colour's. A blue left by an earlier rollout (rolled
        back, or not removed) keeps what it has — an operator may have given the candidate
        what green lacks on purpose (a variable its new score script reads, a longer
        readiness delay) — and takes green's for what it lacks: a variable green has and it
        does not, a probe, request settings or data collection it has none of; and its egress
        closed where green's is (`_egress_closed`). (Was: green's replaced all of
        its own, silently, and a redeploy of the same release restarted every instance.) An
        existing green keeps its own: they are production's, which an operator tunes. None too
        when the other colour is absent (a first release): Azure's defaults, or what the
        deployment holds.
        """
        if existing is not None and colour is Colour.GREEN:
            return None
        other = self._get_deployment(self.names[colour.other])
        if other is None:
            return None
        name = self.names[colour]
        serving = _serving(other, served_as)
        serving["data_collector"] = self._collector_for(
            other.data_collector, self.names[colour.other], name
        )
        if existing is None:
            return serving
        own = _serving(existing, served_as)
        own["data_collector"] = self._collector_for(existing.data_collector, name, name)
        filled = {key: own[key] if own[key] is not None else serving[key] for key in serving}
        filled["environment_variables"] = {
            **(other.environment_variables or {}),
            **(existing.environment_variables or {}),
            **served_as,
        }
        # Not a setting an operator tunes but the endpoint's network isolation: a blue whose
        # egress is open (Azure's default, which every blue made before green's was copied
        # has) where green's is closed breaks the policy green follows, so it is closed.
        if _egress_closed(other.egress_public_network_access):
            filled["egress_public_network_access"] = other.egress_public_network_access
        return filled

    def _collector_for(self, held: Any, source: str, target: str) -> Any:
        """Deployment `source`'s model data collection (`held`, as Azure reads it; None: none)
        as one to send for deployment `target`: the same collections, sampling, rolling rate
        and headers. A collection writing to `source`'s own default data asset writes to
        `target`'s (azure-ai-ml registers it), one writing to a data asset an operator named
        to that asset, its path read (one read each): azure-ai-ml registers every collection's
        data asset before the PUT, and takes the ARM id Azure answers for a DataAsset
        (AttributeError: a deployment that collects data could not be sent back at all).
        """
        if held is None:
            return None
        from azure.ai.ml.entities import (
            DataAsset,
            DataCollector,
            DeploymentCollection,
            RequestLogging,
        )

        collections = {}
        for key, collection in (held.collections or {}).items():
            name, version = _data_asset(collection.data, self.endpoint, source, key)
            data = None
            if name:
                found = self._call(
                    f"data asset {name}:{version}",
                    functools.partial(self._ml.data.get, name=name, version=version),
                )
                # (typed int; a data asset's version is a string, which azure-ai-ml passes on)
                data = DataAsset(name=name, version=version, path=found.path)  # type: ignore[arg-type]
            collections[key] = DeploymentCollection(
                enabled=collection.enabled, data=data, client_id=collection.client_id
            )
        requests = held.request_logging
        return DataCollector(
            collections,
            rolling_rate=held.rolling_rate,
            sampling_rate=getattr(held, "sampling_rate", None),
            request_logging=(
                None
                if requests is None
                else RequestLogging(capture_headers=list(requests.capture_headers or []))
            ),
        )

    def _holds(
        self,
        deployment: Any,
        colour: Colour,
        release: Release,
        serving: Mapping[str, Any] | None = None,
    ) -> bool:
        """Whether `deployment` has finished deploying `release` as `colour`, as configured:
        Succeeded, with the release's tags, model and environment variables (one made before
        they existed answers version "0"), the settings `serving` names (when it names any)
        and the configured environment and code. What cannot
        be compared (a local code folder, which the SDK uploads; a registry's or a curated
        environment's `@latest`, which Azure resolves) counts as a change. A workspace
        environment's `name@latest` is resolved (one read), and only when all else is held."""
        tags = deployment.tags or {}
        variables = deployment.environment_variables or {}
        deployment_name = self.names[colour]
        if (
            _state(deployment).lower() != "succeeded"
            or any(tags.get(key) != value for key, value in release_tags(release).items())
            or any(variables.get(k) != v for k, v in _served_as(colour, release).items())
            or not all(
                _same_setting(k, getattr(deployment, k), v, self.endpoint, deployment_name)
                for k, v in (serving or {}).items()
            )
        ):
            return False
        if not _is_asset(deployment.model, "models", f"azureml:{release.ref}"):
            return False
        if self._code:
            held = deployment.code_configuration
            if held is None or held.scoring_script != self._scoring_script:
                return False
            if not _is_asset(held.code, "codes", self._code):
                return False
        environment = self._environment
        if not environment or _is_asset(deployment.environment, "environments", environment):
            return True
        name = _labelled_latest(environment)
        return name is not None and self._holds_latest(deployment.environment, name)

    def _holds_latest(self, held: Any, name: str) -> bool:
        """Whether `held` (the deployment's environment, as Azure answers it) is the version of
        workspace environment `name` that `@latest` names now: the one created last, which a
        PUT would deploy. A newer one registered since is a change. A read that fails (404,
        5xx, no version at all) counts as a change too: the PUT then resolves the label itself,
        and what Azure answers it is the deploy's answer. Credentials Azure rejects (401, 403)
        or none found raise, as the router's other calls do: the PUT would fail alike."""
        from azure.core.exceptions import ClientAuthenticationError

        what = f"environment {name}@latest"
        try:
            latest = self._call(what, lambda: self._ml.environments.get(name=name, label="latest"))
        except RouterError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientAuthenticationError) or (
                isinstance(exc, RouterRefused)
                and not (isinstance(cause, Exception) and _invalid(cause))
            ):
                raise
            log.info("%s: %s; deploying it again", what, exc)
            return False
        return _is_asset(held, "environments", f"azureml:{name}:{latest.version}")

    def _settled(self, what: str, read: Callable[[], Any], timeout_s: float, setting: str) -> Any:
        """`read()` (the endpoint or a deployment; None when absent) once no change of it is in
        progress, waiting at most `timeout_s` (the router option `setting`): while Azure
        carries one out (ours that timed out, or someone else's), what it shows is what was
        asked for, not what serves, and Azure refuses another write to it."""
        deadline = time.monotonic() + timeout_s
        while True:
            resource = self._get(what, read)
            state = "" if resource is None else _state(resource)
            if state.lower() not in _IN_PROGRESS:
                return resource
            if time.monotonic() >= deadline:
                raise RouterError(
                    f"{what} is still {state} after {timeout_s:g} s (router.{setting}): "
                    "an earlier change has not finished"
                )
            log.info("%s is %s: waiting for that change to finish", what, state)
            self._sleep(self._poll_s)

    def get_weights(self) -> Weights:
        """The weights the endpoint's `traffic` holds now, with its `mirror_traffic` to blue.

        WeightsUnsettled (a RouterError, carrying the weights shown) while that may not be what
        serves: the endpoint's last change Failed or was Canceled (Azure may show the traffic it
        was asked for), or a change is in progress (Creating, Updating, Deleting: what it shows
        is what was asked for). The controller then counts the data plane as unread (and
        `set_weights` writes a Failed endpoint again).
        """
        endpoint = self._endpoint()
        state = _state(endpoint)
        traffic, mirror = nonzero(endpoint.traffic or {}), nonzero(endpoint.mirror_traffic or {})
        if not (_failed(endpoint) or state.lower() in _IN_PROGRESS):
            return weights_from_traffic(traffic, self._keys, mirror)
        shown = {
            "traffic": traffic,
            **({"mirror_traffic": mirror} if endpoint.mirror_traffic else {}),
        }
        why = (
            "its last change did not apply, so what it shows may be what was asked for, not "
            "what serves (the next weights change writes it again)"
            if _failed(endpoint)
            else "a change is in progress, so what it shows is what was asked for, not yet "
            "what serves (read again once Azure has finished it)"
        )
        try:
            weights: Weights | None = weights_from_traffic(traffic, self._keys, mirror)
        except RouterError:
            weights = None  # a split no rollout writes: still someone's
        raise WeightsUnsettled(
            f"endpoint {self.endpoint} is in provisioning state {state}: {why}; it shows "
            + ", ".join(f"{k} {v}" for k, v in shown.items()),
            weights,
        )

    def remove(self, colour: Colour) -> None:
        """Delete deployment `colour` (and any shadow to it); a no-op when it is already gone."""
        name = self.names[colour]
        # Mid-change, the endpoint shows the traffic asked for (a rollback that timed out: blue
        # 0 %), not what serves, and Azure refuses to delete a deployment that is mid-change:
        # wait for both, as deploy does.
        endpoint = self._settled_endpoint_for_write()
        if endpoint is None:
            return
        traffic, mirror = nonzero(endpoint.traffic or {}), nonzero(endpoint.mirror_traffic or {})
        if traffic.get(self._keys[colour]):
            raise RouterError(f"cannot remove {colour.value}: it still serves default traffic")
        if self._keys[colour] in mirror:  # Azure refuses to delete a deployment still mirrored to
            mirror.pop(self._keys[colour])
            self._update_endpoint(endpoint, traffic, mirror)
        what = f"delete deployment {self.endpoint}/{name}"
        if self._settled_deployment(name) is None:  # gone, or its deletion has now finished
            return
        self.fence()
        self._get(  # already gone is fine: remove is idempotent
            what,
            lambda: self._finish_deploy(
                what,
                self._ml.online_deployments.begin_delete(name=name, endpoint_name=self.endpoint),
            ),
        )

    # ------------------------------------------------------------------------------ internals
    def _get_deployment(self, name: str) -> Any:
        return self._get(f"deployment {self.endpoint}/{name}", lambda: self._deployment_raw(name))

    def _deployment_raw(self, name: str) -> Any:
        return _read_deployment(self._ml, self.endpoint, name)

    def _settled_deployment(self, name: str) -> Any:
        """Deployment `name` (None when absent) once no change of it is in progress, waiting at
        most `deploy_timeout_s`: Azure refuses to write or delete it meanwhile."""
        return self._settled(
            f"deployment {self.endpoint}/{name}",
            lambda: self._deployment_raw(name),
            self._deploy_timeout_s,
            "deploy_timeout_s",
        )

    def _settled_endpoint_for_write(self) -> Any:
        """The endpoint (None when absent) once no change of it is in progress, waiting at most
        `deploy_timeout_s`, before a deployment of it is written or deleted."""
        return self._settled(
            f"endpoint {self.endpoint}",
            self._endpoint_raw,
            self._deploy_timeout_s,
            "deploy_timeout_s",
        )

    def _ensure_endpoint(self) -> None:
        if self._get(f"endpoint {self.endpoint}", self._endpoint_raw) is not None:
            return
        from azure.ai.ml.entities import ManagedOnlineEndpoint

        new = ManagedOnlineEndpoint(name=self.endpoint, auth_mode="key")
        what = f"create endpoint {self.endpoint}"
        self.fence()
        self._call(
            what,
            lambda: self._finish_deploy(
                what, self._ml.online_endpoints.begin_create_or_update(new)
            ),
        )
        log.info("created endpoint %s", self.endpoint)

    def _endpoint_raw(self) -> Any:
        return self._ml.online_endpoints.get(name=self.endpoint)

    def _endpoint(self) -> Any:
        endpoint = self._get(f"endpoint {self.endpoint}", self._endpoint_raw)
        if endpoint is None:
            raise RouterError(f"endpoint {self.endpoint} does not exist (deploy a colour first)")
        return endpoint

    def _update_endpoint(
        self, endpoint: Any, traffic: dict[str, int], mirror: dict[str, int]
    ) -> None:
        endpoint.traffic = traffic
        endpoint.mirror_traffic = mirror
        what = f"update endpoint {self.endpoint} traffic"
        self.fence()
        self._call(
            what,
            lambda: _finish(
                what,
                self._ml.online_endpoints.begin_create_or_update(endpoint),
                self._traffic_timeout_s,
                "traffic_timeout_s",
            ),
        )

    def _finish_deploy(self, what: str, poller: Any) -> Any:
        """Wait for a deployment's (or the endpoint's) creation, update or deletion."""
        return _finish(what, poller, self._deploy_timeout_s, "deploy_timeout_s")

    def _get(self, what: str, call: Callable[[], T]) -> T | None:
        try:
            return self._call(what, call)
        except _NotFound:
            self._check_workspace()
            return None

    def _check_workspace(self) -> None:
        """RouterError when the workspace itself is not found (a wrong subscription, resource
        group or workspace): every read under it is a 404 too, which would otherwise read as an
        endpoint or deployment that is merely absent ("green serves nothing: bootstrap it").
        Checked once, on the first 404; the SDK reads the workspace on every write anyway."""
        if self._workspace_found:
            return
        ws = self._ml.workspace_name
        where = (
            f"workspace {ws} (resource group {self._ml.resource_group_name}, "
            f"subscription {self._ml.subscription_id})"
        )
        try:
            self._call(where, lambda: self._ml.workspaces.get(ws))
        except _NotFound as exc:
            raise RouterError(
                f"{exc}: check router.subscription_id, router.resource_group and router.workspace"
            ) from exc
        except RouterError:
            return  # no answer either way (no read permission, say): take the 404 as it came
        self._workspace_found = True

    def _call(self, what: str, call: Callable[[], T]) -> T:
        """Run one SDK call, turning Azure's errors into RouterError naming the resource."""
        from azure.core.exceptions import (
            AzureError,
            ClientAuthenticationError,
            HttpResponseError,
            ResourceNotFoundError,
            ServiceRequestTimeoutError,
            ServiceResponseTimeoutError,
        )

        try:
            # azure-ai-ml prints a "." per poll of an operation on stdout, the stream
            # `rollout run` writes its tick lines to: it goes nowhere instead.
            with contextlib.redirect_stdout(io.StringIO()):
                return call()
        except ResourceNotFoundError as exc:
            # `_get` takes it for "absent"; any other caller shows what Azure said.
            raise _NotFound(f"{what}: {_describe(exc)}") from exc
        except ClientAuthenticationError as exc:
            if exc.response is None:  # no token at all: the credential chain found no identity
                # Retried: the chain's failures include blips (`az` timing out, IMDS busy).
                raise RouterError(
                    f"{what}: no usable Azure credentials ({one_line(exc.message)})"
                ) from exc
            rejected = f"{what}: Azure rejected the credentials ({_describe(exc)})"
            if exc.status_code in _REFUSED:
                raise RouterRefused(f"{rejected}: {_REFUSED[exc.status_code]}") from exc
            raise RouterError(rejected) from exc  # a token service's 5xx, say
        except HttpResponseError as exc:
            if exc.status_code in _REFUSED:
                raise RouterRefused(
                    f"{what}: {_describe(exc)}: {_REFUSED[exc.status_code]}"
                ) from exc
            raise RouterError(f"{what}: {_describe(exc)}") from exc
        except (ServiceRequestTimeoutError, ServiceResponseTimeoutError) as exc:
            # The client's retry budget (rollout.azure_retry) spent on requests with no answer.
            raise RouterError(
                f"{what}: no answer from Azure within {self._traffic_timeout_s:g} s "
                "(router.traffic_timeout_s)"
            ) from exc
        except AzureError as exc:
            if _invalid(exc):
                raise RouterRefused(f"{what}: {one_line(exc.message)}") from exc
            if _local_file_missing(exc):  # "Failed to open scoring script": no retry makes it
                raise RouterRefused(
                    f"{what}: {one_line(exc.message)} (router.code, router.scoring_script)"
                ) from exc
            raise RouterError(f"{what}: {one_line(exc.message)}") from exc
        except Exception as exc:
            # azure-ai-ml raises its own MlException tree (validation, asset resolution).
            if type(exc).__module__.startswith("azure."):
                raise RouterError(f"{what}: {one_line(str(exc))}") from exc
            raise


#: Answers no retry within the controller's few seconds changes, and what to do about them.
#: azure-core's bearer policy renews a token minutes before it expires and answers a claims
#: challenge itself, so a 401 that reaches us is a token of the wrong tenant or identity, not a
#: stale one; a 403 is Azure RBAC (whose new assignments take minutes to apply) or a policy.
#: 400s stay retried: Azure ML's answer to a write while the endpoint or the deployment is
#: mid-change could not be checked here, and that one goes away by itself.
_REFUSED = {
    401: (
        "sign in as an identity of the subscription's tenant (`az login --tenant ...`, or the "
        "service principal / managed identity DefaultAzureCredential finds)"
    ),
    403: (
        "the identity needs a role on the workspace that may read and write its online "
        "endpoints and deployments (e.g. AzureML Data Scientist), or on a resource they link "
        "(LinkedAuthorizationFailed), or a policy denies the request (the code says which); a "
        "new role assignment takes minutes to apply"
    ),
}


def _invalid(exc: Exception) -> bool:
    """Whether azure-ai-ml refused what we asked for before sending it (a name Azure refuses,
    an asset the workspace lacks): its ValidationException, raised as it is or, by the endpoint
    and deployment writes, again as a bare MlException carrying the formatted text (the
    ValidationException then is its `__context__`). Nothing a retry changes."""
    from azure.ai.ml.exceptions import ValidationException

    return isinstance(exc, ValidationException) or isinstance(exc.__context__, ValidationException)


def _local_file_missing(exc: BaseException) -> bool:
    """Whether azure-ai-ml failed on a file of this machine it reads before sending (the
    scoring script): an OSError in the chain of exceptions it raised."""
    return any(isinstance(link, OSError) for link in error_chain(exc))


def _finish(what: str, poller: Any, timeout_s: float, setting: str) -> Any:
    """The result of a long-running operation, waiting at most `timeout_s` (RouterError then).

    `setting` names the router option that bounds this wait, so the error says what to raise.
    """
    poller.wait(timeout=timeout_s)  # returns, not raises, when it expires
    if not poller.done():
        raise RouterError(
            f"{what}: Azure has not finished after {timeout_s:g} s (router.{setting}); "
            "it goes on, and the next call reads the state it reached"
        )
    return poller.result()


def _operation_failed(exc: BaseException | None) -> bool:
    """Whether `exc` is a long-running operation's end in Failed (not Canceled): azure-core's
    poller raises it with the final status poll, an HTTP 200 saying `"status": "Failed"`."""
    from azure.core.exceptions import HttpResponseError

    if not isinstance(exc, HttpResponseError) or exc.status_code is None:
        return False
    if exc.status_code >= 400 or exc.response is None:
        return False
    try:
        body = json.loads(exc.response.text())
    except ValueError:
        return False
    return isinstance(body, dict) and str(body.get("status", "")).lower() == "failed"


def _describe(exc: Any) -> str:
    """One line for an HttpResponseError: the status (or 'operation failed') and ARM's error."""
    if exc.status_code is not None and exc.status_code < 400:
        # A long-running operation that ended Failed/Canceled: the poll itself was an HTTP 200.
        return f"the operation failed: {http_detail(exc)}"
    return f"HTTP {exc.status_code} {http_detail(exc)}"


class _NotFound(RouterError):
    """A resource the caller may treat as absent (raised only out of `_call`)."""
