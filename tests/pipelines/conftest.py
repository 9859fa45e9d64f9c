"""Shared fixtures: tiny model folders that follow the contract without training anything."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

MakeModel = Callable[..., Path]


def write_model_folder(
    folder: Path,
    *,
    name: str = "m",
    mse: float = 100.0,
    salt: str = "",
    data_fingerprint: str = "sha256:fixture",
    eval_fingerprint: str | None = None,
) -> Path:
    """A model folder with a fake model file: registry and gate tests need no sklearn."""
    folder.mkdir(parents=True, exist_ok=True)
    blob = f"model-bytes {name} {mse} {salt}".encode()
    (folder / "model.skops").write_bytes(blob)
    manifest = {
        "name": name,
        "framework": "sklearn",
        "estimator": "Ridge",
        "model_file": "model.skops",
        "sha256": hashlib.sha256(blob).hexdigest(),
        "feature_names": ["a", "b"],
        "target": "y",
        "metrics": {"mse": mse, "rmse": mse**0.5, "r2": 0.5},
        "data_fingerprint": data_fingerprint,
        "library_versions": {},
        "params": {"alpha": 1.0, "test_fraction": 0.2, "seed": 1},
    }
    if eval_fingerprint is not None:
        manifest["eval_fingerprint"] = eval_fingerprint
    (folder / "model.json").write_text(json.dumps(manifest))
    (folder / "sample-input.json").write_text(json.dumps({"data": [[1.0, 2.0]]}))
    return folder


@pytest.fixture
def make_model(tmp_path: Path) -> MakeModel:
    counter = iter(range(10_000))

    def make(**kwargs: object) -> Path:
        return write_model_folder(tmp_path / f"model-{next(counter)}", **kwargs)  # type: ignore[arg-type]

    return make


def existing_code_upload(fake: Any, match: re.Match[str], body: Any, query: Any) -> Any:
    """A FakeArm route: answer azure-ai-ml's code lookup-by-content-hash with a code version.

    Azure ML does that when the same snapshot was uploaded before; the first upload goes to blob
    storage through azure-storage-blob's own HTTP pipeline, which the ARM transport cannot reach.
    Use: `arm.on("GET", r"^.*/codes/[^/]+/versions$", existing_code_upload)`.
    """
    version, _ = fake.put(match.group(0) + "/1", {"properties": {
        "codeUri": "https://fakestore.blob.core.windows.net/azureml/LocalUpload/snapshot",
        "hash": query["hash"][0], "hashVersion": query["hashVersion"][0]}})  # fmt: skip
    return 200, {"value": [version]}, {}
