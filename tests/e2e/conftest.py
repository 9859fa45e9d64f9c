"""The e2e tests share the local tests' trained-model releases."""

from tests.local.conftest import make_release

__all__ = ["make_release"]
