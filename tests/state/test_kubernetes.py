"""What only the kubernetes state store has, against the fake kube-apiserver over real HTTP.

The contract (tests/state/test_stores.py) runs first; here: the objects as the API server holds
them, compare-and-swap appends under injected and real concurrent writers, the 1 MiB limit, two
controllers on two "nodes" (a live lease refused, an expired one taken over, the stale one fenced,
renewal keeping a lease alive past several ttls, release letting the next one in at once), and
errors naming the object. "Another node" is another store with its own client; time passing is
another store whose clock runs ahead (a lease expires for it) — nothing is mocked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import exceptions as k8s_exceptions

from rollout.config import KubernetesStateConfig
from rollout.core.machine import with_commands
from rollout.core.status import Command
from rollout.errors import ConfigError, LeaseHeldError, StateError
from rollout.state import kubernetes_objects as o
from rollout.state.factory import make_store
from rollout.state.kubernetes import KubernetesStateStore, _Conflict
from rollout.state.kubernetes_objects import StateObjects
from tests.fakes.kube_apiserver import DELETED, ApiError, FakeKubeApiServer
from tests.fakes.server import Answering, LocalServer
from tests.state.contract import a_status
from tests.state.helpers import (
    LEASES,
    NAMESPACE,
    InstantTime,
    ahead,
    exercise,
    kube_store,
    lease_of,
    status,
    successor,
)

MICRO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|\+00:00)")


def eventually(check: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.02)


def commands_configmap(api: FakeKubeApiServer, name: str = "r") -> dict[str, Any]:
    return api.get("configmaps", f"aml-rollout-{name}-commands", NAMESPACE)


# ---------------------------------------------------------------------------------- objects


def test_the_objects_as_the_api_server_holds_them(api: FakeKubeApiServer) -> None:
    store = kube_store(api, "diabetes", ttl=7)
    store.push_command(Command(id="1", kind="pause", by="ann"))
    with store.lease("ann's controller"):
        store.save(a_status())
        lease = lease_of(api, "diabetes")
        status_cm = api.get("configmaps", "aml-rollout-diabetes-status", NAMESPACE)
    spec = lease["spec"]
    assert spec["holderIdentity"].startswith("ann's controller pid ")
    assert spec["leaseDurationSeconds"] == 7
    assert spec["leaseTransitions"] == 0
    assert MICRO_TIME.fullmatch(spec["acquireTime"]) and MICRO_TIME.fullmatch(spec["renewTime"])
    for obj in (lease, status_cm, commands_configmap(api, "diabetes")):
        assert obj["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "aml-rollout"}
        assert obj["metadata"]["annotations"][o.ROLLOUT_ANNOTATION] == "diabetes"
    claim = f"{spec['holderIdentity']} since {spec['acquireTime']}"
    assert status_cm["metadata"]["annotations"][o.HOLDER_ANNOTATION] == claim
    assert status_cm["data"][o.STATUS_KEY].startswith("{")
    log = commands_configmap(api, "diabetes")["data"][o.COMMANDS_KEY]
    assert log.count("\n") == 1 and '"id":"1"' in log
    assert "holderIdentity" not in lease_of(api, "diabetes")["spec"]  # released


def test_a_lease_written_on_a_whole_second_is_still_a_micro_time(api: FakeKubeApiServer) -> None:
    # The kubernetes client re-serialises a typed Lease with isoformat(), which drops a zero
    # fraction; the API server (and the fake) refuse anything but six digits.
    store = kube_store(api, clock=lambda: 1_800_000_000.0)
    with store.lease("ann"):
        assert MICRO_TIME.fullmatch(lease_of(api)["spec"]["acquireTime"])


def test_other_fields_of_the_objects_survive_our_writes(api: FakeKubeApiServer) -> None:
    store = kube_store(api)
    store.save(a_status(1))
    store.push_command(Command(id="1", kind="pause"))
    name = "aml-rollout-r-status"

    def annotate(obj: dict[str, Any]) -> None:
        obj["metadata"]["annotations"]["team"] = "ml-platform"
        obj["data"]["notes.txt"] = "kept"

    api.before_next_write("configmaps", name, annotate)
    store.push_command(Command(id="2", kind="resume"))  # a write elsewhere changes nothing here
    api.before_next_write("configmaps", "aml-rollout-r-commands", annotate)
    store.push_command(Command(id="3", kind="abort"))
    cm = commands_configmap(api)
    assert cm["metadata"]["annotations"]["team"] == "ml-platform"
    assert cm["data"]["notes.txt"] == "kept"
    assert [c.id for c in store.commands()] == ["1", "2", "3"]


# --------------------------------------------------------------------------------- commands


def test_a_push_that_meets_a_concurrent_append_appends_after_it(api: FakeKubeApiServer) -> None:
    store = kube_store(api)
    store.push_command(Command(id="1", kind="pause"))
    other = o.command_line(Command(id="theirs", kind="resume", by="bob"))

    def another_cli_appends(obj: dict[str, Any]) -> None:
        obj["data"][o.COMMANDS_KEY] += other

    api.before_next_write("configmaps", "aml-rollout-r-commands", another_cli_appends)
    store.push_command(Command(id="mine", kind="abort", by="ann"))
    assert [c.id for c in store.commands()] == ["1", "theirs", "mine"]
    patches = [r for r in api.requests if r.verb == "patch" and r.resource == "configmaps"]
    assert [r.status for r in patches] == [409, 200]


def test_endless_conflicts_are_a_state_error_not_a_lost_command(api: FakeKubeApiServer) -> None:
    store = kube_store(api, max_conflict_retries=3, sleep=lambda _s: None)
    store.push_command(Command(id="1", kind="pause"))
    original = store._patch_configmap

    def always_beaten(name: str, patch: dict[str, Any]) -> dict[str, Any]:
        api.before_next_write("configmaps", name, lambda obj: obj["metadata"].update(x="y"))
        return original(name, patch)

    store._patch_configmap = always_beaten  # type: ignore[method-assign]
    with pytest.raises(StateError, match="still conflicting after 3 attempts"):
        store.push_command(Command(id="2", kind="abort"))
    assert [c.id for c in kube_store(api).commands()] == ["1"]


def test_a_full_command_log_refuses_the_push_and_keeps_the_log(api: FakeKubeApiServer) -> None:
    store = kube_store(api)
    store.push_command(Command(id="1", kind="pause"))
    cm = commands_configmap(api)
    room = o.CONFIGMAP_MAX_BYTES - o.size_with(cm, o.COMMANDS_KEY, cm["data"][o.COMMANDS_KEY])
    filler = '{"note":"x"}\n' * ((room - 20) // 13)  # 20 bytes left: no command fits
    cm["data"][o.COMMANDS_KEY] = filler + cm["data"][o.COMMANDS_KEY]
    api.seed(cm, "configmaps")
    with pytest.raises(StateError) as refused:
        store.push_command(Command(id="2", kind="abort", by="ann"))
    message = str(refused.value)
    assert "command log of rollout 'r' is full" in message and "nothing was written" in message
    assert "kubectl -n ml delete configmap aml-rollout-r-commands" in message
    log = store.commands()
    assert [c.id for c in log if c is not None] == ["1"]  # the filler lines are no commands
    assert len(log) == filler.count("\n") + 1  # but they keep their positions


def test_the_fake_refuses_an_oversized_configmap_as_the_api_server_does(
    api: FakeKubeApiServer,
) -> None:
    # The store's own check keeps it from ever sending one; the server would say this.
    store = kube_store(api)
    store.push_command(Command(id="1", kind="pause"))
    body = {"data": {o.COMMANDS_KEY: "x" * o.CONFIGMAP_MAX_BYTES}}
    with pytest.raises(StateError, match=r"HTTP 422 .*Too long: must have at most 1048576 bytes"):
        store._json(
            "write",
            lambda: store._core.patch_namespaced_config_map(
                "aml-rollout-r-commands",
                NAMESPACE,
                body,
                _content_type="application/merge-patch+json",
                _preload_content=False,
            ),
        )


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        # A patch its content type cannot hold (a list as merge patch): the real API server
        # answers 400, not a dropped connection the client reports as an unreachable server.
        pytest.param("application/merge-patch+json", [{"op": "add"}], 400, id="merge-patch-list"),
        pytest.param(
            "application/json-patch+json", [{"op": "replace", "path": "/data/a", "value": "2"}],
            200, id="json-patch-list",
        ),
        # The client (kubernetes 37) sends a dict on a typed API as strategic merge patch,
        # by default and even when told JSON Patch; the fake refuses it rather than
        # approximate it (merge patch would differ on lists: containers, env).
        pytest.param(None, {"data": {"a": "2"}}, 415, id="client-default-for-a-dict"),
        pytest.param(
            "application/json-patch+json", {"data": {"a": "2"}}, 415,
            id="a-dict-told-json-patch-goes-as-strategic",
        ),
    ],
)  # fmt: skip
def test_the_fake_answers_a_malformed_patch_as_the_api_server_does(
    api: FakeKubeApiServer, content_type: str | None, body: Any, status: int
) -> None:
    store = kube_store(api)
    store.push_command(Command(id="1", kind="pause"))
    api.seed(o.configmap(store.objects, "cm", {"a": "1"}), "configmaps")
    kwargs = {} if content_type is None else {"_content_type": content_type}
    try:
        store._core.patch_namespaced_config_map("cm", NAMESPACE, body, **kwargs)
        answered = 200
    except k8s_exceptions.ApiException as exc:
        answered = exc.status
    assert answered == status


# ----------------------------------------------------------------------- two nodes, one lease


def test_a_live_lease_is_refused_at_once_naming_its_holder(api: FakeKubeApiServer) -> None:
    first, second = kube_store(api, ttl=30), kube_store(api, ttl=30)
    with first.lease("ann's controller"):
        started = time.monotonic()
        with pytest.raises(LeaseHeldError) as refused:
            second.lease("bob's controller").__enter__()
        assert time.monotonic() - started < 1
    message = str(refused.value)
    assert re.search(r"\(ann's controller pid \d+ on \S+ since \d{4}-\d\d-\d\dT[\d:]+Z\)", message)
    assert "aml-rollout rollout pause|resume|promote|abort" in message
    assert "Lease ml/aml-rollout-r" in message and "expires 30 s after its last renewal" in message


def test_an_expired_lease_is_taken_over_and_the_stale_controller_fenced(
    api: FakeKubeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    stale = kube_store(api, ttl=30)
    later = successor(api)  # to it, stale's lease ran out
    with stale.lease("ann's controller"):
        stale.save(a_status(1))
        with caplog.at_level(logging.WARNING), later.lease("bob's controller"):
            assert "took over the expired lease of ann's controller" in caplog.text
            assert lease_of(api)["spec"]["leaseTransitions"] == 1
            resumed = later.load()
            assert resumed is not None and resumed.tick == 1
            # The stale controller wakes up: it may neither persist a decision nor read one.
            with pytest.raises(StateError, match="lost rollout 'r' to another controller"):
                stale.save(a_status(2))
            later.save(a_status(2))
            with pytest.raises(StateError, match="lost rollout 'r' to another controller"):
                stale.load()
    loaded = kube_store(api).load()
    assert loaded is not None and loaded.tick == 2
    assert "holderIdentity" not in lease_of(api)["spec"]  # the stale one did not clear bob's
    clears = [r for r in api.requests if r.resource == "leases" and r.status == 409]
    assert clears  # stale's release met bob's lease and left it alone


def test_a_stale_controller_is_fenced_even_before_the_new_one_saves(
    api: FakeKubeApiServer,
) -> None:
    stale = kube_store(api, ttl=30)
    later = successor(api)
    with stale.lease("ann"):
        stale.save(a_status(1))
        with later.lease("bob"):  # takes the lease and claims the status: nothing else yet
            with pytest.raises(StateError, match="lost rollout"):
                stale.save(a_status(2))
            loaded = later.load()
            assert loaded is not None and loaded.tick == 1


@pytest.mark.parametrize(
    ("frozen_s", "said"),
    [
        # A GC pause, a SIGSTOP: its own monotonic clock saw the time go (its lease lapsed:
        # the renewal that would take it back meets bob's take).
        pytest.param(
            61.0, r"Lease ml/aml-rollout-r was taken over by bob pid", id="it-saw-the-time-go"
        ),
        # A suspended VM: CLOCK_MONOTONIC does not count the suspension. The Lease says it.
        pytest.param(0.0, r"Lease ml/aml-rollout-r was taken over by bob pid", id="it-did-not"),
    ],
)
def test_a_holder_frozen_before_its_claim_does_not_claim_over_its_successor(
    api: FakeKubeApiServer, monkeypatch: pytest.MonkeyPatch, frozen_s: float, said: str
) -> None:
    """Was: ann took the Lease, froze past its expiry, bob took over, claimed and saved; ann
    woke and claimed the status over bob's claim: bob's next save was fenced ("lost rollout")
    while ann had lost the lease too. Both stopped; nobody drove the rollout."""
    frozen = InstantTime()
    ann = kube_store(api, ttl=30, monotonic=frozen.monotonic, sleep=frozen.sleep)
    bob = successor(api)  # to bob, ann's lease ran out while she was frozen
    claim = ann._claim_status
    with contextlib.ExitStack() as bobs:

        def freeze_then_claim(claim_text: str) -> None:
            frozen.now += frozen_s
            bobs.enter_context(bob.lease("bob"))
            bob.save(a_status(5))
            claim(claim_text)

        monkeypatch.setattr(ann, "_claim_status", freeze_then_claim)
        lost = f"lost the lease of rollout 'r': .*{said}"
        with pytest.raises(StateError, match=lost), ann.lease("ann"):
            pytest.fail("ann drives the rollout bob took over")
        bob.save(a_status(6))  # bob's claim stands: it goes on
        assert "bob" in o.claim_of(api.get("configmaps", "aml-rollout-r-status", NAMESPACE))
        assert "bob" in lease_of(api)["spec"]["holderIdentity"]  # ann's release left it alone


def test_the_renewal_notices_a_take_over_and_saves_stop(
    api: FakeKubeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = kube_store(api, ttl=3)  # renews 1 s after taking the lease: bob has it by then
    later = successor(api, ttl=1)
    with caplog.at_level(logging.WARNING), store.lease("ann"), later.lease("bob"):
        eventually(lambda: "lost the lease of rollout 'r'" in caplog.text)
        with pytest.raises(StateError, match=r"lost the lease .* taken over by bob pid"):
            store.save(a_status(2))


def test_every_take_of_the_lease_moves_the_status_version(api: FakeKubeApiServer) -> None:
    # The claim is the fence, and the API server skips a write that changes nothing: a claim
    # must differ from the last one even when the same process takes the lease again.
    store = kube_store(api, ttl=30)
    versions = []
    for _ in range(2):
        with store.lease("ann"):
            versions.append(api.get("configmaps", "aml-rollout-r-status", NAMESPACE))
    assert versions[0]["metadata"]["resourceVersion"] != versions[1]["metadata"]["resourceVersion"]


def test_a_save_after_the_lease_is_lost_is_refused(api: FakeKubeApiServer) -> None:
    store = kube_store(api, ttl=1)
    with store.lease("ann"):
        store.save(a_status(1))
        api.delete("leases", "aml-rollout-r", NAMESPACE, "coordination.k8s.io")
        eventually(lambda: store._held is not None and store._held.lost is not None)
        with pytest.raises(StateError, match=r"lost the lease of rollout 'r': .* was deleted"):
            store.save(a_status(2))


def test_a_lease_not_renewed_for_its_ttl_refuses_saves_once_taken_over(
    api: FakeKubeApiServer,
) -> None:
    # A controller frozen (or cut off) past its ttl must not write when it wakes, even before
    # its renewal thread has run once: its lease lapsed, and the renewal that would take it
    # back meets the successor's take.
    offset = [0.0]
    store = kube_store(api, ttl=30, monotonic=lambda: time.monotonic() + offset[0])
    with store.lease("ann"):
        store.save(a_status(1))
        with successor(api).lease("bob"):
            offset[0] = 21.0  # past the 20 s renew deadline of a 30 s lease
            taken = r"lost the lease of rollout 'r': Lease ml/aml-rollout-r was taken over by bob"
            with pytest.raises(StateError, match=taken):
                store.check_lease()
            with pytest.raises(StateError, match=taken):
                store.save(a_status(2))


def test_renewal_keeps_a_live_lease_alive_past_several_ttls(api: FakeKubeApiServer) -> None:
    store, other = kube_store(api, ttl=1), kube_store(api, ttl=1)
    with store.lease("ann"):
        acquired = lease_of(api)["spec"]["renewTime"]
        for tick in range(1, 7):  # 3 s: three ttls
            time.sleep(0.5)
            store.save(a_status(tick))
        with pytest.raises(LeaseHeldError, match="ann"):
            other.lease("bob").__enter__()
        assert lease_of(api)["spec"]["renewTime"] > acquired
    renewals = [r for r in api.requests if r.resource == "leases" and r.verb == "patch"]
    assert len(renewals) >= 6  # every ttl/3, then the release


def test_controller_is_none_once_the_lease_expired(api: FakeKubeApiServer) -> None:
    store = kube_store(api, ttl=30)
    with store.lease("ann"):
        assert "ann" in (kube_store(api).controller() or "")
        assert kube_store(api, clock=ahead(60)).controller() is None


def test_a_release_that_fails_is_logged_not_raised(
    api: FakeKubeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = kube_store(api, ttl=30)
    with caplog.at_level(logging.WARNING), store.lease("ann"):
        api.cut_off("leases", "patch")  # the release's answer is lost
    assert "could not release Lease ml/aml-rollout-r" in caplog.text
    assert "it expires 30 s after its last renewal" in caplog.text


def test_a_lease_deleted_by_hand_is_released_without_a_warning(
    api: FakeKubeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Was "could not release Lease ... (HTTP 404 ...); it expires 30 s after its last
    renewal": a 404 is a Lease there is nothing left of to release."""
    store = kube_store(api, ttl=30)
    with caplog.at_level(logging.WARNING), store.lease("ann"):
        api.delete("leases", "aml-rollout-r", NAMESPACE, "coordination.k8s.io")
    assert "could not release" not in caplog.text
    assert kube_store(api).controller() is None


def test_a_racing_take_over_that_loses_names_the_winner(api: FakeKubeApiServer) -> None:
    stale = kube_store(api, ttl=30)
    with stale.lease("ann"):
        pass
    # ann released; bob and carol both see a free Lease; carol writes first.
    carol = kube_store(api, ttl=30)

    def carol_wins(obj: dict[str, Any]) -> None:
        obj["spec"].update(
            holderIdentity="carol's controller pid 9 on node-2",
            renewTime=o.micro_time(time.time()),
            acquireTime=o.micro_time(time.time()),
        )

    api.before_next_write("leases", "aml-rollout-r", carol_wins)
    with pytest.raises(LeaseHeldError, match="carol's controller pid 9 on node-2"):
        kube_store(api, ttl=30).lease("bob").__enter__()
    assert carol.controller() == o.describe_holder(lease_of(api))
    assert lease_of(api)["spec"]["holderIdentity"] == "carol's controller pid 9 on node-2"


# ----------------------------------------------------------------------------------- errors


def test_a_missing_namespace_is_named() -> None:
    with FakeKubeApiServer() as bare:
        store = kube_store(bare)
        with pytest.raises(StateError, match=r"namespace 'ml'.* does not exist"):
            store.push_command(Command(id="1", kind="pause"))
        with pytest.raises(StateError, match=r"namespace 'ml'.* does not exist"):
            store.lease("ann").__enter__()


def test_a_command_log_deleted_between_read_and_append_is_started_again(
    api: FakeKubeApiServer,
) -> None:
    """The docs say `kubectl delete configmap aml-rollout-<name>-commands` starts a new log.
    Was: a push racing that delete got a 404 on its append and said the namespace did not
    exist, and the command (an abort, say) was lost."""
    store = kube_store(api)
    store.push_command(Command(id="1", kind="pause"))
    api.before_next_write("configmaps", "aml-rollout-r-commands", lambda _obj: DELETED)
    store.push_command(Command(id="2", kind="abort"))
    assert [c.id for c in store.commands() if c] == ["2"]


@pytest.mark.parametrize(
    ("resource", "name"),
    [
        pytest.param("leases", "aml-rollout-r", id="lease-deleted-before-the-take"),
        pytest.param("configmaps", "aml-rollout-r-status", id="status-deleted-before-the-claim"),
    ],
)
def test_an_object_deleted_between_read_and_write_is_read_again(
    api: FakeKubeApiServer, resource: str, name: str
) -> None:
    """Was: StateError 'the namespace does not exist' (any 404 on a write was taken for one)."""
    previous = kube_store(api)
    with previous.lease("bob"):
        previous.save(a_status(1))
    api.before_next_write(resource, name, lambda _obj: DELETED)
    store = kube_store(api)
    with store.lease("ann"):
        assert "ann" in lease_of(api)["spec"]["holderIdentity"]
        assert o.claim_of(api.get("configmaps", "aml-rollout-r-status", NAMESPACE))


def test_an_unreachable_api_server_is_a_state_error_with_its_url() -> None:
    with FakeKubeApiServer() as gone:
        url = gone.url
    cfg = KubernetesStateConfig(namespace=NAMESPACE, api_url=url)
    store = make_store(cfg, "r")
    with pytest.raises(StateError, match=f"cannot reach the Kubernetes API at {url}") as e:
        store.load()
    assert str(e.value).endswith(f"{url}: Failed to establish a new connection: [Errno 111] "
                                 "Connection refused")  # fmt: skip


@pytest.mark.parametrize(
    ("resource", "verb", "call"),
    [
        pytest.param("configmaps", "get", lambda store: store.load(), id="load"),
        pytest.param("configmaps", "get", lambda store: store.commands(), id="commands"),
        pytest.param("leases", "get", lambda store: store.controller(), id="controller"),
        # (A push whose append broke off, or a take of the Lease, after a read answered, is
        # tried again and finds its write: test_an_append_whose_answer_broke_off_after_it_
        # landed_is_not_made_twice, test_a_lease_take_whose_answer_broke_off_after_it_landed_
        # is_ours. Here every answer breaks off: tried again, in no real time, then said.)
        pytest.param("leases", "get", lambda store: store.lease("bob").__enter__(), id="lease"),
    ],
)
def test_an_answer_broken_off_mid_body_is_a_state_error(
    api: FakeKubeApiServer, resource: str, verb: str, call: Callable[[KubernetesStateStore], object]
) -> None:
    """Was: urllib3's ProtocolError, a traceback (`rollout status` exit 1): a body read
    lazily (`_preload_content=False`) was read outside the try that maps urllib3's errors."""
    previous = kube_store(api)
    previous.push_command(Command(id="1", kind="pause"))
    with previous.lease("ann"):
        previous.save(a_status(1))
    api.cut_off(resource, verb)
    instant = InstantTime()
    with pytest.raises(StateError) as broken:
        call(kube_store(api, monotonic=instant.monotonic, sleep=instant.sleep))
    assert f"the answer of the Kubernetes API at {api.url} broke off: " in str(broken.value)
    assert "IncompleteRead(" in str(broken.value)


@pytest.mark.parametrize(
    ("body", "said"),
    [
        pytest.param(b"<html>502 Bad Gateway</html>", "text/html, 28 bytes: '<html>502 Bad",
                     id="a-proxy-s-page"),
        pytest.param(b'["a list"]', "application/json, 10 bytes: '[\"a list\"]'",
                     id="json-but-no-object"),
    ],
)  # fmt: skip
def test_an_answer_with_no_json_object_is_a_state_error_saying_what_came(
    api: FakeKubeApiServer, body: bytes, said: str
) -> None:
    """Was "the API server answered something not JSON", whatever came (even JSON that is no
    object): the status, the Content-Type and the start of the body, which `kubeapi.NotJson`
    gives and the router passes on, were dropped."""
    store = kube_store(api)
    store.push_command(Command(id="1", kind="pause"))
    content_type = "application/json" if body.startswith(b"[") else "text/html"
    api.answer_raw_next("configmaps", "get", body, content_type=content_type)
    with pytest.raises(StateError) as caught:
        store.commands()
    message = str(caught.value)
    assert "HTTP 200 with no JSON (" + said in message
    assert message.endswith(f"[{api.url}]")


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda store: store.load(), id="status"),
        pytest.param(lambda store: store.commands(), id="commands"),
        pytest.param(lambda store: store.controller(), id="controller"),
    ],
)
def test_an_api_url_that_is_no_api_server_is_not_taken_for_a_rollout_not_started(
    call: Callable[[KubernetesStateStore], object],
) -> None:
    """Any HTTP server that is not an API server answers `404 page not found` for every path:
    read as a missing ConfigMap, `status` said "not started" and steering refused so."""
    with Answering(404, b"404 page not found\n", "text/plain") as url:
        store = make_store(KubernetesStateConfig(namespace=NAMESPACE, api_url=url), "r")
        with pytest.raises(StateError) as refused:
            call(store)
    assert f"the API server at {url} does not serve this resource type (HTTP 404 naming no " \
        "object); is it a Kubernetes API server? (check state.api_url or the kubeconfig)" \
        in str(refused.value)  # fmt: skip


def _edited_status(**fields: Any) -> str:
    return json.dumps({**status().to_dict(), **fields})


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("{not json", id="not-json"),
        pytest.param(_edited_status(commands=["pause"]), id="a-command-that-is-not-an-object"),
        pytest.param(_edited_status(commands="pause"), id="commands-not-a-list"),
    ],
)
def test_an_unreadable_status_is_a_state_error(api: FakeKubeApiServer, text: str) -> None:
    api.seed(
        {"metadata": {"name": "aml-rollout-r-status", "namespace": NAMESPACE},
         "data": {o.STATUS_KEY: text}},
        "configmaps",
    )  # fmt: skip
    with pytest.raises(
        StateError, match=r"ConfigMap ml/aml-rollout-r-status .* not a rollout"
    ) as e:
        kube_store(api).load()
    # The way on, which `run --restart` is not (it reads the status first), as the hint says it.
    saved = "aml-rollout-r-status.broken.yaml"
    assert (
        "move it aside (`kubectl -n ml get configmap aml-rollout-r-status -o yaml > "
        f"{saved} && kubectl -n ml delete configmap aml-rollout-r-status`): `aml-rollout rollout "
        "run` then starts a new rollout"
    ) in str(e.value)
    api.delete("configmaps", "aml-rollout-r-status", NAMESPACE)
    store = kube_store(api)
    with store.lease("ann"):
        assert store.load() is None  # a new rollout


@pytest.mark.parametrize(
    ("namespace_", "name", "field"),
    [
        pytest.param("ML", "r", "state.namespace", id="namespace-upper-case"),
        pytest.param("ml", "a_b", "name", id="underscore"),
        pytest.param("ml", "x" * 233, "name", id="too-long"),
        pytest.param("ml", "x" * 201, "name", id="longer-than-any-rollout-name"),
    ],
)
def test_names_the_api_server_would_refuse_are_config_errors(
    namespace_: str, name: str, field: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{field}: "):
        StateObjects(namespace_, name)


def test_built_from_a_spec_through_the_factory(api: FakeKubeApiServer) -> None:
    cfg = KubernetesStateConfig(namespace=NAMESPACE, api_url=api.url, lease_ttl_s=9)
    store = make_store(cfg, "r")
    assert isinstance(store, KubernetesStateStore) and store.lease_ttl_s == 9
    store.push_command(Command(id="1", kind="pause"))
    assert [c.id for c in kube_store(api).commands()] == ["1"]


def test_status_and_steering_name_the_configmap_they_found_missing(
    api: FakeKubeApiServer, tmp_path: Path
) -> None:
    """A laptop whose spec has another state.namespace (or whose kubeconfig context is another
    cluster) than the controller's read only "not started (no status found)"."""
    from typer.testing import CliRunner

    from rollout.cli import app

    spec = tmp_path / "rollout.yaml"
    spec.write_text(json.dumps({
        "name": "diabetes",
        "router": {"kind": "memory"},
        "state": {"kind": "kubernetes", "namespace": "ml-dev", "api_url": api.url},
    }))  # fmt: skip
    missing = "no ConfigMap ml-dev/aml-rollout-diabetes-status: another state.namespace"
    status = CliRunner().invoke(app, ["rollout", "status", str(spec)])
    assert "not started" in status.output
    assert missing in " ".join(status.output.split())
    pause = CliRunner().invoke(app, ["rollout", "pause", str(spec)])
    assert pause.exit_code == 2 and missing in pause.output


def test_status_and_steering_tell_a_status_configmap_with_no_status_yet_from_none(
    api: FakeKubeApiServer, tmp_path: Path
) -> None:
    """Every lease take creates the status ConfigMap, empty (a bootstrap, a controller stopped
    before its first save): that was "no ConfigMap ...: another state.namespace?"."""
    from typer.testing import CliRunner

    from rollout.cli import app

    spec = tmp_path / "rollout.yaml"
    spec.write_text(json.dumps({
        "name": "r",
        "router": {"kind": "memory"},
        "state": {"kind": "kubernetes", "namespace": NAMESPACE, "api_url": api.url},
    }))  # fmt: skip
    with kube_store(api).lease("ann"):
        pass
    assert api.exists("configmaps", "aml-rollout-r-status", NAMESPACE)
    empty = f"ConfigMap {NAMESPACE}/aml-rollout-r-status holds no status yet: a lease was taken"
    status = CliRunner().invoke(app, ["rollout", "status", str(spec)])
    said = " ".join(status.output.split())
    assert "not started" in said and empty in said and "no ConfigMap" not in said, said
    pause = CliRunner().invoke(app, ["rollout", "pause", str(spec)])
    assert pause.exit_code == 2 and empty in " ".join(pause.output.split()), pause.output


def test_the_store_uses_exactly_the_verbs_of_its_role_rules(api: FakeKubeApiServer) -> None:
    exercise(api)
    granted = {(g, r, v) for g, r, verbs in o.ROLE_RULES for v in verbs}
    assert api.verbs_used() == granted


def test_a_clock_running_ahead_cannot_take_a_live_lease(api: FakeKubeApiServer) -> None:
    """To a laptop whose clock is two minutes ahead the pod's lease looks expired: it watches
    the Lease for a ttl, sees it renewed, and is refused; the pod keeps driving."""
    pod = kube_store(api, ttl=1)  # renews every 1/3 s
    laptop = kube_store(api, ttl=1, clock=ahead(120))
    with pod.lease("pod"):
        pod.save(a_status(1))
        with pytest.raises(LeaseHeldError, match="pod pid"):
            laptop.lease("laptop").__enter__()
        pod.save(a_status(2))  # still the holder
    assert lease_of(api)["spec"].get("leaseTransitions", 0) == 0


def test_an_expired_lease_is_watched_a_ttl_before_it_is_taken(
    api: FakeKubeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    stale = kube_store(api, ttl=30)
    instant = InstantTime()
    now = 1_900_000_000.0  # 2030-03-17T17:46:40Z
    later = kube_store(
        api, ttl=30, clock=lambda: now, monotonic=instant.monotonic, sleep=instant.sleep
    )
    with stale.lease("ann"), caplog.at_level(logging.WARNING), later.lease("bob"):
        assert instant.now >= 30  # a whole ttl with no renewal seen, then the take-over
        assert "bob" in (later.controller() or "")
    # Said at WARNING, which `run` shows: it was INFO, and `run` sat silent for the whole
    # watch (up to lease_ttl_s, an hour), like a hang.
    watching = [r for r in caplog.records if "looks expired" in r.getMessage()]
    assert watching and watching[0].levelno == logging.WARNING
    assert re.search(
        r"Lease ml/aml-rollout-r of ann pid \d+ on \S+ since [\dT:Z-]+ looks expired; watching "
        r"it 30 s for a renewal, taking it over at 17:47:10Z if none comes",
        watching[0].getMessage(),
    )


def test_the_watch_lasts_the_lease_s_own_duration_when_it_is_longer(
    api: FakeKubeApiServer,
) -> None:
    """A holder with a 60 s ttl renews every 20 s. A newcomer with a 15 s ttl (a spec changed
    since) whose clock runs ahead sees the Lease expired; watching it only its own 15 s, it
    could miss the next renewal and take a live lease. It watches the Lease's own duration."""
    holder = kube_store(api, ttl=60)
    instant = InstantTime()

    def sleep_through_a_renewal(seconds: float) -> None:
        before = instant.now
        instant.sleep(seconds)
        if before < 20 <= instant.now:  # the holder's renewal, 20 s into the watch
            lease = lease_of(api)
            lease["spec"]["renewTime"] = o.micro_time(time.time())
            api.seed(lease, "leases", "coordination.k8s.io")

    newcomer = kube_store(
        api, ttl=15, clock=ahead(120), monotonic=instant.monotonic, sleep=sleep_through_a_renewal
    )
    with holder.lease("ann"):
        with pytest.raises(LeaseHeldError, match="ann pid"):
            newcomer.lease("bob").__enter__()
        holder.save(a_status(1))  # still the holder
    assert lease_of(api)["spec"].get("leaseTransitions", 0) == 0


def test_an_edit_of_the_status_configmap_by_someone_else_does_not_stop_the_holder(
    api: FakeKubeApiServer,
) -> None:
    """A `kubectl label`, or a GitOps tool stamping its metadata, moves the resourceVersion
    without touching the claim or the status: not another controller, no reason to stop."""
    store = kube_store(api, ttl=30)
    with store.lease("ann"):
        store.save(a_status(1))
        cm = api.get("configmaps", "aml-rollout-r-status", NAMESPACE)
        cm["metadata"].setdefault("labels", {})["team"] = "ml"
        api.seed(cm, "configmaps")
        store.save(a_status(2))
        loaded = store.load()
        assert loaded is not None and loaded.tick == 2
        assert (
            api.get("configmaps", "aml-rollout-r-status", NAMESPACE)["metadata"]["labels"]["team"]
            == "ml"
        )


def test_a_log_line_this_version_cannot_read_keeps_its_position(
    api: FakeKubeApiServer,
) -> None:
    store = kube_store(api)
    store.push_command(Command(id="1", kind="pause"))
    cm = commands_configmap(api)
    cm["data"][o.COMMANDS_KEY] += '{"id":"2","kind":"rewind"}\nnot json\n'  # newer, by hand
    api.seed(cm, "configmaps")
    store.push_command(Command(id="3", kind="abort"))
    assert [c and c.id for c in store.commands()] == ["1", None, None, "3"]


@pytest.mark.parametrize(
    "line",
    [
        pytest.param('{"id":["x"],"kind":"abort"}', id="list-id"),
        pytest.param('{"id":{"a":1},"kind":"pause"}', id="object-id"),
        pytest.param('{"kind":"pause"}', id="no-id"),
        pytest.param('{"id":"w","kind":"set_weight","weight":"25"}', id="string-weight"),
        pytest.param('{"id":"w","kind":"set_weight","weight":true}', id="bool-weight"),
        pytest.param('{"id":"t","kind":"pause","at":"yesterday"}', id="string-time"),
        pytest.param('{"id":"b","kind":"pause","by":["ann"]}', id="list-author"),
    ],
)
def test_a_hand_edited_line_with_fields_of_the_wrong_type_is_unreadable_not_a_crash(
    api: FakeKubeApiServer, line: str
) -> None:
    """`kubectl edit` can put anything in the log; the controller puts command ids in sets."""
    store = kube_store(api)
    store.push_command(Command(id="1", kind="pause"))
    cm = commands_configmap(api)
    cm["data"][o.COMMANDS_KEY] += line + "\n"
    api.seed(cm, "configmaps")
    store.push_command(Command(id="3", kind="abort"))
    read = store.commands()
    assert [c and c.id for c in read] == ["1", None, "3"]
    fresh = replace(status(), commands_read=0, commands_tail=())
    assert [c.id for c in with_commands(fresh, read).commands] == ["1", "3"]


def test_a_later_tenure_of_the_same_holder_string_is_not_taken_for_ours(
    api: FakeKubeApiServer,
) -> None:
    """Same owner, pid and host (host networking, two controllers in one process): the Lease's
    acquireTime tells the tenures apart, so the stale one still notices the takeover."""
    stale = kube_store(api, ttl=3)  # renews 1 s after taking the lease
    later = successor(api)
    with stale.lease("ctl"):
        stale.save(a_status(1))
        with later.lease("ctl"):
            eventually(lambda: stale._held is not None and stale._held.lost is not None)
            with pytest.raises(StateError, match="taken over by ctl"):
                stale.save(a_status(2))
            later.save(a_status(2))


def test_a_slow_api_server_does_not_cost_the_lease(api: FakeKubeApiServer) -> None:
    """Renewals run every ttl/3 from when the last one was sent: round trips of 0.6 s (within
    their 1 s timeout, ttl 3 s) do not add up past the 2 s renew deadline."""
    store = kube_store(api, ttl=3)
    with store.lease("ann"):
        api.delay("leases", "patch", 0.6)
        deadline = time.monotonic() + 4.5
        while time.monotonic() < deadline:
            store.check_lease()  # never lost
            time.sleep(0.05)
        api.delay("leases", "patch", 0)


def test_a_label_on_a_dead_holders_lease_is_no_sign_of_life(api: FakeKubeApiServer) -> None:
    """Only a renewal or a take tells the watcher the holder lives; a metadata edit of the
    Lease meanwhile (a label) does not, and the take-over carries the edited version."""
    dead = kube_store(api, ttl=30)
    instant = InstantTime()
    edits = iter(range(1, 100))

    def sleep_and_label(seconds: float) -> None:
        instant.sleep(seconds)
        lease = lease_of(api)
        lease["metadata"].setdefault("labels", {})["edit"] = str(next(edits))
        api.seed(lease, "leases", "coordination.k8s.io")

    later = kube_store(
        api, ttl=30, clock=ahead(120), monotonic=instant.monotonic, sleep=sleep_and_label
    )
    with dead.lease("ann"), later.lease("bob"):
        assert "bob" in (later.controller() or "")


def _ghost(api: FakeKubeApiServer, renewed_at: float, ttl: int = 30) -> None:
    """A Lease left by a controller that is gone, renewed last at `renewed_at` by its clock."""
    objects = StateObjects(NAMESPACE, "r")
    api.seed(
        o.lease(objects, "ann's controller pid 7 on laptop", ttl, renewed_at), "leases", LEASES
    )


def test_a_dead_holder_whose_clock_ran_ahead_is_watched_and_taken_over(
    api: FakeKubeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Was: its renewTime an hour ahead of this machine's clock, the Lease read as live for
    that hour; every successor refused at once, told it "expires 30 s after its last renewal".
    A renewTime more than a ttl ahead says nothing of life: the Lease is watched for a change
    (client-go judges expiry by when it last saw the record change) and taken over."""
    _ghost(api, time.time() + 3600)
    assert "60.0 min ahead of this machine's clock" in (kube_store(api).controller() or "")
    instant = InstantTime()
    later = kube_store(api, ttl=30, monotonic=instant.monotonic, sleep=instant.sleep)
    with caplog.at_level(logging.WARNING), later.lease("bob"):
        assert instant.now >= 30
        assert "bob" in (later.controller() or "")
    assert (
        ("Lease ml/aml-rollout-r of ann's controller pid 7 on laptop since ") in caplog.text
        and "Z: its renewTime is 60.0 min ahead of this machine's clock; watching it 30 s"
        in caplog.text
    )


def test_a_live_holder_whose_clock_runs_ahead_is_seen_renewing_and_kept(
    api: FakeKubeApiServer,
) -> None:
    laptop = kube_store(api, ttl=1, clock=ahead(3600))  # renews every 1/3 s
    with laptop.lease("laptop"):
        with pytest.raises(LeaseHeldError) as refused:
            kube_store(api, ttl=1).lease("pod").__enter__()
        laptop.save(a_status(1))  # still the holder
    assert "laptop pid" in str(refused.value)
    assert "its renewTime is 60.0 min ahead of this machine's clock" in str(refused.value)


def test_a_dead_holder_within_a_ttl_ahead_is_still_refused_at_once_saying_how_to_force(
    api: FakeKubeApiServer,
) -> None:
    """Clocks a few seconds apart are trusted (a dead holder then blocks for at most 2 ttl);
    the refusal says how to take over at once, which the next test shows is safe."""
    _ghost(api, time.time() + 10)
    with pytest.raises(LeaseHeldError) as refused:
        kube_store(api, ttl=30).lease("bob").__enter__()
    assert (
        "to take over at once, `kubectl -n ml delete lease aml-rollout-r` (a controller still "
        "alive stops at its next renewal)"
    ) in str(refused.value)


def test_a_lease_deleted_to_force_a_take_over_stops_a_live_holder(
    api: FakeKubeApiServer,
) -> None:
    """What the refusal's `kubectl delete lease` does to a holder that was alive after all: the
    next controller takes the Lease at once and claims the status; the old one can save
    nothing more and stops at its next renewal, leaving the new one's Lease alone."""
    ann = kube_store(api, ttl=3)  # renews every second
    with ann.lease("ann"):
        ann.save(a_status(1))
        api.delete("leases", "aml-rollout-r", NAMESPACE, LEASES)
        bob = kube_store(api, ttl=30)
        with bob.lease("bob"):
            with pytest.raises(StateError, match="lost"):
                ann.save(a_status(2))  # fenced by bob's claim even before its renewal
            eventually(lambda: ann._held is not None and ann._held.lost is not None)
            with pytest.raises(StateError, match="lost the lease of rollout 'r'"):
                ann.check_lease()
            loaded = bob.load()
            assert loaded is not None and loaded.tick == 1
            bob.save(a_status(2))
    assert "holderIdentity" not in lease_of(api)["spec"]  # bob's release, not ann's


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="Linux only")
def test_a_holder_resumed_from_suspend_sees_its_lease_gone_at_once(
    api: FakeKubeApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CLOCK_MONOTONIC does not count a suspended VM's sleep: resumed an hour later, the
    holder's own check passed until its renewal thread next ran and met the take-over, and it
    could apply its pending router actions meanwhile. The lease's clock counts the suspension."""
    store = kube_store(api, ttl=30)
    with store.lease("ann"):
        store.save(a_status(1))
        gettime = time.clock_gettime

        def an_hour_suspended(clock: int) -> float:
            return gettime(clock) + (3600 if clock == time.CLOCK_BOOTTIME else 0)

        with successor(api).lease("bob"):  # the hour was bob's: he took over
            monkeypatch.setattr(time, "clock_gettime", an_hour_suspended)
            with pytest.raises(StateError, match="taken over by bob"):
                store.check_lease()


# ------------------------------------------------------------- an API server that blips


def status_of(api: FakeKubeApiServer) -> dict[str, Any]:
    return api.get("configmaps", "aml-rollout-r-status", NAMESPACE)


def lease_refusals(api: FakeKubeApiServer) -> int:
    """The Lease requests the API server answered 503 (`fail_next`)."""
    return sum(1 for r in api.requests if r.resource == "leases" and r.status == 503)


def stored_tick(api: FakeKubeApiServer) -> int:
    return int(json.loads(status_of(api)["data"]["status.json"])["tick"])


@pytest.mark.parametrize(
    ("code", "headers", "pauses"),
    [
        pytest.param(500, None, [1.0], id="etcd-500"),
        pytest.param(503, None, [1.0], id="restarting-503"),
        pytest.param(429, {"Retry-After": "3"}, [3.0], id="429-retry-after-honoured"),
        pytest.param(429, {"Retry-After": "3600"}, [30.0], id="429-retry-after-capped"),
    ],
)
def test_a_save_that_meets_a_blip_is_tried_again(
    api: FakeKubeApiServer, code: int, headers: dict[str, str] | None, pauses: list[float]
) -> None:
    """Was: StateError at the first 5xx or 429, and the controller, which saves a rollback
    before it applies it, stopped with the rollback decided but not applied."""
    instant = Recorded()
    store = kube_store(api, ttl=30, monotonic=instant.monotonic, sleep=instant.sleep)
    with store.lease("ann"):
        store.save(a_status(1))
        api.fail_next("configmaps", "patch", code, name="aml-rollout-r-status", headers=headers)
        store.save(a_status(2))
        assert stored_tick(api) == 2
        assert instant.slept == pauses
        store.save(a_status(3))  # its resourceVersion is the server's: no 409
    assert stored_tick(api) == 3


def test_a_save_whose_answer_was_lost_but_landed_is_done(api: FakeKubeApiServer) -> None:
    """The first try's write was made, its answer broken off; the second, carrying the old
    resourceVersion, is refused (409) and finds its own status under its own claim. Was a
    StateError; and, retried, "lost rollout 'r' to another controller"."""
    instant = InstantTime()

    def sleep(seconds: float) -> None:
        api.cut_off("configmaps", "patch", False)
        instant.sleep(seconds)

    store = kube_store(api, ttl=30, monotonic=instant.monotonic, sleep=sleep)
    with store.lease("ann"):
        store.save(a_status(1))
        api.cut_off("configmaps", "patch")
        store.save(a_status(2))
        patches = [
            r.status for r in api.requests if r.resource == "configmaps" and r.verb == "patch"
        ]
        assert patches[-2:] == [200, 409]
        store.save(a_status(3))
    assert stored_tick(api) == 3


def test_a_save_the_api_server_never_answers_gives_up_after_the_rollback_retry(
    api: FakeKubeApiServer,
) -> None:
    """The pauses double up to 30 s, for 10 minutes (the controller's ROLLBACK_RETRY_S), the
    lease renewed meanwhile."""
    from rollout.controller import ROLLBACK_RETRY_S
    from rollout.state.kubernetes import OUTAGE_S

    assert OUTAGE_S == ROLLBACK_RETRY_S
    instant = Recorded()
    store = kube_store(api, ttl=30, monotonic=instant.monotonic, sleep=instant.sleep)
    with store.lease("ann"):
        store.save(a_status(1))
        api.fail_next("configmaps", "patch", 503, 10_000)
        with pytest.raises(StateError, match=r"still failing after 10\.0 min: .*HTTP 503"):
            store.save(a_status(2))
        assert instant.slept[:7] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
        assert instant.slept[-1] == 29.0  # cut short: the last try at 10 min, not 9.5
        assert sum(instant.slept) == 600
        store.check_lease()  # renewed all along: only the status could not be written
    assert stored_tick(api) == 1


def test_a_lapsed_lease_nobody_took_is_renewed_and_the_holder_goes_on(
    api: FakeKubeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    """No renewal went through for two thirds of the ttl (an API server restarting): the
    holder does nothing until a renewal guarded by the Lease's resourceVersion goes through,
    which proves nobody took the Lease over. Was: StateError, the controller stopped."""
    offset = [0.0]
    store = kube_store(api, ttl=30, monotonic=lambda: time.monotonic() + offset[0])
    with caplog.at_level(logging.WARNING), store.lease("ann"):
        store.save(a_status(1))
        renewed = lease_of(api)["spec"]["renewTime"]
        offset[0] = 21.0
        store.check_lease()
        assert lease_of(api)["spec"]["renewTime"] > renewed
        store.save(a_status(2))
    assert "renewed the lease of rollout 'r' again" in caplog.text
    assert stored_tick(api) == 2


@pytest.mark.parametrize(
    ("failures", "lost"),
    [
        pytest.param(5, None, id="api-back-within-the-outage"),
        pytest.param(
            10_000,
            r"no renewal went through for 10\.3 min, 10\.0 min past its renew deadline",
            id="api-down-for-good",
        ),
    ],
)
def test_a_lapsed_lease_is_renewed_once_the_api_server_answers_again(
    api: FakeKubeApiServer, failures: int, lost: str | None
) -> None:
    instant = InstantTime()
    store = kube_store(api, ttl=30, monotonic=instant.monotonic, sleep=instant.sleep)
    with store.lease("ann"):
        api.fail_next("leases", "patch", 503, failures)
        instant.now += 21.0  # past the renew deadline
        if lost is None:
            store.check_lease()
            assert lease_refusals(api) == failures
        else:
            with pytest.raises(StateError, match=lost):
                store.check_lease()
            assert instant.now > 20 + 600  # the renew deadline, then OUTAGE_S
        api.fail_next("leases", "patch", 503, 0)


class ClosesIdleConnections(BaseHTTPRequestHandler):
    """The fake kube-apiserver behind a front that answers one request per connection and
    closes it, unanswered, when a second comes: a pooled connection the API server closed as
    the request went out (kube-apiserver closes idle ones)."""

    api: FakeKubeApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.served = getattr(self, "served", 0) + 1
        if self.served > 1:
            self.close_connection = True
            return
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        try:
            code, payload = self.api.handle(
                self.command, self.path.split("?")[0], body, content_type
            )
        except ApiError as exc:
            code, payload = exc.code, {"kind": "Status", "code": exc.code, "details": exc.details}
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = _serve


def test_a_write_on_a_pooled_connection_the_server_closed_is_sent_again(
    api: FakeKubeApiServer,
) -> None:
    """Was: "cannot reach the Kubernetes API" (urllib3 retries no PATCH after a read error
    unless told to: `kubeapi.Retries`), though it had answered the read a moment before."""
    handler = type("Front", (ClosesIdleConnections,), {"api": api})
    front = LocalServer(handler)
    front.start()
    try:
        cli = make_store(KubernetesStateConfig(namespace=NAMESPACE, api_url=front.url), "r")
        cli.push_command(Command(id="1", kind="pause"))  # creates the log (a first connection)
        cli.push_command(Command(id="2", kind="resume"))  # its read, then its patch, on one
    finally:
        front.stop()
    assert [c.id for c in kube_store(api).commands() if c] == ["1", "2"]


def answered_409_after_landing(store: KubernetesStateStore, method: str) -> None:
    """Make `store`'s next `method` write land, then answer 409: what a write whose answer was
    lost, sent again by the client, meets."""
    write = getattr(store, method)

    def landed_then_refused(*args: Any) -> Any:
        setattr(store, method, write)  # once
        write(*args)
        raise _Conflict("HTTP 409 the object has been modified")

    setattr(store, method, landed_then_refused)


@pytest.mark.parametrize(
    ("released_before", "method"),
    [
        pytest.param(False, "_create_lease", id="create"),
        pytest.param(True, "_patch_lease", id="take"),
    ],
)
def test_a_lease_take_that_landed_before_its_409_is_ours(
    api: FakeKubeApiServer, released_before: bool, method: str
) -> None:
    """Was: LeaseHeldError naming this very controller as the one driving the rollout."""
    if released_before:
        with kube_store(api, ttl=30).lease("ann"):
            pass
    store = kube_store(api, ttl=30)
    answered_409_after_landing(store, method)
    with store.lease("bob"):
        store.save(a_status(1))
        assert "bob" in lease_of(api)["spec"]["holderIdentity"]


def test_a_command_whose_append_landed_before_its_409_is_not_appended_twice(
    api: FakeKubeApiServer,
) -> None:
    cli = kube_store(api)
    cli.push_command(Command(id="1", kind="pause"))
    answered_409_after_landing(cli, "_patch_configmap")
    cli.push_command(Command(id="2", kind="resume"))
    assert [c.id for c in cli.commands() if c] == ["1", "2"]  # was 1, 2, 2


def renewing(store: KubernetesStateStore, instant: InstantTime, until: Callable[[], bool]) -> None:
    """Run the renewal thread's tries on `instant`'s clock (the real thread waits on real
    time) until `until()`, the lease is lost, or a try goes through after `until()`."""
    held = store._held
    assert held is not None
    while held.lost is None:
        done = until()
        with held.lock:
            instant.now += store._renew_once(held)
        if done:
            return


@pytest.mark.parametrize(
    ("ttl", "failures"),
    [
        # Renewed every 1200 s: the first failure came after the 600 s, counted from the last
        # renewal, not from the renew deadline (2400 s), and lost a lease valid another hour.
        pytest.param(3600, 1, id="one-blip-of-the-longest-lease"),
        # Renewed every 400 s, its renew deadline 800 s: given up at 600 s, before it.
        pytest.param(1200, 250, id="lost-before-its-own-renew-deadline"),
        pytest.param(30, 5, id="a-short-lease"),
    ],
)
def test_failed_renewals_before_the_outage_limit_do_not_lose_the_lease(
    api: FakeKubeApiServer, ttl: int, failures: int
) -> None:
    """Was: "lost the lease of rollout 'r': it could not be renewed for 10.0 min" after one
    503 of a lease_ttl_s 3600. OUTAGE_S now counts from the renew deadline: the holder acts
    no more from the deadline on (`check_lease`), so waiting longer lets no two act."""
    instant = InstantTime()
    store = kube_store(api, ttl=ttl, monotonic=instant.monotonic, sleep=instant.sleep)
    with store.lease("ann"):
        store.save(a_status(1))
        api.fail_next("leases", "patch", 503, failures)
        renewed = lease_of(api)["spec"]["renewTime"]
        instant.now = ttl / 3  # the renewal thread's time to renew
        renewing(store, instant, lambda: lease_refusals(api) == failures)
        assert lease_of(api)["spec"]["renewTime"] > renewed
        store.check_lease()
        store.save(a_status(2))
    assert stored_tick(api) == 2


def test_an_outage_is_told_when_it_starts_lapses_and_ends_not_every_second(
    api: FakeKubeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Was: "could not renew Lease ..." at WARNING on every try, a line a second for up to
    10 minutes on `run`'s terminal."""
    instant = InstantTime()
    store = kube_store(api, ttl=30, monotonic=instant.monotonic, sleep=instant.sleep)
    logger = "rollout.state.kubernetes"
    with caplog.at_level(logging.WARNING, logger), store.lease("ann"):
        api.fail_next("leases", "patch", 503, 100)
        instant.now = 10.0
        renewing(store, instant, lambda: lease_refusals(api) == 100)  # 100 s: past 20 s
        store.check_lease()
    told = [r.getMessage() for r in caplog.records if r.name == logger]
    assert len(told) == 3, told
    assert told[0].startswith("could not renew Lease ml/aml-rollout-r: write Lease")
    assert "was not renewed for 20 s, two thirds of state.lease_ttl_s" in told[1]
    assert told[2].startswith("renewed Lease ml/aml-rollout-r again after 100 failed tries")


# -------------------------------------------- reads, the claim and the CLI's commands in a blip


class Recorded(InstantTime):
    """InstantTime that keeps the pauses it slept."""

    def __init__(self) -> None:
        super().__init__()
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        super().sleep(seconds)


def spec_store(url: str, instant: InstantTime, ttl: int = 30) -> KubernetesStateStore:
    """A store on the client a spec's `state` builds (its urllib3 retries: no Retry-After
    slept inside a request), on `instant`'s clock."""
    from rollout import kubeapi

    cfg = KubernetesStateConfig(namespace=NAMESPACE, api_url=url, lease_ttl_s=ttl)
    return KubernetesStateStore(
        StateObjects(NAMESPACE, "r"),
        kubeapi.api_client(cfg, "state"),
        lease_ttl_s=ttl,
        monotonic=instant.monotonic,
        sleep=instant.sleep,
    )


def _started(api: FakeKubeApiServer) -> None:
    """A rollout under way: its status saved, one command queued."""
    store = kube_store(api, ttl=30)
    with store.lease("earlier controller"):
        store.save(a_status(4))
    store.push_command(Command(id="1", kind="pause"))


STATUS_CM, COMMANDS_CM = "aml-rollout-r-status", "aml-rollout-r-commands"


def _resume(store: KubernetesStateStore) -> object:
    status_read = store.load()
    assert status_read is not None
    return status_read.tick


def _queue(store: KubernetesStateStore) -> object:
    store.push_command(Command(id="2", kind="abort", by="ann"))
    return [c.id for c in store.commands() if c]


def _holder(store: KubernetesStateStore) -> object:
    return store.controller()


def _ids(store: KubernetesStateStore) -> object:
    return [c.id for c in store.commands() if c]


@pytest.mark.parametrize(
    ("held", "call", "resource", "verb", "name", "code", "headers", "result", "pauses"),
    [
        # The controller: `run` reads the queued commands every tick (and every poll of its
        # wait), and the status when it resumes.
        pytest.param(True, _ids, "configmaps", "get", COMMANDS_CM, 503, None, ["1"], [1.0],
                     id="run-tick-reads-the-commands-503"),
        pytest.param(True, _resume, "configmaps", "get", STATUS_CM, 500, None, 4, [1.0, 2.0],
                     id="run-resume-loads-the-status-500"),
        pytest.param(True, _ids, "configmaps", "get", COMMANDS_CM, 429, {"Retry-After": "5"},
                     ["1"], [5.0], id="run-tick-429-retry-after-honoured"),
        # One-shot commands: `status`, `pause`/`abort`.
        pytest.param(False, _resume, "configmaps", "get", STATUS_CM, 503, None, 4, [1.0],
                     id="status-loads-the-status"),
        pytest.param(False, _ids, "configmaps", "get", COMMANDS_CM, 503, None, ["1"], [1.0],
                     id="status-reads-the-commands"),
        pytest.param(False, _holder, "leases", "get", "aml-rollout-r", 503, None, None, [1.0],
                     id="status-reads-the-holder"),
        pytest.param(False, _queue, "configmaps", "get", COMMANDS_CM, 503, None, ["1", "2"],
                     [1.0], id="abort-reads-the-log"),
        pytest.param(False, _queue, "configmaps", "patch", COMMANDS_CM, 503, None, ["1", "2"],
                     [1.0, 2.0, 4.0], id="abort-appends-to-the-log"),
    ],
)  # fmt: skip
def test_a_read_or_a_command_that_meets_a_blip_is_tried_again(
    api: FakeKubeApiServer,
    held: bool,
    call: Callable[[KubernetesStateStore], object],
    resource: str,
    verb: str,
    name: str,
    code: int,
    headers: dict[str, str] | None,
    result: object,
    pauses: list[float],
) -> None:
    """Was: StateError at the first 5xx, 429 or timeout of a read (only a save was tried
    again): `run` exited 2 mid-rollout on one 503 reading the queued commands, blue left at
    its weight with nobody watching; `status`, `pause` and `abort` failed on one blip."""
    _started(api)
    instant = Recorded()
    store = spec_store(api.url, instant)
    with store.lease("ann") if held else contextlib.nullcontext():
        api.fail_next(resource, verb, code, len(pauses), name=name, headers=headers)
        assert call(store) == result
    assert instant.slept == pauses
    failed = [r for r in api.requests if r.status == code]
    assert [(r.verb, r.name) for r in failed] == [(verb, name)] * len(pauses)


def test_a_claim_that_meets_a_blip_is_tried_again(api: FakeKubeApiServer) -> None:
    """Was: `run` exited 2 at its start, the Lease taken, on one 503 claiming the status."""
    _started(api)
    instant = Recorded()
    store = spec_store(api.url, instant)
    api.fail_next("configmaps", "patch", 503, 2, name=STATUS_CM)
    with store.lease("ann"):
        assert _resume(store) == 4
        store.save(a_status(5))
        claim = status_of(api)["metadata"]["annotations"][o.HOLDER_ANNOTATION]
        assert claim.startswith("ann pid ")
    assert instant.slept == [1.0, 2.0]
    assert stored_tick(api) == 5


def test_an_append_whose_answer_broke_off_after_it_landed_is_not_made_twice(
    api: FakeKubeApiServer,
) -> None:
    """The append landed, its answer broken off (no answer: tried again); the next try finds
    the line where it was sent. Was: StateError, the command queued all the same."""
    _started(api)

    class Healed(Recorded):
        def sleep(self, seconds: float) -> None:
            api.cut_off("configmaps", "patch", False)
            super().sleep(seconds)

    instant = Healed()
    cli = spec_store(api.url, instant)
    api.cut_off("configmaps", "patch")
    assert _queue(cli) == ["1", "2"]
    assert instant.slept == [1.0]


@pytest.mark.parametrize(
    ("held", "call", "resource", "verb", "object_named"),
    [
        pytest.param(True, _resume, "configmaps", "get", f"ConfigMap ml/{STATUS_CM}",
                     id="run-load-403"),
        pytest.param(True, _ids, "configmaps", "get", f"ConfigMap ml/{COMMANDS_CM}",
                     id="run-commands-403"),
        pytest.param(False, _queue, "configmaps", "patch", f"ConfigMap ml/{COMMANDS_CM}",
                     id="abort-append-403"),
        pytest.param(False, _holder, "leases", "get", "Lease ml/aml-rollout-r",
                     id="status-holder-403"),
    ],
)  # fmt: skip
def test_a_refusal_is_not_tried_again_and_names_the_object_and_the_verb(
    api: FakeKubeApiServer,
    held: bool,
    call: Callable[[KubernetesStateStore], object],
    resource: str,
    verb: str,
    object_named: str,
) -> None:
    """A 403 (RBAC) is an answer, not a blip: asking again for minutes would only hide it."""
    _started(api)
    instant = Recorded()
    store = spec_store(api.url, instant)
    with store.lease("ann") if held else contextlib.nullcontext():
        api.fail_next(resource, verb, 403, 100)
        with pytest.raises(StateError) as raised:
            call(store)
    said = str(raised.value)
    assert object_named in said and f'cannot {verb} resource "{resource}"' in said, said
    assert "still failing" not in said
    assert instant.slept == []
    assert len([r for r in api.requests if r.status == 403]) == 1


@pytest.mark.parametrize(
    ("held", "after"),
    [
        # A controller holding the lease: as long as a save, the controller's rollback retry.
        pytest.param(True, r"10\.0 min", id="run-waits-out-the-outage"),
        # `status`, `pause`, `abort`: tries at 0, 1, 3, 7, 15, 31 and 60 s (the last pause
        # cut short to end at the minute: was 31 s, the docs said a minute), then a clear error.
        pytest.param(False, "60 s", id="status-gives-up-after-a-minute"),
    ],
)
def test_a_read_the_api_server_never_answers_gives_up_within_its_bound(
    api: FakeKubeApiServer, held: bool, after: str
) -> None:
    from rollout.state.kubernetes import CLI_OUTAGE_S, OUTAGE_S

    _started(api)
    instant = Recorded()
    store = spec_store(api.url, instant)
    with store.lease("ann") if held else contextlib.nullcontext():
        api.fail_next("configmaps", "get", 503, 10_000, name=COMMANDS_CM)
        with pytest.raises(StateError, match=f"still failing after {after}: .*HTTP 503"):
            store.commands()
        api.fail_next("configmaps", "get", 503, 0)
        if held:
            store.check_lease()  # renewed all along: only the ConfigMap could not be read
    bound = OUTAGE_S if held else CLI_OUTAGE_S
    assert sum(instant.slept) == bound
    assert instant.slept[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert instant.slept[-1] == 29.0  # the last pause cut short to end at the bound


@pytest.mark.parametrize(
    ("held", "call", "verb", "name", "told"),
    [
        pytest.param(True, _ids, "get", COMMANDS_CM, "read the command log of rollout 'r'",
                     id="read"),
        pytest.param(True, lambda store: store.save(a_status(5)), "patch", STATUS_CM,
                     "save the status of rollout 'r'", id="save"),
        pytest.param(False, _queue, "patch", COMMANDS_CM, "queue the command for rollout 'r'",
                     id="push"),
    ],
)  # fmt: skip
def test_a_request_s_outage_is_told_when_it_starts_and_ends_not_at_every_try(
    api: FakeKubeApiServer,
    caplog: pytest.LogCaptureFixture,
    held: bool,
    call: Callable[[KubernetesStateStore], object],
    verb: str,
    name: str,
    told: str,
) -> None:
    """Was: a save's every retry at WARNING (reads were not retried at all). (A lease of
    300 s: its lapse, told once too, is another test's.)"""
    _started(api)
    instant = Recorded()
    store = spec_store(api.url, instant, ttl=300)
    logger = "rollout.state.kubernetes"
    holding = store.lease("ann") if held else contextlib.nullcontext()
    with caplog.at_level(logging.WARNING, logger), holding:
        api.fail_next("configmaps", verb, 503, 5, name=name)
        call(store)
    lines = [r.getMessage() for r in caplog.records if r.name == logger]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"could not {told}: ") and "HTTP 503" in lines[0]
    assert lines[1] == f"{told}: went through after 5 failed tries (31 s)"


def test_a_run_whose_command_read_meets_a_503_mid_rollout_goes_on(tmp_path: Path) -> None:
    """The repro: `rollout run` on the kubernetes store, one 503 on the third tick's read of
    the queued commands. Was: StateError (exit 2) at that tick, the rollout left Progressing
    with blue at 10 % and nobody watching; now it ends Succeeded, 1 s later."""
    from rollout.api import run_rollout
    from rollout.controller import FakeClock
    from tests.engine.killable_driver import spec_for

    with FakeKubeApiServer() as api:
        api.seed({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ml"}},
                 "namespaces")  # fmt: skip
        ticks: list[int] = []

        def on_tick(status: Any, record: Any) -> None:
            ticks.append(status.tick)
            if len(ticks) == 3:
                api.fail_next("configmaps", "get", 503, name="aml-rollout-kill-commands")

        result = run_rollout(spec_for(tmp_path, api.url), clock=FakeClock(1000.0), on_tick=on_tick)
        assert result.phase.value == "Succeeded"
        assert [r.status for r in api.requests if r.status >= 500] == [503]


def test_an_api_server_that_never_answered_is_said_unreachable_at_once() -> None:
    """A wrong api_url, `kubectl proxy` not running: no pause, as for a router that never
    answered the controller; waiting a minute would only delay the one line that says why."""
    with FakeKubeApiServer() as gone:
        url = gone.url
    instant = Recorded()
    store = spec_store(url, instant)
    with pytest.raises(StateError, match=r"^read ConfigMap ml/aml-rollout-r-status: cannot reach"):
        store.load()
    assert instant.slept == []


def test_no_answer_after_the_api_server_answered_is_tried_again(api: FakeKubeApiServer) -> None:
    """No answer (here each broken off mid-body) once the API server answered this store: an
    outage, waited out within the one-shot bound, then said with what the last try met."""
    _started(api)
    instant = Recorded()
    store = spec_store(api.url, instant)
    assert _resume(store) == 4
    api.cut_off("configmaps", "get")
    with pytest.raises(StateError, match=r"^cannot read the command log .* 60 s: .*broke off"):
        store.commands()
    assert instant.slept == [1.0, 2.0, 4.0, 8.0, 16.0, 29.0]


@pytest.mark.parametrize(
    ("released_before", "verb", "times", "pauses"),
    [
        pytest.param(False, "get", 1, [1.0], id="read-of-the-lease-503"),
        pytest.param(False, "create", 2, [1.0, 2.0], id="create-503"),
        pytest.param(True, "patch", 1, [1.0], id="take-of-a-released-lease-503"),
    ],
)
def test_a_lease_take_that_meets_a_blip_is_tried_again(
    api: FakeKubeApiServer, released_before: bool, verb: str, times: int, pauses: list[float]
) -> None:
    """Was: `run` exited 2 at its start on one 503 taking the Lease."""
    if released_before:
        with kube_store(api, ttl=30).lease("ann"):
            pass
    instant = Recorded()
    store = spec_store(api.url, instant)
    api.fail_next("leases", verb, 503, times)
    with store.lease("bob"):
        store.save(a_status(1))
        assert "bob" in lease_of(api)["spec"]["holderIdentity"]
    assert instant.slept == pauses


@pytest.mark.parametrize("verb", ["create", "patch"])
def test_a_lease_take_whose_answer_broke_off_after_it_landed_is_ours(
    api: FakeKubeApiServer, verb: str
) -> None:
    """Was: StateError; and tried again without looking, LeaseHeldError naming this very
    controller as the one driving the rollout."""
    if verb == "patch":
        with kube_store(api, ttl=30).lease("ann"):
            pass

    class Healed(Recorded):
        def sleep(self, seconds: float) -> None:
            api.cut_off("leases", verb, False)
            super().sleep(seconds)

    instant = Healed()
    store = spec_store(api.url, instant)
    api.cut_off("leases", verb)
    with store.lease("bob"):
        store.save(a_status(1))
        assert "bob" in lease_of(api)["spec"]["holderIdentity"]
    assert instant.slept == [1.0]


# ------------------------------------------------- review fixes: first answers, renewal, claim


def quick_store(url: str, instant: InstantTime, *, timeout: float = 10.0) -> KubernetesStateStore:
    """`spec_store` with a shorter request timeout: a slow answer costs less real time."""
    from rollout import kubeapi

    cfg = KubernetesStateConfig(namespace=NAMESPACE, api_url=url, lease_ttl_s=30)
    return KubernetesStateStore(
        StateObjects(NAMESPACE, "r"),
        kubeapi.api_client(cfg, "state"),
        lease_ttl_s=30,
        request_timeout_s=timeout,
        monotonic=instant.monotonic,
        sleep=instant.sleep,
    )


@pytest.mark.parametrize("how", ["slow", "broken-off"])
def test_a_first_answer_slow_or_broken_off_is_tried_again(api: FakeKubeApiServer, how: str) -> None:
    """The API server took the store's very first request (it is there) and answered it late,
    or broke its answer off: an outage, tried again as a 503 is. Was: said "never reached"
    and final at once, `run` exit 2 on one answer a second too slow."""
    _started(api)

    class Healed(Recorded):
        def sleep(self, seconds: float) -> None:
            api.delay("configmaps", "get", 0)
            api.cut_off("configmaps", "get", False)
            super().sleep(seconds)

    instant = Healed()
    store = quick_store(api.url, instant, timeout=0.3)
    if how == "slow":
        api.delay("configmaps", "get", 1.0)
    else:
        api.cut_off("configmaps", "get")
    assert _resume(store) == 4
    assert instant.slept == [1.0]


def test_renewals_answered_later_than_a_third_of_the_ttl_keep_the_lease(
    api: FakeKubeApiServer,
) -> None:
    """Lease writes answered in 1.5 s, a ttl of 3 s: each renewal lands. Was: the renewal timed
    out at ttl/3 (1 s) though it landed, every later one carried a stale resourceVersion (409,
    unseen: timed out too), and the holder was lapsed, then lost, with nobody else about.

    The renewal thread renews back to back then, each renewal sent as the last is answered: a
    lapsed `check_lease` waits for the one in flight, not for the thread to let go of the lock
    (was: it took it again first, and `check_lease` waited out 30 to 90 renewals)."""

    def renewals() -> int:
        return sum(r.resource == "leases" and r.verb == "patch" for r in api.requests)

    store = kube_store(api, ttl=3, outage_s=3)
    waited: list[int] = []
    with store.lease("ann"):
        store.save(a_status(1))
        api.delay("leases", "patch", 1.5)
        api.delay("leases", "get", 1.5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            before = renewals()
            store.check_lease()  # at times lapsed (waits for the renewal), never lost
            waited.append(renewals() - before)
            time.sleep(0.1)
        api.delay("leases", "patch", 0)
        api.delay("leases", "get", 0)
        store.save(a_status(2))
    answers = [r.status for r in api.requests if r.resource == "leases" and r.verb == "patch"]
    assert 409 not in answers, answers
    assert max(waited) <= 2, waited
    assert stored_tick(api) == 2


def test_the_lease_is_renewed_while_the_claim_waits_out_a_blip(api: FakeKubeApiServer) -> None:
    """The claim's read of the status meets a 503 asking for a 4 s pause; a standby tries for
    the Lease from the take on. Was: nothing renewed during the pause (the renewal thread
    started after the claim), the standby took the Lease over, and the live controller
    stopped ("lost the lease")."""
    import threading

    taken: list[str] = []
    stop = threading.Event()

    def held_by_ann() -> bool:
        holder = (
            lease_of(api)["spec"].get("holderIdentity", "")
            if api.exists("leases", "aml-rollout-r", NAMESPACE, LEASES)
            else ""
        )
        return holder.startswith("ann ")

    def standby() -> None:
        bob = kube_store(api, ttl=1)
        while not held_by_ann() and not stop.is_set():
            time.sleep(0.02)
        while not stop.is_set():
            try:
                with bob.lease("bob"):
                    taken.append("bob")
                    return
            except LeaseHeldError:
                time.sleep(0.1)

    ann = kube_store(api, ttl=1)
    api.fail_next("configmaps", "get", 503, 1, name=STATUS_CM, headers={"Retry-After": "4"})
    waiting = threading.Thread(target=standby, daemon=True)
    waiting.start()
    try:
        with ann.lease("ann"):
            ann.save(a_status(1))
            # The standby stops while ann still holds the Lease: a take of its begun as ann
            # let go found it free (a flake under load, not a lease lost).
            stop.set()
            waiting.join(5)
    finally:
        stop.set()
        waiting.join(5)
    assert taken == []
    assert [r.status for r in api.requests if r.status == 503] == [503]
    assert stored_tick(api) == 1
