"""`aml-rollout pipeline ...` and `aml-rollout registry ...`: outputs and error messages."""

from __future__ import annotations

import io
import os
import re
import shlex
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from aml_pipelines.cli import versions_table
from aml_pipelines.pipeline import EXAMPLE_SPEC
from aml_pipelines.registry.base import ModelVersion
from rollout.cli import app
from tests.pipelines.conftest import write_model_folder

runner = CliRunner()
SPEC = ("--rollout-spec", str(EXAMPLE_SPEC))  # named explicitly: build and submit need a spec


def invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env=env)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["pipeline", "build"], "Missing option '--output'", id="build-needs-output"),
        pytest.param(
            ["pipeline", "submit", "--subscription", "s"], "Missing option", id="submit-coordinates"
        ),
        pytest.param(
            ["pipeline", "validate", "-p", "alpha=x"],
            "--param alpha: 'x' is not a valid float",
            id="bad-float",
        ),
        pytest.param(
            ["pipeline", "validate", "-p", "colour=blue"],
            "expected KEY=VALUE with KEY one of",
            id="unknown-param",
        ),
        pytest.param(
            ["pipeline", "validate", "-p", "force=maybe"], "expected true or false", id="bad-bool"
        ),
        # an empty value became None: a traceback from the first check that read it
        pytest.param(
            ["pipeline", "validate", "-p", "image_registry="],
            "--param image_registry: empty value; give one, or leave -p image_registry out for "
            "the default 'amlrollout.azurecr.io'",
            id="empty-image-registry",
        ),
        pytest.param(
            ["pipeline", "run-local", "-p", "model_name= "],
            "--param model_name: empty value",
            id="empty-model-name",
        ),
        pytest.param(
            ["pipeline", "validate", "-p", "alpha="], "--param alpha: empty value", id="empty-alpha"
        ),
        pytest.param(
            ["pipeline", "validate", "--rollout-spec", "nope.yaml"],
            "--rollout-spec: nope.yaml not found",
            id="no-spec",
        ),
        pytest.param(
            ["pipeline", "validate", "--rollout-spec", "components"],
            "--rollout-spec: components is a folder; name the spec file",
            id="spec-is-a-folder",
        ),
        pytest.param(
            ["pipeline", "run-local", "--registry", "azureml"],
            "run-local needs a local registry",
            id="azure-registry",
        ),
        # a typo'd kind passed `startswith("local")`: train ran, then register failed (exit 1)
        pytest.param(
            ["pipeline", "run-local", "--registry", "locale:/x"],
            "run-local needs a local registry, got 'locale:/x'",
            id="locale-registry",
        ),
        pytest.param(
            ["pipeline", "run-local", "--until", "rollout"],
            "--until rollout needs --rollout-spec FILE",
            id="rollout-without-spec",
        ),
        pytest.param(
            ["pipeline", "run-local", "--until", "deploy"],
            "until: 'deploy' is not one of",
            id="bad-until",
        ),
        pytest.param(
            ["pipeline", "validate", "--deploy", "-p", "alpha=1"],
            "KEY one of ['image_registry', 'model_name', 'model_version', 'package_mode']",
            id="deploy-unknown-param",
        ),
        pytest.param(
            [
                "pipeline",
                "build",
                "--deploy",
                "-o",
                "x.yml",
                "-p",
                "model_name=d",
                "-p",
                "model_version=0",
                *SPEC,
            ],
            "model_version: 0 is not a registry version",
            id="deploy-version-zero",
        ),
        # it built (and validated) a deploy of version 1 when no version was named
        pytest.param(
            ["pipeline", "build", "--deploy", "-o", "x.yml", "-p", "model_name=d", *SPEC],
            "model_version: not given; the deploy pipeline rolls out one registered version",
            id="deploy-build-without-version",
        ),
        pytest.param(
            ["pipeline", "validate", "--deploy", "-p", "model_name=diabetes"],
            "name it with -p model_version=V (`aml-rollout registry list diabetes`",
            id="deploy-validate-without-version",
        ),
        # it deployed the demo's `diabetes-ridge` when no model was named
        pytest.param(
            ["pipeline", "build", "--deploy", "-o", "x.yml", "-p", "model_version=4", *SPEC],
            "model_name: not given; the deploy pipeline rolls out one registered model",
            id="deploy-build-without-model",
        ),
        # an empty name wrote a YAML without default_compute, which Azure ML refuses
        pytest.param(
            ["pipeline", "build", "-o", "x.yml", "--compute", " ", *SPEC],
            "compute: ' ' names no compute cluster; pass --compute NAME",
            id="build-empty-compute",
        ),
        pytest.param(
            [
                "pipeline",
                "build",
                "--deploy",
                "-o",
                "x.yml",
                "-p",
                "model_name=d",
                "-p",
                "model_version=2",
                "--compute",
                "",
                *SPEC,
            ],
            "compute: '' names no compute cluster",
            id="deploy-build-empty-compute",
        ),
        # the job ends with the rollout step: the bundled example's placeholder subscription
        # would train and register, then fail at the rollout
        pytest.param(
            ["pipeline", "build", "-o", "x.yml"],
            "pipeline build needs --rollout-spec FILE: the job ends with the rollout step",
            id="build-without-spec",
        ),
        pytest.param(
            ["pipeline", "build", "--deploy", "-o", "x.yml"],
            "pipeline build needs --rollout-spec FILE",
            id="deploy-build-without-spec",
        ),
        pytest.param(
            [
                "pipeline",
                "submit",
                "--subscription",
                "s",
                "--resource-group",
                "r",
                "--workspace",
                "w",
            ],
            "pipeline submit needs --rollout-spec FILE",
            id="submit-without-spec",
        ),
        pytest.param(
            ["pipeline", "validate", "-p", "target=y"],
            "target: 'y' is given without data",
            id="target-without-data",
        ),
        pytest.param(
            ["pipeline", "build", "-o", "x.yml", "-p", "target=y", *SPEC],
            "(-p data=FOLDER)",
            id="build-target-without-data",
        ),
        # validate called the pipeline valid; build refused it
        pytest.param(
            ["pipeline", "validate", "-p", "data=no/such/folder", "-p", "target=y"],
            "data: local path no/such/folder does not exist",
            id="validate-missing-data",
        ),
        # the train step refused it, after the job was built and submitted
        pytest.param(
            ["pipeline", "run-local", "-p", "data=tests"],
            "tests' is given without target; name the CSV's target column with -p target=",
            id="data-without-target",
        ),
        pytest.param(
            ["registry", "list", "--registry", "s3:x"], "unknown kind 's3'", id="bad-registry-kind"
        ),
        pytest.param(
            ["registry", "show", "m", "one"], "Invalid value for 'version'", id="version-not-int"
        ),
        # rich markup: `[b]` and `[red]` in a value were eaten, the line named another path/name
        pytest.param(
            ["pipeline", "validate", "--rollout-spec", "/tmp/[red]spec.yaml"],
            "--rollout-spec: /tmp/[red]spec.yaml not found",
            id="brackets-in-spec-path-kept",
        ),
        pytest.param(
            ["pipeline", "validate", "-p", "model_name=a[b]"],
            "model name 'a[b]' is invalid",
            id="brackets-in-model-name-kept",
        ),
    ],
)
def test_bad_arguments_get_one_clear_line(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())  # rich may wrap long lines
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["validate", "build", "submit"])
@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("steps: [0, 200]\n", "steps", id="invalid-field"),
        pytest.param("steps: [0, 5\n", "not valid YAML", id="not-yaml"),
    ],
)
def test_an_invalid_rollout_spec_is_refused_before_any_job(
    tmp_path: Path, command: str, text: str, message: str
) -> None:
    """Else the job would train and register a version, then fail at its rollout step."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(text, encoding="utf-8")
    out = tmp_path / "pipeline.yml"
    where = {
        "validate": [],
        "build": ["-o", str(out)],
        "submit": ["--subscription", "s", "--resource-group", "r", "--workspace", "w"],
    }[command]
    result = invoke("pipeline", command, *where, "--rollout-spec", str(spec))
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert f"--rollout-spec: {spec}" in flat and message in flat
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output  # one line, as documented
    assert not out.exists()


def test_validate_prints_a_summary() -> None:
    result = invoke("pipeline", "validate")
    assert result.exit_code == 0, result.output
    assert "pipeline valid (offline): train → register → package → rollout" in result.output


def test_build_writes_a_relative_pipeline_yaml(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.yml"
    result = invoke(
        "pipeline", "build", "-o", str(out), "-p", "alpha=0.5", "--compute", "gpu", *SPEC
    )
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "alpha: 0.5" in text and "default_compute: azureml:gpu" in text
    assert "code: /" not in text
    # it asks no workspace which version is production: it says what that costs the gate
    assert "production_model input is unbound" in " ".join(result.output.split())


def test_build_binds_the_production_model_it_is_given(tmp_path: Path) -> None:
    """Without a workspace to ask, `--production-model` says which version the gate re-scores."""
    import yaml
    from azure.ai.ml import load_job

    out = tmp_path / "pipeline.yml"
    result = invoke(
        "pipeline", "build", "-o", str(out), *SPEC, "--production-model", "azureml:diabetes-ridge:3"
    )
    assert result.exit_code == 0, result.output
    assert "unbound" not in result.output
    inputs = yaml.safe_load(out.read_text())["inputs"]
    assert inputs["production_model"] == {
        "type": "custom_model",
        "path": "azureml:diabetes-ridge:3",
    }
    assert load_job(out)._validate().passed


@pytest.mark.parametrize(
    ("given", "message"),
    [
        pytest.param(
            ["--production-model", "diabetes-ridge:3"],
            "is not azureml:MODEL:VERSION (e.g. azureml:diabetes-ridge:3)",
            id="no-azureml-prefix",
        ),
        pytest.param(
            ["--production-model", "azureml:diabetes-ridge:latest"],
            "is not azureml:MODEL:VERSION",
            id="label",
        ),
        pytest.param(
            ["--production-model", "azureml:diabetes:3"],
            "is a version of diabetes, not of diabetes-ridge, the model this pipeline registers",
            id="another-model",
        ),
        pytest.param(
            [
                "--production-model",
                "azureml:d:1",
                "--deploy",
                "-p",
                "model_name=d",
                "-p",
                "model_version=2",
            ],
            "--deploy builds no register step",
            id="deploy",
        ),
    ],
)
def test_build_refuses_a_production_model_it_cannot_bind(
    tmp_path: Path, given: list[str], message: str
) -> None:
    out = tmp_path / "pipeline.yml"
    result = invoke("pipeline", "build", "-o", str(out), *SPEC, *given)
    assert result.exit_code == 2, result.output
    assert "--production-model: " in result.output and message in " ".join(result.output.split())
    assert not out.exists()


def test_run_local_into_a_run_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    """`--run-dir` naming a file was a FileExistsError traceback, before anything ran."""
    (tmp_path / "run").write_text("")
    result = invoke("pipeline", "run-local", "--run-dir", str(tmp_path / "run"))
    assert result.exit_code == 2, result.output
    assert f"run_dir {tmp_path / 'run'}: cannot create it" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("where", "message"),
    [
        pytest.param(".", "is a folder; name the YAML file", id="a-folder"),
        pytest.param("file/pipeline.yml", "pipeline.yml: cannot write it", id="under-a-file"),
    ],
)
def test_build_to_an_unwritable_output_is_one_line(
    tmp_path: Path, where: str, message: str
) -> None:
    """`-o` naming a folder (or a path under a file) was an IsADirectoryError traceback."""
    (tmp_path / "file").write_text("")
    result = invoke("pipeline", "build", "-o", str(tmp_path / where), *SPEC)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    "deploy",
    [
        pytest.param([], id="training"),
        pytest.param(["--deploy", "-p", "model_name=d", "-p", "model_version=2"], id="deploy"),
    ],
)
def test_a_built_yaml_without_compute_is_accepted_by_job_create(
    tmp_path: Path, deploy: list[str]
) -> None:
    from azure.ai.ml import load_job

    from aml_pipelines.build import offline_client
    from aml_pipelines.errors import AzureNotConfigured

    out = tmp_path / "pipeline.yml"
    result = invoke("pipeline", "build", *deploy, "-o", str(out), *SPEC)
    assert result.exit_code == 0, result.output
    assert "default_compute: azureml:cpu-cluster" in out.read_text()  # as `pipeline submit`
    job = load_job(out)  # what `az ml job create -f` does, then its checks before any request
    assert job._validate().passed
    # The offline client's credential raises when asked for a token: reaching that point means
    # the SDK's own checks ("Compute not set", bindings) passed and it was about to send the job.
    with pytest.raises(AzureNotConfigured):
        offline_client().jobs.create_or_update(job)


def test_build_prints_a_submit_command_a_shell_can_run(tmp_path: Path) -> None:
    out = tmp_path / "my jobs" / "pipeline.yml"
    result = invoke("pipeline", "build", "-o", str(out), *SPEC)
    assert result.exit_code == 0, result.output
    command = result.output.split("submit with: ", 1)[1].split("\nnote: ")[0].strip()
    assert shlex.split(command) == ["az", "ml", "job", "create", "-f", str(out)]


def test_a_built_job_carries_the_source_commit(tmp_path: Path) -> None:
    import yaml
    from azure.ai.ml import load_job

    from components.common import source_commit

    out = tmp_path / "pipeline.yml"
    result = invoke("pipeline", "build", "-o", str(out), *SPEC)
    assert result.exit_code == 0, result.output
    commit = source_commit()  # this checkout's HEAD (+ -dirty while it has changes)
    assert commit
    jobs = yaml.safe_load(out.read_text())["jobs"]
    assert {n: j["environment_variables"] for n, j in jobs.items()} == {
        n: {"GIT_COMMIT": commit} for n in ("train", "register", "package", "rollout")
    }
    loaded = load_job(out)  # az ml job create sends it on each node
    assert loaded.jobs["register"].environment_variables == {"GIT_COMMIT": commit}


def test_deploy_pipeline_validates_and_builds(tmp_path: Path) -> None:
    validated = invoke(
        "pipeline", "validate", "--deploy", "-p", "model_name=diabetes", "-p", "model_version=2"
    )
    assert validated.exit_code == 0, validated.output
    assert "pipeline valid (offline): package → rollout" in validated.output
    out = tmp_path / "deploy.yml"
    built = invoke("pipeline", "build", "--deploy", "-o", str(out), *SPEC,
                   "-p", "model_name=diabetes", "-p", "model_version=4")  # fmt: skip
    assert built.exit_code == 0, built.output
    text = out.read_text()
    assert "path: azureml:diabetes:4" in text and "model_version: 4" in text
    assert "code: /" not in text


def test_registry_list_show_tag(tmp_path: Path) -> None:
    from aml_pipelines.registry.local import LocalRegistry

    spec = f"local:{tmp_path / 'reg'}"
    LocalRegistry(tmp_path / "reg").register(
        "m", write_model_folder(tmp_path / "src", mse=42.0), {"stage": "candidate", "mse": "42.0"}
    )
    listed = invoke("registry", "list", "--registry", spec)
    assert listed.exit_code == 0 and "candidate" in listed.output and "42" in listed.output
    tagged = invoke("registry", "tag", "m", "1", "stage=production", "--registry", spec)
    assert tagged.exit_code == 0 and '"stage": "production"' in tagged.output
    shown = invoke("registry", "show", "m", "1", "--registry", spec)
    assert shown.exit_code == 0 and '"stage": "production"' in shown.output
    missing = invoke("registry", "show", "m", "7", "--registry", spec)
    assert missing.exit_code == 2 and "version 7 not found" in missing.output
    bad = invoke("registry", "tag", "m", "1", "stage", "--registry", spec)
    assert bad.exit_code == 2 and "expected KEY=VALUE" in bad.output
    # a typo'd stage was written: every reader of `stage` then ignored the version
    typo_stage = invoke("registry", "tag", "m", "1", "stage=prod", "--registry", spec)
    assert typo_stage.exit_code == 2, typo_stage.output
    assert (
        "tag stage='prod': not a stage; one of ['archived', 'candidate', 'production', "
        "'rolled-back']" in " ".join(typo_stage.output.split())
    )
    kept = invoke("registry", "show", "m", "1", "--registry", spec).output
    assert '"stage": "production"' in kept  # nothing written
    # a value in brackets is printed as written, not taken for rich markup
    noted = invoke("registry", "tag", "m", "1", "note=[red]retrained", "--registry", spec)
    assert noted.exit_code == 0 and '"note": "[red]retrained"' in noted.output
    # an unknown model is an error, as `registry show` of it is (it said "no registered models
    # named 'other'" and exited 0, so a script could not tell a typo from an empty listing)
    other = invoke("registry", "list", "other", "--registry", spec)
    assert other.exit_code == 2, other.output
    assert f"model 'other' not found in {spec} (models: m)" in " ".join(other.output.split())
    assert invoke("registry", "show", "other", "1", "--registry", spec).exit_code == 2
    typo = invoke("registry", "list", "--registry", f"local:{tmp_path / 'none'}")
    assert typo.exit_code == 2 and "does not exist" in typo.output
    # known, but its one version withdrawn (archived in the studio): an empty listing, not an error
    LocalRegistry(tmp_path / "reg").withdraw("m", 1)
    empty = invoke("registry", "list", "m", "--registry", spec)
    assert empty.exit_code == 0, empty.output
    assert f"model 'm' has no listed version in {spec}" in " ".join(empty.output.split())
    shown = invoke("registry", "show", "m", "1", "--registry", spec)
    assert shown.exit_code == 0 and '"withdrawn": true' in shown.output


def test_registry_tag_keeps_one_production_version(tmp_path: Path) -> None:
    # Two `production` versions: every reader takes the highest, so a hand-tagged older version
    # was silently ignored by the gate, the triggers and `registry list`.
    from aml_pipelines.registry.local import LocalRegistry

    registry = LocalRegistry(tmp_path / "reg")
    for mse in (42.0, 41.0):
        registry.register("m", write_model_folder(tmp_path / str(mse), mse=mse), {"stage": "x"})
    spec = f"local:{tmp_path / 'reg'}"
    assert (
        invoke("registry", "tag", "m", "2", "stage=production", "--registry", spec).exit_code == 0
    )

    refused = invoke("registry", "tag", "m", "1", "stage=production", "--registry", spec)
    assert refused.exit_code == 2
    assert "m:2 is already tagged stage=production" in " ".join(refused.output.split())
    assert [v.stage for v in registry.list_versions("m")] == ["x", "production"]

    moved = invoke("registry", "tag", "m", "1", "stage=production", "--replace", "--registry", spec)
    assert moved.exit_code == 0, moved.output
    assert [v.stage for v in registry.list_versions("m")] == ["production", "archived"]
    assert "m:2 tags:" in moved.output


def test_registry_refuses_a_tampered_model(tmp_path: Path) -> None:
    from aml_pipelines.registry.local import LocalRegistry

    stored = LocalRegistry(tmp_path / "reg").register("m", write_model_folder(tmp_path / "s"))
    assert stored.path is not None
    (stored.path / "model.skops").write_bytes(b"evil")
    result = invoke("registry", "show", "m", "1", "--registry", f"local:{tmp_path / 'reg'}")
    assert result.exit_code == 2
    assert "m:1 is corrupted: model.skops has sha256" in " ".join(result.output.split())


@pytest.mark.parametrize(
    "model",
    [
        pytest.param("diabetes-ridge", id="one-line-per-version"),
        pytest.param("diabetes-ridge-nightly-retrain", id="long-name-folds-the-others"),
    ],
)
def test_registry_list_never_cuts_model_version_or_stage_at_80_columns(model: str) -> None:
    # At 80 columns it printed `diabete…`, `product…`, `rolled-…`: the very columns one reads.
    rows = [
        (1, "archived", "-"),
        (2, "production", "green 75%"),
        (3, "rolled-back", "-"),
        (14, "candidate", "blue 25%"),
    ]
    table = versions_table(
        (
            ModelVersion(model, version, f"uri:{version}", f"{version:07x}".ljust(64, "f"),
                         {"stage": stage, "mse": "3077.1234", "r2": "0.45123"},
                         "2026-11-29T08:05:00+00:00"),
            serving,
        )
        for version, stage, serving in rows
    )  # fmt: skip
    console = Console(width=80, file=io.StringIO(), record=True)
    console.print(table)
    text = console.export_text()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for version, stage, _ in rows:
        line = re.search(rf"^{model}  +{version}  +{stage}  .*$", text, re.MULTILINE)
        assert line, text
        if len(model) <= 14:  # the common case: only "green 75%" wraps, at its space
            assert line.group().endswith(f"{version:07x}  2026-11-29"), text


@pytest.mark.parametrize("command", ["build", "submit"])
def test_the_cli_default_compute_is_the_pipelines_default(command: str) -> None:
    from aml_pipelines.build import DEFAULT_COMPUTE

    shown = invoke("pipeline", command, "--help", env={"COLUMNS": "200"})
    assert f"[default: {DEFAULT_COMPUTE}]" in shown.output


@pytest.mark.parametrize(
    ("command", "has_deploy"),
    [
        pytest.param("validate", True, id="validate"),
        pytest.param("build", True, id="build"),
        pytest.param("submit", False, id="submit"),
        pytest.param("run-local", False, id="run-local"),
    ],
)
def test_help_mentions_deploy_only_where_the_command_has_it(command: str, has_deploy: bool) -> None:
    # Was: submit's and run-local's --param help listed the inputs "with --deploy", an option
    # neither command has.
    shown = invoke("pipeline", command, "--help", env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert ("--deploy" in shown.output) is has_deploy, shown.output


def test_registry_list_before_anything_was_registered(tmp_path: Path) -> None:
    """The default registry not created yet is empty, not an error (a named one is: a typo)."""
    for named in ("", "local"):  # unset, or the default named as such
        env = {"AML_ROLLOUT_HOME": str(tmp_path), "AML_ROLLOUT_REGISTRY": named}
        result = invoke("registry", "list", env=env)
        assert result.exit_code == 0, result.output
        # Named by its path (was "the local registry": from the wrong folder, an empty one).
        where = " ".join(result.output.split())
        assert f"no registered models in the local registry {tmp_path / 'registry'}" in where
        assert "run from the folder you registered in" in where


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks")
def test_registry_tag_replace_archives_the_holder_another_process_just_tagged(
    tmp_path: Path,
) -> None:
    # Two `registry tag M V stage=production --replace` at once both read v1 as the holder,
    # archived it and tagged their own version: two production versions. Here another process
    # (this one) promotes v2 while `registry tag m 3 ... --replace` runs.
    import subprocess
    import sys

    from aml_pipelines.registry.local import LocalRegistry
    from tests.pipelines.test_registry_local import wait_until_blocked_on

    registry = LocalRegistry(tmp_path / "reg")
    for i in (1, 2, 3):
        registry.register("m", write_model_folder(tmp_path / str(i), salt=str(i)), {"stage": "x"})
    registry.set_tags("m", 1, {"stage": "production"})
    command = ["registry", "tag", "m", "3", "stage=production", "--replace"]
    cli = None
    try:
        with registry.transaction("m"):
            cli = subprocess.Popen(
                [sys.executable, "-c", "from rollout.cli import main; main()", *command],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=Path(__file__).resolve().parents[2],
                env={**os.environ, "AML_ROLLOUT_REGISTRY": f"local:{tmp_path / 'reg'}"},
            )
            wait_until_blocked_on(registry.root / "m" / ".lock")
            registry.set_tags("m", 2, {"stage": "production"})
            registry.set_tags("m", 1, {"stage": "archived"})
        out, _ = cli.communicate(timeout=60)
    finally:
        if cli is not None and cli.poll() is None:
            cli.kill()
            cli.communicate()
    assert cli.returncode == 0, out
    assert [v.stage for v in registry.list_versions("m")] == ["archived", "archived", "production"]
    assert "m:2 tags:" in out


def test_submit_refuses_a_model_name_differing_only_in_case_before_the_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The register step refused it, in Azure, after train had run on the cluster.
    from azure.ai.ml import MLClient

    from aml_pipelines.registry.azureml import AzureMLRegistry
    from tests.fakes.arm import FakeArm, StaticCredential, iter_calls
    from tests.pipelines.conftest import existing_code_upload

    sub, rg, ws = "11111111-2222-3333-4444-555555555555", "ml-rg", "ml-ws"
    with FakeArm() as arm:
        arm.add_workspace(sub, rg, ws)
        arm.on("GET", r"^.*/codes/[^/]+/versions$", existing_code_upload)
        client = MLClient(StaticCredential(), sub, rg, ws, transport=arm.transport())
        AzureMLRegistry(client).register(
            "diabetes", "azureml://jobs/r/outputs/model", {"sha256": "ab" * 32}
        )
        monkeypatch.setattr("aml_pipelines.build.workspace_client", lambda *_: client)
        result = invoke(
            "pipeline", "submit", "--subscription", sub, "--resource-group", rg,
            "--workspace", ws, "--rollout-spec", str(EXAMPLE_SPEC), "-p", "model_name=Diabetes",
        )  # fmt: skip
        assert result.exit_code == 2, result.output
        assert "differs from the registered 'diabetes' only in case" in " ".join(
            result.output.split()
        )
        assert not list(iter_calls(arm, "PUT", r"/jobs/[^/]+$"))


@pytest.mark.parametrize("command", ["validate", "build"])
def test_the_param_help_says_deploy_requires_model_name_and_version(command: str) -> None:
    # It said "model_version (required), model_name": `validate --deploy -p model_version=1`
    # then failed with "model_name: not given".
    shown = invoke("pipeline", command, "--help", env={"COLUMNS": "200"})
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", shown.output).split())
    assert "with --deploy: model_name and model_version (required)," in text, text
    # and the pipeline does refuse each missing one
    for given in ("model_version=1", "model_name=m"):
        missing = invoke("pipeline", "validate", "--deploy", "-p", given)
        assert missing.exit_code == 2 and "not given" in missing.output, missing.output


def test_a_tag_that_moves_no_stage_is_written_beside_a_damaged_production_version(
    tmp_path: Path,
) -> None:
    # Was (since the tag transaction): `registry tag m 2 note=x` locked the model and hashed
    # every version first, and a damaged production v1 stopped it ("m:1 is corrupted").
    from aml_pipelines.registry.local import LocalRegistry

    registry = LocalRegistry(tmp_path / "reg")
    for i in (1, 2):
        registry.register("m", write_model_folder(tmp_path / str(i), salt=str(i)), {"stage": "x"})
    registry.set_tags("m", 1, {"stage": "production"})
    model_file = next(p for p in (registry.root / "m" / "1").iterdir() if p.suffix != ".json")
    model_file.write_bytes(b"tampered")
    noted = invoke("registry", "tag", "m", "2", "note=x", "--registry", f"local:{tmp_path / 'reg'}")
    assert noted.exit_code == 0, noted.output
    assert registry.get("m", 2).tags["note"] == "x"
