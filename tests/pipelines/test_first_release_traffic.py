"""A model's first release reports the traffic the router serves after the deploy, not the
traffic it asked for: the rollout component's result.json (`traffic`) and the trigger's
delivery outcome. The read is a report: weights that cannot be read fail nothing that was
deployed and tagged."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aml_pipelines.delivery import EngineDelivery, first_release_reason
from aml_pipelines.registry.local import LocalRegistry
from components.rollout.main import main
from rollout.config import spec_from_dict
from rollout.controller import FakeClock
from rollout.core.types import Weights
from rollout.errors import RouterError
from rollout.routers.memory import MemoryRouter
from tests.pipelines.conftest import write_model_folder

#: No absolute limit: the release is deployed unjudged, and no metrics read the weights.
SPEC = {
    "name": "first-traffic",
    "router": {"kind": "memory"},
    "metrics": {"kind": "static"},
    "steps": [50, 100],
    "analysis": {"interval_s": 1, "latency": {"enabled": False}, "errors": {"max_rate": None}},
}


class ChangedAfterTheDeploy(MemoryRouter):
    """A memory router whose data plane changes once the first release's weights are written
    and read back by the controller: a later read returns `later`, or raises it (an endpoint
    a human split again meanwhile, or one gone Failed). `witness`, asked at each later read,
    says what else held then (in `witnessed`)."""

    def __init__(
        self, later: Weights | Exception, witness: Callable[[], Any] = lambda: None
    ) -> None:
        super().__init__()
        self.later = later
        self.witness = witness
        self.witnessed: list[Any] = []
        self.reads_as_written: int | None = None  # None: nothing written yet

    def set_weights(self, weights: Weights) -> None:
        super().set_weights(weights)
        self.reads_as_written = 1  # the controller's read-back of what it wrote

    def get_weights(self) -> Weights:
        if self.reads_as_written is None or self.reads_as_written > 0:
            self.reads_as_written = (self.reads_as_written or 1) - 1
            return super().get_weights()
        self.witnessed.append(self.witness())
        if isinstance(self.later, Exception):
            raise self.later
        return self.later


@pytest.fixture
def registry(tmp_path: Path) -> LocalRegistry:
    registry = LocalRegistry(tmp_path / "registry")
    registry.register("m", write_model_folder(tmp_path / "v1", name="m"), {"stage": "candidate"})
    return registry


def _router_is(
    monkeypatch: pytest.MonkeyPatch, later: Weights | Exception | None, **kwargs: Any
) -> MemoryRouter:
    """The spec's router (`kind: memory`) is a ChangedAfterTheDeploy (None: a memory router
    as usual), one instance for every call of the factory."""
    router = MemoryRouter() if later is None else ChangedAfterTheDeploy(later, **kwargs)
    # the class, not `make_router`, which modules bind when first imported (rollout.api)
    monkeypatch.setattr(MemoryRouter, "from_config", classmethod(lambda cls, cfg: router))
    return router


def _run_step(tmp_path: Path, registry: LocalRegistry) -> tuple[int, dict]:
    """The rollout component on package m:1 with --registry: (exit code, result.json)."""
    package = tmp_path / "package"
    package.mkdir()
    (package / "package.json").write_text(
        json.dumps({"model": "m", "version": "1", "sha256": "ab" * 32, "image": "r/m:1"})
    )
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(SPEC))
    result = tmp_path / "result"
    argv = [f"--package={package}", f"--spec={spec}", f"--registry=local:{registry.root}",
            f"--result={result}"]  # fmt: skip
    code = main(argv)
    return code, json.loads((result / "result.json").read_text())


UNREADABLE = [
    pytest.param(RouterError("endpoint m is Failed"), id="router-error"),
    # not only the router's own errors: a client's bug, a broken connection pool
    pytest.param(RuntimeError("connection pool is closed"), id="any-exception"),
]


def test_the_step_writes_the_traffic_it_reads(
    tmp_path: Path, registry: LocalRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    _router_is(monkeypatch, None)
    code, result = _run_step(tmp_path, registry)
    assert code == 0
    assert result["traffic"] == {"green": 100, "blue": 0}
    assert result["reason"].startswith("first release of m: deployed to green with all traffic")


@pytest.mark.parametrize("error", UNREADABLE)
def test_weights_that_cannot_be_read_fail_nothing_in_the_step(
    tmp_path: Path,
    registry: LocalRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
) -> None:
    router = _router_is(monkeypatch, error, witness=lambda: registry.get("m", 1).stage)
    code, result = _run_step(tmp_path, registry)
    assert code == 0  # deployed unjudged: as with weights read
    tags = registry.get("m", 1).tags
    assert (tags["stage"], tags["first_check"]) == ("production", "unjudged")
    assert router.witnessed == ["production"]  # tagged before the read, which may fail
    assert result["traffic"] is None
    assert "all traffic" not in result["reason"]
    assert "weights could not be read" in result["reason"]
    assert f"the router's weights could not be read after the deploy ({error})" in caplog.text


def test_the_step_says_the_share_green_really_serves(
    tmp_path: Path, registry: LocalRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    _router_is(monkeypatch, Weights.blue_at(30))
    code, result = _run_step(tmp_path, registry)
    assert code == 0
    assert result["traffic"] == {"green": 70, "blue": 30}
    assert "all traffic" not in result["reason"]
    assert "green, which serves 70 % of traffic (blue 30 %)" in result["reason"]
    assert registry.get("m", 1).stage == "production"


@pytest.mark.parametrize(
    ("traffic", "head", "still"),
    [
        pytest.param({"green": 100, "blue": 0}, "deployed to green with all traffic",
                     "It still serves all traffic", id="all"),
        pytest.param({"green": 70, "blue": 30},
                     "deployed to green, which serves 70 % of traffic (blue 30 %)",
                     "Green still serves 70 % of traffic (blue 30 %)", id="less-than-all"),
        pytest.param(None, "its share of traffic is not known: the router's weights could not",
                     "It stays deployed (there is nothing to fall back to)", id="unread"),
    ],
)  # fmt: skip
def test_a_failed_first_release_says_what_it_still_serves(
    traffic: dict[str, int] | None, head: str, still: str
) -> None:
    said = first_release_reason("m", 1, "Failed", "error rate 30 %", traffic)
    assert said.startswith("first release of m: ") and head in said
    assert still in said
    assert ("all traffic" in said) == (traffic == {"green": 100, "blue": 0})


# ------------------------------------------------------------- the trigger's delivery path


def _deliver(tmp_path: Path, registry: LocalRegistry) -> tuple[str, str]:
    spec = spec_from_dict({**SPEC, "state": {"dir": str(tmp_path / "rollout")}})
    outcome = EngineDelivery(registry, spec, clock=FakeClock(1_000.0)).deliver(registry.get("m", 1))
    return outcome.phase, outcome.reason


@pytest.mark.parametrize(
    ("later", "says"),
    [
        pytest.param(None, "deployed to green with all traffic", id="all-traffic"),
        pytest.param(Weights.blue_at(30), "green, which serves 70 % of traffic (blue 30 %)",
                     id="less-than-all"),
        pytest.param(RouterError("endpoint m is Failed"), "weights could not be read",
                     id="unread-router-error"),
        pytest.param(RuntimeError("connection pool is closed"), "weights could not be read",
                     id="unread-any-exception"),
    ],
)  # fmt: skip
def test_the_delivery_says_what_green_serves(
    tmp_path: Path,
    registry: LocalRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    later: Weights | Exception | None,
    says: str,
) -> None:
    _router_is(monkeypatch, later)
    with caplog.at_level(logging.INFO, logger="aml_pipelines.delivery"):
        phase, reason = _deliver(tmp_path, registry)
    assert phase == "Succeeded"
    assert says in reason
    assert ("all traffic" in reason) == (later is None)
    assert registry.get("m", 1).tags["first_check"] == "unjudged"
    assert registry.get("m", 1).stage == "production"
