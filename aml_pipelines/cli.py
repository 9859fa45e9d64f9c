"""`aml-rollout pipeline ...` and `aml-rollout registry ...` (heavy imports inside commands).

Only typer, rich, the standard library and `aml_pipelines.build` (no SDK at import) are
imported at module level; azure.ai.ml and the registry backends load inside the command that
needs them, so `aml-rollout --help` stays fast.
Every error a user can fix (PipelineError) prints one red line and exits non-zero: 2 for bad
input or configuration, a failed step's own exit code for `run-local` (128 + N for a step killed
by signal N, or for `run-local` itself stopped by SIGTERM or SIGHUP). A rollout that ran and was
not promoted (rolled back, paused) is an outcome, not an error: `run-local` reports it as such,
with the reason and the ledger, and still exits with the rollout step's code (3, 5).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from aml_pipelines.build import DEFAULT_COMPUTE

if TYPE_CHECKING:
    from aml_pipelines.pipeline import DeployParams, PipelineParams
    from aml_pipelines.registry.base import ModelVersion

EXIT_USER_ERROR = 2

pipeline_app = typer.Typer(no_args_is_help=True)
registry_app = typer.Typer(no_args_is_help=True)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

_TRAINING_INPUTS = (
    "model_name, alpha, test_fraction, seed, data, target, metric, max_regression, force, "
    "image_registry, package_mode"
)
ParamOption = Annotated[
    list[str] | None,
    typer.Option(
        "--param",
        "-p",
        help=f"Pipeline input KEY=VALUE (repeatable): {_TRAINING_INPUTS}; with "
        "--deploy: model_name and model_version (required), image_registry, package_mode.",
        show_default=False,
    ),
]
#: For the commands without --deploy (submit, run-local): only the training pipeline's inputs.
TrainingParamOption = Annotated[
    list[str] | None,
    typer.Option(
        "--param",
        "-p",
        help=f"Pipeline input KEY=VALUE (repeatable): {_TRAINING_INPUTS}.",
        show_default=False,
    ),
]
SpecOption = Annotated[
    Path | None,
    typer.Option(
        help="Rollout spec for the rollout step: required by build, submit and run-local "
        "--until rollout; validate uses the bundled example by default."
    ),
]
DeployOption = Annotated[
    bool,
    typer.Option(
        "--deploy",
        help="The deploy pipeline (package → rollout of a registered version: "
        "-p model_name=N -p model_version=V) instead of the training pipeline.",
    ),
]
RegistryOption = Annotated[
    str | None,
    typer.Option(
        "--registry",
        envvar="AML_ROLLOUT_REGISTRY",
        help="local:PATH or azureml:SUBSCRIPTION/RESOURCE_GROUP/WORKSPACE "
        "(default: local, .aml-rollout/registry)",
        show_default=False,
    ),
]


@contextmanager
def _user_errors() -> Iterator[None]:
    """PipelineError -> one red line and an exit code, never a traceback."""
    from aml_pipelines.errors import PipelineError

    try:
        yield
    except PipelineError as exc:
        # Escaped: messages quote paths, names and values, whose `[...]` rich would take as markup
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(getattr(exc, "exit_code", EXIT_USER_ERROR)) from None


def parse_params(
    pairs: list[str] | None, *, rollout_spec: Path | None = None, **overrides: Any
) -> PipelineParams:
    """PipelineParams from KEY=VALUE pairs, converted to each field's type; errors name the key."""
    from aml_pipelines.pipeline import PipelineParams

    params: PipelineParams = _parse_into(PipelineParams, pairs, rollout_spec, overrides)
    return params


def parse_deploy_params(
    pairs: list[str] | None, *, rollout_spec: Path | None = None, **overrides: Any
) -> DeployParams:
    """DeployParams (the deploy pipeline's inputs) from KEY=VALUE pairs, like parse_params."""
    from aml_pipelines.pipeline import DeployParams

    params: DeployParams = _parse_into(DeployParams, pairs, rollout_spec, overrides)
    return params


def _parse_into(
    cls: Any, pairs: list[str] | None, rollout_spec: Path | None, overrides: dict[str, Any]
) -> Any:
    from aml_pipelines.errors import ConfigError

    fields = {f.name: f for f in dataclasses.fields(cls)}
    settable = sorted(set(fields) - {"registry", "rollout_spec"})
    values: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in settable:
            raise ConfigError(f"--param {pair!r}: expected KEY=VALUE with KEY one of {settable}")
        if not raw.strip() and fields[key].default is not None:
            # Only the optional inputs (data, target) are unset by an empty value: the others
            # became None, which every step and check took for a value (a traceback).
            raise ConfigError(
                f"--param {key}: empty value; give one, or leave -p {key} out for the default "
                f"{fields[key].default!r}"
            )
        annotation = fields[key].type
        kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "str")
        kind = kind.removesuffix(" | None")  # optional (model_version): typed all the same
        try:
            if kind == "bool":
                if raw.lower() not in {"true", "false"}:
                    raise ValueError("expected true or false")
                values[key] = raw.lower() == "true"
            elif kind == "int":
                values[key] = int(raw)
            elif kind == "float":
                values[key] = float(raw)
            else:
                values[key] = raw or None
        except ValueError as exc:
            raise ConfigError(f"--param {key}: {raw!r} is not a valid {kind} ({exc})") from None
    if rollout_spec is not None:
        if rollout_spec.is_dir():  # it said "not found" of a folder that is there
            raise ConfigError(f"--rollout-spec: {rollout_spec} is a folder; name the spec file")
        if not rollout_spec.is_file():
            raise ConfigError(f"--rollout-spec: {rollout_spec} not found")
        # Checked here, not first at the job's last step: a bad spec would fail the rollout
        # only after train and register spent cluster time and left a candidate behind.
        from rollout.api import load_spec
        from rollout.errors import ConfigError as SpecError

        try:
            load_spec(rollout_spec)
        except SpecError as exc:
            raise ConfigError(f"--rollout-spec: {exc}") from None
        values["rollout_spec"] = str(rollout_spec)
    return cls(**values)


# ------------------------------------------------------------------------------------- pipeline


@pipeline_app.command("validate")
def validate(
    params: ParamOption = None, rollout_spec: SpecOption = None, deploy: DeployOption = False
) -> None:
    """Load and validate every component, build the pipeline and validate it offline."""
    with _user_errors():
        from aml_pipelines.build import validate_deploy_offline, validate_offline

        if deploy:
            summary = validate_deploy_offline(
                parse_deploy_params(params, rollout_spec=rollout_spec)
            )
        else:
            summary = validate_offline(parse_params(params, rollout_spec=rollout_spec))
    table = Table("step", "component", "inputs", "outputs", title="components: valid")
    for step, info in summary.components.items():
        table.add_row(
            step,
            f"{info['name']}:{info['version']}",
            ", ".join(info["inputs"]),
            ", ".join(info["outputs"]),
        )
    out.print(table)
    out.print(
        f"pipeline valid (offline): {' → '.join(summary.nodes)}; "
        f"{len(summary.pipeline_inputs)} inputs, outputs {', '.join(summary.outputs)}"
    )


def _require_spec(rollout_spec: Path | None, command: str) -> None:
    """Refuse to build or submit a job whose rollout step would use the bundled example spec.

    Both pipelines end with the rollout step. The example targets a placeholder subscription
    (00000000-...): a job built with it trains and registers a version, then fails at the rollout
    after spending cluster time, and leaves a candidate behind. `validate` (offline) still uses
    it; passing the example explicitly is a deliberate choice and is accepted.
    """
    if rollout_spec is None:
        from aml_pipelines.errors import ConfigError

        raise ConfigError(
            f"pipeline {command} needs --rollout-spec FILE: the job ends with the rollout step, "
            "and the bundled example (components/rollout/spec.example.yaml) targets a placeholder "
            "subscription 00000000-0000-0000-0000-000000000000"
        )


@pipeline_app.command("build")
def build(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the job YAML.")],
    params: ParamOption = None,
    rollout_spec: SpecOption = None,
    # Azure ML refuses a job with no compute ("Compute not set"): the same default as submit.
    compute: Annotated[str, typer.Option(help="Compute cluster for every step.")] = DEFAULT_COMPUTE,
    deploy: DeployOption = False,
    production_model: Annotated[
        str | None,
        typer.Option(
            "--production-model",
            metavar="azureml:MODEL:VERSION",
            help="Bind the register step's production_model input to production's version, "
            "for the gate to re-score it after a data refresh (`submit` finds it itself).",
        ),
    ] = None,
) -> None:
    """Write the pipeline job YAML (relative code: paths) for `az ml job create -f`."""
    with _user_errors():
        from aml_pipelines.build import dump_pipeline, stamp_source
        from aml_pipelines.pipeline import build_deploy_pipeline, build_pipeline

        _require_spec(rollout_spec, "build")
        if deploy:
            if production_model is not None:
                _refuse_production_model("--deploy builds no register step to bind it to")
            deploy_params = parse_deploy_params(params, rollout_spec=rollout_spec)
            job = build_deploy_pipeline(deploy_params, compute=compute)
        else:
            pipeline_params = parse_params(params, rollout_spec=rollout_spec)
            if production_model is not None:
                _check_production_model(production_model, pipeline_params.model_name)
            job = build_pipeline(
                pipeline_params, compute=compute, production_model=production_model
            )
        stamp_source(job)
        dump_pipeline(job, output)
    # Quoted: the line is meant to be pasted into a shell, and paths hold spaces
    out.print(
        f"wrote {output} ({', '.join(job.jobs)}); "
        f"submit with: az ml job create -f {shlex.quote(str(output))}",
        markup=False,
    )
    if not deploy and production_model is None:
        # build asks no workspace (the job's registry, `azureml`, is known only where it runs)
        out.print(
            "note: the register step's production_model input is unbound: after a data refresh "
            "its gate cannot re-score production and refuses the model as not comparable; "
            "`pipeline submit` binds it, or build with --production-model "
            "azureml:MODEL:PRODUCTION_VERSION",
            markup=False,
        )


def _check_production_model(reference: str, model_name: str) -> None:
    """`--production-model`: an Azure ML reference to a version of the model the run trains."""
    import re

    found = re.fullmatch(r"azureml:([A-Za-z0-9_.-]+):([1-9][0-9]*)", reference)
    if found is None:
        _refuse_production_model(
            f"{reference!r} is not azureml:MODEL:VERSION (e.g. azureml:{model_name}:3)"
        )
    if found[1] != model_name:
        _refuse_production_model(
            f"{reference!r} is a version of {found[1]}, not of {model_name}, the model this "
            "pipeline registers (set -p model_name=...)"
        )


def _refuse_production_model(why: str) -> NoReturn:
    from aml_pipelines.errors import ConfigError

    raise ConfigError(f"--production-model: {why}")


@pipeline_app.command("submit")
def submit(
    subscription: Annotated[str, typer.Option(help="Azure subscription id.")],
    resource_group: Annotated[str, typer.Option(help="Resource group of the workspace.")],
    workspace: Annotated[str, typer.Option(help="Azure ML workspace name.")],
    compute: Annotated[str, typer.Option(help="Compute cluster for every step.")] = DEFAULT_COMPUTE,
    experiment: Annotated[str, typer.Option(help="Experiment name.")] = "aml-rollout",
    params: TrainingParamOption = None,
    rollout_spec: SpecOption = None,
) -> None:
    """Submit the pipeline to an Azure ML workspace (DefaultAzureCredential)."""
    with _user_errors():
        from aml_pipelines.build import production_model_uri, submit_pipeline, workspace_client
        from aml_pipelines.pipeline import build_pipeline

        # DefaultAzureCredential logs every credential it tried; the error line below says it all
        logging.getLogger("azure.identity").setLevel(logging.ERROR)

        _require_spec(rollout_spec, "submit")
        pipeline_params = parse_params(params, rollout_spec=rollout_spec)
        client = workspace_client(subscription, resource_group, workspace)
        # production's files, for the gate to re-score it on the candidate's rows (unbound:
        # none); a model name the registry holds in another case is refused there
        production = production_model_uri(
            pipeline_params.registry, pipeline_params.model_name, ml_client=client
        )
        job = build_pipeline(pipeline_params, compute=compute, production_model=production)
        submitted = submit_pipeline(job, client, experiment=experiment)
    out.print(
        f"submitted {submitted.name}: {submitted.studio_url or '(no studio URL)'}", markup=False
    )


@pipeline_app.command("run-local")
def run_local(
    params: TrainingParamOption = None,
    rollout_spec: SpecOption = None,
    until: Annotated[str, typer.Option(help="Last step to run.")] = "package",
    run_dir: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<id>).")] = None,
    registry: RegistryOption = None,
) -> None:
    """Run the pipeline's steps here, as subprocesses, with a local registry."""
    with _user_errors():
        from aml_pipelines.errors import ConfigError, ModelNotRegistered, RolloutNotPromoted
        from aml_pipelines.local_runner import run_local as run

        spec = registry or "local"
        if spec.partition(":")[0] != "local":  # `locale:` passed, failing the register step
            raise ConfigError(f"--registry: run-local needs a local registry, got {spec!r}")
        if until == "rollout" and rollout_spec is None:
            raise ConfigError(
                "--until rollout needs --rollout-spec FILE (the bundled example targets Azure)"
            )
        pipeline_params = parse_params(params, rollout_spec=rollout_spec, registry=spec)
        try:
            result = run(pipeline_params, run_dir=run_dir, until=until, sink=_echo)
        except (RolloutNotPromoted, ModelNotRegistered) as verdict:
            # The gate or the rollout did its job (production is protected): say what it decided.
            out.print(f"[bold yellow]{escape(str(verdict))}[/]")
            raise typer.Exit(verdict.exit_code) from None
        except KeyboardInterrupt:
            # The runner said which step stopped and where its log is: one line, no traceback
            err.print("[bold red]error:[/] interrupted (Ctrl-C)")
            raise typer.Exit(130) from None
    total = sum(step.seconds for step in result.steps.values())
    out.print(f"[green]local run complete[/] in {total:.1f} s: {escape(str(result.run_dir))}")
    registration = result.run_dir / "register" / "registration" / "registration.json"
    # This run's: not one an earlier run of the folder left there (`--until train` announced it)
    if "register" in result.steps and registration.is_file():
        info = json.loads(registration.read_text())
        out.print(
            f"registered {info['name']} version {info['version']} (sha256 {info['sha256']})",
            markup=False,
        )


def _echo(line: str) -> None:
    err.print(line, markup=False)


# ------------------------------------------------------------------------------------- registry


def _open(spec: str | None, *, must_exist: bool = False) -> Any:
    from aml_pipelines.registry.factory import open_registry

    return open_registry(spec, must_exist=must_exist)


@registry_app.command("list")
def list_versions(
    name: Annotated[str | None, typer.Argument(help="Model name (default: every model).")] = None,
    registry: RegistryOption = None,
    rollout_spec: Annotated[
        Path | None,
        typer.Option(help="Rollout spec whose status shows the serving colour mid-rollout."),
    ] = None,
) -> None:
    """List registered versions with their stage, serving colour and metrics."""
    with _user_errors():
        from aml_pipelines.delivery import serving_column
        from aml_pipelines.errors import ModelNotFound

        # A registry the user named by path (--registry, $AML_ROLLOUT_REGISTRY) that does not
        # exist is a typo, not an empty registry; the default one is merely not used yet.
        default = not registry or registry in ("local", "local:")
        reg = _open(registry, must_exist=not default)
        # The default one is found from the working folder: named by its path, so a listing
        # run from the wrong folder does not read as an empty registry.
        where = f"the local registry {reg.root}" if default else str(registry)
        rows = []
        for model in [name] if name else reg.names():
            versions = reg.list_versions(model)
            if name and not versions and name not in (known := reg.names()):
                # As `registry show` of it: exit 2, not an empty listing a script takes for one.
                raise ModelNotFound(
                    f"model {name!r} not found in {where} (models: {', '.join(known) or 'none'})"
                )
            colours = serving_column(versions, rollout_spec)
            rows += [(mv, colours.get(mv.version, "-")) for mv in versions]
        table = versions_table(rows)
    if table.row_count:
        out.print(table)
    elif name:  # known, every version left out of listings (archived in the Azure ML studio)
        out.print(f"model {name!r} has no listed version in {where}", markup=False)
    else:
        hint = ""
        if default and not reg.root.exists():
            hint = (
                " (none here: run from the folder you registered in, or give --registry or "
                "$AML_ROLLOUT_HOME)"
            )
        out.print(f"no registered models in {where}{hint}", markup=False)


@registry_app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="Version number.")],
    registry: RegistryOption = None,
) -> None:
    """Show one version (verifying its files) as JSON."""
    with _user_errors():
        mv = _open(registry).get(name, version)
    record = dataclasses.asdict(mv)
    record["path"] = str(mv.path) if mv.path else None
    out.print_json(json.dumps(record))


@registry_app.command("tag")
def tag(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="Version number.")],
    tags: Annotated[list[str], typer.Argument(help="KEY=VALUE pairs; KEY= removes the tag.")],
    registry: RegistryOption = None,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="With stage=production: archive the version that holds it now "
            "(otherwise refused: a model has one production version).",
        ),
    ] = False,
) -> None:
    """Set (or remove) tags on a version, e.g. `stage=production`."""
    with _user_errors():
        from aml_pipelines.delivery import plan_manual_tags, retag
        from aml_pipelines.errors import ConfigError
        from aml_pipelines.registry.base import STAGE_TAG, Stage

        pairs: dict[str, str] = {}
        for pair in tags:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ConfigError(f"tag {pair!r}: expected KEY=VALUE")
            pairs[key] = value
        stages = sorted((Stage.CANDIDATE, Stage.PRODUCTION, Stage.ARCHIVED, Stage.ROLLED_BACK))
        if pairs.get(STAGE_TAG) and pairs[STAGE_TAG] not in stages:
            # `stage=prod` was written as given: the gate, the triggers and `registry list` read
            # only these values, so the version silently stayed out of every decision.
            raise ConfigError(
                f"tag {STAGE_TAG}={pairs[STAGE_TAG]!r}: not a stage; one of {stages} "
                f"({STAGE_TAG}= removes it)"
            )
        reg = _open(registry)
        if pairs.get("sha256") != "":
            # An unknown or damaged version is named before anything else; but not for removing
            # `sha256`: that repairs a tag the azureml registry refuses the version for.
            reg.get(name, version)
        # Listed only to move production: other tags must stay writable beside a damaged version.
        # Read, planned and written as one step: two `--replace` at once each archived the
        # same holder and tagged their own version, leaving two production versions.
        changes = retag(
            reg,
            name,
            lambda versions: plan_manual_tags(versions, version, pairs, replace=replace),
            listed=pairs.get(STAGE_TAG) == Stage.PRODUCTION,
        )
        written = [reg.get(name, change.version) for change in changes]
    for mv in written:
        out.print(
            f"{mv.name}:{mv.version} tags: {json.dumps(dict(mv.tags), sort_keys=True)}",
            markup=False,
        )


def versions_table(rows: Iterable[tuple[ModelVersion, str]]) -> Table:
    """The `registry list` table of (version, serving colour) rows, readable at 80 columns.

    model, version and stage are what a reader scans for, so they never wrap or get cut; the other
    columns fold when the terminal is narrow (serving wraps "green 75%" at its space). Borderless,
    with the sha256 shortened to 7 hex digits (as git does) and `created` to the date (UTC), one
    version is one line at 80 columns for model names up to 14 characters (diabetes-ridge; about 11
    mid-rollout, when serving reads "green 75%"); `registry show` prints the full values.
    """
    # no_wrap: never wrapped, and cut only if the folding columns cannot give way enough
    table = Table(
        Column("model", no_wrap=True),
        Column("version", no_wrap=True),
        Column("stage", no_wrap=True),
        Column("serving", overflow="fold"),
        Column("mse", overflow="fold"),
        Column("r2", overflow="fold"),
        Column("sha256", overflow="fold"),
        Column("created", no_wrap=True),  # a date folded mid-way reads worse than a wrapped colour
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    for mv, colour in rows:
        table.add_row(
            mv.name,
            str(mv.version),
            mv.stage or "-",
            colour,
            _short(mv.tags.get("mse")),
            _short(mv.tags.get("r2")),
            mv.sha256[:7],
            mv.created_at[:10] or "-",
        )
    return table


def _short(value: str | None) -> str:
    if value is None:
        return "-"
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value
