"""Metrics factory: the spec's `metrics.kind` → a MetricsProvider.

Backends are imported only when chosen (Prometheus pulls in prometheus-api-client). Every class
offers `from_config(cfg, router=None) -> Self`; the simulated source needs the router to split
its synthetic traffic by the weights actually served. Unknown kind → ConfigError.
"""

from __future__ import annotations

import importlib
from typing import Any

from rollout.errors import ConfigError
from rollout.metrics.base import MetricsProvider
from rollout.routers.base import TrafficRouter

#: kind → (module, class). The class has `from_config(cfg, router=None)`.
BACKENDS: dict[str, tuple[str, str]] = {
    "static": ("rollout.metrics.static", "StaticMetrics"),
    "simulated": ("rollout.metrics.static", "SimulatedMetrics"),
    "prometheus": ("rollout.metrics.prometheus", "PrometheusMetrics"),
    "azuremonitor": ("rollout.metrics.azuremonitor", "AzureMonitorMetrics"),
}


def make_metrics(cfg: Any, router: TrafficRouter | None = None) -> MetricsProvider:
    """Build the metrics provider a spec's `metrics` section describes."""
    kind = getattr(cfg, "kind", None)
    if kind not in BACKENDS:
        raise ConfigError(f"metrics.kind: unknown kind {kind!r} (known: {', '.join(BACKENDS)})")
    module_name, class_name = BACKENDS[kind]
    cls = getattr(importlib.import_module(module_name), class_name)
    provider: MetricsProvider = cls.from_config(cfg, router=router)
    return provider
