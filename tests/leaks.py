"""Processes a test session leaves running: found by a tag in their environment, reported, killed.

An `aml-rollout serve` with a pytest temporary model folder was once found hours after the
tests, orphaned (PPID 1), and which test had started it was never found. So the session tags
itself: the controller (the only pytest process without xdist, or xdist's controller) puts
`TAG=<unique value>` in its environment at configure, before xdist starts its workers, whose
environment is a copy of the controller's (execnet's `Popen` passes none of its own); every
process a test starts inherits it, however deep, unless it is given an environment made from
scratch. At the end of the session, once xdist's workers are gone, every process of our uid
whose `/proc/<pid>/environ` holds the tag is a leak: it is reported with its command line and
the test that was running when it started (pytest's own `PYTEST_CURRENT_TEST`, which children
inherit too), killed by PID, and the session fails.

The pytest processes are not counted: the controller sets the tag after its exec, and its
`/proc/<pid>/environ` is the environment it was started with; a worker's holds the tag, and is
excluded by PID (each reports its own through xdist's `workeroutput`).

A pytest killed hard (SIGKILL, a CI job's timeout) runs no end of session. Its tag names its
controller (PID and kernel start time), so any later session reports what it left: processes
whose tag names a controller that is gone (`left_by_dead_sessions`), with their test. They are
only reported, not killed, nor do they fail the session: it did not start them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from rollout.local.process import pid_alive, pid_start_time

#: The environment variable holding the session's tag.
TAG = "AML_ROLLOUT_TEST_SESSION"


@dataclass(frozen=True)
class Leak:
    """A process that carries the session's tag."""

    pid: int
    start_time: str | None
    command: str
    test: str  # PYTEST_CURRENT_TEST when it started ("" outside a test)

    def __str__(self) -> str:
        started = f" (started during {self.test})" if self.test else ""
        return f"pid {self.pid}: {self.command}{started}"


def new_tag() -> str:
    """A value no other session uses, naming this process as its controller."""
    return f"{os.getpid()}:{pid_start_time(os.getpid())}:{uuid.uuid4().hex}"


def session_alive(tag: str) -> bool:
    """Whether the controller a tag names still runs (a tag of another shape: assumed so)."""
    pid, _, rest = tag.partition(":")
    start_time = rest.partition(":")[0]
    if not pid.isdigit() or not start_time:
        return True
    return pid_start_time(int(pid)) == start_time


def tagged_processes(tag: str, *, exclude: Collection[int] = ()) -> list[Leak]:
    """Live processes of our uid whose environment holds `TAG=tag` (unreadable ones skipped)."""
    return _scan(lambda found: found == tag, exclude)


def left_by_dead_sessions() -> list[Leak]:
    """Live processes of our uid tagged by a session whose controller is gone (killed)."""
    return _scan(lambda found: not session_alive(found), ())


def _scan(matches: Callable[[str], bool], exclude: Collection[int]) -> list[Leak]:
    prefix = f"{TAG}=".encode()
    uid = os.getuid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        pid = int(entry.name)
        try:
            if entry.stat().st_uid != uid:
                continue
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            tag = next((v for v in environ if v.startswith(prefix)), None)
            if tag is None or not matches(tag.removeprefix(prefix).decode(errors="replace")):
                continue
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # gone since the listing, or not ours to read
            continue
        test = next((v for v in environ if v.startswith(b"PYTEST_CURRENT_TEST=")), b"")
        found.append(
            Leak(
                pid=pid,
                start_time=pid_start_time(pid),
                command=command.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace"),
                test=test.partition(b"=")[2].decode(errors="replace"),
            )
        )
    return [leak for leak in found if pid_alive(leak.pid)]  # zombies hold nothing


def kill(leaks: Iterable[Leak], *, grace_s: float = 2.0) -> None:
    """SIGTERM each process by PID, SIGKILL what still runs after `grace_s`.

    A PID is signalled only while its kernel start time is the one seen when it was found, so
    a PID recycled in between is never hit.
    """
    leaks = list(leaks)

    def signal_all(signum: int) -> None:
        for leak in leaks:
            if pid_start_time(leak.pid) == leak.start_time:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(leak.pid, signum)

    def wait(deadline: float) -> None:
        while any(pid_alive(leak.pid) for leak in leaks) and time.monotonic() < deadline:
            time.sleep(0.02)

    signal_all(signal.SIGTERM)
    wait(time.monotonic() + grace_s)
    signal_all(signal.SIGKILL)
    wait(time.monotonic() + grace_s)
