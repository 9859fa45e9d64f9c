"""Process locks on files (fcntl.flock), with the holder's pid in the message.

Two uses, two modes:

- *exclusive roles* (one watcher per model, one webhook server per state folder) take the lock
  without blocking; the second process gets a `TriggerError` that names the holder and exits.
- *critical sections* (read-modify-write of a cursor, one delivery at a time per endpoint) block
  until the lock is free.

flock locks belong to the open file description, so they die with the process, SIGKILL included:
a crashed watcher never leaves a stale lock behind (no pid-file heuristics needed). The lock file
itself is never deleted — deleting it would let a second process lock a different inode.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from aml_pipelines.errors import TriggerError


class FileLock:
    """An exclusive flock on `path`; `what` names the role in the error message."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None

    def acquire(self, *, blocking: bool) -> None:
        """Take the lock; without `blocking`, raise TriggerError at once when it is taken."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a --state-dir that is a file or unwritable: one line, no traceback
            raise TriggerError(
                f"cannot create the lock {self.path}: {exc.strerror}; check --state-dir"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TriggerError(
                f"{self.what} is already running (pid {holder}, lock {self.path}); "
                "stop it first or use another state folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @contextlib.contextmanager
    def held(self, *, blocking: bool = True) -> Iterator[None]:
        """Hold the lock for the duration of a `with` block."""
        self.acquire(blocking=blocking)
        try:
            yield
        finally:
            self.release()
