"""Router factory: the spec's `router.kind` → a TrafficRouter.

Each backend lives in its own module, imported only when chosen (the Istio one pulls in the
kubernetes client, the Azure one azure-ai-ml). Every backend class offers
`from_config(cfg) -> Self`. An unknown kind is a ConfigError — never a silent fallback.
"""

from __future__ import annotations

import importlib
from typing import Any

from rollout.errors import ConfigError
from rollout.routers.base import TrafficRouter

#: kind → (module, class). The class has `from_config(cfg)`.
BACKENDS: dict[str, tuple[str, str]] = {
    "memory": ("rollout.routers.memory", "MemoryRouter"),
    "envoy": ("rollout.routers.envoy", "EnvoyRouter"),
    "istio": ("rollout.routers.istio", "IstioRouter"),
    "azureml": ("rollout.routers.azureml", "AzureMLRouter"),
}


def make_router(cfg: Any) -> TrafficRouter:
    """Build the router a spec's `router` section describes."""
    kind = getattr(cfg, "kind", None)
    if kind not in BACKENDS:
        raise ConfigError(f"router.kind: unknown kind {kind!r} (known: {', '.join(BACKENDS)})")
    module_name, class_name = BACKENDS[kind]
    cls = getattr(importlib.import_module(module_name), class_name)
    router: TrafficRouter = cls.from_config(cfg)
    return router
