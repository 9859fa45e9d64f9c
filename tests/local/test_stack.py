"""The local stack's lifecycle with real processes: up, serving through Envoy, and nothing left.

Real Envoy, real Prometheus, real `aml-rollout serve` processes for real trained models. After
`stop()` (or an error while starting) no process of the stack is alive and no port is bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from rollout.core.types import Colour, Weights
from rollout.errors import DeployFailed, LocalStackError, RouterError
from rollout.local.envoy import EnvoyProcess
from rollout.local.process import Child, log_tail, pid_alive, port_is_free
from rollout.local.stack import LocalStack
from rollout.local.workloads import ScoringProcesses
from tests.local.conftest import MakeRelease

pytestmark = pytest.mark.slow


def ports_of(stack: LocalStack) -> list[int]:
    ports = [stack.envoy.port, stack.envoy.admin_port, stack.prometheus.port]
    return ports + [int(r["port"]) for r in stack.workloads.records()]


def test_serves_both_colours_through_envoy_and_stops_clean(make_release: MakeRelease) -> None:
    stack = LocalStack().start()
    try:
        stack.router.deploy(Colour.GREEN, make_release("1"))
        stack.router.deploy(Colour.BLUE, make_release("2"))
        stack.router.set_weights(Weights.blue_at(0))
        with httpx.Client(base_url=stack.url, timeout=10) as client:
            row = {"data": [[0.01] * 10]}
            default = client.post("/score", json=row).json()
            blue = client.post("/score", json=row, headers={"x-api-version": "blue"}).json()
        assert (default["colour"], default["version"]) == ("green", "1")
        assert (blue["colour"], blue["version"]) == ("blue", "2")
        pids = [p for p in stack.processes().values() if p is not None]
        ports = ports_of(stack)
        assert len(pids) == 4
    finally:
        stack.stop()
    assert not any(pid_alive(pid) for pid in pids)
    assert all(port_is_free(port) for port in ports)
    assert not stack.workdir.exists()  # a temporary stack leaves nothing behind


def test_fault_knob_makes_a_colour_fail(make_release: MakeRelease, tmp_path: Path) -> None:
    with LocalStack(tmp_path / "stack") as stack:
        stack.router.deploy(Colour.GREEN, make_release("1"))
        stack.set_fault(Colour.GREEN, 1.0)
        assert httpx.post(f"{stack.url}/score", json={"data": [[0.0] * 10]}).status_code == 500
    assert (tmp_path / "stack" / "envoy" / "envoy.json").exists()  # a given workdir is kept


def test_a_failed_start_leaves_nothing_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AML_ROLLOUT_PROMETHEUS", str(tmp_path / "no-such-prometheus"))
    stack = LocalStack(tmp_path / "stack")
    with pytest.raises(LocalStackError, match="AML_ROLLOUT_PROMETHEUS"):
        stack.start()
    assert not stack.envoy.running
    assert port_is_free(stack.envoy.admin_port)


def test_servers_started_by_a_dead_controller_are_still_stopped(
    make_release: MakeRelease, tmp_path: Path
) -> None:
    stack = LocalStack(tmp_path / "stack").start()
    try:
        # A second router on the same files, as a separate controller process would build it.
        from rollout.routers.factory import make_router

        other = make_router(stack.router_config())
        other.deploy(Colour.GREEN, make_release("1"))
        other.close()  # type: ignore[attr-defined]
        pids = [int(r["pid"]) for r in stack.workloads.records()]
        assert pids and all(pid_alive(p) for p in pids)
    finally:
        stack.stop()
    assert not any(pid_alive(p) for p in pids)
    assert not list(stack.workloads.directory.glob("*.proc.json"))


def test_a_server_stopped_by_another_controller_is_reaped_by_its_parent(
    make_release: MakeRelease, tmp_path: Path
) -> None:
    workloads = ScoringProcesses(tmp_path / "workloads")
    workloads.start(Colour.GREEN, make_release("1"))
    [pid] = [int(r["pid"]) for r in workloads.records()]
    # A controller in another process promotes past it: it stops the server but cannot reap it.
    other = "import sys; from rollout.local.workloads import ScoringProcesses as S; "
    other += "S(sys.argv[1]).stop_all()"
    subprocess.run([sys.executable, "-c", other, str(workloads.directory)], check=True, timeout=60)
    assert not pid_alive(pid)
    assert workloads.records() == []
    assert not Path(f"/proc/{pid}").exists()  # reaped, not left a zombie until we exit


@pytest.mark.parametrize(
    ("model_dir", "match"),
    [
        pytest.param(None, "has no model_dir", id="no-model-dir"),
        pytest.param("missing", "is not a folder", id="missing-folder"),
        pytest.param("empty", "did not start", id="server-refuses-the-folder"),
    ],
)
def test_a_release_that_cannot_be_served_is_deploy_failed(
    tmp_path: Path, model_dir: str | None, match: str
) -> None:
    """DeployFailed, not a RouterError to retry: the controller fails a candidate that cannot be
    served at once (a server that exits on the folder would exit again)."""
    from rollout.core.types import Release
    from rollout.errors import DeployFailed

    (tmp_path / "empty").mkdir()
    folder = None if model_dir is None else str(tmp_path / model_dir)
    with LocalStack(tmp_path / "stack") as stack:
        with pytest.raises(DeployFailed, match=match):
            stack.router.deploy(Colour.GREEN, Release("diabetes", "9", model_dir=folder))
        assert stack.router.release(Colour.GREEN) is None
        assert not list(stack.workloads.directory.glob("*.proc.json"))


def test_a_workdir_serves_again_after_a_stop_and_after_a_crash(
    make_release: MakeRelease, tmp_path: Path
) -> None:
    from rollout.routers.factory import make_router

    workdir = tmp_path / "stack"
    with LocalStack(workdir) as first:
        first.router.deploy(Colour.GREEN, make_release("1"))
        first_ports = (first.envoy.port, first.envoy.admin_port)
        # A second stack on a live one's folder would stop its servers and rewrite its routes.
        refused = LocalStack(workdir)
        with pytest.raises(LocalStackError, match=r"another local stack runs in .* \(pid \d+"):
            refused.start()
        refused.stop()  # as `up` does on any exit: the live stack's servers are not its own
        first.router.set_weights(Weights.blue_at(0))
        served = httpx.post(f"{first.url}/score", json={"data": [[0.0] * 10]}, timeout=10)
        assert served.status_code == 200  # untouched
    # A crash: Envoy and Prometheus gone, a server started by a controller in another process
    # (not tied to the stack's life) still running, its record and releases.json left behind.
    crashed = LocalStack(workdir).start()
    other = make_router(crashed.router_config())
    other.deploy(Colour.GREEN, make_release("1"))
    other.close()  # type: ignore[attr-defined]
    [left] = [int(r["pid"]) for r in crashed.workloads.records()]
    crashed.prometheus.stop()
    crashed.envoy.stop()
    crashed._unlock_workdir()  # what the kernel does when a process dies
    assert (workdir / "releases.json").exists()

    second = LocalStack(workdir).start()  # was: "envoy ... /ready not ready after 20 s"
    try:
        assert (second.envoy.port, second.envoy.admin_port) != first_ports
        assert not pid_alive(left), "a server of the previous stack outlived it"
        assert second.workloads.records() == []
        assert second.router.release(Colour.GREEN) is None
        assert second.router.served_endpoints(Colour.GREEN) == []
        second.router.deploy(Colour.GREEN, make_release("2"))
        second.router.set_weights(Weights.blue_at(0))
        served = httpx.post(f"{second.url}/score", json={"data": [[0.0] * 10]}, timeout=10)
        assert (served.status_code, served.json()["version"]) == (200, "2")
    finally:
        second.stop()


def test_a_server_that_dies_on_start_says_why_and_where_its_log_is(tmp_path: Path) -> None:
    from rollout.core.types import Release
    from rollout.errors import RouterError

    (tmp_path / "empty").mkdir()
    workloads = ScoringProcesses(tmp_path / "workloads")
    with pytest.raises(RouterError) as failed:
        workloads.start(Colour.GREEN, Release("diabetes", "9", model_dir=str(tmp_path / "empty")))
    message = str(failed.value)
    assert "did not start" in message
    assert "holds neither package.json" in message  # the cause, from the server's log
    assert str(tmp_path / "workloads" / "green-") in message and ".log" in message


@pytest.mark.parametrize("step", ["wait_ready", "_warm_up"])
def test_a_server_interrupted_while_it_starts_is_stopped(
    make_release: MakeRelease, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    # Was: Ctrl-C on `aml-rollout rollout run` while blue's server loaded left it running,
    # recorded but routed to by nothing, until the stack stopped; each resume started another.
    from rollout.local import workloads as module

    workloads = ScoringProcesses(tmp_path / "workloads")
    pids: list[int] = []

    def ctrl_c(*args: object, **kwargs: object) -> None:
        pids.extend(int(r["pid"]) for r in workloads.records())
        raise KeyboardInterrupt

    monkeypatch.setattr(module, step, ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            workloads.start(Colour.BLUE, make_release("1"))
        assert len(pids) == 1
        assert not pid_alive(pids[0])
        assert workloads.records() == []
    finally:
        workloads.stop_all()  # a failed check leaves no server behind


def disk_full(monkeypatch: pytest.MonkeyPatch, written: list[str] | None = None) -> None:
    """Every `Path.write_text` (what `write_atomically` writes with) fails as on a full disk;
    what it was asked to write is kept in `written`."""

    def write_text(self: Path, data: str, encoding: str | None = None) -> int:
        if written is not None:
            written.append(data)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", write_text)


def test_a_server_whose_record_cannot_be_written_is_stopped_and_a_router_error(
    make_release: MakeRelease, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: the record was written outside the try that stops the server: a full disk made
    # `rollout run` die with a traceback, leaving a server no record names and nothing stops.
    workloads = ScoringProcesses(tmp_path / "workloads")
    release = make_release("1")
    written: list[str] = []
    disk_full(monkeypatch, written)
    try:
        with pytest.raises(RouterError, match="No space left on device"):
            workloads.start(Colour.BLUE, release)
    finally:
        monkeypatch.undo()
        leaked = [int(json.loads(w)["pid"]) for w in written if '"pid"' in w]
        workloads.stop_all()
        for pid in leaked:  # a failed check leaves no server behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    assert len(leaked) == 1
    assert not pid_alive(leaked[0])
    assert not list(workloads.directory.glob(".*.tmp"))


def test_a_release_whose_folder_holds_another_model_is_refused(
    make_release: MakeRelease, tmp_path: Path
) -> None:
    # Was: a recorded release whose model_dir now holds another model's files (a re-run wrote
    # there) started them under its label: /score answered v1 with v2's sha256.
    workloads = ScoringProcesses(tmp_path / "workloads")
    v1, v2 = make_release("1"), make_release("2")
    stale = dataclasses.replace(v1, model_dir=v2.model_dir)
    with pytest.raises(DeployFailed, match=f"holds a model of sha256 {v2.sha256}, not {v1.sha256}"):
        workloads.start(Colour.GREEN, stale)
    assert workloads.records() == []


def test_stop_all_stops_the_servers_it_started_when_their_records_are_gone(
    make_release: MakeRelease, tmp_path: Path
) -> None:
    # Was: servers were found only through their records; with the workdir removed while the
    # stack ran, `up` said "no process left" with a server still running.
    workloads = ScoringProcesses(tmp_path / "stack" / "workloads")
    workloads.start(Colour.GREEN, make_release("1"))
    [pid] = [int(r["pid"]) for r in workloads.records()]
    shutil.rmtree(tmp_path / "stack")
    try:
        assert workloads.stop_all() == 1
        assert not pid_alive(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def test_a_stack_stops_whole_on_a_full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    # Was: stop() rewrote workloads/targets.json first, and its ENOSPC ended stop() there:
    # Envoy and Prometheus left running, the lock held, the temporary folder kept.
    stack = LocalStack().start()
    disk_full(monkeypatch)
    try:
        stack.stop()
    finally:
        monkeypatch.undo()
        stack.stop()  # a failed check leaves nothing running
    assert not stack.envoy.running and not stack.prometheus.running
    assert not stack.workdir.exists()


def test_every_part_of_a_stop_runs_and_the_first_error_is_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = LocalStack().start()
    workdir = stack.workdir

    def fails(what: str) -> Callable[..., None]:
        def stop(*args: object, **kwargs: object) -> None:
            raise OSError(errno.EIO, f"{what} could not be stopped")

        return stop

    monkeypatch.setattr(stack.workloads, "stop_all", fails("scoring servers"))
    monkeypatch.setattr(stack.prometheus, "stop", fails("prometheus"))
    try:
        with pytest.raises(OSError, match="scoring servers could not be stopped"):
            stack.stop()
        assert not stack.envoy.running
        assert stack._lock_fd is None
        assert not workdir.exists()
    finally:
        monkeypatch.undo()
        stack.prometheus.stop()


def test_envoy_or_prometheus_ending_by_itself_is_reported_with_its_log(tmp_path: Path) -> None:
    """What `up` watches: a process of the stack gone on its own (its code or signal, and why,
    from its log); nothing while they run, nor once `stop()` ended them on purpose."""
    stack = LocalStack(tmp_path / "stack")
    assert stack.envoy.ended() is None and stack.prometheus.ended() is None  # never started
    script = "import time; print('listener bind failed', flush=True); time.sleep(30)"
    envoy = Child("envoy", [sys.executable, "-c", script], log_path=tmp_path / "envoy.log")
    prometheus = Child(
        "prometheus",
        [sys.executable, "-c", "raise SystemExit(3)"],
        log_path=tmp_path / "prometheus.log",
    )
    stack.envoy._child, stack.prometheus._child = envoy.start(), prometheus.start()
    try:
        assert prometheus.process is not None and prometheus.process.wait(timeout=10) == 3
        assert stack.prometheus.ended() == "prometheus exited with code 3"  # empty log: no quote
        assert stack.envoy.ended() is None  # still runs
        prometheus.stop()
        assert stack.prometheus.ended() is None  # stopped on purpose
        deadline = time.monotonic() + 10
        while "bind failed" not in log_tail(tmp_path / "envoy.log") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert envoy.process is not None
        os.kill(envoy.process.pid, signal.SIGKILL)
        envoy.process.wait(timeout=10)
        ended = stack.envoy.ended()
        assert ended is not None and ended.startswith("envoy was killed by SIGKILL\n")
        assert ended.endswith("listener bind failed")
    finally:
        envoy.stop()
        prometheus.stop()


def test_a_log_kept_from_an_earlier_run_is_not_quoted_for_this_one(tmp_path: Path) -> None:
    """Was: logs are appended to (a folder used again), and a process that ended writing
    nothing was explained with the earlier run's last lines."""
    log = tmp_path / "envoy.log"
    log.write_text("error: the earlier run's listener failed\n")
    silent = Child("envoy", [sys.executable, "-c", "raise SystemExit(1)"], log_path=log).start()
    assert silent.process is not None and silent.process.wait(timeout=10) == 1
    assert silent.ended() == "envoy exited with code 1"
    silent.stop()
    script = "print('this run cannot bind', flush=True); raise SystemExit(1)"
    failing = Child(
        "envoy", [sys.executable, "-c", script], log_path=log, ready_url="http://127.0.0.1:1/"
    )
    with pytest.raises(LocalStackError) as failed:
        failing.start(ready_timeout_s=10)
    assert "this run cannot bind" in str(failed.value)
    assert "earlier run" not in str(failed.value)
    assert "earlier run" in log.read_text()  # kept, only not quoted


def shared_memory_of(pid: int) -> set[str]:
    """The /dev/shm files a process maps (Envoy's hot restart maps envoy_shared_memory_<id>)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {line.split()[-1] for line in maps.splitlines() if "/dev/shm/" in line}


def test_envoys_side_by_side_leave_nothing_in_dev_shm(tmp_path: Path) -> None:
    """Was: started with hot restart (`--use-dynamic-base-id`), every Envoy made a
    /dev/shm/envoy_shared_memory_<id> that nothing removed, even after a clean stop (1,939 of
    them on one machine). Read from /proc: a parallel test's Envoy must not count here."""
    envoys = [EnvoyProcess(tmp_path / name) for name in ("a", "b")]
    try:
        for envoy in envoys:
            envoy.start()
        mapped = {path for envoy in envoys if envoy.pid for path in shared_memory_of(envoy.pid)}
        assert all(httpx.get(f"{e.admin_url}/ready").status_code == 200 for e in envoys)
        assert envoys[0].port != envoys[1].port
    finally:
        for envoy in envoys:
            envoy.stop()
    assert mapped == set()
    assert not [path for path in mapped if Path(path).exists()]  # none left after the stop


@pytest.mark.parametrize(
    ("signum", "expected"),
    [
        pytest.param(signal.SIGTERM, RouterError, id="sigterm-the-stacks-stop-is-retried"),
        pytest.param(signal.SIGKILL, RouterError, id="sigkill-an-oom-kill-is-retried"),
        pytest.param(signal.SIGSEGV, DeployFailed, id="sigsegv-a-crash-on-its-model-fails"),
    ],
)
def test_a_server_killed_while_it_loads_is_retried_not_deploy_failed(
    make_release: MakeRelease, tmp_path: Path, signum: signal.Signals, expected: type
) -> None:
    """Was: any server that ended before /readyz was DeployFailed, which fails the candidate
    for good: `up` stopped while blue loaded (its SIGTERM), an operator's kill or the OOM
    killer ended a rollout Failed with nothing wrong in its model, although it should resume
    once `up` is back. Killed from outside is a RouterError (retried); a crash is the model's."""
    workloads = ScoringProcesses(tmp_path / "workloads")
    killed: list[int] = []

    def kill_once_recorded() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            records = list(workloads.directory.glob("*.proc.json"))
            if records:
                pid = int(json.loads(records[0].read_text())["pid"])
                time.sleep(0.2)  # loading: its record written, /readyz not answered yet
                os.killpg(pid, signum)
                killed.append(pid)
                return
            time.sleep(0.01)

    import threading

    killer = threading.Thread(target=kill_once_recorded, daemon=True)
    killer.start()
    with pytest.raises(RouterError) as failed:
        workloads.start(Colour.BLUE, make_release("2"))
    killer.join(timeout=30)
    assert killed, "the server was never seen loading"
    assert type(failed.value) is expected
    if expected is RouterError:
        assert f"killed by {signum.name} from outside" in str(failed.value)
    assert not pid_alive(killed[0])
    assert not list(workloads.directory.glob("*.proc.json"))


@pytest.mark.parametrize(
    ("option", "says"),
    [
        pytest.param({}, "use another folder (--workdir)", id="up"),
        pytest.param({"folder_option": "--out"}, "use another folder (--out)", id="demo"),
    ],
)
def test_a_folder_in_use_is_refused_naming_the_option_that_chooses_it(
    tmp_path: Path, option: dict[str, str], says: str
) -> None:
    # Was "stop it, or use another folder" after two `demo`s started in the same second: the
    # user had chosen no folder, and was not told how to choose one.
    first = LocalStack(tmp_path, **option)
    first._lock_workdir()
    try:
        with pytest.raises(LocalStackError) as refused:
            LocalStack(tmp_path, **option)._lock_workdir()
        assert str(refused.value).endswith(f"): stop it, or {says}")
    finally:
        assert first._lock_fd is not None
        os.close(first._lock_fd)
