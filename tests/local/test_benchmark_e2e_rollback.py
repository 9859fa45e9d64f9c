"""benchmarks/e2e_rollback.py: bad arguments refused before any start, failed runs named, and
SIGTERM ending it as cleanly as Ctrl-C (stack stopped, temp dir removed)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

import benchmarks.e2e_rollback as bench
from benchmarks.e2e_rollback import main
from rollout.core.types import Colour, Phase, Weights
from rollout.local.process import pid_alive
from tests.cli import stop_and_wait


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        pytest.param(["--runs", "2"], "--runs must be at least 3", id="too-few-runs"),
        pytest.param(["--rps", "0"], "--rps must be above 0, not 0", id="no-load"),
        pytest.param(["--rps", "-5"], "--rps must be above 0, not -5", id="negative-load"),
        pytest.param(["--rps", "nan"], "--rps must be above 0, not nan", id="nan-load"),
    ],
)
def test_bad_arguments_exit_2_before_the_stack_starts(
    capsys: pytest.CaptureFixture[str], args: list[str], problem: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert problem in capsys.readouterr().err.splitlines()[-1]


class FakeRouter:
    """What `measure_set_weights` needs of the stack's Envoy router."""

    last_served_s: float | None = None

    def set_weights(self, weights: Weights) -> None:
        self.last_served_s = 0.002


class FakeStack:
    """A stack with nothing running: the run's controller is replaced, so nothing reaches it."""

    def __init__(self) -> None:
        self.router = FakeRouter()
        self.metrics = None
        self.faults: list[tuple[Colour, float]] = []

    def spec(self, name: str, **fields: Any) -> str:
        return name

    def set_fault(self, colour: Colour, error_rate: float) -> None:
        self.faults.append((colour, error_rate))


class BlindWatcher:
    """A watcher that never sees blue at 0 %."""

    def __init__(self, stack: Any) -> None:
        self.errors_at_zero = None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        return None


def crashing_rollout(*, at_ten: bool) -> Any:
    def run_rollout(spec: Any, *, on_tick: Any, **options: Any) -> Any:
        if at_ten:
            on_tick(SimpleNamespace(phase=Phase.PROGRESSING, blue_weight=10), {})
        raise RuntimeError("state store exploded")

    return run_rollout


@pytest.mark.parametrize(
    ("at_ten", "problem"),
    [
        pytest.param(
            False,
            r"run 0: the rollout never reached 10 % in 30 s \(the controller crashed: "
            r"RuntimeError: state store exploded\)",
            id="crash-before-ten",
        ),
        pytest.param(
            True,
            r"run 0: Envoy still served blue when the controller ended, \d+\.\d s after the "
            r"fault \(the controller crashed: RuntimeError: state store exploded\)",
            id="crash-after-the-fault",
        ),
    ],
)
def test_a_crashed_controller_fails_the_run_at_once_saying_so(
    monkeypatch: pytest.MonkeyPatch, at_ten: bool, problem: str
) -> None:
    monkeypatch.setattr("rollout.api.run_rollout", crashing_rollout(at_ten=at_ten))
    monkeypatch.setattr(bench, "PATIENCE_S", 30.0)
    monkeypatch.setattr(bench, "HEALTHY_S", 0.0)
    monkeypatch.setattr(bench, "_ZeroWatcher", BlindWatcher)
    monkeypatch.setattr(bench, "blue_5xx", lambda stack: 0)
    started = time.monotonic()
    with pytest.raises(bench.RunFailed) as failed:
        bench.one_run(cast(Any, FakeStack()), cast(Any, None), 0)
    assert re.fullmatch(problem, str(failed.value)), failed.value
    assert time.monotonic() - started < 10  # not a wait for PATIENCE_S


def bench_dirs(tmp: Path) -> list[Path]:
    return list(tmp.glob("aml-rollout-bench-*"))


@pytest.mark.slow
@pytest.mark.e2e
def test_sigterm_stops_the_stack_and_removes_the_temp_dir(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.e2e_rollback", "--runs", "3", "--rps", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        cwd=Path(__file__).parents[2],
    )
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while len(pids) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
            pids = [
                int(json.loads(p.read_text())["pid"])
                for d in bench_dirs(tmp_path)
                for p in (d / "stack" / "workloads").glob("*.proc.json")
            ]
        assert len(pids) == 2, "the benchmark's stack never served green and blue"
    finally:
        _, err = stop_and_wait(process)
    assert process.returncode == 130, err
    assert "interrupted: the stack is stopped and its temp dir removed" in err
    assert bench_dirs(tmp_path) == []
    assert not any(pid_alive(p) for p in pids)


def test_the_watcher_sees_a_rollback_served_just_before_it_was_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The controller can end (and the watcher be stopped) between two of the watcher's polls."""
    watchers: list[Any] = []

    class LateRouter:
        """Envoy as the watcher sees it: its first answer (blue 10 %) comes once stop() was
        called; the rollback to 0 % is served by then."""

        def __init__(self, **config: Any) -> None:
            self.answers = 0

        def get_weights(self) -> Weights:
            self.answers += 1
            if self.answers == 1:
                while not watchers[0]._stop.is_set():
                    time.sleep(0.001)
                return Weights.blue_at(10)
            return Weights.blue_at(0)

        def close(self) -> None:
            pass

    monkeypatch.setattr("rollout.routers.envoy.EnvoyRouter", LateRouter)
    monkeypatch.setattr(bench, "blue_5xx", lambda stack: 7)
    stack = SimpleNamespace(envoy=SimpleNamespace(admin_url="", files=None), workdir=Path())
    watcher = bench._ZeroWatcher(cast(Any, stack))
    watchers.append(watcher)
    watcher.start()
    assert watcher.stop() is not None
    assert watcher.errors_at_zero == 7
