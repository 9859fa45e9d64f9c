"""The request-head guard (scoring.httpguard) on a real uvicorn, over raw sockets.

Bounds are shrunk (a 4 KiB head, 0.3 s for it, 0.6 s of keep-alive) so each case takes well
under a second; `serve` and the image use the module's values (test_serve_cli.py and
tests/pipelines/test_package.py check that they do).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from scoring.httpguard import GuardedHttpToolsProtocol
from tests.scoring.conftest import running_server

HEAD_CAP = 4096
HEAD_TIMEOUT_S = 0.3
KEEP_ALIVE_S = 0.6


class SmallGuard(GuardedHttpToolsProtocol):
    max_head_bytes = HEAD_CAP
    head_timeout_s = HEAD_TIMEOUT_S


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers 200 with the body's length; `?slow` first waits one head timeout and more."""
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    if scope["query_string"] == b"slow":
        await asyncio.sleep(HEAD_TIMEOUT_S * 2)
    body = str(size).encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with running_server(
        echo,
        lifespan="off",
        http=SmallGuard,
        loop="uvloop",
        timeout_keep_alive=KEEP_ALIVE_S,
    ) as url:
        yield int(url.rsplit(":", 1)[1])


def request(path: str = "/", *, headers: bytes = b"", body: bytes = b"") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n".encode()
        + headers
        + b"\r\n"
        + body
    )


def until_closed(conn: socket.socket, within: float = 3.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (monotonic);
    fails if it is still open after `within` seconds."""
    conn.settimeout(within)
    received = b""
    try:
        while chunk := conn.recv(65536):
            received += chunk
    except TimeoutError:
        pytest.fail(f"still open after {within} s; received {received[:200]!r}")
    except ConnectionResetError:
        pass  # closed with unread bytes of ours in its buffer: a reset, still a close
    return received, time.monotonic()


@pytest.mark.parametrize(
    ("sent", "status", "bound"),
    [
        # Was held for ever: uvicorn's keep-alive timer starts only after a first answer.
        pytest.param(b"", None, KEEP_ALIVE_S, id="nothing-sent-closed-after-keep-alive"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\n", b"408", HEAD_TIMEOUT_S, id="half-a-head-408"
        ),
        pytest.param(b"P", b"408", HEAD_TIMEOUT_S, id="one-byte-408"),
    ],
)
def test_a_connection_that_does_not_complete_a_head_is_closed(
    port: int, sent: bytes, status: bytes | None, bound: float
) -> None:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        started = time.monotonic()
        conn.sendall(sent)
        received, closed = until_closed(conn)
    assert bound * 0.9 <= closed - started < bound + 1.0
    if status is None:
        assert received == b""
    else:
        assert received.startswith(b"HTTP/1.1 " + status), received
        assert b"connection: close" in received
        assert b"request head not received within 0.3 s" in received


def test_a_head_sent_a_byte_at_a_time_does_not_extend_its_deadline(port: int) -> None:
    # Was: 500 connections each sending a header byte every 10 s were all still open at 90 s.
    head = request(headers=b"X-Slow: " + b"a" * 100 + b"\r\n")
    with socket.create_connection(("127.0.0.1", port)) as conn:
        started = time.monotonic()
        conn.settimeout(0.05)
        received = b""
        for byte in head[:-4]:  # never the blank line that ends the head
            try:
                conn.send(bytes([byte]))
                received = conn.recv(4096)
                break  # answered (408) or closed (b"")
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        assert time.monotonic() - started < HEAD_TIMEOUT_S + 1.0
    assert received.startswith(b"HTTP/1.1 408"), received


def test_a_head_over_the_cap_is_answered_431_and_closed(port: int) -> None:
    # Was: a 64 MiB header value read whole (the process grew by 73 MB), then the request served.
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nX-Big: ")
        started = time.monotonic()
        try:
            for _ in range(64):  # up to 1 MiB of one header value, never finished
                conn.sendall(b"a" * 16384)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed by the server part-way: the point
        received, closed = until_closed(conn)
    assert received.startswith(b"HTTP/1.1 431"), received[:200]
    assert f"request head larger than {HEAD_CAP} bytes".encode() in received
    assert closed - started < HEAD_TIMEOUT_S  # at the cap, not at the deadline


@pytest.mark.parametrize(
    ("chunks", "answer"),
    [
        pytest.param(
            [request(headers=b"X-Pad: " + b"a" * 3000 + b"\r\n")], b"0", id="head-under-cap"
        ),
        # The cap counts head bytes only: a body far above it, in the same read as its head.
        pytest.param([request(body=b"b" * 200_000)], b"200000", id="big-body-same-read"),
        pytest.param(
            [b"POST / HTTP/1.1\r\nHost: x\r\n", b"Content-Length: 2\r\n\r\nhi"],
            b"2",
            id="head-in-two-reads",
        ),
    ],
)
def test_complete_heads_under_the_cap_are_served(
    port: int, chunks: list[bytes], answer: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as conn:
        for chunk in chunks:
            conn.sendall(chunk)
            time.sleep(HEAD_TIMEOUT_S / 3)
        received = conn.recv(65536)
    assert received.startswith(b"HTTP/1.1 200"), received
    assert received.endswith(b"\r\n\r\n" + answer)


def test_a_slow_answer_and_keep_alive_are_not_cut_by_the_head_deadline(port: int) -> None:
    # The deadline covers the head only: an answer taking two head timeouts arrives, and the
    # connection then stays open for its keep-alive, not its head deadline.
    with socket.create_connection(("127.0.0.1", port), timeout=3) as conn:
        conn.sendall(request("/?slow", body=b"abc"))
        assert conn.recv(65536).endswith(b"\r\n\r\n3")
        time.sleep(HEAD_TIMEOUT_S * 1.5)
        conn.sendall(request(body=b"abcd"))
        assert conn.recv(65536).endswith(b"\r\n\r\n4")
        started = time.monotonic()
        received, closed = until_closed(conn)
    assert received == b""
    assert KEEP_ALIVE_S * 0.9 <= closed - started < KEEP_ALIVE_S + 1.0


def test_a_stalled_pipelined_head_waits_for_the_answer_before_it(port: int) -> None:
    # The head deadline passes while the request before it is still being answered: that
    # answer is sent whole, then the 408, then the close (not a 408 inside the answer).
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(request("/?slow", body=b"abc") + b"POST / HTTP/1.1\r\nHo")
        received, _ = until_closed(conn)
    first, _, rest = received.partition(b"\r\n\r\n3")
    assert first.startswith(b"HTTP/1.1 200"), received
    assert rest.startswith(b"HTTP/1.1 408"), received


def test_a_later_head_on_a_kept_alive_connection_gets_its_own_deadline(port: int) -> None:
    # The deadline runs from the first byte of each head, not from the connection's first
    # request (one timer per connection watches them all).
    with socket.create_connection(("127.0.0.1", port), timeout=3) as conn:
        for _ in range(2):
            conn.sendall(request(body=b"ab"))
            assert conn.recv(65536).endswith(b"\r\n\r\n2")
            time.sleep(HEAD_TIMEOUT_S / 2)
        conn.sendall(b"POST / HTTP/1.1\r\nHo")
        started = time.monotonic()
        received, closed = until_closed(conn)
    assert received.startswith(b"HTTP/1.1 408"), received
    assert HEAD_TIMEOUT_S * 0.9 <= closed - started < HEAD_TIMEOUT_S + 1.0
