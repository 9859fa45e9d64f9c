"""Factories map every `kind` to a backend class with `from_config`; unknown kinds are errors."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import BaseModel

from rollout.config import (
    AzureMLRouterConfig,
    EnvoyRouterConfig,
    FileStateConfig,
    IstioRouterConfig,
    KubernetesStateConfig,
    MemoryRouterConfig,
    MemoryStateConfig,
    PrometheusMetricsConfig,
    SimulatedMetricsConfig,
    StaticMetricsConfig,
)
from rollout.errors import ConfigError
from rollout.metrics import factory as metrics_factory
from rollout.metrics.static import SimulatedMetrics, StaticMetrics
from rollout.routers import factory as router_factory
from rollout.routers.memory import MemoryRouter
from rollout.state import factory as state_factory
from rollout.state.file import FileStateStore
from rollout.state.memory import MemoryStateStore


@pytest.mark.parametrize(
    ("backends", "kind"),
    [pytest.param(router_factory.BACKENDS, k, id=f"router-{k}") for k in router_factory.BACKENDS]
    + [
        pytest.param(metrics_factory.BACKENDS, k, id=f"metrics-{k}")
        for k in metrics_factory.BACKENDS
    ]
    + [pytest.param(state_factory.BACKENDS, k, id=f"state-{k}") for k in state_factory.BACKENDS],
)
def test_every_kind_names_a_class_with_from_config(
    backends: dict[str, tuple[str, str]], kind: str
) -> None:
    module, name = backends[kind]
    cls = getattr(importlib.import_module(module), name)
    assert callable(getattr(cls, "from_config", None))


def test_memory_and_in_process_metrics_are_built() -> None:
    router = router_factory.make_router(MemoryRouterConfig())
    assert isinstance(router, MemoryRouter)
    assert isinstance(metrics_factory.make_metrics(StaticMetricsConfig()), StaticMetrics)
    simulated = metrics_factory.make_metrics(SimulatedMetricsConfig(), router=router)
    assert isinstance(simulated, SimulatedMetrics)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        pytest.param(router_factory.make_router, "router.kind", id="router"),
        pytest.param(metrics_factory.make_metrics, "metrics.kind", id="metrics"),
    ],
)
def test_an_unknown_kind_is_a_config_error_not_a_fallback(make: object, field: str) -> None:
    with pytest.raises(ConfigError, match=f"{field}: unknown kind 'nginx'"):
        make(SimpleNamespace(kind="nginx"))  # type: ignore[operator]


def test_file_and_memory_stores_are_built(tmp_path: Path) -> None:
    store = state_factory.make_store(FileStateConfig(dir=tmp_path / "a"), "r")
    assert isinstance(store, FileStateStore) and store.dir == tmp_path / "a"
    moved = state_factory.make_store(FileStateConfig(), "r", directory=tmp_path / "b")
    assert isinstance(moved, FileStateStore) and moved.dir == tmp_path / "b"
    assert isinstance(state_factory.make_store(MemoryStateConfig(), "r"), MemoryStateStore)


def test_an_unknown_state_kind_is_a_config_error_listing_the_kinds() -> None:
    with pytest.raises(
        ConfigError, match=r"state.kind: unknown kind 'etcd' \(known: file, memory, kubernetes\)"
    ):
        state_factory.make_store(SimpleNamespace(kind="etcd"), "r")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bullet", "configs"),
    [
        pytest.param(
            "router",
            [MemoryRouterConfig, EnvoyRouterConfig, IstioRouterConfig, AzureMLRouterConfig],
            id="routers",
        ),
        pytest.param(
            "metrics",
            [StaticMetricsConfig, SimulatedMetricsConfig, PrometheusMetricsConfig],
            id="metrics",
        ),
        pytest.param(
            "state", [FileStateConfig, MemoryStateConfig, KubernetesStateConfig], id="state"
        ),
    ],
)
def test_the_spec_reference_lists_exactly_the_fields_of_each_kind(
    bullet: str, configs: list[type[BaseModel]]
) -> None:
    """docs/engine.md once listed Istio fields the loader refuses; the list now is checked."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "engine.md").read_text()
    text = " ".join(doc.split(f"- `{bullet}` — ", 1)[1].split("\n- `", 1)[0].split())
    for config in configs:
        kind = config.model_fields["kind"].default
        start = text.index(f"`{kind}` (") + len(f"`{kind}` (")
        depth, end = 1, start
        while depth:
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        listed = set(re.findall(r"`(\w+)`", text[start:end]))
        assert listed == set(config.model_fields) - {"kind"}, kind
