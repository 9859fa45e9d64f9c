"""Registry watcher: poll a model's versions and hand each new matching one to the dispatcher.

A version is *new* when it is newer than the version in production, carries every required tag
(e.g. `stage=candidate`), has not been delivered already (its `stage` is not production,
archived or rolled-back — the registry is the first record of what was delivered) and is not in
the cursor (the durable record that covers the window before tags are written). A watcher started
on an existing registry therefore picks up registered-but-undelivered candidates and leaves the
history alone. A damaged version the listings leave out is asked for (`damaged=`) and judged by
its tags alike: accepted, it is closed Failed, as an event for it is. Versions are allocated in
increasing order, so the full listing (which re-hashes every version of a local registry) runs
only when `latest` shows a higher version; an old version re-tagged as a candidate later is
noticed at the next registration or restart.

One watcher per model and state folder: `run` holds a non-blocking flock for its lifetime, so a
second watcher exits at once with a message naming the first one's pid. At start it reconciles the
registry tags from the rollout state store (repairing a crash between traffic and tags; retried
while the registry cannot be reached, before any delivery) and then resumes whatever the cursor
left open.

Polling and delivering are separate threads: the main thread keeps polling while a rollout runs,
so with `supersede` a newer version can abort the running rollout; without it, newer versions
wait their turn in the cursor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from aml_pipelines.delivery import DeliveryOutcome
from aml_pipelines.errors import RegistryError
from aml_pipelines.registry.base import (
    STAGE_TAG,
    DamagedVersion,
    ModelRegistry,
    ModelVersion,
    Stage,
)
from aml_pipelines.trigger.dispatch import DELIVERED, REMIND_S, DeliveryWorker, Dispatcher, Reminder
from aml_pipelines.trigger.store import MISSING

log = logging.getLogger(__name__)

#: Seconds a stopped watcher (SIGTERM) waits for its delivery thread before it returns: a
#: rollout in progress does not look at `stop`, and waiting it out (it was a whole --interval,
#: up to a day) kept it shifting traffic past Kubernetes's 30 s grace, to a SIGKILL. It is cut
#: as by a crash and resumes on the next start, as with `serve`.
STOP_WAIT_S = 5.0


def matches(version: ModelVersion | DamagedVersion, required: Mapping[str, str]) -> bool:
    """True when `version` carries every required tag with the required value."""
    return all(version.tags.get(k) == v for k, v in required.items())


def new_versions(
    versions: Sequence[ModelVersion | DamagedVersion],
    required: Mapping[str, str],
    known: set[int],
    production: int = 0,
) -> list[ModelVersion | DamagedVersion]:
    """The versions a watcher should accept, oldest first (pure; see the module docstring).
    `production`: the production version as find_by_tag tells it (the listing may leave it out:
    archived in the Azure ML studio, it still serves). A damaged version is one too: accepted,
    it is closed Failed, as an event for it is."""
    production = max(
        [production, *(v.version for v in versions if v.stage == Stage.PRODUCTION)], default=0
    )
    return sorted(
        (
            v
            for v in versions
            if v.version > production
            and v.version not in known
            and v.stage not in DELIVERED
            and matches(v, required)
        ),
        key=lambda v: v.version,
    )


class Watcher:
    """Polls one model in a registry and feeds new matching versions to a dispatcher."""

    def __init__(
        self,
        registry: ModelRegistry,
        model: str,
        dispatcher: Dispatcher,
        *,
        required_tags: Mapping[str, str] | None = None,
        interval_s: float = 10.0,
    ) -> None:
        self.registry = registry
        self.model = model
        self.dispatcher = dispatcher
        self.required_tags = dict(required_tags or {})
        self.interval_s = interval_s
        self._listed_up_to: int | None = None
        self.clock: Callable[[], float] = time.monotonic
        self._reminder = Reminder(lambda: self.clock())
        #: What a failed poll is said as, and the Reminder's key for it.
        self._polling = f"polling the registry for {model}"

    @property
    def stop(self) -> threading.Event:
        """Set it (e.g. from a signal handler) to end `run` after the current poll."""
        return self.dispatcher.stop

    def poll(self) -> list[int]:
        """Accept every new matching version; returns the versions accepted now.

        Listing re-reads (and, for the local registry, re-hashes) every version, so it runs only
        when `latest` shows a version above the highest one listed before: a quiet registry costs
        one version read per poll, not one per registered version. Damaged versions count (the
        listings leave them out): a damaged candidate is accepted, to be closed Failed.
        """
        damaged: list[DamagedVersion] = []
        latest = self.registry.latest(self.model, damaged=damaged)
        top = max([v.version for v in damaged] + ([latest.version] if latest else []), default=0)
        if not top and self._listed_up_to is not None and not self.registry.withdrawn(self.model):
            # Versions are never removed: none where some were is a registry folder gone (an
            # unmounted share), said as a failed poll is, not polled in silence.
            raise RegistryError(
                f"{self.model}: {self.registry!r} holds no version of it any more (it held up to "
                f"v{self._listed_up_to}): a folder unmounted, moved or removed, or a registry "
                "answering an empty list?"
            )
        if not top or (self._listed_up_to is not None and top <= self._listed_up_to):
            return []
        damaged = []
        versions = self.registry.list_versions(self.model, damaged=damaged)
        entries = self.dispatcher.store.load(self.model).entries.values()
        known = {e.version for e in entries if e.outcome != MISSING}  # MISSING: listed now
        production = 0
        if not any(v.stage == Stage.PRODUCTION for v in versions):
            # Asked only then (a local registry's find_by_tag re-hashes every version again):
            # the listing leaves out a production version archived in the Azure ML studio.
            tagged = self.registry.find_by_tag(self.model, STAGE_TAG, Stage.PRODUCTION)
            production = max((v.version for v in tagged), default=0)
        listed: list[ModelVersion | DamagedVersion] = [*versions, *damaged]
        fresh = new_versions(listed, self.required_tags, known, production)
        accepted = [
            v.version for v in fresh if self.dispatcher.accept(self.model, v.version, "watch")
        ]
        # Only once all are accepted: a poll that fails on the way lists again next time.
        self._listed_up_to = max((v.version for v in listed), default=top)
        return accepted

    def run(
        self,
        *,
        once: bool = False,
        on_outcome: Callable[[DeliveryOutcome], None] | None = None,
    ) -> list[DeliveryOutcome]:
        """Lock, reconcile, then poll and deliver until stopped (or one round with `once`).

        Returns the outcomes of a `once` round (a long-running watcher logs them instead);
        `on_outcome` hears each as it closes, before an error on a later version ends the round.
        """
        store = self.dispatcher.store
        lock = store.lock(f"watch-{self.model}", f"a watcher of model {self.model!r}")
        with lock.held(blocking=False):
            if once:
                self.dispatcher.delivery.reconcile()  # an error is the pass's: exit 2
                self.poll()
                return self.dispatcher.drain(self.model, on_outcome)
            # The worker reconciles before its first delivery, retrying while the registry
            # cannot be reached: a restart during an outage waits for it, polling meanwhile.
            worker = DeliveryWorker(self.dispatcher, lambda: [self.model], reconcile=True)
            worker.start()
            log.info(
                "watching %s every %.1f s (tags %s)",
                self.model,
                self.interval_s,
                self.required_tags,
            )
            while not self.stop.is_set():
                try:
                    if self.poll():
                        worker.wake()
                except Exception as exc:
                    # A registry hiccup must not kill a long-running watcher: log, retry next poll.
                    self._poll_failed(exc)
                else:
                    if self._reminder.ended(self._polling):
                        log.info("%s works again", self._polling)
                self.stop.wait(self.interval_s)
            if not worker.join(timeout=STOP_WAIT_S):
                log.info(
                    "the delivery in progress is cut (its rollout is kept): it resumes on the "
                    "next start"
                )
            return []

    def _poll_failed(self, exc: Exception) -> None:
        """Say a failed poll once, and again only every REMIND_S while the same error repeats,
        as the worker does (Reminder.say: an unexpected error with its traceback the first
        time)."""
        self._reminder.say(
            log,
            self._polling,
            exc,
            f"polling again every {self.interval_s:g} s, quietly (said again every "
            f"{REMIND_S / 60:g} min)",
        )
