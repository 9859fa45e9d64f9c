"""Helpers every component's `main.py` shares: logging setup, atomic JSON writes, run identity.

Components run as `python -m components.<step>.main` both in Azure ML and under the local runner,
so these helpers use only the standard library and never import azure.ai.ml.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging() -> None:
    """Log INFO and above to stderr (Azure ML captures it in the step's std_log)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


def write_json(path: Path, payload: Any) -> None:
    """Write `payload` as indented JSON, atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2, sort_keys=True)
            fh.write("\n")
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    """Read a JSON file."""
    return json.loads(path.read_text(encoding="utf-8"))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
