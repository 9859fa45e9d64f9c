"""Kubernetes state stores on the fake kube-apiserver, and a run that uses every verb they need."""

from __future__ import annotations

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
