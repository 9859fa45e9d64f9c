"""In-memory StateStore for tests, dry runs and the simulator (no durability, same contract).

Its status and commands live in the process, and so does its lease. A dry run still writes a
ledger, `<dir>/<name>.memory.ledger.jsonl`: a store given that `directory` also holds an
exclusive lock on `<dir>/<name>.memory.lock` with its lease, so that a second dry run of the
same name there (another process) is refused, as a second controller of a file store's rollout
is. Without it both ran, interleaving one ledger, and `explain` told one story of the two.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import ClassVar

from rollout.core.status import Command, Status
from rollout.errors import LeaseHeldError, StateError
from rollout.state.file import locked


class MemoryStateStore:
    """Status and commands in a Python object; leases per rollout name within the process,
    and across processes per ledger directory when given one."""

    _leases: ClassVar[dict[str, str]] = {}

    def __init__(self, name: str = "rollout", directory: Path | None = None) -> None:
        self.name = name
        #: Held with the lease: one dry run at a time writes the ledger beside it.
        self.lock_path = Path(directory) / f"{name}.memory.lock" if directory is not None else None
        self._status: Status | None = None
        self._commands: list[Command] = []
        self.saves = 0

    def load(self) -> Status | None:
        """The last saved status."""
        return self._status

    def save(self, status: Status) -> None:
        """Keep `status`."""
        self._status = status
        self.saves += 1

    def push_command(self, command: Command) -> None:
        """Queue a command."""
        self._commands.append(command)

    def commands(self) -> list[Command | None]:
        """All queued commands."""
        return list(self._commands)

    def check_lease(self) -> None:
        """A lease in this process is never lost."""

    def controller(self) -> str | None:
        """The lease holder in this process, if any."""
        return self._leases.get(self.name)

    @contextmanager
    def lease(self, owner: str) -> Iterator[None]:
        """Exclusive per rollout name in this process, and per ledger directory and name."""
        holder = self._leases.get(self.name)
        if holder is not None:
            raise LeaseHeldError(
                f"rollout {self.name!r} is already driven by another controller ({holder})"
            )
        with self._locked(owner):
            self._leases[self.name] = owner
            try:
                yield
            finally:
                self._leases.pop(self.name, None)

    def _locked(self, owner: str) -> AbstractContextManager[object]:
        """The lock file held (nothing without a directory); LeaseHeldError when another dry
        run holds it."""
        if self.lock_path is None:
            return nullcontext()
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a directory another user created, a read-only mount
            raise StateError(f"cannot take the lock {self.lock_path}: {exc.strerror}") from exc
        ledger = self.lock_path.with_name(f"{self.name}.memory.ledger.jsonl")

        def refusal(holder: str) -> str:
            return (
                f"rollout {self.name!r} is already driven by another dry run ({holder}), which "
                f"writes its ledger {ledger}; stop it or let it end, or give this one another "
                "--state-dir"
            )

        return locked(self.lock_path, owner, "lock", refusal)
