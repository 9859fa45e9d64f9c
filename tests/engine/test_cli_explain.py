"""`explain` of a spec named in capitals and of a ledger torn before its first line.

Findings of a review of the operator CLI: `explain` took a spec only by a lower-case `.yaml`
or `.yml` (`status` takes any name), and refused as "not a rollout ledger" a rollout's own
ledger torn twice before its first complete line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rollout.commands.rollout import EXIT_ERROR
from tests.cli import invoke_rollout as invoke
from tests.cli import one_line
from tests.engine.specs import write_spec


@pytest.mark.parametrize("name", ["DRY.YAML", "dry.Yml", "dry.yaml"])
def test_explain_takes_a_spec_whatever_the_case_of_its_suffix(tmp_path: Path, name: str) -> None:
    # Was "DRY.YAML is not a rollout ledger (no ledger lines)", which `status` took as a spec.
    spec = write_spec(tmp_path, metrics={"kind": "static", "ticks": []})
    from rollout.api import run_rollout
    from rollout.controller import FakeClock

    run_rollout(spec, clock=FakeClock(0.0), max_ticks=1)
    named = shutil.copy(spec, tmp_path / name)
    code, out = invoke("explain", str(named))
    assert code == 0, out
    assert "started rollout cli" in out


@pytest.mark.parametrize(
    ("content", "said"),
    [
        pytest.param(
            b'{"at": 1796211847.79, "candidate": {"dep',
            "the ledger is empty but for a torn line",
            id="torn-once",
        ),
        pytest.param(
            b'{"at": 1796211847.79, "candidate": {"dep#torn\n{"at": 1796211850.1, "cand',
            "the ledger is empty but for torn lines",
            id="torn-twice",
        ),
        pytest.param(
            b'{"at": 1#torn\n{"actions": [#torn\n{"at',
            "the ledger is empty but for torn lines",
            id="torn-three-times",
        ),
        pytest.param(
            b'{"at": 1796211847.79, "cand#torn\n',
            "the ledger is empty but for a torn line",
            id="ended-by-a-torn-line-with-nothing-after",
        ),
    ],
)
def test_explain_of_a_ledger_torn_before_its_first_line(
    tmp_path: Path, content: bytes, said: str
) -> None:
    # Torn twice was "not a rollout ledger (no ledger lines)": the first fragment, ended by
    # the next append's `#torn`, is a complete line.
    ledger = tmp_path / "t.ledger.jsonl"
    ledger.write_bytes(content)
    code, out = invoke("explain", str(ledger))
    assert code == 0, out
    assert one_line(out).startswith(said), out


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"hello#torn\n", id="a-word-ended-torn"),
        pytest.param(b'{"name": "x"}#torn\n{"at', id="another-tools-json-ended-torn"),
        pytest.param(b'{"at": 1#torn\nhello\n{"at', id="a-word-between-torn-lines"),
        pytest.param(b"#torn\n", id="torn-marker-alone"),
    ],
)
def test_explain_still_refuses_what_is_no_torn_ledger(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    code, out = invoke("explain", str(path))
    assert code == EXIT_ERROR, out
    assert "is not a rollout ledger (no ledger lines)" in one_line(out), out
