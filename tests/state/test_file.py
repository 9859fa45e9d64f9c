"""The file store beyond the shared contract: what a local or network filesystem may do to it."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from rollout.core.status import Status
from rollout.errors import LeaseHeldError, StateError
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


def test_a_status_is_renamed_into_place_whole_and_the_rename_made_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reader (`status`, a restarted controller) sees the old status or the new one, never a
    # torn one: the new one is written and fsynced under another name, then renamed over it;
    # the directory's fsync makes the rename survive a power cut.
    store = FileStateStore(tmp_path, "r")
    store.save(Status(name="r", id="1"))
    events: list[tuple[str, Any]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        events.append(("fsync", "dir" if stat.S_ISDIR(mode) else "file"))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        assert Path(dst) == store.status_path and Path(src) != store.status_path
        new = json.loads(Path(src).read_text(encoding="utf-8"))
        assert new["id"] == "2"  # the temp is whole before the rename...
        assert store.load() == Status(name="r", id="1")  # ...and the status untouched till then
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(file_store.os, "fsync", fsync)
    monkeypatch.setattr(file_store.os, "replace", replace)
    store.save(Status(name="r", id="2"))
    assert events == [("fsync", "file"), ("replace", "r.status.json"), ("fsync", "dir")]
    assert store.load() == Status(name="r", id="2")


def test_a_controller_starting_while_a_probe_holds_the_lock_waits_it_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `status` probes the lease with a shared lock for microseconds: a controller starting
    # at that moment waits for it instead of being refused as "already driven".
    lock = tmp_path / "r.lock"
    lock.write_text("")
    probe = os.open(lock, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    waited: list[float] = []

    def probe_ends(seconds: float) -> None:
        waited.append(seconds)
        fcntl.flock(probe, fcntl.LOCK_UN)

    monkeypatch.setattr(file_store.time, "sleep", probe_ends)
    try:
        store = FileStateStore(tmp_path, "r")
        with store.lease("ann"):
            store.check_lease()
            assert "ann" in lock.read_text()
    finally:
        os.close(probe)
    assert waited


def _delete(path: Path) -> None:
    path.unlink()


def _replace(path: Path) -> None:
    other = path.with_name("other")
    other.write_text("")
    other.replace(path)


@pytest.mark.parametrize(
    "clean_up",
    [
        pytest.param(_delete, id="lock-file-deleted"),
        pytest.param(_replace, id="lock-file-replaced"),
    ],
)
def test_a_lease_whose_lock_file_is_cleaned_up_is_lost_not_shared(
    tmp_path: Path, clean_up: Any
) -> None:
    # Was: the lock stayed on the old inode, a second controller locked a new file, and both
    # drove the rollout (each applied the same pause, the ledger's ticks interleaved).
    first, second = FileStateStore(tmp_path, "r"), FileStateStore(tmp_path, "r")
    with first.lease("ann"):
        first.check_lease()
        first.save(Status(name="r", id="1"))
        with pytest.raises(LeaseHeldError):
            second.lease("bob").__enter__()
        clean_up(tmp_path / "r.lock")
        with second.lease("bob"):
            second.check_lease()
            for use in (first.check_lease, lambda: first.save(Status(name="r", id="1"))):
                with pytest.raises(StateError, match=r"lost the lease .*/r\.lock was deleted"):
                    use()
            second.save(Status(name="r", id="2"))
            assert "bob" in (first.controller() or "")
    assert first.load() == Status(name="r", id="2")


def test_a_lock_file_deleted_as_it_is_locked_is_locked_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The holder's clean up between this open and this lock: the lock would be on a file the
    # next controller never opens.
    path = tmp_path / "r.lock"
    real = file_store._try_lock
    deleted: list[int] = []

    def racing(fd: int, patience_s: float = 0.2) -> bool:
        if not deleted:
            deleted.append(fd)
            path.unlink()
        return real(fd, patience_s)

    monkeypatch.setattr(file_store, "_try_lock", racing)
    store = FileStateStore(tmp_path, "r")
    with store.lease("ann"):
        store.check_lease()
        assert "ann" in path.read_text()
        assert "ann" in (FileStateStore(tmp_path, "r").controller() or "")


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b"", id="empty"),
        # Was a UnicodeDecodeError traceback from `status`, `run` and `status --watch`.
        pytest.param(b"\xff\xfe garbage", id="not-utf-8"),
    ],
)
def test_a_corrupt_status_file_is_one_line_saying_how_to_start_again(
    tmp_path: Path, content: bytes
) -> None:
    store = FileStateStore(tmp_path, "r")
    store.status_path.write_bytes(content)
    with pytest.raises(StateError) as refused:
        store.load()
    path = store.status_path
    assert str(refused.value).startswith(f"{path} is not a rollout status: ")
    # `run --restart` reads the status first, so it cannot be the way out: moving it aside is.
    assert f"move it aside (`mv {path} {path}.broken`)" in str(refused.value)
    assert "`aml-rollout rollout run` then starts a new rollout" in str(refused.value)
    assert "\n" not in str(refused.value)


def fails_once(monkeypatch: pytest.MonkeyPatch, name: str, exc: BaseException) -> None:
    """`file_store.os.<name>` raises `exc` at its next call, then works again."""

    def fail(*args: Any) -> Any:
        monkeypatch.undo()
        raise exc

    monkeypatch.setattr(file_store.os, name, fail)


@pytest.mark.parametrize(
    ("call", "exc", "error"),
    [
        pytest.param(
            "write",
            OSError(errno.ENOSPC, "No space left on device"),
            StateError,
            id="stamp-disk-full",
        ),
        pytest.param(
            "fsync", OSError(errno.EIO, "Input/output error"), StateError, id="stamp-fsync"
        ),
        pytest.param("write", KeyboardInterrupt(), KeyboardInterrupt, id="stamp-ctrl-c"),
    ],
)
def test_a_lease_whose_stamp_fails_is_released_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, exc: BaseException, error: Any
) -> None:
    # Was: the locked fd leaked, so the process kept the lock: its next run_rollout, and any
    # other process's `run`, refused as "already driven by another controller (unknown)".
    store = FileStateStore(tmp_path, "r")
    fails_once(monkeypatch, call, exc)
    with pytest.raises(error):
        store.lease("ann").__enter__()
    assert store.controller() is None
    with store.lease("ann"):
        assert "ann" in (FileStateStore(tmp_path, "r").controller() or "")


def test_a_lease_whose_release_fails_to_clear_the_stamp_still_drops_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stamp only names the holder while the lock is held: left behind, it names no one,
    # and an error about it would hide what stopped the controller (the block's exception).
    store = FileStateStore(tmp_path, "r")
    with pytest.raises(KeyboardInterrupt), store.lease("ann"):
        fails_once(monkeypatch, "ftruncate", OSError(errno.EIO, "Input/output error"))
        raise KeyboardInterrupt
    assert store.controller() is None
    with store.lease("bob"):
        assert "bob" in (store.controller() or "")


def test_the_lease_holder_removes_the_temp_files_of_killed_saves(tmp_path: Path) -> None:
    # Was: a controller SIGKILLed between a status temp's write and its rename left
    # `.r.status.<pid>.tmp` for good, one per killed pid (a crash loop: one per restart).
    left = [tmp_path / f".r.status.{pid}.tmp" for pid in (3172, 3179)]
    others = [
        tmp_path / ".r2.status.3172.tmp",  # another rollout's
        tmp_path / ".r.status.1.status.3172.tmp",  # rollout "r.status.1"'s
        tmp_path / "r.status.json",
    ]
    for path in (*left, *others):
        path.write_text("{}")
    store = FileStateStore(tmp_path, "r")
    with store.lease("ann"):
        saving = tmp_path / f".r.status.{os.getpid()}.tmp"
        saving.write_text("{}")  # the holder's save, under way
        with pytest.raises(LeaseHeldError):  # refused: removes nothing of the holder's
            FileStateStore(tmp_path, "r").lease("bob").__enter__()
        assert saving.exists()
        saving.unlink()
    assert not [path for path in left if path.exists()]
    assert all(path.exists() for path in others)


def _append_lines(path: str, writer: int, count: int) -> None:
    from rollout import jsonl

    for i in range(count):
        pad = "x" * (150 + (i * 37 + writer) % 300)  # lines that cross pages now and then
        jsonl.append(Path(path), {"w": writer, "i": i, "pad": pad}, fsync=False)


def test_writers_appending_at_once_leave_no_torn_line(tmp_path: Path) -> None:
    # Was: a writer seeing another's line half written (one crossing a page) took it for a
    # torn fragment: 103 `#torn` lines and a warning in 18,000 appends by 6 writers, no one
    # killed (an operator's pause or resume beside the controller's own lines).
    import multiprocessing

    from rollout import jsonl

    path = tmp_path / "c.jsonl"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_append_lines, args=(str(path), w, 2000)) for w in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    lines = path.read_bytes().split(b"\n")[:-1]
    assert len(lines) == 8000
    assert not [line for line in lines if line.startswith(b"#torn")]
    assert len(jsonl.read(path)) == 8000
