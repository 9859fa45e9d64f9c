"""Bounds uvicorn lacks on a connection's request head, for the scoring server.

uvicorn bounds the wait *between* requests (`timeout_keep_alive`, armed once an answer is
sent), and the scoring app bounds a body (`--max-body-bytes`, 30 s). Nothing bounds the head:

- its size: httptools (what `serve` and the image run) has no cap (uvicorn's
  `h11_max_incomplete_event_size` is h11's only); a 64 MiB header value was read whole, and
  the process grew by 73 MB;
- its time: a connection that sent nothing, or its headers a byte at a time, was never closed
  (500 of them held 500 file descriptors for as long as their clients liked).

`GuardedHttpToolsProtocol` closes those gaps, handed to uvicorn as its HTTP protocol
(`uvicorn.Config(http=...)`, `uvicorn --http scoring.httpguard:GuardedHttpToolsProtocol`):
uvicorn's httptools protocol, plus a cap on a request head (`MAX_HEAD_BYTES`: 431 and closed),
a deadline for it once it has begun (`HEAD_TIMEOUT_S`: 408 and closed), and, before a first
request, the keep-alive timeout the server already applies between requests (closed). An idle
connection thus lasts the documented keep-alive (75 s) whether or not it has sent a request
yet, which the proxy in front relies on: it closes its idle connections first. The Event Grid
webhook (aml_pipelines.trigger.webhook) runs on it too, with its own head deadline, which also
bounds the wait before a first request (`idle_timeout_s`).

It also tells the app when the server begins to stop, which ASGI has no message for (lifespan's
shutdown comes only once the requests in flight are done): an app whose lifespan state holds a
callable under `BEGIN_SHUTDOWN` has it called then, once per open connection. The scoring app
uses it to answer a body still arriving 408 before uvicorn's graceful timeout cancels the
request (which uvicorn answers 500).

This module imports only asyncio and uvicorn: it ships in the model package with the server.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

#: Bytes of one request head (request line and headers) over which it is refused with 431 and
#: the connection closed. Envoy and Istio cap headers at 60 KiB: nothing they relay is refused.
#: Counted by what the socket delivers while the head is incomplete, so a head ending within a
#: read is not counted at all and a refusal comes within one read (256 KiB) of the cap.
MAX_HEAD_BYTES = 64 * 1024
#: Seconds from a request head's first byte to its last: a client sends a head at once.
HEAD_TIMEOUT_S = 10.0
#: The lifespan state key of a callable to call when the server begins to stop (see above).
BEGIN_SHUTDOWN = "scoring.begin_shutdown"


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a size cap and a deadline on each request head, and
    the keep-alive timeout before a first request too (see the module docstring)."""

    max_head_bytes: int = MAX_HEAD_BYTES
    head_timeout_s: float = HEAD_TIMEOUT_S
    #: Seconds a connection may wait with no request begun where uvicorn's keep-alive timer is
    #: not armed (before its first request); None: that keep-alive timeout.
    idle_timeout_s: float | None = None

    def connection_made(  # type: ignore[override]  # as uvicorn's: a TCP transport
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        self._awaiting_head = True  # from the end of one request to the end of the next head
        self._head_bytes = 0
        self._heads = 0  # heads completed: tells a read that finished one from one that did not
        self._head_began: float | None = None  # loop time of the first byte of the current head
        # One timer per connection checks the head deadline, not one per request: arming and
        # cancelling one for each head doubled the guard's cost (~1 µs more a request).
        self._watch: asyncio.TimerHandle | None = None
        # uvicorn arms its keep-alive timer only once an answer is sent: a connection that never
        # sent a request was held for ever.
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        begin = self.app_state.get(BEGIN_SHUTDOWN)
        if begin is not None:
            begin()
        super().shutdown()

    def data_received(self, data: bytes) -> None:
        kept_alive = self.timeout_keep_alive_task is not None  # uvicorn's: cancelled by any byte
        counting, heads = self._awaiting_head, self._heads
        super().data_received(data)
        if kept_alive and self._heads == heads and self._head_began is None:
            self._idle()  # bytes that began no request (blank lines) do not make it busy
        if not counting or not self._awaiting_head or self._heads != heads:
            # A read that completed a head, or began in a body, is not counted: what it held
            # of a next head is not told apart from the body before it.
            return
        self._head_bytes += len(data)
        if self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
            self._refuse(431, f"request head larger than {self.max_head_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._head_began = self.loop.time()
        if self._watch is None:
            self._watch = self.loop.call_later(self.head_timeout_s, self._check_head)

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._head_bytes = 0
        self._heads += 1
        self._head_began = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_head = True

    def _idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        timeout = self.timeout_keep_alive if self.idle_timeout_s is None else self.idle_timeout_s
        self._idle_timer = self.loop.call_later(timeout, self.timeout_keep_alive_handler)

    def _check_head(self) -> None:
        self._watch = None
        if self._head_began is None or self.transport.is_closing():
            return  # the next head arms it again
        left = self._head_began + self.head_timeout_s - self.loop.time()
        if left > 0 or self._answering():
            # Not late yet; or a pipelined head behind a request still being answered: that
            # answer first.
            self._watch = self.loop.call_later(
                left if left > 0 else self.head_timeout_s, self._check_head
            )
            return
        self._refuse(408, f"request head not received within {self.head_timeout_s:g} s")

    def _answering(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` with `message` and close: the head was never complete, so no app saw
        the request (uvicorn's own 400 for a malformed head is written the same way)."""
        self._cancel_timers()
        if self._answering():
            # Our answer would land inside the one being sent for the request before.
            self.transport.close()
            return
        body = message.encode("ascii")
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._idle_timer, self._watch):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._watch = None
