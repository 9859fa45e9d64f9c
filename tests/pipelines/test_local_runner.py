"""The local runner: real component command lines as subprocesses, in dependency order."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aml_pipelines.errors import (
    ComponentError,
    ConfigError,
    ModelNotRegistered,
    RolloutNotPromoted,
    RunTerminated,
    StepFailed,
)
from aml_pipelines.local_runner import (
    _earlier_outputs,
    _execute,
    _render_value,
    _Stopper,
    _verdict,
    render_command,
    run_id,
    run_local,
)
from aml_pipelines.pipeline import STEPS, PipelineParams, component_path
from aml_pipelines.registry.base import Stage
from aml_pipelines.registry.local import LocalRegistry
from components.common import source_commit
from components.register.main import EXIT_GATE_REFUSED
from components.rollout.main import EXIT_PAUSED, EXIT_ROLLED_BACK

COMMAND = (
    "python -m x --a=${{inputs.a}} $[[--b='${{inputs.b}}']] --flag=${{inputs.f}} "
    "--out='${{outputs.o}}'"
)


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        pytest.param({"a": 1, "b": None, "f": False}, ["--a=1", "--flag=False"], id="drop"),
        pytest.param(
            {"a": 1, "b": "x y", "f": True}, ["--a=1", "--b=x y", "--flag=True"], id="keep"
        ),
        # Azure ML substitutes into the text and runs it with a shell: unquoted, a space splits
        pytest.param(
            {"a": "x y", "b": None, "f": True}, ["--a=x", "y", "--flag=True"], id="unquoted"
        ),
        # one word with its option: argparse cannot take the value for another option
        pytest.param(
            {"a": -1, "b": "-y", "f": True}, ["--a=-1", "--b=-y", "--flag=True"], id="leading-dash"
        ),
    ],
)
def test_render_command(inputs: dict[str, object], expected: list[str]) -> None:
    argv = render_command(COMMAND, inputs, {"o": Path("/out dir")})
    assert argv[0] == sys.executable and argv[1:3] == ["-m", "x"]
    assert argv[3:-1] == expected
    assert argv[-1] == "--out=/out dir"


@pytest.mark.parametrize(
    ("b", "out", "message"),
    [
        pytest.param("it's", "/o", "^b: \"it's\" holds a single quote", id="one-quote"),
        # two quotes parsed: the step got `abc` for `a'b'c`, silently
        pytest.param("a'b'c", "/o", "^b: \"a'b'c\" holds a single quote", id="two-quotes"),
        pytest.param("x", "/bob's run/o", "^output o: \"/bob's run/o\" holds a single quote",
                     id="output-folder"),
    ],
)  # fmt: skip
def test_a_value_that_breaks_the_quoting_is_one_clear_error(b: str, out: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        render_command(COMMAND, {"a": 1, "b": b, "f": True}, {"o": Path(out)})


def _azure_rendered(command: str, values: dict[str, object]) -> str:
    """The command text as Azure ML runs it: every value substituted textually, blocks kept."""
    text = re.sub(r"\$\[\[(.*?)\]\]", r"\1", command, flags=re.DOTALL)
    return re.sub(
        r"\$\{\{(?:inputs|outputs)\.(\w+)\}\}", lambda m: _render_value(values[m.group(1)]), text
    )


# A value with a space for every input and output of every component (paths included).
SPACED: dict[str, object] = {
    "model_name": "my model", "alpha": 1.0, "test_fraction": 0.2, "seed": 42,
    "data": "/data dir/csv", "target": "disease progression", "model": "/mnt/model dir",
    "metrics": "/mnt/metrics dir", "model_ref": "azureml://datastores/d/paths/a b/",
    "registry": "local:/reg dir", "metric": "mse", "max_regression": 0.0, "force": False,
    "rollout_in_job": True,
    "registration": "/mnt/reg dir", "model_version": 2, "registered_model": "/mnt/rm dir",
    "image_registry": "acr.io", "mode": "local", "package": "/mnt/pkg dir",
    "spec": "/specs/my spec.yaml", "result": "/mnt/result dir",
    "production_model": "/mnt/production dir",
}  # fmt: skip


@pytest.mark.parametrize("step", STEPS)
def test_azure_and_local_rendering_agree_on_every_argument(step: str) -> None:
    from azure.ai.ml import load_component

    component = load_component(source=component_path(step))
    values = {k: SPACED[k] for k in [*component.inputs, *component.outputs]}
    # Azure ML: the text run by a shell (here `python` is a shell function printing its argv)
    script = 'python() { printf "%s\\0" "$@"; }; ' + _azure_rendered(component.command, values)
    shell = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, check=True, timeout=30
    )
    azure_argv = shell.stdout.split("\0")[:-1]
    local_argv = render_command(
        component.command,
        {k: values[k] for k in component.inputs},
        {k: Path(str(values[k])) for k in component.outputs},
    )
    assert local_argv[1:] == azure_argv
    for name in component.inputs:  # each spaced value arrived as ONE argument, with its option
        if isinstance(values[name], str):
            assert any(arg.partition("=")[2] == values[name] for arg in azure_argv), name


def _rendered(step: str, **values: object) -> list[str]:
    """The step's argv from its component.yml, `values` over SPACED's (every input bound)."""
    from azure.ai.ml import load_component

    component = load_component(source=component_path(step))
    bound = {k: values.get(k, SPACED[k]) for k in [*component.inputs, *component.outputs]}
    return render_command(
        component.command,
        {k: bound[k] for k in component.inputs},
        {k: Path(str(bound[k])) for k in component.outputs},
    )


@pytest.mark.parametrize(
    ("step", "name", "value", "dest"),
    [
        pytest.param("train", "target", "-y", "target", id="csv-column-with-a-dash"),
        # not a negative number to argparse (no `-\d+` nor `-\d*\.\d+`): an option
        pytest.param("train", "alpha", -1e-05, "alpha", id="exponent-notation-number"),
        pytest.param("package", "model_name", "-m", "model_name", id="model-name-with-a-dash"),
        pytest.param("rollout", "registry", "-x", "registry", id="registry-with-a-dash"),
    ],
)
def test_a_value_starting_with_a_dash_reaches_the_step_as_a_value(
    step: str, name: str, value: object, dest: str
) -> None:
    """argparse, not the step's own check, would have refused it with a usage error."""
    import importlib

    parse_args = importlib.import_module(f"components.{step}.main").parse_args
    args = parse_args(_rendered(step, **{name: value})[3:])
    assert getattr(args, dest) == value


def test_the_train_step_runs_on_a_csv_whose_target_starts_with_a_dash(tmp_path: Path) -> None:
    """End to end: the real train command line, rendered as in Azure ML, run as the runner does."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [f"{i},{(i * 7) % 5},{2 * i + 1}" for i in range(40)]
    (data / "d.csv").write_text("\n".join(["x1,x2,-y", *rows]) + "\n")
    argv = _rendered(
        "train", model_name="m", data=str(data), target="-y",
        model=str(tmp_path / "model"), metrics=str(tmp_path / "metrics"),
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "model" / "model.json").read_text())["target"] == "-y"


@pytest.mark.parametrize(
    ("command", "message"),
    [
        pytest.param("run ${{inputs.zzz}}", "unknown input 'zzz'", id="unknown-input"),
        pytest.param("run ${{outputs.zzz}}", "unknown output 'zzz'", id="unknown-output"),
        pytest.param("run ${{inputs.b}}", "not bound", id="required-unbound"),
    ],
)
def test_render_command_errors(command: str, message: str) -> None:
    with pytest.raises(ComponentError, match=message):
        render_command(command, {"a": 1, "b": None}, {})


def _params(tmp_path: Path, **kwargs: object) -> PipelineParams:
    return PipelineParams(registry=f"local:{tmp_path / 'registry'}", **kwargs)  # type: ignore[arg-type]


@pytest.mark.slow
def test_v1_registered_worse_v2_refused_better_v2_registered(tmp_path: Path) -> None:
    lines: list[str] = []
    registry = LocalRegistry(tmp_path / "registry")

    first = run_local(_params(tmp_path), run_dir=tmp_path / "run1", sink=lines.append)
    assert list(first.steps) == ["train", "register", "package"]
    package = json.loads((first.output("package", "package") / "package.json").read_text())
    assert (package["model"], package["version"]) == ("diabetes-ridge", "1")
    assert registry.get("diabetes-ridge", 1).stage == Stage.CANDIDATE
    # Nothing in this run rolls it out: it is the triggers' to deliver.
    assert "rollout_by" not in registry.get("diabetes-ridge", 1).tags
    assert any(line.startswith("[train] ") and "trained diabetes-ridge" in line for line in lines)
    assert (tmp_path / "run1" / "register" / "std_log.txt").read_text().count("gate passed") == 1
    registry.set_tags("diabetes-ridge", 1, {"stage": Stage.PRODUCTION})  # v1 went live

    with pytest.raises(ModelNotRegistered) as refused:  # a StepFailed, reported as an outcome
        run_local(_params(tmp_path, alpha=10.0), run_dir=tmp_path / "run2", sink=lines.append)
    assert (refused.value.step, refused.value.exit_code) == ("register", EXIT_GATE_REFUSED)
    assert "not registered, the gate refused the model" in str(refused.value)
    assert any(line.startswith("[register] not registered (exit 3)") for line in lines)
    assert any("worse than production diabetes-ridge:1" in line for line in lines)
    assert not (tmp_path / "run2" / "package").exists()  # stopped at the first failure
    assert [v.version for v in registry.list_versions("diabetes-ridge")] == [1]
    # production's folder is bound to the step's production_model input, as Azure ML mounts it
    assert any(
        line.startswith("[register] $ ")
        and f"--production-model={registry.get('diabetes-ridge', 1).path}" in line
        for line in lines
    )

    # another seed, other held-out rows: both re-scored (production from that folder) on v2's
    # rows that v1 held out too (half the rows held out: enough of them in common)
    better = run_local(
        _params(tmp_path, alpha=0.1, seed=7, test_fraction=0.5),
        run_dir=tmp_path / "run3",
        sink=lines.append,
    )
    assert any(
        line.startswith("[register] ")
        and "production diabetes-ridge:1 and the candidate re-scored on the 44 of" in line
        for line in lines
    )
    registration = json.loads(
        (better.output("register", "registration") / "registration.json").read_text()
    )
    assert registration["version"] == 2
    v2 = registry.get("diabetes-ridge", 2)
    assert v2.sha256 == registration["sha256"]
    # better on the rows both held out (the tags were measured on other rows: not compared)
    gate = registration["gate"]
    assert gate["comparable"] is True and gate["candidate"] < gate["baseline"]
    assert v2.tags["source_run"] == f"{run_id(tmp_path / 'run3')}/register"

    # Another folder of the same name is another run: production's own model is refused. It was
    # "the same run" (`run1/register`), its v1 reused as registered by it, and rolled out again.
    with pytest.raises(ModelNotRegistered):
        run_local(
            _params(tmp_path), run_dir=tmp_path / "ci" / "run1", until="register", sink=lines.append
        )
    assert any("the candidate is production diabetes-ridge:1's own model" in x for x in lines)
    assert v2.tags["git_commit"] == source_commit()  # the checkout's, "-dirty" when it has changes


def test_a_run_id_belongs_to_its_run_folder_not_to_its_name(tmp_path: Path) -> None:
    # It was the folder's name: `/a/out` and `/b/out` were one run to the register step.
    first, second = tmp_path / "a" / "out", tmp_path / "b" / "out"
    for folder in (first, second):
        folder.mkdir(parents=True)
    ids = run_id(first), run_id(second)
    assert ids[0] != ids[1] and all(i.startswith("out-") for i in ids)
    assert (run_id(first), run_id(second)) == ids  # a re-run of a folder is the same run
    assert (first / ".run-id").read_text().strip() == ids[0]
    # a run folder from before `.run-id`: its versions' source_run named it by its name
    old = tmp_path / "c" / "out"
    (old / "register" / "registration").mkdir(parents=True)
    (old / "register" / "std_log.txt").write_text("")
    assert run_id(old) == run_id(old) == "out"
    # a project's `train/` code is not a step folder: the id was silently the folder's name
    project = tmp_path / "d" / "proj"
    (project / "train").mkdir(parents=True)
    assert run_id(project).startswith("proj-")


@pytest.mark.parametrize("name", ["run 3", " padded ", "tab\there"], ids=["space", "padded", "tab"])
@pytest.mark.parametrize("legacy", [False, True], ids=["new", "legacy"])
def test_a_run_folder_whose_name_has_whitespace_keeps_its_run_id(
    tmp_path: Path, name: str, legacy: bool
) -> None:
    # `--run-dir "run 3"` ran once: its id `run 3-<hex>` was then refused as damaged (two words).
    folder = tmp_path / name
    (folder / "train" if legacy else folder).mkdir(parents=True)
    if legacy:
        (folder / "train" / "std_log.txt").write_text("")
    first = run_id(folder)
    assert first == (name if legacy else first) and first.startswith(name)
    assert run_id(folder) == run_id(folder) == first


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param(" \n", id="blank"),
        pytest.param("out-0123456789ab\nout-ba9876543210\n", id="two-lines"),
    ],
)
def test_a_damaged_run_id_file_is_one_error_that_keeps_the_registration_link(
    tmp_path: Path, text: str
) -> None:
    (tmp_path / ".run-id").write_text(text)
    with pytest.raises(ConfigError) as refused:
        run_id(tmp_path)
    message = str(refused.value)
    assert f"{tmp_path / '.run-id'} is damaged" in message
    # Removing it gave the folder a new id: register then took a re-run for a new run.
    assert "write back" in message and "source_run" in message


def test_a_missing_data_folder_is_refused_before_any_step(tmp_path: Path) -> None:
    # It ran the train step, which failed with exit code 1 ("no CSV file found").
    with pytest.raises(ConfigError, match=r"^data: local path .*nope does not exist"):
        run_local(
            _params(tmp_path, data=str(tmp_path / "nope"), target="y"), run_dir=tmp_path / "r"
        )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param("azureml://datastores/x/paths/y", id="datastore-uri"),
        pytest.param("azureml:diabetes-csv:1", id="data-asset"),
        pytest.param("https://example.org/data.csv", id="web-url"),
    ],
)
def test_data_that_is_not_a_local_path_is_refused_before_any_step(
    tmp_path: Path, data: str
) -> None:
    # Train failed late on a mangled path: "no CSV file found at azureml:/datastores/x/paths/y".
    with pytest.raises(
        ConfigError,
        match=rf"^data: {re.escape(data)} is not a local path: run-local reads a local CSV "
        r"folder; data in Azure ML needs `pipeline submit`",
    ):
        run_local(_params(tmp_path, data=data, target="y"), run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_package_mode_azureml_with_a_local_registry_is_refused_before_any_step(
    tmp_path: Path,
) -> None:
    # The package step refused it, after train ran and register left a version behind.
    with pytest.raises(ConfigError, match=r"^package_mode: azureml has Azure ML build the image"):
        run_local(_params(tmp_path, package_mode="azureml"), run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists() and not (tmp_path / "registry").exists()


def test_until_train_runs_one_step_and_a_failure_stops_the_run(tmp_path: Path) -> None:
    only = run_local(_params(tmp_path, seed=3), run_dir=tmp_path / "r1", until="train")
    assert list(only.steps) == ["train"]
    assert (only.output("train", "model") / "model.json").is_file()

    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "d.csv").write_text("a,y\n1,2\n")
    with pytest.raises(StepFailed) as failed:
        run_local(_params(tmp_path, data=str(bad), target="y"), run_dir=tmp_path / "r2")
    assert (failed.value.step, failed.value.exit_code) == ("train", 1)
    assert "too few" in (tmp_path / "r2" / "train" / "std_log.txt").read_text()
    assert not (tmp_path / "r2" / "register").exists()


def test_a_target_column_with_a_space_trains_locally_and_as_azure_runs_it(tmp_path: Path) -> None:
    from azure.ai.ml import load_component

    data = tmp_path / "my data"
    data.mkdir()
    rows = [f"{i},{(i * 7) % 5},{2 * i + (i * 7) % 5}" for i in range(12)]
    (data / "d.csv").write_text("a,b,disease progression\n" + "\n".join(rows) + "\n")
    params = _params(tmp_path, data=str(data), target="disease progression")
    run = run_local(params, run_dir=tmp_path / "run dir", until="train")
    model = json.loads((run.output("train", "model") / "model.json").read_text())
    assert (model["target"], model["feature_names"]) == ("disease progression", ["a", "b"])

    # The same YAML as Azure ML runs it: values substituted into the text, run by a shell.
    train = load_component(source=component_path("train"))
    values = {"model_name": "m", "alpha": 1.0, "test_fraction": 0.25, "seed": 1, "data": data,
              "target": "disease progression", "model": tmp_path / "az model",
              "metrics": tmp_path / "az metrics"}  # fmt: skip
    command = _azure_rendered(train.command, values).replace("python", sys.executable, 1)
    shell = subprocess.run(
        ["bash", "-c", command],
        cwd=Path(train.base_path, train.code).resolve(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shell.returncode == 0, shell.stderr
    assert json.loads((tmp_path / "az model" / "model.json").read_text())["target"] == (
        "disease progression"
    )


def test_every_step_is_rendered_before_the_first_runs(tmp_path: Path) -> None:
    # The spec's `'` was refused at the rollout step, after train, register and package ran: v1
    # was left tagged rollout_by=pipeline-job, which the triggers skip, so nothing delivered it.
    spec = tmp_path / "it's" / "spec.yaml"
    spec.parent.mkdir()
    spec.write_text(DRY_RUN_SPEC)
    with pytest.raises(ConfigError, match=r"^spec: \".*it's/spec.yaml\" holds a single quote"):
        run_local(
            _params(tmp_path, rollout_spec=str(spec)), run_dir=tmp_path / "r", until="rollout"
        )
    assert not (tmp_path / "r" / "train").exists() and not (tmp_path / "registry").exists()


def test_run_local_reports_only_a_registration_this_run_made(tmp_path: Path) -> None:
    # `--until train` into a run folder an earlier run registered from printed that run's
    # "registered diabetes-ridge version 1", though nothing was registered; and the earlier
    # run's register/ and package/ stayed in the run folder, read as this run's outputs.
    from rollout.cli import app

    run = tmp_path / "run"
    stale = run / "register" / "registration"
    stale.mkdir(parents=True)
    (run / ".run-id").write_text("run-0123456789ab\n")
    (stale / "registration.json").write_text(
        json.dumps({"name": "diabetes-ridge", "version": 7, "sha256": "0" * 64})
    )
    (run / "package" / "package").mkdir(parents=True)
    (run / "package" / "package" / "package.json").write_text('{"version": "7"}')
    (run / "rollout" / "result").mkdir(parents=True)  # the rollout's state store: it stays
    args = ["pipeline", "run-local", "--registry", f"local:{tmp_path / 'registry'}",
            "--run-dir", str(run)]  # fmt: skip
    trained = CliRunner().invoke(app, [*args, "--until", "train"], terminal_width=400)
    assert trained.exit_code == 0, trained.output
    assert "local run complete" in trained.output and "registered" not in trained.output
    assert sorted(p.name for p in run.iterdir()) == [
        ".run-id", ".run-local.lock", "previous", "rollout", "train"
    ]  # fmt: skip
    assert (run / "previous" / "register" / "registration" / "registration.json").is_file()
    assert (run / "previous" / "package" / "package" / "package.json").is_file()
    assert f"earlier run's register, package moved to {run / 'previous'}" in trained.output

    registered = CliRunner().invoke(app, [*args, "--until", "register"], terminal_width=400)
    assert registered.exit_code == 0, registered.output
    # the run before's train/ replaces the older outputs there
    assert sorted(p.name for p in (run / "previous").iterdir()) == [".run-local", "train"]
    sha256 = LocalRegistry(tmp_path / "registry").get("diabetes-ridge", 1).sha256
    assert f"registered diabetes-ridge version 1 (sha256 {sha256})" in registered.output


def _layout(root: Path, files: list[str]) -> None:
    """Create `files` under `root` (a name ending in `/`: an empty folder)."""
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
        else:
            path.write_text("x")


RUN = [".run-id", "train/std_log.txt", "register/registration/registration.json"]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param([], [], id="empty"),
        pytest.param(RUN, ["train", "register"], id="run-folder"),
        pytest.param(["train/std_log.txt", "package/std_log.txt"], ["train", "package"],
                     id="run-folder-from-before-run-id"),
        # nothing to move: a previous/ of the user's is left alone
        pytest.param(["previous/notes.txt", "rollout/std_log.txt"], [], id="nothing-to-move"),
        pytest.param([*RUN, "previous/.run-local", "previous/notes.txt"], ["train", "register"],
                     id="marked-previous"),
        pytest.param([*RUN, "previous/package/std_log.txt"], ["train", "register"],
                     id="previous-from-before-the-mark"),
        pytest.param([*RUN, "previous/"], ["train", "register"], id="empty-previous"),
        # `--run-dir .` in a project root: its train/ code was moved, then deleted
        pytest.param(["train/my_train.py"], "holds train/ that run-local did not write",
                     id="code-folder"),
        pytest.param(["register/std_log.txt", "train/my_train.py", "package/"],
                     "holds train/, package/ that run-local did not write", id="beside-ours"),
        pytest.param([*RUN, "previous/notes.txt"],
                     "holds previous/ that run-local did not make, where the earlier run's train, "
                     "register would go", id="user-previous"),
        pytest.param([*RUN, "previous/train/my_train.py"], "holds previous/ that run-local",
                     id="user-previous-with-a-step-name"),
        pytest.param([*RUN, "previous"], "holds previous/ that run-local", id="previous-file"),
    ],
)  # fmt: skip
def test_only_run_locals_own_folders_are_moved_aside(
    tmp_path: Path, files: list[str], expected: list[str] | str
) -> None:
    _layout(tmp_path, files)
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=f"^run_dir {re.escape(str(tmp_path))} {expected}"):
            _earlier_outputs(tmp_path)
    else:
        assert _earlier_outputs(tmp_path) == expected


@pytest.mark.parametrize("fails", ["iterdir", "is_file"])
def test_an_unreadable_previous_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    # chmod does not stop root (the CI container's user): the listing (or, on Python 3.11, the
    # look for previous/'s mark: is_file() raises EACCES) fails as it would then
    _layout(tmp_path, [*RUN, "previous/train/std_log.txt"])
    real = getattr(Path, fails)

    def refused(self: Path) -> object:
        if "previous" in self.parts:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, fails, refused)
    with pytest.raises(ConfigError, match="holds previous/ that run-local did not make"):
        _earlier_outputs(tmp_path)


def test_a_project_folder_is_refused_as_run_dir_and_left_as_it_was(tmp_path: Path) -> None:
    # `run-local --run-dir .` in a project root moved its train/ code into previous/, deleting
    # the user's previous/; the next run deleted the code too.
    project = tmp_path / "proj"
    _layout(project, ["train/my_train.py", "previous/notes.txt"])
    with pytest.raises(ConfigError, match=r"holds train/ that run-local did not write"):
        run_local(_params(tmp_path), run_dir=project, until="train")
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*")) == [
        "previous",
        "previous/notes.txt",
        "train",
        "train/my_train.py",
    ]  # and no .run-id: refused again next time, not taken for a run folder


def test_a_run_folder_in_use_by_another_run_local_is_refused(tmp_path: Path) -> None:
    # Two runs in one folder interleaved: the second moved the first's live train/ aside.
    import fcntl

    run = tmp_path / "run"
    _layout(run, RUN)
    with (run / ".run-local.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        with pytest.raises(
            ConfigError, match=r"^run_dir .* is in use by another run-local \(PID 4242\)"
        ):
            run_local(_params(tmp_path), run_dir=run, until="train")
    assert (run / "train" / "std_log.txt").is_file() and not (run / "previous").exists()


@pytest.mark.parametrize(
    ("code", "message", "exit_code"),
    [
        pytest.param(1, "step 'train' failed with exit code 1", 1, id="exit-1"),
        # the OOM killer on a large CSV: it read "exit code -9" and run-local exited 247
        pytest.param(-9, "step 'train' was killed by SIGKILL (out of memory?)", 137, id="sigkill"),
        pytest.param(-15, "step 'train' was killed by SIGTERM", 143, id="sigterm"),
    ],
)
def test_a_step_killed_by_a_signal_says_so_and_exits_as_a_shell_would(
    code: int, message: str, exit_code: int
) -> None:
    failed = StepFailed("train", code)
    assert (str(failed), failed.exit_code) == (message, exit_code)


def test_std_log_holds_each_line_as_the_step_prints_it(tmp_path: Path) -> None:
    # It was block-buffered: `tail -f` of a long rollout's std_log.txt showed nothing till the end.
    log = tmp_path / "std_log.txt"
    seen: list[str] = []
    code = _execute(
        [sys.executable, "-c", "print('one'); print('two')"],
        tmp_path, os.environ, log, "train", lambda line: seen.append(log.read_text()),
    )  # fmt: skip
    assert (code, seen) == (0, ["one\n", "one\ntwo\n"])


# A step that stops on SIGTERM, as the rollout step does (lease released), after the runner got
# `signum` (a supervisor's `kill`, a CI cancel, a hang-up: to run-local alone, not its group).
STOPPABLE_STEP = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (print("stopping: lease released"), sys.exit(130)))
print("rolling out", flush=True)
os.kill(os.getppid(), {signum})
time.sleep(30)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("ignores", [False, True], ids=["stops", "ignores-it"])
def test_a_stop_signal_to_the_runner_stops_the_step_and_keeps_its_log(
    tmp_path: Path, signum: int, ignores: bool
) -> None:
    # run-local died at once (exit 143): the step ran on under PID 1, moving traffic unwatched,
    # and its std_log.txt was empty.
    script = STOPPABLE_STEP.format(signum=int(signum))
    if ignores:  # it does not stop: killed after the grace period
        script = script.replace("lambda *_: (print(\"stopping: lease released\"), sys.exit(130))",
                                "signal.SIG_IGN")  # fmt: skip
    caught: list[int] = []
    previous = signal.signal(signum, lambda s, _: caught.append(s))  # not pytest's death
    log = tmp_path / "std_log.txt"
    stopper = _Stopper(grace_s=0.2)
    try:
        with stopper.installed():
            code = _execute(
                [sys.executable, "-c", script], tmp_path, {**os.environ}, log, "rollout",
                lambda line: None, stopper,
            )  # fmt: skip
    finally:
        signal.signal(signum, previous)
    assert caught == [] and stopper.signum == signum
    if ignores:
        assert (code, stopper.killed, log.read_text()) == (-9, True, "rolling out\n")
    else:
        assert (code, stopper.killed) == (130, False)
        assert log.read_text() == "rolling out\nstopping: lease released\n"
    assert signal.getsignal(signum) is not stopper._handle  # restored on the way out


def test_an_ignored_stop_signal_stays_ignored_for_the_runner_and_its_steps(tmp_path: Path) -> None:
    # Under `nohup` SIGHUP is ignored: run-local handled it anyway, so closing the terminal
    # stopped the run (exit 129), and its steps, a handled signal being reset at exec, died of it.
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log = tmp_path / "std_log.txt"
    stopper = _Stopper()
    try:
        with stopper.installed():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stopper._handle  # not ignored: handled
            script = "import signal; print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN)"
            code = _execute(
                [sys.executable, "-c", script], tmp_path, {**os.environ}, log, "train",
                lambda line: None, stopper,
            )  # fmt: skip
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert (code, log.read_text()) == (0, "True\n")  # the step inherits the ignore


def test_a_stop_signal_between_steps_ends_the_run_at_once() -> None:
    with pytest.raises(RunTerminated) as stopped, _Stopper().installed():
        os.kill(os.getpid(), signal.SIGTERM)
    assert (str(stopped.value), stopped.value.exit_code) == ("terminated (SIGTERM)", 143)


def test_unknown_until_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="until"):
        run_local(_params(tmp_path), run_dir=tmp_path / "r", until="deploy")


DRY_RUN_SPEC = """
name: local-runner
router: {kind: memory}
metrics: {kind: simulated, seed: 5, rps: 200000}
steps: [50, 100]
analysis: {interval_s: 0.02, min_requests: 50, max_step_duration_s: 10}
stable: {model: diabetes-ridge, version: "0"}
"""


@pytest.mark.slow
def test_all_four_steps_with_a_dry_run_rollout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tmp_path / "rollout.yaml"
    # A relative path in the spec is the caller's, as for `aml-rollout rollout run|status SPEC`
    # there: the rollout step ran in the checkout and wrote routes.json into it (an installed
    # package: next to site-packages), where `rollout status` never looked.
    spec.write_text(
        DRY_RUN_SPEC.replace("{kind: memory}", "{kind: memory, state_file: routes.json}")
    )
    caller = tmp_path / "caller"
    (caller / "components").mkdir(parents=True)  # a package of the caller's, not the steps'
    (caller / "components" / "__init__.py").write_text("raise SystemExit('wrong components')\n")
    monkeypatch.chdir(caller)
    run = run_local(
        _params(tmp_path, rollout_spec=str(spec)), run_dir=tmp_path / "run", until="rollout"
    )
    assert (caller / "routes.json").is_file()
    assert list(run.steps) == ["train", "register", "package", "rollout"]
    result = json.loads((run.output("rollout", "result") / "result.json").read_text())
    assert result["phase"] == "Succeeded"
    assert result["candidate"]["model_dir"] == str(run.output("package", "package"))
    assert result["candidate"]["image"] == "amlrollout.azurecr.io/diabetes-ridge:1"
    # The run's own rollout step rolled it out: a trigger watching this registry leaves it alone.
    registered = LocalRegistry(tmp_path / "registry").get("diabetes-ridge", 1)
    assert registered.tags["rollout_by"] == "pipeline-job"


@pytest.mark.slow
def test_run_local_reports_a_rollback_as_an_outcome_not_a_crash(tmp_path: Path) -> None:
    # It printed "error: step 'rollout' failed with exit code 3" for a rollback that did its job.
    from rollout.cli import app

    spec = tmp_path / "rollout.yaml"
    spec.write_text(DRY_RUN_SPEC.replace("rps: 200000", "rps: 200000, canary: {error_rate: 0.3}"))
    result = CliRunner().invoke(
        app,
        ["pipeline", "run-local", "--until", "rollout", "--rollout-spec", str(spec),
         "--registry", f"local:{tmp_path / 'registry'}", "--run-dir", str(tmp_path / "run")],
        terminal_width=400,
    )  # fmt: skip
    assert result.exit_code == EXIT_ROLLED_BACK, result.output  # scripts still see "not promoted"
    ledger = tmp_path / "run" / "rollout" / "result" / "local-runner.ledger.jsonl"
    assert "rollout: rolled back (exit 3): rolled back at step 50 %: canary error rate" in (
        result.output
    )
    assert f"see the ledger: {ledger}" in result.output and ledger.is_file()
    assert "error:" not in result.output and "failed with exit code" not in result.output
    registry = LocalRegistry(tmp_path / "registry")
    assert registry.get("diabetes-ridge", 1).stage == Stage.ROLLED_BACK


@pytest.mark.slow
@pytest.mark.parametrize(
    ("to_group", "signum", "code", "last_line"),
    [
        pytest.param(True, signal.SIGINT, 130, "error: interrupted (Ctrl-C)", id="ctrl-c"),
        # `kill PID`, a CI cancel: run-local died at once, the step ran on unwatched under PID 1
        # and ended Paused at 50/50, its std_log.txt empty
        pytest.param(False, signal.SIGTERM, 143, "error: terminated (SIGTERM)", id="sigterm"),
    ],
)
def test_a_stopped_run_mid_rollout_says_where_the_rollout_stands(
    tmp_path: Path, to_group: bool, signum: int, code: int, last_line: str
) -> None:
    # Ctrl-C printed nothing and exited 130, or the rollout step's traceback: nothing said that
    # traffic may be split or where the rollout's state is.
    import time

    spec = tmp_path / "slow.yaml"  # never decides: too few requests for any verdict
    spec.write_text(
        DRY_RUN_SPEC.replace("rps: 200000", "rps: 1")
        .replace("min_requests: 50", "min_requests: 100000")
        # nor pauses: on a loaded machine the signal may come 10 s after "Progressing", when
        # the step pauses and ends on its own, without its "interrupted:" line
        .replace("max_step_duration_s: 10", "max_step_duration_s: 3600")
    )
    out = tmp_path / "out.txt"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rollout.cli", "pipeline", "run-local", "--until", "rollout",
             "--rollout-spec", str(spec), "--registry", f"local:{tmp_path / 'registry'}",
             "--run-dir", str(tmp_path / "run")],
            stdout=sink, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2],
            start_new_session=True,  # its own process group, as a terminal's foreground job
            # a background runner may start us with SIGINT ignored, which children inherit
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        # train, register and package first: minutes on a machine loaded by a parallel suite.
        # Signalled before the rollout step ran, the run stopped in another step and the test
        # failed on a line about the rollout that could not be there.
        deadline = time.monotonic() + 240  # below pytest-timeout's 300 s
        while "Progressing" not in out.read_text():
            assert proc.poll() is None, out.read_text()
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)  # the run and its step
                pytest.fail(f"the rollout step did not start in 240 s:\n{out.read_text()}")
            time.sleep(0.1)
        if to_group:
            os.killpg(proc.pid, signum)  # what Ctrl-C in a terminal does
        else:
            os.kill(proc.pid, signum)
        exit_code = proc.wait(timeout=60)
    text = out.read_text()
    result = tmp_path / "run" / "rollout" / "result"
    assert exit_code == code, text
    assert "[rollout] interrupted after" in text if to_group else "[rollout] stopped after" in text
    hint = f"[rollout] the rollout's state: aml-rollout rollout status {spec} --state-dir {result}"
    assert hint in text
    assert "interrupted: the rollout stopped without a verdict" in text, text
    log = (tmp_path / "run" / "rollout" / "std_log.txt").read_text()
    assert "interrupted: the rollout stopped without a verdict" in log, log  # the step's last line
    assert text.rstrip().endswith(last_line)
    assert "Traceback" not in text


def test_run_local_still_reports_a_failed_step_as_an_error(tmp_path: Path) -> None:
    from rollout.cli import app

    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "d.csv").write_text("a,y\n1,2\n")
    result = CliRunner().invoke(
        app,
        ["pipeline", "run-local", "--until", "train", "-p", f"data={bad}", "-p", "target=y",
         "--registry", f"local:{tmp_path / 'registry'}", "--run-dir", str(tmp_path / "run")],
        terminal_width=400,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "error: step 'train' failed with exit code 1" in result.output


@pytest.mark.parametrize(
    ("code", "record", "message"),
    [
        pytest.param(EXIT_ROLLED_BACK, {"reason": "5xx", "ledger": "/l.jsonl"},
                     "rollout: rolled back (exit 3): 5xx — see the ledger: /l.jsonl",
                     id="rolled-back"),
        pytest.param(EXIT_PAUSED, {"reason": "inconclusive", "ledger": "/l.jsonl"},
                     "rollout: paused for a human decision (exit 5): inconclusive — see the "
                     "ledger: /l.jsonl", id="paused"),
        pytest.param(EXIT_ROLLED_BACK, None, "rollout: rolled back (exit 3)", id="no-result"),
        pytest.param(EXIT_PAUSED, "{truncated", "rollout: paused for a human decision (exit 5)",
                     id="damaged-result"),
    ],
)  # fmt: skip
def test_a_rollout_verdict_names_the_outcome_reason_and_ledger(
    tmp_path: Path, code: int, record: object, message: str
) -> None:
    if record is not None:
        text = record if isinstance(record, str) else json.dumps(record)
        (tmp_path / "result.json").write_text(text)
    verdict = _verdict(code, tmp_path)
    assert isinstance(verdict, StepFailed)  # callers catching StepFailed still stop
    assert isinstance(verdict, RolloutNotPromoted)
    assert (verdict.step, verdict.exit_code, str(verdict)) == ("rollout", code, message)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("registry", "aml_home"),
    [
        pytest.param("local:~/reg", None, id="registry-with-a-tilde"),
        pytest.param("local", "~/aml", id="aml-rollout-home-with-a-tilde"),
    ],
)
def test_a_tilde_in_the_registry_is_the_home_folder_every_command_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: str, aml_home: str | None
) -> None:
    # Quoted (a CI YAML, a .env file, $AML_ROLLOUT_HOME) the shell leaves `~` alone: run-local
    # registered into ./~/reg while `registry list` and the triggers read $HOME/reg.
    from aml_pipelines.registry.factory import open_registry

    home, project = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    project.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(project)
    if aml_home is None:
        monkeypatch.delenv("AML_ROLLOUT_HOME", raising=False)
    else:
        monkeypatch.setenv("AML_ROLLOUT_HOME", aml_home)
    run_local(PipelineParams(registry=registry), run_dir=tmp_path / "run", until="register")
    opened = open_registry(registry, must_exist=True)  # what `registry list` and triggers open
    assert isinstance(opened, LocalRegistry) and opened.root.is_relative_to(home)
    assert [v.version for v in opened.list_versions("diabetes-ridge")] == [1]
    assert not (project / "~").exists()


def test_a_model_name_differing_only_in_case_is_refused_before_train(tmp_path: Path) -> None:
    # The register step refused it, after train had run (in Azure: on a cluster); docs say a
    # model_name the registry refuses is refused before the job is built.
    from tests.pipelines.conftest import write_model_folder

    registry = LocalRegistry(tmp_path / "registry")
    registry.register("diabetes-ridge", write_model_folder(tmp_path / "m", name="diabetes-ridge"))
    with pytest.raises(ConfigError, match="differs from the registered 'diabetes-ridge' only in"):
        run_local(_params(tmp_path, model_name="Diabetes-Ridge"), run_dir=tmp_path / "r")
    assert not (tmp_path / "r" / "train").exists()


def test_a_train_only_run_is_not_refused_for_a_case_twin(tmp_path: Path) -> None:
    # Was refused (exit 2) since the pre-flight case-twin check: `--until train` registers
    # nothing, and trained normally before it.
    from tests.pipelines.conftest import write_model_folder

    registry = LocalRegistry(tmp_path / "registry")
    registry.register("diabetes-ridge", write_model_folder(tmp_path / "m", name="diabetes-ridge"))
    run = run_local(
        _params(tmp_path, model_name="Diabetes-Ridge"), until="train", run_dir=tmp_path / "r"
    )
    assert list(run.steps) == ["train"]
