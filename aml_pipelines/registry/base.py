"""The ModelRegistry contract and the ModelVersion record both backends return."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from aml_pipelines.errors import IntegrityError

STAGE_TAG = "stage"
#: Set at registration by a training pipeline whose own rollout step rolls the version out
#: (value ROLLOUT_BY_JOB): the triggers leave such a version alone, or it would be rolled out
#: twice, by two controllers at once on one endpoint.
ROLLOUT_BY_TAG = "rollout_by"
ROLLOUT_BY_JOB = "pipeline-job"


class Stage:
    """Values of the `stage` tag: the registry follows traffic."""

    CANDIDATE = "candidate"
    PRODUCTION = "production"
    ARCHIVED = "archived"
    ROLLED_BACK = "rolled-back"


@dataclass(frozen=True)
class ModelVersion:
    """One immutable registered version of a model."""

    name: str
    version: int
    uri: str
    sha256: str
    tags: Mapping[str, str] = field(default_factory=dict)
    created_at: str = ""
    path: Path | None = None  # a local folder holding the model files, when there is one
    #: Withdrawn by a person: archived in the registry itself (the Azure ML studio's Archive,
    #: `isArchived`), so listings leave it out and no trigger delivers it. Not the
    #: `stage=archived` tag a promotion writes on the version it replaced.
    withdrawn: bool = False

    @property
    def stage(self) -> str | None:
        """The `stage` tag, or None."""
        return self.tags.get(STAGE_TAG)


@dataclass(frozen=True)
class DamagedVersion:
    """A version a listing leaves out because it fails its checks (IntegrityError): asked for
    with `damaged=`, so a trigger can close a damaged candidate Failed instead of never seeing
    it. Its tags as far as they can be read ({} when they cannot), and why it is left out."""

    name: str
    version: int
    tags: Mapping[str, str]
    error: str

    @property
    def stage(self) -> str | None:
        """The `stage` tag, or None."""
        return self.tags.get(STAGE_TAG)


@runtime_checkable
class ModelRegistry(Protocol):
    def register(
        self, name: str, source: str | Path, tags: Mapping[str, str] | None = None
    ) -> ModelVersion:
        """Register the model at `source` as the next version of `name`; versions never collide."""

    def get(self, name: str, version: int) -> ModelVersion:
        """One version; raises ModelNotFound, or IntegrityError if its files do not match."""

    def latest(
        self, name: str, *, damaged: list[DamagedVersion] | None = None
    ) -> ModelVersion | None:
        """The highest version of `name`, or None when none is registered. With `damaged`,
        the damaged versions left out above the one returned are appended to it."""

    def list_versions(
        self, name: str, *, damaged: list[DamagedVersion] | None = None
    ) -> list[ModelVersion]:
        """Every version of `name`, oldest first. With `damaged`, the versions left out as
        damaged are appended to it, oldest first."""

    def set_tags(self, name: str, version: int, tags: Mapping[str, str]) -> ModelVersion:
        """Merge `tags` into a version's tags; an empty value removes the tag (tags are
        mutable; model files are not). A `sha256` tag other than the version's own sha256 is
        an IntegrityError, raised before anything is written (see check_sha256_tag)."""

    def find_by_tag(self, name: str, key: str, value: str) -> list[ModelVersion]:
        """Versions of `name` whose tag `key` equals `value`, oldest first."""

    def names(self) -> list[str]:
        """Every model name with at least one version, sorted."""

    def withdraw(self, name: str, version: int) -> ModelVersion:
        """Withdraw a version, as the Azure ML studio's Archive does: `list_versions` and
        `latest` leave it out from then on; `get` and `find_by_tag` return it, `withdrawn`."""

    def withdrawn(self, name: str) -> set[int]:
        """The withdrawn versions of `name` (a cheap read: no version's files are checked)."""


def check_sha256_tag(version: ModelVersion, tags: Mapping[str, str]) -> None:
    """Refuse to write a `sha256` tag that is not the version's sha256 (removing it is fine).

    The tag claims the model file's hash: the azureml registry refuses to read a version whose
    tag disagrees with its immutable property, so once written, `get`, the listings and the
    production lookup all raised for it (on production: the gate, the watcher, every delivery).
    """
    claimed = tags.get("sha256")
    if claimed and claimed != version.sha256:
        raise IntegrityError(
            f"{version.name}:{version.version}: tag sha256={claimed[:16]}… is not its sha256 "
            f"{version.sha256[:16]}… (the model file's hash); nothing written"
        )


class SkippedVersions:
    """The versions a registry's listings leave out (unreadable, tampered), each warned about
    once per registry object, so a watcher polling every few seconds does not repeat it."""

    def __init__(self) -> None:
        self._warned: set[tuple[str, str]] = set()

    def warn(self, log: logging.Logger, name: str, version: object, exc: Exception) -> None:
        if (name, str(version)) not in self._warned:
            self._warned.add((name, str(version)))
            log.warning("skipping %s:%s in listings: %s", name, version, exc)
