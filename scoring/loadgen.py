"""The load generator: bounded scoring traffic with per-version counts (load_test.sh, grown up).

The seed's `load_test.sh 10 $GATEWAY_IP/score blue` curled a URL N times and showed which version
answered. `run_load` does that at a constant rate (or flat out), with `concurrency` connections,
over a request count or a duration (one of them is required: load is always bounded), and counts:

- by version: `colour/model:version` read from each answer's body (what the server says it is),
- by status: HTTP status code, or the transport error's class name (ConnectError, ReadTimeout),
  or `Timeout` for a request with no complete answer within `timeout` (the whole request's bound),
- latency: a log-bucketed histogram (1 % resolution) so p50/p99 cost bounded memory however
  long it runs. Only HTTP answers (any status) are timed: a refused connection "takes"
  microseconds and a timeout takes `timeout`, neither of which is a server's latency. With a
  rate, a request is timed from when it was due, not from when a connection was free to send
  it: what a client on that schedule waits (timing from the send hides a server too slow for
  the rate, "coordinated omission"). Flat out, it is timed from the send.

A run where no request got a 2xx answer failed as a whole; `failure_hint` says the likely cause
in one line (no key, nothing listening, no answer in time), and `aml-rollout load` exits 1.

Pacing is open-loop: request i is due at start + i/rps, whoever is free sends it, so a slow
server does not slow the offered rate down (until all `concurrency` connections are busy). The
run ends at `duration` either way: requests still waiting for a connection then are not sent,
and those in flight get up to `timeout` to finish.
Payloads are real held-out diabetes rows (the model folder's sample-input.json, or a fixed split
of the bundled data set), one row per request unless `batch` says more. `colour` sets the
`x-api-version` header, which pins a colour at the router.

`BackgroundLoad` runs the same loop on its own thread and event loop for the demo and the
benchmarks: `snapshot()` reads running counts at any time, `stop()` ends it and returns the report.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

MAX_DURATION_S = 24 * 3600.0
MAX_REQUESTS = 100_000_000
_LOG_STEP = math.log(1.01)


class LatencyHistogram:
    """Latencies in log buckets 1 % wide: quantiles within 1 %, memory bounded by the range."""

    def __init__(self) -> None:
        self._buckets: Counter[int] = Counter()
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def record(self, seconds: float) -> None:
        """Add one latency."""
        self._buckets[math.floor(math.log(max(seconds, 1e-7)) / _LOG_STEP)] += 1
        self.count += 1
        self.total += seconds
        self.max = max(self.max, seconds)

    def quantile(self, q: float) -> float:
        """The q-quantile in seconds (upper edge of its bucket, capped by the max); 0 if empty."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen >= rank:
                return min(math.exp((index + 1) * _LOG_STEP), self.max)
        return self.max

    def copy(self) -> LatencyHistogram:
        """An independent copy."""
        other = LatencyHistogram()
        other._buckets = self._buckets.copy()
        other.count, other.total, other.max = self.count, self.total, self.max
        return other


@dataclass(frozen=True)
class LoadReport:
    """What a load run saw; `by_version` keys are `colour/model:version`."""

    sent: int
    elapsed_s: float
    by_status: dict[str, int]
    by_version: dict[str, int]
    #: Latency of HTTP answers only (transport errors are not timed); 0 when there were none.
    #: With a rate, from each request's due time (its wait for a connection included).
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    #: Requests that got an HTTP answer (any status), as opposed to a transport error.
    answered: int = 0
    #: The first error answer (4xx/5xx): its status and what the server said, on one line;
    #: without one, the first transport error (`ConnectError: ...`).
    first_error: str | None = None

    @property
    def ok(self) -> int:
        """Answers with status 200."""
        return self.by_status.get("200", 0)

    @property
    def succeeded(self) -> int:
        """Answers with a 2xx status."""
        return sum(n for status, n in self.by_status.items() if _is_2xx(status))

    @property
    def rps(self) -> float:
        """Achieved requests per second."""
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (with the achieved rps)."""
        return {
            "sent": self.sent,
            "answered": self.answered,
            "succeeded": self.succeeded,
            "elapsed_s": round(self.elapsed_s, 3),
            "rps": round(self.rps, 1),
            "by_status": self.by_status,
            "by_version": self.by_version,
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "max_ms": round(self.max_ms, 3),
            "mean_ms": round(self.mean_ms, 3),
            "first_error": self.first_error,
        }


class LoadStats:
    """Running counts, written by the load loop and readable from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: Counter[str] = Counter()
        self._version: Counter[str] = Counter()
        self._latency = LatencyHistogram()
        self._started = time.monotonic()
        self._ended: float | None = None
        self.first_error: str | None = None
        #: The first transport error (no answer): reported only when no answer was an error.
        self.first_failure: str | None = None

    def record(self, status: str, version: str | None, seconds: float | None) -> None:
        """Count one request; `seconds` None for a transport error (no answer to time)."""
        with self._lock:
            self._status[status] += 1
            if version is not None:
                self._version[version] += 1
            if seconds is not None:
                self._latency.record(seconds)

    def start(self) -> None:
        """Mark the start of sending (elapsed time counts from here)."""
        self._started = time.monotonic()

    def finish(self) -> None:
        """Mark the end of sending."""
        self._ended = time.monotonic()

    def snapshot(self) -> LoadReport:
        """The counts so far."""
        with self._lock:
            latency = self._latency.copy()
            by_status = dict(sorted(self._status.items()))
            sent = sum(by_status.values())  # every request gets a status, answer or error
            by_version = dict(sorted(self._version.items()))
        end = self._ended if self._ended is not None else time.monotonic()
        return LoadReport(
            sent=sent,
            answered=latency.count,
            elapsed_s=end - self._started,
            by_status=by_status,
            by_version=by_version,
            p50_ms=latency.quantile(0.50) * 1000,
            p99_ms=latency.quantile(0.99) * 1000,
            max_ms=latency.max * 1000,
            mean_ms=latency.total / latency.count * 1000 if latency.count else 0.0,
            first_error=self.first_error or self.first_failure,
        )


def default_rows() -> list[list[float]]:
    """Held-out diabetes rows: the 20 % test split (seed 42) that train holds out by default."""
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    data = load_diabetes()
    _, x_test = train_test_split(data.data, test_size=0.2, random_state=42)
    rows: list[list[float]] = x_test.tolist()
    return rows


def read_sample(path: Path | str) -> list[list[float]]:
    """Rows from a sample-input.json (`{"data": [[...], ...]}`) or a model/package folder."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "sample-input.json", path / "model" / "sample-input.json"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ValueError(f"{path} holds no sample-input.json")
        path = found
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file or folder") from None
    except (OSError, ValueError) as exc:  # a folder's permissions, not UTF-8
        raise ValueError(
            f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})"
        ) from exc
    try:
        rows = json.loads(text)["data"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: expected a JSON object with a 'data' list ({exc})") from exc
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise ValueError(f"{path}: 'data' must be a non-empty list of rows")
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            # Python's json reads NaN and Infinity; httpx would send them as null, a 422 each.
            if isinstance(value, float) and not math.isfinite(value):
                name = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
                raise ValueError(
                    f"{path}: data[{i}][{j}] is {name}, which JSON cannot carry to the server; "
                    "give finite numbers"
                )
    return rows


def normalise_url(url: str) -> str:
    """Add http:// to a bare host[:port]/path (the seed passed `$GATEWAY_IP/score`).

    ValueError for what no request could go to (no host, another scheme, a port out of range),
    before any worker starts: one clear line instead of every worker failing at once.
    """
    full = url if "://" in url else f"http://{url}"
    try:
        parsed = httpx.URL(full)
    except httpx.InvalidURL as exc:
        raise ValueError(f"invalid URL {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"invalid URL {url!r}: expected [http(s)://]host[:port]/path")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ValueError(f"invalid URL {url!r}: port {parsed.port} is not within 1..65535")
    return full


def _is_2xx(status: str) -> bool:
    return len(status) == 3 and status.startswith("2") and status.isdigit()


def failure_hint(report: LoadReport, url: str, *, key_sent: bool = False) -> str | None:
    """One line on why no request got a 2xx answer; None when at least one did.

    `key_sent`: the requests carried an API key (a 401 then means a wrong one, not a missing one).
    """
    if report.succeeded:
        return None
    statuses = report.by_status
    if not statuses:
        return f"no request was sent to {url}"
    seen = ", ".join(f"{status} x{n}" for status, n in statuses.items())
    if "401" in statuses:
        if key_sent:
            return f"no request succeeded ({seen}); 401: the API key was refused (wrong key?)"
        return f"no request succeeded ({seen}); 401: set --api-key (or AML_ROLLOUT_API_KEY)"
    if "ConnectError" in statuses and not report.answered:
        why = report.first_error
        # httpx says a refused connection as "All connection attempts failed"; a host name that
        # does not resolve, a TLS failure and the like in their own words, given as they are.
        if why is None or any(s in why.lower() for s in ("refused", "all connection attempts")):
            return f"no request succeeded ({seen}): nothing is listening at {url}"
        return f"no request succeeded ({seen}): could not connect to {url} ({why})"
    if any(status.endswith("Timeout") for status in statuses) and not report.answered:
        return f"no request succeeded ({seen}): {url} did not answer within --timeout"
    said = f"; the first said {report.first_error}" if report.first_error else ""
    return f"no request to {url} got a 2xx answer ({seen}){said}"


def _error_of(response: httpx.Response) -> str:
    """`STATUS: message` of an error answer: its `error` field, else its text, on one line."""
    try:
        message = str(orjson.loads(response.content)["error"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = response.text
    message = " ".join(message.split()) or "(no body)"
    if len(message) > 200:
        message = message[:200] + "..."
    return f"{response.status_code}: {message}"


def _version_of(body: bytes) -> str | None:
    try:
        answer = orjson.loads(body)
        return f"{answer['colour']}/{answer['model']}:{answer['version']}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


def _stopped(stop: threading.Event | asyncio.Event | None) -> bool:
    return stop is not None and stop.is_set()


async def run_load(
    url: str,
    *,
    rps: float | None = None,
    requests: int | None = None,
    duration: float | None = None,
    concurrency: int = 8,
    colour: str | None = None,
    rows: Sequence[Sequence[float]] | None = None,
    batch: int = 1,
    api_key: str | None = None,
    timeout: float = 10.0,
    stats: LoadStats | None = None,
    stop: threading.Event | asyncio.Event | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> LoadReport:
    """Send bounded load to `url` and return what came back.

    At least one of `requests` and `duration` bounds the run (ValueError otherwise); `rps=None`
    sends as fast as `concurrency` connections allow. `stats` receives running counts; `stop`
    ends the run early. `transport` lets tests drive an ASGI app in-process.
    """
    if requests is None and duration is None:
        raise ValueError("load must be bounded: give a request count or a duration")
    if requests is not None and not 0 < requests <= MAX_REQUESTS:
        raise ValueError(f"requests must be within 1..{MAX_REQUESTS}, got {requests}")
    if duration is not None and not 0 < duration <= MAX_DURATION_S:
        raise ValueError(f"duration must be within 0..{MAX_DURATION_S:.0f} s, got {duration}")
    # `not x > 0`, not `x <= 0`: NaN is neither, and a NaN rate sent flat out.
    if rps is not None and not rps > 0:
        raise ValueError(f"rps must be positive, got {rps}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if concurrency < 1 or batch < 1:
        raise ValueError("concurrency and batch must be at least 1")
    target = normalise_url(url)
    rows = list(rows) if rows is not None else default_rows()
    if not rows:
        raise ValueError("no rows to send")
    bodies = [
        orjson.dumps({"data": [list(rows[(i + k) % len(rows)]) for k in range(batch)]})
        for i in range(0, len(rows), batch)
    ]
    headers = {"content-type": "application/json"}
    if colour:
        headers["x-api-version"] = colour
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    stats = stats if stats is not None else LoadStats()
    next_ticket = 0

    async def worker(client: httpx.AsyncClient, start: float, deadline: float) -> None:
        nonlocal next_ticket
        while not _stopped(stop):
            ticket = next_ticket
            if requests is not None and ticket >= requests:
                return
            next_ticket += 1
            picked = time.monotonic()  # this worker (a connection) is free from now
            if rps is not None:
                due = start + ticket / rps
                if due >= deadline:
                    return
                while (wait := due - time.monotonic()) > 0 and not _stopped(stop):
                    await asyncio.sleep(min(wait, 0.2))
                # A request still waiting for a free connection at the deadline is not sent:
                # the backlog of a server slower than `rps` ran the load on past `duration`
                # (a 2 s run lasted 21 s).
                if _stopped(stop) or time.monotonic() >= deadline:
                    return
            elif time.monotonic() >= deadline:
                return
            sent = time.monotonic()
            # Open loop: a request that fell due while every connection was busy is timed from
            # when it was due, so its wait for a connection counts (timed from the send, a
            # server 10x too slow showed its own 200 ms while requests went out 19 s late:
            # coordinated omission). One a free connection waited for is timed from its send:
            # this client's own late wake-up is no wait of the server's.
            timed_from = due if rps is not None and picked > due else sent
            try:
                # httpx's own timeout bounds each connect, write and read, not the request: an
                # answer trickling in a byte at a time ran on past it (and past `duration`).
                async with asyncio.timeout(timeout):
                    response = await client.post(target, content=bodies[ticket % len(bodies)])
            except TimeoutError:
                if stats.first_failure is None:
                    stats.first_failure = f"Timeout: no complete answer within {timeout:g} s"
                stats.record("Timeout", None, None)
                continue
            except httpx.HTTPError as exc:
                if stats.first_failure is None:  # `--json` says why, not only how many
                    stats.first_failure = f"{type(exc).__name__}: {exc}"[:200]
                stats.record(type(exc).__name__, None, None)
                continue
            elapsed = time.monotonic() - timed_from
            version = _version_of(response.content) if response.status_code == 200 else None
            if response.status_code >= 400 and stats.first_error is None:
                stats.first_error = _error_of(response)  # why a failed run failed, in its words
            stats.record(str(response.status_code), version, elapsed)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        headers=headers, timeout=timeout, limits=limits, transport=transport
    ) as client:
        stats.start()
        start = time.monotonic()
        deadline = start + (duration if duration is not None else MAX_DURATION_S)
        await asyncio.gather(*(worker(client, start, deadline) for _ in range(concurrency)))
        stats.finish()
    return stats.snapshot()


class BackgroundLoad:
    """`run_load` on its own thread: start(), snapshot() while it runs, stop() -> LoadReport.

    `BackgroundLoad(url, rps=50, colour=None).start()` takes run_load's keyword options. Without
    `requests` or `duration` it runs until stop() (capped at MAX_DURATION_S). Memory stays
    bounded: counters and a log histogram, no per-request records.
    """

    def __init__(self, url: str, **options: Any) -> None:
        if "requests" not in options and "duration" not in options:
            options["duration"] = MAX_DURATION_S
        self.url = url
        self.options = options
        self.stats = LoadStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> BackgroundLoad:
        """Start sending; returns self."""
        if self._thread is not None:
            raise RuntimeError("this load has already been started")

        def main() -> None:
            try:
                asyncio.run(run_load(self.url, stats=self.stats, stop=self._stop, **self.options))
            except BaseException as exc:  # surfaced by stop()
                self._error = exc

        self._thread = threading.Thread(target=main, name="aml-rollout-load", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """Whether the load is still being sent."""
        return self._thread is not None and self._thread.is_alive()

    def snapshot(self) -> LoadReport:
        """Running counts."""
        return self.stats.snapshot()

    def stop(self, timeout: float = 15.0) -> LoadReport:
        """Stop sending, wait for requests in flight (up to `timeout`), return the final report."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._error is not None:
            raise self._error
        return self.stats.snapshot()

    def __enter__(self) -> BackgroundLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
