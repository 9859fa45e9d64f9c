"""The leak detector of the test suite (`tests.leaks`) finds what carries its tag, and kills it."""

from __future__ import annotations

import os
import signal
import subprocess

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
