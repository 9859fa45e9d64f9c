"""SIGKILL a real controller process at many points; restarted, it must finish the rollout safely.

Each case kills the driver (tests/engine/killable_driver.py) right after its Nth durable write —
a status save or an action applied to the file-backed router — then restarts it until the
rollout ends. The router's journal records every action that reached the "data plane"; from it:
- every weight is 0 or a planned weight;
- the weights, with idempotent re-applies collapsed, walk the plan in order: no step skipped, none
  revisited after moving on;
- the candidate is deployed to green once in effect (one promotion), blue removed once;
- the rollout ends Succeeded with green serving the candidate at 100 %.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from itertools import groupby
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def drive(work: Path, kill_at: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.engine.killable_driver", str(work), str(kill_at)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def journal(work: Path) -> list[dict[str, Any]]:
    lines = (work / "journal.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def check_invariants(work: Path) -> None:
    actions = journal(work)
    weights = [a["blue"] for a in actions if a["action"] == "set_weights"]
    assert set(weights) <= {0, 10, 50, 100}
    walk = [w for w, _ in groupby(weights)]
    if walk[0] == 0:  # the bootstrap's "all to green" (absent when killed right before it)
        walk = walk[1:]
    assert walk == [10, 50, 100, 0]
    effects = [
        (a["action"], a.get("colour"), (a.get("release") or {}).get("version"))
        for a in actions
        if a["action"] != "set_weights"
    ]
    collapsed = [e for e, _ in groupby(effects)]
    assert collapsed == [
        ("deploy", "green", "1"),  # bootstrap: the stable release on an empty data plane
        ("deploy", "blue", "2"),
        ("deploy", "green", "2"),  # Blue_Green: exactly one promotion
        ("remove", "blue", None),
    ]
    routes = json.loads((work / "routes.json").read_text())
    assert routes["weights"] == {"blue": 0, "green": 100}
    assert routes["releases"]["green"]["version"] == "2"
    assert "blue" not in routes["releases"]


@pytest.fixture(scope="module")
def total_writes(tmp_path_factory: pytest.TempPathFactory) -> int:
    work = tmp_path_factory.mktemp("clean")
    done = drive(work, 0)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["phase"] == "Succeeded"
    check_invariants(work)
    return int(outcome["writes"])


# A clean run makes 22 durable writes today: one case per write (spread evenly if that changes).
POINTS = 22


@pytest.mark.parametrize("point", range(1, POINTS + 1), ids=lambda p: f"kill-at-{p}-of-{POINTS}")
def test_killed_anywhere_the_restarted_controller_finishes_safely(
    tmp_path: Path, total_writes: int, point: int
) -> None:
    kill_at = max(1, round(total_writes * point / POINTS))
    killed = drive(tmp_path, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    for _ in range(3):
        done = drive(tmp_path, 0)
        if done.returncode == 0:
            break
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["phase"] == "Succeeded"
    check_invariants(tmp_path)


def test_killed_twice_in_a_row(tmp_path: Path, total_writes: int) -> None:
    assert drive(tmp_path, max(2, total_writes // 3)).returncode == -signal.SIGKILL
    assert drive(tmp_path, 3).returncode == -signal.SIGKILL
    done = drive(tmp_path, 0)
    assert done.returncode == 0, done.stderr
    check_invariants(tmp_path)


def test_a_second_live_controller_exits_with_a_clear_message(tmp_path: Path) -> None:
    from rollout.state.file import FileStateStore

    with FileStateStore(tmp_path, "kill").lease("the first controller"):
        second = drive(tmp_path, 0)
    assert second.returncode != 0
    assert "LeaseHeldError" in second.stderr
    assert "already driven by another controller (the first controller" in second.stderr
