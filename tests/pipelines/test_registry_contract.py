"""One contract suite, run against every registry backend: local, memory, azureml (on fake ARM)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aml_pipelines.errors import IntegrityError, ModelNotFound
from aml_pipelines.registry.base import ModelRegistry
from tests.pipelines.conftest import write_model_folder

Source = Callable[[int], tuple[str | Path, dict[str, str]]]


@pytest.fixture(params=["local", "memory", "azureml"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[ModelRegistry, Source]]:
    kind = request.param
    if kind == "azureml":
        from azure.ai.ml import MLClient

        from aml_pipelines.registry.azureml import AzureMLRegistry
        from tests.fakes.arm import FakeArm, StaticCredential

        with FakeArm() as arm:
            arm.add_workspace("s", "rg", "ws")
            client = MLClient(StaticCredential(), "s", "rg", "ws", transport=arm.transport())

            def remote(i: int) -> tuple[str | Path, dict[str, str]]:
                return f"azureml://jobs/run-{i}/outputs/model", {"sha256": f"{i:064x}"}

            yield AzureMLRegistry(client), remote
        return

    def folder(i: int) -> tuple[str | Path, dict[str, str]]:
        return write_model_folder(tmp_path / f"src-{i}", salt=str(i)), {}

    if kind == "local":
        from aml_pipelines.registry.local import LocalRegistry

        yield LocalRegistry(tmp_path / "registry"), folder
    else:
        from aml_pipelines.registry.memory import MemoryRegistry

        yield MemoryRegistry(), folder


def _register(registry: ModelRegistry, source: Source, i: int, **tags: str) -> Any:
    path, base_tags = source(i)
    return registry.register("contract-model", path, {**base_tags, **tags})


def test_versions_count_up_from_one(backend) -> None:
    registry, source = backend
    assert isinstance(registry, ModelRegistry)
    assert registry.latest("contract-model") is None
    assert registry.list_versions("contract-model") == []
    assert registry.names() == []  # the triggers warn about a --model the registry lacks
    versions = [_register(registry, source, i).version for i in range(3)]
    assert versions == [1, 2, 3]
    assert registry.names() == ["contract-model"]
    latest = registry.latest("contract-model")
    assert latest is not None and latest.version == 3
    assert [v.version for v in registry.list_versions("contract-model")] == [1, 2, 3]


def test_tags_merge_remove_and_find(backend) -> None:
    registry, source = backend
    _register(registry, source, 1, stage="candidate", owner="a")
    _register(registry, source, 2, stage="candidate")
    updated = registry.set_tags("contract-model", 1, {"stage": "production", "owner": ""})
    assert updated.tags.get("stage") == "production" and "owner" not in updated.tags
    assert registry.get("contract-model", 1).tags == updated.tags
    assert [v.version for v in registry.find_by_tag("contract-model", "stage", "candidate")] == [2]


def test_sha256_is_fixed_at_registration(backend) -> None:
    registry, source = backend
    first = _register(registry, source, 7)
    assert len(first.sha256) == 64
    assert registry.set_tags("contract-model", 1, {"x": "y"}).sha256 == first.sha256


def test_a_sha256_tag_is_checked_before_it_is_written(backend) -> None:
    # azureml wrote it, then refused the version for good (get, listings, the production lookup)
    registry, source = backend
    first = _register(registry, source, 1, stage="production")
    with pytest.raises(IntegrityError, match=r"contract-model:1: tag sha256=.* is not its sha256"):
        registry.set_tags("contract-model", 1, {"sha256": "f" * 64, "note": "x"})
    assert registry.get("contract-model", 1).tags == first.tags  # nothing written
    assert [v.version for v in registry.find_by_tag("contract-model", "stage", "production")] == [1]
    same = registry.set_tags("contract-model", 1, {"sha256": first.sha256})
    assert same.tags["sha256"] == first.sha256
    assert "sha256" not in registry.set_tags("contract-model", 1, {"sha256": ""}).tags


def test_unknown_version(backend) -> None:
    registry, source = backend
    _register(registry, source, 1)
    with pytest.raises(ModelNotFound):
        registry.get("contract-model", 5)


def test_a_withdrawn_version_is_left_out_of_listings_but_not_out_of_reach(backend) -> None:
    # Withdrawn = archived by a person (the Azure ML studio's Archive), not the `stage=archived`
    # tag a promotion writes: listings leave it out (the watcher never picks it up), `get` (the
    # dispatcher, the webhook) sees it withdrawn, and `find_by_tag` still finds production.
    registry, source = backend
    _register(registry, source, 1, stage="production")
    _register(registry, source, 2, stage="candidate")
    assert registry.withdrawn("contract-model") == set()
    assert not registry.get("contract-model", 2).withdrawn
    assert registry.withdraw("contract-model", 2).withdrawn
    assert registry.withdrawn("contract-model") == {2}
    assert [v.version for v in registry.list_versions("contract-model")] == [1]
    latest = registry.latest("contract-model")
    assert latest is not None and latest.version == 1
    candidate = registry.get("contract-model", 2)
    assert candidate.withdrawn and candidate.stage == "candidate"
    assert [v.version for v in registry.find_by_tag("contract-model", "stage", "candidate")] == [2]

    registry.withdraw("contract-model", 1)  # a clean-up in the studio: production still serves
    assert registry.list_versions("contract-model") == []
    assert registry.latest("contract-model") is None
    (production,) = registry.find_by_tag("contract-model", "stage", "production")
    assert production.version == 1 and production.withdrawn
    assert registry.names() == ["contract-model"]  # known, if nothing is listed
    # A promotion tags it `stage=archived`: that must not restore it in the studio.
    assert registry.set_tags("contract-model", 1, {"stage": "archived"}).withdrawn
    assert registry.get("contract-model", 1).withdrawn
    assert registry.list_versions("contract-model") == []
    with pytest.raises(ModelNotFound):
        registry.withdraw("contract-model", 5)


def test_tags_planned_over_a_holder_that_moved_are_planned_again(backend) -> None:
    from aml_pipelines.delivery import SUCCEEDED, TagTransactions, plan_tags, retag

    registry, source = backend
    if isinstance(registry, TagTransactions):
        pytest.skip("planned under the model's lock: test_registry_local's two-process test")
    for i in (1, 2, 3):
        _register(registry, source, i, stage="candidate")
    registry.set_tags("contract-model", 1, {"stage": "production"})
    plans = []

    def plan(versions: Any) -> Any:
        if not plans:  # another writer promotes v2 after this listing was read
            registry.set_tags("contract-model", 2, {"stage": "production"})
            registry.set_tags("contract-model", 1, {"stage": "archived"})
        plans.append([v.version for v in versions if v.stage == "production"])
        return plan_tags(versions, 3, SUCCEEDED)

    retag(registry, "contract-model", plan, candidate=3)
    assert plans == [[1], [2]]
    production = registry.find_by_tag("contract-model", "stage", "production")
    assert [v.version for v in production] == [3]
