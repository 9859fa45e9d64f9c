"""State store factory: the spec's `state.kind` → a StateStore (unknown kind → ConfigError)."""

from __future__ import annotations

from pathlib import Path

from rollout.config import StateConfig
from rollout.errors import ConfigError
from rollout.state.base import StateStore
from rollout.state.file import FileStateStore
from rollout.state.memory import MemoryStateStore


def make_store(cfg: StateConfig, name: str, *, directory: Path | None = None) -> StateStore:
    """Build the store for rollout `name`; `directory` overrides `cfg.dir` (--state-dir)."""
    if cfg.kind == "file":
        return FileStateStore(directory or cfg.dir, name)
    if cfg.kind == "memory":
        return MemoryStateStore(name)
    raise ConfigError(f"state.kind: unknown kind {cfg.kind!r} (known: file, memory)")
