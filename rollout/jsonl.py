"""Append-only JSON-lines files (the ledger, the command log) that survive torn writes.

A writer killed mid-line, or stopped by a full disk, leaves a fragment without its newline.
Readers only take complete lines, and skip (with a warning) the ones that do not parse; a writer
that finds a fragment at the end terminates it first with `TORN`, so that the fragment never
swallows the next record and never parses: a fragment may be a whole JSON object short of its
newline only, whose writer was told it failed (`rollout promote`: "cannot queue a command"),
and a newline alone would make it a record read later. The command log is
read without the warning (`read_slots(warn=False)`): the controller warns once, as it reads past
such a line.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: What ends a torn fragment: it cannot be the end of any JSON text, so the line never parses.
#: Out of a string `#` is no JSON; in one (or after its `\`, or in a `\u` escape) it is a
#: character, or a bad escape, of a string no quote closes (TORN has no `"`).
TORN = b"#torn\n"


def append(path: Path, record: dict[str, Any], *, fsync: bool = True) -> None:
    """Append `record` as one line (one `write` under O_APPEND, so writers never interleave)."""
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)  # read: its last byte
    try:
        # Among writers, one at a time: without, a line another writer had half written (one
        # crossing a page) read as a torn fragment, and a `#torn` line and a warning followed
        # with nobody killed (6 writers x 3,000 lines: 103 of them). A writer killed mid-line
        # lets go of the lock as it dies, its fragment left for the next one to end.
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = TORN + line  # end a torn fragment first, as a line that never parses
        while line:
            written = os.write(fd, line)
            line = line[written:]
        fcntl.flock(fd, fcntl.LOCK_UN)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path) -> list[dict[str, Any]]:
    """The records of every complete line; FileNotFoundError/OSError as `open` raises them."""
    return [record for record in read_slots(path) if record is not None]


def iter_records(path: Path, *, end: int, warn: bool = True) -> Iterator[dict[str, Any]]:
    """`read`, one record at a time: the complete lines of the file's first `end` bytes (its
    size when first looked at, so that two passes over a file still written read the same
    lines). Holds one line at a time, where `read` holds the whole file and every record."""
    skipped: list[int] = []
    with Path(path).open("rb") as fh:
        offset = 0
        for number, line in enumerate(fh, 1):
            offset += len(line)
            if offset > end or not line.endswith(b"\n"):
                break  # torn, or written after `end`
            if not line.strip():
                continue
            record = _record(line)
            if record is None:
                skipped.append(number)
            else:
                yield record
    if warn and skipped:
        _warn_skipped(str(path), skipped)


def read_slots(path: Path, *, warn: bool = True) -> list[dict[str, Any] | None]:
    """One entry per complete non-blank line: its record, or None (with a warning, unless not
    `warn`) when it is not a JSON object. A line keeps its position whether or not it parses, so
    positions into the file never shift (a fragment ended by the next append becomes a None
    slot in place)."""
    data = Path(path).read_bytes()
    lines = data.split(b"\n")[:-1]  # the last piece is incomplete
    return parse_lines(lines, where=path if warn else None)


def parse_lines(
    lines: Iterable[str | bytes], *, where: Path | None = None
) -> list[dict[str, Any] | None]:
    """Each non-blank line's JSON object, or None for a line that is not one (logged as one
    warning naming `where` and the line numbers, when given; each line once per process)."""
    slots: list[dict[str, Any] | None] = []
    skipped: list[int] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _record(line)
        if record is None:
            skipped.append(number)
        slots.append(record)
    if where is not None and skipped:
        _warn_skipped(str(where), skipped)
    return slots


def _record(line: str | bytes) -> dict[str, Any] | None:
    """The JSON object a line holds, else None."""
    try:
        record = json.loads(line)
    except ValueError:  # UnicodeDecodeError included
        return None
    return record if isinstance(record, dict) else None


#: Lines already reported per file. The controller and `status --watch` read the command log
#: every second, and lines never move: without this one torn line would warn once a second for
#: the rest of the rollout.
_reported: dict[str, set[int]] = {}


def _warn_skipped(where: str, numbers: list[int]) -> None:
    seen = _reported.setdefault(where, set())
    new = [n for n in numbers if n not in seen]
    if not new:
        return
    seen.update(new)
    shown = ", ".join(str(n) for n in new[:5]) + (", ..." if len(new) > 5 else "")
    log.warning(
        "%s: skipped %d line(s) that are not JSON objects (a torn write?): line %s",
        where,
        len(new),
        shown,
    )
