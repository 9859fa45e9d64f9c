"""Fixtures for the local stack tests: real model folders written by the train component."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from rollout.core.types import Release

MakeRelease = Callable[[str], Release]


def train_release(folder: Path, version: str, *, alpha: float = 1.0) -> Release:
    """Train the example model into `folder` (the train component's code) and describe it."""
    from components.train.train import TrainParams, train

    result = train(folder, name="diabetes", params=TrainParams(alpha=alpha))
    meta = json.loads((folder / "model.json").read_text())
    return Release(model=meta["name"], version=version, sha256=result.sha256, model_dir=str(folder))


@pytest.fixture(scope="session")
def make_release(tmp_path_factory: pytest.TempPathFactory) -> MakeRelease:
    """A release of a freshly trained model (one training per version, shared by the session)."""
    base = tmp_path_factory.mktemp("models")
    cache: dict[str, Release] = {}

    def make(version: str) -> Release:
        if version not in cache:
            cache[version] = train_release(base / f"v{version}", version, alpha=1.0 / int(version))
        return cache[version]

    return make
