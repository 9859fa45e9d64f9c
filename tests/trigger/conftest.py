"""Fixtures for the trigger tests: a real local registry and the file-backed resumable delivery."""

from __future__ import annotations

from pathlib import Path

import pytest

from aml_pipelines.registry.local import LocalRegistry
from aml_pipelines.trigger.dispatch import Dispatcher
from aml_pipelines.trigger.store import TriggerStore
from tests.trigger.fakes import ResumableDelivery


@pytest.fixture
def registry(tmp_path: Path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "registry")


@pytest.fixture
def delivery(tmp_path: Path, registry: LocalRegistry) -> ResumableDelivery:
    return ResumableDelivery(tmp_path / "engine", registry)


@pytest.fixture
def dispatcher(tmp_path: Path, registry: LocalRegistry, delivery: ResumableDelivery) -> Dispatcher:
    return Dispatcher(TriggerStore(tmp_path / "trigger"), registry, delivery, wait_interval_s=0)
