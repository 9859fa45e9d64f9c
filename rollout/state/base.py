"""The StateStore contract: where a rollout's status, operator commands and lease live.

The controller is the only writer of the status and must hold the lease while it writes. Any
process (the CLI) may queue commands without the lease; the controller reads them each tick and
the machine handles them in order, so a command never races the analysis.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

from rollout.core.status import Command, Status


@runtime_checkable
class StateStore(Protocol):
    def load(self) -> Status | None:
        """The last saved status, or None for a rollout never started. StateError if unreadable."""

    def save(self, status: Status) -> None:
        """Persist `status` durably (a crash right after leaves this or the previous one)."""

    def push_command(self, command: Command) -> None:
        """Queue an operator command (needs no lease)."""

    def commands(self) -> list[Command | None]:
        """The command log, oldest first: one entry per line, None for a line that is not a
        command this version can read (it keeps its position: the machine reads by position)."""

    def check_lease(self) -> None:
        """StateError when the lease this store holds is lost or about to be (no-op otherwise).

        The controller asks before every router action: a controller that lost its lease must
        not move traffic the one that took over now drives.
        """

    def controller(self) -> str | None:
        """Who holds the lease now ("ann's controller pid 12 on host since ..."), None if nobody."""

    def lease(self, owner: str) -> AbstractContextManager[None]:
        """Hold the rollout's lease for the block; LeaseHeldError if another controller has it."""
