"""Istio router: blue/green Deployments and Services behind a Gateway and a VirtualService.

The objects and the route arithmetic come from `istio_manifests` (pure); this module only reads
and writes them through the kubernetes client (decide first, apply after — Argo Rollouts'
generateVirtualServicePatches vs reconcileVirtualService).

- `deploy` makes sure the Services, the Gateway and the VirtualService exist (created when
  missing, never overwritten), and a DestinationRule per Service bounding idle upstream
  connections below the scoring server's keep-alive (created when missing; in one that exists,
  the user's, only a missing idle timeout is added, see `_bound_idle_connections`), then
  creates Deployment `<app>-<colour>`, or, when it exists,
  changes only what the router owns in the object it read (the scoring container's image and,
  for a tag, its pull policy; its AML_ROLLOUT_COLOUR variable; the `aml-rollout.io/*`
  annotations of the Deployment and of its pod template, so that a new release rolls the pods
  even under an unchanged tag, see `istio_manifests.pinned`) and sends what changed as a
  JSON merge patch carrying the read `resourceVersion` (409 → re-read → retry, as below):
  replicas set by an HPA, Helm's metadata, resources and the rest stay, and so do fields the
  client's typed models do not know (a PUT goes through them, and they refuse such fields).
  A Deployment scaled to 0 is refused before any write (DeployFailed: a rollout of no pod).
  Then it waits, bounded, until the rollout is complete by `kubectl rollout status`'s rule (new
  pods all updated and available, no old pod left), failing at once when the Deployment
  reports ProgressDeadlineExceeded (not the condition read before the write: the rollout
  before's) or a pod of the new release will not become ready by itself
  (`m.never_ready`: a crash loop, as when the package image cannot load its model). Any
  failure is DeployFailed, which the controller does not retry (it would wait as long again),
  saying why as far as the API tells: the Deployment's conditions and its pods' reasons
  (ImagePullBackOff, CrashLoopBackOff with the last exit and its message, Unschedulable...),
  read with the `pods: list` the Role grants for this, once per poll while not complete.
- `set_weights` reads the VirtualService, computes the new `spec.http` with `merge_routes` (only
  routes named `aml-rollout-*` change, pin routes found below our default route move back first;
  the user's routes stay where they are; what it drops of someone's edits to our routes, a
  foreign mirror or destination, is logged) and sends it as a JSON merge patch carrying
  `metadata.resourceVersion`. A 409 (someone wrote in between) re-reads and retries, a
  bounded number of times, then raises ConflictError. Nothing is written when the routes
  already match (idempotent, and no resourceVersion churn for watchers). A shadow
  step (`weights.mirror`) adds `mirror` / `mirrorPercentage` to our default route; as a merge
  patch replaces a list whole, the next `spec.http` without them removes them (no nulls needed).
  Traffic, live or mirrored, is refused to a colour whose Deployment or weighted Service is
  missing (for good: RouterRefused; Istio would answer 503 for that share). A colour whose
  Deployment has no pod available (`m.no_pod_available`: scaled to 0, crashed, past its
  progress deadline) is refused only a share that grows (a RouterError, as a pod may yet come
  up), and never by weights that send blue nothing (a rollback, an abort: a warning).
- `get_weights` reads the VirtualService back: what the control plane holds, the mirror to
  blue's weighted Service included (`istio_manifests.mirror_from_route`).
- `remove` deletes the Deployment (its Services stay: empty Services are free and keep the pinned
  route valid), refusing while the colour still takes default traffic.

API failures become RouterError naming the object and the HTTP status; a 409 that outlives the
retries is ConflictError; no answer at all from the API server is RouterUnavailable (one that
took the request and answered late, or broke its answer off, is a plain RouterError, and so
is an answer with no JSON in it, `kubeapi.NotJson`: a proxy's page, a body cut short); pods
that do not become ready are DeployFailed. A refusal that no retry changes is RouterRefused
(DeployFailed is one): a namespace that does not exist, a release without an image, a 401 or
403 (credentials or RBAC), a 400 or 422 (an object refused as invalid: `kubeapi.REFUSED`),
traffic to a colour with no Deployment, a Deployment of one's own named `<app>-<colour>` whose
pods its Services would not reach (`istio_manifests.updated_deployment`), a 404 for a
resource type the API server does not serve (`kubeapi.not_served`: no Istio, or one before
1.22). Only the verbs in `istio_manifests.ROLE_RULES` are used (checked by a test against a
recorded run), so the rendered RBAC Role is enough.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from rollout import kubeapi
from rollout.core.types import Colour, Release, Weights
from rollout.errors import (
    GONE,
    ConflictError,
    DeployFailed,
    RouterError,
    RouterRefused,
    RouterUnavailable,
)
from rollout.routers import istio_manifests as m
from rollout.routers.base import Fence, no_fence

if TYPE_CHECKING:
    from rollout.config import IstioRouterConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

_NOT_FOUND = kubeapi.NOT_FOUND
_CONFLICT = kubeapi.CONFLICT


class IstioRouter:
    """A TrafficRouter over the Kubernetes API (Istio networking v1 + apps/v1 + core/v1)."""

    def __init__(
        self,
        layout: m.IstioLayout,
        api_client: k8s.ApiClient,
        *,
        max_conflict_retries: int = 5,
        ready_timeout_s: float = 300.0,
        poll_s: float = 2.0,
        request_timeout_s: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        credentials: kubeapi.Credentials | None = None,
    ) -> None:
        self.layout = layout
        #: What `api_client` authenticates with, for the hints of a 401/403.
        self._credentials = credentials
        self._apps = k8s.AppsV1Api(api_client)
        self._core = k8s.CoreV1Api(api_client)
        self._custom = k8s.CustomObjectsApi(api_client)
        self._host = api_client.configuration.host
        self._max_retries = max_conflict_retries
        self._ready_timeout_s = ready_timeout_s
        self._poll_s = poll_s
        self._timeout = request_timeout_s
        self._sleep = sleep
        self._monotonic = monotonic
        #: Checked before every write (see routers.base.Fence): the controller's lease check.
        self.fence: Fence = no_fence

    @classmethod
    def from_config(cls, cfg: IstioRouterConfig) -> IstioRouter:
        """Build from the spec's `router` section (see IstioRouterConfig for the API server)."""
        layout = m.IstioLayout(
            namespace=cfg.namespace,
            app=cfg.app,
            port=cfg.port,
            container_port=cfg.container_port,
            header=cfg.header,
            hosts=tuple(cfg.hosts),
            replicas=cfg.replicas,
            ingress_selector=(("istio", cfg.ingress_gateway),),
            api_key_secret=cfg.api_key_secret,
            api_key_secret_key=cfg.api_key_secret_key,
        )
        return cls(
            layout,
            kubeapi.api_client(cfg, "router"),
            ready_timeout_s=cfg.ready_timeout_s,
            credentials=kubeapi.Credentials.of(cfg),
        )

    # ---------------------------------------------------------------- TrafficRouter protocol
    def deploy(self, colour: Colour, release: Release) -> None:
        """Make `colour` serve `release` and wait until its pods are available."""
        body = m.deployment(self.layout, colour, release)  # checks the release has an image
        name = self.layout.deployment(colour)
        if (current := self._read_deployment(name)) is not None:
            # Refused before any write (scaled to 0, pods its Services miss), routing included.
            m.updated_deployment(self.layout, current, colour, release)
        self._ensure_routing()
        stale = self._retry_conflicts(
            f"Deployment {self._ns}/{name}", lambda: self._upsert(name, body, colour, release)
        )
        self._wait_available(name, stale)
        log.info("deployed %s:%s as %s", release.model, release.version, name)

    def release(self, colour: Colour) -> Release | None:
        """The release recorded on Deployment `<app>-<colour>`, or None when it does not exist."""
        found = self._read_deployment(self.layout.deployment(colour))
        if found is None:
            return None
        container = m.scoring_container(found)
        image = container.get("image") if container else None
        annotations = (found.get("metadata") or {}).get("annotations")
        return m.release_from_annotations(annotations, image)

    def set_weights(self, weights: Weights) -> None:
        """Set our default route's weights; header-pinned and user routes are untouched."""
        for colour in Colour:
            if weights.of(colour):
                sending = f"send {weights.of(colour)} % to {colour.value}"
            elif colour is Colour.BLUE and weights.mirror:
                sending = f"mirror {weights.mirror} % to blue"
            else:
                continue  # a rollback must work whatever state the other colour is in
            name = f"{self._ns}/{self.layout.deployment(colour)}"
            found = self._read_deployment(self.layout.deployment(colour))
            if found is None:
                # The API server reads what it stores: absent now is absent on the next ask.
                raise RouterRefused(f"cannot {sending}: Deployment {name} does not exist{GONE}")
            # With no pod available it answers nothing: 503s charged to its model. (With pods
            # available, e.g. a stalled scale-up, it still serves and may take traffic.) Not
            # RouterRefused: a pod may come up, or be scaled up, before the next try.
            if (why := m.no_pod_available(found)) is not None:
                self._no_pod(
                    weights,
                    colour,
                    f"cannot {sending}: Deployment {name} {why}: every request of that share "
                    "would fail (503)",
                )
            self._require_service(colour, sending)
        what = f"VirtualService {self._ns}/{self.layout.virtual_service}"
        self._retry_conflicts(what, lambda: self._patch_routes(weights))
        log.info("%s: default route set to %s", what, weights)

    def get_weights(self) -> Weights:
        """The default route's weights as the VirtualService holds them now, and the percent it
        mirrors to blue's weighted Service (a mirror anywhere else reads as 0: not ours)."""
        vs = self._read_virtual_service()
        if vs is None:
            raise RouterError(
                f"VirtualService {self._ns}/{self.layout.virtual_service} does not exist "
                "(run `aml-rollout manifests | kubectl apply -f -`, or deploy a colour first)"
            )
        return m.weights_from_routes(vs.get("spec", {}).get("http") or [], self.layout)

    def remove(self, colour: Colour) -> None:
        """Delete Deployment `<app>-<colour>` (ending a mirror to it); a no-op when already gone."""
        vs = self._read_virtual_service()
        served = m.weights_from_routes(vs["spec"].get("http") or [], self.layout) if vs else None
        if served is not None and served.of(colour):
            raise RouterError(f"cannot remove {colour.value}: it still serves default traffic")
        if served is not None and served.mirror and colour is Colour.BLUE:
            self.set_weights(Weights.blue_at(served.blue))  # no copies to a removed blue
        name = self.layout.deployment(colour)
        self.fence()
        self._read(
            f"delete Deployment {self._ns}/{name}",
            lambda: self._apps.delete_namespaced_deployment(
                name, self._ns, _request_timeout=self._timeout
            ),
        )

    # ------------------------------------------------------------------------------ internals
    @property
    def _ns(self) -> str:
        return self.layout.namespace

    def _ensure_routing(self) -> None:
        """Create the Services, Gateway and VirtualService that are missing; never overwrite.
        A Service that exists must expose `router.port` (RouterRefused): our routes send to it."""
        for svc in m.services(self.layout):
            self._ensure_service(svc)
        for rule in m.destination_rules(self.layout):
            what = f"DestinationRule {self._ns}/{rule['metadata']['name']}"
            self._retry_conflicts(what, functools.partial(self._bound_idle_connections, rule))
        self._ensure_istio("gateways", m.gateway(self.layout))
        self._ensure_istio("virtualservices", m.virtual_service(self.layout, Weights.blue_at(0)))

    def _ensure_service(self, svc: dict[str, Any]) -> None:
        name = svc["metadata"]["name"]

        def read() -> object:
            return self._read_service(name)

        def create() -> object:
            self.fence()
            return self._core.create_namespaced_service(
                self._ns, _model(k8s.V1Service, svc), _request_timeout=self._timeout
            )

        self._create_if_missing(f"Service {self._ns}/{name}", read, create)

    def _read_service(self, name: str) -> object:
        """Service `name` as read (raw JSON, see `kubeapi.read_json`); RouterRefused when it lacks
        `router.port`: a route to a port the Service does not expose fails every request (Envoy
        answers 503)."""
        found = kubeapi.read_json(
            lambda: self._core.read_namespaced_service(
                name, self._ns, _request_timeout=self._timeout, _preload_content=False
            )
        )
        ports = [p.get("port") for p in (found.get("spec") or {}).get("ports") or []]
        if self.layout.port not in ports:
            raise RouterRefused(
                f"Service {self._ns}/{name} exposes port {', '.join(map(str, ports)) or 'none'}, "
                f"not router.port {self.layout.port}: routes to it would fail every request; set "
                f"router.port: {ports[0] if ports else '<its port>'} (the Service's port, not "
                "the scoring server's: that is router.container_port), or change the Services"
            )
        return found

    def _no_pod(self, weights: Weights, colour: Colour, problem: str) -> None:
        """RouterError `problem` when `weights` grow the share (live or mirrored) of `colour`,
        which has no pod available; else only a warning.

        A share that does not grow protects nobody: its requests fail already, and refusing
        would keep users on it. Weights that send blue nothing (a rollback, an abort) are
        written whatever green's state: the operator asked to leave blue, green is the stable
        release, and the controller would retry them for minutes with blue's share in place.
        """
        served = self._served()
        grows = served is None or weights.of(colour) > served.of(colour)
        if colour is Colour.BLUE and served is not None and weights.mirror > served.mirror:
            grows = True
        if grows and (weights.blue or weights.mirror):
            raise RouterError(problem)
        why = "its share does not grow" if not grows else "the weights send blue nothing"
        log.warning("%s; written all the same: %s", problem, why)

    def _served(self) -> Weights | None:
        """The weights the VirtualService holds now; None when there is none to read (or none
        readable as ours: `m.weights_from_routes` says why, and the write will too)."""
        vs = self._read_virtual_service()
        if vs is None:
            return None
        try:
            return m.weights_from_routes(vs.get("spec", {}).get("http") or [], self.layout)
        except RouterError:
            return None

    def _require_service(self, colour: Colour, sending: str) -> None:
        """RouterRefused when the colour's weighted Service is gone (or lacks `router.port`).

        Istio answers 503 for the share a route sends to a host no Service backs, and the judge
        would charge them to the model. Only `deploy` re-creates Services (never overwriting
        one): here the weights are left as they are and the user is told.
        """
        name = self.layout.service(colour)
        what = f"Service {self._ns}/{name}"
        if self._read(what, functools.partial(self._read_service, name)) is None:
            raise RouterRefused(
                f"cannot {sending}: {what} does not exist: Istio would answer 503 for that "
                f"share (re-create it: a deploy of {colour.value} does, or `kubectl apply` it "
                "from `aml-rollout manifests` or the chart; then `run` again to resume)"
            )

    def _check_service_ports(self) -> None:
        """RouterRefused when an existing Service lacks `router.port` (see `_read_service`)."""
        for svc in m.services(self.layout):
            name = svc["metadata"]["name"]
            self._read(f"Service {self._ns}/{name}", functools.partial(self._read_service, name))

    def _bound_idle_connections(self, wanted: dict[str, Any]) -> None:
        """Create DestinationRule `wanted` when missing; to one that exists (the user's) add only
        our idle timeout, when it has none (`m.idle_timeout_patch`), and say when theirs is one
        the scoring server does not outlast. Run by `_retry_conflicts` (a 409 re-reads).

        A 403 does not stop the deploy: a Role from before the router wrote DestinationRules
        (an older chart or `manifests`) lacks them, and the rollout works without (Istio's
        default idle timeout, an hour); the warning says what to re-apply.
        """
        name = wanted["metadata"]["name"]
        what = f"DestinationRule {self._ns}/{name}"
        try:
            try:
                found = self._get_custom("destinationrules", name)
            except ApiException as exc:
                if exc.status != _NOT_FOUND or kubeapi.not_served(exc):
                    raise
                self.fence()
                self._custom.create_namespaced_custom_object(
                    m.ISTIO_GROUP,
                    m.ISTIO_VERSION,
                    self._ns,
                    "destinationrules",
                    wanted,
                    _request_timeout=self._timeout,
                )  # a 409 (created meanwhile) re-reads: theirs, then
                log.info("created %s", what)
                return
            if (problem := m.idle_timeout_problem(found)) is not None:
                log.warning("%s", problem)
            if (patch := m.idle_timeout_patch(found)) is None:
                return
            self.fence()
            self._custom.patch_namespaced_custom_object(
                m.ISTIO_GROUP,
                m.ISTIO_VERSION,
                self._ns,
                "destinationrules",
                name,
                patch,
                _request_timeout=self._timeout,
            )
            log.info("%s: idle timeout %s added (the rest is yours)", what, m.IDLE_TIMEOUT)
        except ApiException as exc:
            if exc.status != 403:
                raise
            log.warning(
                "%s: %s; idle upstream connections keep Istio's default (1 h), longer than the "
                "scoring server's keep-alive: a request may meet a connection it just closed "
                "(503); re-apply the Role (`aml-rollout manifests` or the chart), which grants "
                "destinationrules create, get, patch",
                what,
                kubeapi.describe(exc, self._credentials),
            )

    def _ensure_istio(self, plural: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]

        def create() -> object:
            self.fence()
            return self._custom.create_namespaced_custom_object(
                m.ISTIO_GROUP,
                m.ISTIO_VERSION,
                self._ns,
                plural,
                obj,
                _request_timeout=self._timeout,
            )

        self._create_if_missing(
            f"{obj['kind']} {self._ns}/{name}", lambda: self._get_custom(plural, name), create
        )

    def _create_if_missing(
        self, what: str, read: Callable[[], object], create: Callable[[], object]
    ) -> None:
        if self._read(what, read) is not None:
            return
        try:
            create()
            log.info("created %s", what)
        except ApiException as exc:
            if exc.status == _NOT_FOUND and not kubeapi.not_served(exc):  # a POST's 404
                raise RouterRefused(
                    f"create {what}: {kubeapi.describe(exc)} (namespace {self._ns!r} does not "
                    "exist: create it, e.g. with `aml-rollout manifests`, or fix "
                    f"router.namespace) [{self._host}]"
                ) from exc
            if exc.status != _CONFLICT:  # 409 AlreadyExists: someone created it meanwhile
                raise _router_error(f"create {what}", exc, self._host, self._credentials) from exc
        except HTTPError as exc:
            raise _unreachable(f"create {what}", exc, self._host) from exc

    def _upsert(
        self, name: str, body: dict[str, Any], colour: Colour, release: Release
    ) -> dict[str, Any] | None:
        """Create or patch the Deployment; its progress deadline condition as read before the
        write (the rollout before's, which `m.rollout_waiting_for` ignores), if any."""
        current = self._read_deployment(name)
        if current is None:  # only a new Deployment gets the whole manifest (and layout.replicas)
            self.fence()
            self._apps.create_namespaced_deployment(
                self._ns, _model(k8s.V1Deployment, body), _request_timeout=self._timeout
            )
            return None
        wanted = m.updated_deployment(self.layout, current, colour, release)
        spec = {k: v for k, v in current.items() if k != "status"}
        if wanted == spec:
            return None  # already serving it: no write, no new generation, its deadline its own
        # A merge patch of what changed, carrying the read resourceVersion (409 if it moved):
        # a PUT of the whole object would go through the client's typed models, which refuse
        # any field they do not know.
        self.fence()
        self._apps.patch_namespaced_deployment(
            name,
            self._ns,
            m.merge_patch(spec, wanted),
            _content_type="application/merge-patch+json",
            _request_timeout=self._timeout,
        )
        return m.past_deadline(current)

    def _read_deployment(self, name: str) -> dict[str, Any] | None:
        """The Deployment as the API server sent it (raw JSON), or None when it does not exist."""
        found = self._read(  # raw JSON: the typed model would drop fields it does not know
            f"Deployment {self._ns}/{name}",
            lambda: kubeapi.read_json(
                lambda: self._apps.read_namespaced_deployment(
                    name, self._ns, _request_timeout=self._timeout, _preload_content=False
                )
            ),
        )
        return cast(dict[str, Any] | None, found)

    def _wait_available(self, name: str, stale: dict[str, Any] | None = None) -> None:
        """Poll until the Deployment's rollout is complete (see `m.rollout_waiting_for`; `stale`
        is the progress deadline condition of the rollout before, no failure of this one).

        DeployFailed when it will not be: a pod of the new release that will not become ready
        by itself (`m.never_ready`: a crash loop, the package image exiting 3 when its model
        cannot load), past its progress deadline, or still not complete after `ready_timeout_s`
        — an answer the controller does not retry (it would only wait as long again), saying
        why as far as the API tells (`m.not_ready`). Each poll that finds the rollout not
        complete lists the pods once (none when it is); the failure reuses that list.
        """
        deadline = self._monotonic() + self._ready_timeout_s
        what = f"Deployment {self._ns}/{name}"
        while True:
            dep = self._read_deployment(name)
            if dep is None:
                raise RouterError(f"{what} disappeared while waiting for it to become available")
            try:
                waiting_for = m.rollout_waiting_for(dep, stale)
            except DeployFailed as exc:
                raise DeployFailed(m.not_ready(str(exc), dep, self._pods(dep))) from None
            if waiting_for is None:
                return
            pods = self._pods(dep)
            if not isinstance(pods, str) and (why := m.never_ready(dep, pods)) is not None:
                # Only the new release's pods: an old pod crash-looping is not this deploy's.
                raise DeployFailed(m.not_ready(f"{what}: {why}", dep, m.release_pods(dep, pods)))
            if self._monotonic() >= deadline:
                headline = (
                    f"{what} not available after {self._ready_timeout_s:g} s "
                    f"(router.ready_timeout_s), waiting for {waiting_for}"
                )
                raise DeployFailed(m.not_ready(headline, dep, pods))
            self._sleep(self._poll_s)

    def _pods(self, deployment: dict[str, Any]) -> list[dict[str, Any]] | str:
        """The pods a Deployment selects, as raw JSON; what went wrong (a str) when they cannot
        be read: a Role from before `pods: list`, say, must not hide why the deploy failed."""
        labels = ((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if not labels:
            return "not read (the Deployment selects by expressions)"
        selector = ",".join(f"{key}={value}" for key, value in sorted(labels.items()))
        try:
            found = kubeapi.read_json(
                lambda: self._core.list_namespaced_pod(
                    self._ns,
                    label_selector=selector,
                    _request_timeout=self._timeout,
                    _preload_content=False,
                )
            )
            items = found.get("items") or []
        except ApiException as exc:
            return f"not readable ({kubeapi.describe(exc, self._credentials)})"
        except (HTTPError, ValueError) as exc:
            return f"not readable ({exc})"
        return cast(list[dict[str, Any]], items)

    def _patch_routes(self, weights: Weights) -> None:
        vs = self._read_virtual_service()
        if vs is None:
            self.fence()
            self._custom.create_namespaced_custom_object(
                m.ISTIO_GROUP,
                m.ISTIO_VERSION,
                self._ns,
                "virtualservices",
                m.virtual_service(self.layout, weights),
                _request_timeout=self._timeout,
            )
            return
        found = vs.get("spec", {}).get("http") or []
        current = m.with_default_named(found, self.layout)  # what the checks below read
        wanted = m.merge_routes(current, self.layout, weights)
        if wanted == found:
            return
        if m.route_ports(current) - {self.layout.port}:
            self._check_service_ports()  # our routes move to router.port: the Services need it
        where = f"VirtualService {self._ns}/{self.layout.virtual_service}"
        if foreign := m.foreign_destinations(current, self.layout):
            log.warning(
                "%s: the destinations of route %r are aml-rollout's: its traffic to %s (not "
                "blue's or green's weighted Service) is dropped by this write",
                where,
                m.DEFAULT_ROUTE,
                ", ".join(foreign),
            )
        if below := m.pins_below_default(current):
            log.warning(
                "%s: %s came after route %r, which takes every request first (no request was "
                "pinned): moved back above it, first",
                where,
                " and ".join(map(repr, below)),
                m.DEFAULT_ROUTE,
            )
        if foreign := m.foreign_mirrors(current, self.layout):
            log.warning(
                "%s: the mirror of route %r is aml-rollout's: its mirror to %s (not blue's "
                "weighted Service) is dropped by this write",
                where,
                m.DEFAULT_ROUTE,
                ", ".join(foreign),
            )
        patch = {
            "metadata": {"resourceVersion": vs["metadata"]["resourceVersion"]},
            "spec": {"http": wanted},
        }
        self.fence()
        self._custom.patch_namespaced_custom_object(
            m.ISTIO_GROUP,
            m.ISTIO_VERSION,
            self._ns,
            "virtualservices",
            self.layout.virtual_service,
            patch,
            _request_timeout=self._timeout,
        )

    def _retry_conflicts(self, what: str, write: Callable[[], T]) -> T:
        """Run a read-modify-write; on 409 run it again from the read, a bounded number of times.
        What the write that went through returns."""
        for attempt in range(1, self._max_retries + 1):
            try:
                return write()
            except ApiException as exc:
                if exc.status != _CONFLICT:
                    raise _router_error(
                        f"write {what}", exc, self._host, self._credentials
                    ) from exc
                log.info("%s changed under us (409), re-reading (attempt %d)", what, attempt)
            except HTTPError as exc:
                raise _unreachable(f"write {what}", exc, self._host) from exc
            except kubeapi.NotJson as exc:  # a read of the read-modify-write (see `_read`)
                raise RouterError(f"{what}: {exc} [{self._host}]") from exc
        raise ConflictError(
            f"write {what}: still conflicting after {self._max_retries} attempts "
            "(another writer keeps changing it)"
        )

    def _read_virtual_service(self) -> dict[str, Any] | None:
        name = self.layout.virtual_service
        return self._read(
            f"VirtualService {self._ns}/{name}", lambda: self._get_custom("virtualservices", name)
        )

    def _get_custom(self, plural: str, name: str) -> dict[str, Any]:
        """An Istio object as read; NotJson for an answer that is none (the client would hand
        back its text as the object)."""
        obj = kubeapi.read_json(
            lambda: self._custom.get_namespaced_custom_object(
                m.ISTIO_GROUP,
                m.ISTIO_VERSION,
                self._ns,
                plural,
                name,
                _request_timeout=self._timeout,
                _preload_content=False,
            )
        )
        return cast(dict[str, Any], obj)

    def _read(self, what: str, call: Callable[[], T]) -> T | None:
        """Run one API call; None on 404, RouterError on anything else that fails."""
        try:
            return call()
        except ApiException as exc:
            if exc.status == _NOT_FOUND and not kubeapi.not_served(exc):
                return None
            raise _router_error(what, exc, self._host, self._credentials) from exc
        except HTTPError as exc:
            raise _unreachable(what, exc, self._host) from exc
        except kubeapi.NotJson as exc:  # asked again, it may come through: not a refusal
            raise RouterError(f"{what}: {exc} [{self._host}]") from exc


def _model(cls: Any, body: dict[str, Any]) -> Any:
    """A typed client model from one of our dicts (the typed APIs want models, not dicts)."""
    model = cls.from_dict(body)
    if model is None:
        raise RouterError(f"cannot build a {cls.__name__} from {body.get('kind')} manifest")
    return model


def _router_error(
    what: str, exc: ApiException, host: str, credentials: kubeapi.Credentials | None
) -> RouterError:
    if kubeapi.not_served(exc):
        # Not a missing object: the API itself is not there, and asking again will not install
        # it (retried, it was 4 attempts over 7 s, then "failed 4 times").
        if _ISTIO_KINDS & set(what.split()):  # "create VirtualService ml/diabetes", say
            fix = (
                f"the router needs {m.ISTIO_GROUP}/{m.ISTIO_VERSION}, served by Istio 1.22 or "
                f"later: is Istio installed, and recent enough? (`kubectl api-versions | grep "
                f"{m.ISTIO_GROUP}`)"
            )
        else:  # apps/v1 and v1 are served by every API server: this is not one
            fix = "is it a Kubernetes API server? (check router.api_url or the kubeconfig)"
        return RouterRefused(
            f"{what}: the API server at {host} does not serve this resource type (HTTP 404 "
            f"naming no object); {fix}"
        )
    said = f"{what}: {kubeapi.describe(exc, credentials)}"
    if exc.status in kubeapi.REFUSED:  # credentials, RBAC, an invalid object: final answers
        invalid = exc.status not in (401, 403)
        return RouterRefused(f"{said}{_INVALID if invalid else ''} [{host}]")
    cls = ConflictError if exc.status == _CONFLICT else RouterError
    return cls(f"{said} [{host}]")


#: The kinds of networking.istio.io the router reads and writes, as its error messages name them.
_ISTIO_KINDS = frozenset({"DestinationRule", "Gateway", "VirtualService"})

_INVALID = (
    " (refused as invalid, and sent again it would be again: fix what the API server names, in "
    "the spec's router settings or the release's image, or an admission policy that denies it)"
)


def _unreachable(what: str, exc: Exception, host: str) -> RouterError:
    """No (whole) answer to a request: RouterUnavailable only when nothing answers at `host` (the
    controller fails a run's first deploy on it at once: a spec pointing at no API server). An
    API server that took the request and was slow (an admission webhook), or whose answer broke
    off, is there: a plain RouterError, which the controller retries (the write may have been
    made, and the retry re-reads)."""
    cls = RouterError if kubeapi.reached(exc) else RouterUnavailable
    return cls(f"{what}: {kubeapi.no_answer(exc, host)}")
