"""Open a model registry from a one-line spec: the `--registry` option and the components' input.

    local:PATH                       a LocalRegistry rooted at PATH
    local                            a LocalRegistry at the default root (.aml-rollout/registry)

An unknown kind is a ConfigError naming the accepted kinds; there is no silent fallback.
"""

from __future__ import annotations

import os
from pathlib import Path

from aml_pipelines.errors import ConfigError
from aml_pipelines.registry.base import ModelRegistry

KINDS = ("local",)
ENV_VAR = "AML_ROLLOUT_REGISTRY"


def default_spec() -> str:
    """$AML_ROLLOUT_REGISTRY, else the local registry (.aml-rollout/ or $AML_ROLLOUT_HOME)."""
    return os.environ.get(ENV_VAR) or "local"


def open_registry(spec: str | None = None) -> ModelRegistry:
    """Build the registry a spec names (see the module docstring)."""
    spec = spec or default_spec()
    kind, _, arg = spec.partition(":")
    if kind == "local":
        from aml_pipelines.registry.local import LocalRegistry, default_root

        return LocalRegistry(Path(arg) if arg else default_root())
    raise ConfigError(f"registry: unknown kind {kind!r} in {spec!r}; expected one of 'local:PATH'")
