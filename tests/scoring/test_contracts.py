"""Scoring against the other parts' contracts: the train component's model folder, and score.py
called the way Azure ML calls it (init() with AZUREML_MODEL_DIR, run(raw JSON string))."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from scoring import score
from scoring.model import LinearPredictor, load_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from components.train.train import TrainParams, train

    out = tmp_path_factory.mktemp("trained") / "model"
    train(out, name="diabetes", params=TrainParams())
    return out


def test_the_train_components_folder_loads_on_the_fast_path(trained: Path) -> None:
    model = load_model(trained)
    assert isinstance(model.predictor, LinearPredictor)
    meta = json.loads((trained / "model.json").read_text())
    assert model.identity.sha256 == meta["sha256"]
    rows = np.array(json.loads((trained / "sample-input.json").read_text())["data"])
    np.testing.assert_allclose(
        model.predictor.predict(rows), model.estimator.predict(rows), rtol=1e-9, atol=1e-9
    )


def test_score_py_contract(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # AML mounts a registered folder as AZUREML_MODEL_DIR/<name>
    shutil.copytree(trained, tmp_path / "diabetes")
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("AML_ROLLOUT_COLOUR", "blue")
    monkeypatch.setattr(score, "_scorer", None)
    assert score.run('{"data": [[0,0,0,0,0,0,0,0,0,0]]}') == {"error": "init() has not run"}
    score.init()
    rows = json.loads((trained / "sample-input.json").read_text())["data"][:2]
    answer = score.run(json.dumps({"data": rows}))
    assert answer["colour"] == "blue" and answer["model"] == "diabetes"
    assert len(answer["predictions"]) == 2
    json.dumps(answer)  # JSON-serialisable, as AML requires
    # without the AML server's AMLResponse, errors come back as a dict naming the problem
    assert score.run('{"data": [[1]]}') == {"error": "data[0] has 1 values, the model expects 10"}


def test_score_py_init_needs_the_model_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AZUREML_MODEL_DIR", raising=False)
    with pytest.raises(RuntimeError, match="AZUREML_MODEL_DIR"):
        score.init()
