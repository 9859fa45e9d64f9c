"""Validate, dump and submit the pipeline job: the library behind `aml-rollout pipeline ...`.

- `validate_offline` loads every component YAML and runs its `_validate()`, builds the pipeline,
  runs the job's own validation and `MLClient.jobs.validate` with an offline client (a
  placeholder workspace and a credential that is never asked for a token): no network.
- `dump_pipeline` writes the job YAML with RELATIVE paths. azure-ai-ml dumps `code:` as an absolute
  path and prefixes every input path with `azureml:` (which would name a registered data asset,
  even for `https://` or `abfss://` URIs); local paths are written relative (and must exist),
  remote URIs and `azureml:` references as given, so `az ml job create -f pipeline.yml` sends what
  `submit` sends, from any checkout.
- `stamp_source` sets GIT_COMMIT (the submitting checkout's `git rev-parse HEAD`, "-dirty" when
  the staged packages have changes) on every step: the steps run in a snapshot without .git.
- `workspace_client` / `submit_pipeline` talk to a real workspace with DefaultAzureCredential
  (the identity `rollout.azure_credential` picks, as the endpoint router does);
  tests pass `transport=` (a fake ARM server) and a static credential instead.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aml_pipelines.errors import (
    AzureNotConfigured,
    ComponentError,
    ConfigError,
    PipelineError,
)
from aml_pipelines.pipeline import (
    COMPONENTS_DIR,
    DeployParams,
    PipelineParams,
    build_deploy_pipeline,
    build_pipeline,
    component_path,
    load_components,
)
from components.common import CODE_PACKAGES, source_commit
from rollout.azure_credential import default_credential

log = logging.getLogger(__name__)

DEFAULT_COMPUTE = "cpu-cluster"
# What the steps import at run time (the component code folder, staged for submission).
OFFLINE_WORKSPACE = ("00000000-0000-0000-0000-000000000000", "offline-rg", "offline-ws")


@dataclass(frozen=True)
class ValidationSummary:
    """What `pipeline validate` checked."""

    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    pipeline_inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


class OfflineCredential:
    """A credential for MLClient operations that never leave the process (validate, build)."""

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        raise AzureNotConfigured("an offline client tried to reach Azure")


def offline_client() -> Any:
    """An MLClient bound to a placeholder workspace; constructing it makes no request."""
    from azure.ai.ml import MLClient

    sub, rg, ws = OFFLINE_WORKSPACE
    return MLClient(OfflineCredential(), sub, rg, ws)


def load_validated_components() -> dict[str, Any]:
    """Load every component YAML and run its validation; ComponentError names the failing file."""
    loaded = load_components()
    for step, component in loaded.items():
        result = component._validate()
        if not result.passed:
            raise ComponentError(f"{component_path(step)}: invalid: {result.error_messages}")
    return loaded


def validate_offline(
    params: PipelineParams | None = None, *, compute: str = DEFAULT_COMPUTE
) -> ValidationSummary:
    """Every offline check azure-ai-ml offers, for the components and the assembled pipeline.

    Azure ML requires a compute per node; validation uses `compute` (a name, not looked up).
    """
    loaded = load_validated_components()
    return _validated(build_pipeline(params, loaded=loaded, compute=compute), loaded)


def validate_deploy_offline(
    params: DeployParams | None = None, *, compute: str = DEFAULT_COMPUTE
) -> ValidationSummary:
    """`validate_offline` for the deploy pipeline (package → rollout of a registered version)."""
    loaded = load_validated_components()
    job = build_deploy_pipeline(params, loaded=loaded, compute=compute)
    return _validated(job, {step: c for step, c in loaded.items() if step in job.jobs})


def _validated(job: Any, loaded: dict[str, Any]) -> ValidationSummary:
    own = job._validate()
    if not own.passed:
        raise ComponentError(f"pipeline is invalid: {own.error_messages}")
    remote_style = offline_client().jobs.validate(job)
    if not remote_style.passed:
        raise ComponentError(f"pipeline is invalid: {remote_style.error_messages}")
    return ValidationSummary(
        components={
            step: {
                "name": c.name,
                "version": c.version,
                "inputs": sorted(c.inputs),
                "outputs": sorted(c.outputs),
            }
            for step, c in loaded.items()
        },
        nodes=list(job.jobs),
        pipeline_inputs=sorted(job.inputs),
        outputs=sorted(job.outputs),
    )


def pipeline_dict(job: Any, relative_to: Path) -> dict[str, Any]:
    """The job as a YAML-ready dict with local paths relative to `relative_to`."""
    data: dict[str, Any] = job._to_dict()
    base = relative_to.resolve()

    def relative(path: str) -> str:
        rel = os.path.relpath(Path(path).resolve(), base)
        return rel if rel.startswith(".") else f"./{rel}"

    for key, value in job.inputs.items():
        # azure-ai-ml dumps a boolean pipeline input as 0/1; a boolean component input wants bools
        if isinstance(getattr(value, "_data", None), bool):
            data["inputs"][key] = value._data
    for key, spec in (data.get("inputs") or {}).items():
        # _to_dict() writes EVERY path as `azureml:<path>` (a data-asset reference): take the path
        # the job was given instead. Remote URIs and asset references go as they are (as submit
        # sends them); a local path must exist, since `az ml job create` uploads it.
        given = getattr(getattr(job.inputs.get(key), "_data", None), "path", None)
        if not (isinstance(spec, dict) and isinstance(given, str)):
            continue
        if "://" in given or given.startswith("azureml:"):
            spec["path"] = given
        elif Path(given).exists():
            spec["path"] = relative(given)
        else:
            raise ConfigError(f"{key}: local path {given} does not exist")
    for node in data.get("jobs", {}).values():
        component = node.get("component")
        code = component.get("code") if isinstance(component, dict) else None
        if isinstance(code, str) and Path(code).is_absolute():
            component["code"] = relative(code)
    return data


def dump_pipeline(job: Any, out: Path) -> Path:
    """Write the job YAML to `out` with relative paths (see the module docstring)."""
    import yaml

    if out.is_dir():  # `-o runs/` meant as a folder: say so before building anything
        raise ConfigError(
            f"--output {out} is a folder; name the YAML file, e.g. {out}/pipeline.yml"
        )
    data = pipeline_dict(job, out.parent)
    text = yaml.safe_dump(data, sort_keys=False, width=100, allow_unicode=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:  # a typo'd or read-only folder is the user's to fix: no traceback
        raise ConfigError(f"--output {out}: cannot write it: {exc.strerror}") from None
    return out


def workspace_client(
    subscription: str,
    resource_group: str,
    workspace: str,
    *,
    credential: Any = None,
    **client_kwargs: Any,
) -> Any:
    """An MLClient for a workspace; `rollout.azure_credential.default_credential()` by default."""
    from azure.ai.ml import MLClient

    missing = [
        flag
        for flag, value in (
            ("--subscription", subscription),
            ("--resource-group", resource_group),
            ("--workspace", workspace),
        )
        if not value
    ]
    if missing:
        raise AzureNotConfigured(f"missing workspace coordinates: {', '.join(missing)}")
    if credential is None:
        credential = default_credential()
    return MLClient(credential, subscription, resource_group, workspace, **client_kwargs)


def stage_code(job: Any, into: Path) -> Path:
    """Point every step's `code` at a snapshot of just the packages the steps import.

    The components declare `code: ../..` (the repository root) so the same YAML runs locally.
    azure-ai-ml walks every file under a code folder to hash it, ignored or not (a .venv inside
    the checkout made that ~5 s per step here); the snapshot holds only source files, so hashing
    is instant and the upload small. Same sources, same hash: Azure ML re-uses the upload.
    """
    import shutil

    root = COMPONENTS_DIR.parent
    for package in CODE_PACKAGES:
        shutil.copytree(
            root / package,
            into / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"),
            dirs_exist_ok=True,
        )
    for node in job.jobs.values():
        node.component.code = str(into)
    return into


def stamp_source(job: Any, commit: str | None = None) -> str | None:
    """Set GIT_COMMIT on every step of `job` to the submitting checkout's commit.

    In Azure ML the steps run in a staged snapshot without .git, where `git rev-parse` cannot
    answer: without this every registered model was tagged git_commit=unknown.
    """
    commit = commit or source_commit()
    if commit:
        for node in job.jobs.values():
            node.environment_variables = {
                **(node.environment_variables or {}),
                "GIT_COMMIT": commit,
            }
    return commit


def production_model_uri(registry: str, model_name: str, *, ml_client: Any = None) -> str | None:
    """The model input Azure ML mounts for the register step: production's version, or None.

    The gate re-scores production after a data refresh and needs its files; the Azure ML
    registry downloads none, so the job asks Azure ML to mount them (the register step's
    `production_model` input). `registry` is the pipeline's: `azureml` (the job's workspace,
    read through `ml_client`, the submission's) → `azureml:<name>:<version>`;
    `azureml:SUB/RG/WS` (another workspace) → its `azureml://` model URI. None: no version is
    tagged stage=production (a first release), or a local registry (a job cannot mount a
    folder of this machine; run-local binds it itself). The step checks the files are still
    production's when it runs. A `model_name` differing from a registered one only in case is
    refused here (ConfigError), as the register step would refuse it after train ran.
    """
    from aml_pipelines.registry.azureml import AzureMLRegistry
    from aml_pipelines.registry.factory import open_registry
    from components.register.register import check_case_twin, production_version

    kind, _, coordinates = registry.partition(":")
    if kind != "azureml":
        return None
    reader = (
        AzureMLRegistry(ml_client)
        if not coordinates and ml_client is not None
        else open_registry(registry)
    )
    try:
        check_case_twin(reader, model_name)
        production = production_version(reader, model_name)
    except AzureNotConfigured as exc:  # the first call to Azure of `pipeline submit`
        raise AzureNotConfigured(
            f"{exc}: run `az login`, or set AZURE_CLIENT_ID / AZURE_TENANT_ID / AZURE_CLIENT_SECRET"
        ) from exc
    if production is None:
        return None
    log.info("binding production_model to %s:%s", production.name, production.version)
    if not coordinates:
        return f"azureml:{production.name}:{production.version}"
    sub, rg, ws = coordinates.split("/")
    return (
        f"azureml://subscriptions/{sub}/resourcegroups/{rg}/workspaces/{ws}/models/"
        f"{production.name}/versions/{production.version}"
    )


def submit_pipeline(job: Any, ml_client: Any, *, experiment: str = "aml-rollout") -> Any:
    """Submit the job (stamped with its GIT_COMMIT, with a staged code snapshot).

    Azure errors become one clear line.
    """
    import tempfile

    from azure.ai.ml.exceptions import MlException
    from azure.core.exceptions import AzureError, ClientAuthenticationError

    stamp_source(job)
    try:
        with tempfile.TemporaryDirectory(prefix="aml-rollout-code-") as tmp:
            stage_code(job, Path(tmp))
            return ml_client.jobs.create_or_update(job, experiment_name=experiment)
    except ClientAuthenticationError as exc:
        if exc.response is not None:  # a token was sent, and ARM refused it (expired, tenant)
            raise PipelineError(
                "submitting the pipeline failed: Azure rejected the credentials "
                f"(HTTP {exc.status_code}): {_first_line(exc)}"
            ) from exc
        raise AzureNotConfigured(
            "no usable Azure credentials (DefaultAzureCredential found none): run `az login`, "
            "or set AZURE_CLIENT_ID / AZURE_TENANT_ID / AZURE_CLIENT_SECRET; "
            f"{_first_line(exc)}"
        ) from exc
    except (AzureError, MlException) as exc:
        raise PipelineError(f"submitting the pipeline failed: {_first_line(exc)}") from exc


def _first_line(exc: Exception) -> str:
    """The substance of an Azure error in one line.

    azure-ai-ml reports a job that fails its own validation as a JSON document
    (`{"result": "Failed", "errors": [{"message", "path"}, ...]}`), whose first line is "{", and
    one whose dependencies it cannot resolve as coloured paragraphs (a summary, "Details:" with
    the cause, then "Resolutions:" and links) whose first line is a colour code alone.
    """
    from rollout.azure_text import one_line, strip_ansi

    text = strip_ansi(str(exc)).strip()
    try:
        errors = json.loads(text)["errors"]
        return "; ".join(f"{e.get('path', '?')}: {e.get('message', '?')}" for e in errors)
    except (ValueError, KeyError, TypeError, AttributeError):
        if "\nResolutions:" in text:
            return one_line(text)
        return text.splitlines()[0] if text else type(exc).__name__
