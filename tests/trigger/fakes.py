"""Test helpers for the triggers: tiny model folders and a resumable stand-in for the delivery.

`ResumableDelivery` is not a mock: it is a small delivery with the same crash semantics as the
real one (package + rollout engine), persisted in files so it works across processes:

- progress is saved after every step in `status.json` (like the rollout state store);
- `deliver()` of the candidate found there *continues* from the saved step (journal "resume"),
  a candidate whose rollout already ended is not run again (journal "ended-before");
- `abort()` queues a command the running delivery reads at its next step (like the engine);
- a version tagged `steps: N` takes N steps instead of the delivery's default (a long rollout
  that a test can supersede without racing its end);
- after the terminal status is saved, the registry tags are written with the real
  `follow_traffic` — the window a crash can cut (`crash_between=True` SIGKILLs itself there).

Every call leaves a line in `journal.jsonl`, which is what the tests count.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aml_pipelines.delivery import (
    ROLLED_BACK,
    SUCCEEDED,
    DeliveryOutcome,
    RolloutView,
    TagChange,
    follow_traffic,
    reconcile,
)
from aml_pipelines.registry.base import ModelRegistry, ModelVersion, Stage
from aml_pipelines.registry.local import LocalRegistry


def register(
    registry: LocalRegistry, tmp: Path, name: str = "diabetes", **tags: str
) -> ModelVersion:
    """Register a tiny model folder (a unique payload each time) with `tags`."""
    folder = tmp / f"src-{time.monotonic_ns()}"
    folder.mkdir(parents=True)
    payload = os.urandom(16)
    (folder / "model.skops").write_bytes(payload)
    manifest = {
        "name": name,
        "framework": "sklearn",
        "model_file": "model.skops",
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    (folder / "model.json").write_text(json.dumps(manifest))
    return registry.register(name, folder, tags)


def journal(root: Path) -> list[dict[str, Any]]:
    """The journal lines of a ResumableDelivery rooted at `root`."""
    path = root / "journal.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ResumableDelivery:
    """A file-backed delivery with the real engine's resume semantics (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        registry: ModelRegistry,
        *,
        steps: int = 3,
        step_s: float = 0.0,
        crash_between: bool = False,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.registry = registry
        self.steps = steps
        self.step_s = step_s
        self.crash_between = crash_between
        self.status_path = self.root / "status.json"
        self.abort_path = self.root / "abort"

    # -- files --------------------------------------------------------------------------------

    def _status(self) -> dict[str, Any] | None:
        if not self.status_path.exists():
            return None
        data: dict[str, Any] = json.loads(self.status_path.read_text())
        return data

    def _save(self, **status: Any) -> None:
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        tmp.replace(self.status_path)

    def _log(self, event: str, version: int, **extra: Any) -> None:
        with (self.root / "journal.jsonl").open("a") as fh:
            fh.write(json.dumps({"event": event, "version": version, **extra}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    # -- the Delivery protocol ----------------------------------------------------------------

    def current(self) -> RolloutView | None:
        st = self._status()
        if st is None:
            return None
        return RolloutView(
            st["model"], st["candidate"], st["phase"], st["reason"], st["stable"], st["weight"]
        )

    def deliver(
        self,
        version: ModelVersion,
        *,
        before_rollout: Callable[[], DeliveryOutcome | None] | None = None,
    ) -> DeliveryOutcome:
        st = self._status()
        same = st is not None and (st["model"], st["candidate"]) == (version.name, version.version)
        if same and st is not None and st["phase"] in (SUCCEEDED, ROLLED_BACK):
            self._log("ended-before", version.version)
            return self._finish(version, st["phase"], st["reason"])
        if same and st is not None:
            step = st["step"]
            stable = st["stable"]
            self._log("resume", version.version, step=step)
        else:
            step = 0
            production = self.registry.find_by_tag(version.name, "stage", Stage.PRODUCTION)
            stable = production[-1].version if production else None
            # As the engine: asked before a new rollout (not a resume, nor a first release).
            ended = before_rollout() if stable is not None and before_rollout else None
            if ended is not None:
                self._log("not-started", version.version)
                return ended
            self._log("start", version.version)
        phase, reason = SUCCEEDED, "all steps passed"
        steps = int(version.tags.get("steps", self.steps))
        while step < steps:
            if self.abort_path.exists():
                phase, reason = ROLLED_BACK, self.abort_path.read_text()
                self.abort_path.unlink()
                break
            self._progress(version, stable, step, steps)
            time.sleep(self.step_s)
            step += 1
            # Persist the step before reporting it: a kill right after the report must resume
            # from this step (as the engine's state store does), never from the one before.
            self._progress(version, stable, step, steps)
            self._log("step", version.version, step=step)
        if phase == SUCCEEDED and version.tags.get("fault"):
            phase, reason = ROLLED_BACK, "canary error rate 4.1% vs 0.1% baseline"
        self._save(
            model=version.name,
            candidate=version.version,
            phase=phase,
            reason=reason,
            stable=stable,
            weight=0,
            step=step,
        )
        self._log("end", version.version, phase=phase)
        if self.crash_between:  # traffic moved, tags not yet written
            os.kill(os.getpid(), signal.SIGKILL)
        return self._finish(version, phase, reason)

    def _progress(self, version: ModelVersion, stable: int | None, step: int, steps: int) -> None:
        self._save(
            model=version.name,
            candidate=version.version,
            phase="Progressing",
            reason="",
            stable=stable,
            weight=int(100 * (min(step, steps - 1) + 1) / (steps + 1)),
            step=step,
        )

    def _finish(self, version: ModelVersion, phase: str, reason: str) -> DeliveryOutcome:
        changes = follow_traffic(self.registry, version.name, version.version, phase, reason)
        return DeliveryOutcome(version.name, version.version, phase, reason, None, tuple(changes))

    def abort(self, reason: str) -> None:
        # Written whole, then renamed into place: the running delivery checks that the file
        # exists, then reads it, and a plain write_text let it read the file still empty (a
        # rollout RolledBack with reason "", seen once in 40 runs on a loaded box).
        partial = self.abort_path.with_name(f"abort.{threading.get_ident()}.tmp")
        partial.write_text(reason)
        partial.replace(self.abort_path)

    def reconcile(self) -> list[TagChange]:
        return reconcile(self.registry, self.current())
