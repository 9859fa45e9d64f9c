"""SIGKILL a real controller process at many points; restarted, it must finish the rollout safely.

Each case kills the driver (tests/engine/killable_driver.py) right after its Nth durable write —
a status save or an action applied to the file-backed router — then restarts it until the
rollout ends. The router's journal records every action that reached the "data plane"; from it:
- every weight is 0 or a planned weight;
- the weights, with idempotent re-applies collapsed, walk the plan in order: no step skipped, none
  revisited after moving on;
- the candidate is deployed to green once in effect (one promotion), blue removed once;
- the rollout ends Succeeded with green serving the candidate at 100 %.

Both durable state stores run it: `file`, and `kubernetes` against the fake kube-apiserver in
this process (the killed driver talks to it over HTTP; its Lease, never released, expires 1 s
after its last renewal, and the restarted driver waits for that, as a rescheduled pod would).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path
from typing import Any

import pytest

from rollout.ledger import explain, read_ledger
from tests.fakes.kube_apiserver import FakeKubeApiServer

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def state_on(backend: str) -> Iterator[str | None]:
    """Where the driver keeps its state: None for the file store, else an API server's URL."""
    if backend == "file":
        yield None
        return
    with FakeKubeApiServer() as api:
        api.seed(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ml"}}, "namespaces"
        )
        yield api.url


def drive(work: Path, kill_at: int, api_url: str | None = None, *flags: str) -> Any:
    extra = [api_url, *flags] if api_url else []
    return subprocess.run(
        [sys.executable, "-m", "tests.engine.killable_driver", str(work), str(kill_at), *extra],
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
    # (blue %, mirrored %): the shadow step, then the live steps, promotion, blue removed.
    weights = [(a["blue"], a.get("mirror", 0)) for a in actions if a["action"] == "set_weights"]
    assert set(weights) <= {(0, 0), (0, 20), (10, 0), (50, 0), (100, 0)}
    walk = [w for w, _ in groupby(weights)]
    if walk[0] == (0, 0):  # the bootstrap's "all to green" (absent when killed right before it)
        walk = walk[1:]
    assert walk == [(0, 20), (10, 0), (50, 0), (100, 0), (0, 0)]
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
def total_writes(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], int]:
    """The durable writes of a clean run, per store (measured once per module)."""
    known: dict[str, int] = {}

    def of(backend: str) -> int:
        if backend not in known:
            work = tmp_path_factory.mktemp(f"clean-{backend}")
            with state_on(backend) as url:
                done = drive(work, 0, url)
            assert done.returncode == 0, done.stderr
            outcome = json.loads(done.stdout.strip().splitlines()[-1])
            assert outcome["phase"] == "Succeeded"
            check_invariants(work)
            known[backend] = int(outcome["writes"])
        return known[backend]

    return of


# A clean run makes 27 durable writes today: one case per write for the file store (spread
# evenly if that changes), and 6 spread over them for the kubernetes store, whose restarts each
# wait up to a second for the killed controller's lease to expire.
POINTS = {"file": 27, "kubernetes": 6}
CASES = [
    pytest.param(backend, point, id=f"{backend}-kill-at-{point}-of-{points}")
    for backend, points in POINTS.items()
    for point in range(1, points + 1)
]


@pytest.mark.parametrize(("backend", "point"), CASES)
def test_killed_anywhere_the_restarted_controller_finishes_safely(
    tmp_path: Path, total_writes: Callable[[str], int], backend: str, point: int
) -> None:
    kill_at = max(1, round(total_writes(backend) * point / POINTS[backend]))
    with state_on(backend) as url:
        killed = drive(tmp_path, kill_at, url)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        for _ in range(3):
            done = drive(tmp_path, 0, url)
            if done.returncode == 0:
                break
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["phase"] == "Succeeded"
    check_invariants(tmp_path)


@pytest.mark.parametrize("backend", POINTS)
def test_killed_twice_in_a_row(
    tmp_path: Path, total_writes: Callable[[str], int], backend: str
) -> None:
    with state_on(backend) as url:
        first = drive(tmp_path, max(2, total_writes(backend) // 3), url)
        assert first.returncode == -signal.SIGKILL, first.stderr
        assert drive(tmp_path, 3, url).returncode == -signal.SIGKILL
        done = drive(tmp_path, 0, url)
    assert done.returncode == 0, done.stderr
    check_invariants(tmp_path)


def test_a_second_live_controller_exits_with_a_clear_message(tmp_path: Path) -> None:
    from rollout.state.file import FileStateStore

    with FileStateStore(tmp_path, "kill").lease("the first controller"):
        second = drive(tmp_path, 0)
    assert second.returncode != 0
    assert "LeaseHeldError" in second.stderr
    assert "already driven by another controller (the first controller" in second.stderr


def test_a_second_live_controller_on_another_node_exits_with_a_clear_message(
    tmp_path: Path,
) -> None:
    from tests.state.helpers import kube_store

    with FakeKubeApiServer() as api:
        api.seed(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ml"}}, "namespaces"
        )
        with kube_store(api, "kill", ttl=30).lease("the first controller"):
            second = drive(tmp_path, 0, api.url, "--no-wait")
    assert second.returncode != 0
    assert "LeaseHeldError" in second.stderr
    assert "already driven by another controller (the first controller pid" in second.stderr


def killed_with_a_step_up_pending(work: Path, total: int) -> Any:
    """Kill a fresh rollout in `work` right after it saved a step up it had not applied yet."""
    from rollout.core.status import SetWeights
    from rollout.state.file import FileStateStore

    for kill_at in range(total // 3, total):
        for old in work.iterdir():
            old.unlink()
        assert drive(work, kill_at).returncode == -signal.SIGKILL
        saved = FileStateStore(work, "kill").load()
        assert saved is not None and not saved.terminal
        left = saved.pending[saved.applied :]
        if left and isinstance(left[0], SetWeights) and left[0].weights.blue > 0:
            return saved
    raise AssertionError("no kill point leaves a step up pending")


@pytest.mark.parametrize("point", range(1, 5), ids=lambda p: f"kill-at-{p}-after-the-abort")
def test_an_abort_queued_while_killed_is_applied_once_however_often_killed_again(
    tmp_path: Path, total_writes: Callable[[str], int], point: int
) -> None:
    """Killed with a step up decided and not applied, then an abort queued: the step up never
    reaches the data plane, the abort does, once, whatever the kills after it."""
    from rollout.core.status import Command
    from rollout.state.file import FileStateStore

    begun = killed_with_a_step_up_pending(tmp_path, total_writes("file"))
    store = FileStateStore(tmp_path, "kill")
    store.push_command(Command(id="abort-1", kind="abort", by="ann", rollout=begun.id))
    before = len(journal(tmp_path))
    assert drive(tmp_path, point).returncode == -signal.SIGKILL
    done = drive(tmp_path, 0)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["phase"] == "RolledBack"
    after = journal(tmp_path)[before:]
    # From the abort on: blue at 0 % and nothing else, no promotion, no weight on the way.
    assert {(a["blue"], a.get("mirror", 0)) for a in after if a["action"] == "set_weights"} == {
        (0, 0)
    }
    assert all(a["action"] == "set_weights" for a in after)
    story = "\n".join(explain(read_ledger(tmp_path / "kill.ledger.jsonl")))
    assert story.count("operator abort") == 1, story
