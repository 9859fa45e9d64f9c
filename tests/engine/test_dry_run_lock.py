"""Two dry runs (state.kind memory) of one spec: the second is refused, as a second `run` of a
file-store rollout is.

A memory store's lease is per process, so both ran, interleaving one ledger; `explain` then
dropped the first rollout's later lines as stale and told one story of the two."""

from __future__ import annotations

import subprocess
from pathlib import Path

from typer.testing import CliRunner

from rollout.cli import app
from rollout.commands.rollout import EXIT_ERROR, EXIT_PAUSED
from rollout.commands.stack import EXIT_INTERRUPTED
from tests.cli import CLI, stop_and_wait
from tests.engine.specs import write_spec

runner = CliRunner()


def _held_dry_run(tmp_path: Path) -> Path:
    """A dry run that never decides: 1 request a second against 10,000 needed, held after
    60 s of its clock."""
    return write_spec(
        tmp_path,
        metrics={"kind": "simulated", "seed": 1, "rps": 1},
        analysis={
            "min_requests": 10000,
            "interval_s": 1,
            "max_step_duration_s": 60,
            "on_inconclusive": "hold",
            "latency": {"enabled": False},
        },
        state={"kind": "memory", "dir": str(tmp_path / "state")},
    )


def test_a_second_dry_run_of_one_spec_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    spec = _held_dry_run(tmp_path)
    first = subprocess.Popen(
        [*CLI, "rollout", "run", str(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout is not None
        tick = first.stdout.readline()  # its first tick: it holds the lease from before it
        assert "Progressing" in tick, (tick, first.stderr and first.stderr.read())
        second = runner.invoke(app, ["rollout", "run", str(spec), "--simulated-time", "-q"])
        said = " ".join(second.output.split())
        assert second.exit_code == EXIT_ERROR, said
        assert "error: rollout 'cli' is already driven by another dry run (" in said, said
        assert "pid " in said and f"{tmp_path / 'state' / 'cli.memory.ledger.jsonl'}" in said
    finally:
        _, err = stop_and_wait(first)
    assert first.returncode == EXIT_INTERRUPTED, err
    # Its lock went with it: the next dry run runs (held: it never decides).
    again = runner.invoke(app, ["rollout", "run", str(spec), "--simulated-time", "-q"])
    assert again.exit_code == EXIT_PAUSED, again.output


def test_dry_runs_of_one_spec_in_two_state_dirs_both_run(tmp_path: Path) -> None:
    # Each its own ledger: nothing to keep apart.
    spec = _held_dry_run(tmp_path)
    for where in ("a", "b"):
        state = tmp_path / where
        result = runner.invoke(
            app, ["rollout", "run", str(spec), "--state-dir", str(state), "--simulated-time", "-q"]
        )
        assert result.exit_code == EXIT_PAUSED, result.output
        assert (state / "cli.memory.ledger.jsonl").is_file()
