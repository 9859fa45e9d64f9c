"""What the triggers remember across restarts: a cursor per model and the event ids already seen.

Cursor (`<state>/cursor-<model>.json`): every version a trigger has accepted, with its state

    pending  accepted (seen by the watcher, or received from Event Grid), not yet delivered
    started  the delivery began: written BEFORE the first side effect (packaging, traffic)
    done     the delivery ended; `outcome` is the rollout phase, or `superseded`

A version enters the cursor once and only moves forward (pending → started → done), so it is
delivered at most once; it enters as soon as it is seen and leaves only as `done`, so no version
is skipped. A version found `started` after a crash is *resumed*, never started again: the
delivery path continues it from the rollout state store (see aml_pipelines/delivery.py).

Every change is a read-modify-write under a short flock and lands with write-temp + fsync +
rename + fsync of the folder, so a crash leaves either the old or the new file, never half of one,
and two processes (a watcher and a webhook server) sharing a state folder cannot lose an update.

A cursor grows with the registry: one entry per version accepted, kept for good (a done entry is
what keeps a superseded or skipped candidate from being delivered later), but for entries closed
`missing`, of which the last MISSING_KEPT are kept (`_forget_missing`).

Seen events (`<state>/events.json`): the ids of the last `SEEN_EVENTS_KEPT` accepted Event Grid
events. Event Grid delivers at least once and retries for up to 24 h; ids older than that window
are far beyond the bound.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from aml_pipelines.errors import TriggerError
from aml_pipelines.fileio import write_json
from aml_pipelines.trigger.lock import FileLock

SEEN_EVENTS_KEPT = 10_000
#: Entries closed MISSING kept per cursor, the most recent (see `_forget_missing`).
MISSING_KEPT = 100
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
#: Longest model part of a state file name: a file name is at most 255 bytes, and around it go
#: "cursor-" + ".json", and write_json's ".<name>.XXXXXXXX.tmp". (Model names reach 255.)
_MAX_SAFE_NAME = 200


class Step(StrEnum):
    """Where one version is in its delivery."""

    PENDING = "pending"
    STARTED = "started"
    DONE = "done"


#: Outcome recorded for a pending version skipped because a newer one superseded it.
SUPERSEDED = "superseded"
#: Outcome recorded for a pending version the registry already shows as delivered, or as
#: withdrawn (archived in the Azure ML studio), or that another rollout is in charge of.
SKIPPED = "skipped"
#: Outcome recorded for a pending version the registry did not hold when its turn came (an event
#: ahead of a registry read, or naming a version that was never registered; one an event named is
#: asked for a few times first, see dispatch.MISSING_RETRIES_S): the one closed
#: entry a trigger accepts again, once the watcher lists the version or a new event names it.
MISSING = "missing"


@dataclass(frozen=True)
class Entry:
    """One version in a cursor."""

    version: int
    step: Step
    source: str = ""  # "watch" or "event:<id>"
    outcome: str = ""  # rollout phase (Succeeded, RolledBack, Failed, ...), SUPERSEDED or SKIPPED
    reason: str = ""
    updated_at: str = ""
    #: How many times the delivery was entered (2 = resumed once, after a crash or an error,
    #: a refused retry included); shown by `trigger status`, never a limit.
    attempts: int = 0

    def to_json(self) -> dict[str, Any]:
        """The JSON form (the version is the key, not repeated)."""
        data = asdict(self)
        del data["version"]
        data["step"] = self.step.value
        return data


@dataclass
class Cursor:
    """Every version of one model a trigger has accepted, keyed by version."""

    model: str
    entries: dict[int, Entry] = field(default_factory=dict)

    def open_entries(self) -> list[Entry]:
        """Versions not yet done: started first (a crash left them), then pending; oldest first."""
        live = [e for e in self.entries.values() if e.step is not Step.DONE]
        return sorted(live, key=lambda e: (e.step is not Step.STARTED, e.version))


def _forget_missing(cursor: Cursor) -> None:
    """Drop all but the MISSING_KEPT most recent entries closed MISSING. Every other entry
    stands for a version the registry held (but for one `--supersede` closed before reading
    it), so a cursor grows as the registry does; a MISSING one stands for whatever version
    number an event named, and remembers nothing a trigger needs (it is accepted again when
    named): kept only for `trigger status`."""
    missing = sorted(
        (e for e in cursor.entries.values() if e.step is Step.DONE and e.outcome == MISSING),
        key=lambda e: (e.updated_at, e.version),
    )
    for entry in missing[: max(0, len(missing) - MISSING_KEPT)]:
        del cursor.entries[entry.version]


#: A version number as a cursor writes it (no sign, no leading zero, ASCII digits only).
_VERSION = re.compile(r"[1-9][0-9]*")
#: The type of each field of an Entry as written (but the version, which is the key).
_FIELD_TYPES: dict[str, type] = {
    "step": str,
    "source": str,
    "outcome": str,
    "reason": str,
    "updated_at": str,
    "attempts": int,
}


def _entry(key: str, value: Any) -> Entry:
    """One entry of a cursor file, checked field by field: a wrong type let through failed
    later, far from the file (`attempts + 1` in the worker, with a traceback)."""
    if not _VERSION.fullmatch(key):
        raise ValueError(f"version {key!r} is not a version number")
    if not isinstance(value, dict):
        raise TypeError(f"version {key}: {value!r} is not an entry")
    if unknown := sorted(set(value) - set(_FIELD_TYPES)):
        raise ValueError(f"version {key}: unknown field(s) {', '.join(unknown)}")
    for name, kind in _FIELD_TYPES.items():
        if name in value and (not isinstance(value[name], kind) or isinstance(value[name], bool)):
            raise TypeError(f"version {key}: {name} {value[name]!r} is not a {kind.__name__}")
    if "step" not in value:
        raise ValueError(f"version {key}: no step")
    try:
        step = Step(value["step"])
    except ValueError:
        raise ValueError(
            f"version {key}: step {value['step']!r} is not one of "
            f"{', '.join(s.value for s in Step)}"
        ) from None
    return Entry(version=int(key), **{**value, "step": step})


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise TriggerError(f"cannot read trigger state {path}: {exc}") from exc


class TriggerStore:
    """Cursors and seen event ids under one state folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------ paths and locks

    def _safe(self, model: str) -> str:
        safe = _SAFE_NAME.sub("_", model)
        if len(safe) <= _MAX_SAFE_NAME:
            return safe
        # Cut to fit a file name; a hash of the whole name keeps two long names apart.
        digest = hashlib.sha256(model.encode()).hexdigest()[:16]
        return f"{safe[: _MAX_SAFE_NAME - len(digest) - 1]}-{digest}"

    def cursor_path(self, model: str) -> Path:
        """The cursor file of one model."""
        return self.root / f"cursor-{self._safe(model)}.json"

    def lock(self, name: str, what: str) -> FileLock:
        """A lock file in the state folder (e.g. `watch-<model>`, `deliver`, `serve`)."""
        return FileLock(self.root / f"{self._safe(name)}.lock", what)

    # ------------------------------------------------------------------ cursors

    def load(self, model: str) -> Cursor:
        """The cursor of `model` (empty when none was written yet); TriggerError naming the
        file when it holds anything but what `_editing` writes."""
        path = self.cursor_path(model)
        raw = _read_json(path)
        cursor = Cursor(model)
        if raw is None:
            return cursor
        versions = raw.get("versions") if isinstance(raw, dict) else None
        if not isinstance(versions, dict):
            # Every caller expects a TriggerError: an AttributeError here was a traceback from
            # `trigger status`, uvicorn's bare 500, and every model's deliveries stopped.
            raise TriggerError(
                f'trigger cursor {path} is unreadable: no versions in it (expected {{"model": '
                f'..., "versions": {{version: entry}}}})'
            )
        for key, value in versions.items():
            try:
                cursor.entries[int(key)] = _entry(key, value)
            except (TypeError, ValueError) as exc:
                raise TriggerError(f"trigger cursor {path} is unreadable: {exc}") from exc
        return cursor

    @contextlib.contextmanager
    def _editing(self, model: str) -> Iterator[Cursor]:
        """The cursor to change under the lock; written after, unless left as it was."""
        with self.lock(f"cursor-{model}", f"cursor of {model}").held():
            cursor = self.load(model)
            before = dict(cursor.entries)
            yield cursor
            _forget_missing(cursor)
            if cursor.entries == before and self.cursor_path(model).exists():
                return  # nothing new (a redelivered event): no write, no fsync
            write_json(
                self.cursor_path(model),
                {
                    "model": model,
                    "versions": {str(v): e.to_json() for v, e in sorted(cursor.entries.items())},
                },
            )

    def accept(self, model: str, version: int, source: str) -> bool:
        """Record `version` as pending unless the cursor already knows it; True when new.

        A version closed as MISSING is known only as "not there yet": it is pending again.
        """
        return bool(self.accept_many(model, [(version, source)]))

    def accept_many(
        self,
        model: str,
        versions: Sequence[tuple[int, str]],
        closed: Mapping[int, tuple[str, str]] | None = None,
    ) -> list[int]:
        """`accept` each (version, source) in one cursor write; returns the new versions (one
        given twice is new once). An Event Grid batch is recorded in one write, not one each.
        A new version in `closed` is recorded `done` with its (outcome, reason) instead of
        pending: known from the start not to be delivered (withdrawn in the registry)."""
        new = []
        with self._editing(model) as cursor:
            for version, source in versions:
                known = cursor.entries.get(version)
                if known is not None and known.outcome != MISSING:
                    continue
                entry = Entry(version, Step.PENDING, source, updated_at=_now())
                if closed is not None and version in closed:
                    outcome, reason = closed[version]
                    entry = replace(entry, step=Step.DONE, outcome=outcome, reason=reason)
                cursor.entries[version] = entry
                new.append(version)
        return new

    def update(self, model: str, version: int, change: Callable[[Entry], Entry]) -> Entry:
        """Apply `change` to one entry atomically and return the new entry."""
        with self._editing(model) as cursor:
            if version not in cursor.entries:
                raise TriggerError(f"version {version} of {model} is not in the trigger cursor")
            entry = change(cursor.entries[version])
            cursor.entries[version] = Entry(**{**asdict(entry), "updated_at": _now()})
            return cursor.entries[version]

    def models(self) -> list[str]:
        """Models that have a cursor in this folder (as written in the files)."""
        names = []
        for path in sorted(self.root.glob("cursor-*.json")):
            raw = _read_json(path)
            if raw is None:
                continue  # removed since the listing
            if not (isinstance(raw, dict) and isinstance(raw.get("model"), str)):
                # Not skipped: its versions would be neither shown nor delivered, unsaid.
                raise TriggerError(f"trigger cursor {path} is unreadable: no model name in it")
            names.append(raw["model"])
        return names

    # ------------------------------------------------------------------ seen events

    def _events_path(self) -> Path:
        return self.root / "events.json"

    def _event_ids(self) -> list[str]:
        """The remembered event ids ([] before the first); TriggerError naming the file when it
        holds anything else (never overwritten: it is what makes redeliveries duplicates)."""
        path = self._events_path()
        raw = _read_json(path)
        if raw is None:
            return []
        ids = raw.get("ids") if isinstance(raw, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise TriggerError(f'cannot read trigger state {path}: expected {{"ids": [event ids]}}')
        return ids

    def events_seen(self, event_ids: Iterable[str]) -> set[str]:
        """Those of `event_ids` remembered before (redeliveries)."""
        known = set(self._event_ids())
        return {event_id for event_id in event_ids if event_id in known}

    def remember_events(self, event_ids: Iterable[str]) -> None:
        """Record accepted event ids, in one write (the last SEEN_EVENTS_KEPT are kept)."""
        path = self._events_path()
        with self.lock("events", "event id store").held():
            ids = self._event_ids()
            known = set(ids)
            fresh = [i for i in dict.fromkeys(event_ids) if i not in known]
            if fresh:
                write_json(path, {"ids": (ids + fresh)[-SEEN_EVENTS_KEPT:]})
