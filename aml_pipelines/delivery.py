"""The one delivery path: a registered model version → package → rollout → registry tags.

Both triggers (the registry watcher and the Event Grid webhook) hand versions to a `Delivery`;
nothing else starts a rollout on their behalf. A delivery:

1. packages the version (idempotent: the package folder is keyed by model and version and written
   with temp + rename, so doing it twice after a crash costs time, not correctness);
2. rolls it out through the rollout engine, whose state store is resumable: called again for the
   same candidate after a crash, it continues the rollout where the store says it is instead of
   starting over, and a finished rollout is not run again while green serves its outcome
   (`starts_anew`: otherwise that outcome is history, and the version is rolled out anew);
3. makes the registry follow traffic: promoted → the candidate is `stage=production` and the
   previous production version `stage=archived`; rolled back (or failed) → the candidate is
   `stage=rolled-back` with `rollback_reason` from the ledger.

A model's first release has nothing to be compared with, so no rollout can judge it: it is
deployed to green with all traffic and judged on the spec's absolute limits alone (the engine's
`bootstrap_checked`). It stays deployed whatever the verdict — there is nothing to fall back
to — so it is tagged `stage=production`, with `first_check` saying how the check went (and
`first_check_reason` unless Successful); a failed or unreadable check makes the delivery's
outcome Failed, an undecided one Inconclusive. A spec with no absolute limit deploys it unjudged
(`first_check=unjudged`). The outcome says what green serves as the router reads it once the
tags are written (`served_traffic`), not what was asked: a hand-made split or an endpoint
changed during the check shows. That read is a report: weights that cannot be read fail
nothing that was deployed and tagged; the outcome says they could not be read.

Step 3 can be cut short by a crash after traffic moved. `reconcile` repairs that: it reads the last
rollout's status from the state store and writes whatever tags are missing — while green still
serves that rollout's outcome, and only for a version of the registry with the same bits. Tag
planning is a pure function of (versions, candidate, phase), so reconcile is idempotent — a second
call plans nothing.

The registry is the truth about what serves: `serving` maps versions to the colour they serve from
the same status (green = production; blue = the candidate while a rollout runs).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from aml_pipelines.errors import (
    ConfigError,
    IntegrityError,
    ModelNotFound,
    RegistryError,
    TriggerError,
)
from aml_pipelines.registry.base import STAGE_TAG, ModelRegistry, ModelVersion, Stage

if TYPE_CHECKING:
    from rollout.core.types import Release

log = logging.getLogger(__name__)

#: Tag carrying why a candidate was rolled back (from the rollout's ledger / status).
REASON_TAG = "rollback_reason"
#: Azure ML tag values are free text but long ones clutter every listing.
MAX_REASON_CHARS = 256
#: Tag saying how the check of a model's first release went: a verdict (Successful, Failed,
#: Inconclusive, Error) or UNJUDGED; FIRST_CHECK_REASON_TAG says why, unless Successful.
FIRST_CHECK_TAG = "first_check"
FIRST_CHECK_REASON_TAG = "first_check_reason"
#: `first_check` of a first release the spec gives no absolute limit to be judged on.
UNJUDGED = "unjudged"
SUCCESSFUL = "Successful"  # rollout.core.types.Verdict.SUCCESSFUL, without importing the engine

SUCCEEDED = "Succeeded"
ROLLED_BACK = "RolledBack"
FAILED = "Failed"
TERMINAL = frozenset({SUCCEEDED, ROLLED_BACK, FAILED})
#: The outcome of a first release whose check stayed undecided: neither a pass nor a failure.
INCONCLUSIVE = "Inconclusive"
#: A first release's delivery outcome by how its check went. A breached limit or metrics that
#: could not be read is a failed delivery, though the release stays deployed.
FIRST_CHECK_OUTCOMES = {
    SUCCESSFUL: SUCCEEDED,
    "Failed": FAILED,
    "Error": FAILED,
    "Inconclusive": INCONCLUSIVE,
    UNJUDGED: SUCCEEDED,
}


@dataclass(frozen=True)
class RolloutView:
    """What the rollout state store says about the last rollout on the endpoint.

    `phase` is a `rollout.core.types.Phase` value; `weight` the blue weight in percent.
    `candidate` is 0 when the stored candidate's version is not a number (a hand-made
    `rollout start` of a build no registry holds); `ref` names it as stored ("model:version"),
    `sha256` its bits when the store records them.
    """

    model: str
    candidate: int
    phase: str
    reason: str = ""
    stable: int | None = None
    weight: int = 0
    ref: str = ""
    sha256: str | None = None

    @property
    def active(self) -> bool:
        """True while the rollout has not reached a terminal phase."""
        return self.phase not in TERMINAL

    @property
    def label(self) -> str:
        """The candidate in words: as stored, never a made-up "version 0"."""
        return self.ref or f"{self.model}:{self.candidate}"

    def of(self, model: str, version: int, sha256: str | None) -> bool:
        """Whether the rollout's candidate is `model` v`version`: its model and number, and not
        other bits where both name a sha256 (a registry reset or re-created reuses numbers)."""
        return (self.model, self.candidate) == (model, version) and not _other_bits(
            self.sha256, sha256
        )

    def named_against(self, model: str, version: int) -> str:
        """The candidate in words next to `model` v`version`, saying "other bits" where it has
        that number (and is not that version: `of`)."""
        if (self.model, self.candidate) != (model, version):
            return self.label
        return f"{self.label} (other bits, sha256 {(self.sha256 or '')[:12]})"


@dataclass(frozen=True)
class TagChange:
    """Tags to merge into one version (planned, then applied in order)."""

    version: int
    tags: Mapping[str, str]


@dataclass(frozen=True)
class DeliveryOutcome:
    """How a delivery ended: the rollout's terminal phase and why.

    For a model's first release, `phase` follows its check (FIRST_CHECK_OUTCOMES), `first_check`
    is the check's verdict or UNJUDGED, and `reason` says both in words; empty for a rollout.
    """

    model: str
    version: int
    phase: str
    reason: str = ""
    ledger_path: Path | None = None
    tag_changes: tuple[TagChange, ...] = field(default=())
    first_check: str = ""


class Delivery(Protocol):
    """Package + roll out one version at a time on one endpoint, and keep registry tags true."""

    def current(self) -> RolloutView | None:
        """The last rollout on the endpoint from the state store (active or finished), or None."""

    def deliver(
        self,
        version: ModelVersion,
        *,
        before_rollout: Callable[[], DeliveryOutcome | None] | None = None,
    ) -> DeliveryOutcome:
        """Deliver `version` and block until its rollout ends; resumes a rollout of the same
        candidate found in the state store instead of starting it again. `before_rollout`, when
        given, is asked once the version is packaged, just before a new rollout of it begins
        (not on a resume, nor for a first release): an outcome it returns ends the delivery
        there, with nothing of the version deployed."""

    def abort(self, reason: str) -> None:
        """Ask the active rollout to roll back now; it ends RolledBack with `reason`."""

    def reconcile(self) -> list[TagChange]:
        """Write the stage tags the last finished rollout implies (idempotent); returns changes."""


# ------------------------------------------------------------------------------- pure planning


def plan_tags(
    versions: Sequence[ModelVersion], candidate: int, phase: str, reason: str = ""
) -> list[TagChange]:
    """The tag changes that make the registry agree with a rollout of `candidate` in `phase`.

    Only differences are planned, so applying the plan twice is harmless and a repaired registry
    plans nothing. The candidate's change comes first: a crash half-way leaves two `production`
    versions at worst (repaired by the next plan), never none.
    """
    by_version = {v.version: v for v in versions}
    if candidate not in by_version or phase not in TERMINAL:
        return []
    changes: list[TagChange] = []

    def want(version: ModelVersion, tags: Mapping[str, str]) -> None:
        if any(version.tags.get(k) != v for k, v in tags.items()):
            changes.append(TagChange(version.version, dict(tags)))

    if phase == SUCCEEDED:
        want(by_version[candidate], {STAGE_TAG: Stage.PRODUCTION})
        for other in versions:
            if other.version != candidate and other.stage == Stage.PRODUCTION:
                want(other, {STAGE_TAG: Stage.ARCHIVED})
    else:
        short = short_reason(reason, phase)
        want(by_version[candidate], {STAGE_TAG: Stage.ROLLED_BACK, REASON_TAG: short})
    return changes


def short_reason(reason: str, fallback: str) -> str:
    """A reason as a tag value: `fallback` when empty, cut to MAX_REASON_CHARS."""
    return (reason or fallback)[:MAX_REASON_CHARS]


def plan_first_release_tags(
    versions: Sequence[ModelVersion], candidate: int, check: str, reason: str = ""
) -> list[TagChange]:
    """The tag changes for a model's first release `candidate` whose check ended `check` (a
    verdict value or UNJUDGED) because of `reason`.

    It stays deployed whatever the verdict (there is nothing to fall back to), so it is
    `stage=production` in every case, and `first_check` says how the check went, with a short
    `first_check_reason` unless Successful (a Successful check removes an older one: an empty
    value removes a tag). Stage and check go in one write, so no crash leaves a production
    version whose check is not told. Like `plan_tags`, only differences are planned.
    """
    by_version = {v.version: v for v in versions}
    if candidate not in by_version:
        return []
    wanted = {
        STAGE_TAG: Stage.PRODUCTION,
        FIRST_CHECK_TAG: check,
        FIRST_CHECK_REASON_TAG: "" if check == SUCCESSFUL else short_reason(reason, check),
    }
    tags = by_version[candidate].tags
    changes = (
        [TagChange(candidate, wanted)]
        if any(tags.get(k, "") != v for k, v in wanted.items())
        else []
    )
    # Any other production version is archived after, as on a promotion.
    promoted = plan_tags(versions, candidate, SUCCEEDED)
    return changes + [c for c in promoted if c.version != candidate]


def first_release_reason(
    model: str, version: int, check: str, reason: str, traffic: Mapping[str, int] | None
) -> str:
    """A first release's outcome in words: what it serves (`traffic`, as `served_traffic` read
    it; None: unread), how its check went, what next."""
    ref = f"{model}:{version}"
    if traffic is None:
        head = (
            f"first release of {model}: deployed to green (its share of traffic is not known: "
            "the router's weights could not be read after the deploy)"
        )
        still = "It stays deployed"
    elif traffic["green"] == 100:
        head = f"first release of {model}: deployed to green with all traffic"
        still = "It still serves all traffic"
    else:
        share = f"{traffic['green']} % of traffic (blue {traffic['blue']} %)"
        head = f"first release of {model}: deployed to green, which serves {share}"
        still = f"Green still serves {share}"
    again = f"`aml-rollout rollout bootstrap SPEC --release {ref} --check` judges it again"
    said = {
        UNJUDGED: f"{head}, unjudged: {reason}",
        SUCCESSFUL: f"{head}; its check on the absolute limits was Successful: {reason}",
        "Failed": (
            f"{head}; its check on the absolute limits Failed: {reason}. {still} (there is "
            "nothing to fall back to): roll a fixed version out against it"
        ),
        "Inconclusive": (
            f"{head}; its check on the absolute limits was Inconclusive: {reason}. A human's "
            f"call: look at its traffic; {again}"
        ),
        "Error": (
            f"{head}; its check on the absolute limits ended in Error: {reason}. {still}, "
            f"unjudged; once the metrics can be read, {again}"
        ),
    }
    return said.get(check, f"{head}; its check on the absolute limits: {check}: {reason}")


def served_traffic(router: Any, ref: str) -> dict[str, int] | None:
    """What the router serves now, `{"green": w, "blue": w}` in percent, for the outcome of
    the first release `ref`; None, logged, when the weights cannot be read.

    A report, read after the release was deployed and tagged: ANY exception (not only a
    RouterError: a client's own bug, a closed connection) is caught, for the release must not
    fail for want of a number it does not need.
    """
    try:
        weights = router.get_weights()
        return {"green": int(weights.green), "blue": int(weights.blue)}
    except Exception as exc:  # report-only: see the docstring
        log.warning(
            "%s: the router's weights could not be read after the deploy (%s); the release "
            "stays deployed and tagged, the traffic it serves is reported as unknown",
            ref,
            exc,
        )
        return None


def plan_manual_tags(
    versions: Sequence[ModelVersion], version: int, tags: Mapping[str, str], *, replace: bool
) -> list[TagChange]:
    """The changes for a person tagging `version` by hand (`aml-rollout registry tag`).

    Tagging a version `stage=production` while another carries it would leave two: every reader
    of "the production version" (the register gate, the watcher's and dispatcher's no-downgrade
    check, the delivery's `stable`, `registry list`) takes the highest, so a hand-tagged older
    version would be silently ignored, and a hand-tagged newer one would become the gate's
    baseline while traffic still goes to the other. So that is refused (ConfigError naming the
    holder), unless `replace`: then the holder is archived after the new tag is written — the
    order plan_tags uses, so a crash in between leaves two at worst, never none.
    """
    changes = [TagChange(version, dict(tags))]
    if tags.get(STAGE_TAG) != Stage.PRODUCTION:
        return changes
    holders = [v for v in versions if v.stage == Stage.PRODUCTION and v.version != version]
    if holders and not replace:
        labels = ", ".join(f"{v.name}:{v.version}" for v in holders)
        raise ConfigError(
            f"{labels} {'is' if len(holders) == 1 else 'are'} already tagged stage=production; "
            f"a model has one production version (the gate, the triggers and `registry list` "
            f"read it). Add --replace to tag {holders[0].name}:{version} production and "
            f"archive {labels} (this records what serves; it moves no traffic)"
        )
    return changes + [TagChange(v.version, {STAGE_TAG: Stage.ARCHIVED}) for v in holders]


def apply_tags(registry: ModelRegistry, model: str, changes: Sequence[TagChange]) -> None:
    """Write planned tag changes in order."""
    for change in changes:
        registry.set_tags(model, change.version, change.tags)
        log.info("registry: %s v%d tagged %s", model, change.version, dict(change.tags))


def taggable_versions(
    registry: ModelRegistry, model: str, candidate: int | None = None
) -> list[ModelVersion]:
    """The versions tags are planned over, oldest first: the listing, and what it leaves out
    (withdrawn: archived in the Azure ML studio) that tags are still written for — a production
    version (it still serves, and a promotion must archive it, or two versions stay tagged
    production) and the `candidate` a rollout ended for (withdrawn after its delivery started,
    its tags must still say what serves)."""
    versions = {v.version: v for v in registry.list_versions(model)}
    for held in registry.find_by_tag(model, STAGE_TAG, Stage.PRODUCTION):
        versions.setdefault(held.version, held)
    if candidate is not None and candidate not in versions:
        versions[candidate] = registry.get(model, candidate)
    return [versions[v] for v in sorted(versions)]


@runtime_checkable
class TagTransactions(Protocol):
    """A registry that can lock a model for a read-plan-write of its tags (the local one)."""

    def transaction(self, name: str) -> AbstractContextManager[None]:
        """Hold `name`'s lock: no other process registers, tags or withdraws a version of it
        until the block ends; this object's own writes inside it go through."""


#: How often `retag` plans anew on a registry without transactions when production moved
#: between its reading and its writing, before it gives up.
RETAG_ATTEMPTS = 3


def retag(
    registry: ModelRegistry,
    model: str,
    plan: Callable[[Sequence[ModelVersion]], list[TagChange]],
    *,
    candidate: int | None = None,
    listed: bool = True,
) -> list[TagChange]:
    """Read `model`'s taggable versions (unless not `listed`), plan over them and write the plan.

    A plan over a listing read before another writer's changes is stale: two `registry tag M V
    stage=production --replace` at once each archived the same holder and tagged their own
    version, leaving two production versions. On a registry with transactions (local) the read,
    the plan and the writes are one step under the model's lock. Azure ML has no lock: the
    production holders are read again just before writing, and the plan made anew over a fresh
    listing if they moved. What that cannot close is the window between that last read and the
    writes (one request): a production tag written in it by someone else still leaves two, for
    the next promotion or a `registry tag --replace` to archive.
    """

    if not listed:
        # Tags that move no stage: nothing read (nor locked and hashed), so they stay writable
        # beside a version the listing refuses (the `sha256=` repair of a tampered tag).
        changes = plan([])
        apply_tags(registry, model, changes)
        return changes
    if isinstance(registry, TagTransactions):
        with registry.transaction(model):
            changes = plan(taggable_versions(registry, model, candidate))
            apply_tags(registry, model, changes)
        return changes
    versions = taggable_versions(registry, model, candidate)
    for _ in range(RETAG_ATTEMPTS):
        changes = plan(versions)
        planned_over = {v.version for v in versions if v.stage == Stage.PRODUCTION}
        now = {v.version for v in registry.find_by_tag(model, STAGE_TAG, Stage.PRODUCTION)}
        if not changes or now == planned_over:
            apply_tags(registry, model, changes)
            return changes
        log.info("registry: %s production moved to %s while tagging; planning again", model, now)
        versions = taggable_versions(registry, model, candidate)
    raise RegistryError(
        f"{model}: the version tagged stage=production kept changing while these tags were "
        f"planned ({RETAG_ATTEMPTS} times); nothing written, try again"
    )


def follow_traffic(
    registry: ModelRegistry, model: str, candidate: int, phase: str, reason: str = ""
) -> list[TagChange]:
    """Plan and apply the tags for a rollout of `candidate` that ended in `phase` (one step:
    see `retag`)."""
    return retag(
        registry,
        model,
        lambda versions: plan_tags(versions, candidate, phase, reason),
        candidate=candidate,
    )


def reconcile(
    registry: ModelRegistry,
    view: RolloutView | None,
    *,
    still_serves: Callable[[], bool] | None = None,
) -> list[TagChange]:
    """Repair tags after a crash between "traffic moved" and "tags written" (idempotent).

    Only a rollout of a sound version of this registry is replayed — not one of a build it does
    not hold (a hand-made `rollout start`, under a number or a name it lacks or cannot hold), nor
    of another version under the same number (other bits: the registry was reset since), nor of
    one damaged since (each logged) — and, when `still_serves` is given, only while it says
    green still serves the rollout's outcome (otherwise the outcome is history: `starts_anew`).
    """
    if view is None or view.active or not _of_registry(registry, view):
        return []
    if still_serves is not None and not still_serves():
        log.info(
            "last rollout (%s %s): that outcome no longer serves, nothing to reconcile",
            view.label,
            view.phase,
        )
        return []
    changes = follow_traffic(registry, view.model, view.candidate, view.phase, view.reason)
    if changes:
        log.warning(
            "registry repaired from rollout status (%s v%d %s): %d tag change(s)",
            view.model,
            view.candidate,
            view.phase,
            len(changes),
        )
    return changes


def _of_registry(registry: ModelRegistry, view: RolloutView) -> bool:
    """Whether the view's candidate is a version of `registry` (the same bits); says why not."""
    said = f"last rollout ({view.label}, {view.phase})"
    if view.candidate < 1:
        log.warning("%s is not a version of this registry: nothing to reconcile", said)
        return False
    try:
        held = registry.get(view.model, view.candidate)
    except ModelNotFound:
        log.warning("%s is not a version of this registry: nothing to reconcile", said)
        return False
    except (IntegrityError, ConfigError) as exc:
        # A version damaged since (the listings step over it, with a warning: so does this), or
        # a hand rollout under a name the registry cannot hold: no sound version of it to tag.
        # Raised, it stopped every delivery after it (reconcile runs before each `watch --once`
        # pass and at every start), though its tags were written long ago.
        log.warning("%s: cannot check its candidate: %s; nothing to reconcile", said, exc)
        return False
    if _other_bits(view.sha256, held.sha256):
        log.warning(
            "%s rolled out other bits (sha256 %s) than the registry's %s:%d (sha256 %s): "
            "nothing to reconcile",
            said,
            (view.sha256 or "")[:12],
            held.name,
            held.version,
            (held.sha256 or "")[:12],
        )
        return False
    return True


def _other_bits(a: str | None, b: str | None) -> bool:
    """Whether two sha256s differ where both are known (Release.unlike's rule)."""
    return bool(a and b and a != b)


def serving(versions: Sequence[ModelVersion], view: RolloutView | None) -> dict[int, str]:
    """Which colour each version serves: `green`, or `blue 25%` / `green 75%` mid-rollout.

    Green serves production (seed semantics: on promotion green is replaced by the candidate);
    while a rollout runs its candidate serves blue at the current weight. The rollout status is
    the truth; the production tag stands in when no rollout ever ran.
    """
    production = max((v.version for v in versions if v.stage == Stage.PRODUCTION), default=None)
    if view is None:
        return {} if production is None else {production: "green"}
    if view.phase == SUCCEEDED:
        return {view.candidate: "green"}
    green = view.stable if view.stable is not None else production
    colours = {} if green is None else {green: "green"}
    if view.active:
        colours[view.candidate] = f"blue {view.weight}%"
        if green is not None:
            colours[green] = f"green {100 - view.weight}%"
    return colours


# ------------------------------------------------------------------------- the engine delivery


class EngineDelivery:
    """Package, then run the rollout engine in this process against the spec's router.

    The router is whatever the spec names: Envoy on this machine, Istio on a cluster, an Azure ML
    managed online endpoint. The controller runs here, next to the trigger, so one durable state
    store serves resume, abort (supersede) and tag reconciliation alike — an Azure ML pipeline job
    would keep the rollout's state on an ephemeral job disk, out of the trigger's reach.

    A version with a local folder (the `local` registry) is packaged to
    `<state_dir>/packages/<model>/<version>` (the scoring server and Envoy stack serve it from
    there); one without (an Azure ML registry) is deployed from the registry itself — the azureml
    router deploys `azureml:<model>:<version>`. The rollout's status, lease and ledger live in
    `state_dir` (default: the spec's `state.dir`). `clock` is for tests.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        spec: Any,
        *,
        state_dir: Path | None = None,
        image_registry: str = "localhost",
        clock: Any = None,
    ) -> None:
        from rollout.api import load_spec

        self.registry = registry
        self.spec = spec if not isinstance(spec, str | Path) else load_spec(spec)
        self.state_dir = Path(state_dir) if state_dir is not None else Path(self.spec.state.dir)
        self.image_registry = image_registry
        self.clock = clock
        #: Versions whose resume was said and did not end yet: retried after an error (by the
        #: trigger's worker, every interval), it is said again at debug only.
        self._resuming: set[tuple[str, int]] = set()

    def _store(self) -> Any:
        from rollout.api import open_store

        return open_store(self.spec, self.state_dir)

    def current(self) -> RolloutView | None:
        """The last rollout in the engine's state store."""
        return rollout_view(self.spec, self.state_dir)

    def deliver(
        self,
        version: ModelVersion,
        *,
        before_rollout: Callable[[], DeliveryOutcome | None] | None = None,
    ) -> DeliveryOutcome:
        """Package + roll out `version`; resume it if the store has it running, or just re-tag
        if its rollout ended and green still serves the outcome (`starts_anew`; otherwise it
        is rolled out again, judged against what green serves now).

        A model's first release (no production version, green serving nothing or, after a
        crash, already serving it) is deployed to green with all traffic and judged on the
        spec's absolute limits (`check_first_release`): there is nothing to compare it with.
        Otherwise `before_rollout` is asked, once packaged, whether the rollout should still
        begin (see Delivery.deliver).
        """
        from rollout.core.types import Release
        from rollout.routers.factory import make_router

        view = self.current()
        ours = view is not None and view.of(version.name, version.version, version.sha256)
        router = None
        if view is not None and ours and not view.active:
            # Replayed only while green still serves its outcome (as the rollout step does on a
            # re-run); otherwise that outcome is history and a new judged rollout starts below.
            router = make_router(self.spec.router)
            release = Release(
                model=version.name, version=str(version.version), sha256=version.sha256
            )
            if not starts_anew(self.spec, release, self.state_dir, router=router):
                log.info(
                    "%s v%d: its rollout already ended (%s)",
                    version.name,
                    version.version,
                    view.phase,
                )
                return self._finish(version, view.phase, view.reason, None)
            ours = False
        if view is not None and view.active and not ours:
            raise TriggerError(
                f"cannot deliver {version.name} v{version.version}: the rollout of "
                f"{view.named_against(version.name, version.version)} is {view.phase}"
            )
        if ours:
            # Resumed: the stored status carries the candidate; naming it keeps a spec that
            # names another `candidate:` from being taken for a different rollout.
            key = (version.name, version.version)
            said = log.debug if key in self._resuming else log.info
            said("%s v%d: resuming its rollout", version.name, version.version)
            self._resuming.add(key)
            release = Release(
                model=version.name, version=str(version.version), sha256=version.sha256
            )
            resumed = self._roll_out(version, self.spec, release, resumed=True)
            self._resuming.discard(key)
            return resumed
        # One router client and one metrics client for all the delivery's calls (azureml: an
        # MLClient; azuremonitor: a credential and its token), the metrics probed first.
        router = router or make_router(self.spec.router)
        metrics = probe_metrics(self.spec, router)
        try:
            release = self._package(version)
            spec = self._with_stable(self.spec, version.name)
            if spec.stable is None and green_is_free(spec, release, router):
                return self._deliver_first(version, spec, release, router, metrics)
            # Packaging takes a while, and a newer version accepted meanwhile had no rollout of
            # this one to abort (the trigger's --supersede): asked now, before anything deploys.
            if before_rollout is not None and (ended := before_rollout()) is not None:
                return ended
            return self._roll_out(version, spec, release, router=router, metrics=metrics)
        finally:
            _close(metrics)

    def _roll_out(
        self,
        version: ModelVersion,
        spec: Any,
        release: Any,
        *,
        resumed: bool = False,
        router: Any = None,
        metrics: Any = None,
    ) -> DeliveryOutcome:
        """Run (or resume) the rollout of `release` to its end, then tag the registry. Resumed,
        the spec's router and metrics are built by the engine (a simulated source reseeded)."""
        from rollout.api import run_rollout

        result = run_rollout(
            spec,
            candidate=release,
            state_dir=self.state_dir,
            router=router,
            metrics=metrics,
            clock=self.clock,
            on_tick=_TickLog(f"{version.name}:{version.version}"),
            restart=not resumed,
        )
        return self._finish(version, result.phase.value, result.reason, result.ledger_path)

    def _finish(
        self, version: ModelVersion, phase: str, reason: str, ledger: Path | None
    ) -> DeliveryOutcome:
        changes = follow_traffic(self.registry, version.name, version.version, phase, reason)
        return DeliveryOutcome(version.name, version.version, phase, reason, ledger, tuple(changes))

    def _package(self, version: ModelVersion) -> Any:
        from rollout.core.types import Release

        if version.path is None:  # e.g. Azure ML: the endpoint deploys the registered model
            return Release(model=version.name, version=str(version.version), sha256=version.sha256)
        return package_release(version, self.state_dir, image_registry=self.image_registry)

    def _deliver_first(
        self, version: ModelVersion, spec: Any, release: Any, router: Any, metrics: Any
    ) -> DeliveryOutcome:
        """Deploy and judge a model's first release (`check_first_release`), then tag it.

        A Failed or Error check closes the delivery like any other outcome: it is not retried
        (it would judge the same release again and again).
        """
        check, reason, ledger = check_first_release(
            spec,
            release,
            state_dir=self.state_dir,
            router=router,
            metrics=metrics,
            clock=self.clock,
        )
        changes = tag_first_release(self.registry, version.name, version.version, check, reason)
        # Read once tagged: a report, which fails nothing that was deployed and tagged.
        traffic = served_traffic(router, release.ref)
        phase = FIRST_CHECK_OUTCOMES.get(check, FAILED)
        said = first_release_reason(version.name, version.version, check, reason, traffic)
        log.log(logging.WARNING if phase == FAILED else logging.INFO, "%s", said)
        return DeliveryOutcome(
            version.name, version.version, phase, said, ledger, tuple(changes), check
        )

    def _with_stable(self, spec: Any, model: str) -> Any:
        """The spec, with the production version as `stable` when the spec names none.

        The engine keeps whatever green serves; `stable` only matters on a fresh data plane.
        """
        if spec.stable is not None:
            return spec
        production = self.registry.find_by_tag(model, STAGE_TAG, Stage.PRODUCTION)
        if not production:
            return spec
        from rollout.config import ReleaseConfig

        release = self._package(production[-1])
        return spec.model_copy(update={"stable": ReleaseConfig(**asdict(release))})

    def abort(self, reason: str) -> None:
        """Queue an `abort` command for the running controller (it rolls back on its next tick);
        once per rollout: one queued already is applied in its turn, and a rollout with no
        controller (kept open, its version gone from the registry) got one more at every
        restart of a trigger with --supersede, none applied."""
        from rollout.core.status import Command

        store = self._store()
        status = store.load()
        if status is None or status.terminal:
            log.info("nothing to abort (%s): no rollout is running", reason)
            return
        if any(
            c is not None and c.kind == "abort" and c.rollout == status.id for c in store.commands()
        ):
            log.info("an abort of the running rollout is queued already (%s)", reason)
            return
        store.push_command(
            Command(
                id=f"trigger-{uuid.uuid4().hex}",
                kind="abort",
                at=time.time(),
                by=f"trigger ({reason})",
                rollout=status.id,  # never the next rollout, if this one ends first
            )
        )

    def reconcile(self) -> list[TagChange]:
        """Repair registry tags from the engine's last status, while green serves its outcome."""

        def still_serves() -> bool:
            stored = self._store().load()
            return stored is not None and outcome_serves(self.spec, stored)[0]

        return reconcile(self.registry, self.current(), still_serves=still_serves)


def probe_metrics(spec: Any, router: Any) -> Any:
    """The spec's metrics provider, probed: raise MetricsError, before anything is packaged or
    deployed, when the metrics cannot be read (the probe the controller runs as a rollout or a
    first release's check begins). Asked first, a delivery the trigger retries every interval
    until they can be read costs one trivial query per retry: no packaging of the model again,
    and no log line saying it goes to green when nothing will. The caller closes the provider
    it gets (`_close`).

    A secret or certificate the client is built with that cannot be read now (an environment
    variable unset, a token file missing, empty or being rewritten, a CA file gone: rollout's
    ConfigError naming the field) is metrics that cannot be read too, retried, not an invalid
    spec closing the version Failed: the spec was validated when loaded, and what building the
    client checks beyond it is what it reads from the environment and files. A variable
    misnamed for good is retried for good, as a wrong `metrics.url` is, and said the same way.
    """
    from rollout.errors import ConfigError as SpecError
    from rollout.errors import MetricsError
    from rollout.metrics.factory import make_metrics

    def unreadable(exc: Exception) -> MetricsError:
        return MetricsError(
            f"metrics unreadable, nothing deployed: {exc} (check the spec's `metrics:`, or bring "
            "the backend up: the trigger retries it)"
        )

    try:
        metrics = make_metrics(spec.metrics, router=router, latency=spec.analysis.latency)
    except SpecError as exc:
        raise unreadable(exc) from exc
    try:
        metrics.probe()
    except MetricsError as exc:
        _close(metrics)
        raise unreadable(exc) from exc
    return metrics


def _close(metrics: Any) -> None:
    """Close a metrics provider's HTTP session (Prometheus) or credential, if it has one."""
    close = getattr(metrics, "close", None)
    if close is not None:
        close()


def green_is_free(spec: Any, release: Any, router: Any) -> bool:
    """True when green serves nothing, or (after a crash) already serves `release`: the model's
    first release. False when green serves another release, which a rollout then compares the
    candidate with."""
    from rollout.api import green_release
    from rollout.controller import same_bits

    serving = green_release(spec, router=router)
    return serving is None or same_bits(serving, release)


def starts_anew(spec: Any, candidate: Any, state_dir: Path, *, router: Any = None) -> bool:
    """Whether the stored rollout has ended and a new one of `candidate` starts: it was of another
    version (or other bits under its number: a sha256 each names, and they differ), or its
    outcome no longer serves.

    A store that outlives one run (the trigger's `state.dir`, `state.kind: kubernetes`,
    `run-local --run-dir` again) holds the last rollout; the engine refuses to start another over
    an ended one unless told. An ended rollout of the SAME version (a retried step, a redelivery)
    is reported as it ended — and its outcome written to the registry — only while green still
    serves that outcome: the candidate after a promotion, the stable release after a rollback.
    Otherwise (an old run's folder re-run, a version delivered again after later rollouts or a
    hand-made change of green) the outcome is history, and replayed it would tag the registry
    with what no longer serves: a new rollout of the candidate starts against what green serves
    now. One still running is resumed or refused by the engine, as before. `router`: the spec's,
    if the caller has one (None: built here).
    """
    from rollout.api import open_store

    stored = open_store(spec, state_dir).load()
    if stored is None or not stored.terminal or stored.candidate is None:
        return False
    if stored.candidate.ref != candidate.ref or _other_bits(
        stored.candidate.sha256, candidate.sha256
    ):
        return True  # another version, or other bits under its number (a registry reset)
    serves, green = outcome_serves(spec, stored, router=router)
    if serves:
        return False
    log.warning(
        "the rollout of %s in %s ended %s, but green serves %s now: that outcome no longer "
        "serves, so it is not reported; starting a new rollout of %s",
        candidate.ref,
        state_dir,
        stored.phase.value,
        green.ref if green is not None else "nothing",
        candidate.ref,
    )
    return True


def outcome_serves(spec: Any, stored: Any, *, router: Any = None) -> tuple[bool, Any]:
    """Whether green serves the outcome of the ended rollout `stored` (a Status): the candidate
    after a promotion, the stable release otherwise; and the release green serves (or None)."""
    from rollout.api import green_release
    from rollout.core.types import Phase

    served = stored.candidate if stored.phase is Phase.SUCCEEDED else stored.stable
    green = green_release(spec, router=router)
    return served is not None and green is not None and not served.unlike(green), green


def check_first_release(
    spec: Any,
    release: Any,
    *,
    state_dir: Path,
    router: Any,
    metrics: Any = None,
    clock: Any = None,
) -> tuple[str, str, Path]:
    """Deploy a model's first release to green with all traffic and judge it on the spec's
    absolute limits: (how the check went — a verdict value or UNJUDGED —, why, the ledger).

    Green already serving it (a redelivery after a crash before the tags), it is only judged,
    afresh. The check holds the rollout's lease for up to `max_step_duration_s`; whatever its
    verdict the release stays deployed. What it serves then is the router's to say: the callers
    read it (`served_traffic`) once the tags are written. A spec with no absolute limit cannot
    judge it: deployed unjudged, as told. `metrics` judges it (None: the spec's, built for the
    check).
    """
    from rollout.api import bootstrap, bootstrap_checked, ledger_written
    from rollout.core.machine import first_release_limits
    from rollout.ledger import span

    analysis = spec.analysis
    ledger = ledger_written(spec, state_dir)  # the check writes it, an old shared one aside
    if not first_release_limits(analysis):
        bootstrap(spec, release, state_dir=state_dir, router=router)
        reason = (
            "the spec's analysis sets no absolute limit to judge it on (errors.max_rate, "
            "or latency.max_slow_rate with slo_ms)"
        )
        return UNJUDGED, reason, ledger
    log.info(
        "%s: first release, to green with all traffic; judging it on the absolute limits "
        "every %g s, for at most %s",
        release.ref,
        analysis.interval_s,
        span(analysis.max_step_duration_s),
    )
    check = bootstrap_checked(
        spec,
        release,
        state_dir=state_dir,
        router=router,
        metrics=metrics,  # None: the spec's
        clock=clock,
        on_look=_LookLog(release.ref, analysis.interval_s),
    )
    return check.verdict.value, check.reason, ledger


def tag_first_release(
    registry: ModelRegistry, model: str, version: int, check: str, reason: str
) -> list[TagChange]:
    """Plan and apply the tags of a first release whose check ended `check` (read, plan and
    write as one step: `retag`)."""
    return retag(
        registry,
        model,
        lambda versions: plan_first_release_tags(versions, version, check, reason),
        candidate=version,
    )


class _LookLog:
    """Logs the looks of a first release's check: each change of verdict, and otherwise about
    once a minute (a release without traffic is looked at for hours, every few seconds)."""

    def __init__(self, ref: str, interval_s: float) -> None:
        self.ref = ref
        self.every = max(1, math.ceil(60.0 / interval_s))
        self.looks = 0
        self.last = ""

    def __call__(self, verdict: Any, reason: str) -> None:
        self.looks += 1
        if verdict.value != self.last or self.looks % self.every == 0:
            log.info(
                "%s: first-release check, look %d: %s: %s",
                self.ref,
                self.looks,
                verdict.value,
                reason,
            )
            self.last = verdict.value


class _TickLog:
    """Logs a rollout's progress about once a minute while the controller says nothing.

    The controller logs each change (a step passed, a rollback, a hold), but a step waiting for
    traffic, or a rollout held for a human, can last hours between two of them: without this the
    trigger's log would not tell an operator whether it is still at work, and where.
    """

    EVERY_S = 60.0

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.said_at: float | None = None

    def __call__(self, status: Any, record: Mapping[str, Any]) -> None:
        from rollout.ledger import span

        at = float(record.get("at", status.updated_at))
        if record.get("describe") or record.get("phase") != record.get("phase_before"):
            self.said_at = at  # the controller logged this tick
            return
        if self.said_at is None:
            self.said_at = at
        if at - self.said_at < self.EVERY_S:
            return
        self.said_at = at
        where = "shadow step" if status.mirror else f"blue at {status.blue_weight} %"
        log.log(
            logging.WARNING if status.held else logging.INFO,  # it waits for a person
            "%s: %s, %s for %s (%d canary requests in the step): %s%s",
            self.ref,
            status.phase.value,
            where,
            span(at - status.step_started_at),
            status.step_canary_requests,
            status.reason,
            "; answer with `aml-rollout rollout resume|promote|abort`" if status.held else "",
        )


def rollout_view(spec: Any, state_dir: Path | None = None) -> RolloutView | None:
    """What the engine's state store says about the last rollout of `spec` (a spec or its path)."""
    from rollout.api import open_store

    status = open_store(spec, state_dir).load()
    if status is None or status.candidate is None:
        return None
    candidate, stable = status.candidate, status.stable
    return RolloutView(
        model=candidate.model,
        candidate=_int(candidate.version),
        phase=status.phase.value,
        reason=status.reason,
        stable=_int(stable.version) if stable and stable.model == candidate.model else None,
        weight=status.blue_weight,
        ref=candidate.ref,
        sha256=candidate.sha256,
    )


def serving_column(versions: Sequence[ModelVersion], spec: Path | None) -> dict[int, str]:
    """`serving` for one model's versions, from the rollout status of `spec` when given."""
    view = rollout_view(spec) if spec is not None else None
    if view is not None and versions and view.model != versions[0].name:
        view = None  # the spec rolls out another model
    return serving(versions, view)


def _int(version: str) -> int:
    try:
        return int(version)
    except ValueError:
        return 0  # not a registry version: never equal to one


def package_release(version: ModelVersion, out_dir: Path, *, image_registry: str) -> Release:
    """Package a registered version under `out_dir/packages/<name>/<version>`; its Release."""
    from components.package.package import build_package
    from rollout.core.types import Release

    folder = out_dir / "packages" / version.name / str(version.version)
    package = build_package(version, folder, image_registry=image_registry)
    return Release(
        model=version.name,
        version=str(version.version),
        sha256=version.sha256,
        image=package.image,
        model_dir=str(package.path),
    )
