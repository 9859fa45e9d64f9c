"""`aml-rollout demo`: the whole story on the local stack, with real processes and the real engine.

1. train v1 → register (local registry) → production → package → green (a scoring process
   behind Envoy); steady load starts through Envoy (real held-out rows);
2. train v2 → register (the gate compares it with production) → package → live rollout with the
   real engine (`rollout.api.run_rollout`), the Envoy router and the Prometheus provider, shown
   as a live view, on the product's default plan: the shadow step first (blue at 0 %, 20 % of
   live requests copied to it here, 5 % by default; its answers judged and discarded by Envoy),
   then 5, 25, 50 % →
   promoted; the registry follows (v2 production, v1 archived);
3. train v3 → register → package → the same rollout, but v3's scoring server has the fault knob
   on (the demo knob, clearly labelled: 40 % of its answers are 500s) → rolled back
   automatically, normally in the shadow step: the demo then says how many mirrored copies v3
   was judged on, and that no user received an answer from it — only if the load generator saw
   none (no answer naming v3, no 5xx) while blue never left 0 %; otherwise it says what users
   got. The registry tags v3 rolled-back with the reason;
4. an HTML report (weights, per-colour error rate and p99 over time, decisions marked) and the
   ledgers, whose paths are printed.

Green, v2 and every other healthy server run with the fault knob off: they answer no 500 at
all. v2 is promoted on the engine's "negligible rate" evidence (its own error rate shown below
`errors.negligible_rate`, no baseline errors needed), which this demo sets to 1 %; latency is
judged against a 250 ms SLO the same way (its share of slower requests shown below 1 %).
"""

from __future__ import annotations

import logging
import math
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table

from rollout.core.types import Phase, Release, Verdict, Weights
from rollout.errors import LocalStackError
from rollout.ledger import read_ledger
from rollout.local.stack import LocalStack

if TYPE_CHECKING:
    from rollout.controller import Clock

log = logging.getLogger(__name__)

MODEL = "diabetes"
#: v1 → v2 → v3: each better on held-out MSE than the last, so each passes the registry gate.
ALPHAS = {1: 1.0, 2: 0.3, 3: 0.1}
FAULTY_VERSION = 3
FAULT_ERROR_RATE = 0.4
RPS = 120.0
DEMO_MIRROR_PERCENT = 20
ANALYSIS: dict[str, Any] = {
    "interval_s": 1.0,
    # The healthy candidate must not be rolled back by bad luck (A/A false rollbacks <= alpha).
    "alpha": 0.01,
    "min_requests": 100,
    "max_step_duration_s": 150.0,
    # "Fewer than 1 % errors is fine for this demo service, whatever green does." A clean canary
    # shows that after about ln(2/alpha)/0.01 ≈ 600 requests (counted over all steps, the shadow
    # step's mirrored copies included). The product default (0.1 %) would need ~6,000. The
    # faulty candidate (40 %) is far above both this and `max_ratio` x green's 0 %.
    "errors": {"negligible_rate": 0.01},
    # Latency against an SLO: "slow" = above Envoy's 250 ms bucket, and a slow share under 1 %
    # is fine whatever green does. (Against green's own p99 bucket, a few milliseconds here, a
    # fresh process's tail on this shared 2-core machine differs from a warm one's by more than
    # any model does: that once rolled back a healthy candidate. docs/local-stack.md.)
    "latency": {"threshold": "slo", "slo_ms": 250, "negligible_rate": 0.01},
}
#: The panel's latency: Envoy's p99 per colour over this many seconds, read at most every
#: LATENCY_EVERY_S (a Prometheus query, not one per redraw).
LATENCY_WINDOW_S = 10
LATENCY_EVERY_S = 2.0


@dataclass
class DemoResult:
    """Where the demo wrote its outputs and how each rollout ended."""

    out_dir: Path
    report: Path
    ledgers: list[Path] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)


def run_demo(
    out_dir: Path,
    *,
    console: Console | None = None,
    rps: float = RPS,
    stopping: threading.Event | None = None,
    hold: Callable[[], None] | None = None,
) -> DemoResult:
    """Run the story; the stack is always stopped at the end (also on Ctrl-C or an error).

    `stopping` (set by a signal handler) stops the judge at its next wait, should the handler's
    KeyboardInterrupt be lost (see `sigterm_as_interrupt`). `hold` is called as the stack's stop
    begins: from then on a signal must not be raised (`interrupted_once`), or it would cut the
    stop short.
    """
    from aml_pipelines.delivery import package_release
    from aml_pipelines.registry.local import LocalRegistry
    from rollout.api import bootstrap, bootstrap_checked
    from rollout.controller import RealClock

    console = console or Console(emoji=False)
    clock = RealClock(stopping)
    out_dir = out_dir.resolve()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file there, no permission, a read-only place
        why = "it is not a folder" if isinstance(exc, FileExistsError) else exc.strerror
        raise LocalStackError(
            f"cannot write the demo's outputs in {out_dir}: {why or exc}"
        ) from exc
    registry = LocalRegistry(out_dir / "registry")
    earlier = registry.latest(MODEL)
    if earlier is not None:
        # Its gate would refuse v1 against the earlier run's production model (and say to
        # rerun with `--param force=true`, an option `demo` does not have).
        raise LocalStackError(
            f"{out_dir} holds an earlier demo's registry ({MODEL} up to v{earlier.version}): "
            "the story starts from an empty one; give a new --out"
        )
    result = DemoResult(out_dir, out_dir / "report.html")
    started = time.monotonic()
    # The demo knob: only the faulty candidate's server injects errors; all others answer clean.
    faults = {str(FAULTY_VERSION): FAULT_ERROR_RATE}
    console.rule("[bold]aml-rollout demo[/]")
    console.print(
        f"[yellow]demo knob:[/] v{FAULTY_VERSION} (the faulty candidate) answers "
        f"{FAULT_ERROR_RATE:.0%} of requests with 500; every other server has no fault injected"
    )
    with _running(
        LocalStack(out_dir / "stack", faults=faults, folder_option="--out"), hold
    ) as stack:
        console.print(
            f"stack up: envoy {stack.url}  admin {stack.envoy.admin_url}  "
            f"prometheus {stack.prometheus.url}"
        )
        # 1. v1 becomes production and serves as green.
        v1 = _pipeline(1, registry, out_dir, console)
        _tag(registry, v1, "Succeeded", "first production model")
        green = package_release(v1, out_dir, image_registry="localhost")
        console.print(f"[green]green[/] ← {MODEL} v1 (production)")
        first = stack.spec(f"{MODEL}-v1", analysis=ANALYSIS)
        bootstrap(first, green, router=stack.router)
        rows = _sample_rows(green)
        load = stack.start_load(rps=rps, rows=rows, concurrency=16)
        load_started = time.monotonic()
        console.print(f"load: {rps:g} requests/s through Envoy (held-out rows)")
        # A first release has nothing to compare it with: judged on the absolute limits alone
        # (what `aml-rollout rollout bootstrap --check` does).
        check = bootstrap_checked(
            first, green, router=stack.router, metrics=stack.metrics, clock=clock
        )
        style = "green" if check.verdict is Verdict.SUCCESSFUL else "red"
        console.print(
            f"first release v1 checked on absolute limits: [{style}]{check.verdict.value}[/]: "
            f"{escape(check.reason)}"
        )

        # 2. and 3. two candidates, rolled out by the real engine.
        for number in (2, 3):
            version = _pipeline(number, registry, out_dir, console)
            candidate = package_release(version, out_dir, image_registry="localhost")
            name = f"{MODEL}-v{number}"
            label = (
                " [red](fault knob on: the faulty candidate)[/]" if number == FAULTY_VERSION else ""
            )
            console.rule(f"rollout of {MODEL} v{number}{label}")
            before = load.snapshot()
            phase, reason, ledger = _rollout(stack, name, candidate, load, console, clock)
            seen = exposure(before, load.snapshot(), candidate, read_ledger(ledger))
            _tag(registry, version, phase, reason)
            result.ledgers.append(ledger)
            result.outcomes[name] = phase
            style = "green" if phase == "Succeeded" else "red"
            console.print(f"[{style}]{phase}[/]: {reason}")
            if phase != "Succeeded":
                console.print(seen.story(f"v{number}"))
            stages = {f"v{v.version}": v.stage for v in registry.list_versions(MODEL)}
            console.print(f"registry stages: {stages}")

        from rollout.report import write_report

        write_report(
            result.report,
            result.ledgers,
            prometheus_url=stack.prometheus.url,
            title="aml-rollout demo",
            notes=[
                f"Local stack: Envoy + Prometheus + uvicorn scoring servers, {rps:g} req/s. "
                f"Demo knob: {FAULT_ERROR_RATE:.0%} injected errors on v{FAULTY_VERSION} only; "
                "the other servers run clean (errors.negligible_rate 1 %)."
            ],
        )
        final = load.snapshot()
        seconds = time.monotonic() - load_started
        latency = envoy_p99_ms(stack.prometheus.url, seconds)
        for line in load_summary(final, latency, seconds, rps):
            console.print(line, highlight=False)
    print_outputs(console, result, time.monotonic() - started)
    return result


@contextmanager
def _running(stack: LocalStack, hold: Callable[[], None] | None) -> Iterator[LocalStack]:
    """`with stack:`, calling `hold` before the stop (was: a second Ctrl-C or SIGHUP landed in
    the stop and cut it short, and the demo said "the stack is stopped")."""
    with stack:
        try:
            yield stack
        finally:
            # Not `contextlib.suppress`: a signal could land in its own call, before it holds.
            try:
                if hold is not None:
                    hold()
            except KeyboardInterrupt:  # the one a signal raises, just before: it asks for this
                pass


def print_outputs(console: Console, result: DemoResult, seconds: float) -> None:
    """Where the report and ledgers are: one line each whatever the width (a wrapped
    `explain` hint, pasted, ran without its ledger), paths printed as they are, not as markup."""
    console.rule("[bold]done[/]")
    lines = [f"report:  {result.report}"]
    lines += [
        f"ledger:  {path}   (aml-rollout rollout explain {shlex.quote(str(path))})"
        for path in result.ledgers
    ]
    lines.append(f"outputs: {result.out_dir}   ({seconds:.0f} s)")
    for line in lines:
        console.print(line, soft_wrap=True, markup=False, highlight=False)


# ----------------------------------------------------------------------------------- the steps


def _pipeline(number: int, registry: Any, out_dir: Path, console: Console) -> Any:
    """train → register with the components' real commands; returns the new ModelVersion."""
    from aml_pipelines.local_runner import run_local
    from aml_pipelines.pipeline import PipelineParams

    params = PipelineParams(
        model_name=MODEL,
        alpha=ALPHAS[number],
        registry=f"local:{out_dir / 'registry'}",
        image_registry="localhost",
    )
    before = registry.latest(MODEL)
    console.print(f"[bold]pipeline v{number}[/]: train (alpha {ALPHAS[number]}) → register")

    def sink(line: str) -> None:
        if any(word in line for word in ("failed", "gate ", "registered ", "mse=")):
            text = line.split(": ", 1)[-1] if " INFO " in line else line
            console.print(f"  [dim]{text.strip()[:120]}[/]", highlight=False)

    run_local(params, run_dir=out_dir / "pipeline" / f"v{number}", until="register", sink=sink)
    version = registry.latest(MODEL)
    if version is None or (before is not None and version.version == before.version):
        raise LocalStackError(f"pipeline v{number} registered no new version of {MODEL}")
    return version


def _tag(registry: Any, version: Any, phase: str, reason: str) -> None:
    from aml_pipelines.delivery import follow_traffic

    follow_traffic(registry, version.name, version.version, phase, reason)


def _sample_rows(release: Release) -> list[list[float]] | None:
    from scoring.loadgen import read_sample

    try:
        return read_sample(Path(str(release.model_dir)))
    except ValueError:
        return None


def _rollout(
    stack: LocalStack, name: str, candidate: Release, load: Any, console: Console, clock: Clock
) -> tuple[str, str, Path]:
    from rollout.api import run_rollout

    # The default plan, shadow step first; 20 % mirrored rather than 5 % so that, at the demo's
    # 120 req/s, the shadow step has its 100 copies in about 4 s instead of 17.
    spec = stack.spec(name, analysis=ANALYSIS, mirror_percent=DEMO_MIRROR_PERCENT)
    latency = EnvoyLatency(stack.prometheus.url)
    view = _LiveView(name, load, latency=latency)
    try:
        with (
            latency,
            Live(view.render(), console=console, refresh_per_second=4, transient=False) as live,
        ):
            view.live = live.update
            outcome = run_rollout(
                spec,
                candidate=candidate,
                router=stack.router,
                metrics=stack.metrics,
                on_tick=view.tick,
                restart=True,
                clock=clock,
            )
    finally:  # also on Ctrl-C: "interrupted: ..." was glued to the panel's bottom border
        end_live(console)
    return outcome.phase.value, outcome.reason, outcome.ledger_path


@dataclass(frozen=True)
class Exposure:
    """What users got from a candidate during its rollout, and what the judge saw of it."""

    #: Answers whose body names the candidate (the load generator reads `colour/model:version`).
    answers: int
    #: Client-visible 5xx during the rollout. An error body names no server, but every other
    #: server in the demo answers no 500 at all, so these are the candidate's (or Envoy's).
    errors_5xx: int
    #: Blue's highest weight during the rollout (0: it never served live traffic).
    max_weight: int
    #: Blue's requests and errors the judge counted (mirrored copies in the shadow step).
    judged: int
    judged_bad: int
    mirror: int

    def story(self, name: str) -> str:
        """One line for the console: what users received from the candidate."""
        if self.max_weight == 0 and self.answers == 0 and self.errors_5xx == 0:
            return (
                f"users never received an answer from {name}: it was judged on {self.judged} "
                f"mirrored copies of their requests ({self.mirror} % shadow, {self.judged_bad} "
                "answered 500), whose answers Envoy discarded"
            )
        return (
            f"users received {self.answers} answers from {name} and {self.errors_5xx} 5xx "
            f"during its rollout (blue reached {self.max_weight} %; the judge counted "
            f"{self.judged} canary requests, {self.judged_bad} errors)"
        )


def exposure(before: Any, after: Any, candidate: Release, ledger: list[dict[str, Any]]) -> Exposure:
    """Exposure from two load snapshots around a rollout and the rollout's ledger."""
    named = f"{candidate.model}:{candidate.version}"
    answers = sum(
        n - before.by_version.get(key, 0)
        for key, n in after.by_version.items()
        if key.startswith("blue/") and key.endswith(f"/{named}")
    )
    errors = sum(
        n - before.by_status.get(code, 0)
        for code, n in after.by_status.items()
        if code.startswith("5")
    )
    ticks = [r for r in ledger if "weight" in r]
    judged = [r["checks"]["errors"] for r in ledger if "errors" in r.get("checks", {})]
    last = judged[-1] if judged else {}
    return Exposure(
        answers=answers,
        errors_5xx=errors,
        max_weight=max((int(r["weight"]) for r in ticks), default=0),
        judged=int(last.get("canary_requests", 0)),
        judged_bad=int(last.get("canary_bad", 0)),
        mirror=max((int(r.get("mirror", 0)) for r in ticks), default=0),
    )


def envoy_p99_ms(
    prometheus_url: str,
    window_s: float,
    *,
    timeout_s: float = 1.0,
    client: httpx.Client | None = None,
) -> dict[str, float]:
    """p99 in ms per colour as Envoy measured it over the last `window_s`, from Prometheus.

    The judge's own source (`envoy_cluster_upstream_rq_time`): unlike the load generator's p99,
    it holds no delay of the process sending the load. Mirrored copies count in blue's. Empty
    when Prometheus does not answer in time (the demo goes on without it); a colour that served
    nothing in the window (a NaN quantile) is left out.
    """
    from rollout.report import P99_MS

    query = P99_MS.format(w=f"{max(1, round(window_s))}s")
    try:
        answer = (client or httpx).get(
            f"{prometheus_url}/api/v1/query", params={"query": query}, timeout=timeout_s
        )
        answer.raise_for_status()
        p99 = {
            str(item["metric"]["envoy_cluster_name"]): float(item["value"][1])
            for item in answer.json()["data"]["result"]
        }
    except (httpx.HTTPError, ValueError, KeyError, TypeError, IndexError) as exc:
        log.info("demo: no latency from Prometheus at %s (%s)", prometheus_url, exc)
        return {}
    return {colour: ms for colour, ms in sorted(p99.items()) if math.isfinite(ms)}


class EnvoyLatency:
    """Envoy's p99 per colour (`envoy_p99_ms`, over LATENCY_WINDOW_S), read every
    LATENCY_EVERY_S on a thread of its own through one kept HTTP client; calling it gives the
    last answer at once. The panel is redrawn in the controller's tick: a read there held every
    other tick up to 0.7 s (a new client loads the CA bundle, even for http://)."""

    def __init__(self, prometheus_url: str) -> None:
        self.prometheus_url = prometheus_url
        self._latest: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="demo-latency", daemon=True)

    def __call__(self) -> dict[str, float]:
        return self._latest

    def __enter__(self) -> EnvoyLatency:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _poll(self) -> None:
        with httpx.Client() as client:
            while True:
                self._latest = envoy_p99_ms(self.prometheus_url, LATENCY_WINDOW_S, client=client)
                if self._stop.wait(LATENCY_EVERY_S):
                    return


def _by_colour(p99: dict[str, float]) -> str:
    return ", ".join(f"{colour} {ms:.1f} ms" for colour, ms in p99.items()) or "not available"


#: A load that sent less than this share of the rate asked fell behind (its own process, on a
#: busy machine): it times each request from when it was due, so its p99 is its backlog.
KEPT_RATE = 0.9


def load_summary(final: Any, p99: dict[str, float], seconds: float, rps: float) -> list[str]:
    """The demo's last words on the load: what was sent, at what rate of the `rps` asked, and
    each latency labelled by who measured it (was one `p99 2283.9 ms`, the client's, read as
    what users waited). The client's p99 is left out when the generator fell behind: measured
    at load average 7, 58 of 120 req/s went out and its "p99 77346.4 ms" was the backlog."""
    behind = final.rps < KEPT_RATE * rps
    rate = f"{final.rps:.0f} of the {rps:g} req/s asked"
    if behind:
        rate += " (the load generator fell behind: a busy machine)"
    client = (
        "         client-side p99 not shown: the load generator fell behind, so it times its "
        "own backlog, not the answers"
        if behind
        else f"         client-side p99 {final.p99_ms:.1f} ms (this process's load generator, "
        "its own delays on a busy machine included)"
    )
    return [
        f"load: {final.sent} requests in {seconds:.0f} s, {rate}, by version {final.by_version}",
        f"latency: p99 as Envoy measured it over the load's {seconds:.0f} s (what the judge "
        f"reads): {_by_colour(p99)}",
        client,
    ]


def end_live(console: Console) -> None:
    """End the line a finished `Live` left open.

    In a terminal, rich ends the live display with a newline; into a file or a pipe (`make demo
    | tee`), it writes the last render once and stops after the panel's bottom border, so the
    next print would start on that line (`╯Succeeded: ...`).
    """
    if not console.is_terminal or console.is_dumb_terminal:
        console.line()


class _LiveView:
    """The rich panel redrawn on every controller tick."""

    def __init__(
        self, name: str, load: Any, latency: Callable[[], dict[str, float]] = dict
    ) -> None:
        self.name = name
        self.load = load
        #: Envoy's p99 per colour now (`EnvoyLatency`: its last answer, never a query).
        self.latency = latency
        self.started = time.monotonic()
        self.status: Any = None
        self.record: dict[str, Any] = {}
        self.counts: dict[str, Any] = {}
        self.live: Callable[[Any], None] | None = None

    def tick(self, status: Any, record: dict[str, Any]) -> None:
        self.status, self.record = status, record
        if record.get("counts"):
            # Keep the evidence of the last analysed tick on screen after the decision.
            self.counts = record["counts"]
        if self.live is not None:
            self.live(self.render())

    @staticmethod
    def _step(status: Any, record: dict[str, Any], weight: int) -> str:
        if status is not None and not status.terminal and status.mirror:
            return f"{record.get('step', 0)} (shadow: {status.weights.blue_share})"
        if status is None or not status.terminal:
            return f"{record.get('step', 0)} (blue {weight} %)"
        # Ended: blue is back at 0 % either way, so "step 1 (blue 0 %)" next to Succeeded would
        # read as a failure. Say who serves all traffic now.
        serving = status.candidate if status.phase is Phase.SUCCEEDED else status.stable
        who = serving.ref if serving is not None else "the stable release"
        return f"done: green serves {who} (100 %)"

    def render(self) -> Panel:
        status, record = self.status, self.record
        weight = status.blue_weight if status is not None else 0
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        table.add_row("phase", status.phase.value if status is not None else "starting")
        table.add_row("step", self._step(status, record, weight))
        bar = ProgressBar(total=100, completed=weight, width=40, complete_style="blue")
        weights = status.weights if status is not None else Weights.blue_at(0)
        split = str(weights) + (" (answers discarded)" if weights.mirror else "")
        table.add_row("weights", Group(bar, split))
        for colour in ("blue", "green"):
            c = self.counts.get(colour, {})
            table.add_row(
                colour,
                f"{c.get('requests', 0)} requests, {c.get('errors', 0)} errors "
                "(last analysed step)",
            )
        verdict = record.get("verdict") or "-"
        table.add_row("verdict", verdict)
        table.add_row("reason", str(record.get("reason", ""))[:160])
        table.add_row("load", f"{self.load.snapshot().rps:.0f} req/s through Envoy")
        slo = ANALYSIS["latency"]["slo_ms"]
        table.add_row(
            "latency",
            f"p99 as Envoy measured it (last {LATENCY_WINDOW_S} s): {_by_colour(self.latency())}  "
            f"(SLO {slo} ms)",
        )
        elapsed = time.monotonic() - self.started
        return Panel(table, title=f"{self.name}  +{elapsed:.0f} s", expand=False)
