"""Child processes of the local stack: started in their own session, stopped by PID, waited for.

Every process (Envoy, Prometheus, scoring servers) is started with `start_new_session=True`, so
that a Ctrl-C in the terminal reaches only the Python parent, which then stops its children in
order, and so Envoy does not get the shutdown signal a short-lived parent shell would send it.
Stopping sends SIGTERM to the child's process group, waits, then SIGKILLs and reaps it: no orphan
and no port left bound. Output goes to a log file in the stack's directory, quoted in the error
when a process dies or never gets ready.

A parent killed hard (SIGKILL, an OOM kill, a test runner's timeout) runs no cleanup, and its own
session no longer reaches the children. `die_with_parent=True` asks Linux to send the child
SIGTERM when its parent dies (`prctl(PR_SET_PDEATHSIG)`, set between fork and exec). The kernel
ties that signal to the *thread* that forked the child, not the process: a child started from a
short-lived worker thread would be stopped when that thread ends. So it is only set for
children started from the main thread (whose end is the process's end); elsewhere, and on other
systems, the child simply does not get it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

import httpx

from rollout.errors import LocalStackError

log = logging.getLogger(__name__)

#: Lines of a child's log quoted when it fails.
LOG_TAIL_LINES = 15

#: Waits up to a timeout (seconds), while `alive()`, until a process is ready; LocalStackError
#: when it is not.
ReadyProbe = Callable[[float, Callable[[], bool]], None]


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket listening on a port the OS picks, to hand to a child (`Child(pass_fds=)`).

    The port is ours from the bind on: no other process can take it before the child serves,
    as it can between `free_port()` and a child's own bind. Close the parent's copy once the
    child has started.
    """
    return socket.create_server((host, 0))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS picks it).

    Free *now* only: another process (a parallel test worker's server) may bind it before the
    caller's child does. Prefer `listening_socket()`; a child that cannot take a socket must
    check that what answers on the port is itself (see `wait_ready`'s `wrong_server`).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on `host:port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex((host, port)) != 0


def binary_override(variable: str) -> str | None:
    """The binary `$variable` names (None when unset), or LocalStackError when it cannot run.

    Checked before anything starts: found at the start, the error names no log, and a stack
    half up (Envoy started, Prometheus not) left its temporary folder behind for nothing. A
    bare name is a command on PATH (`AML_ROLLOUT_ENVOY=envoy`, a system Envoy), as for a shell.
    """
    override = os.environ.get(variable)
    if not override:
        return None
    found = shutil.which(override)  # an executable file, a bare name looked up on PATH only
    if found:
        return found
    if os.sep not in override:
        raise LocalStackError(f"{variable}={override} is not a file, nor a command on PATH")
    if not Path(override).is_file():
        raise LocalStackError(f"{variable}={override} is not a file")
    raise LocalStackError(f"{variable}={override} is not executable")


def quoted_log_tail(path: Path, *, or_else: str | None = None, since: int = 0) -> str:
    """The log's last lines (written after byte `since`) set off for an error message; `or_else`
    (default: the log's path in parentheses) when there are none."""
    tail = log_tail(path, since=since)
    if tail:
        return f"\n--- last lines of {path} ---\n{tail}"
    return f" (log: {path})" if or_else is None else or_else


def log_tail(path: Path, lines: int = LOG_TAIL_LINES, *, since: int = 0) -> str:
    """The last lines of a log file written after byte `since` ('' when there are none)."""
    try:
        with path.open("rb") as fh:
            fh.seek(since)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists and is not a zombie."""
    try:
        with Path(f"/proc/{pid}/stat").open(encoding="utf-8") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def pid_start_time(pid: int) -> str | None:
    """The kernel's start time of a PID (guards against a recycled PID), None if gone."""
    try:
        with Path(f"/proc/{pid}/stat").open(encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def kill_group(pid: int, *, grace_s: float = 5.0) -> None:
    """SIGTERM the process group led by `pid`, then SIGKILL after `grace_s`; waits for the end."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pid_alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.02)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + grace_s
        while pid_alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.02)
    _reap(pid)


#: <linux/prctl.h>: the signal a process gets when its parent (thread) dies.
PR_SET_PDEATHSIG = 1


def die_with_parent_hook() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child get SIGTERM when this process dies; None if unsafe.

    None off Linux and off the main thread (see the module docstring). The hook runs in the
    forked child before exec, so it does as little as possible: libc's `prctl` is looked up
    here, in the parent. If the parent died between fork and prctl, the child stops at once.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    # The kernel reads the signal as an unsigned long: pass a full one, not a bare int.
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()
    term = int(signal.SIGTERM)

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, term)
        if os.getppid() != parent:
            os.kill(os.getpid(), term)

    return hook


def _reap(pid: int) -> None:
    # Our own children must be waited for, or they stay zombies; others' are reaped by init.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


class Child:
    """One child process with a log file, a readiness probe and a clean stop.

    `die_with_parent`: the child gets SIGTERM when this process dies, even by SIGKILL (Linux,
    main thread only: see `die_with_parent_hook`). `pass_fds`: descriptors the child inherits
    (a `listening_socket()` it serves on). `ready`: waits until the process is ready, for when
    a fixed `ready_url` cannot tell (its address is only known once the process runs).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        ready_url: str | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        die_with_parent: bool = False,
        pass_fds: Sequence[int] = (),
        ready: ReadyProbe | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.ready_url = ready_url
        self.env = env
        self.cwd = cwd
        self.die_with_parent = die_with_parent
        self.pass_fds = tuple(pass_fds)
        self.ready = ready
        self.process: subprocess.Popen[bytes] | None = None
        #: Where this run's output begins in `log_path` (appended to: a folder used again).
        self._log_start = 0

    @property
    def pid(self) -> int | None:
        """The PID while started."""
        return None if self.process is None else self.process.pid

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self, *, ready_timeout_s: float = 30.0) -> Child:
        """Start the process and wait until `ready` passes or `ready_url` answers 200
        (LocalStackError otherwise, the process stopped)."""
        if self.running:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        hook = die_with_parent_hook() if self.die_with_parent else None
        with self.log_path.open("ab") as out:
            self._log_start = out.tell()  # only this run's lines are quoted when it fails
            try:
                self.process = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=hook,  # only prctl: see die_with_parent_hook
                    env=self.env,
                    cwd=self.cwd,
                    pass_fds=self.pass_fds,
                )
            except OSError as exc:
                raise LocalStackError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc
        log.debug("started %s (pid %d): %s", self.name, self.process.pid, " ".join(self.argv))
        probe = self.ready
        if probe is None and self.ready_url is not None:
            url = self.ready_url

            def probe(timeout_s: float, alive: Callable[[], bool]) -> None:
                wait_ready(url, timeout_s=timeout_s, alive=alive)

        if probe is not None:
            try:
                probe(ready_timeout_s, lambda: self.running)
            except LocalStackError as exc:
                self.stop()
                raise LocalStackError(f"{self.name}: {exc}{self._tail()}") from None
        return self

    def ended(self) -> str | None:
        """How a started process ended by itself (exit code or signal, then its log's last
        lines); None while it runs, and once `stop()` or `kill()` ended it."""
        code = None if self.process is None else self.process.poll()
        if code is None:
            return None
        how = f"exited with code {code}" if code >= 0 else f"was killed by {signal_name(-code)}"
        return f"{self.name} {how}{self._tail()}"

    def stop(self, *, grace_s: float = 5.0) -> None:
        """Stop the process group and reap it; a no-op when not running."""
        if self.process is None:
            return
        if self.process.poll() is None:
            kill_group(self.process.pid, grace_s=grace_s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace_s)
        log.debug("stopped %s (pid %d)", self.name, self.process.pid)
        self.process = None

    def kill(self) -> None:
        """SIGKILL at once (tests of failure handling)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def _tail(self) -> str:
        return quoted_log_tail(self.log_path, or_else="", since=self._log_start)


def wait_ready(url: str, *, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll `url` until it answers 200; LocalStackError on timeout or when `alive()` turns false.

    A 4xx answer fails at once: our servers answer their ready path with 200, or 503 while they
    start, never "not found". Whoever answers 404 there is another server on the port (one that
    took it before our child could), and waiting for it to turn ready would be a silent minute.
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not alive():
                raise LocalStackError(f"exited before {url} answered")
            try:
                response = client.get(url)
                if response.status_code == 200:
                    return
                if 400 <= response.status_code < 500:
                    raise LocalStackError(wrong_server(url, f"HTTP {response.status_code}"))
                last = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(0.05)
    raise LocalStackError(f"{url} not ready after {timeout_s:g} s ({last})")


def wrong_server(url: str, answer: str) -> str:
    """The error for a port where a server other than ours answers."""
    where = httpx.URL(url)
    return (
        f"something else answers on {where.host}:{where.port} ({answer} for {where.path}): "
        "another process took the port"
    )


class StackProcess:
    """What Envoy and Prometheus share: one `Child` at a time, its pid, a stop, a `with` block.

    Subclasses set `self._child` in their `start()` and return `self` from it.
    """

    _child: Child | None = None
    stop_grace_s: float = 5.0

    def start(self) -> Self:
        """Start the process; returns once it answers its readiness probe."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._child is not None and self._child.running

    @property
    def pid(self) -> int | None:
        """The process id while running."""
        return None if self._child is None else self._child.pid

    def ended(self) -> str | None:
        """How the process ended by itself, its log quoted; None while it runs or once stopped."""
        return None if self._child is None else self._child.ended()

    def stop(self) -> None:
        """Stop the process and reap it; a no-op when it is not running."""
        if self._child is not None:
            self._child.stop(grace_s=self.stop_grace_s)
            self._child = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def signal_name(signum: int) -> str:
    """`SIGTERM`, or `signal 77` for a number no Signals member names."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
