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

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rollout.config import (
    AzureMLRouterConfig,
    EnvoyRouterConfig,
    IstioRouterConfig,
    KubernetesStateConfig,
    MemoryStateConfig,
    RolloutSpec,
    is_local_code,
    load_spec,
)
from rollout.controller import Clock, Controller, FirstCheck, RealClock, TickHook, default_owner
from rollout.core.status import Status
from rollout.core.types import Colour, Phase, Release, Verdict
from rollout.errors import ConfigError
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
    "check_deployable",
    "check_image",
    "check_model_dir",
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
    """The ledger to read for the rollout (`explain`, `status`): the one it writes
    (`ledger_written`); for a kubernetes store whose namespace has none yet, the shared
    `<dir>/<name>.ledger.jsonl` that versions before wrote for every namespace, if there is one:
    a rollout run before the upgrade is still told (its lines, as then, may mix namespaces).
    Run again, it writes its namespace's ledger, read from then on."""
    path = ledger_written(spec, state_dir)
    if isinstance(spec.state, KubernetesStateConfig) and not path.exists():
        shared = state_dir_of(spec, state_dir) / f"{spec.name}.ledger.jsonl"
        if shared.is_file():
            return shared
    return path


def ledger_written(spec: RolloutSpec, state_dir: Path | None = None) -> Path:
    """The ledger file the rollout appends to: `<name>.ledger.jsonl`, with a memory store
    `<name>.memory.ledger.jsonl`, with a kubernetes store `<namespace>/<name>.ledger.jsonl`.
    A memory store's rollout (a dry run) has no lease and no status outside its process, so
    nothing stops it while the same name's real rollout runs, or keeps its lines apart after:
    in the real rollout's ledger, `explain` and the report would tell the dry run's outcome as
    the real one's. A kubernetes store's status, commands and Lease are its namespace's: a
    staging and a production rollout of one name, run from one directory (a CI runner), are
    two rollouts, and in one file `explain` told one's outcome as the other's. (A folder, not
    a part of the file's name: the report names a rollout after its ledger file.)"""
    directory = state_dir_of(spec, state_dir)
    if isinstance(spec.state, KubernetesStateConfig):
        return directory / spec.state.namespace / f"{spec.name}.ledger.jsonl"
    memory = ".memory" if isinstance(spec.state, MemoryStateConfig) else ""
    return directory / f"{spec.name}{memory}.ledger.jsonl"


def open_store(spec: RolloutSpec | str | Path, state_dir: Path | None = None) -> StateStore:
    """The state store of a spec (for status and operator commands)."""
    spec = _spec(spec)
    return make_store(spec.state, spec.name, directory=state_dir)


def _metrics_of(spec: RolloutSpec, router: TrafficRouter, store: StateStore) -> MetricsProvider:
    """The spec's metrics source; a simulated one resuming a rollout draws on, not again."""
    metrics = make_metrics(spec.metrics, router=router, latency=spec.analysis.latency)
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
        latency = spec.analysis.latency
        return metrics or make_metrics(spec.metrics, router=router, latency=latency)

    controller = _first_release(spec, state_dir, router, observed, clock)
    check = controller.bootstrap_checked(release, on_look=on_look)
    if spec.notify is not None:
        WebhookNotifier(spec.notify).first_release(spec.name, release, check.verdict, check.reason)
    return check


def _store_sleep(clock: Clock | None) -> Callable[[float], None]:
    """How the store waits: as a real clock does, which a stop cuts short (`RealClock(stopping)`:
    the signal's KeyboardInterrupt may be lost); not as a fake one, which would not wait."""
    return clock.sleep if isinstance(clock, RealClock) else time.sleep


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
        make_store(spec.state, spec.name, directory=state_dir, sleep=_store_sleep(clock)),
        ledger=Ledger(ledger_written(spec, state_dir)),
        clock=clock,
        owner=default_owner(),
    )


def green_release(
    spec: RolloutSpec | str | Path, *, router: TrafficRouter | None = None
) -> Release | None:
    """The release green serves on the spec's data plane (None: nothing)."""
    spec = _spec(spec)
    return (router or make_router(spec.router)).release(Colour.GREEN)


def check_deployable(spec: RolloutSpec, release: Release | None, where: str) -> None:
    """Refuse (ConfigError), before anything is deployed or stored, a candidate the spec's
    router cannot deploy as named: `check_image` and `check_model_dir`. `where` names where
    the release was given (`candidate`, `--candidate`)."""
    check_image(spec, release, where)
    check_model_dir(spec, release, where)


def check_router_files(spec: RolloutSpec) -> None:
    """Refuse, before anything is deployed, router files of this machine that are not there:
    the azureml router's local `code` folder and its `scoring_script`, which azure-ai-ml reads
    only when it writes blue's deployment (the rollout then failed at blue's turn)."""
    router = spec.router
    if not isinstance(router, AzureMLRouterConfig) or router.code is None:
        return
    if not is_local_code(router.code):
        return  # a code asset: whether it holds the script is Azure's answer
    folder = Path(router.code)
    read = "" if folder.is_absolute() else f", read from the current directory {Path.cwd()}"
    if not folder.is_dir():
        raise ConfigError(f"router.code: no folder {router.code}{read}")
    if not (folder / router.scoring_script).is_file():
        raise ConfigError(
            f"router.scoring_script: {router.scoring_script} is not a file of router.code "
            f"{router.code}{read}"
        )


def check_image(spec: RolloutSpec, release: Release | None, where: str) -> None:
    """Refuse, before anything is deployed or stored, a release the istio router cannot deploy:
    one without a container image (a started rollout would keep it, failing every resume)."""
    if release is None or release.image or not isinstance(spec.router, IstioRouterConfig):
        return
    raise ConfigError(
        f"{where}: {release.ref} names no container image, and the istio router deploys "
        f"images: give the spec's `{_field(where)}:` {{model: {release.model}, version: "
        f"'{release.version}', image: <registry>/{release.model}:{release.version}}} "
        "(package.json's `image`)"
    )


def _field(where: str) -> str:
    """The spec field a release checked as `where` ("stable", "--candidate", ...) comes from."""
    return "stable" if where == "stable" else "candidate"


def check_model_dir(spec: RolloutSpec, release: Release | None, where: str) -> None:
    """Refuse, before anything is deployed or stored, a release the envoy router cannot start
    its scoring server for as named: no model folder, a folder that is not there or that the
    server cannot find one model in (`resolve_model_dir`: a folder of several packages), or one
    holding another model than the release's sha256, or the package of another release
    (package.json's model or version: `other_release`). Begun, the rollout would Fail at that
    deploy and stay Failed (`run` again: "already ended") with the spec fixed — or, for another
    model, record one release while blue served another."""
    from rollout.local.workloads import other_release
    from scoring.errors import ModelLoadError
    from scoring.model import recorded_sha256, resolve_model_dir

    if release is None or not isinstance(spec.router, EnvoyRouterConfig):
        return
    if not release.model_dir:
        raise ConfigError(
            f"{where}: {release.ref} names no model folder, and the envoy router serves a "
            "release from its package or model folder: name it in the spec's "
            f"`{_field(where)}:` {{model: {release.model}, version: "
            f"'{release.version}', model_dir: <package folder>}}"
        )
    folder = Path(release.model_dir)
    if not folder.is_dir():
        read = "" if folder.is_absolute() else f", read from the current directory {Path.cwd()}"
        raise ConfigError(
            f"{where}: {release.ref} has no model folder {release.model_dir} (its `model_dir:`"
            f"{read}); the envoy router serves a release from its package or model folder"
        )
    try:
        resolve_model_dir(folder)
    except ModelLoadError as exc:  # (a folder of several packages, or of none)
        raise ConfigError(
            f"{where}: {release.ref}'s model folder {release.model_dir} cannot be served: {exc}"
        ) from None
    other = other_release(release)
    if other is not None:
        path, held_ref, differs = other
        raise ConfigError(
            f"{where}: {release.ref} names {' and '.join(differs)}, but its model folder "
            f"{release.model_dir} is the package of {held_ref} ({path}): another release's "
            "package (name its folder in `model_dir:`)"
        )
    if not release.sha256:
        return
    # (unreadable: the server's own load says what is wrong with the folder, at deploy)
    model_json, held = recorded_sha256(folder)
    if held is not None and held != release.sha256:
        raise ConfigError(
            f"{where}: {release.ref} is sha256 {release.sha256[:12]}…, but its model folder "
            f"holds {held[:12]}… ({model_json}): another model's folder"
        )


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
    A new rollout's candidate the router cannot deploy as named is a ConfigError before
    anything is deployed or stored (`check_deployable`).
    """
    spec = _spec(spec)
    store = make_store(spec.state, spec.name, directory=state_dir, sleep=_store_sleep(clock))
    previous = store.load()
    if previous is None or (previous.terminal and restart):  # a new rollout, not a resume
        # Begun, a candidate the router cannot deploy Fails at its deploy and stays Failed.
        wanted = candidate or (spec.candidate.to_release() if spec.candidate else None)
        check_deployable(spec, wanted, "candidate")
        check_router_files(spec)
    router = router or make_router(spec.router)
    metrics = metrics or _metrics_of(spec, router, store)
    ledger_path = ledger_written(spec, state_dir)
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
