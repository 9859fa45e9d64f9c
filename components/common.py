"""Helpers every component's `main.py` shares: logging setup, run identity, JSON files.

Components run as `python -m components.<step>.main` both in Azure ML and under the local runner,
so these helpers use only the standard library and never import azure.ai.ml.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

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
    """Log INFO and above to stderr (Azure ML captures it in the step's std_log), the Azure SDKs
    only what a user acts on (no HTTP request dumps, no list of every credential tried), and
    httpx only its warnings: at INFO it logs every request's full URL, and a notification's
    (rollout.notify) is an incoming webhook's, whose path is its secret. The trigger's
    `watch`/`serve` log the same way (aml_pipelines.trigger.cli)."""
    from rollout.azure_credential import quiet_azure_logs

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    quiet_azure_logs()
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_id() -> str:
    """The Azure ML run id when running in Azure, the local runner's run id locally."""
    return os.environ.get("AZUREML_RUN_ID") or os.environ.get("AML_ROLLOUT_RUN_ID") or "unknown"


#: The packages a job's code snapshot holds (build.stage_code), whose changes make it "-dirty".
CODE_PACKAGES = ("aml_pipelines", "components", "rollout", "scoring")
#: The folder holding those packages: the checkout locally, the code snapshot in Azure ML.
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The source commit (`source_commit`), or "unknown"."""
    return source_commit() or "unknown"


def source_commit(root: Path = SOURCE_ROOT, env: Mapping[str, str] = os.environ) -> str | None:
    """The commit of the code a job runs: $GIT_COMMIT, else `git rev-parse HEAD` of `root`.

    "-dirty" is appended when the packages that are staged (CODE_PACKAGES) differ from HEAD
    (changed or untracked files). None when `root` is not a git checkout and GIT_COMMIT is unset.
    """
    if commit := env.get("GIT_COMMIT"):
        return commit

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        # Only the project's own checkout: installed into a virtualenv inside another git
        # project, `root` would answer with that project's HEAD.
        if Path(git("rev-parse", "--show-toplevel")).resolve() != Path(root).resolve():
            return None
        head = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--", *CODE_PACKAGES)
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if changed else head


def parse_bool(text: str) -> bool:
    """Parse a boolean as Azure ML renders it on a command line ("True"/"False")."""
    lowered = text.strip().lower()
    if lowered in {"true", "1", "yes"}:
        return True
    if lowered in {"false", "0", "no", ""}:
        return False
    raise ValueError(f"not a boolean: {text!r}")
