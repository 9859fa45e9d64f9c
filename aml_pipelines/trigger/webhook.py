"""Event Grid webhook: a small ASGI app on uvicorn, feeding the same dispatcher as the watcher.

Why a raw ASGI app on uvicorn rather than FastAPI or `http.server`: the stdlib server is documented
as not for production (basic security checks only, one thread per connection) and this endpoint
faces the internet; uvicorn is already a dependency (the scoring service runs on it) and gives a
hardened HTTP parser, TLS (`--ssl-*`), graceful shutdown and keep-alive. A framework would add
routing and validation we do not need for one route, while the body limit must be enforced
*while streaming* (chunked bodies carry no Content-Length) — the raw `receive()` loop does that in
a few lines.

Routes:
- `POST /events`   Event Grid schema (array) or CloudEvents 1.0 (structured, or batch array)
- `OPTIONS /events` CloudEvents abuse-protection handshake: `WebHook-Request-Origin` is echoed in
  `WebHook-Allowed-Origin`
- `GET /healthz`   liveness, no secret needed, reveals nothing

Every `/events` request must carry the shared secret: query `?key=` (what an Event Grid endpoint
URL carries), or header `aeg-sas-key` / `x-aml-rollout-key` (e.g. set through Event Grid's
delivery attribute mapping). Compared with `hmac.compare_digest`; 401 otherwise, before the body is
read. During a secret rotation a previous secret is accepted too (`previous_secrets`): Event Grid
never retries a 401, so an event sent with the old key while its endpoint URL changes would be
lost; each use of it is logged (never the value), so the operator sees when it stops. Our own
log lines never carry the query string or headers; uvicorn's access log (kept: it is
what operators grep) gets every query value blanked (`key=***`) by the `RedactKey` filter.

Answers: 200 with a JSON summary for accepted deliveries (Event Grid treats 2xx as delivered),
`{"validationResponse": code}` for the handshake, 400 malformed (the body, or every event in it;
a malformed event among good ones is logged and listed under `rejected` in a 200 — see
eventgrid.py), 401 no/wrong key, 404 unknown path, 405 wrong method, 408 head or body too
slow (HEADER_TIMEOUT_S, BODY_TIMEOUT_S), 413 body over the limit, 415 not JSON, 431 head over
64 KiB (before the key is read: scoring.httpguard, as the scoring server). Event Grid does not
retry 400, 401, 413 (it dead-letters them), so only well-formed but temporarily unprocessable
deliveries get a 5xx: 500 `{"error"}` when the events cannot be recorded (accepting is a
local file write: a full disk, an unreadable trigger state file). Event Grid retries those with
backoff (for 24 h by default), so the operator can mend the state while no event is lost.
Each model's events are recorded on their own: one model's unreadable cursor fails the answer,
not the other models' events of the batch, which the retry finds duplicates (by event id).

Accepting an event = a durable `pending` entry in the model's cursor (see store.py), then the
event id is remembered; the single `DeliveryWorker` delivers pending versions one at a time.
An event for a version the registry shows withdrawn (archived in the Azure ML studio: one read
per model and batch) is recorded closed `skipped` instead, and answered under `skipped` with why.
Redeliveries are answered 200 and counted as duplicates: by event id, and by version (a second
event for a version already in the cursor).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from aml_pipelines.errors import PipelineError, TriggerError
from aml_pipelines.trigger.dispatch import WITHDRAWN, Dispatcher
from aml_pipelines.trigger.eventgrid import (
    BadEvent,
    ModelRegistered,
    Rejected,
    Validation,
    parse,
)
from scoring.httpguard import GuardedHttpToolsProtocol

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 1024 * 1024  # Event Grid's own limit for one event is 1 MB
SECRET_HEADERS = (b"aeg-sas-key", b"x-aml-rollout-key")
#: Seconds the answer waits for the registry to say which versions are archived (a batch's
#: models read side by side), before it accepts their events without knowing: Event Grid
#: waits 30 s for the answer, and azure-core retries a slow Azure ML for minutes.
WITHDRAWN_READ_S = 5.0
WITHDRAWN_READERS = 8  # registry reads at once
JSON_TYPES = (
    "application/json",
    "application/cloudevents+json",
    "application/cloudevents-batch+json",
)

#: Model cursors of a batch written at once (see `_accept`): concurrent fsyncs are committed
#: together (on ext4, 600 cursor writes took 6.3 s one after another, 0.3 s four at a time).
CURSOR_WRITERS = 8

#: Seconds a connection may wait before its first request, and a request head may take from its
#: first byte: one that sends nothing is closed, one sending its headers a byte at a time is
#: answered 408 and closed (scoring.httpguard, which also answers a head over 64 KiB 431).
#: uvicorn times out only the wait *between* requests (keep-alive), so idle sockets were held
#: for ever, until the process ran out of file descriptors and a signed Event Grid POST got no
#: answer. Event Grid sends a request at once.
HEADER_TIMEOUT_S = 10.0
#: Connections and requests at once over which a request is answered 503 (Event Grid retries
#: it) rather than served: a bound on the tasks and memory a flood costs. Event Grid delivers a
#: few requests at once per subscription.
LIMIT_CONCURRENCY = 100
#: Seconds a request body may take to arrive once its head has: one sent a byte at a time held a
#: connection and a task for as long as its sender kept going (the head deadline above ends when
#: the head is complete). 1 MB, Event Grid's largest, takes well under a second.
BODY_TIMEOUT_S = 10.0

#: A query string in a log argument (a request path; paths carry no spaces).
_QUERY = re.compile(r"\?(\S*)")

#: Characters a log line must not carry raw: a decoded path's %0A started a forged log line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\]")
#: A query in a decoded request path (`/events%3Fkey=...`): all of it, spaces too.
_PATH_QUERY = re.compile(r"\?(.*)", re.DOTALL)

Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _redact_query(match: re.Match[str]) -> str:
    """`?key=s3cret&x` → `?key=***&***`: every value, and every part without a name."""
    parts = (p.partition("=") for p in match.group(1).split("&"))
    return "?" + "&".join(f"{name}=***" if eq else "***" for name, eq, _ in parts)


def shown_path(path: str) -> str:
    """A request path as our log lines show it: control characters (and backslashes) escaped,
    so that a `%0A` in it cannot start a forged line, and a query in it (a `%3F` decodes to
    `?`) blanked as RedactKey blanks the access log's."""
    escaped = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), path)
    return _PATH_QUERY.sub(_redact_query, escaped)


class RedactKey(logging.Filter):
    """Blank every query value in log records (uvicorn's access log prints the request path).

    Every value, not only `key=`'s: the key is read from the query as `parse_qs` decodes it, so
    `?%6Bey=...` is a key too, and a mistyped `?KEY=...` (refused) still carries the secret.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _QUERY.sub(_redact_query, a) if isinstance(a, str) else a for a in record.args
            )
        return True


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


#: The start of the reason given for an event of another workspace (see Filter.workspace).
OTHER_WORKSPACE = "other workspace"


def same_arm_id(a: str, b: str) -> bool:
    """ARM resource ids compare case-insensitively (Azure itself varies the casing)."""
    return a.strip().rstrip("/").lower() == b.strip().rstrip("/").lower()


@dataclass(frozen=True)
class Filter:
    """Which ModelRegistered events start a delivery: model names (empty = any), tags, and the
    workspace (the registry's ARM id; None when the registry is not an Azure ML workspace)."""

    models: Collection[str] = ()
    tags: Mapping[str, str] | None = None
    #: An event's version number means something only in the workspace that registered it: an
    #: event from another workspace (a subscription on dev beside prod) naming a model of the
    #: same name would deliver this registry's version of that number, or close it `missing`.
    workspace: str | None = None

    def reason_to_skip(self, event: ModelRegistered) -> str | None:
        """Why the event is ignored, or None when it passes."""
        if self.workspace is not None and not same_arm_id(event.topic, self.workspace):
            return f"{OTHER_WORKSPACE}: {event.topic or 'no topic'} is not {self.workspace}"
        if self.models and event.model not in self.models:
            return f"model {event.model!r} is not watched"
        for key, value in (self.tags or {}).items():
            if event.tags.get(key) != value:
                return f"tag {key}={value} not set"
        return None


class WebhookApp:
    """The ASGI application; `wake` is called after events were accepted."""

    def __init__(
        self,
        *,
        secret: str,
        dispatcher: Dispatcher,
        previous_secrets: Collection[str] = (),
        wake: Callable[[], None],
        event_filter: Filter | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        body_timeout_s: float = BODY_TIMEOUT_S,
    ) -> None:
        self._secret = secret.encode()
        self._previous = [previous.encode() for previous in previous_secrets]
        self.dispatcher = dispatcher
        self.wake = wake
        self.filter = event_filter or Filter()
        self.max_body = max_body
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not served
            return
        client = (scope.get("client") or ("?", 0))[0]
        method, path = scope["method"], shown_path(scope["path"])
        try:
            status, body, headers = await self._handle(scope, receive)
        except _Reject as rej:
            # Logged without query string or headers: they may carry the secret.
            level = logging.ERROR if rej.status >= 500 else logging.WARNING
            log.log(level, "%s %s from %s → %d %s", method, path, client, rej.status, rej.message)
            status, body = rej.status, {"error": rej.message}
            # The rest of a body too slow to wait for is not read: the connection cannot carry
            # another request.
            headers = {"Connection": "close"} if status == 408 else {}
        await _respond(send, status, body, headers)

    async def _handle(
        self, scope: Scope, receive: Receive
    ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        path, method = scope["path"], scope["method"]
        if path == "/healthz":
            return 200, {"status": "ok"}, {}
        if path != "/events":
            raise _Reject(404, f"no route {shown_path(path)}; Event Grid posts to /events")
        headers = {k.lower(): v for k, v in scope["headers"]}
        authorised = self._authorised(scope, headers)
        if authorised is None:
            raise _Reject(
                401,
                "missing or wrong key (query ?key=, or header aeg-sas-key or x-aml-rollout-key)",
            )
        if authorised == "previous":
            log.info(
                "%s %s from %s authorised by the previous secret (--previous-secret-env): the "
                "sender still uses the old key; end the rotation once these lines stop",
                method,
                path,
                (scope.get("client") or ("?", 0))[0],
            )
        if method == "OPTIONS":
            origin = headers.get(b"webhook-request-origin", b"").decode(errors="replace")
            if not origin:
                raise _Reject(400, "OPTIONS without WebHook-Request-Origin")
            log.info("CloudEvents validation handshake from %s", origin)
            return 200, None, {"WebHook-Allowed-Origin": origin, "WebHook-Allowed-Rate": "*"}
        if method != "POST":
            raise _Reject(405, f"method {method} not allowed on /events")
        content_type = headers.get(b"content-type", b"").decode(errors="replace")
        if content_type.split(";")[0].strip().lower() not in JSON_TYPES:
            raise _Reject(415, f"content type {content_type or 'none'!r} is not JSON")
        body = await self._read_body(headers, receive)
        try:
            records = parse(body)
        except BadEvent as exc:
            raise _Reject(400, str(exc)) from None
        validation = next((r for r in records if isinstance(r, Validation)), None)
        if validation is not None:
            log.info("Event Grid subscription validation (event %s)", validation.event_id)
            return 200, {"validationResponse": validation.code}, {}
        events = [r for r in records if isinstance(r, ModelRegistered)]
        rejected = [r for r in records if isinstance(r, Rejected)]
        for bad in rejected:  # the rest of the batch is acknowledged: see eventgrid.Rejected
            log.warning(
                "rejected event [%d] (id %s) of a batch: %s", bad.index, bad.event_id, bad.error
            )
        try:
            summary = await asyncio.to_thread(self._accept, events)
        except (TriggerError, OSError) as exc:
            # 5xx on purpose: Event Grid retries it, where a 4xx would drop the event.
            raise _Reject(500, f"cannot record the events (Event Grid will retry): {exc}") from None
        summary["ignored_other_types"] = len(records) - len(events) - len(rejected)
        summary["rejected"] = [
            {"index": r.index, "id": r.event_id, "error": r.error} for r in rejected
        ]
        return 200, summary, {}

    def _authorised(self, scope: Scope, headers: Mapping[bytes, bytes]) -> str | None:
        """ "current" or "previous": the secret an offered key matches (the current one first);
        None when none does."""
        query = parse_qs(scope.get("query_string", b"").decode(errors="replace"))
        offered = [v.encode() for v in query.get("key", [])]
        offered += [headers[h] for h in SECRET_HEADERS if h in headers]
        # Compare every offered value with every secret (constant time each), so timing reveals
        # neither which value nor which secret matched.
        current = [hmac.compare_digest(value, self._secret) for value in offered]
        previous = [hmac.compare_digest(v, p) for v in offered for p in self._previous]
        if any(current):
            return "current"
        return "previous" if any(previous) else None

    async def _read_body(self, headers: Mapping[bytes, bytes], receive: Receive) -> bytes:
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_body:
                    raise _Reject(413, f"body of {int(declared)} bytes exceeds {self.max_body}")
            except ValueError:
                raise _Reject(400, "Content-Length is not a number") from None
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _Reject(400, "client disconnected mid-body")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body:  # chunked bodies declare no length: count as we read
                        raise _Reject(413, f"body exceeds {self.max_body} bytes")
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise _Reject(
                408, f"body not received within {self.body_timeout_s:g} s ({size} bytes came)"
            ) from None

    def _accept(self, events: list[ModelRegistered]) -> dict[str, Any]:
        store = self.dispatcher.store
        accepted: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        duplicates, filtered = 0, []
        wanted = []
        for event in events:
            skip = self.filter.reason_to_skip(event)
            if skip is not None:
                filtered.append({"id": event.event_id, "reason": skip})
            else:
                wanted.append(event)
        if others := [f for f in filtered if f["reason"].startswith(OTHER_WORKSPACE)]:
            # Acknowledged (a 5xx would be retried for 24 h, to no avail): a subscription
            # pointed at the wrong workspace must still be seen.
            log.warning(
                "filtered %d event(s) from another workspace (%s); check the Event Grid "
                "subscription's source",
                len(others),
                others[0]["reason"],
            )
        # One read and one write of each state file per batch, not per event: Event Grid waits
        # 30 s for the answer, and a batch holds up to 5,000 events.
        seen = store.events_seen(event.event_id for event in wanted)
        by_model: dict[str, list[ModelRegistered]] = {}
        for event in wanted:
            if event.event_id in seen:
                duplicates += 1
                log.info("duplicate event %s (id already seen)", event.event_id)
                continue
            seen.add(event.event_id)  # twice in one batch: the second is a redelivery
            by_model.setdefault(event.model, []).append(event)
        withdrawn_by_model = self._withdrawn(list(by_model))
        failed: list[str] = []
        #: The ids of the groups whose cursor is written, remembered in one write at the end:
        #: once per group, a batch of 3,000 models took 40 s (Event Grid waits 30 s).
        recorded: list[str] = []
        unexpected: BaseException | None = None
        try:
            # Each model's group on its own: one whose cursor cannot be read (or written) must
            # not keep the others from being recorded — Event Grid retries the whole batch, in
            # which the recorded ones are then duplicates (by event id), and would otherwise
            # drop them all with the failing one's after its TTL. Side by side: each cursor
            # write is two fsyncs, which the file system commits together when they come at
            # once (3,000 models: 24.7 s one after another).
            with ThreadPoolExecutor(
                max_workers=min(CURSOR_WRITERS, len(by_model)) or 1,
                thread_name_prefix="record-events",
            ) as pool:
                groups = {
                    model: pool.submit(self._accept_group, model, group, withdrawn_by_model[model])
                    for model, group in by_model.items()
                }
            for model, future in groups.items():  # in the batch's order
                try:
                    group_accepted, group_skipped, group_duplicates = future.result()
                except (TriggerError, OSError) as exc:  # answered 500 below, and logged there
                    failed.append(f"{model}: {exc}")
                except Exception as exc:  # raised once the others are told (ids, answer)
                    unexpected = unexpected or exc
                else:
                    accepted += group_accepted
                    skipped += group_skipped
                    duplicates += group_duplicates
                    recorded += (event.event_id for event in by_model[model])
        finally:
            try:
                # Cursors first, then the ids: a crash in between makes Event Grid's retry a
                # version duplicate (the cursor knows the version), never a lost event. Also
                # when another group failed or an unexpected error ended the batch.
                if recorded:
                    store.remember_events(recorded)
            finally:
                # Also when another model's group failed, or an unexpected error came (its
                # group's versions may be in the cursor already): the retry finds these
                # duplicates, and nothing else would wake the worker for them.
                if accepted or unexpected or failed:
                    self.wake()
        if unexpected is not None:
            raise unexpected
        if failed:
            raise TriggerError("; ".join(failed))
        return {
            "accepted": accepted,
            "duplicates": duplicates,
            "filtered": filtered,
            "skipped": skipped,
        }

    def _accept_group(
        self, model: str, group: list[ModelRegistered], withdrawn: set[int]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
        """Record one model's events in its cursor (their ids are remembered by the caller,
        once for the batch); returns (accepted, skipped, duplicates)."""
        accepted: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        duplicates = 0
        new = set(
            self.dispatcher.accept_many(
                model,
                [(event.version, f"event:{event.event_id}") for event in group],
                withdrawn=withdrawn,
            )
        )
        for event in group:
            if event.version in new and event.version in withdrawn:
                new.discard(event.version)
                skipped.append({"model": model, "version": event.version, "reason": WITHDRAWN})
            elif event.version in new:
                new.discard(event.version)
                accepted.append({"model": model, "version": event.version})
            else:
                duplicates += 1
                log.info(
                    "duplicate event %s: %s v%d is already known",
                    event.event_id,
                    model,
                    event.version,
                )
        return accepted, skipped, duplicates

    def _withdrawn(self, models: list[str]) -> dict[str, set[int]]:
        """The versions of each model withdrawn in the registry (archived in the Azure ML
        studio), so that the answer says so. The models are read WITHDRAWN_READERS at a time
        (a batch of a thousand models was a thousand threads and as many registry calls at
        once, which Azure ML throttles), for at most WITHDRAWN_READ_S in all: one the registry
        does not answer for in time (or answers with an error) has none, its events are
        accepted, and the delivery asks again (and skips a withdrawn version) before any
        rollout. Event Grid waits 30 s for the answer."""
        found: dict[str, set[int]] = {}
        answered: set[str] = set()  # read, or failed: not late
        pending: queue.SimpleQueue[str] = queue.SimpleQueue()
        for model in models:
            pending.put(model)

        def read(model: str) -> None:
            try:
                found[model] = self.dispatcher.registry.withdrawn(model)
            except PipelineError as exc:
                log.warning(
                    "cannot read which versions of %s are archived in the registry (%s); the "
                    "events are accepted, and their delivery checks again",
                    model,
                    exc,
                )

        def work() -> None:
            while True:
                try:
                    model = pending.get_nowait()
                except queue.Empty:
                    return
                try:
                    read(model)
                finally:
                    answered.add(model)

        # Daemon threads: a read hung in the SDK must not keep the answer, nor the exit, waiting.
        readers = [
            threading.Thread(target=work, name=f"withdrawn-{n}", daemon=True)
            for n in range(min(WITHDRAWN_READERS, len(models)))
        ]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + WITHDRAWN_READ_S
        for reader in readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        if late := [m for m in models if m not in answered]:
            log.warning(
                "the registry did not say within %g s which versions of %s are archived; the "
                "events are accepted, and their delivery checks again",
                WITHDRAWN_READ_S,
                ", ".join(late),
            )
        return {model: set() if model in late else found.get(model, set()) for model in models}


#: Seconds a TLS connection being closed waits for the client's close (asyncio's default: 30).
SSL_SHUTDOWN_S = 1.0


def _loop_with_handshake_timeout(timeout_s: float) -> asyncio.AbstractEventLoop:
    """The event loop uvicorn's `loop="auto"` picks (uvloop when installed, else asyncio's),
    whose TLS servers drop a connection that has not completed its handshake within
    `timeout_s`: the head's deadline starts only once it is done (the protocol is told of the
    connection then), so one that sent nothing, or half a ClientHello, was held for asyncio's
    default 60 s; and whose closing ones wait SSL_SHUTDOWN_S for the client's close. uvicorn
    has no option for either (make_server's Config gives this factory)."""
    try:
        import uvloop

        base: type[asyncio.AbstractEventLoop] = uvloop.Loop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        base = asyncio.SelectorEventLoop

    class Loop(base):  # type: ignore[valid-type,misc]
        async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:
            if kwargs.get("ssl") is not None:
                kwargs.setdefault("ssl_handshake_timeout", timeout_s)
                # A refused head (431) closes the connection; over TLS the close waited 30 s
                # for the client's, the loop decrypting all it sent meanwhile (8 GiB).
                kwargs.setdefault("ssl_shutdown_timeout", SSL_SHUTDOWN_S)
            return await super().create_server(*args, **kwargs)  # type: ignore[no-any-return]

    return Loop()


def _guarded(header_timeout_s: float) -> type[GuardedHttpToolsProtocol]:
    """The scoring server's httptools protocol (a request head over 64 KiB is answered 431 and
    closed: httptools kept every header and the whole URL, before the key could be checked),
    with `header_timeout_s` for a head once begun (408 and closed) and for the wait before a
    first request (closed). uvicorn's keep-alive bounds the wait between requests."""

    class WebhookHttpProtocol(GuardedHttpToolsProtocol):
        head_timeout_s = header_timeout_s
        idle_timeout_s = header_timeout_s

    return WebhookHttpProtocol


def _encrypted(pem: str) -> bool:
    """True when the PEM file holds an encrypted private key (PKCS#8 `BEGIN ENCRYPTED PRIVATE
    KEY`, or a traditional key's `Proc-Type: 4,ENCRYPTED`). An unreadable file is not: loading
    it says why."""
    try:
        with Path(pem).open("rb") as file:
            return b"ENCRYPTED" in file.read(1024 * 1024)
    except OSError:
        return False


async def _respond(
    send: Send, status: int, body: dict[str, Any] | None, extra: dict[str, str]
) -> None:
    payload = b"" if body is None else json.dumps(body).encode()
    headers = [(k.lower().encode(), v.encode()) for k, v in extra.items()]
    headers.append((b"content-length", str(len(payload)).encode()))
    if body is not None:
        headers.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def make_server(
    app: WebhookApp,
    *,
    host: str,
    port: int,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    limit_concurrency: int = LIMIT_CONCURRENCY,
) -> tuple[Any, Any, str]:
    """A uvicorn Server, its bound socket and the events URL (`port=0` picks a free port);
    ConfigError when the address cannot be bound or the TLS files do not load. A connection
    that begins no request for `header_timeout_s` is closed, a request head not complete
    `header_timeout_s` after its first byte is answered 408 and one over 64 KiB 431 (both then
    closed); over `limit_concurrency` connections at once a request is answered 503.

    Run it with `server.run(sockets=[sock])`; set `server.should_exit` to stop it.
    """
    import socket
    import ssl

    import uvicorn

    from aml_pipelines.errors import ConfigError

    if ssl_keyfile and not ssl_certfile:
        # uvicorn asserts on it (a traceback); ignored, it would serve plain HTTP.
        raise ConfigError(
            f"--ssl-keyfile {ssl_keyfile}: give the certificate too (--ssl-certfile cert.pem)"
        )
    key_option, key_file = (
        ("--ssl-keyfile", ssl_keyfile) if ssl_keyfile else ("--ssl-certfile", ssl_certfile)
    )
    if key_file and _encrypted(key_file):
        # OpenSSL would prompt on the terminal ("Enter PEM pass phrase:"), then fail with
        # "[Errno 22] Invalid argument", which says nothing of the cause.
        raise ConfigError(
            f"{key_option} {key_file}: the private key is encrypted (has a pass phrase), which "
            "serve cannot ask for: decrypt it (openssl pkey -in ENCRYPTED.key -out plain.key, "
            "readable only by the user serve runs as) and give that file"
        )
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactKey) for f in access.filters):
        access.addFilter(RedactKey())

    class Config(uvicorn.Config):
        def get_loop_factory(self) -> Callable[[], asyncio.AbstractEventLoop] | None:
            # uvicorn has no timeout for a TLS handshake either: see the loop's docstring.
            if not self.is_ssl:
                return super().get_loop_factory()
            return partial(_loop_with_handshake_timeout, header_timeout_s)

    config = Config(
        app,
        lifespan="off",
        log_config=None,  # keep the caller's logging set-up
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        limit_concurrency=limit_concurrency,
        # uvicorn bounds neither a request head's size nor its time (see HEADER_TIMEOUT_S).
        http=_guarded(header_timeout_s),
    )
    try:
        # Loaded now, not by `run`: a certificate that does not load is then one line, not a
        # traceback after "listening on" was printed.
        config.load()
    except (OSError, ssl.SSLError) as exc:
        files = (
            f"{ssl_certfile} / {ssl_keyfile}"
            if ssl_keyfile
            else f"{ssl_certfile} (no --ssl-keyfile: the key must be in that file)"
        )
        raise ConfigError(f"--ssl-certfile/--ssl-keyfile: cannot load {files}: {exc}") from exc
    try:
        sock = socket.create_server((host, port))
    except OSError as exc:
        raise ConfigError(
            f"--host/--port: cannot listen on {host}:{port}: {exc.strerror or exc} "
            "(another process holds the port, or the address is not this machine's)"
        ) from exc
    scheme = "https" if ssl_certfile else "http"
    url = f"{scheme}://{host}:{sock.getsockname()[1]}/events"
    return uvicorn.Server(config), sock, url
