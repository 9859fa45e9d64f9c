"""A watcher process for the kill/restart tests: the real Watcher, Dispatcher, store and lock,
the real LocalRegistry, and the file-backed ResumableDelivery (tests/trigger/fakes.py).

    python -m tests.trigger.proc ROOT [--once] [--step-s S] [--crash-between] [--supersede]
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from aml_pipelines.errors import TriggerError
from aml_pipelines.registry.local import LocalRegistry
from aml_pipelines.trigger.dispatch import Dispatcher
from aml_pipelines.trigger.store import TriggerStore
from aml_pipelines.trigger.watcher import Watcher
from tests.trigger.fakes import ResumableDelivery


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--once", action="store_true")
    parser.add_argument("--step-s", type=float, default=0.0)
    parser.add_argument("--crash-between", action="store_true")
    parser.add_argument("--supersede", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    registry = LocalRegistry(args.root / "registry")
    delivery = ResumableDelivery(
        args.root / "engine", registry, step_s=args.step_s, crash_between=args.crash_between
    )
    dispatcher = Dispatcher(
        TriggerStore(args.root / "trigger"),
        registry,
        delivery,
        supersede=args.supersede,
        wait_interval_s=0.05,
    )
    watcher = Watcher(
        registry, "diabetes", dispatcher, required_tags={"stage": "candidate"}, interval_s=0.05
    )
    signal.signal(signal.SIGTERM, lambda *_: watcher.stop.set())
    try:
        watcher.run(once=args.once)
    except TriggerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
