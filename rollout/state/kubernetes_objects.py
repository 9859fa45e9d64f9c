"""The objects of the kubernetes state store, as plain dicts, and the rules on them (pure, no I/O).

Rollout `<name>` in namespace `<ns>` is three objects:

    ConfigMap aml-rollout-<name>-status    data `status.json`: the status, one JSON document;
                                           annotation aml-rollout.io/holder: the controller that
                                           last took the lease, and when (its claim, see the
                                           store)
    ConfigMap aml-rollout-<name>-commands  data `commands.jsonl`: operator commands, a JSON line
                                           each, append-only — a command's position never moves
    Lease     aml-rollout-<name>           coordination.k8s.io/v1: holderIdentity,
                                           leaseDurationSeconds, acquireTime, renewTime,
                                           leaseTransitions (client-go's leader-election fields)

`rollout.state.kubernetes` reads and writes them; everything decided from their content — the
names, whether a Lease is held, what a take-over, renewal or release writes, a command appended,
the size a ConfigMap may have — is here, as `istio_manifests` is for the Istio router; the RBAC
Role uses it without importing the kubernetes client.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from rollout import jsonl
from rollout.core.status import Command
from rollout.errors import ConfigError, StateError
from rollout.kubenames import (
    COMMANDS_SUFFIX,
    PREFIX,
    STATUS_SUFFIX,
    namespace_problem,
    rollout_name_problem,
)

Obj = dict[str, Any]

STATUS_KEY = "status.json"
COMMANDS_KEY = "commands.jsonl"
HOLDER_ANNOTATION = "aml-rollout.io/holder"
ROLLOUT_ANNOTATION = "aml-rollout.io/rollout"
LABELS = {"app.kubernetes.io/managed-by": "aml-rollout"}
LEASE_API = "coordination.k8s.io/v1"

#: What the API server accepts in one ConfigMap: the bytes of every `data` (and `binaryData`)
#: key and value together (Kubernetes' MaxSecretSize, which ConfigMaps share).
CONFIGMAP_MAX_BYTES = 1024 * 1024

#: What the kubernetes state store does through the API, and nothing else. The RBAC Role of the
#: chart and of `aml-rollout manifests` includes these rules (`istio_manifests.ROLE_RULES`);
#: tests/state/test_kubernetes.py checks they equal what a recorded run of the store used.
ROLE_RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("", "configmaps", ("create", "get", "patch")),
    ("coordination.k8s.io", "leases", ("create", "get", "patch")),
)


@dataclass(frozen=True, slots=True)
class StateObjects:
    """The names of one rollout's objects in one namespace (checked on construction)."""

    namespace: str
    rollout: str

    def __post_init__(self) -> None:
        if (problem := namespace_problem(self.namespace)) is not None:
            raise ConfigError(f"state.namespace: {problem}")
        if (problem := rollout_name_problem(self.rollout)) is not None:
            raise ConfigError(f"name: {problem}")

    @property
    def status(self) -> str:
        """The status ConfigMap."""
        return f"{PREFIX}{self.rollout}{STATUS_SUFFIX}"

    @property
    def commands(self) -> str:
        """The command-log ConfigMap."""
        return f"{PREFIX}{self.rollout}{COMMANDS_SUFFIX}"

    @property
    def lease(self) -> str:
        """The Lease."""
        return f"{PREFIX}{self.rollout}"

    def metadata(self, name: str, annotations: dict[str, str] | None = None) -> Obj:
        """Metadata for a new object of this rollout."""
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": dict(LABELS),
            "annotations": {ROLLOUT_ANNOTATION: self.rollout, **(annotations or {})},
        }


# ------------------------------------------------------------------------------------ writes
#
# A new object is POSTed whole. Every later write is a JSON merge patch of only our fields,
# carrying the resourceVersion it was computed from: the API server applies it only if the
# object is still that version (else 409), and leaves every other field as it is.


def resource_version(obj: Obj | None) -> str | None:
    """The resourceVersion of an object as read (None for no object)."""
    if obj is None:
        return None
    version = (obj.get("metadata") or {}).get("resourceVersion")
    return None if version is None else str(version)


def _guarded(obj: Obj, patch: Obj) -> Obj:
    """`patch`, applicable only while the object is still `obj`'s version."""
    version = resource_version(obj)
    if version is None:  # a null resourceVersion in a merge patch would make it unconditional
        raise StateError(f"{(obj.get('metadata') or {}).get('name')}: no resourceVersion")
    return {**patch, "metadata": {**(patch.get("metadata") or {}), "resourceVersion": version}}


# ----------------------------------------------------------------------------------- ConfigMaps


def configmap(objects: StateObjects, name: str, data: dict[str, str], claim: str = "") -> Obj:
    """A new ConfigMap of the rollout; `claim` stamps the holder annotation."""
    annotations = {HOLDER_ANNOTATION: claim} if claim else {}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": objects.metadata(name, annotations),
        "data": dict(data),
    }


def data_patch(obj: Obj, key: str, value: str) -> Obj:
    """Set one data key of `obj` (as read)."""
    return _guarded(obj, {"data": {key: value}})


def claim_patch(obj: Obj, claim: str) -> Obj:
    """Stamp `obj` (as read) with the holder annotation: a write that moves its version."""
    return _guarded(obj, {"metadata": {"annotations": {HOLDER_ANNOTATION: claim}}})


def claim_of(obj: Obj | None) -> str | None:
    """The holder annotation of a ConfigMap as read (None when absent)."""
    annotations = ((obj or {}).get("metadata") or {}).get("annotations") or {}
    value = annotations.get(HOLDER_ANNOTATION)
    return value if isinstance(value, str) else None


def data_of(obj: Obj | None, key: str) -> str | None:
    """One data value of a ConfigMap as read (None when absent)."""
    if obj is None:
        return None
    value = (obj.get("data") or {}).get(key)
    return value if isinstance(value, str) else None


def size_with(obj: Obj | None, key: str, value: str) -> int:
    """The bytes the API server counts against CONFIGMAP_MAX_BYTES once `key` is `value`."""
    data = {**((obj or {}).get("data") or {}), key: value}
    size = sum(len(k.encode()) + len(str(v).encode()) for k, v in data.items())
    binary = (obj or {}).get("binaryData") or {}
    return size + sum(len(k.encode()) + len(str(v).encode()) for k, v in binary.items())


def command_line(command: Command) -> str:
    """A command as one line of the log."""
    return json.dumps(command.to_dict(), sort_keys=True, separators=(",", ":")) + "\n"


def appended(log: str, line: str) -> str:
    """The log with `line` appended (a log not ending in a newline is ended first)."""
    if log and not log.endswith("\n"):
        log += "\n"
    return log + line


def parse_commands(log: str) -> list[Command | None]:
    """The commands of a log, oldest first; None for a line that is not a command.

    Lines are whole (each append is one atomic write of the ConfigMap). A line that does not
    parse (edited in by hand, or from a newer version) keeps its position, so positions mean
    the same to every reader, whatever it can parse. Blank lines are not positions.
    """
    return [Command.from_line(record) for record in jsonl.parse_lines(log.splitlines())]


# ---------------------------------------------------------------------------------------- Lease


def micro_time(at: float) -> str:
    """`at` (epoch seconds) as a MicroTime: RFC 3339 with exactly six fractional digits.

    The API server parses MicroTime with Go's `2006-01-02T15:04:05.000000Z07:00`, which refuses
    any other number of digits. Patches carry this string as it is; but a new Lease is POSTed
    through the client's typed model, which re-serialises the time with `datetime.isoformat()`
    and so drops a fraction of exactly zero (kubernetes client 37). A time is therefore never
    written on a whole second: one microsecond later, it always keeps its six digits.
    """
    moment = dt.datetime.fromtimestamp(at, dt.UTC)
    if moment.microsecond == 0:
        moment += dt.timedelta(microseconds=1)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def clock_time(at: float) -> str:
    """Epoch seconds as a time of day in UTC, as a log line says when: "17:47:10Z"."""
    return f"{dt.datetime.fromtimestamp(at, dt.UTC):%H:%M:%SZ}"


def parse_time(text: Any) -> float | None:
    """Epoch seconds of an RFC 3339 time (any precision), None when absent or unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def lease(objects: StateObjects, holder: str, ttl_s: int, now: float) -> Obj:
    """A new Lease held by `holder` from `now`."""
    return {
        "apiVersion": LEASE_API,
        "kind": "Lease",
        "metadata": objects.metadata(objects.lease),
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": ttl_s,
            "acquireTime": micro_time(now),
            "renewTime": micro_time(now),
            "leaseTransitions": 0,
        },
    }


def holder_of(obj: Obj | None) -> str | None:
    """The holderIdentity written in a Lease, live or not."""
    if obj is None:
        return None
    holder = (obj.get("spec") or {}).get("holderIdentity")
    return str(holder) if holder else None


def live_holder(obj: Obj, now: float) -> str | None:
    """Who holds the Lease at `now`: its holder while renewTime + leaseDurationSeconds is ahead.

    No holder (released), a lease past its duration (its controller stopped renewing: dead,
    frozen or cut off) or one with no readable renewTime (it cannot prove it is alive) is free.
    Times are compared across machines, so this trusts their clocks to agree to well within
    the ttl (NTP-synchronised nodes agree to milliseconds).
    """
    spec = obj.get("spec") or {}
    holder = holder_of(obj)
    if holder is None:
        return None
    renewed = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
    duration = spec.get("leaseDurationSeconds")
    if renewed is None or not isinstance(duration, int | float):
        return None
    return holder if renewed + duration > now else None


def renewed_ahead(obj: Obj, now: float) -> float | None:
    """How far the Lease's renewTime is ahead of `now`, when by more than its
    leaseDurationSeconds; else None. Clocks a ttl apart say nothing of the holder: a dead one
    whose clock ran an hour ahead would read as live for that hour (`live_holder`), so such a
    Lease is judged as client-go does, by whether it is seen to change."""
    spec = obj.get("spec") or {}
    renewed = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
    duration = spec.get("leaseDurationSeconds")
    if renewed is None or not isinstance(duration, int | float):
        return None
    return renewed - now if renewed - now > duration else None


def describe_holder(obj: Obj) -> str:
    """The holder as people read it: "<owner> pid N on host since 2024-05-01T10:00:00Z"."""
    spec = obj.get("spec") or {}
    holder = holder_of(obj) or "nobody"
    acquired = parse_time(spec.get("acquireTime"))
    if acquired is None:
        return holder
    return f"{holder} since {dt.datetime.fromtimestamp(acquired, dt.UTC):%Y-%m-%dT%H:%M:%SZ}"


def take_patch(obj: Obj, holder: str, ttl_s: int, now: float) -> Obj:
    """Make `holder` the holder of the Lease `obj` (as read); a new holder is one transition."""
    spec = obj.get("spec") or {}
    transitions = int(spec.get("leaseTransitions") or 0)
    if spec.get("holderIdentity") != holder:
        transitions += 1
    return _guarded(
        obj,
        {
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": ttl_s,
                "acquireTime": micro_time(now),
                "renewTime": micro_time(now),
                "leaseTransitions": transitions,
            }
        },
    )


def renew_patch(obj: Obj, now: float) -> Obj:
    """Renew the Lease `obj` (as last written) at `now`."""
    return _guarded(obj, {"spec": {"renewTime": micro_time(now)}})


def release_patch(obj: Obj) -> Obj:
    """Clear the holder of the Lease `obj` (as last written): the next controller takes it."""
    return _guarded(obj, {"spec": {"holderIdentity": None}})
