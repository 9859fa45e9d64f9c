"""The `azureml` model registry: model versions in an Azure ML workspace (`ml_client.models`).

- **Sources are `azureml://` paths, never local uploads**: a job output
  (`azureml://jobs/<run>/outputs/<name>`, what the register component receives in `direct` mode)
  or a datastore path. Uploading from the machine would register bits nobody evaluated.
- **Versions are explicit**: the next version is max(existing) + 1 and the PUT names it. Azure ML
  refuses to change an existing version (409), so two concurrent registrations cannot share a
  version: the loser re-reads and takes the next one (bounded attempts).
- **Integrity**: the model file's sha256 is an immutable model *property* (set at registration;
  the registry never downloads the files). Every read checks that the `sha256` tag, when present,
  still matches it; the bits themselves are re-hashed by the package step and by the scoring server.
- **Tags are mutable**: `set_tags` re-PUTs the same version with merged tags (Azure ML allows
  tag changes on an existing version). A `sha256` tag other than the property is refused before
  the PUT (written, every read of the version raised); removing one repairs such a version.
- **Listings skip what they cannot read**: a workspace may hold versions registered outside
  aml-rollout (no `sha256` property, or a version that is not an integer). `get` refuses them
  (IntegrityError); `list_versions`, `latest` and `find_by_tag` leave them out with one warning
  per version, so one foreign version does not stop the gate, the watcher and every delivery
  (one tagged `stage=production` still raises: the gate and the no-downgrade check need it).
  Version allocation still counts every integer version, foreign ones included, and archived
  ones: Azure ML leaves an archived version (the studio's Archive) out of a listing unless asked
  (`ListViewType.ALL`), and reusing its number is a 409 at every attempt.
- **Archived in the studio** (`withdraw` does the same): `list_versions` and `latest` leave such
  a version out (withdrawn: the watcher does not pick up a candidate archived before its
  delivery), `find_by_tag` does not: a production version archived in a clean-up still serves,
  and hidden it let the gate pass any candidate and the triggers roll out an older version
  against it (as a first release). azure-ai-ml's `Model` does not carry `isArchived`, so
  `ModelVersion.withdrawn` is read from an `ARCHIVED_ONLY` listing (one more call for `get`
  and `find_by_tag`); `get` must tell it, as an event names a version the dispatcher then
  `get`s. `set_tags` archives such a version again after its PUT: azure-ai-ml sends every
  version PUT with `isArchived: false`, which restored it in the studio (a promotion tagging a
  production version archived in a clean-up `stage=archived` put it back in every listing).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aml_pipelines.errors import (
    AzureNotConfigured,
    IntegrityError,
    ModelNotFound,
    RegistryError,
)
from aml_pipelines.registry.base import (
    STAGE_TAG,
    DamagedVersion,
    ModelVersion,
    SkippedVersions,
    Stage,
    check_sha256_tag,
)
from aml_pipelines.registry.local import check_name

log = logging.getLogger(__name__)

SHA256_PROPERTY = "sha256"
MODEL_TYPE = "custom_model"
# Azure ML sets these inside a job; `azureml` with no coordinates means "this workspace".
_JOB_ENV = ("AZUREML_ARM_SUBSCRIPTION", "AZUREML_ARM_RESOURCEGROUP", "AZUREML_ARM_WORKSPACE_NAME")


def workspace_client(coordinates: str | None = None, **client_kwargs: Any) -> Any:
    """MLClient for `SUB/RESOURCE_GROUP/WORKSPACE`, or the job's own workspace when None."""
    if coordinates:
        parts = coordinates.split("/")
        if len(parts) != 3 or not all(parts):
            raise AzureNotConfigured(
                f"registry: 'azureml:{coordinates}' must be "
                "azureml:SUBSCRIPTION/RESOURCE_GROUP/WORKSPACE"
            )
    else:
        parts = [os.environ.get(var, "") for var in _JOB_ENV]
        if not all(parts):
            raise AzureNotConfigured(
                "registry: 'azureml' names the workspace of the running Azure ML job, but "
                f"{', '.join(_JOB_ENV)} are not set; "
                "use azureml:SUBSCRIPTION/RESOURCE_GROUP/WORKSPACE"
            )
    from aml_pipelines.build import workspace_client as client_for

    return client_for(*parts, **client_kwargs)


class AzureMLRegistry:
    """ModelRegistry over an Azure ML workspace (see the module docstring)."""

    kind = "azureml"

    def __init__(self, ml_client: Any, *, max_attempts: int = 5) -> None:
        self.ml_client = ml_client
        self.max_attempts = max_attempts
        self._skipped = SkippedVersions()

    def __repr__(self) -> str:
        return f"AzureMLRegistry({self.ml_client.workspace_name!r})"

    @property
    def workspace_id(self) -> str:
        """The workspace's ARM id: the `topic` (`source`) of the Event Grid events it raises."""
        client = self.ml_client
        return (
            f"/subscriptions/{client.subscription_id}/resourceGroups/{client.resource_group_name}"
            f"/providers/Microsoft.MachineLearningServices/workspaces/{client.workspace_name}"
        )

    def register(
        self, name: str, source: str | Path, tags: Mapping[str, str] | None = None
    ) -> ModelVersion:
        """Register `source` (an azureml:// path) as the next version of `name`."""
        from azure.ai.ml.entities import Model
        from azure.core.exceptions import HttpResponseError

        check_name(name)
        uri = str(source)
        if not uri.startswith("azureml://"):
            raise RegistryError(
                f"the azureml registry registers azureml:// job-output or datastore paths, "
                f"not {uri!r} (a local upload would register unevaluated bits)"
            )
        tags = dict(tags or {})
        sha256 = tags.get("sha256", "")
        if len(sha256) != 64:
            raise RegistryError(
                "the azureml registry needs the model file's sha256 in the `sha256` tag "
                "(it never downloads the files to hash them)"
            )
        for attempt in range(1, self.max_attempts + 1):
            # Every version, readable or not, archived or not: none may be reused.
            taken = self._list(name, view="ALL")
            version = max((int(m.version) for m in taken if _is_int(m.version)), default=0) + 1
            model = Model(
                name=name,
                version=str(version),
                path=uri,
                type=MODEL_TYPE,
                tags=tags,
                properties={SHA256_PROPERTY: sha256},
            )
            try:
                created = self._call(
                    f"register {name}:{version}", self.ml_client.models.create_or_update, model
                )
            except RegistryError as exc:
                if (
                    not isinstance(exc.__cause__, HttpResponseError)
                    or exc.__cause__.status_code != 409
                ):
                    raise
                log.info(
                    "version %s of %s was taken concurrently (attempt %d)", version, name, attempt
                )
                continue
            return self._to_version(created)
        raise RegistryError(
            f"could not allocate a version of {name} after {self.max_attempts} tries"
        )

    def get(self, name: str, version: int) -> ModelVersion:
        """One version; ModelNotFound if absent, IntegrityError if its sha256 tag was altered."""
        model = self._call(f"get {name}:{version}", self.ml_client.models.get, name, str(version))
        return self._to_version(model, withdrawn=version in self.withdrawn(name))

    def latest(
        self, name: str, *, damaged: list[DamagedVersion] | None = None
    ) -> ModelVersion | None:
        found: list[DamagedVersion] = []
        versions = self.list_versions(name, damaged=found)
        if damaged is not None:
            top = versions[-1].version if versions else 0
            damaged.extend(d for d in found if d.version > top)
        return versions[-1] if versions else None

    def list_versions(
        self, name: str, *, damaged: list[DamagedVersion] | None = None
    ) -> list[ModelVersion]:
        """Every readable version of `name` not archived in the studio, oldest first (see the
        module docstring); with `damaged`, the ones left out with an integer version are
        appended to it."""
        return self._readable(name, damaged=damaged)

    def _readable(
        self,
        name: str,
        *,
        archived: bool = False,
        damaged: list[DamagedVersion] | None = None,
    ) -> list[ModelVersion]:
        # With `archived`, which versions there are comes from one listing of them all; the
        # archived ones, read first, only set the flag: a version archived or restored between
        # the two reads is then listed once (its flag stale), never missed nor listed twice.
        if archived:
            archived_here = self.withdrawn(name)
            listed = [
                (model, _is_int(model.version) and int(model.version) in archived_here)
                for model in self._list(name, view="ALL")
            ]
        else:
            listed = [(model, False) for model in self._list(name, view="ACTIVE_ONLY")]
        versions: list[ModelVersion] = []
        left_out: list[DamagedVersion] = []
        for model, is_withdrawn in listed:
            try:
                versions.append(self._to_version(model, withdrawn=is_withdrawn))
            except IntegrityError as exc:
                if (model.tags or {}).get(STAGE_TAG) == Stage.PRODUCTION:
                    raise  # never hide production: the gate and the no-downgrade check need it
                self._skipped.warn(log, name, model.version, exc)
                if _is_int(model.version):
                    tags = {str(k): str(v) for k, v in (model.tags or {}).items()}
                    left_out.append(DamagedVersion(name, int(model.version), tags, str(exc)))
        if damaged is not None:
            damaged.extend(sorted(left_out, key=lambda d: d.version))
        return sorted(versions, key=lambda v: v.version)

    def set_tags(self, name: str, version: int, tags: Mapping[str, str]) -> ModelVersion:
        """Merge `tags` into the version's tags (an empty value removes the tag)."""
        model = self._call(f"get {name}:{version}", self.ml_client.models.get, name, str(version))
        # Before the PUT: written, a disagreeing tag made every read of the version raise. The
        # version itself is not checked (_to_version): `sha256=` must repair such a tag.
        sha256 = str((model.properties or {}).get(SHA256_PROPERTY, ""))
        check_sha256_tag(ModelVersion(name, version, "", sha256), tags)
        withdrawn = version in self.withdrawn(name)
        merged = dict(model.tags or {})
        for key, value in tags.items():
            if value == "":
                merged.pop(key, None)
            else:
                merged[key] = str(value)
        model.tags = merged
        updated = self._call(f"tag {name}:{version}", self.ml_client.models.create_or_update, model)
        if withdrawn:  # the PUT restored it (isArchived: false): a person archived it
            try:
                self._archive(name, version)
            except RegistryError as exc:
                # A retry of the tag write would find it restored and leave it so: say it now.
                raise RegistryError(
                    f"{name}:{version} was archived in the studio; writing its tags restored it "
                    f"(azure-ai-ml sends isArchived: false) and archiving it again failed ({exc}): "
                    "archive it again in the studio"
                ) from exc
        return self._to_version(updated, withdrawn=withdrawn)

    def find_by_tag(self, name: str, key: str, value: str) -> list[ModelVersion]:
        """Versions whose tag `key` equals `value`, archived ones included (see the module
        docstring), oldest first."""
        return [v for v in self._readable(name, archived=True) if v.tags.get(key) == value]

    def names(self) -> list[str]:
        """Every model name in the workspace."""
        return sorted(
            {m.name for m in self._call("list models", lambda: list(self.ml_client.models.list()))}
        )

    def withdraw(self, name: str, version: int) -> ModelVersion:
        """Archive the version, as the studio's Archive does."""
        self._archive(name, version)
        return self.get(name, version)

    def withdrawn(self, name: str) -> set[int]:
        """The versions of `name` archived in the studio (their number only: none is checked)."""
        return {
            int(m.version) for m in self._list(name, view="ARCHIVED_ONLY") if _is_int(m.version)
        }

    # -- internals ------------------------------------------------------------------------------

    def _archive(self, name: str, version: int) -> None:
        self._call(
            f"archive {name}:{version}",
            lambda: self.ml_client.models.archive(name=name, version=str(version)),
        )

    def _list(self, name: str, *, view: str = "ACTIVE_ONLY") -> list[Any]:
        """The versions of `name` Azure ML lists in `view` (a ListViewType name): ACTIVE_ONLY
        (its default), ARCHIVED_ONLY or ALL."""
        from azure.ai.ml.constants import ListViewType

        list_view_type = ListViewType[view]
        models: list[Any] = self._call(
            f"list {name}",
            lambda: list(self.ml_client.models.list(name=name, list_view_type=list_view_type)),
        )
        return models

    def _to_version(self, model: Any, *, withdrawn: bool = False) -> ModelVersion:
        tags = {str(k): str(v) for k, v in (model.tags or {}).items()}
        sha256 = str((model.properties or {}).get(SHA256_PROPERTY, ""))
        label = f"{model.name}:{model.version}"
        if not _is_int(model.version):
            raise IntegrityError(
                f"{label}: version {model.version!r} is not an integer: not registered by "
                "aml-rollout"
            )
        if not sha256:
            raise IntegrityError(
                f"{label} has no {SHA256_PROPERTY} property: not registered by aml-rollout"
            )
        if tags.get("sha256", sha256) != sha256:
            raise IntegrityError(
                f"{label}: tag sha256 {tags['sha256'][:16]}… disagrees with the immutable "
                f"property {sha256[:16]}…; refusing to use it"
            )
        created = getattr(getattr(model, "creation_context", None), "created_at", None)
        created_at = created.isoformat(timespec="seconds") if created is not None else ""
        return ModelVersion(
            name=model.name,
            version=int(model.version),
            uri=f"azureml:{model.name}:{model.version}",
            sha256=sha256,
            tags=tags,
            created_at=created_at,
            path=None,
            withdrawn=withdrawn,
        )

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        from azure.core.exceptions import (
            AzureError,
            ClientAuthenticationError,
            HttpResponseError,
            ResourceNotFoundError,
        )

        from rollout.azure_text import one_line

        try:
            return fn(*args)
        except ResourceNotFoundError as exc:
            raise ModelNotFound(
                f"{what}: not found in workspace {self.ml_client.workspace_name}"
            ) from exc
        except ClientAuthenticationError as exc:
            raise AzureNotConfigured(
                f"{what}: no usable Azure credentials ({str(exc).splitlines()[0]})"
            ) from exc
        except HttpResponseError as exc:
            raise RegistryError(
                f"{what}: Azure ML answered {exc.status_code}: {one_line(exc.message)}"
            ) from exc
        except AzureError as exc:  # no answer at all: connection refused, timed out, DNS
            raise RegistryError(f"{what}: cannot reach Azure ML ({one_line(str(exc))})") from exc


def _is_int(version: Any) -> bool:
    return str(version).isdigit()
