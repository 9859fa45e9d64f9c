"""Real processes: SIGKILL mid-delivery and restart, crash between traffic and tags, two watchers,
and supersede on a live watcher. The watcher runs as `python -m tests.trigger.proc` (the real
Watcher, Dispatcher, cursor store, lock and LocalRegistry; the file-backed ResumableDelivery).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from aml_pipelines.registry.local import LocalRegistry
from aml_pipelines.trigger.store import Step, TriggerStore
from tests.trigger.fakes import journal, register

ROOT = Path(__file__).resolve().parents[2]


def _start(root: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.trigger.proc", str(root), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # subprocess.run kills the watcher if it outlives the timeout: a failing test leaks nothing.
    return subprocess.run(
        [sys.executable, "-m", "tests.trigger.proc", str(root), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _per_version(root: Path, kind: str) -> Counter[int]:
    return Counter(e["version"] for e in journal(root / "engine") if e["event"] == kind)


def test_sigkill_mid_delivery_then_restart_resumes_without_repeating_or_skipping(
    tmp_path: Path,
) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    # v1 takes 50 steps of 0.3 s: the kill after its first step cannot come after its end.
    register(registry, tmp_path, stage="candidate", steps="50")
    register(registry, tmp_path, stage="candidate")
    proc = _start(tmp_path, "--once", "--step-s", "0.3")
    try:
        _until(lambda: _per_version(tmp_path, "step")[1] >= 1, "v1 to pass its first step")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert _per_version(tmp_path, "end") == Counter()  # killed mid-delivery, nothing finished

    done = _run(tmp_path, "--once")
    assert done.returncode == 0, done.stderr
    assert _per_version(tmp_path, "start") == Counter({1: 1, 2: 1})  # never started twice
    assert _per_version(tmp_path, "resume") == Counter({1: 1})  # v1 continued, not restarted
    assert _per_version(tmp_path, "end") == Counter({1: 1, 2: 1})  # v2 not skipped
    resumed_at = next(e["step"] for e in journal(tmp_path / "engine") if e["event"] == "resume")
    assert resumed_at >= 1  # from the persisted step, not from zero
    entries = TriggerStore(tmp_path / "trigger").load("diabetes").entries
    assert {v: (e.step, e.attempts) for v, e in entries.items()} == {
        1: (Step.DONE, 2),
        2: (Step.DONE, 1),
    }
    assert [v.stage for v in registry.list_versions("diabetes")] == ["archived", "production"]


@pytest.mark.parametrize(
    ("tags", "stage", "outcome", "reason"),
    [
        pytest.param({}, "production", "Succeeded", None, id="promoted"),
        pytest.param(
            {"fault": "yes"},
            "rolled-back",
            "RolledBack",
            "canary error rate 4.1% vs 0.1% baseline",
            id="rolled-back",
        ),
    ],
)
def test_crash_between_traffic_and_tags_is_repaired_on_restart(
    tmp_path: Path, tags: dict[str, str], stage: str, outcome: str, reason: str | None
) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    register(registry, tmp_path, stage="production")
    register(registry, tmp_path, stage="candidate", **tags)
    crashed = _run(tmp_path, "--once", "--crash-between")
    assert crashed.returncode == -signal.SIGKILL
    assert registry.get("diabetes", 2).stage == "candidate"  # traffic moved, tags did not

    again = _run(tmp_path, "--once")
    assert again.returncode == 0, again.stderr
    assert "registry repaired from rollout status" in again.stderr
    v1, v2 = registry.list_versions("diabetes")
    assert v2.stage == stage
    assert v2.tags.get("rollback_reason") == reason
    assert v1.stage == ("archived" if stage == "production" else "production")
    # The reconciled registry settles the started version: its rollout is not run again...
    assert [e["event"] for e in journal(tmp_path / "engine") if e["event"] != "step"] == [
        "start",
        "end",
    ]
    # ...and the cursor records the rollout's real outcome.
    entry = TriggerStore(tmp_path / "trigger").load("diabetes").entries[2]
    assert (entry.step, entry.outcome) == (Step.DONE, outcome)
    if reason is not None:
        assert entry.reason == reason


def test_a_second_watcher_exits_with_a_clear_message(tmp_path: Path) -> None:
    first = _start(tmp_path)
    lock = tmp_path / "trigger" / "watch-diabetes.lock"
    try:
        _until(lambda: lock.exists() and lock.read_text() == str(first.pid), "the first watcher")
        second = _run(tmp_path, "--once")
        assert second.returncode == 2
        assert f"a watcher of model 'diabetes' is already running (pid {first.pid}" in second.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=10) == 0
    finally:
        first.kill()
        first.communicate()
    # The lock dies with its holder: a new watcher starts at once.
    assert _run(tmp_path, "--once").returncode == 0


def test_live_watcher_delivers_new_versions_and_supersedes(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "registry")
    watcher = _start(tmp_path, "--supersede", "--step-s", "0.2")
    try:
        # v1 alone would take 200 s: it cannot end before v2 supersedes it, however slow the box.
        register(registry, tmp_path, stage="candidate", steps="1000")
        _until(lambda: _per_version(tmp_path, "step")[1] >= 1, "v1 to be rolling out")
        register(registry, tmp_path, stage="candidate")
        _until(lambda: _per_version(tmp_path, "end")[2] == 1, "v2 to be delivered")
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=10) == 0
    finally:
        watcher.kill()
        watcher.communicate()
    v1, v2 = registry.list_versions("diabetes")
    assert (v1.stage, v1.tags["rollback_reason"]) == ("rolled-back", "superseded by version 2")
    assert v2.stage == "production"
    assert _per_version(tmp_path, "start") == Counter({1: 1, 2: 1})
