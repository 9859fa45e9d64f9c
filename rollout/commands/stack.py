"""Top-level commands about the embedded local stack: `demo`, `up`, `manifests`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

stack_commands: dict[str, Callable[..., Any]] = {}
