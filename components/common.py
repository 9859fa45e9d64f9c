"""Helpers every component's `main.py` shares: logging setup, run identity, JSON files.

Components run as `python -m components.<step>.main` both in Azure ML and under the local runner,
so these helpers use only the standard library and never import azure.ai.ml.
"""

from __future__ import annotations

import logging
import os
import subprocess

from aml_pipelines.fileio import read_json, sha256_file, write_json

__all__ = [
    "git_commit",
    "parse_bool",
    "read_json",
    "run_id",
    "setup_logging",
    "sha256_file",
    "write_json",
]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging() -> None:
    """Log INFO and above to stderr (Azure ML captures it in the step's std_log)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


def run_id() -> str:
    """The Azure ML run id when running in Azure, the local runner's run id locally."""
    return os.environ.get("AZUREML_RUN_ID") or os.environ.get("AML_ROLLOUT_RUN_ID") or "unknown"


def git_commit() -> str:
    """The source commit: $GIT_COMMIT (set by CI or the runner), else `git rev-parse HEAD`."""
    if commit := os.environ.get("GIT_COMMIT"):
        return commit
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def parse_bool(text: str) -> bool:
    """Parse a boolean as Azure ML renders it on a command line ("True"/"False")."""
    lowered = text.strip().lower()
    if lowered in {"true", "1", "yes"}:
        return True
    if lowered in {"false", "0", "no", ""}:
        return False
    raise ValueError(f"not a boolean: {text!r}")
