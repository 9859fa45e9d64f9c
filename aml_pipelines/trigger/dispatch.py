"""Exactly-once hand-off from triggers to the delivery path, one rollout at a time.

The watcher and the webhook only *accept* versions (a durable `pending` entry in the cursor); a
single worker then delivers them, oldest first. The worker's loop for one version is

    take the deliver lock (one delivery per endpoint, across processes)
    re-read the entry                      → done already (another process)? skip
    ask the registry                       → not there: a version an event named is asked for
                                             again with backoff (MISSING_RETRIES_S), then
                                             closed as `missing`; the lock is let go
                                             between the reads (see below)
                                           → stage records a delivery, withdrawn (archived in
                                             the studio) while pending, a newer version is in
                                             production, or the job that registered it rolls it
                                             out itself? close it `skipped`, without a rollout
    wait while another rollout is active   → or, with supersede, abort it and wait for it to end;
                                             the lock is let go while waiting, and all of
                                             the above checked again once it is taken again
    mark `started` (durable)               → from here on, a crash means "resume", not "restart"
    delivery.deliver(version)              → package + rollout + tags; resumes from the state store
    mark `done` with the outcome (durable)

Crash semantics (SIGKILL anywhere):
- before `started`: the entry is still pending and is delivered on restart — nothing happened yet;
- between `started` and `done`: on restart the entry is found `started` and delivered again, which
  the delivery path turns into a *resume* (the package step is idempotent; the rollout engine
  continues the rollout of the same candidate from its state store); a rollout that already ended
  is not run again: the start-up reconcile writes its tags, which then settle the entry with the
  rollout's outcome (one the registry cannot give, damaged or removed since, is settled from the
  state store: `_ended_unread`). An error on the way, even one that closes a version before its
  rollout (a corrupted model, an invalid spec: PERMANENT), leaves one whose rollout is live in the
  state store open, to be resumed once it is gone: closed, its rollout had no controller for good
  (one the registry lost for good is resumed by hand, `rollout run`: its reason says so).
  `attempts` counts the entries into delivery;
- after `done`: nothing to do. So each version is delivered once, and none is skipped.

A version awaited from the registry: each miss puts off the version's next read (in memory,
`_misses`) and gives the deliver lock back; the entry stays `pending`, so a crash only starts its
reads over. Meanwhile the worker delivers other models' versions (and another process on the
state folder may deliver), while this model's later versions wait behind it, in order, as they
would behind its delivery. `watch --once` (drain with `wait`) just waits for the next read.

Supersede: when a newer version of the same model is accepted while an older one is being delivered,
the active rollout is aborted (it rolls back cleanly and ends RolledBack with the reason "superseded
by version N"), and older pending versions are closed as `superseded` instead of being rolled out
only to be replaced. The accept only asks for that abort: the DeliveryWorker makes it on a thread of
its own (`check_supersede`; its delivery thread is in the rollout), off a webhook's answer, and
makes it again until the rollout state and the registry answer — once the version is in the cursor,
nothing else would ask again. The check is made again before each delivery, so an older version
already `started` whose rollout has not begun (retried after an error, or killed while being
packaged) is closed as `superseded` too, and one whose rollout is in the state store (killed
mid-rollout, the newer version accepted just as it began) is resumed only to be aborted. A newer
version supersedes (or aborts) only once read from the registry, sound and not withdrawn
(`_superseding`): one the registry does not hold is asked for again, the older pending one kept open
meanwhile and delivered if the newer closes `missing` or Failed. A version being packaged when a
newer one is accepted (nothing to abort yet) is asked about once packaged, just before its rollout
begins (`_superseded_meanwhile`), and closed as `superseded` there. Kept: a started version of a
model with no production version — a first release, which may already serve all traffic (deployed to
green before its check, no rollout in the state store, killed before its tags) — and one whose
rollout ended (settled with its outcome). A newer pending version withdrawn in the registry
(archived in the Azure ML studio) supersedes nothing: it is skipped when its turn comes. Without
supersede a newer version waits its turn.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from functools import partial

from aml_pipelines.delivery import (
    FAILED,
    FIRST_CHECK_OUTCOMES,
    FIRST_CHECK_REASON_TAG,
    FIRST_CHECK_TAG,
    REASON_TAG,
    ROLLED_BACK,
    SUCCEEDED,
    Delivery,
    DeliveryOutcome,
    RolloutView,
    short_reason,
)
from aml_pipelines.errors import (
    ConfigError,
    IntegrityError,
    ModelNotFound,
    PipelineError,
    RegistryError,
    TriggerError,
)
from aml_pipelines.registry.base import (
    ROLLOUT_BY_JOB,
    ROLLOUT_BY_TAG,
    STAGE_TAG,
    ModelRegistry,
    ModelVersion,
    Stage,
)
from aml_pipelines.trigger.store import (
    MISSING,
    SKIPPED,
    SUPERSEDED,
    Cursor,
    Entry,
    Step,
    TriggerStore,
)
from rollout.errors import ConfigError as SpecError
from rollout.errors import RolloutError

log = logging.getLogger(__name__)

#: Errors after which a version cannot be delivered as things stand (a missing or corrupted model,
#: an invalid spec): close it as Failed instead of retrying forever. Anything else (a network
#: error, a router that is down) leaves it open, to be resumed on the next attempt — and so does
#: any of these while the version's rollout is live in the state store (`_kept_live`).
PERMANENT = (ModelNotFound, IntegrityError, ConfigError, SpecError)
#: Stages a version only reaches through a delivery: such a version is never delivered again.
DELIVERED = frozenset({Stage.PRODUCTION, Stage.ARCHIVED, Stage.ROLLED_BACK})
#: Why a pending version withdrawn in the registry (archived in the Azure ML studio:
#: ModelVersion.withdrawn) is closed `skipped` instead of rolled out.
WITHDRAWN = (
    "withdrawn before its delivery: archived in the registry (the Azure ML studio's Archive), "
    "so not rolled out"
)
#: Seconds between the registry reads of a version an event named that the registry does not
#: hold (yet): an event can arrive before the registry answers for its version (replication
#: lag), and with `serve` alone nothing but a new event would accept a version closed as
#: `missing` again. 8 reads over about 2 min; the delivery lock is free between them.
MISSING_RETRIES_S = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


class Dispatcher:
    """Accepts versions durably and delivers them one at a time, exactly once each."""

    def __init__(
        self,
        store: TriggerStore,
        registry: ModelRegistry,
        delivery: Delivery,
        *,
        supersede: bool = False,
        wait_interval_s: float = 5.0,
        stop: threading.Event | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.delivery = delivery
        self.supersede = supersede
        self.wait_interval_s = wait_interval_s
        self.stop = stop or threading.Event()
        self.missing_retries_s: Sequence[float] = MISSING_RETRIES_S
        #: Waits that many seconds; True when stopped meanwhile (a test's clock replaces it).
        self.pause: Callable[[float], bool] = self.stop.wait
        self.clock: Callable[[], float] = time.monotonic
        #: Versions the registry did not hold when last read: (reads missed, next read at clock).
        self._misses: dict[tuple[str, int], tuple[int, float]] = {}
        self._deliver_lock = store.lock("deliver", "a delivery on this endpoint")
        #: The version `delivery.deliver` is at in this process (read by `accept`'s thread).
        self._delivering: tuple[str, int] | None = None
        #: The version whose delivery this process entered last and did not see end (it was
        #: interrupted, or failed): what an interrupted `watch --once` says it leaves.
        self.entered: tuple[str, int] | None = None
        #: Versions whose last delivery in this process ended in an error, to be retried.
        self._failing: set[tuple[str, int]] = set()
        #: (model, version, newer) already said or done by `_supersede_started`: once each.
        self._kept: set[tuple[str, int, int]] = set()
        #: Newer versions read and found unable to supersede (not in the registry for good,
        #: corrupted, withdrawn): each closes at its own turn (see `_superseding`).
        self._unfit: set[tuple[str, int]] = set()
        #: Per model, when the drain that stopped without `wait` can go on (see `next_read_in`).
        self._due: dict[str, float] = {}
        #: Versions whose drain without `wait` found the endpoint busy: where their wait is.
        self._waits: dict[tuple[str, int], _EndpointWait] = {}
        #: With supersede, per model, the newest version accepted whose check of the running
        #: rollout (`_abort_older`) is still to be made (see `check_supersede`).
        self._to_check: dict[str, int] = {}
        self._to_check_lock = threading.Lock()
        #: Called when an accept asks for a supersede check: the DeliveryWorker's, which makes
        #: it on a thread of its own. None (no worker: `watch --once`, a test): made at once.
        self.check_requested: Callable[[], None] | None = None

    # ------------------------------------------------------------------ accepting

    def accept(self, model: str, version: int, source: str) -> bool:
        """Record a version to deliver; False when the cursor already knows it (duplicate)."""
        return bool(self.accept_many(model, [(version, source)]))

    def accept_many(
        self, model: str, versions: Sequence[tuple[int, str]], *, withdrawn: Collection[int] = ()
    ) -> list[int]:
        """`accept` each (version, source) of one model in one cursor write; returns the new
        versions (the others were duplicates). A new one in `withdrawn` (the registry says so:
        archived in the Azure ML studio) is recorded closed, `skipped` (WITHDRAWN), instead."""
        closed = {version: (SKIPPED, WITHDRAWN) for version in withdrawn}
        new = self.store.accept_many(model, versions, closed)
        sources: dict[int, str] = {}
        for version, source in versions:
            sources.setdefault(version, source)  # the first is the one recorded
        for version in new:
            if version in closed:
                log.info("skipped %s v%d (%s): %s", model, version, sources[version], WITHDRAWN)
            else:
                log.info("accepted %s v%d (%s)", model, version, sources[version])
        if (pending := [v for v in new if v not in closed]) and self.supersede:
            with self._to_check_lock:
                self._to_check[model] = max(self._to_check.get(model, 0), *pending)
            if self.check_requested is None:
                # No worker to make a failed check again (`watch --once`): a registry that
                # cannot be read is told and the pass goes on to deliver, as when the check
                # finds the version missing; raised, it failed the pass after the cursor had
                # recorded the version, and the next pass never checked it again.
                self.check_supersede(on_error=self._unread_registry)
            else:
                # Not on the accepting thread: the check reads the rollout state and the
                # registry, which a webhook's answer must not wait for (Event Grid waits 30 s),
                # and an error there, the version already in the cursor, lost the abort: the
                # retry of the event was a duplicate, never checked again.
                self.check_requested()
        return new

    def check_supersede(
        self, on_error: Callable[[str, int, Exception], None] | None = None
    ) -> bool:
        """Make the supersede checks accepts asked for: abort the running rollout of an older
        version of the model (`_abort_older`); True when all were made. One that fails stays
        asked for, to be made again, and is told to `on_error` (model, version, error); without
        it the first error is raised, once the others are made."""
        with self._to_check_lock:
            todo = dict(self._to_check)
        error: Exception | None = None
        for model, newest in todo.items():
            try:
                self._abort_older(model, newest)
            except Exception as exc:
                if on_error is None:
                    error = error or exc
                else:
                    on_error(model, newest, exc)
                continue
            with self._to_check_lock:
                if self._to_check.get(model) == newest:  # else a newer one came meanwhile
                    del self._to_check[model]
        if error is not None:
            raise error
        with self._to_check_lock:
            return not any(self._to_check.get(model) == newest for model, newest in todo.items())

    @staticmethod
    def _unread_registry(model: str, version: int, exc: Exception) -> None:
        if not isinstance(exc, RegistryError):
            raise exc
        log.warning(
            "%s v%d aborts nothing (the registry cannot be read: %s); the running rollout goes on",
            model,
            version,
            exc,
        )

    def _abort_older(self, model: str, newest: int) -> None:
        view = self.delivery.current()
        if view is not None and view.active and view.model == model and view.candidate < newest:
            if why := self._cannot_supersede(model, newest):
                # An event ahead of the registry, or naming a version never registered (or
                # corrupted, withdrawn) would abort a good candidate for nothing: its rollout
                # goes on, and `newest` follows it if it turns up.
                log.info(
                    "%s v%d aborts nothing for now (%s): the rollout of v%d goes on",
                    model,
                    newest,
                    why,
                    view.candidate,
                )
                return
            log.warning("superseding the rollout of %s v%d by v%d", model, view.candidate, newest)
            self.delivery.abort(f"superseded by version {newest}")
            return
        delivering = self._delivering
        if delivering is None or delivering[0] != model or delivering[1] >= newest:
            return
        try:
            first = not self.registry.find_by_tag(model, STAGE_TAG, Stage.PRODUCTION)
        except PipelineError:  # a log line is not worth failing the accept (a webhook's 500)
            return
        if first:
            # The model's first release, being checked: no rollout, so nothing to abort. Said
            # here, once per accepted version, or the newer one would wait without a word.
            log.info(
                "%s v%d waits for the first-release check of v%d to end: --supersede cannot cut "
                "it short (v%d serves all traffic, with no rollout to abort and nothing to fall "
                "back to); the check ends with a verdict, or after analysis.max_step_duration_s",
                model,
                newest,
                delivering[1],
                delivering[1],
            )

    def _cannot_supersede(self, model: str, version: int) -> str | None:
        """Why pending `version` cannot supersede an older one as the registry stands (None: it
        can): it must be in the registry, sound, and not withdrawn. A registry that cannot be
        read says nothing: its error is raised, and the check made again (`check_supersede`)."""
        try:
            found = self.registry.get(model, version)
        except (ModelNotFound, IntegrityError) as exc:
            return str(exc)
        return "withdrawn in the registry" if found.withdrawn else None

    # ------------------------------------------------------------------ delivering

    def drain(
        self,
        model: str,
        on_outcome: Callable[[DeliveryOutcome], None] | None = None,
        *,
        wait: bool = True,
    ) -> list[DeliveryOutcome]:
        """Deliver every open version of `model` (started ones first); returns the outcomes.

        `on_outcome` hears each as it closes: an error on a later version ends the drain with
        the exception, and the outcomes before it must not be lost with the return value.
        A version awaited from the registry is waited for (`pause`), and so is the endpoint
        while another rollout is active on it; without `wait` the drain ends there instead (the
        worker goes on with other models, and comes back when due: see `next_read_in`).
        """
        outcomes = []
        while not self.stop.is_set():
            cursor = self.store.load(model)
            open_entries = cursor.open_entries()
            # One closed by another process is awaited no more (due forever, it would end
            # every wait of the worker at once).
            still_open = {e.version for e in open_entries}
            for closed in {*self._misses, *self._failing, *self._unfit, *self._waits}:
                if closed[0] == model and closed[1] not in still_open:
                    self._forget(*closed)
            self._due.pop(model, None)
            if not open_entries:
                break
            version = open_entries[0].version
            if (later := self._blocked_for(cursor, version)) > 0:
                if not wait:
                    self._due[model] = self.clock() + later  # the worker wakes for it
                    break
                if self.pause(later):
                    break
                continue
            outcome = self._deliver_one(model, version, block=wait)
            if not wait and model in self._due:  # waits for the endpoint: the worker comes back
                break
            if outcome is not None:
                outcomes.append(outcome)
                if on_outcome is not None:
                    on_outcome(outcome)
        return outcomes

    def next_read_in(self) -> float | None:
        """Seconds until a model whose drain stopped without `wait` can go on (0: now): a read
        from the registry its oldest open version waits for is due, or its next look at a busy
        endpoint (every `wait_interval_s`); None when none waits.

        Only the read that blocks each model counts: an awaited version behind the model's
        oldest open one is not read before its turn, and counted, being due, it ended every wait
        of the worker at once, over and over (a core spun until it closed, ~2 min).
        """
        now = self.clock()
        return min((max(0.0, due - now) for due in self._due.values()), default=None)

    def _blocked_for(self, cursor: Cursor, version: int) -> float:
        """Seconds before `version`, the oldest open one of its model, can be taken further:
        until its next read from the registry (0: now). With supersede, for a pending version
        a newer open version not read yet is read now (it may supersede this one at once), and
        the reads of newer ones awaited from the registry are waited for, each of which may yet
        supersede it (see `_superseding`). A started one waits for its own read only: the newer
        ones are read with it, and nothing can supersede it before (`_deliver_locked`); 0 while
        that read is not due spun the drain on the registry for the ~2 min of its reads."""
        model = cursor.model
        own = self._read_in(model, version)
        if not self.supersede or cursor.entries[version].step is not Step.PENDING:
            return own
        newer = [
            e.version
            for e in cursor.open_entries()
            if e.version > version and (model, e.version) not in self._unfit
        ]
        if not newer:
            return own
        if any((model, v) not in self._misses for v in newer):
            return 0.0
        return min(self._read_in(model, v) for v in newer)

    def _read_in(self, model: str, version: int) -> float:
        missed = self._misses.get((model, version))
        return 0.0 if missed is None else max(0.0, missed[1] - self.clock())

    def resume_order(self, models: list[str]) -> list[str]:
        """`models` with those holding a `started` entry first (otherwise in the given order).

        A `started` entry may be the endpoint's active rollout, left by a crash, which only this
        worker resumes: a pending version of another model drained before it would wait for
        that rollout forever. A cursor that cannot be read keeps its place (drain reports it).
        """

        def started(model: str) -> bool:
            try:
                entries = self.store.load(model).entries.values()
            except TriggerError:
                return False
            return any(e.step is Step.STARTED for e in entries)

        return sorted(models, key=lambda model: not started(model))

    def _deliver_one(
        self, model: str, version: int, *, block: bool = True
    ) -> DeliveryOutcome | None:
        """Deliver `version` under the deliver lock — let go while another rollout is active
        on the endpoint: that rollout may be one only another process sharing the state folder
        can resume (a kill left it active), and that process needs the lock to do so. Held
        through the wait, it was a deadlock: the endpoint split, with no controller. Each time
        the lock is taken again, everything is checked again.

        Without `block` (the worker) the wait is not made here: the model is due again in an
        interval (`_due`) and None returned. The worker must stay free to retry the resume of
        a live rollout kept open after an error (`_kept_live`): waiting here for the endpoint,
        it waited for that very rollout, and mended, nothing resumed it."""
        wait = self._waits.pop((model, version), None) or _EndpointWait()
        while True:
            with self._deliver_lock.held():
                outcome = self._deliver_locked(model, version, wait)
            if not wait.busy:
                return outcome
            if not block:
                self._waits[(model, version)] = wait  # its abort and its line: once per wait
                self._due[model] = self.clock() + self.wait_interval_s
                return None
            if not self._wait_for_endpoint(model, version, wait):
                return None

    def _deliver_locked(
        self, model: str, version: int, wait: _EndpointWait
    ) -> DeliveryOutcome | None:
        """`_deliver_one`'s work, the lock held; `wait.busy` when another rollout is active."""
        wait.busy = False
        cursor = self.store.load(model)
        entry = cursor.entries[version]
        if entry.step is Step.DONE:  # another process finished it while we waited
            self._forget(model, version)
            return None
        # With supersede, the newest open version above this one that supersedes it (0:
        # none), and whether one awaited from the registry may yet.
        newer, awaited = self._superseding(cursor, version) if self.supersede else (0, False)
        if newer and entry.step is Step.PENDING:
            reason = f"superseded by version {newer}"
            self._close(model, version, SUPERSEDED, reason)
            return DeliveryOutcome(model, version, SUPERSEDED, reason)
        if awaited and entry.step is Step.PENDING:
            return None  # kept open: read again with the newer one's next read (drain)
        if self._read_in(model, version) > 0:
            return None  # awaited itself, its next read not due (a newer one's was)
        try:
            model_version = self.registry.get(model, version)
        except ModelNotFound as exc:
            if (
                newer
                and entry.step is Step.STARTED
                and (closed := self._supersede_started(model, version, newer))
            ):
                # Started, gone from the registry (which then cannot settle it), a deliverable
                # newer version open: closed at once when nothing of it is live, as an awaited
                # pending one is, not after its ~2 min of reads.
                return closed
            if (ended := self._ended_unread(model, entry, exc)) is not None:
                return ended
            if self._missed(entry, model):
                return None  # still open: read again later, the lock let go meanwhile
            if self._kept_live(model, version, exc, unread=True):
                raise
            return self._fail(model, version, exc, MISSING, self._missing_retries(entry))
        except PERMANENT as exc:
            if (ended := self._ended_unread(model, entry, exc)) is not None:
                return ended
            if self._kept_live(model, version, exc, unread=True):
                raise
            return self._fail(model, version, exc)
        self._misses.pop((model, version), None)
        try:
            settled = self._settled(entry, model_version)
        except PERMANENT as exc:
            if self._kept_live(model, version, exc, model_version.sha256):
                raise
            return self._fail(model, version, exc)
        if settled is not None:
            outcome_name, reason = settled
            log.info("%s v%d: %s (%s)", model, version, outcome_name, reason)
            self._close(model, version, outcome_name, reason)
            return DeliveryOutcome(model, version, outcome_name, reason)
        if (
            newer
            and entry.step is Step.STARTED
            and (closed := self._supersede_started(model, version, newer, model_version.sha256))
        ):
            return closed
        wait.sha256 = model_version.sha256
        if self._endpoint_busy(model, version, wait):
            wait.busy = True
            return None
        started = self.store.update(
            model,
            version,
            lambda e: replace(e, step=Step.STARTED, attempts=e.attempts + 1, reason=""),
        )
        if entry.step is Step.STARTED:  # after a crash, or an error in this process
            # Said once: a retry after an error the worker already told of (every interval,
            # for as long as the metrics are unreadable, say) is no news.
            said = log.debug if (model, version) in self._failing else log.warning
            said("resuming the delivery of %s v%d (attempt %d)", model, version, started.attempts)
        self._delivering = self.entered = (model, version)
        try:
            outcome = self.delivery.deliver(
                model_version,
                before_rollout=(
                    partial(self._superseded_meanwhile, model, version) if self.supersede else None
                ),
            )
            self.entered = None
        except PERMANENT as exc:
            if self._kept_live(model, version, exc, model_version.sha256):
                raise
            return self._fail(model, version, exc)
        except Exception as exc:
            # Left open, to be retried: `trigger status` tells why it waits. An unexpected error
            # too (a full disk, a path that is not a folder): it is retried as a known one is.
            self._retried(model, version, f"waits, to be retried: {describe(exc)}")
            raise
        finally:
            self._delivering = None
        self._close(model, version, outcome.phase, outcome.reason)
        if outcome.phase != SUPERSEDED:  # _superseded_meanwhile said it
            log.info("delivered %s v%d: %s %s", model, version, outcome.phase, outcome.reason)
        return outcome

    def _kept_live(
        self,
        model: str,
        version: int,
        exc: Exception,
        sha256: str | None = None,
        *,
        unread: bool = False,
    ) -> bool:
        """Whether `exc`, an error that closes a version for good (PERMANENT, or not in the
        registry), leaves it open instead, to be retried as a resume: True when its rollout is
        live in the state store (killed mid-rollout, the version `started`). Closed, it left that
        rollout with no controller (blue serving its share, nothing to resume it) and every later
        version waiting for it for ever; retried, it goes on once the error is gone: a secret the
        resumed rollout's metrics read, a registry version damaged or removed meanwhile (`sha256`:
        the version's, once read; None, its number alone identifies it). A state store that
        cannot be read raises its own error here, which keeps the version open too.

        `unread`: the registry could not give the version, which the resume needs. Gone or
        damaged for good, it is never resumed here: the reason names the way out, the rollout
        resumed by hand from the state store, after which its outcome settles the version
        (`_ended_unread`)."""
        view = self.delivery.current()
        if view is None or not view.active or not view.of(model, version, sha256):
            return False
        why = (
            f"waits, to be retried as a resume (its rollout is live in the state store): "
            f"{describe(exc)}"
        )
        if unread:
            why += (
                "; if the registry lost it for good, `aml-rollout rollout run <spec>` resumes it "
                "from the state store (`rollout abort <spec>` first to roll it back), and the "
                "trigger then closes it with that rollout's outcome"
            )
        self._retried(model, version, why)
        return True

    def _ended_unread(self, model: str, entry: Entry, exc: Exception) -> DeliveryOutcome | None:
        """A `started` version the registry cannot give (`exc`: damaged, removed) whose
        rollout has ended in the state store (killed before its tags): closed with that
        rollout's outcome when it rolled back (the version serves nothing, whatever else
        changed since); None when no such rollout ended. Closed Failed (or `missing`) from the
        registry's error, a promoted version serving all traffic was reported a failure.

        A promotion is not settled so: it says the version serves, which only green can tell
        still holds (an operator may have sent green back since) and only the registry's bits
        tell are the ones promoted (a registry reset reuses numbers). The version is kept open
        and `exc` raised again (`watch --once` exits 2; the worker retries): the registry giving
        it again settles it, its tags written. Either way the tags wait for a reconcile that
        can read it (each `watch --once` pass, each start)."""
        version = entry.version
        view = self.delivery.current()
        if entry.step is not Step.STARTED or view is None or view.active:
            return None
        if not view.of(model, version, None):
            return None
        if view.phase == SUCCEEDED:
            self._retried(
                model,
                version,
                f"waits: its rollout was promoted ({view.reason}), but the registry cannot give "
                f"it to check that is what serves and to tag it: {describe(exc)}",
            )
            raise exc
        reason = f"{view.reason} (its tags not written: {describe(exc)})"
        log.warning("%s v%d: its rollout ended %s; %s", model, version, view.phase, reason)
        self._close(model, version, view.phase, reason)
        return DeliveryOutcome(model, version, view.phase, reason)

    def _retried(self, model: str, version: int, why: str) -> None:
        """Leave `version` open, to be retried after an error; `trigger status` tells `why`."""
        self._failing.add((model, version))
        self.store.update(model, version, lambda e: replace(e, reason=why))

    def _missing_retries(self, entry: Entry) -> Sequence[float]:
        """The pauses before asking again for a version the registry does not hold: only for
        one an event named. One the watcher listed is not lagging: it was removed since."""
        return self.missing_retries_s if entry.source.startswith("event:") else ()

    def _missed(self, entry: Entry, model: str) -> bool:
        """Put off the next read of a version the registry did not hold; False when its
        retries are spent (it is then closed `missing`)."""
        retries = self._missing_retries(entry)
        missed, _ = self._misses.get((model, entry.version), (0, 0.0))
        if missed >= len(retries):
            return False  # closed `missing` (which forgets it)
        delay = retries[missed]
        self._misses[(model, entry.version)] = (missed + 1, self.clock() + delay)
        log.info(
            "%s v%d is not in the registry (yet?); asking again in %g s (%d of %d)",
            model,
            entry.version,
            delay,
            missed + 1,
            len(retries),
        )
        # In the cursor too: `trigger status` runs in another process, which cannot see
        # `_misses`, and showed the version pending with no reason while it was awaited.
        why = (
            f"not in the registry (yet?) when read; asking again in {delay:g} s "
            f"({missed + 1} of {len(retries)})"
        )
        self.store.update(model, entry.version, lambda e: replace(e, reason=why))
        return True

    def _superseded_meanwhile(self, model: str, version: int) -> DeliveryOutcome | None:
        """With supersede, asked by the delivery once `version` is packaged, just before its
        rollout begins: a newer version accepted meanwhile (by this process, whose accept found
        no rollout to abort yet, or by another sharing the state folder) closes it as
        superseded, nothing of it deployed; None: roll it out."""
        newest, _ = self._superseding(self.store.load(model), version)
        if not newest:
            return None
        reason = f"superseded by version {newest} before its rollout started"
        log.info("%s v%d: %s", model, version, reason)
        return DeliveryOutcome(model, version, SUPERSEDED, reason)

    def _superseding(self, cursor: Cursor, version: int) -> tuple[int, bool]:
        """(The newest open version above `version` that supersedes it, 0 for none; whether a
        newer one awaited from the registry may yet.)

        A newer version supersedes only once read from the registry, sound, and (pending) not
        withdrawn: one the registry does not hold (an event ahead of it, or naming a version
        never registered) or a corrupted one closed a deliverable older version as superseded,
        then itself as `missing` or Failed — nothing delivered. One not held is asked for again
        as at its own turn (`_missed`); meanwhile it is awaited. One that cannot be delivered is
        remembered unfit, said once, and closed at its own turn, the older one delivered first.
        """
        model, awaited = cursor.model, False
        newer = [e for e in cursor.open_entries() if e.version > version]
        for entry in sorted(newer, key=lambda e: e.version, reverse=True):
            key = (model, entry.version)
            if key in self._unfit:
                continue
            if key in self._misses and self._read_in(*key) > 0:
                awaited = True
                continue
            try:
                found = self.registry.get(model, entry.version)
            except ModelNotFound as exc:
                if self._missed(entry, model):
                    awaited = True
                    continue
                why = str(exc)
            except PERMANENT as exc:
                why = str(exc)
            else:
                self._misses.pop(key, None)
                if not (entry.step is Step.PENDING and found.withdrawn):
                    return entry.version, awaited
                why = WITHDRAWN
            self._unfit.add(key)
            log.info("%s v%d supersedes nothing: %s", model, entry.version, why)
        return 0, awaited

    def _supersede_started(
        self, model: str, version: int, newest: int, sha256: str | None = None
    ) -> DeliveryOutcome | None:
        """Close `started` `version` as superseded by `newest` when nothing of it is live; else
        None, and it is delivered (resumed, settled or checked) as without supersede.

        The accept of `newest` only aborted a rollout already active: one retried after an error
        (metrics unreadable: nothing deployed), or killed while being packaged, had none yet.
        - Its rollout in the state store (the engine saves it before deploying anything): it
          was killed mid-rollout, `newest` accepted just as it began. An active one is
          aborted here, and the delivery resumes it to roll it back (RolledBack, "superseded by
          version N"); an ended one is settled with its outcome, which is what serves.
        - No production version: a first release, deployed to green with all traffic before its
          check, and tagged only after it (tag_first_release) — with no rollout in the state
          store. Killed in between, it serves all traffic untagged, which only the router could
          tell: not closed as superseded (nothing to fall back to); it is checked, then `newest`
          is rolled out against it.
        """
        view = self.delivery.current()
        if view is not None and view.of(model, version, sha256):
            if view.active and (model, version, newest) not in self._kept:
                log.warning("superseding the rollout of %s v%d by v%d", model, version, newest)
                self.delivery.abort(f"superseded by version {newest}")
                self._kept.add((model, version, newest))
            return None
        if not self.registry.find_by_tag(model, STAGE_TAG, Stage.PRODUCTION):
            if (model, version, newest) not in self._kept:
                log.info(
                    "%s v%d is not superseded by v%d: the model's first release, it may already "
                    "serve all traffic (nothing to fall back to); it is checked, then v%d is "
                    "rolled out against it",
                    model,
                    version,
                    newest,
                    newest,
                )
                self._kept.add((model, version, newest))
            return None
        reason = f"superseded by version {newest} before its rollout started"
        log.info("%s v%d: %s", model, version, reason)
        self._close(model, version, SUPERSEDED, reason)
        return DeliveryOutcome(model, version, SUPERSEDED, reason)

    def _settled(self, entry: Entry, version: ModelVersion) -> tuple[str, str] | None:
        """(outcome, reason) when the registry already settles this version, else None.

        - Its stage records a delivery. For a version we had started, that is our rollout's
          outcome (the tags are written after it ended; a restart's reconcile may have just
          written them), so no second rollout is run — nor a second check of a first release,
          whose `first_check` tag gives the outcome; `stage=rolled-back` is Failed or RolledBack
          as the state store says (`_rolled_back`). For a pending one, someone else delivered it
          (e.g. Event Grid redelivers an old event after the state folder was lost): skipped.
        - A newer version is in production (a crash left it open while another trigger moved
          on, or events arrived out of order): rolling it out would downgrade production.
        - A pending version withdrawn (archived in the Azure ML studio) before its delivery: a
          person's call, which only `get` tells (listings leave it out). One withdrawn once its
          delivery started is delivered (resumed) all the same: its rollout may be live, or a
          first release serve all traffic; `rollout abort` stops a rollout. A withdrawn
          production version records a delivery, above: it still serves.
        - A pending version the pipeline job that registered it rolls out itself (tag
          `rollout_by=pipeline-job`, the training pipeline): a second rollout of it would run
          beside the job's, two controllers on one endpoint.
        """
        stage = version.stage
        if stage in DELIVERED and entry.step is Step.STARTED:
            if stage == Stage.ROLLED_BACK:
                return self._rolled_back(version)
            check = version.tags.get(FIRST_CHECK_TAG) if stage == Stage.PRODUCTION else None
            if check is not None:  # a first release, tagged after its check
                recorded = f"registry records stage={stage}, {FIRST_CHECK_TAG}={check}"
                if why := version.tags.get(FIRST_CHECK_REASON_TAG, ""):
                    recorded += f": {why}"
                return FIRST_CHECK_OUTCOMES.get(check, FAILED), recorded
            return SUCCEEDED, f"registry records stage={stage}"
        if stage in DELIVERED:
            return SKIPPED, f"already delivered (stage={stage})"
        if entry.step is Step.PENDING and version.withdrawn:
            return SKIPPED, WITHDRAWN
        if entry.step is Step.PENDING and version.tags.get(ROLLOUT_BY_TAG) == ROLLOUT_BY_JOB:
            run = version.tags.get("source_run", "?")
            return SKIPPED, (
                f"rolled out by the pipeline job that registered it ({run}; "
                f"tag {ROLLOUT_BY_TAG}={ROLLOUT_BY_JOB})"
            )
        production = self.registry.find_by_tag(version.name, STAGE_TAG, Stage.PRODUCTION)
        newest = max((v.version for v in production), default=0)
        if newest > version.version:
            return SKIPPED, f"older than the production version {newest}"
        return None

    def _rolled_back(self, version: ModelVersion) -> tuple[str, str]:
        """(outcome, reason) of a started version the registry records `stage=rolled-back`.

        The tag is written for a rollout that ended Failed (blue could not be deployed) as for
        one rolled back (plan_tags): the delivery that wrote it said Failed (`watch --once` exit
        5), and settled from the registry after a kill short of `done` it became RolledBack
        (exit 3). So the ended rollout in the state store says which, when it is this version's
        and the one these tags record (its reason is their `rollback_reason`: not a pipeline
        job's status, nor a rollout tagged again by hand since); else the registry's word."""
        reason = version.tags.get(REASON_TAG, "")
        view = self.delivery.current()
        if (
            view is not None
            and view.phase == FAILED
            and view.of(version.name, version.version, version.sha256)
            and reason == short_reason(view.reason, view.phase)
        ):
            return FAILED, view.reason
        return ROLLED_BACK, reason

    def _fail(
        self,
        model: str,
        version: int,
        exc: Exception,
        outcome: str = FAILED,
        waited: Sequence[float] = (),
    ) -> DeliveryOutcome:
        reason = str(exc)
        if waited:
            reason += f" after {len(waited) + 1} reads over {sum(waited):g} s"
        if outcome == MISSING:
            reason += (
                " (accepted again once registered: the watcher lists it, or an event names it)"
            )
        log.error("cannot deliver %s v%d: %s", model, version, reason)
        self._close(model, version, outcome, reason)
        return DeliveryOutcome(model, version, outcome, reason)

    def _close(self, model: str, version: int, outcome: str, reason: str) -> Entry:
        self._forget(model, version)  # superseded while awaited, failed for good after errors
        return self.store.update(
            model,
            version,
            lambda e: replace(e, step=Step.DONE, outcome=outcome, reason=reason),
        )

    def _forget(self, model: str, version: int) -> None:
        """Drop what this process remembers of a closed version: a long-running `serve` would
        otherwise keep an entry per version that ever missed or failed."""
        self._misses.pop((model, version), None)
        self._failing.discard((model, version))
        self._unfit.discard((model, version))
        self._waits.pop((model, version), None)
        self._kept = {k for k in self._kept if k[:2] != (model, version)}

    def _endpoint_busy(self, model: str, version: int, wait: _EndpointWait) -> bool:
        """True while another rollout is active on the endpoint (with supersede, it is asked
        to abort, once). A rollout of this very version is ours, left by a crash: the delivery
        resumes it."""
        view = self.delivery.current()
        if view is None or not view.active or view.of(model, version, wait.sha256):
            return False
        if self.supersede and not wait.aborted:
            log.warning(
                "aborting the active rollout of %s for %s v%d",
                view.named_against(model, version),
                model,
                version,
            )
            self.delivery.abort(f"superseded by {model} version {version}")
            wait.aborted = True
        elif view != wait.reported:  # once per state, not every interval
            log.info(
                "%s v%d waits: the rollout of %s is %s%s",
                model,
                version,
                view.named_against(model, version),
                view.phase,
                f" ({view.reason})" if view.reason else "",
            )
            wait.reported = view
        return True

    def _wait_for_endpoint(self, model: str, version: int, wait: _EndpointWait) -> bool:
        """Wait, without the deliver lock, until the endpoint looks free (one look at the
        rollout state every interval); False when stopped meanwhile."""
        while not self.stop.wait(self.wait_interval_s):
            if not self._endpoint_busy(model, version, wait):
                return True
        return False


@dataclass
class _EndpointWait:
    """Where a delivery waiting for another rollout is: across the times it takes the lock."""

    busy: bool = False
    aborted: bool = False
    reported: RolloutView | None = None
    #: The sha256 of the version waiting, once read from the registry: a rollout of its number
    #: with other bits (the registry reset since) is another rollout, not ours to resume.
    sha256: str | None = None


#: Seconds before an error that keeps repeating is said again (see Reminder).
REMIND_S = 600.0


def unexpected(exc: BaseException) -> bool:
    """True for an error no part of aml-rollout raises on purpose (a bug, a full disk)."""
    return not isinstance(exc, PipelineError | RolloutError)


def describe(exc: BaseException) -> str:
    """The one line an error is told by: its message, after its type for an unexpected one
    (an OSError's message does not say it is a NotADirectoryError; a KeyError's is the key)."""
    return f"{type(exc).__name__}: {exc}" if unexpected(exc) else str(exc)


class Reminder:
    """Says a repeating error once, and again only every REMIND_S while it repeats (a registry
    or metrics down for a night: a few dozen lines, not one per retry)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        #: What failed → (the error, when it was last said).
        self._said: dict[str, tuple[str, float]] = {}

    def due(self, what: str, error: str) -> tuple[bool, bool]:
        """(say, again): whether to say `error` of `what` now, and whether it is the error
        said last time (still failing)."""
        now, said = self.clock(), self._said.get(what)
        again = said is not None and said[0] == error
        if said is not None and again and now - said[1] < REMIND_S:
            return False, True
        self._said[what] = (error, now)
        return True, again

    def ended(self, what: str) -> bool:
        """Forget `what`'s error (it works again); True when one was said."""
        return self._said.pop(what, None) is not None

    def say(
        self,
        logger: logging.Logger,
        what: str,
        exc: Exception,
        then: str,
        verbs: tuple[str, str] = ("failed", "still fails"),
    ) -> None:
        """Log that `what` failed with `exc` (`verbs`: the first time, and while it repeats),
        `then` telling what comes next: once, and again only every REMIND_S while the same error
        repeats. An unexpected error is an ERROR with its traceback when first said, so a bug
        can be found, but only then: retried every few seconds, a traceback each time was
        hundreds of thousands of lines a day (on a full disk, filling it further)."""
        error = describe(exc)
        # An unexpected error is the same one again by its kind: a full disk names another
        # temporary folder each time, and was a new error (its traceback) at every retry.
        kind = f"{type(exc).__name__} {getattr(exc, 'errno', '')}" if unexpected(exc) else error
        say, again = self.due(what, kind)
        if not say:
            logger.debug("%s %s again: %s", what, verbs[0], error)
            return
        logger.log(
            logging.ERROR if unexpected(exc) else logging.WARNING,
            "%s %s: %s; %s",
            what,
            verbs[again],
            error,
            then,
            exc_info=exc if unexpected(exc) and not again else None,
        )


class DeliveryWorker:
    """The single thread that drains cursors: the webhook's queue → one delivery at a time.

    Models with a `started` entry are drained first on every pass (see Dispatcher.resume_order).
    An interrupted pass is retried every `wait_interval_s`; its error is logged once, and again
    only every REMIND_S while it repeats (metrics down for a night: a few dozen lines, not
    thousands), an unexpected one with its traceback the first time (Reminder.say).
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        models: Callable[[], list[str]],
        *,
        reconcile: bool = False,
    ) -> None:
        self.dispatcher = dispatcher
        self.models = models
        #: Reconcile the registry with the rollout state before the first delivery (see
        #: `_reconciled`): what a long-running trigger does at start.
        self.reconcile = reconcile
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delivery-worker", daemon=True)
        #: With supersede: the checks accepts ask for (`Dispatcher.check_supersede`) are made
        #: on a thread of their own, as the delivery thread is in the rollout they may abort.
        self._check = threading.Event()
        self._checker = threading.Thread(
            target=self._run_checks, name="supersede-check", daemon=True
        )
        self.failures = 0  # deliveries interrupted by an error (each is retried)
        self.last_error: BaseException | None = None
        self.clock: Callable[[], float] = time.monotonic
        self._reminder = Reminder(lambda: self.clock())

    def start(self) -> None:
        """Start the thread; it first drains what a previous process left open. With
        supersede, start the thread of the supersede checks too."""
        self._wake.set()
        self._thread.start()
        if self.dispatcher.supersede:
            self.dispatcher.check_requested = self._check.set
            self._check.set()  # any asked for before
            self._checker.start()

    def wake(self) -> None:
        """Tell the worker new versions were accepted."""
        self._wake.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the threads to end (after `dispatcher.stop` is set); False when the
        delivery thread has not (within `timeout`): it is in a delivery."""
        self._wake.set()
        self._check.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in (self._thread, self._checker):
            if thread.is_alive():
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self._thread.is_alive()

    def _run_checks(self) -> None:
        """Make the supersede checks as accepts ask for them; one that fails (the rollout state
        or the registry unreadable) is made again every `wait_interval_s` until it is made, said
        once while it fails: lost, the newer version waited for the whole rollout."""
        stop, retry = self.dispatcher.stop, self.dispatcher.wait_interval_s
        while not stop.is_set():
            self._check.wait()
            self._check.clear()
            while not stop.is_set() and not self.dispatcher.check_supersede(self._check_failed):
                stop.wait(retry)

    def _check_failed(self, model: str, version: int, exc: Exception) -> None:
        self._said(f"the supersede check of {model} v{version}", exc)

    def _run(self) -> None:
        stop = self.dispatcher.stop
        if self.reconcile and not self._reconciled():
            return
        while not stop.is_set():
            # Woken by an accept, or when a version awaited from the registry is due.
            self._wake.wait(self.dispatcher.next_read_in())
            self._wake.clear()
            try:
                # Reads every cursor: one that cannot be read must not end the thread (the
                # webhook would go on accepting versions nobody delivers); mended, it is read.
                models = self.dispatcher.resume_order(self.models())
            except Exception as exc:
                self._failed("deliveries", exc)
                continue
            self._reminder.ended("deliveries")
            for model in models:
                if stop.is_set():
                    break
                try:
                    self.dispatcher.drain(model, wait=False)
                except Exception as exc:
                    # The entry stays `started`/`pending`: retried (as a resume) on the next wake.
                    self._failed(f"delivery of {model}", exc)
                else:
                    self._reminder.ended(f"delivery of {model}")

    def _reconciled(self) -> bool:
        """Reconcile the registry with the rollout state (the tags of a rollout that ended
        before they were written), retried every `wait_interval_s` while it fails — said once,
        then quietly, as a failing poll — and never skipped: a delivery before it could roll out
        a version over tags that do not say what serves. False when stopped meanwhile.

        The reconcile reads the registry whenever the last rollout has ended: an error that
        escaped ended `watch` and `serve` at start (exit 2), so one restarted during an Azure ML
        outage crash-looped instead of waiting for it.
        """
        stop, retry = self.dispatcher.stop, self.dispatcher.wait_interval_s
        what = "reconciling the registry with the rollout state"
        while not stop.is_set():
            try:
                self.dispatcher.delivery.reconcile()
            except Exception as exc:
                self._reminder.say(
                    log,
                    what,
                    exc,
                    f"trying again every {retry:g} s, quietly (said again every "
                    f"{REMIND_S / 60:g} min), before any delivery",
                )
            else:
                if self._reminder.ended(what):
                    log.info("%s works again", what)
                return True
            stop.wait(retry)
        return False

    def _failed(self, what: str, exc: Exception) -> None:
        """Log an interrupted pass (one line for a known error, said once while it repeats),
        wait, and wake up to retry."""
        self.failures += 1
        self.last_error = exc
        self._said(what, exc)
        self.dispatcher.stop.wait(self.dispatcher.wait_interval_s)
        self._wake.set()

    def _said(self, what: str, exc: Exception) -> None:
        """Log that `what` stopped, to be retried: said once while the same error repeats, an
        unexpected one with its traceback the first time (Reminder.say)."""
        self._reminder.say(
            log,
            what,
            exc,
            f"retrying every {self.dispatcher.wait_interval_s:g} s, quietly (said again every "
            f"{REMIND_S / 60:g} min while it lasts)",
            ("stopped", "still stopped"),
        )
