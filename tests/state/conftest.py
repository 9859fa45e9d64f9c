"""Fixtures shared by the state-store tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.kube_apiserver import FakeKubeApiServer
from tests.state.helpers import namespace


@pytest.fixture
def api() -> Iterator[FakeKubeApiServer]:
    """A fake kube-apiserver over HTTP with the test namespace in it."""
    with FakeKubeApiServer() as server:
        server.seed(namespace(), "namespaces")
        yield server
