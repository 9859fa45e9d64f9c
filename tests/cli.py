"""The `aml-rollout` command as a subprocess's argv: this interpreter, whatever is on PATH."""

from __future__ import annotations

import sys

CLI = [
    sys.executable,
    "-c",
    "import sys; from rollout.cli import main; sys.argv[0] = 'aml-rollout'; main()",
]
