"""The router contract, run against the in-memory reference backend (plain and file-backed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rollout.core.types import Colour, Release, Weights
from rollout.routers.memory import MemoryRouter
from tests.routers.contract import RouterContract


class TestMemoryRouterContract(RouterContract):
    @pytest.fixture
    def router(self) -> MemoryRouter:
        return MemoryRouter()


class _Reopening(MemoryRouter):
    """Every read goes through a fresh instance on the same file, like a restarted controller."""

    def __init__(self, path: Path) -> None:
        super().__init__(state_file=path)
        self._path = path

    def get_weights(self) -> Weights:
        return MemoryRouter(state_file=self._path).get_weights()

    def release(self, colour: Colour) -> Release | None:
        return MemoryRouter(state_file=self._path).release(colour)


class TestFileBackedMemoryRouterContract(RouterContract):
    """Same contract with the routes in a state file, read back by a fresh instance each time."""

    @pytest.fixture
    def router(self, tmp_path: Path) -> MemoryRouter:
        return _Reopening(tmp_path / "routes.json")
