"""File StateStore: one directory, a few files per rollout, safe against crashes and twins.

    <dir>/<name>.status.json     the status; replaced atomically (temp + fsync + rename + dir fsync)
    <dir>/<name>.commands.jsonl  operator commands, appended with O_APPEND (one write per line)
    <dir>/<name>.lock            the lease: an fcntl lock held for the controller's lifetime

The kernel drops an fcntl lock when its process dies — even by SIGKILL — so a crashed
controller never wedges the rollout, and a second live controller fails fast with LeaseHeldError
naming the holder (pid, host, start time written into the lock file). The lock is on the file's
inode, not its name: a lock file deleted (a "stale lock" cleanup, `rm -rf .rollout`) or replaced
while held lets the next controller lock a new one, so the holder checks, before every router
action and status save, that the name still leads to the inode it locked, and stops if not.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from rollout import jsonl
from rollout.core.status import Command, Status
from rollout.errors import LeaseHeldError, StateError


class FileStateStore:
    """A StateStore in a local directory."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir = Path(directory)
        self.name = name
        self.status_path = self.dir / f"{name}.status.json"
        self.commands_path = self.dir / f"{name}.commands.jsonl"
        self.lock_path = self.dir / f"{name}.lock"
        #: The lock file's descriptor while this store holds the lease, else None.
        self._held: int | None = None

    def _ensure_dir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.dir}: {exc.strerror}") from exc

    def load(self) -> Status | None:
        """The saved status, or None when the rollout never started."""
        try:
            data = self.status_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self.status_path}: {exc.strerror}") from exc
        try:
            # Decoded here, not by read_text: bytes that are not UTF-8 (a UnicodeDecodeError, a
            # ValueError) are a corrupt status like any other, not a traceback.
            return Status.from_dict(json.loads(data.decode("utf-8")))
        except (ValueError, KeyError, TypeError) as exc:
            # `run --restart` reads the status first too: moving the file aside is the way on.
            path = self.status_path
            raise StateError(
                f"{path} is not a rollout status: {exc}; move it aside (`mv {path} "
                f"{path}.broken`): `aml-rollout rollout run` then starts a new rollout"
            ) from exc

    def save(self, status: Status) -> None:
        """Replace the status file atomically and durably (StateError once the lease is lost)."""
        self.check_lease()
        self._ensure_dir()
        tmp = self.dir / f".{self.name}.status.{os.getpid()}.tmp"
        try:
            with tmp.open("w", encoding="utf-8") as fh:
                json.dump(status.to_dict(), fh, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(self.status_path)
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StateError(f"cannot write {self.status_path}: {exc.strerror}") from exc
        finally:
            # Gone once renamed; left by a failed write (a full disk, Ctrl-C), it is litter.
            # (A SIGKILL skips this: the next lease holder removes it, `_remove_stale_temps`.)
            tmp.unlink(missing_ok=True)

    def push_command(self, command: Command) -> None:
        """Append one command line (a single write, so concurrent writers do not interleave)."""
        self._ensure_dir()
        try:
            jsonl.append(self.commands_path, command.to_dict())
        except OSError as exc:
            raise StateError(
                f"cannot queue a command in {self.commands_path}: {exc.strerror}"
            ) from exc

    def commands(self) -> list[Command | None]:
        """The command log, oldest first; None for a line that is not a command.

        Positions are stable: the log only grows, a line counts once it is complete (whether
        it parses or not), and a torn fragment is ended by the next append, never merged into
        it. Such a line is not warned about here, at every read by every command: the controller
        warns once, when it reads past it.
        """
        try:
            slots = jsonl.read_slots(self.commands_path, warn=False)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StateError(f"cannot read {self.commands_path}: {exc.strerror}") from exc
        return [Command.from_line(record) for record in slots]

    def check_lease(self) -> None:
        """StateError once the lock file this store locked is no longer `<name>.lock` (deleted
        or replaced): another controller may have locked the new one. The lock itself is held
        until the process dies."""
        try:
            if self._held is None or _names(self.lock_path, self._held):
                return
        except OSError as exc:
            raise StateError(f"cannot check the lease {self.lock_path}: {exc.strerror}") from exc
        raise StateError(
            f"lost the lease of rollout {self.name!r}: its lock file {self.lock_path} was deleted "
            "or replaced while this controller held it; another controller may drive it now, so "
            "this one stops (`aml-rollout rollout status` names the one running; leave the lock "
            "file alone while a controller runs)"
        )

    def controller(self) -> str | None:
        """The lease holder, probed without waiting (the probe holds the lock for microseconds)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self.lock_path}: {exc.strerror}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return self.lock_path.read_text(encoding="utf-8").strip() or "a controller"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except OSError as exc:  # ENOLCK: a network filesystem without its lock service
            raise StateError(f"cannot probe the lease {self.lock_path}: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def _remove_stale_temps(self) -> None:
        """Remove the status temp files (`save`'s, named by pid) a killed holder left: only the
        lease holder saves, so with the lease taken none is being written. Best effort: litter
        that stays (a directory of another user) stops nothing."""
        prefix = f".{self.name}.status."
        with suppress(OSError):
            for path in self.dir.iterdir():
                pid = path.name.removeprefix(prefix).removesuffix(".tmp")
                if path.name == f"{prefix}{pid}.tmp" and pid.isascii() and pid.isdigit():
                    with suppress(OSError):
                        path.unlink()

    @contextmanager
    def lease(self, owner: str) -> Iterator[None]:
        """Hold an exclusive fcntl lock on the lock file for the block."""
        self._ensure_dir()

        def refusal(holder: str) -> str:
            return (
                f"rollout {self.name!r} is already driven by another controller ({holder}); "
                "stop it, or steer it with `aml-rollout rollout pause|resume|promote|abort`"
            )

        with locked(self.lock_path, owner, "lease", refusal) as fd:
            self._held = fd
            self._remove_stale_temps()
            try:
                yield
            finally:
                self._held = None


@contextmanager
def locked(path: Path, owner: str, what: str, refusal: Callable[[str], str]) -> Iterator[int]:
    """`path`'s lock (`hold_lock`) held for the block, its fd given; StateError naming `what`
    when it cannot be taken (a directory another user created, a read-only mount), and
    LeaseHeldError saying `refusal(the holder's stamp)` while another process holds it. Let
    go, its stamp is cleared first: one left behind names no one, and an error there would
    hide the one that ended the block."""
    try:
        fd = hold_lock(path, owner)
    except OSError as exc:
        raise StateError(f"cannot take the {what} {path}: {exc.strerror}") from exc
    if isinstance(fd, str):
        raise LeaseHeldError(refusal(fd))
    try:
        yield fd
    finally:
        try:
            with suppress(OSError):
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing drops the lock


#: Times `hold_lock` locks anew a lock file deleted or replaced as it was locked.
LOCK_ATTEMPTS = 5


def _names(path: Path, fd: int) -> bool:
    """Whether `path` still leads to the file open as `fd` (not deleted, not replaced)."""
    try:
        there = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino)


def hold_lock(path: Path, owner: str) -> int | str:
    """Take `path`'s exclusive fcntl lock and stamp it with who holds it: the open fd (close it
    to release; the kernel does if the process dies), or the holder's stamp when another
    process has it."""
    for _ in range(LOCK_ATTEMPTS):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            return path.read_text(encoding="utf-8").strip() or "unknown"
        if _names(path, fd):
            break
        # Deleted or replaced between the open and the lock (by its holder's exit, or a clean
        # up): the lock is on a file no one else will open. Lock the one the name leads to now.
        os.close(fd)
    else:
        raise OSError(errno.EAGAIN, f"replaced {LOCK_ATTEMPTS} times while being locked")
    try:
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        holder = f"pid {os.getpid()} on {socket.gethostname()} since {stamp}"
        os.write(fd, f"{owner} {holder}".encode() if owner else holder.encode())
        os.fsync(fd)
    except BaseException:
        # Kept open, the fd would hold the lock for the life of the process: its next
        # run_rollout, and every other process's, refused as "already driven".
        os.close(fd)
        raise
    return fd


def _try_lock(fd: int, patience_s: float = 0.2) -> bool:
    """Take the lease's exclusive lock, waiting out `controller()` probes (microseconds each).

    A live controller holds the lock for good, so a short wait changes nothing there; without
    it, a controller starting while `status` probed would be refused as "already driven".
    """
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
