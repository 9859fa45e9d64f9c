"""`aml-rollout up` stops on SIGTERM even when the KeyboardInterrupt it raises is lost.

Was: a SIGTERM sent as `up` finished printing its URLs was ignored about one time in six, and
`up` served on until killed. The handler raised KeyboardInterrupt inside a finalizer that the
garbage collector ran at that moment; Python prints such an exception ("Exception ignored in:
...") and drops it. The stack here is a stand-in (no process starts): the signal is what is
tested, delivered inside a finalizer on purpose.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import io
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

import rollout.commands.stack as stack_commands
import rollout.local.stack as local_stack
from rollout.cli import app as cli_app
from rollout.core.types import Colour, Release
from rollout.errors import LocalStackError


@pytest.fixture(autouse=True)
def ctrl_c_as_in_a_terminal() -> Any:
    """Ctrl-C handled by Python's own handler, as in a terminal: `up` and `demo` take SIGINT
    over only then (not when it is ignored, as in a background job). A pytest-xdist worker
    does not have it, and there the ctrl-c cases sent a signal nothing raised."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class SignalsWhenCollected:
    """Sends SIGTERM to this process from its finalizer, where an exception is lost."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


class StandInStack:
    """What `up` asks of a LocalStack, doing nothing."""

    def __init__(self, workdir: Path | None, *, envoy_port: int | None = None) -> None:
        self.workdir = workdir
        self.keep = True
        self.stopped = False
        self.url = "http://127.0.0.1:1"
        self.envoy = SimpleNamespace(admin_url="http://127.0.0.1:2", ended=self.envoy_ended)
        self.prometheus = SimpleNamespace(url="http://127.0.0.1:3", ended=self.prometheus_ended)
        self.workloads = SimpleNamespace(
            endpoint_of=lambda colour: None, reap=lambda: None, directory=Path("workloads")
        )
        self.router = SimpleNamespace(
            deploy=self.deploy, set_weights=self.set_weights, release=self.release
        )
        StandInStack.last = self

    last: StandInStack | None = None

    def start(self) -> StandInStack:
        return self

    def deploy(self, colour: Any, release: Any) -> None:
        pass

    def set_weights(self, weights: Any) -> None:
        pass

    def release(self, colour: Any) -> Any:
        return None  # as if nothing were deployed: no scoring server is missed

    def stop(self) -> None:
        self.stopped = True

    def envoy_ended(self) -> str | None:
        return None

    def prometheus_ended(self) -> str | None:
        return None


class SigtermLostStack(StandInStack):
    """A stand-in whose setting of the weights loses a SIGTERM in a finalizer."""

    def set_weights(self, weights: Any) -> None:
        SignalsWhenCollected()  # collected at once: SIGTERM, its KeyboardInterrupt dropped
        gc.collect()


def invoke_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stack: type[StandInStack], duration: str
) -> Result:
    """`aml-rollout up` of a one-file package with `stack` standing in for the LocalStack."""
    package = tmp_path / "package"
    package.mkdir()
    (package / "package.json").write_text(json.dumps({"model": "diabetes", "version": "1"}))
    monkeypatch.setattr(local_stack, "LocalStack", stack)
    monkeypatch.setattr(
        stack_commands, "_write_spec", lambda stack, candidate, console: tmp_path / "x.yaml"
    )
    return CliRunner().invoke(
        cli_app,
        ["up", "--model-dir", str(package), "--workdir", str(tmp_path), "--duration", duration],
    )


# The lost KeyboardInterrupt is reported as unraisable: that is the situation under test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_up_stops_on_a_sigterm_whose_interrupt_a_finalizer_swallowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.monotonic()
    result = invoke_up(tmp_path, monkeypatch, SigtermLostStack, "8")
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert "stopping ..." in result.output  # the SIGTERM was heard, not the --duration
    assert elapsed < 4
    assert StandInStack.last is not None and StandInStack.last.stopped
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after `up`


class EnvoyDiesStack(StandInStack):
    """A stand-in whose Envoy is found dead once `up` has printed its URLs."""

    def envoy_ended(self) -> str | None:
        return "envoy was killed by SIGKILL\n--- last lines of envoy.log ---\n(nothing)"


def test_up_stops_with_one_error_when_envoy_dies_under_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: Envoy SIGKILLed under a running `up` left it printing nothing and serving nothing
    (curl: connection refused) until Ctrl-C, its URLs and spec still on screen."""
    started = time.monotonic()
    result = invoke_up(tmp_path, monkeypatch, EnvoyDiesStack, "8")
    assert time.monotonic() - started < 4  # not the --duration
    assert isinstance(result.exception, LocalStackError), result.output
    message = str(result.exception)
    assert message.startswith("envoy was killed by SIGKILL")
    assert "last lines of envoy.log" in message and "stopped" in message
    assert StandInStack.last is not None and StandInStack.last.stopped


class InterruptedWhileStopping(StandInStack):
    """A stand-in whose stop takes a second Ctrl-C (or SIGTERM) half-way, as an impatient user."""

    signum = signal.SIGINT
    finished = False

    def stop(self) -> None:
        os.kill(os.getpid(), self.signum)  # handled before the next line runs
        InterruptedWhileStopping.finished = True
        super().stop()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_second_interrupt_does_not_cut_the_stop_short(
    signum: signal.Signals, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: a second Ctrl-C while `up` stopped raised inside `stop()` (a SIGTERM killed it):
    the temporary folder, and servers a controller in another process started, stayed."""
    monkeypatch.setattr(InterruptedWhileStopping, "signum", signum)
    monkeypatch.setattr(InterruptedWhileStopping, "finished", False)
    runner_got: list[int] = []  # SIGTERM's handler outside `up` (the default one would kill us)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: runner_got.append(signum))
    try:
        result = invoke_up(tmp_path, monkeypatch, InterruptedWhileStopping, "0.1")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 0, result.output
    assert InterruptedWhileStopping.finished and runner_got == []
    assert "stack stopped" in result.output


class SlowToCheckStack(StandInStack):
    """A stand-in whose health check takes longer than what is left of `--duration`."""

    clock: FakeTime

    def envoy_ended(self) -> str | None:
        self.clock.now += 0.15  # a loaded machine: the check outlasts the time left
        return None


class FakeTime:
    """`up`'s clock: as `time`, a negative sleep is a ValueError."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        self.now += seconds


def test_the_duration_ending_during_a_check_is_a_clean_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: time running out between the loop's test and its sleep slept a negative time: a
    ValueError traceback at the end of `up --duration` instead of a clean stop."""
    clock = FakeTime()
    monkeypatch.setattr(SlowToCheckStack, "clock", clock, raising=False)
    monkeypatch.setattr(stack_commands, "time", clock)
    result = invoke_up(tmp_path, monkeypatch, SlowToCheckStack, "0.1")
    assert result.exception is None, result.exception
    assert "stack stopped" in result.output


class PrometheusDiesStack(StandInStack):
    """A stand-in whose Prometheus is found dead at every check after the URLs."""

    def prometheus_ended(self) -> str | None:
        return "prometheus exited with code 1"


def test_a_dead_prometheus_is_said_once_and_envoy_serves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: not a word. Envoy still serves, so `up` keeps it up (a rehearsed metrics outage:
    a rollout holds its weights on Error ticks) and says what is lost, once."""
    monkeypatch.setattr(stack_commands, "time", FakeTime())
    result = invoke_up(tmp_path, monkeypatch, PrometheusDiesStack, "5")
    assert result.exception is None, result.exception
    assert result.output.count("prometheus exited with code 1") == 1
    assert "no metrics" in result.output
    assert "stack stopped" in result.output  # by --duration, not by the dead Prometheus


class GreenDiesStack(StandInStack):
    """A stand-in whose releases file names green's release, and no live server serves it."""

    def release(self, colour: Any) -> Any:
        return Release(model="diabetes", version="1") if colour is Colour.GREEN else None


def test_green_s_server_gone_is_said_once_and_up_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: not a word, and exit 0, while Envoy answered every request 503 (green's server
    killed under `up`). Said once, as for Prometheus: a rollout can still deploy green anew."""
    monkeypatch.setattr(stack_commands, "time", FakeTime())
    result = invoke_up(tmp_path, monkeypatch, GreenDiesStack, "5")
    assert result.exception is None, result.exception
    assert result.output.count("green's scoring server (diabetes:1) ended") == 1, result.output
    assert "503" in result.output
    assert "stack stopped" in result.output


class HangUpStack(StandInStack):
    """A stand-in whose terminal closes while `up` serves: SIGHUP, once."""

    sent = False

    def envoy_ended(self) -> str | None:
        if not HangUpStack.sent:
            HangUpStack.sent = True
            os.kill(os.getpid(), signal.SIGHUP)
        return None


@pytest.mark.parametrize("nohup", [False, True], ids=["terminal-closed", "under-nohup"])
def test_a_closed_terminal_stops_up_cleanly_unless_nohup(
    nohup: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: SIGHUP (terminal closed, ssh dropped) killed `up` with no stop at all: its temporary
    folder stayed in /tmp, with whatever a controller in another process had started in it.
    Under `nohup` (SIGHUP ignored) it serves on."""
    monkeypatch.setattr(HangUpStack, "sent", False)
    monkeypatch.setattr(stack_commands, "time", FakeTime())
    runner_got: list[int] = []  # SIGHUP's handler outside `up` (the default one would kill us)
    outside = signal.SIG_IGN if nohup else (lambda signum, frame: runner_got.append(signum))
    previous = signal.signal(signal.SIGHUP, outside)
    try:
        result = invoke_up(tmp_path, monkeypatch, HangUpStack, "5")
        assert signal.getsignal(signal.SIGHUP) is outside  # restored after `up`
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert result.exception is None, result.exception
    assert HangUpStack.sent and runner_got == []
    assert ("stopping ..." in result.output) is not nohup  # else: --duration's end
    assert "stack stopped" in result.output


def test_a_signal_handled_while_the_stop_event_is_locked_does_not_block() -> None:
    """Was: the handler called `stopping.set()`, whose lock is not re-entrant. A second Ctrl-C
    handled while the first handler was inside set() blocked on it for good (`up` hung with the
    stack running; only SIGKILL ended it). The thread running the handler holds the lock here,
    as the main thread did then; the handler is called directly (a real signal pair races)."""
    with stack_commands.sigterm_as_interrupt() as stopping:
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        raised: list[str] = []

        def handled_inside_set() -> None:
            with stopping._cond:  # type: ignore[attr-defined]  # what Event.set() holds
                try:
                    handler(signal.SIGTERM, None)
                except KeyboardInterrupt:
                    raised.append("KeyboardInterrupt")

        worker = threading.Thread(target=handled_inside_set, daemon=True)
        worker.start()
        worker.join(timeout=2)
        assert not worker.is_alive(), "the handler blocked on the event's lock"
    assert raised == ["KeyboardInterrupt"]
    assert stopping.wait(timeout=2)  # set all the same, once the lock was free


class ClosedTerminal(io.StringIO):
    """`up`'s stdout once its terminal closed: the second SIGHUP (the kernel's, after bash's)
    lands as `up` says "stopping ...", and, when `gone`, every write then fails with EIO."""

    def __init__(self, *, gone: bool) -> None:
        super().__init__()
        self.gone = gone
        self.second_sent = False
        self.replaced = sys.stdout  # CliRunner's, which closes its buffer once collected

    def write(self, text: str) -> int:
        if "stopping ..." in text and not self.second_sent:
            self.second_sent = True
            os.kill(os.getpid(), signal.SIGHUP)
        if self.gone:
            raise OSError(errno.EIO, "Input/output error")
        return super().write(text)


class TerminalClosesStack(StandInStack):
    """A stand-in whose terminal closes while `up` serves: SIGHUP twice, the tty maybe gone."""

    gone = False
    terminal: ClosedTerminal | None = None

    def envoy_ended(self) -> str | None:
        if TerminalClosesStack.terminal is None:
            # CliRunner puts its own stdout back at the end of the invocation.
            sys.stdout = TerminalClosesStack.terminal = ClosedTerminal(gone=self.gone)
            os.kill(os.getpid(), signal.SIGHUP)
        return None


@pytest.mark.parametrize("gone", [False, True], ids=["second-sighup", "second-sighup-and-eio"])
def test_a_terminal_closing_stops_up_cleanly_even_with_a_second_signal(
    gone: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: `up` gave SIGTERM and SIGHUP back their default as it unwound from the first, before
    its stop deferred them: the second SIGHUP of a closing terminal, in that gap, killed `up`
    with no stop (its temporary folder left). And "stopping ..." written to the hung-up
    terminal raised EIO: exit 1, a traceback, after the stop."""
    monkeypatch.setattr(TerminalClosesStack, "gone", gone)
    monkeypatch.setattr(TerminalClosesStack, "terminal", None)
    monkeypatch.setattr(stack_commands, "time", FakeTime())
    runner_got: list[int] = []  # SIGHUP's handler outside `up` (the default one would kill us)
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: runner_got.append(signum))
    try:
        result = invoke_up(tmp_path, monkeypatch, TerminalClosesStack, "5")
    finally:
        signal.signal(signal.SIGHUP, previous)
    terminal = TerminalClosesStack.terminal
    assert terminal is not None and terminal.second_sent
    assert runner_got == []  # both SIGHUPs were `up`'s
    assert result.exception is None, result.exception
    assert StandInStack.last is not None and StandInStack.last.stopped
    if not gone:
        said = terminal.getvalue()
        assert "stopping ..." in said and "still stopping" in said and "stack stopped" in said


class ReaderGone:
    """`up`'s stdout a pipe whose reader has gone (`up | tee`, tee ended): writes are EPIPE."""

    def __init__(self) -> None:
        read, write = os.pipe()
        os.close(read)
        self.file = os.fdopen(write, "w")  # CliRunner puts its own stdout back at the end
        self.replaced = sys.stdout  # which closes its buffer once collected

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()


class PipeGoneWhileStopping(StandInStack):
    """A stand-in whose stop takes a second SIGTERM after `up`'s stdout reader has gone."""

    pipe: ReaderGone | None = None
    finished = False

    def stop(self) -> None:
        PipeGoneWhileStopping.pipe = ReaderGone()
        sys.stdout = PipeGoneWhileStopping.pipe.file
        os.kill(os.getpid(), signal.SIGTERM)  # "still stopping" to the pipe: EPIPE
        PipeGoneWhileStopping.finished = True
        super().stop()


def test_a_signal_during_the_stop_with_stdout_s_reader_gone_does_not_cut_it_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: rich turns a broken pipe into SystemExit(1) (it never gives the error back), which
    the handler's "still stopping" raised out of `stop()`: exit 1, the stop cut short."""
    monkeypatch.setattr(PipeGoneWhileStopping, "pipe", None)
    monkeypatch.setattr(PipeGoneWhileStopping, "finished", False)
    runner_got: list[int] = []  # SIGTERM's handler outside `up` (the default one would kill us)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: runner_got.append(signum))
    try:
        result = invoke_up(tmp_path, monkeypatch, PipeGoneWhileStopping, "0.1")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if PipeGoneWhileStopping.pipe is not None:
            PipeGoneWhileStopping.pipe.close()
    assert PipeGoneWhileStopping.finished and runner_got == []
    assert result.exit_code == 0, (result.exit_code, result.exception)
    assert StandInStack.last is not None and StandInStack.last.stopped


def test_demo_goes_quiet_and_carries_on_when_its_stdout_reader_has_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`aml-rollout demo | head -3`: was rich's exit on the broken pipe, exit 1 mid-story (its
    `finally` stopping the stack all the same). The story stands in for `run_demo` (no process
    starts): it writes to the console once the reader has gone, goes on, and stops its stack."""
    import rollout.local.demo as local_demo

    told: list[str] = []
    pipes: list[ReaderGone] = []

    def story(out_dir: Path, *, console: Any, rps: float, stopping: Any, hold: Any) -> Any:
        try:
            console.print("pipeline v1: train → register")
            pipes.append(ReaderGone())  # made here: it keeps CliRunner's stdout alive
            sys.stdout = pipes[0].file  # `head -3` has read its lines and gone
            console.print("rollout of diabetes v2")  # EPIPE
            told.append("went on")
            return local_demo.DemoResult(
                out_dir,
                out_dir / "report.html",
                outcomes={"diabetes-v2": "Succeeded", "diabetes-v3": "RolledBack"},
            )
        finally:
            told.append("stack stopped")

    monkeypatch.setattr(local_demo, "run_demo", story)
    try:
        result = CliRunner().invoke(cli_app, ["demo", "--out", str(tmp_path / "demo")])
    finally:
        for pipe in pipes:
            pipe.close()
    assert result.exit_code == 0, (result.exit_code, result.exception)
    assert told == ["went on", "stack stopped"]


class DemoStandInStack(InterruptedWhileStopping):
    """What `run_demo` asks of a LocalStack, whose stop takes a second signal half-way."""

    def __init__(self, workdir: Path | None, **options: Any) -> None:
        super().__init__(workdir)

    def __enter__(self) -> DemoStandInStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_second_signal_does_not_cut_the_demos_stop_short(
    signum: signal.Signals, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: `demo` raised on every signal: a second one (a closed terminal sends SIGHUP twice)
    landed in the stack's stop and cut it short, and the demo said "the stack is stopped"."""
    import rollout.local.demo as local_demo

    monkeypatch.setattr(InterruptedWhileStopping, "signum", signum)
    monkeypatch.setattr(InterruptedWhileStopping, "finished", False)
    monkeypatch.setattr(local_demo, "LocalStack", DemoStandInStack)
    # The first signal arrives while v1's pipeline runs.
    monkeypatch.setattr(local_demo, "_pipeline", lambda *args: os.kill(os.getpid(), signum))
    runner_got: list[int] = []  # SIGTERM's handler outside `demo` (the default one would kill us)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: runner_got.append(signum))
    try:
        result = CliRunner().invoke(cli_app, ["demo", "--out", str(tmp_path / "demo")])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 130, (result.exit_code, result.exception)
    assert InterruptedWhileStopping.finished and runner_got == []
    assert "interrupted: the stack is stopped" in result.output


@pytest.mark.parametrize("workdir", [True, False], ids=["workdir", "temporary-folder"])
def test_training_the_example_on_a_full_disk_is_one_line_and_a_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workdir: bool
) -> None:
    """Was: the train component's OSError was a traceback, the stack's stop a second one; and
    then a temporary folder was kept "for its logs", which say nothing of it, on a full disk."""
    import components.train.train as train_module

    def disk_full(folder: Path, **options: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "model.skops"))

    class Stack(StandInStack):
        def __init__(self, given: Path | None, **kwargs: Any) -> None:
            super().__init__(given or tmp_path, **kwargs)
            self.keep = given is not None  # as LocalStack: a folder of its own is removed

    monkeypatch.setattr(train_module, "train", disk_full)
    monkeypatch.setattr(local_stack, "LocalStack", Stack)
    given = ["--workdir", str(tmp_path)] if workdir else []
    result = CliRunner().invoke(cli_app, ["up", *given, "--duration", "1"])
    assert isinstance(result.exception, LocalStackError), result.output  # the CLI's one line
    folder = tmp_path / "models" / "green"
    assert str(result.exception) == (
        f"cannot train the example model in {folder}: No space left on device"
    )
    assert StandInStack.last is not None and StandInStack.last.stopped
    assert StandInStack.last.keep is workdir


class LoadEndsStack(StandInStack):
    """A stand-in whose background load has ended by itself (its error kept for the stop)."""

    def start_load(self, rps: float) -> Any:
        return SimpleNamespace(running=False)


def test_a_background_load_that_ended_by_itself_is_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: not a word until the stop (a log line), while a rollout against the stack waited
    on "no mirrored copies counted yet" for traffic that never came."""
    monkeypatch.setattr(stack_commands, "time", FakeTime())
    package = tmp_path / "package"
    package.mkdir()
    (package / "package.json").write_text(json.dumps({"model": "diabetes", "version": "1"}))
    monkeypatch.setattr(local_stack, "LocalStack", LoadEndsStack)
    monkeypatch.setattr(
        stack_commands, "_write_spec", lambda stack, candidate, console: tmp_path / "x.yaml"
    )
    options = ["--workdir", str(tmp_path), "--duration", "5", "--load-rps", "50"]
    result = CliRunner().invoke(cli_app, ["up", "--model-dir", str(package), *options])
    assert result.exception is None, result.exception
    assert result.output.count("the background load (--load-rps) ended") == 1, result.output
    assert "stack stopped" in result.output
