"""The StateStore contract (tests/state/contract.py) on every store: memory, file, kubernetes.

The kubernetes store runs against the fake kube-apiserver over real HTTP with the unmodified
kubernetes client; `twin` is a second store with its own client, as on another node.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rollout.state.file import FileStateStore
from rollout.state.kubernetes import KubernetesStateStore
from rollout.state.memory import MemoryStateStore
from tests.fakes.kube_apiserver import FakeKubeApiServer
from tests.state.contract import StateStoreContract
from tests.state.helpers import kube_store


class TestMemoryStore(StateStoreContract):
    @pytest.fixture
    def store(self) -> MemoryStateStore:
        return MemoryStateStore("r")

    @pytest.fixture
    def twin(self, store: MemoryStateStore) -> MemoryStateStore:
        return store  # one object is the whole store


class TestFileStore(StateStoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> FileStateStore:
        return FileStateStore(tmp_path, "r")

    @pytest.fixture
    def twin(self, tmp_path: Path) -> FileStateStore:
        return FileStateStore(tmp_path, "r")


class TestKubernetesStore(StateStoreContract):
    @pytest.fixture
    def store(self, api: FakeKubeApiServer) -> KubernetesStateStore:
        return kube_store(api, ttl=5)

    @pytest.fixture
    def twin(self, api: FakeKubeApiServer) -> KubernetesStateStore:
        return kube_store(api, ttl=5)
