"""State store factory: the spec's `state.kind` → a StateStore (unknown kind → ConfigError).

The kubernetes store lives in its own module, imported only when chosen (it pulls in the
kubernetes client), as the router factory does for its backends; it offers
`from_config(cfg, name)`.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path

from rollout.config import FileStateConfig, MemoryStateConfig, StateConfig
from rollout.errors import ConfigError
from rollout.state.base import StateStore
from rollout.state.file import FileStateStore
from rollout.state.memory import MemoryStateStore

#: kind → (module, class) for the stores built from their config alone.
BACKENDS: dict[str, tuple[str, str]] = {
    "kubernetes": ("rollout.state.kubernetes", "KubernetesStateStore"),
}
KINDS = ("file", "memory", *BACKENDS)


def make_store(
    cfg: StateConfig,
    name: str,
    *,
    directory: Path | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> StateStore:
    """Build the store for rollout `name`; `directory` overrides `cfg.dir` (--state-dir), which
    for the kubernetes store holds only the ledger (not built here). `sleep` is how the
    kubernetes store waits (up to OUTAGE_S through an API server outage): a controller's
    `RealClock(stopping).sleep` stops there too should a signal's KeyboardInterrupt be lost."""
    if isinstance(cfg, FileStateConfig):
        return FileStateStore(directory or cfg.dir, name)
    if isinstance(cfg, MemoryStateConfig):
        return MemoryStateStore(name, directory or cfg.dir)  # its ledger's directory
    kind = getattr(cfg, "kind", None)
    if kind not in BACKENDS:
        raise ConfigError(f"state.kind: unknown kind {kind!r} (known: {', '.join(KINDS)})")
    module_name, class_name = BACKENDS[kind]
    cls = getattr(importlib.import_module(module_name), class_name)
    store: StateStore = cls.from_config(cfg, name, sleep=sleep)
    return store
