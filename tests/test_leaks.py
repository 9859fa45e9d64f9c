"""The leak detector of the test suite (`tests.leaks`) finds what carries its tag, and kills it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rollout.local.process import pid_alive
from tests import leaks


def test_a_tagged_process_is_found_with_its_test_and_killed() -> None:
    tag = leaks.new_tag()
    env = {**os.environ, leaks.TAG: tag}
    with (
        subprocess.Popen(["sleep", "60"], env=env, start_new_session=True) as tagged,
        # The same command with this session's tag only: not a leak of `tag`.
        subprocess.Popen(["sleep", "60"], start_new_session=True) as untagged,
    ):
        try:
            found = leaks.tagged_processes(tag)
            assert [(leak.pid, leak.command) for leak in found] == [(tagged.pid, "sleep 60")]
            assert found[0].test == os.environ["PYTEST_CURRENT_TEST"]
            assert leaks.tagged_processes(tag, exclude={tagged.pid}) == []
            leaks.kill(found)
            assert tagged.wait(timeout=5) == -signal.SIGTERM  # by PID
            assert pid_alive(untagged.pid)
        finally:
            tagged.kill()
            untagged.kill()


@pytest.mark.parametrize(
    ("tag", "alive"),
    [
        pytest.param(leaks.new_tag(), True, id="this-session"),
        pytest.param(f"{os.getpid()}:0:x", False, id="its-pid-now-another-process"),
        pytest.param("999999999:1:x", False, id="its-controller-gone"),
        pytest.param("not-ours", True, id="another-shape-assumed-alive"),
    ],
)
def test_a_session_is_alive_while_its_controller_runs(tag: str, alive: bool) -> None:
    assert leaks.session_alive(tag) is alive


def test_what_a_killed_session_left_is_found_with_its_test() -> None:
    env = {**os.environ, leaks.TAG: f"{os.getpid()}:0:killed"}  # a controller no longer there
    with subprocess.Popen(["sleep", "60"], env=env, start_new_session=True) as orphan:
        try:
            # Until the child execs, /proc shows its parent's environment (this live session's
            # tag): on a loaded machine the scan could come first and find nothing.
            deadline = time.monotonic() + 10
            while Path(f"/proc/{orphan.pid}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":
                assert time.monotonic() < deadline, "sleep never started"
                time.sleep(0.01)
            found = [leak for leak in leaks.left_by_dead_sessions() if leak.pid == orphan.pid]
            assert [leak.test for leak in found] == [os.environ["PYTEST_CURRENT_TEST"]]
        finally:
            orphan.kill()


def test_stop_and_wait_kills_a_process_that_outlives_its_timeout() -> None:
    """A test failing at its stop step (the process ignores SIGTERM) leaves nothing running."""
    from tests.cli import stop_and_wait

    ignores = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"  # noqa: E501
    process = subprocess.Popen([sys.executable, "-c", ignores], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    with pytest.raises(subprocess.TimeoutExpired):
        stop_and_wait(process, timeout=0.3)
    assert process.returncode == -signal.SIGKILL
