"""Open a model registry from a one-line spec: the `--registry` option and the components' input.

    local:PATH                       a LocalRegistry rooted at PATH
    local                            a LocalRegistry at the default root (.aml-rollout/registry)
    azureml                          the Azure ML workspace of the running job (AZUREML_ARM_*
                                     variables, which Azure ML sets inside every job)
    azureml:SUB/RESOURCE_GROUP/WS    an explicit Azure ML workspace (DefaultAzureCredential)

An unknown kind is a ConfigError naming the accepted kinds; there is no silent fallback.
Readers that would otherwise wait on nothing (the triggers) pass `must_exist=True`: a `local`
root that is not a folder is then a ConfigError instead of an empty registry. Writers (the
register step) leave it False: the first registration creates the folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aml_pipelines.errors import ConfigError
from aml_pipelines.registry.base import ModelRegistry

KINDS = ("local", "azureml")
ENV_VAR = "AML_ROLLOUT_REGISTRY"


def default_spec() -> str:
    """$AML_ROLLOUT_REGISTRY, else the local registry (.aml-rollout/ or $AML_ROLLOUT_HOME)."""
    return os.environ.get(ENV_VAR) or "local"


def open_registry(
    spec: str | None = None, *, ml_client: Any = None, must_exist: bool = False
) -> ModelRegistry:
    """Build the registry a spec names (see the module docstring); `ml_client` overrides Azure."""
    spec = spec or default_spec()
    kind, _, arg = spec.partition(":")
    if kind == "local":
        from aml_pipelines.registry.local import LocalRegistry, default_root

        registry = LocalRegistry(Path(arg) if arg else default_root())
        if must_exist and registry.root.exists() and not registry.root.is_dir():
            # "does not exist" would send the user looking for a folder that is there, as a file
            raise ConfigError(
                f"registry {spec!r}: {registry.root} is a file, not a registry folder; check "
                "--registry / $AML_ROLLOUT_REGISTRY"
            )
        if must_exist and not registry.root.is_dir():
            raise ConfigError(
                f"registry {spec!r}: {registry.root} does not exist (nothing was ever registered "
                "there); check --registry / $AML_ROLLOUT_REGISTRY, or create the folder to "
                "wait for a first registration"
            )
        return registry
    if kind == "azureml":
        from aml_pipelines.registry.azureml import AzureMLRegistry, workspace_client

        return AzureMLRegistry(
            ml_client if ml_client is not None else workspace_client(arg or None)
        )
    raise ConfigError(
        f"registry: unknown kind {kind!r} in {spec!r}; expected local, local:PATH, azureml or "
        "azureml:SUBSCRIPTION/RESOURCE_GROUP/WORKSPACE"
    )
