"""benchmarks/pipeline.py: its JSON line, bad --repeat, and a failing command as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchmarks.pipeline as bench


def _fake_cli(tmp_path: Path, body: str) -> str:
    script = tmp_path / "aml-rollout"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_one_json_line_with_one_time_per_repetition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "CLI", _fake_cli(tmp_path, "exit 0"))
    assert bench.main(["--repeat", "2", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    payload = json.loads(lines[-1])
    assert set(payload) == {"help_s", "validate_s", "build_s", "run_local_s", "load_average"}
    assert all(len(payload[name]) == 2 for name in bench.COMMANDS)


def test_a_failing_command_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = _fake_cli(tmp_path, 'case "$1" in pipeline) echo "error: boom" >&2; exit 3;; esac')
    monkeypatch.setattr(bench, "CLI", cli)
    assert bench.main(["--json"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "error: `aml-rollout pipeline validate` exited 3: error: boom\n"


@pytest.mark.parametrize("repeat", ["0", "-1"])
def test_repeat_must_be_at_least_one(capsys: pytest.CaptureFixture[str], repeat: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--repeat", repeat])
    assert exit_info.value.code == 2
    assert "--repeat must be at least 1" in capsys.readouterr().err


def test_a_hung_command_fails_after_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "CLI", _fake_cli(tmp_path, "exec sleep 30"))
    monkeypatch.setattr(bench, "TIMEOUT_S", 0.5)
    assert bench.main(["--repeat", "1"]) == 1
    assert capsys.readouterr().err == "error: `aml-rollout --help` ran over 0.5 s\n"
