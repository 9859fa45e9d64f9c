"""Top-level commands about the embedded local stack: `demo` and `up`.

Only typer, rich and the stdlib at module level (the stack, the engine, sklearn and the pipeline
runner are imported inside the commands), so `aml-rollout --help` stays fast. SIGTERM and SIGHUP
(a closed terminal; not under `nohup`) are turned into the same clean stop as Ctrl-C: every
process of the stack is stopped and reaped.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import math
import shlex
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from rollout.commands.console import QuietWhenReaderGone

EXIT_INTERRUPTED = 130


class _Interrupts:
    """The signal handler of `sigterm_as_interrupt` and `interrupted_once`: re-entrancy safe.

    A Python signal handler runs in the main thread between two bytecodes: inside another
    handler, or while the main thread holds a lock. Was: it called `stopping.set()`, which takes
    the Event's lock, not a re-entrant one: a second signal handled while the first handler was
    inside set() (two Ctrl-C, or the SIGHUP pair of a closed terminal) blocked `up` forever on
    that lock, with the whole stack running (as would a signal landing while a `RealClock` wait
    held it). The event is now set by a thread of its own, which waits for the lock if need be.
    """

    def __init__(self, console: Console | None) -> None:
        self.stopping = threading.Event()
        #: `interrupted_once`: where "still stopping" is said once a signal is not raised.
        self.console = console
        #: Signals are acknowledged, not raised (`interrupted_once`: after the first, or `hold()`).
        self.held = False
        self._setting = False

    def handler(self, signum: int, frame: Any) -> None:
        if self.held:
            _still_stopping(self.console)
            return
        if not self._setting:
            # Not threading.Thread: its start() takes a module lock the main thread may hold.
            _thread.start_new_thread(self.stopping.set, ())
            self._setting = True  # after the start: a handler run before it starts its own
        if self.console is not None:  # raised once: the stop that follows is not cut short
            self.held = True
        raise KeyboardInterrupt

    def hold(self) -> None:
        """From now on a signal is acknowledged, never raised (call it as the stop begins)."""
        self.held = True

    def install(self) -> dict[signal.Signals, Any]:
        """Handle SIGTERM, SIGINT (while Python's own handles it: not when ignored, as in a
        background job) and SIGHUP; returns the handlers they had."""
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self.handler)}
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, self.handler)
        # A closed terminal or dropped ssh session: by default it killed us with no stop at all
        # (the temporary folder stayed). Under `nohup` it is ignored, and stays so.
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self.handler)
        return previous


class _UpConsole(QuietWhenReaderGone):
    """`up`'s stdout, whose reader may go (`up | tee`, tee ended) while `up` serves or stops.

    Was: rich's exit on a broken pipe, raised by the handler saying "still stopping" during the
    stop, escaped `stack.stop()` and cut it short. Here the console goes quiet instead: `up`
    serves, then stops, as it would have, printing nothing more.
    """


def _restore(previous: dict[signal.Signals, Any]) -> None:
    for signum, earlier in previous.items():
        signal.signal(signum, earlier)


def _still_stopping(console: Console | None) -> None:
    if console is not None:
        # After SIGHUP the terminal may be gone (EIO); a signal handled while the main thread
        # writes to the same stream is a RuntimeError ("reentrant call"): the stop goes on. (EPIPE
        # never reaches here: rich exits on it instead, which `_UpConsole` turns into silence.)
        with contextlib.suppress(OSError, RuntimeError):
            console.print("still stopping (a few seconds at most) ...")


@contextmanager
def sigterm_as_interrupt() -> Iterator[threading.Event]:
    """Treat SIGTERM and SIGHUP like Ctrl-C for the block, so `finally` clauses stop the stack.

    Yields an event set (from a thread, at once) by any of the three. The KeyboardInterrupt a
    handler raises lands wherever the main thread is, and one that lands in a finalizer
    (`__del__`, a weakref callback) is printed as "Exception ignored" and lost: a loop that
    waits for a stop must check the event (a controller given `RealClock(stopping)` does at
    each wait). Every signal raises.
    """
    interrupts = _Interrupts(None)
    previous = interrupts.install()
    try:
        yield interrupts.stopping
    finally:
        _restore(previous)


@contextmanager
def interrupted_once(console: Console) -> Iterator[_Interrupts]:
    """As `sigterm_as_interrupt`, but only the first signal raises, and nothing after `hold()`.

    For a block that stops what it runs in its own `finally`, which begins with `hold()`: every
    later signal is acknowledged ("still stopping") until the block ends, after the stop. Was:
    `sigterm_as_interrupt` put SIGTERM and SIGHUP back to their default as it unwound, before
    the stop deferred them: a second one in between (a closed terminal sends SIGHUP twice)
    killed `up` with no stop, its temporary folder left behind.
    """
    interrupts = _Interrupts(console)
    previous = interrupts.install()
    try:
        yield interrupts
    finally:
        _restore(previous)


def demo(
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder (default: a new runs/demo-<UTC timestamp>[-N])."),
    ] = None,
    rps: Annotated[float, typer.Option(min=10, max=1000, help="Load through Envoy.")] = 120.0,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log what the stack does.")
    ] = False,
) -> None:
    """Run the whole story on the embedded local stack (train, register, roll out, roll back)."""
    import logging

    logging.basicConfig(
        level=logging.INFO if verbose else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for quiet in ("httpx", "httpcore"):  # their INFO line names each URL, a notify token's too
        logging.getLogger(quiet).setLevel(logging.WARNING)
    from rollout.local.demo import run_demo

    folder = out or default_demo_folder(Path("runs"), datetime.now(UTC))
    # `demo | head -3`: quiet once the reader has gone, the story and the stack's stop go on
    # (was: rich's exit 1 mid-story).
    console = QuietWhenReaderGone(soft_wrap=True, emoji=False)
    try:
        # As `up`: only the first signal raises, none once the stack's stop begins (was: every
        # one raised, and a second cut the stop short).
        with interrupted_once(console) as interrupts:
            result = run_demo(
                folder,
                console=console,
                rps=rps,
                stopping=interrupts.stopping,
                hold=interrupts.hold,
            )
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: the stack is stopped[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    expected = {"diabetes-v2": "Succeeded", "diabetes-v3": "RolledBack"}
    if result.outcomes != expected:
        console.print(f"[red]the demo did not go as expected: {result.outcomes}[/]")
        raise typer.Exit(1)


def default_demo_folder(parent: Path, now: datetime) -> Path:
    """`parent/demo-<now>`, or `-2`, `-3`, ... after it: the first that did not exist, created
    here, so that two demos started in the same second each get their own (was: the second was
    refused, about a folder its user never chose). If `parent` cannot hold it, the first name:
    the demo then says why in one line."""
    stem = f"demo-{now:%Y%m%dT%H%M%S}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return parent / stem
    folder, n = parent / stem, 1
    while True:
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            n += 1
            folder = parent / f"{stem}-{n}"
        except OSError:
            return folder


def up(
    model_dir: Annotated[
        Path | None,
        typer.Option(help="Package or model folder green serves (default: train the example)."),
    ] = None,
    candidate_dir: Annotated[
        Path | None,
        typer.Option(help="Package or model folder blue serves (pinned traffic only, weight 0)."),
    ] = None,
    workdir: Annotated[
        Path | None, typer.Option(help="Where the stack keeps its files (default: a temp dir).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Envoy listener port (default: free).")
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option(
            min=0.1, callback=_finite, help="Stop after this many seconds (default: Ctrl-C)."
        ),
    ] = None,
    load_rps: Annotated[
        float,
        typer.Option(min=0, callback=_finite, help="Background load through Envoy (0 = none)."),
    ] = 0.0,
) -> None:
    """Start the local stack and keep it running until Ctrl-C; prints the URLs to curl."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from rollout.core.types import Colour, Weights
    from rollout.errors import LocalStackError, RolloutError
    from rollout.local.stack import LocalStack

    console = _UpConsole(soft_wrap=True, emoji=False)
    if port is not None:
        from rollout.local.process import port_is_free

        if not port_is_free(port):
            raise LocalStackError(
                f"--port {port}: 127.0.0.1:{port} is already in use; choose another port, "
                "or leave --port out for a free one"
            )
    # Read before anything starts: a mistyped folder is one line, not seconds of training first.
    green = None if model_dir is None else _release(model_dir, "1", "--model-dir")
    candidate = None if candidate_dir is None else _release(candidate_dir, "2", "--candidate-dir")
    stack = LocalStack(workdir, envoy_port=port)
    # Handled from here to the end of the stop: the first signal stops `up`, any later one is
    # acknowledged (never the default action, which killed `up` with no stop).
    with interrupted_once(console) as interrupts:
        try:
            stack.start()
            if green is None:  # a failure names no log in the folder: not kept for it
                green = _release(
                    _train_example(stack.workdir / "models" / "green", console),
                    "1",
                    "--model-dir",
                )
            try:
                stack.router.deploy(Colour.GREEN, green)
                if candidate is not None:
                    stack.router.deploy(Colour.BLUE, candidate)
                stack.router.set_weights(Weights.blue_at(0))
            except RolloutError as exc:
                if stack.keep:
                    raise
                # The error names a server's log in the folder: removing it would leave the
                # user a dead path (a model that fails to load says why only there).
                stack.keep = True
                raise LocalStackError(
                    f"{exc}\n(the stack stopped; its files and logs are kept in {stack.workdir})"
                ) from exc
            load = stack.start_load(rps=load_rps) if load_rps else None
            _print_urls(console, stack, blue=candidate is not None)
            _print_spec_hint(
                console, _write_spec(stack, candidate, console), blue=candidate is not None
            )
            deadline = None if duration is None else time.monotonic() + duration
            said: set[str] = set()
            while deadline is None or time.monotonic() < deadline:
                # Its KeyboardInterrupt may have been lost (see sigterm_as_interrupt).
                if interrupts.stopping.is_set():
                    raise KeyboardInterrupt
                _watch(console, stack, said, load)
                # Time may run out since the loop's test: never a negative sleep (ValueError).
                time.sleep(
                    0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
                )
        except KeyboardInterrupt:
            _say(console, "stopping ...")
        finally:
            # Not `contextlib.suppress`: a signal could land in its own call, before it holds.
            try:  # noqa: SIM105
                interrupts.hold()
            except KeyboardInterrupt:  # the one a signal raises, just before: it asks for this
                pass
            ledgers = _keep_history(stack)
            stack.stop()
    _say(console, "stack stopped: no process left, ports released")
    if ledgers:
        _say(
            console,
            f"kept {stack.workdir}: it holds the ledger of a rollout run against this stack "
            f"({', '.join(p.name for p in ledgers)}); remove the folder when done, or give "
            "--workdir next time",
            markup=False,
            highlight=False,
        )


def _say(console: Console, text: str, **options: Any) -> None:
    """A line about the stop, which goes on (and ends well) when the terminal is gone (EIO)."""
    with contextlib.suppress(OSError):
        console.print(text, **options)


def _finite(value: float | None) -> float | None:
    """Refuse NaN and infinity, which pass typer's ranges (NaN fails every comparison): was,
    `--duration nan` stopped the stack as soon as it served, `--load-rps nan` sent no load."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def _watch(console: Console, stack: Any, said: set[str], load: Any = None) -> None:
    """Envoy or Prometheus gone by itself (killed, crashed): nothing restarts them.

    Without Envoy nothing is served and no weight can be set: the stack is stopped, with an
    error naming it and its log (the folder kept for that log). Without Prometheus Envoy still
    serves; a rollout then reads no metrics (Error ticks, weights held): said once, `up` goes on.
    Without green's scoring server Envoy answers 503 to what it routes there: said once too.
    The background load (`--load-rps`) ended by itself is said once too: a rollout against the
    stack would otherwise wait for traffic that never comes, with not a word until the stop.

    Scoring servers that ended are reaped first: a controller in another process that rolls back
    or promotes past one stops it by PID, and it stayed a zombie under `up` until `up` exited.
    """
    from rollout.core.types import Colour
    from rollout.errors import LocalStackError

    stack.workloads.reap()

    ended = stack.envoy.ended()
    if ended is not None:
        stack.keep = True
        raise LocalStackError(
            f"{ended}\n(while the stack ran; nothing restarts it, so `up` stopped the stack: "
            f"its files and logs are kept in {stack.workdir})"
        )
    ended = stack.prometheus.ended()
    if ended is not None and "prometheus" not in said:
        said.add("prometheus")
        console.print(
            f"warning: {ended}\n(Envoy still serves, but a rollout against this stack now reads "
            "no metrics: its ticks are Errors, its weights hold, and after "
            "analysis.max_consecutive_errors of them (4 s with up's spec) it is held for a "
            f"human. To go on: stop `up`, start it again with `--workdir {stack.workdir}` (it "
            "serves blue 0 % again), then `aml-rollout rollout resume SPEC` and `rollout run "
            "SPEC` set the rollout's weights back)",
            markup=False,
            highlight=False,
        )
    if load is not None and not load.running and "load" not in said:
        said.add("load")
        console.print(
            "warning: the background load (--load-rps) ended: no more requests are sent "
            "through Envoy (why is logged as `up` stops)",
            markup=False,
            highlight=False,
        )
    # Green is what answers: its server gone, every request Envoy sends it is a 503. Read
    # around the server's lookup: a controller in another process replacing green (a
    # promotion) starts the new server before it records it, and forgets a removed one first.
    serves = stack.router.release(Colour.GREEN)
    if (
        serves is not None
        and "green" not in said
        and stack.workloads.endpoint_of(Colour.GREEN) is None
        and stack.router.release(Colour.GREEN) == serves
    ):
        said.add("green")
        logs = f"{stack.workloads.directory}" + ("" if stack.keep else ", until `up` stops")
        console.print(
            f"warning: green's scoring server ({serves.ref}) ended: every request Envoy sends "
            f"to green now fails (503), and nothing restarts it; its log is in {logs}\n"
            "(stop `up` and start it again to serve green again)",
            markup=False,
            highlight=False,
        )


def _keep_history(stack: Any) -> list[Path]:
    """Ledgers of rollouts run against a stack in a temporary folder, which is then kept.

    `up` writes a spec whose state lives in the stack's folder; a temporary one is removed at
    stop, and took the ledger of a rollout a user had just run (`rollout explain`) with it.
    """
    if stack.keep:
        return []
    ledgers = sorted((Path(stack.workdir) / "state").glob("*.ledger.jsonl"))
    if ledgers:
        stack.keep = True
    return ledgers


def _write_spec(stack: Any, candidate: Any, console: Console) -> Path:
    """A rollout spec wired to this stack (router envoy, metrics prometheus), as YAML.

    A folder given again (`up --workdir D` to resume a rollout) keeps its spec's own fields:
    only what names this stack (router, metrics, state) is rewritten, and the candidate when
    one is given. Rewritten whole, it lost a user's edits and set `candidate: null`. A spec
    that no longer loads is moved aside to `rollout.yaml.previous`, and said.
    """
    from dataclasses import asdict

    import yaml

    from rollout.config import AnalysisConfig, LatencyCheck, RolloutSpec

    # The product's plan (the shadow step, then 5, 25, 50 %) and error analysis, but latency
    # against a 250 ms SLO, as in the demo: green's own p99 bucket is 1-5 ms here, and a fresh
    # blue's tail on a shared machine is slower than that by more than any model is, so the
    # default check rolled back a healthy candidate at the shadow step (twice in a row).
    latency = LatencyCheck(threshold="slo", slo_ms=250)
    fields: dict[str, Any] = {"analysis": AnalysisConfig(interval_s=1.0, latency=latency)}
    if candidate is not None:
        fields["candidate"] = asdict(candidate)
    fresh = stack.spec("local", **fields).model_dump(mode="json")
    path = Path(stack.workdir) / "rollout.yaml"
    document = fresh
    if path.is_file():
        try:
            kept = yaml.safe_load(path.read_text(encoding="utf-8"))
            if not isinstance(kept, dict):
                raise ValueError("not a mapping of fields")
            wired = ("router", "metrics", "state") + (("candidate",) if candidate else ())
            kept.update({key: fresh[key] for key in wired})
            document = RolloutSpec.model_validate(kept).model_dump(mode="json")
        except (OSError, ValueError, yaml.YAMLError) as exc:  # pydantic's errors are ValueErrors
            aside = path.with_name(f"{path.name}.previous")
            path.replace(aside)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            console.print(
                f"warning: {path} no longer loads ({first}): moved to {aside}, a new one written",
                markup=False,
                highlight=False,
            )
            document = fresh
    path.write_text(yaml.safe_dump(document, sort_keys=False), "utf-8")
    return path


def _train_example(folder: Path, console: Console) -> Path:
    from components.train.train import TrainParams, train
    from rollout.errors import LocalStackError

    console.print("training the example model (diabetes, Ridge) ...")
    try:
        train(folder, name="diabetes", params=TrainParams())
    except OSError as exc:  # a full disk: one line, not the train component's traceback
        raise LocalStackError(
            f"cannot train the example model in {folder}: {exc.strerror or exc}"
        ) from exc
    return folder


def _release(folder: Path, default_version: str, option: str) -> Any:
    """The release a folder `aml-rollout serve --model-dir` accepts holds: a package folder
    (package.json), a bare model folder (model.json) or a folder holding exactly one of those."""
    from rollout.core.types import Release
    from rollout.errors import LocalStackError
    from scoring.errors import ModelLoadError
    from scoring.model import MODEL_JSON, resolve_model_dir

    try:
        model_folder, package = resolve_model_dir(folder)
        if package is not None:
            name, version, sha256 = package["model"], package["version"], package.get("sha256")
        else:
            meta = json.loads((model_folder / MODEL_JSON).read_text(encoding="utf-8"))
            name, version, sha256 = meta["name"], default_version, meta.get("sha256")
    except ModelLoadError as exc:
        raise LocalStackError(f"{option}: {exc}") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LocalStackError(f"{option} {folder}: unreadable manifest ({exc})") from exc
    return Release(
        model=str(name),
        version=str(version),
        sha256=str(sha256 or ""),
        model_dir=str(folder.resolve()),
    )


def _print_urls(console: Console, stack: Any, *, blue: bool) -> None:
    table = Table("what", "where", title="aml-rollout local stack (Ctrl-C to stop)")
    table.add_row("scoring (Envoy)", f"{stack.url}/score")
    table.add_row("Envoy admin", stack.envoy.admin_url)
    table.add_row("Prometheus", stack.prometheus.url)
    from rollout.core.types import Colour

    for colour in (Colour.GREEN, Colour.BLUE):
        served = stack.workloads.endpoint_of(colour)
        if served is not None:
            table.add_row(f"{colour.value} server (direct)", f"http://{served.host}:{served.port}")
    table.add_row("files", str(stack.workdir))
    console.print(table)
    row = '{"data": [[0.03, 0.05, 0.06, 0.02, -0.04, -0.03, -0.04, 0.0, 0.02, -0.02]]}'
    _print_command(
        console, f"curl -s {stack.url}/score -H 'content-type: application/json' -d '{row}'"
    )
    if blue:
        _print_command(
            console,
            f"curl -s {stack.url}/score -H 'x-api-version: blue' "
            f"-H 'content-type: application/json' -d '{row}'",
        )
    _print_command(
        console, f"curl -s {stack.url}/score   # GET: which colour, model and version answers"
    )


def _print_spec_hint(console: Console, spec_file: Path, *, blue: bool) -> None:
    _print_command(console, f"rollout spec for this stack: {spec_file}")
    if blue:
        command = f"aml-rollout rollout run {shlex.quote(str(spec_file))}"  # --workdir "a b"
        _print_command(console, f"  roll blue out live:  {command}")


def _print_command(console: Console, line: str) -> None:
    """One line to copy and paste: never wrapped (a newline inside a quoted header is a 400),
    never styled (rich would read `[...]` in a JSON body as markup)."""
    console.print(line, soft_wrap=True, markup=False, highlight=False)
