"""The `memory` model registry: the ModelRegistry contract in a dict, for tests and dry runs.

It keeps the same promises as the other backends where they matter to callers: versions count
up from 1 and never repeat, tags are mutable, a model's sha256 is fixed at registration (taken
from the `sha256` tag, or computed from a local model folder's model file), a withdrawn version
is left out of listings but not of `get` and `find_by_tag`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from aml_pipelines.errors import ModelNotFound, RegistryError
from aml_pipelines.fileio import read_json, sha256_file
from aml_pipelines.registry.base import DamagedVersion, ModelVersion, check_sha256_tag
from aml_pipelines.registry.local import check_name


class MemoryRegistry:
    """ModelRegistry held in memory (one process)."""

    kind = "memory"

    def __init__(self) -> None:
        self._versions: dict[str, list[ModelVersion]] = {}
        self._lock = threading.Lock()

    def register(
        self, name: str, source: str | Path, tags: Mapping[str, str] | None = None
    ) -> ModelVersion:
        check_name(name)
        tags = dict(tags or {})
        sha256 = tags.get("sha256") or self._hash_folder(source)
        with self._lock:
            versions = self._versions.setdefault(name, [])
            version = ModelVersion(
                name=name,
                version=len(versions) + 1,
                uri=f"memory:{name}:{len(versions) + 1}",
                sha256=sha256,
                tags=tags,
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                path=Path(source) if Path(str(source)).is_dir() else None,
            )
            versions.append(version)
        return version

    def get(self, name: str, version: int) -> ModelVersion:
        versions = self._versions.get(check_name(name), [])
        if not 1 <= version <= len(versions):
            raise ModelNotFound(f"model {name!r} version {version} not found (memory registry)")
        return versions[version - 1]

    def latest(
        self, name: str, *, damaged: list[DamagedVersion] | None = None
    ) -> ModelVersion | None:
        versions = self.list_versions(name)
        return versions[-1] if versions else None

    def list_versions(
        self, name: str, *, damaged: list[DamagedVersion] | None = None
    ) -> list[ModelVersion]:
        """Every version not withdrawn, oldest first (none is ever damaged here)."""
        return [v for v in self._versions.get(check_name(name), []) if not v.withdrawn]

    def set_tags(self, name: str, version: int, tags: Mapping[str, str]) -> ModelVersion:
        current = self.get(name, version)
        check_sha256_tag(current, tags)
        merged = {k: v for k, v in {**current.tags, **tags}.items() if v != ""}
        return self._replace(replace(current, tags=merged))

    def find_by_tag(self, name: str, key: str, value: str) -> list[ModelVersion]:
        """Versions whose tag `key` equals `value`, withdrawn ones included, oldest first."""
        return [v for v in self._versions.get(check_name(name), []) if v.tags.get(key) == value]

    def withdraw(self, name: str, version: int) -> ModelVersion:
        return self._replace(replace(self.get(name, version), withdrawn=True))

    def withdrawn(self, name: str) -> set[int]:
        return {v.version for v in self._versions.get(check_name(name), []) if v.withdrawn}

    def _replace(self, updated: ModelVersion) -> ModelVersion:
        with self._lock:
            self._versions[updated.name][updated.version - 1] = updated
        return updated

    def names(self) -> list[str]:
        return sorted(name for name, versions in self._versions.items() if versions)

    @staticmethod
    def _hash_folder(source: str | Path) -> str:
        model_json = Path(str(source)) / "model.json"
        if not model_json.is_file():
            raise RegistryError(
                f"{source}: give the model's sha256 in the `sha256` tag or a model folder"
            )
        return sha256_file(model_json.parent / str(read_json(model_json)["model_file"]))
