"""`aml-rollout rollout status`: the table says one thing about a rollout, the thing that is so
(which step blue is at, which colour serves which release, which answer works)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rollout.cli import app
from rollout.commands.rollout import EXIT_RUNNING
from tests.engine.specs import write_spec

runner = CliRunner()


def status_cli(spec: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["rollout", "status", str(spec)])
    return result.exit_code, result.output


def plain(table: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", table)


@pytest.mark.parametrize(
    "release",
    [
        pytest.param("m:1", id="a-string"),
        pytest.param(None, id="null"),
        pytest.param(["m", "1"], id="a-list"),
    ],
)
def test_status_tells_a_bootstrap_line_of_another_shape_without_a_traceback(
    tmp_path: Path, release: object
) -> None:
    # Measured: `AttributeError: 'str' object has no attribute 'get'`, exit 1, on a hand-edited
    # bootstrap line, where `explain` of the same ledger says "bootstrapped green with ?:?".
    spec = write_spec(tmp_path)
    (tmp_path / "state").mkdir()
    line = {"at": 1.0, "by": "ann", "event": "bootstrap", "release": release}
    (tmp_path / "state" / "cli.ledger.jsonl").write_text(json.dumps(line) + "\n")
    code, out = status_cli(spec)
    assert code == EXIT_RUNNING, out
    assert "not started" in out
    assert "?:? with all traffic, bootstrapped" in plain(out)
