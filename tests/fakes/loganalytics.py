"""A fake Log Analytics query API holding an Azure ML endpoint's traffic log.

`POST /v1/workspaces/<id>/query` (what azure-monitor-query's `LogsQueryClient.query_workspace`
sends, through the FakeArm transport: `https://api.loganalytics.io` is routed here) answers the
query shape `rollout.metrics.azuremonitor.traffic_query` writes, evaluated over the stored
records, `AmlOnlineEndpointTrafficLog | take 0` (the table's columns, no row) and `print ok = 1`.
The query text is parsed, not trusted: its time window, endpoint, deployments, failed-request
predicate and latency bounds decide what is counted, so a test of the provider also tests the KQL
it writes. Anything else is a 400 `BadArgumentError`, as a syntax error is. `drop_table()` makes
it a workspace with no traffic log table (no diagnostic setting sends it there): a query of the
table is then Azure's 400 whose innermost `innererror` names the table it cannot resolve.
`answer_raw()` sends the next queries an answer that is not Log Analytics' JSON, as a gateway or
a proxy in front of it does (a 502 with an empty body, a 504 HTML page, a 200 JSON list).

    with FakeLogAnalytics() as logs:
        logs.log(at, "ep", "blue", code=503, ms=42)  # the endpoint's own 5xx
        logs.log(at, "ep", "blue", model=500)  # the model's 500: Azure answers (and logs) 424
        logs.log(at, "ep", "blue", code=429, reason="Too many pending requests")  # out of capacity
        client = LogsQueryClient(StaticCredential(), transport=logs.transport())
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.fakes.arm import FakeArm, FakeArmTransport

HOST = "api.loganalytics.io"
WORKSPACE = "11111111-2222-3333-4444-555555555555"

#: The failed-request predicate the fake knows (and `Record.failed` evaluates): another one in
#: the query is a syntax error here, so a change to the provider's must be made here too.
_FAILED = (
    'code >= 500 or code == 408 or (code == 429 and reason !has "rate")'
    " or model >= 500 or (code == 424 and model < 400)"
)
_TIME = r"datetime\((?P<{name}>[0-9T:.\-]+Z)\)"
_QUERY = re.compile(
    r"^AmlOnlineEndpointTrafficLog\n"
    rf"\| where TimeGenerated >= {_TIME.format(name='start')} and TimeGenerated < "
    rf"{_TIME.format(name='end')}\n"
    r'\| where EndpointName (?P<eq>==|=~) "(?P<endpoint>(?:[^"\\]|\\.)*)" and DeploymentName '
    r"(?P<in>in|in~) \((?P<deployments>[^)]*)\)\n"
    r"\| extend code = toint\(ResponseCode\), model = coalesce\(toint\(ModelStatusCode\), 0\), "
    r"reason = tostring\(ResponseCodeReason\), ms = todouble\(TotalDurationMs\)\n"
    rf"\| summarize requests = count\(\), errors = countif\({re.escape(_FAILED)}\), "
    r"(?P<bounds>(?:le_\d+ = countif\(ms <= [0-9.e+]+\)(?:, )?)+) by "
    r"DeploymentName(?P<lower> = tolower\(DeploymentName\))?$"
)
_TAKE_0 = "AmlOnlineEndpointTrafficLog | take 0"
#: Some of the table's documented columns, with their types (what `take 0` answers).
_SCHEMA = {
    "TimeGenerated": "datetime",
    "EndpointName": "string",
    "DeploymentName": "string",
    "ResponseCode": "string",
    "ResponseCodeReason": "string",
    "ModelStatusCode": "string",
    "TotalDurationMs": "long",
}
_BOUND = re.compile(r"le_(\d+) = countif\(ms <= ([0-9.e+]+)\)")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Record:
    """One request in the traffic log."""

    at: float
    endpoint: str
    deployment: str
    code: int  # ResponseCode, what the client got
    model_code: int | None  # ModelStatusCode, what the model container answered (None: nothing)
    ms: float
    reason: str = ""  # ResponseCodeReason, the reason phrase of `code`

    def failed(self) -> bool:
        """`_FAILED` on this record, as Kusto evaluates it (a missing model code is 0; `has` matches
        a whole term, case-insensitively)."""
        model = self.model_code or 0
        rate_limited = "rate" in re.findall(r"[0-9a-z]+", self.reason.lower())
        return (
            self.code >= 500
            or self.code == 408
            or (self.code == 429 and not rate_limited)
            or model >= 500
            or (self.code == 424 and model < 400)
        )


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _epoch(stamp: str) -> float:
    return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()


class _RawArm(FakeArm):
    """FakeArm whose POSTs can be answered with raw bytes, not the JSON FakeArm always sends."""

    def __init__(self, hosts: tuple[str, ...], sent: Callable[[Any], None]) -> None:
        #: [status, content type (None: no header), body, times left], the first left first.
        self.raw: list[list[Any]] = []
        self.raw_lock = threading.Lock()
        self._sent = sent  # told each raw-answered request's JSON body
        super().__init__(hosts=hosts)

    def _take_raw(self) -> tuple[int, str | None, bytes] | None:
        with self.raw_lock:
            for answer in self.raw:
                if answer[3] > 0:
                    answer[3] -= 1
                    return answer[0], answer[1], answer[2]
        return None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        arm = self
        base = super()._handler_class()

        class _Handler(base):  # type: ignore[valid-type,misc]
            def _handle_raw(self) -> None:
                raw = arm._take_raw()
                if raw is None:
                    base._handle(self)
                    return
                length = int(self.headers.get("Content-Length") or 0)
                sent = self.rfile.read(length) if length else b""
                arm._sent(json.loads(sent) if sent else None)
                status, content_type, data = raw
                self.send_response(status)
                if content_type is not None:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = _handle_raw

        return _Handler


class FakeLogAnalytics:
    """The fake API and the traffic log it holds (see the module docstring)."""

    def __init__(self, workspace: str = WORKSPACE) -> None:
        self.workspace = workspace
        self.records: list[Record] = []
        self.queries: list[str] = []
        self._partial = False
        self._table_exists = True
        #: A table answered instead of evaluating the query (another schema, say).
        self._table: tuple[list[str], list[list[Any]]] | None = None
        self._arm = _RawArm(
            (HOST,), lambda body: self.queries.append(str((body or {}).get("query")))
        )
        self._arm.on("POST", r"^/v1/workspaces/([^/]+)/query$", self._query)

    def __enter__(self) -> FakeLogAnalytics:
        self._arm.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._arm.stop()

    def transport(self) -> FakeArmTransport:
        """Pass as `transport=` to a LogsQueryClient."""
        return self._arm.transport()

    def log(
        self,
        at: float,
        endpoint: str,
        deployment: str,
        *,
        code: int = 200,
        model: int | None = None,
        ms: float = 20.0,
        reason: str = "",
    ) -> None:
        """Add one request to the log, as Azure logs it: `code` is the endpoint's answer (and
        `reason` its reason phrase); with `model` (the model container's code) other than 200
        the endpoint answered 424, unless `code` says otherwise (a mirrored copy logged with the
        live answer's code, say)."""
        if model is not None and model != 200 and code == 200:
            code = 424
        elif model is None and code == 200:
            model = 200
        self.records.append(Record(at, endpoint, deployment, code, model, ms, reason))

    def fail(self, status: int, code: str, times: int = 1) -> None:
        """The next `times` queries fail with an API error."""
        self._arm.fail("POST", r"/query$", status, code, times)

    def drop_table(self) -> None:
        """The workspace has no AmlOnlineEndpointTrafficLog table (no diagnostic setting)."""
        self._table_exists = False

    def answer_partially(self) -> None:
        """The next queries return their table with a partial-error, as a timed-out query does."""
        self._partial = True

    def answer_raw(
        self, status: int, body: bytes, content_type: str | None = None, times: int = 1
    ) -> None:
        """The next `times` queries get `status` and `body` as they are, not Log Analytics' JSON:
        what a gateway or proxy in front of it answers (an empty 502, a 504 HTML page, a
        text/plain 503), or a 200 whose JSON is not an object (`b"[]"`)."""
        with self._arm.raw_lock:
            self._arm.raw.append([status, content_type, body, times])

    def answer_table(self, columns: list[str], rows: list[list[Any]]) -> None:
        """The next traffic queries get this table (all columns `long` but the first)."""
        self._table = (columns, rows)

    # -- the API ----------------------------------------------------------------------------

    def _query(
        self, _arm: FakeArm, match: re.Match[str], body: Any, _q: Any
    ) -> tuple[int, Any, dict[str, str]]:
        if match.group(1) != self.workspace:
            error = {"code": "WorkspaceNotFoundError", "message": f"workspace {match.group(1)}"}
            return 404, {"error": error}, {}
        query = str((body or {}).get("query", ""))
        self.queries.append(query)
        if query == "print ok = 1":
            return 200, _tables(["ok"], ["int"], [[1]]), {}
        if not self._table_exists and query.startswith("AmlOnlineEndpointTrafficLog"):
            return 400, _no_table("take" if query == _TAKE_0 else "where"), {}
        if query == _TAKE_0:
            return 200, _tables(list(_SCHEMA), list(_SCHEMA.values()), []), {}
        parsed = _QUERY.match(query)
        if parsed is not None and self._table is not None:
            columns, rows = self._table
            return 200, _tables(columns, ["string"] + ["long"] * (len(columns) - 1), rows), {}
        if parsed is None:
            error = {"code": "BadArgumentError", "message": "Syntax error: unexpected query"}
            return 400, {"error": error}, {}
        start, end = _epoch(parsed["start"]), _epoch(parsed["end"])

        # Kusto's `==` and `in` compare case-sensitively, `=~` and `in~` do not.
        def fold(text: str, operator: str) -> str:
            return text.lower() if operator.endswith("~") else text

        endpoint = fold(_unquote(parsed["endpoint"]), parsed["eq"])
        deployments = [
            fold(_unquote(d), parsed["in"]) for d in _STRING.findall(parsed["deployments"])
        ]
        bounds = [(int(i), float(b)) for i, b in _BOUND.findall(parsed["bounds"])]
        rows: dict[str, list[int]] = {}
        for record in self.records:
            if not (start <= record.at < end and fold(record.endpoint, parsed["eq"]) == endpoint):
                continue
            if fold(record.deployment, parsed["in"]) not in deployments:
                continue
            name = record.deployment.lower() if parsed["lower"] else record.deployment
            row = rows.setdefault(name, [0, 0] + [0] * len(bounds))
            row[0] += 1
            row[1] += record.failed()
            for i, bound in bounds:
                row[2 + i] += record.ms <= bound
        columns = ["DeploymentName", "requests", "errors", *(f"le_{i}" for i, _ in bounds)]
        types = ["string"] + ["long"] * (len(columns) - 1)
        answer = _tables(columns, types, [[name, *row] for name, row in rows.items()])
        if self._partial:
            answer["error"] = {"code": "PartialError", "message": "query timed out, results cut"}
        return 200, answer, {}


def _tables(columns: list[str], types: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    described = [{"name": n, "type": t} for n, t in zip(columns, types, strict=True)]
    return {"tables": [{"name": "PrimaryResult", "columns": described, "rows": rows}]}


def _no_table(operator: str) -> dict[str, Any]:
    """Log Analytics' answer to a query of a table the workspace does not have (its shape as
    azure-monitor-query's docs show it: the substance in the innermost `innererror`)."""
    named = f"'{operator}' operator: Failed to resolve table or column expression named "
    return {
        "error": {
            "code": "BadArgumentError",
            "message": "The request had some invalid properties",
            "innererror": {
                "code": "SemanticError",
                "message": "A semantic error occurred.",
                "innererror": {
                    "code": "SEM0100",
                    "message": named + "'AmlOnlineEndpointTrafficLog'",
                },
            },
        }
    }
