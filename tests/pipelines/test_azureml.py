"""The Azure ML side through a fake ARM server: real azure-ai-ml calls over real HTTP.

The registry backend and pipeline submission use `MLClient(transport=FakeArmTransport)`; the SDK
serialises, sends and parses as it would against management.azure.com. What is NOT exercised:
the first-time upload of the code snapshot to blob storage (the fake answers the SDK's
lookup-by-content-hash with an existing code version, as Azure ML does when the same snapshot was
uploaded before), and anything the job does after it is accepted.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aml_pipelines.errors import (
    AzureNotConfigured,
    GateRefused,
    IntegrityError,
    ModelNotFound,
    PipelineError,
    RegistryError,
)
from aml_pipelines.registry.azureml import AzureMLRegistry
from aml_pipelines.registry.base import ModelRegistry, Stage
from aml_pipelines.registry.factory import open_registry
from tests.fakes.arm import FakeArm, StaticCredential, iter_calls
from tests.fakes.identity import AZURE_CREDENTIAL_ENV, FakeIdentityEndpoint
from tests.pipelines.conftest import MakeModel, existing_code_upload

SUB, RG, WS = "11111111-2222-3333-4444-555555555555", "ml-rg", "ml-ws"
WS_PATH = (
    f"/subscriptions/{SUB}/resourceGroups/{RG}"
    f"/providers/Microsoft.MachineLearningServices/workspaces/{WS}"
)
SHA = "ab" * 32


@pytest.fixture
def arm() -> Iterator[FakeArm]:
    with FakeArm() as fake:
        fake.add_workspace(SUB, RG, WS)
        yield fake


@pytest.fixture
def client(arm: FakeArm) -> Any:
    from azure.ai.ml import MLClient

    return MLClient(StaticCredential(), SUB, RG, WS, transport=arm.transport())


@pytest.fixture
def registry(client: Any) -> AzureMLRegistry:
    return AzureMLRegistry(client)


def test_register_get_list_tag(arm: FakeArm, registry: AzureMLRegistry) -> None:
    assert isinstance(registry, ModelRegistry)
    first = registry.register(
        "m", "azureml://jobs/run-1/outputs/model", {"sha256": SHA, "stage": "candidate"}
    )
    second = registry.register("m", "azureml://jobs/run-2/outputs/model", {"sha256": "cd" * 32})
    assert (first.version, second.version) == (1, 2)
    assert first.uri == "azureml:m:1" and first.sha256 == SHA and first.stage == Stage.CANDIDATE
    put = arm.get(f"{WS_PATH}/models/m/versions/1")
    assert put is not None
    assert put["properties"]["modelUri"] == "azureml://jobs/run-1/outputs/model"
    assert put["properties"]["properties"] == {"sha256": SHA}
    assert registry.latest("m") == registry.get("m", 2)
    assert [v.version for v in registry.list_versions("m")] == [1, 2]
    tagged = registry.set_tags("m", 1, {"stage": Stage.PRODUCTION})
    assert tagged.tags["stage"] == "production" and tagged.sha256 == SHA
    assert [v.version for v in registry.find_by_tag("m", "stage", "production")] == [1]
    assert registry.names() == ["m"]
    with pytest.raises(ModelNotFound, match="get m:9: not found"):
        registry.get("m", 9)


@pytest.mark.parametrize(
    ("source", "tags", "message"),
    [
        pytest.param("/tmp/model", {"sha256": SHA}, "not '/tmp/model'", id="local-path"),
        pytest.param("azureml://jobs/r/outputs/model", {}, "sha256", id="no-sha256"),
    ],
)
def test_refuses_local_uploads_and_unhashed_models(
    arm: FakeArm, registry: AzureMLRegistry, source: str, tags: dict[str, str], message: str
) -> None:
    with pytest.raises(RegistryError, match=message):
        registry.register("m", source, tags)
    assert not list(iter_calls(arm, "PUT", "/models/"))


def test_a_tampered_sha256_tag_is_refused(arm: FakeArm, registry: AzureMLRegistry) -> None:
    registry.register("m", "azureml://jobs/r/outputs/model", {"sha256": SHA})
    stored = arm.get(f"{WS_PATH}/models/m/versions/1")
    assert stored is not None
    stored["properties"]["tags"]["sha256"] = "0" * 64
    arm.put(f"{WS_PATH}/models/m/versions/1", stored)
    with pytest.raises(IntegrityError, match="disagrees with the immutable property"):
        registry.get("m", 1)


def test_a_tampered_sha256_tag_can_be_removed_with_the_cli(
    arm: FakeArm, registry: AzureMLRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`registry tag m 1 sha256=` is the repair: its check of the version first refused it."""
    from typer.testing import CliRunner

    from rollout.cli import app

    registry.register("m", "azureml://jobs/r/outputs/model", {"sha256": SHA, "stage": "production"})
    monkeypatch.setattr("aml_pipelines.cli._open", lambda spec, **_: registry)
    runner = CliRunner()
    refused = runner.invoke(app, ["registry", "tag", "m", "1", f"sha256={SHA.upper()}"])
    assert refused.exit_code == 2, refused.output
    assert "m:1: tag sha256=ABAB" in refused.output and "is not its sha256" in refused.output
    assert registry.get("m", 1).tags == {"sha256": SHA, "stage": "production"}  # not written

    stored = arm.get(f"{WS_PATH}/models/m/versions/1")
    assert stored is not None
    stored["properties"]["tags"]["sha256"] = "0" * 64  # written in the studio, or by an old release
    arm.put(f"{WS_PATH}/models/m/versions/1", stored)
    repaired = runner.invoke(app, ["registry", "tag", "m", "1", "sha256="])
    assert repaired.exit_code == 0, repaired.output
    assert registry.get("m", 1).tags == {"stage": "production"}


def _foreign(arm: FakeArm, version: str, **tags: str) -> None:
    """A version registered outside aml-rollout (studio, `az ml model create`): no sha256."""
    arm.put(
        f"{WS_PATH}/models/m/versions/{version}",
        {"properties": {"modelUri": "azureml://datastores/d/paths/m", "tags": tags}},
    )
    arm._refresh_container(f"{WS_PATH}/models/m")


def test_listings_skip_versions_not_registered_by_aml_rollout(
    arm: FakeArm, registry: AzureMLRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    registry.register(
        "m", "azureml://jobs/r1/outputs/model", {"sha256": SHA, "stage": "production"}
    )
    registry.register("m", "azureml://jobs/r2/outputs/model", {"sha256": SHA, "stage": "candidate"})
    _foreign(arm, "3", note="manual")
    _foreign(arm, "4-hotfix", stage="candidate")
    for _ in range(2):
        assert [v.version for v in registry.list_versions("m")] == [1, 2]
        latest = registry.latest("m")
        assert latest is not None and latest.version == 2
        assert [v.version for v in registry.find_by_tag("m", "stage", "candidate")] == [2]
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 2  # once per version, not once per listing
    assert any("m:3 has no sha256 property" in message for message in skipped)
    with pytest.raises(IntegrityError, match="not registered by aml-rollout"):
        registry.get("m", 3)  # strict where a version is asked for by name
    ours = registry.register("m", "azureml://jobs/r5/outputs/model", {"sha256": SHA})
    assert ours.version == 4  # the foreign version 3 is skipped in listings, never reused


def test_a_foreign_production_version_is_not_hidden(
    arm: FakeArm, registry: AzureMLRegistry
) -> None:
    # Hiding it would make the gate pass any candidate and let old versions replace it.
    registry.register("m", "azureml://jobs/r1/outputs/model", {"sha256": SHA})
    _foreign(arm, "2", stage="production")
    with pytest.raises(IntegrityError, match="m:2 has no sha256 property"):
        registry.find_by_tag("m", "stage", "production")


def test_a_version_taken_concurrently_is_skipped(arm: FakeArm, registry: AzureMLRegistry) -> None:
    def competitor(
        fake: FakeArm, match: re.Match[str], body: Any, query: Any
    ) -> tuple[int, Any, dict]:
        # another process registers version 1 first; Azure ML then refuses our PUT of version 1
        fake.put(
            match.group(0),
            {
                "properties": {
                    "modelUri": "azureml://jobs/other/outputs/m",
                    "properties": {"sha256": "ef" * 32},
                }
            },
        )
        fake._refresh_container(match.group(0).rsplit("/versions/", 1)[0])
        return 409, {"error": {"code": "Conflict", "message": "version exists"}}, {}

    arm.on("PUT", r"^.*/models/m/versions/1$", competitor)
    ours = registry.register("m", "azureml://jobs/ours/outputs/model", {"sha256": SHA})
    assert ours.version == 2 and ours.sha256 == SHA
    assert registry.get("m", 1).sha256 == "ef" * 32


def test_a_version_archived_in_the_studio_is_never_reused(
    arm: FakeArm, client: Any, registry: AzureMLRegistry
) -> None:
    # Azure ML hides archived versions from a listing unless asked (azure-ai-ml's
    # models.list defaults to ListViewType.ACTIVE_ONLY): allocating from that listing picked
    # the archived latest version's number again, which Azure ML refuses (409), every time.
    for run in (1, 2):
        registry.register("m", f"azureml://jobs/run-{run}/outputs/model", {"sha256": SHA})
    client.models.archive("m", "2")  # what the studio's Archive does
    assert [m.version for m in client.models.list(name="m")] == ["1"]  # the fake hides it too

    before = len(arm.calls)
    third = registry.register("m", "azureml://jobs/run-3/outputs/model", {"sha256": SHA})
    assert third.version == 3
    views = [
        q.get("listViewType")
        for m, p, q, _ in arm.calls[before:]
        if m == "GET" and p.endswith("/models/m/versions")
    ]
    assert views[0] == ["All"], views


def test_a_production_version_archived_in_the_studio_is_still_found(
    client: Any, registry: AzureMLRegistry
) -> None:
    # Archived (a studio clean-up) it still serves: hidden from find_by_tag, the gate passed any
    # candidate and the triggers rolled out versions older than it.
    registry.register(
        "m", "azureml://jobs/r1/outputs/model", {"sha256": SHA, "stage": "production"}
    )
    registry.register("m", "azureml://jobs/r2/outputs/model", {"sha256": SHA, "stage": "candidate"})
    client.models.archive("m", "1")
    assert [v.version for v in registry.find_by_tag("m", "stage", "production")] == [1]
    # Listings stay active-only: a candidate withdrawn in the studio is not picked up.
    client.models.archive("m", "2")
    assert registry.list_versions("m") == []
    assert registry.latest("m") is None


def test_concurrent_registrations_get_distinct_versions(client: Any) -> None:
    results: list[int] = []

    def register(i: int) -> None:
        reg = AzureMLRegistry(client, max_attempts=20)
        results.append(
            reg.register("m", f"azureml://jobs/r{i}/outputs/model", {"sha256": SHA}).version
        )

    threads = [threading.Thread(target=register, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == [1, 2, 3, 4]


def test_the_register_gate_runs_against_azure(
    registry: AzureMLRegistry, make_model: MakeModel, tmp_path: Path
) -> None:
    from components.register.register import register_model

    first = register_model(make_model(mse=10.0), registry, source="azureml://jobs/a/outputs/model")
    assert first.version.version == 1
    registry.set_tags("m", 1, {"stage": Stage.PRODUCTION})
    with pytest.raises(GateRefused, match="worse than production m:1"):
        register_model(make_model(mse=11.0), registry, source="azureml://jobs/b/outputs/model")
    better = register_model(
        make_model(mse=9.0), registry, source="azureml://jobs/c/outputs/model", out_dir=tmp_path
    )
    assert better.version.version == 2 and better.version.tags["gate_baseline"] == "m:1"
    assert (tmp_path / "registration.json").read_text().count('"uri": "azureml:m:2"') == 1


@pytest.mark.parametrize(
    ("spec", "env", "message"),
    [
        pytest.param(
            "azureml:only-two/parts", {}, "must be azureml:SUBSCRIPTION", id="bad-coordinates"
        ),
        pytest.param("azureml", {}, "AZUREML_ARM_SUBSCRIPTION", id="not-in-a-job"),
    ],
)
def test_factory_azure_errors(spec: str, env: dict[str, str], message: str, monkeypatch) -> None:
    for var in (
        "AZUREML_ARM_SUBSCRIPTION",
        "AZUREML_ARM_RESOURCEGROUP",
        "AZUREML_ARM_WORKSPACE_NAME",
    ):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(AzureNotConfigured, match=message):
        open_registry(spec)


def test_factory_uses_a_given_client(client: Any) -> None:
    assert isinstance(open_registry("azureml", ml_client=client), AzureMLRegistry)


# ---------------------------------------------------------------------------------- submission


def test_submit_sends_the_pipeline_job(arm: FakeArm, client: Any) -> None:
    from aml_pipelines.build import submit_pipeline
    from aml_pipelines.pipeline import PipelineParams, build_pipeline
    from components.common import source_commit

    arm.on("GET", r"^.*/codes/[^/]+/versions$", existing_code_upload)
    spec = "azureml://datastores/workspaceblobstore/paths/specs/rollout.yaml"
    job = build_pipeline(PipelineParams(alpha=0.5, rollout_spec=spec), compute="cpu-cluster")
    submitted = submit_pipeline(job, client, experiment="exp")
    assert submitted.name and submitted.studio_url

    jobs = list(iter_calls(arm, "PUT", r"/jobs/[^/]+$"))
    assert len(jobs) == 1
    properties = jobs[0][1]["properties"]
    assert properties["jobType"] == "Pipeline" and properties["experimentName"] == "exp"
    assert properties["inputs"]["alpha"]["value"] == "0.5"
    assert properties["inputs"]["rollout_spec"]["uri"] == spec
    assert set(properties["jobs"]) == {"train", "register", "package", "rollout"}
    # the steps run in a snapshot without .git: the submitting checkout's commit goes with them
    commit = source_commit()
    assert commit and all(
        node["environment_variables"] == {"GIT_COMMIT": commit}
        for node in properties["jobs"].values()
    )
    components = [body for _, body in iter_calls(arm, "PUT", r"/components/[^/]+/versions/")]
    commands = {c["properties"]["componentSpec"]["command"].split()[2] for c in components}
    assert commands == {f"components.{s}.main" for s in ("train", "register", "package", "rollout")}
    # the code snapshot holds the packages only: hashing it must not walk the whole checkout
    assert all(
        c["properties"]["componentSpec"]["code"].startswith("azureml:/subscriptions/")
        for c in components
    )


def test_submit_reports_azure_errors_in_one_line(arm: FakeArm, client: Any) -> None:
    from aml_pipelines.build import submit_pipeline
    from aml_pipelines.pipeline import PipelineParams, build_pipeline

    arm.on("GET", r"^.*/codes/[^/]+/versions$", existing_code_upload)
    arm.fail("PUT", r"/jobs/[^/]+$", 400, "UserError: compute cpu-cluster not found")
    spec = "azureml://datastores/d/paths/s.yaml"
    job = build_pipeline(PipelineParams(rollout_spec=spec), compute="cpu-cluster")
    with pytest.raises(PipelineError, match="submitting the pipeline failed") as caught:
        submit_pipeline(job, client)
    assert "compute cpu-cluster not found" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_job_the_sdk_refuses_says_why_in_one_line(arm: FakeArm, client: Any) -> None:
    """azure-ai-ml's own validation comes as a JSON document: not 'failed: {'."""
    from aml_pipelines.build import submit_pipeline
    from aml_pipelines.pipeline import PipelineParams, build_pipeline

    arm.on("GET", r"^.*/codes/[^/]+/versions$", existing_code_upload)
    job = build_pipeline(PipelineParams(rollout_spec="azureml://datastores/d/paths/s.yaml"))
    with pytest.raises(PipelineError) as caught:
        submit_pipeline(job, client)  # no compute
    assert str(caught.value).startswith(
        "submitting the pipeline failed: jobs.train.compute: Compute not set; "
    )
    assert "\n" not in str(caught.value)


def test_submit_with_credentials_azure_rejects_says_so(arm: FakeArm, client: Any) -> None:
    """A token ARM refuses (expired, another tenant) is not 'no credentials found'."""
    from aml_pipelines.build import submit_pipeline
    from aml_pipelines.pipeline import PipelineParams, build_pipeline

    arm.on("GET", r"^.*/codes/[^/]+/versions$", existing_code_upload)
    arm.fail("PUT", r"/jobs/[^/]+$", 401, "InvalidAuthenticationTokenTenant")
    spec = "azureml://datastores/d/paths/s.yaml"
    job = build_pipeline(PipelineParams(rollout_spec=spec), compute="cpu-cluster")
    with pytest.raises(PipelineError) as caught:
        submit_pipeline(job, client)
    message = str(caught.value)
    assert message.startswith("submitting the pipeline failed: Azure rejected the credentials")
    assert "InvalidAuthenticationTokenTenant" in message and "found none" not in message
    assert "\n" not in message


def test_submit_without_credentials_says_so(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from aml_pipelines.pipeline import EXAMPLE_SPEC
    from rollout.cli import app

    for var in AZURE_CREDENTIAL_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached az / token-cache accounts
    monkeypatch.setenv("PATH", "/nonexistent")  # no az, pwsh or azd to ask
    # developer credentials only: never probe a managed-identity endpoint (CI runs on cloud VMs)
    monkeypatch.setenv("AZURE_TOKEN_CREDENTIALS", "dev")
    result = CliRunner().invoke(app, ["pipeline", "submit", "--subscription", SUB,
                                      "--resource-group", RG, "--workspace", WS,
                                      "--rollout-spec", str(EXAMPLE_SPEC)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "no usable Azure credentials" in result.output and "az login" in result.output


def test_package_in_azureml_mode_asks_azure_to_build_the_image(
    arm: FakeArm, client: Any, registry: AzureMLRegistry, tmp_path: Path
) -> None:
    from components.package.package import build_package
    from components.train.train import TrainParams, train

    def package_action(fake: FakeArm, path: str, body: Any) -> dict[str, Any]:
        environment = body["targetEnvironmentId"]
        name = environment.rsplit("/environments/", 1)[1]
        fake.put(f"{WS_PATH}/environments/{name}/versions/1", {"properties": {"image": "img"}})
        return {"targetEnvironmentId": f"{environment}/versions/1"}

    arm.on("GET", r"^.*/codes/[^/]+/versions$", existing_code_upload)
    arm.lro(r"/models/[^/]+/versions/[^/]+/package$", polls=2, result=package_action)
    trained = train(tmp_path / "model", name="m", params=TrainParams())
    version = registry.register("m", "azureml://jobs/r/outputs/model", {"sha256": trained.sha256})
    result = build_package(
        version, tmp_path / "pkg", image_registry="acr.io", model_dir=tmp_path / "model",
        mode="azureml", ml_client=client,
    )  # fmt: skip
    assert result.manifest["azureml_environment"] == "m-serving:1"
    ((_, request),) = iter_calls(arm, "POST", r"/models/m/versions/1/package$")
    server = request["inferencingServer"]
    assert server["serverType"] == "AzureMLOnline"
    assert server["codeConfiguration"]["scoringScript"] == "score.py"
    assert (tmp_path / "pkg" / "score.py").is_file()


# ---------------------------------------------------------------------------------- identity

CLIENT_ID = "11111111-2222-3333-4444-555555555555"


@pytest.mark.parametrize("variable", ["DEFAULT_IDENTITY_CLIENT_ID", "AZURE_CLIENT_ID"])
def test_the_steps_ask_azure_ml_for_the_user_assigned_identity(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """The rule itself is tested in tests/routers/test_azureml.py; this is the pipelines' use."""
    from aml_pipelines.build import workspace_client

    for name in AZURE_CREDENTIAL_ENV:
        monkeypatch.delenv(name, raising=False)
    with FakeIdentityEndpoint() as identity:
        monkeypatch.setenv("MSI_ENDPOINT", identity.url)
        monkeypatch.setenv("MSI_SECRET", "s")
        monkeypatch.setenv(variable, CLIENT_ID)
        client = workspace_client(SUB, RG, WS)
        client._credential.get_token("https://management.azure.com/.default")
    assert identity.client_ids() == [CLIENT_ID]


def test_an_azure_ml_error_answer_is_one_line(arm: FakeArm, registry: AzureMLRegistry) -> None:
    # azure-core's message for an ARM error is "(Code) message\nCode: ...\nMessage: ...".
    arm.fail("GET", r"/models/m/versions/3$", 400, "UserError")
    with pytest.raises(RegistryError) as caught:
        registry.get("m", 3)
    message = str(caught.value)
    assert message.startswith("get m:3: Azure ML answered 400: (UserError) injected failure")
    assert "\n" not in message


class _JobsRefusing:
    """`ml_client.jobs` whose create_or_update fails as azure-ai-ml fails a job it cannot resolve:
    its own formatter colours the text (a ValidationException becomes an MlException)."""

    def create_or_update(self, job: Any, **kwargs: Any) -> Any:
        from azure.ai.ml._exception_helper import log_and_raise_error
        from azure.ai.ml.exceptions import (
            ErrorCategory,
            ErrorTarget,
            ValidationErrorType,
            ValidationException,
        )

        log_and_raise_error(
            ValidationException(
                message="the compute 'gpu-cluster' does not exist",
                no_personal_data_message="compute not found",
                target=ErrorTarget.JOB,
                error_category=ErrorCategory.USER_ERROR,
                error_type=ValidationErrorType.RESOURCE_NOT_FOUND,
            )
        )


def test_a_coloured_sdk_error_is_one_plain_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its first line is a colour code alone: the error was 'failed: ' and a coloured terminal."""
    from types import SimpleNamespace

    from aml_pipelines import build
    from aml_pipelines.pipeline import PipelineParams, build_pipeline

    monkeypatch.setattr(build, "stage_code", lambda job, folder: None)
    job = build_pipeline(PipelineParams(rollout_spec="azureml://datastores/d/paths/s.yaml"))
    with pytest.raises(PipelineError) as caught:
        build.submit_pipeline(job, SimpleNamespace(jobs=_JobsRefusing()))
    assert str(caught.value) == (
        "submitting the pipeline failed: 1) Resource was not found. "
        "Details: (x) the compute 'gpu-cluster' does not exist"
    )


@pytest.mark.parametrize("production", [2, None], ids=["production-bound", "first-release"])
def test_the_submitted_job_mounts_productions_files_for_the_gate(
    arm: FakeArm, client: Any, registry: AzureMLRegistry, production: int | None
) -> None:
    """The register step gets production's version as a custom_model input Azure ML mounts:
    the registry downloads nothing, and the gate needs the files to re-score production."""
    from aml_pipelines.build import production_model_uri, submit_pipeline
    from aml_pipelines.pipeline import PipelineParams, build_pipeline

    arm.on("GET", r"^.*/codes/[^/]+/versions$", existing_code_upload)
    for run in ("run-1", "run-2", "run-3"):
        registry.register("diabetes", f"azureml://jobs/{run}/outputs/model", {"sha256": SHA})
    if production is not None:
        registry.set_tags("diabetes", production, {"stage": Stage.PRODUCTION})

    uri = production_model_uri("azureml", "diabetes", ml_client=client)
    assert uri == (f"azureml:diabetes:{production}" if production else None)
    spec = "azureml://datastores/workspaceblobstore/paths/specs/rollout.yaml"
    params = PipelineParams(model_name="diabetes", rollout_spec=spec)
    job = build_pipeline(params, compute="cpu-cluster", production_model=uri)
    submit_pipeline(job, client, experiment="exp")

    [(_, body)] = iter_calls(arm, "PUT", r"/jobs/[^/]+$")
    properties = body["properties"]
    register_inputs = properties["jobs"]["register"]["inputs"]
    # bound to the pipeline input either way, as train's optional data: an input with no value
    # is left out of the step's command ($[[...]])
    assert register_inputs["production_model"]["value"] == "${{parent.inputs.production_model}}"
    assert register_inputs["production_model"]["mode"] == "ReadOnlyMount"
    if production is None:
        assert "production_model" not in properties["inputs"]
        return
    # azure-ai-ml resolved azureml:diabetes:N to the version's ARM id, read from the workspace
    assert properties["inputs"]["production_model"] == {
        "uri": f"{WS_PATH}/models/diabetes/versions/{production}",
        "jobInputType": "custom_model",
    }


def test_a_registry_in_another_workspace_binds_its_model_uri(
    arm: FakeArm, client: Any, registry: AzureMLRegistry, monkeypatch
) -> None:
    from aml_pipelines.build import production_model_uri
    from aml_pipelines.registry import factory

    registry.register("diabetes", "azureml://jobs/run-1/outputs/model", {"sha256": SHA})
    registry.set_tags("diabetes", 1, {"stage": Stage.PRODUCTION})
    monkeypatch.setattr(
        factory, "open_registry", lambda spec, **kwargs: registry if spec.endswith(WS) else None
    )
    uri = production_model_uri(f"azureml:{SUB}/{RG}/{WS}", "diabetes", ml_client=None)
    assert uri == (
        f"azureml://subscriptions/{SUB}/resourcegroups/{RG}/workspaces/{WS}/models/diabetes/"
        "versions/1"
    )
    assert production_model_uri("local:/tmp/reg", "diabetes", ml_client=client) is None
    # azure-ai-ml takes that URI for a custom_model input: the job it builds validates offline
    from aml_pipelines.build import offline_client
    from aml_pipelines.pipeline import PipelineParams, build_pipeline

    job = build_pipeline(
        PipelineParams(model_name="diabetes"), compute="cpu-cluster", production_model=uri
    )
    assert job.inputs["production_model"]._data.path == uri
    result = offline_client().jobs.validate(job)
    assert result.passed, result.error_messages


def test_azure_ml_out_of_reach_is_a_registry_error(
    registry: AzureMLRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that fails is no HTTP answer: it was a bare azure-core error, which the
    webhook did not take for a registry it cannot read (a 500 with a traceback)."""
    from azure.core.exceptions import ServiceRequestError

    def unreachable(**_: Any) -> Any:
        raise ServiceRequestError(
            "<urllib3.connection.HTTPSConnection>: Failed to establish a new connection: "
            "[Errno 111] Connection refused"
        )

    monkeypatch.setattr(registry.ml_client.models, "list", unreachable)
    with pytest.raises(
        RegistryError, match=r"^list m: cannot reach Azure ML \(.*Connection refused\)$"
    ):
        registry.withdrawn("m")


def test_production_restored_between_two_listings_is_still_found(
    client: Any, registry: AzureMLRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version archived or restored in the studio while find_by_tag lists is found once:
    membership comes from one listing of every version, not from two views read apart."""
    registry.register(
        "m", "azureml://jobs/r1/outputs/model", {"sha256": SHA, "stage": "production"}
    )
    client.models.archive("m", "1")
    real_list = client.models.list
    listings = 0

    def restored_after_the_first(**kwargs: Any) -> Any:
        nonlocal listings
        found = list(real_list(**kwargs))
        listings += 1
        if listings == 1:
            client.models.restore("m", "1")  # a person's Restore in the studio, meanwhile
        return found

    monkeypatch.setattr(client.models, "list", restored_after_the_first)
    assert [v.version for v in registry.find_by_tag("m", "stage", "production")] == [1]


def test_a_tag_write_that_cannot_archive_again_says_so(
    client: Any, registry: AzureMLRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tag PUT restores an archived version; a retry would see it restored and leave it so."""
    registry.register("m", "azureml://jobs/r1/outputs/model", {"sha256": SHA, "stage": "candidate"})
    client.models.archive("m", "1")

    def refused(name: str, version: int) -> None:
        raise RegistryError(f"archive {name}:{version}: Azure ML answered 503: try again later")

    monkeypatch.setattr(registry, "_archive", refused)
    said = (
        r"m:1 was archived in the studio; writing its tags restored it .* 503: try again "
        r"later\): archive it again in the studio"
    )
    with pytest.raises(RegistryError, match=said):
        registry.set_tags("m", 1, {"stage": "rolled-back"})
