"""`aml-rollout rollout status`: the table says one thing about a rollout, the thing that is so
(which step blue is at, which colour serves which release, which answer works)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from rollout.api import load_spec, open_store, run_rollout
from rollout.cli import app
from rollout.commands.rollout import EXIT_ERROR, EXIT_PAUSED, EXIT_RUNNING, _status_view
from rollout.controller import FakeClock
from rollout.core.status import Status
from tests.engine.specs import write_spec

runner = CliRunner()


def status_cli(spec: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["rollout", "status", str(spec)])
    return result.exit_code, result.output


def rendered(spec: Path, status: Status) -> str:
    """The status table as a terminal gets it, styles kept (the plan's step is reversed)."""
    console = Console(record=True, width=200, force_terminal=True, color_system="standard")
    console.print(_status_view(load_spec(spec), status, None))
    return console.export_text(styles=True)


def highlighted(table: str) -> list[str]:
    """The plan steps shown reversed (bold + reverse: ESC[1;7m)."""
    return re.findall(r"\x1b\[1;7m(\d+)\x1b\[0m", table)


def plain(table: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", table)


def held_off_plan(tmp_path: Path) -> Path:
    """A rollout at blue 80 % whose `steps` were then edited to no longer have 80, run once
    more: held for a human (its evidence passing the step meanwhile)."""
    spec = write_spec(tmp_path, 0.01, steps=[10, 50, 80, 100])
    result = run_rollout(load_spec(spec), clock=FakeClock(0.0), max_ticks=3)
    assert result.status.blue_weight == 80
    data = yaml.safe_load(spec.read_text())
    data["steps"] = [10, 25, 50, 100]
    spec.write_text(yaml.safe_dump(data))
    return spec


def test_after_a_steps_edit_the_plan_highlights_blues_weight_not_the_stored_index(
    tmp_path: Path,
) -> None:
    # Measured: `plan 10 → 25 → [50] → 100` beside `blue 80 % / green 20 %` (step index 2 of the
    # old plan [10, 50, 80, 100] applied to the new one), before the next run and once held.
    spec = write_spec(tmp_path, 0.01, steps=[10, 50, 80, 100])
    run_rollout(load_spec(spec), clock=FakeClock(0.0), max_ticks=2)  # blue at 50 %, index 1
    data = yaml.safe_load(spec.read_text())
    data["steps"] = [10, 25, 50, 100]  # 50 % is step 3 now
    spec.write_text(yaml.safe_dump(data))
    status = open_store(load_spec(spec)).load()
    assert status is not None and status.blue_weight == 50
    assert highlighted(rendered(spec, status)) == ["50"]

    (tmp_path / "off").mkdir()
    spec = held_off_plan(tmp_path / "off")  # blue at 80 %, no step of the plan now
    status = open_store(load_spec(spec)).load()
    assert status is not None and status.blue_weight == 80
    assert highlighted(rendered(spec, status)) == []
    run_rollout(load_spec(spec), clock=FakeClock(100.0), max_ticks=2)
    status = open_store(load_spec(spec)).load()
    assert status is not None and status.held
    assert highlighted(rendered(spec, status)) == []


def test_the_plan_highlights_the_step_as_before_when_steps_were_not_edited(
    tmp_path: Path,
) -> None:
    spec = write_spec(tmp_path, 0.01, steps=[10, 50, 80, 100])
    run_rollout(load_spec(spec), clock=FakeClock(0.0), max_ticks=3)
    status = open_store(load_spec(spec)).load()
    assert status is not None and status.step_index == 2
    assert highlighted(rendered(spec, status)) == ["80"]


def test_a_held_rollout_whose_resume_is_refused_is_not_said_to_advance_on_resume(
    tmp_path: Path,
) -> None:
    # Measured: "resume  refused: blue is at 80 %, which the plan ... no longer has" and, in the
    # same table, "since held  ... `resume` lets it advance on the next tick"; resume exited 2.
    spec = held_off_plan(tmp_path)
    result = run_rollout(load_spec(spec), clock=FakeClock(100.0), max_ticks=2)
    assert result.status.held and result.status.verdict is not None
    assert result.status.verdict.value == "Successful"
    code, out = status_cli(spec)
    assert code == EXIT_PAUSED
    assert "refused: blue is at 80 %" in out
    assert "resume` lets it advance" not in out
    resumed = runner.invoke(app, ["rollout", "resume", str(spec)])
    assert resumed.exit_code == EXIT_ERROR  # indeed refused, as the table says


def finalising(tmp_path: Path, *, apply: bool) -> Path:
    """A rollout stopped in Finalising: after its Blue_Green was applied (green serves the
    candidate), or (`apply` False) before, as a `run` stopped at a deploy that failed."""
    spec = write_spec(
        tmp_path, 0.01, router={"kind": "memory", "state_file": str(tmp_path / "plane.json")}
    )
    result = run_rollout(load_spec(spec), clock=FakeClock(0.0), max_ticks=6)
    assert result.phase.value == "Finalising", result.reason
    if not apply:
        store = open_store(load_spec(spec))
        status = store.load()
        assert status is not None
        # As saved before its router call: the deploy to green still pending.
        from dataclasses import replace

        store.save(replace(status, applied=0))
    return spec


def test_finalising_after_greens_deploy_shows_the_candidate_on_green(tmp_path: Path) -> None:
    # Measured: `stable  m:1 (green)` while the reason said "Blue_Green: green now serves m:2"
    # and the memory router's green held m:2.
    spec = finalising(tmp_path, apply=True)
    plane = json.loads((tmp_path / "plane.json").read_text())
    assert plane["releases"]["green"]["version"] == "2"
    code, out = status_cli(spec)
    assert code == EXIT_RUNNING
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "m:2 (blue and green: promoting)" in rows["candidate"]
    assert "m:1 (replaced)" in rows["stable"]


def test_finalising_before_greens_deploy_still_shows_the_stable_on_green(tmp_path: Path) -> None:
    spec = finalising(tmp_path, apply=False)
    code, out = status_cli(spec)
    assert code == EXIT_RUNNING
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "m:2 (blue)" in rows["candidate"]
    assert "m:1 (green)" in rows["stable"]


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
