"""The one way this project reaches a Kubernetes API server, and reads its errors.

Shared by the istio router and the kubernetes state store, so a spec names its cluster the same
way in `router:` and `state:` (KubeApiConfig): `api_url` (e.g. `kubectl proxy`), else the
in-cluster service account (`in_cluster`), else the kubeconfig (`kubeconfig`, `context`).
Errors are read the same way too: one line with the HTTP status, the API server's own message,
and for 401/403 what to fix.
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from rollout.errors import ConfigError

if TYPE_CHECKING:
    from rollout.config import KubeApiConfig

NOT_FOUND = 404
CONFLICT = 409


def api_client(cfg: KubeApiConfig, where: str) -> k8s.ApiClient:
    """An ApiClient for the API server `cfg` names; ConfigError names `where` (e.g. "router")."""
    configuration = k8s.Configuration()
    try:
        if cfg.api_url:
            configuration.host = cfg.api_url
        elif cfg.in_cluster:
            k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        else:
            k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(cfg.kubeconfig) if cfg.kubeconfig else None,
                context=cfg.context,
                client_configuration=configuration,
            )
    except (k8s_config.ConfigException, OSError) as exc:
        raise ConfigError(f"{where}: cannot load Kubernetes credentials: {exc}") from exc
    # Fail fast and let the caller's next attempt retry, rather than hang on a dead API server.
    configuration.retries = 2
    return k8s.ApiClient(configuration)


def not_served(exc: ApiException) -> bool:
    """Whether a 404 is for the resource type, not an object: the API server serves no such
    group/version/resource (e.g. networking.istio.io/v1 before Istio 1.22). A missing object's
    (or namespace's) Status names it in `details`; a path no API serves names nothing."""
    if exc.status != NOT_FOUND:
        return False
    try:
        details = json.loads(exc.body or "").get("details") or {}
    except (ValueError, AttributeError):  # "404 page not found", as older API servers answer
        return True
    return not (isinstance(details, dict) and details.get("name"))


def describe(exc: ApiException) -> str:
    """ "HTTP 403 <the API server's message> (what to do)" for an API error."""
    message = exc.reason or ""
    with contextlib.suppress(ValueError, AttributeError):  # a non-JSON body keeps the reason
        message = json.loads(exc.body or "{}").get("message", message)
    hint = {
        401: " (credentials rejected: check the kubeconfig/context)",
        403: (
            " (forbidden: the identity this runs as — the kubeconfig's user, or in a pod its "
            "ServiceAccount — needs the Role from `aml-rollout manifests` bound in that "
            "namespace)"
        ),
    }.get(exc.status or 0, "")
    return f"HTTP {exc.status} {message}{hint}"
