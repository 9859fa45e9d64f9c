"""`--delivery pipeline`: the trigger submits the deploy pipeline to Azure ML, exactly once.

Real azure-ai-ml calls over HTTP to the fake ARM server (tests/fakes/arm.py): the registry reads
and the job submission (components, environment, the pipeline job PUT) are the SDK's own. The
fake answers the code snapshot's lookup-by-hash with an existing upload (the first upload goes to
blob storage, out of the ARM transport's reach). What a job does once Azure ML accepted it is not
exercised here: the rollout step's tagging runs in tests/pipelines/test_rollout_component.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from aml_pipelines.azure_delivery import (
    HELD,
    JOB_TERMINAL,
    JOBS_FILE,
    NOT_FOUND,
    SUBMITTED,
    PipelineDelivery,
)
from aml_pipelines.delivery import FAILED, SUCCEEDED
from aml_pipelines.errors import ConfigError, PipelineError, TriggerError
from aml_pipelines.registry.azureml import AzureMLRegistry
from aml_pipelines.registry.base import ModelVersion
from aml_pipelines.trigger.dispatch import Dispatcher
from aml_pipelines.trigger.store import Step, TriggerStore
from aml_pipelines.trigger.watcher import Watcher
from rollout.errors import ConfigError as SpecError
from tests.fakes.arm import FakeArm, StaticCredential, iter_calls
from tests.pipelines.conftest import existing_code_upload

SUB, RG, WS = "11111111-2222-3333-4444-555555555555", "ml-rg", "ml-ws"
WS_PATH = (
    f"/subscriptions/{SUB}/resourceGroups/{RG}"
    f"/providers/Microsoft.MachineLearningServices/workspaces/{WS}"
)
SPEC_URI = "azureml://datastores/workspaceblobstore/paths/specs/rollout.yaml"
JOB_PUT = r"/workspaces/[^/]+/jobs/[^/]+$"


@pytest.fixture
def arm() -> Iterator[FakeArm]:
    with FakeArm() as fake:
        fake.add_workspace(SUB, RG, WS)
        fake.on("GET", r"^.*/codes/[^/]+/versions$", existing_code_upload)
        yield fake


@pytest.fixture
def client(arm: FakeArm) -> Any:
    from azure.ai.ml import MLClient

    return MLClient(StaticCredential(), SUB, RG, WS, transport=arm.transport())


@pytest.fixture
def registry(client: Any) -> AzureMLRegistry:
    registry = AzureMLRegistry(client)
    registry.register(
        "diabetes",
        "azureml://jobs/run-1/outputs/model",
        {"sha256": "a" * 64, "stage": "production"},
    )
    registry.register(
        "diabetes", "azureml://jobs/run-2/outputs/model", {"sha256": "b" * 64, "stage": "candidate"}
    )
    return registry


def _watcher(tmp_path: Path, client: Any, registry: AzureMLRegistry) -> Watcher:
    delivery = PipelineDelivery(
        client, SPEC_URI, tmp_path / "trigger", watched=registry, compute="cpu-cluster"
    )
    dispatcher = Dispatcher(
        TriggerStore(tmp_path / "trigger"), registry, delivery, wait_interval_s=0
    )
    return Watcher(registry, "diabetes", dispatcher, required_tags={"stage": "candidate"})


def _jobs(arm: FakeArm) -> list[tuple[str, Any]]:
    return list(iter_calls(arm, "PUT", JOB_PUT))


def _set_status(arm: FakeArm, name: str, status: str) -> None:
    job = arm.get(f"{WS_PATH}/jobs/{name}")
    assert job is not None
    job["properties"]["status"] = status
    arm.put(f"{WS_PATH}/jobs/{name}", job)


def test_a_new_version_submits_one_deploy_job_and_a_restart_none(
    tmp_path: Path, arm: FakeArm, client: Any, registry: AzureMLRegistry
) -> None:
    _watcher(tmp_path, client, registry).run(once=True)

    ((path, body),) = _jobs(arm)
    properties = body["properties"]
    assert properties["jobType"] == "Pipeline"
    assert set(properties["jobs"]) == {"package", "rollout"}
    inputs = properties["inputs"]
    assert inputs["model_name"]["value"] == "diabetes"
    assert inputs["model_version"]["value"] == "2"
    assert inputs["registered_model"]["jobInputType"] == "custom_model"
    # azure-ai-ml resolved `azureml:diabetes:2` against the workspace to the version's ARM id
    assert inputs["registered_model"]["uri"] == f"{WS_PATH}/models/diabetes/versions/2"
    assert inputs["rollout_spec"]["uri"] == SPEC_URI
    assert inputs["registry"]["value"] == "azureml"  # the job's own workspace
    job = path.rsplit("/", 1)[1]
    assert job.startswith("deploy-diabetes-v2-")

    entry = TriggerStore(tmp_path / "trigger").load("diabetes").entries[2]
    assert (entry.step, entry.outcome) == (Step.DONE, SUBMITTED)
    assert job in entry.reason  # the cursor records the submitted job (and its studio URL)
    assert (tmp_path / "trigger" / JOBS_FILE).is_file()

    _watcher(tmp_path, client, registry).run(once=True)  # restarted: nothing new
    assert len(_jobs(arm)) == 1
    # the trigger writes no tag in this mode: the job's rollout step does
    assert registry.get("diabetes", 2).stage == "candidate"


def test_a_crash_before_azure_accepted_the_job_resubmits_it_under_the_same_name(
    tmp_path: Path, arm: FakeArm, client: Any, registry: AzureMLRegistry
) -> None:
    arm.fail("PUT", JOB_PUT, 400, "UserError")  # the submission does not land
    watcher = _watcher(tmp_path, client, registry)
    with pytest.raises(PipelineError, match="submitting the pipeline failed"):
        watcher.run(once=True)
    entry = TriggerStore(tmp_path / "trigger").load("diabetes").entries[2]
    assert entry.step is Step.STARTED  # left open: resumed on the next start
    first_name = _jobs(arm)[0][0].rsplit("/", 1)[1]

    view = PipelineDelivery(
        client, SPEC_URI, tmp_path / "trigger", watched=AzureMLRegistry(client)
    ).current()
    assert view is not None and not view.active  # a job that never landed is not running

    _watcher(tmp_path, client, registry).run(once=True)
    names = [path.rsplit("/", 1)[1] for path, _ in _jobs(arm)]
    assert names == [first_name, first_name]  # one job: the name chosen before the crash
    assert arm.get(f"{WS_PATH}/jobs/{first_name}") is not None


def test_delivering_again_after_acceptance_submits_nothing(
    tmp_path: Path, arm: FakeArm, client: Any, registry: AzureMLRegistry
) -> None:
    """A crash after Azure ML accepted the job, before the cursor said `done`."""
    delivery = PipelineDelivery(
        client, SPEC_URI, tmp_path / "trigger", watched=AzureMLRegistry(client)
    )
    first = delivery.deliver(registry.get("diabetes", 2))
    again = delivery.deliver(registry.get("diabetes", 2))
    assert len(_jobs(arm)) == 1
    assert first.phase == again.phase == SUBMITTED and first.reason == again.reason


def test_the_next_version_waits_for_the_running_job(
    tmp_path: Path, arm: FakeArm, client: Any, registry: AzureMLRegistry
) -> None:
    """One rollout per endpoint: the last job counts as a running rollout until it ended."""
    delivery = PipelineDelivery(
        client, SPEC_URI, tmp_path / "trigger", watched=AzureMLRegistry(client)
    )
    assert delivery.current() is None
    delivery.deliver(registry.get("diabetes", 2))
    name = _jobs(arm)[0][0].rsplit("/", 1)[1]

    _set_status(arm, name, "Running")
    view = delivery.current()
    assert view is not None and view.active and (view.model, view.candidate) == ("diabetes", 2)
    assert name in view.reason

    _set_status(arm, name, "Completed")
    view = delivery.current()
    assert view is not None and not view.active and view.phase == SUCCEEDED
    reads = len(list(iter_calls(arm, "GET", rf"/jobs/{name}$")))
    delivery.current()  # a terminal status is remembered: Azure ML is not asked again
    assert len(list(iter_calls(arm, "GET", rf"/jobs/{name}$"))) == reads


def _completed(arm: FakeArm, registry: AzureMLRegistry, job: str) -> None:
    _set_status(arm, job, "Completed")


def _tagged_rolled_back(arm: FakeArm, registry: AzureMLRegistry, job: str) -> None:
    registry.set_tags("diabetes", 2, {"stage": "rolled-back"})  # a person settled the endpoint


@pytest.mark.parametrize(
    ("status", "polled", "release"),
    [
        # v2's job runs: v3 waits until it completed
        pytest.param("Running", r"/jobs/{job}$", _completed, id="while-the-job-runs"),
        # v2's job failed with v2 still a candidate (a rollout held for a human exits 5): v3
        # waits until a person tagged v2
        pytest.param(
            "Failed",
            r"/models/diabetes/versions/2$",
            _tagged_rolled_back,
            id="after-the-job-left-its-version-a-candidate",
        ),
    ],
)
def test_the_watcher_submits_the_next_version_only_once_the_endpoint_is_free(
    tmp_path: Path,
    arm: FakeArm,
    client: Any,
    registry: AzureMLRegistry,
    status: str,
    polled: str,
    release: Callable[[FakeArm, AzureMLRegistry, str], None],
) -> None:
    """End to end: v3 arrives while v2's delivery holds the endpoint; its job is submitted once
    the endpoint is free, and not before."""
    _watcher(tmp_path, client, registry).run(once=True)
    (first,) = [path.rsplit("/", 1)[1] for path, _ in _jobs(arm)]
    _set_status(arm, first, status)
    registry.register(
        "diabetes", "azureml://jobs/run-3/outputs/model", {"sha256": "c" * 64, "stage": "candidate"}
    )
    watcher = _watcher(tmp_path, client, registry)
    watcher.dispatcher.wait_interval_s = 0.02
    runner = threading.Thread(target=watcher.run, kwargs={"once": True})
    runner.start()
    looked = polled.format(job=first)
    try:
        deadline = time.monotonic() + 10
        while len(list(iter_calls(arm, "GET", looked))) < 4:  # it looks again and again...
            assert time.monotonic() < deadline, f"the watcher never asked for {looked}"
            time.sleep(0.01)
        assert len(_jobs(arm)) == 1  # ...and submits nothing meanwhile
        release(arm, registry, first)
        runner.join(timeout=10)
        assert not runner.is_alive()
    finally:
        watcher.dispatcher.stop.set()
        runner.join(timeout=10)
    assert [body["properties"]["inputs"]["model_version"]["value"] for _, body in _jobs(arm)] == [
        "2",
        "3",
    ]


def test_abort_is_refused_and_reconcile_writes_nothing(tmp_path: Path, client: Any) -> None:
    delivery = PipelineDelivery(
        client, SPEC_URI, tmp_path / "trigger", watched=AzureMLRegistry(client)
    )
    with pytest.raises(TriggerError, match="cannot be aborted cleanly"):
        delivery.abort("superseded by version 3")
    assert delivery.reconcile() == []


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        pytest.param("nope.yaml", ConfigError, "--spec: nope.yaml not found", id="missing-file"),
        pytest.param("BAD", SpecError, "steps", id="invalid-spec"),
    ],
)
def test_a_local_spec_is_checked_before_anything_is_submitted(
    tmp_path: Path, client: Any, spec: str, error: type[Exception], message: str
) -> None:
    if spec == "BAD":
        bad = tmp_path / "bad.yaml"
        bad.write_text(
            "name: x\nrouter: {kind: memory}\nmetrics: {kind: simulated}\nsteps: [50, 40]\n"
        )
        spec = str(bad)
    with pytest.raises(error, match=message):
        PipelineDelivery(client, spec, tmp_path / "trigger", watched=AzureMLRegistry(client))


# ------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--delivery", "pipeline", "--subscription", SUB],
                     "give --resource-group, --workspace", id="no-workspace"),
        pytest.param(["--delivery", "pipeline", "--subscription", SUB, "--resource-group", RG,
                      "--workspace", WS, "--supersede"], "--supersede needs --delivery engine",
                     id="supersede"),
        pytest.param(["--delivery", "pipeline", "--subscription", SUB, "--resource-group", RG,
                      "--workspace", WS, "--registry", "local"],
                     f"omit --registry or give azureml:{SUB}/{RG}/{WS}", id="local-registry"),
        pytest.param(["--delivery", "kubernetes"], "--delivery: 'kubernetes' is not one of",
                     id="unknown"),
    ],
)  # fmt: skip
def test_pipeline_delivery_options_are_checked(
    tmp_path: Path, args: list[str], message: str
) -> None:
    from rollout.cli import app

    argv = ["trigger", "watch", "--model", "diabetes", "--once", "--spec", SPEC_URI,
            "--state-dir", str(tmp_path / "trigger"), *args]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert isinstance(result.exception, ConfigError), result.output
    assert message in str(result.exception)
    assert not (tmp_path / "trigger").exists()  # refused before anything was written


def test_watch_with_pipeline_delivery_submits_through_the_cli(
    tmp_path: Path, arm: FakeArm, registry: AzureMLRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI wiring end to end; only the credential and the transport point at the fake."""
    from aml_pipelines import build
    from rollout.cli import app

    real = build.workspace_client
    monkeypatch.setattr(
        build,
        "workspace_client",
        lambda *a, **kw: real(*a, credential=StaticCredential(), transport=arm.transport(), **kw),
    )
    argv = ["trigger", "watch", "--model", "diabetes", "--once", "--spec", SPEC_URI,
            "--state-dir", str(tmp_path / "trigger"), "--delivery", "pipeline",
            "--subscription", SUB, "--resource-group", RG, "--workspace", WS,
            "--compute", "gpu-cluster"]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "diabetes v2: Submitted pipeline job deploy-diabetes-v2-" in result.output
    ((_, body),) = _jobs(arm)
    assert body["properties"]["settings"]["default_compute"].endswith("gpu-cluster")
    again = CliRunner().invoke(app, argv)
    assert again.exit_code == 0 and "no new version to deliver" in again.output
    assert len(_jobs(arm)) == 1


def test_the_terminal_job_statuses_are_azure_ai_mls() -> None:
    from azure.ai.ml.operations._run_history_constants import RunHistoryConstants

    assert set(JOB_TERMINAL) == {*RunHistoryConstants.TERMINAL_STATUSES, NOT_FOUND}


@pytest.mark.parametrize(
    "tags",
    [
        pytest.param({}, id="left-a-candidate"),
        # accepted through another --tag filter: the register step never tagged it a candidate.
        # Was: reported Failed, and the next version's job went onto the split endpoint.
        pytest.param({"stage": "", "approved": "yes"}, id="without-a-stage"),
    ],
)
@pytest.mark.parametrize("status", ["Failed", "NotResponding", "Paused", "Canceled"])
def test_a_job_that_stopped_without_completing_holds_the_endpoint_until_its_version_is_settled(
    tmp_path: Path,
    arm: FakeArm,
    client: Any,
    registry: AzureMLRegistry,
    status: str,
    tags: dict[str, str],
) -> None:
    """The rollout step tags the version once traffic settled (production or rolled-back); one
    not so tagged may hold traffic split (held for a human: exit 5; stopped mid-step), so the
    next version waits for a person's tag instead of being rolled out on top of it."""
    registry.set_tags("diabetes", 2, tags)
    delivery = PipelineDelivery(client, SPEC_URI, tmp_path / "trigger", watched=registry)
    delivery.deliver(registry.get("diabetes", 2))
    name = _jobs(arm)[0][0].rsplit("/", 1)[1]
    _set_status(arm, name, status)

    view = delivery.current()
    assert view is not None and view.active and view.phase == HELD
    assert f"pipeline job {name} is {status}" in view.reason
    said = "stage=candidate" if not tags else "no stage"
    assert f"diabetes v2 is not tagged production or rolled-back ({said})" in view.reason
    assert "aml-rollout registry tag diabetes 2 stage=rolled-back" in view.reason

    registry.set_tags("diabetes", 2, {"stage": "rolled-back"})  # a person settled it
    view = delivery.current()
    assert view is not None and not view.active and view.phase == FAILED


# archived: it was production and another version replaced it since (a later job's own
# rollout, or a person's `--replace`): its traffic settled long ago. Was: held for ever.
@pytest.mark.parametrize("stage", ["rolled-back", "production", "archived"])
def test_a_failed_job_whose_rollout_step_tagged_its_version_is_over(
    tmp_path: Path, arm: FakeArm, client: Any, registry: AzureMLRegistry, stage: str
) -> None:
    """Rolled back (exit 3), or a first release tagged production whatever its check said."""
    delivery = PipelineDelivery(client, SPEC_URI, tmp_path / "trigger", watched=registry)
    delivery.deliver(registry.get("diabetes", 2))
    _set_status(arm, _jobs(arm)[0][0].rsplit("/", 1)[1], "Failed")
    registry.set_tags("diabetes", 2, {"stage": stage})
    view = delivery.current()
    assert view is not None and not view.active and view.phase == FAILED


def submitted_specs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The text of each job's rollout_spec input as it is submitted (Azure ML's upload of a local
    file goes to blob storage, out of the fake ARM's reach): a list that fills as jobs go."""
    import aml_pipelines.build as build

    submitted: list[str] = []

    def submit(job: Any, ml_client: Any, *, experiment: str) -> Any:
        submitted.append(Path(job.inputs["rollout_spec"].path).read_text())
        return SimpleNamespace(studio_url="https://ml.azure.com/runs/x", status="NotStarted")

    monkeypatch.setattr(build, "submit_pipeline", submit)
    monkeypatch.setattr(PipelineDelivery, "_get_job", lambda self, name: None)
    return submitted


def test_a_local_spec_edited_while_the_trigger_runs_is_not_submitted_unchecked(
    tmp_path: Path, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: checked when the trigger started, then uploaded as it was at each submission: a typo
    # made days later went to the next job, which packaged, then failed its rollout step on the
    # spec, its version left a candidate that held the endpoint.
    spec = tmp_path / "rollout.yaml"
    good = "name: x\nrouter: {kind: memory}\nmetrics: {kind: simulated}\nsteps: [10, 100]\n"
    spec.write_text(good)
    delivery = PipelineDelivery(
        client, str(spec), tmp_path / "trigger", watched=AzureMLRegistry(client)
    )
    spec.write_text(good.replace("[10, 100]", "[50, 40]"))  # edited meanwhile
    submitted = submitted_specs(monkeypatch)
    version = ModelVersion(
        name="diabetes", version=7, uri="azureml://jobs/r/outputs/model",
        sha256="a" * 64, tags={"stage": "candidate"},
    )  # fmt: skip
    delivery.deliver(version)
    assert submitted == [good]  # the spec as checked, as the engine delivery rolls out


def test_triggers_sharing_a_state_folder_each_submit_their_own_spec(
    tmp_path: Path, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was (the first snapshot): both copied to <state-dir>/spec/rollout.yaml, the trigger started
    # last overwrote the other's: diabetes jobs went out with churn's spec.
    texts = {}
    for model in ("diabetes", "churn"):
        (tmp_path / model).mkdir()
        spec = tmp_path / model / "rollout.yaml"
        texts[model] = (
            f"name: {model}\nrouter: {{kind: memory}}\nmetrics: {{kind: simulated}}\n"
            "steps: [10, 100]\n"
        )
        spec.write_text(texts[model])
    submitted = submitted_specs(monkeypatch)
    registry = AzureMLRegistry(client)
    deliveries = {
        model: PipelineDelivery(
            client, str(tmp_path / model / "rollout.yaml"), tmp_path / "trigger", watched=registry
        )
        for model in ("diabetes", "churn")
    }
    for model, delivery in deliveries.items():
        delivery.deliver(
            ModelVersion(name=model, version=1, uri="azureml://jobs/r/outputs/model",
                         sha256="a" * 64, tags={"stage": "candidate"})
        )  # fmt: skip
    assert submitted == [texts["diabetes"], texts["churn"]]
    assert {Path(d.spec).name for d in deliveries.values()} == {"rollout.yaml"}


def test_a_state_dir_that_is_a_file_is_one_config_error(tmp_path: Path, client: Any) -> None:
    # Was (the first snapshot): a NotADirectoryError traceback, exit 1.
    spec = tmp_path / "rollout.yaml"
    spec.write_text("name: x\nrouter: {kind: memory}\nmetrics: {kind: simulated}\n")
    (tmp_path / "trigger").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"--state-dir .*trigger: cannot keep a copy of --spec"):
        PipelineDelivery(client, str(spec), tmp_path / "trigger", watched=AzureMLRegistry(client))
