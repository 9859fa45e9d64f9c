"""The `local` model registry: a folder on disk, safe for several processes at once.

Layout (one folder per model name):

    <root>/<name>/.lock             fcntl lock serialising version allocation and tag edits
    <root>/<name>/<version>/        the model files, immutable once renamed into place
    <root>/<name>/<version>/.registry.json
                                    {name, version, sha256, files: {relpath: sha256}, created_at}
    <root>/<name>/<version>.tags.json
                                    mutable tags, replaced atomically (temp + rename)
    <root>/<name>/<version>.withdrawn
                                    present once the version is withdrawn (`withdraw`, as the
                                    Azure ML studio's Archive): listings leave it out
    <root>/<name>/.tmp-<id>/, .tmp-<id>.lock
                                    a registration's copy in progress, and its liveness lock

Registration copies the model into a private temp folder first (the slow part, outside the lock),
then takes the lock, allocates the next number (past every version folder, and past the tags file
or withdrawn marker a version removed by hand left: reused, the number would inherit them), writes
the version's tags file and renames the temp folder onto it. The rename is atomic and fails if the
target exists, so even a broken lock could not make two registrations share a version; it comes
after the tags, so a version is never visible without the tags it was registered with. Every read
re-hashes the stored files against `.registry.json`: a corrupted, truncated, added or removed file
raises IntegrityError naming the file, never a silently different model.

While it copies, a registration holds an flock on its temp folder's `.tmp-<id>.lock`; another
registration deletes a temp folder as abandoned only when it can take that lock (its owner died),
never by age: copytree gives the temp folder the source folder's mtime, so a model trained hours
ago looked abandoned at once and was deleted under the registration copying it.

`sha256` of a version is the hash of the model file named by its `model.json` (the model-folder
contract), so it equals `model.json`'s own `sha256` and the scoring server can check it again.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aml_pipelines.errors import ConfigError, IntegrityError, ModelNotFound, RegistryError
from aml_pipelines.fileio import read_json, sha256_file, write_json
from aml_pipelines.registry.base import (
    STAGE_TAG,
    DamagedVersion,
    ModelVersion,
    SkippedVersions,
    Stage,
    check_sha256_tag,
)

log = logging.getLogger(__name__)

MANIFEST = ".registry.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def check_name(name: str) -> str:
    """Model names are path-safe (letters, digits, `.`, `_`, `-`), as Azure ML requires."""
    # fullmatch, not `^...$`: `$` also matches before a trailing newline, and "m\n" had the
    # cursor file of "m_".
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"model name {name!r} is invalid: use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)"
        )
    return name


#: The stage of a version whose tags file cannot be read.
_UNKNOWN = "<unknown>"


class LocalRegistry:
    """ModelRegistry over a local folder (see the module docstring for the layout)."""

    kind = "local"

    def __init__(self, root: str | Path) -> None:
        self.root = local_root(root)
        self._skipped = SkippedVersions()
        # The model folders whose lock this thread holds (see transaction): flock is held per
        # open file, so taking it again through a second open() would wait on itself.
        self._held = threading.local()

    def __repr__(self) -> str:
        return f"LocalRegistry({str(self.root)!r})"

    # -- writes -------------------------------------------------------------------------------

    def register(
        self, name: str, source: str | Path, tags: Mapping[str, str] | None = None
    ) -> ModelVersion:
        """Copy the model folder `source` in as the next version of `name`."""
        model_root = self.root / check_name(name)
        src = Path(source)
        if str(source).startswith("azureml:"):
            raise RegistryError(f"the local registry stores local folders, not {source}")
        model_json = src / "model.json"
        if not model_json.is_file():
            raise RegistryError(f"{src} is not a model folder: model.json is missing")
        manifest = read_json(model_json)
        model_file = src / str(manifest.get("model_file", ""))
        if not model_file.is_file():
            raise RegistryError(f"{src}: model file {manifest.get('model_file')!r} is missing")
        if not manifest.get("sha256"):
            raise RegistryError(f"{model_json} has no sha256 (the hash of its model file)")
        sha256 = sha256_file(model_file)
        claimed = {manifest.get("sha256"), (tags or {}).get("sha256", sha256)}
        if claimed != {sha256}:
            raise IntegrityError(
                f"{model_file} has sha256 {sha256}, "
                f"but model.json or the tags claim {sorted(map(str, claimed - {sha256}))}"
            )

        try:
            model_root.mkdir(parents=True, exist_ok=True)
            _remove_abandoned_staging(model_root)
            with _staging_folder(model_root) as staging:
                version = self._store(name, src, staging, model_file.name, sha256, tags or {})
        except OSError as exc:  # a registry it cannot write, a source it cannot read
            raise RegistryError(
                f"{name}: cannot register {src} in {self.root}: {_describe(exc)}"
            ) from None
        return self.get(name, version)

    def _store(
        self,
        name: str,
        src: Path,
        staging: Path,
        model_file: str,
        sha256: str,
        tags: Mapping[str, str],
    ) -> int:
        """Copy `src` into `staging`, then (locked) rename it into place as the next version."""
        model_root = staging.parent
        # A version folder copied from another local registry holds its manifest: copied
        # along, it would be hashed as a model file, then replaced by this version's own.
        shutil.copytree(src, staging, symlinks=False, ignore=shutil.ignore_patterns(MANIFEST))
        files = {
            path.relative_to(staging).as_posix(): sha256_file(path)
            for path in sorted(staging.rglob("*"))
            if path.is_file()
        }
        if files.get(model_file) != sha256:
            raise IntegrityError(f"{src / model_file} changed while it was being registered")
        with self._locked(model_root):
            version = max(self._numbers_taken(model_root), default=0) + 1
            record = {
                "name": name,
                "version": version,
                "sha256": sha256,
                "model_file": model_file,
                "files": files,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            write_json(staging / MANIFEST, record)
            # write_json re-creates a folder removed meanwhile: renamed into place, that would
            # be a version holding only its manifest, corrupted for good.
            if not all((staging / rel).is_file() for rel in files):
                raise RegistryError(
                    f"{name}: the copy of {src} in {staging} was removed before it was "
                    "registered; register it again"
                )
            # Tags first: the folder is what makes the version visible, and a reader (the
            # watcher) that saw it without its tags would never look at it again. A tags file
            # left by a crash before the rename only costs its number (see _numbers_taken).
            tags_path = self._tags_path(model_root, version)
            write_json(tags_path, dict(tags))
            try:
                # rename(2) onto a fresh name: atomic, and fails if the version exists.
                staging.rename(model_root / str(version))
            except BaseException:
                tags_path.unlink(missing_ok=True)
                raise
        return version

    def withdraw(self, name: str, version: int) -> ModelVersion:
        """Withdraw the version (see the Protocol): its `.withdrawn` marker, for good."""
        model_root = self.root / check_name(name)
        self.get(name, version)  # raises ModelNotFound / IntegrityError first
        with self._editing(name, version, model_root):
            self._withdrawn_path(model_root, version).touch()
        return self.get(name, version)

    def set_tags(self, name: str, version: int, tags: Mapping[str, str]) -> ModelVersion:
        """Merge `tags` into the version's tags (an empty value removes the tag)."""
        model_root = self.root / check_name(name)
        # raises ModelNotFound / IntegrityError first
        check_sha256_tag(self.get(name, version), tags)
        with self._editing(name, version, model_root):
            path = self._tags_path(model_root, version)
            current: dict[str, str] = read_json(path) if path.exists() else {}
            for key, value in tags.items():
                if value == "":
                    current.pop(key, None)
                else:
                    current[key] = str(value)
            write_json(path, current)
        return self.get(name, version)

    @contextmanager
    def transaction(self, name: str) -> Iterator[None]:
        """Hold `name`'s lock for a read-plan-write of its tags: no other process registers,
        tags or withdraws a version of it meanwhile (this object's own writes go through).

        Each write takes the lock on its own, but a plan made from a listing read before it can
        be stale by then: two `registry tag M V stage=production --replace` at once each read the
        same holder, each archived it and tagged its own version, and left two production
        versions. Read, plan and write inside one transaction.

        The versions' files are hashed before the lock is taken; inside it, a version whose
        files are as they were then (size, mtime, inode) is not hashed again: re-hashing every
        version under the lock kept the model's other writers waiting (4 s for 2 GB).
        """
        model_root = self.root / check_name(name)
        if not model_root.is_dir():  # a typo'd name or registry: not created by a tag edit
            raise ModelNotFound(f"model {name!r} not found in {self.root}")
        outermost = getattr(self._held, "trusted", None) is None
        if outermost:
            self._held.trusted = {}
            self._list(name, withdrawn=True)  # hashed here, outside the lock
        try:
            with ExitStack() as stack:
                try:
                    stack.enter_context(self._locked(model_root))
                except OSError as exc:  # a registry this user cannot write: one line
                    raise RegistryError(f"{name}: cannot write {_describe(exc)}") from None
                yield
        finally:
            if outermost:
                self._held.trusted = None

    # -- reads --------------------------------------------------------------------------------

    def get(self, name: str, version: int) -> ModelVersion:
        """One version, after re-hashing every stored file against its manifest."""
        try:
            return self._get(name, version)
        except OSError as exc:  # an unreadable folder, a name too long: one line, not a trace
            raise RegistryError(
                f"{name}:{version}: cannot read it in {self.root}: {exc.strerror or exc}"
            ) from None

    def _get(self, name: str, version: int) -> ModelVersion:
        model_root = self.root / check_name(name)
        folder = model_root / str(version)
        if not (folder / MANIFEST).is_file():
            known = sorted(self._versions(model_root))
            raise ModelNotFound(
                f"model {name!r} version {version} not found in {self.root} "
                f"(versions: {known or 'none'})"
            )
        record = _read_record(folder / MANIFEST, f"{name}:{version}")
        self._verify(name, version, folder, record)
        tags_path = self._tags_path(model_root, version)
        tags = _read_record(tags_path, f"{name}:{version}") if tags_path.exists() else {}
        return ModelVersion(
            name=name,
            version=version,
            uri=folder.as_uri(),
            sha256=str(record["sha256"]),
            tags={str(k): str(v) for k, v in tags.items()},
            created_at=str(record.get("created_at", "")),
            path=folder,
            withdrawn=self._withdrawn_path(model_root, version).exists(),
        )

    def latest(
        self, name: str, *, damaged: list[DamagedVersion] | None = None
    ) -> ModelVersion | None:
        """The highest readable version of `name` not withdrawn, or None; with `damaged`, the
        damaged ones above it are appended to it (newest first)."""
        model_root = self.root / check_name(name)
        withdrawn = self.withdrawn(name)
        for version in sorted(self._versions(model_root) - withdrawn, reverse=True):
            if (found := self._readable(name, version, damaged=damaged)) is not None:
                return found
        return None

    def list_versions(
        self, name: str, *, damaged: list[DamagedVersion] | None = None
    ) -> list[ModelVersion]:
        """Every readable version of `name` not withdrawn, oldest first; with `damaged`, the
        damaged ones left out are appended to it.

        A version that fails its checks (a damaged old version) is left out with one warning, so
        it cannot stop the gate, the watcher and the delivery of every new version; `get` of it
        still raises IntegrityError. A damaged version tagged `stage=production` still raises:
        without it the gate would pass any candidate and old versions could downgrade production.
        """
        return self._list(name, withdrawn=False, damaged=damaged)[0]

    def find_by_tag(self, name: str, key: str, value: str) -> list[ModelVersion]:
        """Versions whose tag `key` equals `value`, withdrawn ones included, oldest first.

        Asked for production and finding none while a version's tags could not be read, it
        raises: that version may be production, and "none" would let the gate pass anything.
        """
        # The tags first: only a version that may carry the tag is read whole (its files
        # hashed); every registration asks this three times over every version.
        unknown: list[int] = []
        maybe = [
            v
            for v in sorted(self._versions(self.root / check_name(name)))
            if self._tag(name, v, key) in (value, _UNKNOWN)
        ]
        read = (self._readable(name, v, unknown) for v in maybe)
        found = [mv for mv in read if mv is not None and mv.tags.get(key) == value]
        if not found and (key, value) == (STAGE_TAG, Stage.PRODUCTION) and unknown:
            tags = self._tags_path(self.root / name, unknown[0])
            raise IntegrityError(
                f"{name}:{unknown[0]}: its tags are damaged, so which version is in "
                f"production is unknown; repair or remove {tags}"
            )
        return found

    def names(self) -> list[str]:
        """Every model name with at least one version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self._versions(p))

    def withdrawn(self, name: str) -> set[int]:
        """The withdrawn versions of `name` (their markers; no files re-hashed)."""
        model_root = self.root / check_name(name)
        return {
            v for v in self._versions(model_root) if self._withdrawn_path(model_root, v).exists()
        }

    # -- internals ----------------------------------------------------------------------------

    def _list(
        self, name: str, *, withdrawn: bool, damaged: list[DamagedVersion] | None = None
    ) -> tuple[list[ModelVersion], list[int]]:
        """The readable versions (withdrawn ones too with `withdrawn`), and the skipped ones
        whose stage is unknown (see find_by_tag); the damaged ones go to `damaged`."""
        unknown: list[int] = []
        versions = self._versions(self.root / check_name(name))
        if not withdrawn:
            versions -= self.withdrawn(name)
        found = (self._readable(name, v, unknown, damaged) for v in sorted(versions))
        return [mv for mv in found if mv is not None], unknown

    def _readable(
        self,
        name: str,
        version: int,
        unknown: list[int] | None = None,
        damaged: list[DamagedVersion] | None = None,
    ) -> ModelVersion | None:
        """The version, or None (warned once) when it fails its checks; its number goes to
        `unknown` when its tags cannot be read either, and a damaged one (IntegrityError, not a
        folder without its record) to `damaged`."""
        try:
            return self.get(name, version)
        except (IntegrityError, ModelNotFound) as exc:
            # Never hide production: the gate and the no-downgrade check compare to it.
            stage = self._stage_tag(name, version)
            if stage == Stage.PRODUCTION:
                raise
            if stage is _UNKNOWN and unknown is not None:
                unknown.append(version)
            if damaged is not None and isinstance(exc, IntegrityError):
                tags = self._tags(name, version)
                damaged.append(DamagedVersion(name, version, tags or {}, str(exc)))
            self._skipped.warn(log, name, version, exc)
            return None

    def _stage_tag(self, name: str, version: int) -> str | None:
        """The version's stage tag (None without one); `_UNKNOWN` when its tags are damaged."""
        return self._tag(name, version, STAGE_TAG)

    def _tag(self, name: str, version: int, key: str) -> str | None:
        """The version's tag `key` (None without one); `_UNKNOWN` when its tags are damaged."""
        tags = self._tags(name, version)
        return _UNKNOWN if tags is None else tags.get(key) or None

    def _tags(self, name: str, version: int) -> dict[str, str] | None:
        """The version's tags, read alone (its files unchecked); None when they are damaged."""
        path = self._tags_path(self.root / name, version)
        if not path.exists():
            return {}  # as `get` reads it: no tags
        try:
            tags = _read_record(path, f"{name}:{version}")
        except RegistryError:  # IntegrityError included
            return None
        return {str(k): str(v) for k, v in tags.items()}

    @staticmethod
    def _versions(model_root: Path) -> set[int]:
        if not model_root.is_dir():
            return set()
        return {int(p.name) for p in model_root.iterdir() if p.is_dir() and p.name.isdigit()}

    @staticmethod
    def _numbers_taken(model_root: Path) -> set[int]:
        """Version numbers in use: folders, and the tags files and withdrawn markers of versions
        removed by hand (a new version given such a number was born withdrawn, or tagged)."""
        taken = set()
        for path in model_root.iterdir():
            number = path.name.removesuffix(".tags.json").removesuffix(".withdrawn")
            if number.isdigit() and (number != path.name or path.is_dir()):
                taken.add(int(number))
        return taken

    @staticmethod
    def _tags_path(model_root: Path, version: int) -> Path:
        return model_root / f"{version}.tags.json"

    @staticmethod
    def _withdrawn_path(model_root: Path, version: int) -> Path:
        return model_root / f"{version}.withdrawn"

    def _verify(self, name: str, version: int, folder: Path, record: Mapping[str, object]) -> None:
        expected = record.get("files")
        if not isinstance(expected, dict):
            raise IntegrityError(f"{name}:{version}: {MANIFEST} has no file list")
        present = {
            p.relative_to(folder).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and p.name != MANIFEST
        }
        if extra := sorted(present - expected.keys()):
            raise IntegrityError(f"{name}:{version} was tampered with: unexpected files {extra}")
        if missing := sorted(rel for rel in expected if not (folder / rel).is_file()):
            raise IntegrityError(f"{name}:{version} is corrupted: {missing[0]} is missing")
        trusted: dict[Path, object] | None = getattr(self._held, "trusted", None)
        signature = _signature(folder, expected) if trusted is not None else None
        if trusted is not None and trusted.get(folder) == signature:
            return  # hashed moments ago in this transaction, and unchanged since
        for rel, digest in sorted(expected.items()):
            actual = sha256_file(folder / rel)
            if actual != digest:
                raise IntegrityError(
                    f"{name}:{version} is corrupted: {rel} has sha256 {actual[:16]}…, "
                    f"registered {str(digest)[:16]}…; refusing to use it"
                )
        if trusted is not None:
            trusted[folder] = signature

    @contextmanager
    def _editing(self, name: str, version: int, model_root: Path) -> Iterator[None]:
        """The lock, for a tags or withdrawn-marker edit; a registry this user cannot write (a
        read-only mount, another account's registry) is one RegistryError, not a traceback."""
        try:
            with self._locked(model_root):
                yield
        except OSError as exc:
            raise RegistryError(f"{name}:{version}: cannot write {_describe(exc)}") from None

    @contextmanager
    def _locked(self, model_root: Path) -> Iterator[None]:
        held: set[Path] = self._held.__dict__.setdefault("roots", set())
        if model_root in held:  # inside this thread's transaction: the lock is ours already
            yield
            return
        fd = os.open(model_root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held.add(model_root)
            yield
        finally:
            held.discard(model_root)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _read_record(path: Path, label: str) -> dict[str, Any]:
    """A JSON object from the registry's own files; damage is an IntegrityError, not a crash,
    and a file this user may not read (a registry shared between accounts) a RegistryError."""
    try:
        record = read_json(path)
    except OSError as exc:
        raise RegistryError(f"{label}: {path} cannot be read ({exc.strerror})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError: truncated or overwritten
        raise IntegrityError(
            f"{label}: {path.name} is damaged ({exc}); refusing to use it"
        ) from exc
    if not isinstance(record, dict):
        raise IntegrityError(f"{label}: {path.name} is not a JSON object; refusing to use it")
    return record


def _describe(exc: OSError) -> str:
    """`path (reason)` of an OSError, as far as it names them."""
    reason = exc.strerror or str(exc)
    return f"{exc.filename} ({reason})" if exc.filename else reason


@contextmanager
def _staging_folder(model_root: Path) -> Iterator[Path]:
    """A fresh staging folder name, its `.lock` flock-held from before the folder exists until
    after it is gone (renamed into place or removed): alive for _remove_abandoned_staging."""
    staging = model_root / f".tmp-{uuid.uuid4().hex}"
    lock = staging.with_name(staging.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        lock.unlink(missing_ok=True)
        os.close(fd)  # releases the flock, once nothing is left to protect


def _remove_abandoned_staging(model_root: Path, older_than_s: float = 3600.0) -> None:
    """Delete staging folders killed registrations left behind, never a live one.

    A staging folder goes when its lock can be taken (its owner is gone), whatever its mtime (the
    source folder's). A staging folder without a lock file (left by an older release) and a lock
    file without its folder (a registration killed between the two) go when an hour old.
    """
    cutoff = time.time() - older_than_s
    for leftover in model_root.glob(".tmp-*"):
        with suppress(OSError):
            if leftover.name.endswith(".lock"):
                folder = leftover.with_name(leftover.name.removesuffix(".lock"))
                if not folder.exists() and leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
            elif (lock := leftover.with_name(leftover.name + ".lock")).exists():
                _remove_if_unlocked(leftover, lock)
            elif leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)


def _remove_if_unlocked(staging: Path, lock: Path) -> None:
    fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)  # gone meanwhile: its owner is done (OSError)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a live registration
        shutil.rmtree(staging, ignore_errors=True)
        lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


def default_root() -> Path:
    """Where `local:` registries live unless told: $AML_ROLLOUT_HOME/registry or ./.aml-rollout."""
    home = os.environ.get("AML_ROLLOUT_HOME")
    return Path(home) / "registry" if home else Path(".aml-rollout") / "registry"


def local_root(path: str | Path | None = None) -> Path:
    """The absolute folder of the local registry at `path` (default_root() when empty).

    Every path to a local registry goes through here: run-local once resolved `local:~/reg`
    without expanding `~` (quoted, or from CI YAML or $AML_ROLLOUT_HOME, the shell does not) and
    registered into a folder named `~` in the current one, while every other command read
    $HOME/reg.
    """
    return (Path(path) if path else default_root()).expanduser().resolve()


def _signature(folder: Path, files: Mapping[str, object]) -> object:
    """What a version's files look like on disk (size, mtime, inode of each, and of its
    manifest): equal, they were not rewritten since it was taken (see `transaction`)."""

    def stat(path: Path) -> tuple[int, int, int]:
        st = path.stat()
        return st.st_size, st.st_mtime_ns, st.st_ino

    return (stat(folder / MANIFEST), tuple((rel, stat(folder / rel)) for rel in sorted(files)))
