"""Metrics factory: the spec's `metrics.kind` → a MetricsProvider.

Backends are imported only when chosen (Prometheus pulls in prometheus-api-client). Every class
offers `from_config(cfg, router=None) -> Self`; the simulated source needs the router to split
its synthetic traffic by the weights actually served. Prometheus' also takes `slo_ms`, the SLO
the analysis measures against (`LatencyCheck.measured_slo_ms`): its histogram's bounds are
known only when read, so it is the one to refuse an SLO that is none of them (the other
sources' bounds are in the spec, checked there). Unknown kind → ConfigError.
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


#: The kinds whose `from_config` takes `slo_ms`.
MEASURE_SLO = frozenset({"prometheus"})


def make_metrics(
    cfg: Any, router: TrafficRouter | None = None, *, slo_ms: float | None = None
) -> MetricsProvider:
    """Build the metrics provider a spec's `metrics` section describes; `slo_ms`: the spec's
    `analysis.latency.measured_slo_ms`."""
    kind = getattr(cfg, "kind", None)
    if kind not in BACKENDS:
        raise ConfigError(f"metrics.kind: unknown kind {kind!r} (known: {', '.join(BACKENDS)})")
    module_name, class_name = BACKENDS[kind]
    cls = getattr(importlib.import_module(module_name), class_name)
    provider: MetricsProvider
    if kind in MEASURE_SLO:
        provider = cls.from_config(cfg, router=router, slo_ms=slo_ms)
    else:
        provider = cls.from_config(cfg, router=router)
    return provider
