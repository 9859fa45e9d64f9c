"""The Kubernetes and Istio objects of a blue/green model service, as plain dicts (pure, no I/O).

One `IstioLayout` names everything; the functions here build the objects from it, and the same
functions serve both the `aml-rollout manifests` bootstrap and the Istio router, so what a user
applies and what the router later patches cannot drift apart.

    Gateway <app>-gateway ──► VirtualService <app>, spec.http in order:
      aml-rollout-pin-blue    x-api-version: blue   ─► Service <app>-blue-pinned
      aml-rollout-pin-green   x-api-version: green  ─► Service <app>-green-pinned
      (routes the user added: kept, in place)
      aml-rollout-default     weighted              ─► Services <app>-blue / <app>-green
    Services <app>-<colour> and <app>-<colour>-pinned both select Deployment <app>-<colour>;
    a DestinationRule of the same name per Service closes idle connections after 60 s.

A request naming both colours (the header twice) matches neither pin (`withoutHeaders`): it
follows the weights, as on the local Envoy router.

Pinned requests go through their own Service so Istio telemetry (`destination_service_name`)
tells them apart: A/B and load-test traffic stays out of the canary statistics, as with the
Envoy router's pinned clusters.

The router owns only the routes named `aml-rollout-*`. `merge_routes` computes the new
`spec.http` from the one read back (Argo Rollouts' generateVirtualServicePatches, pure) and keeps
every other route where it was — never replacing the whole VirtualService (flagger#1715). A
VirtualService with no route named `aml-rollout-default` may still have one that is ours in all
but name: a bare catch-all (no `match`, `[]`, `[{}]`, a uri prefix "/"; no other field) sending
only to the weighted Services; `with_default_named` reads it as the default route (and refuses
one that sets anything else: taken over, that would be lost).

The shadow step (`Weights.mirror` > 0, blue at 0 %) is Istio's request mirroring on the default
route only: `mirror: {host: <app>-blue, port: {number: <port>}}` and `mirrorPercentage: {value:
<percent>}`. The proxy copies that share of the un-pinned requests to blue's weighted Service
and discards blue's answers; pinned routes are never mirrored. `mirror_from_route` reads it back:
only a mirror to blue's weighted Service counts (that is where the judge reads blue); a mirror
elsewhere copies nothing to blue, reads as 0 and is dropped by the next write of the route,
whose mirror is ours (`foreign_mirrors` names it, so the router can say so).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from rollout.core.types import Colour, Release, Weights
from rollout.errors import DeployFailed, RouterError, RouterRefused, SettingError
from rollout.kubenames import (
    DNS_1123_LABEL,
    app_problem,
    hosts_problem,
    label_value_problem,
    secret_key_problem,
    secret_name_problem,
)
from rollout.routers.base import UPSTREAM_IDLE_S
from rollout.state.kubernetes_objects import ROLE_RULES as STATE_ROLE_RULES
from scoring.auth import API_KEY_ENV
from scoring.cli import KEEP_ALIVE_S

Obj = dict[str, Any]

ISTIO_GROUP = "networking.istio.io"
ISTIO_VERSION = "v1"
MANAGED_BY = "aml-rollout"
ROUTE_PREFIX = "aml-rollout-"
DEFAULT_ROUTE = "aml-rollout-default"
ANNOTATION_PREFIX = "aml-rollout.io/"
SCORING_CONTAINER = "scoring"
COLOUR_ENV = "AML_ROLLOUT_COLOUR"
#: The one port our Gateway listens on (HTTP).
GATEWAY_PORT = 80

# What the Istio router does through the API, and nothing else.
ROUTER_RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("apps", "deployments", ("create", "delete", "get", "patch")),
    ("", "pods", ("list",)),  # while a deploy waits: new pods that will not heal, and why
    ("", "services", ("create", "get")),
    # patch: only to add the idle timeout to a DestinationRule of the user's that has none
    (ISTIO_GROUP, "destinationrules", ("create", "get", "patch")),
    (ISTIO_GROUP, "gateways", ("create", "get")),
    (ISTIO_GROUP, "virtualservices", ("create", "get", "patch")),
)
# The controller's RBAC Role: the router's rules, and the kubernetes state store's (ConfigMaps
# and a Lease: a controller running in the cluster keeps its state there). The chart's Role is
# this table; tests/routers/test_manifests.py checks it equals what a run of the router and of
# the state store used, no more, no less.
ROLE_RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = ROUTER_RULES + STATE_ROLE_RULES


def pin_route(colour: Colour) -> str:
    """The name of the route that pins `colour` by header."""
    return f"{ROUTE_PREFIX}pin-{colour.value}"


#: The names of our routes in a VirtualService's `spec.http`: the pins and the default.
OUR_ROUTES = frozenset({*(pin_route(c) for c in Colour), DEFAULT_ROUTE})


@dataclass(frozen=True, slots=True)
class IstioLayout:
    """Names and settings of one model service in one namespace."""

    namespace: str
    app: str
    port: int = 80  # the Services' port (what the VirtualService routes to)
    container_port: int = 8000  # the scoring server's port in the pod
    header: str = "x-api-version"
    hosts: tuple[str, ...] = ("*",)
    replicas: int = 1
    ingress_selector: tuple[tuple[str, str], ...] = (("istio", "ingressgateway"),)
    service_account: str = "aml-rollout"
    labels: tuple[tuple[str, str], ...] = field(default=())
    #: The Istio revision whose sidecars the namespace gets (`istio.io/rev`), as AKS's Istio
    #: add-on requires (`asm-1-23`); "" labels it `istio-injection: enabled`, which the add-on
    #: ignores. Only the bootstrap's Namespace uses it.
    istio_revision: str = ""
    #: The Secret whose key `api_key_secret_key` the scoring container gets as
    #: AML_ROLLOUT_API_KEY (`api_key_env`), so /score needs `Authorization: Bearer <key>`;
    #: "" (the default) serves without auth. Only Deployments built here (`deployment`) get it;
    #: `updated_deployment` keeps whatever env a Deployment has, so a patched one keeps it.
    api_key_secret: str = ""
    api_key_secret_key: str = "api-key"  # noqa: S105 (the key's name in the Secret, no secret)

    def __post_init__(self) -> None:
        # SettingError names the spec field; `manifests` names its option for a value it gave.
        if not DNS_1123_LABEL.fullmatch(self.namespace):
            raise SettingError(
                "router.namespace",
                f"{self.namespace!r} is not a DNS-1123 label "
                "(lower-case letters, digits and '-', at most 63 characters)",
            )
        for name, problem in (
            ("router.app", app_problem(self.app)),
            ("router.hosts", hosts_problem(self.hosts)),
        ):
            if problem is not None:
                raise SettingError(name, problem)
        for name, port in (("port", self.port), ("container_port", self.container_port)):
            if not 0 < port < 65536:
                raise SettingError(f"router.{name}", f"{port} is not a TCP port")
        if self.replicas < 1:  # a colour without a pod answers 503 for its share of traffic
            raise SettingError(
                "router.replicas",
                f"{self.replicas} must be >= 1 (a colour without a pod answers 503 for its "
                "share of traffic)",
            )
        gateway = [("router.ingress_gateway", value) for _, value in self.ingress_selector]
        # istio_revision is no spec field: only `manifests --istio-revision` sets it.
        for name, value in [*gateway, ("istio_revision", self.istio_revision)]:
            if value and (problem := label_value_problem(value)) is not None:
                raise SettingError(name, problem)
        # (`manifests --api-key-secret[-key]` set them too, unchecked by the spec.) The API
        # server would refuse the Deployment (422) only once everything else was applied.
        if self.api_key_secret and (problem := secret_name_problem(self.api_key_secret)):
            raise SettingError("router.api_key_secret", problem)
        if (problem := secret_key_problem(self.api_key_secret_key)) is not None:
            raise SettingError("router.api_key_secret_key", problem)

    @property
    def gateway(self) -> str:
        return f"{self.app}-gateway"

    @property
    def virtual_service(self) -> str:
        return self.app

    def deployment(self, colour: Colour) -> str:
        return f"{self.app}-{colour.value}"

    def service(self, colour: Colour, *, pinned: bool = False) -> str:
        return f"{self.app}-{colour.value}{'-pinned' if pinned else ''}"


def api_key_env(layout: IstioLayout) -> Obj:
    """The scoring container's AML_ROLLOUT_API_KEY, read by the kubelet from the layout's
    Secret when the pod starts (the controller needs no access to Secrets). A missing Secret or
    key keeps the pod from starting (CreateContainerConfigError), an empty value stops the
    server (scoring.auth): never a pod serving /score without auth by mistake."""
    ref = {"name": layout.api_key_secret, "key": layout.api_key_secret_key}
    return {"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": ref}}


def _meta(layout: IstioLayout, name: str, **labels: str) -> Obj:
    all_labels = {"app.kubernetes.io/name": layout.app, "app.kubernetes.io/managed-by": MANAGED_BY}
    all_labels.update(dict(layout.labels))
    all_labels.update(labels)
    return {"name": name, "namespace": layout.namespace, "labels": all_labels}


# ---- workloads ------------------------------------------------------------------------------
#: With the scoring container's `securityContext`, what Kubernetes' "restricted" Pod Security
#: Standard asks of a pod (a namespace enforcing it creates no pod without them). The package's
#: image runs as uid 10001, so it meets it; an image of one's own that runs as root is refused
#: by the kubelet (`CreateContainerConfigError`, which the deploy's wait reports).
RESTRICTED_POD: Obj = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def deployment(layout: IstioLayout, colour: Colour, release: Release) -> Obj:
    """The Deployment `<app>-<colour>` serving `release` (its identity kept in annotations)."""
    if not release.image:
        raise RouterRefused(
            f"release {release.ref} has no container image, and the istio router deploys "
            "images: give it in the spec (`candidate:` / `stable:` `image: "
            "<registry>/<model>:<version>`, package.json's `image`)"
        )
    pod_labels = {"app": layout.app, "version": colour.value}
    probe = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5}
    # The scoring server labels its metrics and answers with this colour; after Blue_Green,
    # green pods serve blue's release and must say green.
    env: list[Obj] = [{"name": COLOUR_ENV, "value": colour.value}]
    if layout.api_key_secret:  # /healthz, /readyz (the probes) and /metrics stay open
        env.append(api_key_env(layout))
    scoring: Obj = {
        "name": SCORING_CONTAINER,
        "image": release.image,
        "env": env,
        "ports": [{"name": "http", "containerPort": layout.container_port}],
        "readinessProbe": probe,
        "livenessProbe": {**probe, "httpGet": {"path": "/healthz", "port": "http"}},
        # A container that dies (a model that cannot load: the image exits 3) leaves its log's
        # tail in the pod's `message`, which the deploy's error quotes (`_exit`).
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    if not pinned(release.image):
        scoring["imagePullPolicy"] = "Always"  # see `pinned`
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            **_meta(layout, layout.deployment(colour), **pod_labels),
            "annotations": release_annotations(release),
        },
        "spec": {
            "replicas": layout.replicas,
            "selector": {"matchLabels": pod_labels},
            "template": {
                # The release on the pods too: a new release is a new pod template, so the pods
                # roll even when its image keeps its tag (see `pinned`).
                "metadata": {"labels": pod_labels, "annotations": release_annotations(release)},
                "spec": {"securityContext": copy.deepcopy(RESTRICTED_POD), "containers": [scoring]},
            },
        },
    }


def pinned(image: str) -> bool:
    """Whether an image reference names its bits by digest (`...@sha256:<hex>`).

    A tag does not: the package step names images `<registry>/<model>:<version>`, and a model
    re-packaged under its version (new bits, a new sha256) is pushed under the same tag. Its
    pods must roll (the release's annotations are on the pod template, so the template changes)
    and must pull the tag again: with Kubernetes' default for a tag, IfNotPresent, a node that
    ran the old image starts the new pod on it. So a tag gets `imagePullPolicy: Always` (the
    kubelet resolves the tag at the registry and pulls only when the digest is new); a digest
    keeps the default and starts without the registry.
    """
    return "@" in image


def scoring_container(deployment: Obj) -> Obj | None:
    """The pod template's container the router owns: the one named `scoring` (as `deployment`
    and the chart name it), else the only one; None when it has none.

    RouterRefused for several and none named `scoring`: which one serves the model cannot be
    told, and taking the first (a log shipper, say) would give it the new image while the old
    model went on serving under the new release's annotations.
    """
    pod = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
    found = pod.get("containers") or []
    named = next((c for c in found if c.get("name") == SCORING_CONTAINER), None)
    if named is not None or len(found) <= 1:
        return named or (found[0] if found else None)
    meta = deployment.get("metadata") or {}
    names = ", ".join(str(c.get("name")) for c in found)
    raise RouterRefused(
        f"Deployment {meta.get('namespace')}/{meta.get('name')} has {len(found)} containers "
        f"({names}) and none named `{SCORING_CONTAINER}`: which one serves the model cannot be "
        f"told; name the scoring server's container `{SCORING_CONTAINER}` (as `aml-rollout "
        "manifests` and the chart do)"
    )


def updated_deployment(layout: IstioLayout, current: Obj, colour: Colour, release: Release) -> Obj:
    """`current` (a Deployment as read) changed only where the router owns it.

    That is the scoring container's image (and, for an image not pinned by digest, its
    `imagePullPolicy: Always`, see `pinned`), its AML_ROLLOUT_COLOUR variable and the
    `aml-rollout.io/*` annotations, of the Deployment and of its pod template (so that a new
    release rolls the pods even under an unchanged image tag). Everything else (replicas an
    HPA or an operator set, Helm's labels and annotations, resources, imagePullSecrets, ...) is
    kept, and so is `metadata.resourceVersion`. `status` is dropped (it is not ours to write).
    The release's image is checked by `deployment`, which `IstioRouter.deploy` builds first.
    The router sends `merge_patch(current, result)`.

    RouterRefused for a Deployment whose pods the colour's Services would not send to (see
    `_check_selected`): Istio would answer 503 for its whole share. DeployFailed for one scaled
    to 0: its rollout would be complete at once, with no pod to serve the release.
    """
    if (current.get("spec") or {}).get("replicas") == 0:
        found = current.get("metadata") or {}
        ns, name = found.get("namespace"), found.get("name")
        raise DeployFailed(
            f"Deployment {ns}/{name} is scaled to 0 (spec.replicas 0): it would serve "
            f"{release.ref} with no pod; scale it up (`kubectl -n {ns} scale deployment {name} "
            "--replicas=1`), then deploy again"
        )
    new = copy.deepcopy(current)
    new.pop("status", None)
    meta = new.setdefault("metadata", {})
    meta["annotations"] = {**(meta.get("annotations") or {}), **release_annotations(release)}
    container = scoring_container(new)
    if container is None:
        raise RouterRefused(
            f"Deployment {meta.get('namespace')}/{meta.get('name')} has no containers"
        )
    _check_selected(layout, colour, new, container)
    container["image"] = release.image
    if release.image and not pinned(release.image):
        container["imagePullPolicy"] = "Always"
    template_meta = new["spec"]["template"].setdefault("metadata", {})
    template_meta["annotations"] = {
        **(template_meta.get("annotations") or {}),
        **release_annotations(release),
    }
    ours = {"name": COLOUR_ENV, "value": colour.value}
    env = container.setdefault("env", [])
    at = next((i for i, e in enumerate(env) if e.get("name") == COLOUR_ENV), None)
    if at is None:
        env.append(ours)
    else:
        env[at] = ours  # in place, so a second deploy of the same release changes nothing
    return new


def _check_selected(layout: IstioLayout, colour: Colour, deployment: Obj, container: Obj) -> None:
    """RouterRefused unless the Services `service` makes for `colour` reach `deployment`'s
    pods: its pod template carries their selector's labels and `container` (the scoring one) a
    port named as their targetPort. A Deployment of one's own named `<app>-<colour>` may not;
    then the Services have no endpoints, and Istio answers 503 for the colour's whole share
    while the deploy and the routes read back fine."""
    spec = service(layout, colour)["spec"]
    selector: dict[str, str] = spec["selector"]
    target: str = spec["ports"][0]["targetPort"]
    labels = ((deployment["spec"]["template"].get("metadata") or {}).get("labels")) or {}
    ports = container.get("ports") or []
    if all(labels.get(k) == v for k, v in selector.items()) and any(
        p.get("name") == target for p in ports
    ):
        return
    meta = deployment.get("metadata") or {}
    names = " and ".join(layout.service(colour, pinned=p) for p in (False, True))
    has_labels = ", ".join(f"{k}={v}" for k, v in labels.items()) or "(none)"
    has_ports = ", ".join(
        f"{p['name']}={p.get('containerPort')}" if p.get("name") else str(p.get("containerPort"))
        for p in ports
    )
    raise RouterRefused(
        f"Deployment {meta.get('namespace')}/{meta.get('name')} is not what Services {names} "
        f"send to: they select pods labelled "
        f"{', '.join(f'{k}={v}' for k, v in selector.items())} and send to their container "
        f"port named `{target}`; the pod template has labels {has_labels} and ports "
        f"{has_ports or '(none)'} on container `{container.get('name')}`: Istio would answer "
        f"503 for {colour.value}'s share. Label the pod template and name the scoring "
        f"container's port `{target}` (as `aml-rollout manifests` and the chart do)"
    )


def merge_patch(current: Obj, wanted: Obj) -> Obj:
    """The JSON merge patch (RFC 7386) that turns `current` into `wanted`, carrying `current`'s
    resourceVersion so that the API server refuses it (409) if the object changed since.

    Objects are diffed key by key; a list that differs is sent whole (merge patch replaces
    lists); a key `wanted` lacks is sent as null (removed). Only what differs is sent, so the
    write never goes through the client's typed models, which refuse any field they do not
    know (a field newer than the client, from a newer cluster).
    """
    version = (current.get("metadata") or {}).get("resourceVersion")
    if not version:  # without it the patch would apply whatever happened since the read
        raise RouterError("merge_patch needs the object as read, with its resourceVersion")
    patch = _diff(current, wanted)
    patch.setdefault("metadata", {})["resourceVersion"] = version
    return patch


def _diff(current: Obj, wanted: Obj) -> Obj:
    patch: Obj = {key: None for key in current if key not in wanted}
    for key, value in wanted.items():
        old = current.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            if nested := _diff(old, value):
                patch[key] = nested
        elif key not in current or old != value:
            patch[key] = value
    return patch


def rollout_waiting_for(deployment: Obj, stale: Obj | None = None) -> str | None:
    """What a Deployment's rollout still waits for, or None when it is complete.

    `kubectl rollout status`'s rule: the controller has seen the current generation, all wanted
    replicas run the new pod template, no old pod is left, and every new pod is available. Old
    pods that are still available do not count (mid rolling update they keep
    `availableReplicas` up). A rollout past its progressDeadlineSeconds raises DeployFailed:
    waiting longer will not help (`not_ready` says why).

    A deadline condition equal to `stale` (`past_deadline` of the Deployment as read before
    this rollout's write) is the rollout before's: the deployment controller keeps a condition
    of the same reason as it is until it sees progress, so a fixed release would be failed for
    its predecessor's deadline. It is no failure, and nor is any deadline of a rollout that is
    complete (every pod available: it serves). A new rollout that times out too, leaving that
    condition as it was, is caught by the caller's own timeout.
    """
    meta = deployment.get("metadata") or {}
    status = deployment.get("status") or {}
    where = f"Deployment {meta.get('namespace')}/{meta.get('name')}"
    generation = meta.get("generation") or 0
    if (status.get("observedGeneration") or 0) < generation:
        return "the deployment controller to see the new spec"
    waiting = _replicas_waiting_for(deployment)
    if waiting is not None and past_deadline(deployment) not in (None, stale):
        raise DeployFailed(f"{where} exceeded its progress deadline")
    return waiting


def _replicas_waiting_for(deployment: Obj) -> str | None:
    """What the replicas of a Deployment whose generation is observed still wait for."""
    status = deployment.get("status") or {}
    replicas = (deployment.get("spec") or {}).get("replicas")
    want = 1 if replicas is None else int(replicas)
    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    if updated < want:
        return f"{updated} of {want} replicas updated"
    if total > updated:
        return f"{total - updated} old replicas to terminate"
    if available < updated:
        return f"{available} of {updated} updated replicas available"
    return None


def past_deadline(deployment: Obj) -> Obj | None:
    """The Progressing condition saying ProgressDeadlineExceeded, if the Deployment has one."""
    for condition in (deployment.get("status") or {}).get("conditions") or []:
        if (condition.get("type"), condition.get("reason")) == (
            "Progressing",
            "ProgressDeadlineExceeded",
        ):
            return dict(condition)
    return None


def no_pod_available(deployment: Obj) -> str | None:
    """Why a Deployment serves no request now ("has no available pod (...)"), or None when it
    has a pod available.

    Its Services then have no endpoints: Istio answers 503 for every request a route sends
    there, and the judge charges them to the colour's model. Scaled to 0, every pod crashed or
    not ready yet, past its progress deadline: a pod may come up, or be scaled up, meanwhile.
    """
    if int((deployment.get("status") or {}).get("availableReplicas") or 0) > 0:
        return None
    replicas = (deployment.get("spec") or {}).get("replicas")
    if replicas == 0:
        why = "spec.replicas 0: scaled to 0"
    elif past_deadline(deployment) is not None:
        why = "past its progress deadline"
    else:
        why = f"0 of {1 if replicas is None else replicas} available: crashed, or not ready yet"
    return f"has no available pod ({why})"


#: The longest API server message quoted in `not_ready` (an image pull error can be a screenful).
_MESSAGE_CHARS = 300


def not_ready(headline: str, deployment: Obj, pods: list[Obj] | str) -> str:
    """One line for a Deployment whose pods will not become ready: `headline` (what the wait
    saw), then what the API says about why — the Deployment's conditions that are not well
    (`ReplicaFailure` e.g. a quota, `Available=False`, a progress deadline) and the pods' own
    reasons (`pod_problems`; `pods` is a str when they could not be read) — and where to look.
    """
    meta = deployment.get("metadata") or {}
    parts = [headline]
    for condition in (deployment.get("status") or {}).get("conditions") or []:
        kind, state = condition.get("type"), condition.get("status")
        if (kind, state) in (("Available", "True"), ("Progressing", "True")) or (
            kind == "ReplicaFailure" and state != "True"
        ):
            continue
        parts.append(
            f"{kind}={state} {condition.get('reason', '')}: "
            f"{_short(condition.get('message', ''))}".rstrip(": ")
        )
    parts.append(f"pods: {pods if isinstance(pods, str) else pod_problems(pods)}")
    parts.append(f"see `kubectl -n {meta.get('namespace')} describe deployment {meta.get('name')}`")
    return "; ".join(parts)


def pod_problems(pods: list[Obj]) -> str:
    """Why the pods that are not ready are not, as their status says: a container waiting
    (ImagePullBackOff, CrashLoopBackOff with its last exit, CreateContainerConfigError...), a
    pod the scheduler cannot place, a container running but not ready (its readiness probe).
    The same reason on several pods is said once, with their number."""
    seen: dict[str, int] = {}
    for pod in pods:
        status = pod.get("status") or {}
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue  # on its way out: an old pod, not why the new ones are not ready
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        if (conditions.get("Ready") or {}).get("status") == "True":
            continue
        reasons = []
        scheduled = conditions.get("PodScheduled") or {}
        if scheduled.get("status") == "False":
            reasons.append(
                f"not scheduled, {scheduled.get('reason', '')}: {_short(scheduled.get('message'))}"
            )
        for container in [
            *(status.get("initContainerStatuses") or []),
            *(status.get("containerStatuses") or []),
        ]:
            if (reason := _container_problem(container)) is not None:
                reasons.append(f"container {container.get('name')} {reason}")
        for reason in reasons or [f"{status.get('phase', 'Unknown')}, not ready"]:
            seen[reason] = seen.get(reason, 0) + 1
    if not seen:
        return "none that is not ready"
    return "; ".join(
        reason if count == 1 else f"{reason} ({count} pods)" for reason, count in seen.items()
    )


#: A container in CrashLoopBackOff counts as never healing once restarted this many times: the
#: kubelet restarts a first crash at once and backs off after the second, so 2 restarts are three
#: exits in a row, some 10-20 s after the first: not the odd crash of a pod that then comes up
#: (a first attempt at a slow mount, say), and still seconds, not `ready_timeout_s`, after it.
CRASH_LOOP_RESTARTS = 2


def release_pods(deployment: Obj, pods: list[Obj]) -> list[Obj]:
    """The pods of the release the Deployment's pod template carries: those whose
    `aml-rollout.io/*` annotations (copied from the template to every pod) are the template's.
    A pod of the previous release, still there mid rolling update, is not one; none is when the
    template carries no release (not a Deployment the router wrote: nothing to tell them by).
    Pods on their way out (`deletionTimestamp`) are left out too."""
    wanted = _template_annotations(deployment)
    if not wanted:
        return []
    return [
        pod
        for pod in pods
        if not (pod.get("metadata") or {}).get("deletionTimestamp")
        and wanted.items() <= ((pod.get("metadata") or {}).get("annotations") or {}).items()
    ]


def _template_annotations(deployment: Obj) -> dict[str, str]:
    """The `aml-rollout.io/*` annotations of the Deployment's pod template: its release."""
    template = (deployment.get("spec") or {}).get("template") or {}
    found = (template.get("metadata") or {}).get("annotations") or {}
    return {key: value for key, value in found.items() if key.startswith(ANNOTATION_PREFIX)}


def never_ready(deployment: Obj, pods: list[Obj]) -> str | None:
    """Why a pod of the Deployment's new release (`release_pods`) will not become ready by
    itself, or None while every one still may — so that the deploy fails at once, not after
    `ready_timeout_s` or the progress deadline. Only states that do not heal count:

    - a container in CrashLoopBackOff restarted `CRASH_LOOP_RESTARTS` times or more (the package
      image exits 3 at once when its model cannot load: a loop within seconds);
    - a terminated container that its pod's `restartPolicy` will not restart (Never; OnFailure
      after exit 0). A Deployment's pods are always `Always`, so this is for completeness.

    Not an image pull failing (ErrImagePull / ImagePullBackOff): a wrong tag never heals, but a
    registry that hiccups or a node's credentials refreshed late do, and the pod status says
    neither when the back-off began nor which it is; that stays for `ready_timeout_s` or the
    progress deadline, which `not_ready` then explains. Nor a pod not scheduled (the cluster
    autoscaler may add a node) or a readiness probe still failing (a model may load slowly).
    """
    annotations = _template_annotations(deployment)
    release = (
        f"{annotations.get(f'{ANNOTATION_PREFIX}model')}:"
        f"{annotations.get(f'{ANNOTATION_PREFIX}version')}"
    )
    for pod in release_pods(deployment, pods):
        status = pod.get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        if (conditions.get("Ready") or {}).get("status") == "True":
            continue
        policy = (pod.get("spec") or {}).get("restartPolicy") or "Always"
        for container in [
            *(status.get("initContainerStatuses") or []),
            *(status.get("containerStatuses") or []),
        ]:
            if (why := _never_heals(container, policy)) is not None:
                return (
                    f"pod {(pod.get('metadata') or {}).get('name')} of release {release} "
                    f"will not become ready (container {container.get('name')} {why})"
                )
    return None


def _never_heals(container: Obj, restart_policy: str) -> str | None:
    state = container.get("state") or {}
    restarts = int(container.get("restartCount") or 0)
    waiting = state.get("waiting") or {}
    if waiting.get("reason") == "CrashLoopBackOff" and restarts >= CRASH_LOOP_RESTARTS:
        return f"crash-loops, {restarts} restarts"
    if (terminated := state.get("terminated")) is not None and (
        restart_policy == "Never"
        or (restart_policy == "OnFailure" and not terminated.get("exitCode"))
    ):
        return f"terminated, and restartPolicy {restart_policy} does not restart it"
    return None


def _container_problem(container: Obj) -> str | None:
    state = container.get("state") or {}
    if waiting := state.get("waiting"):
        text = f"{waiting.get('reason', 'waiting')}: {_short(waiting.get('message'))}".rstrip(": ")
        last = (container.get("lastState") or {}).get("terminated")
        if last:
            text += f" (last {_exit(last)})"
        return text
    if (terminated := state.get("terminated")) and terminated.get("exitCode"):
        return f"terminated, {_exit(terminated)}"
    if "running" in state and not container.get("ready"):
        return "running, not ready (its readiness probe fails)"
    return None


def _exit(terminated: Obj) -> str:
    """`exit 3: Error: <message>`: the code, the reason and what the container left in its
    termination log (`terminationMessagePath`), which Kubernetes keeps in `message`."""
    said = f"exit {terminated.get('exitCode')}: {terminated.get('reason', '')}"
    if message := _short(terminated.get("message")):
        said += f": {message}"
    return said


def _short(message: object) -> str:
    text = " ".join(str(message or "").split())
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 1] + "…"


def release_annotations(release: Release) -> dict[str, str]:
    """The release identity as Deployment annotations (read back by `release_from_annotations`)."""
    return {
        f"{ANNOTATION_PREFIX}model": release.model,
        f"{ANNOTATION_PREFIX}version": release.version,
        f"{ANNOTATION_PREFIX}sha256": release.sha256,
    }


def release_from_annotations(annotations: dict[str, str] | None, image: str | None) -> Release:
    """The release a Deployment serves, from what `release_annotations` wrote."""
    annotations = annotations or {}
    model = annotations.get(f"{ANNOTATION_PREFIX}model")
    version = annotations.get(f"{ANNOTATION_PREFIX}version")
    if not model or version is None:
        raise RouterRefused(
            f"Deployment has no {ANNOTATION_PREFIX}model/version annotations: "
            "it was not deployed by aml-rollout"
        )
    return Release(
        model=model,
        version=version,
        sha256=annotations.get(f"{ANNOTATION_PREFIX}sha256", ""),
        image=image,
    )


def service(layout: IstioLayout, colour: Colour, *, pinned: bool = False) -> Obj:
    """Service `<app>-<colour>[-pinned]` in front of the colour's pods."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(layout, layout.service(colour, pinned=pinned)),
        "spec": {
            "selector": {"app": layout.app, "version": colour.value},
            "ports": [{"name": "http", "port": layout.port, "targetPort": "http"}],
        },
    }


def services(layout: IstioLayout) -> list[Obj]:
    """The four Services: weighted and pinned, per colour."""
    return [
        service(layout, c, pinned=p) for c in (Colour.GREEN, Colour.BLUE) for p in (False, True)
    ]


# ---- Istio ----------------------------------------------------------------------------------
#: The idle timeout of Istio's upstream connection pools to our Services (an Istio duration).
IDLE_TIMEOUT = f"{UPSTREAM_IDLE_S}s"


def destination_rule(layout: IstioLayout, colour: Colour, *, pinned: bool = False) -> Obj:
    """DestinationRule `<app>-<colour>[-pinned]`: idle upstream connections to that Service are
    closed after UPSTREAM_IDLE_S, before the scoring server's keep-alive closes them.

    Istio keeps them an hour by default, the scoring server KEEP_ALIVE_S: a request the proxy
    sends on a connection the server closes at that moment comes back as a 503 (upstream reset)
    the judge charges to the model. Istio applies a host's connection pool settings to the
    gateway's outbound cluster and to the inbound cluster of the pod's sidecar, the proxy that
    holds the connections to the scoring server (unless a Sidecar's `inboundConnectionPool`
    says otherwise).
    """
    name = layout.service(colour, pinned=pinned)
    return {
        "apiVersion": f"{ISTIO_GROUP}/{ISTIO_VERSION}",
        "kind": "DestinationRule",
        "metadata": _meta(layout, name),
        "spec": {
            "host": name,
            "trafficPolicy": {"connectionPool": {"http": {"idleTimeout": IDLE_TIMEOUT}}},
        },
    }


def destination_rules(layout: IstioLayout) -> list[Obj]:
    """One DestinationRule per Service (`services`), named and ordered as they are."""
    return [
        destination_rule(layout, c, pinned=p)
        for c in (Colour.GREEN, Colour.BLUE)
        for p in (False, True)
    ]


def idle_timeout_patch(found: Obj) -> Obj | None:
    """The merge patch adding our idle timeout to a DestinationRule that has none (carrying its
    resourceVersion), or None when it has one: the router owns that one field, and only while
    nobody has set it. A merge patch of nested objects leaves every other field as it is."""
    if idle_timeout_of(found) is not None:
        return None
    return {
        "metadata": {"resourceVersion": found["metadata"]["resourceVersion"]},
        "spec": {"trafficPolicy": {"connectionPool": {"http": {"idleTimeout": IDLE_TIMEOUT}}}},
    }


def idle_timeout_of(rule: Obj) -> str | None:
    """A DestinationRule's top-level `connectionPool.http.idleTimeout`, None when unset."""
    policy = (rule.get("spec") or {}).get("trafficPolicy") or {}
    value = ((policy.get("connectionPool") or {}).get("http") or {}).get("idleTimeout")
    return None if value in (None, "") else str(value)


def idle_timeout_problem(rule: Obj) -> str | None:
    """What is wrong with the idle timeout a DestinationRule of the user's sets, if anything:
    one the scoring server's keep-alive does not outlast (its connections may be closed under
    a request). None when it is shorter, unset, or not a duration we can read."""
    value = idle_timeout_of(rule)
    seconds = duration_s(value) if value is not None else None
    if seconds is None or seconds < KEEP_ALIVE_S:
        return None
    meta = rule.get("metadata") or {}
    return (
        f"DestinationRule {meta.get('namespace')}/{meta.get('name')} keeps idle upstream "
        f"connections {value}, but the scoring server closes idle connections after "
        f"{KEEP_ALIVE_S} s: a request sent on one it has just closed fails (a 503 charged to "
        f"the model); kept, as it is yours: set it below {KEEP_ALIVE_S}s (aml-rollout's is "
        f"{IDLE_TIMEOUT})"
    )


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_s(text: str) -> float | None:
    """Seconds in a Go duration as Istio takes them (`60s`, `1h`, `1m30s`, `500ms`), or None."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    return sum(float(number) * _UNIT_S[unit] for number, unit in parts)


def gateway(layout: IstioLayout) -> Obj:
    """An HTTP Gateway on the ingress gateway for the service's hosts."""
    return {
        "apiVersion": f"{ISTIO_GROUP}/{ISTIO_VERSION}",
        "kind": "Gateway",
        "metadata": _meta(layout, layout.gateway),
        "spec": {
            "selector": dict(layout.ingress_selector),
            "servers": [
                {
                    "port": {"number": GATEWAY_PORT, "name": "http", "protocol": "HTTP"},
                    "hosts": list(layout.hosts),
                }
            ],
        },
    }


def _destination(layout: IstioLayout, colour: Colour, *, pinned: bool = False) -> Obj:
    return {"host": layout.service(colour, pinned=pinned), "port": {"number": layout.port}}


def _service_named(host: object, layout: IstioLayout) -> str | None:
    """The Service in the layout's namespace that a route host names, or None.

    Istio accepts the short name `<svc>` (the VirtualService's namespace) and the dotted forms
    `<svc>.<ns>`, `<svc>.<ns>.svc.cluster.local` (any cluster domain); a host in another
    namespace is not one of ours, whatever its first label.
    """
    name, _, rest = str(host or "").partition(".")
    if rest and rest.split(".")[0] != layout.namespace:
        return None
    return name


def managed_routes(layout: IstioLayout, weights: Weights) -> list[Obj]:
    """Our three routes, in order: pin blue, pin green, weighted default."""
    # A request naming both colours (the header twice) pins neither and follows the weights:
    # Istio's proxies from Envoy 1.39 on match each value of a repeated header on its own, so
    # blue's route, first, would take it; before, the joined "blue,green" matched neither.
    pins = [
        {
            "name": pin_route(colour),
            "match": [
                {
                    "headers": {layout.header: {"exact": colour.value}},
                    "withoutHeaders": {layout.header: {"exact": colour.other.value}},
                }
            ],
            "route": [{"destination": _destination(layout, colour, pinned=True)}],
        }
        for colour in (Colour.BLUE, Colour.GREEN)
    ]
    default: Obj = {
        "name": DEFAULT_ROUTE,
        "route": [
            {"destination": _destination(layout, colour), "weight": weights.of(colour)}
            for colour in (Colour.GREEN, Colour.BLUE)
        ],
    }
    if weights.mirror:  # the shadow step: copies to blue's weighted Service, answers discarded
        default["mirror"] = _destination(layout, Colour.BLUE)
        default["mirrorPercentage"] = {"value": float(weights.mirror)}
    return [*pins, default]


def route_ports(http: list[Obj]) -> set[object]:
    """The destination ports of our routes in a VirtualService's `spec.http`."""
    return {
        ((destination.get("destination") or {}).get("port") or {}).get("number")
        for route in http
        if route.get("name") in OUR_ROUTES
        for destination in route.get("route") or []
    }


def virtual_service(layout: IstioLayout, weights: Weights) -> Obj:
    """The VirtualService bound to the Gateway, holding only our routes."""
    return {
        "apiVersion": f"{ISTIO_GROUP}/{ISTIO_VERSION}",
        "kind": "VirtualService",
        "metadata": _meta(layout, layout.virtual_service),
        "spec": {
            "hosts": list(layout.hosts),
            "gateways": [layout.gateway],
            "http": managed_routes(layout, weights),
        },
    }


def merge_routes(current: list[Obj], layout: IstioLayout, weights: Weights) -> list[Obj]:
    """`spec.http` with our routes set to `weights` and every other route kept where it was.

    Our routes already present are rewritten in place: their match, destinations and mirror
    are ours; any other field on them (a timeout, retries) is kept. Missing pin routes go
    first (header matches must win over anything broader), and so do pin routes found below
    our default route (moved there by hand, or an adopted VirtualService: `pins_below_default`),
    which takes every request first and would leave header pinning dead while the weights read
    back right; a missing default route goes last (it matches everything). Pure: the router
    applies the result as a merge patch.

    A user route that matches every request (see `check_reachable`) placed before any of ours
    is refused with RouterError rather than written: Istio takes the first match, so our route
    would never be reached while get_weights reported its split. We do not move our default
    route above it: that would silently take over everything the user's route serves. A bare
    one that sends only to our weighted Services is our default route under another name,
    though (`with_default_named`): it becomes ours, in place.
    """
    current = with_default_named(current, layout)
    ours = {route["name"]: route for route in managed_routes(layout, weights)}
    present = {route.get("name") for route in current}
    below = set(pins_below_default(current))
    merged = [
        _ours_over(route, ours[route["name"]], layout) if route.get("name") in ours else route
        for route in current
        if route.get("name") not in below
    ]
    moved = {route["name"]: route for route in current if route.get("name") in below}
    first = [
        _ours_over(moved[name], route, layout) if name in moved else route
        for name, route in ours.items()
        if name != DEFAULT_ROUTE and (name not in present or name in moved)
    ]
    tail = [] if DEFAULT_ROUTE in present else [ours[DEFAULT_ROUTE]]
    result = [*first, *merged, *tail]
    check_reachable(result, layout)
    return result


def pins_below_default(http: list[Obj]) -> list[str]:
    """Our pin routes that come after our default route in `spec.http`: never reached, as the
    default route matches every request first (`merge_routes` moves them back first)."""
    names = [route.get("name") for route in http]
    if DEFAULT_ROUTE not in names:
        return []
    after = names[names.index(DEFAULT_ROUTE) + 1 :]
    return [pin_route(c) for c in (Colour.BLUE, Colour.GREEN) if pin_route(c) in after]


#: The fields of our routes that are ours: written as we want them at every change (a mirror
#: we do not want is dropped). Any other field set on them (timeout, retries, headers...) stays.
_OWNED_FIELDS = ("match", "route", "mirror", "mirrorPercentage", "mirrorPercent", "mirrors")


def _ours_over(found: Obj, ours: Obj, layout: IstioLayout) -> Obj:
    """Our route `ours` over the one found under its name, keeping the fields not ours, and
    the found match when it is one of the ways to match every request that ours (no `match`)
    says too (`[]`, `[{}]`, a uri prefix "/"...): rewriting it would change nothing Istio does,
    yet write at every weights change asked again."""
    kept = {k: v for k, v in found.items() if k not in _OWNED_FIELDS}
    if "match" in found and "match" not in ours and matches_everything(found, layout):
        kept["match"] = found["match"]
    return {**kept, **ours}


def with_default_named(http: list[Obj], layout: IstioLayout) -> list[Obj]:
    """`spec.http` with our default route named `DEFAULT_ROUTE`: as it is when one is, else
    with the first route that matches every request (`matches_everything`: no `match`, `[]`,
    `[{}]`, a uri prefix "/"...) named so when it is a bare weighted route: only a match and
    destinations at blue's and green's weighted Services (a VirtualService made by hand, or
    before aml-rollout, whose weighted route is ours in all but name). Its traffic already goes
    where ours would send it, so taking it over takes nobody's over; one that sends anywhere
    else is the user's (`check_reachable`).

    RouterRefused for one that sends only there but sets anything else (a name, a mirror to
    the user's own service, a timeout...): taken over, that would be renamed or dropped with
    no word, as our route's owned fields are rewritten; the user decides.
    """
    if any(route.get("name") == DEFAULT_ROUTE for route in http):
        return http
    at = next((i for i, r in enumerate(http) if matches_everything(r, layout)), None)
    if at is None or http[at].get("name") in OUR_ROUTES or not _weighted_only(http[at], layout):
        return http
    if extra := _fields_of_its_own(http[at]):
        name = http[at].get("name") or f"#{at} (unnamed)"
        raise RouterRefused(
            f"VirtualService {layout.namespace}/{layout.virtual_service}: route {name!r} "
            f"sends only to blue's and green's weighted Services but sets {', '.join(extra)}, "
            f"which taking it over as {DEFAULT_ROUTE!r} would lose; remove them (it is then "
            f"taken over), or name it {DEFAULT_ROUTE!r} yourself (its fields other than "
            f"{', '.join(_OWNED_FIELDS)} are then kept), or give it a narrower match"
        )
    return [*http[:at], {**http[at], "name": DEFAULT_ROUTE}, *http[at + 1 :]]


def _fields_of_its_own(route: Obj) -> list[str]:
    """What a weighted route sets besides a match and destinations (host, port, weight)."""
    extra = [key for key in route if key not in ("match", "route")]
    for index, destination in enumerate(route.get("route") or []):
        extra += [f"route[{index}].{k}" for k in destination if k not in ("destination", "weight")]
        to = destination.get("destination") or {}
        extra += [f"route[{index}].destination.{k}" for k in to if k not in ("host", "port")]
    return extra


def _weighted_only(route: Obj, layout: IstioLayout) -> bool:
    """Whether a route has destinations, all blue's or green's weighted Service."""
    weighted = {layout.service(c) for c in Colour}
    hosts = [(d.get("destination") or {}).get("host") for d in route.get("route") or []]
    return bool(hosts) and all(_service_named(h, layout) in weighted for h in hosts)


# A match entry with only these keys, and a `uri` (if any) among _EVERY_URI, matches everything
# that comes through our Gateway; so do `gateways` naming it and `port` its port (`_narrows`).
_NON_MATCHING_KEYS = {"name", "ignoreUriCase", "statPrefix"}
_EVERY_URI = ({"prefix": "/"}, {"regex": ".*"}, {"regex": "^.*$"}, {"regex": "/.*"})


def matches_everything(route: Obj, layout: IstioLayout) -> bool:
    """Whether an http route takes every request that comes through our Gateway (no `match`, or
    a match-all entry in it)."""
    entries = route.get("match")
    if not entries:
        return True
    return any(isinstance(entry, dict) and not _narrows(entry, layout) for entry in entries)


def _narrows(entry: Obj, layout: IstioLayout) -> bool:
    """Whether a match entry leaves out some request through our Gateway. Its `gateways`
    (which replace the VirtualService's for that route) leave out none when they name ours
    (`<name>` in the VirtualService's namespace, or `<namespace>/<name>`), its `port` none when
    it is the Gateway's one port."""
    ours = {layout.gateway, f"{layout.namespace}/{layout.gateway}"}
    return (
        not set(entry) <= {*_NON_MATCHING_KEYS, "uri", "gateways", "port"}
        or entry.get("uri", _EVERY_URI[0]) not in _EVERY_URI
        or ("gateways" in entry and not ours & set(entry["gateways"] or ()))
        or entry.get("port", GATEWAY_PORT) != GATEWAY_PORT
    )


def check_reachable(http: list[Obj], layout: IstioLayout) -> None:
    """Raise RouterRefused when a user route that takes every request shadows one of ours
    (the user's route to change: no retry helps)."""
    for index, route in enumerate(http):
        if route.get("name") in OUR_ROUTES or not matches_everything(route, layout):
            continue
        shadowed = [r["name"] for r in http[index + 1 :] if r.get("name") in OUR_ROUTES]
        if shadowed:
            name = route.get("name") or f"#{index} (unnamed)"
            raise RouterRefused(
                f"VirtualService {layout.namespace}/{layout.virtual_service}: route {name!r} "
                f"matches every request, so {', '.join(map(repr, shadowed))} after it would "
                f"never be reached; give {name!r} a narrower match, move it after "
                f"{DEFAULT_ROUTE!r}, or delete it (aml-rollout will not put its routes above "
                "it: that would take over the traffic it serves)"
            )
        return


def weights_from_routes(http: list[Obj], layout: IstioLayout) -> Weights:
    """The weights of our default route, read from a VirtualService's `spec.http`.

    The weights are read as Istio serves them (pilot's route translation): a lone destination
    takes everything, whatever its weight; among several, an absent weight is 0 (Go clients
    omit zero values) and each destination gets weight / sum (relative weights).

    RouterError when a user route shadows it (`check_reachable`): its weights would not be
    what the data plane serves; and for a split Weights cannot hold (not whole percents). A
    route that is ours in all but name is read as ours (`with_default_named`).
    """
    http = with_default_named(http, layout)
    check_reachable(http, layout)
    route = next((r for r in http if r.get("name") == DEFAULT_ROUTE), None)
    where = f"VirtualService {layout.namespace}/{layout.virtual_service}"
    if route is None:
        raise RouterError(f"{where} has no {DEFAULT_ROUTE!r} route (not bootstrapped?)")
    by_host = {layout.service(c): c for c in Colour}
    found = {Colour.BLUE: 0, Colour.GREEN: 0}
    destinations = route.get("route") or []
    lone = len(destinations) == 1
    for destination in destinations:
        host = (destination.get("destination") or {}).get("host", "")
        name = _service_named(host, layout)
        if name not in by_host:
            raise RouterError(f"{where}: route {DEFAULT_ROUTE!r} sends traffic to unknown {host!r}")
        found[by_host[name]] += 1 if lone else int(destination.get("weight") or 0)
    total = sum(found.values())
    if total == 0:
        raise RouterError(f"{where}: route {DEFAULT_ROUTE!r} has no destination with a weight")
    if found[Colour.BLUE] * 100 % total:
        raise RouterError(
            f"{where}: route {DEFAULT_ROUTE!r} sends {found[Colour.BLUE]}/{total} of its traffic "
            "to blue, not a whole percent"
        )
    blue = found[Colour.BLUE] * 100 // total
    mirror = mirror_from_route(route, layout)
    try:
        return Weights(blue=blue, green=100 - blue, mirror=mirror)
    except ValueError as exc:
        raise RouterError(f"{where}: route {DEFAULT_ROUTE!r} has invalid weights: {exc}") from exc


def _mirrors(route: Obj) -> list[tuple[object, float]]:
    """(host, percent) of every mirror on an http route, by Istio's rules.

    `mirror` takes `mirrorPercentage.value` (a double), else the deprecated integer
    `mirrorPercent`, else 100 (absent: everything is mirrored); `mirrors` entries (the newer list,
    never together with `mirror`) take their own `percentage.value`, else 100. A percentage of
    0 mirrors nothing.
    """
    found: list[tuple[object, float]] = []
    if isinstance(route.get("mirror"), dict):
        if isinstance(route.get("mirrorPercentage"), dict):
            percent = route["mirrorPercentage"].get("value", 0)
        else:
            percent = next(
                (route[k] for k in ("mirrorPercent", "mirror_percent") if route.get(k) is not None),
                100,
            )
        found.append((route["mirror"].get("host"), percent))
    for entry in route.get("mirrors") or []:
        if isinstance(entry, dict) and isinstance(entry.get("destination"), dict):
            percentage = entry.get("percentage")
            percent = percentage.get("value", 0) if isinstance(percentage, dict) else 100
            found.append((entry["destination"].get("host"), percent))
    return [(host, float(percent)) for host, percent in found if float(percent) > 0]


def mirror_from_route(route: Obj, layout: IstioLayout) -> int:
    """Percent of a route's requests mirrored to blue's weighted Service (0: none).

    Only blue's weighted Service counts: the judge reads blue there. A mirror to any other host
    (blue's pinned Service included) copies nothing the judge sees and is not ours: it reads as
    0 here (see `foreign_mirrors`). RouterError for what Weights cannot hold: a share that is
    not a whole percent, or blue mirrored twice.
    """
    where = f"VirtualService {layout.namespace}/{layout.virtual_service}"
    blue = layout.service(Colour.BLUE)
    shares = [p for host, p in _mirrors(route) if _service_named(host, layout) == blue]
    if not shares:
        return 0
    if len(shares) > 1:
        raise RouterError(f"{where}: route {route.get('name')!r} mirrors to {blue!r} twice")
    percent = shares[0]
    if not percent.is_integer():
        raise RouterError(
            f"{where}: route {route.get('name')!r} mirrors {percent:g} % to {blue!r}; "
            "aml-rollout mirrors whole percents only"
        )
    return int(percent)


def foreign_mirrors(http: list[Obj], layout: IstioLayout) -> list[str]:
    """Hosts our default route mirrors to other than blue's weighted Service (someone's edit).

    Its mirrors are ours and the next write sets them as we want, so these disappear.
    """
    route = next((r for r in http if r.get("name") == DEFAULT_ROUTE), None)
    if route is None:
        return []
    blue = layout.service(Colour.BLUE)
    return [str(h) for h, _ in _mirrors(route) if _service_named(h, layout) != blue]


def foreign_destinations(http: list[Obj], layout: IstioLayout) -> list[str]:
    """Hosts our default route sends traffic to other than blue's and green's weighted Services
    (someone's edit; `weights_from_routes` refuses to read them). Its destinations are ours and
    the next write sets them as we want, so these and their share disappear."""
    route = next((r for r in http if r.get("name") == DEFAULT_ROUTE), None)
    if route is None:
        return []
    weighted = {layout.service(c) for c in Colour}
    hosts = [(d.get("destination") or {}).get("host") for d in route.get("route") or []]
    return [str(h) for h in hosts if _service_named(h, layout) not in weighted]


# ---- RBAC and bootstrap ---------------------------------------------------------------------
def rbac(layout: IstioLayout) -> list[Obj]:
    """ServiceAccount, Role (only what the router and the state store use, see ROLE_RULES) and
    RoleBinding."""
    role_name = f"{layout.app}-rollout"
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(layout, layout.service_account),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(layout, role_name),
            "rules": [
                {"apiGroups": [group], "resources": [resource], "verbs": list(verbs)}
                for group, resource, verbs in ROLE_RULES
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(layout, role_name),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name},
            "subjects": [
                {
                    "kind": "ServiceAccount",
                    "name": layout.service_account,
                    "namespace": layout.namespace,
                }
            ],
        },
    ]


def namespace(layout: IstioLayout) -> Obj:
    """The namespace, labelled for Istio sidecar injection (by the layout's revision, if any)."""
    injection = (
        {"istio.io/rev": layout.istio_revision}
        if layout.istio_revision
        else {"istio-injection": "enabled"}
    )
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": layout.namespace, "labels": injection},
    }


def bootstrap(layout: IstioLayout, releases: dict[Colour, Release] | None = None) -> list[Obj]:
    """Everything `kubectl apply` needs before the first rollout, in apply order.

    Deployments are rendered for the colours in `releases` (usually green, the production model);
    traffic starts on green, or on blue when only blue is given.
    """
    releases = releases or {}
    weights = Weights.blue_at(100 if set(releases) == {Colour.BLUE} else 0)
    deployments = [
        deployment(layout, c, releases[c]) for c in (Colour.GREEN, Colour.BLUE) if c in releases
    ]
    return [
        namespace(layout),
        *rbac(layout),
        *services(layout),
        *destination_rules(layout),
        *deployments,
        gateway(layout),
        virtual_service(layout, weights),
    ]
