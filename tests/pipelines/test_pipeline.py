"""Components and pipeline, offline: every YAML loads and validates, the pipeline builds,
validates (azure-ai-ml's own checks and `MLClient.jobs.validate`) and dumps to a stable YAML."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from aml_pipelines import build as build_module
from aml_pipelines.build import dump_pipeline, load_validated_components, validate_offline
from aml_pipelines.errors import ComponentError
from aml_pipelines.pipeline import STEPS, PipelineParams, build_pipeline, component_path

GOLDEN = Path(__file__).parent / "golden" / "pipeline.yml"
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


def test_a_broken_binding_is_reported_with_its_file(tmp_path: Path, monkeypatch) -> None:
    broken = tmp_path / "components" / "train" / "component.yml"
    broken.parent.mkdir(parents=True)
    text = component_path("train").read_text().replace("${{inputs.seed}}", "${{inputs.sead}}")
    broken.write_text(text)
    shutil.copy(REPO / "environment.yml", tmp_path / "environment.yml")
    paths = {step: component_path(step) for step in STEPS} | {"train": broken}
    monkeypatch.setattr(build_module, "component_path", paths.__getitem__)
    with pytest.raises(ComponentError, match=r"train/component\.yml: .*sead") as caught:
        load_validated_components()
    assert "\n" not in str(caught.value)  # one line for the CLI, not the SDK's JSON report


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


def test_pipeline_dumps_to_the_golden_yaml(tmp_path: Path, components) -> None:
    out = dump_pipeline(
        build_pipeline(compute="cpu-cluster", loaded=components), tmp_path / "p.yml"
    )
    dumped = yaml.safe_load(out.read_text())
    codes = {node["component"]["code"] for node in dumped["jobs"].values()}
    assert codes == {os.path.relpath(REPO, tmp_path)}  # relative, never absolute
    assert not dumped["inputs"]["rollout_spec"]["path"].startswith(("azureml:", "/"))
    normalised = _normalise(out.read_text(), tmp_path)
    assert "environment.yml" in normalised
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(normalised)
    assert normalised == GOLDEN.read_text(), "run with UPDATE_GOLDEN=1 after an intended change"


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
