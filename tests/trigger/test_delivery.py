"""The registry follows traffic: tag planning (pure), reconcile after a crash, serving colours,
and EngineDelivery on the real rollout engine (memory router, simulated traffic, fake clock).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aml_pipelines.delivery import (
    EngineDelivery,
    RolloutView,
    TagChange,
    plan_first_release_tags,
    plan_manual_tags,
    plan_tags,
    reconcile,
    serving,
    starts_anew,
)
from aml_pipelines.errors import ConfigError
from aml_pipelines.registry.base import ModelVersion
from aml_pipelines.registry.local import LocalRegistry
from aml_pipelines.trigger.dispatch import Dispatcher
from aml_pipelines.trigger.store import Step, TriggerStore
from rollout.config import spec_from_dict
from rollout.controller import FakeClock
from rollout.core.types import Colour, Release
from rollout.errors import MetricsError
from rollout.ledger import explain, read_ledger
from rollout.routers.memory import MemoryRouter
from tests.trigger.fakes import register


def _mv(version: int, **tags: str) -> ModelVersion:
    return ModelVersion("m", version, f"file:///m/{version}", "0" * 64, tags)


PROD1_CAND2 = [_mv(1, stage="production"), _mv(2, stage="candidate")]


@pytest.mark.parametrize(
    ("versions", "candidate", "phase", "reason", "expected"),
    [
        pytest.param(
            PROD1_CAND2,
            2,
            "Succeeded",
            "",
            [TagChange(2, {"stage": "production"}), TagChange(1, {"stage": "archived"})],
            id="promote-archives-previous",
        ),
        pytest.param(
            PROD1_CAND2,
            2,
            "RolledBack",
            "canary 5xx 4 %",
            [TagChange(2, {"stage": "rolled-back", "rollback_reason": "canary 5xx 4 %"})],
            id="rollback-keeps-production",
        ),
        pytest.param(
            PROD1_CAND2,
            2,
            "Failed",
            "",
            [TagChange(2, {"stage": "rolled-back", "rollback_reason": "Failed"})],
            id="failed-counts-as-rolled-back",
        ),
        pytest.param(PROD1_CAND2, 2, "Progressing", "", [], id="active-plans-nothing"),
        pytest.param(
            [_mv(1, stage="archived"), _mv(2, stage="production")],
            2,
            "Succeeded",
            "",
            [],
            id="already-true-plans-nothing",
        ),
        pytest.param(
            [_mv(1, stage="production"), _mv(2, stage="production")],
            2,
            "Succeeded",
            "",
            [TagChange(1, {"stage": "archived"})],
            id="half-written-promotion-finished",
        ),
        pytest.param(PROD1_CAND2, 3, "Succeeded", "", [], id="unknown-candidate"),
    ],
)
def test_plan_tags(versions, candidate, phase, reason, expected) -> None:
    assert plan_tags(versions, candidate, phase, reason) == expected


@pytest.mark.parametrize(
    ("versions", "version", "tags", "replace", "expected"),
    [
        pytest.param(
            [_mv(1, stage="candidate")],
            1,
            {"stage": "production"},
            False,
            [TagChange(1, {"stage": "production"})],
            id="first-production",
        ),
        pytest.param(
            PROD1_CAND2,
            1,
            {"stage": "production", "note": "x"},
            False,
            [TagChange(1, {"stage": "production", "note": "x"})],
            id="the-holder-itself",
        ),
        pytest.param(
            PROD1_CAND2,
            2,
            {"note": "x"},
            False,
            [TagChange(2, {"note": "x"})],
            id="other-tags-untouched",
        ),
        pytest.param(
            PROD1_CAND2,
            2,
            {"stage": "production"},
            True,
            [TagChange(2, {"stage": "production"}), TagChange(1, {"stage": "archived"})],
            id="replace-archives-the-holder-after",
        ),
        pytest.param(
            [_mv(1, stage="production"), _mv(2, stage="production"), _mv(3)],
            3,
            {"stage": "production"},
            True,
            [
                TagChange(3, {"stage": "production"}),
                TagChange(1, {"stage": "archived"}),
                TagChange(2, {"stage": "archived"}),
            ],
            id="replace-repairs-two-holders",
        ),
    ],
)
def test_plan_manual_tags(versions, version, tags, replace, expected) -> None:
    assert plan_manual_tags(versions, version, tags, replace=replace) == expected


@pytest.mark.parametrize(
    "versions",
    [
        pytest.param(PROD1_CAND2, id="newer-over-older"),
        pytest.param(
            [_mv(1, stage="candidate"), _mv(2, stage="production")], id="older-over-newer"
        ),
    ],
)
def test_a_second_production_version_is_refused(versions) -> None:
    other = 2 if versions[0].stage == "candidate" else 1
    target = 3 - other
    with pytest.raises(
        ConfigError, match=rf"m:{other} is already tagged stage=production.*--replace"
    ):
        plan_manual_tags(versions, target, {"stage": "production"}, replace=False)


def test_reason_is_bounded() -> None:
    (change,) = plan_tags(PROD1_CAND2, 2, "RolledBack", "x" * 1000)
    assert len(change.tags["rollback_reason"]) == 256


FIRST = [_mv(1, stage="candidate")]
CHECKED = {"stage": "production", "first_check": "Successful", "first_check_reason": ""}


@pytest.mark.parametrize(
    ("versions", "candidate", "check", "reason", "expected"),
    [
        pytest.param(FIRST, 1, "Successful", "error rate 0 %", [TagChange(1, CHECKED)], id="clean"),
        pytest.param(
            FIRST,
            1,
            "Failed",
            "error rate 31 % is above the limit 10 %",
            [
                TagChange(
                    1,
                    {
                        "stage": "production",
                        "first_check": "Failed",
                        "first_check_reason": "error rate 31 % is above the limit 10 %",
                    },
                )
            ],
            id="failed-still-production-with-the-reason",
        ),
        pytest.param(
            FIRST,
            1,
            "Error",
            "",
            [
                TagChange(
                    1,
                    {"stage": "production", "first_check": "Error", "first_check_reason": "Error"},
                )
            ],
            id="no-reason-says-the-verdict",
        ),
        pytest.param(
            [_mv(1, stage="production", first_check="Successful")],
            1,
            "Successful",
            "error rate 0 %",
            [],
            id="already-true-plans-nothing",
        ),
        pytest.param(
            [_mv(1, stage="production", first_check="Failed", first_check_reason="31 %")],
            1,
            "Successful",
            "error rate 0 %",
            [TagChange(1, CHECKED)],
            id="a-later-success-replaces-a-failure",
        ),
        pytest.param(
            [_mv(1, stage="production", first_check="Error", first_check_reason="down")],
            1,
            "Error",
            "down",
            [],
            id="same-failure-plans-nothing",
        ),
        pytest.param(
            [_mv(1, stage="production"), _mv(2, stage="candidate")],
            2,
            "Successful",
            "",
            [TagChange(2, CHECKED), TagChange(1, {"stage": "archived"})],
            id="another-production-archived-after",
        ),
        pytest.param(FIRST, 2, "Successful", "", [], id="unknown-candidate"),
    ],
)
def test_plan_first_release_tags(versions, candidate, check, reason, expected) -> None:
    assert plan_first_release_tags(versions, candidate, check, reason) == expected


def test_first_check_reason_is_bounded() -> None:
    (change,) = plan_first_release_tags(FIRST, 1, "Failed", "x" * 1000)
    assert len(change.tags["first_check_reason"]) == 256


@pytest.mark.parametrize(
    ("view", "expected"),
    [
        pytest.param(None, {1: "green"}, id="no-rollout-production-is-green"),
        pytest.param(
            RolloutView("m", 2, "Progressing", stable=1, weight=25),
            {1: "green 75%", 2: "blue 25%"},
            id="mid-rollout",
        ),
        pytest.param(RolloutView("m", 2, "Succeeded", stable=1), {2: "green"}, id="promoted"),
        pytest.param(RolloutView("m", 2, "RolledBack", stable=1), {1: "green"}, id="rolled-back"),
        pytest.param(
            RolloutView("m", 2, "Paused", weight=50),
            {1: "green 50%", 2: "blue 50%"},
            id="paused-no-stable-uses-production",
        ),
    ],
)
def test_serving_colours(view: RolloutView | None, expected: dict[int, str]) -> None:
    assert serving(PROD1_CAND2, view) == expected


# ------------------------------------------------------------------ on the real engine


def _spec(
    tmp: Path,
    canary_error_rate: float,
    interval_s: float = 10.0,
    *,
    baseline_error_rate: float = 0.01,
    metrics: dict[str, Any] | None = None,
    analysis: dict[str, Any] | None = None,
):
    simulated = {
        "kind": "simulated",
        "seed": 1,
        "rps": 500,
        "baseline": {"error_rate": baseline_error_rate},
        "canary": {"error_rate": canary_error_rate},
    }
    return spec_from_dict(
        {
            "name": "diabetes",
            "router": {"kind": "memory", "state_file": str(tmp / "routes.json")},
            "metrics": metrics or simulated,
            "steps": [10, 50, 100],
            "analysis": {
                "interval_s": interval_s,
                "min_requests": 50,
                "max_step_duration_s": 600,
                "latency": {"enabled": False},
                **(analysis or {}),
            },
            "state": {"dir": str(tmp / "rollout")},
        }
    )


@pytest.fixture
def two_versions(tmp_path: Path) -> LocalRegistry:
    registry = LocalRegistry(tmp_path / "registry")
    register(registry, tmp_path, stage="production")
    register(registry, tmp_path, stage="candidate")
    return registry


@pytest.mark.parametrize(
    ("canary_error_rate", "stages", "reason"),
    [
        pytest.param(0.01, ["archived", "production"], None, id="promoted"),
        pytest.param(0.5, ["production", "rolled-back"], "canary error rate", id="rolled-back"),
    ],
)
def test_local_delivery_tags_follow_the_rollout(
    tmp_path: Path,
    two_versions: LocalRegistry,
    canary_error_rate: float,
    stages: list[str],
    reason: str | None,
) -> None:
    delivery = EngineDelivery(
        two_versions, _spec(tmp_path, canary_error_rate), clock=FakeClock(1_000.0)
    )
    outcome = delivery.deliver(two_versions.get("diabetes", 2))
    versions = two_versions.list_versions("diabetes")
    assert [v.stage for v in versions] == stages
    if reason is not None:
        assert reason in versions[1].tags["rollback_reason"]
        assert versions[1].tags["rollback_reason"] == outcome.reason
    assert outcome.ledger_path is not None and outcome.ledger_path.exists()
    view = delivery.current()
    assert view is not None and (view.model, view.candidate, view.stable) == ("diabetes", 2, 1)


def killed_before_the_tags(monkeypatch: pytest.MonkeyPatch, deliver: Callable[[], object]) -> None:
    """Run `deliver` as a trigger killed after the traffic moved, before the tags were written."""

    def crash(*_args: object, **_kw: object) -> None:
        raise SystemExit("killed after the traffic moved, before the tags were written")

    monkeypatch.setattr("aml_pipelines.delivery.apply_tags", crash)
    with pytest.raises(SystemExit):
        deliver()
    monkeypatch.undo()


def _events(ledger: Path | None) -> list[str]:
    assert ledger is not None
    return [r.get("event", "tick") for r in read_ledger(ledger)]


def _green(tmp: Path) -> tuple[str, dict[str, int]]:
    routes = json.loads((tmp / "routes.json").read_text())
    return routes["releases"]["green"]["version"], routes["weights"]


def test_a_models_first_release_is_checked_then_the_next_is_rolled_out_against_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: "green serves nothing" for ever, retried every interval: the trigger could deliver
    # no model that had never been in production. Then: deployed unjudged.
    registry = LocalRegistry(tmp_path / "registry")
    register(registry, tmp_path, stage="candidate")
    delivery = EngineDelivery(registry, _spec(tmp_path, 0.01), clock=FakeClock(1_000.0))
    killed_before_the_tags(monkeypatch, lambda: delivery.deliver(registry.get("diabetes", 1)))
    first = delivery.deliver(registry.get("diabetes", 1))  # the retry finds v1 on green

    assert (first.phase, first.first_check) == ("Succeeded", "Successful")
    assert first.reason.startswith(
        "first release of diabetes: deployed to green with all traffic; its check on the "
        "absolute limits was Successful: error rate"
    )
    (v1,) = registry.list_versions("diabetes")
    assert dict(v1.tags, stage="production") == v1.tags
    assert (v1.tags["first_check"], "first_check_reason" in v1.tags) == ("Successful", False)
    assert _green(tmp_path) == ("1", {"blue": 0, "green": 100})
    # Deployed once; judged by the killed delivery, and afresh by the retry (only judged).
    assert _events(first.ledger_path) == ["bootstrap", "first-check", "first-check"]

    register(registry, tmp_path, stage="candidate")
    second = delivery.deliver(registry.get("diabetes", 2))
    assert (second.phase, second.first_check) == ("Succeeded", ""), second.reason
    assert [v.stage for v in registry.list_versions("diabetes")] == ["archived", "production"]
    view = delivery.current()
    assert view is not None and (view.candidate, view.stable) == (2, 1)  # judged against v1
    story = "\n".join(explain(read_ledger(first.ledger_path)))
    assert "bootstrapped green with diabetes:1 (a first release, judged on" in story


@pytest.mark.parametrize(
    ("spec_kw", "phase", "check", "says"),
    [
        pytest.param(
            {"baseline_error_rate": 0.3},
            "Failed",
            "Failed",
            "is above the limit 10 %",
            id="over-errors-max-rate-fails",
        ),
        pytest.param(
            {"metrics": {"kind": "static"}},
            "Inconclusive",
            "Inconclusive",
            "undecided after 10.0 min: no requests yet",
            id="no-traffic-is-undecided",
        ),
        pytest.param(
            {"metrics": {"kind": "static", "ticks": [{"error": "connection refused"}]}},
            "Failed",
            "Error",
            "metrics unreadable: connection refused",
            id="unreadable-metrics-is-an-error",
        ),
    ],
)
def test_a_first_release_that_is_not_shown_good_still_serves_and_says_so(
    tmp_path: Path, spec_kw: dict[str, Any], phase: str, check: str, says: str
) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    register(registry, tmp_path, stage="candidate")
    delivery = EngineDelivery(registry, _spec(tmp_path, 0.01, **spec_kw), clock=FakeClock(1e3))
    outcome = delivery.deliver(registry.get("diabetes", 1))

    assert (outcome.phase, outcome.first_check) == (phase, check)
    assert f"its check on the absolute limits {'ended in ' * (check == 'Error')}" in outcome.reason
    assert says in outcome.reason
    # Nothing to fall back to: it serves all traffic, so production is the truth.
    assert _green(tmp_path) == ("1", {"blue": 0, "green": 100})
    v1 = registry.get("diabetes", 1)
    assert (v1.stage, v1.tags["first_check"]) == ("production", check)
    assert says in v1.tags["first_check_reason"]
    assert _events(outcome.ledger_path) == ["bootstrap", "first-check"]


def test_a_long_first_check_logs_its_progress_about_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No traffic: looked at every 10 s for max_step_duration_s (600 s), 60 looks.
    registry = LocalRegistry(tmp_path / "registry")
    register(registry, tmp_path, stage="candidate")
    spec = _spec(tmp_path, 0.01, metrics={"kind": "static"})
    delivery = EngineDelivery(registry, spec, clock=FakeClock(1_000.0))
    with caplog.at_level(logging.INFO, logger="aml_pipelines.delivery"):
        delivery.deliver(registry.get("diabetes", 1))
    said = [r.getMessage() for r in caplog.records]
    assert said[0].startswith("diabetes:1: first release, to green with all traffic; judging")
    assert "every 10 s, for at most 10.0 min" in said[0]
    looks = [m for m in said if "first-release check, look" in m]
    assert [m.split(",")[1].split(":")[0] for m in looks] == [
        f" look {n}" for n in (1, *range(6, 61, 6))
    ]
    assert looks[0].endswith("look 1: Inconclusive: no requests yet")


class _AbortAt(FakeClock):
    """A fake clock that has `delivery` abort its rollout once it reads `at` (a person
    answering a held rollout from another terminal)."""

    def __init__(self, start: float, at: float) -> None:
        super().__init__(start)
        self.at = at
        self.delivery: EngineDelivery | None = None

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        if self.delivery is not None and self.t >= self.at:
            self.delivery.abort("answered by a person")
            self.delivery = None


@pytest.mark.parametrize("on_inconclusive", ["rollback", "hold"])
def test_a_long_rollout_step_logs_its_progress_about_once_a_minute(
    tmp_path: Path,
    two_versions: LocalRegistry,
    caplog: pytest.LogCaptureFixture,
    on_inconclusive: str,
) -> None:
    # Was: nothing between the controller's "started" and the step's end, up to
    # max_step_duration_s (3 h by default) on an endpoint without traffic, then nothing while
    # held for a human: the trigger's log did not say whether it was still at work.
    spec = _spec(
        tmp_path, 0.01, metrics={"kind": "static"}, analysis={"on_inconclusive": on_inconclusive}
    )
    clock = _AbortAt(1_000.0, at=1_000.0 + 600 + 300)  # held for 5 min, then aborted
    delivery = EngineDelivery(two_versions, spec, clock=clock)
    clock.delivery = delivery
    with caplog.at_level(logging.INFO, logger="aml_pipelines.delivery"):
        outcome = delivery.deliver(two_versions.get("diabetes", 2))
    assert outcome.phase == "RolledBack"
    said = [
        r.getMessage() for r in caplog.records if "canary requests in the step" in r.getMessage()
    ]
    assert said[0].startswith(
        "diabetes:2: Progressing, blue at 10 % for 60 s (0 canary requests in the step): "
    )
    spans = [m.split(" for ")[1].split(" (")[0] for m in said]
    assert spans[:9] == [f"{s} s" if s < 120 else f"{s / 60:.1f} min" for s in range(60, 600, 60)]
    held = [m for m in said if m.startswith("diabetes:2: Paused")]
    assert len(held) == (4 if on_inconclusive == "hold" else 0), said
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [m for m in warned if "canary requests in the step" in m] == held  # a person's turn
    assert all(m.endswith("; answer with `aml-rollout rollout resume|promote|abort`") for m in held)


@pytest.mark.parametrize(
    "analysis",
    [
        pytest.param({"errors": {"max_rate": None}}, id="no-max-rate"),
        pytest.param(
            {"errors": {"enabled": False}, "latency": {"enabled": True}},
            id="latency-relative-to-the-baseline-only",
        ),
    ],
)
def test_a_first_release_with_no_limit_to_judge_on_is_deployed_unjudged(
    tmp_path: Path, analysis: dict[str, Any]
) -> None:
    # The engine refuses to check without a limit (a ConfigError: the version would have been
    # closed Failed with nothing deployed); the delivery deploys it as before, and says why.
    registry = LocalRegistry(tmp_path / "registry")
    register(registry, tmp_path, stage="candidate")
    delivery = EngineDelivery(
        registry, _spec(tmp_path, 0.01, analysis=analysis), clock=FakeClock(1e3)
    )
    outcome = delivery.deliver(registry.get("diabetes", 1))

    assert (outcome.phase, outcome.first_check) == ("Succeeded", "unjudged")
    assert outcome.reason.startswith(
        "first release of diabetes: deployed to green with all traffic, unjudged: the spec's "
        "analysis sets no absolute limit"
    )
    v1 = registry.get("diabetes", 1)
    assert (v1.stage, v1.tags["first_check"]) == ("production", "unjudged")
    assert "errors.max_rate" in v1.tags["first_check_reason"]
    assert _green(tmp_path) == ("1", {"blue": 0, "green": 100})
    assert _events(outcome.ledger_path) == ["bootstrap"]


def _first_release_dispatcher(tmp: Path, registry: LocalRegistry) -> Dispatcher:
    spec = _spec(tmp, 0.01, baseline_error_rate=0.3)  # v1 breaches errors.max_rate (10 %)
    delivery = EngineDelivery(registry, spec, clock=FakeClock(1_000.0))
    return Dispatcher(TriggerStore(tmp / "trigger"), registry, delivery, wait_interval_s=0)


def test_a_failed_first_check_closes_the_version_failed_not_retried(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    register(registry, tmp_path, stage="candidate")
    dispatcher = _first_release_dispatcher(tmp_path, registry)
    dispatcher.accept("diabetes", 1, "test")
    (outcome,) = dispatcher.drain("diabetes")

    assert (outcome.phase, outcome.first_check) == ("Failed", "Failed")
    entry = dispatcher.store.load("diabetes").entries[1]
    assert (entry.step, entry.outcome, entry.reason) == (Step.DONE, "Failed", outcome.reason)
    assert dispatcher.drain("diabetes") == []  # closed: not judged again
    assert _events(outcome.ledger_path) == ["bootstrap", "first-check"]


def test_killed_after_the_first_release_tags_the_restart_settles_it_without_judging_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    register(registry, tmp_path, stage="candidate")
    dispatcher = _first_release_dispatcher(tmp_path, registry)
    dispatcher.accept("diabetes", 1, "test")

    def killed(*_args: object, **_kw: object) -> None:
        raise SystemExit("killed after the tags, before the cursor said done")

    monkeypatch.setattr(Dispatcher, "_close", killed)
    with pytest.raises(SystemExit):
        dispatcher.drain("diabetes")
    monkeypatch.undo()
    assert dispatcher.store.load("diabetes").entries[1].step is Step.STARTED
    assert registry.get("diabetes", 1).tags["first_check"] == "Failed"

    restarted = _first_release_dispatcher(tmp_path, registry)
    # Settled from the registry, not judged again (the ledger below); told as an outcome.
    assert [o.phase for o in restarted.drain("diabetes")] == ["Failed"]
    entry = restarted.store.load("diabetes").entries[1]
    # Was: Succeeded ("registry records stage=production"), for a release that failed its check.
    assert (entry.step, entry.outcome) == (Step.DONE, "Failed")
    assert entry.reason.startswith("registry records stage=production, first_check=Failed: ")
    assert "is above the limit 10 %" in entry.reason
    assert _events(tmp_path / "rollout" / "diabetes.ledger.jsonl") == ["bootstrap", "first-check"]


def _started(ledger: Path) -> list[str]:
    """The candidate versions the ledger's rollouts started with."""
    return [r["candidate"]["version"] for r in read_ledger(ledger) if r.get("event") == "start"]


@pytest.mark.parametrize(
    ("supersede", "expected"),
    [
        pytest.param(
            True,
            [
                (2, "superseded", "superseded by version 3 before its rollout started"),
                (3, "Succeeded"),
            ],
            id="supersede-closes-it-before-its-rollout",
        ),
        pytest.param(False, [(2, "Succeeded"), (3, "Succeeded")], id="without-it-waits-its-turn"),
    ],
)
def test_a_version_accepted_while_an_older_one_is_packaged(
    tmp_path: Path,
    two_versions: LocalRegistry,
    monkeypatch: pytest.MonkeyPatch,
    supersede: bool,
    expected: list[tuple[object, ...]],
) -> None:
    # Was: with --supersede, v3 accepted while v2 was being packaged (in this process: nothing
    # to abort yet) let v2 be rolled out all the same, to its end, before v3 replaced it.
    import aml_pipelines.delivery

    register(two_versions, tmp_path, stage="candidate")  # v3
    delivery = EngineDelivery(two_versions, _spec(tmp_path, 0.01), clock=FakeClock(1_000.0))
    dispatcher = Dispatcher(
        TriggerStore(tmp_path / "trigger"),
        two_versions,
        delivery,
        supersede=supersede,
        wait_interval_s=0,
    )
    package, arriving = aml_pipelines.delivery.package_release, [3]

    def slow_package(version: ModelVersion, out_dir: Path, **kw: Any) -> Release:
        if version.version == 2 and arriving:  # the watcher's thread accepts v3 meanwhile
            assert dispatcher.accept("diabetes", arriving.pop(), "watch")
        return package(version, out_dir, **kw)

    monkeypatch.setattr(aml_pipelines.delivery, "package_release", slow_package)
    assert dispatcher.accept("diabetes", 2, "watch")
    outcomes = dispatcher.drain("diabetes")

    said = [
        (o.version, o.phase, o.reason) if o.phase == "superseded" else (o.version, o.phase)
        for o in outcomes
    ]
    assert said == expected
    entries = dispatcher.store.load("diabetes").entries
    assert [(v, e.step, e.outcome) for v, e in entries.items()] == [
        (v, Step.DONE, phase) for v, phase, *_ in expected
    ]
    ledger = tmp_path / "rollout" / "diabetes.ledger.jsonl"
    assert _started(ledger) == ["3"] if supersede else ["2", "3"]
    stages = [v.stage for v in two_versions.list_versions("diabetes")]
    assert stages == ["archived", "candidate" if supersede else "archived", "production"]


@pytest.mark.parametrize("first", [True, False], ids=["first-release", "rollout"])
def test_unreadable_metrics_stop_a_delivery_before_it_packages_anything(
    tmp_path: Path, first: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # Was: the engine's own probe refused only after the version was packaged again and
    # "first release, to green with all traffic" was logged — at every retry of the trigger.
    registry = LocalRegistry(tmp_path / "registry")
    if not first:
        register(registry, tmp_path, stage="production")
    register(registry, tmp_path, stage="candidate")
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))  # bound, not listening: refused
        url = f"http://127.0.0.1:{bound.getsockname()[1]}"
        spec = _spec(tmp_path, 0.01, metrics={"kind": "prometheus", "url": url})
        delivery = EngineDelivery(registry, spec, clock=FakeClock(1_000.0))
        with caplog.at_level(logging.INFO), pytest.raises(MetricsError) as raised:
            delivery.deliver(registry.latest("diabetes"))
    assert str(raised.value).startswith(
        f"metrics unreadable, nothing deployed: Prometheus at {url} is unreachable"
    )
    assert not (tmp_path / "rollout").exists()  # no package, no status, no ledger
    assert not (tmp_path / "routes.json").exists()  # nothing deployed
    assert [r.getMessage() for r in caplog.records if r.name.startswith("aml_pipelines")] == []


@pytest.mark.parametrize("first", [False, True], ids=["rollout", "first-release"])
def test_a_delivery_builds_one_router_and_one_metrics_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: bool
) -> None:
    # Was: besides the probe's, the rollout or the first release's check built a metrics client
    # of its own (a Prometheus session; on azuremonitor a credential and its token), left
    # unclosed — and, until 2d49adf, run_rollout a router of its own (on azureml an MLClient).
    import rollout.api
    import rollout.metrics.factory
    import rollout.routers.factory

    registry = LocalRegistry(tmp_path / "registry")
    if not first:
        register(registry, tmp_path, stage="production")
    register(registry, tmp_path, stage="candidate")
    built = {"router": 0, "metrics": 0}
    closed: list[object] = []

    def counting(real: Callable[..., Any], what: str) -> Callable[..., Any]:
        def build(*args: Any, **kw: Any) -> Any:
            built[what] += 1
            made = real(*args, **kw)
            if what == "metrics":
                made.close = lambda: closed.append(made)
            return made

        return build

    for module, name, what in [
        (rollout.routers.factory, "make_router", "router"),
        (rollout.api, "make_router", "router"),
        (rollout.metrics.factory, "make_metrics", "metrics"),
        (rollout.api, "make_metrics", "metrics"),
    ]:
        monkeypatch.setattr(module, name, counting(getattr(module, name), what))
    delivery = EngineDelivery(registry, _spec(tmp_path, 0.01), clock=FakeClock(1_000.0))
    outcome = delivery.deliver(registry.latest("diabetes"))
    assert outcome.phase == "Succeeded", outcome.reason
    assert built == {"router": 1, "metrics": 1}
    assert len(closed) == 1  # once the delivery is done with it


def test_a_first_version_is_rolled_out_against_what_green_already_serves(tmp_path: Path) -> None:
    """No production version in the registry, but green serves a release (deployed before the
    registry was used): the candidate is judged against it, not deployed unjudged."""
    registry = LocalRegistry(tmp_path / "registry")
    register(registry, tmp_path, stage="candidate")
    spec = _spec(tmp_path, 0.5)
    MemoryRouter.from_config(spec.router).deploy(Colour.GREEN, Release("diabetes", "0"))
    delivery = EngineDelivery(registry, spec, clock=FakeClock(1_000.0))
    outcome = delivery.deliver(registry.get("diabetes", 1))
    assert outcome.phase == "RolledBack", outcome.reason
    assert registry.get("diabetes", 1).stage == "rolled-back"


def test_crash_between_traffic_and_tags_is_repaired_idempotently(
    tmp_path: Path, two_versions: LocalRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    delivery = EngineDelivery(two_versions, _spec(tmp_path, 0.01), clock=FakeClock(1_000.0))
    killed_before_the_tags(monkeypatch, lambda: delivery.deliver(two_versions.get("diabetes", 2)))
    assert two_versions.get("diabetes", 2).stage == "candidate"  # the registry lies...

    restarted = EngineDelivery(two_versions, _spec(tmp_path, 0.01))
    changes = restarted.reconcile()  # ...until the restart reconciles it from the status
    assert changes == [TagChange(2, {"stage": "production"}), TagChange(1, {"stage": "archived"})]
    assert restarted.reconcile() == []  # idempotent
    assert reconcile(two_versions, restarted.current()) == []
    # Delivering the same version again does not roll it out again: the status says it ended.
    ledger = tmp_path / "rollout" / "diabetes.ledger.jsonl"
    before = ledger.read_text()
    outcome = restarted.deliver(two_versions.get("diabetes", 2))
    assert outcome.phase == "Succeeded"
    assert ledger.read_text() == before


@pytest.mark.parametrize(
    ("green_since", "phase", "stages"),
    [
        # green still serves v2: the redelivery reports the promotion (a new rollout, judged
        # against the failing canary below, would roll back)
        pytest.param(None, "Succeeded", ["archived", "production"], id="still-served-is-replayed"),
        # green was set back to v1 since: the promotion is history; v2 is judged again against
        # v1 (and rolls back). Replayed, v2 was tagged production while green served v1.
        pytest.param("1", "RolledBack", ["production", "rolled-back"], id="history-rolls-out-anew"),
    ],
)
def test_an_ended_rollout_is_replayed_only_while_green_serves_its_outcome(
    tmp_path: Path,
    two_versions: LocalRegistry,
    green_since: str | None,
    phase: str,
    stages: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The rule of the rollout step's re-run (components/rollout: `starts_anew`), here for the
    trigger: an ended rollout of the version is replayed only while its outcome serves."""
    first = EngineDelivery(two_versions, _spec(tmp_path, 0.01), clock=FakeClock(1_000.0))
    assert first.deliver(two_versions.get("diabetes", 2)).phase == "Succeeded"
    if green_since is not None:  # rolled back by hand, the registry told so
        spec = _spec(tmp_path, 0.01)
        MemoryRouter.from_config(spec.router).deploy(Colour.GREEN, Release("diabetes", green_since))
        two_versions.set_tags("diabetes", 1, {"stage": "production"})
        two_versions.set_tags("diabetes", 2, {"stage": "archived"})
    caplog.clear()
    again = EngineDelivery(two_versions, _spec(tmp_path, 0.5), clock=FakeClock(2_000.0))
    # A watcher's restart reconciles first: nothing to write either way (was: the history case
    # re-tagged v2 production and v1 archived while green served v1).
    assert again.reconcile() == []
    outcome = again.deliver(two_versions.get("diabetes", 2))
    assert outcome.phase == phase, outcome.reason
    assert [v.stage for v in two_versions.list_versions("diabetes")] == stages
    assert ("that outcome no longer serves" in caplog.text) == (green_since is not None)


@pytest.mark.parametrize(
    "hand_made",
    [
        pytest.param("2-hotfix", id="not-a-registry-number"),
        pytest.param("9", id="a-number-the-registry-lacks"),
    ],
)
def test_a_hand_rollout_of_no_version_of_the_registry_blocks_no_delivery(
    tmp_path: Path, two_versions: LocalRegistry, hand_made: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`rollout start` by hand of a build the registry does not hold, on the trigger's endpoint:
    reconcile has nothing to tag (was: ModelNotFound "version 0 not found" at every reconcile,
    the watcher retrying it for ever, and no later version delivered)."""
    from rollout.api import run_rollout

    spec = _spec(tmp_path, 0.01)
    delivery = EngineDelivery(two_versions, spec, clock=FakeClock(1_000.0))
    assert delivery.deliver(two_versions.get("diabetes", 2)).phase == "Succeeded"
    hand = Release("diabetes", hand_made, sha256="0" * 64)
    ended = run_rollout(
        spec, candidate=hand, state_dir=tmp_path / "rollout", clock=FakeClock(5_000.0), restart=True
    )
    assert ended.phase.value == "Succeeded"
    v3 = register(two_versions, tmp_path, stage="candidate")
    caplog.clear()
    restarted = EngineDelivery(two_versions, spec, clock=FakeClock(9_000.0))
    assert restarted.reconcile() == []
    assert f"diabetes:{hand_made}" in caplog.text and "version 0" not in caplog.text
    assert [v.stage for v in two_versions.list_versions("diabetes")][:2] == [
        "archived",
        "production",
    ]
    assert restarted.deliver(v3).phase == "Succeeded"
    assert two_versions.get("diabetes", 3).stage == "production"


def test_a_new_version_under_a_reused_number_is_rolled_out_not_replayed(
    tmp_path: Path, two_versions: LocalRegistry
) -> None:
    """The state store outlives the registry (reset, re-created): its ended rollout of the old
    diabetes:2 is not the new diabetes:2, other bits. Was: the new v2 reported Succeeded and
    tagged production, never deployed, while green served the old bits."""
    spec = _spec(tmp_path, 0.01)
    old = two_versions.get("diabetes", 2)
    assert EngineDelivery(two_versions, spec, clock=FakeClock(1_000.0)).deliver(old).phase == (
        "Succeeded"
    )
    reset = LocalRegistry(tmp_path / "registry-reset")
    register(reset, tmp_path, stage="production")
    new = register(reset, tmp_path, stage="candidate")
    assert new.version == 2 and new.sha256 != old.sha256
    # The rollout step's rule (components/rollout) as well: green serves the old bits' outcome.
    state = tmp_path / "rollout"
    assert not starts_anew(spec, Release("diabetes", "2", sha256=old.sha256), state)
    assert starts_anew(spec, Release("diabetes", "2", sha256=new.sha256), state)

    again = EngineDelivery(reset, spec, clock=FakeClock(9_000.0))
    assert again.reconcile() == []  # the old v2's promotion is not the new v2's
    assert reset.get("diabetes", 2).stage == "candidate"
    assert again.deliver(new).phase == "Succeeded"
    green = MemoryRouter.from_config(spec.router).release(Colour.GREEN)
    assert green is not None and green.sha256 == new.sha256
    assert _started(tmp_path / "rollout" / "diabetes.ledger.jsonl") == ["2", "2"]


def test_abort_rolls_the_running_rollout_back_with_the_reason(
    tmp_path: Path, two_versions: LocalRegistry
) -> None:
    # Real clock, long analysis interval: the rollout sits in its first step until aborted
    # (the controller wakes early for commands).
    delivery = EngineDelivery(two_versions, _spec(tmp_path, 0.01, interval_s=30.0))
    outcomes = []
    worker = threading.Thread(
        target=lambda: outcomes.append(delivery.deliver(two_versions.get("diabetes", 2)))
    )
    worker.start()
    try:
        deadline = threading.Event()
        for _ in range(500):
            view = delivery.current()
            if view is not None and view.phase == "Progressing":
                break
            deadline.wait(0.02)
        delivery.abort("superseded by version 3")
    finally:
        worker.join(30)
    (outcome,) = outcomes
    assert outcome.phase == "RolledBack"
    assert "aborted by trigger (superseded by version 3)" in outcome.reason
    tags = two_versions.get("diabetes", 2).tags
    assert tags["stage"] == "rolled-back"
    assert tags["rollback_reason"] == outcome.reason


# ------------------------------------------------------------------ invariants (hypothesis)

STAGES = st.sampled_from([None, "candidate", "production", "archived", "rolled-back"])


def _apply(versions: list[ModelVersion], changes: list[TagChange]) -> list[ModelVersion]:
    tags = {v.version: dict(v.tags) for v in versions}
    for change in changes:
        tags[change.version].update(change.tags)
    return [_mv(v.version, **tags[v.version]) for v in versions]


@given(
    stages=st.lists(STAGES, min_size=1, max_size=6),
    data=st.data(),
    phase=st.sampled_from(["Succeeded", "RolledBack", "Failed"]),
)
def test_tag_plans_converge_in_one_application(stages, data, phase) -> None:
    versions = [_mv(i + 1, **({"stage": s} if s else {})) for i, s in enumerate(stages)]
    candidate = data.draw(st.integers(1, len(versions)))
    after = _apply(versions, plan_tags(versions, candidate, phase, "why"))
    assert plan_tags(after, candidate, phase, "why") == []  # idempotent: reconcile twice = once
    production = [v.version for v in after if v.stage == "production"]
    if phase == "Succeeded":
        assert production == [candidate]  # exactly one production, the promoted one
    else:
        assert after[candidate - 1].stage == "rolled-back"
        # a rollback never touches the production version(s)
        assert production == [
            v.version for v in versions if v.stage == "production" and v.version != candidate
        ]


class _RemoteRegistry:
    """The local registry seen as a remote one (Azure ML): versions carry no local folder."""

    def __init__(self, inner: LocalRegistry) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def get(self, name: str, version: int) -> ModelVersion:
        return replace(self.inner.get(name, version), path=None)

    def list_versions(self, name: str) -> list[ModelVersion]:
        return [replace(v, path=None) for v in self.inner.list_versions(name)]

    def find_by_tag(self, name: str, key: str, value: str) -> list[ModelVersion]:
        return [v for v in self.list_versions(name) if v.tags.get(key) == value]


def test_a_version_without_local_files_is_rolled_out_from_the_registry(
    tmp_path: Path, two_versions: LocalRegistry
) -> None:
    remote = _RemoteRegistry(two_versions)
    delivery = EngineDelivery(remote, _spec(tmp_path, 0.01), clock=FakeClock(1_000.0))  # type: ignore[arg-type]
    outcome = delivery.deliver(remote.get("diabetes", 2))
    assert outcome.phase == "Succeeded"
    assert not (tmp_path / "rollout" / "packages").exists()  # nothing packaged locally
    green = json.loads((tmp_path / "routes.json").read_text())["releases"]["green"]
    # Promoted: green serves v2, identified by the registry alone (model, version, sha256).
    assert (green["model"], green["version"], green["model_dir"]) == ("diabetes", "2", None)
    assert green["sha256"] == two_versions.get("diabetes", 2).sha256
