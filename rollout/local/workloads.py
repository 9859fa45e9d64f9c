"""Scoring processes as the Envoy router's workloads: one `aml-rollout serve` per deployed release.

`start(colour, release)` runs `aml-rollout serve --model-dir <release.model_dir> --colour C
--fd N --version V` in its own session and returns once `/readyz` answers; the router then
points the colour's EDS file at it. N is a socket this process binds on a port the OS picks and
hands down: the port is the server's from the start, so no other process (a parallel test's
Envoy or Prometheus) can take it between choosing and binding, as it once did when the port was
chosen here and bound by the server. Each process is recorded in `directory` as one JSON file
(pid, kernel start time, port, colour, release) *before* we wait for it, so a process
started by a controller that is SIGKILLed a moment later is still found and stopped by the stack.
Processes outlive the controller on purpose: the data plane keeps serving while a controller
restarts, as pods do on Kubernetes. The one exception is `die_with_parent=True`, which
`LocalStack` sets for its own instance: a server started by the process that owns Envoy (the
demo, `up`, an in-process controller) is useless once that process is gone, so Linux stops it
with its owner even after a SIGKILL (see `rollout.local.process`). A controller in another
process (`aml-rollout rollout run` against the stack) builds its own instance without it, so
its servers survive its restart.

For the local Prometheus, the live processes are also listed in `targets.json` (file service
discovery), so each scoring server's own /metrics is scraped with its colour as a label.

`faults` is the demo knob: a release whose version is listed (or any release, under "*")
starts with the scoring server's fault injection on (`--fault-error-rate`), so the demo and the
e2e tests can roll out a candidate that misbehaves. It is logged loudly and never set by
anything but the demo and tests.

A new server gets a few scoring requests before it is handed to Envoy (its first requests pay
for lazy imports and allocations), so a canary is not judged on its cold start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from rollout.core.types import Colour, Release
from rollout.errors import DeployFailed, LocalStackError, RouterError
from rollout.local.process import (
    Child,
    kill_group,
    listening_socket,
    pid_alive,
    pid_start_time,
    quoted_log_tail,
    signal_name,
    wait_ready,
)
from rollout.routers.envoy import Endpoint, write_atomically

log = logging.getLogger(__name__)

#: How long a scoring server may take to load its model and answer /readyz.
READY_TIMEOUT_S = 60.0
#: Scoring requests a new server answers before it gets traffic.
WARM_UP_REQUESTS = 20
#: Servers started by this Python process, by PID: kept so they are reaped (not left zombies, and
#: without Popen's "still running" warning) whichever ScoringProcesses instance stops them, or,
#: when a controller in another process stopped them, by `reap()` (`_reap_exited`).
_OWN: dict[int, Child] = {}
_SERVE = "import sys; from rollout.cli import main; sys.argv[0] = 'aml-rollout'; main()"


class ScoringProcesses:
    """Workloads backed by local scoring server processes, recorded in `directory`."""

    def __init__(
        self,
        directory: Path,
        *,
        faults: Mapping[str, float] | None = None,
        host: str = "127.0.0.1",
        ready_timeout_s: float = READY_TIMEOUT_S,
        die_with_parent: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.die_with_parent = die_with_parent
        self.faults = dict(faults or {})
        self.host = host
        self.ready_timeout_s = ready_timeout_s

    def _serve_argv(self, release: Release, model_dir: str, colour: Colour, fd: int) -> list[str]:
        """`aml-rollout serve` for `release` (in `model_dir`) as `colour` on the socket `fd`."""
        argv = [sys.executable, "-c", _SERVE, "serve", "--model-dir", model_dir,
                "--colour", colour.value, "--fd", str(fd), "--log-level", "warning"]  # fmt: skip
        recorded = package_of(Path(model_dir))
        if recorded is None or recorded[1].get("version") in (None, ""):
            # A bare model folder (or a package that records no version) is served as the
            # release names it; a package's own version is the one it answers (`_check_model`
            # refused one naming another).
            argv += ["--version", release.version]
        fault = self.faults.get(release.version, self.faults.get("*", 0.0))
        if fault:
            log.warning(
                "demo knob: %s:%s starts with fault injection on (%.0f %% errors)",
                release.model,
                release.version,
                fault * 100,
            )
            argv += ["--fault-error-rate", str(fault)]
        return argv

    def start(self, colour: Colour, release: Release) -> Endpoint:
        """Start a scoring server for `release`; returns once it is ready."""
        # What is wrong with the release itself is DeployFailed: an answer, no retry helps.
        if not release.model_dir:
            raise DeployFailed(
                f"cannot deploy {release.ref} to {colour.value} locally: "
                "the release has no model_dir (a package or model folder)"
            )
        if not Path(release.model_dir).is_dir():
            raise DeployFailed(
                f"cannot deploy to {colour.value}: {release.model_dir} is not a folder"
            )
        _check_model(colour, release)
        # Closed once the child started: it holds its own copy, and ours would keep the port
        # bound after the server ends.
        with listening_socket(self.host) as sock:
            port: int = sock.getsockname()[1]
            ref = f"{colour.value}-{port}"
            self.directory.mkdir(parents=True, exist_ok=True)
            log_path = self.directory / f"{ref}.log"
            child = Child(
                f"scoring server {ref}",
                self._serve_argv(release, release.model_dir, colour, sock.fileno()),
                log_path=log_path,
                ready_url=None,
                die_with_parent=self.die_with_parent,
                pass_fds=(sock.fileno(),),
            )
            child.start()
        assert child.pid is not None
        _OWN[child.pid] = child
        record = {
            "ref": ref,
            "pid": child.pid,
            "start_time": pid_start_time(child.pid),
            "host": self.host,
            "port": port,
            "colour": colour.value,
            "release": {"model": release.model, "version": release.version},
        }
        try:
            # In the try: a server no record names would outlive everything (was: a full
            # disk here left one running, and `rollout run` died with a traceback).
            write_atomically(self._record_path(ref), record)
            wait_ready(
                f"http://{self.host}:{port}/readyz",
                timeout_s=self.ready_timeout_s,
                alive=lambda: child.running,
            )
            _warm_up(f"http://{self.host}:{port}/score", Path(release.model_dir))
            self._write_targets()
        except LocalStackError as exc:
            # Read before the discard, which forgets the process.
            refused, how = _how_it_ended(child)
            self._discard(child.pid, ref)
            # The cause (a bad model folder, a traceback) is in the server's own log.
            error = DeployFailed if refused else RouterError
            raise error(
                f"scoring server for {colour.value} did not start: {exc}{how}"
                f"{quoted_log_tail(log_path)}"
            ) from None
        except BaseException:
            # Ctrl-C or SIGTERM while it loads, or its record not written (a RouterError):
            # nothing routes to it yet and no one would stop it before the stack does (a
            # resumed rollout starts another one).
            self._discard(child.pid, ref)
            raise
        log.info("%s serves %s:%s on port %d", colour.value, release.model, release.version, port)
        return Endpoint(self.host, port, ref)

    def stop(self, endpoint: Endpoint) -> None:
        """Stop the server behind `endpoint` (if it is still the process we started)."""
        record = self._read(endpoint.ref)
        if record is not None and _same_process(record):
            _stop(int(record["pid"]))
        with contextlib.suppress(FileNotFoundError):
            self._record_path(endpoint.ref).unlink()
        self._write_targets()

    def _discard(self, pid: int, ref: str) -> None:
        """Stop a server that failed to start, by its pid (it may have no record), and forget
        it; a file that cannot be written now must not hide why it failed."""
        if pid in _OWN:  # else it ended and was reaped: its pid may be another's now
            _stop(pid)
        with contextlib.suppress(FileNotFoundError):
            self._record_path(ref).unlink()
        with contextlib.suppress(RouterError):
            self._write_targets()

    def alive(self, endpoint: Endpoint) -> bool:
        """Whether the server behind `endpoint` still runs."""
        record = self._read(endpoint.ref)
        return record is not None and _same_process(record)

    def stop_all(self, *, targets: bool = True) -> int:
        """Stop every recorded server, and every server this process started here that has no
        record (its folder removed); returns how many were running. `targets=False` leaves
        targets.json as it is (at the stack's shutdown: no Prometheus reads it any more)."""
        stopped = 0
        for record in self.records():
            if _same_process(record):
                _stop(int(record["pid"]))
                stopped += 1
            with contextlib.suppress(FileNotFoundError):
                self._record_path(str(record["ref"])).unlink()
        for pid, child in list(_OWN.items()):
            if child.log_path.parent == self.directory:
                stopped += child.running
                _stop(pid)
        if targets:
            self._write_targets()
        return stopped

    def reap(self) -> None:
        """Collect the exit status of servers this process started that have ended since.

        One that a controller in another process stopped stays a zombie here (only its parent
        can reap it) until this runs; `records()` runs it too. A long-lived owner (`up`) calls it
        in its loop. It polls our own Popen objects, never `waitpid(-1)`: that would take the
        exit status of children other code waits for.
        """
        _reap_exited()

    def records(self) -> list[dict[str, Any]]:
        """Every recorded server, running or not."""
        _reap_exited()
        found = []
        for path in sorted(self.directory.glob("*.proc.json")):
            record = self._read(path.name.removesuffix(".proc.json"))
            if record is not None:
                found.append(record)
        return found

    def endpoint_of(self, colour: Colour) -> Endpoint | None:
        """The newest live server of `colour` (for the fault knob and `up`'s listing)."""
        live = [r for r in self.records() if r["colour"] == colour.value and _same_process(r)]
        if not live:
            return None
        newest = max(live, key=lambda r: int(r["pid"]))
        return Endpoint(str(newest["host"]), int(newest["port"]), str(newest["ref"]))

    # ------------------------------------------------------------------------------- internals

    def _record_path(self, ref: str) -> Path:
        return self.directory / f"{ref}.proc.json"

    def _read(self, ref: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self._record_path(ref).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data

    def _write_targets(self) -> None:
        groups = [
            {
                "targets": [f"{r['host']}:{r['port']}"],
                "labels": {"colour": r["colour"], "version": r["release"]["version"]},
            }
            for r in self.records()
            if _same_process(r)
        ]
        if not self.directory.is_dir():
            return  # no server was ever started here: no target to list (and maybe no folder)
        write_atomically(self.directory / "targets.json", groups)


def _warm_up(url: str, model_dir: Path, requests: int = WARM_UP_REQUESTS) -> None:
    """Send a few real rows (errors ignored: a faulty server is still warm)."""
    rows: list[Any] = [[0.0] * 10]
    for candidate in (model_dir / "sample-input.json", model_dir / "model" / "sample-input.json"):
        if candidate.is_file():
            with contextlib.suppress(OSError, ValueError, KeyError):
                rows = json.loads(candidate.read_text(encoding="utf-8"))["data"] or rows
            break
    with httpx.Client(timeout=5.0) as client:
        for i in range(requests):
            with contextlib.suppress(httpx.HTTPError):
                client.post(url, json={"data": [rows[i % len(rows)]]})


def package_of(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The package.json of the package in `folder` (as `resolve_model_dir` finds it) and what
    it records; None for a bare model folder, or one that cannot be read (the server's own load
    says why)."""
    from scoring.errors import ModelLoadError
    from scoring.model import PACKAGE_JSON, resolve_model_dir

    try:
        model_dir, package = resolve_model_dir(folder)
    except ModelLoadError:
        return None
    return None if package is None else (model_dir.parent / PACKAGE_JSON, package)


def other_release(release: Release) -> tuple[Path, str, list[str]] | None:
    """When the package in `release.model_dir` records another model or version than the
    release names: its package.json, the release it records (`model:version`) and the words
    for what differs (`model iris`, `version 3`). None when it records this release, or none
    (a bare model folder, or a package.json without the field: the release's name is taken).

    Was not checked: a spec whose `version:` was bumped, `model_dir:` forgotten, served the old
    package as the new version (the sha256 check passed: the spec's was the old one's too),
    and the rollout promoted a release nobody had served.
    """
    recorded = package_of(Path(release.model_dir)) if release.model_dir else None
    if recorded is None:
        return None
    path, package = recorded
    model, version = package.get("model"), package.get("version")
    differs = [
        f"{field} {named}"
        for field, named, held in (
            ("model", release.model, model),
            ("version", release.version, version),
        )
        if held not in (None, "") and str(held) != named
    ]
    if not differs:
        return None
    held_ref = (
        f"{model if model not in (None, '') else release.model}:"
        f"{version if version not in (None, '') else '(no version)'}"
    )
    return path, held_ref, differs


def _check_model(colour: Colour, release: Release) -> None:
    """DeployFailed when the release's folder holds another model than the release names.

    A recorded release may point at a folder a later run wrote another model into (a re-run
    reusing its package path): its server would serve that model under the release's label.
    A package whose package.json records another model or version would answer under the
    release's label too (`other_release`). A folder whose model.json cannot be read is left to
    the server, which says why in its log.
    """
    if release.model_dir is None:
        return
    # Refused for green, the candidate is a promotion's (a rollout begun before this check, or
    # its folder rewritten since): it is no release to promote; an abort sends all traffic
    # back to green's release.
    way_out = (
        "; if a rollout is promoting it, abort that rollout (`aml-rollout rollout abort SPEC`, "
        "then `run`): all traffic goes back to green's release"
        if colour is Colour.GREEN
        else ""
    )
    other = other_release(release)
    if other is not None:
        path, held_ref, _ = other
        raise DeployFailed(
            f"cannot deploy {release.ref} to {colour.value}: {release.model_dir} is the package "
            f"of {held_ref} ({path}), not of {release.ref}{way_out}"
        )
    if not release.sha256:
        return
    from scoring.model import recorded_sha256

    _, found = recorded_sha256(Path(release.model_dir))
    if found is not None and found != release.sha256:
        raise DeployFailed(
            f"cannot deploy {release.ref} to {colour.value}: {release.model_dir} holds a model "
            f"of sha256 {found}, not {release.sha256} (another model was written there "
            f"since){way_out}"
        )


#: Signals a process raises on itself when it crashes (a native library loading the model):
#: the release's own doing, as an exit is. Any other came from outside: an operator's `kill`,
#: the OOM killer's SIGKILL, the stack's stop (SIGTERM) while it loaded.
_CRASHES = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT})


def _how_it_ended(child: Child) -> tuple[bool, str]:
    """For a server that did not start: whether it ended by its release's doing (it exited by
    itself: a model it cannot load; or crashed) — DeployFailed then, which fails the candidate
    for good — and, for one a signal from outside ended, words saying so.

    Not one still running (slow: a loaded machine), nor one killed from outside: was
    DeployFailed too, so stopping `up` while blue loaded (or an OOM kill) ended its rollout
    Failed, with nothing wrong in the model, where a RouterError is retried and the rollout
    resumes once `up` is back.
    """
    code = None if child.process is None else child.process.poll()
    if code is None:
        return False, ""
    if code >= 0 or -code in _CRASHES:
        return True, ""
    return False, (
        f" (killed by {signal_name(-code)} from outside, not ended by its model: the deploy is "
        "retried, and a rollout resumes once the stack serves again)"
    )


def _stop(pid: int) -> None:
    own = _OWN.pop(pid, None)
    if own is not None:
        own.stop()
    else:
        kill_group(pid)


def _reap_exited() -> None:
    # Only the parent can reap a child: one that a controller in another process stopped (it
    # promoted or rolled back past it) is a zombie here, and its record is gone, until we poll it.
    for pid, child in list(_OWN.items()):
        if not child.running:  # the poll collects its exit status
            del _OWN[pid]


def _same_process(record: Mapping[str, Any]) -> bool:
    pid = int(record["pid"])
    return pid_alive(pid) and pid_start_time(pid) == record.get("start_time")
