"""End to end on the real local stack: Envoy + Prometheus + scoring processes + the real engine.

One stack for the module (starting it costs seconds). Models are really trained; every rollout
goes through `rollout.api.run_rollout` (or the `aml-rollout rollout run` CLI in a subprocess) with
the Envoy router and the Prometheus provider — no shortcut decision logic anywhere.

Healthy servers run with no fault injected (0 % errors): a healthy candidate is promoted on the
engine's negligible-rate evidence, its own error rate shown below `errors.negligible_rate` (1 %
here). The demo knob (`faults`) is on for release "3" only, the faulty candidate (50 % errors).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from rollout.api import run_rollout
from rollout.core.types import Colour, Phase, Release, Weights
from rollout.ledger import read_ledger
from rollout.local.process import port_is_free
from rollout.local.stack import LocalStack
from tests.cli import CLI
from tests.local.conftest import MakeRelease
from tests.routers.contract import identity

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FAULTY = "3"
RPS = 100
ANALYSIS: dict[str, Any] = {
    "interval_s": 1.0,
    # A/A false rollbacks are <= alpha (measured ~2-3 % at 0.05); three healthy rollouts here
    # must not make the suite flaky.
    "alpha": 0.01,
    "min_requests": 100,
    # "Below 1 % errors is fine for this test service": a clean canary proves it after ~600
    # requests (ln(2/alpha)/0.01 plus the prior's cost), about 15 s at these loads.
    "errors": {"negligible_rate": 0.01},
    "latency": {"enabled": False},
    "max_step_duration_s": 120,
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("stack"), faults={FAULTY: 0.5}) as stack:
        yield stack


@pytest.fixture
def green_v1(stack: LocalStack, make_release: MakeRelease) -> Release:
    """Green serves v1, blue nothing, all default traffic to green (no load running)."""
    stack.stop_loads()
    v1 = make_release("1")
    stack.router.deploy(Colour.GREEN, v1)
    stack.router.set_weights(Weights.blue_at(0))
    stack.router.remove(Colour.BLUE)
    return v1


def envoy_counters(stack: LocalStack) -> dict[str, int]:
    text = httpx.get(
        f"{stack.envoy.admin_url}/stats", params={"filter": r"upstream_rq_total$"}
    ).text
    counts = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name.startswith("cluster.") and name.count(".") == 2:
            counts[name.split(".")[1]] = int(value)
    return counts


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


def send(stack: LocalStack, n: int, colour: str | None = None) -> Any:
    import asyncio

    from scoring.loadgen import run_load

    report = asyncio.run(run_load(f"{stack.url}/score", requests=n, concurrency=16, colour=colour))
    assert report.sent == n
    return report


def envoy_stat(stack: LocalStack, name: str) -> int:
    """One of Envoy's own statistics, e.g. `cluster.blue.upstream_rq_completed`."""
    text = httpx.get(
        f"{stack.envoy.admin_url}/stats", params={"filter": f"^{re.escape(name)}$"}
    ).text
    return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if ":" in line)


def scoring_answers(stack: LocalStack, colour: Colour) -> Counter[str]:
    """POST /score answers by status code, as the colour's scoring server itself counted them."""
    endpoint = stack.workloads.endpoint_of(colour)
    assert endpoint is not None, f"no {colour.value} server"
    text = httpx.get(f"http://{endpoint.host}:{endpoint.port}/metrics").text
    answers: Counter[str] = Counter()
    for line in text.splitlines():
        found = re.match(r'scoring_requests_total\{.*code="(\d+)".*\} (\S+)$', line)
        if found:
            answers[found[1]] += int(float(found[2]))
    return answers


def scraped_after(stack: LocalStack, moment: float, timeout_s: float = 15.0) -> None:
    """Wait until Prometheus holds an Envoy sample from after `moment` plus one stats flush."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = httpx.get(
            f"{stack.prometheus.url}/api/v1/query",
            params={"query": 'timestamp(envoy_server_uptime{job="envoy"})'},
        ).json()
        result = answer["data"]["result"]
        if result and float(result[0]["value"][1]) > moment + 1.2:
            return
        time.sleep(0.2)
    pytest.fail("Prometheus did not scrape Envoy in time")


# ------------------------------------------------------------------------------------- traffic


def test_weighted_split_of_2000_requests_is_binomial(
    stack: LocalStack, green_v1: Release, make_release: MakeRelease
) -> None:
    stack.router.deploy(Colour.BLUE, make_release("2"))
    stack.router.set_weights(Weights.blue_at(30))
    before = envoy_counters(stack)
    report = send(stack, 2000)
    moved = delta(before, envoy_counters(stack))
    # Every answered request went through a weighted cluster; on a loaded box a few of the
    # 2000 may fail short of one (1996 were routed once: Envoy or the client gave up on a
    # connection), and the split is that of the requests routed.
    routed = moved["blue"] + moved["green"]
    assert report.succeeded <= routed <= 2000, (moved, report.by_status)
    sigma = (routed * 0.3 * 0.7) ** 0.5  # 20.5 for 2000
    assert abs(moved["blue"] - 0.3 * routed) <= 4 * sigma, (moved, report.by_status)


def test_pinned_requests_reach_only_their_colour_and_not_the_canary_counts(
    stack: LocalStack, green_v1: Release, make_release: MakeRelease
) -> None:
    stack.router.deploy(Colour.BLUE, make_release("2"))
    stack.router.set_weights(Weights.blue_at(50))
    time.sleep(1.5)  # let Prometheus hold a sample from before the window
    since = time.time()
    before = envoy_counters(stack)
    send(stack, 1000, colour="blue")
    send(stack, 1000, colour="green")
    moved = delta(before, envoy_counters(stack))
    assert moved["blue-pinned"] == 1000 and moved["green-pinned"] == 1000
    assert moved["blue"] == 0 and moved["green"] == 0
    # ... and the judge's source sees none of them on the weighted clusters.
    now = time.time()
    time.sleep(2.5)  # one scrape after `now`
    observation = stack.metrics.observe(since, now + 1.5)
    assert observation.error is None
    assert observation.blue.requests == 0 and observation.green.requests == 0


MIRROR = 10
MIRRORED_OF = 2000


def test_shadow_step_copies_to_blue_whose_answers_no_client_sees_and_prometheus_counts(
    stack: LocalStack, green_v1: Release, make_release: MakeRelease
) -> None:
    stack.router.deploy(Colour.BLUE, make_release("2"))
    stack.set_fault(Colour.BLUE, 1.0)  # a candidate answering 500 to everything
    stack.router.set_weights(Weights.blue_at(0, MIRROR))
    assert stack.router.get_weights() == Weights.blue_at(0, MIRROR)
    since = time.time()
    scraped_after(stack, since)  # the window's counts start at its first scrape
    completed, failed = "cluster.blue.upstream_rq_completed", "cluster.blue.upstream_rq_5xx"
    envoy_before = {name: envoy_stat(stack, name) for name in (completed, failed)}
    blue_before = scoring_answers(stack, Colour.BLUE)

    report = send(stack, MIRRORED_OF)

    # (b) Clients only ever got green's answers.
    assert report.by_status == {"200": MIRRORED_OF}, report.by_status
    assert all(v.startswith("green/") for v in report.by_version), report.by_version
    # (a) Blue's server answered about MIRROR % of them, as copies (each one a 500).
    deadline = time.monotonic() + 10  # copies are fire-and-forget: let the last ones land
    while envoy_stat(stack, "cluster.blue.upstream_rq_active") and time.monotonic() < deadline:
        time.sleep(0.05)
    answered = scoring_answers(stack, Colour.BLUE) - blue_before
    copies = answered.total()
    assert set(answered) == {"500"}, answered
    sigma = (MIRRORED_OF * MIRROR / 100 * (1 - MIRROR / 100)) ** 0.5  # 13.4
    assert abs(copies - MIRRORED_OF * MIRROR / 100) <= 4 * sigma, copies
    # ... charged to blue's weighted cluster by Envoy,
    assert envoy_stat(stack, completed) - envoy_before[completed] == copies
    assert envoy_stat(stack, failed) - envoy_before[failed] == copies
    # (c) ... and seen by the judge's source: the envoy preset counts them under blue, exactly.
    now = time.time()
    scraped_after(stack, now)
    observation = stack.metrics.observe(since, now + 1.5)
    assert observation.error is None
    assert (observation.blue.requests, observation.blue.errors) == (copies, copies)
    assert (observation.green.requests, observation.green.errors) == (MIRRORED_OF, 0)
    assert observation.blue.latency_buckets[-1][1] == copies  # latency too (+Inf bucket)
    stack.router.set_weights(Weights.blue_at(0))


def test_scoring_series_carry_one_colour_label_not_exported_duplicates(
    stack: LocalStack, green_v1: Release
) -> None:
    # The targets and the servers' own series both say colour and version: without
    # honor_labels Prometheus renamed the servers' labels exported_colour / exported_version.
    send(stack, 20, colour="green")
    deadline = time.monotonic() + 15
    labels: list[dict[str, str]] = []
    wanted = ("green", green_v1.version)
    while time.monotonic() < deadline:
        answer = httpx.get(
            f"{stack.prometheus.url}/api/v1/query",
            params={"query": 'scoring_requests_total{job="scoring"}'},
        ).json()
        labels = [r["metric"] for r in answer["data"]["result"]]
        if any((s.get("colour"), s.get("version")) == wanted for s in labels):
            break
        time.sleep(0.25)
    else:
        pytest.fail(f"Prometheus never scraped green's server: {labels}")
    # (Servers of earlier tests may still show until their staleness markers land.)
    for series in labels:
        assert not any(name.startswith("exported_") for name in series), series
        assert series["colour"] in ("blue", "green"), series


# ------------------------------------------------------------------------------------ rollouts


def rollout(stack: LocalStack, name: str, candidate: Release, **fields: Any) -> Any:
    spec = stack.spec(name, steps=fields.pop("steps", [50, 100]), analysis=ANALYSIS | fields)
    return run_rollout(spec, candidate=candidate, router=stack.router, metrics=stack.metrics)


def test_healthy_candidate_is_promoted(
    stack: LocalStack, green_v1: Release, make_release: MakeRelease
) -> None:
    v2 = make_release("2")
    stack.start_load(rps=RPS)
    result = rollout(stack, "healthy", v2, steps=[20, 50, 100])
    assert result.phase is Phase.SUCCEEDED, result.reason
    assert stack.router.release(Colour.GREEN) == v2
    assert stack.router.release(Colour.BLUE) is None
    assert stack.router.get_weights() == Weights.blue_at(0)
    assert stack.router.served_endpoints(Colour.BLUE) == []
    assert {20, 50} <= {r["weight"] for r in read_ledger(result.ledger_path) if "weight" in r}


def test_faulty_candidate_is_rolled_back_and_blue_ends_at_zero(
    stack: LocalStack, green_v1: Release, make_release: MakeRelease
) -> None:
    stack.start_load(rps=RPS)
    result = rollout(stack, "faulty", make_release(FAULTY))
    assert result.phase is Phase.ROLLED_BACK, result.reason
    assert "rolled back" in result.reason
    assert stack.router.get_weights() == Weights.blue_at(0)
    assert stack.router.release(Colour.GREEN) == green_v1


def test_faulty_candidate_is_rolled_back_at_the_shadow_step_unseen_by_any_client(
    stack: LocalStack, green_v1: Release, make_release: MakeRelease
) -> None:
    load = stack.start_load(rps=RPS)
    spec = stack.spec("shadow-faulty", analysis=ANALYSIS)  # the default plan
    assert (spec.plan[0], spec.shadow_percent) == (0, 5)
    before = load.snapshot()
    copies_before = envoy_stat(stack, "cluster.blue.upstream_rq_completed")
    started = time.monotonic()
    result = run_rollout(
        spec, candidate=make_release(FAULTY), router=stack.router, metrics=stack.metrics
    )
    took = time.monotonic() - started
    after = load.snapshot()

    assert result.phase is Phase.ROLLED_BACK, result.reason
    assert result.reason.startswith("rolled back at the shadow step (5 % mirrored)"), result.reason
    assert took < 30, took
    ledger = read_ledger(result.ledger_path)
    assert {r["weight"] for r in ledger if "weight" in r} == {0}, "blue got live traffic"
    counted = [r["counts"]["blue"] for r in ledger if "counts" in r]
    assert any(c["errors"] > 0 for c in counted), counted  # judged on blue's mirrored answers
    assert envoy_stat(stack, "cluster.blue.upstream_rq_completed") > copies_before
    # Meanwhile every client answer came from green: no 5xx, no answer from blue.
    statuses = Counter(after.by_status) - Counter(before.by_status)
    versions = Counter(after.by_version) - Counter(before.by_version)
    assert statuses and set(statuses) == {"200"}, statuses
    assert all(v.startswith("green/") for v in versions), versions
    assert stack.router.get_weights() == Weights.blue_at(0)
    assert stack.router.release(Colour.GREEN) == green_v1


class CanaryKilledBeforeTraffic:
    """The stack's router, except that blue's server is SIGKILLed just before blue gets traffic.

    So no request of the step ever reaches blue: all it serves are Envoy's own 503s.
    """

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.killed: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stack.router, name)

    def set_weights(self, weights: Weights) -> None:
        if weights.blue > 0 and not self.killed:
            (server,) = [r for r in self.stack.workloads.records() if r["colour"] == "blue"]
            os.kill(int(server["pid"]), signal.SIGKILL)
            self.killed.append(int(server["pid"]))
            # Dead, not dying: a connection accepted in between would be a real upstream request.
            deadline = time.monotonic() + 10
            while not port_is_free(int(server["port"])) and time.monotonic() < deadline:
                time.sleep(0.01)
        self.stack.router.set_weights(weights)


def test_killed_canary_server_is_rolled_back_on_envoys_503s(
    stack: LocalStack, green_v1: Release, make_release: MakeRelease
) -> None:
    """Blue's scoring server dies as it gets 50 %: Envoy answers 503 after each failed connect.

    Those 503s never reach `upstream_rq_total` (no upstream request was made); the provider must
    still count them as blue's requests and errors, and the judge must roll back at once — not
    see "no traffic" while half the users get errors.
    """
    stack.start_load(rps=RPS)
    router = CanaryKilledBeforeTraffic(stack)
    # Bounded even if the outage went unseen: an inconclusive step rolls back after 40 s.
    analysis = ANALYSIS | {"max_step_duration_s": 40, "on_inconclusive": "rollback"}
    spec = stack.spec("killed-canary", steps=[50, 100], analysis=analysis)
    started = time.monotonic()
    result = run_rollout(spec, candidate=make_release("2"), router=router, metrics=stack.metrics)
    assert router.killed, "the rollout never sent traffic to blue"
    assert result.phase is Phase.ROLLED_BACK, result.reason
    assert time.monotonic() - started < 30, "rolled back only when the step timed out"
    assert stack.router.get_weights() == Weights.blue_at(0)
    assert stack.router.release(Colour.GREEN) == green_v1
    # The judge saw the outage as blue's errors over as many requests, not as "no traffic".
    counted = [r["counts"]["blue"] for r in read_ledger(result.ledger_path) if "counts" in r]
    assert any(c["errors"] > 0 and c["requests"] == c["errors"] for c in counted), counted


#: Canary requests that prove a clean canary below the 1 % negligible rate with room to spare
#: (~600 needed at alpha 0.01): once Envoy has served this many to blue in the step, only the
#: outage can be what keeps the rollout from promoting.
ENOUGH_FOR_PROMOTION = 900


def test_prometheus_down_mid_step_never_promotes(
    stack: LocalStack, green_v1: Release, make_release: MakeRelease
) -> None:
    stack.start_load(rps=RPS)
    spec = stack.spec(
        "outage", steps=[50, 100], analysis=ANALYSIS | {"max_consecutive_errors": 100}
    )
    ticks: list[dict[str, Any]] = []
    outcome: list[Any] = []
    started = threading.Event()

    def on_tick(status: Any, record: dict[str, Any]) -> None:
        ticks.append({"phase": status.phase, "weight": status.blue_weight, **record})
        if status.phase is Phase.PROGRESSING and status.blue_weight == 50:
            started.set()

    def drive() -> None:
        outcome.append(
            run_rollout(
                spec,
                candidate=make_release("2"),
                router=stack.router,
                metrics=stack.metrics,
                on_tick=on_tick,
            )
        )

    thread = threading.Thread(target=drive)
    thread.start()
    try:
        assert started.wait(60), "the rollout never reached 50 %"
        stack.prometheus.stop()
        step_began = envoy_counters(stack).get("blue", 0)
        down_from = len(ticks)
        # Down until the data plane holds enough evidence to promote, had anyone seen it.
        deadline = time.monotonic() + 60
        served = 0
        while served < ENOUGH_FOR_PROMOTION and time.monotonic() < deadline:
            assert stack.router.get_weights() == Weights.blue_at(50)
            time.sleep(0.25)
            served = envoy_counters(stack).get("blue", 0) - step_began
        assert served >= ENOUGH_FOR_PROMOTION, f"only {served} canary requests in 60 s"
        assert stack.router.get_weights() == Weights.blue_at(50)
        while_down = ticks[down_from:]
        assert while_down, "no tick while Prometheus was down"
        assert all(t["phase"] == Phase.PROGRESSING and t["weight"] == 50 for t in while_down)
        assert any(t.get("verdict") == "Error" for t in while_down)
    finally:
        stack.prometheus.start()
        thread.join(120)
    assert outcome and outcome[0].phase is Phase.SUCCEEDED, outcome


def test_controller_killed_mid_rollout_resumes_and_finishes(
    stack: LocalStack, green_v1: Release, make_release: MakeRelease, tmp_path: Path
) -> None:
    v2 = make_release("2")
    stack.start_load(rps=RPS)
    spec = stack.spec(
        "killed",
        steps=[20, 50, 100],
        analysis=ANALYSIS,
        candidate={
            "model": v2.model,
            "version": v2.version,
            "sha256": v2.sha256,
            "model_dir": v2.model_dir,
        },
    )
    spec_file = tmp_path / "killed.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    status_file = spec.state.dir / "killed.status.json"
    argv = [
        *CLI,
        "rollout",
        "run",
        str(spec_file),
        "--quiet",
    ]
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            # 50 % decided *and* applied: the status is saved before its actions run.
            saved = json.loads(status_file.read_text()) if status_file.exists() else {}
            if saved.get("blue_weight") == 50 and saved["applied"] == len(saved["pending"]):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the first controller never reached 50 %")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    assert stack.router.get_weights() == Weights.blue_at(50)  # the data plane kept serving
    second = subprocess.run(argv, capture_output=True, text=True, timeout=150, check=False)
    assert second.returncode == 0, second.stdout + second.stderr
    assert identity(stack.router.release(Colour.GREEN)) == identity(v2)
    assert stack.router.release(Colour.BLUE) is None
    assert stack.router.get_weights() == Weights.blue_at(0)
    live = [r for r in stack.workloads.records() if r["colour"] == "blue"]
    assert live == [], "a blue scoring server outlived the rollout"
