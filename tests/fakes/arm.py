"""A fake Azure Resource Manager: a real HTTP server on 127.0.0.1, reached through azure-core.

Why: azure-ai-ml's real serialisation, retries, paging and LRO polling should run in tests, with
no network and no mock of the SDK. `FakeArmTransport` is an azure-core `RequestsTransport` that
rewrites `https://management.azure.com/...` (and any other host you list) to this server after
every policy has run, so bearer-token policies still see https. It also compresses the sleeps
azure-core asks it for (LRO polling intervals, retry back-off) to 10 ms, and records what was
asked in `transport.sleeps`.

    with FakeArm() as arm:
        arm.add_workspace(SUB, RG, WS)                       # location + properties.workspaceId
        client = MLClient(StaticCredential(), SUB, RG, WS, transport=arm.transport())
        client.models.create_or_update(Model(name="m", path="azureml://...", type="custom_model"))
        arm.get(path) / arm.put(path, body) / arm.children(path)   # inspect or seed state
        arm.calls                                            # [(method, path, query, body), ...]

Generic resource semantics (any provider, any depth):

- `PUT path` stores the JSON body as the resource and answers it with `id` (the path), `name` (the
  last segment), `type` (e.g. `Microsoft.MachineLearningServices/workspaces/models/versions`),
  `systemData` (created/lastModified, by "fake-arm") and `properties.provisioningState:
  Succeeded`. 201 when created, 200 when replaced.
- `GET path` returns the resource; `GET` of a collection (a path ending in a resource type, e.g.
  `.../models/m/versions`) returns `{"value": [children...]}` (no paging); 404 otherwise, with an
  ARM error body `{"error": {"code": "ResourceNotFound", "message": ...}}`.
- `DELETE path` removes the resource and everything under it (200, or 204 when absent).
- `PATCH path` merges the body into the stored resource (dicts merged recursively).
- `arm.on(method, regex, handler)` adds a route (first match wins, before the generic ones):
  `handler(arm, match, body, query) -> (status, body_dict, headers)`; use it for POST actions
  (listKeys, package, ...) and anything the generic rules do not cover.
- `arm.lro(regex, polls=1, result=None)`: PUT/DELETE/POST on matching paths answer 201/202 with
  `Azure-AsyncOperation` and `Location` headers; the operation reports `InProgress` `polls`
  times, then `Succeeded`. While it runs, the resource shows what ARM shows: a PUT stores the
  body at once with `provisioningState` `Creating` (new) or `Updating` (replaced), a DELETE
  leaves it `Deleting`; the operation's `Succeeded` makes it `Succeeded`, or removes it. (A
  test that answers `/_operations/` itself owns that state too.) For a POST, `result`
  (a dict, or a callable `(arm, path, body) -> dict`) is what the `Location` URL returns once
  the operation is done: the action's response body. These answers carry `Retry-After:
  arm.retry_after` ("0" unless set; None: no header).
- A write to a resource whose provisioning state is not terminal (`Creating`, `Updating`,
  `Deleting`, ...: not `Succeeded`, `Failed` or `Canceled`), or a PUT of a resource under one,
  answers 409 `Conflict`, as ARM does ("... the resource entity provisioning state is not
  terminal"; Azure ML: "Cannot create a deployment in endpoint ... because it is in Updating
  provisioning state").
- `arm.defaults(regex, properties)`: properties merged into matching PUT bodies when absent (e.g.
  model versions get `flavors: {}`, which azure-ai-ml needs when reading them back).
- `arm.fail(method, regex, status, code, times=1)`: the next `times` matching calls fail with an
  ARM error (to test retries and error messages).

Azure ML asset versions (`.../workspaces/<ws>/{models,environments,components,codes,data}/<name>/
versions/<v>`) behave as the service does: a PUT creates or refreshes the container
`.../<kind>/<name>` with `properties.latestVersion` and `nextVersion` (azure-ai-ml reads it to pick
the next version), and a version is immutable: re-PUT with a different body apart from `tags`,
`description`, `properties`, `stage` and `isArchived` answers 409 `Conflict`. A listing of asset
versions or containers leaves archived ones (`properties.isArchived`) out unless its
`listViewType` says `All` or `ArchivedOnly` (the service's default, and azure-ai-ml's, is
`ActiveOnly`). Such a listing honours `$orderBy=createdtime desc` (or `asc`: by `systemData.
createdAt`) and `$top` (the first so many, no next page), which azure-ai-ml sends to resolve a
`name@latest` label (the most recently created version).

Paths compare case-insensitively, as ARM does; `api-version` and other query strings are
recorded in `calls` and otherwise ignored.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from azure.core.credentials import AccessToken
from azure.core.pipeline.transport import RequestsTransport

from tests.fakes.server import LocalServer

Handler = Callable[
    ["FakeArm", re.Match[str], Any, dict[str, list[str]]], tuple[int, Any, dict[str, str]]
]

ARM_HOST = "management.azure.com"
_WORKSPACE_TYPE = "Microsoft.MachineLearningServices/workspaces"
_TERMINAL = ("succeeded", "failed", "canceled")
_ASSET_VERSION = re.compile(
    r"/(?P<kind>models|environments|components|codes|data)/(?P<name>[^/]+)/versions/[^/]+$",
    re.IGNORECASE,
)
_ASSET_COLLECTION = re.compile(
    r"/workspaces/[^/]+/(models|environments|components|codes|data)(/[^/]+/versions)?$",
    re.IGNORECASE,
)


class StaticCredential:
    """A TokenCredential handing out unsigned JWTs (the fake does not check them).

    azure-ai-ml decodes token claims when it submits jobs (`tid`, and `aud` must equal the
    requested resource), so each token has the shape of a real one for the scope asked.
    """

    EXPIRES = 4_102_444_800  # 2100-01-01

    def __init__(self, oid: str = "00000000-0000-0000-0000-00000000000a") -> None:
        self.oid = oid
        self.scopes: list[str] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.extend(scopes)
        audience = (scopes[0] if scopes else "").removesuffix("/.default")
        claims = {
            "aud": audience,
            "oid": self.oid,
            "tid": "00000000-0000-0000-0000-00000000000b",
            "exp": self.EXPIRES,
        }
        parts = [{"alg": "none", "typ": "JWT"}, claims]
        encoded = [base64.urlsafe_b64encode(json.dumps(p).encode()) for p in parts]
        encoded.append(base64.urlsafe_b64encode(b"unsigned"))
        return AccessToken(".".join(e.decode().rstrip("=") for e in encoded), self.EXPIRES)


class FakeArmTransport(RequestsTransport):
    """RequestsTransport sending requests for `hosts` to the fake server instead."""

    def __init__(self, base_url: str, hosts: frozenset[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._base = urlsplit(base_url)
        self._hosts = hosts
        #: Every wait azure-core asked for, in seconds, before compressing it.
        self.sleeps: list[float] = []

    def sleep(self, duration: float) -> None:
        """Compress the waits azure-core asks for (LRO polling intervals, retry back-off).

        azure-core sleeps through the transport; against the fake a 30 s polling interval (what
        azure-ai-ml uses when a response carries no non-zero Retry-After) is pure waiting.
        """
        self.sleeps.append(duration)
        time.sleep(min(duration, 0.01))

    def send(self, request: Any, **kwargs: Any) -> Any:
        original = request.url
        parts = urlsplit(original)
        if parts.hostname not in self._hosts:
            return super().send(request, **kwargs)
        request.headers["x-fake-arm-original-host"] = parts.netloc
        request.url = urlunsplit(
            (self._base.scheme, self._base.netloc, parts.path, parts.query, "")
        )
        try:
            return super().send(request, **kwargs)
        finally:
            # LRO pollers re-read the resource at the request's URL and the bearer-token policy
            # refuses plain http: the request leaves the transport as it came in.
            request.url = original


def _archived_view(assets: list[dict[str, Any]], query: dict[str, list[str]]) -> list[Any]:
    """The assets a listing's `listViewType` shows (ActiveOnly when not given)."""
    view = (query.get("listViewType") or ["ActiveOnly"])[0].lower()
    if view == "all":
        return assets
    archived = view == "archivedonly"
    return [a for a in assets if bool(a.get("properties", {}).get("isArchived")) == archived]


def _ordered(assets: list[dict[str, Any]], query: dict[str, list[str]]) -> list[Any]:
    """The assets in a listing's `$orderBy` (`createdtime asc|desc`), the first `$top` of them."""
    order = (query.get("$orderBy") or [""])[0].lower().split()
    if order[:1] == ["createdtime"]:
        assets = sorted(  # stable: assets created in one instant stay in path order
            assets,
            key=lambda a: datetime.fromisoformat(a["systemData"]["createdAt"]),
            reverse=order[-1] == "desc",
        )
    top = query.get("$top")
    return assets[: int(top[0])] if top else assets


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _segments(path: str) -> list[str]:
    return [s for s in path.strip("/").split("/") if s]


def _is_collection(path: str) -> bool:
    """ARM paths alternate type/name (after dropping `providers/<namespace>`)."""
    segments = _segments(path)
    remaining: list[str] = []
    skip = 0
    for i, seg in enumerate(segments):
        if skip:
            skip -= 1
            continue
        if seg.lower() == "providers" and i + 1 < len(segments):
            skip = 1
            continue
        remaining.append(seg)
    return len(remaining) % 2 == 1


def _resource_type(path: str) -> str:
    segments = _segments(path)
    lowered = [s.lower() for s in segments]
    if "providers" not in lowered:
        return "/".join(segments[-2:-1])
    start = len(lowered) - 1 - lowered[::-1].index("providers")
    namespace, rest = segments[start + 1], segments[start + 2 :]
    return "/".join([namespace, *rest[0::2]])


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


class FakeArm:
    """The fake server and its state (see the module docstring)."""

    def __init__(self, hosts: tuple[str, ...] = (ARM_HOST,)) -> None:
        self.hosts = frozenset(hosts)
        self.resources: dict[str, dict[str, Any]] = {}  # lower-cased path -> resource
        self.calls: list[tuple[str, str, dict[str, list[str]], Any]] = []
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self._lro: list[tuple[re.Pattern[str], int, Any]] = []
        self._defaults: list[tuple[re.Pattern[str], dict[str, Any]]] = []
        self._failures: list[list[Any]] = []
        self._operations: dict[str, int] = {}
        self._targets: dict[str, tuple[str, str]] = {}  # operation -> (method, resource path)
        self._results: dict[str, Any] = {}
        #: The Retry-After header of LRO answers (the 201/202 and InProgress polls); None: none.
        self.retry_after: str | None = "0"
        self._lock = threading.Lock()
        self._server = LocalServer(self._handler_class())
        self.defaults(r"/models/[^/]+/versions/[^/]+$", {"flavors": {}})

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> FakeArm:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> FakeArm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def transport(self, **kwargs: Any) -> FakeArmTransport:
        """An azure-core transport routing the fake's hosts here (pass as `transport=`)."""
        return FakeArmTransport(self.url, self.hosts, **kwargs)

    # -- configuration ----------------------------------------------------------------------------

    def on(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method.upper(), re.compile(pattern, re.IGNORECASE), handler))

    def lro(self, pattern: str, polls: int = 1, result: Any = None) -> None:
        self._lro.append((re.compile(pattern, re.IGNORECASE), polls, result))

    def defaults(self, pattern: str, properties: dict[str, Any]) -> None:
        self._defaults.append((re.compile(pattern, re.IGNORECASE), properties))

    def fail(self, method: str, pattern: str, status: int, code: str, times: int = 1) -> None:
        self._failures.append(
            [method.upper(), re.compile(pattern, re.IGNORECASE), status, code, times]
        )

    # -- state ------------------------------------------------------------------------------------

    def put(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Store a resource as a PUT would; returns (resource, created)."""
        resource = copy.deepcopy(body) if isinstance(body, dict) else {}
        key = path.rstrip("/").lower()
        properties = resource.setdefault("properties", {})
        if isinstance(properties, dict):
            for pattern, extra in self._defaults:
                if pattern.search(path):
                    for name, value in extra.items():
                        properties.setdefault(name, copy.deepcopy(value))
            properties.setdefault("provisioningState", "Succeeded")
        with self._lock:
            previous = self.resources.get(key)
            created_at = previous["systemData"]["createdAt"] if previous else _now()
            resource.update(
                {
                    "id": path.rstrip("/"),
                    "name": _segments(path)[-1],
                    "type": _resource_type(path),
                    "systemData": {
                        "createdAt": created_at,
                        "createdBy": "fake-arm",
                        "createdByType": "User",
                        "lastModifiedAt": _now(),
                        "lastModifiedBy": "fake-arm",
                        "lastModifiedByType": "User",
                    },
                }
            )
            self.resources[key] = resource
        return copy.deepcopy(resource), previous is None

    def get(self, path: str) -> dict[str, Any] | None:
        with self._lock:
            found = self.resources.get(path.rstrip("/").lower())
            return copy.deepcopy(found) if found is not None else None

    def children(self, path: str) -> list[dict[str, Any]]:
        prefix = path.rstrip("/").lower() + "/"
        with self._lock:
            return [
                copy.deepcopy(r)
                for key, r in sorted(self.resources.items())
                if key.startswith(prefix) and "/" not in key[len(prefix) :]
            ]

    def delete(self, path: str) -> bool:
        key = path.rstrip("/").lower()
        with self._lock:
            doomed = [k for k in self.resources if k == key or k.startswith(key + "/")]
            for k in doomed:
                del self.resources[k]
        return bool(doomed)

    def add_workspace(
        self, subscription: str, resource_group: str, workspace: str, location: str = "westeurope"
    ) -> dict[str, Any]:
        """Seed a workspace as azure-ai-ml expects to read it (location, workspaceId, URLs)."""
        path = (
            f"/subscriptions/{subscription}/resourceGroups/{resource_group}"
            f"/providers/{_WORKSPACE_TYPE}/{workspace}"
        )
        resource, _ = self.put(
            path,
            {
                "location": location,
                "kind": "Default",
                "identity": {"type": "SystemAssigned"},
                "properties": {
                    "workspaceId": str(uuid.uuid5(uuid.NAMESPACE_URL, path)),
                    "friendlyName": workspace,
                    "discoveryUrl": f"https://{location}.api.azureml.ms/discovery",
                    "mlFlowTrackingUri": f"azureml://{location}.api.azureml.ms/mlflow/v1.0{path}",
                    "storageAccount": f"/subscriptions/{subscription}/resourceGroups/"
                    f"{resource_group}/providers/Microsoft.Storage/storageAccounts/fakestore",
                },
            },
        )
        return resource

    # -- HTTP -------------------------------------------------------------------------------

    def _answer(self, method: str, raw_path: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        parts = urlsplit(raw_path)
        path, query = parts.path, parse_qs(parts.query)
        self.calls.append((method, path, query, body))
        for failure in self._failures:
            if failure[4] > 0 and failure[0] == method and failure[1].search(path):
                failure[4] -= 1
                return failure[2], _error(failure[3], f"injected failure on {method} {path}"), {}
        for route_method, pattern, handler in self._routes:
            if route_method == method and (match := pattern.search(path)):
                return handler(self, match, body, query)
        if path.startswith("/_operations/"):
            return self._operation(path)
        lro = next(((n, r) for p, n, r in self._lro if p.search(path)), None)
        polls = lro[0] if lro else None
        if method == "GET":
            found = self.get(path)
            if found is not None:
                return 200, found, {}
            if _is_collection(path):
                children = self.children(path)
                if _ASSET_COLLECTION.search(path):
                    children = _ordered(_archived_view(children, query), query)
                return 200, {"value": children}, {}
            return 404, _error("ResourceNotFound", f"{path} was not found"), {}
        if method in ("PUT", "PATCH", "DELETE") and (busy := self._busy(path, method)):
            return 409, _error("Conflict", busy), {}
        if method == "PUT":
            body = body if isinstance(body, dict) else {}
            if (asset := _ASSET_VERSION.search(path)) and (conflict := self._immutable(path, body)):
                return 409, _error("Conflict", conflict), {}
            if polls is not None:
                # Async: ARM answers (and shows) a non-terminal state until the operation ends.
                state = "Updating" if self.get(path) is not None else "Creating"
                body = _merge(copy.deepcopy(body), {"properties": {"provisioningState": state}})
            resource, created = self.put(path, body)
            if asset:
                self._refresh_container(path[: asset.start()] + f"/{asset['kind']}/{asset['name']}")
            if polls is not None:
                return 201, resource, self._start_operation(polls, path, method="PUT")
            return (201 if created else 200), resource, {}
        if method == "PATCH":
            current = self.get(path)
            if current is None:
                return 404, _error("ResourceNotFound", f"{path} was not found"), {}
            resource, _ = self.put(path, _merge(current, body if isinstance(body, dict) else {}))
            return 200, resource, {}
        if method == "DELETE":
            if polls is not None and (doomed := self.get(path)) is not None:
                doomed.setdefault("properties", {})["provisioningState"] = "Deleting"
                with self._lock:
                    self.resources[path.rstrip("/").lower()] = doomed
                return 202, None, self._start_operation(polls, path, method="DELETE")
            existed = self.delete(path)
            return (200 if existed else 204), None, {}
        if method == "POST" and lro is not None:
            result = lro[1](self, path, body) if callable(lro[1]) else lro[1]
            return 202, None, self._start_operation(lro[0], path, result)
        return 404, _error("NoFakeRoute", f"the fake ARM has no route for {method} {path}"), {}

    def _immutable(self, path: str, body: dict[str, Any]) -> str | None:
        current = self.get(path)
        if current is None:
            return None
        mutable = {"tags", "description", "properties", "stage", "isArchived", "provisioningState"}
        before = {k: v for k, v in current.get("properties", {}).items() if k not in mutable}
        after = {k: v for k, v in body.get("properties", {}).items() if k not in mutable}
        before = {k: v for k, v in before.items() if k in after or v not in ({}, None, False)}
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if not changed:
            return None
        return f"{path} already exists and is immutable (would change {changed})"

    def _refresh_container(self, container: str) -> None:
        numbers = [
            int(v["name"]) for v in self.children(container + "/versions") if v["name"].isdigit()
        ]
        latest = max(numbers, default=0)
        existing = self.get(container) or {"properties": {}}
        existing["properties"].update(
            {"latestVersion": str(latest), "nextVersion": str(latest + 1)}
        )
        self.put(container, existing)

    def _busy(self, path: str, method: str) -> str | None:
        """Why ARM refuses this write now: it or (for a PUT) a parent is mid-operation."""
        segments = _segments(path)
        for depth in range(len(segments), 0, -1):
            if depth < len(segments) and method != "PUT":
                break
            resource = self.get("/" + "/".join(segments[:depth]))
            state = str(((resource or {}).get("properties") or {}).get("provisioningState", ""))
            if state and state.lower() not in _TERMINAL:
                return (
                    f"cannot modify {path}: {'/'.join(segments[:depth])} is in {state} "
                    "provisioning state, which is not terminal; retry when it has finished"
                )
        return None

    def _start_operation(
        self, polls: int, path: str, result: Any = None, method: str = "POST"
    ) -> dict[str, str]:
        op = uuid.uuid4().hex
        self._operations[op] = polls
        self._targets[op] = (method, path)
        url = f"https://{ARM_HOST}/_operations/{op}"
        location = url
        if result is not None:
            self._results[op] = result
            location = f"{url}/result"
        return {"Azure-AsyncOperation": url, "Location": location, **self._retry_after()}

    def _retry_after(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": self.retry_after}

    def _operation(self, path: str) -> tuple[int, Any, dict[str, str]]:
        if path.endswith("/result"):
            op = path.rsplit("/", 2)[-2]
            if op not in self._results or self._operations.get(op, 1) > 0:
                return 404, _error("OperationNotFound", f"no finished operation {op}"), {}
            return 200, self._results[op], {}
        op = path.rsplit("/", 1)[-1]
        if op not in self._operations:
            return 404, _error("OperationNotFound", f"no operation {op}"), {}
        if self._operations[op] > 0:
            self._operations[op] -= 1
            return 200, {"status": "InProgress"}, self._retry_after()
        self._settle(op)
        return 200, {"status": "Succeeded"}, {}

    def _settle(self, op: str) -> None:
        """The resource as a finished operation leaves it: Succeeded, or deleted."""
        method, path = self._targets.pop(op, ("POST", ""))
        if method == "DELETE":
            self.delete(path)
        elif method == "PUT" and (resource := self.get(path)) is not None:
            resource.setdefault("properties", {})["provisioningState"] = "Succeeded"
            with self._lock:
                self.resources[path.rstrip("/").lower()] = resource

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        arm = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body leave in two writes; with Nagle on, every response would wait
            # for the client's delayed ACK (~40 ms a request).
            disable_nagle_algorithm = True

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                status, payload, headers = arm._answer(self.command, self.path, body)
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("x-ms-request-id", uuid.uuid4().hex)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _handle

            def log_message(self, format: str, *args: Any) -> None:  # quiet test output
                pass

        return _Handler


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def iter_calls(arm: FakeArm, method: str, pattern: str) -> Iterator[tuple[str, Any]]:
    """(path, body) of recorded calls matching a method and a regex."""
    compiled = re.compile(pattern, re.IGNORECASE)
    for call_method, path, _query, body in arm.calls:
        if call_method == method and compiled.search(path):
            yield path, body
