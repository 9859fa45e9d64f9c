"""Azure Monitor as a MetricsProvider: an Azure ML endpoint's traffic log, counted in Log Analytics.

A managed online endpoint exposes no Prometheus metrics, and Azure Monitor's platform metrics
for it are per-minute aggregates with latency as percentiles only: no counts above a bound, which
the judge's slow-request test needs. Its **traffic log** has what the judge wants. A diagnostic
setting on the endpoint sends `AmlOnlineEndpointTrafficLog` to a Log Analytics workspace: one
record per request, with the deployment that answered it (`DeploymentName`), the final response
code (`ResponseCode`), the model container's own code (`ModelStatusCode`) and the total duration
(`TotalDurationMs`). One KQL query per tick, with azure-monitor-query's `LogsQueryClient`, counts
per deployment the requests whose `TimeGenerated` falls in the window, the failed ones among them,
and the requests at or under each latency bound (`buckets_ms`): exact integers, and a cumulative
histogram. Names compare regardless of case (`=~`, `in~`), as Azure matches endpoint and
deployment names (azure-ai-ml lower-cases the deployments in an endpoint's traffic).

A failed request is what a 5xx is behind Envoy or Istio, in Azure's codes: a 5xx from the
endpoint; a 424, which Azure answers whenever the model container does not answer 200 (the model's
500 is logged as ResponseCode 424, ModelStatusCode 500), unless the model's own code was a 4xx (the
client's fault, as a 4xx is elsewhere); a 408, the model running past `request_timeout_ms`
(Envoy's 504); and a 429 "Too many pending requests", which Azure answers when more than
2 x `max_concurrent_requests_per_instance` x `instance_count` requests wait on one deployment: the
deployment that answered it is out of capacity, as an upstream whose queue overflows is behind
Envoy (whose 503s count). It is the colour's own failure, and one a slow candidate hides
otherwise: the requests it cannot take are answered at once, so its latency even looks better.
The endpoint's own 429 "Rate-limited" (its requests per second quota) is not counted: it is no
deployment's doing, and falls on both colours by their share of the requests. Counting
`ResponseCode >= 500` alone would miss every error the model raises.

    AmlOnlineEndpointTrafficLog
    | where TimeGenerated >= datetime(2026-11-29T16:00:00.000000Z)
        and TimeGenerated < datetime(2026-11-29T16:05:00.000000Z)
    | where EndpointName =~ "diabetes-ep" and DeploymentName in~ ("blue", "green")
    | extend code = toint(ResponseCode), model = coalesce(toint(ModelStatusCode), 0),
        reason = tostring(ResponseCodeReason), ms = todouble(TotalDurationMs)
    | summarize requests = count(), errors = countif(code >= 500 or code == 408
        or (code == 429 and reason !has "rate") or model >= 500
        or (code == 424 and model < 400)),
        le_0 = countif(ms <= 5.0), le_1 = countif(ms <= 10.0), ...
        by DeploymentName = tolower(DeploymentName)

Records reach the workspace minutes after the request (Azure's ingestion latency). The counts of
a step grow as they arrive, and a request counts once, in the step its `TimeGenerated` falls in,
if its record arrives before that step ends: a late record adds to a later tick's increment, and
the judge's test conditions on each tick's split between the colours, which lateness does not
bias. One arriving after its step ended is never counted (each step is asked about its own window
[step start, now) only while it lasts), so `analysis.min_step_duration_s` well above the lag
keeps that loss small. The judge waits for evidence as it would for a quiet service. Set
`analysis.interval_s` to a minute or more: the log moves no faster, and each tick is a query (Log
Analytics throttles at about 200 a minute per user).

What cannot be told apart in the log, and is therefore counted: requests pinned to a deployment
with the `azureml-model-deployment` header, and the copies Azure mirrors to a deployment. Azure
mirrors a share of the endpoint's traffic to the shadow deployment "so that you can gather metrics
and logging", but the traffic log's documented columns have none that marks a copy. During the
shadow step blue takes no live traffic, so its records are its mirrored copies (and any request
pinned to it); green's are the live requests, each once (green logs its own answer, the copy is
blue's). The judge compares the colours' rates on the split it counts, so a 5 % mirror is simply a
small blue. `ResponseCode` is documented as what the client was answered, which for a copy may be
green's answer, not blue's: a model 5xx (`ModelStatusCode`) therefore counts as failed whatever
`ResponseCode` says; for a live request Azure answers 424 whenever the model did not answer 200,
so this counts nothing more there. If Azure logs no copies, blue shows no requests during the
shadow step and the judge holds it ("no mirrored copies counted yet"): use `mirror_percent: 0`.

A query that fails (no permission, a workspace that does not exist, a partial result, an answer
that is not Log Analytics' JSON: a gateway's empty 502 or HTML 504, a proxy's page) gives
`Observation(error=...)` naming the workspace (and the HTTP status), so the judge says Error;
no record in the window gives zero counts (Inconclusive). A workspace without the table (no
diagnostic setting sends the log there yet) answers every query 400, its reason in the innermost
`innererror`: `probe` reads the table (`take 0`), so that is refused before a rollout starts,
saying which setting to create.
The credential is `DefaultAzureCredential` with the pipelines' rule
(rollout.azure_credential); it needs the Log Analytics Reader role on the workspace.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rollout.azure_credential import default_credential
from rollout.azure_text import error_line, http_detail, innermost_error
from rollout.core.types import Colour, ColourCounts, Observation
from rollout.errors import MetricsError, error_chain

if TYPE_CHECKING:
    from rollout.config import AzureMonitorMetricsConfig, ColourNames
    from rollout.routers.base import TrafficRouter

TABLE = "AmlOnlineEndpointTrafficLog"
#: What a workspace without the table (Log Analytics cannot resolve its name) needs.
NO_TABLE = (
    f": this workspace has no {TABLE} table: create the endpoint's diagnostic setting that "
    'sends it here (docs/azureml-endpoint.md, "Metrics: the endpoint\'s traffic log"); the '
    "table appears with its first records, minutes after the endpoint's first request"
)

#: A failed request (see the module docstring): an endpoint 5xx, a model timeout (408), a
#: deployment out of capacity (429 "Too many pending requests", not the endpoint's "Rate-limited"),
#: a model 5xx whatever code the endpoint logged (a mirrored copy's may be the live answer's), or
#: a 424 with no model code (the model did not answer). `model` is 0 when the model gave no code,
#: `reason` "" when the log has none.
FAILED = (
    'code >= 500 or code == 408 or (code == 429 and reason !has "rate")'
    " or model >= 500 or (code == 424 and model < 400)"
)


def kql_string(text: str) -> str:
    """`text` as a KQL string literal (double quotes; backslash and quote escaped)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def kql_real(bound: float, index: int) -> str:
    """Latency bound `buckets_ms[index]` as a KQL real literal that Kusto parses to the same
    double; ValueError naming it when no literal can (inf, nan, an int too large for a double;
    a larger int than 2**53 is the double it rounds to, as any float() of it).

    The shortest decimal that reads back as the double (Python's repr), written out as digits,
    a point and digits, the form Kusto's docs give for a real: `:g` kept 6 digits, so a bound
    of 1234567 ms counted the requests under 1.23457e+06, and repr's exponents (1e-05, 1e+16)
    are not the `1e5` the docs show. An infinite bound would be the query's `inf`, which KQL
    does not parse (its literal is `real(+inf)`), and counts what `requests` counts anyway.
    """
    name = f"latency bound buckets_ms[{index}]"
    try:
        value = float(bound)
    except OverflowError:
        raise ValueError(f"{name} is too large for a double") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} = {value!r}: a bound must be a finite number of milliseconds")
    text = format(decimal.Decimal(repr(value)), "f")
    return text if "." in text else f"{text}.0"


def _kql_time(epoch_s: float) -> str:
    stamp = dt.datetime.fromtimestamp(epoch_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f"datetime({stamp})"


def traffic_query(
    endpoint: str, names: Sequence[str], buckets_ms: Sequence[float], since: float, now: float
) -> str:
    """The KQL counting each deployment's requests, failed ones and requests per latency bound."""
    bounds = ", ".join(
        f"le_{i} = countif(ms <= {kql_real(b, i)})" for i, b in enumerate(buckets_ms)
    )
    deployments = ", ".join(kql_string(n) for n in names)
    return (
        f"{TABLE}\n"
        f"| where TimeGenerated >= {_kql_time(since)} and TimeGenerated < {_kql_time(now)}\n"
        f"| where EndpointName =~ {kql_string(endpoint)} and DeploymentName in~ ({deployments})\n"
        "| extend code = toint(ResponseCode), model = coalesce(toint(ModelStatusCode), 0),"
        " reason = tostring(ResponseCodeReason), ms = todouble(TotalDurationMs)\n"
        f"| summarize requests = count(), errors = countif({FAILED}), {bounds}"
        " by DeploymentName = tolower(DeploymentName)"
    )


class AzureMonitorMetrics:
    """MetricsProvider counting an Azure ML endpoint's traffic log in Log Analytics."""

    def __init__(
        self,
        client: Any,
        workspace_id: str,
        endpoint: str,
        *,
        deployments: ColourNames | None = None,
        buckets_ms: Sequence[float] = (),
        timeout_s: float = 30.0,
    ) -> None:
        from rollout.config import AZURE_LOG_BUCKETS_MS, ColourNames

        self._client = client
        self.workspace_id = workspace_id
        self.endpoint = endpoint
        self.names = deployments or ColourNames()
        self.buckets_ms = tuple(buckets_ms) or AZURE_LOG_BUCKETS_MS
        self.timeout_s = timeout_s

    @classmethod
    def from_config(
        cls,
        cfg: AzureMonitorMetricsConfig,
        router: TrafficRouter | None = None,
        **client_kwargs: Any,
    ) -> AzureMonitorMetrics:
        """Build with a LogsQueryClient on `default_credential()`; `client_kwargs` go to it
        (tests pass `transport=`)."""
        from azure.monitor.query import LogsQueryClient

        client = LogsQueryClient(default_credential(), endpoint=cfg.logs_url, **client_kwargs)
        return cls(
            client,
            cfg.workspace_id,
            cfg.endpoint,
            deployments=cfg.deployments,
            buckets_ms=cfg.buckets_ms,
            timeout_s=cfg.timeout_s,
        )

    # ----------------------------------------------------------------- MetricsProvider protocol

    def observe(self, since: float, now: float) -> Observation:
        """Per-colour counts of the requests logged between `since` and `now`; never raises."""
        if now <= since:
            return Observation(since=since, at=now)
        names = [self.names.of(c) for c in Colour]
        query = traffic_query(self.endpoint, names, self.buckets_ms, since, now)
        try:
            rows = self._query(query, since, now)
        except MetricsError as exc:
            return Observation(since=since, at=now, error=str(exc))
        counts = {c: self._counts(rows.get(self.names.of(c).lower())) for c in Colour}
        detail = {"workspace": self.workspace_id, "query": query, "rows": rows}
        return Observation(
            since=since, at=now, blue=counts[Colour.BLUE], green=counts[Colour.GREEN], detail=detail
        )

    def history(self, since: float, now: float) -> Observation:
        """The same counts for a window before the rollout (the log keeps its retention)."""
        return self.observe(since, now)

    def probe(self) -> None:
        """Read the traffic log table's columns (`take 0`: no row, over the last minute) through
        the same client and credential as every tick: a MetricsError names the workspace and
        what failed, a workspace the log is not sent to (no such table) included."""
        self._run(f"{TABLE} | take 0", dt.timedelta(minutes=1))

    # ------------------------------------------------------------------------------ internals

    def _counts(self, row: dict[str, int] | None) -> ColourCounts:
        if row is None:
            return ColourCounts()
        bounds = [(b / 1000.0, row[f"le_{i}"]) for i, b in enumerate(self.buckets_ms)]
        buckets = (*bounds, (math.inf, row["requests"]))
        return ColourCounts(requests=row["requests"], errors=row["errors"], latency_buckets=buckets)

    def _query(self, query: str, since: float, now: float) -> dict[str, dict[str, int]]:
        """{deployment: {column: count}} for the query's one table."""
        start = dt.datetime.fromtimestamp(since, dt.UTC)
        end = dt.datetime.fromtimestamp(now, dt.UTC)
        tables = self._run(query, (start, end))
        if len(tables) != 1:
            raise MetricsError(self._where(f"expected one result table, got {len(tables)}"))
        table = tables[0]
        columns = list(table.columns)
        wanted = ["DeploymentName", "requests", "errors"]
        wanted += [f"le_{i}" for i in range(len(self.buckets_ms))]
        if missing := [c for c in wanted if c not in columns]:
            raise MetricsError(self._where(f"the result has no column {', '.join(missing)}"))
        rows: dict[str, dict[str, int]] = {}
        for row in table.rows:
            if len(row) != len(columns):  # the counts would shift under other columns' names
                problem = f"a row has {len(row)} values for {len(columns)} columns"
                raise MetricsError(self._where(problem))
            values = dict(zip(columns, row, strict=True))
            try:
                rows[str(values["DeploymentName"])] = {c: int(values[c]) for c in wanted[1:]}
            except (TypeError, ValueError) as exc:
                raise MetricsError(self._where(f"a count is not a number ({exc})")) from None
        return rows

    def _run(self, query: str, timespan: Any) -> list[Any]:
        """The query's tables; MetricsError for anything but a complete result."""
        from azure.core.exceptions import AzureError, HttpResponseError
        from azure.monitor.query import LogsQueryStatus

        answered: list[Any] = []  # the HTTP response, to say what came back if it is no answer
        try:
            result = self._client.query_workspace(
                self.workspace_id,
                query,
                timespan=timespan,
                server_timeout=max(1, int(self.timeout_s)),
                connection_timeout=self.timeout_s,
                read_timeout=self.timeout_s,
                # One attempt: azure-core would sleep each Retry-After as sent (a throttled
                # query's 3600 s, 3 times) past timeout_s; a failed query is an Error tick,
                # and the next tick is the retry.
                retry_total=0,
                raw_response_hook=lambda pipeline: answered.append(pipeline.http_response),
            )
        except HttpResponseError as exc:
            # azure-monitor-query re-raises every error of its request as a bare
            # HttpResponseError, the credential's own included (no response: no token at all).
            if _no_token(exc):
                problem = f"no usable Azure credentials ({error_line(exc)})"
            elif exc.status_code == 401:
                problem = (
                    f"Azure rejected the credentials (HTTP {exc.status_code} {http_detail(exc)})"
                )
            else:
                problem = f"HTTP {exc.status_code} {http_detail(exc)}"
                if _no_table(exc):
                    problem += NO_TABLE
            raise MetricsError(self._where(problem)) from exc
        except AzureError as exc:
            if _timed_out(exc):  # a hung API (or a timeout_s too short), not "unreachable"
                problem = f"no answer within {self.timeout_s:g} s (metrics.timeout_s)"
                raise MetricsError(self._where(problem)) from exc
            raise MetricsError(self._where(f"unreachable ({error_line(exc)})")) from exc
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            # azure-monitor-query 2.0 reads every answer but a 401/404/409 with an unguarded
            # `response.json()` (a gateway's empty 502 or HTML 504 raises JSONDecodeError), and
            # a 200's JSON with `.get` (a list raises AttributeError): an Error tick, not a crash.
            said = _not_an_answer(answered[-1] if answered else None)
            raise MetricsError(self._where(said)) from exc
        if result.status != LogsQueryStatus.SUCCESS:
            # A partial result may miss records: counting it would undercount the step.
            error = getattr(result, "partial_error", None)
            raise MetricsError(
                self._where(f"partial result ({error_line(error) if error else '?'})")
            )
        return list(result.tables)

    def _where(self, problem: str) -> str:
        return f"Log Analytics workspace {self.workspace_id} ({TABLE}): {problem}"


def _not_an_answer(response: Any) -> str:
    """What came back instead of Log Analytics' JSON: its status, its content type and the first
    line of a text body (an HTML page's markup says nothing more than its status)."""
    from azure.core.exceptions import AzureError

    if response is None:  # the hook did not run: nothing to say but that
        return "not a Log Analytics answer"
    try:
        body = response.body() or b""
    except (AzureError, OSError):  # (requests' errors are OSErrors)
        body = b""
    text = body.decode("utf-8", "replace").strip()  # any bytes: a gateway's are not always text
    content_type = str(response.headers.get("Content-Type") or "").split(";", 1)[0].strip()
    said = f"HTTP {response.status_code} "
    if not text:
        said += "with an empty body"
    else:
        said += content_type or "with no content type"
        line = text.split("\n", 1)[0].strip()
        if not (content_type.endswith(("html", "json", "xml")) or line.startswith("<")):
            said += f' "{line if len(line) <= 120 else line[:117] + "..."}"'
    return f"{said}: not a Log Analytics answer (a gateway or proxy in between?)"


def _no_table(exc: Any) -> bool:
    """Whether Log Analytics could not resolve the traffic log table's name (SEM0100, said in
    its innermost `innererror`): the workspace has no such table."""
    said = str(innermost_error(getattr(exc, "error", None)).get("message", ""))
    return f"named '{TABLE.lower()}'" in said.lower()


def _timed_out(exc: BaseException) -> bool:
    """Whether azure-core gave up waiting for the connection or the answer (`timeout_s`)."""
    from azure.core.exceptions import ServiceRequestTimeoutError, ServiceResponseTimeoutError

    timeouts = (ServiceRequestTimeoutError, ServiceResponseTimeoutError)
    return any(isinstance(seen, timeouts) for seen in error_chain(exc))


def _no_token(exc: BaseException) -> bool:
    """Whether the credential got no token (a ClientAuthenticationError with no response, maybe
    re-raised by the SDK as the context of another error): no identity to sign in as."""
    from azure.core.exceptions import ClientAuthenticationError

    return any(
        isinstance(seen, ClientAuthenticationError) and seen.response is None
        for seen in error_chain(exc)
    )
