"""No spec, however malformed, gets past `load_spec` as anything but a `ConfigError` naming a field.

A property test (hypothesis) mutates valid specs at random — any value replaced by one of another
type, a required key deleted, an unknown key added at any depth, a mapping wrapped in a list —
and checks that loading either succeeds with nothing non-finite in it (and dumps to a spec that
loads again), or raises ConfigError whose every problem starts with a field path. Then YAML's
own oddities through the real CLI (`rollout validate`: exit 2, one line, no traceback), and
random pieces of YAML text through `load_spec`. Deterministic (`derandomize`): CI cannot flake.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from typer.testing import CliRunner

from rollout.cli import app
from rollout.commands.rollout import EXIT_ERROR
from rollout.config import RolloutSpec, load_spec, spec_from_dict
from rollout.errors import ConfigError
from tests.core.helpers import spec_data

#: Valid specs covering every backend kind and most optional sections.
BASES: list[dict[str, Any]] = [
    spec_data(
        metrics={
            "kind": "static",
            "ticks": [{"blue": {"requests": 10, "errors": 1}, "green": {"requests": 90}}],
            "history": {"green": {"requests": 900, "latency_buckets": [[5, 800], [50, 900]]}},
        }
    ),
    {
        "name": "diabetes",
        "router": {
            "kind": "envoy",
            "admin_url": "http://127.0.0.1:9901",
            "routes_file": ".rollout/routes.yaml",
        },
        "metrics": {"kind": "prometheus", "url": "http://127.0.0.1:9090", "preset": "envoy"},
        "steps": [0, 5, 25, 50, 100],
        "mirror_percent": 5,
        "analysis": {
            "interval_s": 10,
            "alpha": 0.05,
            "errors": {"max_ratio": 2.0, "max_rate": 0.1, "negligible_rate": 0.001},
            "latency": {"threshold": "slo", "slo_ms": 250, "max_slow_rate": 0.05},
            "on_inconclusive": "hold",
        },
        "header": "x-api-version",
        "candidate": {"model": "diabetes", "version": "2"},
        "notify": {"url": "https://hooks.example.com/r", "phases": ["Paused", "Failed"]},
    },
    {
        "name": "diabetes",
        "router": {
            "kind": "istio",
            "namespace": "ml",
            "app": "diabetes",
            "hosts": ["diabetes.example.com"],
        },
        "metrics": {"kind": "prometheus", "preset": "istio"},
        "candidate": {"model": "diabetes", "version": "2", "image": "registry/diabetes:2"},
        "state": {"kind": "kubernetes", "namespace": "ml", "lease_ttl_s": 15},
    },
    {
        "name": "diabetes-ridge",
        "router": {
            "kind": "azureml",
            "subscription_id": "00000000-0000-0000-0000-000000000000",
            "resource_group": "rg",
            "workspace": "ws",
            "endpoint": "diabetes-ridge",
            "environment": "azureml:sklearn-env:1",
        },
        "metrics": {
            "kind": "azuremonitor",
            "workspace_id": "00000000-0000-0000-0000-000000000000",
        },
        "steps": [0, 10, 50, 100],
        "mirror_percent": 10,
    },
    {
        "name": "dry",
        "router": {"kind": "memory"},
        "metrics": {
            "kind": "simulated",
            "seed": 2,
            "rps": [[0, 100], [60, 200]],
            "baseline": {"error_rate": 0.001, "latency_ms": {"median": 20, "sigma": 0.4}},
            "canary": {"error_rate": 0.01, "from_s": 30},
        },
        "steps": "seed",
        "state": {"dir": "/tmp/x"},
    },
    {
        "metrics": {
            "kind": "prometheus",
            "url": "https://prom.example.com",
            "preset": "custom",
            "queries": {"requests": "sum(r{c='{colour}'})", "errors": "sum(e{c='{colour}'})"},
            "basic_auth": {"username": "u", "password_env": "P"},
        },
    },
]

#: Values of every type YAML can produce, and the edges of each.
ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    10**400,
    -(10**400),
    -1,
    0,
    1.5,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "x" * 5000,
    "seed",
    [],
    [1, "a"],
    {},
    {"a": 1},
    datetime.date(2024, 1, 1),
    b"\xff",
]

#: A field path: dotted names and list indexes (`metrics.ticks.0.blue`).
FIELD_PATH = re.compile(r"[\w-]+(\.[\w-]+)*|\(top level\)")


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position in a parsed document (the root as ())."""
    found = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*path, index))
    return found


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        doc = doc[part]
    return doc


@st.composite
def mutated_specs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid spec with one to three random mutations."""
    doc: dict[str, Any] = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        how = draw(st.sampled_from(["replace", "delete", "unknown-key", "wrap"]))
        target = _at(doc, path)
        if how == "replace" and path:
            _at(doc, path[:-1])[path[-1]] = copy.deepcopy(draw(st.sampled_from(ODD_VALUES)))
        elif how == "delete" and path and isinstance(_at(doc, path[:-1]), dict):
            del _at(doc, path[:-1])[path[-1]]
        elif how == "unknown-key" and isinstance(target, dict):
            target[draw(st.sampled_from(["bogus", "Kind", "1"]))] = copy.deepcopy(
                draw(st.sampled_from(ODD_VALUES))
            )
        elif how == "wrap" and path and isinstance(target, dict):
            _at(doc, path[:-1])[path[-1]] = [target]
    return doc


def _finite(node: Any) -> bool:
    """No inf or NaN in a dumped spec (but a histogram's last bound: Prometheus' +Inf)."""
    if isinstance(node, float):
        return math.isfinite(node)
    if isinstance(node, dict):
        buckets = node.get("latency_buckets", [])
        return all(map(_finite, [v for k, v in node.items() if k != "latency_buckets"])) and all(
            _finite(count) and (_finite(bound) or (i == len(buckets) - 1 and bound == math.inf))
            for i, (bound, count) in enumerate(buckets)
        )
    if isinstance(node, list | tuple):
        return all(map(_finite, node))
    return True


@pytest.mark.parametrize("base", BASES, ids=lambda base: str(base.get("name", "no-name")))
def test_the_bases_are_valid(base: dict[str, Any]) -> None:
    assert isinstance(spec_from_dict(copy.deepcopy(base)), RolloutSpec)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(mutated_specs())
def test_a_mutated_spec_loads_or_names_its_fields(doc: dict[str, Any]) -> None:
    try:
        spec = spec_from_dict(copy.deepcopy(doc))
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message
        assert FIELD_PATH.fullmatch(message.removeprefix("spec: ").partition(": ")[0]), message
        try:
            RolloutSpec.model_validate(doc)
        except ValidationError as invalid:  # each problem at a field, not at a pydantic type
            for err in invalid.errors():
                where = ".".join(map(str, err["loc"])) or "(top level)"
                assert FIELD_PATH.fullmatch(where), (where, message)
        return
    # What loads holds nothing that cannot be meant, and dumps to a spec that loads again.
    dumped = spec.model_dump(mode="python")
    assert _finite(dumped), dumped
    written = spec.model_dump(mode="json")
    assert spec_from_dict(copy.deepcopy(written)).model_dump(mode="json") == written


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(base)
    *parents, last = path.split(".")
    target = doc
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = value
    return doc


@pytest.mark.parametrize(
    ("base", "path", "value", "message"),
    [
        pytest.param(
            BASES[0],
            "analysis.interval_s",
            math.inf,
            "analysis.interval_s: Input should be a finite number",
            id="interval-inf",  # reached time.sleep(inf) in the controller
        ),
        pytest.param(
            BASES[4],
            "analysis.interval_s",
            0.001,
            "analysis.interval_s: Input should be greater than or equal to 0.01",
            id="interval-busy-loop",  # ticked a thousand times a second, a ledger line each
        ),
        pytest.param(
            BASES[1],
            "analysis.interval_s",
            0.5,
            "analysis.interval_s: 0.5 s is below 1 s, the shortest tick with metrics kind "
            "prometheus: each tick reaches it over the network (the value is in seconds)",
            id="interval-hammers-prometheus",  # queried Prometheus between its scrapes
        ),
        pytest.param(
            BASES[2],
            "analysis.interval_s",
            0.2,
            "analysis.interval_s: 0.2 s is below 1 s, the shortest tick with metrics kind "
            "prometheus and state kind kubernetes: each tick reaches them over the network",
            id="interval-hammers-the-api-server",  # a ConfigMap written five times a second
        ),
        pytest.param(
            BASES[3],
            "analysis.interval_s",
            0.9,
            "analysis.interval_s: 0.9 s is below 1 s, the shortest tick with metrics kind "
            "azuremonitor",
            id="interval-hammers-log-analytics",
        ),
        pytest.param(
            BASES[1],
            "router.timeout_s",
            math.inf,
            "router.timeout_s: Input should be a finite number",
            id="timeout-inf",
        ),
        pytest.param(
            BASES[3],
            "router.deploy_timeout_s",
            math.inf,
            "router.deploy_timeout_s: Input should be a finite number",
            id="deploy-timeout-inf",
        ),
        pytest.param(
            BASES[3],
            "router.traffic_timeout_s",
            math.nan,
            "router.traffic_timeout_s: Input should be a finite number",
            id="traffic-timeout-nan",
        ),
        pytest.param(
            BASES[3],
            "metrics.timeout_s",
            math.inf,
            "metrics.timeout_s: Input should be a finite number",
            id="log-analytics-timeout-inf",
        ),
        pytest.param(
            BASES[0],
            "analysis.latency",
            {"history_s": math.nan},
            "analysis.latency.history_s: Input should be a finite number",
            id="history-nan",
        ),
        pytest.param(
            BASES[4],
            "metrics.buckets_ms",
            [1, math.inf],
            "metrics.buckets_ms.1: Input should be a finite number",
            id="simulated-bucket-inf",
        ),
        pytest.param(
            BASES[4],
            "metrics.seed",
            -1,
            "metrics.seed: Input should be greater than or equal to 0",
            id="negative-seed",  # was a traceback from numpy at `rollout run`
        ),
        pytest.param(
            BASES[4],
            "metrics.rps",
            10**400,
            "metrics.rps: expected requests per second",
            id="rps-beyond-float",  # was two lines of pydantic's union
        ),
        pytest.param(
            BASES[0],
            "metrics.ticks",
            [{"blue": {"requests": math.nan}}],
            "metrics.ticks.0.blue.requests: expected a whole number, got nan",
            id="tick-count-nan",  # was taken, and crashed the first observation (int(nan))
        ),
        pytest.param(
            BASES[0],
            "metrics.ticks",
            [{"green": {"reqests": 5}}],
            "metrics.ticks.0.green.reqests: unknown field: did you mean requests?",
            id="tick-count-typo",  # was a tick of 0 requests
        ),
        pytest.param(
            BASES[0],
            "metrics.ticks",
            [{"blue": {"requests": 10, "errors": 20}}],
            "metrics.ticks.0.blue.errors: errors 20 > requests 10",
            id="tick-more-errors-than-requests",  # was valid, then every tick "metrics unusable"
        ),
        pytest.param(
            BASES[0],
            "metrics.history",
            {"green": {"requests": 10, "latency_buckets": [[5, -1]]}},
            "metrics.history.green.latency_buckets.0.1: Input should be greater than or equal to 0",
            id="history-bucket-negative",
        ),
        pytest.param(
            BASES[4],
            "metrics.rps",
            1e18,
            "metrics.rps: expected requests per second (a number from 0 to 1e+09)",
            id="rps-beyond-numpy",  # was a traceback from numpy's Poisson draw at `rollout run`
        ),
        pytest.param(
            BASES[0],
            "analysis.errors",
            {"max_ratio": 1e300},
            "analysis.errors.max_ratio: Input should be less than or equal to 1000",
            id="error-margin-absurd",  # was NaN in the judge's e-values
        ),
        pytest.param(
            BASES[1],
            "analysis.latency.max_ratio",
            1e17,
            "analysis.latency.max_ratio: Input should be less than or equal to 1000",
            id="latency-margin-absurd",
        ),
        pytest.param(
            BASES[0],
            "metrics.history",
            {"green": {"latency_buckets": [[math.inf, 800], [0.05, 900]]}},
            "metrics.history.green.latency_buckets: a cumulative histogram's "
            "bounds increase and its counts never decrease, got [inf, 800] then [0.05, 900]",
            id="history-buckets-out-of-order",
        ),
        pytest.param(
            BASES[0],
            "name",
            "x" * 201,
            "name: at most 200 characters, got 201: it names the rollout's files",
            id="name-too-long-for-a-file",  # was "File name too long" at `rollout run`
        ),
        # Loaded, leaving the first request or deploy to fail on them:
        pytest.param(
            BASES[2],
            "router.ready_timeout_s",
            0.5,
            "router.ready_timeout_s: 0.5 s is below 30 s, the shortest wait for new pods "
            "to be scheduled, start the scoring server and pass its readiness probe (every 5 s) "
            "(the value is in seconds)",
            id="ready-timeout-fails-every-deploy",  # was accepted: each candidate's deploy failed
        ),
        pytest.param(
            BASES[3],
            "router.deploy_timeout_s",
            0.05,
            "router.deploy_timeout_s: 0.05 s is below 300 s, the shortest wait for Azure "
            "to create, update or delete a deployment (VMs allocated, the image pulled or built, "
            "the scoring server started and ready: minutes) (the value is in seconds)",
            id="deploy-timeout-fails-every-deploy",  # was accepted: every deploy timed out
        ),
        pytest.param(
            BASES[3],
            "router.traffic_timeout_s",
            0.05,
            "router.traffic_timeout_s: 0.05 s is below 60 s, the shortest wait for Azure "
            "to apply a change of the endpoint's traffic (tens of seconds, polled every 5 s) "
            "(the value is in seconds)",
            id="traffic-timeout-fails-every-step",  # was accepted: every traffic change timed out
        ),
        pytest.param(
            BASES[1],
            "router.domains",
            [],
            "router.domains: List should have at least 1 item",
            id="envoy-without-domains",
        ),
        pytest.param(
            BASES[1],
            "router.clusters",
            {"blue": ""},
            "router.clusters.blue: String should have at least 1 character",
            id="envoy-cluster-unnamed",
        ),
        # Was accepted, blue and green one name: the judge compared a series with itself (every
        # candidate "not worse"), or Envoy read one weight for both colours.
        pytest.param(
            BASES[1],
            "router.clusters",
            {"blue": "x", "green": "x"},
            "router.clusters: blue and green name the same cluster, 'x'",
            id="envoy-one-cluster-for-both",
        ),
        # Was accepted, then `run` died of a traceback (the socket refuses ~1e10 s).
        pytest.param(
            BASES[1],
            "metrics.timeout_s",
            1e10,
            "metrics.timeout_s: Input should be less than or equal to 600",
            id="prometheus-timeout-beyond-any-socket",
        ),
        pytest.param(
            BASES[1],
            "router.timeout_s",
            1e10,
            "router.timeout_s: Input should be less than or equal to 600",
            id="envoy-timeout-beyond-any-socket",
        ),
        pytest.param(
            BASES[3],
            "metrics.timeout_s",
            601,
            "metrics.timeout_s: Input should be less than or equal to 600",
            id="azuremonitor-timeout-beyond-the-apis-longest",
        ),
        pytest.param(  # was accepted: a canary with no pod took traffic, and was rolled back
            BASES[2],
            "router.replicas",
            0,
            "router.replicas: Input should be greater than or equal to 1",
            id="istio-without-pods",
        ),
        pytest.param(
            BASES[1],
            "router.pinned_clusters",
            {"blue": "p", "green": "p"},
            "router.pinned_clusters: blue and green name the same cluster, 'p'",
            id="envoy-one-pinned-cluster-for-both",
        ),
        pytest.param(
            BASES[1],
            "router.pinned_clusters",
            {"blue": "blue", "green": "green-pinned"},
            "router.pinned_clusters.blue: 'blue' is a weighted cluster (router.clusters.blue)",
            id="envoy-pinned-is-weighted",
        ),
        pytest.param(
            BASES[1],
            "metrics.labels",
            {"blue": "svc", "green": "svc"},
            "metrics.labels: blue and green name the same series, 'svc'",
            id="prometheus-one-label-for-both",
        ),
        pytest.param(
            BASES[5],
            "metrics.labels",
            {"blue": "a", "green": "a"},
            "metrics.labels: blue and green name the same series, 'a'",
            id="custom-one-label-for-both",
        ),
        pytest.param(
            BASES[3],
            "metrics.deployments",
            {"blue": "cand", "green": "Cand"},
            "metrics.deployments: blue and green name the same deployment, 'cand' and 'Cand' "
            "(Azure ML names ignore case)",
            id="azuremonitor-one-deployment-for-both",
        ),
        pytest.param(
            BASES[1],
            "metrics.labels",
            {"green": ""},
            "metrics.labels.green: String should have at least 1 character",
            id="prometheus-label-empty",
        ),
        pytest.param(
            BASES[1],
            "router.admin_url",
            "127.0.0.1:9901",
            "router.admin_url: must be an http:// or https:// URL, got '127.0.0.1:9901'",
            id="admin-url-without-scheme",
        ),
        pytest.param(
            BASES[1],
            "metrics.url",
            "prometheus:9090",
            "metrics.url: must be an http:// or https:// URL",
            id="prometheus-url-without-scheme",
        ),
        pytest.param(
            BASES[2],
            "router.api_url",
            "localhost:8001",
            "router.api_url: must be an http:// or https:// URL",
            id="api-url-without-scheme",
        ),
        pytest.param(
            BASES[0],
            "candidate.model",
            "",
            "candidate.model: String should have at least 1 character",
            id="empty-model",  # was the release ":2"
        ),
        pytest.param(
            BASES[0],
            "stable.version",
            "",
            "stable.version: String should have at least 1 character",
            id="empty-version",
        ),
        pytest.param(
            BASES[2],
            "candidate.image",
            "",
            "candidate.image: String should have at least 1 character",
            id="empty-image",
        ),
        pytest.param(
            BASES[5],
            "metrics.queries.errors",
            "",
            "metrics.queries.errors: String should have at least 1 character",
            id="empty-query",
        ),
        pytest.param(
            BASES[4],
            "metrics.buckets_ms",
            [50, 10],
            "metrics.buckets_ms: bounds must increase strictly, got [50.0, 10.0]",
            id="simulated-buckets-decreasing",  # as azuremonitor's already were
        ),
        # An SLO between two bucket bounds measured above the next one up while every message
        # named the SLO (300 ms on 250/500: a canary at 450 ms on every request was promoted).
        pytest.param(
            {**BASES[4], "analysis": {"latency": {"threshold": "slo"}}},
            "analysis.latency.slo_ms",
            300,
            "analysis.latency.slo_ms: 300 ms is no bound of the latency histogram, whose nearest "
            "are 250 or 500 ms: a request counts as slow only above a bound, so it would measure "
            "> 500 ms; set slo_ms to 250 or 500 (or add 300 to metrics.buckets_ms)",
            id="simulated-slo-between-bounds",
        ),
        pytest.param(
            {**BASES[3], "analysis": {"latency": {"threshold": "slo"}}},
            "analysis.latency.slo_ms",
            200,
            "analysis.latency.slo_ms: 200 ms is no bound of the latency histogram, whose nearest "
            "are 150 or 250 ms",
            id="azuremonitor-slo-between-bounds",
        ),
        pytest.param(
            {**BASES[4], "analysis": {"latency": {"threshold": "slo"}}},
            "analysis.latency.slo_ms",
            90000,
            "analysis.latency.slo_ms: 90000 ms is above the latency histogram's largest bound, "
            "60000 ms: no request could count as slower",
            id="simulated-slo-above-every-bound",
        ),
        pytest.param(
            {
                **_with(  # blue's histogram: without, no SLO could be measured at all
                    BASES[0],
                    "metrics.ticks",
                    [{"blue": {"requests": 10, "latency_buckets": [[5, 9], [50, 10]]}}],
                ),
                "analysis": {"latency": {"threshold": "slo"}},
            },
            "analysis.latency.slo_ms",
            6000,  # the ticks' bounds are in seconds: 5 s and 50 s
            "analysis.latency.slo_ms: 6000 ms is no bound of the latency histogram, whose "
            "nearest are 5000 or 50000 ms",
            id="static-slo-between-bounds",
        ),
        pytest.param(
            {**BASES[4], "analysis": {"latency": {"max_slow_rate": 0.05}}},
            "analysis.latency.slo_ms",
            300,
            "analysis.latency.slo_ms: 300 ms is no bound of the latency histogram",
            id="simulated-guard-slo-between-bounds",  # the guard measures it too
        ),
        # No histogram, no slow request: the SLO check judged nothing (a canary 10x slower was
        # held as if undecided) and the guard never tripped.
        pytest.param(
            {**BASES[5], "analysis": {"latency": {"slo_ms": 250}}},
            "analysis.latency.threshold",
            "slo",
            "analysis.latency.threshold: 'slo' measures requests slower than slo_ms (250 ms) on "
            "the latency histogram, and metrics.queries has no latency_bucket",
            id="custom-slo-without-histogram",
        ),
        pytest.param(
            {**BASES[5], "analysis": {"latency": {"slo_ms": 250}}},
            "analysis.latency.max_slow_rate",
            0.05,
            "analysis.latency.max_slow_rate: measures requests slower than slo_ms (250 ms) on "
            "the latency histogram, and metrics.queries has no latency_bucket",
            id="custom-guard-without-histogram",
        ),
        # Was accepted, and never measured: a guard the spec showed and nothing applied.
        pytest.param(
            {**BASES[0], "analysis": {"latency": {"enabled": False, "slo_ms": 250}}},
            "analysis.latency.max_slow_rate",
            0.05,
            "analysis.latency.max_slow_rate: is not applied while the latency check is off",
            id="guard-of-a-disabled-latency-check",
        ),
        # Was "analysis: max_step_duration_s must be >= min_step_duration_s" for all three,
        # naming the section, and a field the user may not have written.
        pytest.param(
            _with(BASES[1], "analysis.interval_s", 20),
            "analysis.max_step_duration_s",
            15,
            "analysis.max_step_duration_s: 15 s is shorter than a step's minimum duration, 20 s "
            "(analysis.interval_s, as min_step_duration_s is not set): give at least that",
            id="max-step-below-interval",
        ),
        pytest.param(
            BASES[1],
            "analysis.min_step_duration_s",
            20000,
            "analysis.min_step_duration_s: 20000 s is longer than max_step_duration_s, 10800 s "
            "(the default): a step could never last that long; lower it, or raise "
            "max_step_duration_s",
            id="min-step-above-default-max",
        ),
        pytest.param(
            BASES[1],
            "analysis.interval_s",
            20000,
            "analysis.interval_s: 20000 s is longer than max_step_duration_s, 10800 s (the "
            "default), and a step lasts at least one interval (min_step_duration_s is not set)",
            id="interval-above-default-max",
        ),
        # The istio preset counts a Service's requests by destination_service_name: a label other
        # than the Service the router weights (and `manifests` creates) read another Service's
        # traffic, or none; swapped, each colour's evidence was the other's.
        pytest.param(
            BASES[2],
            "metrics.labels",
            {"blue": "diabetes-green", "green": "diabetes-blue"},
            "metrics.labels.blue: 'diabetes-green' is green's Service (router.app diabetes): blue "
            "and green swapped? blue's weighted Service is 'diabetes-blue'; metrics.labels.green: "
            "'diabetes-blue' is blue's Service",
            id="istio-labels-swapped",
        ),
        pytest.param(
            BASES[2],
            "metrics.labels",
            {"blue": "blue", "green": "diabetes-green"},
            "metrics.labels.blue: 'blue' is no Service the router weights (router.app diabetes): "
            "blue's is 'diabetes-blue', as `aml-rollout manifests` creates it",
            id="istio-label-not-the-routers",
        ),
        pytest.param(
            BASES[2],
            "metrics.namespace",
            "default",
            "metrics.namespace: 'default' is not the router's namespace, 'ml', where its Services "
            "are",
            id="istio-namespace-not-the-routers",
        ),
        pytest.param(
            BASES[1],
            "metrics.labels",
            {"blue": "green", "green": "blue"},
            "metrics.labels.blue: 'green' is green's cluster (router.clusters): blue and green "
            "swapped? blue's weighted cluster is 'blue'",
            id="envoy-labels-swapped",
        ),
    ],
)
def test_a_value_that_cannot_be_meant_is_named(
    base: dict[str, Any], path: str, value: Any, message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        spec_from_dict(_with(base, path, value))
    assert str(raised.value).startswith(f"spec: {message}"), str(raised.value)


@pytest.mark.parametrize(
    ("base", "path", "message"),
    [
        pytest.param(BASES[1], "stpes", "stpes: unknown field: did you mean steps?", id="top"),
        pytest.param(
            BASES[1],
            "analysis.intervall_s",
            "analysis.intervall_s: unknown field: did you mean interval_s?",
            id="section",
        ),
        pytest.param(
            BASES[1],
            "analysis.latency.slo_s",
            "analysis.latency.slo_s: unknown field: did you mean slo_ms?",
            id="nested-section",
        ),
        pytest.param(
            BASES[2],
            "router.ready_timout_s",
            "router.ready_timout_s: unknown field: did you mean ready_timeout_s?",
            id="union-member-by-its-kind",  # not another router's field
        ),
        pytest.param(
            BASES[2],
            "state.lease_tll_s",
            "state.lease_tll_s: unknown field: did you mean lease_ttl_s?",
            id="state-member",
        ),
        pytest.param(
            BASES[1], "notify.colour", "notify.colour: unknown field", id="nothing-near-it"
        ),
    ],
)
def test_an_unknown_field_is_named_with_the_nearest_known_one(
    base: dict[str, Any], path: str, message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        spec_from_dict(_with(base, path, 1))
    assert str(raised.value) == f"spec: {message}"


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        pytest.param(
            "router",
            {"kind": "nginx"},
            "router.kind: unknown kind 'nginx': one of memory, envoy, istio, azureml",
            id="unknown",
        ),
        pytest.param(
            "metrics",
            {"kind": "prometheous", "url": "http://127.0.0.1:9090"},
            "metrics.kind: unknown kind 'prometheous': did you mean prometheus? (one of static, "
            "simulated, prometheus, azuremonitor)",
            id="typo",
        ),
        pytest.param(
            "router",
            {"namespace": "ml", "app": "diabetes"},
            "router.kind: missing: one of memory, envoy, istio, azureml",
            id="missing",  # was: "router: Unable to extract tag using discriminator 'kind'"
        ),
        pytest.param(
            "state",
            {"kind": "redis"},
            "state.kind: unknown kind 'redis': one of file, memory, kubernetes",
            id="state",
        ),
    ],
)
def test_a_backends_kind_unknown_or_missing_is_named_with_the_kinds_there_are(
    section: str, value: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        spec_from_dict({**BASES[1], section: value})
    assert str(raised.value) == f"spec: {message}"


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        pytest.param(
            "candidate",
            "diabetes:2",
            "candidate: expected a mapping, got the text 'diabetes:2': write "
            '{model: diabetes, version: "2"}',
            id="release-as-on-the-command-line",  # was: "Input should be a valid dictionary or
            # instance of ReleaseConfig"
        ),
        pytest.param(
            "router",
            "istio",
            "router: expected a mapping, got the text 'istio': write {kind: istio, ...}",
            id="a-kind-alone",
        ),
        pytest.param(
            "metrics",
            ["prometheus"],
            "metrics: expected a mapping with a kind (one of static, simulated, prometheus, "
            "azuremonitor), got a list",
            id="a-list",
        ),
        pytest.param(
            "analysis",
            None,
            "analysis: expected a mapping (interval_s, alpha, min_requests, ...), got nothing "
            "(an empty value)",
            id="empty",
        ),
    ],
)
def test_a_section_that_is_no_mapping_says_what_it_takes(
    section: str, value: Any, message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        spec_from_dict({**BASES[1], section: value})
    assert str(raised.value) == f"spec: {message}"


def test_a_validators_words_come_without_pydantics_prefix() -> None:
    with pytest.raises(ConfigError) as raised:
        spec_from_dict(_with(BASES[1], "steps", [5, 50]))
    assert str(raised.value) == "spec: steps: the last weight must be 100 (promotion), got 50"


def test_a_scripted_histogram_may_end_at_inf() -> None:
    """Prometheus' last bucket is +Inf: a static tick may copy it (NaN stays refused)."""
    buckets = [[0.05, 90], [math.inf, 100]]
    spec = spec_from_dict(
        _with(BASES[0], "metrics.history", {"green": {"latency_buckets": buckets}})
    )
    assert spec.metrics.history.green.latency_buckets[-1] == (math.inf, 100)  # type: ignore[union-attr]
    written = yaml.safe_dump(spec.model_dump(mode="json"))  # as `aml-rollout up` writes a spec
    again = spec_from_dict(yaml.safe_load(written)).metrics
    assert again == spec.metrics  # was null for .inf: not a bound
    with pytest.raises(ConfigError, match=r"history\.green\.latency_buckets\.0\.0: Input should"):
        spec_from_dict(
            _with(BASES[0], "metrics.history", {"green": {"latency_buckets": [[math.nan, 1]]}})
        )


# ------------------------------------------------------------------------------ YAML, via the CLI

runner = CliRunner()

#: Nine lists of nine aliases of the one before: 28 values written, 490 million once expanded.
BILLION_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{name}: &{name} [{', '.join([f'*{before}'] * 9)}]\n"
    for before, name in itertools.pairwise("abcdefghi")
)


def validate(path: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["rollout", "validate", str(path)])
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "name: a\nsteps: seed\nname: b\n",
            "line 3, column 1: duplicate key 'name' (first on line 1): give it once",
            id="duplicate-key",  # was: rollout b, silently
        ),
        pytest.param(
            "analysis:\n  interval_s: 5\n  errors: {max_ratio: 3}\n  interval_s: 50\n",
            "line 4, column 3: duplicate key 'interval_s' (first on line 2)",
            id="duplicate-nested-key",
        ),
        pytest.param(
            BILLION_LAUGHS,
            "aliases (*name) expand 28 values to 490,329,064: refused",
            id="billion-laughs",  # was: minutes of CPU, then all memory
        ),
        pytest.param(
            "name: &a [*a]\n",
            "line 1, column 7: an alias (*name) inside the value it names",
            id="recursive-alias",  # was: RecursionError, a traceback
        ),
        pytest.param(
            "name: " + "[" * 5000 + "]" * 5000 + "\n",
            "not a spec: collections nested too deeply",
            id="nested-too-deeply",  # was: RecursionError, a traceback
        ),
        pytest.param(
            "candidate: {model: m, version: 2024-01-01}\n",
            'candidate.version: read as the date 2024-01-01: quote the version (e.g. "2024-01-01")',
            id="version-read-as-a-date",  # was: "Input should be a valid string"
        ),
        pytest.param(
            "name: 2024-13-45\n",
            "line 1, column 7: '2024-13-45' is not a date (month must be in 1..12); quote it if "
            "it is text",
            id="no-such-date",  # was a ValueError traceback from PyYAML's date constructor
        ),
        pytest.param(
            "name: 0x_\n",
            "line 1, column 7: '0x_' is not a whole number; quote it if it is text",
            id="hex-without-digits",  # was a ValueError traceback
        ),
        pytest.param(
            "name: !!int\n",
            "line 1, column 7: '' is not a whole number",
            id="empty-int-tag",  # was an IndexError traceback
        ),
        pytest.param(
            "name: !!set [a]\n",
            "line 1, column 7: expected a mapping node, but found sequence",
            id="set-of-a-list",
        ),
        pytest.param(
            "? |\n  two\n  lines\n: 1\n",
            "'two\\nlines\\n': unknown field",
            id="key-with-a-newline",  # was a message of three lines
        ),
        pytest.param(
            "name: a\nanalysis:\n\tinterval_s: 5\n",
            "line 3, column 1: found character '\\t' that cannot start any token",
            id="tab-indent",
        ),
        pytest.param("- name: a\n", "expected a mapping at the top level", id="top-level-list"),
        pytest.param("rollout\n", "expected a mapping at the top level", id="top-level-scalar"),
        pytest.param("", "the file is empty (no settings in it)", id="empty-file"),
        pytest.param(
            "# a spec, to be written\n\n",
            "the file is empty (no settings in it)",
            id="comments-only",
        ),
        pytest.param(
            "analysis: {interval_s: .inf}\n",
            "analysis.interval_s: Input should be a finite number",
            id="inf-interval",
        ),
        pytest.param(
            "analysis: {alpha: .nan}\n",
            "analysis.alpha: Input should be a finite number",
            id="nan-alpha",
        ),
        pytest.param(
            "candidate: {model: m, version: 1.10}\n",
            "candidate.version: read as the number 1.1: quote the version",
            id="version-read-as-a-number",
        ),
        pytest.param(
            "on: [Failed]\n",
            "top level: a key YAML reads as a boolean (an unquoted on, off, yes or no)",
            id="on-key",
        ),
        pytest.param(
            "analysis: {on_inconclusive: no}\n",
            "analysis.on_inconclusive: Input should be 'hold' or 'rollback'",
            id="no-value",
        ),
    ],
)
def test_validate_names_what_is_wrong_with_the_yaml(
    tmp_path: Path, text: str, message: str
) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text, "utf-8")
    # CPU seconds, not wall-clock: the bound is for the refusals that once took minutes of CPU
    # (a YAML bomb), and a loaded machine stretched 0.85 s of CPU past 5 s of wall-clock.
    started = time.process_time()
    code, out = validate(spec)
    cpu_s = time.process_time() - started
    assert cpu_s < 5, f"{cpu_s:.2f} s of CPU"
    assert code == EXIT_ERROR, out
    assert message in out
    assert out.startswith(f"error: {spec}: ") and "Traceback" not in out


def test_validate_refuses_a_file_too_large_to_be_a_spec(tmp_path: Path) -> None:
    # Was read whole into memory first (a 2 GB file: 2 GB, then PyYAML on it).
    from rollout.config import MAX_SPEC_BYTES

    path = tmp_path / "spec.yaml"
    with path.open("wb") as big:
        big.truncate(2 * 1024**3)  # sparse: no disk, no time
    code, out = validate(path)
    assert code == EXIT_ERROR
    assert out == (
        f"error: {path}: not a spec: larger than {MAX_SPEC_BYTES:,} bytes, the most a spec may "
        "be (is it the right file?)"
    )


def test_a_spec_of_the_largest_size_loads(tmp_path: Path) -> None:
    from rollout.config import MAX_SPEC_BYTES

    text = "name: big\n"
    path = tmp_path / "spec.yaml"
    path.write_text(text + "#" * (MAX_SPEC_BYTES - len(text)))
    assert load_spec(path).name == "big"


def test_validate_refuses_a_file_not_in_utf8(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_bytes("name: diabète\n".encode("latin-1"))
    code, out = validate(spec)
    assert code == EXIT_ERROR
    assert "not UTF-8 text (byte 0xe8 at offset 10); save it as UTF-8" in out


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            "stable: &s {model: m, version: '1'}\ncandidate: {<<: *s, version: '2'}\n",
            id="merge-key-overridden",  # not a duplicate: a key next to `<<` overrides on purpose
        ),
        pytest.param(
            "metrics: {kind: static, ticks: [&t {blue: {requests: 5}, green: {requests: 50}}, "
            + ", ".join(["*t"] * 2000)
            + "]}\n",
            id="aliases-within-the-limit",  # 14,000 values more: the limit is for bombs only
        ),
        pytest.param("analysis: {errors: {enabled: yes}, latency: {enabled: no}}\n", id="yes-no"),
    ],
)
def test_validate_takes_yaml_a_spec_may_use(tmp_path: Path, text: str) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text, "utf-8")
    code, out = validate(spec)
    assert code == 0, out


#: Pieces of YAML that reach PyYAML's less travelled paths: tags, anchors, odd scalars.
YAML_PIECES = [
    *["name: ", "steps: ", "analysis:\n  ", "metrics: {kind: static, ticks: [", "candidate: "],
    *["!!int ", "!!float ", "!!timestamp ", "!!bool ", "!!set ", "!!binary ", "!!str ", "!foo "],
    *["&a ", "*a", "<<: ", "? ", "- ", "|\n  ", ">-\n  ", "---\n", "%YAML 1.1\n"],
    *["2024-01-01", "2024-13-45", "1.10", ".inf", ".nan", "0x", "0x_", "1_0", "1e400", "190:20:30"],
    *["yes", "on", "~", "'", '"', "\t", "\n", "  ", ": ", ", ", "[", "]", "{", "}", "#", "\ufeff"],
]


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.lists(st.one_of(st.sampled_from(YAML_PIECES), st.text(max_size=4)), max_size=25))
def test_any_text_loads_or_is_one_config_error(pieces: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        spec = Path(folder) / "spec.yaml"
        spec.write_bytes("".join(pieces).encode("utf-8", "surrogatepass"))
        try:
            load_spec(spec)
        except ConfigError as exc:
            # One line, but for a key YAML read as a boolean: that line, then the other problems.
            assert "\n" not in str(exc) or "reads as a boolean" in str(exc), str(exc)


@pytest.mark.parametrize(
    ("base", "interval"),
    [
        pytest.param(BASES[4], 0.01, id="simulated-at-the-floor"),  # fast demos and tests
        pytest.param(BASES[0], 0.02, id="static"),
        pytest.param(BASES[1], 1, id="prometheus-at-1-s"),  # the local stack scrapes every 1 s
        pytest.param(BASES[2], 1.0, id="kubernetes-store-at-1-s"),
    ],
)
def test_the_shortest_ticks_each_backend_allows_load(base: dict[str, Any], interval: float) -> None:
    spec = spec_from_dict(_with(base, "analysis.interval_s", interval))
    assert spec.analysis.interval_s == interval


@pytest.mark.parametrize(
    ("base", "field", "seconds"),
    [
        pytest.param(BASES[2], "ready_timeout_s", 30, id="istio-ready"),
        pytest.param(BASES[3], "deploy_timeout_s", 300, id="azureml-deploy"),
        pytest.param(BASES[3], "traffic_timeout_s", 60, id="azureml-traffic"),
    ],
)
def test_the_shortest_router_waits_load(base: dict[str, Any], field: str, seconds: float) -> None:
    spec = spec_from_dict(_with(base, f"router.{field}", seconds))
    assert getattr(spec.router, field) == seconds


def _assert_load_refuses(tmp_path: Path, text: str, message: str) -> None:
    """`load_spec` of `text` raises a ConfigError starting with the file and `message`."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_spec(spec)
    assert str(refused.value).startswith(f"{spec}: {message}"), str(refused.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            'analysis: {interval_s: "5"}\n',
            "analysis.interval_s: expected a number, got the text '5': write it without quotes",
            id="quoted-interval",  # was 5.0, while "5s" was refused: a template's quotes
        ),
        pytest.param(
            "analysis: {interval_s: 1e1}\n",
            "analysis.interval_s: expected a number, got the text '1e1': YAML reads 1e1 as text; "
            "write 10",
            id="exponent-yaml-reads-as-text",  # was "write it without quotes": it was
        ),
        pytest.param(
            "analysis: {alpha: 5e-2}\n",
            "analysis.alpha: expected a number, got the text '5e-2': YAML reads 5e-2 as text; "
            "write 0.05",
            id="exponent-without-a-dot",
        ),
        pytest.param(
            "analysis: {alpha: 123456789e-12}\n",
            "analysis.alpha: expected a number, got the text '123456789e-12': YAML reads "
            "123456789e-12 as text; write 0.000123456789",
            id="exponent-every-digit-kept",  # was "write 1.234568e-4": another number
        ),
        pytest.param(
            "analysis: {max_step_duration_s: 12345678901234567e0}\n",
            "analysis.max_step_duration_s: expected a number, got the text '12345678901234567e0': "
            "YAML reads 12345678901234567e0 as text; write 1.2345678901234568e+16",
            id="exponent-large",
        ),
        pytest.param(
            "analysis: {interval_s: '5s'}\n",
            "analysis.interval_s: expected a number, got the text '5s'",
            id="interval-with-a-unit",
        ),
        pytest.param(
            "analysis: {min_requests: '200'}\n",
            "analysis.min_requests: expected a whole number, got the text '200': write it",
            id="quoted-count",
        ),
        pytest.param(
            "analysis: {errors: {max_rate: yes}}\n",
            "analysis.errors.max_rate: expected a number, got the boolean true",
            id="boolean-rate",  # was 1.0: 100 % errors allowed
        ),
        pytest.param(
            "analysis: {min_requests: 200.5}\n",
            "analysis.min_requests: expected a whole number, got 200.5",
            id="fractional-count",
        ),
        pytest.param(
            "analysis: {min_requests: 200.0}\n",
            "analysis.min_requests: expected a whole number, got 200.0",
            id="count-written-as-a-float",  # as strict as the text: what YAML read is what counts
        ),
        pytest.param(
            "metrics: {kind: static, history: {green: {latency_buckets: [[5, '800']]}}}\n",
            "metrics.history.green.latency_buckets.0.1: expected a whole number, got the "
            "text '800'",
            id="quoted-bucket-count",  # inside a list of pairs too
        ),
        pytest.param(
            "router: {kind: istio, namespace: ml, app: a, port: '80'}\n",
            "router.port: expected a whole number, got the text '80'",
            id="quoted-port",
        ),
        pytest.param(
            "mirror_percent: '5'\nsteps: [0, 50, 100]\n",
            "mirror_percent: expected a whole number, got the text '5'",
            id="quoted-percent",
        ),
    ],
)
def test_a_number_is_a_number_not_text(text: str, message: str, tmp_path: Path) -> None:
    _assert_load_refuses(tmp_path, text, message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "candidate: {model: 1.10, version: '2'}\n",
            "candidate.model: expected text, got the number 1.1: quote it (unquoted, YAML reads "
            "1.10 as the number 1.1)",
            id="model-read-as-a-float",  # was "Input should be a valid string"
        ),
        pytest.param(
            "name: 2024\n",
            "name: expected text, got the number 2024: quote it",
            id="name-read-as-an-int",
        ),
        pytest.param(
            "router: {kind: istio, app: diabetes, namespace: 0.5}\n",
            "router.namespace: expected text, got the number 0.5: quote it",
            id="namespace-read-as-a-float",
        ),
        pytest.param(
            "state: {kind: kubernetes, namespace: no}\n",
            "state.namespace: expected text, got the boolean false: quote it",
            id="namespace-read-as-a-boolean",  # YAML 1.1: no, off, yes, on
        ),
        pytest.param(
            "candidate: {model: diabetes, version: '2', deployment: 2024-01-01}\n",
            "candidate.deployment: expected text, got the date 2024-01-01: quote it",
            id="text-read-as-a-date",
        ),
    ],
)
def test_text_yaml_read_as_something_else_says_to_quote_it(
    text: str, message: str, tmp_path: Path
) -> None:
    _assert_load_refuses(tmp_path, text, message)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        pytest.param('state: {dir: "st\\0ate"}\n', "state.dir", id="state-dir"),
        pytest.param(
            'router: {kind: envoy, routes_file: "routes\\0.yaml"}\n',
            "router.routes_file",
            id="routes",
        ),
        pytest.param(
            'candidate: {model: m, version: "2", model_dir: "pk\\0g"}\n',
            "candidate.model_dir",
            id="model-dir",  # a str, not a Path
        ),
        pytest.param(
            'router: {kind: envoy, routes_file: r.yaml, domains: ["a", "b\\0"]}\n',
            "router.domains",
            id="in-a-list",
        ),
    ],
)
def test_a_nul_byte_is_refused_at_its_field(text: str, field: str, tmp_path: Path) -> None:
    # Was loaded, then a traceback at run: "ValueError: embedded null byte" from open().
    _assert_load_refuses(tmp_path, text, f"{field}: holds a NUL byte (\\0)")


def test_a_whole_number_is_a_number() -> None:
    """Strict, not pedantic: an int is taken wherever a float is (`interval_s: 5`)."""
    spec = spec_from_dict(
        {"analysis": {"interval_s": 5, "max_step_duration_s": 60, "errors": {"max_rate": 1}}}
    )
    assert spec.analysis.interval_s == 5.0
    assert spec.analysis.max_step_duration_s == 60.0
    assert spec.analysis.errors.max_rate == 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "analysis: {latency: {enabled: 'no'}}\n",
            "analysis.latency.enabled: expected true or false, got the text 'no': write false "
            "without quotes",
            id="quoted-no",  # was false, silently: a template's quotes
        ),
        pytest.param(
            "analysis: {errors: {enabled: 1}}\n",
            "analysis.errors.enabled: expected true or false, got the number 1",
            id="number-for-a-switch",  # was true: a count in the wrong place
        ),
        pytest.param(
            "router: {kind: istio, namespace: ml, app: a, in_cluster: 'true'}\n",
            "router.in_cluster: expected true or false, got the text 'true': write true "
            "without quotes",
            id="quoted-in-cluster",
        ),
        pytest.param(
            "state: {kind: kubernetes, namespace: ml, in_cluster: 'Off'}\n",
            "state.in_cluster: expected true or false, got the text 'Off': write "
            "false without quotes",
            id="quoted-off",
        ),
        pytest.param(
            "metrics: {kind: prometheus, url: 'http://p:9090', azure_auth: 'maybe'}\n",
            "metrics.azure_auth: expected true or false, got the text 'maybe'",
            id="text-for-a-switch",
        ),
        pytest.param(
            "metrics: {kind: prometheus, url: 'https://p', insecure_skip_verify: 0.0}\n",
            "metrics.insecure_skip_verify: expected true or false, got the number 0.0",
            id="float-for-a-switch",
        ),
    ],
)
def test_a_switch_is_true_or_false_not_text(text: str, message: str, tmp_path: Path) -> None:
    _assert_load_refuses(tmp_path, text, message)


def test_an_slo_nothing_measures_is_not_checked_against_the_bounds() -> None:
    # threshold baseline_p99 and no max_slow_rate: slo_ms is read by nothing.
    analysis = {"latency": {"threshold": "baseline_p99", "slo_ms": 300}}
    spec = spec_from_dict({**BASES[4], "analysis": analysis})
    assert spec.analysis.latency.slo_ms == 300


def _fields_told(message: str) -> list[str]:
    """The field paths a ConfigError of `spec_from_dict` names, in order."""
    return re.findall(r"(?:^spec: |; )([\w.]+): ", message)


def test_every_cross_field_mistake_is_told_at_once() -> None:
    # Told one per run: a user fixed the first, ran validate again, and only then saw the next.
    doc = {
        **BASES[2],  # istio router, istio preset, kubernetes store
        "name": "diabetes_v2",  # a file name, but no ConfigMap's
        "steps": [5, 50, 100],
        "mirror_percent": 10,  # and no 0 % step
        "analysis": {"interval_s": 0.5},  # below the floor of a remote metrics source
    }
    with pytest.raises(ConfigError) as raised:
        spec_from_dict(doc)
    assert _fields_told(str(raised.value)) == ["mirror_percent", "analysis.interval_s", "name"]


def test_every_mistake_of_one_section_is_told_at_once() -> None:
    metrics = {
        "kind": "prometheus",
        "url": "http://user:secret@prometheus:9090",
        "namespace": "ml",
        "latency_unit": "s",
    }
    with pytest.raises(ConfigError) as raised:
        spec_from_dict({**BASES[0], "metrics": metrics})
    told = _fields_told(str(raised.value))
    assert told == ["metrics.latency_unit", "metrics.namespace", "metrics.url"]


@pytest.mark.parametrize(
    ("router", "metrics", "told"),
    [
        pytest.param(  # was: loaded ok (only texts and lists of them were looked at)
            {"kind": "istio", "app": "ab"},
            {"kind": "prometheus", "preset": "istio", "match_labels": {"job": "a\0"}},
            ["metrics.match_labels.job"],
            id="a-match-labels-value",
        ),
        pytest.param(  # was: also metrics.labels.blue and .green, derived from the app
            {"kind": "istio", "app": "a\0b", "namespace": "m\0l"},
            {"kind": "prometheus", "preset": "istio"},
            ["router.app", "router.namespace"],
            id="istio-app-told-once",
        ),
        pytest.param(
            {"kind": "envoy", "routes_file": "r.yaml", "clusters": {"blue": "b\0"}},
            {"kind": "prometheus", "preset": "envoy"},
            ["router.clusters.blue"],
            id="envoy-cluster-told-once",
        ),
    ],
)
def test_a_nul_byte_is_told_once_at_the_field_the_user_wrote(
    router: dict[str, Any], metrics: dict[str, Any], told: list[str]
) -> None:
    with pytest.raises(ConfigError) as raised:
        spec_from_dict({"name": "x", "steps": [5, 100], "router": router, "metrics": metrics})
    assert _fields_told(str(raised.value)) == told, str(raised.value)
    assert "holds a NUL byte" in str(raised.value)


# ---------------------------------------------------- an SLO on scripted counts with no histogram

_FAST = [[0.25, 80], [math.inf, 90]]  # 90 requests, 10 of them above 250 ms


def _scripted(blue: dict[str, Any], green: dict[str, Any], latency: dict[str, Any]) -> Any:
    """BASES[0] (memory router, static metrics) with one tick of these counts and this check."""
    doc = _with(BASES[0], "metrics.ticks", [{"blue": blue, "green": green}])
    return _with(doc, "analysis.latency", {"enabled": True, **latency})


@pytest.mark.parametrize(
    ("blue", "green", "latency", "message"),
    [
        pytest.param(
            {"requests": 10},
            {"requests": 90},
            {"threshold": "slo", "slo_ms": 250},
            "analysis.latency.threshold: 'slo' measures requests slower than slo_ms (250 ms) on "
            "the latency histogram, and metrics.ticks give blue and green requests but no "
            "latency_buckets: how many were slow is unknown, so latency is never judged. Add "
            "latency_buckets to their counts, or set analysis.latency.enabled to false",
            id="slo-check",
        ),
        pytest.param(
            {"requests": 10},
            {"requests": 90},
            {"max_slow_rate": 0.05, "slo_ms": 250},
            "analysis.latency.max_slow_rate: measures requests slower than slo_ms (250 ms) on the "
            "latency histogram, and metrics.ticks give blue and green requests but no "
            "latency_buckets",
            id="slo-guard",
        ),
        pytest.param(  # green's histogram alone: blue's slow requests are never known
            {"requests": 10},
            {"requests": 90, "latency_buckets": _FAST},
            {"threshold": "slo", "slo_ms": 250},
            "analysis.latency.threshold: 'slo' measures requests slower than slo_ms (250 ms) on "
            "the latency histogram, and metrics.ticks give blue requests but no latency_buckets: "
            "how many were slow is unknown, so latency is never judged. Add latency_buckets to "
            "its counts",
            id="blue-without-histogram",
        ),
    ],
)
def test_an_slo_on_scripted_counts_without_a_histogram_is_refused(
    blue: dict[str, Any], green: dict[str, Any], latency: dict[str, Any], message: str
) -> None:
    """Was: loaded, and the dry run held at its first step until max_step_duration_s ("latency
    not judged now (blue and green: no latency histogram)"), exit 4 — as custom Prometheus
    queries without `latency_bucket` were already refused."""
    with pytest.raises(ConfigError) as raised:
        spec_from_dict(_scripted(blue, green, latency))
    assert str(raised.value).startswith(f"spec: {message}"), str(raised.value)


@pytest.mark.parametrize(
    ("blue", "green", "latency"),
    [
        pytest.param(
            {"requests": 10, "latency_buckets": _FAST},
            {"requests": 90, "latency_buckets": _FAST},
            {"threshold": "slo", "slo_ms": 250, "max_slow_rate": 0.05},
            id="both-histograms",
        ),
        pytest.param(  # blue serves nothing in the script: no request of its to judge
            {},
            {"requests": 90, "latency_buckets": _FAST},
            {"max_slow_rate": 0.05, "slo_ms": 250},
            id="no-blue-traffic",
        ),
        pytest.param(  # the baseline's p99: "latency not judged (... no histogram)", said
            {"requests": 10},
            {"requests": 90},
            {"threshold": "baseline_p99"},
            id="no-slo-measured",
        ),
        pytest.param(
            {"requests": 10},
            {"requests": 90},
            {"enabled": False, "threshold": "slo", "slo_ms": 250},
            id="latency-off",
        ),
    ],
)
def test_scripted_counts_an_slo_can_be_measured_on_load(
    blue: dict[str, Any], green: dict[str, Any], latency: dict[str, Any]
) -> None:
    assert spec_from_dict(_scripted(blue, green, latency)).metrics.kind == "static"


def test_an_slo_on_a_static_source_with_no_ticks_loads() -> None:
    """The default source observes nothing at all (no traffic, never judged on anything): the
    core's tests hand their observations to `step` with it."""
    spec = spec_from_dict(
        {"analysis": {"latency": {"threshold": "slo", "slo_ms": 250}}, "steps": [5, 100]}
    )
    assert spec.analysis.latency.slo_ms == 250


# ------------------------------------------------- a Prometheus that relabels the router's colours


def _relabelled(base: dict[str, Any], labels: dict[str, str], **more: Any) -> dict[str, Any]:
    """`base` (BASES[1]: envoy router and preset; BASES[2]: istio) with these metrics.labels."""
    return {**base, "metrics": {**base["metrics"], "labels": labels, **more}}


@pytest.mark.parametrize(
    ("base", "labels", "selector"),
    [
        pytest.param(  # e.g. Istio's Telemetry API overriding destination_service_name
            BASES[2],
            {"blue": "diabetes-blue.ml.svc.cluster.local", "green": "ml/diabetes-green"},
            'destination_service_name=~"diabetes\\\\-blue\\\\.ml\\\\.svc\\\\.cluster\\\\.local|'
            'ml/diabetes\\\\-green"',
            id="istio",
        ),
        pytest.param(  # e.g. metric_relabel_configs prefixing envoy_cluster_name
            BASES[1],
            {"blue": "edge_blue", "green": "edge_green"},
            'envoy_cluster_name=~"edge_blue|edge_green"',
            id="envoy",
        ),
        pytest.param(  # relabelling opaque ids: nothing to tell a swap by, the user's word taken
            BASES[1],
            {"blue": "c-7f3a", "green": "c-19be"},
            'envoy_cluster_name=~"c\\\\-7f3a|c\\\\-19be"',
            id="opaque",
        ),
    ],
)
def test_a_relabelling_prometheus_is_read_by_the_preset_with_its_own_labels(
    base: dict[str, Any], labels: dict[str, str], selector: str
) -> None:
    """Was: no way to run a preset on a Prometheus whose colour label values are not the
    router's names (refused at metrics.labels), but rewriting its three queries as `custom`."""
    from rollout.metrics.prometheus import PrometheusMetrics

    spec = spec_from_dict(_relabelled(base, labels, relabelled=True))
    provider = PrometheusMetrics.from_config(spec.metrics)  # type: ignore[arg-type]
    assert provider.preset is not None
    assert selector in provider.preset.requests.selector(
        [provider.labels.blue, provider.labels.green]
    )


@pytest.mark.parametrize(
    ("base", "labels", "more", "message"),
    [
        pytest.param(  # the mistake the router check is there for, relabelled or not
            BASES[2],
            {"blue": "diabetes-green", "green": "diabetes-blue"},
            {"relabelled": True},
            "metrics.labels.blue: 'diabetes-green' is green's Service (router.app diabetes): "
            "blue and green swapped?",
            id="istio-swapped",
        ),
        pytest.param(
            BASES[2],
            {"blue": "diabetes-green.ml.svc.cluster.local", "green": "diabetes-blue.ml"},
            {"relabelled": True},
            "metrics.labels.blue: 'diabetes-green.ml.svc.cluster.local' holds green's Service "
            "name 'diabetes-green' (router.app diabetes), not blue's 'diabetes-blue': blue and "
            "green swapped?; metrics.labels.green: 'diabetes-blue.ml' holds blue's Service name",
            id="istio-relabelled-swapped",
        ),
        pytest.param(
            BASES[1],
            {"blue": "EDGE_GREEN", "green": "edge_blue"},
            {"relabelled": True},
            "metrics.labels.blue: 'EDGE_GREEN' holds green's cluster name 'green' "
            "(router.clusters), not blue's 'blue': blue and green swapped?",
            id="envoy-relabelled-swapped",
        ),
        pytest.param(  # without the flag, a label not the router's is still a mistake
            BASES[1],
            {"blue": "edge_blue", "green": "edge_green"},
            {},
            "metrics.labels.blue: 'edge_blue' is no cluster the router weights (router.clusters): "
            "blue's is 'blue'; leave metrics.labels out and the preset reads the router's, or, "
            "if your Prometheus relabels them, give its values and set metrics.relabelled: true",
            id="envoy-not-the-routers-says-how",
        ),
        pytest.param(
            BASES[2],
            {"blue": "diabetes-blue", "green": "diabetes-green"},
            {"relabelled": True},
            "metrics.relabelled: metrics.labels are the router's own Services (router.app "
            "diabetes): nothing is relabelled; give the values your Prometheus holds in "
            "metrics.labels, or remove relabelled",
            id="nothing-relabelled",
        ),
        pytest.param(
            BASES[5],
            {"blue": "b", "green": "g"},
            {"relabelled": True},
            "metrics.relabelled: lifts the check of metrics.labels against the router's names, "
            "made only where a preset reads the router's own data plane (istio with the istio "
            "router, envoy with the envoy router); here metrics.labels are taken as given",
            id="custom-preset",
        ),
    ],
)
def test_relabelled_labels_are_refused_when_swapped_or_not_relabelled(
    base: dict[str, Any], labels: dict[str, str], more: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        spec_from_dict(_relabelled(base, labels, **more))
    assert str(raised.value).startswith(f"spec: {message}"), str(raised.value)
