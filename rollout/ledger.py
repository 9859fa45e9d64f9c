"""The decision ledger: one JSON line per tick, the answer to "why did it decide that?".

Each line carries the counts the judge saw (cumulative for the step and this tick's increment),
the statistics (log e-values for "worse" and "not worse"), the thresholds, the verdict, the
actions and the reason. `explain` turns a ledger into a short story in plain words.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rollout import jsonl
from rollout.core.types import Phase
from rollout.errors import StateError

#: The events of a first release (`bootstrap`, `bootstrap --check`): lines of no rollout.
BOOTSTRAP_EVENTS = ("bootstrap", "first-check")


class Ledger:
    """Append-only JSONL file; each line is flushed and fsync'ed (a crash loses at most one)."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self._fsync = fsync

    def append(self, record: dict[str, Any]) -> None:
        """Write one line."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            jsonl.append(self.path, record, fsync=self._fsync)
        except OSError as exc:
            raise StateError(f"cannot append to ledger {self.path}: {exc.strerror}") from exc


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """The records of a ledger, one per tick. StateError if unreadable.

    Lines torn by a crash are skipped, and so are lines of ticks that were done again (see
    `latest_ticks`): the file keeps both, as an append-only log should.
    """
    return list(iter_ledger(path))


def iter_ledger(path: Path) -> Iterator[dict[str, Any]]:
    """`read_ledger`, one record at a time: a first pass over the file notes the lines of ticks
    done again, a second yields the others. Holds a number or two per line, not every record
    (a long rollout's ledger is 1 KB a tick, its records several times that in memory)."""
    try:
        end = path.stat().st_size  # a controller may append meanwhile: both passes stop here
        redone = _redone(jsonl.iter_records(path, end=end, warn=False))
        for index, record in enumerate(jsonl.iter_records(path, end=end)):
            if index not in redone:
                yield record
    except OSError as exc:
        raise StateError(f"cannot read ledger {path}: {exc.strerror}") from exc


def has_ledger_lines(path: Path) -> bool:
    """Whether the file holds a ledger line, read up to the first: a record with a time (`at`, a
    number) and a tick's phase (one of Phase's) or an event. A command log, or another tool's
    JSON lines (a "phase" of its own, a time in words), has none. StateError if unreadable."""
    try:
        records = jsonl.iter_records(path, end=path.stat().st_size, warn=False)
        return any(_is_ledger_record(record) for record in records)
    except OSError as exc:
        raise StateError(f"cannot read ledger {path}: {exc.strerror}") from exc


#: The phases a tick's line may have.
PHASES = frozenset(phase.value for phase in Phase)
#: The keys a ledger line may begin with (json.dumps sorts them): a tick's `actions` or `at`.
#: `event`, `phase` and `tick` too, for lines written by hand or by an older version.
FIRST_KEYS = ("actions", "at", "event", "phase", "tick")


def _is_ledger_record(record: dict[str, Any]) -> bool:
    """A line a controller wrote: a numeric time, and a Phase or an event."""
    at = record.get("at")
    if not isinstance(at, int | float) or isinstance(at, bool):
        return False
    if "phase" in record:
        return isinstance(record["phase"], str) and record["phase"] in PHASES
    return isinstance(record.get("event"), str)


def may_be_torn_ledger_line(fragment: bytes) -> bool:
    """Whether `fragment`, a file's last line without its newline, may be a ledger line cut
    short by a writer that stopped in the middle of it: ASCII (json.dumps escapes the rest),
    `{` and then, if anything, a key a ledger line begins with (or the start of one)."""
    text = fragment.strip()
    if not text.isascii():
        return False
    match = re.fullmatch(rb'\{\s*(?:"([a-z_]*)("?).*)?', text, flags=re.DOTALL)
    if match is None:
        return False
    key, closed = (match.group(1) or b"").decode(), match.group(2)
    if closed:
        return key in FIRST_KEYS
    return any(first.startswith(key) for first in FIRST_KEYS)


class _Cuts:
    """Where `iter_rollouts` cuts, one record at a time: `begins(record)` is True for the first
    record of a piece."""

    def __init__(self) -> None:
        self.started = False
        self.rollout = None  # the rollout_id of the lines read last (older ledgers have none)
        self.between = False  # the last piece holds a bootstrap's lines, no rollout's

    def begins(self, record: dict[str, Any]) -> bool:
        new_id = record.get("rollout_id")
        outside = record.get("event") in BOOTSTRAP_EVENTS
        cut = (
            not self.started
            or record.get("event") == "start"
            or bool(new_id and self.rollout and new_id != self.rollout)
            or (outside and not self.between)
            or (self.between and not outside and bool(new_id or "phase" in record))
        )
        if cut:
            self.between = outside
        self.started = True
        self.rollout = new_id or self.rollout
        return cut


def iter_rollouts(records: Iterable[dict[str, Any]]) -> Iterator[Iterator[dict[str, Any]]]:
    """`records` cut where a rollout begins: at its `start` line, at a line of another
    `rollout_id` (its start line lost: stopped between the status save and the line), or at its
    first line after a bootstrap's; and where a bootstrap's lines begin (`bootstrap`,
    `first-check`: no rollout's, written only while none is active, so they end the one before).
    Lazily: each piece an iterator, to be read before the next."""
    cuts = _Cuts()
    count = 0

    def piece(record: dict[str, Any]) -> int:
        nonlocal count
        count += cuts.begins(record)
        return count

    return (group for _, group in itertools.groupby(records, key=piece))


def latest_ticks(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`records` without the lines of ticks a later line of the same rollout did again.

    The controller appends a tick's line before it saves the status. Stopped in between (a
    Ctrl-C, a SIGKILL), its decision was never the rollout's: the resumed controller does that
    tick again, on newer counts, and its line is the one that counts. Tick numbers count from 1
    again in each of the `iter_rollouts`.
    """
    redone = _redone(records)
    return [record for index, record in enumerate(records) if index not in redone]


def _redone(records: Iterable[dict[str, Any]]) -> set[int]:
    """The indexes of the `latest_ticks` leaves out: a line of tick T is done again when a
    later line of its rollout has a tick T' <= T (ticks only go up otherwise; a tick done again
    does again the ticks after it, if any were written); and a line of a superseded `tenure`
    (a take of the lease: the controller stamps its ticks' lines), one written after a line of
    a later tenure of its rollout. That controller lost the lease and its save was refused: its
    decision was never the rollout's, and its tick must not read as the successor's ticks done
    again. Tenures are ranked per `rollout_id`: another rollout's controller (a dry run of the
    same name, its lease its own) supersedes none of this one's. But a rollout started after
    another (`run --restart`) took the lease from it: a stamped line of the earlier rollout
    written after the later one's start is stale too (a frozen controller waking late). Lines
    with no tenure (earlier versions, events) are read as before."""
    ticks: list[int | None] = []  # each line's tick, None for a line of no tick
    begins: set[int] = set()  # where each rollout's lines begin
    cuts = _Cuts()
    tenures: dict[Any, dict[str, int]] = {}  # per rollout_id, each tenure's rank by its first line
    started: set[Any] = set()  # the rollout ids of the start lines
    latest: Any = None  # the one begun last
    stale: set[int] = set()
    for index, record in enumerate(records):
        tenure = record.get("tenure")
        rollout = record.get("rollout_id")
        rollout = rollout if isinstance(rollout, str) else None
        if record.get("event") == "start":
            started.add(rollout)
            latest = rollout
        ranks = tenures.setdefault(rollout, {})
        superseded = isinstance(tenure, str) and (
            ranks.setdefault(tenure, len(ranks)) < len(ranks) - 1
            or (rollout in started and rollout != latest)
        )
        if superseded:
            stale.add(index)
            ticks.append(None)  # hides nothing, and cuts nothing
            continue
        tick = record.get("tick")
        ticks.append(tick if isinstance(tick, int) and not isinstance(tick, bool) else None)
        if cuts.begins(record):
            begins.add(index)
    redone: set[int] = stale
    lowest = math.inf  # the lowest tick of the lines after this one, in its rollout
    for index in reversed(range(len(ticks))):
        tick = ticks[index]
        if tick is not None:
            if lowest <= tick:
                redone.add(index)
            lowest = min(lowest, tick)
        if index in begins:
            lowest = math.inf
    return redone


def span(seconds: float) -> str:
    """A duration as a person says it: "40 s", "12.5 min", "3.0 h"."""
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def explain(records: Iterable[dict[str, Any]]) -> list[str]:
    """The story of a rollout in plain words: one line per event that changed something.

    One pass, holding the line before and the line after the one it reads (`iter_ledger`
    gives a ledger so)."""
    lines: list[str] = []
    start = 0.0
    last: dict[str, Any] | None = None
    previous = None
    unreadable_since: float | None = None  # the first tick of a metrics outage
    uncounted: list[int] = []  # the ticks of a run whose counts were not the candidate's
    unread: list[int] = []  # the ticks of a run that could not read what the data plane served
    unread_why = ""  # why, as its first tick said
    cuts = _Cuts()  # where a rollout (or a bootstrap's lines) begins, as the report cuts
    for before, rec, following in windows(records):
        cut = cuts.begins(rec)
        if uncounted and (cut or "event" in rec or not rec.get("not_counted")):
            lines.append(_not_counted(uncounted, before, start))
            uncounted = []
        if unread and (cut or "event" in rec or not rec.get("data_plane_unread")):
            lines.append(_unread(unread, unread_why, before, start))
            unread = []
        if cut:
            start = rec.get("at", start if last is not None else 0.0)
            unreadable_since, previous = None, None
            if last is not None and rec.get("event") not in ("start", *BOOTSTRAP_EVENTS):
                # Its controller stopped between saving the status and appending the start
                # line: the story begins at its first line, not inside the rollout before.
                rollout_id = rec.get("rollout_id")
                named = f"rollout {rollout_id}" if rollout_id else "a rollout"
                lines.append(f"{named} (its start line is missing from the ledger)")
        last = rec
        if "event" in rec:
            said = event_sentence(rec, checked=following.get("event") == "first-check")
            untimed = rec["event"] in ("start", "bootstrap")
            lines.append(said if untimed else f"[{span(rec.get('at', start) - start)}] {said}")
            continue
        if rec.get("not_counted") and isinstance(rec.get("tick"), int):
            uncounted.append(rec["tick"])
        if rec.get("data_plane_unread") and isinstance(rec.get("tick"), int):
            unread_why = unread_why if unread else str(rec["data_plane_unread"])
            unread.append(rec["tick"])
        changed = (
            rec.get("actions") or rec.get("phase") != rec.get("phase_before") or rec.get("commands")
        )
        # A metrics outage changes nothing until it holds the rollout, yet the story needs it:
        # weights held for a minute with no line said nothing of why. Said from its error: the
        # reason of a paused or held tick is the pause's, and of a tick with a command the
        # command's (the outage went untold, and then its end was told).
        if rec.get("verdict") == "Error" and unreadable_since is None:
            unreadable_since = rec.get("at", start)
            outage, reason = _outage(rec), str(rec.get("reason", ""))
            error = rec.get("metrics_error")
            # (A hold for it, "metrics unreadable 3 times in a row: <error>", says it itself.)
            told = outage == reason or (isinstance(error, str) and bool(error) and error in reason)
            if not (changed and told):
                lines.append(f"[{span(rec.get('at', start) - start)}] {outage}")
        elif rec.get("counts") and unreadable_since is not None:  # observed again
            lines.append(
                f"[{span(rec.get('at', start) - start)}] metrics readable again after "
                f"{span(rec.get('at', start) - unreadable_since)}"
            )
            unreadable_since = None
        if not changed:
            continue
        t = span(rec.get("at", start) - start)
        reason = rec.get("reason", "")
        notes = rec.get("commands") or []
        for note in notes:
            # In the words of the command the operator typed (`set-weight`), not the log's kind.
            lines.append(f"[{t}] operator {note.replace('set_weight', 'set-weight', 1)}")
        said_it = notes and (notes[-1].endswith(f": {reason}") or reason == previous)
        if said_it and not rec.get("actions") and rec.get("phase") == rec.get("phase_before"):
            # A command that changed nothing (a resume refused, a pause of a paused rollout):
            # not a phase entered anew.
            lines[-1] += f" → still {rec.get('phase')}"
        elif notes and notes[-1].endswith(f": {reason}"):
            lines[-1] += f" → {rec.get('phase')}"  # the command's effect is the new phase
        elif reason == previous:  # e.g. RollingBack → RolledBack: same cause, say it once
            lines.append(f"[{t}] {rec.get('phase')}")
        else:
            lines.append(f"[{t}] {rec.get('phase')}: {reason}")
        previous = reason
    if last is None:
        return ["the ledger is empty: the rollout has not ticked yet"]
    if uncounted:
        lines.append(_not_counted(uncounted, last, start))
    if unread:
        lines.append(_unread(unread, unread_why, last, start))
    # After an event (a bootstrap, a start not ticked yet) there is no phase to say it is still in.
    if "event" not in last and last.get("phase") not in ("Succeeded", "RolledBack", "Failed"):
        checks = last.get("checks") or {}
        parts = []
        for key in ("errors", "slow"):
            c = checks.get(key)
            if c:
                parts.append(
                    f"{key}: e-value worse {math.exp(min(c['log_e_worse'], 700)):.3g}, "
                    f"not-worse {math.exp(min(c['log_e_ok'], 700)):.3g} after "
                    f"{c['canary_requests']} canary requests"
                )
        now = span(last.get("at", start) - start)
        lines.append(f"[{now}] still {last.get('phase')}: {last.get('reason', '')}")
        if parts:
            lines.append("    " + "; ".join(parts))
    return lines


def windows(
    records: Iterable[dict[str, Any]],
) -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """Each record with the one before and the one after it ({} at either end)."""
    before: dict[str, Any] = {}
    ahead = iter(records)
    rec = next(ahead, None)
    while rec is not None:
        following = next(ahead, None)
        yield before, rec, {} if following is None else following
        before, rec = rec, following


def _outage(rec: dict[str, Any]) -> str:
    """The first tick of a metrics outage in words: its `metrics_error`, as the machine words it
    in a reason (and that reason whole when it is the outage's: "...; holding"); the tick's
    reason when the line has no error (an observation missing, a line of an older version)."""
    reason, error = str(rec.get("reason", "")), rec.get("metrics_error")
    if not isinstance(error, str) or not error:
        return reason
    said = error if error.startswith("metrics unusable") else f"metrics unreadable ({error})"
    return reason if reason.startswith(said) else said


def _ref(release: Any) -> str:
    """A ledger's release (`_release_dict`) as `model:version`."""
    release = release if isinstance(release, dict) else {}
    return f"{release.get('model', '?')}:{release.get('version', '?')}"


def event_sentence(rec: dict[str, Any], *, checked: bool = False) -> str:
    """A ledger line that is no tick (an `event`) in words, without its time: what `explain`
    and the report say of it. `checked`: a bootstrap whose first-check follows it."""
    event, described = rec["event"], "; ".join(rec.get("describe") or [])
    if event == "start":
        prepared = f"; green served nothing: {described}" if described else ""
        return (
            f"started rollout {rec.get('name', '')}: candidate {_ref(rec.get('candidate'))} "
            f"(blue) against {_ref(rec.get('stable'))} (green), plan {rec.get('plan')}{prepared}"
        )
    if event == "bootstrap":
        judged = "judged on absolute limits alone" if checked else "unjudged"
        return (
            f"bootstrapped green with {_ref(rec.get('release'))} (a first release, {judged}: "
            f"nothing to compare it with), by {rec.get('by', '?')}"
        )
    if event == "first-check":
        return (
            f"first release {_ref(rec.get('release'))} judged on the absolute limits: "
            f"{rec.get('verdict', '?')}: {rec.get('reason', '')}"
        )
    if event == "restore":
        return f"resumed with a data plane serving {rec.get('served')}: {described}"
    if event == "not-applied":
        error = str(rec.get("error"))
        why = error if error.startswith(described) else f"could not {described}: {error}"
        return f"controller stopped: {why} (the next `run` applies it first)"
    if event == "skipped":
        return f"not applied, an abort being queued: {described}"
    if event == "green-lost":
        return (
            f"the rollback's weights were refused, green serving nothing "
            f"({rec.get('error', '?')}): {described}, then the weights again"
        )
    return f"{event}: {described or rec.get('reason', '')}"


def _ticks(ticks: list[int]) -> str:
    return f"tick {ticks[0]}" if len(ticks) == 1 else f"ticks {ticks[0]}–{ticks[-1]}"


def _unread(ticks: list[int], why: str, last: dict[str, Any], start: float) -> str:
    """The line for a run of ticks that could not read what the data plane served
    (`data_plane_unread`): a change made to it under the rollout then held nothing."""
    return (
        f"[{span(last.get('at', start) - start)}] {_ticks(ticks)}: what the data plane serves "
        f"could not be read ({why}); changes to it went unnoticed"
    )


def _not_counted(ticks: list[int], last: dict[str, Any], start: float) -> str:
    """The line for a run of ticks whose counts the judge left out (`not_counted`: a data plane
    changed under the rollout served them, another release or another split): what the
    metrics said then is in the ledger, and is no evidence for or against the candidate."""
    return (
        f"[{span(last.get('at', start) - start)}] {_ticks(ticks)} not counted as the candidate's "
        f"evidence: {last.get('not_counted')}"
    )
