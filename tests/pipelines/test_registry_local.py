"""The local registry: immutable versions, mutable tags, integrity on every read, two writers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aml_pipelines import fileio
from aml_pipelines.errors import ConfigError, IntegrityError, ModelNotFound, RegistryError
from aml_pipelines.registry.base import ModelRegistry, Stage
from aml_pipelines.registry.factory import KINDS, open_registry
from aml_pipelines.registry.local import LocalRegistry
from tests.pipelines.conftest import MakeModel, write_model_folder


@pytest.fixture
def registry(tmp_path: Path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "registry")


def test_versions_count_up_and_keep_their_files(registry: LocalRegistry, make_model: MakeModel):
    first = registry.register("m", make_model(mse=10.0), {"stage": Stage.CANDIDATE})
    second = registry.register("m", make_model(mse=9.0))
    assert isinstance(registry, ModelRegistry)
    assert (first.version, second.version) == (1, 2)
    assert registry.latest("m") == second
    assert [v.version for v in registry.list_versions("m")] == [1, 2]
    assert first.path is not None and (first.path / "model.skops").is_file()
    assert first.uri.startswith("file://")
    assert first.stage == Stage.CANDIDATE and second.stage is None
    assert registry.names() == ["m"]


def test_tags_are_mutable_and_files_are_not(registry: LocalRegistry, make_model: MakeModel):
    registry.register("m", make_model(), {"stage": "candidate", "mse": "10"})
    before = registry.get("m", 1)
    after = registry.set_tags("m", 1, {"stage": Stage.PRODUCTION, "mse": ""})
    assert after.tags == {"stage": "production"}  # "" removes a tag
    assert after.sha256 == before.sha256
    assert [v.version for v in registry.find_by_tag("m", "stage", "production")] == [1]
    assert registry.find_by_tag("m", "stage", "candidate") == []


def test_a_version_folder_of_another_registry_registers_as_a_sound_version(
    registry: LocalRegistry, tmp_path: Path, make_model: MakeModel
) -> None:
    """A version copied from a dev registry into prod holds dev's manifest: not a model file."""
    dev = LocalRegistry(tmp_path / "dev").register("m", make_model(mse=10.0))
    assert dev.path is not None and (dev.path / ".registry.json").is_file()

    copied = registry.register("m", dev.path)
    assert registry.get("m", 1) == copied and copied.sha256 == dev.sha256
    assert [v.version for v in registry.list_versions("m")] == [1]
    assert sorted(p.name for p in copied.path.iterdir()) == sorted(  # type: ignore[union-attr]
        p.name for p in dev.path.iterdir()
    )


def test_sha256_is_the_model_file_hash(registry: LocalRegistry, make_model: MakeModel):
    source = make_model()
    version = registry.register("m", source)
    assert version.sha256 == (source / "model.json").read_text().split('"sha256": "')[1][:64]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        pytest.param(lambda d: _flip_byte(d / "model.skops"), "model.skops has sha256", id="flip"),
        pytest.param(lambda d: (d / "model.skops").write_bytes(b""), "model.skops", id="truncate"),
        pytest.param(lambda d: (d / "model.json").unlink(), "model.json is missing", id="delete"),
        pytest.param(lambda d: (d / "evil.py").write_text("x"), "unexpected files", id="add"),
        pytest.param(
            lambda d: (d / ".registry.json").write_text('{"name": "m", "ver'),
            r"\.registry\.json is damaged",
            id="manifest-truncated",
        ),
        pytest.param(
            lambda d: (d.parent / "1.tags.json").write_text(""),
            r"1\.tags\.json is damaged",
            id="tags-empty",
        ),
        pytest.param(
            lambda d: (d.parent / "1.tags.json").write_text("[]"),
            "not a JSON object",
            id="tags-not-an-object",
        ),
    ],
)
def test_a_tampered_version_is_refused_and_left_out_of_listings(
    registry: LocalRegistry, make_model: MakeModel, tamper, message: str, caplog
) -> None:
    stored = registry.register("m", make_model(), {"stage": Stage.ARCHIVED})
    registry.register("m", make_model(mse=9.0), {"stage": Stage.CANDIDATE})
    assert stored.path is not None
    tamper(stored.path)
    with pytest.raises(IntegrityError, match=message):
        registry.get("m", 1)  # strict: IntegrityError closes a delivery as Failed, never a retry
    # One damaged old version must not block the gate, the watcher and every new delivery.
    for _ in range(2):
        assert [v.version for v in registry.list_versions("m")] == [2]
        assert [v.version for v in registry.find_by_tag("m", "stage", "candidate")] == [2]
        latest = registry.latest("m")
        assert latest is not None and latest.version == 2
    assert [r.getMessage()[:22] for r in caplog.records if r.levelname == "WARNING"] == [
        "skipping m:1 in listin"
    ]  # once per version, not once per listing


def test_a_damaged_latest_version_is_skipped_by_latest(
    registry: LocalRegistry, make_model: MakeModel
) -> None:
    registry.register("m", make_model())
    broken = registry.register("m", make_model(mse=9.0))
    assert broken.path is not None
    _flip_byte(broken.path / "model.skops")
    latest = registry.latest("m")
    assert latest is not None and latest.version == 1


def test_a_damaged_production_version_is_never_hidden(
    registry: LocalRegistry, make_model: MakeModel
) -> None:
    # Left out, the gate would pass any candidate and older versions could replace production.
    stored = registry.register("m", make_model(), {"stage": Stage.PRODUCTION})
    registry.register("m", make_model(mse=9.0), {"stage": Stage.CANDIDATE})
    assert stored.path is not None
    _flip_byte(stored.path / "model.skops")
    with pytest.raises(IntegrityError, match=r"model\.skops has sha256"):
        registry.find_by_tag("m", "stage", Stage.PRODUCTION)


def test_a_version_whose_tags_are_damaged_is_not_hidden_either(
    registry: LocalRegistry, make_model: MakeModel
) -> None:
    # Its stage is unknown: it may be production, and hiding it would let the gate pass anything.
    stored = registry.register("m", make_model(), {"stage": Stage.PRODUCTION})
    registry.register("m", make_model(mse=9.0), {"stage": Stage.CANDIDATE})
    assert stored.path is not None
    (stored.path.parent / "1.tags.json").write_text("")
    assert [v.version for v in registry.list_versions("m")] == [2]  # listings go on
    with pytest.raises(IntegrityError, match=r"which version is in production is unknown"):
        registry.find_by_tag("m", "stage", Stage.PRODUCTION)
    # Repaired: the same registry object sees it (nothing about the damage is remembered).
    (stored.path.parent / "1.tags.json").write_text('{"stage": "production"}')
    assert [v.version for v in registry.find_by_tag("m", "stage", Stage.PRODUCTION)] == [1]


def test_a_damaged_version_without_tags_does_not_block_the_production_lookup(
    registry: LocalRegistry, make_model: MakeModel
) -> None:
    stored = registry.register("m", make_model())
    assert stored.path is not None
    (stored.path.parent / "1.tags.json").unlink(missing_ok=True)
    _flip_byte(stored.path / "model.skops")
    assert registry.find_by_tag("m", "stage", Stage.PRODUCTION) == []  # no tags: not production


@pytest.mark.parametrize(
    ("setup", "error", "message"),
    [
        pytest.param("no-model-json", RegistryError, "not a model folder", id="not-a-model"),
        pytest.param("lying-sha", IntegrityError, "claim", id="model-json-lies"),
        # was an IntegrityError: "... model.json or the tags claim ['None']"
        pytest.param("no-sha", RegistryError, "model.json has no sha256", id="model-json-no-sha"),
        pytest.param("azureml", RegistryError, "local folders", id="azureml-uri"),
    ],
)
def test_bad_sources_are_refused(
    registry: LocalRegistry, tmp_path: Path, setup: str, error: type[Exception], message: str
) -> None:
    source: str | Path = write_model_folder(tmp_path / "src")
    if setup == "no-model-json":
        (tmp_path / "src" / "model.json").unlink()
    elif setup == "lying-sha":
        text = (tmp_path / "src" / "model.json").read_text()
        (tmp_path / "src" / "model.json").write_text(text.replace('"sha256": "', '"sha256": "0'))
    elif setup == "no-sha":
        record = fileio.read_json(tmp_path / "src" / "model.json")
        del record["sha256"]
        fileio.write_json(tmp_path / "src" / "model.json", record)
    else:
        source = "azureml://jobs/x/outputs/model"
    with pytest.raises(error, match=message):
        registry.register("m", source)
    assert registry.list_versions("m") == []


def test_unknown_version_and_bad_names(registry: LocalRegistry, make_model: MakeModel) -> None:
    registry.register("m", make_model())
    with pytest.raises(ModelNotFound, match=r"version 7 not found .*versions: \[1\]"):
        registry.get("m", 7)
    assert registry.latest("other") is None
    with pytest.raises(ConfigError, match="invalid"):
        registry.register("../escape", make_model())
    with pytest.raises(ConfigError, match="invalid"):  # `$` matched before the newline
        registry.register("m\n", make_model())
    # Was a raw OSError (ENAMETOOLONG), retried by the trigger's worker with a traceback.
    with pytest.raises(RegistryError, match=r"m:9{300}: cannot read it in .*: File name too long"):
        registry.get("m", int("9" * 300))


def test_factory_maps_kinds_and_refuses_unknown_ones(tmp_path: Path) -> None:
    assert isinstance(open_registry(f"local:{tmp_path}"), LocalRegistry)
    expected = "unknown kind 'mlflow' .*; expected local, local:PATH, azureml or azureml:SUB"
    with pytest.raises(ConfigError, match=expected) as refused:
        open_registry("mlflow:x")
    # Every accepted kind is named, not only the first one written (was: "one of 'local:PATH'").
    assert all(kind in str(refused.value) for kind in KINDS)


def test_readers_can_require_the_local_folder_to_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert isinstance(open_registry(f"local:{missing}"), LocalRegistry)  # a writer creates it
    assert not missing.exists()
    with pytest.raises(ConfigError, match=f"{missing} does not exist"):
        open_registry(f"local:{missing}", must_exist=True)
    missing.mkdir()  # an empty registry, waiting for its first registration, is fine
    assert open_registry(f"local:{missing}", must_exist=True).names() == []
    a_file = tmp_path / "registry.txt"  # was reported as "does not exist"
    a_file.write_text("")
    with pytest.raises(ConfigError, match=f"{a_file} is a file, not a registry folder"):
        open_registry(f"local:{a_file}", must_exist=True)


def test_a_sha256_tag_is_a_claim_that_is_checked(registry: LocalRegistry, tmp_path: Path) -> None:
    source = write_model_folder(tmp_path / "src")
    with pytest.raises(IntegrityError, match="the tags claim"):
        registry.register("m", source, {"sha256": "0"})
    assert registry.list_versions("m") == []


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tags=st.dictionaries(
        # ("sha256" is not a free tag: it claims the model file's hash, see the test above.)
        st.text(
            st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=8
        ).filter(lambda key: key != "sha256"),
        st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=8),
        max_size=5,
    )
)
def test_tags_round_trip(tmp_path: Path, tags: dict[str, str]) -> None:
    registry = LocalRegistry(tmp_path / "hyp")
    version = registry.register("m", write_model_folder(tmp_path / "hyp-src"), tags)
    assert dict(registry.get("m", version.version).tags) == tags


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from aml_pipelines.registry.local import LocalRegistry
    from tests.pipelines.conftest import write_model_folder

    root, go, me, count = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    sources = [
        write_model_folder(root.parent / f"src-{me}-{i}", salt=f"{me}{i}") for i in range(count)
    ]
    (root.parent / f"ready-{me}").touch()
    deadline = time.monotonic() + 30
    while not go.exists() and time.monotonic() < deadline:  # start together
        time.sleep(0.001)
    registry = LocalRegistry(root)
    print(" ".join(str(registry.register("m", s, {"writer": me}).version) for s in sources))
    """
)


def test_two_processes_registering_at_once_get_distinct_versions(tmp_path: Path) -> None:
    root, go, per_writer = tmp_path / "registry", tmp_path / "go", 6
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), str(go), name, str(per_writer)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        for name in ("a", "b")
    ]
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"ready-{n}").exists() for n in "ab"):  # both imported, then go
            assert time.monotonic() < deadline, "writers did not start"
            time.sleep(0.01)
        go.touch()
        outputs = [w.communicate(timeout=60)[0] for w in writers]
    finally:  # a failed start or a hung writer leaks no process
        for w in writers:
            w.kill()
            w.communicate()
    assert [w.returncode for w in writers] == [0, 0]
    got = [int(v) for out in outputs for v in out.split()]
    assert sorted(got) == list(range(1, 2 * per_writer + 1))
    registry = LocalRegistry(root)
    by_writer = {v.version: v.tags["writer"] for v in registry.list_versions("m")}
    assert sorted(by_writer.values()) == ["a"] * per_writer + ["b"] * per_writer


@pytest.mark.parametrize(
    ("lock", "age_s", "removed"),
    [
        # A registration killed mid-copy: its lock file is there and nobody holds it.
        pytest.param("free", 0, True, id="killed-registration"),
        # A live one copying a model folder last written long ago (copytree copies its mtime).
        pytest.param("held", 7200, False, id="live-registration-of-an-old-folder"),
        # Staging folders of older versions (no lock file): judged by their age, as they were.
        pytest.param(None, 7200, True, id="old-lockless"),
        pytest.param(None, 0, False, id="recent-lockless"),
    ],
)
def test_abandoned_staging_folders_are_cleaned(
    registry: LocalRegistry, make_model: MakeModel, lock: str | None, age_s: int, removed: bool
) -> None:
    import fcntl

    registry.register("m", make_model())
    staging = registry.root / "m" / ".tmp-other"
    staging.mkdir()
    (staging / "model.skops").write_bytes(b"half copied")
    then = time.time() - age_s
    os.utime(staging, (then, then))
    held = None
    if lock is not None:
        held = os.open(registry.root / "m" / ".tmp-other.lock", os.O_RDWR | os.O_CREAT)
        if lock == "held":
            fcntl.flock(held, fcntl.LOCK_EX)  # another registration, in flight
    try:
        registry.register("m", make_model(mse=5.0))
    finally:
        if held is not None:
            os.close(held)
    assert staging.exists() is not removed
    assert (registry.root / "m" / ".tmp-other.lock").exists() is (lock is not None and not removed)
    assert [v.version for v in registry.list_versions("m")] == [1, 2]


@pytest.mark.parametrize(
    "when",
    [
        pytest.param("copying", id="while-it-hashes-the-copy"),
        pytest.param("locked", id="while-it-holds-the-lock"),
    ],
)
def test_a_live_registration_of_an_old_model_folder_survives_another_one(
    registry: LocalRegistry, make_model: MakeModel, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """copytree copies the source folder's mtime onto the staging folder: a folder trained over
    an hour ago looked abandoned, and a registration starting meanwhile deleted it (a raw
    FileNotFoundError, or a version holding only its manifest, corrupted for good)."""
    from aml_pipelines.registry import local

    source = make_model()
    then = time.time() - 7200
    os.utime(source, (then, then))
    cleaned: list[bool] = []

    def another_registration_starts() -> None:
        if not cleaned:
            cleaned.append(True)
            local._remove_abandoned_staging(registry.root / "m")  # what its register does first

    real_hash, real_write = local.sha256_file, local.write_json

    def hashing(path: Path) -> str:
        if when == "copying" and ".tmp-" in str(path):
            another_registration_starts()
        return real_hash(path)

    def writing(path: Path, payload: Any) -> None:
        if when == "locked" and path.name == local.MANIFEST:
            another_registration_starts()
        real_write(path, payload)

    monkeypatch.setattr(local, "sha256_file", hashing)
    monkeypatch.setattr(local, "write_json", writing)
    version = registry.register("m", source)
    monkeypatch.undo()
    assert cleaned and registry.get("m", 1) == version
    assert version.path is not None and (version.path / "model.skops").is_file()
    assert sorted(p.name for p in (registry.root / "m").iterdir()) == [".lock", "1", "1.tags.json"]


def test_a_staging_folder_removed_under_a_registration_fails_it_cleanly(
    registry: LocalRegistry, make_model: MakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never a version made of a re-created, empty staging folder (write_json makes its folder)."""
    import shutil

    from aml_pipelines.registry import local

    real_write = local.write_json

    def writing(path: Path, payload: Any) -> None:
        if path.name == local.MANIFEST:
            shutil.rmtree(path.parent)  # someone removed it by hand
        real_write(path, payload)

    monkeypatch.setattr(local, "write_json", writing)
    with pytest.raises(RegistryError, match=r"m: the copy of .* in .*\.tmp-\w+ was removed"):
        registry.register("m", make_model())
    monkeypatch.undo()
    assert registry.list_versions("m") == [] and not (registry.root / "m" / "1").exists()
    assert registry.register("m", make_model()).version == 1


def test_a_removed_versions_number_is_not_reused_with_its_tags_and_marker(
    registry: LocalRegistry, make_model: MakeModel
) -> None:
    import shutil

    registry.register("m", make_model(), {"stage": Stage.PRODUCTION})
    registry.register("m", make_model(mse=9.0), {"stage": Stage.CANDIDATE, "bad": "yes"})
    registry.withdraw("m", 2)
    shutil.rmtree(registry.root / "m" / "2")  # the bad version removed by hand
    # It got number 2 again, born withdrawn (out of every listing) and tagged bad=yes.
    new = registry.register("m", make_model(mse=8.0), {"stage": Stage.CANDIDATE})
    assert (new.version, new.withdrawn, dict(new.tags)) == (3, False, {"stage": "candidate"})
    assert [v.version for v in registry.list_versions("m")] == [1, 3]


@pytest.mark.parametrize(
    ("fails", "message"),
    [
        pytest.param("lock", r"cannot write .*/m/\.lock \(Read-only file system\)", id="lock"),
        pytest.param(
            "record",
            r"cannot write .*/m/1\.(tags\.json|withdrawn) \(Permission denied\)",
            id="record",
        ),
    ],
)
@pytest.mark.parametrize("edit", ["tag", "withdraw"])
def test_a_registry_it_cannot_write_is_one_clear_error(
    registry: LocalRegistry,
    make_model: MakeModel,
    monkeypatch: pytest.MonkeyPatch,
    fails: str,
    message: str,
    edit: str,
) -> None:
    """Was a raw OSError traceback from `registry tag` (a read-only mount, another's registry)."""
    import errno

    from aml_pipelines.registry import local

    registry.register("m", make_model())
    real_open = os.open

    def refusing_open(path: Any, flags: int, *args: Any) -> int:
        if fails == "lock" and str(path).endswith(".lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    def refusing_write(path: Path, payload: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def refusing_touch(self: Path, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(local.os, "open", refusing_open)
    if fails == "record":
        monkeypatch.setattr(local, "write_json", refusing_write)
        monkeypatch.setattr(Path, "touch", refusing_touch)
    with pytest.raises(RegistryError, match=message):
        if edit == "tag":
            registry.set_tags("m", 1, {"note": "x"})
        else:
            registry.withdraw("m", 1)
    monkeypatch.undo()
    assert registry.get("m", 1).tags == {} and not registry.get("m", 1).withdrawn


def test_write_json_is_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tags and manifests must survive a power cut: data fsynced before the rename, the folder
    # after it (rename alone may reach the disk before the data, leaving an empty file).
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, Path.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", str(Path(f"/proc/self/fd/{fd}").readlink())))
        real_fsync(fd)

    def replace(self: Path, target: Any) -> Path:
        events.append(("rename", str(target)))
        return real_replace(self, target)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(Path, "replace", replace)
    target = tmp_path / "1.tags.json"
    fileio.write_json(target, {"stage": "candidate"})
    monkeypatch.undo()
    assert [kind for kind, _ in events] == ["fsync", "rename", "fsync"]
    assert Path(events[0][1]).parent == tmp_path and events[0][1] != str(target)  # the temp file
    assert events[1][1] == str(target) and events[2][1] == str(tmp_path)
    assert fileio.read_json(target) == {"stage": "candidate"}
    assert [p.name for p in tmp_path.iterdir()] == ["1.tags.json"]


@pytest.mark.parametrize(
    ("umask", "mode"),
    [pytest.param(0o022, 0o644, id="umask-022"), pytest.param(0o027, 0o640, id="umask-027")],
)
def test_registry_records_get_the_mode_of_a_normal_open(
    registry: LocalRegistry, make_model: MakeModel, umask: int, mode: int
) -> None:
    """Tags and manifests as readable as the model files: a registry shared by a service
    account and its users was unreadable to all but the writer (mkstemp's 0600)."""
    old = os.umask(umask)
    try:
        version = registry.register("m", make_model(), {"stage": Stage.CANDIDATE})
        registry.set_tags("m", 1, {"stage": Stage.PRODUCTION})
    finally:
        os.umask(old)
    assert version.path is not None
    modes = {
        p.name: p.stat().st_mode & 0o777
        for p in [*version.path.iterdir(), registry.root / "m" / "1.tags.json"]
    }
    assert modes == dict.fromkeys(modes, mode)


def test_an_unreadable_registry_record_is_one_clear_error(
    registry: LocalRegistry, make_model: MakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.register("m", make_model())
    real = fileio.read_json

    def forbidden(path: Path) -> Any:
        if path.name in {".registry.json", "1.tags.json"}:  # root reads whatever the mode
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr("aml_pipelines.registry.local.read_json", forbidden)
    with pytest.raises(RegistryError, match=r"m:1: .*\.registry\.json cannot be read \(Permi"):
        registry.list_versions("m")


def wait_until_blocked_on(lock: Path, timeout_s: float = 60.0) -> None:
    """Return once some process waits for the flock on `lock` (a `->` line of /proc/locks): a
    sure sign, with no sleep guessing how long a start takes, that it reached the lock."""
    inode = lock.stat().st_ino
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "->" in fields and fields[fields.index("->") + 5].endswith(f":{inode}"):
                return
        time.sleep(0.01)
    raise AssertionError(f"nobody waited for {lock} within {timeout_s} s")


FOLLOWER = textwrap.dedent(
    """
    import sys
    from aml_pipelines.delivery import SUCCEEDED, follow_traffic
    from aml_pipelines.registry.local import LocalRegistry

    changes = follow_traffic(LocalRegistry(sys.argv[1]), "m", 3, SUCCEEDED)
    print(" ".join(f"{c.version}={c.tags['stage']}" for c in changes))
    """
)


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks")
def test_a_promotion_plans_over_the_holder_another_process_just_tagged(
    registry: LocalRegistry, make_model: MakeModel
) -> None:
    # v1 production, v2 and v3 candidates. Another process (this one) promotes v2 while the
    # rollout step's follow_traffic promotes v3: planned over a listing read before v2 moved,
    # it archived v1 (already archived) and left v2 and v3 both production.
    for i in (1, 2, 3):
        registry.register("m", make_model(salt=str(i)), {"stage": "candidate"})
    registry.set_tags("m", 1, {"stage": Stage.PRODUCTION})
    follower = None
    try:
        with registry.transaction("m"):
            follower = subprocess.Popen(
                [sys.executable, "-c", FOLLOWER, str(registry.root)],
                stdout=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).resolve().parents[2],
            )
            wait_until_blocked_on(registry.root / "m" / ".lock")
            registry.set_tags("m", 2, {"stage": Stage.PRODUCTION})
            registry.set_tags("m", 1, {"stage": Stage.ARCHIVED})
        out, _ = follower.communicate(timeout=60)
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
            follower.communicate()
    assert follower.returncode == 0
    assert out.split() == ["3=production", "2=archived"]
    stages = {v.version: v.stage for v in registry.list_versions("m")}
    assert stages == {1: Stage.ARCHIVED, 2: Stage.ARCHIVED, 3: Stage.PRODUCTION}


def test_a_transaction_lets_its_own_writes_through_and_keeps_others_out(
    registry: LocalRegistry, make_model: MakeModel
) -> None:
    registry.register("m", make_model(salt="1"))
    lock = registry.root / "m" / ".lock"
    import fcntl

    with registry.transaction("m"):
        registry.set_tags("m", 1, {"k": "v"})  # not waiting on itself
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # another open file (another process) waits
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released once the block ends
    finally:
        os.close(fd)
    assert registry.get("m", 1).tags["k"] == "v"


def test_a_tag_transaction_hashes_the_versions_before_it_takes_the_lock(
    registry: LocalRegistry, make_model: MakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: every version's files re-hashed (twice) while the model's lock was held: another
    # writer of the model waited 3.9 s for ten 200 MB versions.
    from aml_pipelines.delivery import plan_manual_tags, retag
    from aml_pipelines.registry import local

    for mse in (10.0, 9.0, 8.0):
        registry.register("m", make_model(mse=mse))
    registry.set_tags("m", 1, {"stage": Stage.PRODUCTION})
    hashed, real = {"locked": 0, "free": 0}, local.sha256_file

    def counted(path: Path) -> str:
        locked = registry.root / "m" in registry._held.__dict__.get("roots", set())
        hashed["locked" if locked else "free"] += 1
        return real(path)

    monkeypatch.setattr(local, "sha256_file", counted)
    retag(registry, "m", lambda vs: plan_manual_tags(vs, 3, {"stage": "production"}, replace=True))
    assert hashed["locked"] == 0 and hashed["free"] > 0
    assert [v.version for v in registry.find_by_tag("m", "stage", Stage.PRODUCTION)] == [3]
    # a file rewritten between the two reads is hashed again under the lock, and caught
    monkeypatch.setattr(local, "sha256_file", real)
    model_file = next(p for p in (registry.root / "m" / "2").iterdir() if p.suffix != ".json")
    with registry.transaction("m"):
        model_file.write_bytes(b"tampered")
        with pytest.raises(IntegrityError, match="m:2 is corrupted"):
            registry.get("m", 2)


def test_a_tag_edit_on_a_model_that_is_not_there_creates_nothing(tmp_path: Path) -> None:
    # Was: `registry tag typo 1 sha256=` made typo/.lock (and the registry folder), after which
    # a watcher on the typo'd registry opened it and polled an empty registry for ever.
    registry = LocalRegistry(tmp_path / "typo-registry")
    with (
        pytest.raises(ModelNotFound, match="model 'diabetis' not found"),
        registry.transaction("diabetis"),
    ):
        pass
    assert not (tmp_path / "typo-registry").exists()
