"""The one way this project reaches a Kubernetes API server, and reads its errors.

Shared by the istio router and the kubernetes state store, so a spec names its cluster the same
way in `router:` and `state:` (KubeApiConfig): `api_url` (e.g. `kubectl proxy`), else the
in-cluster service account (`in_cluster`), else the kubeconfig (`kubeconfig`, `context`).
Errors are read the same way too: one line with the HTTP status, the API server's own message,
and for 401/403 what to fix, said for the credentials actually used (`Credentials`): api_url
sends none of its own, in_cluster is the pod's ServiceAccount, a kubeconfig is a file and a
context.

Some answers are final (`REFUSED`): no retry a few seconds later changes them. A 401 is not a
stale token that asking again would renew: the client itself renews a kubeconfig's expiring
token (exec plugin, OIDC) before each request, and re-reads an in-cluster ServiceAccount token
every minute. A 403 is RBAC (or an admission policy) saying no; RBAC changes when someone binds
the Role. A 400 or 422 is the object refused as invalid (by the API server's validation or an
admission webhook's denial): sent again, it is refused again. 409s, 429s, 5xx (a webhook that
cannot be reached is a 500) and timeouts are not final.

The client itself retries a request twice only when it got no answer at all (a refused
connection, a pooled connection the server had closed: `Retries`), never one the API server
took and was slow to answer, nor a connect that timed out, nor after a 429 or 503 by its
Retry-After: the caller's own retry
(the controller's, the lease renewal's, the state store's save) decides when to ask again, so a
request takes at most its `_request_timeout`, not three of them or minutes of Retry-After.
Writes are retried so too (PATCH, POST, DELETE): every write of this project is safe to send
twice. A patch carries the resourceVersion it was computed from, so a second copy of one that
landed is refused (409) and its caller re-reads; a create that landed answers 409 AlreadyExists,
which each caller handles; a delete that landed answers 404, which is "already gone".
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import (
    ConnectTimeoutError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.util.retry import Retry

from rollout.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

    from urllib3.connectionpool import ConnectionPool
    from urllib3.response import BaseHTTPResponse

    from rollout.config import KubeApiConfig

NOT_FOUND = 404
CONFLICT = 409
#: Answers a retry does not change (see the module docstring): credentials refused, forbidden,
#: the object refused as invalid.
REFUSED = frozenset({400, 401, 403, 422})


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
        raise ConfigError(
            f"{where}: cannot load Kubernetes credentials: {_unloadable(cfg, where, exc)}"
        ) from exc
    except (yaml.YAMLError, TypeError, ValueError, KeyError, AttributeError) as exc:
        # The client parses the file with no check of its shape: a token file given as the
        # kubeconfig, a truncated one, `clusters: 5` were tracebacks.
        where_from = f"`{where}.kubeconfig`" if cfg.kubeconfig else "$KUBECONFIG / ~/.kube/config"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{where}: cannot load Kubernetes credentials: {where_from}: "
            f"{', '.join(_kubeconfig_files(cfg))} is not a kubeconfig ({first})"
        ) from None
    # Fail fast and let the caller's next attempt retry, rather than hang on a dead API server.
    # (The client hands `retries` to urllib3's PoolManager as is: a Retry object is taken.)
    configuration.retries = Retries(total=2, respect_retry_after_header=False)
    return k8s.ApiClient(configuration)


class Retries(Retry):
    """urllib3's retries of a request that got no answer at all, and only those.

    A read timeout is not retried: the API server took the request (it may have made the write)
    and is slow, and a retry would wait `_request_timeout` again, twice (measured: a GET answered
    after 12 s raised after 30 s, saying "within 10 s"). Nor a connect timeout (an address that
    drops packets: a private cluster off its VPN), for the same 3 × `_request_timeout`: a lease
    renewal would take its whole ttl. A 429 or 503 is not retried either
    (`respect_retry_after_header=False`): urllib3 would sleep its Retry-After, uncapped, inside
    one request. A pooled connection the server had closed (urllib3's "Connection aborted", a
    read error too) is still retried, which `read=0` would stop, whatever the verb: urllib3's
    default `allowed_methods` retries no PATCH or POST after a read error, these default to
    None (every write here is safe to send twice: the module docstring).
    """

    def __init__(self, total: bool | int | None = 10, **kwargs: Any) -> None:
        kwargs.setdefault("allowed_methods", None)  # (`new()` passes ours on)
        super().__init__(total, **kwargs)

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: ConnectionPool | None = None,
        _stacktrace: TracebackType | None = None,
    ) -> Self:
        if isinstance(error, ReadTimeoutError | ConnectTimeoutError) and not isinstance(
            error,
            NewConnectionError,  # (a ConnectTimeoutError: a refused connection)
        ):
            raise error  # as urllib3 re-raises a read error it does not retry
        return super().increment(method, url, response, error, _pool, _stacktrace)


def _unloadable(cfg: KubeApiConfig, where: str, exc: Exception) -> str:
    """Why `api_client` could not load credentials, said for what the spec chose. The client
    says "Invalid kube-config file. No configuration found." for a kubeconfig that does not
    exist, and "Service host/port is not set." for in_cluster outside a pod."""
    in_pod = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    if cfg.in_cluster:
        if in_pod:
            return str(exc)
        return (
            f"`{where}.in_cluster: true`, but this does not run in a pod (no "
            f"KUBERNETES_SERVICE_HOST): outside the cluster use `{where}.kubeconfig` / "
            f"`{where}.context`, or `{where}.api_url` (e.g. `kubectl proxy`)"
        )
    files = _kubeconfig_files(cfg)
    if any(Path(f).expanduser().is_file() for f in files if f):
        why = str(exc)
        if "No configuration found" in why:  # $KUBECONFIG's files merged: none parsed
            why = f"{', '.join(files)} is not a kubeconfig (no configuration found in it)"
        if cfg.context and f"name {cfg.context} in" in why:  # "Expected object with name ..."
            why = f"`{where}.context`: no context {cfg.context!r} in {', '.join(files)}"
            with contextlib.suppress(k8s_config.ConfigException, OSError, KeyError, TypeError):
                contexts, _ = k8s_config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
                    config_file=str(cfg.kubeconfig) if cfg.kubeconfig else None
                )
                why += f" (it has {', '.join(str(c['name']) for c in contexts) or 'none'})"
    elif cfg.kubeconfig:
        why = f"`{where}.kubeconfig`: no file {cfg.kubeconfig}"
    else:
        why = (
            f"no kubeconfig ({', '.join(files)} does not exist): set `{where}.kubeconfig`, "
            f"`{where}.api_url` or `{where}.in_cluster`"
        )
    if in_pod:
        # A pod has no kubeconfig: its ServiceAccount is what the spec forgot to ask for.
        why += f" (this runs in a pod: `{where}.in_cluster: true` uses its ServiceAccount)"
    return why


def _kubeconfig_files(cfg: KubeApiConfig) -> list[str]:
    """The kubeconfig files the client reads: the spec's, else load_kube_config's own default
    ($KUBECONFIG, a list; else ~/.kube/config)."""
    if cfg.kubeconfig:
        return [str(cfg.kubeconfig)]
    return [f for f in (os.environ.get("KUBECONFIG") or "~/.kube/config").split(os.pathsep) if f]


_ROLE = "the Role from `aml-rollout manifests` bound in that namespace"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What requests to the API server authenticate with, as `api_client` chose it from a
    KubeApiConfig: what a 401 or 403 hint must name (`hint`)."""

    source: Literal["api_url", "in_cluster", "kubeconfig"]
    #: The URL (api_url), or the kubeconfig file and context; "" for in_cluster.
    detail: str = ""

    @classmethod
    def of(cls, cfg: KubeApiConfig) -> Credentials:
        """The credentials `api_client(cfg)` uses (the same rule, in the same order)."""
        if cfg.api_url:
            return cls("api_url", cfg.api_url)
        if cfg.in_cluster:
            return cls("in_cluster")
        # load_kube_config's own default: $KUBECONFIG, else ~/.kube/config.
        path = cfg.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        context = f"context {cfg.context}" if cfg.context else "its current context"
        return cls("kubeconfig", f"kubeconfig {path}, {context}")

    def hint(self, status: int) -> str:
        """What to fix after a 401 (credentials rejected) or a 403 (forbidden); "" otherwise."""
        if status == 401:
            return {
                "api_url": (
                    f"credentials rejected: requests to api_url {self.detail} carry none of "
                    "their own; behind `kubectl proxy` it is the proxy's kubeconfig that was "
                    "refused (renew its login, restart the proxy), and an API server reached "
                    "directly needs in_cluster or kubeconfig instead of api_url"
                ),
                "in_cluster": (
                    "credentials rejected: the pod's ServiceAccount token (in_cluster) was "
                    "refused: is it mounted (automountServiceAccountToken) and of this cluster?"
                ),
                "kubeconfig": (
                    f"credentials rejected: check {self.detail} (its user's token or "
                    "certificate; on AKS `az aks get-credentials`, with Entra ID `kubelogin`)"
                ),
            }[self.source]
        if status == 403:
            return {
                "api_url": (
                    f"forbidden: api_url {self.detail} adds no credentials, so the identity is "
                    "whatever answers there (`kubectl proxy`: its kubeconfig's user; else "
                    f"anonymous), and it needs {_ROLE}"
                ),
                "in_cluster": (
                    f"forbidden: the pod's ServiceAccount (in_cluster) needs {_ROLE}: run the "
                    "pod as the chart's (`serviceAccountName: aml-rollout`)"
                ),
                "kubeconfig": f"forbidden: the user of {self.detail} needs {_ROLE}",
            }[self.source]
        return ""


class NotJson(ValueError):
    """A successful answer whose body is no JSON object: an HTML page of a proxy or a gateway
    in between, a body someone cut short (with a Content-Length to match, so nothing tells the
    client it is short). Its message says what came: the status, the Content-Type, the length
    and the first characters; the caller names the object and the API server."""

    #: The first characters of the body said in the message (a proxy's page can be long).
    SHOWN = 80

    def __init__(self, status: int, content_type: str | None, body: bytes) -> None:
        start = body[: self.SHOWN].decode("utf-8", "replace")
        more = "..." if len(body) > self.SHOWN else ""
        super().__init__(
            f"HTTP {status} with no JSON ({content_type or 'no Content-Type'}, {len(body)} "
            f"bytes: {start!r}{more}): a proxy or a gateway in front of the API server?"
        )
        self.status = status


def read_json(call: Callable[[], Any]) -> Any:
    """Make a request sent with `_preload_content=False` and read its whole answer as JSON.

    Such a body is read lazily, after the call returned the status: a connection reset or a
    stall mid-body raises urllib3's HTTPError (ProtocolError, ReadTimeoutError) from the read.
    Call this inside the try that maps HTTPError, so the read is mapped as the call is.
    NotJson (a ValueError) when the body is no JSON object, as every answer of the API server
    is: the client's own reading would hand back the text as the object (a str for a custom
    object; a typed model built from nothing).
    """
    answer = call()
    body = answer.data
    try:
        found = json.loads(body)
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise NotJson(answer.status, answer.headers.get("Content-Type"), body)
    return found


_CONNECTION = re.compile(r"^HTTPS?Connection(Pool)?\(host=[^)]*\): ")
_READ_TIMEOUT = re.compile(r"read timeout=([0-9.]+)")
_TIMEOUT = re.compile(r"timeout=([0-9]+\.[0-9]+)")


def _reason(exc: Exception) -> BaseException:
    """The failure urllib3 met: a MaxRetryError carries the last one in `reason`."""
    return getattr(exc, "reason", None) or exc


def _broken_off(reason: BaseException) -> bool:
    """Raised while reading a body: the server answered, then the connection went."""
    return isinstance(reason, ProtocolError) and str(reason.args[0]).startswith("Connection broken")


def reached(exc: Exception) -> bool:
    """Whether the API server took the request that got no (whole) answer: a read timeout (slow:
    overloaded, or waiting on an admission webhook) or an answer broken off mid-body. It is
    there, and asking again is worth it (the write may even have been made); else nothing
    answers at its address at all (refused, a connect timeout, a name that does not resolve)."""
    reason = _reason(exc)
    return _broken_off(reason) or isinstance(reason, ReadTimeoutError)


def no_answer(exc: Exception, host: str) -> str:
    """Why no answer came from the API server at `host`, in a few words: urllib3's innermost
    reason without its repetition of the host and the path ("Max retries exceeded with url:
    ... (Caused by ...)"). A read timeout is not "cannot reach": the API server took the
    request and did not answer in time (overloaded, or waiting on an admission webhook)."""
    reason = _reason(exc)
    if _broken_off(reason):
        # The server answered, then the connection went (reset, a proxy's timeout, an API
        # server restarting). Its inner error says how far it got.
        inner = reason.args[-1]
        return f"the answer of the Kubernetes API at {host} broke off: {inner!r}"
    if isinstance(reason, ReadTimeoutError):
        found = _READ_TIMEOUT.search(str(reason))
        within = f" within {round(float(found.group(1)), 1):g} s" if found else " in time"
        return (
            f"no answer from the Kubernetes API at {host}{within} (reached, but slow: "
            "overloaded, or waiting on an admission webhook)"
        )
    if isinstance(reason, ConnectTimeoutError) and not isinstance(reason, NewConnectionError):
        # Raised as ConnectTimeoutError(conn, message): its str is the tuple's repr.
        why = str(reason.args[-1]) if reason.args else type(reason).__name__
    else:
        why = _CONNECTION.sub("", str(reason)) or type(reason).__name__
    # The timeout left of the request's total, e.g. 9.999871: said as what was asked (10).
    why = _TIMEOUT.sub(lambda m: f"timeout={round(float(m.group(1)), 1):g}", why)
    return f"cannot reach the Kubernetes API at {host}: {why}"


def retry_after(exc: ApiException) -> float | None:
    """The seconds a 429's or 503's Retry-After header asks the client to wait (None when
    absent or not a number of seconds: an HTTP date is not what the API server sends)."""
    value = (exc.headers or {}).get("Retry-After")
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and seconds >= 0 else None


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


def describe(exc: ApiException, credentials: Credentials | None = None) -> str:
    """ "HTTP 403 <the API server's message> (what to do)" for an API error; the hint names
    `credentials` (a client built without a KubeApiConfig gets a general one)."""
    message = exc.reason or ""
    with contextlib.suppress(ValueError, AttributeError):  # a non-JSON body keeps the reason
        message = json.loads(exc.body or "{}").get("message", message)
    status = exc.status or 0
    if credentials is not None:
        hint = credentials.hint(status)
    else:
        hint = {
            401: "credentials rejected",
            403: f"forbidden: the identity this runs as needs {_ROLE}",
        }.get(status, "")
    return f"HTTP {exc.status} {message}" + (f" ({hint})" if hint else "")
