"""The two pipelines, wired with azure-ai-ml's @pipeline from the same command components.

- `build_pipeline`: the training pipeline, train → register → package → rollout. Registering is
  part of it; the package step names the new version by the register step's registration.json.
- `build_deploy_pipeline`: the deploy pipeline, package → rollout, for a version that is ALREADY
  registered (what the registration trigger submits with `--delivery pipeline`). It starts from
  a registered reference: `model_name` + `model_version`, and the model's files as a
  `custom_model` input `azureml:<name>:<version>` that Azure ML mounts for the package step.

This module only wires nodes. Each step is the command component in `components/<step>/
component.yml`, loaded with `load_component`; the same YAML command lines run in Azure ML (the
job a builder returns, submitted or dumped) and on this machine (the local runner walks the
training pipeline's nodes). There is no second definition of a step. In both pipelines the
rollout step gets the registry, so the registry tags follow traffic from inside the job.

`azure.ai.ml` is imported inside the functions: importing it costs about a second and a half.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import components

STEPS = ("train", "register", "package", "rollout")
DEPLOY_STEPS = ("package", "rollout")
COMPONENTS_DIR = Path(components.__file__).resolve().parent
EXAMPLE_SPEC = COMPONENTS_DIR / "rollout" / "spec.example.yaml"
PIPELINE_NAME = "aml_rollout_delivery"
DEPLOY_PIPELINE_NAME = "aml_rollout_deploy"
#: Rows of the bundled diabetes data the train step reads without `data` (scikit-learn's).
BUNDLED_ROWS = 442


def component_path(step: str) -> Path:
    """The component YAML of a step."""
    return COMPONENTS_DIR / step / "component.yml"


@dataclass(frozen=True)
class PipelineParams:
    """The pipeline's inputs, with the defaults a user gets from `aml-rollout pipeline ...`."""

    model_name: str = "diabetes-ridge"
    alpha: float = 1.0
    test_fraction: float = 0.2
    seed: int = 42
    data: str | None = None
    target: str | None = None
    registry: str = "azureml"
    metric: str = "mse"
    max_regression: float = 0.0
    force: bool = False
    image_registry: str = "amlrollout.azurecr.io"
    package_mode: str = "local"
    rollout_spec: str = field(default=str(EXAMPLE_SPEC))

    def literals(self) -> dict[str, Any]:
        """The scalar inputs (everything except the data and spec paths)."""
        values = asdict(self)
        for key in ("data", "rollout_spec", "target"):
            values.pop(key)
        return values


@dataclass(frozen=True)
class DeployParams:
    """The deploy pipeline's inputs: a registered version, where to package and how to roll out."""

    # No defaults: a deploy pipeline of a model or version nobody named would package and roll
    # out whatever `diabetes-ridge` (the demo's model) or version 1 is. None is refused by
    # check_params with how to name one.
    model_name: str | None = None
    model_version: int | None = None
    registry: str = "azureml"
    image_registry: str = "amlrollout.azurecr.io"
    package_mode: str = "local"
    rollout_spec: str = field(default=str(EXAMPLE_SPEC))

    @property
    def model_uri(self) -> str:
        """The registered model as an Azure ML asset reference."""
        return f"azureml:{self.model_name}:{self.model_version}"


def check_params(params: PipelineParams | DeployParams) -> None:
    """Refuse inputs a step would refuse, before a job is built (ConfigError naming the input).

    Without this, a bad `metric`, `package_mode` or `image_registry` fails its step only after
    train (and register) ran on the cluster, and leaves a registered candidate behind; a bad
    `model_name` trains a model the register step then refuses.
    """
    from aml_pipelines.errors import ConfigError
    from aml_pipelines.registry.local import check_name
    from components.package.package import MODES, image_name

    if params.model_name is None:
        raise ConfigError(
            "model_name: not given; the deploy pipeline rolls out one registered model and does "
            "not guess which: name it with -p model_name=N (`aml-rollout registry list` lists "
            "the models)"
        )
    check_name(params.model_name)
    # The package step names the image `<image_registry>/<model_name>:<version>`: a registry, or
    # a model name that makes no repository once lower-cased (`m.`), fails it after train and
    # register.
    image_name(params.image_registry, params.model_name, 1)
    if params.package_mode not in MODES:
        raise ConfigError(f"package_mode: {params.package_mode!r} is not one of {list(MODES)}")
    if isinstance(params, DeployParams):
        if params.model_version is None:
            raise ConfigError(
                "model_version: not given; the deploy pipeline rolls out one registered version "
                "and does not guess which: name it with -p model_version=V (`aml-rollout "
                f"registry list {params.model_name}` lists the versions)"
            )
        if params.model_version < 1:
            raise ConfigError(f"model_version: {params.model_version} is not a registry version")
        return
    from components.register.gate import LOWER_IS_BETTER
    from components.train.train import TrainParams

    if params.target is not None and params.data is None:
        # The step would drop --target silently (its $[[...]] block needs data too).
        raise ConfigError(
            f"target: {params.target!r} is given without data; target names a column of the CSV "
            "data (-p data=FOLDER), the bundled diabetes data has its own target"
        )
    if params.data is not None and is_local_path(params.data):
        if not Path(params.data).exists():
            # validate said "valid" of it; build refused it only when writing the YAML
            raise ConfigError(f"data: local path {params.data} does not exist")
        if not Path(params.data).is_dir():
            # A uri_folder input: azure-ai-ml refuses to upload a file for it ("There is no dir
            # on target path"), at submit or `az ml job create`, after build wrote the YAML.
            raise ConfigError(
                f"data: {params.data} is a file; data is a folder of CSV files (a uri_folder "
                "input): pass the folder holding it"
            )
    if params.data is not None and params.target is None:
        # The train step refuses it (a CSV has no default target), after the job was submitted.
        raise ConfigError(
            f"data: {params.data!r} is given without target; name the CSV's target column "
            "with -p target=COLUMN"
        )
    if params.data is not None and params.target is not None and is_local_path(params.data):
        from components.train.train import check_csv_target

        # A typo'd target, or a folder without CSV files, failed the train step in Azure ML
        # minutes after submission (compute started); the first header line tells now.
        check_csv_target(Path(params.data), params.target)
    if params.target is not None and "'" in params.target:
        # The train command single-quotes it ('${{inputs.target}}'): the step's shell line breaks.
        raise ConfigError(
            f"target: {params.target!r} holds a single quote ('), which the train step's shell "
            "command line cannot carry; rename the column"
        )
    if params.metric not in LOWER_IS_BETTER:
        raise ConfigError(f"metric: {params.metric!r} is not one of {sorted(LOWER_IS_BETTER)}")
    if not (math.isfinite(params.max_regression) and params.max_regression >= 0):
        raise ConfigError(f"max_regression: must be >= 0, got {params.max_regression}")
    TrainParams(alpha=params.alpha, test_fraction=params.test_fraction, seed=params.seed)
    if params.data is None:
        # The bundled data's size is known: a split the train step refuses (`-p
        # test_fraction=0.999`) was refused only once the job ran. Its rule, train.train's:
        held_out = math.ceil(params.test_fraction * BUNDLED_ROWS)
        if held_out < 2 or BUNDLED_ROWS - held_out < 2:
            raise ConfigError(
                f"test_fraction: {params.test_fraction} leaves {BUNDLED_ROWS - held_out} "
                f"training and {held_out} held-out rows of {BUNDLED_ROWS}; both need at least 2 "
                "(r2 needs 2 held-out rows)"
            )


def is_local_path(value: str) -> bool:
    """Whether an input value is a local path (not a URI or an `azureml:` asset reference)."""
    return "://" not in value and not value.startswith("azureml:")


def quiet_sdk() -> None:
    """Silence azure-ai-ml's "experimental class" notices (logged for its own schema classes)."""
    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)


def load_components() -> dict[str, Any]:
    """Every step's component, loaded (and schema-checked) from its YAML.

    ComponentError names the file that does not load: `run-local`, `build` and `submit` load
    them too, and a user edits these files (train is the step a user replaces).
    """
    quiet_sdk()
    from azure.ai.ml import load_component

    from aml_pipelines.errors import ComponentError

    loaded: dict[str, Any] = {}
    for step in STEPS:
        path = component_path(step)
        try:
            loaded[step] = load_component(source=path)
        except Exception as exc:  # the SDK raises marshmallow / its own / YAML errors
            raise ComponentError(f"{path}: does not load: {sdk_errors(exc)}") from exc
    return loaded


def sdk_errors(exc: Exception) -> str:
    """The SDK's validation errors as `field: message` pairs instead of its JSON report."""
    text = str(exc)
    start, end = text.find("{"), text.rfind("}")
    try:
        report = json.loads(text[start : end + 1])
        return "; ".join(f"{e.get('path')}: {e.get('message')}" for e in report["errors"])
    except (ValueError, KeyError, TypeError):
        return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def build_pipeline(
    params: PipelineParams | None = None,
    *,
    compute: str | None = None,
    loaded: dict[str, Any] | None = None,
    rolls_out: bool = True,
    production_model: str | None = None,
) -> Any:
    """The pipeline job for `params` (an azure.ai.ml PipelineJob), ready to validate or submit.

    `production_model`: the files of the version tagged stage=production, bound to the register
    step's `production_model` input (a custom_model: `azureml:<name>:<version>`, or an
    `azureml://` model URI, which Azure ML mounts; run-local, the local registry's folder) so
    that the gate can re-score production after a data refresh. None (a first release): the
    input stays unbound. `build.production_model_uri` resolves it for a submission.

    The job's rollout step rolls out the version its register step registers, so the register
    step tags it `rollout_by=pipeline-job` and the registration triggers leave it alone (two
    controllers would otherwise roll it out at once). `rolls_out=False` is for the local runner
    stopping before the rollout step: the version is then the triggers' to deliver.
    """
    from azure.ai.ml import Input
    from azure.ai.ml.dsl import pipeline

    params = params or PipelineParams()
    check_params(params)
    steps = loaded or load_components()
    train_c, register_c, package_c, rollout_c = (steps[s] for s in STEPS)

    @pipeline(
        None,
        name=PIPELINE_NAME,
        display_name="aml-rollout: train, register, package, roll out",
        description="Ridge model → gated registration → scoring package → judged rollout",
    )
    # No annotations here: the dsl reads them at runtime, and this module's postponed annotations
    # would hand it strings. Input types come from the components and the values passed.
    def delivery(  # type: ignore[no-untyped-def]
        model_name,
        alpha,
        test_fraction,
        seed,
        registry,
        metric,
        max_regression,
        force,
        image_registry,
        package_mode,
        rollout_spec,
        rollout_in_job,
        data=None,
        target=None,
        production_model=None,
    ):
        train = train_c(
            model_name=model_name,
            alpha=alpha,
            test_fraction=test_fraction,
            seed=seed,
            data=data,
            target=target,
        )
        register = register_c(
            model=train.outputs.model,
            model_ref=train.outputs.model,
            registry=registry,
            metric=metric,
            max_regression=max_regression,
            force=force,
            rollout_in_job=rollout_in_job,
            production_model=production_model,
        )
        package = package_c(
            registration=register.outputs.registration,
            model=train.outputs.model,
            registry=registry,
            image_registry=image_registry,
            mode=package_mode,
        )
        rollout = rollout_c(package=package.outputs.package, spec=rollout_spec, registry=registry)
        return {
            "model": train.outputs.model,
            "metrics": train.outputs.metrics,
            "registration": register.outputs.registration,
            "package": package.outputs.package,
            "rollout_result": rollout.outputs.result,
        }

    kwargs: dict[str, Any] = params.literals()
    # A pipeline input rather than a node literal: the YAML dump writes a node's boolean as 1,
    # which is not what a boolean input takes; pipeline inputs are written true/false.
    kwargs["rollout_in_job"] = rolls_out
    kwargs["rollout_spec"] = Input(type="uri_file", path=params.rollout_spec)
    if params.data is not None:
        kwargs["data"] = Input(type="uri_folder", path=params.data)
    if params.target is not None:
        kwargs["target"] = params.target
    if production_model is not None:
        kwargs["production_model"] = Input(type="custom_model", path=production_model)
    job = delivery(**kwargs)
    _declared_modes(job)
    _set_compute(job, compute)
    return job


def build_deploy_pipeline(
    params: DeployParams | None = None,
    *,
    compute: str | None = None,
    loaded: dict[str, Any] | None = None,
) -> Any:
    """The deploy pipeline job (package → rollout) for one registered version."""
    from azure.ai.ml import Input
    from azure.ai.ml.dsl import pipeline

    params = params or DeployParams()
    check_params(params)
    steps = loaded or load_components()
    package_c, rollout_c = (steps[s] for s in DEPLOY_STEPS)

    @pipeline(
        None,
        name=DEPLOY_PIPELINE_NAME,
        display_name=f"aml-rollout: deploy {params.model_name}:{params.model_version}",
        description="A registered model version → scoring package → judged rollout → tags",
    )
    # No annotations, as in build_pipeline: the dsl reads them at runtime.
    def deploy(  # type: ignore[no-untyped-def]
        model_name,
        model_version,
        registered_model,
        registry,
        image_registry,
        package_mode,
        rollout_spec,
    ):
        package = package_c(
            model_name=model_name,
            model_version=model_version,
            registered_model=registered_model,
            registry=registry,
            image_registry=image_registry,
            mode=package_mode,
        )
        rollout = rollout_c(package=package.outputs.package, spec=rollout_spec, registry=registry)
        return {"package": package.outputs.package, "rollout_result": rollout.outputs.result}

    job = deploy(
        model_name=params.model_name,
        model_version=params.model_version,
        registered_model=Input(type="custom_model", path=params.model_uri),
        registry=params.registry,
        image_registry=params.image_registry,
        package_mode=params.package_mode,
        rollout_spec=Input(type="uri_file", path=params.rollout_spec),
    )
    _declared_modes(job)
    _set_compute(job, compute)
    return job


def _declared_modes(job: Any) -> None:
    """Give each node input bound to a value the mode its component declares (register's
    `model_ref`: `direct`). azure-ai-ml sends a node input's own mode only, none for one bound
    to another step's output or to a pipeline input (whose mode it never passes down): the job
    then names no mode, and whether the step gets the `azureml://` URI it registers or a mount
    (a uri_folder's default) is left to the service."""
    for node in job.jobs.values():
        for name, declared in node.component.inputs.items():
            bound = node.inputs.get(name)
            if declared.mode and bound is not None and bound._data is not None and not bound.mode:
                bound.mode = declared.mode


def _set_compute(job: Any, compute: str | None) -> None:
    if compute is not None and not compute.strip():
        from aml_pipelines.errors import ConfigError

        # An empty name set no default_compute: a YAML Azure ML refuses ("Compute not set").
        raise ConfigError(
            f"compute: {compute!r} names no compute cluster; pass --compute NAME "
            "(Azure ML refuses a job without one)"
        )
    if compute is not None:
        from azure.ai.ml.entities import PipelineJobSettings

        job.settings = job.settings or PipelineJobSettings()
        job.settings.default_compute = compute
