"""The scoring server: `create_app(...)` builds the FastAPI application one colour runs.

Routes:

- `POST /score` `{"data": [[...], ...]}` -> `{"predictions": [...], "model", "version", "colour"}`
- `GET /score` -> the model identity (what the seed's `curl $GATEWAY_IP/score` showed)
- `GET`/`HEAD /healthz` (process alive), `GET`/`HEAD /readyz` (200 only once the model is loaded)
- `GET /metrics` (Prometheus text from the injected registry, see scoring.metrics)
- `GET|PUT /admin/fault` (the fault knob; loopback clients only, not relayed by a proxy,
  key-protected when keys are set)
- `GET /openapi.json`, `/docs`, `/redoc` (key-protected when keys are set: the document names
  the model's features)

`POST /score` is the hot path, so it is a raw ASGI endpoint (`ScoreEndpoint`) placed first in the
router instead of a FastAPI route with a pydantic body: FastAPI's body parsing and validation cost
more than the model does. It reads the body in chunks up to `max_body_bytes` (a larger one is
read to its end and dropped before the 413, up to `DRAIN_FACTOR` times the limit, beyond which it
is cut or, declared so, refused before reading), decodes it with orjson, validates it
(scoring.inputs), predicts (scoring.model fast path) and answers with orjson. Its schema, built
from model.json's feature names, is added to the OpenAPI document by hand.

Only the linear fast path (microseconds) scores on the event loop. Any other estimator scores on
one predict thread (`ServerState.executor`), one request at a time as before, while the loop keeps
reading requests and answering probes: a request waiting for the thread is in flight and its wait
is in the latency histogram, as the client sees it (on the loop, a request queued behind another's
predict was not yet started, and its wait was measured by no one).

Every bad request gets a 4xx JSON `{"error": "..."}`; an unexpected exception in scoring is
logged and answered 500 (and counted: the judge must see real failures). API keys are compared in
constant time and never logged. Uvicorn should run with the access log off (`aml-rollout serve`
does), httptools and uvloop.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from scoring.auth import api_key_problem
from scoring.errors import InputError, ModelLoadError
from scoring.faults import FaultKnob
from scoring.httpguard import BEGIN_SHUTDOWN
from scoring.inputs import DEFAULT_MAX_ROWS
from scoring.metrics import ScoringMetrics
from scoring.model import LoadedModel, load_model
from scoring.scorer import Scorer

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20
#: Bytes of /score bodies buffered at once, across requests: without a cap, N slow clients held
#: N times the body limit. A body that would pass it is answered 429, to retry (not a 5xx: the
#: canary judge counts a 5xx against the model).
DEFAULT_MAX_BUFFERED_BODY_BYTES = 32 << 20
#: A body over the limit is still read, and dropped, up to this many times the limit before its
#: 413 is sent. Answered and closed with the rest of the upload unread or in flight, the kernel
#: resets the connection under its sender, and an Envoy in front answers its client 503 instead
#: (1-3 of 40 oversized requests): a 5xx the canary judge counts against the model. A larger
#: body is cut unread, as is one whose rest takes longer than the body timeout (408).
DRAIN_FACTOR = 4
#: How long a request's body may take to arrive once its headers have: a client that stops
#: sending mid-body gets a 408 and the connection closed, well inside the 75 s keep-alive.
DEFAULT_BODY_TIMEOUT_S = 30.0
#: Once the server begins to stop, how long a body still arriving may take to end before its
#: 408: well inside the graceful timeout (scoring.cli.SHUTDOWN_TIMEOUT_S, 20 s), which must leave
#: time to predict and answer; past it uvicorn cancels the request and answers 500 itself.
SHUTDOWN_BODY_GRACE_S = 1.0
#: A fault setting is two numbers; anything longer is not one.
ADMIN_MAX_BODY_BYTES = 4096
#: Headers a proxy adds on the way (Envoy: x-forwarded-proto, x-envoy-expected-rq-timeout-ms).
#: A request to /admin carrying one came through a proxy on this host, from anywhere.
PROXY_HEADERS = frozenset({"forwarded", "x-forwarded-for", "x-forwarded-proto", "x-real-ip"})
PROXY_HEADER_PREFIX = "x-envoy-"
#: What a 404 answers with: the routes a client most likely wanted.
ROUTES_HINT = (
    'score with POST /score {"data": [[...], ...]}; GET /score (identity), /healthz, /readyz, '
    "/metrics, /docs"
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: The exit status of a server whose model failed to load in the background: uvicorn's own for
#: "application startup failed".
LOAD_FAILURE_EXIT = 3

_JSON_HEADERS = [(b"content-type", b"application/json")]
_AUTH_HEADERS = [*_JSON_HEADERS, (b"www-authenticate", b"Bearer")]
_FAULT_HEADERS = [*_JSON_HEADERS, (b"x-fault-injected", b"1")]
_ENCODING_HEADERS = [*_JSON_HEADERS, (b"accept-encoding", b"identity")]

#: The rest of a body that stopped arriving (408), or was cut or refused unread (413), may still
#: come: the connection cannot be reused. Kept open, its sender could trickle that rest for ever.
#: A 413 whose body was drained to its end is closed too: one rule, for a rare client.
_CLOSE_HEADERS = [*_JSON_HEADERS, (b"connection", b"close")]
_BODY_LEFT_UNREAD = frozenset({408, 413})  # the answers after which the connection is closed
#: A 429's body was dropped, and may not have all arrived (its drain timed out): closed as well.
_RETRY_HEADERS = [*_CLOSE_HEADERS, (b"retry-after", b"1")]
_UPGRADE_LOST_BODY = orjson.dumps(
    {
        "error": "no request body arrived: this server speaks HTTP/1.1 only, and a request "
        "offering another protocol (Upgrade: h2c) loses its body on the way in; send it "
        "without the Upgrade header (Java HttpClient: version HTTP_1_1)"
    }
)


class FaultSetting(BaseModel):
    """The fault knob's setting (PUT /admin/fault body and GET answer)."""

    # NaN passes neither bound check nor JSON serialisation: refuse it as bad input (422). So
    # are a numeric string or a boolean (strict), and an unknown field such as "latency": it was
    # dropped, the answer 200, and the knob set to something other than what was asked.
    model_config = ConfigDict(allow_inf_nan=False, strict=True, extra="forbid")

    error_rate: float = Field(0.0, ge=0.0, le=1.0, description="probability of an injected 500")
    latency_ms: float = Field(0.0, ge=0.0, le=60_000, description="latency added to each request")


class ScoreResponse(BaseModel):
    """The answer of POST /score."""

    predictions: list[float]
    model: str
    version: str
    colour: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer."""

    error: str


@dataclass(slots=True)
class ServerState:
    """Mutable state of one server: the model once loaded, metrics, fault knob and limits."""

    colour: str
    registry: CollectorRegistry
    fault: FaultKnob
    api_keys: tuple[bytes, ...]
    max_body_bytes: int
    max_rows: int
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    max_buffered_body_bytes: int = DEFAULT_MAX_BUFFERED_BODY_BYTES
    #: Bytes of /score bodies held now (BodyHold; changed on the event loop only).
    buffered_body_bytes: int = 0
    #: The server has begun to stop (`begin_shutdown`).
    stopping: bool = False
    #: The deadlines of the bodies being read now, moved up when the server begins to stop.
    body_deadlines: set[asyncio.Timeout] = field(default_factory=set)
    scorer: Scorer | None = None
    metrics: ScoringMetrics | None = None
    load_error: str | None = None
    #: Where a model off the linear fast path predicts: one thread, so requests take turns as
    #: they did on the loop (no more CPU than before), and the loop stays free.
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="scoring-predict")
    )
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, model: LoadedModel) -> None:
        """Make `model` the one served (called once, at start or by the background loader)."""
        with self._lock:
            self.metrics = ScoringMetrics(self.registry, model.identity, self.colour)
            self.metrics.show_fault(self.fault.error_rate, self.fault.latency_ms)
            self.scorer = Scorer(model, self.colour, self.max_rows)

    def begin_shutdown(self) -> None:
        """The server begins to stop (on the event loop; more calls change nothing): a body
        still arriving has SHUTDOWN_BODY_GRACE_S more at most, then its 408 with the connection
        closed, instead of being cut when the graceful timeout ends."""
        if self.stopping:
            return
        self.stopping = True
        when = asyncio.get_running_loop().time() + SHUTDOWN_BODY_GRACE_S
        for deadline in self.body_deadlines:
            due = deadline.when()
            if due is None or due > when:
                deadline.reschedule(when)

    def set_fault(self, error_rate: float, latency_ms: float) -> None:
        """Turn the fault knob (logged and exported)."""
        self.fault.set(error_rate, latency_ms)
        if self.metrics is not None:
            self.metrics.show_fault(error_rate, latency_ms)

    def authorised(self, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        """True without keys, or when `Authorization: Bearer <key>` matches one (constant time)."""
        if not self.api_keys:
            return True
        presented = b""
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    presented = token.strip()
                break
        ok = False
        for key in self.api_keys:  # no early exit: timing must not tell which key matched
            ok |= hmac.compare_digest(presented, key)
        return ok


class BodyHold:
    """What one request's body holds of the server's cap on bodies buffered at once
    (`ServerState.max_buffered_body_bytes`): taken as the body arrives, all given back when the
    body is dropped or the request ends. Used on the event loop only, so without a lock."""

    __slots__ = ("gauge", "held", "state")

    def __init__(self, state: ServerState, gauge: Gauge) -> None:
        self.state = state
        self.gauge = gauge
        self.held = 0

    def take(self, size: int) -> bool:
        """Hold `size` more bytes; False, holding no more, when the total would pass the cap."""
        state = self.state
        if state.buffered_body_bytes + size > state.max_buffered_body_bytes:
            return False
        state.buffered_body_bytes += size
        self.held += size
        self.gauge.set(state.buffered_body_bytes)
        return True

    def release(self) -> None:
        """Give back all this request holds."""
        if self.held:
            self.state.buffered_body_bytes -= self.held
            self.held = 0
            self.gauge.set(self.state.buffered_body_bytes)


def is_loopback(host: str) -> bool:
    """Whether a peer address is this machine's loopback (127.0.0.0/8, ::1).

    A server bound to `::` accepts IPv4 too, and sees a local IPv4 client as ::ffff:127.0.0.1.
    """
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _error(message: str) -> bytes:
    return orjson.dumps({"error": message})


class ScoreEndpoint:
    """Raw ASGI endpoint for POST /score (see the module docstring for why it is raw)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        metrics = state.metrics
        scorer = state.scorer
        if metrics is None or scorer is None:
            failed = state.load_error
            message = f"model failed to load: {failed}" if failed else "model not loaded yet"
            await _send(send, 503, _error(message), _JSON_HEADERS)
            return
        started = time.perf_counter()
        metrics.in_flight.inc()
        status, cut = 500, False
        hold = BodyHold(state, metrics.buffered_body)
        try:
            status, body, headers = await self._answer(scope, receive, scorer, metrics, hold)
            await _send(send, status, body, headers)
        except Exception:
            log.exception("unexpected error while scoring")
            await _send(send, 500, _error("internal error while scoring"), _JSON_HEADERS)
        except asyncio.CancelledError:
            # Still running when the server's graceful stop ran out (SHUTDOWN_TIMEOUT_S):
            # uvicorn answers it 500 itself, counted so; the time it was cut at is no latency of
            # the model's, kept out of the histogram a judge reads.
            status, cut = 500, True
            raise
        finally:
            hold.release()
            metrics.in_flight.dec()
            metrics.count(status)
            # A body that never arrived measured the client's silence, not the model: kept out
            # of the histogram a judge reads (a stalled client once put ~95 s in it).
            if status not in _BODY_NEVER_ARRIVED and not cut:
                metrics.observe_latency(time.perf_counter() - started)

    async def _answer(
        self,
        scope: Scope,
        receive: Receive,
        scorer: Scorer,
        metrics: ScoringMetrics,
        hold: BodyHold,
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        state = self.state
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if not state.authorised(headers):
            return (
                401,
                _error("missing or invalid API key (Authorization: Bearer <key>)"),
                _AUTH_HEADERS,
            )
        for name, value in headers:
            if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
                # Decoded as is, a gzip body was a 400 "malformed JSON: not valid UTF-8".
                encoding = value.strip()[:64].decode("latin-1")
                message = (
                    f"Content-Encoding {encoding} is not supported: send the body uncompressed"
                )
                return 415, _error(message), _ENCODING_HEADERS
        body = await _read_body(headers, receive, state.max_body_bytes, state, hold)
        if isinstance(body, InputError):
            if body.status in _BODY_LEFT_UNREAD:
                answer_headers = _CLOSE_HEADERS
            elif body.status == 429:
                answer_headers = _RETRY_HEADERS
            else:
                answer_headers = _JSON_HEADERS
            return body.status, _error(body.message), answer_headers
        if not body and any(name == b"upgrade" for name, _ in headers):
            # uvicorn's httptools parser drops the body of a request offering an upgrade it
            # does not take (uvicorn #2722), and Java's HttpClient offers h2c on every request:
            # "empty request body" sent the client looking for a bug in its payload.
            return 400, _UPGRADE_LOST_BODY, _JSON_HEADERS
        if state.fault.active:
            draw = state.fault.draw()
            if draw.delay_s > 0:
                metrics.fault_delays.inc()
                await asyncio.sleep(draw.delay_s)
            if draw.error:
                metrics.fault_errors.inc()
                return 500, _error("injected fault (fault knob is on)"), _FAULT_HEADERS
        try:
            if scorer.inline:
                answer = scorer.score(body)
            else:
                loop = asyncio.get_running_loop()
                answer = await loop.run_in_executor(state.executor, scorer.score, body)
        except InputError as exc:
            return exc.status, _error(exc.message), _JSON_HEADERS
        return 200, orjson.dumps(answer), _JSON_HEADERS


#: Statuses of a /score request whose body never (fully) arrived: 408 timed out, 499 the client
#: went away (nginx's code; nobody receives the answer).
_BODY_NEVER_ARRIVED = frozenset({408, 499})


async def _read_body(
    headers: Sequence[tuple[bytes, bytes]],
    receive: Receive,
    limit: int,
    state: ServerState,
    hold: BodyHold | None = None,
) -> bytes | InputError:
    """The request body, or an InputError: 413 when it exceeds `limit`, 429 when `hold` cannot
    take it (as it arrives), 408 when it has not all
    arrived within the body timeout (less once the server stops: SHUTDOWN_BODY_GRACE_S), 499
    when the client disconnected.

    A body refused before its end is still read to it and dropped before the answer (see
    DRAIN_FACTOR), unless it is over DRAIN_FACTOR times the limit: refused unread when its
    Content-Length says so, else cut once that much has come.
    """
    declared = _content_length(headers)
    if isinstance(declared, InputError):
        return declared
    refusal: InputError | None = None  # decided before the body's end: the rest is dropped
    if declared is not None and declared > limit:
        refusal = InputError(f"request body of {declared} bytes exceeds {limit} bytes", 413)
        if declared > DRAIN_FACTOR * limit:
            return refusal
    # Bytes are charged to the hold as they arrive, a declared length's too: charged whole up
    # front, 32 idle connections declaring 1 MiB each and sending nothing made every request a
    # 429 for the body timeout, with no memory held.
    chunks: list[bytes] = []
    size = 0
    timeout_s = state.body_timeout_s
    if state.stopping:
        timeout_s = min(timeout_s, SHUTDOWN_BODY_GRACE_S)
    try:
        async with asyncio.timeout(timeout_s) as deadline:
            state.body_deadlines.add(deadline)
            try:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return InputError("client disconnected before sending the body", 499)
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit and (refusal is None or refusal.status != 413):
                        refusal = InputError(f"request body exceeds {limit} bytes", 413)
                    if refusal is None and hold and not hold.take(len(chunk)):
                        refusal = _too_busy(hold)
                    if refusal is None:
                        chunks.append(chunk)
                    else:
                        chunks.clear()  # dropped: only the body's end is waited for now
                        if hold is not None:
                            hold.release()
                        if size > DRAIN_FACTOR * limit:
                            return refusal  # cut: the connection is closed with the rest unread
                    if not message.get("more_body", False):
                        break
            finally:
                state.body_deadlines.discard(deadline)
    except TimeoutError:
        if refusal is not None:
            # Decided before the rest was late: its answer, not a 408 (one a client may retry,
            # with the same body again). The connection is closed after either.
            return refusal
        if state.stopping:
            return InputError("request body not all received before the server stopped", 408)
        return InputError(f"request body not received within {timeout_s:g} s", 408)
    if refusal is not None:
        return refusal
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | InputError | None:
    """The declared Content-Length; None without one (chunked); a 400 when it is no number."""
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return InputError("invalid Content-Length header", 400)
    return None


def _too_busy(hold: BodyHold) -> InputError:
    cap = hold.state.max_buffered_body_bytes
    message = f"too many request bodies arriving at once (over {cap} bytes): retry in a second"
    return InputError(message, 429)


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _validation_message(exc: RequestValidationError | ValidationError) -> str:
    """One line naming each bad field and why, without echoing the input back."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(x) for x in error.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route of `app` answers on the request's path."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def _score_openapi(
    n_features: int | None, feature_names: Sequence[str], max_rows: int
) -> dict[str, Any]:
    row: dict[str, Any] = {"type": "array", "items": {"type": "number"}}
    if n_features is not None:
        row |= {
            "minItems": n_features,
            "maxItems": n_features,
            "description": "one value per feature, in order: " + ", ".join(feature_names),
        }
    request_schema = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "array", "minItems": 1, "maxItems": max_rows, "items": row}
        },
    }
    error = {"$ref": "#/components/schemas/ErrorResponse"}

    def answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    return {
        "summary": "Score rows with the served model",
        "operationId": "score_post",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": request_schema}},
        },
        "responses": {
            "200": answer("predictions", {"$ref": "#/components/schemas/ScoreResponse"}),
            "400": answer("malformed JSON or unreadable body", error),
            "401": answer("missing or invalid API key", error),
            "408": answer("body not all received in time", error),
            "413": answer("body or batch too large", error),
            "415": answer("compressed body (Content-Encoding other than identity)", error),
            "429": answer("too many bodies arriving at once: retry after Retry-After", error),
            "422": answer("well-formed JSON the model cannot score", error),
            "500": answer("injected fault or internal error", error),
            "503": answer("model not loaded yet", error),
        },
    }


def exit_on_load_failure(message: str) -> None:
    """End the process with LOAD_FAILURE_EXIT (for `create_app(on_load_failure=...)`).

    A server whose model cannot load must not run on with /healthz 200: Kubernetes would keep
    the pod Running and unready, never restarting it, and the deploy would wait its whole ready
    timeout to report "readiness probe failed". Exiting gives CrashLoopBackOff with the reason
    in the pod's logs. os._exit, from the loader thread: nothing is served yet, nothing to drain.
    """
    log.critical("exiting with status %d: the model cannot load (%s)", LOAD_FAILURE_EXIT, message)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(LOAD_FAILURE_EXIT)


def create_app(
    model: LoadedModel | Path | str,
    *,
    colour: str = "green",
    registry: CollectorRegistry | None = None,
    api_keys: Sequence[str] = (),
    fault: FaultKnob | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_rows: int = DEFAULT_MAX_ROWS,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    max_buffered_body_bytes: int = DEFAULT_MAX_BUFFERED_BODY_BYTES,
    version: str | None = None,
    on_load_failure: Callable[[str], object] | None = None,
) -> FastAPI:
    """The scoring application for one colour.

    `model` is a loaded model (the CLI loads it first so a bad model stops the start with a clear
    error) or a model/package folder, loaded in a background thread at startup while /readyz
    says 503 and /healthz 200 (a large model may take longer to load than a liveness probe
    waits for a port). A failed load is logged, /readyz says "failed", then `on_load_failure`
    gets the message: the image passes `exit_on_load_failure`, so the container restarts.
    `registry` defaults to a fresh CollectorRegistry (never the global one). A request body
    that has not all arrived `body_timeout_s` after the headers is answered 408; one that would
    take the bodies buffered at once past `max_buffered_body_bytes`, 429.
    """
    if max_body_bytes < 1 or max_rows < 1 or not body_timeout_s > 0:
        raise ValueError("max_body_bytes, max_rows and body_timeout_s must be positive")
    if max_buffered_body_bytes < max_body_bytes:
        # A body of the largest size allowed would be a 429 every time, retried for ever.
        raise ValueError(
            f"max_buffered_body_bytes ({max_buffered_body_bytes}) must be at least "
            f"max_body_bytes ({max_body_bytes})"
        )
    if (problem := api_key_problem(api_keys)) is not None:
        raise ValueError(problem)
    state = ServerState(
        colour=colour,
        registry=registry if registry is not None else CollectorRegistry(),
        fault=fault if fault is not None else FaultKnob(),
        api_keys=tuple(k.encode() for k in api_keys),
        max_body_bytes=max_body_bytes,
        max_rows=max_rows,
        body_timeout_s=body_timeout_s,
        max_buffered_body_bytes=max_buffered_body_bytes,
    )
    pending: Path | None = None
    if isinstance(model, LoadedModel):
        state.install(model)
    else:
        pending = Path(model)

    def load_in_background(path: Path) -> None:
        try:
            state.install(load_model(path, version=version))
        except ModelLoadError as exc:
            state.load_error = str(exc)
            log.error("cannot serve %s: %s", path, exc)
        except Exception as exc:  # any other failure must not leave /readyz saying "loading"
            state.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("cannot serve %s", path)
        else:
            return
        if on_load_failure is not None:
            on_load_failure(state.load_error)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        if pending is not None:
            threading.Thread(target=load_in_background, args=(pending,), daemon=True).start()
        try:
            # uvicorn hands this state to scoring.httpguard's protocol, which calls it when the
            # server begins to stop.
            yield {BEGIN_SHUTDOWN: state.begin_shutdown}
        finally:
            # Uvicorn has drained the requests it waited for; a predict still running (past
            # the graceful timeout) finishes on its own, nobody left to answer.
            state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="aml-rollout scoring",
        summary=f"{colour} scoring server",
        version="1",
        lifespan=lifespan,
        # Not a 307 to /score with an empty body for POST /score/: curl printed nothing at all
        # (and a client that does not follow redirects got no error to read). A 404 that says
        # where to score instead.
        redirect_slashes=False,
        # With keys, the schema routes are added further down, behind the key: the document
        # names the model's features, as GET /score (keyed) does.
        openapi_url=None if state.api_keys else "/openapi.json",
        docs_url=None if state.api_keys else "/docs",
        redoc_url=None if state.api_keys else "/redoc",
    )
    app.state.scoring = state

    # Every error answer is {"error": ...} (FastAPI's defaults say {"detail": ...}), and bad
    # input never becomes a 5xx: the default 422 handler echoes the input back, and a NaN in
    # it could not be serialised (500).
    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = exc.headers
        message = str(exc.detail)
        if exc.status_code == 404:
            # Starlette says "Not Found": say where scoring is (a client of another server
            # posts to /predict or /invocations).
            message = f"no such route: {ROUTES_HINT}"
        elif exc.status_code == 405:
            # Starlette's Allow names the first route on the path only; /score and /admin/fault
            # have two (POST and GET, PUT and GET).
            allowed = ", ".join(_allowed_methods(app, request))
            others = {k: v for k, v in (headers or {}).items() if k.lower() != "allow"}
            headers = {**others, "allow": allowed}
            message = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=headers)

    app.router.routes.insert(0, Route("/score", ScoreEndpoint(state), methods=["POST"]))

    def require_key(request: Request) -> JSONResponse | None:
        if state.authorised(request.scope["headers"]):
            return None
        return JSONResponse(
            {"error": "missing or invalid API key (Authorization: Bearer <key>)"},
            status_code=401,
            headers={"www-authenticate": "Bearer"},
        )

    if state.api_keys:
        # GET and HEAD, as FastAPI's own routes these replace take them.

        @app.api_route("/openapi.json", methods=["GET", "HEAD"], include_in_schema=False)
        async def openapi_document(request: Request) -> Response:
            return require_key(request) or JSONResponse(app.openapi())

        @app.api_route("/docs", methods=["GET", "HEAD"], include_in_schema=False)
        async def swagger_ui(request: Request) -> Response:
            title = f"{app.title} - Swagger UI"
            return require_key(request) or get_swagger_ui_html(
                openapi_url="/openapi.json", title=title
            )

        @app.api_route("/redoc", methods=["GET", "HEAD"], include_in_schema=False)
        async def redoc(request: Request) -> Response:
            title = f"{app.title} - ReDoc"
            return require_key(request) or get_redoc_html(openapi_url="/openapi.json", title=title)

    def not_ready() -> JSONResponse:
        status = "failed" if state.load_error else "loading"
        detail = state.load_error or "model not loaded yet"
        return JSONResponse({"status": status, "error": detail}, status_code=503)

    @app.get("/score", responses={401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def identity(request: Request) -> Response:
        """The model identity and colour this server serves."""
        if (denied := require_key(request)) is not None:
            return denied
        if state.scorer is None:
            return not_ready()
        return Response(orjson.dumps(state.scorer.identity()), media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive (says nothing about the model)."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz() -> Response:
        """200 once the model is loaded and the server can score; 503 before (or if it failed)."""
        if state.scorer is None:
            return not_ready()
        ident = state.scorer.model.identity
        return JSONResponse({"status": "ready", "model": ident.name, "version": ident.version})

    # HEAD too: some load balancers and uptime checks probe with it, and read a 405 as "down".
    # Outside the schema: one function under two methods would repeat its OpenAPI operation id.
    for path, probe in (("/healthz", healthz), ("/readyz", readyz), ("/score", identity)):
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics of this server."""
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    def admin_guard(request: Request) -> JSONResponse | None:
        if request.client is None or not is_loopback(request.client.host):
            return JSONResponse({"error": "the admin route only answers loopback clients"}, 403)
        # A local proxy (the stack's Envoy) connects from loopback too: its requests come from
        # anywhere. The Envoy route table refuses /admin as well; this holds where it does not
        # (another proxy, a percent-encoded path that its prefix match misses).
        if any(k in PROXY_HEADERS or k.startswith(PROXY_HEADER_PREFIX) for k in request.headers):
            return JSONResponse(
                {"error": "the admin route does not answer requests relayed by a proxy"}, 403
            )
        return require_key(request)

    @app.get(
        "/admin/fault",
        response_model=FaultSetting,
        responses={code: {"model": ErrorResponse} for code in (401, 403)},
    )
    async def get_fault(request: Request) -> Any:
        """The fault knob's current setting."""
        if (denied := admin_guard(request)) is not None:
            return denied
        return FaultSetting(error_rate=state.fault.error_rate, latency_ms=state.fault.latency_ms)

    @app.put(
        "/admin/fault",
        response_model=FaultSetting,
        responses={code: {"model": ErrorResponse} for code in (400, 401, 403, 413, 422)},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": FaultSetting.model_json_schema()}},
            }
        },
    )
    async def put_fault(request: Request) -> Any:
        """Set the fault knob (demos and tests): injected 500s and added latency."""
        # The body is read here, after the guard, not declared as a parameter: FastAPI would read
        # and parse a body of any size from any client before the guard could refuse it.
        if (denied := admin_guard(request)) is not None:
            return denied
        body = await _read_body(
            request.scope["headers"], request.receive, ADMIN_MAX_BODY_BYTES, state
        )
        if isinstance(body, InputError):
            close = {"connection": "close"} if body.status in _BODY_LEFT_UNREAD else None
            return JSONResponse({"error": body.message}, body.status, headers=close)
        try:
            setting = FaultSetting.model_validate_json(body)
        except ValidationError as exc:
            return JSONResponse({"error": _validation_message(exc)}, 422)
        state.set_fault(setting.error_rate, setting.latency_ms)
        return setting

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["ScoreResponse"] = ScoreResponse.model_json_schema()
            components["ErrorResponse"] = ErrorResponse.model_json_schema()
            model_ = state.scorer.model if state.scorer else None
            schema["paths"].setdefault("/score", {})["post"] = _score_openapi(
                model_.n_features if model_ else None,
                model_.feature_names if model_ else (),
                state.max_rows,
            )
            if model_ is not None:  # cache only the complete document
                app.openapi_schema = schema
            return schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
