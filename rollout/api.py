"""The engine's public Python API: what the CLI, the demo and the delivery trigger call.

    from rollout.api import load_spec, run_rollout
    result = run_rollout("rollout.yaml", candidate=Release("diabetes", "7"))
    result.phase            # Phase.SUCCEEDED / ROLLED_BACK / PAUSED / FAILED
    result.reason           # one sentence: why
    result.ledger_path      # the JSONL ledger (`aml-rollout rollout explain PATH`)

`run_rollout` builds the router, metrics provider and state store the spec names (through the
factories), holds the rollout's lease and drives it to a terminal phase — or, with
`stop_when_paused`, until the inconclusive policy holds it for a human (an operator's `pause`
keeps the controller running, guarding, until resume, promote or abort).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rollout.config import RolloutSpec, load_spec
from rollout.controller import Clock, Controller, FirstCheck, TickHook, default_owner
from rollout.core.status import Status
from rollout.core.types import Colour, Phase, Release, Verdict
from rollout.ledger import Ledger
from rollout.metrics.base import MetricsProvider
from rollout.metrics.factory import make_metrics
from rollout.metrics.static import SimulatedMetrics, StaticMetrics
from rollout.notify import WebhookNotifier
from rollout.routers.base import TrafficRouter
from rollout.routers.factory import make_router
from rollout.state.base import StateStore
from rollout.state.factory import make_store

__all__ = [
    "FirstCheck",
    "RolloutResult",
    "bootstrap",
    "bootstrap_checked",
    "green_release",
    "load_spec",
    "open_store",
    "run_rollout",
]


@dataclass(frozen=True, slots=True)
class RolloutResult:
    """How a rollout ended (or where it stopped)."""

    phase: Phase
    reason: str
    ledger_path: Path
    candidate: Release | None
    stable: Release | None
    status: Status

    @property
    def promoted(self) -> bool:
        """True when the candidate now serves production."""
        return self.phase is Phase.SUCCEEDED


def _spec(spec: RolloutSpec | str | Path) -> RolloutSpec:
    return spec if isinstance(spec, RolloutSpec) else load_spec(spec)


def state_dir_of(spec: RolloutSpec, state_dir: Path | None = None) -> Path:
    """Where the rollout keeps its ledger (and with the file store its status, commands, lease)."""
    return Path(state_dir) if state_dir is not None else spec.state.dir


def ledger_path_of(spec: RolloutSpec, state_dir: Path | None = None) -> Path:
    """The ledger file of the rollout."""
    return state_dir_of(spec, state_dir) / f"{spec.name}.ledger.jsonl"


def open_store(spec: RolloutSpec | str | Path, state_dir: Path | None = None) -> StateStore:
    """The state store of a spec (for status and operator commands)."""
    spec = _spec(spec)
    return make_store(spec.state, spec.name, directory=state_dir)


def _metrics_of(spec: RolloutSpec, router: TrafficRouter, store: StateStore) -> MetricsProvider:
    """The spec's metrics source; a simulated one resuming a rollout draws on, not again."""
    metrics = make_metrics(
        spec.metrics, router=router, slo_ms=spec.analysis.latency.measured_slo_ms
    )
    if isinstance(metrics, SimulatedMetrics):
        stored = store.load()
        if stored is not None and not stored.terminal:
            # Same seed, same draws: a dry run resumed in a new process would replay the
            # traffic its first process saw, every error of it counted again.
            metrics.reseed(stored.tick)
    return metrics


def bootstrap(
    spec: RolloutSpec | str | Path,
    release: Release,
    *,
    state_dir: Path | None = None,
    router: TrafficRouter | None = None,
) -> bool:
    """Deploy a service's first release to an empty green, all traffic to it (no judge: there is
    nothing to compare it with). False when green already serves it. See Controller.bootstrap."""
    spec = _spec(spec)
    # StaticMetrics: bootstrap observes nothing, so the spec's backend is not built.
    return _first_release(spec, state_dir, router, lambda _: StaticMetrics([])).bootstrap(release)


def bootstrap_checked(
    spec: RolloutSpec | str | Path,
    release: Release,
    *,
    state_dir: Path | None = None,
    router: TrafficRouter | None = None,
    metrics: MetricsProvider | None = None,
    clock: Clock | None = None,
    on_look: Callable[[Verdict, str], None] | None = None,
) -> FirstCheck:
    """`bootstrap`, then judge the first release on the spec's absolute limits from the spec's
    metrics, every interval, until a verdict; the spec's `notify` hears how it ended. See
    Controller.bootstrap_checked."""
    spec = _spec(spec)

    def observed(router: TrafficRouter) -> MetricsProvider:
        slo_ms = spec.analysis.latency.measured_slo_ms
        return metrics or make_metrics(spec.metrics, router=router, slo_ms=slo_ms)

    controller = _first_release(spec, state_dir, router, observed, clock)
    check = controller.bootstrap_checked(release, on_look=on_look)
    if spec.notify is not None:
        WebhookNotifier(spec.notify).first_release(spec.name, release, check.verdict, check.reason)
    return check


def _first_release(
    spec: RolloutSpec,
    state_dir: Path | None,
    router: TrafficRouter | None,
    metrics: Callable[[TrafficRouter], MetricsProvider],
    clock: Clock | None = None,
) -> Controller:
    """The controller that brings a service's first release (`metrics` of the router used)."""
    router = router or make_router(spec.router)
    return Controller(
        spec,
        router,
        metrics(router),
        make_store(spec.state, spec.name, directory=state_dir),
        ledger=Ledger(ledger_path_of(spec, state_dir)),
        clock=clock,
        owner=default_owner(),
    )


def green_release(
    spec: RolloutSpec | str | Path, *, router: TrafficRouter | None = None
) -> Release | None:
    """The release green serves on the spec's data plane (None: nothing)."""
    spec = _spec(spec)
    return (router or make_router(spec.router)).release(Colour.GREEN)


def run_rollout(
    spec: RolloutSpec | str | Path,
    *,
    candidate: Release | None = None,
    state_dir: Path | None = None,
    router: TrafficRouter | None = None,
    metrics: MetricsProvider | None = None,
    clock: Clock | None = None,
    on_tick: TickHook | None = None,
    stop_when_paused: bool = False,
    restart: bool = False,
    max_ticks: int | None = None,
) -> RolloutResult:
    """Drive a rollout to its end and report how it ended.

    `router`/`metrics` override the spec's backends (tests, the local stack); `restart` starts a
    new rollout when the stored one has ended (otherwise its result is returned unchanged).
    """
    spec = _spec(spec)
    router = router or make_router(spec.router)
    store = make_store(spec.state, spec.name, directory=state_dir)
    metrics = metrics or _metrics_of(spec, router, store)
    ledger_path = ledger_path_of(spec, state_dir)
    controller = Controller(
        spec,
        router,
        metrics,
        store,
        ledger=Ledger(ledger_path),
        clock=clock,
        candidate=candidate,
        on_tick=on_tick,
        owner=default_owner(),
        notifier=WebhookNotifier(spec.notify) if spec.notify else None,
    )
    status = controller.run(restart=restart, max_ticks=max_ticks, stop_when_paused=stop_when_paused)
    return RolloutResult(
        phase=status.phase,
        reason=status.reason,
        ledger_path=ledger_path,
        candidate=status.candidate,
        stable=status.stable,
        status=status,
    )
