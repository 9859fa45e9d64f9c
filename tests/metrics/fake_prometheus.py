"""A Prometheus HTTP API fake: real `/api/v1/query` JSON over a real socket, from stored samples.

It evaluates just the PromQL the provider sends — a selector (`name{a="x",b=~"y|z"}`), a range
selector (`sel[30s]`, answered as a matrix), `resets(sel[30s])` (and of a subquery),
`last_over_time(sel[30s])`, `max_over_time(sel[30s])`, a vector compared `== N` (a filter),
the subqueries `(sel)[60s:1s]` (a matrix), `last_over_time((sel)[300s:1s])` and
`min_over_time((sel)[300s:1s])`, `count(...)` of
any of these that is a vector, and `vector(1)`
— against series a test writes with `add(name, labels, [(t, value), ...])`, with Prometheus'
semantics: an instant selector takes the newest sample at or before `time` within 5 minutes
(stale after), a range takes samples in `(time - range, time]`, a subquery evaluates at each
multiple of its step in that range (and `last_over_time` keeps each series' last value there).
A value of `STALE` is a
staleness marker (what Prometheus writes for every series of a target when a scrape fails): an
instant selector whose newest sample is one finds nothing, and ranges skip it. Anything else
answers 400 with Prometheus' error JSON, so a query the fake does not understand fails the test
instead of passing by accident.

Authentication and TLS, as a Prometheus behind a proxy has them: with `require_authorization`
set, a request whose `Authorization` header is not exactly that answers 401 (and with
`echo_authorization` its body, and that of an injected `status`, quotes the header it got, as
some proxies' error pages do — to test that no secret travels on into an error message);
`authorizations` records the header of every request (None when absent).
`FakePrometheus(tls=context)` serves HTTPS (tests.fakes.tls).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import ssl
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlparse

from tests.fakes.server import LocalServer

LOOKBACK_S = 300.0
#: A staleness marker, as a sample value (Prometheus never returns it from a query).
STALE = None
_SELECTOR = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<matchers>(?:[^}"]|"(?:[^"\\]|\\.)*")*)\})?$'
)
_SUBQUERY = re.compile(r"\((?P<expr>.*)\)\[(?P<range>\d+)(?P<unit>ms|s):(?P<step>\d+)s\]")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')


class FakePrometheus:
    """Serve stored series on 127.0.0.1; `queries` records every query seen."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.series: list[tuple[dict[str, str], list[tuple[float, float | None]]]] = []
        self.queries: list[tuple[str, float]] = []
        self.status = 200  # set to 500/503 to simulate a sick Prometheus
        #: Sent with every successful answer (a Thanos querier's partial response carries one).
        self.warnings: list[str] = []
        self.require_authorization: str | None = None
        #: Sent as WWW-Authenticate with a 401 (Azure's claims challenge, say).
        self.challenge: str | None = None
        self.echo_authorization = False
        self.authorizations: list[str | None] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                params = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path != "/api/v1/query":
                    self._send(404, {"status": "error", "error": "not found"})
                    return
                got = self.headers.get("Authorization")
                fake.authorizations.append(got)
                if fake.require_authorization is not None and got != fake.require_authorization:
                    body = {"status": "error", "error": "unauthorized"}
                    if fake.echo_authorization:
                        body["error"] = f"unauthorized: Authorization {got!r} refused"
                    challenge = {"WWW-Authenticate": fake.challenge} if fake.challenge else {}
                    self._send(401, body, challenge)
                    return
                if fake.status != 200:
                    body = {"status": "error", "error": "injected"}
                    if fake.echo_authorization:
                        body["error"] = f"injected; Authorization {got!r}"
                    self._send(fake.status, body)
                    return
                at = float(params.get("time", "1e12"))
                fake.queries.append((params["query"], at))
                try:
                    result_type, result = fake.evaluate(params["query"], at)
                except ValueError as exc:
                    self._send(400, {"status": "error", "errorType": "bad_data", "error": str(exc)})
                    return
                answer: dict[str, Any] = {
                    "status": "success",
                    "data": {"resultType": result_type, "result": result},
                }
                if fake.warnings:
                    answer["warnings"] = fake.warnings
                self._send(200, answer)

            def _send(
                self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._server = LocalServer(Handler, ssl_context=tls)

    @property
    def url(self) -> str:
        return self._server.url

    def add(
        self, name: str, labels: dict[str, str], samples: list[tuple[float, float | None]]
    ) -> None:
        """Store one series (samples in time order; a value of `STALE` is a staleness marker)."""
        self.series.append(({"__name__": name, **labels}, sorted(samples, key=lambda s: s[0])))

    def __enter__(self) -> FakePrometheus:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    # -------------------------------------------------------------------------------- PromQL

    def evaluate(self, query: str, at: float) -> tuple[str, list[dict[str, Any]]]:
        query = query.strip()
        if query == "vector(1)":
            return "vector", [{"metric": {}, "value": [at, "1"]}]
        if (compared := re.fullmatch(r"(.*) == (\d+)", query)) is not None:
            kind, items = self.evaluate(compared.group(1), at)
            wanted = float(compared.group(2))
            return kind, [item for item in items if float(item["value"][1]) == wanted]
        if query.startswith("count(") and query.endswith(")"):
            kind, items = self.evaluate(query[len("count(") : -1], at)
            if kind != "vector":
                raise ValueError(f"fake Prometheus: count() of a {kind}")
            return "vector", [{"metric": {}, "value": [at, str(len(items))]}] if items else []
        if query.startswith("max(timestamp(") and query.endswith("))"):
            # The newest sample's own time of the selected series (not the evaluation time).
            newest = [
                before[-1][0]
                for _, samples in self._select(query[len("max(timestamp(") : -2])
                if (before := [(t, v) for t, v in samples if at - LOOKBACK_S < t <= at])
                and before[-1][1] is not STALE
            ]
            return "vector", [{"metric": {}, "value": [at, _fmt(max(newest))]}] if newest else []
        if query.startswith("resets(") and query.endswith(")"):
            subquery = _SUBQUERY.fullmatch(query[len("resets(") : -1])
            if subquery is not None:
                points = self._subquery(subquery, at).values()
                return "vector", [
                    {"metric": labels, "value": [at, str(_drops([float(v) for _, v in values]))]}
                    for labels, values in points
                ]
            selector, window = _range(query[len("resets(") : -1])
            result = []
            for labels, inside in self._ranges(selector, window, at):
                resets = sum(1 for (_, a), (_, b) in itertools.pairwise(inside) if b < a)
                result.append({"metric": _without_name(labels), "value": [at, str(resets)]})
            return "vector", result
        if query.startswith("last_over_time((") and query.endswith(")"):
            subquery = _SUBQUERY.fullmatch(query[len("last_over_time(") : -1])
            if subquery is not None:
                # Each series takes its last value in the subquery's range.
                return "vector", [
                    {"metric": labels, "value": [at, points[-1][1]]}
                    for labels, points in self._subquery(subquery, at).values()
                ]
        if query.startswith("min_over_time((") and query.endswith(")"):
            subquery = _SUBQUERY.fullmatch(query[len("min_over_time(") : -1])
            if subquery is not None:
                return "vector", [
                    {"metric": labels, "value": [at, _fmt(min(float(v) for _, v in points))]}
                    for labels, points in self._subquery(subquery, at).values()
                ]
        subquery = _SUBQUERY.fullmatch(query)
        if subquery is not None:
            return "matrix", [
                {"metric": labels, "values": [[t, v] for t, v in points]}
                for labels, points in self._subquery(subquery, at).values()
            ]
        if query.startswith("last_over_time(") and query.endswith(")"):
            selector, window = _range(query[len("last_over_time(") : -1])
            result = [
                {"metric": labels, "value": [at, _fmt(inside[-1][1])]}
                for labels, inside in self._ranges(selector, window, at)
            ]
            return "vector", result
        if query.startswith("max_over_time(") and query.endswith(")"):
            selector, window = _range(query[len("max_over_time(") : -1])
            result = [
                {"metric": _without_name(labels), "value": [at, _fmt(max(v for _, v in inside))]}
                for labels, inside in self._ranges(selector, window, at)
            ]
            return "vector", result
        if query.endswith("]"):
            selector, window = _range(query)
            result = [
                {"metric": labels, "values": [[t, str(v)] for t, v in inside]}
                for labels, inside in self._ranges(selector, window, at)
            ]
            return "matrix", result
        result = []
        for labels, samples in self._select(query):
            before = [(t, v) for t, v in samples if at - LOOKBACK_S < t <= at]
            if before and before[-1][1] is not STALE:
                result.append({"metric": labels, "value": [at, _fmt(before[-1][1])]})
        return "vector", result

    def _subquery(
        self, subquery: re.Match[str], at: float
    ) -> dict[str, tuple[dict[str, str], list[tuple[float, str]]]]:
        """A subquery's points per series: its expression evaluated at every multiple of its
        step in (at - range, at], as Prometheus does."""
        scale = 1000.0 if subquery.group("unit") == "ms" else 1.0
        window, step = float(subquery.group("range")) / scale, float(subquery.group("step"))
        times = []
        t = math.floor(at / step) * step
        while t > at - window:
            times.append(t)
            t -= step
        found: dict[str, tuple[dict[str, str], list[tuple[float, str]]]] = {}
        for t in reversed(times):
            for item in self.evaluate(subquery.group("expr"), t)[1]:
                labels = _without_name(item["metric"])
                key = json.dumps(labels, sort_keys=True)
                found.setdefault(key, (labels, []))[1].append((t, item["value"][1]))
        return found

    def _ranges(
        self, selector: str, window: float, at: float
    ) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
        """Each selected series' samples in `(at - window, at]`, staleness markers skipped."""
        found = []
        for labels, samples in self._select(selector):
            inside = [(t, v) for t, v in samples if at - window < t <= at and v is not STALE]
            if inside:
                found.append((labels, inside))
        return found

    def _select(
        self, selector: str
    ) -> list[tuple[dict[str, str], list[tuple[float, float | None]]]]:
        match = _SELECTOR.match(selector.strip())
        if match is None:
            raise ValueError(f"fake Prometheus cannot parse {selector!r}")
        matchers = []
        raw = match.group("matchers") or ""
        for part in _split(raw):
            m = _MATCHER.fullmatch(part)
            if m is None:
                raise ValueError(f"fake Prometheus cannot parse matcher {part!r}")
            # PromQL's string escapes first (`\\` and `\"`), then the regex, as Prometheus does.
            value = re.sub(r'\\(["\\])', r"\1", m.group(3))
            matchers.append((m.group(1), m.group(2), value))
        chosen = []
        for labels, samples in self.series:
            if labels["__name__"] != match.group("name"):
                continue
            if all(_matches(labels.get(k, ""), op, v) for k, op, v in matchers):
                chosen.append((labels, samples))
        return chosen


def _split(raw: str) -> list[str]:
    parts, current, quoted, escaped = [], "", False, False
    for ch in raw:
        if quoted and (escaped or ch == "\\"):
            escaped = not escaped  # a backslash escapes the next character
        elif ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    return parts


def _matches(value: str, op: str, wanted: str) -> bool:
    if op == "=":
        return value == wanted
    if op == "!=":
        return value != wanted
    return re.fullmatch(wanted, value) is not None


def _range(text: str) -> tuple[str, float]:
    m = re.fullmatch(r"(.*)\[(\d+)(ms|s)\]", text.strip())
    if m is None:
        raise ValueError(f"fake Prometheus cannot parse range {text!r}")
    return m.group(1), float(m.group(2)) / (1000.0 if m.group(3) == "ms" else 1.0)


def _drops(values: list[float]) -> int:
    return sum(1 for a, b in itertools.pairwise(values) if b < a)


def _without_name(labels: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in labels.items() if k != "__name__"}


def _fmt(value: float) -> str:
    if value != value:
        return "NaN"
    return repr(float(value)) if value != int(value) else str(int(value))
