"""The delivery path after a crash, or with a backend's secret unreadable for a while, on the real
rollout engine (memory router, simulated traffic, fake clock):

- an error while a version's rollout is live in the state store never closes the version (it
  would leave the rollout with no controller, and every later version waiting for it): it stays
  open and is resumed once the error is gone;
- a Prometheus secret that cannot be read as a delivery begins is "metrics unreadable" (retried,
  nothing deployed), not an invalid spec (closed Failed, the candidate lost);
- a last rollout whose candidate the registry cannot vouch for (damaged since, or a hand rollout
  under a name it cannot hold) is nothing to reconcile, not an error before every delivery;
- a rollout that ended Failed keeps that outcome when the trigger is killed after its tags.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from aml_pipelines import delivery as delivery_module
from aml_pipelines.delivery import (
    DeliveryOutcome,
    EngineDelivery,
    RolloutView,
    TagChange,
    follow_traffic,
    package_release,
)
from aml_pipelines.errors import IntegrityError, ModelNotFound
from aml_pipelines.registry.base import ModelVersion
from aml_pipelines.registry.local import LocalRegistry
from aml_pipelines.trigger.cli import once_exit_code
from aml_pipelines.trigger.dispatch import DeliveryWorker, Dispatcher
from aml_pipelines.trigger.store import Step, TriggerStore
from aml_pipelines.trigger.watcher import Watcher
from rollout.api import bootstrap, run_rollout
from rollout.controller import FakeClock
from rollout.core.types import Colour, Release
from rollout.errors import ConfigError as SpecError
from rollout.errors import DeployFailed, MetricsError
from rollout.routers.memory import MemoryRouter
from tests.trigger.fakes import register
from tests.trigger.test_delivery import _spec

TOKEN_ENV = "AML_ROLLOUT_TEST_PROM_TOKEN"


def _prometheus_spec(tmp: Path, auth: dict[str, str]) -> Any:
    """`_spec`'s endpoint (router, state dir) with its metrics read from a Prometheus behind
    `auth`: what a trigger restarted without the token in its environment, or with the token
    file caught mid-rewrite, builds."""
    return _spec(tmp, 0.01, metrics={"kind": "prometheus", "url": "http://127.0.0.1:9", **auth})


def _ledger(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "rollout" / "diabetes.ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _starts(tmp: Path) -> list[str]:
    """The candidate versions the ledger's rollouts started with."""
    return [r["candidate"]["version"] for r in _ledger(tmp) if r.get("event") == "start"]


def _killed_mid_rollout(
    monkeypatch: pytest.MonkeyPatch, dispatcher: Dispatcher, after_ticks: int
) -> None:
    """Drain as a trigger SIGKILLed after `after_ticks` ticks of the rollout."""
    ticks = 0
    logged = delivery_module._TickLog.__call__

    def tick(self: Any, status: Any, record: Any) -> None:
        nonlocal ticks
        logged(self, status, record)
        ticks += 1
        if ticks == after_ticks:
            raise SystemExit("killed mid-rollout")

    monkeypatch.setattr(delivery_module._TickLog, "__call__", tick)
    with pytest.raises(SystemExit):
        dispatcher.drain("diabetes")
    monkeypatch.undo()


def _v2_killed_at_50(
    tmp: Path, monkeypatch: pytest.MonkeyPatch, *others: str
) -> tuple[LocalRegistry, TriggerStore, FakeClock, EngineDelivery]:
    """diabetes v1 in production, v2 accepted, its rollout's trigger killed at blue 50 %;
    `others`: models with a candidate waiting too. The delivery's clock is for every restart:
    one an hour later would find the step over its max_step_duration_s and hold the rollout
    for a human (the engine's rule, not ours)."""
    registry = LocalRegistry(tmp / "registry")
    register(registry, tmp, stage="production")
    register(registry, tmp, stage="candidate")
    for name in others:
        register(registry, tmp, name=name, stage="candidate")
    store = TriggerStore(tmp / "trigger")
    store.accept("diabetes", 2, "watch")
    clock = FakeClock(1_000.0)
    delivery = EngineDelivery(registry, _spec(tmp, 0.01), clock=clock)
    _killed_mid_rollout(monkeypatch, Dispatcher(store, registry, delivery), after_ticks=3)
    live = delivery.current()
    assert live is not None and live.active and (live.candidate, live.weight) == (2, 50)
    return registry, store, clock, delivery


#: What a case breaks before the restart: (the restarted trigger's spec, how to mend it after).
Broken = tuple[Any, Callable[[], object]]


def _token_env_unset(tmp: Path, registry: LocalRegistry) -> Broken:
    return _prometheus_spec(tmp, {"bearer_token_env": TOKEN_ENV}), lambda: None


def _token_file_empty(tmp: Path, registry: LocalRegistry) -> Broken:
    (tmp / "token").write_text("")
    return _prometheus_spec(tmp, {"bearer_token_file": str(tmp / "token")}), lambda: None


def _damaged(tmp: Path, registry: LocalRegistry) -> Broken:
    model_file = registry.root / "diabetes" / "2" / "model.skops"
    good = model_file.read_bytes()
    model_file.write_bytes(good + b"x")
    return _spec(tmp, 0.01), lambda: model_file.write_bytes(good)


def _removed(tmp: Path, registry: LocalRegistry) -> Broken:
    folder, aside = registry.root / "diabetes" / "2", tmp / "aside"
    shutil.move(folder, aside)
    return _spec(tmp, 0.01), lambda: shutil.move(aside, folder)


@pytest.mark.parametrize(
    ("breaks", "error", "said"),
    [
        # The spec's metrics are built again on a resume: a secret not readable at that moment.
        pytest.param(_token_env_unset, SpecError, f"{TOKEN_ENV} is not set", id="token-env-unset"),
        pytest.param(_token_file_empty, SpecError, "token is empty", id="token-file-empty"),
        # A live rollout needs only the state store: a registry read failing closes nothing.
        pytest.param(_damaged, IntegrityError, "diabetes:2 is corrupted", id="damaged-in-registry"),
        pytest.param(_removed, ModelNotFound, "not found", id="gone-from-registry"),
    ],
)
def test_an_error_resuming_a_live_rollout_leaves_it_open_to_be_resumed(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    breaks: Callable[[Path, LocalRegistry], Broken],
    error: type[Exception],
    said: str,
) -> None:
    # Was: each error PERMANENT (a corrupted model, an invalid spec, not in the registry), so the
    # version was closed Failed (or `missing`) while its rollout stayed Progressing at 50 % with
    # no controller: nothing resumed it, every later version waited for it for ever.
    registry, store, clock, good = _v2_killed_at_50(tmp_path, monkeypatch)
    live = good.current()

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    spec, mend = breaks(tmp_path, registry)
    restarted = EngineDelivery(registry, spec, clock=clock)
    with pytest.raises(error, match=said):  # retried: an error stops a pass, as a 503 does
        Dispatcher(store, registry, restarted).drain("diabetes")
    entry = store.load("diabetes").entries[2]
    assert (entry.step, entry.outcome) == (Step.STARTED, "")
    assert entry.reason.startswith(
        "waits, to be retried as a resume (its rollout is live in the state store): "
    )
    assert said in entry.reason
    assert good.current() == live  # not touched

    mend()
    mended = EngineDelivery(registry, _spec(tmp_path, 0.01), clock=clock)
    [outcome] = Dispatcher(store, registry, mended).drain("diabetes")
    assert outcome.phase == "Succeeded", outcome.reason
    assert store.load("diabetes").entries[2].outcome == "Succeeded"
    assert _starts(tmp_path) == ["2"]  # resumed, not started again
    assert registry.get("diabetes", 2).stage == "production"


@pytest.mark.parametrize(
    ("auth", "token", "said"),
    [
        pytest.param({"bearer_token_env": TOKEN_ENV}, None, f"{TOKEN_ENV} is not set", id="env"),
        pytest.param({"bearer_token_file": "token"}, None, "does not exist", id="file-missing"),
        pytest.param({"bearer_token_file": "token"}, "", "is empty", id="file-empty"),
    ],
)
def test_a_secret_unreadable_as_a_delivery_begins_is_retried_not_failed(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    auth: dict[str, str],
    token: str | None,
    said: str,
) -> None:
    # Was: rollout's ConfigError from building the metrics client, PERMANENT for the trigger:
    # a good candidate closed Failed for good (`watch --once` exit 5) because its token file
    # was being rewritten, where Prometheus down at that moment is retried (exit 2).
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    if "bearer_token_file" in auth:
        auth = {"bearer_token_file": str(tmp_path / "token")}
        if token is not None:
            (tmp_path / "token").write_text(token)
    registry = LocalRegistry(tmp_path / "registry")
    register(registry, tmp_path, stage="production")
    register(registry, tmp_path, stage="candidate")
    store = TriggerStore(tmp_path / "trigger")
    store.accept("diabetes", 2, "watch")
    delivery = EngineDelivery(registry, _prometheus_spec(tmp_path, auth), clock=FakeClock(1_000.0))
    with pytest.raises(MetricsError, match=f"^metrics unreadable, nothing deployed: .*{said}"):
        Dispatcher(store, registry, delivery).drain("diabetes")
    entry = store.load("diabetes").entries[2]
    assert (entry.step, entry.outcome) == (Step.STARTED, "")
    assert entry.reason.startswith("waits, to be retried: metrics unreadable, nothing deployed")
    assert delivery.current() is None
    assert not (tmp_path / "rollout" / "packages").exists()  # nothing packaged either


def test_a_damaged_old_candidate_of_the_last_rollout_blocks_no_delivery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Was: reconcile read the last rollout's candidate with `registry.get`, which re-hashes it:
    # IntegrityError at every `watch --once` (exit 2) and every start, no version ever delivered
    # again, though its tags had long been written.
    registry = LocalRegistry(tmp_path / "registry")
    register(registry, tmp_path, stage="candidate")
    delivery = EngineDelivery(registry, _spec(tmp_path, 0.5), clock=FakeClock(1_000.0))
    assert delivery.deliver(registry.get("diabetes", 1)).phase == "Succeeded"  # first release
    register(registry, tmp_path, stage="candidate")
    assert delivery.deliver(registry.get("diabetes", 2)).phase == "RolledBack"
    model_file = registry.root / "diabetes" / "2" / "model.skops"
    model_file.write_bytes(model_file.read_bytes() + b"x")  # history, damaged since
    register(registry, tmp_path, stage="candidate")

    dispatcher = Dispatcher(TriggerStore(tmp_path / "trigger"), registry, delivery)
    watcher = Watcher(registry, "diabetes", dispatcher, required_tags={"stage": "candidate"})
    caplog.set_level(logging.WARNING, "aml_pipelines.delivery")
    outcomes = watcher.run(once=True)
    assert [(o.version, o.phase) for o in outcomes] == [(3, "RolledBack")]  # v3 delivered
    assert _starts(tmp_path) == ["2", "3"]
    warned = [r.getMessage() for r in caplog.records if r.name == "aml_pipelines.delivery"]
    assert any(
        line.startswith("last rollout (diabetes:2, RolledBack): cannot check its candidate: ")
        and "diabetes:2 is corrupted" in line
        and line.endswith("nothing to reconcile")
        for line in warned
    ), warned


def test_a_hand_rollout_under_a_name_the_registry_cannot_hold_blocks_no_delivery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Was: `registry.get("acme/diabetes", 2)` raised the registry's ConfigError (an invalid
    # model name) at every reconcile; a hand rollout of a build the registry lacks ("2-hotfix",
    # a missing number) was already "nothing to reconcile".
    registry = LocalRegistry(tmp_path / "registry")
    register(registry, tmp_path, stage="production")
    spec = _spec(tmp_path, 0.01)
    delivery = EngineDelivery(registry, spec, clock=FakeClock(1_000.0))
    v1 = package_release(registry.get("diabetes", 1), delivery.state_dir, image_registry="local")
    bootstrap(spec, v1, state_dir=delivery.state_dir)
    hand = Release(model="acme/diabetes", version="2", sha256="ab" * 32, model_dir=v1.model_dir)
    ended = run_rollout(
        spec, candidate=hand, state_dir=delivery.state_dir, clock=FakeClock(2_000.0), restart=True
    )
    assert ended.phase.value == "Succeeded"
    register(registry, tmp_path, stage="candidate")

    dispatcher = Dispatcher(TriggerStore(tmp_path / "trigger"), registry, delivery)
    watcher = Watcher(registry, "diabetes", dispatcher, required_tags={"stage": "candidate"})
    caplog.set_level(logging.WARNING, "aml_pipelines.delivery")
    assert [(o.version, o.phase) for o in watcher.run(once=True)] == [(2, "Succeeded")]
    assert "last rollout (acme/diabetes:2, Succeeded): cannot check its candidate: " in caplog.text


class _BlueNeverReady:
    """A memory router whose blue deploys never become ready (an image pull back-off)."""

    problem = "pods never ready: image pull back-off"

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        deploy = MemoryRouter.deploy

        def refused(router: MemoryRouter, colour: Colour, release: Release) -> None:
            if colour is Colour.BLUE:
                raise DeployFailed(self.problem)
            deploy(router, colour, release)

        monkeypatch.setattr(MemoryRouter, "deploy", refused)


@pytest.mark.parametrize("killed", [False, True], ids=["uninterrupted", "killed-after-tags"])
def test_a_failed_rollout_keeps_its_outcome_when_killed_after_its_tags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, killed: bool
) -> None:
    # Was: the restart settled it from the registry, whose `stage=rolled-back` is written for a
    # Failed rollout as for a rolled-back one: RolledBack, `watch --once` exit 3 instead of 5.
    _BlueNeverReady(monkeypatch)
    registry = LocalRegistry(tmp_path / "registry")
    register(registry, tmp_path, stage="production")
    register(registry, tmp_path, stage="candidate")
    store = TriggerStore(tmp_path / "trigger")
    store.accept("diabetes", 2, "watch")

    def dispatcher() -> Dispatcher:
        return Dispatcher(
            store, registry, EngineDelivery(registry, _spec(tmp_path, 0.01), clock=FakeClock(1e3))
        )

    if killed:
        close = Dispatcher._close

        def cut(self: Dispatcher, *args: Any) -> Any:
            raise SystemExit("killed after the tags, before the cursor said done")

        monkeypatch.setattr(Dispatcher, "_close", cut)
        with pytest.raises(SystemExit):
            dispatcher().drain("diabetes")
        monkeypatch.setattr(Dispatcher, "_close", close)
        assert store.load("diabetes").entries[2].step is Step.STARTED
        assert registry.get("diabetes", 2).stage == "rolled-back"
    [outcome] = dispatcher().drain("diabetes")
    assert (outcome.phase, once_exit_code([outcome.phase])) == ("Failed", 5)
    assert outcome.reason == f"diabetes:2 could not be deployed to blue: {_BlueNeverReady.problem}"
    entry = store.load("diabetes").entries[2]
    assert (entry.outcome, entry.reason) == ("Failed", outcome.reason)
    assert _starts(tmp_path) == ["2"]  # settled, not rolled out again


class _EndedRollout:
    """A delivery whose state store holds one ended rollout, `view`; it delivers nothing."""

    def __init__(self, view: RolloutView) -> None:
        self.view = view

    def current(self) -> RolloutView:
        return self.view

    def deliver(self, version: ModelVersion, **_kw: Any) -> DeliveryOutcome:
        raise AssertionError(f"v{version.version} settled from the registry: not delivered")

    def abort(self, reason: str) -> None:
        raise AssertionError("nothing to abort")

    def reconcile(self) -> list[TagChange]:
        return []


BLUE_NEVER_READY = "diabetes:2 could not be deployed to blue: image pull back-off"


@pytest.mark.parametrize(
    ("view", "tagged", "settled"),
    [
        pytest.param(
            RolloutView("diabetes", 2, "Failed", BLUE_NEVER_READY),
            ("Failed", BLUE_NEVER_READY),
            ("Failed", BLUE_NEVER_READY),
            id="its-failed-rollout",
        ),
        pytest.param(
            RolloutView("diabetes", 2, "RolledBack", "canary error rate 4 %"),
            ("RolledBack", "canary error rate 4 %"),
            ("RolledBack", "canary error rate 4 %"),
            id="its-rolled-back-rollout",
        ),
        # --delivery pipeline: a job whose rollout rolled back ends Failed, its step's reason
        # in the tag.
        pytest.param(
            RolloutView("diabetes", 2, "Failed", "pipeline job j2 is Failed"),
            ("RolledBack", "canary error rate 4 %"),
            ("RolledBack", "canary error rate 4 %"),
            id="a-pipeline-job-failed-by-its-rollback",
        ),
        pytest.param(
            RolloutView("diabetes", 2, "Failed", BLUE_NEVER_READY),
            ("RolledBack", "rolled back by hand"),
            ("RolledBack", "rolled back by hand"),
            id="tagged-again-by-hand-since",
        ),
        pytest.param(
            RolloutView("diabetes", 3, "Failed", BLUE_NEVER_READY),
            ("Failed", BLUE_NEVER_READY),
            ("RolledBack", BLUE_NEVER_READY),
            id="the-store-holds-another-version",
        ),
    ],
)
def test_a_started_version_tagged_rolled_back_settles_as_its_rollout_ended(
    tmp_path: Path, view: RolloutView, tagged: tuple[str, str], settled: tuple[str, str]
) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    register(registry, tmp_path, stage="production")
    register(registry, tmp_path, stage="candidate")
    follow_traffic(registry, "diabetes", 2, *tagged)  # what the delivery wrote before a kill
    store = TriggerStore(tmp_path / "trigger")
    store.accept("diabetes", 2, "watch")
    store.update("diabetes", 2, lambda e: replace(e, step=Step.STARTED, attempts=1))
    [outcome] = Dispatcher(store, registry, _EndedRollout(view)).drain("diabetes")
    assert (outcome.phase, outcome.reason) == settled


def _until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Until `condition()`, for up to `timeout` s (the worker runs on its own thread)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize(
    "breaks",
    [
        pytest.param(_removed, id="gone-from-registry-for-a-while"),
        pytest.param(_damaged, id="damaged-in-registry-for-a-while"),
    ],
)
def test_a_worker_resumes_a_mended_live_rollout_while_another_model_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, breaks: Callable[[Path, LocalRegistry], Broken]
) -> None:
    # Was: the kept-open resume failed, the worker went on to the other model's pending version,
    # which waited for the endpoint inside its drain (`wait=False` did not stop that wait) until
    # the live rollout ended — which only the resume it kept the worker from could do: mended,
    # the rollout stayed at blue 50 % with no controller until the trigger was restarted.
    registry, store, clock, good = _v2_killed_at_50(tmp_path, monkeypatch, "other")
    live = good.current()

    spec, mend = breaks(tmp_path, registry)
    store.accept("other", 1, "event:e1")
    dispatcher = Dispatcher(
        store, registry, EngineDelivery(registry, spec, clock=clock), wait_interval_s=0.05
    )
    worker = DeliveryWorker(dispatcher, lambda: ["diabetes", "other"])
    worker.start()
    try:
        # The resume is retried every interval, the other model's version waiting meanwhile.
        _until(lambda: worker.failures >= 3, "the resume retried while the other model waits")
        assert store.load("other").entries[1].step is Step.PENDING
        assert good.current() == live  # not touched
        mend()
        _until(lambda: store.load("diabetes").entries[2].outcome != "", "v2 closed once mended")
        _until(lambda: store.load("other").entries[1].step is Step.DONE, "the other delivered")
    finally:
        dispatcher.stop.set()
        worker.join(10)
    assert store.load("diabetes").entries[2].outcome == "Succeeded"
    assert _starts(tmp_path) == ["2", "1"]  # v2 resumed, not started again; then the other's


@pytest.mark.parametrize("breaks", [_damaged, _removed], ids=["damaged", "removed"])
def test_a_promoted_version_unreadable_before_its_tags_waits_for_the_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, breaks: Callable[[Path, LocalRegistry], Broken]
) -> None:
    # Was: killed after the promotion, before the tags, v2 then damaged in the registry: the
    # reconcile stepped over it (nothing to tag it from), and the dispatcher closed v2 Failed
    # (`watch --once` exit 5) from the registry's error, though its rollout Succeeded and it
    # serves all traffic. Then, for a while: closed Succeeded from the state store alone —
    # also when green had been sent back to v1 since. Kept open until the registry can say.
    registry = LocalRegistry(tmp_path / "registry")
    register(registry, tmp_path, stage="production")
    register(registry, tmp_path, stage="candidate")
    store = TriggerStore(tmp_path / "trigger")
    store.accept("diabetes", 2, "watch")
    clock = FakeClock(1_000.0)
    delivery = EngineDelivery(registry, _spec(tmp_path, 0.01), clock=clock)

    def killed(*_args: Any, **_kw: Any) -> list[TagChange]:
        raise SystemExit("killed after the rollout ended, before its tags")

    monkeypatch.setattr(delivery_module, "follow_traffic", killed)
    with pytest.raises(SystemExit):
        Dispatcher(store, registry, delivery).drain("diabetes")
    monkeypatch.undo()
    ended = delivery.current()
    assert ended is not None and (ended.candidate, ended.phase) == (2, "Succeeded")
    _, mend = breaks(tmp_path, registry)

    def watch_once() -> list[DeliveryOutcome]:
        dispatcher = Dispatcher(store, registry, delivery)
        watcher = Watcher(registry, "diabetes", dispatcher, required_tags={"stage": "candidate"})
        return watcher.run(once=True)

    with pytest.raises((IntegrityError, ModelNotFound)):  # `watch --once`: exit 2
        watch_once()
    entry = store.load("diabetes").entries[2]
    assert (entry.step, entry.outcome) == (Step.STARTED, "")
    assert entry.reason.startswith(f"waits: its rollout was promoted ({ended.reason}), but the ")
    mend()
    [outcome] = watch_once()
    assert (outcome.version, outcome.phase, once_exit_code([outcome.phase])) == (2, "Succeeded", 0)
    assert registry.get("diabetes", 2).stage == "production"
    assert registry.get("diabetes", 1).stage == "archived"
    assert _starts(tmp_path) == ["2"]


def test_a_resume_retried_after_the_same_error_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Was: the engine delivery's `resuming its rollout` INFO line at every retry (at serve's
    # 5 s, 720 lines an hour of a misnamed token variable), beside the worker's once-said error.
    registry, store, clock, _ = _v2_killed_at_50(tmp_path, monkeypatch)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    spec, _ = _token_env_unset(tmp_path, registry)
    dispatcher = Dispatcher(
        store, registry, EngineDelivery(registry, spec, clock=clock), wait_interval_s=0.01
    )
    worker = DeliveryWorker(dispatcher, lambda: ["diabetes"])
    caplog.set_level(logging.DEBUG, "aml_pipelines")
    worker.start()
    try:
        _until(lambda: worker.failures >= 5, "five retries of the resume")
    finally:
        dispatcher.stop.set()
        worker.join(10)
    said = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("aml_pipelines") and r.levelno >= logging.INFO
    ]
    assert said.count("diabetes v2: resuming its rollout") == 1, said
    assert len(said) == 3, said  # the dispatcher's resume, the delivery's, the worker's error


def test_a_live_rollout_whose_version_is_gone_for_good_names_the_way_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: the version kept open for ever (the resume needs the registry's copy), nothing in
    # `trigger status` saying how to get out, and with --supersede one more abort queued at
    # every restart, none applied (no controller runs).
    registry, store, clock, delivery = _v2_killed_at_50(tmp_path, monkeypatch)
    shutil.rmtree(registry.root / "diabetes" / "2")  # removed by hand, for good
    register(registry, tmp_path, stage="candidate")
    store.accept("diabetes", 3, "watch")
    for _restart in range(3):
        with pytest.raises(ModelNotFound):
            Dispatcher(store, registry, delivery, supersede=True).drain("diabetes")
    reason = store.load("diabetes").entries[2].reason
    assert "`aml-rollout rollout run <spec>` resumes it from the state store" in reason, reason
    queued = [c for c in delivery._store().commands() if c is not None]
    assert [c.kind for c in queued] == ["abort"]  # one per rollout, not one per restart

    # The way out, by hand: the stored rollout resumed, the queued abort rolls it back.
    ended = run_rollout(_spec(tmp_path, 0.01), state_dir=delivery.state_dir, clock=clock)
    assert ended.phase.value == "RolledBack"
    outcomes = Dispatcher(store, registry, delivery, supersede=True).drain("diabetes")
    assert [(o.version, o.phase) for o in outcomes] == [(2, "RolledBack"), (3, "Succeeded")]
