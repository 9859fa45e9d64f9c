"""Run one small rollout in this process; optionally SIGKILL ourselves at the Nth durable write.

    python -m tests.engine.killable_driver WORKDIR KILL_AT [API_URL [--no-wait]]

Durable writes are the state store's saves and the router's applied actions (the memory router
mirrors its routes to WORKDIR/routes.json and journals each action to WORKDIR/journal.jsonl).
KILL_AT = 0 runs to the end and prints the phase and the number of durable writes as JSON.
The router outlives the process (its file), exactly as a real data plane outlives a controller.

Without API_URL the state is in a file store in WORKDIR. With it, in the kubernetes store on the
API server there (namespace `ml`, a 1 s lease; the ledger still in WORKDIR): a controller killed
by SIGKILL cannot release its Lease, so a restarted one waits for it to expire, as a pod
rescheduled after a crash would — unless `--no-wait`, which shows what a second controller sees.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from rollout.api import run_rollout
from rollout.config import RolloutSpec, spec_from_dict
from rollout.controller import FakeClock
from rollout.errors import LeaseHeldError
from rollout.routers.memory import MemoryRouter
from rollout.state.factory import make_store
from rollout.state.file import FileStateStore

LEASE_TTL_S = 1


def spec_for(work: Path, api_url: str | None = None) -> RolloutSpec:
    state: dict[str, Any] = {"kind": "file", "dir": str(work)}
    if api_url:
        state = {
            "kind": "kubernetes",
            "namespace": "ml",
            "api_url": api_url,
            "lease_ttl_s": LEASE_TTL_S,
            "dir": str(work),
        }
    return spec_from_dict(
        {
            "name": "kill",
            "steps": [0, 10, 50, 100],  # the shadow step first, as by default
            "mirror_percent": 20,
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
            "state": state,
        }
    )


def main() -> None:
    work, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    api_url = sys.argv[3] if len(sys.argv) > 3 else None
    wait = "--no-wait" not in sys.argv
    spec = spec_for(work, api_url)
    store_cls: Any = FileStateStore
    if api_url:
        from rollout.state.kubernetes import KubernetesStateStore

        store_cls = KubernetesStateStore
    writes = [0]

    def count() -> None:
        writes[0] += 1
        if writes[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    save, commit = store_cls.save, MemoryRouter._commit

    def counted_save(self: Any, status: Any) -> None:
        save(self, status)
        count()

    def counted_commit(self: MemoryRouter, action: str, **fields: Any) -> None:
        commit(self, action, **fields)
        count()

    store_cls.save = counted_save
    MemoryRouter._commit = counted_commit  # type: ignore[method-assign]
    # A restarted controller's clock continues after the last persisted tick.
    saved = make_store(spec.state, spec.name).load()
    clock = FakeClock((saved.updated_at + 10.0) if saved else 1000.0)
    deadline = time.monotonic() + LEASE_TTL_S + 5
    while True:
        try:
            result = run_rollout(spec, clock=clock)
            break
        except LeaseHeldError:
            if not (api_url and wait) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # the killed controller's lease runs out within LEASE_TTL_S
    print(json.dumps({"phase": result.phase.value, "writes": writes[0]}))


if __name__ == "__main__":
    main()
