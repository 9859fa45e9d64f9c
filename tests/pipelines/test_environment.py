"""environment.yml (the steps' conda env in Azure ML) lists exactly pyproject's dependencies."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_environment_yml_matches_pyproject() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(declared), (
        "environment.yml (the Azure ML steps' environment) must list the same dependencies as "
        f"pyproject.toml: add {sorted(set(declared) - set(pip))}, remove "
        f"{sorted(set(pip) - set(declared))} under `pip:` in environment.yml"
    )
    python = next(d for d in environment["dependencies"] if str(d).startswith("python="))
    assert python == "python=3.11"  # pyproject: requires-python >= 3.11
