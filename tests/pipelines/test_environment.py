"""The Azure ML steps' environment is pinned, and pinned to what this checkout runs locally.

environment.yml (the steps' conda env) lists pyproject's dependencies, each `==` the version
installed here, and every component.yml names its base image by a dated tag: a pipeline re-run
months later builds the same environment, and `run-local` runs the code Azure ML runs. The
package step's Dockerfile runs the same Python, by its full version and Debian release.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from aml_pipelines.pipeline import STEPS, component_path

REPO = Path(__file__).resolve().parents[2]
# An Azure ML base image by its dated tag (`:20250601.v1`) or by digest; `:latest`, or no tag,
# is whatever Microsoft pushed last.
PINNED_IMAGE = re.compile(
    r"^mcr\.microsoft\.com/azureml/[\w.-]+(:\d{8}\.v\d+|@sha256:[0-9a-f]{64})$"
)


def _environment() -> tuple[list[str], list[str]]:
    """environment.yml's conda dependencies and its pip requirements."""
    deps = yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    return [str(d) for d in deps if not isinstance(d, dict)], pip


def _key(requirement: Requirement) -> tuple[str, frozenset[str]]:
    return requirement.name.lower().replace("_", "-"), frozenset(requirement.extras)


def test_environment_yml_lists_pyprojects_dependencies() -> None:
    declared = {
        _key(r): r
        for r in map(Requirement, tomllib.loads((REPO / "pyproject.toml").read_text())[
            "project"]["dependencies"])
    }  # fmt: skip
    pinned = {_key(r): r for r in map(Requirement, _environment()[1])}
    assert sorted(pinned) == sorted(declared), (
        "environment.yml (the Azure ML steps' environment) must list the same dependencies as "
        f"pyproject.toml: add {sorted(set(declared) - set(pinned))}, remove "
        f"{sorted(set(pinned) - set(declared))} under `pip:` in environment.yml"
    )
    for key, requirement in pinned.items():
        version = _exact_pin(requirement)  # (an unpinned one is the next test's)
        assert version is None or declared[key].specifier.contains(version, prereleases=True), (
            f"environment.yml pins {requirement}, outside pyproject's {declared[key]}"
        )


@pytest.mark.parametrize(
    ("line", "pinned"),
    [
        pytest.param("numpy==2.4.6", True, id="exact"),
        pytest.param("uvicorn[standard]==0.54.0", True, id="exact-with-extras"),
        pytest.param("numpy>=1.26", False, id="floor"),
        pytest.param("numpy", False, id="bare"),
        pytest.param("numpy~=2.4", False, id="compatible"),
        pytest.param("numpy==2.*", False, id="wildcard"),
        pytest.param("numpy==2.4.6,!=2.4.5", False, id="two-clauses"),
    ],
)
def test_an_unpinned_requirement_is_told_from_a_pinned_one(line: str, pinned: bool) -> None:
    assert (_exact_pin(Requirement(line)) is not None) is pinned


def _exact_pin(requirement: Requirement) -> str | None:
    """The one version `requirement` allows (`name==X.Y.Z`), else None."""
    specs = list(requirement.specifier)
    if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
        return None
    return specs[0].version


def test_every_requirement_is_pinned_to_the_version_installed_here() -> None:
    conda, pip = _environment()
    unpinned = [line for line in pip if _exact_pin(Requirement(line)) is None]
    assert not unpinned, f"environment.yml: pin these with ==: {unpinned}"
    differing = {
        line: metadata.version(Requirement(line).name)
        for line in pip
        if _exact_pin(Requirement(line)) != metadata.version(Requirement(line).name)
    }
    assert not differing, (
        "environment.yml pins other versions than this checkout's environment runs (installed "
        f"here: {differing}): `run-local` and Azure ML would run different code"
    )
    # conda's own two: the interpreter (this one's minor version) and the installer, exact
    assert sorted(d.split("=")[0] for d in conda) == ["pip", "python"], conda
    major_minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"python={major_minor}" in {d.rsplit(".", 1)[0] for d in conda}, conda
    assert all(re.fullmatch(r"(python|pip)=\d+\.\d+(\.\d+)?", d) for d in conda), conda


@pytest.mark.parametrize("step", STEPS)
def test_each_component_runs_on_a_pinned_base_image(step: str) -> None:
    environment: dict[str, Any] = yaml.safe_load(component_path(step).read_text())["environment"]
    assert PINNED_IMAGE.match(environment["image"]), (
        f"components/{step}/component.yml: image {environment['image']} is not pinned; name a "
        "dated tag (mcr.microsoft.com/azureml/<image>:YYYYMMDD.vN) or a digest"
    )


def test_every_component_runs_on_the_same_image() -> None:
    images = {yaml.safe_load(component_path(s).read_text())["environment"]["image"] for s in STEPS}
    assert len(images) == 1, f"one environment for every step, not {sorted(images)}"


def test_the_makefile_installs_the_venv_at_these_pins(tmp_path: Path) -> None:
    """`make` writes environment.yml's pins to a pip constraints file (extras dropped: pip
    refuses them there); run here as make runs it (`$$` is make's `$`)."""
    makefile = (REPO / "Makefile").read_text()
    script = re.search(r"sed -n '([^']+)' environment\.yml", makefile)
    assert script is not None, "the Makefile no longer writes the constraints with sed"
    assert "-c $(VENV)/constraints.txt" in makefile
    written = subprocess.run(
        ["sed", "-n", script.group(1).replace("$$", "$"), str(REPO / "environment.yml")],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    expected = [
        f"{Requirement(line).name}{Requirement(line).specifier}" for line in _environment()[1]
    ]
    assert written == expected


#: The package's image: the interpreter's full version and the Debian release, as Docker Hub
#: tags them (`python:3.11.7-slim-bookworm`); `python:3.11-slim` takes every patch release and a
#: new Debian as they are pushed.
PINNED_PYTHON_IMAGE = re.compile(r"python:(\d+\.\d+\.\d+)-slim-[a-z]+(@sha256:[0-9a-f]{64})?")


@pytest.mark.parametrize(
    ("image", "pinned"),
    [
        pytest.param("python:3.11.7-slim-bookworm", True, id="version-and-debian"),
        pytest.param("python:3.11.7-slim-bookworm@sha256:" + "0" * 64, True, id="digest"),
        pytest.param("python:3.11-slim", False, id="minor-only"),
        pytest.param("python:3.11.7-slim", False, id="debian-floats"),
        pytest.param("python:3.11-slim-bookworm", False, id="patch-floats"),
        pytest.param("python:slim", False, id="bare"),
    ],
)
def test_a_floating_python_image_is_told_from_a_pinned_one(image: str, pinned: bool) -> None:
    assert (PINNED_PYTHON_IMAGE.fullmatch(image) is not None) is pinned


def test_the_package_image_runs_the_python_the_steps_run() -> None:
    """The package's Dockerfile: the interpreter environment.yml pins, on a fixed Debian; its
    pip installs are requirements.txt's `==` pins (test_package), the versions pinned here."""
    from components.package.package import DOCKERFILE, requirements

    (image,) = re.findall(r"^FROM (\S+)$", DOCKERFILE, flags=re.MULTILINE)
    pinned = PINNED_PYTHON_IMAGE.fullmatch(image)
    assert pinned, f"components/package: FROM {image} floats; name e.g. python:3.11.7-slim-bookworm"
    (python,) = [d.partition("=")[2] for d in _environment()[0] if d.startswith("python=")]
    assert pinned.group(1) == python, f"FROM {image}, but environment.yml pins python={python}"
    wanted = {Requirement(line).name: _exact_pin(Requirement(line)) for line in _environment()[1]}
    for line in requirements({}).splitlines():
        if not line.startswith("#"):
            assert _exact_pin(Requirement(line)) == wanted[Requirement(line).name], line
