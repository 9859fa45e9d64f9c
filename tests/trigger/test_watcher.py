"""The registry watcher: exactly one delivery per new matching version, filters, waiting, supersede.

In-process tests use the real store, dispatcher and local registry with the file-backed
ResumableDelivery; the crash and two-watcher tests run real processes (tests/trigger/proc.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from aml_pipelines.delivery import RolloutView
from aml_pipelines.errors import IntegrityError, ModelNotFound, RegistryError, TriggerError
from aml_pipelines.registry import local as local_registry
from aml_pipelines.registry.base import ModelVersion
from aml_pipelines.registry.local import LocalRegistry
from aml_pipelines.trigger import store as store_module
from aml_pipelines.trigger import watcher as watcher_module
from aml_pipelines.trigger.dispatch import WITHDRAWN, DeliveryWorker, Dispatcher
from aml_pipelines.trigger.store import MISSING, Entry, Step, TriggerStore
from aml_pipelines.trigger.watcher import Watcher, new_versions
from rollout.errors import MetricsError
from tests.trigger.fakes import ResumableDelivery, journal, register

CANDIDATE = {"stage": "candidate"}


def _watch(registry: LocalRegistry, dispatcher: Dispatcher, **tags: str) -> None:
    Watcher(registry, "diabetes", dispatcher, required_tags=tags or CANDIDATE).run(once=True)


def _events(root: Path, *kinds: str) -> list[tuple[str, int]]:
    return [(e["event"], e["version"]) for e in journal(root) if e["event"] in kinds]


def test_new_version_is_delivered_exactly_once(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher
) -> None:
    register(registry, tmp_path, stage="candidate")
    _watch(registry, dispatcher)
    _watch(registry, dispatcher)  # nothing new: no second delivery
    assert _events(tmp_path / "engine", "start", "resume", "end") == [("start", 1), ("end", 1)]
    assert registry.get("diabetes", 1).stage == "production"

    register(registry, tmp_path, stage="candidate")
    _watch(registry, dispatcher)
    _watch(registry, dispatcher)
    assert _events(tmp_path / "engine", "start") == [("start", 1), ("start", 2)]
    assert [v.stage for v in registry.list_versions("diabetes")] == ["archived", "production"]
    entries = dispatcher.store.load("diabetes").entries
    assert {v: (e.step, e.outcome, e.attempts) for v, e in entries.items()} == {
        1: (Step.DONE, "Succeeded", 1),
        2: (Step.DONE, "Succeeded", 1),
    }


def test_a_version_its_own_pipeline_job_rolls_out_is_left_to_the_job(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher
) -> None:
    # The training pipeline's register step tags it; its rollout step rolls it out. A trigger
    # delivering it too ran a second controller on the same endpoint, beside the job's.
    register(registry, tmp_path, stage="candidate")
    _watch(registry, dispatcher)
    register(
        registry,
        tmp_path,
        stage="candidate",
        rollout_by="pipeline-job",
        source_run="job-7/register",
    )
    _watch(registry, dispatcher)
    _watch(registry, dispatcher)
    assert _events(tmp_path / "engine", "start") == [("start", 1)]
    assert registry.get("diabetes", 2).stage == "candidate"  # the job's rollout step tags it
    entry = dispatcher.store.load("diabetes").entries[2]
    assert (entry.step, entry.outcome, entry.attempts) == (Step.DONE, "skipped", 0)
    assert entry.reason == (
        "rolled out by the pipeline job that registered it (job-7/register; "
        "tag rollout_by=pipeline-job)"
    )


def test_rolled_back_candidate_is_tagged_with_the_reason(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher
) -> None:
    register(registry, tmp_path, stage="candidate")
    _watch(registry, dispatcher)
    register(registry, tmp_path, stage="candidate", fault="error-rate")
    _watch(registry, dispatcher)
    v1, v2 = registry.list_versions("diabetes")
    assert v1.stage == "production"  # the rollback leaves production where it was
    assert v2.tags["stage"] == "rolled-back"
    assert v2.tags["rollback_reason"] == "canary error rate 4.1% vs 0.1% baseline"


def _mv(version: int, **tags: str) -> ModelVersion:
    return ModelVersion("m", version, f"file:///m/{version}", "0" * 64, tags)


@pytest.mark.parametrize(
    ("versions", "required", "known", "expected"),
    [
        pytest.param([_mv(1, stage="candidate")], CANDIDATE, set(), [1], id="candidate"),
        pytest.param([_mv(1)], CANDIDATE, set(), [], id="untagged-filtered"),
        pytest.param([_mv(1)], {}, set(), [1], id="no-filter"),
        pytest.param(
            [_mv(1, stage="candidate", team="a"), _mv(2, stage="candidate", team="b")],
            {"stage": "candidate", "team": "b"},
            set(),
            [2],
            id="two-tags",
        ),
        pytest.param([_mv(1, stage="candidate")], CANDIDATE, {1}, [], id="in-cursor"),
        pytest.param(
            [_mv(1, stage="production"), _mv(2, stage="rolled-back"), _mv(3, stage="candidate")],
            {},
            set(),
            [3],
            id="delivered-history-skipped",
        ),
        pytest.param(
            [_mv(1, stage="candidate"), _mv(2, stage="production"), _mv(3, stage="candidate")],
            CANDIDATE,
            set(),
            [3],
            id="older-than-production-skipped",
        ),
        pytest.param(
            [_mv(3, stage="candidate"), _mv(2, stage="candidate")],
            CANDIDATE,
            set(),
            [2, 3],
            id="oldest-first",
        ),
    ],
)
def test_which_versions_are_new(versions, required, known, expected) -> None:
    assert [v.version for v in new_versions(versions, required, known)] == expected


def test_filter_by_tags_end_to_end(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher
) -> None:
    register(registry, tmp_path, stage="candidate", team="fraud")
    register(registry, tmp_path, stage="candidate", team="churn")
    register(registry, tmp_path, team="churn")  # not a candidate
    _watch(registry, dispatcher, stage="candidate", team="churn")
    assert _events(tmp_path / "engine", "start") == [("start", 2)]


class _BusyEndpoint(ResumableDelivery):
    """Reports another model's rollout as active for the first `busy_polls` looks."""

    def __init__(self, *args, busy_polls: int, view: RolloutView | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.busy_polls = busy_polls
        self.view = view or RolloutView("other-model", 7, "Progressing", weight=25)
        self.aborts: list[str] = []

    def current(self) -> RolloutView | None:
        if self.busy_polls > 0:
            self.busy_polls -= 1
            return self.view
        return super().current()

    def abort(self, reason: str) -> None:
        self.aborts.append(reason)


#: A rollout of v1's number but other bits, left active before the registry was reset: another
#: rollout, not v1's to resume. Was: taken for v1's own, neither waited for nor aborted, and
#: the delivery refused v1 on every pass.
OTHER_BITS = RolloutView("diabetes", 1, "Progressing", weight=25, ref="diabetes:1", sha256="0" * 64)


@pytest.mark.parametrize("view", [None, OTHER_BITS], ids=["other-model", "same-number-other-bits"])
@pytest.mark.parametrize("supersede", [False, True], ids=["waits", "supersede-aborts"])
def test_a_version_waits_for_the_active_rollout(
    tmp_path: Path, registry: LocalRegistry, supersede: bool, view: RolloutView | None
) -> None:
    busy = _BusyEndpoint(tmp_path / "engine", registry, busy_polls=3, view=view)
    dispatcher = Dispatcher(
        TriggerStore(tmp_path / "trigger"), registry, busy, supersede=supersede, wait_interval_s=0
    )
    register(registry, tmp_path, stage="candidate")
    _watch(registry, dispatcher)
    assert busy.busy_polls == 0  # it looked until the endpoint was free...
    assert _events(tmp_path / "engine", "start", "end") == [("start", 1), ("end", 1)]
    # ...and asked the other rollout to stop only with supersede (once, not on every look).
    assert busy.aborts == (["superseded by diabetes version 1"] if supersede else [])


class _CheckingFirstRelease(ResumableDelivery):
    """While delivering v1 (a first release: no rollout in its state store yet), the watcher's
    thread accepts v2 — twice, as two polls would list it."""

    def __init__(self, *args: Any, dispatcher: list[Dispatcher], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dispatcher = dispatcher
        self.aborts: list[str] = []

    def deliver(self, version: ModelVersion, **kw: Any):
        if version.version == 1:
            assert self.current() is None  # what supersede sees: nothing to abort
            (dispatcher,) = self.dispatcher
            assert dispatcher.accept("diabetes", 2, "watch")
            assert not dispatcher.accept("diabetes", 2, "watch")
        return super().deliver(version, **kw)

    def abort(self, reason: str) -> None:
        self.aborts.append(reason)


def _v1_checked_while_v2_comes(
    tmp_path: Path, registry: LocalRegistry
) -> tuple[Dispatcher, _CheckingFirstRelease]:
    """A --supersede dispatcher with v1, the model's first release, accepted: its check
    accepts v2 (registered too) while it runs."""
    holder: list[Dispatcher] = []
    delivery = _CheckingFirstRelease(tmp_path / "engine", registry, dispatcher=holder)
    dispatcher = Dispatcher(
        TriggerStore(tmp_path / "trigger"), registry, delivery, supersede=True, wait_interval_s=0
    )
    holder.append(dispatcher)
    register(registry, tmp_path, stage="candidate")
    register(registry, tmp_path, stage="candidate")
    assert dispatcher.accept("diabetes", 1, "watch")
    return dispatcher, delivery


def test_supersede_during_a_first_release_check_says_the_newer_version_waits(
    tmp_path: Path, registry: LocalRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    # Was: v2, registered while v1 (the model's first release) was being checked, was accepted
    # and waited for the check — up to max_step_duration_s, 3 h — without a word in the log.
    dispatcher, delivery = _v1_checked_while_v2_comes(tmp_path, registry)
    with caplog.at_level(logging.INFO, logger="aml_pipelines.trigger.dispatch"):
        outcomes = dispatcher.drain("diabetes")
    waits = [r.getMessage() for r in caplog.records if " waits for " in r.getMessage()]
    assert waits == [
        "diabetes v2 waits for the first-release check of v1 to end: --supersede cannot cut it "
        "short (v1 serves all traffic, with no rollout to abort and nothing to fall back to); "
        "the check ends with a verdict, or after analysis.max_step_duration_s"
    ]
    assert delivery.aborts == []
    assert [(o.version, o.phase) for o in outcomes] == [(1, "Succeeded"), (2, "Succeeded")]


def test_a_registry_that_cannot_say_what_is_in_production_does_not_fail_the_accept(
    tmp_path: Path, registry: LocalRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The "waits for the first-release check" line asks the registry; failing, it is left out:
    # the version is still accepted (a webhook would otherwise answer 500 to a recorded event).
    dispatcher, _ = _v1_checked_while_v2_comes(tmp_path, registry)
    real, down = registry.find_by_tag, [TriggerError("registry unreachable")]

    def find_by_tag(*args: Any) -> Any:
        if dispatcher._delivering is not None and down:  # once: as v2 is accepted
            raise down.pop()
        return real(*args)

    monkeypatch.setattr(registry, "find_by_tag", find_by_tag)
    outcomes = dispatcher.drain("diabetes")
    assert [(o.version, o.phase) for o in outcomes] == [(1, "Succeeded"), (2, "Succeeded")]


def test_supersede_closes_older_pending_versions(
    tmp_path: Path, registry: LocalRegistry, delivery: ResumableDelivery
) -> None:
    dispatcher = Dispatcher(
        TriggerStore(tmp_path / "trigger"), registry, delivery, supersede=True, wait_interval_s=0
    )
    for _ in range(3):
        register(registry, tmp_path, stage="candidate")
    _watch(registry, dispatcher)
    assert _events(tmp_path / "engine", "start") == [("start", 3)]
    entries = dispatcher.store.load("diabetes").entries
    assert [(e.outcome, e.reason) for e in entries.values()] == [
        ("superseded", "superseded by version 3"),
        ("superseded", "superseded by version 3"),
        ("Succeeded", "all steps passed"),
    ]


def _supersede_dispatcher(tmp_path: Path, registry: LocalRegistry, delivery: Any) -> Dispatcher:
    return Dispatcher(
        TriggerStore(tmp_path / "trigger"), registry, delivery, supersede=True, wait_interval_s=0
    )


def _outcomes(dispatcher: Dispatcher) -> dict[int, tuple[str, str]]:
    entries = dispatcher.store.load("diabetes").entries
    return {v: (e.outcome, e.reason) for v, e in entries.items()}


@pytest.mark.parametrize("left", ["retried-after-an-error", "killed-while-packaged"])
def test_supersede_closes_a_started_version_whose_rollout_had_not_begun(
    tmp_path: Path, registry: LocalRegistry, left: str
) -> None:
    # Was: only pending versions were superseded, so v2 — started, its rollout not begun (the
    # metrics unreadable, nothing deployed; or a kill while it was packaged) — rolled out in
    # full once it could, then v3 after it.
    down = MetricsError("metrics unreadable, nothing deployed: Prometheus is unreachable")
    engine = _FailingDelivery(tmp_path / "engine", registry, errors=[down])
    dispatcher = _supersede_dispatcher(tmp_path, registry, engine)
    register(registry, tmp_path, stage="production")
    register(registry, tmp_path, stage="candidate")
    register(registry, tmp_path, stage="candidate")
    assert dispatcher.accept("diabetes", 2, "watch")
    if left == "retried-after-an-error":
        with pytest.raises(MetricsError):
            dispatcher.drain("diabetes")
    else:
        engine.errors.clear()
        dispatcher.store.update("diabetes", 2, lambda e: replace(e, step=Step.STARTED, attempts=1))
    assert dispatcher.store.load("diabetes").entries[2].step is Step.STARTED
    assert dispatcher.accept("diabetes", 3, "watch")
    phases = [(o.version, o.phase) for o in dispatcher.drain("diabetes")]
    assert phases == [(2, "superseded"), (3, "Succeeded")]
    assert _events(tmp_path / "engine", "start", "resume") == [("start", 3)]
    assert _outcomes(dispatcher)[2] == (
        "superseded",
        "superseded by version 3 before its rollout started",
    )
    assert [v.stage for v in registry.list_versions("diabetes")] == [
        "archived",
        "candidate",
        "production",
    ]


def test_supersede_aborts_a_started_rollout_found_in_the_state_store(
    tmp_path: Path, registry: LocalRegistry, delivery: ResumableDelivery
) -> None:
    # v3 was accepted while v2 was packaged (no rollout to abort yet), then the process was
    # killed mid-rollout of v2. Was: the restart resumed v2's rollout to its end, then v3's.
    dispatcher = _supersede_dispatcher(tmp_path, registry, delivery)
    register(registry, tmp_path, stage="production")
    v2 = register(registry, tmp_path, stage="candidate")
    register(registry, tmp_path, stage="candidate")
    assert dispatcher.accept("diabetes", 2, "watch")
    assert dispatcher.accept("diabetes", 3, "watch")
    dispatcher.store.update("diabetes", 2, lambda e: replace(e, step=Step.STARTED, attempts=1))
    delivery._progress(v2, 1, 1, 3)  # what the killed process left in the state store: active
    phases = [(o.version, o.phase) for o in dispatcher.drain("diabetes")]
    assert phases == [(2, "RolledBack"), (3, "Succeeded")]
    assert _events(tmp_path / "engine", "start", "resume") == [("resume", 2), ("start", 3)]
    assert _outcomes(dispatcher)[2] == ("RolledBack", "superseded by version 3")
    assert registry.get("diabetes", 2).tags["rollback_reason"] == "superseded by version 3"


def test_supersede_settles_a_started_version_whose_rollout_ended(
    tmp_path: Path, registry: LocalRegistry, delivery: ResumableDelivery
) -> None:
    # Killed after v2's rollout ended, before its tags: v2 serves. Superseded, the cursor would
    # say "nothing of it ran"; it is settled with its rollout's outcome instead.
    dispatcher = _supersede_dispatcher(tmp_path, registry, delivery)
    register(registry, tmp_path, stage="production")
    register(registry, tmp_path, stage="candidate")
    register(registry, tmp_path, stage="candidate")
    assert dispatcher.accept("diabetes", 2, "watch")
    dispatcher.store.update("diabetes", 2, lambda e: replace(e, step=Step.STARTED, attempts=1))
    delivery._save(
        model="diabetes", candidate=2, phase="Succeeded", reason="all steps passed",
        stable=1, weight=0, step=3,
    )  # fmt: skip
    assert dispatcher.accept("diabetes", 3, "watch")
    phases = [(o.version, o.phase) for o in dispatcher.drain("diabetes")]
    assert phases == [(2, "Succeeded"), (3, "Succeeded")]
    assert _events(tmp_path / "engine", "ended-before", "start") == [
        ("ended-before", 2),
        ("start", 3),
    ]


def test_supersede_keeps_a_started_first_release_which_may_already_serve(
    tmp_path: Path,
    registry: LocalRegistry,
    delivery: ResumableDelivery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # No production version: v1 is the model's first release, deployed to green with all
    # traffic before its check and tagged after it, with no rollout in the state store. Killed
    # in between it may serve all traffic: closing it as superseded would hide that. It is
    # delivered (checked), then v2; the log says why, once.
    dispatcher = _supersede_dispatcher(tmp_path, registry, delivery)
    register(registry, tmp_path, stage="candidate")
    register(registry, tmp_path, stage="candidate")
    assert dispatcher.accept("diabetes", 1, "watch")
    dispatcher.store.update("diabetes", 1, lambda e: replace(e, step=Step.STARTED, attempts=1))
    assert dispatcher.accept("diabetes", 2, "watch")
    with caplog.at_level(logging.INFO, logger="aml_pipelines.trigger.dispatch"):
        phases = [(o.version, o.phase) for o in dispatcher.drain("diabetes")]
    assert phases == [(1, "Succeeded"), (2, "Succeeded")]
    said = [r.getMessage() for r in caplog.records if "not superseded" in r.getMessage()]
    assert said == [
        "diabetes v1 is not superseded by v2: the model's first release, it may already serve "
        "all traffic (nothing to fall back to); it is checked, then v2 is rolled out against it"
    ]


class _CountingRegistry:
    """The real local registry, counting full listings (each re-hashes every version)."""

    def __init__(self, inner: LocalRegistry) -> None:
        self.inner = inner
        self.listings = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def list_versions(self, name: str, **options: Any) -> list[ModelVersion]:
        self.listings += 1
        return self.inner.list_versions(name, **options)


def test_a_quiet_registry_is_not_listed_on_every_poll(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher
) -> None:
    counting = _CountingRegistry(registry)
    watcher = Watcher(counting, "diabetes", dispatcher, required_tags=CANDIDATE)  # type: ignore[arg-type]
    register(registry, tmp_path, stage="candidate")
    assert watcher.poll() == [1]
    assert [watcher.poll() for _ in range(5)] == [[]] * 5
    assert counting.listings == 1
    register(registry, tmp_path, stage="candidate")
    assert watcher.poll() == [2]
    assert counting.listings == 2


def test_a_poll_that_fails_while_accepting_does_not_lose_the_version(
    tmp_path: Path,
    registry: LocalRegistry,
    dispatcher: Dispatcher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The running watcher logs a failed poll and polls again; the version listed in the failed
    # poll but never accepted must be accepted then, not taken as already listed.
    register(registry, tmp_path, stage="production")
    watcher = Watcher(registry, "diabetes", dispatcher, required_tags=CANDIDATE)
    assert watcher.poll() == []
    register(registry, tmp_path, stage="candidate")
    real_accept = dispatcher.store.accept_many  # what every accept writes through

    def disk_full(*args: Any) -> list[int]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dispatcher.store, "accept_many", disk_full)
    with pytest.raises(OSError, match="No space left"):
        watcher.poll()
    monkeypatch.setattr(dispatcher.store, "accept_many", real_accept)
    assert watcher.poll() == [2]


def test_a_version_the_registry_shows_delivered_is_skipped(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher
) -> None:
    # E.g. Event Grid redelivers an old event after the trigger's state folder was lost.
    register(registry, tmp_path, stage="production")
    assert dispatcher.accept("diabetes", 1, "event:old")
    # An outcome, so `watch --once` says what became of it (was: "no new version to deliver").
    assert [(o.phase, o.reason) for o in dispatcher.drain("diabetes")] == [
        ("skipped", "already delivered (stage=production)")
    ]
    entry = dispatcher.store.load("diabetes").entries[1]
    assert (entry.step, entry.outcome, entry.reason) == (
        Step.DONE,
        "skipped",
        "already delivered (stage=production)",
    )
    assert journal(tmp_path / "engine") == []


@pytest.mark.parametrize("source", ["event:e2", "watch"])
def test_a_candidate_withdrawn_before_its_delivery_is_skipped(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher, source: str
) -> None:
    # Archived in the Azure ML studio after it was accepted (by an event, or listed by the
    # watcher) and before its turn: the listings leave it out, but the dispatcher `get`s it,
    # which sees it, and it was rolled out. A person withdrew it.
    from typer.testing import CliRunner

    from rollout.cli import app

    register(registry, tmp_path, stage="production")
    register(registry, tmp_path, stage="candidate")
    assert dispatcher.accept("diabetes", 2, source)
    registry.withdraw("diabetes", 2)
    assert [(o.phase, o.reason) for o in dispatcher.drain("diabetes")] == [("skipped", WITHDRAWN)]
    entry = dispatcher.store.load("diabetes").entries[2]
    assert (entry.step, entry.outcome, entry.reason) == (Step.DONE, "skipped", WITHDRAWN)
    assert journal(tmp_path / "engine") == []
    assert registry.get("diabetes", 2).stage == "candidate"  # no tag written either
    shown = CliRunner().invoke(
        app,
        ["trigger", "status", "--state-dir", str(dispatcher.store.root)],
        env={"COLUMNS": "300"},  # rich's width: the reason on one line
    )
    assert shown.exit_code == 0, shown.output
    assert "skipped" in shown.output and WITHDRAWN in shown.output


def test_withdrawn_production_still_serves_and_a_started_delivery_is_not_cut(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher
) -> None:
    # Production archived in a clean-up still serves: a newer candidate is rolled out against
    # it, as before. A version withdrawn once its delivery started (its rollout may be live, or
    # a first release serve all traffic) is delivered, resumed, as any started one.
    register(registry, tmp_path, stage="production")
    register(registry, tmp_path, stage="candidate")
    registry.withdraw("diabetes", 1)
    assert dispatcher.accept("diabetes", 2, "event:e2")
    dispatcher.store.update("diabetes", 2, lambda e: replace(e, step=Step.STARTED, attempts=1))
    registry.withdraw("diabetes", 2)
    assert [o.phase for o in dispatcher.drain("diabetes")] == ["Succeeded"]
    assert _events(tmp_path / "engine", "start") == [("start", 2)]
    assert [registry.get("diabetes", v).stage for v in (1, 2)] == ["archived", "production"]


def test_a_withdrawn_version_supersedes_nothing(
    tmp_path: Path, registry: LocalRegistry, delivery: ResumableDelivery
) -> None:
    # With --supersede, v2 was closed `superseded by version 3`, then v3 skipped as withdrawn:
    # neither rolled out, for a version nobody is to deliver.
    dispatcher = Dispatcher(
        TriggerStore(tmp_path / "trigger"), registry, delivery, supersede=True, wait_interval_s=0
    )
    register(registry, tmp_path, stage="production")
    for _ in range(2):
        register(registry, tmp_path, stage="candidate")
    assert dispatcher.accept_many("diabetes", [(2, "watch"), (3, "watch")]) == [2, 3]
    registry.withdraw("diabetes", 3)
    outcomes = [(o.version, o.phase, o.reason) for o in dispatcher.drain("diabetes")]
    assert outcomes == [(2, "Succeeded", "all steps passed"), (3, "skipped", WITHDRAWN)]


def test_a_corrupted_model_is_closed_as_failed_not_retried(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher
) -> None:
    version = register(registry, tmp_path, stage="candidate")
    assert version.path is not None
    (version.path / "model.skops").write_bytes(b"tampered")
    assert dispatcher.accept("diabetes", 1, "watch")
    (outcome,) = dispatcher.drain("diabetes")
    assert outcome.phase == "Failed"
    assert "corrupted" in outcome.reason
    assert dispatcher.store.load("diabetes").entries[1].step is Step.DONE
    assert journal(tmp_path / "engine") == []


class _Pauses:
    """The dispatcher's `pause` and `clock` without the wait: records each delay and moves the
    clock on by it; registers the version at the `register_at`-th pause (it shows up in the
    registry meanwhile), or stops there."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        registry: LocalRegistry,
        tmp: Path,
        register_at: int = 0,
        stop_at: int = 0,
    ) -> None:
        self.registry, self.tmp = registry, tmp
        self.register_at, self.stop_at = register_at, stop_at
        self.delays: list[float] = []
        self.now = 0.0
        dispatcher.pause, dispatcher.clock = self, lambda: self.now

    def __call__(self, delay: float) -> bool:
        self.delays.append(delay)
        self.now += delay
        if len(self.delays) == self.register_at:
            register(self.registry, self.tmp, stage="candidate")
        return len(self.delays) == self.stop_at


@pytest.mark.parametrize(
    ("source", "register_at", "pauses", "phase", "reason"),
    [
        # Replication lag: the event arrived before the registry answered for the version.
        pytest.param("event:a", 2, [1, 2], "Succeeded", "", id="event-ahead-of-the-registry"),
        pytest.param(
            "event:a", 0, [1, 2, 4], MISSING, "after 4 reads over 7 s", id="never-registered"
        ),
        # The watcher listed it: not there now is no lag, it was removed. Not waited for.
        pytest.param("watch", 0, [], MISSING, "accepted again", id="listed-then-removed"),
    ],
)
def test_a_version_an_event_names_is_asked_for_again_before_it_is_closed_as_missing(
    tmp_path: Path,
    registry: LocalRegistry,
    dispatcher: Dispatcher,
    caplog: pytest.LogCaptureFixture,
    source: str,
    register_at: int,
    pauses: list[float],
    phase: str,
    reason: str,
) -> None:
    """With `serve` alone nothing else would accept a version closed as missing again but a new
    event, so a version read just before the registry had it was never delivered."""
    dispatcher.missing_retries_s = (1, 2, 4)
    paused = _Pauses(dispatcher, registry, tmp_path, register_at=register_at)
    assert dispatcher.accept("diabetes", 1, source)
    with caplog.at_level(logging.INFO):
        (outcome,) = dispatcher.drain("diabetes")
    assert paused.delays == pauses
    assert outcome.phase == phase
    assert reason in outcome.reason
    if pauses:
        assert "diabetes v1 is not in the registry (yet?); asking again in 1 s (1 of 3)" in (
            caplog.text
        )


def test_a_stop_while_waiting_for_a_missing_version_leaves_it_pending(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher
) -> None:
    paused = _Pauses(dispatcher, registry, tmp_path, stop_at=1)  # a signal during the wait
    assert dispatcher.accept("diabetes", 1, "event:a")
    assert dispatcher.drain("diabetes") == []
    assert paused.delays == [1.0]
    entry = dispatcher.store.load("diabetes").entries[1]
    assert entry.step is Step.PENDING
    # In the cursor, where `trigger status` (another process) reads it: was no reason at all.
    assert entry.reason == "not in the registry (yet?) when read; asking again in 1 s (1 of 7)"


@pytest.mark.parametrize("again", ["event", "watch"])
def test_a_version_missing_when_its_turn_came_is_delivered_once_registered(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher, again: str
) -> None:
    """An event ahead of the registry (or naming a version never registered) closes the version
    as missing, not Failed for good: was, the version registered after it never delivered."""
    _Pauses(dispatcher, registry, tmp_path)
    assert dispatcher.accept("diabetes", 1, "event:a")
    (outcome,) = dispatcher.drain("diabetes")
    assert outcome.phase == MISSING
    assert "accepted again once registered" in outcome.reason
    assert dispatcher.store.load("diabetes").entries[1].outcome == MISSING

    register(registry, tmp_path, stage="candidate")
    if again == "event":
        assert dispatcher.accept("diabetes", 1, "event:c")
        dispatcher.drain("diabetes")
    else:
        _watch(registry, dispatcher)
    entry = dispatcher.store.load("diabetes").entries[1]
    assert (entry.step, entry.outcome) == (Step.DONE, "Succeeded")
    assert registry.get("diabetes", 1).stage == "production"
    # Delivered, it is known for good: the same event again is a duplicate.
    assert not dispatcher.accept("diabetes", 1, "event:c")


def test_a_version_awaited_from_the_registry_holds_up_neither_the_endpoint_nor_other_models(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher
) -> None:
    """Was: the worker held the delivery lock through every read of a version an event named
    and the registry lacked (8 reads over ~2 min), and delivered nothing else meanwhile."""
    dispatcher.missing_retries_s = (30.0, 30.0)
    assert dispatcher.accept("fraud", 1, "event:a")  # not in the registry (yet)
    register(registry, tmp_path, stage="candidate")
    assert dispatcher.accept("diabetes", 1, "event:b")
    worker = DeliveryWorker(dispatcher, lambda: ["fraud", "diabetes"])
    with _running(worker):
        _wait_until(lambda: _step(dispatcher) is Step.DONE, dispatcher)
        assert _step(dispatcher) is Step.DONE
        # Free between the reads: another process on this state folder can deliver meanwhile
        # (once the worker has let go of diabetes v1, closed just before it does).
        other = TriggerStore(tmp_path / "trigger").lock("deliver", "another trigger")

        def free() -> bool:
            with contextlib.suppress(TriggerError), other.held(blocking=False):
                return True
            return False

        _wait_until(free, dispatcher)
        assert free()
    fraud = dispatcher.store.load("fraud").entries[1]
    assert (fraud.step, fraud.outcome) == (Step.PENDING, "")  # still awaited, not given up


def test_the_worker_reads_an_awaited_version_again_when_due_unwoken(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher
) -> None:
    # Reads enough to outlast the waits below on a loaded box: how many is not the point.
    dispatcher.missing_retries_s = (0.05,) * 400
    assert dispatcher.accept("fraud", 1, "event:a")
    worker = DeliveryWorker(dispatcher, lambda: ["fraud"])

    def entry() -> Entry:
        return dispatcher.store.load("fraud").entries[1]

    # Waited for in the cursor, not `next_read_in()`: the drain drops the model's due time as
    # each turn begins and sets it again after a miss, so "None" came mid-turn, the version
    # still pending, and the test stopped the worker before its delivery (3 of 6 runs).
    with _running(worker):
        _wait_until(lambda: entry().reason.startswith("not in the registry"), dispatcher)
        register(registry, tmp_path, "fraud", stage="candidate")  # replication caught up
        _wait_until(lambda: entry().step is Step.DONE, dispatcher)
    fraud = entry()
    assert (fraud.step, fraud.outcome) == (Step.DONE, "Succeeded")


def test_an_awaited_version_another_process_delivered_is_no_longer_awaited(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher
) -> None:
    # Still awaited, it would be due forever: the worker's wait would end at once, every time.
    assert dispatcher.accept("diabetes", 1, "event:a")
    assert dispatcher.drain("diabetes", wait=False) == []
    assert dispatcher.next_read_in() is not None
    register(registry, tmp_path, stage="candidate")
    other = Dispatcher(dispatcher.store, registry, dispatcher.delivery, wait_interval_s=0)
    (delivered,) = other.drain("diabetes")  # another trigger on the state folder
    assert delivered.phase == "Succeeded"
    assert dispatcher.drain("diabetes", wait=False) == []
    assert dispatcher.next_read_in() is None


def test_with_supersede_a_newer_version_does_not_wait_for_an_awaited_one(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher
) -> None:
    dispatcher.supersede = True
    _Pauses(dispatcher, registry, tmp_path)
    assert dispatcher.accept("diabetes", 1, "event:a")
    assert dispatcher.drain("diabetes", wait=False) == []  # not there: read again in 1 s
    register(registry, tmp_path, stage="candidate")
    register(registry, tmp_path, stage="candidate")
    assert dispatcher.accept("diabetes", 2, "event:b")
    outcomes = dispatcher.drain("diabetes", wait=False)
    assert [(o.version, o.phase) for o in outcomes] == [(1, "superseded"), (2, "Succeeded")]
    assert dispatcher.next_read_in() is None


@pytest.mark.parametrize(
    ("production", "wait", "outcomes", "pauses", "due"),
    [
        # Nothing of it deployed (no rollout in the state store): closed as any started one
        # whose rollout had not begun, without waiting for its reads.
        pytest.param(
            True, True, [(2, "superseded"), (3, "Succeeded")], [], None, id="superseded-at-once"
        ),
        pytest.param(
            True, False, [(2, "superseded"), (3, "Succeeded")], [], None, id="worker-superseded"
        ),
        # A first release, which may serve all traffic: kept, read again, then closed missing.
        pytest.param(
            False, True, [(1, "missing"), (2, "Succeeded")], [1, 2, 4], None, id="first-release"
        ),
        pytest.param(False, False, [], [], 1.0, id="worker-first-release-waits-for-its-read"),
    ],
)
def test_with_supersede_a_started_version_gone_from_the_registry_is_not_read_in_a_loop(
    tmp_path: Path,
    registry: LocalRegistry,
    dispatcher: Dispatcher,
    monkeypatch: pytest.MonkeyPatch,
    production: bool,
    wait: bool,
    outcomes: list[tuple[int, str]],
    pauses: list[float],
    due: float | None,
) -> None:
    # Was: v3 not awaited, the drain saw v2 as ready at once (0 s), while its delivery returned
    # at "v2's next read not due" before it reached the supersede check: no pause between turns,
    # each a registry read (an Azure ML call) — ~11,000 reads in 7 s for the ~2 min of v2's reads.
    dispatcher.supersede = True
    dispatcher.missing_retries_s = (1, 2, 4)
    paused = _Pauses(dispatcher, registry, tmp_path)
    if production:
        register(registry, tmp_path, stage="production")
    register(registry, tmp_path, stage="candidate")
    register(registry, tmp_path, stage="candidate")
    gone, newer = (2, 3) if production else (1, 2)
    real_get, gets = registry.get, []

    def removed(name: str, version: int) -> ModelVersion:
        gets.append(version)
        if len(gets) == 200:  # the fake clock stands still in a spin: ends it
            dispatcher.stop.set()
        if version == gone:
            raise ModelNotFound(f"{name}:{version} not found")
        return real_get(name, version)

    monkeypatch.setattr(registry, "get", removed)
    assert dispatcher.accept("diabetes", gone, "event:a")
    dispatcher.store.update("diabetes", gone, lambda e: replace(e, step=Step.STARTED, attempts=1))
    assert dispatcher.accept("diabetes", newer, "event:b")
    found = dispatcher.drain("diabetes", wait=wait)
    assert len(gets) <= 40  # every read of the drain, listings' included (a spin: 200)
    assert [(o.version, o.phase) for o in found] == outcomes
    assert paused.delays == pauses
    assert dispatcher.next_read_in() == due
    if production:
        assert found[0].reason == "superseded by version 3 before its rollout started"
        assert _events(tmp_path / "engine", "start", "resume") == [("start", 3)]


def test_only_the_last_versions_closed_missing_are_kept_in_the_cursor(
    tmp_path: Path,
    registry: LocalRegistry,
    dispatcher: Dispatcher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every other entry stands for a version the registry held (the cursor grows with the
    registry); one closed missing stands for a version number an event named, any number, and
    remembers nothing a trigger needs (it is accepted again when named)."""
    monkeypatch.setattr(store_module, "MISSING_KEPT", 2)
    register(registry, tmp_path, stage="candidate")
    assert dispatcher.accept_many("diabetes", [(v, "watch") for v in range(1, 6)])
    outcomes = dispatcher.drain("diabetes")
    assert [o.phase for o in outcomes] == ["Succeeded"] + [MISSING] * 4
    entries = dispatcher.store.load("diabetes").entries
    assert {v: e.outcome for v, e in entries.items()} == {1: "Succeeded", 4: MISSING, 5: MISSING}


class _FailingDelivery(ResumableDelivery):
    """Fails its deliveries with `errors`, one each, then works (metrics down for a while)."""

    def __init__(self, *args: Any, errors: list[Exception], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.errors = errors

    def deliver(self, version: ModelVersion, **kw: Any):
        if self.errors:
            raise self.errors.pop(0)
        return super().deliver(version, **kw)


def _step(dispatcher: Dispatcher) -> Step:
    return dispatcher.store.load("diabetes").entries[1].step


@contextlib.contextmanager
def _running(worker: DeliveryWorker) -> Iterator[None]:
    """The worker's thread started, then stopped and joined (up to 10 s) whatever happens."""
    worker.start()
    try:
        yield
    finally:
        worker.dispatcher.stop.set()
        worker.join(10)


def _wait_until(done: Callable[[], bool], dispatcher: Dispatcher) -> None:
    """Until `done()`, for up to ~10 s (the worker runs on its own thread)."""
    for _ in range(1000):
        if done():
            return
        dispatcher.stop.wait(0.01)


class _EndlessRollout(ResumableDelivery):
    """A rollout that runs until the test ends (the engine's deliver never looks at `stop`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.running, self.released = threading.Event(), threading.Event()

    def deliver(self, version: ModelVersion, **kw: Any):
        self.running.set()
        self.released.wait(60)
        return super().deliver(version, **kw)


def test_a_stopped_watcher_returns_within_seconds_mid_rollout_leaving_it_started(
    tmp_path: Path, registry: LocalRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: SIGTERM mid-rollout, `watch` waited a whole --interval for the delivery thread (up to
    # a day) while the rollout went on shifting traffic, till Kubernetes or systemd killed it.
    monkeypatch.setattr(watcher_module, "STOP_WAIT_S", 0.05)
    delivery = _EndlessRollout(tmp_path / "engine", registry)
    dispatcher = Dispatcher(TriggerStore(tmp_path / "trigger"), registry, delivery)
    register(registry, tmp_path, stage="candidate")
    watcher = Watcher(registry, "diabetes", dispatcher, required_tags=CANDIDATE, interval_s=60)
    run = threading.Thread(target=watcher.run, daemon=True)
    try:
        run.start()
        assert delivery.running.wait(10)
        watcher.stop.set()  # what the SIGTERM handler does
        run.join(5)
        assert not run.is_alive(), "the watcher waited for the rollout"
        assert _step(dispatcher) is Step.STARTED  # cut like a crash: resumed on the next start
    finally:
        delivery.released.set()


def test_worker_retries_a_transient_failure_as_a_resume(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    # A transient error (a network blip), then it works.
    flaky = _FailingDelivery(
        tmp_path / "engine", registry, errors=[ConnectionError("endpoint unreachable")]
    )
    dispatcher = Dispatcher(
        TriggerStore(tmp_path / "trigger"), registry, flaky, wait_interval_s=0.01
    )
    register(registry, tmp_path, stage="candidate")
    worker = DeliveryWorker(dispatcher, lambda: ["diabetes"])
    assert dispatcher.accept("diabetes", 1, "watch")
    with _running(worker):
        _wait_until(lambda: _step(dispatcher) is Step.DONE, dispatcher)
    entry = dispatcher.store.load("diabetes").entries[1]
    assert (entry.step, entry.outcome, entry.attempts) == (Step.DONE, "Succeeded", 2)
    assert (worker.failures, str(worker.last_error)) == (1, "endpoint unreachable")


def _watch_until_delivered(
    watcher: Watcher, dispatcher: Dispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    """Run `watcher` on its thread, its log in `caplog`, until version 1 is delivered."""
    thread = threading.Thread(target=watcher.run)
    with caplog.at_level(logging.DEBUG, logger="aml_pipelines.trigger.watcher"):
        thread.start()
        try:
            _wait_until(lambda: 1 in dispatcher.store.load("diabetes").entries, dispatcher)
            _wait_until(lambda: _step(dispatcher) is Step.DONE, dispatcher)
        finally:
            watcher.stop.set()
            thread.join(10)


def _delivered_after_seven_errors(
    tmp_path: Path,
    registry: LocalRegistry,
    caplog: pytest.LogCaptureFixture,
    errors: list[Exception],
) -> tuple[DeliveryWorker, list[str]]:
    """Version 1 delivered through `errors` (seven), the 4th 10 min after the 3rd, its log in
    `caplog`: the worker, and `trigger status`'s reason after the first error."""
    failing = _FailingDelivery(tmp_path / "engine", registry, errors=errors)
    dispatcher = Dispatcher(
        TriggerStore(tmp_path / "trigger"), registry, failing, wait_interval_s=0.01
    )
    register(registry, tmp_path, stage="candidate")
    worker = DeliveryWorker(dispatcher, lambda: ["diabetes"])
    ticks = iter([0.0, 1.0, 2.0, 700.0, 701.0, 702.0, 703.0])  # a reminder after 10 min
    worker.clock = lambda: next(ticks)
    reasons: list[str] = []
    assert dispatcher.accept("diabetes", 1, "watch")
    with (
        caplog.at_level(logging.DEBUG, logger="aml_pipelines.trigger.dispatch"),
        _running(worker),
    ):
        _wait_until(lambda: worker.failures >= 1, dispatcher)
        reasons.append(dispatcher.store.load("diabetes").entries[1].reason)
        _wait_until(lambda: _step(dispatcher) is Step.DONE, dispatcher)
    entry = dispatcher.store.load("diabetes").entries[1]
    assert (entry.step, entry.outcome, entry.attempts) == (Step.DONE, "Succeeded", 8)
    return worker, reasons


def test_a_delivery_retried_after_the_same_error_says_it_once_and_status_tells_why(
    tmp_path: Path, registry: LocalRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    # Was: metrics nobody could read (a new rollout probes them before deploying anything) cost
    # four log lines per retry, forever — "resuming the delivery", "packaged", "first release,
    # to green with all traffic" (nothing went there) and "stopped" — 1,440 lines an hour at the
    # default 10 s, and `trigger status` showed the version `started` with no reason.
    down = "metrics unreadable, nothing deployed: Prometheus at http://p:9090 is unreachable"
    errors = [MetricsError(down) for _ in range(5)] + [MetricsError(f"{down} (timeout)")] * 2
    worker, reasons = _delivered_after_seven_errors(tmp_path, registry, caplog, errors)
    assert worker.failures == 7
    assert reasons == [f"waits, to be retried: {down}"]
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [line.split(": metrics")[0] for line in said] == [
        "delivery of diabetes stopped",  # the first time
        "delivery of diabetes still stopped",  # 10 min on, the same
        "delivery of diabetes stopped",  # another error
    ]
    assert said[0].endswith(
        "retrying every 0.01 s, quietly (said again every 10 min while it lasts)"
    )


@pytest.mark.parametrize("closed_by", ["a-permanent-error", "another-process"])
def test_a_version_retried_after_an_error_is_forgotten_once_closed(
    tmp_path: Path, registry: LocalRegistry, closed_by: str
) -> None:
    # Was: the version stayed in the dispatcher's retry memory (`_failing`) for as long as the
    # process ran, one entry per version that failed once and then for good.
    errors: list[Exception] = [MetricsError("Prometheus is unreachable")]
    if closed_by == "a-permanent-error":
        errors.append(IntegrityError("model.skops does not match its sha256"))
    failing = _FailingDelivery(tmp_path / "engine", registry, errors=errors)
    dispatcher = Dispatcher(
        TriggerStore(tmp_path / "trigger"), registry, failing, wait_interval_s=0
    )
    register(registry, tmp_path, stage="candidate")
    assert dispatcher.accept("diabetes", 1, "watch")
    with pytest.raises(MetricsError):
        dispatcher.drain("diabetes")
    assert dispatcher._failing == {("diabetes", 1)}  # retried quietly while it stays open
    if closed_by == "another-process":
        TriggerStore(tmp_path / "trigger").update(
            "diabetes", 1, lambda e: replace(e, step=Step.DONE, outcome="Succeeded")
        )
    dispatcher.drain("diabetes")
    assert _step(dispatcher) is Step.DONE
    assert dispatcher._failing == set()


class _UnreachableRegistry(_CountingRegistry):
    """The real local registry behind a network that fails the first polls with `errors`."""

    def __init__(self, inner: LocalRegistry, errors: list[Exception]) -> None:
        super().__init__(inner)
        self.errors = errors

    def latest(self, name: str, **options: Any) -> ModelVersion | None:
        if self.errors:
            raise self.errors.pop(0)
        return self.inner.latest(name, **options)


def test_a_poll_failing_with_the_same_error_says_it_once(
    tmp_path: Path,
    registry: LocalRegistry,
    dispatcher: Dispatcher,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Was: one warning per poll for as long as the registry was unreachable — 360 lines an
    # hour at the default 10 s — where the delivery worker says a repeated error once.
    down = "list diabetes: Azure ML answered 503: Service Unavailable"
    errors: list[Exception] = [RegistryError(down) for _ in range(5)]
    errors += [RegistryError(f"{down} (again)")] * 2
    unreachable = _UnreachableRegistry(registry, errors)
    register(registry, tmp_path, stage="candidate")
    watcher = Watcher(
        unreachable,  # type: ignore[arg-type]
        "diabetes",
        dispatcher,
        required_tags=CANDIDATE,
        interval_s=0.01,
    )
    ticks = iter([0.0, 1.0, 2.0, 700.0, 701.0, 702.0, 703.0])  # a reminder after 10 min
    watcher.clock = lambda: next(ticks)
    _watch_until_delivered(watcher, dispatcher, caplog)
    assert registry.get("diabetes", 1).stage == "production"  # delivered once it answered
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [line.split(": list")[0] for line in said] == [
        "polling the registry for diabetes failed",  # the first time
        "polling the registry for diabetes still fails",  # 10 min on, the same
        "polling the registry for diabetes failed",  # another error
    ]
    assert said[0].endswith("polling again every 0.01 s, quietly (said again every 10 min)")


@pytest.mark.parametrize(
    ("content", "why"),
    [
        pytest.param("{", "Expecting property name", id="not-json"),
        # These were an AttributeError (or a bad value let through, failing later, elsewhere):
        # a traceback from `trigger status`, uvicorn's bare 500, the worker stopped for all.
        pytest.param('{"model": "m", "versions": null}', "no versions", id="versions-null"),
        pytest.param('{"model": "m", "versions": [1]}', "no versions", id="versions-a-list"),
        pytest.param('{"model": "m"}', "no versions", id="no-versions"),
        pytest.param('["m"]', "no versions", id="not-an-object"),
        pytest.param('{"model": "m", "versions": {"1": null}}', "version 1", id="entry-null"),
        pytest.param(
            '{"model": "m", "versions": {"x": {"step": "pending"}}}', "version 'x'", id="key"
        ),
        pytest.param(
            '{"model": "m", "versions": {"0": {"step": "pending"}}}', "version '0'", id="key-0"
        ),
        pytest.param(
            '{"model": "m", "versions": {"1": {"step": "gone"}}}', "version 1", id="bad-step"
        ),
        pytest.param(
            '{"model": "m", "versions": {"1": {"step": "started", "attempts": "2"}}}',
            "version 1: attempts",
            id="attempts-a-string",
        ),
        pytest.param(
            '{"model": "m", "versions": {"1": {"step": "started", "attempts": true}}}',
            "version 1: attempts",
            id="attempts-a-bool",
        ),
        pytest.param(
            '{"model": "m", "versions": {"1": {"step": "done", "reason": null}}}',
            "version 1: reason",
            id="reason-null",
        ),
        pytest.param(
            '{"model": "m", "versions": {"1": {"step": "pending", "when": 3}}}',
            "version 1",
            id="unknown-field",
        ),
    ],
)
def test_a_damaged_cursor_is_a_trigger_error_naming_the_file(
    tmp_path: Path, content: str, why: str
) -> None:
    store = TriggerStore(tmp_path)
    store.cursor_path("m").write_text(content)
    with pytest.raises(TriggerError) as raised:
        store.load("m")
    assert str(store.cursor_path("m")) in str(raised.value)
    assert why in str(raised.value)


@pytest.mark.parametrize(
    ("content", "mended"),
    [
        # The listing of models cannot read it: no model's delivery can go on, till it is mended.
        pytest.param("{", False, id="not-json-stops-every-model"),
        # Its model is known, its versions not: only that model waits (was: an AttributeError
        # stopped every model's deliveries, with a traceback every retry).
        pytest.param('{"model": "other", "versions": null}', True, id="versions-null-stops-own"),
    ],
)
def test_worker_survives_an_unreadable_cursor_and_delivers_once_it_is_mended(
    tmp_path: Path,
    registry: LocalRegistry,
    caplog: pytest.LogCaptureFixture,
    content: str,
    mended: bool,
) -> None:
    # Was: a cursor file that could not be read (of any model) ended the worker thread with a
    # traceback, and `serve` went on answering 200 to events nobody would ever deliver.
    dispatcher = Dispatcher(
        TriggerStore(tmp_path / "trigger"),
        registry,
        ResumableDelivery(tmp_path / "engine", registry),
        wait_interval_s=0.01,
    )
    register(registry, tmp_path, stage="candidate")
    assert dispatcher.accept("diabetes", 1, "event:e1")
    bad = tmp_path / "trigger" / "cursor-other.json"
    bad.write_text(content)
    worker = DeliveryWorker(dispatcher, dispatcher.store.models)
    with (
        caplog.at_level(logging.WARNING, logger="aml_pipelines.trigger.dispatch"),
        _running(worker),
    ):
        _wait_until(lambda: worker.failures >= 2, dispatcher)
        if not mended:
            assert dispatcher.store.load("diabetes").entries[1].step is Step.PENDING
            bad.unlink()  # mended
        _wait_until(lambda: _step(dispatcher) is Step.DONE, dispatcher)
    assert dispatcher.store.load("diabetes").entries[1].outcome == "Succeeded"
    assert str(bad) in str(worker.last_error)
    said = caplog.records[0]
    what = "deliveries" if not mended else "delivery of other"
    assert said.getMessage().startswith(f"{what} stopped: "), said.getMessage()
    assert str(bad) in said.getMessage()
    assert said.exc_info is None  # a known error: one line, no traceback


def test_a_version_older_than_production_is_skipped(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher
) -> None:
    # Event Grid may deliver v1's event after v2 was already promoted: never downgrade.
    register(registry, tmp_path, stage="candidate")
    register(registry, tmp_path, stage="production")
    assert dispatcher.accept("diabetes", 1, "event:late")
    assert [o.phase for o in dispatcher.drain("diabetes")] == ["skipped"]
    entry = dispatcher.store.load("diabetes").entries[1]
    assert (entry.outcome, entry.reason) == ("skipped", "older than the production version 2")
    assert journal(tmp_path / "engine") == []


def test_a_started_version_overtaken_by_a_newer_production_is_not_rolled_out(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher
) -> None:
    # Crashed while packaging v1; meanwhile another trigger promoted v2. Resuming v1 would
    # downgrade production.
    register(registry, tmp_path, stage="candidate")
    assert dispatcher.accept("diabetes", 1, "watch")
    dispatcher.store.update("diabetes", 1, lambda e: replace(e, step=Step.STARTED, attempts=1))
    register(registry, tmp_path, stage="production")
    assert [o.phase for o in dispatcher.drain("diabetes")] == ["skipped"]
    entry = dispatcher.store.load("diabetes").entries[1]
    assert (entry.outcome, entry.reason) == ("skipped", "older than the production version 2")
    assert journal(tmp_path / "engine") == []


def test_worker_resumes_a_crashed_rollout_of_any_model_before_pending_ones(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    # `trigger serve` watches every model on one endpoint. zeta was mid-rollout when the process
    # was killed; alpha (drained first by name) has a pending version that waits for zeta's active
    # rollout, which only this worker can resume: zeta must go first or nothing ever moves.
    engine = ResumableDelivery(tmp_path / "engine", registry)
    dispatcher = Dispatcher(
        TriggerStore(tmp_path / "trigger"), registry, engine, wait_interval_s=0.01
    )
    zeta = register(registry, tmp_path, "zeta", stage="candidate")
    register(registry, tmp_path, "alpha", stage="candidate")
    assert dispatcher.accept("zeta", 1, "event:z1")
    dispatcher.store.update("zeta", 1, lambda e: replace(e, step=Step.STARTED, attempts=1))
    engine._progress(zeta, None, 1, 3)  # the rollout state the killed process left: active
    assert dispatcher.accept("alpha", 1, "event:a1")
    worker = DeliveryWorker(dispatcher, dispatcher.store.models)

    def steps() -> dict[str, Step]:
        return {m: dispatcher.store.load(m).entries[1].step for m in ("alpha", "zeta")}

    with _running(worker):
        _wait_until(lambda: set(steps().values()) == {Step.DONE}, dispatcher)
    assert steps() == {"alpha": Step.DONE, "zeta": Step.DONE}
    events = [(e["event"], e["version"]) for e in journal(tmp_path / "engine")]
    assert events[0] == ("resume", 1) and ("start", 1) in events


@pytest.mark.parametrize("hook", ["write_json", "rename"])
def test_a_poll_during_a_registration_never_loses_the_version(
    tmp_path: Path,
    registry: LocalRegistry,
    dispatcher: Dispatcher,
    monkeypatch: pytest.MonkeyPatch,
    hook: str,
) -> None:
    # A poll at any point of register() (here: at every file write or rename it makes) must not
    # see the version without its tags: the watcher would count it as listed and never look again.
    register(registry, tmp_path, stage="production")
    watcher = Watcher(registry, "diabetes", dispatcher, required_tags=CANDIDATE)
    assert watcher.poll() == []
    polled: list[list[int]] = []
    if hook == "write_json":
        real_write = local_registry.write_json

        def write_then_poll(path: Path, payload: object) -> None:
            real_write(path, payload)
            polled.append(watcher.poll())

        monkeypatch.setattr(local_registry, "write_json", write_then_poll)
    else:
        real_rename = Path.rename

        def rename_then_poll(self: Path, target: Any) -> Path:
            moved = real_rename(self, target)
            polled.append(watcher.poll())
            return moved

        monkeypatch.setattr(Path, "rename", rename_then_poll)
    register(registry, tmp_path, stage="candidate")
    monkeypatch.undo()
    assert polled  # the hook ran inside register()
    accepted = [v for batch in polled for v in batch] + watcher.poll()
    assert accepted == [2]


def _damage(registry: LocalRegistry, version: int) -> None:
    path = registry.get("diabetes", version).path
    assert path is not None
    (path / "model.skops").write_bytes(b"bit rot")


def test_a_damaged_old_version_does_not_block_new_ones(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher
) -> None:
    register(registry, tmp_path, stage="archived")
    register(registry, tmp_path, stage="production")
    _damage(registry, 1)
    register(registry, tmp_path, stage="candidate")
    _watch(registry, dispatcher)
    assert _events(tmp_path / "engine", "start", "end") == [("start", 3), ("end", 3)]
    assert registry.get("diabetes", 3).stage == "production"


def test_a_version_whose_baseline_cannot_be_read_closes_failed(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher
) -> None:
    # The no-downgrade check needs the production version; damaged, it raises IntegrityError.
    # Retrying cannot help: the version is closed Failed with the reason, not retried forever.
    register(registry, tmp_path, stage="production")
    register(registry, tmp_path, stage="candidate")
    _damage(registry, 1)
    assert dispatcher.accept("diabetes", 2, "event:e2")
    [outcome] = dispatcher.drain("diabetes")
    entry = dispatcher.store.load("diabetes").entries[2]
    assert (outcome.phase, entry.step, entry.outcome) == ("Failed", Step.DONE, "Failed")
    assert "diabetes:1 is corrupted" in entry.reason
    assert journal(tmp_path / "engine") == []


def test_with_supersede_a_withdrawn_newer_version_leaves_an_awaited_one_awaited(
    tmp_path: Path,
    registry: LocalRegistry,
    dispatcher: Dispatcher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Was: the drain took any newer open version for one that supersedes (no read to wait for),
    # the delivery did not (v3 is withdrawn): v2's reads were spent back to back, and it was
    # closed `missing` "after 8 reads over 127 s" within milliseconds.
    dispatcher.supersede = True
    pauses = _Pauses(dispatcher, registry, tmp_path)
    register(registry, tmp_path, stage="production")
    register(registry, tmp_path, stage="candidate")
    register(registry, tmp_path, stage="candidate")
    registry.withdraw("diabetes", 3)
    real_get = registry.get

    def lagging(name: str, version: int) -> ModelVersion:  # the event ran ahead of the registry
        if version == 2:
            raise ModelNotFound(f"{name}:{version} not found")
        return real_get(name, version)

    monkeypatch.setattr(registry, "get", lagging)
    assert dispatcher.accept_many("diabetes", [(2, "event:a"), (3, "watch")]) == [2, 3]
    assert dispatcher.drain("diabetes", wait=False) == []
    assert dispatcher.store.load("diabetes").entries[2].step is Step.PENDING
    assert dispatcher.next_read_in() == 1.0 and pauses.delays == []


class _ShowsTheWait(ResumableDelivery):
    """Sets `waiting` once it has shown a rollout of another model than `mine` active."""

    def __init__(self, *args: Any, mine: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mine = mine
        self.waiting = threading.Event()

    def current(self) -> RolloutView | None:
        view = super().current()
        if view is not None and view.active and view.model != self.mine:
            self.waiting.set()
        return view


def test_two_triggers_on_one_state_folder_do_not_deadlock_over_a_rollout_to_resume(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    # Was: the trigger of `other` waited for diabetes v2's rollout (left active by a kill)
    # holding the state folder's deliver lock, on which the trigger of diabetes — the only one
    # that can resume v2 — blocked for ever: the endpoint stayed split, with no controller.
    engine = tmp_path / "engine"
    register(registry, tmp_path, stage="production")
    v2 = register(registry, tmp_path, stage="candidate")
    register(registry, tmp_path, "other", stage="candidate")
    shows = _ShowsTheWait(engine, registry, mine="other")
    of_other = Dispatcher(TriggerStore(tmp_path / "trigger"), registry, shows, wait_interval_s=0.01)
    of_diabetes = Dispatcher(
        TriggerStore(tmp_path / "trigger"),
        registry,
        ResumableDelivery(engine, registry),
        wait_interval_s=0.01,
    )
    assert of_diabetes.accept("diabetes", 2, "watch")
    of_diabetes.store.update("diabetes", 2, lambda e: replace(e, step=Step.STARTED, attempts=1))
    shows._progress(v2, 1, 1, 3)  # what the killed process left in the state store: active
    assert of_other.accept("other", 1, "watch")
    outcomes: dict[str, list[tuple[int, str]]] = {}

    def drain(dispatcher: Dispatcher, model: str) -> None:
        outcomes[model] = [(o.version, o.phase) for o in dispatcher.drain(model)]

    threads = [
        threading.Thread(target=drain, args=(of_other, "other"), daemon=True),
        threading.Thread(target=drain, args=(of_diabetes, "diabetes"), daemon=True),
    ]
    threads[0].start()
    assert shows.waiting.wait(10)  # other v1 waits for diabetes v2's rollout...
    threads[1].start()  # ...which only this trigger resumes
    for thread in threads:
        thread.join(10)
    deadlocked = [thread.is_alive() for thread in threads]
    of_other.stop.set()  # the old code: lets go of the lock, then both threads end
    of_diabetes.stop.set()
    for thread in threads:
        thread.join(10)
    assert deadlocked == [False, False]
    assert outcomes == {"diabetes": [(2, "Succeeded")], "other": [(1, "Succeeded")]}
    assert _events(engine, "start", "resume") == [("resume", 2), ("start", 1)]


@pytest.mark.parametrize(
    ("newer", "pauses", "outcomes"),
    [
        pytest.param(
            "never-registered",
            [1, 2, 4],
            [(2, "Succeeded"), (3, MISSING)],
            id="never-registered-supersedes-nothing",
        ),
        pytest.param(
            "listed-then-removed",
            [],
            [(2, "Succeeded"), (3, MISSING)],
            id="removed-supersedes-nothing",
        ),
        pytest.param(
            "corrupted", [], [(2, "Succeeded"), (3, "Failed")], id="corrupted-supersedes-nothing"
        ),
        pytest.param(
            "ahead-of-the-registry",
            [1, 2],
            [(2, "superseded"), (3, "Succeeded")],
            id="supersedes-once-registered",
        ),
    ],
)
def test_with_supersede_a_newer_version_supersedes_only_once_the_registry_holds_it_sound(
    tmp_path: Path,
    registry: LocalRegistry,
    dispatcher: Dispatcher,
    newer: str,
    pauses: list[float],
    outcomes: list[tuple[int, str]],
) -> None:
    # Was: v2 was closed `superseded by version 3` before v3 was ever read, then v3 closed
    # `missing` (or Failed): nothing delivered, and v2 never again (it is done in the cursor).
    dispatcher.supersede = True
    dispatcher.missing_retries_s = (1, 2, 4)
    ahead = newer == "ahead-of-the-registry"  # v3 registered at the second pause
    paused = _Pauses(dispatcher, registry, tmp_path, register_at=2 if ahead else 0)
    register(registry, tmp_path, stage="production")
    register(registry, tmp_path, stage="candidate")
    if newer == "corrupted":
        register(registry, tmp_path, stage="candidate")
        _damage(registry, 3)
    source = "watch" if newer in ("listed-then-removed", "corrupted") else "event:e3"
    assert dispatcher.accept_many("diabetes", [(2, "watch"), (3, source)]) == [2, 3]
    assert [(o.version, o.phase) for o in dispatcher.drain("diabetes")] == outcomes
    assert paused.delays == pauses
    assert registry.get("diabetes", 2).stage == (
        "production" if outcomes[0][1] == "Succeeded" else "candidate"
    )


@pytest.mark.parametrize(
    ("newer", "aborted"),
    [
        pytest.param("registered", True, id="registered-aborts"),
        pytest.param("not-registered", False, id="not-in-the-registry-aborts-nothing"),
        pytest.param("corrupted", False, id="corrupted-aborts-nothing"),
        pytest.param("withdrawn", False, id="withdrawn-aborts-nothing"),
    ],
)
def test_with_supersede_only_a_deliverable_newer_version_aborts_the_running_rollout(
    tmp_path: Path,
    registry: LocalRegistry,
    delivery: ResumableDelivery,
    newer: str,
    aborted: bool,
) -> None:
    # Was: an event naming v3 aborted v2's live rollout at once (v2 tagged rolled-back), and
    # v3, never registered, closed `missing`: a good candidate lost to a version that is not.
    dispatcher = _supersede_dispatcher(tmp_path, registry, delivery)
    register(registry, tmp_path, stage="production")
    v2 = register(registry, tmp_path, stage="candidate")
    if newer != "not-registered":
        register(registry, tmp_path, stage="candidate")
    if newer == "corrupted":
        _damage(registry, 3)
    if newer == "withdrawn":
        registry.withdraw("diabetes", 3)
    delivery._progress(v2, 1, 1, 3)  # v2's rollout is running
    assert dispatcher.accept("diabetes", 3, "event:e3")
    assert delivery.abort_path.exists() is aborted


def test_the_worker_waits_for_the_read_that_blocks_a_model_not_for_one_behind_it(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher
) -> None:
    # Events for v3, then v2, both ahead of the registry. v3 is due again after 1 s, but waits
    # behind v2 (read again after 2 s): was, the worker woke for v3 at once, over and over —
    # wait(0), a drain that only looks at v2, and again — spinning a core for ~2 min.
    paused = _Pauses(dispatcher, registry, tmp_path)
    assert dispatcher.accept("diabetes", 3, "event:e3")
    assert dispatcher.drain("diabetes", wait=False) == []  # v3 read again in 1 s
    assert dispatcher.accept("diabetes", 2, "event:e2")
    assert dispatcher.drain("diabetes", wait=False) == []  # v2 read again in 1 s
    paused.now += 1.0
    assert dispatcher.drain("diabetes", wait=False) == []  # v2 read again in 2 s
    assert dispatcher.next_read_in() == 2.0


class _UnreachableAtStart(ResumableDelivery):
    """Its start-up reconcile fails with `errors`, one each, then works (Azure ML down)."""

    def __init__(self, *args: Any, errors: list[Exception], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.errors = errors
        self.reconciled = threading.Event()

    def reconcile(self):
        if self.errors:
            raise self.errors.pop(0)
        self.reconciled.set()
        return super().reconcile()

    def deliver(self, version: ModelVersion, **kw: Any):
        assert self.reconciled.is_set(), "delivered before the registry was reconciled"
        return super().deliver(version, **kw)


def test_a_watcher_started_while_the_registry_cannot_be_reached_waits_for_it(
    tmp_path: Path, registry: LocalRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    # Was: the start-up reconcile's error ended `trigger watch` (exit 2) as soon as the state
    # store held an ended rollout: restarted during an Azure ML outage, it crash-looped.
    down = "list diabetes: no usable Azure credentials"
    engine = _UnreachableAtStart(
        tmp_path / "engine", registry, errors=[RegistryError(down) for _ in range(3)]
    )
    dispatcher = Dispatcher(
        TriggerStore(tmp_path / "trigger"), registry, engine, wait_interval_s=0.01
    )
    register(registry, tmp_path, stage="candidate")
    watcher = Watcher(registry, "diabetes", dispatcher, required_tags=CANDIDATE, interval_s=0.01)
    ended: list[BaseException] = []

    def run() -> None:
        try:
            watcher.run()
        except BaseException as exc:
            ended.append(exc)

    thread = threading.Thread(target=run)
    with caplog.at_level(logging.INFO, logger="aml_pipelines.trigger"):
        thread.start()
        try:
            _wait_until(
                lambda: (
                    bool(ended)
                    or (
                        1 in dispatcher.store.load("diabetes").entries
                        and _step(dispatcher) is Step.DONE
                    )
                ),
                dispatcher,
            )
        finally:
            watcher.stop.set()
            thread.join(10)
    assert ended == []
    assert registry.get("diabetes", 1).stage == "production"
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert said == [
        f"reconciling the registry with the rollout state failed: {down}; trying again every "
        "0.01 s, quietly (said again every 10 min), before any delivery"
    ]
    assert "reconciling the registry with the rollout state works again" in caplog.text


@pytest.mark.parametrize(
    ("error", "kept"),
    [
        pytest.param(RegistryError("Azure ML registry unreachable (HTTP 503)"), True, id="503"),
        # The version is not there (yet) or unsound: a final why, until an event names it again.
        pytest.param(ModelNotFound("diabetes:3 not found"), False, id="not-found"),
        pytest.param(IntegrityError("model.skops does not match its sha256"), False, id="damaged"),
    ],
)
def test_with_supersede_a_registry_error_in_the_check_keeps_it_asked_for(
    tmp_path: Path,
    registry: LocalRegistry,
    delivery: ResumableDelivery,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    kept: bool,
) -> None:
    # Was: a registry that could not be read (a 503) was taken for "v3 cannot supersede", as a
    # version not there is: the check counted as made, never again, and v3 waited all of v2's
    # rollout (docs: a check that fails is made again every --interval until it is made).
    dispatcher = _supersede_dispatcher(tmp_path, registry, delivery)
    dispatcher.check_requested = lambda: None  # the check thread's: made below
    register(registry, tmp_path, stage="production")
    v2 = register(registry, tmp_path, stage="candidate")
    register(registry, tmp_path, stage="candidate")
    delivery._progress(v2, 1, 1, 3)  # v2's rollout is running
    assert dispatcher.accept("diabetes", 3, "event:e3")
    get, failures = registry.get, [error]

    def flaky(name: str, version: int) -> ModelVersion:
        if version == 3 and failures:
            raise failures.pop()
        return get(name, version)

    monkeypatch.setattr(registry, "get", flaky)
    failed: list[tuple[str, int, str]] = []
    made = dispatcher.check_supersede(lambda m, v, exc: failed.append((m, v, str(exc))))
    assert (made, failed) == ((False, [("diabetes", 3, str(error))]) if kept else (True, []))
    assert not delivery.abort_path.exists()
    assert dispatcher.check_supersede() is True
    assert delivery.abort_path.exists() is kept  # asked again: v3 is read, v2 aborted


def test_a_once_pass_whose_supersede_check_cannot_read_the_registry_goes_on_to_deliver(
    tmp_path: Path, registry: LocalRegistry, delivery: ResumableDelivery, monkeypatch: Any
) -> None:
    """Was (`watch --once --supersede`, no worker to retry the check): the registry's error
    failed the pass after the cursor had recorded v3, and the next pass never checked it."""
    dispatcher = _supersede_dispatcher(tmp_path, registry, delivery)
    register(registry, tmp_path, stage="production")
    v2 = register(registry, tmp_path, stage="candidate")
    delivery._progress(v2, 1, 1, 3)  # v2's rollout left running by an interrupted pass
    dispatcher.accept("diabetes", 2, "watch")
    register(registry, tmp_path, stage="candidate")
    read, check = registry.get, dispatcher._abort_older
    checking = threading.Event()  # the registry is unreachable for the supersede check only

    def unreachable_while_checking(name: str, version: int) -> Any:
        if checking.is_set():
            raise RegistryError("Azure ML registry unreachable (HTTP 503)")
        return read(name, version)

    def supersede_check(model: str, newest: int) -> None:
        checking.set()
        try:
            check(model, newest)
        finally:
            checking.clear()

    monkeypatch.setattr(registry, "get", unreachable_while_checking)
    monkeypatch.setattr(dispatcher, "_abort_older", supersede_check)
    assert Watcher(registry, "diabetes", dispatcher).poll() == [3]


def test_an_unexpected_delivery_error_is_said_once_with_its_traceback_and_status_tells_why(
    tmp_path: Path, registry: LocalRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    # Was: an error that is not a PipelineError/RolloutError (`.rollout/packages` a file, a full
    # disk) was logged with its traceback at every retry — ~28 lines every 5 s with `serve`,
    # on a full disk filling it further — and `trigger status` showed no reason.
    def not_a_folder() -> OSError:
        return NotADirectoryError(20, "Not a directory", ".rollout/packages/diabetes/1")

    errors: list[Exception] = [not_a_folder() for _ in range(5)]
    # A full disk names another temporary folder at each try: the same error all the same.
    errors += [OSError(28, "No space left on device", f".package-tmp-{i}") for i in range(2)]
    _, reasons = _delivered_after_seven_errors(tmp_path, registry, caplog, errors)
    assert reasons == [
        "waits, to be retried: NotADirectoryError: [Errno 20] Not a directory: "
        "'.rollout/packages/diabetes/1'"
    ]
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.getMessage().split(": ")[0], r.exc_info is not None) for r in said] == [
        ("delivery of diabetes stopped", True),  # the first time, with its traceback
        ("delivery of diabetes still stopped", False),  # 10 min on, the same: one line
        ("delivery of diabetes stopped", True),  # another error, with its traceback
    ]
    assert "NotADirectoryError: [Errno 20]" in said[0].getMessage()
    assert (
        said[0]
        .getMessage()
        .endswith("retrying every 0.01 s, quietly (said again every 10 min while it lasts)")
    )


def test_an_unexpected_poll_error_is_said_once_with_its_traceback(
    tmp_path: Path,
    registry: LocalRegistry,
    dispatcher: Dispatcher,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Was: a poll failing with an error that is not a PipelineError logged its traceback at
    # every poll, where a registry error is said once.
    errors: list[Exception] = [PermissionError(13, "Permission denied", "/mnt/reg")] * 5
    unreachable = _UnreachableRegistry(registry, errors)
    register(registry, tmp_path, stage="candidate")
    watcher = Watcher(
        unreachable,  # type: ignore[arg-type]
        "diabetes",
        dispatcher,
        required_tags=CANDIDATE,
        interval_s=0.01,
    )
    _watch_until_delivered(watcher, dispatcher, caplog)
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.getMessage().split(": ")[0], r.exc_info is not None) for r in said] == [
        ("polling the registry for diabetes failed", True)
    ]
    assert "PermissionError: [Errno 13] Permission denied: '/mnt/reg'" in said[0].getMessage()
    assert "polling the registry for diabetes works again" in caplog.text


@pytest.mark.parametrize("damaged_at", ["start", "between-polls"])
def test_a_damaged_newest_candidate_is_closed_failed_not_ignored(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher, damaged_at: str
) -> None:
    # Was: the listings and `latest` leave a damaged version out, so the watcher never saw it:
    # `watch --once` said "no new version to deliver" (exit 0) for a registered candidate that
    # could never be rolled out, where an event for it closes it Failed (exit 5).
    register(registry, tmp_path, stage="production")
    watcher = Watcher(registry, "diabetes", dispatcher, required_tags=CANDIDATE)
    if damaged_at == "between-polls":
        assert watcher.poll() == []  # listed up to v1: a new version is seen by `latest`
    register(registry, tmp_path, stage="candidate")
    _damage(registry, 2)
    assert watcher.poll() == [2]
    (outcome,) = dispatcher.drain("diabetes")
    assert (outcome.version, outcome.phase) == (2, "Failed")
    assert "diabetes:2 is corrupted" in outcome.reason
    assert watcher.poll() == []  # closed: not accepted again
    assert journal(tmp_path / "engine") == []


@pytest.mark.parametrize(
    "tags",
    [
        pytest.param({"stage": "rolled-back"}, id="delivered-already"),
        pytest.param({}, id="not-a-candidate"),
    ],
)
def test_a_damaged_version_the_watcher_would_not_deliver_is_left_alone(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher, tags: dict[str, str]
) -> None:
    register(registry, tmp_path, stage="production")
    register(registry, tmp_path, **tags)
    _damage(registry, 2)
    assert Watcher(registry, "diabetes", dispatcher, required_tags=CANDIDATE).poll() == []


def test_a_registry_folder_gone_mid_run_is_a_failed_poll_not_silence(
    tmp_path: Path, registry: LocalRegistry, dispatcher: Dispatcher
) -> None:
    # Was: a registry folder gone (an unmounted share) read as "no version", polled forever
    # without a word; a failed poll is said once, every 10 min while it lasts, and when back.
    register(registry, tmp_path, stage="production")
    watcher = Watcher(registry, "diabetes", dispatcher, required_tags=CANDIDATE)
    assert watcher.poll() == []
    registry.root.rename(tmp_path / "gone")
    with pytest.raises(RegistryError, match="no version of it any more"):
        watcher.poll()
    (tmp_path / "gone").rename(registry.root)
    assert watcher.poll() == []
