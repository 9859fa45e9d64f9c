"""The imperative shell around the pure core: observe → `core.step` → persist → apply.

One tick:

1. finish any actions a previous (possibly killed) controller persisted but did not apply;
2. pick up operator commands queued in the state store;
3. observe the metrics since the step began (only in phases that analyse; when starting, green's
   traffic before the rollout, for the latency check's threshold);
4. `core.step(spec, status, observation, now)` → Decision(status, actions, record);
5. append the record to the ledger, persist the new status *with its actions pending*;
6. apply each action through the router, persisting `applied` after each one.

A resumed rollout first brings the data plane back to what its status says the step serves (a
colour serving nothing gets its release, the weights are set again), should the data plane have
lost it while no controller ran.

Because the decision is persisted before anything is applied, and every router call is
idempotent, a controller killed at any instant (SIGKILL included) and restarted converges to the
same data-plane state: no weight outside the plan, no step skipped or applied twice in effect, no
second promotion. Transitional phases (Initializing, Promoting, Finalising, RollingBack) are
stepped at once; analysing phases wait one analysis interval, waking early for commands.

Time comes from an injected `Clock`: `RealClock` in production, `FakeClock` in tests and the
simulator, so no test ever sleeps to wait for logic.
"""

from __future__ import annotations

import getpass
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from rollout.boottime import since_boot
from rollout.config import RolloutSpec
from rollout.core.machine import (
    Decision,
    candidate_failed,
    command_tail,
    first_release_limits,
    judge_first,
    new_status,
    promotion_unapplied,
    queued_abort,
    step,
    unread_from,
    with_commands,
)
from rollout.core.status import (
    TRANSITIONAL,
    Action,
    Counts,
    Deploy,
    Remove,
    SetWeights,
    Status,
    describe,
)
from rollout.core.types import Colour, Observation, Phase, Release, Served, Verdict, Weights
from rollout.errors import (
    ConfigError,
    DeployFailed,
    MetricsError,
    RolloutError,
    RouterError,
    RouterRefused,
    RouterUnavailable,
    WeightsUnsettled,
)
from rollout.ledger import Ledger, span
from rollout.metrics.base import MetricsProvider, usable
from rollout.routers.base import Fenced, TrafficRouter
from rollout.state.base import StateStore

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Router calls are retried this many times (with doubling pauses from 1 s) before giving up;
#: except a deploy that meets `RouterUnavailable` before the router ever answered this controller
#: (a spec pointing at a router nobody runs: fail at once, with that one line), and
#: `RouterRefused`, an answer no retry changes: a namespace that does not exist, a release
#: without an image, live traffic held by a deployment not ours, and `DeployFailed` (pods that
#: never became ready: retrying would wait for them again, for as long). Weight changes, a
#: rollback above all, are retried through anything else (a 503, a 409, a timeout).
ROUTER_ATTEMPTS = 4
#: Except weights that take all traffic off blue (a rollback, an abort, a failed candidate's):
#: the one action that protects users is tried on, the pauses doubling up to
#: `ROLLBACK_PAUSE_CAP_S`, for `ROLLBACK_RETRY_S` (while the lease holds), not for 7 s: an API
#: server upgraded or an Envoy admin restarted then would leave the regression serving until a
#: human ran `run` again.
ROLLBACK_RETRY_S = 600.0
ROLLBACK_PAUSE_CAP_S = 30.0
#: A resume reads the data plane's weights and releases, and a new rollout its releases, this
#: many times through a failure it may outlive (`Controller._read_again`), the pauses doubling
#: from `WEIGHTS_REREAD_PAUSE_S` (0.5 + 1 + 2 s), before it stops: one failed read stopped it at
#: once, an Envoy admin restarting for a second taking the controller down with it.
WEIGHTS_READS = 4
WEIGHTS_REREAD_PAUSE_S = 0.5
#: At most this much of why the data plane could not be read goes into each tick's ledger line
#: (`clipped`). Was 200: `explain` cut the command that starts a stopped `up` again mid-backtick,
#: and "`aml-rollout up)" read as the command (which abandons the rollout).
UNREAD_CHARS = 1000


def clipped(text: str, limit: int) -> str:
    """`text`, or its first words that fit in `limit` characters followed by "…" (cut within
    a word where the last space would leave less than half of them: one long word)."""
    if len(text) <= limit:
        return text
    head = text[: max(limit - 1, 0)]
    words = head.rsplit(" ", 1)[0].rstrip() if " " in head.strip() else ""
    return f"{words if len(words) >= len(head) // 2 else head}…"


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (or since a fake origin)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never steps (NTP does not move it) and counts a suspend:
        time that passed."""

    def sleep(self, seconds: float) -> None:
        """Wait `seconds` (a fake clock just moves on)."""


class RealClock:
    """Wall time. Given the event a signal handler sets (`sigterm_as_interrupt`), a sleep raises
    KeyboardInterrupt once it is set: the handler's own KeyboardInterrupt is lost when it lands
    in a finalizer (printed as "Exception ignored"), and the rollout would go on regardless."""

    def __init__(self, stopping: threading.Event | None = None) -> None:
        self.stopping = stopping

    def now(self) -> float:
        """time.time()."""
        return time.time()

    def monotonic(self) -> float:
        """`since_boot()`: a suspended host's hour passed too (its traffic was served)."""
        return since_boot()

    def sleep(self, seconds: float) -> None:
        """time.sleep(), cut short by a stop."""
        if self.stopping is None:
            time.sleep(max(seconds, 0.0))
        elif self.stopping.wait(max(seconds, 0.0)):
            raise KeyboardInterrupt


class FakeClock:
    """A clock that moves only when slept on: deterministic tests and fast simulations."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = start

    def now(self) -> float:
        """The fake time."""
        return self.t

    def monotonic(self) -> float:
        """The fake time too (it never steps)."""
        return self.t

    def sleep(self, seconds: float) -> None:
        """Advance the fake time."""
        self.t += max(seconds, 0.0)


TickHook = Callable[[Status, dict[str, Any]], None]


class Notifier(Protocol):
    def entered(self, status: Status) -> None:
        """Tell whoever should know that the rollout entered `status.phase` (never raises)."""


@dataclass(frozen=True, slots=True)
class FirstCheck:
    """How the check of a service's first release ended (`Controller.bootstrap_checked`)."""

    #: False when green already served the release with all traffic before this call.
    deployed: bool
    verdict: Verdict
    reason: str


class Controller:
    """Drives one rollout to a terminal phase (or until `max_ticks`)."""

    def __init__(
        self,
        spec: RolloutSpec,
        router: TrafficRouter,
        metrics: MetricsProvider,
        store: StateStore,
        *,
        ledger: Ledger | None = None,
        clock: Clock | None = None,
        candidate: Release | None = None,
        on_tick: TickHook | None = None,
        owner: str = "aml-rollout controller",
        poll_s: float = 1.0,
        notifier: Notifier | None = None,
    ) -> None:
        self.spec = spec
        self.router = router
        self.metrics = metrics
        self.store = store
        self.ledger = ledger
        self.clock = clock or RealClock()
        self.candidate = candidate
        self.on_tick = on_tick
        self.owner = owner
        self.poll_s = poll_s
        self.notifier = notifier
        #: Whether a router action has succeeded since this controller started (see `_apply`).
        self._router_answered = False
        #: Why what the data plane serves could not be read last tick (`_served`), else None.
        self._served_unread: str | None = None
        #: The monotonic clock when the status was last stepped (its `updated_at`), by this
        #: controller since `start`; None before: the first tick then ages the step by wall time.
        self._stepped_mono: float | None = None
        #: This controller's take of the lease, on its ticks' ledger lines (`run` renews it).
        self._tenure = uuid.uuid4().hex[:12]
        if isinstance(router, Fenced):
            # Checked before each write inside an action too, not only before the action: on a
            # slow control plane one action outlasts the lease (routers.base.Fence).
            router.fence = store.check_lease

    # ----------------------------------------------------------------------------- the loop

    def run(
        self,
        *,
        max_ticks: int | None = None,
        restart: bool = False,
        stop_when_paused: bool = False,
    ) -> Status:
        """Hold the lease and tick until the rollout ends; returns the final status.

        With `stop_when_paused` it also returns when the inconclusive policy holds the rollout
        for a human; an operator's `pause` never stops the controller (it keeps guarding and
        waits for resume, promote or abort).
        """
        with self.store.lease(self.owner):
            self._tenure = uuid.uuid4().hex[:12]  # each take of the lease, a new one
            status = self.start(restart=restart)
            ticks = 0
            while not status.terminal:
                if max_ticks is not None and ticks >= max_ticks:
                    break
                if stop_when_paused and status.phase is Phase.PAUSED and status.held:
                    # Held for a human: stop, unless the human has already answered; judged
                    # once first (a `run` begun on a hold), as a hold still guards: blue served
                    # its weight with no controller, and a regression since then rolls back.
                    status = with_commands(status, self.store.commands())
                    if not status.commands and ticks:
                        break
                status = self.tick(status)
                ticks += 1
                if stop_when_paused and status.phase is Phase.PAUSED and status.held:
                    continue  # (returns at once above: no interval's wait for nothing)
                if not status.terminal and status.phase not in TRANSITIONAL:
                    self._wait(self.spec.analysis.interval_s, status)
            return status

    def bootstrap(self, release: Release) -> bool:
        """Deploy `release` to an empty green and send it all traffic: a service's first release.

        A rollout cannot bring it: the judge compares a candidate with what green serves. Holds
        the rollout's lease; refuses while a rollout is active, or when green serves another
        release (roll that one out instead). False when green already serves `release` with all
        traffic; run again after a stop between the deploy and the weights, it sets the weights.
        """
        with self.store.lease(self.owner):
            return self._bootstrap(self._as_served(release))

    def bootstrap_checked(
        self, release: Release, *, on_look: Callable[[Verdict, str], None] | None = None
    ) -> FirstCheck:
        """`bootstrap`, then judge the first release on the spec's absolute limits (there is no
        baseline to compare it with; `core.machine.judge_first`), looking every interval.

        Ends Successful (every limit shown kept after `min_requests`), Failed (a limit
        breached: the release still serves all traffic, there being nothing to roll back to),
        Inconclusive (undecided after `max_step_duration_s`) or Error (the metrics unreadable
        `max_consecutive_errors` times in a row). The lease is held throughout, so no rollout
        starts while the release is judged; the ledger records the verdict. Run again (after a
        stop, say), it judges the release afresh from then on.
        """
        analysis = self.spec.analysis
        if not first_release_limits(analysis):
            raise ConfigError(
                "analysis: checking a first release needs an absolute limit "
                "(`errors.max_rate`, or `latency.max_slow_rate` with `slo_ms`)"
            )
        with self.store.lease(self.owner):
            self._probe_metrics()
            release = self._as_served(release)
            deployed = self._bootstrap(release)
            started, started_mono = self.clock.now(), self.clock.monotonic()
            requests, unread = 0, 0
            while True:
                self.clock.sleep(analysis.interval_s)
                self.store.check_lease()
                now = self.clock.now()
                observation = self._observe(started, now)
                if observation.error is not None:
                    unread += 1
                    verdict, reason = Verdict.ERROR, f"metrics unreadable: {observation.error}"
                else:
                    unread, requests = 0, observation.green.requests
                    verdict, reason = judge_first(analysis, observation.green)
                if on_look is not None:
                    on_look(verdict, reason)
                if verdict in (Verdict.SUCCESSFUL, Verdict.FAILED):
                    break
                if verdict is Verdict.ERROR and unread >= analysis.max_consecutive_errors:
                    break
                judged_for = self.clock.monotonic() - started_mono  # (not by a clock's step)
                if judged_for >= analysis.max_step_duration_s:
                    verdict = Verdict.INCONCLUSIVE
                    reason = f"undecided after {span(judged_for)}: {reason}"
                    break
            if self.ledger is not None:
                self.ledger.append(
                    {
                        "event": "first-check",
                        "at": now,
                        "since": started,
                        "release": _release_dict(release),
                        "verdict": verdict.value,
                        "reason": reason,
                        "requests": requests,
                        "by": self.owner,
                    }
                )
            return FirstCheck(deployed=deployed, verdict=verdict, reason=reason)

    def _probe_metrics(self) -> None:
        """Refuse to begin (a rollout, a first release's check) when the metrics cannot be read:
        a wrong `metrics:` would otherwise deploy, send traffic, and only then hold for a human
        after `max_consecutive_errors` looks. Never on resume: a running rollout keeps guarding,
        and rolls back, with its metrics down."""
        try:
            self.metrics.probe()
        except MetricsError as exc:
            raise MetricsError(
                f"metrics unreadable, nothing deployed: {exc} (check the spec's `metrics:`, "
                "or bring the backend up, and run again)"
            ) from exc

    def _as_served(self, release: Release) -> Release:
        """`release`, or the release green serves when `release` names it by MODEL:VERSION alone
        (a command line's `--release`, which carries no sha256, image or folder): the one green
        serves is the only one it can mean, and judging it again must not read as another."""
        if release != Release(model=release.model, version=release.version):
            return release
        serving = self.router.release(Colour.GREEN)
        return serving if serving is not None and serving.ref == release.ref else release

    def _bootstrap(self, release: Release) -> bool:
        """`bootstrap`, the lease held."""
        status = self.store.load()
        if status is not None and not status.terminal:
            raise RolloutError(
                f"rollout {status.name!r} is {status.phase.value}: bootstrap fills an empty "
                "green, before the first rollout"
            )
        serving = self.router.release(Colour.GREEN)
        actions: tuple[Action, ...] = (Deploy(Colour.GREEN, release), SetWeights(0))
        if serving is not None and same_bits(serving, release):
            if not self._bootstrap_unfinished():
                return False
            # Stopped between the deploy and the weights (a new Azure endpoint then sends
            # green nothing): the weights are what is left to do.
            actions = (SetWeights(0),)
        elif serving is not None:
            raise RolloutError(
                f"green already serves {serving.ref}: roll {release.ref} out instead "
                f"(`aml-rollout rollout run --candidate {release.ref}`)"
            )
        for action in actions:
            self._apply(action)
        if self.ledger is not None:
            self.ledger.append(
                {
                    "event": "bootstrap",
                    "at": self.clock.now(),
                    "release": _release_dict(release),
                    "by": self.owner,
                    "describe": [describe(a) for a in actions],
                }
            )
        return True

    def _bootstrap_unfinished(self) -> bool:
        """True when green serves but blue serves nothing and green lacks all traffic (or the
        data plane has no traffic split yet): a bootstrap stopped before its weights."""
        if self.router.release(Colour.BLUE) is not None:
            return False  # a rollout's state (an ended one that failed): not ours to change
        try:
            return self.router.get_weights() != Weights.blue_at(0)
        except RouterError:
            return True

    def start(self, *, restart: bool = False) -> Status:
        """Resume the stored status (finishing its pending actions) or begin a new rollout."""
        # A stored status was stepped by another controller (or before a stop): its first tick
        # here ages the step by wall time, a real outage included (the metrics cover it).
        self._stepped_mono = None
        status = self.store.load()
        if status is not None and status.terminal and restart:
            if status.applied < len(status.pending):
                # The last rollout's ending (blue back to 0 %, say) was decided but not applied:
                # it is finished first, or the new rollout would begin on its leftovers.
                check_same_router(self.spec, status)
                self._finish_pending(status)
        elif status is not None:
            check_same_router(self.spec, status)
            self._check_same_candidate(status)
            log.info("resuming rollout %s in phase %s", status.name, status.phase.value)
            if self._abort_queued(status):
                undoing = promotion_unapplied(status)
                status = self._skip_pending(status)
                return self._restore_data_plane(status, aborting=True, undoing=undoing)
            # Restored first: a data plane that lost a colour's release refuses the pending
            # weights for good, and every later `run` would stop at them again.
            status = self._restore_data_plane(status)
            return self._finish_pending(status)
        candidate = self._asked_candidate() or self._read_release(Colour.BLUE)
        if candidate is None:
            raise RolloutError(
                "no candidate release: give one (spec `candidate:` or --candidate) or deploy blue"
            )
        serving = self._read_release(Colour.GREEN)
        stable = serving or (self.spec.stable.to_release() if self.spec.stable else None)
        if stable is None:
            raise RolloutError(
                # The data plane named: a namespace or endpoint with a typo reads as empty.
                f"green serves nothing on {self.spec.router.identity}: name the stable release "
                "in the spec (`stable:`) and the controller deploys it first; for a service's "
                "first release, "
                f"`aml-rollout rollout bootstrap SPEC --release {candidate.ref}`"
            )
        if same_bits(candidate, stable) and serving is None:
            raise RolloutError(
                f"`stable:` names the candidate {candidate.ref}: a rollout compares the candidate "
                "with another release; for a service's first release, "
                f"`aml-rollout rollout bootstrap SPEC --release {candidate.ref}`"
            )
        if same_bits(candidate, stable):
            raise RolloutError(
                f"green already serves {candidate.ref}: nothing to roll out (name another "
                "candidate with --candidate or the spec's `candidate:`)"
            )
        if serving is not None:
            self._check_no_rollout_drives(candidate)
        self._probe_metrics()
        prepared: tuple[Action, ...] = ()
        if serving is None:
            # A fresh data plane (dry run, first install): bring up the stable release first.
            log.info("green serves nothing: deploying %s:%s", stable.model, stable.version)
            prepared = (Deploy(Colour.GREEN, stable), SetWeights(0))
            for action in prepared:
                self._apply(action)
        queued = self.store.commands()
        status = new_status(
            self.spec,
            now=self.clock.now(),
            candidate=candidate,
            stable=stable,
            rollout_id=uuid.uuid4().hex,
            commands_read=len(queued),
            commands_tail=command_tail((), queued),
        )
        self.store.save(status)
        if self.ledger is not None:
            self.ledger.append(
                {
                    "event": "start",
                    "at": status.started_at,
                    "name": status.name,
                    "rollout_id": status.id,
                    "plan": list(self.spec.plan),
                    "candidate": _release_dict(candidate),
                    "stable": _release_dict(stable),
                    # What it did to the data plane before the rollout's first tick.
                    **({"describe": [describe(a) for a in prepared]} if prepared else {}),
                }
            )
        return status

    def _check_no_rollout_drives(self, candidate: Release) -> None:
        """Refuse to begin a rollout on a data plane that sends blue traffic already: another
        rollout drives it (one of another `name:` or state store, which this controller's
        lease does not exclude), or a hand edit. Begun, the two would reset each other's
        weights, each judging traffic the other split."""
        try:
            weights = self.router.get_weights()
        except RouterRefused:
            raise  # an answer (no Istio on the API server, no access): the deploy would meet it
        except WeightsUnsettled as exc:
            # Being changed, or its last change failed: someone set what it shows. (Was: read
            # as a new endpoint, and a rollout began over another's traffic mid-change.)
            if exc.shown is None:
                raise
            weights = exc.shown
        except RouterError:
            return  # no traffic split to read yet (a new Azure endpoint): nothing drives it
        if not (weights.blue or weights.mirror):
            return
        blue = self.router.release(Colour.BLUE)
        serving = f" ({blue.ref})" if blue is not None else ""
        raise RolloutError(
            f"{self.spec.router.identity} already sends {weights.blue_share} to blue{serving}: "
            f"another rollout drives it (one with another `name:` or state directory), or a "
            f"hand edit. Let that rollout end, or abort it, before rolling {candidate.ref} out; "
            "if none is running, send all traffic back to green first"
        )

    def _abort_queued(self, status: Status) -> bool:
        """An operator's abort of this rollout was queued while no controller ran, in a phase
        that reads one (Promoting too: a promotion whose weights the router refuses for good
        is left by an abort, never applied again)."""
        readers = (Phase.INITIALIZING, Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTING)
        if status.phase not in readers and not promotion_unapplied(status):
            return False
        queued = with_commands(status, self.store.commands()).commands
        return queued_abort(status, queued) is not None

    def _skip_pending(self, status: Status) -> Status:
        """The status without the actions left to apply, which a queued abort makes moot.

        Applied first, a step up would send blue more traffic for a moment before the abort
        takes it all away, and a router refusing it (a blue deployment gone Failed) would stop
        every `run` before the abort is read: the operator could never abort. In memory only:
        the next tick saves the abort's decision, which replaces them; stopped before, the
        stored status still has them and the abort still unread.
        """
        left = status.pending[status.applied :]
        if not left:
            return status
        skipped = [describe(a) for a in left]
        log.warning("an abort is queued: not applying %s", "; ".join(skipped))
        if self.ledger is not None:  # the ledger's decision line said they would be
            self.ledger.append({"event": "skipped", "at": self.clock.now(), "describe": skipped})
        if promotion_unapplied(status):
            # Its deploy to green skipped, Finalising serves what Promoting does (blue 100 %,
            # green the stable release): the machine reads the abort there.
            return replace(status, phase=Phase.PROMOTING, pending=(), applied=0)
        return replace(status, pending=(), applied=0)

    def _restore_data_plane(
        self, status: Status, *, aborting: bool = False, undoing: bool = False
    ) -> Status:
        """On resume, make the data plane serve what the status says the step serves.

        The status is the rollout's truth; the data plane may have lost it while no controller
        ran: an Envoy restarted from its bootstrap, a memory router without a state file (a dry
        run resumed), a VirtualService edited by hand. Left alone, blue would get no canary
        traffic and the step would wait for evidence until held. A colour that serves nothing
        gets its release again; a colour serving another release is left to the operator, and
        so are the weights then (another rollout drives them: the tick holds for a human). The
        candidate failing that deploy for good fails the rollout, as at its first deploy.
        `aborting` (an abort queued): green only, as the abort's weights come next, in
        Promoting too (an abort read there sends green everything as well). Before its first
        tick (Initializing) a rollout has deployed green only. What the pending actions still do
        (a deploy, the weights) is theirs: they are finished after this. `undoing` (the abort
        of a promotion whose deploy to green was not applied): a green the router refuses to
        read (an Azure deployment that Failed that deploy: no release, no traffic) gets the
        stable release again, as that deploy would have written it too.
        """
        status = self._redeploy_lost_blue(status)
        if status.terminal:
            return status  # the candidate could not be deployed
        analysing = (Phase.INITIALIZING, Phase.PROGRESSING, Phase.PAUSED)
        if status.phase not in analysing and not (aborting and status.phase is Phase.PROMOTING):
            return status
        if status.held and not aborting:
            # Held for a human, who has not answered: the data plane stays as it is (a hold for
            # a change made under the rollout would be undone, its reason then false). The
            # tick says what differs; `resume` sets it back.
            return status
        first = status.phase is Phase.INITIALIZING
        left = status.pending[status.applied :]
        colours = ((Colour.GREEN, status.stable), (Colour.BLUE, status.candidate))
        deployed = colours[:1] if first else colours  # what the rollout has deployed so far
        serving: dict[Colour, Release | None] = {}
        try:
            # An abort reads green alone: blue's release decides nothing it does, and a blue
            # that cannot be read (the failure the operator aborts for, often) stopped every
            # `run` before the abort, which never got through.
            for colour, _ in colours[:1] if aborting else colours:
                serving[colour] = self._release_or_refused(colour, undoing=undoing)
        except (RouterRefused, RouterUnavailable):
            raise  # (an answer, or nothing answers: a deploy would meet it too)
        except RouterError as exc:
            # A blip (an Azure deployment mid-update), as a tick's `_served` takes it: no reason
            # to stop guarding, nor to stop an abort. The first tick checks the data plane (a
            # change holds it for a human); an abort's weights come next regardless.
            log.warning("cannot read what the data plane serves (%s): not restoring it now", exc)
            return status
        redeploying = {a.colour for a in left if isinstance(a, Deploy)}
        if not aborting and any(
            release is not None and (there := serving[colour]) is not None and release.unlike(there)
            for colour, release in deployed
            if colour not in redeploying
        ):
            return status
        repairs: list[Action] = [
            Deploy(colour, release)
            for colour, release in (colours[:1] if aborting else deployed)
            if release is not None
            and (serving[colour] is None or (aborting and self._ours_on_green(status, serving)))
            and colour not in redeploying
        ]
        if (first or aborting) and not repairs:
            # Its first tick sets the weights (a new endpoint has none to read); an abort's
            # come next, tried on through an outage: read first, they stopped its `run`.
            return status
        served: Weights | None = None
        try:
            # An abort's own weights come next whatever serves now: read for the log line
            # alone, an outage of the read stopped it (the weights ride one through).
            if not aborting:
                served = self._weights_read_again(status)
        except (RouterRefused, RouterUnavailable):
            raise  # (nothing answers: writing the weights would not either)
        except RouterError as exc:
            # Weights that cannot be read now (an Azure endpoint Failed or mid-change shows
            # what was asked, not what serves): the status' weights are written again, which
            # also repairs a Failed endpoint. Stopping here stopped every `run` until a human
            # mended the endpoint.
            log.warning("the data plane's weights cannot be read (%s)", exc)
            served = None
        weights_left = any(isinstance(a, SetWeights) for a in left)
        if not (aborting or weights_left) and (repairs or served != status.weights):
            repairs.append(SetWeights(status.blue_weight, status.mirror))
        if not repairs:
            return status
        shown = (
            served.blue_share
            if served is not None
            else "weights not read (an abort's come next)"
            if aborting
            else "weights it could not read"
        )
        log.warning(
            "the data plane serves %s, the rollout's status says %s: %s",
            shown,
            status.weights.blue_share,
            "; ".join(describe(a) for a in repairs),
        )
        if self.ledger is not None:
            self.ledger.append(
                {
                    "event": "restore",
                    "at": self.clock.now(),
                    "served": shown,
                    "describe": [describe(a) for a in repairs],
                }
            )
        for action in repairs:
            if (failed := self._apply_or_fail(action, status)) is not None:
                return failed
        return status

    def _weights_read_again(self, status: Status) -> Weights:
        """The weights the data plane serves, read up to `WEIGHTS_READS` times while nothing
        answers at the router (`_read_again`); then RouterUnavailable saying so. Any other
        error is raised at the first read: a refusal is an answer, and a plain RouterError has
        the status' weights written again (`_restore_data_plane`)."""
        return self._read_again(
            "the data plane's weights",
            self.router.get_weights,
            lambda exc: isinstance(exc, RouterUnavailable),
            then=f", to check them against the rollout's ({status.weights.blue_share})",
            after="; nothing was restored: run again once the router answers",
        )

    def _read_release(self, colour: Colour) -> Release | None:
        """What `colour` serves, read again while the router answers with a failure (a proxy's
        502, an answer cut off): one such answer stopped a new rollout with exit 2. A refusal is
        an answer, and nothing answering at all is said at once, as for a deploy before the
        router ever answered (`_apply`): a spec pointing at a router nobody runs."""
        return self._read_again(
            f"{colour.value}'s release",
            lambda: self.router.release(colour),
            lambda exc: not isinstance(exc, RouterRefused | RouterUnavailable),
        )

    def _read_again(
        self,
        what: str,
        read: Callable[[], T],
        again: Callable[[RouterError], bool],
        *,
        then: str = "",
        after: str = "",
    ) -> T:
        """`read()`, tried up to `WEIGHTS_READS` times while it fails with an error `again`
        takes, pausing 0.5, 1, 2 s on the controller's clock; then a RouterUnavailable (or
        RouterError) saying how often and how long (`what` ... `then`: error `after`)."""
        pause, reads = WEIGHTS_REREAD_PAUSE_S, 0
        started = self.clock.monotonic()
        while True:
            reads += 1
            try:
                return read()
            except RouterError as exc:
                if not again(exc):
                    raise
                if reads >= WEIGHTS_READS:
                    tried = self.clock.monotonic() - started
                    # Nothing answering stays that; any other failure a plain RouterError (a
                    # subclass may take other arguments: WeightsUnsettled).
                    cls = RouterUnavailable if isinstance(exc, RouterUnavailable) else RouterError
                    raise cls(
                        f"{what} could not be read {reads} times in {tried:g} s{then}: {exc}{after}"
                    ) from exc
                log.warning("%s cannot be read (%s): reading again in %g s", what, exc, pause)
            self.clock.sleep(pause)
            pause *= 2

    def _release_or_refused(self, colour: Colour, *, undoing: bool) -> Release | None:
        """What `colour` serves; None for a green the router refuses to read while a promotion
        whose deploy to green failed is undone (the stable release is deployed to it again)."""
        try:
            # Read again while nothing answers: a resume stopped at one blip of an API server
            # (Istio, Azure), where the weights read after it would have ridden it through.
            return self._read_again(
                f"{colour.value}'s release",
                lambda: self.router.release(colour),
                lambda exc: isinstance(exc, RouterUnavailable),
            )
        except RouterRefused as exc:
            if not (undoing and colour is Colour.GREEN):
                raise
            # Azure's Failed deployment says "deploy it again": its PUT of the stable release
            # is what the abort needs, as the router refuses green the weights until then. The
            # skipped deploy would have written green (a hand edit there included) as well.
            log.warning("green cannot be read (%s): it is given the stable release again", exc)
            return None

    @staticmethod
    def _ours_on_green(status: Status, serving: dict[Colour, Release | None]) -> bool:
        """Whether green serves this rollout's candidate while the status says the stable
        release: its own Blue_Green, failed half-way, before an abort sends green all traffic
        (another release there is production moved on, not this rollout's to undo)."""
        green, candidate = serving[Colour.GREEN], status.candidate
        stable = status.stable
        return (
            green is not None
            and candidate is not None
            and stable is not None
            and stable.unlike(green)
            and not candidate.unlike(green)
        )

    def _redeploy_lost_blue(self, status: Status) -> Status:
        """Deploy the candidate to a blue serving nothing when the pending weights send it
        traffic (the status after: Failed when that deploy fails for good): blue's workload
        lost after they were decided (evicted, deleted). The router refuses those weights for
        good, and every `run` would stop at them: in Promoting, where no command is read, not
        even an abort. Any phase,
        held or not: those weights are a decision already made (a promotion, a human's
        set-weight), and blue serving nothing is no one's canary."""
        left = status.pending[status.applied :]
        if status.candidate is None or not any(
            isinstance(a, SetWeights) and (a.blue or a.mirror) for a in left
        ):
            return status
        if any(isinstance(a, Deploy) and a.colour is Colour.BLUE for a in left):
            return status  # deployed by the pending actions themselves, before their weights
        try:
            if self.router.release(Colour.BLUE) is not None:
                return status
        except (RouterRefused, RouterUnavailable):
            raise
        except RouterError as exc:  # a blip, as in `_restore_data_plane`: the weights are tried
            log.warning("cannot read what blue serves (%s): not redeploying it", exc)
            return status
        repair = Deploy(Colour.BLUE, status.candidate)
        log.warning(
            "blue serves nothing, and the pending weights send it traffic: %s", describe(repair)
        )
        self._tell_empty_colour_repair("restore", repair)
        return self._apply_or_fail(repair, status) or status

    def _asked_candidate(self) -> Release | None:
        """The candidate given to the controller, else the spec's (None when neither names one)."""
        return self.candidate or (self.spec.candidate.to_release() if self.spec.candidate else None)

    def _check_same_candidate(self, status: Status) -> None:
        """Refuse to resume a stored rollout of another candidate than the one asked for.

        Otherwise `run --candidate m:3` on a rollout that promoted m:2 would report m:2's success.
        """
        wanted = self._asked_candidate()
        stored = status.candidate
        if wanted is None or stored is None or wanted.ref == stored.ref:
            return
        if status.terminal:
            raise RolloutError(
                f"rollout {status.name!r} of {stored.ref} has ended ({status.phase.value}), and "
                f"{wanted.ref} was asked for: `--restart` starts a new rollout of {wanted.ref}"
            )
        if self._abort_queued(status):
            raise RolloutError(
                f"rollout {status.name!r} of {stored.ref} is still {status.phase.value}, and "
                f"{wanted.ref} was asked for; an abort of it is queued: apply it with "
                f"`--candidate {stored.ref}`, then start {wanted.ref} with `--restart`"
            )
        raise RolloutError(
            f"rollout {status.name!r} of {stored.ref} is still {status.phase.value}, and "
            f"{wanted.ref} was asked for: resume it with `--candidate {stored.ref}`, or end it "
            f"first (`aml-rollout rollout abort`, applied by `run --candidate {stored.ref}`)"
        )

    def _read_commands(self, status: Status) -> Status:
        """`status` with the commands queued since it last read the log, and a warning for each
        entry of them that is not a command (a torn write, an edit by hand, a newer version's
        kind). The status saved after this tick records how far the log was read, so the entry
        is reported once: not at every read, nor by a restarted controller or `status`."""
        commands = self.store.commands()
        read = with_commands(status, commands)
        if read is not status:
            start = 0 if status.commands_read < 0 else unread_from(status, commands)
            unreadable = [str(i + 1) for i in range(start, len(commands)) if commands[i] is None]
            if unreadable:
                log.warning(
                    "rollout %r: skipped entry %s of the command log: not a command this "
                    "version can read (a torn write, an edit by hand or a newer version's "
                    "command); it is not read again",
                    status.name,
                    ", ".join(unreadable),
                )
        return read

    def tick(self, status: Status) -> Status:
        """One observe → decide → persist → apply round."""
        # A controller whose lease was lost while it waited (another one drives the rollout
        # now) decides nothing more: not even a ledger line.
        self.store.check_lease()
        status = self._finish_pending(status)
        if status.terminal:
            return status  # the pending actions ended it (a candidate that could not be deployed)
        status = self._read_commands(status)
        now, mono = self.clock.now(), self.clock.monotonic()
        # The time since the last tick that did pass, whatever the wall clock did meanwhile
        # (an NTP step of 15 minutes aged a healthy step into an inconclusive hold).
        elapsed = None if self._stepped_mono is None else mono - self._stepped_mono
        observation: Observation | None = None
        served: Served | None = None
        if status.phase in (Phase.PROGRESSING, Phase.PAUSED):
            observation = self._observe(status.step_started_at, now)
            served = self._served()
        elif status.phase is Phase.INITIALIZING:
            observation = self._history(now)
        was_held = status.held
        decision: Decision = step(self.spec, status, observation, now, served, elapsed)
        self._stepped_mono = mono
        if served is None and self._served_unread is not None:
            # In the ledger too, not only in a log gone with the controller's terminal:
            # `explain` tells the ticks whose changes to the data plane went unnoticed.
            unread = clipped(self._served_unread, UNREAD_CHARS)
            decision = replace(decision, record={**decision.record, "data_plane_unread": unread})
        record, status = self._persist(decision)
        status = self._finish_pending(status)
        # After the actions: a slow webhook never delays a rollback. (A phase the actions
        # themselves led to, a candidate that could not be deployed, was told already.) A
        # rollout an operator paused, then held (the data plane changed under it), is told too:
        # now it waits for a human's answer, not for the operator's resume alone.
        entered = decision.status.phase.value != record.get("phase_before") or (
            decision.status.held and not was_held
        )
        if self.notifier is not None and entered and status.phase is decision.status.phase:
            self.notifier.entered(status)
        if self.on_tick is not None:
            self.on_tick(status, record)
        return status

    def _persist(self, decision: Decision) -> tuple[dict[str, Any], Status]:
        """Write the decision's ledger line, then its status with the actions pending."""
        record = dict(decision.record)
        record["describe"] = [describe(a) for a in decision.actions]
        record["rollout_id"] = decision.status.id  # (ledger.latest_ticks)
        # Which take of the lease wrote the line: a controller that lost the lease after the
        # check below (frozen in between) may still append, and its line must hide none of
        # its successor's (ledger._redone).
        record["tenure"] = self._tenure
        if self.ledger is not None:
            # Not only at the tick's start: a slow metrics query can outlast the lease, and a
            # stale line would read as the successor's ticks done again.
            self.store.check_lease()
            self.ledger.append(record)
        status = replace(decision.status, pending=decision.actions, applied=0)
        self.store.save(status)
        if decision.actions or status.phase.value != decision.record.get("phase_before"):
            log.info(
                "%s: %s%s",
                status.phase.value,
                status.reason,
                "".join(f"; {describe(a)}" for a in decision.actions),
            )
        return record, status

    # ----------------------------------------------------------------------------- helpers

    def _served(self) -> Served | None:
        """What the data plane serves now, for the machine to hold the rollout when it is no
        longer what the rollout set; None when the router cannot tell (a blip, an Azure
        deployment mid-update): that tick goes on without the check, which is no reason to
        stop guarding."""
        try:
            served = served_now(self.router)
        except RouterError as exc:
            if self._served_unread is None:
                # Once, not every tick: a route the router cannot read (edited by hand into a
                # shape it does not know) would otherwise go unchecked without a word.
                log.warning(
                    "cannot read what the data plane serves (%s): changes made to it under "
                    "this rollout go unnoticed until it can be read",
                    exc,
                )
            self._served_unread = str(exc)
            return None
        if self._served_unread is not None:
            log.warning("the data plane can be read again: checking it for changes")
            self._served_unread = None
        return served

    def _observe(self, since: float, now: float, *, history: bool = False) -> Observation:
        read = self.metrics.history if history else self.metrics.observe
        try:
            # Checked here, the one place every backend's counts pass: an unusable count (a
            # source of one's own answering NaN, say) is an Error tick, like an outage.
            return usable(read(since, now))
        except MetricsError as exc:  # the contract says "never raises"; be safe anyway
            return Observation(since=since, at=now, error=str(exc))

    def _history(self, now: float) -> Observation | None:
        """Green's traffic before the rollout, when the latency check wants its p99 bucket."""
        lat = self.spec.analysis.latency
        if not (lat.uses_baseline_p99 and lat.history_s > 0):
            return None
        return self._observe(now - lat.history_s, now, history=True)

    def _finish_pending(self, status: Status) -> Status:
        """Apply the status's actions left to apply, saving the count of those applied after
        each. A step begun with a deploy to blue or a change of weights counts from when its
        actions are served, not from the decision: while the deploy ran (7 s of a local
        scoring server starting), blue answered with whatever served there before — another
        rollout's candidate, measured on the local stack, whose mirrored copies the step would
        have judged as its own; while an update of the weights ran (minutes on an Azure ML
        endpoint), the previous step's split served, and the step's first tick would judge two
        splits as one."""
        moved = False
        for index in range(status.applied, len(status.pending)):
            action = status.pending[index]
            if (
                isinstance(action, Deploy)
                and action.colour is Colour.GREEN
                and status.phase is Phase.FINALISING
                and self._abort_queued(status)
            ):
                # Queued after this tick read the commands (`abort` saw Promoting), before
                # green gets the candidate: green still serves the stable release, and the
                # abort undoes the promotion as in Promoting. (Was: dropped once it ended.)
                return self._skip_pending(status)
            try:
                failed = self._apply_pending(action, status)
            except RouterError as exc:
                # The controller stops here (exit 2), the action pending for the next run: the
                # ledger says why, or `explain` would only tell the phase the rollout was in.
                if self.ledger is not None:
                    self.ledger.append(
                        {
                            "event": "not-applied",
                            "at": self.clock.now(),
                            "rollout_id": status.id,
                            "describe": [describe(action)],
                            "error": str(exc),
                        }
                    )
                raise
            if failed is not None:
                return failed
            moved = moved or isinstance(action, SetWeights)
            moved = moved or (isinstance(action, Deploy) and action.colour is Colour.BLUE)
            status = replace(status, applied=index + 1)
            if (
                moved
                and status.applied == len(status.pending)
                and status.phase is Phase.PROGRESSING
                and status.last_blue == status.last_green == Counts()
            ):
                # Nothing observed yet (the step's counts are cumulative since it began).
                status = replace(status, step_started_at=self.clock.now(), step_uncounted_s=0.0)
            self.store.save(status)
        return status

    def _apply_pending(self, action: Action, status: Status) -> Status | None:
        """`_apply_or_fail`, but for a rollback's weights refused because green serves nothing
        (its workload evicted or deleted, say while blue had all traffic): green gets the
        stable release again, and the weights are tried once more."""
        try:
            return self._apply_or_fail(action, status)
        except RouterRefused as refused:
            if not self._green_back_for_rollback(status, action, refused):
                raise
            return self._apply_or_fail(action, status)

    def _green_back_for_rollback(
        self, status: Status, action: Action, refused: RouterRefused
    ) -> bool:
        """Deploy the stable release to a green serving nothing when `action` is a rollback's
        weights (all traffic to green); whether it did. Refused for good, they stopped every
        `run` with the rollout in RollingBack, which reads no command: nothing but a hand
        deploy got it out. (An abort queued while no controller ran had this done already, by
        `_restore_data_plane`.) A green serving anything, or unreadable, is a human's."""
        stable = status.stable
        if not (_off_blue(action) and status.phase is Phase.ROLLING_BACK and stable is not None):
            return False
        try:
            if self.router.release(Colour.GREEN) is not None:
                return False
        except RouterError:
            return False
        repair = Deploy(Colour.GREEN, stable)
        log.warning(
            "the rollback's weights were refused (%s), and green serves nothing: %s",
            refused,
            describe(repair),
        )
        # (Not "restore", which `explain` tells as a resume's: this may be mid-run.)
        self._tell_empty_colour_repair("green-lost", repair, error=str(refused))
        self._apply(repair)
        return True

    def _tell_empty_colour_repair(self, event: str, repair: Deploy, **extra: str) -> None:
        """The ledger line of `repair`, a deploy to a colour that served nothing."""
        if self.ledger is not None:
            self.ledger.append(
                {
                    "event": event,
                    "at": self.clock.now(),
                    "served": f"nothing on {repair.colour.value}",
                    **extra,
                    "describe": [describe(repair)],
                }
            )

    def _apply_or_fail(self, action: Action, status: Status) -> Status | None:
        """Apply `action`; when it deploys the candidate and that fails for good (DeployFailed),
        the rollout Fails instead, blue at 0 %, told: that failed status (else None). A deploy
        to green failing so is a human's (the stable release, or a promotion's Blue_Green)."""
        try:
            self._apply(action)
        except DeployFailed as exc:
            if not (isinstance(action, Deploy) and action.colour is Colour.BLUE):
                raise
            _, failed = self._persist(candidate_failed(status, str(exc), self.clock.now()))
            failed = self._finish_pending(failed)
            if self.notifier is not None:
                self.notifier.entered(failed)
            return failed
        return None

    def _apply(self, action: Action) -> None:
        delay = 1.0
        off_blue = _off_blue(action)
        started = self.clock.monotonic()  # (a clock's step cuts no rollback's retries short)
        attempt = 0
        while True:
            attempt += 1
            # A controller whose lease is lost (or about to be) must not move traffic that the
            # controller taking over now drives: StateError, and this one stops.
            self.store.check_lease()
            try:
                if isinstance(action, SetWeights):
                    wanted = action.weights
                    self.router.set_weights(wanted)
                    # Trust what the data plane serves, not what was written (Envoy keeps its
                    # old routes when it rejects a file).
                    served = self.router.get_weights()
                    if served != wanted:
                        accepted, serves = wanted.blue_share, served.blue_share
                        raise RouterError(f"the router accepted {accepted} but serves {serves}")
                elif isinstance(action, Deploy):
                    self.router.deploy(action.colour, action.release)
                elif isinstance(action, Remove):
                    self.router.remove(action.colour)
                self._router_answered = True
                return
            except RouterError as exc:
                if isinstance(exc, RouterRefused):
                    # An answer, not a blip (no such namespace, pods never ready after the
                    # wait, traffic held by a deployment not ours): asking again changes nothing.
                    raise
                if (
                    isinstance(exc, RouterUnavailable)
                    and isinstance(action, Deploy)
                    and not self._router_answered
                ):
                    # A deploy before the router ever answered this controller: a spec pointing
                    # at a router nobody runs, not a blip, and retrying would only delay the one
                    # clear line. Weight changes (a rollback above all) are always retried.
                    raise
                tried = self.clock.monotonic() - started
                if attempt >= ROUTER_ATTEMPTS and not (off_blue and tried < ROLLBACK_RETRY_S):
                    over = f" in {tried:.0f} s" if attempt > ROUTER_ATTEMPTS else ""
                    raise RouterError(
                        f"{describe(action)} failed {attempt} times{over}: {exc}"
                    ) from exc
                log.warning("%s failed (%s); retrying in %.0f s", describe(action), exc, delay)
                self.clock.sleep(delay)
                delay = min(delay * 2, ROLLBACK_PAUSE_CAP_S)

    def _wait(self, seconds: float, status: Status) -> None:
        """Sleep one interval, waking early when an operator command arrives."""
        remaining = seconds
        while remaining > 0:
            nap = min(self.poll_s, remaining) if math.isfinite(self.poll_s) else remaining
            self.clock.sleep(nap)
            remaining -= nap
            if remaining > 0 and with_commands(status, self.store.commands()) is not status:
                return


def served_now(router: TrafficRouter) -> Served:
    """What the data plane serves now: its weights and each colour's release (RouterError when
    the router cannot tell)."""
    return Served(
        weights=router.get_weights(),
        blue=router.release(Colour.BLUE),
        green=router.release(Colour.GREEN),
    )


def check_same_router(spec: RolloutSpec, status: Status) -> None:
    """Refuse to resume or steer a stored rollout of this name that drives another data plane:
    another spec with the same `name` (and state dir), e.g. a copy for another namespace."""
    if not status.router or status.router == spec.router.identity:
        return  # ("" : a status file written before rollouts remembered their router)
    raise RolloutError(
        f"the stored rollout {status.name!r} drives {status.router}, and this spec's router is "
        f"{spec.router.identity}: another spec of the same name shares its state. Give this "
        "spec its own `name:` (or --state-dir)"
    )


def same_bits(a: Release, b: Release) -> bool:
    """The same model bits in the same image (a new image of one model is a real candidate)."""
    return (a.ref, a.sha256, a.image) == (b.ref, b.sha256, b.image)


def _release_dict(release: Release) -> dict[str, Any]:
    return {
        "model": release.model,
        "version": release.version,
        "sha256": release.sha256,
        "image": release.image,
        "model_dir": release.model_dir,
        "deployment": release.deployment,
    }


def current_user() -> str:
    """Who runs this process, for a lease owner or a queued command's `by`: the login name, or
    `uid N` for a uid with no passwd entry and no USER/LOGNAME (a container under an arbitrary
    uid), where getpass raises KeyError (OSError from Python 3.13). Was a traceback there for
    every steering command, abort included."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def default_owner() -> str:
    """A readable lease owner for messages ("ann's controller pid 12 on host since ...")."""
    return f"{current_user()}'s controller"


def _off_blue(action: Action) -> bool:
    """Whether `action` is weights sending blue nothing (a rollback's, an abort's)."""
    return isinstance(action, SetWeights) and not (action.blue or action.mirror)
