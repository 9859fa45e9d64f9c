"""The `aml-rollout` command as a subprocess: this interpreter, whatever is on PATH."""

from __future__ import annotations

import os
import subprocess
import sys

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
