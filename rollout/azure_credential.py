"""Which Azure identity aml-rollout signs in as: one rule for the endpoint router and the pipelines.

Everything that talks to Azure (the `azureml` router moving endpoint traffic, the pipeline
submission, the Azure ML registry in the register and package steps) builds its credential
here, so the rollout step and the register step of one Azure ML job sign in as the same identity.

`DefaultAzureCredential` tries environment variables (a service principal), workload identity, a
managed identity, then developer logins (`az login`, ...). Its managed-identity step asks for the
system-assigned identity unless it is given a client id, and it reads only `AZURE_CLIENT_ID` for
that. An Azure ML compute with a user-assigned identity names it in `DEFAULT_IDENTITY_CLIENT_ID`
instead: without this rule a step there asks for the system-assigned identity, which is absent
(no credential) or another principal (the wrong roles).

azure-identity is imported only when a credential is built.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any


def managed_identity(env: Mapping[str, str]) -> dict[str, str]:
    """Keywords naming the user-assigned identity: AZURE_CLIENT_ID, else DEFAULT_IDENTITY_CLIENT_ID.

    With AZURE_CLIENT_ID set, DefaultAzureCredential already uses it (and its environment
    credential may need it as a service principal's id). Without either, the system-assigned
    identity is used. (Passing `managed_identity_client_id=None` would disable the
    AZURE_CLIENT_ID default, so the keyword is passed only with a value.)
    """
    if env.get("AZURE_CLIENT_ID"):
        return {}
    client_id = env.get("DEFAULT_IDENTITY_CLIENT_ID", "")
    return {"managed_identity_client_id": client_id} if client_id else {}


def default_credential(env: Mapping[str, str] | None = None) -> Any:
    """A DefaultAzureCredential for the identity `managed_identity(env)` names (os.environ)."""
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(**managed_identity(os.environ if env is None else env))


#: Levels `quiet_azure_logs` sets, by logger.
QUIET = {"azure": logging.WARNING, "azure.identity": logging.ERROR}
#: The package whose import sets its loggers to INFO, each with a handler of its own.
AZURE_ML = "azure.ai.ml"


def quiet_azure_logs() -> None:
    """Keep the Azure SDKs' logs to what a user acts on, whatever the root logger's level.

    DefaultAzureCredential logs at WARNING what each credential it tried said (a dozen lines),
    then raises with the same text, which the caller's error line carries: `azure.identity` at
    ERROR keeps that one line. azure-core's HTTP logging policy logs every request and response
    with its headers at INFO (every ARM and Azure Monitor call): `azure` at WARNING, for a
    process logging its own INFO lines (the pipeline steps).

    azure-ai-ml's import sets `azure.ai.ml` and a few of its modules' loggers to INFO, each
    with a stderr handler of its own (its `initialize_logger_info`), which `azure` at WARNING
    does not reach: every deployment write printed "Check: endpoint ... exists". Its loggers
    are set to WARNING now when it is imported already, and else right after its import, which
    the router makes lazily, after this (`QuietAzureML`, on sys.meta_path once).
    """
    for name, level in QUIET.items():
        logging.getLogger(name).setLevel(level)
    if AZURE_ML in sys.modules:
        quiet_azure_ml_loggers()
    if not any(isinstance(finder, QuietAzureML) for finder in sys.meta_path):
        sys.meta_path.insert(0, QuietAzureML())


def quiet_azure_ml_loggers() -> None:
    """`azure.ai.ml` and its loggers that azure-ai-ml set below WARNING, at WARNING."""
    loggers = logging.Logger.manager.loggerDict
    for name in [AZURE_ML, *(n for n in list(loggers) if n.startswith(AZURE_ML + "."))]:
        found = logging.getLogger(name)
        if name == AZURE_ML or logging.NOTSET < found.level < logging.WARNING:
            found.setLevel(logging.WARNING)


class QuietAzureML(importlib.abc.MetaPathFinder):
    """An import hook quieting azure-ai-ml's loggers once its import has set them up.

    It finds `azure.ai.ml` as the finders after it do, and has the loader run it, then
    `quiet_azure_ml_loggers`; the module keeps the loader it was found with. Anything that
    goes wrong in the hook leaves the import as it would have been without it: a log level is
    not worth a failed import.
    """

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != AZURE_ML:
            return None
        try:
            spec = self._spec_of_the_others(fullname, path, target)
            if spec is None or not isinstance(spec.loader, importlib.abc.Loader):
                return spec
            spec.loader = _QuietingLoader(spec.loader)
            return spec
        except Exception:  # the next finders look for it again, as if this one were not here
            return None

    def _spec_of_the_others(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None
    ) -> importlib.machinery.ModuleSpec | None:
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or isinstance(finder, QuietAzureML) or find is None:
                continue
            spec: importlib.machinery.ModuleSpec | None = find(fullname, path, target)
            if spec is not None:
                return spec
        return None


class _QuietingLoader(importlib.abc.Loader):
    """`loader`, quieting azure-ai-ml's loggers after it has run the module."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        # Back to the loader that found it, for whoever asks the module (resources, source).
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        with contextlib.suppress(Exception):  # see QuietAzureML: never fail the import
            quiet_azure_ml_loggers()

    def __getattr__(self, name: str) -> Any:
        # Only for names the loader has and this does not: never dunders (copy and pickle look
        # those up on a half-built object, and `_loader` missing then recursed for ever).
        if name.startswith("__") or name == "_loader":
            raise AttributeError(name)
        return getattr(self._loader, name)
