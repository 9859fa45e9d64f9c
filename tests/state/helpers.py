"""Kubernetes state stores on the fake kube-apiserver, and a run that uses every verb they need."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s

from rollout.core.status import Command, Status
from rollout.core.types import Phase
from rollout.state.kubernetes import KubernetesStateStore
from rollout.state.kubernetes_objects import StateObjects
from tests.fakes.kube_apiserver import FakeKubeApiServer

NAMESPACE = "ml"
LEASES = "coordination.k8s.io"


def namespace(name: str = NAMESPACE) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def kube_store(
    api: FakeKubeApiServer, name: str = "r", *, ttl: int = 1, **kwargs: Any
) -> KubernetesStateStore:
    """A store talking to `api` over HTTP with an unmodified kubernetes client."""
    configuration = k8s.Configuration()
    configuration.host = api.url
    return KubernetesStateStore(
        StateObjects(NAMESPACE, name), k8s.ApiClient(configuration), lease_ttl_s=ttl, **kwargs
    )


def ahead(seconds: float) -> Callable[[], float]:
    """A wall clock `seconds` ahead: to it, a lease renewed now has long expired."""
    return lambda: time.time() + seconds


class InstantTime:
    """A monotonic clock that `sleep` advances at once: a store's wait before taking over an
    expired lease (a whole ttl of watching it unchanged) costs no real time."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def successor(api: FakeKubeApiServer, name: str = "r", *, ttl: int = 30) -> KubernetesStateStore:
    """A controller to which the current holder's lease has expired (its clock is 2 minutes
    ahead, and it watches the Lease unchanged for a ttl in no real time): it takes it over
    unless the holder renews meanwhile (the holders here renew every ttl/3 of real time, long
    after these tests' takeovers)."""
    instant = InstantTime()
    return kube_store(
        api, name, ttl=ttl, clock=ahead(120), monotonic=instant.monotonic, sleep=instant.sleep
    )


def status(name: str = "r", tick: int = 0, **fields: Any) -> Status:
    return Status(name=name, phase=fields.pop("phase", Phase.PROGRESSING), tick=tick, **fields)


def lease_of(api: FakeKubeApiServer, name: str = "r") -> dict[str, Any]:
    return api.get("leases", f"aml-rollout-{name}", NAMESPACE, LEASES)


def exercise(api: FakeKubeApiServer) -> None:
    """What a controller and the CLI do with the store: every verb it ever needs."""
    store, cli = kube_store(api, "verbs"), kube_store(api, "verbs")
    cli.push_command(Command(id="1", kind="pause"))  # creates the log
    cli.push_command(Command(id="2", kind="resume"))  # appends
    with store.lease("controller"):  # creates the Lease, claims (creates) the status
        store.load()
        store.save(status("verbs", 1))
        store.save(status("verbs", 2))
        store.commands()
        cli.controller()
    with store.lease("controller"):  # takes the released Lease, claims the existing status
        store.load()
        store.save(status("verbs", 3))
