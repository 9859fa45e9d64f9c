"""The file store beyond the shared contract: what a local or network filesystem may do to it."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from rollout.core.status import Status
from rollout.errors import StateError
from rollout.state import file as file_store
from rollout.state.file import FileStateStore


def no_locks(fd: int, operation: int) -> None:
    raise OSError(errno.ENOLCK, "No locks available")


@pytest.mark.parametrize(
    "use",
    [
        pytest.param(lambda s: s.controller(), id="who-holds-the-lease"),
        pytest.param(lambda s: s.lease("ann").__enter__(), id="take-the-lease"),
    ],
)
def test_a_filesystem_without_locks_is_a_state_error_naming_the_lock_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use: Any
) -> None:
    # An NFSv3 mount without its lock daemon answers ENOLCK. `status` and the steering
    # commands ask who holds the lease: that was an OSError, a traceback instead of one line.
    store = FileStateStore(tmp_path, "r")
    (tmp_path / "r.lock").write_text("")
    monkeypatch.setattr(file_store.fcntl, "flock", no_locks)
    with pytest.raises(StateError, match=r"r\.lock: No locks available"):
        use(store)


def disk_full(fd: int) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def interrupted(fd: int) -> None:
    raise KeyboardInterrupt  # Ctrl-C, or SIGTERM (`run` turns it into the same)


@pytest.mark.parametrize(
    ("fails", "error"),
    [
        pytest.param(disk_full, StateError, id="disk-full"),
        pytest.param(interrupted, KeyboardInterrupt, id="ctrl-c"),
    ],
)
def test_a_status_write_that_fails_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: Any, error: type[BaseException]
) -> None:
    # Was: a `.r.status.<pid>.tmp` left behind at each one, on a disk already full.
    store = FileStateStore(tmp_path, "r")
    store.save(Status(name="r", id="1"))
    monkeypatch.setattr(file_store.os, "fsync", fails)
    with pytest.raises(error):
        store.save(Status(name="r", id="2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.status.json"]
    loaded = store.load()
    assert loaded is not None and loaded.id == "1"  # the last status written whole is kept
