"""Components and pipeline, offline: every YAML loads and validates, the pipeline builds,
validates (azure-ai-ml's own checks and `MLClient.jobs.validate`) and dumps to a stable YAML."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from aml_pipelines import build as build_module
from aml_pipelines import pipeline as pipeline_module
from aml_pipelines.build import (
    dump_pipeline,
    load_validated_components,
    validate_deploy_offline,
    validate_offline,
)
from aml_pipelines.errors import ComponentError, ConfigError
from aml_pipelines.pipeline import (
    EXAMPLE_SPEC,
    STEPS,
    DeployParams,
    PipelineParams,
    build_deploy_pipeline,
    build_pipeline,
    component_path,
)

GOLDEN = Path(__file__).parent / "golden" / "pipeline.yml"
DEPLOY_GOLDEN = Path(__file__).parent / "golden" / "deploy.yml"
VERSIONS = Path(__file__).parent / "golden" / "component-versions.json"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def components() -> dict[str, object]:
    return load_validated_components()


@pytest.mark.parametrize("step", STEPS)
def test_component_yaml_loads_and_validates(step: str, components: dict[str, object]) -> None:
    raw = yaml.safe_load(component_path(step).read_text())
    assert raw["$schema"].endswith("/commandComponent.schema.json")
    assert raw["command"].startswith(f"python -m components.{step}.main")
    assert raw["environment"]["conda_file"] == "../../environment.yml"
    component = components[step]
    assert component._validate().passed  # type: ignore[attr-defined]
    assert component.name == f"aml_rollout_{step}"  # type: ignore[attr-defined]


@pytest.mark.parametrize("step", STEPS)
def test_every_option_takes_its_value_after_an_equals_sign(step: str) -> None:
    """`--opt '${{inputs.x}}'` hands argparse two words, and argparse reads a second word that
    starts with `-` (a CSV column `-y`, a tag value, `-1e-05`) as another option: the step
    fails with a usage error in Azure ML. `--opt='${{inputs.x}}'` is one word, whatever the
    value (in `$[[...]]` blocks too)."""
    command = yaml.safe_load(component_path(step).read_text())["command"]
    options = re.findall(r"--[\w-]+(?:=|\s+|$)", command)
    assert options, command
    apart = [option.strip() for option in options if not option.endswith("=")]
    assert not apart, f"components/{step}/component.yml: write {apart} as --opt=value"
    # what the rule guards against: an option, then a space, then a placeholder or quote
    assert not re.search(r"--[\w-]+\s+(?:\$\{\{|['\"])", command)


@pytest.mark.parametrize(
    ("step", "deterministic"),
    [
        # same seed and data give the same model bytes: re-using a train output is correct
        pytest.param("train", True, id="train-may-be-reused"),
        pytest.param("register", False, id="register-reads-the-production-version"),
        pytest.param("package", False, id="package-reads-the-registry"),
        pytest.param("rollout", False, id="rollout-depends-on-live-traffic"),
    ],
)
def test_steps_acting_on_live_state_are_never_reused(
    step: str, deterministic: bool, components: dict[str, object]
) -> None:
    # What the SDK sends to Azure ML (azure-ai-ml defaults is_deterministic to true, and Azure ML
    # then re-uses an earlier run's outputs when inputs, code and environment are unchanged).
    spec = components[step]._to_rest_object().properties.component_spec  # type: ignore[attr-defined]
    assert spec["is_deterministic"] is deterministic


def test_a_changed_component_gets_a_new_version() -> None:
    """Azure ML refuses to re-register a changed component under a version it already holds.

    The conda file is part of every component (its environment): a changed pin changes them all.
    """
    current = {}
    environment = (REPO / "environment.yml").read_bytes()
    for step in STEPS:
        text = component_path(step).read_text()
        current[step] = {
            "version": str(yaml.safe_load(text)["version"]),
            "sha256": hashlib.sha256(text.encode() + environment).hexdigest(),
        }
    recorded = json.loads(VERSIONS.read_text())
    if os.environ.get("UPDATE_GOLDEN"):
        VERSIONS.write_text(json.dumps(current, indent=2) + "\n")
        return
    for step in STEPS:
        if current[step]["sha256"] != recorded[step]["sha256"]:
            assert current[step]["version"] != recorded[step]["version"], (
                f"components/{step}/component.yml or environment.yml changed: bump its version"
            )
    assert current == recorded, "run with UPDATE_GOLDEN=1 after an intended change"


def test_a_broken_binding_is_reported_with_its_file(tmp_path: Path, monkeypatch) -> None:
    broken = tmp_path / "components" / "train" / "component.yml"
    broken.parent.mkdir(parents=True)
    text = component_path("train").read_text().replace("${{inputs.seed}}", "${{inputs.sead}}")
    broken.write_text(text)
    shutil.copy(REPO / "environment.yml", tmp_path / "environment.yml")
    paths = {step: component_path(step) for step in STEPS} | {"train": broken}
    monkeypatch.setattr(build_module, "component_path", paths.__getitem__)
    monkeypatch.setattr(pipeline_module, "component_path", paths.__getitem__)
    with pytest.raises(ComponentError, match=r"train/component\.yml: .*sead") as caught:
        load_validated_components()
    assert "\n" not in str(caught.value)  # one line for the CLI, not the SDK's JSON report


def test_a_component_that_does_not_load_is_one_line_naming_it_for_every_command(
    tmp_path: Path, monkeypatch
) -> None:
    # run-local, build and submit load the components without validate's wrapper: a YAML
    # error was a traceback (exit 1) through them.
    from typer.testing import CliRunner

    from rollout.cli import app

    broken = tmp_path / "components" / "train" / "component.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(component_path("train").read_text() + "a: [\n")
    paths = {step: component_path(step) for step in STEPS} | {"train": broken}
    monkeypatch.setattr(build_module, "component_path", paths.__getitem__)
    monkeypatch.setattr(pipeline_module, "component_path", paths.__getitem__)
    for command in (
        ["pipeline", "run-local", "--registry", f"local:{tmp_path / 'reg'}"],
        ["pipeline", "build", "-o", str(tmp_path / "p.yml"), "--rollout-spec", str(EXAMPLE_SPEC)],
        ["pipeline", "validate"],
    ):
        result = CliRunner().invoke(app, command, terminal_width=400)
        assert result.exit_code == 2, (command, result.output)
        assert result.output.startswith(f"error: {broken}: does not load: "), result.output
        assert result.output.count("\n") == 1, result.output


def test_pipeline_validates_offline() -> None:
    summary = validate_offline(PipelineParams(alpha=0.5))
    assert summary.nodes == ["train", "register", "package", "rollout"]
    assert summary.outputs == ["metrics", "model", "package", "registration", "rollout_result"]
    assert "rollout_spec" in summary.pipeline_inputs


def _normalise(text: str, base: Path) -> str:
    """Paths relative to the checkout, and the conda env (checked by test_environment) elided."""
    data = yaml.safe_load(text.replace(os.path.relpath(REPO, base), "<REPO>"))
    for node in data["jobs"].values():
        node["component"]["environment"] = "<environment.yml on the image in component.yml>"
    return yaml.safe_dump(data, sort_keys=False, width=100)


def _check_golden(job: object, tmp_path: Path, golden: Path) -> dict:
    out = dump_pipeline(job, tmp_path / "p.yml")
    dumped: dict = yaml.safe_load(out.read_text())
    codes = {node["component"]["code"] for node in dumped["jobs"].values()}
    assert codes == {os.path.relpath(REPO, tmp_path)}  # relative, never absolute
    assert not dumped["inputs"]["rollout_spec"]["path"].startswith(("azureml:", "/"))
    normalised = _normalise(out.read_text(), tmp_path)
    assert "environment.yml" in normalised
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(normalised)
    assert normalised == golden.read_text(), "run with UPDATE_GOLDEN=1 after an intended change"
    return dumped


def test_pipeline_dumps_to_the_golden_yaml(tmp_path: Path, components) -> None:
    dumped = _check_golden(
        build_pipeline(compute="cpu-cluster", loaded=components), tmp_path, GOLDEN
    )
    # the rollout step writes the registry tags itself (the registry follows traffic in the job)
    assert dumped["jobs"]["rollout"]["inputs"]["registry"] == {
        "path": "${{parent.inputs.registry}}"
    }


@pytest.mark.parametrize(
    "data",
    [
        pytest.param("https://acct.blob.core.windows.net/c/data/", id="https"),
        pytest.param("wasbs://c@acct.blob.core.windows.net/data/", id="wasbs"),
        pytest.param("abfss://fs@acct.dfs.core.windows.net/data/", id="abfss"),
        pytest.param("azureml://datastores/d/paths/data/", id="azureml-uri"),
        pytest.param("azureml:diabetes-csv:1", id="data-asset"),
    ],
)
def test_remote_data_is_dumped_as_submit_sends_it(tmp_path: Path, components, data: str) -> None:
    from azure.ai.ml import load_job

    job = build_pipeline(PipelineParams(data=data, target="y"), compute="c", loaded=components)
    sent = job._to_rest_object().properties.inputs["data"].uri  # what `pipeline submit` sends
    out = dump_pipeline(job, tmp_path / "p.yml")
    assert yaml.safe_load(out.read_text())["inputs"]["data"]["path"] == data
    loaded = load_job(out)  # what `az ml job create -f` sends
    assert loaded._validate().passed
    # (an asset reference is resolved to its ARM id at submission; unresolved, the two spellings
    # of the same reference differ only by the prefix)
    loaded_uri = loaded._to_rest_object().properties.inputs["data"].uri
    assert loaded_uri.removeprefix("azureml:") == sent.removeprefix("azureml:")
    assert "://" not in data or loaded_uri == data


def test_local_data_is_dumped_relative(tmp_path: Path, components) -> None:
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "d.csv").write_text("x,y\n1,2\n")
    job = build_pipeline(
        PipelineParams(data=str(tmp_path / "csv"), target="y"), compute="c", loaded=components
    )
    out = dump_pipeline(job, tmp_path / "out" / "p.yml")
    assert yaml.safe_load(out.read_text())["inputs"]["data"]["path"] == "../csv"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        pytest.param({"d.csv": "a,b,yy\n1,2,3\n"}, r"^target: column 'y' not in the CSV header "
                     r"\['a', 'b', 'yy'\]", id="typo-target"),
        pytest.param({"D.CSV": "a,yy\n1,2\n"}, r"^target: column 'y' not in the CSV header "
                     r"\['a', 'yy'\]", id="upper-case-suffix-read"),
        pytest.param({"notes.txt": "x"}, r"^data: no CSV file found at ", id="no-csv"),
        pytest.param({"d.csv": ""}, r"^data: d.csv is empty", id="empty-csv"),
    ],
)  # fmt: skip
def test_local_csv_data_the_train_step_would_refuse_is_refused_before_building(
    tmp_path: Path, components, files: dict[str, str], message: str
) -> None:
    # Was: built and submitted; the train step refused it in Azure ML minutes later.
    (tmp_path / "csv").mkdir()
    for name, text in files.items():
        (tmp_path / "csv" / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        build_pipeline(
            PipelineParams(data=str(tmp_path / "csv"), target="y"), compute="c", loaded=components
        )


def test_a_missing_local_data_folder_is_named(tmp_path: Path, components) -> None:
    # Refused when the job is built (validate, build, submit, run-local), not first when dumped
    with pytest.raises(ConfigError, match=r"^data: local path .*nope does not exist"):
        build_pipeline(
            PipelineParams(data=str(tmp_path / "nope"), target="y"), compute="c", loaded=components
        )


def test_a_local_data_file_is_refused_naming_the_folder_it_needs(
    tmp_path: Path, components
) -> None:
    # build wrote it; azure-ai-ml refuses a file for a uri_folder input when it uploads it
    (tmp_path / "d.csv").write_text("a,y\n1,2\n")
    with pytest.raises(ConfigError, match=r"^data: .*d\.csv is a file; data is a folder"):
        build_pipeline(
            PipelineParams(data=str(tmp_path / "d.csv"), target="y"), compute="c", loaded=components
        )


def _git(repo: Path, *args: str) -> str:
    import subprocess

    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(repo), "PATH": os.environ["PATH"]}  # fmt: skip
    done = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize(
    ("change", "env", "suffix"),
    [
        pytest.param(None, {}, "", id="clean"),
        pytest.param("components/x.py", {}, "-dirty", id="changed-package-file"),
        pytest.param("scoring/new.py", {}, "-dirty", id="untracked-package-file"),
        pytest.param("notes.txt", {}, "", id="change-outside-the-staged-packages"),
        pytest.param(None, {"GIT_COMMIT": "ci-build-7"}, None, id="GIT_COMMIT-wins"),
    ],
)
def test_source_commit(tmp_path: Path, change: str | None, env: dict, suffix: str | None) -> None:
    from components.common import source_commit

    (tmp_path / "components").mkdir()
    (tmp_path / "components" / "x.py").write_text("x = 1\n")
    (tmp_path / "scoring").mkdir()
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "c")
    head = _git(tmp_path, "rev-parse", "HEAD")
    if change:
        (tmp_path / change).write_text("changed\n")
    expected = "ci-build-7" if suffix is None else head + suffix
    assert source_commit(tmp_path, env) == expected


def test_no_checkout_no_commit(tmp_path: Path) -> None:
    from components.common import source_commit

    assert source_commit(tmp_path, {}) is None  # e.g. an installed package: left to the step
    # Installed into a virtualenv inside the user's own git project: not that project's HEAD.
    installed = tmp_path / ".venv" / "lib" / "site-packages"
    installed.mkdir(parents=True)
    (tmp_path / "train.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "train.py")
    _git(tmp_path, "commit", "-qm", "the user's project")
    assert source_commit(installed, {}) is None


# ---------------------------------------------------------------- the deploy pipeline


def test_deploy_pipeline_validates_offline() -> None:
    summary = validate_deploy_offline(DeployParams(model_name="diabetes", model_version=3))
    assert summary.nodes == ["package", "rollout"]
    assert set(summary.components) == {"package", "rollout"}
    assert summary.outputs == ["package", "rollout_result"]
    assert summary.pipeline_inputs == sorted(
        ["model_name", "model_version", "registered_model", "registry", "image_registry",
         "package_mode", "rollout_spec"]
    )  # fmt: skip


def test_deploy_pipeline_starts_from_a_registered_reference(tmp_path: Path, components) -> None:
    job = build_deploy_pipeline(
        DeployParams(model_name="diabetes", model_version=3),
        compute="cpu-cluster",
        loaded=components,
    )
    dumped = _check_golden(job, tmp_path, DEPLOY_GOLDEN)
    inputs = dumped["inputs"]
    assert (inputs["model_name"], inputs["model_version"]) == ("diabetes", 3)
    assert inputs["registered_model"] == {"type": "custom_model", "path": "azureml:diabetes:3"}
    package = dumped["jobs"]["package"]["inputs"]
    assert set(package) == {"model_name", "model_version", "registered_model", "registry",
                            "image_registry", "mode"}  # fmt: skip
    assert "registration" not in package and "model" not in package
    from azure.ai.ml import load_job

    assert load_job(tmp_path / "p.yml")._validate().passed  # what `az ml job create -f` does


@pytest.mark.parametrize(
    ("params", "message"),
    [
        # each would fail its step only after train (and register) ran in Azure ML
        pytest.param(PipelineParams(metric="auc"), "^metric: 'auc' is not one of", id="metric"),
        pytest.param(PipelineParams(data="https://x/d"), "^data: 'https://x/d' is given without "
                     "target; name the CSV's target column", id="data-without-target"),
        pytest.param(PipelineParams(data="https://x/d", target="it's"),
                     "^target: \"it's\" holds a single quote", id="target-with-a-quote"),
        pytest.param(PipelineParams(package_mode="cloud"), "^package_mode: 'cloud'",
                     id="package-mode"),
        pytest.param(PipelineParams(model_name="my model"), "^model name 'my model' is invalid",
                     id="model-name"),
        pytest.param(PipelineParams(test_fraction=2.0), "^test_fraction", id="test-fraction"),
        # the bundled data's 442 rows: the train step refused the split after validate/build
        pytest.param(PipelineParams(test_fraction=0.999), "^test_fraction: 0.999 leaves 0 "
                     "training and 442 held-out rows of 442", id="bundled-no-training-rows"),
        pytest.param(PipelineParams(test_fraction=0.002), "^test_fraction: 0.002 leaves 441 "
                     "training and 1 held-out rows of 442", id="bundled-one-held-out-row"),
        pytest.param(PipelineParams(alpha=-1.0), "^alpha", id="alpha"),
        pytest.param(PipelineParams(max_regression=-0.1), "^max_regression", id="max-regression"),
        pytest.param(DeployParams("m", 1, package_mode="cloud"), "^package_mode",
                     id="deploy-package-mode"),
        pytest.param(DeployParams("a/b", 1), "^model name 'a/b'", id="deploy-model-name"),
        # the package step's image reference: it failed only after train and register ran
        pytest.param(PipelineParams(image_registry="acr.io/Team"), "^image_registry: 'Team'",
                     id="image-registry"),
        pytest.param(PipelineParams(model_name="m."), "^model name 'm.' does not make an image",
                     id="model-name-no-image"),
        pytest.param(DeployParams("m", 1, image_registry="acr io"), "^image_registry: 'acr io'",
                     id="deploy-image-registry"),
    ],
)  # fmt: skip
def test_inputs_a_step_would_refuse_are_refused_before_building(
    components, params: PipelineParams | DeployParams, message: str
) -> None:
    build = build_deploy_pipeline if isinstance(params, DeployParams) else build_pipeline
    with pytest.raises(ConfigError, match=message):
        build(params, loaded=components)  # type: ignore[operator]


def test_the_bundled_row_count_checked_before_building_is_the_bundled_datas() -> None:
    from components.train.train import load_diabetes_dataset

    assert len(load_diabetes_dataset().target) == pipeline_module.BUNDLED_ROWS


def test_deploy_pipeline_refuses_a_version_below_one(components) -> None:
    with pytest.raises(ConfigError, match="model_version: 0"):
        build_deploy_pipeline(DeployParams("m", model_version=0), loaded=components)


def test_deploy_pipeline_never_guesses_the_version(components) -> None:
    # It built a pipeline deploying version 1 when no version was named.
    with pytest.raises(ConfigError, match=r"^model_version: not given.*-p model_version=V"):
        build_deploy_pipeline(DeployParams(model_name="diabetes"), loaded=components)


def test_deploy_pipeline_never_guesses_the_model(components) -> None:
    # It built a pipeline deploying the demo's `diabetes-ridge` when no model was named.
    with pytest.raises(ConfigError, match=r"^model_name: not given.*-p model_name=N"):
        build_deploy_pipeline(DeployParams(model_version=4), loaded=components)


def test_the_dumped_yaml_loads_back_as_a_valid_job(tmp_path: Path, components) -> None:
    from azure.ai.ml import load_job

    out = dump_pipeline(
        build_pipeline(compute="cpu-cluster", loaded=components), tmp_path / "p.yml"
    )
    job = load_job(out)  # what `az ml job create -f` does first
    assert job._validate().passed
    assert (
        Path(job.jobs["train"].component.base_path, job.jobs["train"].component.code).resolve()
        == REPO
    )


def _sent_modes(job: object) -> dict[tuple[str, str], str | None]:
    """Each data input of each node, with the mode the job's REST body carries for it."""
    jobs = job._to_rest_object().properties.jobs  # type: ignore[attr-defined]
    return {
        (node, name): value.get("mode")
        for node, body in jobs.items()
        for name, value in body["inputs"].items()
    }


def test_a_mode_a_component_declares_is_the_mode_the_submitted_job_sends(
    tmp_path: Path, components
) -> None:
    """Was: `mode: direct` on the register component's model_ref only; the node bound to the
    train output carried no mode (azure-ai-ml passes none down), so the submitted job named
    none and the `azureml://` URI docs/pipeline.md promises was left to the service."""
    from azure.ai.ml import load_job

    job = build_pipeline(compute="cpu-cluster", loaded=components)
    sent = _sent_modes(job)
    assert sent[("register", "model_ref")] == "Direct"
    declared = {
        (step, name): spec.mode
        for step, component in components.items()
        for name, spec in component.inputs.items()  # type: ignore[attr-defined]
        if getattr(spec, "mode", None)
    }
    assert declared == {
        ("register", "model_ref"): "direct",
        ("register", "production_model"): "ro_mount",
    }
    rest_names = {"direct": "Direct", "ro_mount": "ReadOnlyMount"}
    for (step, name), mode in declared.items():
        assert sent[(step, name)] == rest_names[mode]
    # the same for the YAML `pipeline build` writes (what `az ml job create -f` sends)
    loaded = load_job(dump_pipeline(job, tmp_path / "p.yml"))
    assert _sent_modes(loaded)[("register", "model_ref")] == "Direct"


@pytest.mark.parametrize(
    "production",
    [
        pytest.param("azureml:diabetes-ridge:3", id="this-workspace"),
        pytest.param(
            "azureml://subscriptions/s/resourcegroups/rg/workspaces/ws/models/diabetes-ridge/"
            "versions/3",
            id="another-workspace",
        ),
        pytest.param(None, id="first-release-unbound"),
    ],
)
def test_productions_version_is_the_register_steps_mounted_input(
    tmp_path: Path, components, production: str | None
) -> None:
    from azure.ai.ml import load_job

    job = build_pipeline(compute="cpu-cluster", loaded=components, production_model=production)
    assert job._validate().passed
    assert build_module.offline_client().jobs.validate(job).passed
    data = yaml.safe_load(dump_pipeline(job, tmp_path / "p.yml").read_text())
    assert data["jobs"]["register"]["inputs"]["production_model"] == {
        "mode": "ro_mount",
        "path": "${{parent.inputs.production_model}}",
    }
    if production is None:
        assert "production_model" not in data["inputs"]
        return
    assert data["inputs"]["production_model"] == {"type": "custom_model", "path": production}
    reloaded = load_job(tmp_path / "p.yml")  # what `az ml job create -f` sends
    # the SDK keeps a short asset reference without its `azureml:` prefix
    short = "://" not in production
    assert reloaded.inputs["production_model"].path == (
        production.removeprefix("azureml:") if short else production
    )
    assert reloaded._to_rest_object().properties.inputs["production_model"].job_input_type == (
        "custom_model"
    )
    assert reloaded._validate().passed


def test_the_steps_log_no_azure_http_dumps_nor_every_credential_tried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At INFO, azure-core's HTTP logging policy logged every request and response with its
    headers (each tick of the rollout step), and DefaultAzureCredential every credential it
    tried: 30 of a failed rollout step's 43 lines, before the one line that said why."""
    import logging

    from components.common import setup_logging

    names = ("azure", "azure.identity")
    levels = {name: logging.getLogger(name).level for name in names}
    try:
        with caplog.at_level(logging.INFO):
            setup_logging()
            policy = "azure.core.pipeline.policies.http_logging_policy"
            logging.getLogger(policy).info("Request URL: 'http://169.254.169.254/...'")
            logging.getLogger("azure.identity._credentials.chained").warning(
                "DefaultAzureCredential failed to retrieve a token"
            )
            logging.getLogger("azure.ai.ml").warning("an SDK warning stays")
            logging.getLogger("components.rollout").info("the step's own line stays")
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    assert [r.getMessage() for r in caplog.records] == [
        "an SDK warning stays",
        "the step's own line stays",
    ]
