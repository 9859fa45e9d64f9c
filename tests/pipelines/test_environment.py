"""The Azure ML steps' environment is pinned, and pinned to what this checkout runs locally.

environment.yml (the steps' conda env) lists pyproject's dependencies and everything they pull
in on the image (Linux x86_64, CPython 3.11: scripts/lock_environment.py writes that part), each
`==` the version installed here, and every component.yml names its base image by a dated tag: a
pipeline re-run months later builds the same environment, and `run-local` runs the code Azure ML
runs. The package step's Dockerfile runs the same Python, by its full version and Debian release.

constraints-dev.txt pins the rest of what `make` installs: pyproject's dev tools and all they pull
in on this machine that environment.yml does not pin (the same script writes it), so a new
pytest, mypy or schemathesis release cannot break CI; none of it goes into Azure ML.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from aml_pipelines.pipeline import STEPS, component_path
from tests.pipelines.requirements_walk import environment_yml, image_markers, walk

REPO = Path(__file__).resolve().parents[2]
LOCK_SCRIPT = REPO / "scripts" / "lock_environment.py"
DEV_CONSTRAINTS = REPO / "constraints-dev.txt"
# An Azure ML base image by its dated tag (`:20250601.v1`) or by digest; `:latest`, or no tag,
# is whatever Microsoft pushed last.
PINNED_IMAGE = re.compile(
    r"^mcr\.microsoft\.com/azureml/[\w.-]+(:\d{8}\.v\d+|@sha256:[0-9a-f]{64})$"
)


def _key(requirement: Requirement) -> tuple[str, frozenset[str]]:
    return requirement.name.lower().replace("_", "-"), frozenset(requirement.extras)


def test_environment_yml_lists_pyprojects_dependencies() -> None:
    declared = {
        _key(r): r
        for r in map(Requirement, tomllib.loads((REPO / "pyproject.toml").read_text())[
            "project"]["dependencies"])
    }  # fmt: skip
    pip = environment_yml()[1]
    pinned = {_key(r): r for r in map(Requirement, pip)}
    assert set(declared) <= set(pinned), (
        "environment.yml (the Azure ML steps' environment) must list pyproject.toml's "
        f"dependencies: add {sorted(set(declared) - set(pinned))} to the top of its `pip:` list"
    )  # (what else it pins, the closure, is test_the_pins_are_the_closure_...'s)
    names = [canonicalize_name(Requirement(line).name) for line in pip]
    assert len(set(names)) == len(names), (
        f"pinned twice: {sorted(n for n in set(names) if names.count(n) > 1)}"
    )
    for key, requirement in declared.items():
        version = _exact_pin(pinned[key])  # (an unpinned one is the next test's)
        assert version is None or requirement.specifier.contains(version, prereleases=True), (
            f"environment.yml pins {pinned[key]}, outside pyproject's {requirement}"
        )


def test_the_pins_are_the_closure_of_pyprojects_dependencies() -> None:
    """Every package a pinned one requires on the image is pinned, at a version it accepts, and
    nothing else is: a transitive dependency left floating is whatever PyPI serves on the day
    (azure-core, starlette, pydantic-core...). Requires-Dist read offline from this venv, whose
    versions are the pinned ones (the next test); an extra asked for (uvicorn[standard], or by a
    dependency) adds what the package guards with `extra == ...`."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {canonicalize_name(r.name): r for r in map(Requirement, environment_yml()[1])}
    needed: dict[str, str] = {}  # each package the image needs: who asked first
    missing: dict[str, str] = {}
    outside = []
    top = [(Requirement(line), "pyproject.toml") for line in pyproject]
    for requirement, wanted_by in walk(top, image_markers(), follow=pinned.__contains__):
        name = canonicalize_name(requirement.name)
        needed.setdefault(name, wanted_by)
        if name not in pinned:
            missing.setdefault(name, f"{requirement} (needed by {wanted_by})")
            continue
        version = _exact_pin(pinned[name])
        if version is not None and not requirement.specifier.contains(version, prereleases=True):
            outside.append(f"{wanted_by} needs {requirement}, pinned {pinned[name]}")
    fix = "run `.venv/bin/python scripts/lock_environment.py`"
    assert not missing, f"environment.yml leaves these floating: {sorted(missing.values())}; {fix}"
    assert not outside, f"environment.yml pins versions a pinned package refuses: {outside}"
    unneeded = sorted(set(pinned) - set(needed))
    assert not unneeded, f"environment.yml pins what no step needs on the image: {unneeded}; {fix}"


def _lock_script() -> ModuleType:
    """scripts/lock_environment.py, imported (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("lock_environment", LOCK_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_transitive_block_is_what_the_lock_script_writes(capsys) -> None:
    assert _lock_script().main([str(REPO / "environment.yml"), "--check"]) == 0, (
        capsys.readouterr().err
    )


def test_the_dev_constraints_are_what_the_lock_script_writes() -> None:
    lock = _lock_script()
    written = lock.dev_constraints((REPO / "environment.yml").read_text(), lock._dev_requirements())
    assert DEV_CONSTRAINTS.read_text() == written, (
        "constraints-dev.txt is stale: run `.venv/bin/python scripts/lock_environment.py`"
    )


def _dev_pins() -> list[Requirement]:
    lines = DEV_CONSTRAINTS.read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]


def test_the_dev_constraints_pin_the_dev_tools_closure_here_and_nothing_else() -> None:
    """Every package pyproject's dev extra needs on this machine (markers evaluated here: the
    tools run locally, never in Azure ML), and every Requires-Dist of those, is pinned in one of
    the two files; constraints-dev.txt holds nothing that environment.yml pins or nobody needs."""
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "dev"
    ]
    environment = {canonicalize_name(Requirement(line).name) for line in environment_yml()[1]}
    dev_pins = {canonicalize_name(r.name) for r in _dev_pins()}
    assert not environment & dev_pins, (
        f"constraints-dev.txt repeats environment.yml's pins: {sorted(environment & dev_pins)}"
    )
    needed: set[str] = set()
    missing: dict[str, str] = {}
    top = [(Requirement(line), "pyproject's dev extra") for line in dev]
    for requirement, wanted_by in walk(top, default_environment()):
        name = canonicalize_name(requirement.name)
        needed.add(name)
        if name not in environment | dev_pins:
            missing.setdefault(name, f"{requirement} (needed by {wanted_by})")
    fix = "run `.venv/bin/python scripts/lock_environment.py`"
    assert not missing, f"the dev tools leave these floating: {sorted(missing.values())}; {fix}"
    unneeded = sorted(dev_pins - needed)
    assert not unneeded, f"constraints-dev.txt pins what no dev tool needs: {unneeded}; {fix}"


def test_the_dev_constraints_pin_the_versions_installed_here() -> None:
    pins = _dev_pins()
    assert pins, "constraints-dev.txt pins nothing"
    differing = {
        str(r): metadata.version(r.name) for r in pins if _exact_pin(r) != metadata.version(r.name)
    }
    assert not differing, (
        f"constraints-dev.txt pins other versions than the venv runs (installed: {differing})"
    )


def test_the_makefile_installs_the_dev_tools_at_their_pins() -> None:
    """A changed constraints-dev.txt re-installs the venv, and the install takes it with -c."""
    makefile = (REPO / "Makefile").read_text()
    rule = re.search(r"^\$\(STAMP\):(.*)$", makefile, flags=re.MULTILINE)
    assert rule is not None and "constraints-dev.txt" in rule.group(1).split()
    install = re.search(r"pip install [^\n]*-e '\.\[dev\]'(?:[^\n]*\\\n)*[^\n]*", makefile)
    assert install is not None
    assert "-c constraints-dev.txt" in install.group(0)


HAND_COMMENT = "      # a hand-written note among the top pins\n"


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda t: re.sub(r"(?m)^ *- starlette==.*\n", "", t), id="pin-removed"),
        pytest.param(lambda t: t + "      - pluggy==1.7.0\n", id="stale-pin-added"),
        pytest.param(lambda t: re.sub(r"==\S+\n$", "==0.0.1\n", t), id="version-edited"),
        pytest.param(lambda t: t.partition("      # The transitive")[0], id="no-block-yet"),
    ],
)
def test_the_lock_script_rewrites_only_its_block(damage, tmp_path: Path) -> None:
    """The top pins and every comment outside the block stay as written; the block comes back as
    this venv's closure whatever was done to it."""
    current = (REPO / "environment.yml").read_text()
    top_end = current.index("      # The transitive")
    expected = current[:top_end] + HAND_COMMENT + current[top_end:]
    damaged = tmp_path / "environment.yml"
    damaged.write_text(damage(expected))
    assert damaged.read_text() != expected
    lock = _lock_script()
    assert lock.main([str(damaged), "--check"]) == 1
    assert damaged.read_text() == damage(expected), "--check changed the file"
    assert lock.main([str(damaged)]) == 0
    assert damaged.read_text() == expected


def test_the_lock_script_clears_its_block_for_make_to_resolve_a_changed_top_pin(
    tmp_path: Path,
) -> None:
    """`--clear` leaves the top pins as constraints alone (pydantic pins its pydantic-core
    exactly: `make` could not install another pydantic under the block's pin), and the dev
    constraints to their comment (a new pin may need another version of what only they pin); the
    next run writes both back."""
    current = (REPO / "environment.yml").read_text()
    path = tmp_path / "environment.yml"
    path.write_text(current)
    dev = tmp_path / "constraints-dev.txt"
    dev.write_text(DEV_CONSTRAINTS.read_text())
    lock = _lock_script()
    assert lock.main([str(path), "--clear"]) == 0
    cleared = path.read_text()
    block = current.index("      # The transitive")
    assert cleared.startswith(current[:block])
    assert [line for line in cleared[block:].splitlines() if line.lstrip().startswith("- ")] == []
    assert "pydantic-core" not in "".join(_makefile_constraints(path))
    assert all(line.startswith("#") for line in dev.read_text().splitlines())
    assert lock.main([str(path)]) == 0
    assert path.read_text() == current
    assert dev.read_text() == DEV_CONSTRAINTS.read_text()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda t: re.sub(r"(?m)^pluggy==.*\n", "", t), id="pin-removed"),
        pytest.param(lambda t: t + "attrs==26.1.0\n", id="runtime-pin-added"),
        pytest.param(lambda t: re.sub(r"(?m)^ruff==.*$", "ruff==0.0.1", t), id="version-edited"),
        pytest.param(lambda t: None, id="missing"),
    ],
)
def test_the_lock_script_checks_and_rewrites_the_dev_constraints(damage, tmp_path: Path) -> None:
    """`--check` fails on a stale constraints-dev.txt alone (environment.yml current) and the
    next run writes it back, environment.yml untouched."""
    environment = tmp_path / "environment.yml"
    environment.write_text((REPO / "environment.yml").read_text())
    dev = tmp_path / "constraints-dev.txt"
    damaged = damage(DEV_CONSTRAINTS.read_text())
    if damaged is not None:
        dev.write_text(damaged)
    lock = _lock_script()
    assert lock.main([str(environment), "--check"]) == 1
    assert (dev.read_text() if dev.exists() else None) == damaged, "--check changed the file"
    assert lock.main([str(environment)]) == 0
    assert dev.read_text() == DEV_CONSTRAINTS.read_text()
    assert environment.read_text() == (REPO / "environment.yml").read_text()


def test_the_lock_script_refuses_a_top_pin_the_venv_does_not_run() -> None:
    lock = _lock_script()
    with pytest.raises(lock.LockError, match=r"needs numpy==1\.26\.0, installed here: .*`make`"):
        lock.rewrite(
            (REPO / "environment.yml").read_text().replace("numpy==2.4.6", "numpy==1.26.0")
        )


@pytest.mark.parametrize(
    "pip",
    [
        pytest.param("  - pip:\n", id="empty"),
        pytest.param(
            "  - pip:\n      # The transitive closure of the pins above\n", id="block-only"
        ),
    ],
)
def test_the_lock_script_refuses_a_pip_list_without_top_pins(pip: str) -> None:
    lock = _lock_script()
    with pytest.raises(lock.LockError, match=r"`- pip:` list has no pins above"):
        lock.rewrite(f"dependencies:\n  - python=3.11.7\n{pip}")


@pytest.mark.parametrize(
    ("make", "said"),
    [
        pytest.param(
            lambda path: None, r"^error: {path}: cannot be read \(No such file", id="missing"
        ),
        pytest.param(
            lambda path: path.write_text(
                (REPO / "environment.yml").read_text().replace("typer==", "typer=")
            ),
            r"^error: {path}: the `- pip:` item 'typer=0\.28\.0' is not a pip requirement "
            r"\(.*\): pin it as name==version",
            id="conda-style-pin",
        ),
    ],
)
def test_the_lock_script_says_what_is_wrong_with_its_input_in_one_line(
    make: Callable[[Path], None], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "environment.yml"
    make(path)
    assert _lock_script().main([str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert re.search(said.format(path=re.escape(str(path))), err), err
    assert err.count("\n") == 1


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
    conda, pip = environment_yml()
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


def _makefile_constraints(environment_yml: Path) -> list[str]:
    """The constraints `make` writes from `environment_yml`: its sed, run as make runs it (`$$`
    is make's `$`)."""
    makefile = (REPO / "Makefile").read_text()
    script = re.search(
        r"sed -n '([^']+)' environment\.yml \\\n\s*> \$\(VENV\)/constraints", makefile
    )
    assert script is not None, "the Makefile no longer writes the constraints with sed"
    assert "-c $(VENV)/constraints.txt" in makefile
    return subprocess.run(
        ["sed", "-n", script.group(1).replace("$$", "$"), str(environment_yml)],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip


def test_the_makefile_installs_pip_at_its_pin() -> None:
    """pip itself is no later release than environment.yml's (`--upgrade pip` took the latest)."""
    makefile = (REPO / "Makefile").read_text()
    script = re.search(r"^PIP_PIN = \$\(shell sed -n '([^']+)' environment\.yml\)$", makefile, re.M)
    assert script is not None, "the Makefile no longer reads pip's pin with sed"
    assert '"pip==$(PIP_PIN)"' in makefile and "--upgrade pip" not in makefile
    pin = subprocess.run(
        ["sed", "-n", script.group(1).replace("$$", "$"), str(REPO / "environment.yml")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (conda_pip,) = [d for d in environment_yml()[0] if d.startswith("pip=")]
    assert pin and pin == conda_pip.partition("=")[2] == metadata.version("pip")


def test_the_makefile_installs_the_venv_at_these_pins() -> None:
    """`make` writes every one of environment.yml's pins, the closure too, to a pip constraints
    file (extras dropped: pip refuses them there): the venv runs what the steps run."""
    expected = [
        f"{Requirement(line).name}{Requirement(line).specifier}" for line in environment_yml()[1]
    ]
    assert _makefile_constraints(REPO / "environment.yml") == expected


@pytest.mark.parametrize(
    ("line", "constraint"),
    [
        pytest.param("      - starlette==1.10.0", "starlette==1.10.0", id="plain"),
        pytest.param("      - zope.interface==7.2", "zope.interface==7.2", id="dotted"),
        pytest.param("      - typing_extensions==4.16", "typing_extensions==4.16", id="underscore"),
        pytest.param("      - uvicorn[standard]==0.54.0", "uvicorn==0.54.0", id="extra"),
        pytest.param("      - azure-core[aio,tracing]==1.41.0", "azure-core==1.41.0", id="extras"),
        pytest.param("      - certifi==2026.10.19.post1", "certifi==2026.10.19.post1", id="post"),
        pytest.param("      - azure-core-tracing-opentelemetry==1.0.0b13",
                     "azure-core-tracing-opentelemetry==1.0.0b13", id="pre"),
        pytest.param("  - python=3.11.7", None, id="conda-not-pip"),
        pytest.param("      # - numpy==2.4.6", None, id="comment"),
    ],
)  # fmt: skip
def test_the_makefile_takes_any_pin_line(line: str, constraint: str | None, tmp_path: Path) -> None:
    (tmp_path / "environment.yml").write_text(line + "\n")
    assert _makefile_constraints(tmp_path / "environment.yml") == (
        [constraint] if constraint else []
    )


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
    (python,) = [d.partition("=")[2] for d in environment_yml()[0] if d.startswith("python=")]
    assert pinned.group(1) == python, f"FROM {image}, but environment.yml pins python={python}"
    wanted = {
        Requirement(line).name: _exact_pin(Requirement(line)) for line in environment_yml()[1]
    }
    for line in requirements({}).splitlines():
        if not line.startswith("#"):
            assert _exact_pin(Requirement(line)) == wanted[Requirement(line).name], line
