"""The registry follows traffic: tag planning (pure), reconcile after a crash, serving colours,
and EngineDelivery on the real rollout engine (memory router, simulated traffic, fake clock).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aml_pipelines.delivery import (
    EngineDelivery,
    RolloutView,
    TagChange,
    plan_manual_tags,
    plan_tags,
    reconcile,
    serving,
)
from aml_pipelines.errors import ConfigError
from aml_pipelines.registry.base import ModelVersion
from aml_pipelines.registry.local import LocalRegistry
from rollout.config import spec_from_dict
from rollout.controller import FakeClock
from rollout.core.types import Colour, Release
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


def _spec(tmp: Path, canary_error_rate: float, interval_s: float = 10.0):
    return spec_from_dict(
        {
            "name": "diabetes",
            "router": {"kind": "memory", "state_file": str(tmp / "routes.json")},
            "metrics": {
                "kind": "simulated",
                "seed": 1,
                "rps": 500,
                "baseline": {"error_rate": 0.01},
                "canary": {"error_rate": canary_error_rate},
            },
            "steps": [10, 50, 100],
            "analysis": {
                "interval_s": interval_s,
                "min_requests": 50,
                "latency": {"enabled": False},
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

    monkeypatch.setattr("aml_pipelines.delivery.follow_traffic", crash)
    with pytest.raises(SystemExit):
        deliver()
    monkeypatch.undo()


def test_a_models_first_release_is_deployed_unjudged_then_the_next_is_rolled_out_against_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: "green serves nothing" for ever, retried every interval: the trigger could deliver
    # no model that had never been in production.
    registry = LocalRegistry(tmp_path / "registry")
    register(registry, tmp_path, stage="candidate")
    delivery = EngineDelivery(registry, _spec(tmp_path, 0.01), clock=FakeClock(1_000.0))
    killed_before_the_tags(monkeypatch, lambda: delivery.deliver(registry.get("diabetes", 1)))
    first = delivery.deliver(registry.get("diabetes", 1))  # the retry finds v1 on green

    assert first.phase == "Succeeded"
    assert first.reason.startswith("first release of diabetes: deployed to green unjudged")
    assert [v.stage for v in registry.list_versions("diabetes")] == ["production"]
    routes = json.loads((tmp_path / "routes.json").read_text())
    assert routes["weights"] == {"blue": 0, "green": 100}
    assert routes["releases"]["green"]["version"] == "1"

    register(registry, tmp_path, stage="candidate")
    second = delivery.deliver(registry.get("diabetes", 2))
    assert second.phase == "Succeeded", second.reason
    assert [v.stage for v in registry.list_versions("diabetes")] == ["archived", "production"]
    view = delivery.current()
    assert view is not None and (view.candidate, view.stable) == (2, 1)  # judged against v1
    story = "\n".join(explain(read_ledger(first.ledger_path)))
    assert "bootstrapped green with diabetes:1 (a first release, unjudged" in story


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
