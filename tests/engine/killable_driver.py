"""Run one small rollout in this process; optionally SIGKILL ourselves at the Nth durable write.

    python -m tests.engine.killable_driver WORKDIR KILL_AT

Durable writes are the state store's saves and the router's applied actions (the memory router
mirrors its routes to WORKDIR/routes.json and journals each action to WORKDIR/journal.jsonl).
KILL_AT = 0 runs to the end and prints the phase and the number of durable writes as JSON.
The router outlives the process (its file), exactly as a real data plane outlives a controller.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from rollout.api import run_rollout
from rollout.config import RolloutSpec, spec_from_dict
from rollout.controller import FakeClock
from rollout.routers.memory import MemoryRouter
from rollout.state.file import FileStateStore


def spec_for(work: Path) -> RolloutSpec:
    return spec_from_dict(
        {
            "name": "kill",
            "steps": [10, 50, 100],
            "router": {
                "kind": "memory",
                "state_file": str(work / "routes.json"),
                "journal": str(work / "journal.jsonl"),
            },
            "metrics": {
                "kind": "simulated",
                "seed": 5,
                "rps": 200,
                "baseline": {"error_rate": 0.01},
                "canary": {"error_rate": 0.01},
            },
            "analysis": {"min_requests": 100, "latency": {"enabled": False}},
            "candidate": {"model": "m", "version": "2"},
            "stable": {"model": "m", "version": "1"},
            "state": {"kind": "file", "dir": str(work)},
        }
    )


def main() -> None:
    work, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    writes = [0]

    def count() -> None:
        writes[0] += 1
        if writes[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    save, commit = FileStateStore.save, MemoryRouter._commit

    def counted_save(self: FileStateStore, status: Any) -> None:
        save(self, status)
        count()

    def counted_commit(self: MemoryRouter, action: str, **fields: Any) -> None:
        commit(self, action, **fields)
        count()

    FileStateStore.save = counted_save  # type: ignore[method-assign]
    MemoryRouter._commit = counted_commit  # type: ignore[method-assign]
    # A restarted controller's clock continues after the last persisted tick.
    saved = FileStateStore(work, "kill").load()
    clock = FakeClock((saved.updated_at + 10.0) if saved else 1000.0)
    result = run_rollout(spec_for(work), clock=clock)
    print(json.dumps({"phase": result.phase.value, "writes": writes[0]}))


if __name__ == "__main__":
    main()
