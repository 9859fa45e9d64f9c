"""`aml-rollout rollout ...`: run, validate, status, steer (pause, resume, promote...), explain.

Steering commands (pause, resume, promote, abort, set-weight) never touch the data plane
themselves: they queue a command in the rollout's state store, and the running controller hands
it to the state machine at its next tick (waking early), so a command never races an analysis.

Exit codes of `run` (and of `status` for a finished rollout):

    0  promoted (Succeeded)          3  rolled back (RolledBack)
    4  held for a human (Paused)     5  failed (Failed)
    2  error a user can fix (bad spec, lease held, router/metrics unreachable...)
    6  still running (status of an unfinished rollout, an operator's pause included)
  130  interrupted (Ctrl-C or SIGTERM): the rollout is kept (its lease released, or left to
       expire when it cannot be); `run` resumes

Heavy modules (numpy, scipy, the engine) are imported inside command bodies so that
`aml-rollout --help` stays fast.
"""

from __future__ import annotations

import json
import shlex
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from rollout.azure_credential import quiet_azure_logs
from rollout.commands.console import QuietWhenReaderGone

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rollout.config import RolloutSpec
    from rollout.core.status import Command, Status
    from rollout.core.types import Release
    from rollout.state.base import StateStore

rollout_app = typer.Typer(no_args_is_help=True)

EXIT_PROMOTED = 0
EXIT_ERROR = 2
EXIT_ROLLED_BACK = 3
EXIT_PAUSED = 4
EXIT_FAILED = 5
EXIT_RUNNING = 6


class _Output(QuietWhenReaderGone):
    """stdout or stderr, which a controller outlives: rich exits the program (status 1,
    silently) when its reader has gone (`run | head`, `run 2>&1 | head`), and a controller
    stopped so leaves the canary at its weight with nothing guarding it. With `outlive_reader`
    set (by `run`) it prints nothing more, says so once on stderr if that still has a reader,
    and the rollout goes on (its ledger and `status` tell it)."""

    outlive_reader = False

    def on_broken_pipe(self) -> None:
        if not type(self).outlive_reader:
            Console.on_broken_pipe(self)  # a viewer (`status --watch | head`): done, exit
        super().on_broken_pipe()
        if not self.stderr:
            _err.print(
                "stdout closed: the rollout goes on, printing nothing more "
                "(`aml-rollout rollout status` and its ledger tell it)"
            )


# soft_wrap: long lines are printed whole (the terminal wraps them), never broken at 80 columns
# in a pipe or a CI log. emoji: a `:rocket:` in a model name or a reason is text, not an emoji
# (`escape` quotes markup only).
_out = _Output(highlight=False, soft_wrap=True, emoji=False)
_err = _Output(stderr=True, highlight=False, soft_wrap=True, emoji=False)

SpecArg = Annotated[Path, typer.Argument(help="Rollout spec (YAML).", show_default=False)]
StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="Where status, commands and ledger live (default: the spec's state.dir, .rollout "
        "under the current directory); with state.kind kubernetes only the ledger.",
    ),
]


#: C0 controls but tab and newline, DEL and C1: what a terminal must not get from a ledger or a
#: spec. A model name's ESC recoloured the terminal and its OSC set the window title (`explain`).
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c not in (9, 10)}


def _plain(text: str) -> str:
    """`text` with its control characters shown escaped (ESC as `\\x1b`), not sent as such."""
    return text.translate(_CONTROLS)


def _shown(text: str) -> str:
    """`text` printed as it is: neither markup (`escape`) nor control characters."""
    return escape(_plain(text))


def _fail(exc: Exception) -> NoReturn:
    _err.print(f"[bold red]error:[/] {_shown(str(exc))}")
    raise typer.Exit(EXIT_ERROR)


def _exit_code(phase: str) -> int:
    return {
        "Succeeded": EXIT_PROMOTED,
        "RolledBack": EXIT_ROLLED_BACK,
        "Paused": EXIT_PAUSED,
        "Failed": EXIT_FAILED,
    }.get(phase, EXIT_RUNNING)


def _load(spec_path: Path) -> RolloutSpec:
    from rollout.config import load_spec
    from rollout.errors import RolloutError

    try:
        return load_spec(spec_path)
    except RolloutError as exc:
        _fail(exc)


@rollout_app.command()
def validate(spec: SpecArg) -> None:
    """Check a spec: every problem is reported with the field it concerns.

    The spec's candidate and stable releases are checked as the router deploys them (an image
    for istio, a model folder for envoy): `run` refuses such a candidate before anything moves,
    and deploys the stable release to an empty green first, as `bootstrap` does."""
    from rollout.api import check_deployable, check_router_files
    from rollout.controller import same_bits
    from rollout.errors import RolloutError

    parsed = _load(spec)
    releases = {
        where: cfg.to_release()
        for where, cfg in (("candidate", parsed.candidate), ("stable", parsed.stable))
        if cfg is not None
    }
    problems = []
    for where, release in releases.items():  # each told: not ok here, then refused there
        try:
            check_deployable(parsed, release, where)
        except RolloutError as exc:
            problems.append(str(exc))
    try:
        check_router_files(parsed)
    except RolloutError as exc:
        problems.append(str(exc))
    candidate, stable = releases.get("candidate"), releases.get("stable")
    # Not an error: `run` refuses it only while green serves nothing (or the candidate already);
    # on a green serving another release, `stable:` goes unread and the rollout goes on.
    same = candidate is not None and stable is not None and same_bits(candidate, stable)
    if problems:
        for problem in problems:
            _err.print(f"[bold red]error:[/] {_shown(problem)}")
        raise typer.Exit(EXIT_ERROR)
    shadow = f" (0 %: shadow, {parsed.shadow_percent} % mirrored)" if parsed.shadow_percent else ""
    _out.print(
        f"[green]ok[/] {_shown(str(spec))}: rollout [bold]{parsed.name}[/], "
        f"plan {list(parsed.plan)} %{shadow}, "
        f"router {parsed.router.kind}, metrics {parsed.metrics.kind}, "
        f"alpha {parsed.analysis.alpha:g}, interval {parsed.analysis.interval_s:g} s, "
        f"on inconclusive: {parsed.analysis.on_inconclusive}"
    )
    if same and candidate is not None:
        _err.print(
            f"[bold yellow]warning:[/] `stable:` names the candidate {candidate.ref}: `run` "
            "refuses it while green serves nothing (a rollout compares the candidate with "
            "another release; for a service's first release, `aml-rollout rollout bootstrap "
            f"SPEC --release {candidate.ref}`), and reads no `stable:` while green serves "
            "another release"
        )
    needs = {"istio": "image", "envoy": "model folder"}.get(parsed.router.kind)
    if needs is None:
        return
    if "candidate" not in releases:
        # (--candidate MODEL:VERSION carries no folder or image: it picks a release the spec names.)
        _out.print(
            f"no candidate in the spec: the {parsed.router.kind} router deploys a candidate with "
            f"its {needs}: name it in the spec's `candidate:` (`run --candidate` only picks a "
            "release the spec names)"
        )
    for where, release in releases.items():
        given = release.image if parsed.router.kind == "istio" else release.model_dir
        _out.print(
            f"{where} {_shown(release.ref)} deployable by the {parsed.router.kind} router "
            f"({needs} {_shown(str(given))})"
        )


def _release(text: str | None, parsed: RolloutSpec, option: str = "--candidate") -> Release | None:
    """The release MODEL:VERSION names: the spec's `candidate:` or `stable:` of that ref when it
    has one (a command line carries no image, sha256 or package folder; the spec's does)."""
    from rollout.core.types import Release
    from rollout.errors import ConfigError

    if text is None:
        return None
    model, sep, version = text.partition(":")
    if not sep or not model or not version:
        _fail(ConfigError(f"{option}: expected MODEL:VERSION, got {text!r}"))
    named = Release(model=model, version=version)
    for cfg in (parsed.candidate, parsed.stable):
        if cfg is not None and cfg.to_release().ref == named.ref:
            return cfg.to_release()
    return named


@rollout_app.command()
def run(
    spec: SpecArg,
    candidate: Annotated[
        str | None, typer.Option(help="Candidate release MODEL:VERSION (default: the spec's).")
    ] = None,
    state_dir: StateDirOpt = None,
    restart: Annotated[
        bool, typer.Option(help="Start anew when the stored rollout has already ended.")
    ] = False,
    stop_when_paused: Annotated[
        bool, typer.Option(help="Return (exit 4) when the policy holds the rollout for a human.")
    ] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the outcome.")] = False,
    simulated_time: Annotated[
        bool,
        typer.Option(
            help="Advance a fake clock instead of waiting (dry runs on simulated or static "
            "metrics only)."
        ),
    ] = False,
) -> None:
    """Drive a rollout to its end; the exit code says how it ended.

    Promoted (exit 0), rolled back (3), held for a human (4), failed (5), error (2), interrupted
    (130: `run` again resumes it)."""
    import logging

    from rollout.api import check_deployable, run_rollout
    from rollout.commands.stack import EXIT_INTERRUPTED, sigterm_as_interrupt
    from rollout.controller import FakeClock, RealClock, check_same_router
    from rollout.errors import RolloutError

    parsed = _load(spec)
    if simulated_time:
        _simulated_metrics_only(parsed)
    _Output.outlive_reader = True
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_azure_logs()
    # urllib3 warns of each retry it makes ("Retrying (Retry(total=1, ...)) after connection
    # broken by ..."): noise before the one line that says which API server did not answer.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)

    def show(status: Status, record: dict[str, Any]) -> None:
        waits = status.phase.value == "Paused" and not (status.held and stop_when_paused)
        if simulated_time and waits:
            # Waiting for a human, who answers in wall time: on the fake clock alone the
            # controller spun through its ticks, a ledger line each (77 MB in 10 minutes).
            time.sleep(1.0)
        if quiet:
            return
        stamp = time.strftime("%H:%M:%S", time.localtime(record.get("at", time.time())))
        _out.print(
            f"{stamp} [bold]{status.phase.value:<11}[/] blue {status.blue_weight:>3} %  "
            f"{_shown(status.reason)}"
        )

    previous = _load_status(_store(parsed, state_dir))
    asked = _release(candidate, parsed)
    # The spec's candidate counts as asked for too: a spec edited to name the next release
    # was told both "already ended" and, by the error below, that it needs --restart.
    wanted = asked or (parsed.candidate.to_release() if parsed.candidate else None)
    if previous is None or (previous.terminal and restart):  # a new rollout, not a resume
        try:  # run_rollout checks it too; here first, to say which was given: the option or spec
            check_deployable(parsed, wanted, "--candidate" if asked else "candidate")
        except RolloutError as exc:
            _fail(exc)
    stored = previous.candidate if previous is not None else None
    same = wanted is None or (stored is not None and stored.ref == wanted.ref)
    # Another candidate than the ended rollout's is refused below, saying to --restart.
    if previous is not None and previous.terminal and not restart and same:
        try:
            # Another data plane's rollout of this name is refused below: not "already ended"
            # first, as if its outcome were this spec's.
            check_same_router(parsed, previous)
        except RolloutError as exc:
            _fail(exc)
        _out.print(
            f"rollout {parsed.name} already ended ({previous.phase.value}); "
            "`--restart` starts a new one"
        )
    try:
        # SIGTERM (a pod deleted, a node drained) stops like Ctrl-C: the lease is released on
        # the way out, so the next controller need not wait for it to expire.
        with sigterm_as_interrupt() as stopping:
            result = run_rollout(
                parsed,
                candidate=asked,
                state_dir=state_dir,
                on_tick=show,
                stop_when_paused=stop_when_paused,
                restart=restart,
                # Never behind the stored status: a simulated rollout resumed ran ahead of
                # the wall clock, and its ledger would step back in time.
                clock=FakeClock(max(time.time(), previous.updated_at if previous else 0.0))
                if simulated_time
                else RealClock(stopping),  # stops even should the signal's raise be lost
            )
    except RolloutError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        # Not "its lease released": a release that failed (the API server down) is logged
        # above, saying when the lease expires.
        _err.print(
            "interrupted: the rollout stays where it is; `aml-rollout rollout run` resumes it"
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    colour = {"Succeeded": "green", "RolledBack": "yellow"}.get(result.phase.value, "red")
    _out.print(f"[bold {colour}]{result.phase.value}[/]: {_shown(result.reason)}")
    # One line whatever the width (the consoles soft-wrap): wrapped, a pasted hint ran
    # `explain` without its ledger.
    _out.print(
        f"ledger: {result.ledger_path}  "
        f"(aml-rollout rollout explain {shlex.quote(str(result.ledger_path))})",
        markup=False,
    )
    raise typer.Exit(_exit_code(result.phase.value))


@rollout_app.command()
def bootstrap(
    spec: SpecArg,
    release: Annotated[
        str | None,
        typer.Option(
            help="The first release MODEL:VERSION (default: the spec's `stable:`, else its "
            "`candidate:`)."
        ),
    ] = None,
    state_dir: StateDirOpt = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Then judge it on the spec's absolute limits (errors.max_rate, "
            "latency.max_slow_rate) from its metrics until a verdict: within them (exit 0), "
            "a limit breached (5), undecided after max_step_duration_s (4).",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the outcome.")] = False,
    simulated_time: Annotated[
        bool,
        typer.Option(
            help="With --check: advance a fake clock instead of waiting (simulated or static "
            "metrics only)."
        ),
    ] = False,
) -> None:
    """Deploy a service's first release to an empty green, all traffic to it.

    There is nothing to compare it with yet: unjudged, or with --check judged on absolute limits
    alone. Every later release is rolled out against it."""
    from rollout.api import bootstrap as bootstrap_green
    from rollout.api import check_model_dir
    from rollout.errors import ConfigError, RolloutError

    parsed = _load(spec)
    quiet_azure_logs()
    first = _release(release, parsed, "--release")
    if first is None:
        named = parsed.stable or parsed.candidate
        if named is None:
            _fail(ConfigError("--release: name the first release (the spec names none)"))
        first = named.to_release()
    try:
        check_model_dir(parsed, first, "--release" if release else "the first release")
    except ConfigError as exc:
        _fail(exc)
    if check:
        if simulated_time:
            _simulated_metrics_only(parsed)
        raise typer.Exit(_check_first(parsed, first, state_dir, quiet, simulated_time))
    if simulated_time:
        _fail(ConfigError("--simulated-time: only with --check (nothing is waited for)"))
    try:
        done = bootstrap_green(parsed, first, state_dir=state_dir)
    except RolloutError as exc:
        _fail(exc)
    if not done:
        _out.print(f"green already serves {_shown(first.ref)}: nothing to do")
        return
    _out.print(
        f"[bold green]green[/] serves {_shown(first.ref)} with all traffic; roll out the next "
        "release with `aml-rollout rollout run`"
    )


def _simulated_metrics_only(parsed: RolloutSpec) -> None:
    """Refuse --simulated-time unless the metrics are simulated (or static): on live ones the
    fake clock ages steps with seconds that never passed, a ledger line per tick, no wait."""
    from rollout.errors import ConfigError

    kind = parsed.metrics.kind
    if kind not in ("simulated", "static"):
        _fail(
            ConfigError(
                f"--simulated-time: for dry runs on simulated or static metrics; these are {kind} "
                "(metrics.kind): a live rollout waits in wall time"
            )
        )


def _check_first(
    parsed: RolloutSpec, first: Release, state_dir: Path | None, quiet: bool, simulated_time: bool
) -> int:
    """`bootstrap --check`: deploy, then judge the first release; prints the looks and the
    verdict, returns the exit code."""
    from rollout.api import bootstrap_checked
    from rollout.commands.stack import EXIT_INTERRUPTED, sigterm_as_interrupt
    from rollout.controller import FakeClock, RealClock
    from rollout.core.types import Verdict
    from rollout.errors import RolloutError

    clock = FakeClock(time.time()) if simulated_time else None

    def show(verdict: Verdict, reason: str) -> None:
        if not quiet:
            stamp = time.strftime("%H:%M:%S", time.localtime(clock.now() if clock else None))
            _out.print(f"{stamp} [bold]{verdict.value:<12}[/] {_shown(reason)}")

    if not quiet:
        # Said as what comes, not as done: a probe or a deploy refused next deploys nothing.
        _out.print(
            f"{_shown(first.ref)} to green with all traffic, then judged on the absolute limits "
            f"every {parsed.analysis.interval_s:g} s"
        )
    try:
        with sigterm_as_interrupt() as stopping:
            result = bootstrap_checked(
                parsed, first, state_dir=state_dir, clock=clock or RealClock(stopping), on_look=show
            )
    except RolloutError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _err.print(
            f"interrupted: {first.ref} not judged; `aml-rollout rollout bootstrap --check` "
            "finishes its deploy if need be and judges it afresh"
        )
        return EXIT_INTERRUPTED
    if result.verdict is Verdict.ERROR:
        _fail(RolloutError(result.reason))
    colour, said, code, hint = {
        Verdict.SUCCESSFUL: (
            "green",
            "within the limits",
            EXIT_PROMOTED,
            "roll out the next release with `aml-rollout rollout run`",
        ),
        Verdict.FAILED: (
            "red",
            "a limit breached",
            EXIT_FAILED,
            f"{first.ref} still serves all traffic (there is nothing to roll back to): roll a "
            "fixed release out with `aml-rollout rollout run --candidate MODEL:VERSION`",
        ),
        Verdict.INCONCLUSIVE: (
            "yellow",
            "undecided",
            EXIT_PAUSED,
            "a human's call: look at its traffic, or run `bootstrap --check` again",
        ),
    }[result.verdict]
    _out.print(
        f"[bold {colour}]{result.verdict.value}[/] ({said}): first release {_shown(first.ref)}: "
        f"{_shown(result.reason)}",
    )
    _out.print(_shown(hint))
    return code


def _store(parsed: RolloutSpec, state_dir: Path | None) -> StateStore:
    from rollout.api import open_store
    from rollout.errors import RolloutError

    try:
        return open_store(parsed, state_dir)
    except RolloutError as exc:
        _fail(exc)


def _read_status(store: StateStore) -> Status | None:
    """The stored status, with the commands queued since its last tick (shown as "queued")."""
    from rollout.errors import RolloutError

    try:
        return _status_now(store)
    except RolloutError as exc:
        _fail(exc)


def _status_now(store: StateStore) -> Status | None:
    """`_read_status`, raising the RolloutError of a store that cannot be read (a watch goes on)."""
    from rollout.core.machine import with_commands

    status = store.load()
    return with_commands(status, store.commands()) if status else None


def _load_status(store: StateStore) -> Status | None:
    """The stored status (a store that cannot be read is one red line)."""
    from rollout.errors import RolloutError

    try:
        return store.load()
    except RolloutError as exc:
        _fail(exc)


def _view(
    parsed: RolloutSpec,
    store: StateStore,
    status: Status | None,
    first: str | None,
    *,
    read_now: bool = False,
    watching: bool = False,
    unread: str = "",
) -> Any:
    """The status table, with who drives the rollout now (the lease holder); `first` is the
    release a bootstrap left on green, as `_bootstrapped` says it, shown until a rollout begins.
    `read_now`: a held rollout no controller drives, or an ended one whose data plane differed
    from its status when last read, shows what its data plane serves now. `watching`: a lease
    that cannot be read is a row, not an exit, as is `unread` (why the last status read failed:
    the status shown is the one read before)."""
    from rollout.errors import RolloutError

    try:
        holder = store.controller()
    except RolloutError as exc:
        if not watching:
            _fail(exc)
        holder = f"unknown: {exc}"
    fresh = False
    # Also an ended rollout that left the data plane differing from its status (an abort that
    # moved nothing): its last read is from before it ended.
    differs = status is not None and (
        status.held or (status.terminal and status.served is not None)
    )
    if read_now and status is not None and differs and holder is None:
        status, fresh = _served_read_now(parsed, status)
    table = _status_view(parsed, status, holder, fresh=fresh)
    if status is None:
        table.add_row("state", _shown(_no_status(store)))
    if status is None and first is not None:
        table.add_row("green", _shown(first))
    if unread:
        table.add_row("last read", f"[red]{_shown(unread)}[/]; watching on")
    return table


def _bootstrapped(parsed: RolloutSpec, state_dir: Path | None) -> str | None:
    """What green serves after the last bootstrap the ledger records (and how the release's last
    check ended, if it had one), when no rollout has begun since."""
    from rollout.api import ledger_path_of
    from rollout.errors import StateError
    from rollout.ledger import iter_ledger

    path = ledger_path_of(parsed, state_dir)
    if not path.exists():
        return None
    # One line at a time, keeping only the last bootstrap and the last check after it: read
    # whole, a long rollout's ledger took several times its size in memory (75 MB: 472 MB).
    bootstrap: dict[str, Any] | None = None
    check: dict[str, Any] | None = None
    try:
        for record in iter_ledger(path):
            event = record.get("event")
            if event == "bootstrap":
                bootstrap, check = record, None
            elif event == "first-check" and bootstrap is not None:
                check = record
            else:
                bootstrap = check = None
    except StateError:
        return None  # the table says what it can; `explain` reports an unreadable ledger
    if bootstrap is None:
        return None
    release = bootstrap.get("release")
    if not isinstance(release, dict):  # a line edited by hand, or another tool's: `explain`'s ?:?
        release = {}
    judged = "unjudged"
    if check is not None:
        judged = f"judged on the absolute limits: {check.get('verdict')}: {check.get('reason')}"
    return (
        f"{release.get('model', '?')}:{release.get('version', '?')} with all traffic, "
        f"bootstrapped (a first release, {judged}); roll out the next one with "
        "`aml-rollout rollout run`"
    )


def _no_status(store: StateStore) -> str:
    """Where no status was found, and what that directory holds instead: `.rollout` under
    another working directory, or the state dir of another spec, look like "not started" (and
    so does a kubernetes store in another namespace or cluster: its ConfigMap is named)."""
    from rollout.state.file import FileStateStore
    from rollout.state.kubernetes_objects import StateObjects
    from rollout.state.memory import MemoryStateStore

    # The kubernetes store's names, without importing it (and the kubernetes client) here.
    if isinstance(objects := getattr(store, "objects", None), StateObjects):
        if getattr(store, "status_configmap_found", False):
            return (
                f"ConfigMap {objects.namespace}/{objects.status} holds no status yet: a lease "
                "was taken (a bootstrap, or a controller stopped before its first tick)"
            )
        return (
            f"no ConfigMap {objects.namespace}/{objects.status}: another state.namespace, or "
            "another cluster (kubeconfig context), than the controller's?"
        )
    if isinstance(store, MemoryStateStore):
        # A `run` of this spec may well be going on: its status is in that process alone.
        return (
            "state.kind memory keeps the status inside the running controller's process, out of "
            "reach of `status` and the steering commands (state.kind file or kubernetes share it)"
        )
    if not isinstance(store, FileStateStore):
        return "no status found"
    text = f"no {store.status_path}"
    if not store.dir.is_dir():
        return f"{text}, no directory {store.dir}: run from where `run` ran, or give --state-dir"
    others = sorted(p.name.removesuffix(".status.json") for p in store.dir.glob("*.status.json"))
    if others:
        text += f"; that directory holds rollout {', '.join(others)}: another spec's state dir?"
    return text


def _settled(status: Status | None) -> bool:
    """Ended, or held for a human: nothing changes until someone acts."""
    return status is not None and (status.terminal or status.held)


def _status_code(status: Status | None) -> int:
    if status is None or (status.phase.value == "Paused" and not status.held):
        return EXIT_RUNNING  # not started yet, or an operator's pause the controller guards
    return _exit_code(status.phase.value)


def _served_read_now(parsed: RolloutSpec, status: Status) -> tuple[Status, bool]:
    """The status with what the data plane serves now (and True), else as stored (and False,
    the router unreadable). A held rollout's `served` is from its last tick; while no
    controller runs it, another rollout may have promoted since (resume then refused)."""
    from dataclasses import replace

    from rollout.config import MemoryRouterConfig
    from rollout.controller import served_now
    from rollout.errors import RolloutError
    from rollout.routers.factory import make_router

    if isinstance(parsed.router, MemoryRouterConfig) and parsed.router.state_file is None:
        return status, False  # the controller's process alone held that data plane
    try:
        return replace(status, served=served_now(make_router(parsed.router))), True
    except RolloutError:
        return status, False


def _status_view(
    parsed: RolloutSpec, status: Status | None, controller: str | None, *, fresh: bool = False
) -> Any:
    from rich.table import Table

    from rollout.core.machine import (
        left_alone,
        promotion_unapplied,
        resume_refused,
        steering_refused,
    )
    from rollout.core.status import SetWeights, describe
    from rollout.core.types import Phase, Verdict

    table = Table(title=f"rollout {parsed.name}", show_header=False, box=None)
    table.add_column()
    table.add_column(overflow="fold")  # a path or a lease holder cut with "…" says nothing
    if status is None:
        table.add_row("phase", "not started")
        return table
    at = _plan_step(status, parsed.plan)
    plan = " → ".join(
        f"[bold reverse]{w}[/]" if i == at else str(w) for i, w in enumerate(parsed.plan)
    )
    table.add_row("phase", f"[bold]{status.phase.value}[/]")
    # Weights decided but not applied (a controller stopped before its router call) are not
    # what the data plane serves: said so, or they read as the split users get.
    todo = status.pending[status.applied :]
    unserved = any(isinstance(a, SetWeights) for a in todo)
    weights = f"{status.weights}{' (decided, not applied yet)' if unserved else ''}"
    if left_alone(status):
        # Nor are the weights of an abort that moved nothing (another rollout's canary on blue):
        # its "blue 0 %" read as what users get while blue kept its share.
        weights = "none set: the abort left the data plane as it is"
    table.add_row("weights", f"{weights}   plan {plan}")
    # Promoted, the candidate is what green serves; the stable release it replaced is gone.
    # So it is once Finalising's deploy to green is applied (blue keeps the users until the
    # next tick moves them there): "stable (green)" contradicted "green now serves" the candidate.
    promoted = status.phase is Phase.SUCCEEDED
    on_green = status.phase is Phase.FINALISING and not promotion_unapplied(status)
    if status.candidate:
        where = "green: promoted" if promoted else "blue"
        where = "blue and green: promoting" if on_green else where
        table.add_row("candidate", f"{_shown(status.candidate.ref)} ({where})")
    if status.stable:
        replaced = "replaced" if promoted or on_green else "green"
        table.add_row("stable", f"{_shown(status.stable.ref)} ({replaced})")
    if status.served is not None:
        # What the data plane served, not what the rollout set (the weights above): another
        # rollout on it, or a hand edit.
        served = status.served
        blue, green = (r.ref if r else "nothing" for r in (served.blue, served.green))
        when = "read now" if fresh else "last read"
        table.add_row(
            "data plane", _shown(f"blue {blue}, green {green}: {served.weights} ({when})")
        )
    # (`status` here carries what the data plane serves now when `_view` could read it.)
    unresumable = resume_refused(status, parsed.plan)
    if unresumable:
        table.add_row("resume", f"refused: {_shown(unresumable)}")
    elif refused := steering_refused(status):
        table.add_row("promote", f"refused: {_shown(refused)}")
    table.add_row("last verdict", status.verdict.value if status.verdict else "-")
    table.add_row("reason", _shown(status.reason))
    for label, ev in (("errors", status.errors), ("slow requests", status.slow)):
        if ev.canary_requests:
            table.add_row(
                label,
                f"canary {ev.canary_bad}/{ev.canary_requests}, baseline "
                f"{ev.baseline_bad}/{ev.baseline_requests}; e-value worse "
                f"{_exp(ev.log_e_worse())}, not-worse {_exp(ev.log_e_ok())}",
            )
    passes = status.held and status.phase is Phase.PAUSED and status.verdict is Verdict.SUCCESSFUL
    if passes and not unresumable:
        # The judge keeps counting while a human is awaited; the reason above is why it held.
        # (Not said of a resume refused above: the table offered the one answer that fails.)
        table.add_row(
            "since held",
            "the evidence now passes this step: `resume` lets it advance on the next tick",
        )
    if todo:
        table.add_row("not applied", _shown("; ".join(describe(a) for a in todo)))
    if status.commands:
        table.add_row("queued", ", ".join(_typed(c) for c in status.commands))
    if controller:
        table.add_row("controller", _shown(controller))
    elif not status.terminal:
        table.add_row("controller", f"none running: {_undriven(status, parsed.plan)}")
    return table


def _plan_step(status: Status, plan: Sequence[int]) -> int | None:
    """The index of the step of `plan` (the spec's now) to show as the rollout's, or None.

    The stored `step_index` counts in the plan of its day: after `steps` was edited it named
    another weight than blue's (`plan 10 → 25 → [50] → 100` beside blue 80 %). While a step
    runs, the step is blue's weight, found as the machine finds it (`_follow_plan`): none when
    the plan no longer has it. Otherwise (ended, promoting, rolling back) blue's weight is no
    step's, and the stored index is all there is."""
    from rollout.core.machine import plan_step
    from rollout.core.types import Phase

    index = status.step_index
    if status.phase in (Phase.PROGRESSING, Phase.PAUSED):
        return plan_step(plan, index, status.blue_weight)
    return index if index < len(plan) else None


def _undriven(status: Status, plan: Sequence[int]) -> str:
    """What to do about a rollout no controller drives: a held one waits for a human's answer
    first (`run` alone changes nothing there), unless one is queued already. `plan`: the
    spec's steps now (a held weight they no longer have refuses resume)."""
    if status.commands:  # answered: told again to answer, an operator answers twice
        queued = ", ".join(_typed(c) for c in status.commands)
        return f"`aml-rollout rollout run SPEC` acts on the queued {queued}"
    from rollout.core.machine import promotion_unapplied, resume_refused, steering_refused
    from rollout.core.types import Phase

    if promotion_unapplied(status):
        # A deploy that failed for good fails again at every `run`: abort is the way out.
        return (
            "its deploy to green is not applied: `aml-rollout rollout run SPEC` tries it again; "
            "if it fails for good, `aml-rollout rollout abort SPEC` first"
        )
    if status.phase is Phase.PAUSED and not status.held:
        # An operator's pause: `run` guards it, and it stays paused (was: "resume it with
        # `run`", which read as no need for `rollout resume`).
        return (
            "the pause is unguarded: `aml-rollout rollout run SPEC` guards it again (it stays "
            "paused), `aml-rollout rollout resume SPEC` lets it advance"
        )
    what = "answer with resume, promote or abort, then" if status.held else "resume it with"
    if status.held and resume_refused(status):
        # Production moved on under it: resume is refused, and promote would undo that move.
        what = "answer with abort (the data plane's green serves another release), then"
    elif status.held and resume_refused(status, plan):
        # `steps` changed under the held weight: resume is refused (which way is a human's).
        what = "answer with set-weight, promote or abort, then"
    elif status.held and steering_refused(status):
        # Blue serves another rollout's canary: promoted, it would get all users unjudged.
        what = "answer with resume or abort (blue serves another release), then"
    return f"{what} `aml-rollout rollout run SPEC`"


def _typed(command: Command) -> str:
    """A queued command as an operator types it: `set-weight 50`, not its kind `set_weight`."""
    said = command.kind.replace("_", "-")
    return said if command.weight is None else f"{said} {command.weight}"


def _exp(log_value: float) -> str:
    import math

    return f"{math.exp(min(log_value, 700.0)):.3g}"


@rollout_app.command()
def status(
    spec: SpecArg,
    state_dir: StateDirOpt = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until it ends.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the raw status JSON (--watch: a line per change).")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Stop watching after this many seconds.")] = 3600,
) -> None:
    """Show where a rollout is; exit code as for `run` (6 while still running)."""
    from rollout.controller import check_same_router
    from rollout.errors import RolloutError
    from rollout.state.memory import MemoryStateStore

    parsed = _load(spec)
    store = _store(parsed, state_dir)
    current = _read_status(store)
    if current is not None:
        try:
            check_same_router(parsed, current)  # not another data plane's rollout as this one's
        except RolloutError as exc:
            _fail(exc)
    # Read once, not at every refresh: only shown while no rollout has begun.
    first = _bootstrapped(parsed, state_dir) if current is None else None
    if isinstance(store, MemoryStateStore):
        watch = False  # its status is in the controller's process: a watch would wait for nothing
    if watch and (as_json or not _out.is_terminal):
        current = _follow(store, current, timeout, parsed.plan, as_json=as_json)
    elif watch:
        from rich.live import Live

        deadline = time.monotonic() + timeout
        view = _view(parsed, store, current, first, watching=True)
        with Live(view, console=_out, refresh_per_second=2) as live:
            while time.monotonic() < deadline and not _settled(current):
                time.sleep(1.0)
                unread = ""
                try:
                    current = _status_now(store)
                except RolloutError as exc:  # an API blip: said, and the watch goes on
                    unread = f"{time.strftime('%H:%M:%S')} {exc}"
                live.update(_view(parsed, store, current, first, watching=True, unread=unread))
    elif as_json:
        _out.print_json(json.dumps(current.to_dict() if current else None))
    else:
        _out.print(_view(parsed, store, current, first, read_now=True))
    raise typer.Exit(_status_code(current))


def _follow(
    store: StateStore,
    current: Status | None,
    timeout: float,
    plan: Sequence[int],
    *,
    as_json: bool = False,
) -> Status | None:
    """`status --watch` into a pipe or a file: one plain line per change, not a live panel;
    with `--json`, one JSON line (the status, or null) per change.

    A read that fails (a Kubernetes API blip) is one line (on stderr with `--json`) and the
    watch goes on until its timeout, the last status read standing for the rollout's."""
    from rollout.errors import RolloutError

    deadline = time.monotonic() + timeout
    shown: tuple[object, ...] | None = None
    unread: str | None = None
    while True:
        stamp = time.strftime("%H:%M:%S")
        line: tuple[object, ...]
        if unread is not None:
            line = ("unread", unread)
            if line != shown:
                said = f"{stamp} cannot read the status: {unread}; watching on"
                (_err if as_json else _out).print(_plain(said), markup=False)
        elif as_json:
            line = (json.dumps(current.to_dict() if current else None),)
            if line != shown:
                _out.print(line[0], markup=False)
        elif current is None:
            line = ("not started",)
            if line != shown:
                # Else a pipe got nothing for the whole timeout (an hour) where the terminal
                # view says "not started" and where it looked: a wrong directory or spec looked
                # alike. Said again when a status read before is gone (its file, its state dir).
                where = _no_status(store)
                said = "not started" if shown is None else "no status any more"
                _out.print(_plain(f"{stamp} {said} ({where}); waiting for it"), markup=False)
        else:
            # A controller that stopped (Ctrl-C, a crash) changes nothing in the status: said
            # once, or the watch went silent as if a step were merely waiting.
            try:
                driven = current.terminal or store.controller() is not None
            except RolloutError:
                driven = True  # the next read of the status says what is unreadable
            line = (current.phase.value, current.blue_weight, current.reason, driven)
            if line != shown:
                text = f"{stamp} {line[0]:<11} blue {line[1]:>3} %  {line[2]}"
                if not driven:
                    text += f"  (no controller running: {_undriven(current, plan)})"
                _out.print(_plain(text), markup=False)
        shown = line
        if _settled(current) or time.monotonic() >= deadline:
            return current
        time.sleep(1.0)
        try:
            current, unread = _status_now(store), None
        except RolloutError as exc:
            unread = str(exc)


def _refused_now(parsed: RolloutSpec, status: Status, kind: str = "resume") -> str:
    """Why a resume (or a promote, a set-weight) of this held rollout would be refused by what
    the data plane serves now ("" when not, or when the router cannot tell). `Status.served`
    is from its last tick: measured on the local stack, the other rollout promoted while no
    controller ran the held one, and a resume was queued that the next `run` ignored ("green
    now serves ...")."""
    from rollout.core.machine import resume_refused, steering_refused

    if not status.held:
        return ""
    now, fresh = _served_read_now(parsed, status)
    if not fresh:
        return ""  # unreadable: the last tick's record decides
    return resume_refused(now) if kind == "resume" else steering_refused(now)


def _run_again(spec: Path, state_dir: Path | None, *more: str) -> str:
    """The `run` that drives this rollout again, to copy and paste: quoted for the shell, and
    with the --state-dir it was found in (was: neither, and the `run` pasted read the default
    state directory, where it is not, or the shell split the spec's path)."""
    where = ["--state-dir", str(state_dir)] if state_dir is not None else []
    return shlex.join(["aml-rollout", "rollout", "run", str(spec), *where, *more])


def _queue(spec: Path, state_dir: Path | None, kind: str, weight: int | None = None) -> None:
    from rollout.controller import check_same_router, current_user
    from rollout.core.machine import promotion_unapplied, resume_refused, steering_refused
    from rollout.core.status import Command
    from rollout.core.types import Phase
    from rollout.errors import RolloutError

    parsed = _load(spec)
    if weight is not None and weight not in parsed.plan:
        _fail(ValueError(f"weight {weight} is not in the plan {list(parsed.plan)}"))
    store = _store(parsed, state_dir)
    try:
        current = store.load()
        if current is None:
            from rollout.state.memory import MemoryStateStore

            unseen = "is out of reach" if isinstance(store, MemoryStateStore) else "has not started"
            _fail(RolloutError(f"rollout {parsed.name!r} {unseen} ({_no_status(store)})"))
        check_same_router(parsed, current)
        if current.terminal:
            _fail(RolloutError(f"rollout {parsed.name!r} has ended ({current.phase.value})"))
        # (Finalising too while its deploy to green is unapplied and no controller runs: the
        # deploy failed for good, and every `run` stopped at it.)
        under_way = _under_way(current)
        unapplied = promotion_unapplied(current)
        driven = store.controller() if under_way or unapplied else None  # one read of the lease
        undoable = current.phase is Phase.PROMOTING or (unapplied and not driven)
        if under_way and not (kind == "abort" and undoable):
            # The machine reads no command until it has ended but an abort while promoting
            # (green still serves the stable release: blue to 0 % undoes it; and a promotion
            # the router refuses for good has no other way out): queued, one was said to act
            # at the next tick, then dropped.
            finish = f"`{_run_again(spec, state_dir)}` finishes it"
            idle = "" if driven else f"; no controller is running: {finish}"
            unless = " unless aborted" if undoable else ""
            _fail(
                RolloutError(
                    f"rollout {parsed.name!r} is {current.phase.value}: {under_way}, and ends "
                    f"on its own{unless}; {kind.replace('_', '-')} cannot act on it (nothing "
                    f"queued){idle}"
                )
            )
        if kind == "resume" and not _pausing(current, store):
            # The controller would ignore it ("resume: ignored, not paused"), after this said
            # it acts on it.
            already = current.phase is Phase.PAUSED  # (a resume queued since, unread yet)
            _out.print(
                f"rollout {parsed.name} is Paused, and a resume of it is already queued: "
                "nothing more to resume"
                if already
                else f"rollout {parsed.name} is {current.phase.value}, not paused: nothing to "
                "resume"
            )
            return
        if kind == "resume" and (
            refused := resume_refused(current, parsed.plan) or _refused_now(parsed, current)
        ):
            # The controller would ignore it too ("resume: ignored, green now serves ...").
            _fail(RolloutError(f"rollout {parsed.name} cannot be resumed: {refused}"))
        if kind == "pause" and current.held and current.served is not None:
            # Held for a data plane changed under it: a pause was taken, then the same tick
            # held it again for that change (its `run` returned at once, no one guarding).
            refused = resume_refused(current, parsed.plan)
            answer = (
                f", and resume cannot: {refused}"
                if refused
                else ": answer with resume (it sets the data plane back) or abort"
            )
            _fail(
                RolloutError(
                    f"rollout {parsed.name} is held for a change of its data plane, which a "
                    f"pause does not clear{answer}"
                )
            )
        if kind in ("promote", "set_weight") and (
            refused := steering_refused(current) or _refused_now(parsed, current, kind)
        ):
            # The controller would ignore it ("promote: ignored, blue serves diabetes:3 ...").
            what = "promoted" if kind == "promote" else f"set to {weight} %"
            _fail(RolloutError(f"rollout {parsed.name} cannot be {what}: {refused}"))
        command = Command(
            id=uuid.uuid4().hex,
            kind=kind,  # type: ignore[arg-type]
            weight=weight,
            at=time.time(),
            by=current_user(),
            rollout=current.id,
        )
        store.push_command(command)
        running = store.controller()
    except RolloutError as exc:
        _fail(exc)
    said = _typed(command)
    if running:
        race = (
            " (unless it has begun deploying the candidate to green by then: the promotion "
            "then completes, and the ledger says the abort was dropped)"
            if kind == "abort" and current.phase is Phase.PROMOTING
            else ""
        )
        _out.print(
            f"queued {said} for rollout {parsed.name}; the controller acts at its next tick{race}"
        )
        return
    # `run` resumes only the stored rollout's candidate: a spec that now names another one
    # would be refused (the operator may be aborting to roll that one out).
    stored = current.candidate
    named = parsed.candidate.to_release() if parsed.candidate else None
    which = ["--candidate", stored.ref] if stored and named and named.ref != stored.ref else []
    _out.print(
        f"queued {said} for rollout {parsed.name}; no controller is running: "
        f"`{_run_again(spec, state_dir, *which)}` acts on it",
        markup=False,
    )


def _under_way(status: Status) -> str:
    """What a rollout on its way to an end is doing ("" when it reads commands): promoting or
    rolling back, which no command stops or changes."""
    from rollout.core.types import Phase

    candidate = status.candidate.ref if status.candidate else "the candidate"
    return {
        Phase.PROMOTING: f"the promotion of {candidate} is under way (blue at 100 %, green next)",
        Phase.FINALISING: f"the promotion of {candidate} is under way (green gets it, blue goes)",
        Phase.ROLLING_BACK: "the rollback is under way (blue back to 0 %)",
    }.get(status.phase, "")


def _pausing(status: Status, store: StateStore) -> bool:
    """Paused, or to be when the controller reads the commands queued since (the last pause or
    resume among them decides)."""
    from rollout.core.machine import with_commands
    from rollout.core.types import Phase

    paused = status.phase is Phase.PAUSED
    for command in with_commands(status, store.commands()).commands:
        if command.kind in ("pause", "resume") and command.rollout in (None, "", status.id):
            paused = command.kind == "pause"
    return paused


@rollout_app.command()
def pause(spec: SpecArg, state_dir: StateDirOpt = None) -> None:
    """Hold the rollout at its current weight (the judge still rolls back a clear regression)."""
    _queue(spec, state_dir, "pause")


@rollout_app.command()
def resume(spec: SpecArg, state_dir: StateDirOpt = None) -> None:
    """Resume a paused or held rollout (the current step starts its clock again)."""
    _queue(spec, state_dir, "resume")


@rollout_app.command()
def promote(spec: SpecArg, state_dir: StateDirOpt = None) -> None:
    """Promote now, skipping the remaining analysis."""
    _queue(spec, state_dir, "promote")


@rollout_app.command()
def abort(spec: SpecArg, state_dir: StateDirOpt = None) -> None:
    """Roll back at once: blue to 0 %, green keeps serving.

    Blue serving another release than the candidate (another rollout's canary) is left as it
    is."""
    _queue(spec, state_dir, "abort")


@rollout_app.command("set-weight")
def set_weight(
    spec: SpecArg,
    weight: Annotated[int, typer.Argument(help="A weight of the plan (100 promotes).")],
    state_dir: StateDirOpt = None,
) -> None:
    """Jump to a step of the plan; analysis continues from there."""
    _queue(spec, state_dir, "set_weight", weight)


@rollout_app.command()
def explain(
    path: Annotated[
        Path,
        typer.Argument(
            help="A rollout ledger (*.ledger.jsonl), the rollout's spec (YAML), or its status "
            "file (*.status.json, next to its ledger)."
        ),
    ],
    state_dir: StateDirOpt = None,
) -> None:
    """Tell the story of a rollout from its ledger, in plain words."""
    from rollout.api import ledger_path_of
    from rollout.errors import RolloutError, StateError
    from rollout.jsonl import TORN
    from rollout.ledger import explain as story
    from rollout.ledger import has_ledger_lines, iter_ledger, may_be_torn_ledger_line

    ledger = path
    if path.suffix.lower() in (".yaml", ".yml"):  # as `status` takes it: DRY.YAML too
        parsed = _load(path)
        ledger = ledger_path_of(parsed, state_dir)
        if not ledger.exists():
            # As `status` says it: `.rollout` is under the working directory.
            _fail(
                StateError(
                    f"rollout {parsed.name!r} has no ledger {ledger}: not run yet, or run from "
                    "another directory (run this from where `run` ran, or give --state-dir)"
                )
            )
    elif path.name.endswith(".status.json"):
        ledger = path.with_name(path.name.removesuffix(".status.json") + ".ledger.jsonl")
    try:
        told = []
        if not has_ledger_lines(ledger) and ledger.stat().st_size:
            # Only complete lines say what a file is: a controller killed in its first append
            # leaves a fragment alone, in the rollout's own ledger (which must look like the
            # beginning of a ledger line: a word, or binary bytes, without a newline is none).
            # Torn again, each fragment but the last was ended by the next append's `#torn`.
            *lines, last = ledger.read_bytes().split(b"\n")
            mark = TORN.strip()
            ended = [line.strip() for line in lines if line.strip()]
            fragments = [line.removesuffix(mark) for line in ended]
            fragments += [last] if last.strip() or not ended else []
            if not all(line.endswith(mark) for line in ended) or not all(
                may_be_torn_ledger_line(fragment) for fragment in fragments
            ):
                raise StateError(
                    f"{ledger} is not a rollout ledger (no ledger lines): give the rollout's "
                    "<name>.ledger.jsonl, or its spec"
                )
            some = "a torn line" if len(fragments) == 1 else "torn lines"
            them = "it" if len(fragments) == 1 else "each"
            told = [
                f"the ledger is empty but for {some} (its writer stopped in the middle of "
                f"{them}): the rollout has not ticked yet"
            ]
        told = told or story(iter_ledger(ledger))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        # A line of another shape (edited by hand, another tool's JSON lines): one line, not a
        # traceback.
        what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
        _fail(
            StateError(
                f"{ledger}: a line is not a ledger record this version can tell ({what}); give "
                "the rollout's <name>.ledger.jsonl, or its spec"
            )
        )
    except RolloutError as exc:
        _fail(exc)
    for line in told:
        _out.print(_shown(line))
