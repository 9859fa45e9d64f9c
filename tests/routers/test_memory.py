"""The router contract, run against the in-memory reference backend (plain and file-backed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rollout.core.types import Colour, Release, Weights
from rollout.errors import RouterError
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


GOOD_RELEASE = {"model": "diabetes", "version": "2", "sha256": "", "image": None}
GOOD = {"weights": {"blue": 10, "green": 90}, "releases": {"blue": GOOD_RELEASE}}


@pytest.mark.parametrize(
    ("state", "problem"),
    [
        # Was: AttributeError ('list' object has no attribute 'items'), a traceback.
        pytest.param(
            {**GOOD, "releases": []}, "`releases` is a list, not an object", id="releases-list"
        ),
        pytest.param(
            {**GOOD, "releases": None}, "`releases` is null, not an object", id="releases-null"
        ),
        pytest.param(
            {**GOOD, "releases": "blue"}, '`releases` is "blue", not an object',
            id="releases-string",
        ),
        pytest.param({"weights": GOOD["weights"]}, "`releases` is missing", id="no-releases"),
        pytest.param([], "the file holds a list, not an object", id="top-level-list"),
        pytest.param(
            {**GOOD, "weights": []}, "`weights` is a list, not an object", id="weights-list"
        ),
        pytest.param(
            {**GOOD, "weights": {"blue": "10", "green": 90}},
            '`weights.blue` is "10", not a whole number', id="weight-string",
        ),
        # Were loaded: weights no router serves, written back to every journal line.
        pytest.param(
            {**GOOD, "weights": {"blue": 10.5, "green": 89.5}},
            "`weights.blue` is 10.5, not a whole number", id="weight-fraction",
        ),
        pytest.param(
            {**GOOD, "weights": {"blue": True, "green": 90}},
            "`weights.blue` is true, not a whole number", id="weight-boolean",
        ),
        pytest.param(
            {**GOOD, "weights": {"blue": 100}}, "`weights.green` is missing", id="weight-missing"
        ),
        pytest.param(
            {**GOOD, "weights": {"blue": 10, "green": 90, "purple": 0}},
            "`weights.purple` is no weight (blue, green, mirror)", id="weight-unknown",
        ),
        pytest.param(
            {**GOOD, "weights": {"blue": 10, "green": 10}},
            "`weights`: weights must sum to 100, got blue=10 green=10", id="weights-not-100",
        ),
        pytest.param(
            {**GOOD, "releases": {"purple": GOOD_RELEASE}},
            "`releases.purple` is no colour (blue, green)", id="release-colour-unknown",
        ),
        pytest.param(
            {**GOOD, "releases": {"blue": []}},
            "`releases.blue` is a list, not an object", id="release-list",
        ),
        pytest.param(
            {**GOOD, "releases": {"blue": {**GOOD_RELEASE, "model": 7}}},
            "`releases.blue.model` is 7, not a string", id="release-model-number",
        ),
        pytest.param(
            {**GOOD, "releases": {"blue": {**GOOD_RELEASE, "sha256": None}}},
            "`releases.blue.sha256` is null, not a string", id="release-sha256-null",
        ),
        pytest.param(
            {**GOOD, "releases": {"blue": {"model": "diabetes"}}},
            "`releases.blue.version` is missing", id="release-version-missing",
        ),
        pytest.param(
            {**GOOD, "releases": {"blue": {**GOOD_RELEASE, "colour": "blue"}}},
            "`releases.blue.colour` is no release field", id="release-unknown-field",
        ),
    ],
)  # fmt: skip
def test_a_state_file_of_another_shape_is_a_router_error_naming_the_field(
    tmp_path: Path, state: object, problem: str
) -> None:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(RouterError) as unreadable:
        MemoryRouter(state_file=path)
    assert str(unreadable.value) == f"memory router state {path} is unreadable: {problem}"


def test_a_state_file_of_the_right_shape_loads(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps(GOOD), encoding="utf-8")
    router = MemoryRouter(state_file=path)
    assert router.get_weights() == Weights.blue_at(10)
    assert router.release(Colour.BLUE) == Release(model="diabetes", version="2")
    assert router.release(Colour.GREEN) is None


def test_a_state_file_nested_too_deep_is_a_router_error(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")  # (was RecursionError)
    with pytest.raises(RouterError, match=r"routes\.json is unreadable: nested too deep$"):
        MemoryRouter(state_file=path)
