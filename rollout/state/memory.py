"""In-memory StateStore for tests, dry runs and the simulator (no durability, same contract)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

from rollout.core.status import Command, Status
from rollout.errors import LeaseHeldError


class MemoryStateStore:
    """Status and commands in a Python object; leases per rollout name within the process."""

    _leases: ClassVar[dict[str, str]] = {}

    def __init__(self, name: str = "rollout") -> None:
        self.name = name
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
        """Exclusive per rollout name in this process."""
        holder = self._leases.get(self.name)
        if holder is not None:
            raise LeaseHeldError(
                f"rollout {self.name!r} is already driven by another controller ({holder})"
            )
        self._leases[self.name] = owner
        try:
            yield
        finally:
            self._leases.pop(self.name, None)
