"""The watcher on an Azure ML registry: real azure-ai-ml calls over HTTP to the fake ARM server
(tests/fakes/arm.py), delivered by the real engine (memory router, simulated traffic, fake
clock). The registry tags written back are read from the fake's stored ARM resources.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aml_pipelines.delivery import EngineDelivery
from aml_pipelines.registry.azureml import AzureMLRegistry
from aml_pipelines.registry.memory import MemoryRegistry
from aml_pipelines.trigger.dispatch import Dispatcher
from aml_pipelines.trigger.store import TriggerStore
from aml_pipelines.trigger.watcher import Watcher
from rollout.config import spec_from_dict
from rollout.controller import FakeClock
from tests.fakes.arm import FakeArm, StaticCredential, iter_calls

SUB, RG, WS = "11111111-2222-3333-4444-555555555555", "ml-rg", "ml-ws"
VERSIONS = (
    f"/subscriptions/{SUB}/resourceGroups/{RG}"
    f"/providers/Microsoft.MachineLearningServices/workspaces/{WS}/models/diabetes/versions"
)


@pytest.fixture
def arm() -> Iterator[FakeArm]:
    with FakeArm() as fake:
        fake.add_workspace(SUB, RG, WS)
        yield fake


@pytest.fixture
def registry(arm: FakeArm) -> AzureMLRegistry:
    from azure.ai.ml import MLClient

    return AzureMLRegistry(MLClient(StaticCredential(), SUB, RG, WS, transport=arm.transport()))


def _watcher(tmp_path: Path, registry: AzureMLRegistry) -> Watcher:
    spec = spec_from_dict(
        {
            "name": "diabetes",
            "router": {"kind": "memory", "state_file": str(tmp_path / "routes.json")},
            "metrics": {"kind": "simulated", "seed": 1, "rps": 500},
            "steps": [10, 50, 100],
            "analysis": {"interval_s": 10, "min_requests": 50, "latency": {"enabled": False}},
            "state": {"dir": str(tmp_path / "rollout")},
        }
    )
    delivery = EngineDelivery(registry, spec, clock=FakeClock(1_000.0))
    dispatcher = Dispatcher(TriggerStore(tmp_path / "trigger"), registry, delivery)
    return Watcher(registry, "diabetes", dispatcher, required_tags={"stage": "candidate"})


def _stages(arm: FakeArm) -> dict[str, Any]:
    return {v["name"]: v["properties"]["tags"].get("stage") for v in arm.children(VERSIONS)}


def test_watch_an_azureml_registry_and_tag_it_after_promotion(
    tmp_path: Path, arm: FakeArm, registry: AzureMLRegistry
) -> None:
    registry.register(
        "diabetes",
        "azureml://jobs/run-1/outputs/model",
        {"sha256": "a" * 64, "stage": "production"},
    )
    registry.register(
        "diabetes", "azureml://jobs/run-2/outputs/model", {"sha256": "b" * 64, "stage": "candidate"}
    )
    _watcher(tmp_path, registry).run(once=True)
    assert _stages(arm) == {"1": "archived", "2": "production"}

    puts = len(list(iter_calls(arm, "PUT", r"/models/diabetes/versions/")))
    assert puts == 4  # two registrations, two tag writes
    _watcher(tmp_path, registry).run(once=True)  # a restarted watcher: nothing new, nothing written
    assert len(list(iter_calls(arm, "PUT", r"/models/diabetes/versions/"))) == puts
    assert not (tmp_path / "rollout" / "packages").exists()  # deployed from the registry


def test_a_version_older_than_a_production_archived_in_the_studio_is_not_rolled_out(
    tmp_path: Path, arm: FakeArm, registry: AzureMLRegistry
) -> None:
    """Production archived in the studio (it still serves) was hidden from the listings: the
    watcher saw no production and rolled out an older candidate against it, a downgrade."""
    registry.register(
        "diabetes", "azureml://jobs/run-1/outputs/model", {"sha256": "a" * 64, "stage": "candidate"}
    )
    registry.register(
        "diabetes",
        "azureml://jobs/run-2/outputs/model",
        {"sha256": "b" * 64, "stage": "production"},
    )
    registry.ml_client.models.archive("diabetes", "2")
    assert _watcher(tmp_path, registry).run(once=True) == []
    assert _stages(arm) == {"1": "candidate", "2": "production"}


def test_a_candidate_archived_in_the_studio_before_its_delivery_is_not_rolled_out(
    tmp_path: Path, arm: FakeArm, registry: AzureMLRegistry
) -> None:
    """An event accepted v2; a person archived it in the studio before its turn. The listings
    leave it out, but the dispatcher `get`s the version an event names, and it was rolled out."""
    from aml_pipelines.trigger.dispatch import WITHDRAWN

    registry.register(
        "diabetes", "azureml://jobs/run-1/outputs/model", {"sha256": "a" * 64, "stage": "candidate"}
    )
    watcher = _watcher(tmp_path, registry)
    assert watcher.dispatcher.accept("diabetes", 1, "event:e1")
    registry.ml_client.models.archive("diabetes", "1")
    assert [(o.phase, o.reason) for o in watcher.run(once=True)] == [("skipped", WITHDRAWN)]
    assert _stages(arm) == {"1": "candidate"}
    assert not (tmp_path / "routes.json").exists()  # nothing deployed
    assert registry.withdrawn("diabetes") == {1}


def _production_archived_in_the_studio_then_a_candidate(registry: AzureMLRegistry) -> None:
    """v1 tagged production and archived in the studio (out of the listing), v2 a candidate."""
    registry.register(
        "diabetes",
        "azureml://jobs/run-1/outputs/model",
        {"sha256": "a" * 64, "stage": "production"},
    )
    registry.ml_client.models.archive("diabetes", "1")
    registry.register(
        "diabetes", "azureml://jobs/run-2/outputs/model", {"sha256": "b" * 64, "stage": "candidate"}
    )


def test_a_production_archived_in_the_studio_is_tagged_archived_after_a_promotion(
    tmp_path: Path, arm: FakeArm, registry: AzureMLRegistry
) -> None:
    # Left out of the listing the tags were planned from, it stayed `stage=production` beside
    # the promoted version: two production versions, and `registry tag` refused every change.
    _production_archived_in_the_studio_then_a_candidate(registry)
    (outcome,) = _watcher(tmp_path, registry).run(once=True)
    assert outcome.phase == "Succeeded", outcome.reason
    assert _stages(arm) == {"1": "archived", "2": "production"}


def test_registry_tag_replace_archives_a_production_archived_in_the_studio(
    arm: FakeArm, registry: AzureMLRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `registry tag --replace` planned over the listing, which leaves that version out: the new
    # production stood beside the old one, still tagged production.
    from typer.testing import CliRunner

    import aml_pipelines.cli
    from rollout.cli import app

    _production_archived_in_the_studio_then_a_candidate(registry)
    monkeypatch.setattr(aml_pipelines.cli, "_open", lambda *_, **__: registry)
    result = CliRunner().invoke(
        app, ["registry", "tag", "diabetes", "2", "stage=production", "--replace"]
    )
    assert result.exit_code == 0, result.output
    assert _stages(arm) == {"1": "archived", "2": "production"}


def test_serve_accepts_the_events_of_the_registrys_workspace_only(
    registry: AzureMLRegistry,
) -> None:
    """`serve` on an Azure ML registry: an event of a model of the same name registered in
    another workspace named a version of another model (or none), and was delivered."""
    from aml_pipelines.trigger.cli import event_filter
    from aml_pipelines.trigger.eventgrid import parse
    from tests.trigger.test_eventgrid import eg_event

    workspace = VERSIONS.removesuffix("/models/diabetes/versions")
    only = event_filter(["diabetes"], {"stage": "candidate"}, registry)

    def reason(topic: str) -> str | None:
        (event,) = parse(json.dumps([{**eg_event(version="1"), "topic": topic}]).encode())
        return only.reason_to_skip(event)  # type: ignore[arg-type]

    assert reason(workspace) is None
    assert reason(workspace.upper()) is None
    assert (reason(workspace + "-dev") or "").startswith("other workspace")
    # Not an Azure ML workspace: nothing to compare the topic with.
    assert event_filter([], {}, MemoryRegistry()).workspace is None


def test_the_trigger_logs_no_azure_http_dumps(
    tmp_path: Path, registry: AzureMLRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """`trigger watch|serve` log at INFO: azure-core's HTTP logging policy then wrote every
    request a watch on an Azure ML registry made, with its headers, at each poll."""
    import logging

    from aml_pipelines.trigger.cli import _setup_logging

    registry.register(
        "diabetes", "azureml://jobs/run-1/outputs/model", {"sha256": "a" * 64, "stage": "candidate"}
    )
    with caplog.at_level(logging.INFO):  # (the levels it sets: restored by tests/conftest.py)
        _setup_logging()
        _watcher(tmp_path, registry).run(once=True)
    # (azure-ai-ml's own loggers print nothing: they do not propagate, with a NullHandler)
    assert not [r for r in caplog.records if r.name.startswith("azure.core")]
    assert any(r.name.startswith("aml_pipelines.trigger") for r in caplog.records)
