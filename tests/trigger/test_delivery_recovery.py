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
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aml_pipelines import delivery as delivery_module
from aml_pipelines.delivery import (
    EngineDelivery,
)
from aml_pipelines.errors import IntegrityError, ModelNotFound
from aml_pipelines.registry.local import LocalRegistry
from aml_pipelines.trigger.dispatch import Dispatcher
from aml_pipelines.trigger.store import Step, TriggerStore
from rollout.controller import FakeClock
from rollout.errors import ConfigError as SpecError
from rollout.errors import MetricsError
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
    registry = LocalRegistry(tmp_path / "registry")
    register(registry, tmp_path, stage="production")
    register(registry, tmp_path, stage="candidate")
    store = TriggerStore(tmp_path / "trigger")
    store.accept("diabetes", 2, "watch")
    # One clock for the three processes: a restart an hour later would find the step over its
    # max_step_duration_s and hold the rollout for a human (the engine's rule, not ours).
    clock = FakeClock(1_000.0)
    good = EngineDelivery(registry, _spec(tmp_path, 0.01), clock=clock)
    _killed_mid_rollout(monkeypatch, Dispatcher(store, registry, good), after_ticks=3)
    live = good.current()
    assert live is not None and live.active and (live.candidate, live.weight) == (2, 50)

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
