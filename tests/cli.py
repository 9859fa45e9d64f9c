"""The `aml-rollout` command as a subprocess: this interpreter, whatever is on PATH."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

CLI = [
    sys.executable,
    "-c",
    "import sys; from rollout.cli import main; sys.argv[0] = 'aml-rollout'; main()",
]


def run_cli(
    *args: str, timeout: float = 60, columns: int = 200
) -> subprocess.CompletedProcess[str]:
    """`aml-rollout ARGS` as a user runs it, in a terminal `columns` wide (one line per error)."""
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "COLUMNS": str(columns)},
    )


def stop_and_wait(
    process: subprocess.Popen[Any], signum: int = signal.SIGTERM, timeout: float = 60
) -> tuple[Any, Any]:
    """Send `signum`, then wait for the process and return the rest of its (stdout, stderr),
    as `communicate` does (None for a stream not piped).

    One that outlives `timeout` is killed before TimeoutExpired goes up: a test failing there
    leaves nothing running (its children die with it: the parent-death signal).
    """
    process.send_signal(signum)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return out, err


def invoke_rollout(*args: str) -> tuple[int, str]:
    """`aml-rollout rollout ARGS` in this process (typer's CliRunner): its exit code and output."""
    from typer.testing import CliRunner

    from rollout.cli import app

    result = CliRunner().invoke(app, ["rollout", *args])
    return result.exit_code, result.output


def one_line(text: str) -> str:
    """`text` with its folds and runs of blanks made single spaces (rich folds long lines)."""
    return " ".join(text.split())
