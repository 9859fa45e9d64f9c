"""The Azure Monitor provider through the real azure-monitor-query SDK against a fake Log
Analytics API (tests/fakes/loganalytics.py) that parses and evaluates the KQL the provider writes.

What is checked: per-colour requests, failed requests and cumulative latency counts of the
endpoint's traffic log in the window (other endpoints, other deployments, other times and 4xx
excluded; a model's 500, which Azure logs as a 424, and a deployment's 429 counted); the
deployment names and endpoint taken from the azureml router; a KQL string that cannot break out
of its literal; failures (HTTP errors, partial results, no workspace, no credentials, a result of
another shape, an answer that is not Log Analytics' JSON) as one-line Observation errors naming
the workspace, and the controller held or rolled back on them, not crashed; a logs_url ending
in a slash; the judge on these counts, the shadow step's on blue's mirrored copies.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from rollout.config import AzureMonitorMetricsConfig, ColourNames, spec_from_dict
from rollout.controller import Controller, FakeClock
from rollout.core.types import Colour, Phase, Weights
from rollout.errors import ConfigError, MetricsError
from rollout.metrics.azuremonitor import (
    TABLE,
    AzureMonitorMetrics,
    kql_string,
    traffic_query,
)
from rollout.metrics.factory import make_metrics
from rollout.routers.memory import MemoryRouter
from rollout.state.memory import MemoryStateStore
from tests.core.helpers import V1, make_spec
from tests.fakes.arm import StaticCredential
from tests.fakes.identity import AZURE_CREDENTIAL_ENV
from tests.fakes.loganalytics import WORKSPACE, FakeLogAnalytics
from tests.fakes.server import hung_port

T0 = 1_700_000_000.0


@pytest.fixture
def logs() -> Iterator[FakeLogAnalytics]:
    with FakeLogAnalytics() as fake:
        yield fake


def provider(logs: FakeLogAnalytics, **kwargs: Any) -> AzureMonitorMetrics:
    from azure.monitor.query import LogsQueryClient

    client = LogsQueryClient(StaticCredential(), transport=logs.transport())
    kwargs.setdefault("buckets_ms", (10, 50, 100))
    return AzureMonitorMetrics(client, WORKSPACE, kwargs.pop("endpoint", "ep"), **kwargs)


def test_counts_the_endpoints_requests_errors_and_latency_in_the_window(
    logs: FakeLogAnalytics,
) -> None:
    for i in range(10):
        logs.log(T0 + i, "ep", "blue", code=500 if i < 3 else 200, ms=5 + 10 * i)
    logs.log(T0 + 1, "ep", "blue", code=429, reason="Rate-limited")  # the endpoint's quota
    for i in range(20):
        logs.log(T0 + i, "ep", "green", code=503 if i == 0 else 200, ms=40)
    logs.log(T0 - 1, "ep", "blue", code=500)  # before the step
    logs.log(T0 + 30, "ep", "blue", code=500)  # after `now`
    logs.log(T0 + 2, "other-ep", "blue", code=500)  # another endpoint's deployment
    logs.log(T0 + 2, "ep", "orange", code=500)  # a deployment we do not manage

    obs = provider(logs).observe(T0, T0 + 30)

    assert obs.error is None
    assert (obs.blue.requests, obs.blue.errors) == (11, 3)
    assert (obs.green.requests, obs.green.errors) == (20, 1)
    # ms 5, 15, ..., 95 (and the 429 at 20 ms): ≤ 10 ms 1, ≤ 50 ms 6, ≤ 100 ms all 11
    assert obs.blue.latency_buckets == ((0.01, 1), (0.05, 6), (0.1, 11), (float("inf"), 11))
    assert obs.blue.slow(0.05) == 5
    assert obs.green.slow(0.05) == 0
    assert obs.detail["workspace"] == WORKSPACE


def test_no_record_is_zero_counts_not_an_error(logs: FakeLogAnalytics) -> None:
    obs = provider(logs).observe(T0, T0 + 60)
    assert obs.error is None
    assert obs.blue.requests == obs.green.requests == 0


def test_the_deployments_are_the_routers_names(logs: FakeLogAnalytics) -> None:
    logs.log(T0, "ep", "cand-7", code=500)
    logs.log(T0, "ep", "prod-6")
    names = ColourNames(blue="cand-7", green="prod-6")
    obs = provider(logs, deployments=names).observe(T0, T0 + 1)
    assert (obs.blue.requests, obs.blue.errors, obs.green.requests) == (1, 1, 1)


def test_names_are_matched_in_any_case(logs: FakeLogAnalytics) -> None:
    # Azure matches endpoint and deployment names regardless of case (azure-ai-ml lower-cases
    # them in the endpoint's traffic): a log naming `cand-7` for the spec's `Cand-7` counted
    # nothing, and the judge waited on a canary it could not see.
    logs.log(T0, "ep-2", "cand-7", code=500)
    logs.log(T0, "ep-2", "Cand-7")
    logs.log(T0, "EP-2", "prod-6")
    names = ColourNames(blue="Cand-7", green="Prod-6")
    obs = provider(logs, endpoint="Ep-2", deployments=names).observe(T0, T0 + 1)
    assert obs.error is None
    assert (obs.blue.requests, obs.blue.errors, obs.green.requests) == (2, 1, 1)


def test_a_name_cannot_break_out_of_its_kql_string() -> None:
    assert kql_string('ep" or 1 == 1 //') == '"ep\\" or 1 == 1 //"'
    assert kql_string("a\\") == '"a\\\\"'
    query = traffic_query('x" | take 1 //', ["blue"], [10.0], T0, T0 + 1)
    assert 'EndpointName =~ "x\\" | take 1 //"' in query


@pytest.mark.parametrize(
    ("bound", "literal"),
    [
        pytest.param(5, "5.0", id="whole"),
        pytest.param(2.5, "2.5", id="fraction"),
        pytest.param(0.1, "0.1", id="shortest-repr-not-the-binary-expansion"),
        # `:g` kept 6 digits: 1.23457e+06, 0.123457, 1e-05 (a form KQL's docs do not list)
        pytest.param(1234567.0, "1234567.0", id="seven-digits"),
        pytest.param(0.1234567, "0.1234567", id="seven-decimals"),
        pytest.param(1e-05, "0.00001", id="tiny"),
        pytest.param(1e16, "10000000000000000.0", id="huge"),
        pytest.param(123456789.123, "123456789.123", id="twelve-digits"),
    ],
)
def test_a_bound_is_written_as_the_exact_double(bound: float, literal: str) -> None:
    """A KQL real literal (digits, a point, digits) Kusto parses to the same double: the
    requests counted at or under a bound are those under the bound the judge asked about."""
    query = traffic_query("ep", ["blue"], [bound], T0, T0 + 1)
    assert f"le_0 = countif(ms <= {literal})" in query
    assert float(literal) == bound


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        pytest.param([10, math.inf], r"latency bound buckets_ms\[1\] = inf: ", id="inf"),
        pytest.param([math.nan], r"latency bound buckets_ms\[0\] = nan: ", id="nan"),
        pytest.param([-math.inf, 10], r"latency bound buckets_ms\[0\] = -inf: ", id="minus-inf"),
        pytest.param(
            [10, 10**400],
            r"latency bound buckets_ms\[1\] is too large for a double",
            id="no-double-holds-it",
        ),
    ],
)
def test_a_bound_no_kql_real_literal_holds_is_refused(bounds: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        traffic_query("ep", ["blue"], bounds, T0, T0 + 1)


def test_an_odd_endpoint_name_is_matched_as_it_is(logs: FakeLogAnalytics) -> None:
    name = 'ep"quoted\\'
    logs.log(T0, name, "blue")
    obs = provider(logs, endpoint=name).observe(T0, T0 + 1)
    assert obs.error is None and obs.blue.requests == 1


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (403, "InsufficientAccessError", "HTTP 403"),
        (400, "BadArgumentError", "HTTP 400"),
        (500, "InternalServerError", "HTTP 500"),
    ],
)
def test_a_failed_query_is_an_error_naming_the_workspace(
    logs: FakeLogAnalytics, status: int, code: str, expected: str
) -> None:
    logs.fail(status, code, times=5)  # past the SDK's retries
    obs = provider(logs).observe(T0, T0 + 60)
    assert obs.error is not None
    assert obs.error.startswith(
        f"Log Analytics workspace {WORKSPACE} (AmlOnlineEndpointTrafficLog)"
    )
    assert expected in obs.error and "\n" not in obs.error


def test_a_partial_result_is_an_error_not_an_undercount(logs: FakeLogAnalytics) -> None:
    logs.log(T0, "ep", "blue", code=500)
    logs.answer_partially()
    obs = provider(logs).observe(T0, T0 + 60)
    assert obs.error is not None and "partial result (query timed out" in obs.error
    assert obs.blue.requests == 0


def test_a_workspace_that_does_not_exist_is_an_error(logs: FakeLogAnalytics) -> None:
    from azure.monitor.query import LogsQueryClient

    client = LogsQueryClient(StaticCredential(), transport=logs.transport())
    other = "99999999-2222-3333-4444-555555555555"
    obs = AzureMonitorMetrics(client, other, "ep").observe(T0, T0 + 60)
    # Azure's code and message once, not the SDK's "(code) message Code: code Message: message"
    assert obs.error == (
        f"Log Analytics workspace {other} (AmlOnlineEndpointTrafficLog): "
        f"HTTP 404 WorkspaceNotFoundError: workspace {other}"
    )


def test_an_unreachable_api_is_an_error(logs: FakeLogAnalytics) -> None:
    """A closed https port (an http URL would fail earlier, on azure-core refusing to send a
    token in clear, which the spec refuses anyway: `logs_url` must be https)."""
    import socket

    from azure.monitor.query import LogsQueryClient

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))  # held, not listening: refused, and nobody else's port
        url = f"https://127.0.0.1:{probe.getsockname()[1]}"
        client = LogsQueryClient(StaticCredential(), endpoint=url, retry_total=0)
        obs = AzureMonitorMetrics(client, WORKSPACE, "ep", timeout_s=2).observe(T0, T0 + 60)
    assert (
        obs.error is not None and "unreachable" in obs.error and "Connection refused" in obs.error
    )


def test_a_hung_api_is_a_timeout_that_names_its_setting() -> None:
    """Was "unreachable (HTTPSConnectionPool(...): Read timed out. (read timeout=0.3))": an API
    that is there but slow (or a timeout_s too short) read as a network fault."""
    from azure.monitor.query import LogsQueryClient

    with hung_port() as port:
        url = f"https://127.0.0.1:{port}"
        client = LogsQueryClient(StaticCredential(), endpoint=url, retry_total=0)
        obs = AzureMonitorMetrics(client, WORKSPACE, "ep", timeout_s=0.3).observe(T0, T0 + 60)
    assert obs.error == (
        f"Log Analytics workspace {WORKSPACE} (AmlOnlineEndpointTrafficLog): no answer within "
        "0.3 s (metrics.timeout_s)"
    )


def test_a_throttled_query_is_an_error_tick_not_hours_of_waiting(logs: FakeLogAnalytics) -> None:
    """azure-core slept each Retry-After as sent, 3 times: a 429 saying 3600 held one tick
    3 h, with metrics.timeout_s 30. A query is one attempt: the next tick is the retry."""
    import re

    def throttle(_arm: Any, _m: Any, _body: Any, _q: Any) -> Any:
        error = {"error": {"code": "ThrottledError", "message": "too many requests"}}
        return 429, error, {"Retry-After": "3600"}

    logs._arm._routes.insert(0, ("POST", re.compile(r"/query$"), throttle))
    transport = logs.transport()
    from azure.monitor.query import LogsQueryClient

    client = LogsQueryClient(StaticCredential(), transport=transport)
    obs = AzureMonitorMetrics(client, WORKSPACE, "ep", timeout_s=30).observe(T0, T0 + 60)
    assert obs.error is not None and "HTTP 429 ThrottledError" in obs.error
    assert sum(transport.sleeps) <= 30


def test_a_result_of_another_shape_is_an_error(logs: FakeLogAnalytics) -> None:
    logs.answer_table(["DeploymentName", "requests"], [["blue", 3]])
    obs = provider(logs).observe(T0, T0 + 60)
    assert obs.error is not None and "the result has no column errors" in obs.error


def test_no_usable_credentials_is_one_line_naming_the_workspace(
    logs: FakeLogAnalytics, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The real DefaultAzureCredential finding no identity (was: `HTTP None: ...`, since the
    SDK re-raises the credential's error as a bare HttpResponseError)."""
    for name in AZURE_CREDENTIAL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached az / token-cache accounts
    monkeypatch.setenv("PATH", "/nonexistent")  # no az, pwsh or azd to ask
    monkeypatch.setenv("AZURE_TOKEN_CREDENTIALS", "dev")  # never probe a managed identity
    cfg = AzureMonitorMetricsConfig(workspace_id=WORKSPACE, endpoint="ep")
    obs = AzureMonitorMetrics.from_config(cfg, transport=logs.transport()).observe(T0, T0 + 60)
    assert obs.error is not None
    assert obs.error.startswith(
        f"Log Analytics workspace {WORKSPACE} (AmlOnlineEndpointTrafficLog): "
        "no usable Azure credentials ("
    )
    assert "AzureCliCredential" in obs.error  # what each credential said is kept
    assert "HTTP None" not in obs.error and "To mitigate" not in obs.error
    assert "\n" not in obs.error
    assert logs.queries == []  # nothing was sent without a token


def test_credentials_the_api_rejects_are_one_line(logs: FakeLogAnalytics) -> None:
    logs.fail(401, "InvalidAuthenticationToken")
    obs = provider(logs).observe(T0, T0 + 60)
    assert obs.error is not None
    assert "Azure rejected the credentials (HTTP 401 InvalidAuthenticationToken: " in obs.error
    assert "\n" not in obs.error


def test_the_probe_reads_the_traffic_log_table_and_says_why_it_failed(
    logs: FakeLogAnalytics,
) -> None:
    provider(logs).probe()
    assert logs.queries == [f"{TABLE} | take 0"]  # no row: the table's columns only
    logs.fail(403, "InsufficientAccessError", times=5)
    with pytest.raises(MetricsError) as probed:
        provider(logs).probe()
    said = str(probed.value)
    assert said.startswith(f"Log Analytics workspace {WORKSPACE} ({TABLE}): HTTP 403 ")
    assert "\n" not in said


NO_TABLE = (
    f"Log Analytics workspace {WORKSPACE} ({TABLE}): HTTP 400 BadArgumentError: The request had "
    "some invalid properties (SEM0100: '{operator}' operator: Failed to resolve table or column "
    f"expression named '{TABLE}'): this workspace has no {TABLE} table: create the endpoint's "
    'diagnostic setting that sends it here (docs/azureml-endpoint.md, "Metrics: the '
    "endpoint's traffic log\"); the table appears with its first records, minutes after the "
    "endpoint's first request"
)


def test_a_workspace_without_the_traffic_log_table_is_refused_before_the_rollout(
    logs: FakeLogAnalytics,
) -> None:
    """No diagnostic setting sends the log to this workspace yet. Was: the probe (`print ok =
    1`) passed, and every tick was an Error "HTTP 400 BadArgumentError: The request had some
    invalid properties", Azure's substance (its innermost `innererror`) dropped."""
    logs.drop_table()
    with pytest.raises(MetricsError) as probed:
        provider(logs).probe()
    assert str(probed.value) == NO_TABLE.format(operator="take")
    assert provider(logs).observe(T0, T0 + 60).error == NO_TABLE.format(operator="where")


# ---- the spec --------------------------------------------------------------------------------

AZUREML = {
    "kind": "azureml",
    "subscription_id": "00000000-0000-0000-0000-000000000001",
    "resource_group": "rg",
    "workspace": "ws",
    "endpoint": "diabetes-ep",
    "deployments": {"blue": "cand", "green": "prod"},
}


def test_with_the_azureml_router_the_endpoint_and_deployments_are_the_routers() -> None:
    spec = spec_from_dict(
        {"router": AZUREML, "metrics": {"kind": "azuremonitor", "workspace_id": WORKSPACE}}
    )
    assert isinstance(spec.metrics, AzureMonitorMetricsConfig)
    assert spec.metrics.endpoint == "diabetes-ep"
    assert spec.metrics.deployments == ColourNames(blue="cand", green="prod")
    named = spec_from_dict(
        {
            "router": AZUREML,
            "metrics": {"kind": "azuremonitor", "workspace_id": WORKSPACE, "endpoint": "other"},
        }
    )
    assert isinstance(named.metrics, AzureMonitorMetricsConfig)
    assert named.metrics.endpoint == "other"
    one_colour = spec_from_dict(
        {
            "router": AZUREML,
            "metrics": {
                "kind": "azuremonitor",
                "workspace_id": WORKSPACE,
                "deployments": {"blue": "cand-logged-as"},
            },
        }
    )
    assert isinstance(one_colour.metrics, AzureMonitorMetricsConfig)
    assert one_colour.metrics.deployments == ColourNames(blue="cand-logged-as", green="prod")


@pytest.mark.parametrize(
    ("metrics", "field"),
    [
        ({"workspace_id": WORKSPACE}, "metrics.endpoint"),
        ({"workspace_id": "my-workspace", "endpoint": "ep"}, "metrics.workspace_id"),
        (
            {"workspace_id": WORKSPACE, "endpoint": "ep", "buckets_ms": [50, 10]},
            "metrics.buckets_ms",
        ),
        (
            {"workspace_id": WORKSPACE, "endpoint": "ep", "buckets_ms": []},
            "metrics.buckets_ms",
        ),
        (  # azure-core sends the token over https only: every tick would fail
            {"workspace_id": WORKSPACE, "endpoint": "ep", "logs_url": "http://api.loganalytics.io"},
            "metrics.logs_url",
        ),
        (
            {"workspace_id": WORKSPACE, "endpoint": "ep", "logs_url": "ftp://logs.example"},
            "metrics.logs_url",
        ),
    ],
)
def test_the_spec_names_the_bad_field(metrics: dict[str, Any], field: str) -> None:
    with pytest.raises((ConfigError, ValidationError), match=field.replace(".", r"\.")):
        spec_from_dict({"metrics": {"kind": "azuremonitor", **metrics}})


@pytest.mark.parametrize(
    "url",
    ["https://api.loganalytics.azure.cn", "api.loganalytics.us", "https://api.loganalytics.io/v1"],
)
def test_the_logs_url_takes_what_the_sdk_takes(url: str) -> None:
    """A bare host (the SDK adds https://) and a url ending in /v1 (it strips it) work."""
    metrics = {"kind": "azuremonitor", "workspace_id": WORKSPACE, "endpoint": "ep", "logs_url": url}
    assert spec_from_dict({"metrics": metrics}).metrics == AzureMonitorMetricsConfig(
        workspace_id=WORKSPACE, endpoint="ep", logs_url=url
    )


def test_the_factory_builds_it_on_the_default_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "rollout.metrics.azuremonitor.default_credential", lambda: StaticCredential()
    )
    cfg = AzureMonitorMetricsConfig(workspace_id=WORKSPACE, endpoint="ep")
    built = make_metrics(cfg)
    assert isinstance(built, AzureMonitorMetrics)
    assert (built.workspace_id, built.endpoint) == (WORKSPACE, "ep")


# ---- the judge on the traffic log ------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"model": 500}, id="model-errors"),
        # Rejected at once: the candidate's latency even looks better than green's.
        pytest.param(
            {"code": 429, "reason": "Too many pending requests", "ms": 1.0},
            id="out-of-capacity-429s",
        ),
    ],
)
def test_a_candidate_failing_in_the_traffic_log_is_rolled_back(
    logs: FakeLogAnalytics, fault: dict[str, Any]
) -> None:
    """The engine end to end on this provider: after every tick, the requests of the coming
    interval are logged by the colour the router sends them to (1 % errors on green, 20 % on
    blue)."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    clock = FakeClock(T0)
    spec = make_spec(steps=[10, 50, 100])
    metrics = provider(logs)
    served = [0]

    def traffic(*_: Any) -> None:
        # 100 requests a second over the coming interval, split by the served weights.
        weights: Weights = router.get_weights()
        start = clock.now()
        for i in range(int(spec.analysis.interval_s * 100)):
            served[0] += 1
            blue = (served[0] % 100) < weights.blue
            bad = served[0] % (5 if blue else 100) == 0
            colour = "blue" if blue else "green"
            if bad and blue:
                logs.log(start + i / 100, "ep", colour, **fault)
            else:
                logs.log(start + i / 100, "ep", colour, model=500 if bad else 200)

    ctl = Controller(
        spec, router, metrics, MemoryStateStore(spec.name), clock=clock, on_tick=traffic
    )
    final = ctl.run(max_ticks=100)
    assert final.phase is Phase.ROLLED_BACK, final.reason
    assert "canary error rate" in final.reason
    assert router.get_weights() == Weights.blue_at(0)
    assert any("TimeGenerated >=" in q for q in logs.queries)


@pytest.mark.parametrize("healthy", [True, False], ids=["healthy-promoted", "faulty-rolled-back"])
def test_the_shadow_step_is_judged_on_blues_mirrored_copies(
    logs: FakeLogAnalytics, healthy: bool
) -> None:
    """The shadow step on the traffic log: green answers every live request, blue a mirrored copy
    of 20 % of them, logged under blue's deployment name (no column marks a copy). Green's
    requests are counted once, blue's are its copies, and the judge decides on them."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    clock = FakeClock(T0)
    spec = make_spec(steps=[0, 50, 100], mirror_percent=20, analysis={"min_step_duration_s": 0})
    metrics = provider(logs)
    served = [0]
    shadow: list[tuple[float, float, int, int]] = []  # (from, to, live requests, copies)

    def traffic(*_: Any) -> None:
        weights: Weights = router.get_weights()
        start = clock.now()
        live = copies = 0
        for i in range(int(spec.analysis.interval_s * 100)):
            served[0] += 1
            at = start + i / 100
            blue = (served[0] % 100) < weights.blue
            logs.log(at, "ep", "blue" if blue else "green", model=200)
            live += 1
            if weights.mirror and served[0] % 100 < weights.mirror:
                bad = not healthy and served[0] % 500 < 100  # a fifth of blue's copies fail
                logs.log(at, "ep", "blue", model=500 if bad else 200)
                copies += 1
        if weights.mirror:
            shadow.append((start, start + spec.analysis.interval_s, live, copies))

    ctl = Controller(
        spec, router, metrics, MemoryStateStore(spec.name), clock=clock, on_tick=traffic
    )
    final = ctl.run(max_ticks=200)
    assert shadow, "the rollout went through the shadow step"
    during = metrics.observe(shadow[0][0], shadow[-1][1])
    assert during.green.requests == sum(live for *_, live, _ in shadow)  # each request once
    assert during.blue.requests == sum(copies for *_, copies in shadow) > 0
    if healthy:
        assert final.phase is Phase.SUCCEEDED, final.reason
    else:
        assert final.phase is Phase.ROLLED_BACK, final.reason
        assert final.reason.startswith("rolled back at the shadow step"), final.reason
        assert router.get_weights() == Weights.blue_at(0)  # and no shadow left


@pytest.mark.parametrize(
    ("record", "failed"),
    [
        pytest.param({"model": 500}, True, id="model-500-logged-as-424"),
        pytest.param({"model": 503}, True, id="model-503-logged-as-424"),
        pytest.param({"code": 424}, True, id="424-no-model-answer"),
        pytest.param({"model": 400}, False, id="model-400-clients-fault"),
        pytest.param({"code": 408}, True, id="408-model-past-request-timeout"),
        pytest.param({"code": 502}, True, id="endpoint-502"),
        pytest.param(
            {"code": 429, "reason": "Too many pending requests"},
            True,
            id="429-deployment-out-of-capacity",
        ),
        pytest.param({"code": 429}, True, id="429-no-reason-logged"),
        pytest.param({"code": 429, "reason": "Rate-limited"}, False, id="429-endpoint-rate-limit"),
        pytest.param({"code": 429, "reason": "Rate limiting"}, False, id="429-rate-limiting"),
        pytest.param({"code": 401}, False, id="401-unauthorised"),
        # A mirrored copy, should Azure log it with the live answer's code: the model's counts.
        pytest.param({"code": 200, "model": 500}, True, id="model-500-under-a-200"),
        pytest.param({}, False, id="200"),
    ],
)
def test_a_request_fails_as_a_5xx_fails_behind_envoy(
    logs: FakeLogAnalytics, record: dict[str, Any], failed: bool
) -> None:
    """Azure answers 424 (ResponseCode) whenever the model container does not answer 200,
    with the model's code in ModelStatusCode: a model's 500 is never a 5xx in the log. A 429
    is a failure of the deployment that answered it ("Too many pending requests": out of
    capacity), unless it is the endpoint's requests-per-second limit ("Rate-limited")."""
    logs.log(T0, "ep", "blue", **record)
    obs = provider(logs).observe(T0, T0 + 1)
    assert obs.error is None
    assert (obs.blue.requests, obs.blue.errors) == (1, int(failed))


# ---- answers that are not Log Analytics' -----------------------------------------------------

GATEWAY_504 = (
    b"<html><head><title>504 Gateway Time-out</title></head><body><center><h1>504 Gateway "
    b"Time-out</h1></center><hr><center>nginx</center></body></html>"
)
NOT_AN_ANSWER = "not a Log Analytics answer (a gateway or proxy in between?)"


@pytest.mark.parametrize(
    ("status", "body", "content_type", "said"),
    [
        pytest.param(502, b"", None, "HTTP 502 with an empty body: ", id="502-empty"),
        pytest.param(
            502, b"", "application/json", "HTTP 502 with an empty body: ", id="502-empty-json"
        ),
        pytest.param(504, GATEWAY_504, "text/html", "HTTP 504 text/html: ", id="504-html-page"),
        pytest.param(
            503,
            b"upstream connect error or disconnect/reset before headers\nreset reason: overflow",
            "text/plain",
            'HTTP 503 text/plain "upstream connect error or disconnect/reset before headers": ',
            id="503-envoy-text",
        ),
        pytest.param(
            200, b"<html>Sign in</html>", "text/html", "HTTP 200 text/html: ", id="200-html"
        ),
        pytest.param(200, b"[]", "application/json", "HTTP 200 application/json: ", id="200-list"),
        pytest.param(
            200, b'"ok"', "application/json", "HTTP 200 application/json: ", id="200-string"
        ),
        pytest.param(
            502,
            b"\xff\xfebad gateway\r\nmore",
            "text/plain; charset=utf-8",
            'HTTP 502 text/plain "\ufffd\ufffdbad gateway": ',
            id="502-not-utf-8",
        ),
    ],
)
def test_an_answer_that_is_not_log_analytics_json_is_an_error_tick(
    logs: FakeLogAnalytics, status: int, body: bytes, content_type: str | None, said: str
) -> None:
    """A gateway's 502/504 (an empty body, an HTML page), Envoy's text 503, a proxy's 200 page:
    azure-monitor-query 2.0 reads any answer but a 401/404/409 with an unguarded `json()`, and
    a 200 whose JSON is no object with `.get`. Was: JSONDecodeError or AttributeError out of
    `observe`, which promises never to raise, and the controller died mid-rollout."""
    logs.answer_raw(status, body, content_type)
    obs = provider(logs).observe(T0, T0 + 60)
    assert obs.error == f"Log Analytics workspace {WORKSPACE} ({TABLE}): {said}{NOT_AN_ANSWER}"
    assert len(logs.queries) == 1  # one attempt: the next tick is the retry


def test_a_proxys_page_fails_the_probe_with_one_line() -> None:
    """Before anything is deployed: was a JSONDecodeError traceback out of `rollout run`."""
    with FakeLogAnalytics() as logs:
        logs.answer_raw(403, b"<html>Blocked by corporate proxy policy</html>", "text/html")
        with pytest.raises(MetricsError) as probed:
            provider(logs).probe()
    assert str(probed.value) == (
        f"Log Analytics workspace {WORKSPACE} ({TABLE}): HTTP 403 text/html: {NOT_AN_ANSWER}"
    )


@pytest.mark.parametrize(
    ("policy", "phase", "weights"),
    [
        pytest.param("hold", Phase.PAUSED, Weights.blue_at(10), id="held-for-a-human"),
        pytest.param("rollback", Phase.ROLLED_BACK, Weights.blue_at(0), id="rolled-back"),
    ],
)
def test_a_gateway_failing_mid_rollout_is_error_ticks_not_a_crash(
    logs: FakeLogAnalytics, policy: str, phase: Phase, weights: Weights
) -> None:
    """The gateway in front of the Logs API answers 502 with an empty body once the rollout is
    under way. Was: the run died with JSONDecodeError, blue left at 10 % and nobody watching;
    now each tick is an Error, and max_consecutive_errors of them follow `on_inconclusive`."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    spec = make_spec(steps=[10, 50, 100], analysis={"on_inconclusive": policy})
    ticks = [0]

    def gateway_fails_after_the_first_tick(*_: Any) -> None:
        ticks[0] += 1
        if ticks[0] == 1:  # the probe and the first tick were answered
            logs.answer_raw(502, b"", times=1000)

    ctl = Controller(
        spec,
        router,
        provider(logs),
        MemoryStateStore(spec.name),
        clock=FakeClock(T0),
        on_tick=gateway_fails_after_the_first_tick,
    )
    final = ctl.run(max_ticks=100)
    assert final.phase is phase, final.reason
    limit = spec.analysis.max_consecutive_errors
    assert f"metrics unreadable {limit} times in a row: " in final.reason, final.reason
    assert "HTTP 502 with an empty body: not a Log Analytics answer" in final.reason
    assert router.get_weights() == weights


def test_a_row_short_of_its_columns_is_an_error_tick(logs: FakeLogAnalytics) -> None:
    """Was: KeyError 'errors' out of `observe` (the row zipped short of its columns)."""
    logs.answer_table(
        ["DeploymentName", "requests", "errors", "le_0", "le_1", "le_2"], [["blue", 3]]
    )
    obs = provider(logs).observe(T0, T0 + 60)
    assert obs.error == (
        f"Log Analytics workspace {WORKSPACE} ({TABLE}): a row has 2 values for 6 columns"
    )


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        pytest.param(
            "https://api.loganalytics.io/", "https://api.loganalytics.io", id="host-slash"
        ),
        pytest.param(
            "https://api.loganalytics.io/v1/", "https://api.loganalytics.io/v1", id="v1-slash"
        ),
        pytest.param("api.loganalytics.io/", "api.loganalytics.io", id="bare-host-slash"),
    ],
)
def test_a_logs_url_ending_in_a_slash_reaches_the_query_api(
    logs: FakeLogAnalytics, monkeypatch: pytest.MonkeyPatch, url: str, normalised: str
) -> None:
    """Was: accepted, then POSTed to `.../v1//v1/workspaces/<id>/query` (the SDK strips only a
    `/v1` with no slash after it; a host with a slash gave `//v1/...`), an HTTP error at the
    probe naming the workspace, not the url."""
    monkeypatch.setattr(
        "rollout.metrics.azuremonitor.default_credential", lambda: StaticCredential()
    )
    metrics = {"kind": "azuremonitor", "workspace_id": WORKSPACE, "endpoint": "ep", "logs_url": url}
    cfg = spec_from_dict({"metrics": metrics}).metrics
    assert isinstance(cfg, AzureMonitorMetricsConfig)
    assert cfg.logs_url == normalised
    AzureMonitorMetrics.from_config(cfg, transport=logs.transport()).probe()
    assert logs.queries == [f"{TABLE} | take 0"]
