"""The rollout's persisted status, the actions the core asks for, and operator commands.

Everything here is a frozen value with a plain-JSON form (`to_dict` / `from_dict`), so the state
store can write it atomically and a restarted controller reads back exactly what was decided.

`pending` + `applied` are the controller's write-ahead log: a decision is persisted with its
actions *before* any is applied, and `applied` advances after each one. A controller killed at any
point re-applies the remaining actions on restart; every action is idempotent, so an action that
took effect just before the kill is harmless to apply again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from rollout.core.stats import Evidence
from rollout.core.types import Colour, Phase, Release, Served, Verdict, Weights

TERMINAL: frozenset[Phase] = frozenset({Phase.SUCCEEDED, Phase.ROLLED_BACK, Phase.FAILED})
#: Phases the controller steps through at once, without waiting for an analysis interval.
TRANSITIONAL: frozenset[Phase] = frozenset(
    {Phase.INITIALIZING, Phase.PROMOTING, Phase.FINALISING, Phase.ROLLING_BACK}
)


# ------------------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class SetWeights:
    """Send `blue` percent of default traffic to blue, the rest to green.

    With `mirror` (only while `blue` is 0), copy that percent of the traffic to blue as well:
    the shadow step, analysed on answers no user sees.
    """

    blue: int
    mirror: int = 0

    @property
    def weights(self) -> Weights:
        """The weights the router is asked to serve."""
        return Weights.blue_at(self.blue, self.mirror)


@dataclass(frozen=True, slots=True)
class Deploy:
    """Make `colour` serve `release` (Blue_Green deploys blue's release to green)."""

    colour: Colour
    release: Release


@dataclass(frozen=True, slots=True)
class Remove:
    """Remove `colour`'s workload (blue, after promotion)."""

    colour: Colour


Action = SetWeights | Deploy | Remove


def action_to_dict(action: Action) -> dict[str, Any]:
    """Plain-JSON form of an action."""
    if isinstance(action, SetWeights):
        out: dict[str, Any] = {"type": "set_weights", "blue": action.blue}
        if action.mirror:  # (absent when 0: ledgers and journals read as before)
            out["mirror"] = action.mirror
        return out
    if isinstance(action, Deploy):
        return {"type": "deploy", "colour": action.colour.value, "release": asdict(action.release)}
    return {"type": "remove", "colour": action.colour.value}


def action_from_dict(data: dict[str, Any]) -> Action:
    """Inverse of `action_to_dict`."""
    kind = data["type"]
    if kind == "set_weights":
        return SetWeights(blue=int(data["blue"]), mirror=int(data.get("mirror", 0)))
    if kind == "deploy":
        return Deploy(colour=Colour(data["colour"]), release=Release(**data["release"]))
    if kind == "remove":
        return Remove(colour=Colour(data["colour"]))
    raise ValueError(f"unknown action type {kind!r}")


def describe(action: Action) -> str:
    """One short human phrase for an action (ledger, explain, status view)."""
    if isinstance(action, SetWeights):
        return f"set weights {action.weights}"
    if isinstance(action, Deploy):
        return f"deploy {action.release.ref} to {action.colour.value}"
    return f"remove {action.colour.value}"


# ------------------------------------------------------------------------------------ commands

CommandKind = Literal["pause", "resume", "promote", "abort", "set_weight"]
COMMAND_KINDS: tuple[str, ...] = ("pause", "resume", "promote", "abort", "set_weight")


#: The JSON types of a command's fields as `to_dict` writes them (bool is refused separately).
_COMMAND_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "weight": (int, type(None)),
    "at": (int, float),
    "by": str,
    "rollout": str,
}


@dataclass(frozen=True, slots=True)
class Command:
    """An operator's request, queued in the state store and handled by the machine in order."""

    id: str
    kind: CommandKind
    weight: int | None = None
    at: float = 0.0
    by: str = ""
    #: The `Status.id` of the rollout the operator saw when queuing it ("" = whichever runs): a
    #: command aimed at a rollout that has since ended is never applied to the next one.
    rollout: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (without `rollout` when unset, as older readers expect)."""
        data = asdict(self)
        if not self.rollout:
            del data["rollout"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Command:
        """Inverse of `to_dict`; raises ValueError on an unknown kind or a field of the wrong
        type (a hand-edited log line with a list for an id would otherwise reach the core, which
        puts ids in sets); TypeError when it is not an object."""
        if not isinstance(data, dict):
            raise TypeError(f"a command is a JSON object, not {data!r}")
        if data.get("kind") not in COMMAND_KINDS:
            raise ValueError(f"unknown command kind {data.get('kind')!r}")
        for key, types in _COMMAND_FIELD_TYPES.items():
            value = data.get(key)
            if key in data and (isinstance(value, bool) or not isinstance(value, types)):
                raise ValueError(f"command field {key!r} is {value!r}")
        if "id" not in data:
            raise ValueError("command without an id")
        return cls(**data)

    @classmethod
    def from_line(cls, data: Any) -> Command | None:
        """A command log line's command, or None when it is not one this version can read (a
        line edited by hand, a kind or field from a newer version): it still takes its place in
        the log, so that positions mean the same to every reader."""
        if not isinstance(data, dict):
            return None
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError):
            return None


# -------------------------------------------------------------------------------------- status

#: `Status.over_slo_bound_s` of a status file written before the field: the guard's counts were
#: taken against the spec's bound of their day, which is not known now.
GUARD_BOUND_UNKNOWN = -1.0


@dataclass(frozen=True, slots=True)
class Counts:
    """Cumulative counts of one colour since the step began, as last seen by the judge."""

    requests: int = 0
    errors: int = 0
    slow: int = 0
    #: Requests above the latency guard's SLO (0 without a guard; -1 in a status file written
    #: before this field: unknown, so the guard counts from the tick after).
    over_slo: int = 0


@dataclass(frozen=True, slots=True)
class Status:
    """Everything the machine knows between ticks."""

    name: str
    #: Tells one rollout of `name` from the next (a new id each start, "" in old status files).
    id: str = ""
    #: The data plane it drives (the spec's `router.identity`; "" in old status files): another
    #: spec of the same name, on another data plane, must not resume or steer it.
    router: str = ""
    phase: Phase = Phase.INITIALIZING
    step_index: int = 0
    #: Blue's weight once the pending actions are applied (always a plan weight, or 0).
    blue_weight: int = 0
    #: Percent of live traffic mirrored to blue once the pending actions are applied (only in
    #: the shadow step: weight 0 with the spec's `mirror_percent`).
    mirror: int = 0
    started_at: float = 0.0
    step_started_at: float = 0.0
    #: Wall time since `step_started_at` the step's age does not count: steps of the wall
    #: clock (NTP), measured against the controller's monotonic clock between ticks.
    step_uncounted_s: float = 0.0
    updated_at: float = 0.0
    tick: int = 0
    candidate: Release | None = None
    stable: Release | None = None
    errors: Evidence = field(default_factory=Evidence)
    slow: Evidence = field(default_factory=Evidence)
    #: The latency bucket bound (seconds) above which a request is "slow"; fixed once chosen,
    #: but for a spec edited since (another `slo_ms`, or `threshold` switched): `_ingest`.
    slow_threshold_s: float | None = None
    #: Whether `slow_threshold_s` is the spec's SLO (`threshold: slo`), not a p99 bucket chosen
    #: from green's traffic: a spec switched to `baseline_p99` then chooses one (False in
    #: status files written before this field).
    slow_threshold_slo: bool = False
    last_blue: Counts = field(default_factory=Counts)
    last_green: Counts = field(default_factory=Counts)
    step_canary_requests: int = 0
    #: Canary requests above the latency guard's SLO over the rollout (the guard's count; its
    #: requests are the errors check's canary requests, folded from the same ticks).
    canary_over_slo: int = 0
    #: Canary requests whose latency was known, over the rollout: the guard's denominator
    #: (requests read without a histogram are neither over the SLO nor under it).
    canary_slo_requests: int = 0
    #: The latency guard's SLO (seconds) that `over_slo` and the two sums above were counted
    #: against (None: no guard counted them; GUARD_BOUND_UNKNOWN in status files written
    #: before this field). A spec edited since (`slo_ms`, the guard removed or switched off)
    #: re-bases `over_slo` and restarts the sums: a count above another bound is no base.
    over_slo_bound_s: float | None = None
    consecutive_errors: int = 0
    verdict: Verdict | None = None
    reason: str = ""
    #: Paused by the inconclusive policy (waiting for a human), not by an operator's `pause`.
    held: bool = False
    #: What the data plane served when last read while it differed from what the rollout set
    #: (held for a human: another rollout on it, a hand edit; or left so by an abort); None
    #: while it serves what the rollout set, and in status files written before this field.
    served: Served | None = None
    #: Commands read from the store's log but not yet handled.
    commands: tuple[Command, ...] = ()
    #: How many lines of the store's command log this status has read (-1: a status file
    #: written before this field, which remembered the ids in `handled` instead).
    commands_read: int = 0
    #: The ids of the last commands read, newest last (at most COMMANDS_TAIL): reading goes on
    #: after the latest of them in the log, wherever that now stands (() none read yet: from
    #: `commands_read`; None: a status file written before this field, whose `commands_read`
    #: counted only the lines it could read).
    commands_tail: tuple[str, ...] | None = ()
    handled: tuple[str, ...] = ()
    pending: tuple[Action, ...] = ()
    applied: int = 0

    @property
    def terminal(self) -> bool:
        """True once the rollout has ended (Succeeded, RolledBack or Failed)."""
        return self.phase in TERMINAL

    @property
    def weights(self) -> Weights:
        """What the data plane serves once the pending actions are applied."""
        return Weights.blue_at(self.blue_weight, self.mirror)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (what the state store writes)."""
        return {
            "name": self.name,
            "id": self.id,
            "router": self.router,
            "phase": self.phase.value,
            "step_index": self.step_index,
            "blue_weight": self.blue_weight,
            "mirror": self.mirror,
            "started_at": self.started_at,
            "step_started_at": self.step_started_at,
            "step_uncounted_s": self.step_uncounted_s,
            "updated_at": self.updated_at,
            "tick": self.tick,
            "candidate": asdict(self.candidate) if self.candidate else None,
            "stable": asdict(self.stable) if self.stable else None,
            "errors": _evidence_to_dict(self.errors),
            "slow": _evidence_to_dict(self.slow),
            "slow_threshold_s": self.slow_threshold_s,
            # (Absent when False: a status file reads as it did before the field.)
            **({"slow_threshold_slo": True} if self.slow_threshold_slo else {}),
            "last_blue": asdict(self.last_blue),
            "last_green": asdict(self.last_green),
            "step_canary_requests": self.step_canary_requests,
            "canary_over_slo": self.canary_over_slo,
            "canary_slo_requests": self.canary_slo_requests,
            "over_slo_bound_s": self.over_slo_bound_s,
            "consecutive_errors": self.consecutive_errors,
            "verdict": self.verdict.value if self.verdict else None,
            "reason": self.reason,
            "held": self.held,
            "served": _served_to_dict(self.served) if self.served else None,
            "commands": [c.to_dict() for c in self.commands],
            "commands_read": self.commands_read,
            "commands_tail": None if self.commands_tail is None else list(self.commands_tail),
            "handled": list(self.handled),
            "pending": [action_to_dict(a) for a in self.pending],
            "applied": self.applied,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Status:
        """Inverse of `to_dict`; raises KeyError/ValueError/TypeError on a malformed document,
        values a status never holds included (a hand edit): at load, the store's one line,
        not a traceback from the first tick or `status` that uses them."""
        try:
            status = cls._from_dict(data)
        except OverflowError as exc:  # `"tick": 1e400`, read as infinity
            raise ValueError(f"a number out of range ({exc})") from exc
        _ = status.weights  # raises ValueError: blue outside 0..100, or mirrored above 0 %
        if not 0 <= status.applied <= len(status.pending):
            raise ValueError(f"applied {status.applied} of {len(status.pending)} pending actions")
        return status

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> Status:
        return cls(
            name=data["name"],
            id=data.get("id", ""),
            router=str(data.get("router", "")),
            phase=Phase(data["phase"]),
            step_index=int(data["step_index"]),
            blue_weight=int(data["blue_weight"]),
            mirror=int(data.get("mirror", 0)),
            started_at=float(data["started_at"]),
            step_started_at=float(data["step_started_at"]),
            step_uncounted_s=float(data.get("step_uncounted_s", 0.0)),
            updated_at=float(data["updated_at"]),
            tick=int(data["tick"]),
            candidate=Release(**data["candidate"]) if data.get("candidate") else None,
            stable=Release(**data["stable"]) if data.get("stable") else None,
            errors=_evidence_from_dict(data["errors"]),
            slow=_evidence_from_dict(data["slow"]),
            slow_threshold_s=data.get("slow_threshold_s"),
            slow_threshold_slo=_boolean(
                data.get("slow_threshold_slo", False), "slow_threshold_slo"
            ),
            last_blue=_counts_from_dict(data["last_blue"]),
            last_green=_counts_from_dict(data["last_green"]),
            step_canary_requests=int(data["step_canary_requests"]),
            canary_over_slo=int(data.get("canary_over_slo", 0)),
            # A status file from before this field: the errors check's requests, as then.
            canary_slo_requests=int(
                data.get("canary_slo_requests", data["errors"]["canary_requests"])
            ),
            over_slo_bound_s=_bound(data.get("over_slo_bound_s", GUARD_BOUND_UNKNOWN)),
            consecutive_errors=int(data["consecutive_errors"]),
            verdict=Verdict(data["verdict"]) if data.get("verdict") else None,
            reason=data.get("reason", ""),
            held=_boolean(data.get("held", False), "held"),
            served=_served_from_dict(data["served"]) if data.get("served") else None,
            commands=tuple(Command.from_dict(c) for c in data.get("commands", [])),
            commands_read=int(data.get("commands_read", -1)),
            commands_tail=None
            if data.get("commands_tail") is None
            else tuple(str(i) for i in data["commands_tail"]),
            handled=tuple(data.get("handled", [])),
            pending=tuple(action_from_dict(a) for a in data.get("pending", [])),
            applied=int(data.get("applied", 0)),
        )


def _boolean(value: Any, name: str) -> bool:
    # (bool("false") is True: a hand-edited "false" held the rollout.)
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {value!r}")
    return value


def _bound(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"over_slo_bound_s must be a number or null, got {value!r}")
    return float(value)


def _served_to_dict(served: Served) -> dict[str, Any]:
    weights = served.weights
    return {
        "weights": {"blue": weights.blue, "green": weights.green, "mirror": weights.mirror},
        "blue": asdict(served.blue) if served.blue else None,
        "green": asdict(served.green) if served.green else None,
    }


def _served_from_dict(data: dict[str, Any]) -> Served:
    weights = data["weights"]
    return Served(
        weights=Weights(
            blue=int(weights["blue"]),
            green=int(weights["green"]),
            mirror=int(weights.get("mirror", 0)),
        ),
        blue=Release(**data["blue"]) if data.get("blue") else None,
        green=Release(**data["green"]) if data.get("green") else None,
    )


def _counts_from_dict(data: dict[str, Any]) -> Counts:
    # A status file written before `over_slo`: the step's count so far is unknown (-1).
    return Counts(**{"over_slo": -1, **data})


def _evidence_to_dict(ev: Evidence) -> dict[str, Any]:
    return {
        "worse": list(ev.worse),
        "ok": list(ev.ok),
        "canary_bad": ev.canary_bad,
        "baseline_bad": ev.baseline_bad,
        "canary_requests": ev.canary_requests,
        "baseline_requests": ev.baseline_requests,
        "log_e_worse": ev.log_e_worse_value,
        "log_e_ok": ev.log_e_ok_value,
        "low": list(ev.low),
        "log_e_ratio": ev.log_e_ratio_value,
        "log_e_low": ev.log_e_low_value,
        "margin": ev.margin,
        "negligible": ev.negligible,
    }


def _evidence_from_dict(data: dict[str, Any]) -> Evidence:
    return Evidence(
        worse=tuple(float(x) for x in data["worse"]),
        ok=tuple(float(x) for x in data["ok"]),
        canary_bad=int(data["canary_bad"]),
        baseline_bad=int(data["baseline_bad"]),
        canary_requests=int(data["canary_requests"]),
        baseline_requests=int(data["baseline_requests"]),
        log_e_worse_value=float(data["log_e_worse"]),
        log_e_ok_value=float(data["log_e_ok"]),
        # Status files written before the negligible-rate test: "ok" was the ratio test alone.
        low=tuple(float(x) for x in data.get("low", Evidence().low)),
        log_e_ratio_value=float(data.get("log_e_ratio", data["log_e_ok"])),
        log_e_low_value=float(data.get("log_e_low", 0.0)),
        # Status files written before these were kept: taken as the spec's at the next tick.
        margin=None if data.get("margin") is None else float(data["margin"]),
        negligible=None if data.get("negligible") is None else float(data["negligible"]),
    )
