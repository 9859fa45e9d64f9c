"""A small but real kube-apiserver over HTTP, for testing code that speaks the kubernetes client.

It listens on 127.0.0.1 (free port) in a background thread and keeps objects in memory, keyed by
(API group, resource, namespace, name) — every served version of a group shares one store, as in a
real apiserver. What it implements is what clients rely on for correctness:

- REST paths `/api/v1/...` (core group) and `/apis/{group}/{version}/...`, namespaced resources
  and namespaces; GET (one, or a list filtered by an equality `labelSelector`), POST, PUT,
  PATCH, DELETE; the discovery documents (`/api`,
  `/apis`, `/api/v1`, `/apis/{group}/{version}`), so the real `kubectl` can talk to it too.
- `metadata.resourceVersion` bumped on every write (one global counter), `uid`,
  `creationTimestamp`, `generation` (bumped when `spec` changes).
- Optimistic concurrency: a PUT or PATCH whose body (after patching) carries a resourceVersion
  other than the stored one answers 409 Conflict; a PATCH that changes nothing writes nothing
  (the resourceVersion stays, as the real apiserver skips no-op updates); POST of an existing
  name answers 409 AlreadyExists; anything missing answers 404 NotFound; a POST into a missing
  namespace answers 404.
- PATCH as JSON merge patch (RFC 7386) or JSON Patch (RFC 6902, with `test`); strategic merge
  patch is refused with 415 rather than approximated (kubernetes client 37 sends a dict to a
  typed API as one, even when told JSON Patch: say `_content_type` merge patch); a patch its
  content type cannot hold (a list as merge patch) is a 400. An error of the fake itself is
  a 500 naming it, never a dropped connection (which a client reports as an unreachable
  server).
- 404 bodies shaped as the real ones: a missing object's Status names it in `details`, a path
  no API serves (a group or version not installed: `istio_versions=("v1beta1",)` plays Istio
  before 1.22, which had no networking.istio.io/v1) names nothing.
- Two checks of the real one that clients get wrong: a Lease's `acquireTime` / `renewTime` must
  be MicroTimes with exactly six fractional digits (else 400, as Go's RFC3339Micro parser
  answers), and a ConfigMap's data may hold at most 1 MiB (else 422 Invalid, "Too long").
- Deployments are reported available at once (a stand-in for the deployment controller) unless
  `ready_deployments` is False; then `status` is a subresource as in a real apiserver (a write
  of the object keeps the stored status) and a test plays the deployment controller with
  `set_status` (e.g. mid rolling update: old pods still available, new ones not yet).

Every request is recorded (`requests`) with the RBAC verb it needs, so tests can check that a
Role grants exactly what a client used. `delay(resource, verb, s)` answers such requests late (a
slow API server); `cut_off(resource, verb)` breaks their answers off mid-body (a connection reset
after the headers); `fail_next(resource, verb, code, times)` answers the next `times` such
requests `code` (a 503 of an API server restarting, a 429, a 403 of RBAC) without handling
them; `answer_raw_next(resource, verb, body)` answers the next such request with `body` as it
is (a proxy's HTML page, a body cut short: no JSON); `delete(...)` removes an object as another
client would.
`before_next_write(resource, name, fn)` runs `fn(obj)` as a concurrent writer just before the next
write to that object is handled — the race a 409 guards (or, returning DELETED, deletes it: the
race a 404 on a write is).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes.server import LocalServer

# API group → (served versions, {resource: kind}); "" is the core group. Namespaces are the only
# cluster-scoped resource served.
GROUPS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "": (
        ("v1",),
        {
            "namespaces": "Namespace",
            "services": "Service",
            "pods": "Pod",
            "serviceaccounts": "ServiceAccount",
            "configmaps": "ConfigMap",
        },
    ),
    "apps": (("v1",), {"deployments": "Deployment"}),
    "rbac.authorization.k8s.io": (("v1",), {"roles": "Role", "rolebindings": "RoleBinding"}),
    "coordination.k8s.io": (("v1",), {"leases": "Lease"}),
    "networking.istio.io": (
        ("v1", "v1beta1"),
        {
            "gateways": "Gateway",
            "virtualservices": "VirtualService",
            "destinationrules": "DestinationRule",
        },
    ),
}
KINDS = {resource: kind for _, kinds in GROUPS.values() for resource, kind in kinds.items()}
_VERBS = ["create", "delete", "get", "list", "patch", "update"]

_CORE = re.compile(r"^/api/v1/(?:namespaces/(?P<ns>[^/]+)/)?(?P<res>[^/]+)(?:/(?P<name>[^/]+))?$")
_GROUP = re.compile(
    r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/(?:namespaces/(?P<ns>[^/]+)/)?"
    r"(?P<res>[^/]+)(?:/(?P<name>[^/]+))?$"
)

#: What a `before_next_write` hook returns to delete the object rather than change it.
DELETED = object()

Key = tuple[str, str, str, str]  # (group, resource, namespace, name); "" for core / cluster scope


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the apiserver's authorizer would see it."""

    method: str
    verb: str  # get, list, create, update, patch, delete
    group: str  # "" for the core group
    resource: str
    namespace: str
    name: str
    content_type: str
    status: int


class ApiError(Exception):
    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details = details or {}
        #: Extra response headers, e.g. a 429's or a 503's Retry-After.
        self.headers = headers or {}


class RawAnswer(Exception):
    """An answer sent as it is, not a JSON Status (see FakeKubeApiServer.answer_raw_next)."""

    def __init__(self, code: int, body: bytes, content_type: str) -> None:
        super().__init__(f"raw answer {code}")
        self.code, self.body, self.content_type = code, body, content_type


class FakeKubeApiServer:
    """The store, its HTTP front and the test hooks. Use as a context manager or start()/stop()."""

    def __init__(
        self, *, ready_deployments: bool = True, istio_versions: tuple[str, ...] | None = None
    ) -> None:
        self.ready_deployments = ready_deployments
        #: The networking.istio.io versions served (default GROUPS': v1 and v1beta1); e.g.
        #: ("v1beta1",) is Istio before 1.22, ("",) no Istio at all.
        self.istio_versions = istio_versions or GROUPS["networking.istio.io"][0]
        self.requests: list[RecordedRequest] = []
        self._objects: dict[Key, dict[str, Any]] = {}
        self._version = 0
        self._lock = threading.RLock()
        self._hooks: dict[tuple[str, str], Callable[[dict[str, Any]], None]] = {}
        self._delays: dict[tuple[str, str], float] = {}
        self._cut_offs: set[tuple[str, str]] = set()
        #: (resource, verb) → [code, requests still to fail, name or "" for any, headers].
        self._failures: dict[tuple[str, str], list[Any]] = {}
        #: (resource, verb) → the RawAnswer the next such request gets (see answer_raw_next).
        self._raw_next: dict[tuple[str, str], RawAnswer] = {}
        #: Per handler thread: whether the answer being made is to be cut off (see cut_off).
        self._answer = threading.local()
        self._server: LocalServer | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        return self._server.url

    def start(self) -> FakeKubeApiServer:
        self._server = LocalServer(_handler_for(self))
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        self._server = None

    def __enter__(self) -> FakeKubeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- direct access for tests --------------------------------------------------------------
    def get(self, resource: str, name: str, namespace: str = "", group: str = "") -> dict[str, Any]:
        """A copy of a stored object; KeyError when missing."""
        with self._lock:
            return copy.deepcopy(self._objects[(group, resource, namespace, name)])

    def exists(self, resource: str, name: str, namespace: str = "", group: str = "") -> bool:
        with self._lock:
            return (group, resource, namespace, name) in self._objects

    def seed(self, obj: dict[str, Any], resource: str, group: str = "") -> dict[str, Any]:
        """Store `obj` as if a client had created it (no request recorded)."""
        meta = obj.get("metadata", {})
        key = (group, resource, meta.get("namespace", ""), meta["name"])
        with self._lock:
            return copy.deepcopy(self._write(key, copy.deepcopy(obj), previous=None))

    def delete(self, resource: str, name: str, namespace: str = "", group: str = "") -> None:
        """Remove an object as another client's DELETE would (no request recorded)."""
        with self._lock:
            del self._objects[(group, resource, namespace, name)]

    def delay(self, resource: str, verb: str, seconds: float) -> None:
        """Answer every later `verb` request on `resource` `seconds` late (a slow API server);
        0 ends it. Other requests are served meanwhile, as by a real one."""
        self._delays[(resource, verb)] = seconds

    def cut_off(self, resource: str, verb: str, cut: bool = True) -> None:
        """Break every later answer to `verb` requests on `resource` off mid-body: the status and
        the headers (Content-Length the whole body) go out, half the body, then the connection
        closes, as when it is reset mid-answer. The request itself is handled (a write is made).
        False ends it."""
        if cut:
            self._cut_offs.add((resource, verb))
        else:
            self._cut_offs.discard((resource, verb))

    def fail_next(
        self,
        resource: str,
        verb: str,
        code: int,
        times: int = 1,
        *,
        name: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next `times` `verb` requests on `resource` (on the object `name` only, when
        given) with `code` and a Status saying so, without handling them (nothing is written);
        `headers` go with each answer (a Retry-After). Recorded, with `code`, as any request."""
        self._failures[(resource, verb)] = [code, times, name, headers or {}]

    def answer_raw_next(
        self,
        resource: str,
        verb: str,
        body: bytes,
        *,
        code: int = 200,
        content_type: str = "text/html",
    ) -> None:
        """Answer the next `verb` request on `resource` with `code` and `body` as it is, whole
        (Content-Length its length), without handling it (nothing is written): a proxy's HTML
        page, a JSON body cut short by someone in between. Recorded, with `code`."""
        self._raw_next[(resource, verb)] = RawAnswer(code, body, content_type)

    def _failing(self, record: dict[str, str]) -> ApiError | None:
        """The error `fail_next` set for this request, counted; None to handle it."""
        resource, verb, name = record["resource"], record["verb"], record["name"]
        with self._lock:
            failure = self._failures.get((resource, verb))
            if failure is None or failure[1] <= 0 or failure[2] not in ("", name):
                return None
            failure[1] -= 1
        code, headers = failure[0], failure[3]
        if code == 403:  # as RBAC's authorizer words it
            return ApiError(
                403,
                "Forbidden",
                f'{resource} "{name}" is forbidden: User "system:serviceaccount:ml:aml-rollout" '
                f'cannot {verb} resource "{resource}" in API group "{record["group"]}" in the '
                f'namespace "{record["namespace"]}"',
                {"name": name, "group": record["group"], "kind": resource},
            )
        reason = {429: "TooManyRequests", 503: "ServiceUnavailable"}.get(code, "InternalError")
        return ApiError(
            code, reason, f"fail_next: {verb} {resource} answered {code}", None, headers
        )

    def cuts_off_this_answer(self) -> bool:
        """Whether the answer to the request this thread just handled is to be cut off."""
        return bool(getattr(self._answer, "cut", False))

    def set_status(
        self, resource: str, name: str, namespace: str, group: str, status: dict[str, Any]
    ) -> None:
        """Replace an object's `status` as its controller would (a write: resourceVersion moves)."""
        with self._lock:
            obj = self._objects[(group, resource, namespace, name)]
            self._version += 1
            obj["metadata"]["resourceVersion"] = str(self._version)
            obj["status"] = copy.deepcopy(status)

    def before_next_write(
        self, resource: str, name: str, fn: Callable[[dict[str, Any]], object]
    ) -> None:
        """Run `fn(stored_obj)` (mutating it, bumping its version) before the next write to it;
        `fn` returning DELETED deletes it instead (`kubectl delete` between a read and a write)."""
        self._hooks[(resource, name)] = fn

    def verbs_used(self) -> set[tuple[str, str, str]]:
        """(group, resource, verb) of every request received, successful or not."""
        return {(r.group, r.resource, r.verb) for r in self.requests}

    # ---- the API semantics --------------------------------------------------------------------
    def _write(
        self, key: Key, obj: dict[str, Any], previous: dict[str, Any] | None
    ) -> dict[str, Any]:
        self._version += 1
        meta = obj.setdefault("metadata", {})
        meta["name"], meta["resourceVersion"] = key[3], str(self._version)
        if key[2]:
            meta["namespace"] = key[2]
        if previous is None:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            meta["generation"] = 1
        else:
            for field in ("uid", "creationTimestamp"):
                meta[field] = previous["metadata"][field]
            changed = obj.get("spec") != previous.get("spec")
            meta["generation"] = previous["metadata"]["generation"] + (1 if changed else 0)
        if key[1] == "deployments" and self.ready_deployments:
            replicas = obj.get("spec", {}).get("replicas", 1)
            obj["status"] = {
                "observedGeneration": meta["generation"],
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": replicas,
                "availableReplicas": replicas,
            }
        elif key[1] == "deployments" and previous is not None:
            # status is a subresource: writing the object does not change it.
            obj.pop("status", None)
            if "status" in previous:
                obj["status"] = copy.deepcopy(previous["status"])
        self._objects[key] = obj
        return obj

    def _run_hook(self, key: Key) -> None:
        hook = self._hooks.pop((key[1], key[3]), None)
        if hook is not None and key in self._objects:
            obj = copy.deepcopy(self._objects[key])
            if hook(obj) is DELETED:
                del self._objects[key]
            else:
                self._write(key, obj, previous=self._objects[key])

    def handle(
        self, method: str, path: str, body: Any, content_type: str, label_selector: str = ""
    ) -> tuple[int, dict[str, Any]]:
        self._answer.cut = False
        if method == "GET" and (found := discovery(path)) is not None:
            return 200, found
        match = _CORE.match(path) or _GROUP.match(path)
        if match is None:
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource {path}"
            )
        parts = match.groupdict()
        group, resource = parts.get("group") or "", parts["res"]
        namespace, name = parts["ns"] or "", parts["name"] or ""
        if resource == "namespaces" and namespace:  # /api/v1/namespaces/{name}
            namespace, name = "", namespace
        versions, kinds = GROUPS.get(group, ((), {}))
        served = self.istio_versions if group == "networking.istio.io" else versions
        if resource not in kinds or (parts.get("version") or "v1") not in served:
            # What a real apiserver answers for a path no API serves: a Status naming no object.
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if method == "POST" and isinstance(body, dict):
            name = str((body.get("metadata") or {}).get("name", ""))
        verb = {"GET": "get" if name else "list", "POST": "create", "PUT": "update"}.get(
            method, method.lower()
        )
        record = dict(
            method=method, verb=verb, group=group, resource=resource, namespace=namespace, name=name
        )
        self._answer.cut = (resource, verb) in self._cut_offs
        if seconds := self._delays.get((resource, verb)):
            time.sleep(seconds)  # outside the lock: a slow answer, not a stalled server
        if (raw := self._raw_next.pop((resource, verb), None)) is not None:
            self.requests.append(
                RecordedRequest(**record, content_type=content_type, status=raw.code)
            )
            raise raw
        try:
            if (failure := self._failing(record)) is not None:
                raise failure
            with self._lock:
                result = self._dispatch(
                    method, group, resource, namespace, name, body, content_type, label_selector
                )
        except ApiError as exc:
            self.requests.append(
                RecordedRequest(**record, content_type=content_type, status=exc.code)
            )
            raise
        self.requests.append(RecordedRequest(**record, content_type=content_type, status=result[0]))
        return result

    def _dispatch(
        self,
        method: str,
        group: str,
        resource: str,
        namespace: str,
        name: str,
        body: Any,
        content_type: str,
        label_selector: str = "",
    ) -> tuple[int, dict[str, Any]]:
        kind = KINDS[resource]
        if method == "GET" and not name:
            wanted = dict(term.split("=", 1) for term in label_selector.split(",") if term)
            items = [
                copy.deepcopy(o)
                for (g, r, ns, _), o in sorted(self._objects.items())
                if (g, r, ns) == (group, resource, namespace)
                and wanted.items() <= ((o.get("metadata") or {}).get("labels") or {}).items()
            ]
            meta = {"resourceVersion": str(self._version)}
            return 200, {"kind": f"{kind}List", "metadata": meta, "items": items}
        if method == "POST":
            name = (body.get("metadata") or {}).get("name", "")
            if not name:
                raise ApiError(422, "Invalid", f"{kind}: metadata.name is required")
            _validate(resource, name, body)
            if namespace and ("", "namespaces", "", namespace) not in self._objects:
                raise ApiError(
                    404,
                    "NotFound",
                    f'namespaces "{namespace}" not found',
                    {"name": namespace, "kind": "namespaces"},
                )
            key = (group, resource, namespace, name)
            if key in self._objects:
                raise ApiError(409, "AlreadyExists", f'{resource} "{name}" already exists')
            return 201, copy.deepcopy(self._write(key, body, previous=None))
        key = (group, resource, namespace, name)
        if method in ("PUT", "PATCH"):
            self._run_hook(key)
        if key not in self._objects:
            raise ApiError(
                404,
                "NotFound",
                f'{resource} "{name}" not found',
                {"name": name, "group": group, "kind": resource},
            )
        if method == "GET":
            return 200, copy.deepcopy(self._objects[key])
        if method == "DELETE":
            gone = self._objects.pop(key)
            return 200, {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Success",
                "details": {"name": name, "kind": resource, "uid": gone["metadata"]["uid"]},
            }
        current = self._objects[key]
        if method == "PUT":
            new = body
        elif method == "PATCH":
            new = _apply_patch(current, body, content_type)
        else:
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported")
        _validate(resource, name, new)
        wanted = (new.get("metadata") or {}).get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {resource} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
            )
        if method == "PATCH" and new == current:
            return 200, copy.deepcopy(current)  # a no-op write is no write: the version stays
        return 200, copy.deepcopy(self._write(key, new, previous=current))


# Go's time.RFC3339Micro layout, which the apiserver decodes metav1.MicroTime with.
_MICRO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)")
CONFIGMAP_MAX_BYTES = 1024 * 1024  # corev1.MaxSecretSize, which ConfigMaps share


def _validate(resource: str, name: str, obj: dict[str, Any]) -> None:
    """The real apiserver's decoding and validation, where clients are known to go wrong."""
    if resource == "leases":
        for field in ("acquireTime", "renewTime"):
            value = (obj.get("spec") or {}).get(field)
            if value is not None and not (isinstance(value, str) and _MICRO_TIME.fullmatch(value)):
                raise ApiError(
                    400,
                    "BadRequest",
                    f'Lease in version "v1" cannot be handled as a Lease: parsing time '
                    f'"{value}" as "2006-01-02T15:04:05.000000Z07:00": cannot parse',
                )
    if resource == "configmaps":
        size = sum(
            len(str(k).encode()) + len(str(v).encode())
            for part in ("data", "binaryData")
            for k, v in (obj.get(part) or {}).items()
        )
        if size > CONFIGMAP_MAX_BYTES:
            raise ApiError(
                422,
                "Invalid",
                f'ConfigMap "{name}" is invalid: []: Too long: must have at most '
                f"{CONFIGMAP_MAX_BYTES} bytes",
            )


def discovery(path: str) -> dict[str, Any] | None:
    """The discovery documents kubectl reads before anything else (legacy, not aggregated)."""
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
    if path == "/apis":
        groups = []
        for group, (versions, _) in GROUPS.items():
            if group:
                listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
                groups.append({"name": group, "versions": listed, "preferredVersion": listed[0]})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
    parts = path.strip("/").split("/")
    if parts == ["api", "v1"]:
        group, version = "", "v1"
    elif len(parts) == 3 and parts[0] == "apis" and parts[1] in GROUPS:
        group, version = parts[1], parts[2]
    else:
        return None
    versions, kinds = GROUPS[group]
    if version not in versions:
        return None
    resources = [
        {
            "name": resource,
            "singularName": kind.lower(),
            "namespaced": resource != "namespaces",
            "kind": kind,
            "verbs": _VERBS,
        }
        for resource, kind in kinds.items()
    ]
    group_version = f"{group}/{version}" if group else version
    return {"kind": "APIResourceList", "groupVersion": group_version, "resources": resources}


def _apply_patch(current: dict[str, Any], patch: Any, content_type: str) -> dict[str, Any]:
    if content_type == "application/merge-patch+json":
        if not isinstance(patch, dict):  # it would replace the object with a non-object
            raise ApiError(
                400, "BadRequest", f"json: cannot unmarshal {type(patch).__name__} into an object"
            )
        merged = merge_patch(copy.deepcopy(current), patch)
        assert isinstance(merged, dict)
        return merged
    if content_type == "application/json-patch+json":
        if not (isinstance(patch, list) and all(isinstance(op, dict) for op in patch)):
            raise ApiError(
                400, "BadRequest", "json: cannot unmarshal into Go value of type jsonpatch.Patch"
            )
        return json_patch(copy.deepcopy(current), patch)
    raise ApiError(
        415, "UnsupportedMediaType", f"patch content type {content_type!r} not supported"
    )


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null deletes, anything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = merge_patch(target.get(key), value)
    return target


def json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add / remove / replace / test (what clients use against the apiserver)."""
    for op in ops:
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]
        ]
        node: Any = doc
        try:
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            if op["op"] == "test":
                actual = node[int(last)] if isinstance(node, list) else node[last]
                if actual != op["value"]:
                    raise ApiError(422, "Invalid", f"test failed at {op['path']}")
            elif op["op"] == "remove":
                del node[int(last) if isinstance(node, list) else last]
            elif op["op"] in ("add", "replace"):
                if isinstance(node, list):
                    index = len(node) if last == "-" else int(last)
                    if op["op"] == "add":
                        node.insert(index, op["value"])
                    else:
                        node[index] = op["value"]
                else:
                    if op["op"] == "replace" and last not in node:
                        raise KeyError(last)
                    node[last] = op["value"]
            else:
                raise ApiError(422, "Invalid", f"unsupported JSON Patch op {op['op']!r}")
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise ApiError(422, "Invalid", f"JSON Patch {op} does not apply: {exc!r}") from exc
    return doc


def _handler_for(api: FakeKubeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in two writes

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            extra: dict[str, str] = {}
            try:
                body = json.loads(raw) if raw else None
                url = urlsplit(self.path)
                selector = parse_qs(url.query).get("labelSelector", [""])[0]
                code, payload = api.handle(self.command, url.path, body, content_type, selector)
            except RawAnswer as raw:
                self.send_response(raw.code)
                self.send_header("Content-Type", raw.content_type)
                self.send_header("Content-Length", str(len(raw.body)))
                self.end_headers()
                self.wfile.write(raw.body)
                return
            except ApiError as exc:
                extra = exc.headers
                code, payload = (
                    exc.code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "message": exc.message,
                        "reason": exc.reason,
                        "details": exc.details,
                        "code": exc.code,
                    },
                )
            except json.JSONDecodeError as exc:
                code, payload = (
                    400,
                    {
                        "kind": "Status",
                        "status": "Failure",
                        "message": str(exc),
                        "reason": "BadRequest",
                        "code": 400,
                    },
                )
            except Exception as exc:
                # A bug of the fake: say so, do not hang up (a dropped connection reads to the
                # client as an unreachable API server).
                code, payload = (
                    500,
                    {
                        "kind": "Status",
                        "status": "Failure",
                        "message": f"fake kube-apiserver: {exc!r}",
                        "reason": "InternalError",
                        "code": 500,
                    },
                )
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for header, value in extra.items():
                self.send_header(header, value)
            self.end_headers()
            if api.cuts_off_this_answer():
                self.wfile.write(data[: len(data) // 2])
                self.close_connection = True
                return
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    return Handler


@contextmanager
def running(**kwargs: Any) -> Iterator[FakeKubeApiServer]:
    """A started fake apiserver, stopped on exit."""
    with FakeKubeApiServer(**kwargs) as server:
        yield server
