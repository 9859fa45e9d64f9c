"""Metrics factory: the spec's `metrics.kind` → a MetricsProvider.

Backends are imported only when chosen (Prometheus pulls in prometheus-api-client). Every class
offers `from_config(cfg, router=None) -> Self`; the simulated source needs the router to split
its synthetic traffic by the weights actually served. Prometheus' also takes `latency`, the
analysis' latency check: its histogram's bounds are known only when read, so it is the one to
refuse an SLO that is none of them (`measured_slo_ms`; the other sources' bounds are in the
spec, checked there) and, when the judge compares the colours above green's p99 bucket
(`uses_baseline_p99`), a blue histogram without a bound of green's. Unknown kind → ConfigError.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rollout.errors import ConfigError
from rollout.metrics.base import MetricsProvider
from rollout.routers.base import TrafficRouter

if TYPE_CHECKING:
    from rollout.config import LatencyCheck

#: kind → (module, class). The class has `from_config(cfg, router=None)`.
BACKENDS: dict[str, tuple[str, str]] = {
    "static": ("rollout.metrics.static", "StaticMetrics"),
    "simulated": ("rollout.metrics.static", "SimulatedMetrics"),
    "prometheus": ("rollout.metrics.prometheus", "PrometheusMetrics"),
    "azuremonitor": ("rollout.metrics.azuremonitor", "AzureMonitorMetrics"),
}


#: The kinds whose `from_config` takes `latency`.
MEASURE_SLO = frozenset({"prometheus"})


def make_metrics(
    cfg: Any, router: TrafficRouter | None = None, *, latency: LatencyCheck | None = None
) -> MetricsProvider:
    """Build the metrics provider a spec's `metrics` section describes; `latency`: the spec's
    `analysis.latency` (None: the default check)."""
    kind = getattr(cfg, "kind", None)
    if kind not in BACKENDS:
        raise ConfigError(f"metrics.kind: unknown kind {kind!r} (known: {', '.join(BACKENDS)})")
    module_name, class_name = BACKENDS[kind]
    cls = getattr(importlib.import_module(module_name), class_name)
    provider: MetricsProvider
    if kind in MEASURE_SLO:
        provider = cls.from_config(cfg, router=router, latency=latency)
    else:
        provider = cls.from_config(cfg, router=router)
    return provider
