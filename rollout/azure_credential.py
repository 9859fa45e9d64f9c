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

import logging
import os
from collections.abc import Mapping
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


def quiet_azure_logs() -> None:
    """Keep the Azure SDKs' logs to what a user acts on, whatever the root logger's level.

    DefaultAzureCredential logs at WARNING what each credential it tried said (a dozen lines),
    then raises with the same text, which the caller's error line carries: `azure.identity` at
    ERROR keeps that one line. azure-core's HTTP logging policy logs every request and response
    with its headers at INFO (every ARM and Azure Monitor call): `azure` at WARNING, for a
    process logging its own INFO lines (the pipeline steps).
    """
    logging.getLogger("azure").setLevel(logging.WARNING)
    logging.getLogger("azure.identity").setLevel(logging.ERROR)
