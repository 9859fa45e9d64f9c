"""The rollout state machine: `step(spec, status, observation, now) -> Decision(status, actions)`.

Pure: no clock, no I/O. The controller observes, calls `step`, persists the decision, and applies
its actions through the router. Phases (terminal in brackets):

    Initializing ─► Progressing ◄─► Paused
                        │  │            │
        step passed at  │  └─ Failed ─► RollingBack ─► [RolledBack]
        the last step   ▼               (blue → 0 % at once)
                    Promoting ─► Finalising ─► [Succeeded]
            Blue_100 then        Green_100, blue
            Blue_Green           removed

- Initializing: deploy the candidate to blue, set the first planned weight; with a history
  observation (green before the rollout) choose the latency check's "slow" bucket from it. An
  abort queued before then (no controller ran) ends it there: RolledBack, blue given nothing.
- Progressing: every tick folds the new counts into the e-processes (see `rollout.core.stats`) and
  judges the step: Failed → roll back; Successful → next planned weight (or promotion after the
  last one below 100); Inconclusive → wait, and after `max_step_duration_s` follow
  `on_inconclusive` (hold = Paused for a human, or roll back). Metrics errors count as
  Inconclusive until `max_consecutive_errors` in a row, then the same policy applies.
- Paused: no step advances, but the judge keeps watching: a clear regression still rolls back.
- Promoting reads an abort (green still serves the stable release): RollingBack, blue to 0 %;
  so does Finalising while its deploy to green is unapplied (`promotion_unapplied`: the
  controller hands it over as Promoting).
- Operator commands (pause, resume, promote, abort, set_weight) arrive queued in the status and
  are handled here, in order, at the start of a tick — never racing an analysis. Counts in
  hand that fail the candidate come first: it rolls back, and a promote, set-weight, resume or
  pause read with them is dropped (an abort rolls back as it would). An abort read after a
  promote or set-weight in one batch wins: theirs are noted as dropped, not acted on.
- A data plane that no longer serves what the rollout set (another rollout on it, a hand edit;
  `served`, read by the controller) holds for a human before the judge looks: those counts are
  not the step's evidence. A resume sets it back; an abort sets blue to 0 % only while blue
  serves the candidate (else it is another rollout's canary: the rollout ends, acting on nothing).
- A plan edited mid-rollout (`steps` changed, then the controller restarted): the step goes on
  as blue's weight's step in the new plan; a weight the new plan lacks holds for a human.

Invariants (property-tested): blue's weight is always 0 or a planned weight; a Failed verdict
ends with blue at 0; no traffic is neither a pass nor an instant fail; promotion happens once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from rollout.core.stats import Evidence, log_e_above, log_e_below
from rollout.core.status import (
    GUARD_BOUND_UNKNOWN,
    TERMINAL,
    Action,
    Command,
    Counts,
    Deploy,
    Remove,
    SetWeights,
    Status,
    action_to_dict,
)
from rollout.core.types import (
    Colour,
    ColourCounts,
    Observation,
    Phase,
    Release,
    Served,
    Verdict,
)

if TYPE_CHECKING:
    from rollout.config import AnalysisConfig, RolloutSpec

#: Green requests (before the rollout, or in its first step) before their p99 bucket is trusted as
#: the "slow" threshold.
MIN_BASELINE_FOR_P99 = 500
#: Share of baseline requests above the chosen bucket: about its p99.
P99_TAIL = 0.01
#: A bound with more of the baseline above it than this leaves the latency check next to no room
#: (both colours nearly all "slow"): the next bound up with none above it is taken instead.
MAX_P99_TAIL = 0.1
#: A bound with this share of the baseline above it or more is deaf: a canary, however slow, has
#: at most 1/0.75 = 1.33× the baseline's share above it (all of its requests), too little for the
#: "worse" test to tell apart from chance (and a `_seconds` histogram read as ms has all of them
#: above). Below it the bound still tells (60 % of green above it: a canary with all of it above
#: rolled back at the first step), so the largest finite bound is taken rather than latency left
#: unjudged. "Not worse" is another matter: from half on, "< 2× baseline" holds for any canary
#: (`_vacuous`), judged from the rollout's own baseline.
DEAF_P99_TAIL = 0.75
#: Absolute guards fire when their e-value against "at most the limit" reaches 1/GUARD_ALPHA: the
#: chance a canary within the limit ever trips one is at most this, however often it looks — over
#: the rollout, for each guard (both count the canary's requests over the whole rollout).
GUARD_ALPHA = 0.001
GUARD_LOG_THRESHOLD = math.log(1.0 / GUARD_ALPHA)
#: Mirrored copies green's counted live traffic should have brought before a shadow step with
#: none counted asks whether the metrics source counts them at all (with 10 expected, none by
#: chance is ~e^-10); before that, it only says none is counted yet.
UNCOUNTED_COPIES_ASK = 10
#: The errors check's weight in the "worse" e-value when latency is judged too (latency gets the
#: rest). A check with weight w_i crosses 1/α after about ln(1/(α w_i)) / I_i requests, I_i being
#: its evidence per request, so the total is least with w_i ∝ 1/I_i: w ≈ 0.9 at a 0.1 % error
#: rate (slow requests are ~1 % by construction, ~10× the events), 0.5 when errors are as
#: frequent as slow requests. 0.75 is within 3-4 % of the best in both cases (0.9 would lose
#: 14 % in the second). Measured: 5-12 % fewer canary requests to roll back 2× to 50× error
#: regressions, 12 % more for the +30 % latency one (docs/engine.md).
ERRORS_WEIGHT = 0.75


@dataclass(frozen=True, slots=True)
class Decision:
    """The new status, the actions that bring the data plane in line with it, and a ledger line."""

    status: Status
    actions: tuple[Action, ...] = ()
    record: dict[str, Any] = field(default_factory=dict)


def new_status(
    spec: RolloutSpec,
    *,
    now: float,
    candidate: Release | None = None,
    stable: Release | None = None,
    rollout_id: str = "",
    commands_read: int = 0,
    commands_tail: tuple[str, ...] = (),
) -> Status:
    """The status of a rollout that has not started yet.

    `commands_read` is the length of the store's command log now and `commands_tail` its last
    ids (`command_tail((), log)`): commands queued for earlier rollouts of the same name are
    never read by this one.
    """
    if candidate is None and spec.candidate is not None:
        candidate = spec.candidate.to_release()
    if stable is None and spec.stable is not None:
        stable = spec.stable.to_release()
    return Status(
        name=spec.name,
        id=rollout_id,
        router=spec.router.identity,
        commands_read=commands_read,
        commands_tail=commands_tail,
        started_at=now,
        step_started_at=now,
        updated_at=now,
        candidate=candidate,
        stable=stable,
    )


#: How many of the last read command ids a status keeps as anchors in the log.
COMMANDS_TAIL = 16


def with_commands(status: Status, commands: Sequence[Command | None]) -> Status:
    """Queue the commands of the store's log (`commands`, oldest first) not read before.

    Returns `status` itself when there is nothing new. Reading goes on after the latest command
    in the log that was read before (`Status.commands_tail`: the last few ids), wherever it now
    stands: no command is read twice however long the log, and an edit of lines already read
    (one deleted, garbled or pushed twice) replays nothing. A log that holds none of them was
    deleted and begun again (e.g. a full Kubernetes command log): it is read from its start.
    None entries (lines this version cannot read) are skipped.
    """
    if status.commands_read < 0:  # a status file from before `commands_read`: skip by id
        known = set(status.handled) | {c.id for c in status.commands}
        fresh = _once_each(c for c in commands if c is not None and c.id not in known)
        return replace(
            status,
            commands=status.commands + fresh,
            commands_read=len(commands),
            commands_tail=command_tail((), commands),
            handled=(),
        )
    unread = commands[unread_from(status, commands) :]
    seen = set(status.commands_tail or ())
    fresh = _once_each(c for c in unread if c is not None and c.id not in seen)
    if not fresh:
        return status
    return replace(
        status,
        commands=status.commands + fresh,
        commands_read=len(commands),
        commands_tail=command_tail(status.commands_tail or (), unread),
    )


def command_tail(tail: tuple[str, ...], read: Sequence[Command | None]) -> tuple[str, ...]:
    """`tail` followed by the ids just `read` (duplicates too: the log's order), the last few."""
    return (*tail, *(c.id for c in read if c is not None))[-COMMANDS_TAIL:]


def unread_from(status: Status, commands: Sequence[Command | None]) -> int:
    """Where the commands `status` has not read begin in the log."""
    tail, position = status.commands_tail, status.commands_read
    if tail:
        at = commands[position - 1] if 0 < position <= len(commands) else None
        if at is not None and at.id == tail[-1]:
            return position  # the log as it was read, grown at most
        anchors = set(tail)
        for index in range(len(commands) - 1, -1, -1):
            command = commands[index]
            if command is not None and command.id in anchors:
                return index + 1  # edited before that point
        return 0  # none of them left: begun again
    if tail is None:  # saved by an earlier version: it counted readable lines only
        readable = [index for index, c in enumerate(commands) if c is not None]
        if position == 0 or len(readable) < position:
            return 0
        return readable[position - 1] + 1
    return position if position <= len(commands) else 0


def _once_each(commands: Iterable[Command]) -> tuple[Command, ...]:
    seen: set[str] = set()
    out = []
    for command in commands:
        if command.id not in seen:
            seen.add(command.id)
            out.append(command)
    return tuple(out)


def step(
    spec: RolloutSpec,
    status: Status,
    observation: Observation | None,
    now: float,
    served: Served | None = None,
    elapsed: float | None = None,
) -> Decision:
    """Decide one tick. `observation` may be None in phases that do not analyse; `served` is
    what the data plane serves (None when it was not read): one that no longer serves what
    the rollout set holds it for a human (`_drift`). `elapsed` is the time since the last
    tick (`status.updated_at`) on a clock that never steps (None when unknown: the first tick
    of a controller, whose wall time since then is taken as it is); the step ages by it, not
    by a step of the wall clock (`step_age`)."""
    before = status
    status = replace(status, tick=status.tick + 1, updated_at=now)
    record: dict[str, Any] = {"tick": status.tick, "at": now, "phase_before": before.phase.value}
    if elapsed is not None and (stepped := (now - before.updated_at) - elapsed):
        # The wall clock moved by more (or less) than the time that passed: an NTP step. Not
        # the step's age: a healthy step would end inconclusive at the next tick.
        status = replace(status, step_uncounted_s=status.step_uncounted_s + stepped)
        if abs(stepped) >= 1.0:
            record["clock_stepped_s"] = round(stepped, 3)

    if status.phase in TERMINAL:
        status, notes = _drop_commands(status, "ignored: the rollout has ended")
        return _decide(status, (), record, notes)
    if status.phase is Phase.INITIALIZING:
        if (abort := queued_abort(status, status.commands)) is not None:
            # Queued while no controller ran, before its first tick: it comes first, so blue
            # is never given the first step's traffic only to lose it a whole interval later.
            who = f" by {abort.by}" if abort.by else ""
            reason = f"aborted{who} before its first tick: blue was given nothing"
            status = replace(
                status,
                phase=Phase.ROLLED_BACK,
                blue_weight=0,
                mirror=0,
                reason=reason,
                commands=tuple(c for c in status.commands if c is not abort),
            )
            return _decide(status, (), record, [f"abort: {reason}"])
        status = _threshold_from_history(spec, status, observation, record)
        return _decide(*_start(spec, status, now), record)
    if status.phase is Phase.PROMOTING:
        if (abort := queued_abort(status, status.commands)) is not None:
            # Green still serves the stable release until Finalising: blue to 0 % undoes the
            # promotion. The one way out of a promotion whose weights the router refuses for
            # good (its namespace or endpoint gone): `run` stopped at them every time.
            status, actions = _abort_promotion(
                replace(status, commands=tuple(c for c in status.commands if c is not abort)),
                abort,
            )
            return _decide(status, actions, record, [f"abort: {status.reason}"])
        candidate = status.candidate
        if candidate is None:
            reason = "cannot promote: the candidate release is unknown; blue back to 0 %"
            status = replace(status, phase=Phase.FAILED, blue_weight=0, reason=reason)
            return _decide(status, (SetWeights(0),), record)
        status = replace(
            status,
            phase=Phase.FINALISING,
            reason=f"Blue_Green: green now serves {_name(candidate)}",
        )
        return _decide(status, (Deploy(Colour.GREEN, candidate),), record)
    if status.phase is Phase.FINALISING:
        status = replace(
            status,
            phase=Phase.SUCCEEDED,
            blue_weight=0,
            reason=f"Green_100: promoted {_name(status.candidate)}; blue removed",
        )
        return _decide(status, (SetWeights(0), Remove(Colour.BLUE)), record)
    if status.phase is Phase.ROLLING_BACK:
        status = replace(status, phase=Phase.ROLLED_BACK)
        return _decide(status, (), record)
    return _analyse(spec, status, observation, now, record, served)


def step_age(status: Status, now: float) -> float:
    """How long the current step has run at `now`: wall time since it began, less the wall
    clock's steps the controller measured between ticks (`Status.step_uncounted_s`)."""
    return max(now - status.step_started_at - status.step_uncounted_s, 0.0)


def queued_abort(status: Status, commands: Iterable[Command]) -> Command | None:
    """The first abort of this rollout among `commands` (queued, oldest first), or None. A
    promote before it does not hide it: an abort is read while promoting too."""
    for command in commands:
        if command.rollout and command.rollout != status.id:
            continue  # the machine ignores it too
        if command.kind == "abort":
            return command
    return None


def promotion_unapplied(status: Status) -> bool:
    """Whether a Finalising rollout's Blue_Green (green ← the candidate) is still to be applied:
    green then still serves the stable release, and an abort undoes the promotion as in
    Promoting. The way out of a deploy to green that fails for good (no quota for a second copy
    of the candidate): every `run` stopped at it, and no command was read."""
    return status.phase is Phase.FINALISING and any(
        isinstance(a, Deploy) and a.colour is Colour.GREEN for a in status.pending[status.applied :]
    )


def _abort_promotion(status: Status, abort: Command) -> tuple[Status, tuple[Action]]:
    """Roll a promotion back: until Finalising, green still serves the stable release."""
    who = f" by {abort.by}" if abort.by else ""
    stable = f", green keeps serving {status.stable.ref}" if status.stable else ""
    return _rollback(
        status,
        f"aborted{who} while promoting: blue back to 0 %{stable} (the promotion of "
        f"{_name(status.candidate)} abandoned)",
        None,
    )


def candidate_failed(status: Status, problem: str, now: float) -> Decision:
    """Blue's deploy failed for good (`problem`: an image that never starts, a quota, pods never
    ready): the rollout fails with blue at 0 %. Nothing of the candidate was judged and none
    of its answers were served; trying again would only wait for it again."""
    before = status
    status = replace(
        status,
        tick=status.tick + 1,
        updated_at=now,
        phase=Phase.FAILED,
        blue_weight=0,
        mirror=0,
        reason=f"{_name(status.candidate)} could not be deployed to blue: {problem}",
    )
    record = {"tick": status.tick, "at": now, "phase_before": before.phase.value}
    return _decide(status, (SetWeights(0),), record)


# ----------------------------------------------------------------------------------- internals


def _decide(
    status: Status,
    actions: tuple[Action, ...],
    record: dict[str, Any],
    notes: list[str] | None = None,
) -> Decision:
    if status.held and status.phase is not Phase.PAUSED:
        status = replace(status, held=False)
    if status.phase in TERMINAL and status.commands:
        # Queued while it promoted or rolled back (phases that read no command), or before
        # a first deploy that failed: none acts now. Said, not kept in the status for ever.
        status, dropped = _drop_commands(
            status, f"dropped, not acted on: the rollout ended {status.phase.value} first"
        )
        notes = [*(notes or []), *dropped]
    record = {
        **record,
        "phase": status.phase.value,
        "step": status.step_index,
        "weight": status.blue_weight,
        **({"mirror": status.mirror} if status.mirror else {}),
        "verdict": status.verdict.value if status.verdict else None,
        "reason": status.reason,
        "held": status.held,
        "actions": [action_to_dict(a) for a in actions],
    }
    if notes:
        record["commands"] = notes
    return Decision(status=status, actions=actions, record=record)


def _name(release: Release | None) -> str:
    return release.ref if release else "the candidate"


def _threshold_from_history(
    spec: RolloutSpec, status: Status, history: Observation | None, record: dict[str, Any]
) -> Status:
    """Choose the baseline's p99 bucket from green's traffic before the rollout, if enough.

    Chosen on data the rollout never tests, so the latency check counts from the first tick;
    without enough history it is chosen from the first step instead (see `_ingest`).
    """
    if not spec.analysis.latency.uses_baseline_p99 or status.slow_threshold_s is not None:
        return status
    if history is None or history.error is not None:
        return status
    record["history"] = {"since": history.since, "at": history.at, "green": history.green.requests}
    threshold = _baseline_bucket(history.green)
    if threshold is None:
        if history.green.requests >= MIN_BASELINE_FOR_P99:
            record["history"]["no_threshold"] = _no_threshold_why(history.green)
        return status
    record["history"]["slow_threshold_ms"] = threshold * 1000.0
    return replace(status, slow_threshold_s=threshold)


def _start(spec: RolloutSpec, status: Status, now: float) -> tuple[Status, tuple[Action, ...]]:
    first = spec.plan[0]
    actions: list[Action] = []
    if status.candidate is not None:
        actions.append(Deploy(Colour.BLUE, status.candidate))
    if first == 100:
        status = replace(status, phase=Phase.PROMOTING, blue_weight=100, step_index=0)
        return replace(status, reason="plan starts at 100 %: promote"), (
            *actions,
            SetWeights(100),
        )
    mirror = _mirror_at(spec, first)
    actions.append(SetWeights(first, mirror))
    status = _enter_step(status, 0, first, now, mirror)
    reason = f"started: blue at {first} %"
    if mirror:
        reason += (
            f", {mirror} % of live traffic mirrored to it (shadow: its answers are judged, never"
            " served)"
        )
    if status.slow_threshold_s is not None:  # only the history sets it this early
        reason += (
            f"; slow = above {status.slow_threshold_s * 1000:g} ms, green's p99 bucket before the"
            " rollout"
        )
    status = replace(status, phase=Phase.PROGRESSING, reason=reason)
    return status, tuple(actions)


def _mirror_at(spec: RolloutSpec, weight: int) -> int:
    """Percent mirrored to blue at a plan weight: the shadow step's at 0 %, else none."""
    return spec.shadow_percent if weight == 0 else 0


def _step_name(status: Status) -> str:
    """How the reasons name the current step."""
    if status.mirror:
        return f"the shadow step ({status.mirror} % mirrored)"
    return f"step {status.blue_weight} %"


def _enter_step(status: Status, index: int, weight: int, now: float, mirror: int = 0) -> Status:
    """Begin step `index`: counts restart (observations are cumulative since the step began)."""
    return replace(
        status,
        step_index=index,
        blue_weight=weight,
        mirror=mirror,
        step_started_at=now,
        step_uncounted_s=0.0,
        last_blue=Counts(),
        last_green=Counts(),
        step_canary_requests=0,
        consecutive_errors=0,
    )


def _rollback(status: Status, reason: str, verdict: Verdict | None) -> tuple[Status, tuple[Action]]:
    status = replace(
        status,
        phase=Phase.ROLLING_BACK,
        blue_weight=0,
        mirror=0,
        verdict=verdict or status.verdict,
        reason=reason,
    )
    return status, (SetWeights(0),)


def _promote(status: Status, reason: str) -> tuple[Status, tuple[Action]]:
    status = replace(status, phase=Phase.PROMOTING, blue_weight=100, mirror=0, reason=reason)
    return status, (SetWeights(100),)


def _drop_commands(status: Status, why: str) -> tuple[Status, list[str]]:
    notes = [f"{c.kind}{f' by {c.by}' if c.by else ''}: {why}" for c in status.commands]
    return replace(status, commands=()), notes


def _handle_commands(
    spec: RolloutSpec, status: Status, now: float, served: Served | None = None
) -> tuple[Status, tuple[Action, ...], list[str]]:
    """Apply queued operator commands in order; later ones see the effect of earlier ones.

    A resume, promote or set-weight while the data plane has drifted (`served`, see `_drift`;
    this tick's reading, else the held status's) also sets it back first; a promote or
    set-weight is refused while blue serves another release (`steering_refused`)."""
    actions: list[Action] = []
    notes: list[str] = []
    # The notes of the promotes and set-weights acted on so far in this batch: an abort read
    # after them wins, and they are noted as dropped (was: as done, and `explain` told a
    # weight set that was never served).
    steered: list[tuple[int, Command]] = []

    def abort_wins() -> None:
        for index, earlier in steered:
            notes[index] = f"{_typed(earlier)}: dropped, not acted on: the abort read after it wins"
        steered.clear()

    plan = spec.plan
    for cmd in status.commands:
        # Unread this tick (a router blip): what the held status last read. Once a command
        # set the data plane back, the status says `served` is None: it serves ours again.
        seen = served if served is not None else status.served
        who = f" by {cmd.by}" if cmd.by else ""
        if cmd.rollout and cmd.rollout != status.id:
            notes.append(
                f"{cmd.kind}{who}: ignored, queued for an earlier rollout of {status.name}"
            )
            continue
        if status.phase is Phase.PROMOTING and cmd.kind == "abort":
            # A promote (or set-weight 100) earlier in this batch: the abort comes after it and
            # wins, before the promotion's weights are ever served.
            status, acts = _abort_promotion(status, cmd)
            actions = list(acts)  # an abort wins over the commands before it (below)
            abort_wins()
        elif status.phase not in (Phase.PROGRESSING, Phase.PAUSED):
            notes.append(f"{cmd.kind}: ignored in phase {status.phase.value}")
            continue
        elif cmd.kind == "abort":
            if not_ours := _blue_not_ours(status, seen):
                # Blue's weight is whoever deployed there's (another rollout's canary): set to
                # 0 %, that rollout would lose its traffic and hold in turn. Ended, not undone.
                status = replace(
                    status,
                    phase=Phase.ROLLED_BACK,
                    blue_weight=0,
                    mirror=0,
                    reason=f"aborted{who}: the data plane is left as it is ({not_ours})",
                    served=seen,
                )
                notes.append(f"{cmd.kind}: {status.reason}")
                actions = []  # an abort wins over the commands before it (below)
                abort_wins()
                continue
            status, acts = _rollback(status, f"aborted{who}: blue back to 0 %", None)
            # An abort wins over the commands read before it in this batch: a set-weight's 50 %
            # served before the 0 %, a promote's deploy to blue that could fail the abort.
            actions = list(acts)
            abort_wins()
        elif cmd.kind in ("promote", "set_weight") and (refused := _steering_refused(status, seen)):
            notes.append(f"{_typed(cmd)}: ignored, {refused}")
            continue
        elif cmd.kind == "promote":
            restore, back = _setting_back(status, seen)
            status, acts = _promote(status, f"promoted{who} (analysis skipped){back}")
            actions.extend((*restore, *acts))
            if back:
                status, served = replace(status, served=None), None  # as after a resume
        elif cmd.kind == "pause":
            # Of a held rollout: the human's answer, an operator's pause from now on (its `run`
            # goes on guarding, as the docs say), the hold's why kept. (Was: still held, `run`
            # returned at once, and the why was gone.)
            was = f" (was {status.reason})" if status.held else ""
            status = replace(status, phase=Phase.PAUSED, held=False, reason=f"paused{who}{was}")
        elif cmd.kind == "resume":
            if status.phase is not Phase.PAUSED:
                notes.append("resume: ignored, not paused")
                continue
            if off_plan := _off_plan(plan, status.blue_weight):
                # Resumed, the next tick would hold it again, for the same reason.
                notes.append(f"resume: ignored, {off_plan}")
                continue
            # Unread this tick: the held status's last reading, as for abort (else a router
            # blip resumed the step on a data plane that lost blue, or weights edited by hand).
            drift = _drift(status, seen)
            restore, refused = _restoring(status, seen) if seen and drift else ((), "")
            if refused:
                notes.append(f"resume: ignored, {refused}")
                continue
            status = _enter_step(status, status.step_index, status.blue_weight, now, status.mirror)
            back = f"; the data plane set back ({drift})" if drift else ""
            status = replace(
                status, phase=Phase.PROGRESSING, reason=f"resumed{who}{back}", served=None
            )
            actions.extend(restore)
            served = None  # as the status says, once the restore is applied
        elif cmd.kind == "set_weight":
            if cmd.weight not in plan:
                notes.append(f"set_weight {cmd.weight}: ignored, not in the plan {list(plan)}")
                continue
            restore, back = _setting_back(status, seen)
            if cmd.weight == 100:
                status, acts = _promote(status, f"weight set to 100 %{who}: promoting{back}")
                actions.extend((*restore, *acts))
            else:
                mirror = _mirror_at(spec, cmd.weight)
                status = _enter_step(status, plan.index(cmd.weight), cmd.weight, now, mirror)
                status = replace(status, reason=f"weight set to {cmd.weight} %{who}{back}")
                if status.held:
                    # Held, `run` returns: kept held, the weight set would be served with no
                    # one watching it. The analysis goes on from there, as the help says. (An
                    # operator's pause stays: its `run` still watches.)
                    status = replace(status, phase=Phase.PROGRESSING, held=False)
                actions.extend((*restore, SetWeights(cmd.weight, mirror)))
            if back:
                status, served = replace(status, served=None), None  # as after a resume
        if cmd.kind in ("promote", "set_weight"):
            steered.append((len(notes), cmd))
        notes.append(f"{cmd.kind}: {status.reason}")
    return replace(status, commands=()), tuple(actions), notes


def _typed(cmd: Command) -> str:
    """A command as its note names it: `set_weight 50`, `promote by ann`."""
    weight = f" {cmd.weight}" if cmd.weight is not None else ""
    return f"{cmd.kind}{weight}{f' by {cmd.by}' if cmd.by else ''}"


def _steering_refused(status: Status, served: Served | None) -> str:
    """Why a promote or set-weight may not act on this data plane ("" when it may): blue serves
    another release (another rollout's canary, never judged here: promoted, all users would get
    it and that rollout's blue be removed; at a set weight, users would get it at that weight),
    or green does (production moved on: `_restoring`)."""
    if served is None:
        return ""
    if not_ours := _blue_not_ours(status, served):
        return (
            f"{not_ours} resume first (it sets blue back to {_name(status.candidate)}), or "
            "abort (it leaves the data plane as it is)"
        )
    return _restoring(status, served)[1] if _drift(status, served) else ""


def _setting_back(status: Status, served: Served | None) -> tuple[tuple[Action, ...], str]:
    """The deploys a promote or set-weight makes first on a drifted data plane (a colour that
    lost its release: its weights would be refused for good, the rollout stuck at them), and
    the words saying so; its own weights come after, as resume's do."""
    if served is None or not (drift := _drift(status, served)):
        return (), ""
    restore, _ = _restoring(status, served)
    deploys = tuple(a for a in restore if isinstance(a, Deploy))
    return deploys, f"; the data plane set back ({drift})"


def steering_refused(status: Status) -> str:
    """Why a promote or set-weight of this held rollout would be refused ("" when it would
    not), from what the data plane served at its last tick (`Status.served`)."""
    if status.phase is not Phase.PAUSED:
        return ""
    return _steering_refused(status, status.served)


def p99_bucket(counts: ColourCounts) -> float | None:
    """The bucket bound whose share of requests above it is closest to 1 % (about the p99).

    Closest in ratio, so a baseline whose p99 sits near a bound does not flip to a bucket with
    30 % of requests above it by chance; None without a histogram, or with no finite bound
    (+Inf alone: no request is slower than it, and the check would never count). A tight
    baseline may have no bound near its p99: all of it between two bounds. The lower one, with
    nearly all requests above it, made the check blind (a candidate at twice the latency,
    also all "slow", was promoted every time); the upper one, with none above it, is judged as
    a clean baseline is — so it is taken when the closest has more than MAX_P99_TAIL above it.
    With no such bound (the p99 above the largest finite one) that one is taken, unless at least
    DEAF_P99_TAIL of the requests are above it (a histogram far too short for the service, or a
    `_seconds` one read as ms): every bound is then deaf, and None (`_no_threshold_why`).
    """
    if not _finite_bounds(counts) or counts.requests <= 0:
        return None
    best: tuple[float, float, float] | None = None  # distance, bound, tail
    for bound, cumulative in counts.latency_buckets:
        tail = (counts.requests - cumulative) / counts.requests
        if math.isinf(bound):
            break
        if tail <= 0:
            return bound if best is None or best[2] > MAX_P99_TAIL else best[1]
        distance = abs(math.log(tail / P99_TAIL))
        if best is None or distance < best[0]:
            best = (distance, bound, tail)
    if best is not None and best[2] >= DEAF_P99_TAIL:
        return None  # (was: that bound, any canary, however slow, shown "not worse")
    return best[1] if best else counts.latency_buckets[0][0]


def _finite_bounds(counts: ColourCounts) -> bool:
    """Whether the histogram has a bucket bound to count slow requests above (not +Inf only)."""
    return any(bound < math.inf for bound, _ in counts.latency_buckets)


def _no_threshold_why(green: ColourCounts) -> str:
    """Why the latency check has no baseline threshold, from green's reading."""
    if (
        _finite_bounds(green)
        and green.requests >= MIN_BASELINE_FOR_P99
        and p99_bucket(green) is None
    ):
        largest = max(bound for bound, _ in green.latency_buckets if bound < math.inf)
        return (
            f"latency not judged: {_pct(green.slow(largest) / green.requests)} of green's "
            f"requests are above the histogram's largest finite bound ({largest * 1000:g} ms; "
            "is the metrics' `latency_unit` right?)"
        )
    if _finite_bounds(green):
        return "latency threshold not chosen yet (too few baseline requests)"
    if green.latency_buckets:
        return "latency not judged (the metrics source reports no finite latency bucket)"
    return "latency not judged (the metrics source reports no histogram)"


def _baseline_bucket(green: ColourCounts) -> float | None:
    """Green's p99 bucket, once it has served enough requests to trust it (else None)."""
    return p99_bucket(green) if green.requests >= MIN_BASELINE_FOR_P99 else None


def _ingest(
    analysis: AnalysisConfig, status: Status, obs: Observation, *, fold: bool = True
) -> tuple[Status, dict[str, Any]]:
    """Fold one observation's new counts into the evidence; returns the tick's deltas.

    `fold=False`: the counts only become the base the next tick's increase is measured from
    (counts of a data plane that no longer serves what the rollout set, `_drift`)."""
    threshold = status.slow_threshold_s
    fresh_threshold = False
    lat = analysis.latency
    slo_threshold = lat.slo_ms / 1000.0 if lat.threshold == "slo" and lat.slo_ms else None
    # The spec edited since the threshold was set (another `slo_ms`, `threshold` switched;
    # the controller restarted): the spec's bound is the one judged, as it is the one the
    # metrics source checked and the guard counts against. (Was: the old one, kept for good.)
    moved = ""
    if lat.enabled and threshold is not None:
        if slo_threshold is not None and slo_threshold != threshold:
            moved = f"slow above {threshold * 1000:g} ms → {slo_threshold * 1000:g} ms"
            threshold = None
        elif slo_threshold is None and status.slow_threshold_slo:
            moved = f"slow above {threshold * 1000:g} ms (slo_ms) → green's p99 bucket"
            threshold = None
    base = status.last_blue != Counts() or status.last_green != Counts()
    if lat.enabled and threshold is None:
        if slo_threshold is not None:
            threshold = slo_threshold
            # Mid-step (a spec edited to it): the step's slow requests so far were counted
            # against another bound, or none; counted from the tick after, as a p99 bucket is.
            fresh_threshold = base
        else:
            threshold = _baseline_bucket(obs.green)
            fresh_threshold = threshold is not None
    # A bound moved and none chosen yet: the base's slow requests, counted against the old one,
    # are no base for the next tick's either (a count of 0 now would read as "below the last").
    fresh_threshold = fresh_threshold or (moved != "" and base)

    slo_s = _guard_slo_s(analysis)

    def counts(c: ColourCounts) -> Counts:
        # Requests with no histogram: how many were slow is unknown (UNKNOWN), not none.
        unknown = c.requests > 0 and not c.latency_buckets
        slow = 0 if threshold is None else UNKNOWN if unknown else c.slow(threshold)
        over_slo = 0 if slo_s is None else UNKNOWN if unknown else c.slow(slo_s)
        return Counts(requests=c.requests, errors=c.errors, slow=slow, over_slo=over_slo)

    now_b, now_g = counts(obs.blue), counts(obs.green)
    last_b, last_g = status.last_blue, status.last_green
    if fresh_threshold:
        # Count slow requests only from the tick after the threshold was chosen.
        last_b, last_g = replace(last_b, slow=now_b.slow), replace(last_g, slow=now_g.slow)
    # The guard's bound edited since its counts were taken (`slo_ms`, the guard removed or
    # switched off; the controller restarted): a count above another bound is no base for one
    # above this one (was: a loosened bound read "below the last" and dropped every tick,
    # errors included, for the rest of the step), and its sums no rate against this one.
    guard_base = status.over_slo_bound_s
    guard_sums = (status.canary_over_slo, status.canary_slo_requests)
    # Tightened, its counts stand: a request above the old bound is above the new one too,
    # and the step's base counted at the old bound only adds, at the next tick, the requests
    # between the two (was: restarted, and a canary the guard was about to roll back, 13 %
    # slow against a 10 % limit, was promoted after `slo_ms` went from 100 to 90 or 99).
    tightened = (
        guard_base is not None
        and guard_base != GUARD_BOUND_UNKNOWN
        and slo_s is not None
        and slo_s < guard_base
    )
    guard_moved = guard_base != slo_s and not tightened
    restarted: dict[str, list[str]] = {}
    if guard_moved and guard_base != GUARD_BOUND_UNKNOWN:
        if guard_sums != (0, 0) or base:
            restarted["guard"] = [f"{_bound_name(guard_base)} → {_bound_name(slo_s)}"]
        guard_sums = (0, 0)
    # No count of the guard's to go on (a status written before the guard counted its own
    # requests or kept its bound, blue's histogram missing last tick, a bound moved mid-step):
    # count from the next tick. (At a step's start the base is nothing, at any bound.)
    rebase_guard = last_b.over_slo < 0 or (guard_moved and base)
    if rebase_guard:
        last_b = replace(last_b, over_slo=now_b.over_slo)
        last_g = replace(last_g, over_slo=now_g.over_slo)
    if obs.fresh_series and (last_b != Counts() or last_g != Counts()):
        # Counts from another series than the step's base: an increase over it would pair one
        # series' requests with the other's errors. They become the base; nothing is folded.
        last_b, last_g = now_b, now_g
    db, dg = _delta(now_b, last_b), _delta(now_g, last_g)
    tick: dict[str, Any] = {
        "blue": {"requests": db.requests, "errors": db.errors, "slow": db.slow},
        "green": {"requests": dg.requests, "errors": dg.errors, "slow": dg.slow},
    }
    if not fold:
        if restarted:
            tick["evidence_restarted"] = restarted
        return replace(
            status,
            last_blue=now_b,
            last_green=now_g,
            canary_over_slo=guard_sums[0],
            canary_slo_requests=guard_sums[1],
            over_slo_bound_s=slo_s,
            consecutive_errors=0,
        ), tick
    if _below(now_b, last_b) or _below(now_g, last_g):
        # A reading below the last (an empty or short read, a histogram read short, a series
        # missing for a scrape, a counter reset, a clock stepped back): no new data. The base
        # stays, or the series' return would count the whole step again; a count begun anew
        # counts once it passes the base. Nothing of the tick is kept: the next full reading
        # folds its increase over the base (this tick's errors too: delayed, not lost), and
        # sees any edit again. (A bound moved never gets here: its counts were re-based above.)
        tick["not_counted"] = "a reading below the last one"
        return replace(status, consecutive_errors=0), tick
    slo_known = not rebase_guard and now_b.over_slo >= 0 and last_b.over_slo >= 0
    # The spec edited since the last tick (and the controller restarted): "not worse" evidence
    # summed against the old max_ratio or δ starts afresh (`Evidence.restarts`), said here.
    if said := status.errors.restarts(analysis.errors.max_ratio, analysis.errors.negligible_rate):
        restarted["errors"] = said
    errors = status.errors.update(
        kc=db.errors,
        kb=dg.errors,
        nc=db.requests,
        nb=dg.requests,
        margin=analysis.errors.max_ratio,
        negligible=analysis.errors.negligible_rate,
    )
    slow = status.slow
    if moved:
        # "Not worse" summed for one bound is no evidence about another: it starts afresh, as
        # for an edited max_ratio. "Worse" is kept: under "no regression" the canary's share
        # of slow requests is the baseline's at every bound, so its product stays an e-process
        # (and a lean toward a regression is not wiped out by an edit).
        slow = slow.afresh()
        restarted["slow"] = [moved]
    known = all(c.slow >= 0 for c in (now_b, now_g, last_b, last_g))
    if threshold is not None and not fresh_threshold and known:
        if said := slow.restarts(lat.max_ratio, lat.negligible_rate):
            restarted["slow"] = said
        slow = slow.update(
            kc=db.slow,
            kb=dg.slow,
            nc=db.requests,
            nb=dg.requests,
            margin=lat.max_ratio,
            negligible=lat.negligible_rate,
        )
    if restarted:
        tick["evidence_restarted"] = restarted
    status = replace(
        status,
        errors=errors,
        slow=slow,
        slow_threshold_s=threshold,
        slow_threshold_slo=(slo_threshold is not None)
        if lat.enabled
        else status.slow_threshold_slo,
        last_blue=now_b,
        last_green=now_g,
        step_canary_requests=status.step_canary_requests + db.requests,
        canary_over_slo=guard_sums[0] + db.over_slo,
        # Requests whose latency is known both now and at the base: the guard's denominator
        # grows by those only (requests of unknown latency would dilute its rate).
        canary_slo_requests=guard_sums[1] + (db.requests if slo_known else 0),
        over_slo_bound_s=slo_s,
        consecutive_errors=0,
    )
    return status, tick


#: A count the reading cannot give (requests without a latency histogram): never folded, and
#: the next tick's increase is not measured from it.
UNKNOWN = -1


def _below(now: Counts, last: Counts) -> bool:
    """Whether any count read is lower than the base (an unknown count is never lower)."""
    return any(0 <= getattr(now, f.name) < getattr(last, f.name) for f in fields(Counts))


def _bound_name(bound_s: float | None) -> str:
    """How the guard's bound is named where it changed."""
    return "no guard" if bound_s is None else f"slower than {bound_s * 1000:g} ms"


def _delta(now: Counts, last: Counts) -> Counts:
    """The increase of each count over the base (0 where either is unknown)."""
    return Counts(
        *(
            max(getattr(now, f.name) - getattr(last, f.name), 0)
            if getattr(now, f.name) >= 0 and getattr(last, f.name) >= 0
            else 0
            for f in fields(Counts)
        )
    )


def _guard_slo_s(analysis: AnalysisConfig) -> float | None:
    """The latency guard's SLO in seconds (None without a latency guard)."""
    lat = analysis.latency
    if lat.enabled and lat.max_slow_rate is not None and lat.slo_ms is not None:
        return lat.slo_ms / 1000.0
    return None


def _pct(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    percent = x * 100
    # Two significant digits (0.13 %, 4.1 %), whole percents from 10 on: `.2g` says 1e+02.
    return f"{percent:.2g} %" if percent < 9.95 else f"{percent:.0f} %"


def _e(log_e: float) -> str:
    if log_e == math.inf:
        return "∞"
    e = math.exp(min(log_e, 700.0))
    if e < 100:
        return f"{e:.3g}"
    return f"{e:.0f}" if e < 1e5 else f"{e:.1e}"


def _checks(spec: RolloutSpec, status: Status) -> list[tuple[str, str]]:
    """The active checks: (key in status/ledger, phrase for humans)."""
    analysis = spec.analysis
    active = []
    if analysis.errors.enabled:
        active.append(("errors", "error rate"))
    if analysis.latency.enabled and status.slow_threshold_s is not None:
        ms = status.slow_threshold_s * 1000.0
        active.append(("slow", f"slow-request rate (> {ms:g} ms)"))
    return active


def ev_of(status: Status, key: str) -> Evidence:
    """The evidence of one check by its key ("errors" or "slow")."""
    return status.errors if key == "errors" else status.slow


def _worse_weights(analysis: AnalysisConfig) -> dict[str, float]:
    """Each enabled check's weight in the "worse" e-value (summing to 1)."""
    if analysis.errors.enabled and analysis.latency.enabled:
        return {"errors": ERRORS_WEIGHT, "slow": 1.0 - ERRORS_WEIGHT}
    return {"errors": 1.0} if analysis.errors.enabled else {"slow": 1.0}


def _check_record(spec: RolloutSpec, status: Status) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, _ in _checks(spec, status):
        ev = status.errors if key == "errors" else status.slow
        out[key] = {
            "canary_bad": ev.canary_bad,
            "baseline_bad": ev.baseline_bad,
            "canary_requests": ev.canary_requests,
            "baseline_requests": ev.baseline_requests,
            "log_e_worse": round(ev.log_e_worse(), 4),
            "log_e_ok": round(ev.log_e_ok(), 4),
            "log_e_ratio": round(ev.log_e_ratio(), 4),
            "log_e_low": round(ev.log_e_low(), 4),
        }
    if status.slow_threshold_s is not None:
        out["slow_threshold_ms"] = status.slow_threshold_s * 1000.0
    return out


def _guard(
    bad: int,
    requests: int,
    limit: float,
    *,
    log_needed: float = GUARD_LOG_THRESHOLD,
    unit: str = "canary requests",
) -> str:
    """How a rate breaches a hard limit ("" while it does not): its e-value against "at most
    the limit" reached exp(`log_needed`), by default the rollout guards' 1/GUARD_ALPHA."""
    bad = min(bad, requests)  # two series scraped apart: never a rate above 100 %
    if requests <= 0 or bad / requests <= limit:
        return ""  # at or below the limit the e-value cannot reach the threshold: skip it
    log_e = log_e_above(bad, requests, limit)
    if log_e < log_needed:
        return ""
    return (
        f"{_pct(bad / requests)} is above the limit {_pct(limit)} (e-value {_e(log_e)} ≥ "
        f"{_e(log_needed)}) after {requests} {unit}"
    )


def first_release_limits(analysis: AnalysisConfig) -> list[tuple[str, str, float]]:
    """The absolute limits a service's first release is checked against, as (which requests
    are bad: "errors" or "over_slo", what that is, the limit): the hard guards of the spec."""
    limits: list[tuple[str, str, float]] = []
    if analysis.errors.enabled and analysis.errors.max_rate is not None:
        limits.append(("errors", "error rate", analysis.errors.max_rate))
    slo_s = _guard_slo_s(analysis)
    if slo_s is not None and analysis.latency.max_slow_rate is not None:
        slower = f"share of requests slower than {slo_s * 1000:g} ms"
        limits.append(("over_slo", slower, analysis.latency.max_slow_rate))
    return limits


def judge_first(analysis: AnalysisConfig, green: ColourCounts) -> tuple[Verdict, str]:
    """Is green's first release within the spec's absolute limits? From its cumulative counts
    since it took all traffic (there is no baseline: only the hard guards can judge it).

    Failed when a limit is breached, Successful when every limit is shown kept and the release
    has answered `min_requests`, else Inconclusive (no traffic is neither). Each of the k limits
    gets α/k in each direction, on e-values against "at most" and "at least the limit": by
    Ville's inequality the verdict may be asked every tick, for as long as it takes.
    """
    limits = first_release_limits(analysis)
    if not limits:
        raise ValueError("no absolute limit to check a first release against")
    n = green.requests
    if n <= 0:
        return Verdict.INCONCLUSIVE, "no requests yet"
    slo_s = _guard_slo_s(analysis)
    bad_of = {"errors": green.errors, "over_slo": green.slow(slo_s) if slo_s is not None else 0}
    log_needed = math.log(len(limits) / analysis.alpha)
    needed = _e(log_needed)
    kept: list[tuple[float, str, float]] = []
    for name, what, limit in limits:
        if name == "over_slo" and not green.latency_buckets:
            # Requests read without a histogram are neither slow nor fast: no evidence either way.
            return Verdict.INCONCLUSIVE, f"{what} unknown after {n} requests: no latency histogram"
        if bad_of[name] < 0:  # UNKNOWN: the histogram has no bound at or above the SLO
            return Verdict.INCONCLUSIVE, (
                f"{what} unknown: the latency histogram has no bound at or above it (is the "
                "metrics' latency unit right?)"
            )
        bad = min(bad_of[name], n)
        if breach := _guard(bad, n, limit, log_needed=log_needed, unit="requests"):
            return Verdict.FAILED, f"{what} {breach}"
        measured = f"{what} {_pct(bad / n)}"
        below = log_e_below(bad, n, limit)
        if below < log_needed:
            # Undecided: say which way the counts lean, and how far that evidence has come.
            above = bad / n > limit
            side, log_e = ("above", log_e_above(bad, n, limit)) if above else ("below", below)
            return Verdict.INCONCLUSIVE, (
                f"{measured} after {n} requests, not yet shown {side} the limit {_pct(limit)} "
                f"(e-value {_e(log_e)} of {needed})"
            )
        kept.append((below, measured, limit))
    shown = "; ".join(
        f"{measured} is below the limit {_pct(limit)} (e-value {_e(below)} ≥ {needed})"
        for below, measured, limit in kept
    )
    if n < analysis.min_requests:
        return Verdict.INCONCLUSIVE, f"{shown}; {n} of the {analysis.min_requests} requests needed"
    return Verdict.SUCCESSFUL, f"{shown} after {n} requests"


def _judge(spec: RolloutSpec, status: Status, obs: Observation, now: float) -> tuple[Verdict, str]:
    """The verdict of the current step given the accumulated evidence."""
    analysis = spec.analysis
    alpha = analysis.alpha
    checks = _checks(spec, status)

    # Absolute guards act at once, on an e-value of their own (one unlucky error cannot trip
    # them, and looking every tick costs nothing: see `log_e_above`).
    ev = status.errors
    if analysis.errors.enabled and analysis.errors.max_rate is not None:
        breach = _guard(ev.canary_bad, ev.canary_requests, analysis.errors.max_rate)
        if breach:
            return Verdict.FAILED, f"canary error rate {breach}"
    lat = analysis.latency
    slo_s = _guard_slo_s(analysis)
    if slo_s is not None and lat.max_slow_rate is not None:
        breach = _guard(status.canary_over_slo, status.canary_slo_requests, lat.max_slow_rate)
        if breach:
            return Verdict.FAILED, f"canary requests slower than {slo_s * 1000:g} ms: {breach}"

    # The sequential test: a weighted mean of the checks' e-processes is itself an e-process, so
    # the rollout as a whole keeps its false-rollback rate <= alpha (a check not active yet
    # counts as e = 1). The weights split alpha by expected evidence (see ERRORS_WEIGHT).
    weights = _worse_weights(analysis)
    es = {key: math.exp(min(ev_of(status, key).log_e_worse(), 700.0)) for key in weights}
    es = {key: es[key] if any(k == key for k, _ in checks) else 1.0 for key in es}
    combined = sum(weights[key] * es[key] for key in weights)
    if combined >= 1.0 / alpha:
        key, phrase = max(checks, key=lambda kp: weights[kp[0]] * es[kp[0]])
        e = ev_of(status, key)
        # The value this check's e-value had to reach, given the other check's; the one it
        # passes alone when the other's share alone would do (both crossed at once).
        rest = sum(weights[k] * es[k] for k in weights if k != key)
        needed = (1.0 / alpha - rest) / weights[key]
        if needed <= 0:
            needed = 1.0 / (alpha * weights[key])
        return Verdict.FAILED, (
            f"canary {phrase} {_pct(e.canary_rate())} vs {_pct(e.baseline_rate())} baseline, "
            f"e-value {_e(e.log_e_worse())} > {needed:.3g} after {e.canary_requests} canary "
            "requests"
        )

    weight = status.blue_weight
    name = _step_name(status)
    elapsed = step_age(status, now)
    if weight == 0 and not status.mirror:
        if elapsed >= analysis.min_step_s:
            return Verdict.SUCCESSFUL, "step 0 %: blue deployed, reachable by header only"
        return Verdict.INCONCLUSIVE, f"step 0 %: waiting {analysis.min_step_s:g} s"
    if obs.blue.requests == 0 and status.step_canary_requests == 0:
        if status.mirror:
            said = f"no mirrored copies counted yet in {name}"
            # A question only once green's live traffic should have brought copies: a scrape
            # or two after the step began, none is counted on any source.
            expected = obs.green.requests * status.mirror / 100.0
            if expected < UNCOUNTED_COPIES_ASK:
                return Verdict.INCONCLUSIVE, said
            return Verdict.INCONCLUSIVE, (
                f"{said}, while green counted {obs.green.requests} live requests "
                f"(~{expected:.0f} copies expected): does the metrics source count mirrored "
                "requests?"
            )
        return Verdict.INCONCLUSIVE, f"no canary traffic yet at {weight} %"
    if elapsed < analysis.min_step_s:
        return Verdict.INCONCLUSIVE, f"{name} younger than {analysis.min_step_s:g} s"
    if status.step_canary_requests < analysis.min_requests:
        return Verdict.INCONCLUSIVE, (
            f"{name} has {status.step_canary_requests} of "
            f"{analysis.min_requests} canary requests needed"
        )
    if not checks:
        # Errors off, and latency without its threshold: stepping up, or promoting, would take
        # silence for evidence.
        why = _no_threshold_why(obs.green)
        return Verdict.INCONCLUSIVE, f"{name}: nothing judges this canary: errors disabled, {why}"
    last = status.step_index + 1 >= len(spec.plan) or spec.plan[status.step_index + 1] == 100
    if not last:
        hold = analysis.hold_above_e
        # (A relative tolerance, so rounding in the mixtures never holds a step with no data.)
        if hold is not None and combined > hold * (1.0 + 1e-9):
            return Verdict.INCONCLUSIVE, (
                f"{name}: not stepping up while the evidence leans toward a regression "
                f"(e-value {_e(math.log(combined))} > {hold:g}; rollback at {1.0 / alpha:g})"
            )
        return Verdict.SUCCESSFUL, (
            f"{name} passed: {status.step_canary_requests} canary requests, "
            "no evidence of a regression"
        )
    # Promotion needs positive evidence of "not worse" on every check.
    bad = {"errors": "fail"}
    if status.slow_threshold_s is not None:
        bad["slow"] = f"are above {status.slow_threshold_s * 1000:g} ms" + (
            "" if status.slow_threshold_slo else " (is the metrics' `latency_unit` right?)"
        )
    missing = []
    proven = []
    unjudged = []  # said as they are, not after "not yet shown"
    for key, phrase in checks:
        e = status.errors if key == "errors" else status.slow
        check = analysis.errors if key == "errors" else lat
        # "Not worse" = less than max_ratio × baseline OR below the negligible rate; the e-value
        # is the mean of both tests', and the words name the one carrying it.
        log_ok = e.log_e_ok()
        shown = log_ok >= math.log(1.0 / alpha)
        claim = f"< {check.max_ratio:g}× baseline"
        if check.negligible_rate > 0:
            low_claim = f"< {_pct(check.negligible_rate)}"
            if not shown:
                claim = f"{claim} or {low_claim}"
            elif e.log_e_low() > e.log_e_ratio():
                claim = low_claim
        after = f" after {e.canary_requests:,} canary requests"
        if vacuous := _vacuous(e, check.max_ratio, bad[key]):
            unjudged.append(f"{phrase} cannot be shown < {check.max_ratio:g}× baseline: {vacuous}")
            continue
        if shown:
            proven.append(f"{phrase} shown {claim} (e-value {_e(log_ok)} ≥ {1 / alpha:g}){after}")
        else:
            missing.append(f"{phrase} {claim} (e-value {_e(log_ok)} < {1 / alpha:g}{after})")
    blind = [c.value for c in Colour if obs.of(c).requests > 0 and not obs.of(c).latency_buckets]
    if (
        blind
        and status.slow_threshold_s is not None
        and status.slow.log_e_ok() < math.log(1 / alpha)
    ):
        # Their slow requests are unknown: the latency check takes nothing from such a tick.
        unjudged.append(f"latency not judged now ({' and '.join(blind)}: no latency histogram)")
    if lat.enabled and status.slow_threshold_s is None:
        if _finite_bounds(obs.green):  # chosen once green has served enough requests
            unjudged.append(_no_threshold_why(obs.green))
        else:  # never chosen: said, not waited for
            proven.append(_no_threshold_why(obs.green))
    if missing or unjudged:
        not_shown = ["not yet shown " + "; ".join(missing)] if missing else []
        return Verdict.INCONCLUSIVE, f"{name}: " + "; ".join(not_shown + unjudged)
    return Verdict.SUCCESSFUL, "canary not worse: " + "; ".join(proven)


def _vacuous(e: Evidence, max_ratio: float, bad: str) -> str:
    """Why "< max_ratio × baseline" says nothing about this canary ("" when it does): with the
    rollout's baseline at 1 / max_ratio or more of its requests bad, no canary has max_ratio
    times that (none has more than all of its requests bad), and the claim holds for any — a
    canary with every request slow was "shown < 2× baseline" against 60 % (a histogram far too
    short for the service), or one failing every request against a baseline failing half."""
    rate = e.baseline_rate()
    if not e.baseline_requests or rate * max_ratio < 1.0:
        return ""
    return f"{_pct(rate)} of green's requests {bad}, and no canary has more than all of its"


def _drift(status: Status, served: Served | None) -> str:
    """How the data plane differs from what the rollout set ("" when it does not, or was not
    read): another rollout driving it (one of another name or state store), a hand edit, a
    data plane that lost its state. Then the evidence is not this step's, and acting on it
    would fight whoever changed it."""
    if served is None:
        return ""
    off = []
    for colour, release in ((Colour.BLUE, status.candidate), (Colour.GREEN, status.stable)):
        there = served.of(colour)
        if release is None:
            continue
        if there is None:
            off.append(f"{colour.value} serves nothing, not {release.ref}")
        elif release.unlike(there):
            off.append(f"{colour.value} serves {there.ref}, not {release.ref}")
    if served.weights != status.weights:
        off.append(f"it sends {served.weights.blue_share}, not {status.weights.blue_share}")
    return "; ".join(off)


def _blue_not_ours(status: Status, served: Served | None) -> str:
    """Why blue is not this rollout's to set to 0 % ("" when it is, or was not read): it
    serves another release than the candidate, another rollout's canary. A blue serving
    nothing is no one's canary: 0 % sends the requests routed to nothing back to green (and
    writes the routes of a data plane that lost them)."""
    candidate = status.candidate
    if served is None or candidate is None or served.blue is None:
        return ""
    if candidate.unlike(served.blue):
        return f"blue serves {served.blue.ref}, not {candidate.ref}: another rollout's?"
    return ""


def left_alone(status: Status) -> str:
    """Why this ended rollout's weights were never served ("" when they were, or cannot be
    told): an abort left the data plane as it is, blue serving another rollout's canary when
    last read (`Status.served`). Its `blue_weight` 0 is then no weight anyone set."""
    if status.phase is not Phase.ROLLED_BACK:
        return ""
    return _blue_not_ours(status, status.served)


def resume_refused(status: Status, plan: Sequence[int] | None = None) -> str:
    """Why a resume of this held rollout would be refused ("" when it would not), from what
    the data plane served at its last tick (`Status.served`), and with `plan` (the spec's
    now) from blue's weight: a steering command says so up front instead of queuing one the
    controller ignores."""
    if status.phase is not Phase.PAUSED:
        return ""
    if plan is not None and (off := _off_plan(plan, status.blue_weight)):
        return off
    if status.served is None:
        return ""
    return _restoring(status, status.served)[1]


def _off_plan(plan: Sequence[int], weight: int) -> str:
    """Why blue's weight is no step of `plan` ("" when it is one): `steps` changed since the
    step began, and which way to go is a human's to say."""
    if weight in plan:
        return ""
    return (
        f"blue is at {weight} %, which the plan {list(plan)} no longer has (`steps` changed "
        "since this step began): set-weight to a planned weight, promote or abort"
    )


def _restoring(status: Status, served: Served) -> tuple[tuple[Action, ...], str]:
    """The actions that make a drifted data plane serve what the status says again, or why
    none may: green serving another release is production moved on (another rollout promoted
    it), not this rollout's to undo."""
    green = served.green
    if green is not None and status.stable is not None and status.stable.unlike(green):
        return (), (
            f"green now serves {green.ref}, not {status.stable.ref} (promoted by another "
            "rollout, or by hand?): this rollout's baseline serves no more; abort it"
        )
    actions: list[Action] = []
    for colour, release in ((Colour.GREEN, status.stable), (Colour.BLUE, status.candidate)):
        there = served.of(colour)
        if release is None or (there is not None and not release.unlike(there)):
            continue
        if colour is Colour.BLUE and (served.weights.blue or served.weights.mirror):
            # Blue's traffic off the release it serves (another rollout's canary) before this
            # candidate replaces it: else, while it deploys (minutes on Kubernetes), that
            # canary's requests count in the step just restarted as this candidate's, and this
            # candidate then takes that canary's weight, judged at none of it, until the end.
            actions.append(SetWeights(0))
        actions.append(Deploy(colour, release))
    return (*actions, SetWeights(status.blue_weight, status.mirror)), ""


def _analyse(
    spec: RolloutSpec,
    status: Status,
    obs: Observation | None,
    now: float,
    record: dict[str, Any],
    served: Served | None = None,
) -> Decision:
    analysis = spec.analysis
    record["since"] = status.step_started_at
    drift = _drift(status, served)
    if obs is not None and obs.error is None:
        # Counts of a drifted data plane are another release's or another split's (another
        # rollout's canary at its weight): never this candidate's evidence, whether the tick
        # holds, stays held or resumes (a resume restarts the step).
        status, tick = _ingest(analysis, status, obs, fold=not drift)
        record["counts"] = {
            "blue": {"requests": obs.blue.requests, "errors": obs.blue.errors},
            "green": {"requests": obs.green.requests, "errors": obs.green.errors},
        }
        record["tick_counts"] = tick
        if drift:
            record["not_counted"] = "the data plane changed under this rollout"
        if obs.detail:
            record["detail"] = obs.detail  # raw queries and values, for "why did it decide that?"
    elif obs is not None:
        status = replace(status, consecutive_errors=status.consecutive_errors + 1)
        record["metrics_error"] = obs.error

    notes: list[str] = []
    if status.commands and _condemned(spec, status, obs, now, served):
        # This tick's counts (a whole hold's, for a `run` restarted to obey a human's answer)
        # fail the candidate: a promote, set-weight, resume or pause obeyed unjudged would
        # serve a proven regression more (or all) traffic. The judge below rolls back.
        status, notes = _drop_commands(
            status, "dropped, not acted on: this tick's counts fail the candidate"
        )
    if status.commands:
        before = (status.phase, status.step_index)
        status, actions, notes = _handle_commands(spec, status, now, served)
        if actions or (status.phase, status.step_index) != before:
            record["checks"] = _check_record(spec, status)
            return _decide(status, actions, record, notes)

    if drift and served is not None:  # (commands that changed nothing leave it as it was)
        # Before the judge: whatever these counts say, they are not this step's evidence.
        record["drift"] = drift
        _, refused = _restoring(status, served)
        aborts = (
            "leaves the data plane as it is"
            if _blue_not_ours(status, served)
            else "sets blue to 0 %"
        )
        then = f"{refused}, which {aborts}" if refused else f"resume sets it back, abort {aborts}"
        reason = (
            f"held for a human: the data plane changed under this rollout ({drift}): another "
            f"rollout drives it, a hand edit, or a data plane that lost its state (a local "
            f"stack restarted, an endpoint recreated); {then}"
        )
        status = replace(status, phase=Phase.PAUSED, held=True, reason=reason, served=served)
        return _decide(status, (), record, notes)
    if served is not None and status.served is not None:
        status = replace(status, served=None)  # serves what the rollout set again

    if obs is None or obs.error is not None:
        limit = analysis.max_consecutive_errors
        why = (obs.error if obs is not None else None) or "no observation"
        status = replace(status, verdict=Verdict.ERROR)
        if status.consecutive_errors >= limit and status.phase is Phase.PROGRESSING:
            return _decide(
                *_on_inconclusive(
                    spec, status, f"metrics unreadable {limit} times in a row: {why}"
                ),
                record,
                notes,
            )
        if status.phase is not Phase.PAUSED:  # a pause's or hold's why stays (the record says)
            # (Counts read but unusable say so themselves: not "unreadable (metrics unusable".)
            said = why if why.startswith("metrics unusable") else f"metrics unreadable ({why})"
            status = replace(status, reason=f"{said}; holding")
        return _decide(status, (), record, notes)

    status, off_plan = _follow_plan(spec, status, record)
    verdict, reason = _judge(spec, status, obs, now)
    status = replace(status, verdict=verdict)
    record["checks"] = _check_record(spec, status)
    record["threshold_worse"] = 1.0 / analysis.alpha
    record["worse_weights"] = _worse_weights(analysis)
    record["threshold_ok"] = 1.0 / analysis.alpha

    if verdict is Verdict.FAILED:
        at = _step_name(status)
        return _decide(
            *_rollback(status, f"rolled back at {at}: {reason}", Verdict.FAILED),
            record,
            notes,
        )
    record["judge"] = reason
    if off_plan and status.phase is Phase.PROGRESSING:
        status = replace(
            status, phase=Phase.PAUSED, held=True, reason=f"held for a human: {off_plan}"
        )
        return _decide(status, (), record, notes)
    if status.phase is Phase.PAUSED:
        # Held: the judge still guards (a Failed verdict above rolls back), nothing advances.
        return _decide(status, (), record, notes)
    if verdict is Verdict.SUCCESSFUL:
        nxt = status.step_index + 1
        plan = spec.plan
        if nxt >= len(plan) or plan[nxt] == 100:
            return _decide(*_promote(status, f"Blue_100: {reason}"), record, notes)
        status = _enter_step(status, nxt, plan[nxt], now, _mirror_at(spec, plan[nxt]))
        status = replace(status, reason=f"{reason}; blue to {plan[nxt]} %")
        return _decide(status, (SetWeights(plan[nxt], status.mirror),), record, notes)
    if step_age(status, now) >= analysis.max_step_duration_s:
        return _decide(
            *_on_inconclusive(
                spec,
                status,
                f"{_step_name(status)} inconclusive after "
                f"{analysis.max_step_duration_s:g} s: {reason}",
            ),
            record,
            notes,
        )
    return _decide(replace(status, reason=reason), (), record, notes)


def _condemned(
    spec: RolloutSpec, status: Status, obs: Observation | None, now: float, served: Served | None
) -> bool:
    """Whether the judge fails the candidate on the counts in hand, before the queued commands
    are obeyed: only on a usable observation of a data plane that serves what the rollout set
    (this tick's reading, else the held status's), and not with an abort queued (it rolls back
    as it always has)."""
    if obs is None or obs.error is not None or queued_abort(status, status.commands):
        return False
    if _drift(status, served if served is not None else status.served):
        return False
    return _judge(spec, status, obs, now)[0] is Verdict.FAILED


def _follow_plan(spec: RolloutSpec, status: Status, record: dict[str, Any]) -> tuple[Status, str]:
    """Find the current step in a plan edited since the rollout began ("" when it is there).

    The step index was stored against the plan of its day. Blue's weight still in the plan: the
    step goes on as that weight's step there (its evidence and age kept). No longer in it: the
    machine must not guess which way to go, so it returns why it holds for a human.
    """
    plan = spec.plan
    index, weight = status.step_index, status.blue_weight
    step = plan_step(plan, index, weight)
    if step == index:
        return status, ""
    if step is not None:
        record["plan_changed"] = f"blue's {weight} % is now step {step + 1} of {list(plan)}"
        return replace(status, step_index=step), ""
    return status, _off_plan(plan, weight)


def plan_step(plan: Sequence[int], index: int, weight: int) -> int | None:
    """The step of `plan` blue's `weight` is at: `index` (stored against the plan of its
    day) while it still names that weight, else the weight's step in `plan`, else None (the
    plan no longer has it)."""
    if index < len(plan) and plan[index] == weight:
        return index
    return plan.index(weight) if weight in plan else None


def _on_inconclusive(
    spec: RolloutSpec, status: Status, reason: str
) -> tuple[Status, tuple[Action, ...]]:
    if spec.analysis.on_inconclusive == "rollback":
        return _rollback(status, f"rolled back: {reason}", Verdict.INCONCLUSIVE)
    status = replace(
        status,
        phase=Phase.PAUSED,
        verdict=Verdict.INCONCLUSIVE,
        held=True,
        reason=f"held for a human: {reason}",
    )
    return status, ()
