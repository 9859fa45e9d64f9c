"""The controller on in-process backends: end-to-end outcomes, commands, leases, failures."""

from __future__ import annotations

import errno
import json
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from rollout import jsonl
from rollout.config import SimulatedMetricsConfig, StaticTick, TrafficModel
from rollout.controller import (
    ROLLBACK_PAUSE_CAP_S,
    ROLLBACK_RETRY_S,
    WEIGHTS_READS,
    Controller,
    FakeClock,
    RealClock,
)
from rollout.core.status import Command, Deploy, SetWeights, Status
from rollout.core.types import Colour, ColourCounts, Observation, Phase, Release, Verdict, Weights
from rollout.errors import (
    ConfigError,
    ConflictError,
    DeployFailed,
    LeaseHeldError,
    RolloutError,
    RouterError,
    RouterRefused,
    RouterUnavailable,
    StateError,
    WeightsUnsettled,
)
from rollout.ledger import Ledger, explain, read_ledger
from rollout.metrics.static import SimulatedMetrics, StaticMetrics
from rollout.routers.memory import MemoryRouter
from rollout.state.file import FileStateStore
from rollout.state.memory import MemoryStateStore
from tests.core.helpers import V1, V2, make_spec

SPEC = make_spec()


def simulated(router: MemoryRouter, canary_error: float, seed: int = 1) -> SimulatedMetrics:
    cfg = SimulatedMetricsConfig(
        seed=seed,
        rps=200,
        baseline=TrafficModel(error_rate=0.01),
        canary=TrafficModel(error_rate=canary_error),
    )
    return SimulatedMetrics(cfg, router)


def controller(
    tmp_path: Path, router: MemoryRouter, metrics: Any, **kw: Any
) -> tuple[Controller, FakeClock]:
    clock = FakeClock(1000.0)
    store = kw.pop("store", None) or FileStateStore(tmp_path, SPEC.name)
    ctl = Controller(
        kw.pop("spec", SPEC),
        router,
        metrics,
        store,
        ledger=Ledger(tmp_path / "t.ledger.jsonl", fsync=False),
        clock=clock,
        **kw,
    )
    return ctl, clock


def test_a_healthy_candidate_is_promoted_seed_style(tmp_path: Path) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    final = ctl.run(max_ticks=500)
    assert final.phase is Phase.SUCCEEDED
    assert router.get_weights() == Weights.blue_at(0)
    assert router.release(Colour.GREEN) == V2  # green replaced by blue's release
    assert router.release(Colour.BLUE) is None  # blue removed
    story = "\n".join(explain(read_ledger(tmp_path / "t.ledger.jsonl")))
    assert "started rollout t" in story and "Green_100: promoted diabetes:2" in story


def test_a_service_without_any_error_is_promoted_and_the_story_says_why(tmp_path: Path) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    cfg = SimulatedMetricsConfig(
        seed=3, rps=200, baseline=TrafficModel(error_rate=0.0), canary=TrafficModel(error_rate=0.0)
    )
    ctl, _ = controller(tmp_path, router, SimulatedMetrics(cfg, router))
    final = ctl.run(max_ticks=500)
    assert final.phase is Phase.SUCCEEDED
    story = "\n".join(explain(read_ledger(tmp_path / "t.ledger.jsonl")))
    assert "canary not worse: error rate shown < 0.1 % (e-value" in story
    judged = [r for r in read_ledger(tmp_path / "t.ledger.jsonl") if "checks" in r]
    errors = judged[-1]["checks"]["errors"]
    assert errors["canary_bad"] == errors["baseline_bad"] == 0
    assert errors["log_e_low"] > errors["log_e_ratio"] == 0.0


def test_a_regression_is_rolled_back_and_explained(tmp_path: Path) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.08))
    final = ctl.run(max_ticks=500)
    assert final.phase is Phase.ROLLED_BACK
    assert router.get_weights() == Weights.blue_at(0)
    assert router.release(Colour.GREEN) == V1
    story = "\n".join(explain(read_ledger(tmp_path / "t.ledger.jsonl")))
    assert "rolled back at step 10 %: canary error rate" in story
    assert "baseline, e-value" in story and "canary requests" in story


def test_every_tick_writes_one_ledger_line(tmp_path: Path) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.2))
    final = ctl.run(max_ticks=500)
    records = read_ledger(tmp_path / "t.ledger.jsonl")
    assert records[0]["event"] == "start"
    assert [r["tick"] for r in records[1:]] == list(range(1, final.tick + 1))
    judged = [r for r in records if "checks" in r and r.get("verdict")]
    assert judged and all(
        {"counts", "threshold_worse", "verdict", "reason", "actions"} <= r.keys() for r in judged
    )


class InterruptedAt(FileStateStore):
    """A file store that a Ctrl-C stops once, after the ledger line of `tick`, before its save."""

    def __init__(self, root: Path, name: str, tick: int) -> None:
        super().__init__(root, name)
        self.tick = tick

    def save(self, status: Status) -> None:
        if status.tick == self.tick:
            self.tick = -1
            raise KeyboardInterrupt
        super().save(status)


class LeaseLostAt(FileStateStore):
    """A file store whose lease is lost (another controller took over) once `lost` is set."""

    lost = False

    def check_lease(self) -> None:
        if self.lost:
            raise StateError("lost the lease of rollout 't': taken over by bob")
        super().check_lease()


def test_a_controller_that_lost_its_lease_mid_tick_writes_no_ledger_line(tmp_path: Path) -> None:
    """Was: the lease checked only at the tick's start, a controller that lost it during a slow
    metrics query still appended its tick's line (then its save was refused): the ledger read
    as if the successor's ticks had been done again, and `explain` dropped them."""
    store = LeaseLostAt(tmp_path, SPEC.name)
    router = MemoryRouter(releases={Colour.GREEN: V1})
    metrics = simulated(router, 0.01)
    observe = metrics.observe
    looks = []

    def slow_query(since: float, now: float) -> Any:
        looks.append(now)
        if len(looks) == 3:
            store.lost = True  # the query outlasted the lease; bob took it over meanwhile
        return observe(since, now)

    metrics.observe = slow_query  # type: ignore[method-assign]
    ctl, _ = controller(tmp_path, router, metrics, store=store)
    with pytest.raises(StateError, match="lost the lease"):
        ctl.run(max_ticks=50)
    ticks = [r["tick"] for r in read_ledger(tmp_path / "t.ledger.jsonl") if "tick" in r]
    saved = FileStateStore(tmp_path, SPEC.name).load()
    assert saved is not None and ticks == list(range(1, saved.tick + 1))


def test_the_controller_fences_a_routers_writes_with_its_lease(tmp_path: Path) -> None:
    """A router that sends several writes per action gets the lease check before each one."""

    class FencedRouter(MemoryRouter):
        fence: Callable[[], None] = staticmethod(lambda: None)

    store = FileStateStore(tmp_path, SPEC.name)
    router = FencedRouter(releases={Colour.GREEN: V1})
    controller(tmp_path, router, StaticMetrics([]), store=store)
    assert router.fence == store.check_lease
    plain = MemoryRouter(releases={Colour.GREEN: V1})  # one write per action: nothing to fence
    controller(tmp_path, plain, StaticMetrics([]), store=store)
    assert not hasattr(plain, "fence")


def test_a_tick_interrupted_before_its_status_was_saved_is_told_once(tmp_path: Path) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    store = InterruptedAt(tmp_path, SPEC.name, tick=2)
    ctl, _ = controller(tmp_path, router, simulated(router, 0.2), store=store)
    with pytest.raises(KeyboardInterrupt):
        ctl.run(max_ticks=500)
    resumed, _ = controller(tmp_path, router, simulated(router, 0.2, seed=2))
    final = resumed.run(max_ticks=500)
    assert final.phase is Phase.ROLLED_BACK
    raw = [r.get("tick") for r in jsonl.read(tmp_path / "t.ledger.jsonl")]
    assert raw.count(2) == 2  # the file keeps both lines: an append-only log
    records = read_ledger(tmp_path / "t.ledger.jsonl")
    # Was: tick 2 twice, the first a decision the rollout never made.
    assert [r["tick"] for r in records if "tick" in r] == list(range(1, final.tick + 1))


def test_a_restarted_rollout_counts_its_ticks_from_one_again(tmp_path: Path) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.2))
    first = ctl.run(max_ticks=500)
    second = ctl.run(max_ticks=3, restart=True)
    records = read_ledger(tmp_path / "t.ledger.jsonl")
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    assert len(starts) == 2
    assert [r["tick"] for r in records[starts[1] + 1 :]] == list(range(1, second.tick + 1))
    assert [r["tick"] for r in records[1 : starts[1]]] == list(range(1, first.tick + 1))


class NoLedgerAfterStart(Ledger):
    """A ledger whose `start` line is lost once: the process stopped after the status save."""

    def append(self, record: dict[str, Any]) -> None:
        if record.get("event") == "start" and not getattr(self, "stopped", False):
            self.stopped = True
            raise KeyboardInterrupt
        super().append(record)


def test_a_rollout_whose_start_line_was_lost_keeps_the_previous_rollouts_ticks(
    tmp_path: Path,
) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.2))
    first = ctl.run(max_ticks=500)
    path = tmp_path / "t.ledger.jsonl"
    store = FileStateStore(tmp_path, SPEC.name)
    lossy = Controller(
        SPEC,
        router,
        simulated(router, 0.2),
        store,
        ledger=NoLedgerAfterStart(path),
        clock=FakeClock(9e3),
    )
    with pytest.raises(KeyboardInterrupt):
        lossy.run(max_ticks=3, restart=True)
    resumed, _ = controller(tmp_path, router, simulated(router, 0.2, seed=2))
    second = resumed.run(max_ticks=3)
    ticks = [r["tick"] for r in read_ledger(path) if "tick" in r]
    # Was: the second rollout's tick 1 read as tick 1 done again, so every tick of the first
    # rollout vanished from the ledger's story.
    assert ticks == list(range(1, first.tick + 1)) + list(range(1, second.tick + 1))


def test_an_operator_abort_reaches_the_machine_between_ticks(tmp_path: Path) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    store = FileStateStore(tmp_path, SPEC.name)

    def abort_on_third_tick(status: Status, record: dict[str, Any]) -> None:
        if status.tick == 3:
            store.push_command(Command(id="a1", kind="abort", by="ann"))

    ctl, _ = controller(
        tmp_path, router, StaticMetrics([]), store=store, on_tick=abort_on_third_tick
    )
    final = ctl.run(max_ticks=50)
    assert final.phase is Phase.ROLLED_BACK
    assert final.reason.startswith("aborted by ann")
    assert router.get_weights() == Weights.blue_at(0)
    story = explain(read_ledger(tmp_path / "t.ledger.jsonl"))
    assert "operator abort: aborted by ann: blue back to 0 % → RollingBack" in story[-2]
    assert story[-1].endswith("RolledBack")


def test_metrics_outage_holds_the_rollout(tmp_path: Path) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    metrics = StaticMetrics([StaticTick(error="connection refused")])
    ctl, _ = controller(tmp_path, router, metrics)
    final = ctl.run(max_ticks=50, stop_when_paused=True)
    assert final.phase is Phase.PAUSED
    assert "metrics unreadable 4 times in a row: connection refused" in final.reason
    assert router.get_weights() == Weights.blue_at(10)  # held where it was, not rolled back


def test_a_second_controller_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    store = FileStateStore(tmp_path, "t")
    second = FileStateStore(tmp_path, "t")
    with (
        store.lease("first"),
        pytest.raises(LeaseHeldError, match="already driven by another controller \\(first"),
        second.lease("second"),
    ):
        pass
    with FileStateStore(tmp_path, "t").lease("third"):  # released on exit
        pass


def test_memory_store_lease_is_exclusive() -> None:
    with (
        MemoryStateStore("x").lease("a"),
        pytest.raises(LeaseHeldError),
        MemoryStateStore("x").lease("b"),
    ):
        pass


class FlakyRouter(MemoryRouter):
    def __init__(self, failures: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.failures = failures

    def set_weights(self, weights: Weights) -> None:
        if self.failures:
            self.failures -= 1
            raise RouterError("apiserver said 503")
        super().set_weights(weights)


def test_router_errors_are_retried(tmp_path: Path) -> None:
    router = FlakyRouter(2, releases={Colour.GREEN: V1})
    ctl, clock = controller(tmp_path, router, simulated(router, 0.2))
    assert ctl.run(max_ticks=500).phase is Phase.ROLLED_BACK
    assert clock.now() > 1000.0


class FailsAfter(MemoryRouter):
    """Answers `answers` actions, then fails every action after with `error`."""

    def __init__(self, answers: int, error: RouterError, **kw: Any) -> None:
        super().__init__(**kw)
        self.answers, self.error, self.attempts = answers, error, 0

    def deploy(self, colour: Colour, release: Release) -> None:
        self._call()
        super().deploy(colour, release)

    def set_weights(self, weights: Weights) -> None:
        self._call()
        super().set_weights(weights)

    def _call(self) -> None:
        if self.answers == 0:
            self.attempts += 1
            raise self.error
        self.answers -= 1


def unreachable(answers: int, **kw: Any) -> FailsAfter:
    """Answers `answers` actions, then nothing answers at its control plane any more."""
    return FailsAfter(
        answers, RouterUnavailable("admin at http://127.0.0.1:9 is not reachable"), **kw
    )


def test_a_router_that_never_answered_fails_at_once(tmp_path: Path) -> None:
    # Was: 4 attempts and 7 s of pauses (and, with Envoy, a scoring server started and stopped
    # each time) before the same error, for a spec pointing at an Envoy nobody started.
    router = unreachable(0, releases={Colour.GREEN: V1})
    ctl, clock = controller(tmp_path, router, StaticMetrics([]))
    with pytest.raises(RouterUnavailable, match="not reachable"):
        ctl.run(max_ticks=5)
    assert router.attempts == 1
    assert clock.now() == 1000.0  # no pause
    assert explain(read_ledger(tmp_path / "t.ledger.jsonl"))[-1] == (
        f"[0 s] controller stopped: could not deploy {V2.ref} to blue: admin at "
        "http://127.0.0.1:9 is not reachable (the next `run` applies it first)"
    )


def test_a_router_that_answered_before_is_retried_when_unreachable(tmp_path: Path) -> None:
    router = unreachable(2, releases={Colour.GREEN: V1})  # deploy blue, first weight
    ctl, clock = controller(tmp_path, router, simulated(router, 0.01))
    with pytest.raises(RouterError, match="failed 4 times"):
        ctl.run(max_ticks=500)
    assert router.attempts == 4
    assert clock.now() >= 1000.0 + 1 + 2 + 4


class BlipOnPromotion(MemoryRouter):
    """Unreachable once, at the promotion's deploy of the candidate to green (an Envoy admin
    restarted at that moment), after answering every action before it."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.blips = 0

    def deploy(self, colour: Colour, release: Release) -> None:
        if colour is Colour.GREEN and not self.blips:
            self.blips += 1
            raise RouterUnavailable("admin at http://127.0.0.1:9 is not reachable")
        super().deploy(colour, release)


def test_a_deploy_after_the_router_answered_is_retried_through_a_blip(tmp_path: Path) -> None:
    # Only a deploy before the router ever answered fails at once (a router nobody runs); a
    # blip at the promotion's deploy is retried, not the rollout's end.
    router = BlipOnPromotion(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    assert ctl.run(max_ticks=500).phase is Phase.SUCCEEDED
    assert router.blips == 1 and router.release(Colour.GREEN) == V2


NOT_OURS = RouterRefused("deployments aml-rollout does not manage take live traffic: {'old': 10}")


@pytest.mark.parametrize(
    "answers",
    [
        pytest.param(0, id="the-first-deploy"),
        pytest.param(1, id="a-weight-change-after-an-answer"),
    ],
)
def test_a_refusal_for_good_is_not_retried(
    tmp_path: Path, answers: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Was: 3 "retrying" warnings and 1 + 2 + 4 s of pauses, then "failed 4 times: <it>", for a
    refusal no retry changes (a namespace that does not exist, traffic not ours to move)."""
    router = FailsAfter(answers, NOT_OURS, releases={Colour.GREEN: V1})
    ctl, clock = controller(tmp_path, router, StaticMetrics([]))
    with pytest.raises(RouterRefused) as refused:
        ctl.run(max_ticks=5)
    assert refused.value is NOT_OURS  # the router's one line, not "failed 4 times: ..."
    assert router.attempts == 1
    assert clock.now() == 1000.0  # no pause
    assert "retrying" not in caplog.text


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(RouterError("HTTP 503 ServiceUnavailable"), id="503"),
        pytest.param(ConflictError("still conflicting after 5 attempts"), id="409"),
        pytest.param(RouterError("Azure has not finished after 300 s"), id="timeout"),
        pytest.param(RouterUnavailable("cannot reach the Kubernetes API"), id="unreachable"),
    ],
)
def test_a_transient_failure_is_still_retried(tmp_path: Path, error: RouterError) -> None:
    router = FailsAfter(1, error, releases={Colour.GREEN: V1})  # deploys blue, then fails
    ctl, clock = controller(tmp_path, router, StaticMetrics([]))
    with pytest.raises(RouterError, match="failed 4 times"):
        ctl.run(max_ticks=5)
    assert router.attempts == 4
    assert clock.now() == 1000.0 + 1 + 2 + 4


def test_the_shadow_step_s_weights_keep_their_4_attempts_not_a_rollback_s_minutes(
    tmp_path: Path,
) -> None:
    # Blue at 0 % but mirrored: traffic goes TO blue, no rollback to see through an outage.
    router = unreachable(1, releases={Colour.GREEN: V1})  # deploys blue, then fails
    spec = SPEC.model_copy(update={"steps": [0, 10, 50, 100], "mirror_percent": 20})
    ctl, clock = controller(tmp_path, router, StaticMetrics([]), spec=spec)
    with pytest.raises(RouterError, match="failed 4 times: "):
        ctl.run(max_ticks=5)
    assert router.attempts == 4
    assert clock.now() == 1000.0 + 1 + 2 + 4


class DownAtTheRollback(MemoryRouter):
    """Answers 503 to every change of the weights for `outage` s from the first one that takes
    all traffic off blue (an API server upgraded, an Envoy admin restarted, at that moment)."""

    def __init__(self, outage: float, clock: FakeClock, **kw: Any) -> None:
        super().__init__(**kw)
        self.outage, self.clock, self.since, self.attempts = outage, clock, -1.0, 0
        self.paused: list[float] = []

    def set_weights(self, weights: Weights) -> None:
        now = self.clock.now()
        if self.since < 0 and not (weights.blue or weights.mirror):
            self.since = now
        if self.since >= 0 and now - self.since < self.outage:
            self.attempts += 1
            self.paused.append(now)
            raise RouterUnavailable("503 from the API server")
        super().set_weights(weights)


@pytest.mark.parametrize(
    ("outage", "ends"),
    [
        pytest.param(10.0, Phase.ROLLED_BACK, id="a-10-s-blip"),
        pytest.param(170.0, Phase.ROLLED_BACK, id="a-3-min-upgrade"),
        pytest.param(1e9, None, id="down-for-good"),
    ],
)
def test_a_rollback_s_weights_are_retried_through_an_outage_of_minutes(
    tmp_path: Path, outage: float, ends: Phase | None
) -> None:
    """Was: 4 attempts over 7 s, then exit 2 with the failing canary at its weight until a
    human ran `run` again; a step up or down keeps its 4 attempts."""
    clock = FakeClock(1000.0)
    router = DownAtTheRollback(outage, clock, releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.3))
    ctl.clock = clock
    if ends is not None:
        assert ctl.run(max_ticks=500).phase is ends
        assert router.get_weights() == Weights.blue_at(0)
        assert clock.now() - router.since < outage + ROLLBACK_PAUSE_CAP_S
        return
    with pytest.raises(RouterError, match=r"failed \d+ times in 6\d\d s"):
        ctl.run(max_ticks=500)
    assert ROLLBACK_RETRY_S <= clock.now() - router.since < ROLLBACK_RETRY_S + 31
    pauses = [b - a for a, b in zip(router.paused, router.paused[1:], strict=False)]
    assert pauses[:6] == [1, 2, 4, 8, 16, 30] and max(pauses) == ROLLBACK_PAUSE_CAP_S


class NeverReadyBlue(MemoryRouter):
    """Blue's workload never becomes ready; green deploys (once `green_fails`, it fails too)."""

    green_fails = False

    def deploy(self, colour: Colour, release: Release) -> None:
        if colour is Colour.BLUE or self.green_fails:
            super().deploy(colour, release)  # written, as a real router does, but never ready
            raise DeployFailed(f"Deployment ml/diabetes-{colour.value}: ImagePullBackOff")
        super().deploy(colour, release)


class Told:
    def __init__(self) -> None:
        self.phases: list[Phase] = []

    def entered(self, status: Status) -> None:
        self.phases.append(status.phase)


def test_a_candidate_that_cannot_be_deployed_fails_the_rollout_at_once(tmp_path: Path) -> None:
    router = NeverReadyBlue(releases={Colour.GREEN: V1})
    told = Told()
    ctl, clock = controller(tmp_path, router, StaticMetrics([]), notifier=told)
    final = ctl.run(max_ticks=5)
    assert final.phase is Phase.FAILED and final.blue_weight == 0
    assert final.applied == len(final.pending)  # blue at 0 % applied
    assert final.reason == (
        "diabetes:2 could not be deployed to blue: Deployment ml/diabetes-blue: ImagePullBackOff"
    )
    assert router.get_weights() == Weights.blue_at(0)  # no traffic ever went to it
    assert clock.now() == 1000.0  # not tried again: it would only wait again
    assert told.phases == [Phase.FAILED]  # told once
    assert ctl.store.load() == final
    records = read_ledger(tmp_path / "t.ledger.jsonl")
    assert [(r["phase_before"], r["phase"]) for r in records if "phase" in r] == [
        ("Initializing", "Progressing"),
        ("Progressing", "Failed"),
    ]
    assert "could not be deployed to blue" in "\n".join(explain(records))


def test_a_candidate_deploy_failing_after_a_restart_fails_the_rollout_too(tmp_path: Path) -> None:
    # Killed with the deploy pending; the restarted controller meets the failure on resume.
    router = NeverReadyBlue(releases={Colour.GREEN: V1})
    store = FileStateStore(tmp_path, SPEC.name)
    first, _ = controller(
        tmp_path, MemoryRouter(releases={Colour.GREEN: V1}), StaticMetrics([]), store=store
    )
    begun = first.start()
    store.save(begun)  # INITIALIZING; its tick decides Deploy(blue), SetWeights(10)
    decided = replace(
        begun, phase=Phase.PROGRESSING, pending=(Deploy(Colour.BLUE, V2), SetWeights(10))
    )
    store.save(decided)
    told = Told()
    ctl, _ = controller(tmp_path, router, StaticMetrics([]), store=store, notifier=told)
    final = ctl.run(max_ticks=5)
    assert final.phase is Phase.FAILED and "ImagePullBackOff" in final.reason
    assert told.phases == [Phase.FAILED]


def test_a_candidate_that_cannot_be_deployed_again_on_resume_fails_the_rollout(
    tmp_path: Path,
) -> None:
    # The data plane lost blue while no controller ran (an Envoy restarted, a namespace
    # cleaned); the resumed controller deploys it again, and that deploy fails for good.
    healthy = MemoryRouter(releases={Colour.GREEN: V1})
    first, _ = controller(tmp_path, healthy, simulated(healthy, 0.01))
    assert first.run(max_ticks=3).blue_weight == 50
    lost = NeverReadyBlue(releases={Colour.GREEN: V1})
    told = Told()
    ctl, clock = controller(tmp_path, lost, StaticMetrics([]), notifier=told)
    started = clock.now()
    final = ctl.run(max_ticks=5)
    assert final.phase is Phase.FAILED and final.blue_weight == 0
    assert "could not be deployed to blue" in final.reason and "ImagePullBackOff" in final.reason
    assert lost.get_weights() == Weights.blue_at(0)
    assert clock.now() == started  # failed at once, not tried again
    assert told.phases == [Phase.FAILED]
    assert ctl.store.load() == final


class NoQuotaOnGreen(MemoryRouter):
    """Green cannot take a second copy of the candidate (no quota): its Blue_Green fails for
    good; `half_way`: green reports the candidate after the failure."""

    half_way = False

    def deploy(self, colour: Colour, release: Release) -> None:
        if colour is Colour.GREEN and release == V2:
            if self.half_way:
                super().deploy(colour, release)
            raise DeployFailed("diabetes-green: pods never ready (quota exceeded)")
        super().deploy(colour, release)


@pytest.mark.parametrize("half_way", [False, True], ids=["green-untouched", "green-half-way"])
def test_a_promotion_whose_deploy_to_green_fails_for_good_can_be_aborted(
    tmp_path: Path, half_way: bool
) -> None:
    """Was: stuck in Finalising for ever, every `run` stopping at the deploy, every command
    refused. Green still serves the stable release (else gets it again): an abort rolls back."""
    journal = tmp_path / "journal.jsonl"
    router = NoQuotaOnGreen(releases={Colour.GREEN: V1}, journal=journal)
    router.half_way = half_way
    clean = StaticTick.model_validate(
        {"blue": {"requests": 5000, "errors": 0}, "green": {"requests": 50000, "errors": 500}}
    )
    ctl, _ = controller(tmp_path, router, StaticMetrics([clean]))
    with pytest.raises(DeployFailed, match="quota"):
        ctl.run(max_ticks=20)
    stuck = ctl.store.load()
    assert stuck is not None and stuck.phase is Phase.FINALISING
    assert router.get_weights() == Weights.blue_at(100)
    ctl.store.push_command(Command(id="a", kind="abort", by="ann", rollout=stuck.id))
    again, _ = controller(tmp_path, router, StaticMetrics([clean]))
    final = again.run(max_ticks=5)
    assert final.phase is Phase.ROLLED_BACK, final.reason
    assert final.reason.startswith("aborted by ann while promoting: blue back to 0 %")
    assert router.get_weights() == Weights.blue_at(0) and router.release(Colour.GREEN) == V1
    story = "\n".join(explain(read_ledger(tmp_path / "t.ledger.jsonl")))
    assert "not applied, an abort being queued: deploy diabetes:2 to green" in story


def test_the_stable_release_that_cannot_be_deployed_is_an_error_for_a_human(
    tmp_path: Path,
) -> None:
    # Green is not the candidate: failing "the rollout" would blame the wrong release.
    router = NeverReadyBlue()
    router.green_fails = True
    ctl, _ = controller(tmp_path, router, StaticMetrics([]))
    with pytest.raises(DeployFailed, match="diabetes-green"):
        ctl.run(max_ticks=5)


class BlipOnFirstCall(MemoryRouter):
    """Unreachable for the first `blips` weight changes, then fine (a busy Envoy, say)."""

    def __init__(self, blips: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.blips = blips

    def set_weights(self, weights: Weights) -> None:
        if self.blips:
            self.blips -= 1
            raise RouterUnavailable("admin at http://127.0.0.1:9 is not reachable")
        super().set_weights(weights)


def test_a_resumed_rollback_is_retried_through_a_blip(tmp_path: Path) -> None:
    """A controller resumed mid-rollout, whose first action is the rollback, must not give up."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    store = FileStateStore(tmp_path, SPEC.name)
    first, _ = controller(tmp_path, router, StaticMetrics([]), store=store)
    assert first.run(max_ticks=2).blue_weight == 10
    store.push_command(Command(id="a", kind="abort", by="ann"))
    blip = BlipOnFirstCall(
        1, releases={Colour.GREEN: V1, Colour.BLUE: V2}, weights=Weights.blue_at(10)
    )
    resumed, _ = controller(tmp_path, blip, StaticMetrics([]), store=store)
    assert resumed.run(max_ticks=5).phase is Phase.ROLLED_BACK
    assert blip.get_weights() == Weights.blue_at(0)


class BlueUnreadable(MemoryRouter):
    """Blue's release cannot be read (an Azure deployment mid-update); weights work."""

    def release(self, colour: Colour) -> Release | None:
        if colour is Colour.BLUE:
            raise RouterError("deployment blue is Updating: try again when it has")
        return super().release(colour)


@pytest.mark.parametrize(
    ("queued", "reason"),
    [
        pytest.param([], "rolled back at step 10 %", id="a-regression-is-still-rolled-back"),
        pytest.param(["abort"], "aborted by ann", id="a-queued-abort-is-still-applied"),
    ],
)
def test_a_resumed_run_goes_on_through_a_blip_reading_a_colour_s_release(
    tmp_path: Path, queued: list[str], reason: str
) -> None:
    """Was: exit 2 before any tick, while a running controller shrugs the same blip off."""
    store = FileStateStore(tmp_path, SPEC.name)
    first, _ = controller(
        tmp_path, MemoryRouter(releases={Colour.GREEN: V1}), StaticMetrics([]), store=store
    )
    stopped = first.run(max_ticks=2)
    assert stopped.phase is Phase.PROGRESSING and stopped.blue_weight == 10
    for n, kind in enumerate(queued):
        command = Command(id=f"c{n}", kind=kind, by="ann", rollout=stopped.id)  # type: ignore[arg-type]
        store.push_command(command)
    router = BlueUnreadable(
        releases={Colour.GREEN: V1, Colour.BLUE: V2}, weights=Weights.blue_at(10)
    )
    regression = StaticMetrics(
        [
            StaticTick.model_validate(
                {
                    "blue": {"requests": 400, "errors": 200},
                    "green": {"requests": 3600, "errors": 36},
                }
            )
        ]
    )
    resumed, _ = controller(tmp_path, router, regression, store=store)
    final = resumed.run(max_ticks=1)
    assert final.phase is Phase.ROLLING_BACK and final.reason.startswith(reason)
    assert router.get_weights() == Weights.blue_at(0)


class BlueReadFails(MemoryRouter):
    """Every read of blue's release fails with `error`; green's and the weights work."""

    def __init__(self, error: RouterError, **kw: Any) -> None:
        super().__init__(**kw)
        self.error = error

    def release(self, colour: Colour) -> Release | None:
        if colour is Colour.BLUE:
            raise self.error
        return super().release(colour)


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(RouterUnavailable("deployment API at https://ml.example is down"), id="down"),
        pytest.param(RouterRefused("deployment blue is Failed: deploy it again"), id="refused"),
    ],
)
def test_a_queued_abort_gets_through_while_blue_s_release_cannot_be_read(
    tmp_path: Path, error: RouterError
) -> None:
    """Was: the resume read blue's release (to restore the data plane) before the abort and
    stopped at its error, at every `run`: the operator's emergency stop stuck behind the very
    failure they reacted to. An abort sends green everything: green's release is all it reads."""
    store = FileStateStore(tmp_path, SPEC.name)
    first, _ = controller(
        tmp_path, MemoryRouter(releases={Colour.GREEN: V1}), StaticMetrics([]), store=store
    )
    assert first.run(max_ticks=2).blue_weight == 10
    store.push_command(Command(id="a", kind="abort", by="ann"))
    journal = tmp_path / "journal.jsonl"
    router = BlueReadFails(
        error,
        releases={Colour.GREEN: V1, Colour.BLUE: V2},
        weights=Weights.blue_at(10),
        journal=journal,
    )
    resumed, _ = controller(tmp_path, router, StaticMetrics([]), store=store)
    final = resumed.run(max_ticks=3)
    assert final.phase is Phase.ROLLED_BACK and final.reason.startswith("aborted by ann")
    assert router.get_weights() == Weights.blue_at(0)
    assert [r["blue"] for r in jsonl.read(journal) if r["action"] == "set_weights"] == [0]


class ReleaseReadsFail(MemoryRouter):
    """The first `failures` reads of a release fail with `error`; the rest work."""

    def __init__(self, failures: int, error: RouterError, **kw: Any) -> None:
        super().__init__(**kw)
        self.failures, self.error, self.reads = failures, error, 0

    def release(self, colour: Colour) -> Release | None:
        self.reads += 1
        if self.reads <= self.failures:
            raise self.error
        return super().release(colour)


def test_a_new_rollout_reads_the_releases_again_through_a_failed_answer(tmp_path: Path) -> None:
    """Was: one 502 from the API server's proxy, reading blue's or green's release as a new
    rollout began, stopped `run` with exit 2."""
    router = ReleaseReadsFail(
        3, RouterError("Deployment blue: HTTP 502 Bad Gateway"), releases={Colour.GREEN: V1}
    )
    ctl, clock = controller(tmp_path, router, StaticMetrics([]))
    started = clock.monotonic()
    begun = ctl.start()
    assert (begun.phase, begun.candidate, begun.stable) == (Phase.INITIALIZING, V2, V1)
    assert clock.monotonic() - started == pytest.approx(0.5 + 1 + 2)  # on the controller's clock


@pytest.mark.parametrize(
    ("failures", "error", "message"),
    [
        pytest.param(
            4, RouterError("HTTP 502 Bad Gateway"), "could not be read 4 times", id="502s"
        ),
        # Said at once: an answer, or a router nobody runs (as for a first deploy).
        pytest.param(1, RouterRefused("no namespace prod"), "no namespace prod", id="refused"),
        pytest.param(1, RouterUnavailable("nothing at :9901"), "nothing at :9901", id="down"),
    ],
)
def test_a_new_rollout_stops_on_releases_it_cannot_read(
    tmp_path: Path, failures: int, error: RouterError, message: str
) -> None:
    router = ReleaseReadsFail(failures, error, releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, StaticMetrics([]))
    with pytest.raises(type(error), match=message):
        ctl.start()
    assert router.reads == failures


def test_a_step_up_left_pending_is_applied_through_a_blip_reading_blue_s_release(
    tmp_path: Path,
) -> None:
    store, decided = stopped_before_step_up(tmp_path)
    router = BlueUnreadable(
        releases={Colour.GREEN: V1, Colour.BLUE: V2}, weights=Weights.blue_at(10)
    )
    resumed, _ = controller(tmp_path, router, StaticMetrics([]), store=store)
    assert resumed.start().applied == len(decided.pending)
    assert router.get_weights() == Weights.blue_at(50)


def test_a_dead_router_stops_the_controller_and_a_restart_finishes_the_job(
    tmp_path: Path,
) -> None:
    router = FlakyRouter(100, releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, StaticMetrics([]))
    with pytest.raises(RouterError, match="failed 4 times"):
        ctl.run(max_ticks=5)
    saved = FileStateStore(tmp_path, "t").load()
    assert saved is not None and saved.pending[saved.applied :] == (SetWeights(10),)
    # Was: the ledger's story ended "still Initializing", with no word of why the run stopped.
    records = read_ledger(tmp_path / "t.ledger.jsonl")
    assert records[-1]["event"] == "not-applied" and records[-1]["rollout_id"] == saved.id
    assert explain(records)[-1] == (
        "[7 s] controller stopped: set weights blue 10 % / green 90 % failed 4 times: apiserver "
        "said 503 (the next `run` applies it first)"
    )
    healthy = MemoryRouter(releases={Colour.GREEN: V1, Colour.BLUE: V2})
    ctl2, _ = controller(tmp_path, healthy, StaticMetrics([]))
    resumed = ctl2.start()
    assert resumed.applied == len(resumed.pending)
    assert healthy.get_weights() == Weights.blue_at(10)


class RefusesMoreBlue(MemoryRouter):
    """Refuses to send blue more than it serves (an Azure deployment gone Failed, say)."""

    def set_weights(self, weights: Weights) -> None:
        if weights.blue > self.get_weights().blue:
            raise RouterError("deployment blue is Failed: no traffic to it")
        super().set_weights(weights)


def stopped_before_step_up(tmp_path: Path) -> tuple[FileStateStore, Status]:
    """A rollout at 10 % whose step up to 50 % was decided, and never applied (router down)."""
    store = FileStateStore(tmp_path, SPEC.name)
    first, _ = controller(
        tmp_path, MemoryRouter(releases={Colour.GREEN: V1}), StaticMetrics([]), store=store
    )
    at_10 = first.start()
    decided = replace(
        at_10, phase=Phase.PROGRESSING, step_index=1, blue_weight=50, pending=(SetWeights(50),)
    )
    store.save(decided)
    return store, decided


@pytest.mark.parametrize(
    "queued",
    [pytest.param(["abort"], id="abort"), pytest.param(["pause", "abort"], id="pause-then-abort")],
)
def test_an_abort_queued_while_no_controller_ran_is_not_preceded_by_the_step_up(
    tmp_path: Path, queued: list[str]
) -> None:
    # The step up failed (exit 2, kept pending); the operator aborts and runs again. Applying the
    # step up first sent blue 50 % for a moment before the rollback, and a router refusing it
    # failed `run` again and again: the abort could never get through.
    store, _ = stopped_before_step_up(tmp_path)
    for n, kind in enumerate(queued):
        store.push_command(Command(id=f"c{n}", kind=kind, by="ann"))  # type: ignore[arg-type]
    journal = tmp_path / "journal.jsonl"
    router = RefusesMoreBlue(
        releases={Colour.GREEN: V1, Colour.BLUE: V2}, weights=Weights.blue_at(10), journal=journal
    )
    ctl, _ = controller(tmp_path, router, StaticMetrics([]), store=store)
    final = ctl.run(max_ticks=5)
    assert final.phase is Phase.ROLLED_BACK and router.get_weights() == Weights.blue_at(0)
    assert [r["blue"] for r in jsonl.read(journal) if r["action"] == "set_weights"] == [0]
    story = "\n".join(explain(read_ledger(tmp_path / "t.ledger.jsonl")))
    assert "not applied, an abort being queued: set weights blue 50 % / green 50 %" in story


@pytest.mark.parametrize(
    "queued",
    [pytest.param(["abort"], id="abort"), pytest.param(["pause", "abort"], id="pause-then-abort")],
)
def test_an_abort_queued_before_the_first_tick_gives_blue_nothing(
    tmp_path: Path, queued: list[str]
) -> None:
    # A controller stopped after storing the new rollout (Ctrl-C during the history query): the
    # next `run` deployed blue and sent it the first step's live traffic for a whole interval
    # before it read the abort.
    journal = tmp_path / "journal.jsonl"
    router = MemoryRouter(releases={Colour.GREEN: V1}, journal=journal)
    ctl, _ = controller(tmp_path, router, StaticMetrics([]))
    assert ctl.run(max_ticks=0).phase is Phase.INITIALIZING
    for n, kind in enumerate(queued):
        ctl.store.push_command(Command(id=f"c{n}", kind=kind, by="ann"))  # type: ignore[arg-type]
    final = ctl.run(max_ticks=3)
    assert final.phase is Phase.ROLLED_BACK and final.commands == ()
    assert not journal.exists() or jsonl.read(journal) == []
    assert router.release(Colour.BLUE) is None and router.get_weights() == Weights.blue_at(0)
    story = "\n".join(explain(read_ledger(tmp_path / "t.ledger.jsonl")))
    assert "aborted by ann before its first tick: blue was given nothing" in story


def test_a_controller_whose_lock_file_is_deleted_stops_before_its_next_tick(
    tmp_path: Path,
) -> None:
    # Was: a second controller locked a new lock file and both drove the rollout; the first
    # now stops at its next tick, before it writes a ledger line or moves traffic.
    def clean_up_after_tick_2(status: Status, record: dict[str, Any]) -> None:
        if status.tick == 2:
            (tmp_path / "t.lock").unlink()

    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, StaticMetrics([]), on_tick=clean_up_after_tick_2)
    with pytest.raises(StateError, match="lost the lease of rollout 't'"):
        ctl.run(max_ticks=5)
    assert [r["tick"] for r in read_ledger(tmp_path / "t.ledger.jsonl") if "tick" in r] == [1, 2]


def test_a_step_up_kept_pending_is_applied_before_a_pause(tmp_path: Path) -> None:
    # Only an abort makes the step up moot: a pause holds the rollout at the weight it decided.
    store, _ = stopped_before_step_up(tmp_path)
    store.push_command(Command(id="p", kind="pause", by="ann"))
    router = MemoryRouter(releases={Colour.GREEN: V1, Colour.BLUE: V2}, weights=Weights.blue_at(10))
    ctl, _ = controller(tmp_path, router, StaticMetrics([]), store=store)
    final = ctl.run(max_ticks=1)
    assert final.phase is Phase.PAUSED and router.get_weights() == Weights.blue_at(50)


def test_a_finished_rollout_is_not_started_again_unless_asked(tmp_path: Path) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.2))
    assert ctl.run(max_ticks=500).phase is Phase.ROLLED_BACK
    again, _ = controller(tmp_path, router, simulated(router, 0.2))
    assert again.run(max_ticks=5).phase is Phase.ROLLED_BACK  # returned as it was
    fresh = again.run(max_ticks=1, restart=True)
    assert fresh.phase is Phase.PROGRESSING and fresh.tick == 1


def test_a_candidate_is_required(tmp_path: Path) -> None:
    spec = SPEC.model_copy(update={"candidate": None})
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, StaticMetrics([]), spec=spec)
    with pytest.raises(Exception, match="no candidate release"):
        ctl.run(max_ticks=1)


def test_an_unreadable_status_file_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "t.status.json").write_text("{not json")
    with pytest.raises(StateError, match="not a rollout status"):
        FileStateStore(tmp_path, "t").load()


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        pytest.param({"blue_weight": 150}, "weights must be within 0..100", id="blue-150"),
        pytest.param({"mirror": 5}, "blue is mirrored only while", id="mirror-with-blue-10"),
        pytest.param({"tick": 1e400}, "a number out of range", id="tick-1e400"),
        pytest.param({"held": "false"}, "held must be true or false", id="held-a-string"),
        pytest.param({"applied": -1}, "applied -1 of [0-9]+ pending", id="applied-below-0"),
    ],
)
def test_a_status_edited_into_impossible_values_is_a_state_error_at_load(
    tmp_path: Path, edit: dict[str, Any], said: str
) -> None:
    """Was: loaded, then a traceback from `status` or the first tick (exit 1) that used it."""
    store = FileStateStore(tmp_path, "t")
    ctl, _ = controller(tmp_path, MemoryRouter(releases={Colour.GREEN: V1}), StaticMetrics([]))
    at_10 = ctl.run(max_ticks=1)
    assert at_10.blue_weight == 10
    path = tmp_path / "t.status.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(StateError, match=f"not a rollout status: {said}.*move it aside"):
        store.load()


def test_a_torn_command_line_is_skipped_and_never_swallows_the_next(tmp_path: Path) -> None:
    store = FileStateStore(tmp_path, "t")
    store.push_command(Command(id="1", kind="pause"))
    with store.commands_path.open("ab") as fh:
        fh.write('{"id": "2", "by": "Zoë'.encode()[:-1])  # killed inside a UTF-8 character
    assert [c and c.id for c in store.commands()] == ["1"]
    store.push_command(Command(id="3", kind="abort", by="ann"))
    # the fragment, ended by the append, is a line of its own that takes its position
    assert [c and c.id for c in store.commands()] == ["1", None, "3"]


def test_a_torn_command_line_is_reported_once_by_the_controller_that_reads_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The log only grows, so the line stays: reported at each read (the controller's every
    # second, every `status` run) it would warn forever with no way to clear it.
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    ctl.run(max_ticks=1)
    store = FileStateStore(tmp_path, SPEC.name)
    with store.commands_path.open("ab") as fh:
        fh.write(b'{"id": "1", "ki')
    store.push_command(Command(id="2", kind="pause"))
    assert ctl.run(max_ticks=3).phase is Phase.PAUSED
    again, _ = controller(tmp_path, router, simulated(router, 0.01))
    assert again.run(max_ticks=2).phase is Phase.PAUSED  # a restarted controller
    monkeypatch.setattr(jsonl, "_reported", {})  # `status`, `pause`: each a process of its own
    for _ in range(2):
        assert [c and c.id for c in store.commands()] == [None, "2"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "rollout 't': skipped entry 1 of the command log: not a command this version can read "
        "(a torn write, an edit by hand or a newer version's command); it is not read again"
    ]


def test_a_torn_ledger_line_does_not_make_the_ledger_unreadable(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.jsonl", fsync=False)
    ledger.append({"event": "start", "at": 0.0, "name": "t", "plan": [10, 100]})
    with ledger.path.open("a") as fh:
        fh.write('{"tick": 1, "phase')  # the controller was killed mid-line, then restarted
    ledger.append({"tick": 1, "at": 10.0, "phase": "Progressing"})
    assert [r.get("tick") for r in read_ledger(ledger.path)] == [None, 1]
    assert explain(read_ledger(ledger.path))


def test_an_explicit_candidate_wins_over_the_spec(tmp_path: Path) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, StaticMetrics([]), candidate=Release("m", "9"))
    status = ctl.run(max_ticks=1)
    assert status.candidate == Release("m", "9")
    assert router.release(Colour.BLUE) == Release("m", "9")


class StubbornRouter(MemoryRouter):
    """Accepts every write but keeps serving all-green (like Envoy rejecting a route file)."""

    def get_weights(self) -> Weights:
        return Weights.blue_at(0)


def test_weights_the_data_plane_does_not_serve_are_an_error(tmp_path: Path) -> None:
    router = StubbornRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, StaticMetrics([]))
    with pytest.raises(RouterError, match="accepted blue 10 % but serves blue 0 %"):
        ctl.run(max_ticks=3)


class MirrorlessRouter(MemoryRouter):
    """Serves the weights it is given but never the mirror (a data plane that cannot shadow)."""

    def get_weights(self) -> Weights:
        served = super().get_weights()
        return Weights.blue_at(served.blue)


def test_a_mirror_the_data_plane_does_not_serve_is_an_error(tmp_path: Path) -> None:
    # Otherwise the shadow step would wait for copies that never come, saying only that.
    router = MirrorlessRouter(releases={Colour.GREEN: V1})
    spec = SPEC.model_copy(update={"steps": [0, 10, 50, 100], "mirror_percent": 20})
    ctl, _ = controller(tmp_path, router, StaticMetrics([]), spec=spec)
    with pytest.raises(
        RouterError, match=r"accepted blue 0 % \+ 20 % mirrored but serves blue 0 %"
    ):
        ctl.run(max_ticks=3)


class CommandInTheWait(FakeClock):
    """A clock that, at the first nap of a wait, has an operator queue `abort`."""

    def __init__(self, start: float, store: FileStateStore) -> None:
        super().__init__(start)
        self.store, self.pushed = store, False

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        if not self.pushed:
            self.pushed = True
            self.store.push_command(Command(id="a", kind="abort", by="ann"))


def test_a_command_queued_during_the_interval_is_acted_on_at_the_next_poll(
    tmp_path: Path,
) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    store = FileStateStore(tmp_path, SPEC.name)
    clock = CommandInTheWait(1000.0, store)
    ticks: list[tuple[float, Phase]] = []
    ctl, _ = controller(
        tmp_path,
        router,
        StaticMetrics([]),
        store=store,
        poll_s=1.0,
        on_tick=lambda status, _: ticks.append((clock.now(), status.phase)),
    )
    ctl.clock = clock
    ctl.run(max_ticks=2)
    # The abort is read 1 s (one poll) into the 10 s interval, not at its end.
    assert ticks == [(1000.0, Phase.PROGRESSING), (1001.0, Phase.ROLLING_BACK)]


def test_an_operator_pause_keeps_the_controller_guarding_until_resume(tmp_path: Path) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    store = FileStateStore(tmp_path, SPEC.name)
    phases: list[Phase] = []

    def steer(status: Status, record: dict[str, Any]) -> None:
        phases.append(status.phase)
        if status.tick == 2:
            store.push_command(Command(id="p", kind="pause", by="ann"))
        if status.tick == 6:
            store.push_command(Command(id="r", kind="resume", by="ann"))

    ctl, _ = controller(tmp_path, router, simulated(router, 0.01), store=store, on_tick=steer)
    final = ctl.run(max_ticks=500, stop_when_paused=True)
    assert Phase.PAUSED in phases  # it paused, did not return, and resumed
    assert final.phase is Phase.SUCCEEDED
    assert not final.held


def test_the_latency_bucket_comes_from_green_before_the_rollout(tmp_path: Path) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    spec = make_spec(analysis={"latency": {"enabled": True, "history_s": 300}})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01), spec=spec)
    status = ctl.tick(ctl.start())
    assert status.slow_threshold_s == 0.05  # lognormal median 20 ms, σ 0.4: p99 ≈ 50 ms
    first = read_ledger(tmp_path / "t.ledger.jsonl")[1]
    assert 0.9 * 200 * 300 < first["history"]["green"] < 1.1 * 200 * 300
    assert "green's p99 bucket before the rollout" in first["reason"]


def test_without_history_the_first_step_chooses_the_latency_bucket(tmp_path: Path) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    spec = make_spec(analysis={"latency": {"enabled": True, "history_s": 0}})
    ctl, clock = controller(tmp_path, router, simulated(router, 0.01), spec=spec)
    status = ctl.tick(ctl.start())
    assert status.slow_threshold_s is None
    assert "history" not in read_ledger(tmp_path / "t.ledger.jsonl")[1]
    clock.sleep(10)
    status = ctl.tick(status)  # 10 s at 200 rps: 1,800 green requests, enough
    assert status.slow_threshold_s == 0.05


def test_scripted_metrics_can_script_the_history_too(tmp_path: Path) -> None:
    history = StaticTick(green={"requests": 1000, "latency_buckets": [[0.1, 990], [0.25, 1000]]})
    metrics = StaticMetrics([], history)
    assert metrics.history(0.0, 600.0).green.requests == 1000
    assert StaticMetrics([]).history(0.0, 600.0).green.requests == 0
    router = MemoryRouter(releases={Colour.GREEN: V1})
    spec = make_spec(analysis={"latency": {"enabled": True}})
    ctl, _ = controller(tmp_path, router, metrics, spec=spec)
    assert ctl.tick(ctl.start()).slow_threshold_s == 0.1
    assert metrics.calls == 0  # the history is not one of the scripted ticks


def test_a_held_rollout_acts_on_the_answer_queued_while_no_controller_ran(tmp_path: Path) -> None:
    """Held → exit → `rollout resume` → `run` again: the resume is handled, not held again."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    metrics = StaticMetrics([StaticTick(error="connection refused")])
    ctl, _ = controller(tmp_path, router, metrics)
    held = ctl.run(max_ticks=50, stop_when_paused=True)
    assert held.phase is Phase.PAUSED and held.held
    ctl.store.push_command(Command(id="r", kind="resume", by="ann", rollout=held.id))
    again, _ = controller(tmp_path, router, metrics)
    resumed = again.run(max_ticks=1, stop_when_paused=True)
    assert resumed.phase is Phase.PROGRESSING and resumed.reason == "resumed by ann"


@pytest.mark.parametrize(
    ("blue_errors", "phase"),
    [
        pytest.param(2500, Phase.ROLLED_BACK, id="a-regression-since-is-rolled-back"),
        pytest.param(0, Phase.PAUSED, id="else-it-returns-held-after-one-look"),
    ],
)
def test_run_again_on_a_hold_judges_the_counts_before_it_returns(
    tmp_path: Path, blue_errors: int, phase: Phase
) -> None:
    """Was: `run` returned at once (exit 4) without a look, while blue kept serving the held
    weight: the docs say a hold still guards, a regression still rolls back."""
    spec = make_spec(analysis={"max_step_duration_s": 30})
    router = MemoryRouter(releases={Colour.GREEN: V1})
    few = StaticTick.model_validate(
        {"blue": {"requests": 50, "errors": 0}, "green": {"requests": 450, "errors": 5}}
    )
    ctl, _ = controller(tmp_path, router, StaticMetrics([few]), spec=spec)
    held = ctl.run(max_ticks=50, stop_when_paused=True)
    assert held.phase is Phase.PAUSED and held.held
    since = StaticTick.model_validate(
        {
            "blue": {"requests": 5000, "errors": blue_errors},
            "green": {"requests": 45000, "errors": 450},
        }
    )
    again, _ = controller(tmp_path, router, StaticMetrics([since]), spec=spec)
    final = again.run(max_ticks=50, stop_when_paused=True)
    assert final.phase is phase and final.tick == held.tick + (2 if final.terminal else 1)
    assert router.get_weights() == Weights.blue_at(0 if final.terminal else 10)


def test_commands_of_an_ended_rollout_are_not_replayed_on_the_next(tmp_path: Path) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    store = FileStateStore(tmp_path, SPEC.name)

    def promote_at_once(status: Status, record: dict[str, Any]) -> None:
        if status.tick == 2:
            store.push_command(Command(id="p", kind="promote", by="ann", rollout=status.id))

    ctl, _ = controller(tmp_path, router, StaticMetrics([]), store=store, on_tick=promote_at_once)
    first = ctl.run(max_ticks=50)
    assert first.phase is Phase.SUCCEEDED and "promoted by ann" in "\n".join(
        explain(read_ledger(tmp_path / "t.ledger.jsonl"))
    )
    v3 = Release("diabetes", "3")
    nxt, _ = controller(tmp_path, router, StaticMetrics([]), candidate=v3)
    second = nxt.run(max_ticks=5, restart=True)
    assert second.id != first.id
    assert second.phase is Phase.PROGRESSING and second.candidate == v3  # not promoted by ann


def test_a_stored_rollout_of_another_candidate_is_not_reported_as_this_one(
    tmp_path: Path,
) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    assert ctl.run(max_ticks=2).phase is Phase.PROGRESSING
    v3 = Release("diabetes", "3")
    other, _ = controller(tmp_path, router, simulated(router, 0.01), candidate=v3)
    with pytest.raises(RolloutError, match="of diabetes:2 is still Progressing, and diabetes:3"):
        other.run(max_ticks=1)
    assert ctl.run(max_ticks=500).phase is Phase.SUCCEEDED
    with pytest.raises(RolloutError, match=r"has ended \(Succeeded\), and diabetes:3 was asked"):
        other.run(max_ticks=1)
    assert other.run(max_ticks=1, restart=True).candidate == v3


def test_the_release_green_serves_is_no_candidate(tmp_path: Path) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V2})
    ctl, _ = controller(tmp_path, router, StaticMetrics([]))
    with pytest.raises(RolloutError, match="green already serves diabetes:2: nothing to roll out"):
        ctl.run(max_ticks=1)
    assert router.release(Colour.BLUE) is None


def test_a_status_probe_never_makes_a_starting_controller_refuse(tmp_path: Path) -> None:
    """`status` probes the lease by taking it shared for an instant; `run` waits that out."""
    import fcntl
    import os
    import threading

    store = FileStateStore(tmp_path, "t")
    store._ensure_dir()
    fd = os.open(store.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a probe, caught in the act
    release = threading.Timer(0.05, lambda: fcntl.flock(fd, fcntl.LOCK_UN))
    release.start()
    try:
        with store.lease("ann's controller"):
            assert "ann's controller" in (store.controller() or "")
    finally:
        release.join()
        os.close(fd)
    assert store.controller() is None


def test_a_command_without_a_rollout_id_is_written_as_older_readers_expect() -> None:
    assert "rollout" not in Command(id="1", kind="pause").to_dict()
    aimed = Command(id="2", kind="abort", rollout="r1")
    assert Command.from_dict(aimed.to_dict()) == aimed


def test_a_rollout_begun_on_an_empty_green_says_it_deployed_the_stable_release(
    tmp_path: Path,
) -> None:
    """Was: the deploy and the weights were made with no ledger line saying so."""
    router = MemoryRouter()  # a fresh data plane: green serves nothing
    ctl, _ = controller(tmp_path, router, StaticMetrics([]))
    ctl.start()
    assert router.release(Colour.GREEN) is not None
    (start,) = read_ledger(tmp_path / "t.ledger.jsonl")
    assert start["describe"] == ["deploy diabetes:1 to green", "set weights blue 0 % / green 100 %"]
    assert explain([start])[0].endswith(
        "; green served nothing: deploy diabetes:1 to green; set weights blue 0 % / green 100 %"
    )
    again = tmp_path / "again"
    again.mkdir()
    ctl, _ = controller(again, MemoryRouter(releases={Colour.GREEN: V1}), StaticMetrics([]))
    ctl.start()
    assert "describe" not in read_ledger(again / "t.ledger.jsonl")[0]  # nothing done


def test_a_resumed_rollout_restores_a_data_plane_that_lost_its_routes(tmp_path: Path) -> None:
    """A memory router without a state file is a data plane reset (Envoy from its bootstrap)."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    status = ctl.run(max_ticks=3)
    assert status.phase is Phase.PROGRESSING and status.blue_weight == 50
    reset = MemoryRouter()  # a new process: nothing deployed, no weights
    again, _ = controller(tmp_path, reset, simulated(reset, 0.01))
    resumed = again.start()
    assert resumed.blue_weight == 50
    assert reset.release(Colour.GREEN) == V1 and reset.release(Colour.BLUE) == V2
    assert reset.get_weights() == Weights.blue_at(50)
    story = "\n".join(explain(read_ledger(tmp_path / "t.ledger.jsonl")))
    assert "resumed with a data plane serving blue 0 %: deploy diabetes:1 to green" in story


class UnreadableOnce(MemoryRouter):
    """An Azure endpoint Failed or mid-change at the resume: its weights cannot be read once."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unread = 1

    def get_weights(self) -> Weights:
        if self.unread:
            self.unread -= 1
            raise RouterError("endpoint d is Failed: it shows what was asked, not what serves")
        return super().get_weights()


def test_a_resume_whose_weights_cannot_be_read_writes_the_status_weights_again(
    tmp_path: Path,
) -> None:
    """Was: the RouterError of the unreadable weights stopped the resume, and every `run` after
    it, until a human mended the endpoint (which writing the weights again does)."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    assert ctl.run(max_ticks=3).blue_weight == 50
    failed = UnreadableOnce(releases={Colour.GREEN: V1, Colour.BLUE: V2})
    again, _ = controller(tmp_path, failed, simulated(failed, 0.01))
    resumed = again.start()
    assert resumed.blue_weight == 50 and failed.get_weights() == Weights.blue_at(50)
    story = "\n".join(explain(read_ledger(tmp_path / "t.ledger.jsonl")))
    assert (
        "resumed with a data plane serving weights it could not read: set weights blue 50 %"
        in story
    )


class Unreachable(MemoryRouter):
    """Nothing answers at the router's control plane for the first `reads` reads of the weights
    (for ever by default); `reads_made` counts them all."""

    def __init__(self, reads: float = math.inf, **kw: Any) -> None:
        super().__init__(**kw)
        self.failing, self.reads_made = reads, 0

    def get_weights(self) -> Weights:
        self.reads_made += 1
        if self.reads_made <= self.failing:
            raise RouterUnavailable("Envoy admin at http://127.0.0.1:9 is not reachable")
        return super().get_weights()


@pytest.mark.parametrize(
    ("failing", "paused"),
    [
        pytest.param(1, 0.5, id="one-blip"),
        pytest.param(3, 0.5 + 1 + 2, id="three-failed-reads-then-one-answered"),
    ],
)
def test_a_resume_reads_the_weights_again_through_a_blip(
    tmp_path: Path, failing: int, paused: float
) -> None:
    """Was: one failed read of the weights (to compare them with the status') stopped the
    resumed `run` at once: an Envoy admin restarting for a second took the controller down."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    assert ctl.run(max_ticks=3).blue_weight == 50
    blips = Unreachable(
        failing, releases={Colour.GREEN: V1, Colour.BLUE: V2}, weights=Weights.blue_at(50)
    )
    again, clock = controller(tmp_path, blips, StaticMetrics([]))
    resumed = again.start()
    assert resumed.blue_weight == 50 and resumed.phase is Phase.PROGRESSING
    assert blips.reads_made == failing + 1
    assert clock.now() == 1000.0 + paused  # the controller's clock: no test sleeps


@pytest.mark.parametrize(
    "failing", [pytest.param(4, id="four-failed-reads"), pytest.param(math.inf, id="for-good")]
)
def test_a_resume_on_a_router_nothing_answers_stops_after_four_reads_saying_so(
    tmp_path: Path, failing: float
) -> None:
    """Was (the unread weights written again): four weight writes, 7 s, then "failed 4 times",
    and a ledger line saying the data plane was restored."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    assert ctl.run(max_ticks=3).blue_weight == 50
    down = Unreachable(failing, releases={Colour.GREEN: V1, Colour.BLUE: V2})
    again, clock = controller(tmp_path, down, StaticMetrics([]))
    with pytest.raises(RouterUnavailable) as refused:
        again.start()
    assert str(refused.value) == (
        "the data plane's weights could not be read 4 times in 3.5 s, to check them against the "
        "rollout's (blue 50 %): Envoy admin at http://127.0.0.1:9 is not reachable; nothing "
        "was restored: run again once the router answers"
    )
    assert down.reads_made == 4 and clock.now() == 1000.0 + 0.5 + 1 + 2
    assert not any(r.get("event") == "restore" for r in read_ledger(tmp_path / "t.ledger.jsonl"))


def test_a_queued_abort_is_not_held_up_by_weights_nothing_answers_for(tmp_path: Path) -> None:
    """An abort restores nothing but a lost green before its own weights, which are tried on
    through an outage: reading the weights first (for nothing) stopped its `run`."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    assert ctl.run(max_ticks=3).blue_weight == 50
    ctl.store.push_command(Command(id="a", kind="abort", by="ann"))
    down = Unreachable(
        WEIGHTS_READS, releases={Colour.GREEN: V1, Colour.BLUE: V2}, weights=Weights.blue_at(50)
    )
    again, _ = controller(tmp_path, down, StaticMetrics([]))
    final = again.run(max_ticks=3)
    assert final.phase is Phase.ROLLED_BACK and final.reason.startswith("aborted by ann")
    assert down.get_weights() == Weights.blue_at(0)


def _stopped_before_its_first_tick(ctl: Controller) -> None:
    ctl.start()  # the Initializing status saved: a first tick's ledger line failed, say


def _stopped_before_its_first_weights(ctl: Controller) -> None:
    status = ctl.run(max_ticks=1)  # its first tick: deploy blue, then its first weights
    assert status.pending[-1] == SetWeights(10) and status.applied == len(status.pending)
    ctl.store.save(replace(status, applied=len(status.pending) - 1))


@pytest.mark.parametrize(
    "stop",
    [
        pytest.param(_stopped_before_its_first_tick, id="initializing"),
        pytest.param(_stopped_before_its_first_weights, id="weights-pending"),
    ],
)
def test_a_rollout_resumed_on_a_data_plane_that_lost_its_releases_goes_on(
    tmp_path: Path, stop: Callable[[Controller], None]
) -> None:
    """Was: the pending (or first) weights refused for good, "cannot send 100 % to green:
    nothing is deployed there", at every `run` of a dry run resumed in a new process."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    stop(ctl)
    reset = MemoryRouter()  # a new process: nothing deployed, no weights
    again, _ = controller(tmp_path, reset, simulated(reset, 0.01))
    assert again.run(max_ticks=500).phase is Phase.SUCCEEDED
    story = "\n".join(explain(read_ledger(tmp_path / "t.ledger.jsonl")))
    assert "resumed with a data plane serving blue 0 %: deploy diabetes:1 to green" in story


@pytest.mark.parametrize(
    ("phase", "held", "weights"),
    [
        pytest.param(Phase.PROMOTING, False, SetWeights(100), id="promotion-decided"),
        pytest.param(Phase.PAUSED, True, SetWeights(50), id="held-weight-set"),
    ],
)
def test_pending_weights_to_a_blue_that_lost_its_release_deploy_it_first(
    tmp_path: Path, phase: Phase, held: bool, weights: SetWeights
) -> None:
    """Was: "cannot send 100 % to blue: nothing is deployed there" at every `run`, stuck in
    Promoting, where abort is refused (it reads no command): blue's workload lost after the
    weights were decided (or decided by an earlier version that did not redeploy it)."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    status = ctl.run(max_ticks=2)
    assert status.phase is Phase.PROGRESSING
    decided = replace(status, phase=phase, held=held, pending=(weights,), applied=0)
    ctl.store.save(replace(decided, blue_weight=weights.blue))
    router.set_weights(Weights.blue_at(0))
    router.remove(Colour.BLUE)  # evicted, deleted
    again, _ = controller(tmp_path, router, simulated(router, 0.01))
    resumed = again.run(max_ticks=1 if held else 500)
    assert router.release(Colour.BLUE if held else Colour.GREEN) == V2
    assert resumed.phase is (Phase.PAUSED if held else Phase.SUCCEEDED)
    story = "\n".join(explain(read_ledger(tmp_path / "t.ledger.jsonl")))
    assert "data plane serving nothing on blue: deploy diabetes:2 to blue" in story


@pytest.mark.parametrize(
    "promoting", [pytest.param(False, id="progressing"), pytest.param(True, id="promoting")]
)
def test_a_data_plane_that_lost_its_routes_is_not_given_blue_again_for_an_abort(
    tmp_path: Path, promoting: bool
) -> None:
    """Promoting was: green not redeployed, the abort's weights refused at every `run`
    ("cannot send 100 % to green: nothing is deployed there"), stuck in RollingBack."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    status = ctl.run(max_ticks=3)
    assert status.blue_weight == 50
    if promoting:  # stopped after the promotion was decided, before its weights
        promotion = SetWeights(100)
        decided = replace(status, phase=Phase.PROMOTING, pending=(promotion,), applied=0)
        ctl.store.save(replace(decided, blue_weight=promotion.blue))
    ctl.store.push_command(Command(id="a", kind="abort", by="ann"))
    journal = tmp_path / "journal.jsonl"
    reset = MemoryRouter(journal=journal)  # nothing deployed, no weights
    again, _ = controller(tmp_path, reset, simulated(reset, 0.01))
    assert again.run(max_ticks=3).phase is Phase.ROLLED_BACK
    assert reset.release(Colour.GREEN) == V1 and reset.release(Colour.BLUE) is None
    assert [r["blue"] for r in jsonl.read(journal) if r["action"] == "set_weights"] == [0]


def test_a_resumed_rollout_leaves_a_data_plane_that_kept_its_routes_alone(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "journal.jsonl"
    router = MemoryRouter(releases={Colour.GREEN: V1}, journal=journal)
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    ctl.run(max_ticks=3)
    writes = journal.read_text().count("\n")
    again, _ = controller(tmp_path, router, simulated(router, 0.01))
    again.start()
    assert journal.read_text().count("\n") == writes
    assert not any(r.get("event") == "restore" for r in read_ledger(tmp_path / "t.ledger.jsonl"))


def test_a_resumed_dry_run_draws_new_traffic_instead_of_replaying_it(tmp_path: Path) -> None:
    """Same seed in a new process would count the first process's errors again."""
    from rollout.api import _metrics_of

    spec = make_spec(metrics={"kind": "simulated", "rps": 100}, router={"kind": "memory"})
    store = FileStateStore(tmp_path, spec.name)
    fresh = _metrics_of(spec, MemoryRouter(), store)
    assert isinstance(fresh, SimulatedMetrics)
    first = fresh.history(0.0, 600.0).green.requests
    ctl, _ = controller(tmp_path, MemoryRouter(releases={Colour.GREEN: V1}), fresh, spec=spec)
    ctl.run(max_ticks=2)
    resumed = _metrics_of(spec, MemoryRouter(), store)
    assert isinstance(resumed, SimulatedMetrics)
    assert resumed.history(0.0, 600.0).green.requests != first
    replay = SimulatedMetrics(spec.metrics, MemoryRouter())  # type: ignore[arg-type]
    assert replay.history(0.0, 600.0).green.requests == first


class NewEndpoint(MemoryRouter):
    """A data plane like a new Azure ML endpoint: no traffic split until one is set (reading it
    is a RouterError), and `kill_at_set_weights` kills the process at its first weight change."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.traffic_set = False
        self.kill_at_set_weights = False

    def set_weights(self, weights: Weights) -> None:
        if self.kill_at_set_weights:
            self.kill_at_set_weights = False
            raise SystemExit("killed between deploying green and sending it traffic")
        super().set_weights(weights)
        self.traffic_set = True

    def get_weights(self) -> Weights:
        if not self.traffic_set:
            raise RouterError("endpoint traffic {} does not split 100 % (no traffic set yet?)")
        return super().get_weights()


def test_a_bootstrap_killed_before_green_had_traffic_sends_it_traffic_when_run_again(
    tmp_path: Path,
) -> None:
    router = NewEndpoint()
    router.kill_at_set_weights = True
    ctl, _ = controller(tmp_path, router, StaticMetrics([]))
    with pytest.raises(SystemExit):
        ctl.bootstrap(V1)
    assert router.release(Colour.GREEN) == V1 and not router.traffic_set

    # Was: "green already serves m:1: nothing to do", and green was left without traffic.
    assert ctl.bootstrap(V1) is True
    assert router.get_weights() == Weights.blue_at(0)
    story = explain(read_ledger(tmp_path / "t.ledger.jsonl"))
    assert any(line.startswith(f"bootstrapped green with {V1.ref}") for line in story)
    assert ctl.bootstrap(V1) is False  # done: nothing left to do


def first_check_metrics(router: MemoryRouter, error_rate: float) -> SimulatedMetrics:
    cfg = SimulatedMetricsConfig(seed=3, rps=20, baseline=TrafficModel(error_rate=error_rate))
    return SimulatedMetrics(cfg, router)


def test_a_first_release_that_keeps_the_limits_is_checked_successful(tmp_path: Path) -> None:
    router = MemoryRouter()
    ctl, clock = controller(tmp_path, router, first_check_metrics(router, 0.001))
    looks: list[tuple[str, str]] = []
    check = ctl.bootstrap_checked(V1, on_look=lambda v, why: looks.append((v.value, why)))
    assert (check.deployed, check.verdict.value) == (True, "Successful")
    assert "error rate" in check.reason and "below the limit 10 %" in check.reason
    # 20 rps, 100 requests asked: decided at the first look past 100 requests, not before.
    assert [v for v, _ in looks] == ["Inconclusive"] * (len(looks) - 1) + ["Successful"]
    assert clock.now() - 1000.0 == 10.0 * len(looks) <= 60.0
    assert router.release(Colour.GREEN) == V1 and router.get_weights() == Weights.blue_at(0)
    records = read_ledger(tmp_path / "t.ledger.jsonl")
    assert [r.get("event") for r in records] == ["bootstrap", "first-check"]
    assert records[-1]["verdict"] == "Successful" and records[-1]["requests"] >= 100
    story = explain(records)
    assert story[0].startswith(f"bootstrapped green with {V1.ref} (a first release, judged on")
    assert story[1].startswith(f"[{10 * len(looks)} s] first release {V1.ref} judged on the")


def test_a_broken_first_release_fails_its_check_and_keeps_serving(tmp_path: Path) -> None:
    router = MemoryRouter()
    ctl, clock = controller(tmp_path, router, first_check_metrics(router, 0.3))
    check = ctl.bootstrap_checked(V1)
    assert check.verdict.value == "Failed" and "above the limit 10 %" in check.reason
    assert clock.now() == 1010.0  # one look: ~200 requests at 30 % errors
    # Nothing to roll back to: green keeps all traffic (a fix is rolled out against it).
    assert router.release(Colour.GREEN) == V1 and router.get_weights() == Weights.blue_at(0)
    assert read_ledger(tmp_path / "t.ledger.jsonl")[-1]["verdict"] == "Failed"


def test_a_first_release_without_traffic_is_undecided_after_max_step_duration(
    tmp_path: Path,
) -> None:
    ctl, clock = controller(tmp_path, MemoryRouter(), StaticMetrics([]))
    check = ctl.bootstrap_checked(V1)
    assert check.verdict.value == "Inconclusive"  # no traffic: never a pass, never a fail
    assert check.reason == "undecided after 10.0 min: no requests yet"
    assert clock.now() == 1600.0


def test_a_first_release_check_on_unreadable_metrics_is_an_error(tmp_path: Path) -> None:
    metrics = StaticMetrics([StaticTick(error="connection refused")])
    ctl, clock = controller(tmp_path, MemoryRouter(), metrics)
    check = ctl.bootstrap_checked(V1)
    assert (check.verdict.value, check.reason) == (
        "Error",
        "metrics unreadable: connection refused",
    )
    assert clock.now() == 1040.0  # max_consecutive_errors (4) looks in a row


def test_a_first_release_check_holds_the_lease_throughout(tmp_path: Path) -> None:
    router = MemoryRouter()
    ctl, _ = controller(tmp_path, router, first_check_metrics(router, 0.001))
    refused: list[str] = []

    def another_controller(*_: object) -> None:
        try:
            with FileStateStore(tmp_path, SPEC.name).lease("another"):
                pass
        except LeaseHeldError as exc:
            refused.append(str(exc))

    ctl.bootstrap_checked(V1, on_look=another_controller)
    assert refused and "already driven by another controller" in refused[0]


def test_a_first_release_check_needs_an_absolute_limit(tmp_path: Path) -> None:
    router = MemoryRouter()
    spec = make_spec(analysis={"errors": {"max_rate": None}})
    ctl, _ = controller(tmp_path, router, StaticMetrics([]), spec=spec)
    with pytest.raises(ConfigError, match=r"`errors.max_rate`, or `latency.max_slow_rate`"):
        ctl.bootstrap_checked(V1)
    assert router.release(Colour.GREEN) is None  # refused before deploying anything


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(
            {"event": "bootstrap", "at": 1.0, "release": {"model": "m", "version": "1"}},
            id="bootstrap",
        ),
        pytest.param(
            {"event": "start", "at": 1.0, "name": "r", "candidate": {}, "stable": {}},
            id="start-not-ticked-yet",
        ),
    ],
)
def test_a_ledger_ending_with_an_event_tells_no_phase_it_is_still_in(
    record: dict[str, Any],
) -> None:
    story = explain([record])
    assert len(story) == 1  # was a second line: "[0 s] still None: "
    assert "still" not in story[0]


def test_the_story_names_a_weight_set_by_the_command_the_operator_typed(tmp_path: Path) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    ctl.run(max_ticks=1)
    ctl.store.push_command(Command(id="w", kind="set_weight", weight=50, by="ann"))
    ctl.run(max_ticks=1)
    story = explain(read_ledger(tmp_path / "t.ledger.jsonl"))
    assert any(
        line.endswith("operator set-weight: weight set to 50 % by ann → Progressing")
        for line in story
    ), story


class CustomSource:
    """A metrics source of a user's own (the MetricsProvider protocol): `blue` and `green`
    counts as it hands them over, numbers of any kind."""

    def __init__(self, blue: ColourCounts, green: ColourCounts) -> None:
        self.blue, self.green = blue, green

    def observe(self, since: float, now: float) -> Observation:
        return Observation(since=since, at=now, blue=self.blue, green=self.green)

    def history(self, since: float, now: float) -> Observation:
        return Observation(since=since, at=now)

    def probe(self) -> None:
        return None


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("blue", "green", "said"),
    [
        pytest.param(
            ColourCounts(requests=NAN, errors=0),  # type: ignore[arg-type]
            ColourCounts(requests=900, errors=1),
            "blue requests is nan",
            id="nan-requests",
        ),
        pytest.param(
            ColourCounts(requests=100, errors=NAN),  # type: ignore[arg-type]
            ColourCounts(requests=900, errors=1),
            "blue errors is nan",
            id="nan-errors",  # was: the step passed, blue to 50 % (so did inf, negative errors)
        ),
        pytest.param(
            ColourCounts(requests=100, errors=0),
            ColourCounts(requests=INF, errors=1),  # type: ignore[arg-type]
            "green requests is inf",
            id="inf-requests",
        ),
        pytest.param(
            ColourCounts(requests=-100, errors=0),
            ColourCounts(requests=900, errors=1),
            "blue requests is -100",
            id="negative-requests",
        ),
        pytest.param(
            ColourCounts(requests=100, errors=0),
            ColourCounts(requests=900, errors=-5),
            "green errors is -5",
            id="negative-errors",
        ),
        pytest.param(
            ColourCounts(requests=100, errors=150),
            ColourCounts(requests=900, errors=1),
            "blue errors 150 > requests 100",
            id="more-errors-than-requests",
        ),
        pytest.param(
            ColourCounts(requests=100, errors=0, latency_buckets=((0.25, NAN),)),  # type: ignore[arg-type]
            ColourCounts(requests=900, errors=1),
            "blue latency_buckets count at 0.25 s is nan",
            id="nan-bucket",
        ),
    ],
)
def test_unusable_counts_from_a_custom_source_are_an_error_tick_naming_colour_and_field(
    tmp_path: Path, blue: ColourCounts, green: ColourCounts, said: str
) -> None:
    """Was: folded into the evidence, passing the step or rolling back on nonsense."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, CustomSource(blue, green))
    status = ctl.run(max_ticks=3)  # start, then judged twice
    assert status.phase is Phase.PROGRESSING and status.step_index == 0
    assert status.verdict is Verdict.ERROR
    assert status.consecutive_errors == 2
    assert said in status.reason and status.reason.startswith("metrics unusable: ")
    assert status.errors.canary_requests == 0  # nothing of them folded
    ticks = [r for r in read_ledger(tmp_path / "t.ledger.jsonl") if "metrics_error" in r]
    assert len(ticks) == 2 and said in ticks[-1]["metrics_error"]


class RefusesThePromotion(MemoryRouter):
    """A router that refuses blue 100 % for good: the namespace (or endpoint) it was sent to
    is gone for that route, say."""

    def set_weights(self, weights: Weights) -> None:
        if weights.blue == 100:
            raise RouterRefused("namespace ml-prod not found")
        super().set_weights(weights)


def test_a_promotion_the_router_refuses_for_good_can_be_aborted(tmp_path: Path) -> None:
    """Was: every `run` stopped at the promotion's weights, and `abort` was refused in
    Promoting: the rollout could neither end nor be rolled back."""
    router = RefusesThePromotion(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    with pytest.raises(RouterRefused):
        ctl.run(max_ticks=500)
    stuck = ctl.store.load()
    assert stuck is not None and stuck.phase is Phase.PROMOTING and stuck.applied == 0
    again, _ = controller(tmp_path, router, simulated(router, 0.01))
    with pytest.raises(RouterRefused):  # as ever, without an abort
        again.run(max_ticks=5)
    ctl.store.push_command(Command(id="a", kind="abort", by="ann", rollout=stuck.id))
    aborted, _ = controller(tmp_path, router, simulated(router, 0.01))
    final = aborted.run(max_ticks=5)
    assert final.phase is Phase.ROLLED_BACK
    assert router.get_weights() == Weights.blue_at(0) and router.release(Colour.GREEN) == V1
    story = "\n".join(explain(read_ledger(tmp_path / "t.ledger.jsonl")))
    assert "aborted by ann while promoting: blue back to 0 %, green keeps serving diabetes:1" in (
        story
    )


class SteppedClock(FakeClock):
    """A fake clock whose wall time an NTP step moves (`offset`); its monotonic time never."""

    def __init__(self, start: float) -> None:
        super().__init__(start)
        self.offset = 0.0

    def now(self) -> float:
        return self.t + self.offset


#: Too few canary requests ever to pass a step: only its age (60 s at most) ends it, held.
SLOW_STEP = make_spec(analysis={"max_step_duration_s": 60, "min_requests": 10_000})
FEW = StaticTick.model_validate({"blue": {"requests": 10}, "green": {"requests": 90}})


def test_a_step_of_the_wall_clock_does_not_age_the_step(tmp_path: Path) -> None:
    """Was: NTP stepping the wall clock 15 minutes on between two ticks aged a healthy step by
    them: held as inconclusive after 60 s at its fourth tick, 30 s into it."""
    clock = SteppedClock(1000.0)

    def ntp_step(status: Status, record: dict[str, Any]) -> None:
        if status.tick == 3:
            clock.offset += 900.0

    ctl = Controller(
        SLOW_STEP,
        MemoryRouter(releases={Colour.GREEN: V1}),
        StaticMetrics([FEW]),
        FileStateStore(tmp_path, SLOW_STEP.name),
        ledger=Ledger(tmp_path / "t.ledger.jsonl", fsync=False),
        clock=clock,
        on_tick=ntp_step,
    )
    final = ctl.run(max_ticks=20, stop_when_paused=True)
    assert final.held and "inconclusive after 60 s" in final.reason
    assert final.tick == 7  # 60 s after the step began at the first tick, as without a step
    assert final.step_uncounted_s == 900.0
    stepped = [r for r in read_ledger(tmp_path / "t.ledger.jsonl") if "clock_stepped_s" in r]
    assert [(r["tick"], r["clock_stepped_s"]) for r in stepped] == [(4, 900.0)]


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="Linux's suspend-aware clock")
def test_the_real_clocks_passing_time_counts_a_suspend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: time.monotonic, which stops while the machine is suspended: a controller host
    suspended an hour (a laptop's lid) did not age the step for the traffic served meanwhile,
    and the ledger said `clock_stepped_s: 3600` though the wall clock never stepped."""
    real = time.clock_gettime
    suspended = 3600.0

    def clock_gettime(clock: int) -> float:  # the OS's clocks after an hour's suspend
        return real(clock) + (suspended if clock == time.CLOCK_BOOTTIME else 0.0)

    monkeypatch.setattr(time, "clock_gettime", clock_gettime)
    before = time.monotonic()  # (boot time is monotonic time plus every suspend)
    assert RealClock().monotonic() - before >= suspended


def test_a_restart_after_an_outage_ages_the_step_by_it(tmp_path: Path) -> None:
    """No monotonic clock survives a restart: the first tick of a new controller ages the step
    by the wall time since the last one (the metrics counted the outage's traffic)."""
    store = FileStateStore(tmp_path, SLOW_STEP.name)
    router = MemoryRouter(releases={Colour.GREEN: V1})
    first = Controller(SLOW_STEP, router, StaticMetrics([FEW]), store, clock=FakeClock(1000.0))
    assert not first.run(max_ticks=3).held
    later = Controller(SLOW_STEP, router, StaticMetrics([FEW]), store, clock=FakeClock(1900.0))
    final = later.run(max_ticks=1)
    assert final.held and "inconclusive after 60 s" in final.reason


class LosesGreenAtPromotion(MemoryRouter):
    """Green's workload is gone once blue takes all traffic (evicted, its namespace cleaned),
    and an operator's abort is queued then (`store`), read while Promoting."""

    store: FileStateStore | None = None

    def set_weights(self, weights: Weights) -> None:
        super().set_weights(weights)
        if weights.blue == 100 and self.store is not None:
            self._releases.pop(Colour.GREEN)
            promoting = self.store.load()
            assert promoting is not None
            self.store.push_command(Command(id="a", kind="abort", by="ann", rollout=promoting.id))
            self.store = None


@pytest.mark.parametrize("resumed", [False, True], ids=["same-run", "stuck-status-resumed"])
def test_an_abort_while_promoting_whose_rollback_green_refuses_gives_green_its_release(
    tmp_path: Path, resumed: bool
) -> None:
    """Was: the abort's weights refused for good ("cannot send 100 % to green: nothing is
    deployed there"), the rollout stuck in RollingBack: every later `run` stopped at them (the
    resume path restores green for an abort it reads, not for one already decided)."""
    router = LosesGreenAtPromotion(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    if resumed:  # a version without the repair stopped here: RollingBack, its weights pending
        status = ctl.run(max_ticks=1)
        while status.phase is not Phase.PROMOTING:
            status = ctl.run(max_ticks=1)
        assert router.get_weights().blue == 100
        router._releases.pop(Colour.GREEN)
        stuck = replace(
            status,
            phase=Phase.ROLLING_BACK,
            blue_weight=0,
            reason="aborted by ann while promoting: blue back to 0 %",
            pending=(SetWeights(0),),
            applied=0,
        )
        ctl.store.save(stuck)
        ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    else:
        router.store = ctl.store
    final = ctl.run(max_ticks=20)
    assert final.phase is Phase.ROLLED_BACK, final.reason
    assert router.get_weights() == Weights.blue_at(0)
    assert router.release(Colour.GREEN) == V1
    story = "\n".join(explain(read_ledger(tmp_path / "t.ledger.jsonl")))
    assert "the rollback's weights were refused, green serving nothing (" in story
    assert "): deploy diabetes:1 to green, then the weights again" in story
    assert "controller stopped" not in story


class AbortQueuedAtBlueGreen(FileStateStore):
    """An operator's abort lands once the promotion's Blue_Green is decided and saved, before
    green is deployed (`abort` read from a Promoting status a moment before)."""

    def save(self, status: Status) -> None:
        super().save(status)
        if status.phase is Phase.FINALISING and status.applied == 0 and not self.commands():
            self.push_command(Command(id="a", kind="abort", by="ann", rollout=status.id))


def test_an_abort_queued_before_green_gets_the_candidate_is_honoured(tmp_path: Path) -> None:
    """Was: dropped ("abort by ann: dropped, not acted on: the rollout ended Succeeded first"),
    green deployed with the candidate after the abort was queued, though `abort` had said the
    controller acts on it at its next tick."""
    journal = tmp_path / "journal.jsonl"
    router = MemoryRouter(releases={Colour.GREEN: V1}, journal=journal)
    store = AbortQueuedAtBlueGreen(tmp_path, SPEC.name)
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01), store=store)
    final = ctl.run(max_ticks=500)
    assert final.phase is Phase.ROLLED_BACK, final.reason
    assert final.reason.startswith("aborted by ann while promoting: blue back to 0 %")
    assert router.get_weights() == Weights.blue_at(0)
    assert router.release(Colour.GREEN) == V1
    assert not [
        r for r in jsonl.read(journal) if r.get("colour") == "green" and r["action"] == "deploy"
    ]
    story = "\n".join(explain(read_ledger(tmp_path / "t.ledger.jsonl")))
    assert "not applied, an abort being queued: deploy diabetes:2 to green" in story


def short_of_its_newline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next append's line reaches the disk but for its newline, then ENOSPC (a full disk
    at a block boundary): the append fails after writing a complete JSON object."""
    real_write = jsonl.os.write

    def write(fd: int, data: bytes) -> int:
        if len(data) > 1:
            return real_write(fd, data[:-1])
        monkeypatch.undo()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jsonl.os, "write", write)


def test_a_command_whose_queueing_failed_is_never_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Was: `rollout promote` said "cannot queue a command ...: No space left on device" (exit
    2), the next command's append ended the fragment with a newline, and the controller then
    promoted, the analysis skipped."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    rollout_id = ctl.run(max_ticks=1).id
    store = FileStateStore(tmp_path, SPEC.name)
    short_of_its_newline(monkeypatch)
    with pytest.raises(StateError, match=r"cannot queue a command .*No space left on device"):
        store.push_command(Command(id="1", kind="promote", by="ann", rollout=rollout_id))
    assert store.commands_path.read_bytes().endswith(b"}")  # the object whole, no newline
    store.push_command(Command(id="2", kind="pause", by="ann", rollout=rollout_id))
    assert [c and c.id for c in store.commands()] == [None, "2"]
    final = ctl.run(max_ticks=3)
    assert final.phase is Phase.PAUSED, final.reason
    assert router.get_weights() == Weights.blue_at(10)
    assert "skipped entry 1 of the command log" in caplog.text


def test_a_ledger_line_whose_append_failed_is_skipped_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(tmp_path / "l.jsonl", fsync=False)
    ledger.append({"event": "start", "at": 0.0, "name": "t", "plan": [10, 100]})
    short_of_its_newline(monkeypatch)
    with pytest.raises(StateError, match="cannot append to ledger"):
        ledger.append({"tick": 1, "at": 10.0, "phase": "Progressing"})
    ledger.append({"tick": 2, "at": 11.0, "phase": "Progressing"})
    assert [r.get("at") for r in read_ledger(ledger.path)] == [0.0, 11.0]
    assert "l.jsonl: skipped 1 line(s) that are not JSON objects" in caplog.text


def test_no_fragment_of_a_line_parses_once_the_next_append_ends_it(tmp_path: Path) -> None:
    # Cut anywhere: in a key, a string, after a backslash, inside a \u escape, after a number,
    # after the closing brace (the whole object, short of its newline alone).
    record = {"by": 'Zoë "q" \\ end', "id": "1", "kind": "promote", "weight": 12.5, "x": [1]}
    line = json.dumps(record, sort_keys=True).encode()
    for cut in range(1, len(line) + 1):
        path = tmp_path / f"{cut}.jsonl"
        path.write_bytes(line[:cut])
        jsonl.append(path, {"id": "2"}, fsync=False)
        assert jsonl.read_slots(path, warn=False) == [None, {"id": "2"}], line[:cut]


def test_a_dry_run_of_the_same_name_and_dir_leaves_the_real_rollouts_ledger_alone(
    tmp_path: Path,
) -> None:
    """Was: a dry run (`state: {kind: memory}`) appended to `<dir>/<name>.ledger.jsonl` while the
    real rollout ran, and `explain` of the real, Succeeded rollout ended "RolledBack"."""
    from rollout.api import run_rollout
    from rollout.config import spec_from_dict
    from tests.engine.specs import spec_dict

    real = spec_from_dict(
        spec_dict(tmp_path, router={"kind": "memory", "state_file": str(tmp_path / "r.json")})
    )
    dry = spec_from_dict(
        spec_dict(tmp_path, 0.08, state={"kind": "memory", "dir": str(tmp_path / "state")})
    )
    assert run_rollout(real, clock=FakeClock(1000.0), max_ticks=2).phase is Phase.PROGRESSING
    dried = run_rollout(dry, clock=FakeClock(1000.0))
    assert dried.phase is Phase.ROLLED_BACK
    final = run_rollout(real, clock=FakeClock(2000.0))
    assert final.phase is Phase.SUCCEEDED, final.reason
    assert final.ledger_path != dried.ledger_path
    assert {r.get("rollout_id") for r in read_ledger(final.ledger_path)} == {final.status.id}
    assert "RolledBack" not in "\n".join(explain(read_ledger(final.ledger_path)))
    assert "RolledBack" in "\n".join(explain(read_ledger(dried.ledger_path)))


def test_an_abort_with_green_lost_is_not_stopped_by_weights_it_would_only_log(
    tmp_path: Path,
) -> None:
    """Green lost while no controller ran (an Envoy restarted from its bootstrap) and the
    weights unreadable for 4 reads: was, the restore read them for its log line and stopped the
    abort; its own weights ride the outage through."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    assert ctl.run(max_ticks=3).blue_weight == 50
    ctl.store.push_command(Command(id="a", kind="abort", by="ann"))
    down = Unreachable(WEIGHTS_READS, releases={Colour.BLUE: V2}, weights=Weights.blue_at(50))
    again, _ = controller(tmp_path, down, StaticMetrics([]))
    final = again.run(max_ticks=3)
    assert final.phase is Phase.ROLLED_BACK and final.reason.startswith("aborted by ann")
    assert down.release(Colour.GREEN) == V1 and down.get_weights() == Weights.blue_at(0)


class OneBlip(MemoryRouter):
    """Nothing answers at the router's API server for its first call, whatever it is."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.calls = 0

    def _blip(self) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RouterUnavailable("API server at https://k8s:6443 did not answer")

    def release(self, colour: Colour) -> Release | None:
        self._blip()
        return super().release(colour)

    def get_weights(self) -> Weights:
        self._blip()
        return super().get_weights()


def test_a_resume_reads_the_releases_again_through_a_blip(tmp_path: Path) -> None:
    """Was: the resume read the releases before the weights and stopped at one blip of an API
    server (Istio, Azure), which the weights read after it would have ridden through."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, simulated(router, 0.01))
    assert ctl.run(max_ticks=3).blue_weight == 50
    blip = OneBlip(releases={Colour.GREEN: V1, Colour.BLUE: V2}, weights=Weights.blue_at(50))
    again, _ = controller(tmp_path, blip, StaticMetrics([]))
    assert again.start().blue_weight == 50
    assert blip.calls > 1


def test_a_read_failing_with_a_richer_router_error_is_said_as_a_router_error(
    tmp_path: Path,
) -> None:
    """Was: the last failure re-raised as its own class, and WeightsUnsettled (which takes
    the weights it shows too) made a TypeError of it."""
    router = ReleaseReadsFail(4, WeightsUnsettled("mid-change", None), releases={Colour.GREEN: V1})
    ctl, _ = controller(tmp_path, router, StaticMetrics([]))
    with pytest.raises(RouterError, match=r"could not be read 4 times in 3\.5 s: mid-change"):
        ctl.start()
