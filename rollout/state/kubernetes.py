"""Kubernetes StateStore: status and commands in ConfigMaps, the lease a coordination.k8s.io Lease.

Unlike the file store this spans nodes: a controller rescheduled to another node resumes the
rollout, and two controllers on two nodes cannot both drive it. The objects and the rules on
their content are in `kubernetes_objects`; this module reads and writes them. Objects are read
as raw JSON and, once created, written as JSON merge patches of our fields carrying the
resourceVersion they were computed from (compare-and-swap): other fields survive, and nothing
goes through the client's typed models, which would rewrite a Lease's MicroTimes and refuse
fields they do not know.

- **Lease** `aml-rollout-<name>`: `lease(owner)` creates it, or takes it when it has no holder, or
  takes it over when its holder stopped renewing: renewTime + leaseDurationSeconds is past by this
  machine's clock (or is more than a ttl ahead of it: a dead holder whose clock ran ahead must not
  block every successor for the skew) AND the Lease stays unchanged while this process watches it
  for another ttl (or the Lease's own, if longer) by its monotonic clock (client-go's rule: a
  clock running ahead of the holder's must not take a live lease). The take is a patch carrying
  the resourceVersion read — of two controllers racing for it, the API server lets one write and
  answers the other 409, which then re-reads and reports the winner (LeaseHeldError: the CLI's
  contract). A live holder is reported at once. While held, a daemon thread renews it every
  `lease_ttl_s / 3` (every second after a failure), each renewal a patch carrying the version
  this tenure last wrote. A renewal refused (someone took it over or deleted it) marks the lease
  lost: `check_lease()`, which the controller calls before every router action, and `save()`
  raise StateError, and this controller stops. None going through for `renew_deadline_s` (two
  thirds of the ttl: a third of it before anyone may take over) *lapses* it: `check_lease()`
  then waits, this controller acting no more, until a renewal goes through — which proves that
  nobody took the Lease meanwhile (its take would have moved the version) — or the Lease turns
  out taken, or OUTAGE_S (10 min) more pass: an API server restarting for longer than the renew
  deadline does not stop a rollback the controller is retrying. On exit the holder is cleared
  (CAS; a failure is logged, the lease then expires on its own).
- **Fencing** — a lease alone cannot stop a controller that froze (a long GC pause) from writing
  when it wakes. So status writes are compare-and-swap: `save()` patches the status ConfigMap
  carrying the resourceVersion this store last read or wrote. On a 409 it re-reads: if the
  holder annotation is still this tenure's claim and the status still what it wrote, someone
  only edited labels or annotations and the write is retried; otherwise StateError, "lost
  rollout 'x' to another controller" — unless the status read is the very one being written,
  under this tenure's claim: a write that landed though its answer was lost, sent again. A save
  that gets no answer, or a 5xx or 429, is tried again (below; a decided rollback is saved
  before it is applied). Taking the lease *claims* the
  status (a write of the holder annotation, which moves the resourceVersion), so the stale
  controller's next save is refused even if the new one has not saved yet; and the new
  controller's `load()` refuses a status written by anyone else after its claim. A frozen
  controller can thus land at most the one router request it had in flight when it froze
  (actions are idempotent and re-applied by the new controller), never persist a decision.
- **Commands**: ConfigMap `aml-rollout-<name>-commands`, one JSON line per command in one data
  key. `push_command` reads it, appends a line and writes it back with the read resourceVersion;
  a 409 (another CLI appended meanwhile) re-reads and appends again, a bounded number of times
  (unless the log read holds its line where it was sent: its own write, landed and sent again).
  Lines are never rewritten or dropped; a line that does not parse is None. (The machine reads
  on after the last commands it read, `Status.commands_tail`.) A
  ConfigMap holds at most 1 MiB: a push that would pass it is refused with a clear StateError
  and nothing written (~8,000 commands; the log is shared by every rollout of the name).

- **Outages**: every read and write of the status and the command log, the claim and the
  take of the Lease, that
  gets no answer, a 5xx or a 429 is tried again (`_through_outage`), the pauses doubling from
  1 s to 30 s (a Retry-After honoured up to that): for OUTAGE_S while the store holds the lease
  (a controller: a tick's read of the queued commands must not stop it mid-rollout, blue at
  its weight), for CLI_OUTAGE_S otherwise (`status`, `pause`, `abort`: a person waits). Any
  other answer is final at once (a 403 of RBAC, a 422), and so is no answer while the API
  server never answered nor took a request of this store (a wrong `state.api_url`; one
  answered late or broken off was taken: `kubeapi.reached`). An outage is logged when it
  starts and ends (and, for the lease, when it lapses), not at every try.

The ledger is not here: it grows a line per tick and would outgrow a ConfigMap, so it stays a
local file under `state.dir` (mount a volume there in a pod). API failures become StateError
naming the object; only the verbs in `kubernetes_objects.ROLE_RULES` are used.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from rollout import kubeapi
from rollout.boottime import since_boot
from rollout.core.status import Command, Status
from rollout.errors import LeaseHeldError, StateError
from rollout.ledger import span
from rollout.state import kubernetes_objects as o

if TYPE_CHECKING:
    from rollout.config import KubernetesStateConfig

log = logging.getLogger(__name__)

Obj = dict[str, Any]
T = TypeVar("T")
MERGE_PATCH = "application/merge-patch+json"


class _Conflict(Exception):
    """409: the object changed since it was read (or, on create, it already exists)."""


class _Missing(Exception):
    """404: the object (or, on create, its namespace) does not exist."""


class _Unanswered(StateError):
    """No answer a retry would not change: none at all (a timeout, no connection, an answer
    broken off), or a 5xx or 429 (an API server restarting or overloaded, etcd slow). The
    request may even have been carried out."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        #: A 429's (or 503's) Retry-After, in seconds.
        self.retry_after = retry_after


#: How long the store waits out an API server that answers none of its requests (or none of
#: the renewals of a lapsed lease) before it gives up, while it holds the lease: as long as the
#: controller retries a rollback (`controller.ROLLBACK_RETRY_S`), which would otherwise end at
#: the store's first error.
OUTAGE_S = 600.0
#: The same for a store that holds no lease: a one-shot command (`status`, `pause`, `abort`;
#: `run` before it takes the lease). It rides out an API server restarting (seconds to tens
#: of seconds) and tells a person, or a CI step, of a longer outage within a minute rather than
#: ten: such a command decides nothing that waits on it, and run again it is answered.
CLI_OUTAGE_S = 60.0
#: The longest pause between two tries of a request (they double from 1 s); a Retry-After is
#: honoured up to it.
PAUSE_CAP_S = 30.0
#: HTTP 429 Too Many Requests (API priority and fairness): not final, like a 5xx.
TOO_MANY_REQUESTS = 429


@dataclass
class _Held:
    """A lease this store holds: the Lease as last written, and how fresh it is."""

    holder: str
    obj: Obj
    #: `since_boot()` when the last successful write of the Lease was sent.
    renewed_at: float
    lost: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    #: Held around each renewal: the renewal thread's, and the controller's own when it waits
    #: for a lapsed lease (`check_lease`), never both at once.
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: The renewal thread's tries so far, told through `tried` as each ends: a lapsed
    #: controller waits for the try in flight rather than queue on `lock` (not fair: a thread
    #: renewing back to back takes it again first, and kept `check_lease` waiting for minutes).
    tries: int = 0
    tried: threading.Condition = field(default_factory=threading.Condition)
    #: Tries that failed since the last renewal that went through, and whether its lapse was
    #: told: an outage is told when it starts, lapses and ends, not at every try.
    failed: int = 0
    lapse_told: bool = False

    def __post_init__(self) -> None:
        #: The Lease's acquireTime as this tenure wrote it: with the holder, what tells this
        #: tenure from a later one of the same holder string (same owner, pid and host).
        self.acquired: str | None = _acquire_time(self.obj)

    @property
    def claim(self) -> str:
        """What this tenure writes on the status: the holder and its acquireTime, different for
        every take of the Lease, so the claim always moves the status's resourceVersion (the
        API server skips a write that changes nothing)."""
        return f"{self.holder} since {self.acquired}" if self.acquired else self.holder

    def owns(self, found: Obj | None) -> bool:
        """Whether the Lease as read is still this tenure's."""
        return (
            found is not None
            and o.holder_of(found) == self.holder
            and _acquire_time(found) == self.acquired
        )


def _tenure(lease: Obj) -> tuple[Any, ...]:
    """What changes when a Lease is renewed or taken (its metadata may change otherwise)."""
    return (o.holder_of(lease), _acquire_time(lease), (lease.get("spec") or {}).get("renewTime"))


def _duration(lease: Obj) -> float | None:
    """The Lease's leaseDurationSeconds, as its holder wrote it (None when unreadable)."""
    value = (lease.get("spec") or {}).get("leaseDurationSeconds")
    return value if isinstance(value, int | float) and value > 0 else None


def _acquire_time(lease: Obj) -> str | None:
    value = (lease.get("spec") or {}).get("acquireTime")
    return value if isinstance(value, str) else None


class KubernetesStateStore:
    """A StateStore in a Kubernetes namespace (see the module docstring)."""

    def __init__(
        self,
        objects: o.StateObjects,
        api_client: k8s.ApiClient,
        *,
        lease_ttl_s: int = 15,
        max_conflict_retries: int = 10,
        request_timeout_s: float = 10.0,
        outage_s: float = OUTAGE_S,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = since_boot,
        sleep: Callable[[float], None] = time.sleep,
        credentials: kubeapi.Credentials | None = None,
    ) -> None:
        self.objects = objects
        #: What `api_client` authenticates with, for the hints of a 401/403.
        self._credentials = credentials
        self.name = objects.rollout
        self.lease_ttl_s = lease_ttl_s
        #: The holder gives up (`check_lease` fails) this long after its last renewal that went
        #: through, a third of the ttl before anyone else may take the Lease (client-go's
        #: renewDeadline < leaseDuration): it stops moving traffic before a successor starts.
        self.renew_deadline_s = lease_ttl_s * 2 / 3
        self._core = k8s.CoreV1Api(api_client)
        self._coordination = k8s.CoordinationV1Api(api_client)
        self._host = api_client.configuration.host
        self._max_retries = max_conflict_retries
        self._timeout = request_timeout_s
        #: How long a save, or the renewal of a lapsed lease, is tried before it gives up.
        self._outage_s = outage_s
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        #: The status ConfigMap as this store last read or wrote it: its resourceVersion is what
        #: `save()` requires the server still to have (the fence).
        self._status: Obj | None = None
        self._held: _Held | None = None
        #: Whether the API server ever answered this store (any HTTP status) or took one of its
        #: requests (`kubeapi.reached`: answered late, or broken off mid-body): until then, no
        #: answer at all is a wrong `state.api_url` or a proxy not running, not an outage.
        self._answered = False

    @classmethod
    def from_config(
        cls,
        cfg: KubernetesStateConfig,
        name: str,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> KubernetesStateStore:
        """Build from the spec's `state` section (see KubeApiConfig for the API server).
        `sleep` is how it waits (through an outage, for an expired lease): see `make_store`."""
        objects = o.StateObjects(namespace=cfg.namespace, rollout=name)
        return cls(
            objects,
            kubeapi.api_client(cfg, "state"),
            lease_ttl_s=cfg.lease_ttl_s,
            sleep=sleep,
            credentials=kubeapi.Credentials.of(cfg),
        )

    @property
    def _ns(self) -> str:
        return self.objects.namespace

    # ----------------------------------------------------------------------------- status

    def load(self) -> Status | None:
        """The saved status, or None when the rollout never started.

        While this store holds the lease, a status written by anyone else since its claim is
        refused (StateError): another controller drives the rollout now.
        """
        found = self._through_outage(
            f"read the status of rollout {self.name!r}",
            lambda: self._read_configmap(self.objects.status),
        )
        if (
            self._held is not None
            and o.resource_version(found) != o.resource_version(self._status)
            and not self._still_ours(found)
        ):
            raise self._fenced("was written by someone else after this controller took the lease")
        self._status = found
        text = o.data_of(found, o.STATUS_KEY)
        if text is None:
            return None
        try:
            return Status.from_dict(json.loads(text))
        except (ValueError, KeyError, TypeError) as exc:
            # `run --restart` reads the status first too: moving it aside is the way on.
            name, ns = self.objects.status, self._ns
            raise StateError(
                f"ConfigMap {ns}/{name} (key {o.STATUS_KEY}) is not a rollout status: {exc}; "
                f"move it aside (`kubectl -n {ns} get configmap {name} -o yaml > "
                f"{name}.broken.yaml && kubectl -n {ns} delete configmap {name}`): "
                "`aml-rollout rollout run` then starts a new rollout"
            ) from exc

    @property
    def status_configmap_found(self) -> bool:
        """Whether the last `load` found the status ConfigMap: every lease take creates it, so
        one holding no status yet (`load` None) is a bootstrap's, or a controller's stopped
        before its first tick, not a sign of another namespace or cluster."""
        return self._status is not None

    def save(self, status: Status) -> None:
        """Write the status if nobody else wrote it since this store last did (else StateError).

        Refused too when this store's lease was lost (`check_lease`, before each try). A write
        that got no answer, or a 5xx or 429, is tried again for OUTAGE_S (`_through_outage`):
        the controller saves a rollback before it applies it, and one blip of the API server
        must not leave it unapplied. A try that finds its own write landed (answered 409: the
        answer of the previous one was lost, not the write) is done.
        """
        self.check_lease()
        text = json.dumps(status.to_dict(), sort_keys=True)
        name = self.objects.status
        if (size := o.size_with(self._status, o.STATUS_KEY, text)) > o.CONFIGMAP_MAX_BYTES:
            raise StateError(
                f"cannot save the status of rollout {self.name!r}: {self._too_big(name, size)}"
            )
        self._through_outage(
            f"save the status of rollout {self.name!r}", lambda: self._write_status(text)
        )

    def _write_status(self, text: str) -> None:
        """One try of `save`: create the status, or patch it compare-and-swap (see `save`)."""
        current, name = self._status, self.objects.status
        try:
            for _ in range(self._max_retries):
                try:
                    if current is None:
                        holder = self._held.claim if self._held else ""
                        body = o.configmap(self.objects, name, {o.STATUS_KEY: text}, holder)
                        self._status = self._create_configmap(body)
                    else:
                        patch = o.data_patch(current, o.STATUS_KEY, text)
                        self._status = self._patch_configmap(name, patch)
                    return
                except _Conflict:
                    # Someone wrote since `current`: another controller (then the claim or the
                    # status changed); a person or tool editing labels or annotations, which is
                    # no reason to stop; or this very write, landed though its answer was lost
                    # (a timeout, an etcd 500) and now sent again.
                    found = self._read_configmap(name)
                    if found is None:
                        raise self._deleted(name) from None
                    if self._landed(found, text):
                        self._status = found
                        return
                    if current is None or not self._still_ours(found):
                        raise
                    current = found
            raise StateError(
                f"cannot save the status of rollout {self.name!r}: ConfigMap {self._ns}/{name} "
                f"still changing after {self._max_retries} attempts"
            )
        except _Conflict:
            raise self._fenced(
                "was written by someone else since this controller wrote it"
            ) from None
        except _Missing:
            if current is None:
                raise self._no_namespace(name) from None
            raise self._deleted(name) from None

    def _landed(self, found: Obj, text: str) -> bool:
        """Whether the status as read (`found`) is `text` under this tenure's claim: what a
        write of `text` by this controller leaves, and nobody else's (a controller taking over
        claims the status first)."""
        held = self._held
        claim = held.claim if held is not None else None
        return o.claim_of(found) == claim and o.data_of(found, o.STATUS_KEY) == text

    def _deleted(self, name: str) -> StateError:
        return StateError(
            f"ConfigMap {self._ns}/{name} was deleted while this controller drove rollout "
            f"{self.name!r}; it stops rather than start the rollout over"
        )

    def _still_ours(self, found: Obj | None) -> bool:
        """Whether the status as read (`found`) still carries this controller's claim and the
        status it last wrote: a write in between touched only what is not ours (a label, an
        annotation), not another controller's."""
        held, last = self._held, self._status
        return (
            held is not None
            and found is not None
            and o.claim_of(found) == held.claim
            and o.data_of(found, o.STATUS_KEY) == o.data_of(last, o.STATUS_KEY)
        )

    def _fenced(self, why: str) -> StateError:
        return StateError(
            f"lost rollout {self.name!r} to another controller: its status (ConfigMap "
            f"{self._ns}/{self.objects.status}) {why}; this controller stops "
            "(`aml-rollout rollout status` shows who drives it now)"
        )

    # ---------------------------------------------------------------------------- commands

    def push_command(self, command: Command) -> None:
        """Append one line to the command log: read, append, write back if unchanged (CAS).
        Tried again through an outage (`_through_outage`); a write whose answer was lost (a
        409, or none at all) is looked for by the next try, so the line is never in twice."""
        line = o.command_line(command)
        sent: list[str] = []  # the logs writes whose outcome is unknown would have left
        self._through_outage(
            f"queue the command for rollout {self.name!r}", lambda: self._append(line, sent)
        )

    def _append(self, line: str, sent: list[str]) -> None:
        """One try of `push_command`: up to max_conflict_retries appends, each read and CAS."""
        name = self.objects.commands
        for attempt in range(1, self._max_retries + 1):
            found = self._read_configmap(name)
            log_text = o.data_of(found, o.COMMANDS_KEY) or ""
            if sent and log_text.startswith(sent[-1]):
                # That write had landed, and the client sent it again (its answer lost: a
                # connection the server closed), or its answer never came: the line is in, at
                # the place it was sent to.
                return
            new_log = o.appended(log_text, line)
            if (size := o.size_with(found, o.COMMANDS_KEY, new_log)) > o.CONFIGMAP_MAX_BYTES:
                raise StateError(
                    f"cannot queue the command: the command log of rollout {self.name!r} is "
                    f"full ({self._too_big(name, size)}); nothing was written. `kubectl -n "
                    f"{self._ns} delete configmap {name}` starts a new log (a running controller "
                    "reads it from its start)"
                )
            try:
                if found is None:
                    self._create_configmap(o.configmap(self.objects, name, {o.COMMANDS_KEY: line}))
                else:
                    self._patch_configmap(name, o.data_patch(found, o.COMMANDS_KEY, new_log))
                return
            except _Unanswered:
                sent.append(new_log)  # it may have landed: the next try looks
                raise
            except _Conflict:
                sent.append(new_log)
                log.debug("%s changed under us (409); appending again (%d)", name, attempt)
                # Jittered, growing pauses: CLIs pushing at the same instant spread out.
                self._sleep(random.uniform(0, min(0.5, 0.01 * 2**attempt)))  # noqa: S311
            except _Missing:
                if found is None:  # a create's 404: the namespace
                    raise self._no_namespace(name) from None
                # Deleted since the read (`kubectl delete` starts a new log): read it again.
        raise StateError(
            f"could not queue the command in ConfigMap {self._ns}/{name}: still conflicting "
            f"after {self._max_retries} attempts (others keep writing it)"
        )

    def commands(self) -> list[Command | None]:
        """The command log, oldest first (read through an outage: `_through_outage`)."""
        found = self._through_outage(
            f"read the command log of rollout {self.name!r}",
            lambda: self._read_configmap(self.objects.commands),
        )
        return o.parse_commands(o.data_of(found, o.COMMANDS_KEY) or "")

    # ------------------------------------------------------------------------------- lease

    def controller(self) -> str | None:
        """The Lease's holder while its lease runs; None when released or expired."""
        found = self._through_outage(f"read who drives rollout {self.name!r}", self._read_lease)
        if found is None or o.live_holder(found, self._clock()) is None:
            return None
        ahead = self._ahead(found)  # alive only if it is seen renewing: `lease` watches it
        return o.describe_holder(found) + (f" ({ahead})" if ahead else "")

    @contextmanager
    def lease(self, owner: str) -> Iterator[None]:
        """Hold the Lease for the block, renewed in the background; released on exit."""
        stamp = f"pid {os.getpid()} on {socket.gethostname()}"
        held = self._acquire(f"{owner} {stamp}" if owner else stamp)
        self._held = held
        try:
            held.thread = threading.Thread(
                target=self._keep_renewing,
                args=(held,),
                name=f"renew-{self.objects.lease}",
                daemon=True,
            )
            # Renewed from the take on: the claim may wait out an outage (pauses of up to
            # 30 s), and a lease nobody renews meanwhile is a standby's to take.
            held.thread.start()
            self._claim_status(held.claim)
            yield
        finally:
            held.stop.set()
            if held.thread is not None:
                held.thread.join()
            self._held = None
            self._release(held)

    def _acquire(self, holder: str) -> _Held:
        """Create the Lease, or take it over when free; LeaseHeldError when someone holds it.
        Tried again through an outage (`_through_outage`: this store holds no lease yet, so
        for CLI_OUTAGE_S)."""
        #: The acquireTime and send time of each create or take answered 409, or not at all.
        refused: list[tuple[float | None, float]] = []
        return self._through_outage(
            f"take the lease of rollout {self.name!r}",
            lambda: self._acquire_once(holder, refused),
        )

    def _acquire_once(self, holder: str, refused: list[tuple[float | None, float]]) -> _Held:
        """One try of `_acquire`: up to max_conflict_retries reads and writes of the Lease."""
        for _ in range(self._max_retries):
            found = self._read_lease()
            if (
                refused
                and found is not None
                and o.holder_of(found) == holder
                and o.parse_time(_acquire_time(found)) == refused[-1][0]
            ):
                # Our own write, landed though its answer was lost (no answer, or the client
                # sent it again on a connection the server closed, answered 409).
                return _Held(holder=holder, obj=found, renewed_at=refused[-1][1])
            # A renewTime more than a ttl ahead of our clock proves no life (a dead holder whose
            # clock ran an hour ahead would block every successor for that hour): watched too.
            if (
                found is not None
                and o.live_holder(found, self._clock()) is not None
                and o.renewed_ahead(found, self._clock()) is None
            ):
                raise self._held_by(found)
            if found is not None and o.holder_of(found) is not None:
                found = self._watch_expired(found)
            sent, now = self._monotonic(), self._clock()
            try:
                if found is None:
                    written = self._create_lease(
                        o.lease(self.objects, holder, self.lease_ttl_s, now)
                    )
                else:
                    patch = o.take_patch(found, holder, self.lease_ttl_s, now)
                    written = self._patch_lease(patch, self._timeout)
                    if o.holder_of(found):
                        log.warning("took over the expired lease of %s", o.describe_holder(found))
            except _Unanswered:
                # It may have landed: the next try reads whose it is. (As a time: a create's
                # goes through the typed model, which rewrites it.)
                refused.append((o.parse_time(o.micro_time(now)), sent))
                raise
            except _Conflict:
                refused.append((o.parse_time(o.micro_time(now)), sent))
                continue  # someone else created or took it meanwhile (or we did): read who
            except _Missing:
                if found is None:  # a create's 404: the namespace
                    raise self._no_namespace(self.objects.lease) from None
                continue  # deleted since the read: read it again
            return _Held(holder=holder, obj=written, renewed_at=sent)
        raise StateError(
            f"cannot take Lease {self._ns}/{self.objects.lease}: still conflicting after "
            f"{self._max_retries} attempts"
        )

    def _watch_expired(self, found: Obj) -> Obj | None:
        """The Lease `found`, expired by this machine's clock (or renewed more than a ttl ahead
        of it, which proves no life either), once it stayed unchanged for a
        whole ttl by this process's monotonic clock (client-go's rule): a clock running ahead of
        the holder's must not take a live lease. The ttl is the longer of ours and the Lease's
        own leaseDurationSeconds: a holder with a longer one renews less often than ours would.
        LeaseHeldError when it is renewed or taken meanwhile; the Lease as it now stands when
        it is released or deleted meanwhile, or when the watch ends (an edit of its labels or
        annotations only is no sign of life)."""
        tenure = _tenure(found)
        watch_s = max(self.lease_ttl_s, _duration(found) or 0)
        # At WARNING, which `run` shows: the watch can last lease_ttl_s (up to an hour), and
        # a `run` silent that long looks hung.
        log.warning(
            "Lease %s/%s of %s%s; watching it %g s for a renewal, taking it over at %s if "
            "none comes",
            self._ns,
            self.objects.lease,
            o.describe_holder(found),
            f": {ahead}" if (ahead := self._ahead(found)) else " looks expired",
            watch_s,
            o.clock_time(self._clock() + watch_s),
        )
        deadline = self._monotonic() + watch_s
        while self._monotonic() < deadline:
            self._sleep(min(1.0, self.lease_ttl_s / 5))
            seen = self._read_lease()
            if seen is None or o.holder_of(seen) is None:
                return seen  # deleted or released meanwhile: free
            if _tenure(seen) != tenure:
                raise self._held_by(seen)  # renewed (or taken): alive, whatever the clocks say
            found = seen  # the version the take-over must carry
        return found

    def _ahead(self, found: Obj) -> str | None:
        """How far the Lease's renewTime is ahead of this machine's clock, in words, when by
        more than its ttl; else None."""
        ahead = o.renewed_ahead(found, self._clock())
        if ahead is None:
            return None
        return f"its renewTime is {span(ahead)} ahead of this machine's clock"

    def _held_by(self, found: Obj) -> LeaseHeldError:
        ttl = _duration(found) or self.lease_ttl_s
        ahead = self._ahead(found)
        lease = f"{self._ns}/{self.objects.lease}"
        # Deleting the Lease is safe: a live holder's next renewal meets the 404 (or the new
        # Lease's 409) and it stops, and the taker's claim fences its status writes meanwhile.
        return LeaseHeldError(
            f"rollout {self.name!r} is already driven by another controller "
            f"({o.describe_holder(found)}{'; ' + ahead if ahead else ''}); stop it, or steer it "
            f"with `aml-rollout rollout pause|resume|promote|abort` (Lease {lease}: if that "
            f"controller died, its lease expires {ttl:g} s after its last renewal, and a new "
            f"controller takes it over after watching it another {max(ttl, self.lease_ttl_s):g} s;"
            f" to take over at once, `kubectl -n {self._ns} delete lease {self.objects.lease}` "
            "(a controller still alive stops at its next renewal))"
        )

    def _claim_status(self, claim: str) -> None:
        """Write our claim on the status ConfigMap (creating it if need be): the fence moves.

        Only while the Lease is still this tenure's (`_require_lease`), checked before each
        attempt: the claim overwrites whatever claim is there, so a holder that froze between
        taking the Lease and claiming would fence out the successor that took over meanwhile,
        and, having lost the lease itself, stop too: nobody would drive the rollout.
        """
        self._through_outage(
            f"claim the status of rollout {self.name!r}", lambda: self._claim_once(claim)
        )

    def _claim_once(self, claim: str) -> None:
        """One try of `_claim_status` (a claim is the same write however often it is sent)."""
        name = self.objects.status
        for _ in range(self._max_retries):
            self._require_lease()
            found = self._read_configmap(name)
            try:
                if found is None:
                    self._status = self._create_configmap(
                        o.configmap(self.objects, name, {}, claim)
                    )
                else:
                    self._status = self._patch_configmap(name, o.claim_patch(found, claim))
                return
            except _Conflict:
                continue  # a stale controller wrote in between: claim over it
            except _Missing:
                if found is None:  # a create's 404: the namespace
                    raise self._no_namespace(name) from None
                continue  # deleted since the read: read it again
        raise StateError(
            f"cannot claim ConfigMap {self._ns}/{name}: still conflicting after "
            f"{self._max_retries} attempts"
        )

    def _require_lease(self) -> None:
        """StateError (as `check_lease`'s) unless the lease is renewed in time by our clock and
        the Lease, read now, is still this tenure's: off Linux, a suspended VM's clock does not
        count the suspension, the Lease shows the take-over it allowed."""
        self.check_lease()
        held = self._held
        if held is None:
            return
        found = self._read_lease()
        if not held.owns(found):
            taker = o.describe_holder(found) if found else "nobody (it was deleted)"
            held.lost = f"Lease {self._ns}/{self.objects.lease} was taken over by {taker}"
            self.check_lease()

    def _keep_renewing(self, held: _Held) -> None:
        """The renewal thread: every ttl/3 until released, or until the lease is lost.

        The period runs from when the last renewal was *sent*, so a slow API server does not
        stretch the gap between renewals by its round trips (which would trip the renew
        deadline on a lease that is fine). After a failure it tries again every second, past
        the renew deadline too (`check_lease`), until OUTAGE_S past it.
        """
        # From the take, not from this thread's start.
        pause = max(0.0, held.renewed_at + self.lease_ttl_s / 3 - self._monotonic())
        while not held.stop.wait(pause):
            with held.lock:
                if held.lost is not None:
                    return  # given up by `check_lease`, which said so
                pause = self._renew_once(held)
            with held.tried:
                held.tries += 1
                held.tried.notify_all()
            if held.lost is not None:
                log.error("lost the lease of rollout %r: %s", self.name, held.lost)
                return

    def _renew_once(self, held: _Held) -> float:
        """One try of the renewal thread (under `held.lock`); how long to wait for the next."""
        try:
            self._renew(held)
            return max(0.0, held.renewed_at + self.lease_ttl_s / 3 - self._monotonic())
        except (StateError, _Conflict) as exc:
            self._renewal_failed(held, exc)
            return min(1.0, self.lease_ttl_s / 10)  # a blip: try again soon
        except Exception as exc:  # a dead thread would be a lost lease nobody notices
            held.lost = f"renewing it failed: {exc!r}"
            return 0.0

    def _renewal_failed(self, held: _Held, exc: Exception) -> None:
        """Count a try that did not go through; the lease is lost OUTAGE_S past the renew
        deadline. Counted from the deadline, not from the last renewal: a lease_ttl_s of an
        hour is renewed every 20 minutes, and its first failure would be past OUTAGE_S
        already. Waiting longer lets no two controllers act: this one acts no more from the
        deadline on (`_lapsed`), a third of the ttl before anyone may take the Lease over.

        Told at WARNING for the first try of an outage and at the lapse, DEBUG between: `run`
        shows warnings, and a line a second for minutes buries the rest."""
        held.failed += 1
        since = self._monotonic() - held.renewed_at
        if since > self.renew_deadline_s + self._outage_s:
            held.lost = (
                f"no renewal went through for {span(since)}, {span(self._outage_s)} past its "
                f"renew deadline ({exc})"
            )
            return
        log.log(
            logging.WARNING if held.failed == 1 else logging.DEBUG,
            "could not renew Lease %s/%s: %s%s",
            self._ns,
            self.objects.lease,
            exc,
            "; trying again every second" if held.failed == 1 else "",
        )
        if since > self.renew_deadline_s:
            self._tell_lapse(held)

    def _tell_lapse(self, held: _Held) -> None:
        """Say once per outage that the lease lapsed and this controller acts no more."""
        if held.lapse_told:
            return
        held.lapse_told = True
        log.warning(
            "the lease of rollout %r was not renewed for %g s, two thirds of "
            "state.lease_ttl_s: this controller moves no traffic and writes nothing until it "
            "renews it, trying until %s past that deadline",
            self.name,
            self.renew_deadline_s,
            span(self._outage_s),
        )

    def _renew(self, held: _Held) -> None:
        """One renewal: a patch carrying the version this tenure last wrote. A 409 re-reads the
        Lease and, if it is still this tenure's (`held.owns`: our holder and acquireTime, which
        every take changes), adopts its version and renews that: someone touched its metadata,
        or a renewal of ours landed though its answer never came.

        Its answer is waited for up to the renew deadline (client-go bounds a renew by its
        RenewDeadline), not a third of the ttl: a renewal answered later than that landed all
        the same, and one timed out so left every later one a 409 on a stale version while
        Lease writes stayed that slow, the lease lapsed, then lost, with nobody else about.
        The re-read gets the store's usual timeout."""
        timeout = min(self._timeout, max(0.5, self.renew_deadline_s))
        what = f"Lease {self._ns}/{self.objects.lease}"
        for _ in range(2):
            sent, now = self._monotonic(), self._clock()
            try:
                held.obj = self._patch_lease(o.renew_patch(held.obj, now), timeout)
                if held.failed:
                    log.warning(
                        "renewed %s again after %d failed tries (%s since the last renewal)",
                        what,
                        held.failed,
                        span(sent - held.renewed_at),
                    )
                held.renewed_at = sent
                held.failed, held.lapse_told = 0, False
                return
            except _Missing:
                held.lost = f"{what} was deleted"
                return
            except _Conflict:
                found = self._read_lease()
                if found is None or not held.owns(found):
                    taker = o.describe_holder(found) if found else "nobody (it was deleted)"
                    held.lost = f"{what} was taken over by {taker}"
                    return
                held.obj = found  # still ours (someone touched its metadata): renew that
        raise _Conflict(f"{what} keeps changing")

    def check_lease(self) -> None:
        """StateError once the lease is lost. A lease not renewed for `renew_deadline_s` has
        lapsed: this waits until it is renewed again (`_retake`), or lost."""
        held = self._held
        if held is None:
            return
        if held.lost is None and self._lapsed(held):
            self._retake(held)
        if held.lost is not None:
            raise StateError(
                f"lost the lease of rollout {self.name!r}: {held.lost}; another controller may "
                "drive it, so this one stops"
            )

    def _lapsed(self, held: _Held) -> bool:
        return self._monotonic() - held.renewed_at > self.renew_deadline_s

    def _retake(self, held: _Held) -> None:
        """Renew the lapsed lease `held`, trying every second until it goes through, the Lease
        turns out taken over or deleted, or OUTAGE_S past the deadline; meanwhile this
        controller does nothing, as one that lost its lease.

        Safe, as every renewal is: it is a write guarded by the resourceVersion this tenure last
        wrote (`o.renew_patch`; a 409 goes on only when the Lease as read is still this
        tenure's, `_renew`), so it goes through only when nobody took the Lease over since. Then
        no successor ever held it, and none can now: its take carries a version older than the
        renewal's (409), or its watch sees the renewal. A lapse only ends this controller's
        right to act early (a third of the ttl before a successor's may begin): it stops acting
        at the deadline, and acts again only once the renewal proves it the holder still.
        """
        self._tell_lapse(held)
        pause = min(1.0, self.lease_ttl_s / 10)
        while held.lost is None and self._lapsed(held):
            seen = held.tries
            if not held.lock.acquire(blocking=False):
                # The renewal thread's try is in flight: its outcome is what we wait for.
                with held.tried:
                    if held.tries == seen:
                        held.tried.wait(pause)
                continue
            try:
                if held.lost is None and self._lapsed(held):
                    self._renew_once(held)  # as the renewal thread tries, failures counted
            finally:
                held.lock.release()
            if held.lost is None and self._lapsed(held):
                self._sleep(pause)
        if held.lost is None:
            log.warning("renewed the lease of rollout %r again: this controller goes on", self.name)

    def _release(self, held: _Held) -> None:
        """Clear the holder, unless someone took the Lease over; failures are only logged."""
        what = f"Lease {self._ns}/{self.objects.lease}"
        obj = held.obj
        try:
            for _ in range(2):
                try:
                    self._patch_lease(o.release_patch(obj), self._timeout)
                    return
                except _Conflict:
                    found = self._read_lease()
                    if found is None or not held.owns(found):
                        return  # taken over (or deleted): nothing of ours to release
                    obj = found
        except _Missing:
            log.debug("%s was deleted: nothing to release", what)
        except StateError as exc:
            log.warning(
                "could not release %s (%s); it expires %d s after its last renewal",
                what,
                exc,
                self.lease_ttl_s,
            )

    # ---------------------------------------------------------------------------- requests

    def _through_outage(self, doing: str, attempt: Callable[[], T]) -> T:
        """`attempt()`, tried again while it meets no answer, a 5xx or a 429 (_Unanswered), the
        pauses doubling from 1 s up to PAUSE_CAP_S (a Retry-After honoured up to that); any
        other error at once (a 403 of RBAC is an answer: asking again would only hide it), and
        no answer too while the API server never answered nor took a request of this store.

        For OUTAGE_S while this store holds the lease (a controller: it must not stop, blue at
        its weight or a decided rollback unapplied, for an API server restarting), else for
        CLI_OUTAGE_S (a one-shot command, a person waiting for it): the last pause is cut short
        to end there, and a try then that fails gives up, StateError "cannot <doing>: still
        failing after ...". The lease is
        checked after each pause (`check_lease`: a lapsed one is renewed first, a lost one
        stops it). Told at WARNING when the outage starts and when it ends, DEBUG between:
        `run` shows warnings, and a line per try buries the rest.
        """
        bound = self._outage_s if self._held is not None else CLI_OUTAGE_S
        started, pause, failed = self._monotonic(), 1.0, 0
        while True:
            try:
                result = attempt()
            except _Unanswered as exc:
                if not self._answered:
                    # Never reached (a wrong api_url, `kubectl proxy` not running, a cluster off
                    # the VPN): said at once, as the controller does a router that never
                    # answered it; waiting would only delay the one line that says why.
                    raise
                failed += 1
                tried = self._monotonic() - started
                if tried >= bound:
                    raise StateError(
                        f"cannot {doing}: still failing after {span(tried)}: {exc}"
                    ) from exc
                # The last pause is cut short to end at the bound, which is then the last try:
                # a minute is a minute (was: no pause past it, given up at 31 s).
                wait = min(max(pause, exc.retry_after or 0.0), PAUSE_CAP_S, bound - tried)
                log.log(
                    logging.WARNING if failed == 1 else logging.DEBUG,
                    "could not %s: %s; %s",
                    doing,
                    exc,
                    f"trying again for up to {span(bound)}"
                    if failed == 1
                    else f"again in {wait:g} s",
                )
                self._sleep(wait)
                pause = min(pause * 2, PAUSE_CAP_S)
                self.check_lease()  # the lease may have lapsed meanwhile: waits for its renewal
                continue
            if failed:
                log.warning(
                    "%s: went through after %d failed tries (%s)",
                    doing,
                    failed,
                    span(self._monotonic() - started),
                )
            return result

    def _read_configmap(self, name: str) -> Obj | None:
        return self._read(
            f"read ConfigMap {self._ns}/{name}",
            lambda: self._core.read_namespaced_config_map(
                name, self._ns, _request_timeout=self._timeout, _preload_content=False
            ),
        )

    def _create_configmap(self, body: Obj) -> Obj:
        name = body["metadata"]["name"]
        configmap = cast(k8s.V1ConfigMap, body)  # our own object: the typed model knows it all
        return self._json(
            f"create ConfigMap {self._ns}/{name}",
            lambda: self._core.create_namespaced_config_map(
                self._ns, configmap, _request_timeout=self._timeout, _preload_content=False
            ),
        )

    def _patch_configmap(self, name: str, patch: Obj) -> Obj:
        return self._json(
            f"write ConfigMap {self._ns}/{name}",
            lambda: self._core.patch_namespaced_config_map(
                name,
                self._ns,
                patch,
                _content_type=MERGE_PATCH,
                _request_timeout=self._timeout,
                _preload_content=False,
            ),
        )

    def _read_lease(self, timeout: float | None = None) -> Obj | None:
        name = self.objects.lease
        return self._read(
            f"read Lease {self._ns}/{name}",
            lambda: self._coordination.read_namespaced_lease(
                name, self._ns, _request_timeout=timeout or self._timeout, _preload_content=False
            ),
        )

    def _create_lease(self, body: Obj) -> Obj:
        lease = cast(k8s.V1Lease, body)  # see micro_time: its times survive the typed model
        return self._json(
            f"create Lease {self._ns}/{self.objects.lease}",
            lambda: self._coordination.create_namespaced_lease(
                self._ns, lease, _request_timeout=self._timeout, _preload_content=False
            ),
        )

    def _patch_lease(self, patch: Obj, timeout: float) -> Obj:
        name = self.objects.lease
        return self._json(
            f"write Lease {self._ns}/{name}",
            lambda: self._coordination.patch_namespaced_lease(
                name,
                self._ns,
                patch,
                _content_type=MERGE_PATCH,
                _request_timeout=timeout,
                _preload_content=False,
            ),
        )

    def _read(self, what: str, call: Callable[[], Any]) -> Obj | None:
        try:
            return self._json(what, call)
        except _Missing:
            return None
        except _Conflict as exc:  # a read never conflicts
            raise StateError(f"{what}: {exc}") from exc

    def _json(self, what: str, call: Callable[[], Any]) -> Obj:
        """Run one request made with `_preload_content=False`; the object the server answered.

        404 → _Missing, 409 → _Conflict (the callers decide what they mean), anything else that
        fails → StateError naming the object and the API server: _Unanswered when asking again
        may go through (no answer, a 5xx, a 429). A 404 naming no object is no missing object (a
        rollout not started) but a URL that serves no such API.
        """
        try:
            found = cast(Obj, kubeapi.read_json(call))  # the body is read in here too
            self._answered = True
            return found
        except ApiException as exc:
            self._answered = True
            if kubeapi.not_served(exc):
                raise StateError(
                    f"{what}: the API server at {self._host} does not serve this resource type "
                    "(HTTP 404 naming no object); is it a Kubernetes API server? (check "
                    "state.api_url or the kubeconfig)"
                ) from exc
            if exc.status == kubeapi.NOT_FOUND:
                raise _Missing(kubeapi.describe(exc, self._credentials)) from exc
            if exc.status == kubeapi.CONFLICT:
                raise _Conflict(kubeapi.describe(exc, self._credentials)) from exc
            said = f"{what}: {kubeapi.describe(exc, self._credentials)} [{self._host}]"
            status = exc.status or 0
            if status >= 500 or status == TOO_MANY_REQUESTS:
                raise _Unanswered(said, kubeapi.retry_after(exc)) from exc
            raise StateError(said) from exc
        except HTTPError as exc:
            # Slow or broken off, it is there (the write may even be made): an outage, as a 503
            # is, not a wrong address; the istio router tells them apart the same way.
            self._answered = self._answered or kubeapi.reached(exc)
            raise _Unanswered(f"{what}: {kubeapi.no_answer(exc, self._host)}") from exc
        except ValueError as exc:  # kubeapi.NotJson: its message says what came instead
            raise StateError(f"{what}: {exc} [{self._host}]") from exc

    def _no_namespace(self, name: str) -> StateError:
        return StateError(
            f"cannot create {name} in namespace {self._ns!r}: the namespace does not exist "
            f"(create it, or fix state.namespace) [{self._host}]"
        )

    def _too_big(self, name: str, size: int) -> str:
        return (
            f"ConfigMap {self._ns}/{name} would hold {size} bytes, over the "
            f"{o.CONFIGMAP_MAX_BYTES} a ConfigMap may hold"
        )
