"""The package step: folder contract, integrity checks, and the package actually serving."""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from aml_pipelines.errors import ComponentError, ConfigError, IntegrityError, PipelineError
from aml_pipelines.registry.local import LocalRegistry
from components.package import package as package_module
from components.package.main import main
from components.package.package import build_package, image_name, requirements
from components.register.register import register_model
from components.rollout.main import InvalidInput, read_package
from components.train.train import TrainParams, train
from rollout.core.types import Colour, Release
from rollout.local.process import listening_socket
from rollout.routers import istio_manifests as m
from tests.pipelines.requirements_walk import image_markers, walk
from tests.routers.test_manifests import by_name, render_chart

REPO = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalRegistry, Path]:
    root = tmp_path_factory.mktemp("pkg")
    train(root / "model", name="Diabetes-Ridge", params=TrainParams())
    registry = LocalRegistry(root / "registry")
    register_model(root / "model", registry, out_dir=root / "registration")
    return registry, root


def test_package_folder_follows_the_contract(registered, tmp_path: Path) -> None:
    registry, _ = registered
    version = registry.get("Diabetes-Ridge", 1)
    result = build_package(version, tmp_path / "pkg", image_registry="acr.example.io/team/")
    pkg = tmp_path / "pkg"
    manifest = json.loads((pkg / "package.json").read_text())
    assert manifest["model"] == "Diabetes-Ridge" and manifest["version"] == "1"
    assert manifest["sha256"] == version.sha256
    assert manifest["image"] == result.image == "acr.example.io/team/diabetes-ridge:1"
    for rel in ("model/model.skops", "model/model.json", "model/sample-input.json", "score.py",
                "asgi.py", "scoring/app.py", "requirements.txt", "Dockerfile",
                "k8s/values-blue.yaml", "k8s/values-green.yaml"):  # fmt: skip
        assert (pkg / rel).is_file(), rel
    assert not (pkg / "model" / ".registry.json").exists()
    assert not (pkg / "model" / "heldout.csv").exists()  # labelled data stays out of the image
    assert not (pkg / "model" / "train-rows.u64").exists()  # the gate's, not the server's
    assert not (pkg / "scoring" / "cli.py").exists()  # the server needs no CLI
    assert (pkg / "score.py").read_text() == (Path("scoring") / "score.py").read_text()
    requirements = (pkg / "requirements.txt").read_text()
    model_json = json.loads((pkg / "model" / "model.json").read_text())
    assert f"scikit-learn=={model_json['library_versions']['scikit-learn']}" in requirements
    assert "uvicorn[standard]==" in requirements
    assert 'CMD ["uvicorn", "asgi:build", "--factory"' in (pkg / "Dockerfile").read_text()
    blue = yaml.safe_load((pkg / "k8s" / "values-blue.yaml").read_text())
    assert blue["blue"]["image"] == "acr.example.io/team/diabetes-ridge:1"
    assert manifest["files"]["model/model.skops"] == version.sha256


def _pins(text: str) -> dict[str, Requirement]:
    """requirements.txt's lines, by canonical name (comments skipped)."""
    return {
        canonicalize_name(Requirement(line).name): Requirement(line)
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    }


def _floating(text: str, unread: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """What requirements.txt leaves floating on the image (a Requires-Dist of a pinned package,
    marker true on Linux x86_64 CPython 3.11.7, extras followed, not pinned) and what it pins at
    a version its requirer refuses. `unread`: pinned at a version not installed here, so their
    own Requires-Dist cannot be read (pip's to choose)."""
    pins = _pins(text)
    floating, refused = [], []
    top = [(r, "requirements.txt") for r in pins.values()]
    followed = lambda name: name in pins and name not in unread  # noqa: E731 (one use)
    for requirement, wanted_by in walk(top, image_markers(), follow=followed):
        name = canonicalize_name(requirement.name)
        if name not in pins:
            floating.append(f"{requirement} (needed by {wanted_by})")
            continue
        (version,) = [s.version for s in pins[name].specifier if s.operator == "=="]
        if not requirement.specifier.contains(version, prereleases=True):
            refused.append(f"{wanted_by} needs {requirement}, pinned {version}")
    return sorted(set(floating)), refused


def test_requirements_pin_everything_the_image_installs() -> None:
    """Every package a pinned one requires in the image (Linux x86_64, the Dockerfile's CPython;
    uvicorn[standard]'s extras too) is pinned, at a version its requirer accepts: starlette,
    pydantic-core, joblib... do not float to whatever PyPI serves on the day of a rebuild."""
    text = requirements({})
    assert all(len(r.specifier) == 1 for r in _pins(text).values()), text
    floating, refused = _floating(text)
    assert not floating, f"requirements.txt leaves these to pip: {floating}"
    assert not refused, refused
    for name in ("starlette", "pydantic-core", "anyio", "h11", "joblib", "threadpoolctl", "uvloop"):
        assert name in _pins(text), name  # (the walk above is the test; these say what it means)


def test_requirements_pin_the_versions_environment_yml_pins() -> None:
    """The image runs what the steps' environment runs, the transitive packages included: the
    versions the scoring server was tested with (test_environment ties the venv to these)."""
    deps = yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
    environment = _pins("\n".join(next(d["pip"] for d in deps if isinstance(d, dict))))
    text = requirements({})
    differing = {
        str(pin): str(environment.get(name)) for name, pin in _pins(text).items()
        if environment.get(name) is None or pin.specifier != environment[name].specifier
    }  # fmt: skip
    assert not differing, differing


def test_requirements_read_as_three_groups() -> None:
    comments = [line for line in requirements({}).splitlines() if line.startswith("#")]
    assert comments[0].startswith("# the model's libraries")
    assert comments[1].startswith("# the scoring server's libraries")
    assert comments[2].startswith("# what those pull in")
    lines = requirements({}).splitlines()
    third = lines[lines.index(comments[2]) + 1 :]
    names = [canonicalize_name(Requirement(line).name) for line in third if line[:1] != "#"]
    assert names == sorted(names) and "starlette" in names and "fastapi" not in names


def test_a_model_trained_with_another_library_version_pins_the_rest() -> None:
    """scikit-learn 1.8.0 (trained) is not installed here: its own Requires-Dist cannot be read,
    so what only it needs (joblib, threadpoolctl, narwhals) is left to pip and requirements.txt
    says so; everything else stays pinned at the versions tested here."""
    installed = metadata.version("scikit-learn")
    assert installed != "1.8.0"
    text = requirements({"scikit-learn": "1.8.0"})
    pins = _pins(text)
    assert str(pins["scikit-learn"]) == "scikit-learn==1.8.0"
    floating, refused = _floating(text, unread={"scikit-learn"})
    assert not floating and not refused, (floating, refused)
    for name in ("joblib", "threadpoolctl", "narwhals"):
        assert name not in pins, f"{name} is pinned at the version another scikit-learn needs"
    note = " ".join(line for line in text.splitlines() if line.startswith("#"))
    assert f"scikit-learn 1.8.0 is not the version installed here ({installed})" in note
    assert "its own dependencies are pip's choice" in note
    assert {n: str(p) for n, p in pins.items() if n != "scikit-learn"}.items() <= {
        n: str(p) for n, p in _pins(requirements({})).items()
    }.items()


def test_a_model_library_version_a_pinned_package_refuses_is_not_packaged() -> None:
    """skops (as trained) needs scikit-learn>=1.2: an image pinning 1.1.3 would never build."""
    with pytest.raises(PipelineError, match=r"skops needs scikit-learn>=1\.2, pinned: 1\.1\.3"):
        requirements({"scikit-learn": "1.1.3"})


@pytest.mark.parametrize("colour", [Colour.BLUE, Colour.GREEN])
def test_the_helm_values_deploy_this_version_with_the_chart(
    registered, tmp_path: Path, colour: Colour
) -> None:
    # `helm install -f k8s/values-<colour>.yaml charts/aml-rollout` must render this colour's
    # Deployment of this version, exactly as the istio router would deploy it.
    registry, _ = registered
    version = registry.get("Diabetes-Ridge", 1)
    pkg = build_package(version, tmp_path / "p", image_registry="acr.example.io").path
    values = yaml.safe_load((pkg / "k8s" / f"values-{colour.value}.yaml").read_text())
    # Alone, the colour takes the traffic: the chart refuses weight to a colour it has no pod for.
    weights = {colour.value: 100, colour.other.value: 0}
    chart = by_name(render_chart({**values, "weights": weights}, "ml"))
    release = Release(
        model="Diabetes-Ridge",
        version="1",
        sha256=version.sha256,
        image="acr.example.io/diabetes-ridge:1",
    )
    expected = by_name(m.bootstrap(m.IstioLayout(namespace="ml", app="model"), {colour: release}))
    name = ("Deployment", f"model-{colour.value}")
    assert name in chart
    assert chart[name] == expected[name]
    other = colour.other
    assert ("Deployment", f"model-{other.value}") not in chart  # one colour per file


def test_packaged_score_py_serves_with_only_the_package(registered, tmp_path: Path) -> None:
    registry, _ = registered
    pkg = build_package(registry.get("Diabetes-Ridge", 1), tmp_path / "p", image_registry="r").path
    sample = json.loads((pkg / "model" / "sample-input.json").read_text())["data"][:3]
    code = (
        "import json, sys, scoring, score\n"
        "assert scoring.__file__.startswith(sys.argv[1]), scoring.__file__\n"
        "score.init()\n"
        "print(json.dumps(score.run(sys.argv[2])))\n"
    )
    env = {**os.environ, "AZUREML_MODEL_DIR": str(pkg), "PYTHONPATH": ""}
    out = subprocess.run(
        [sys.executable, "-c", code, str(pkg), json.dumps({"data": sample})],
        cwd=pkg, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(answer["predictions"]) == 3
    assert answer["model"] == "Diabetes-Ridge" and answer["version"] == "1", answer


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["usual-umask", "private-umask"])
def test_the_images_non_root_user_can_read_every_packaged_file(
    registered, tmp_path: Path, umask: int
) -> None:
    # The Dockerfile copies the folder as root and runs the server as uid 10001: a file only its
    # owner may read (package.json was 0600, from write_json's mkstemp) left the model unloadable
    # in the container, /readyz 503 forever.
    registry, _ = registered
    previous = os.umask(umask)
    try:
        pkg = build_package(registry.get("Diabetes-Ridge", 1), tmp_path / "p", image_registry="r")
    finally:
        os.umask(previous)
    # The folder itself too: `COPY . .` keeps /app's mode, but a copy that keeps modes
    # (`cp -a`, some builders) gave a 0700 /app the server could not enter.
    for path in [pkg.path, *pkg.path.rglob("*")]:
        others = path.stat().st_mode & 0o007
        wanted = 0o005 if path.is_dir() else 0o004
        assert others & wanted == wanted, (
            f"{path.relative_to(pkg.path)}: {oct(path.stat().st_mode)}"
        )


def test_the_image_serves_like_aml_rollout_serve(registered, tmp_path: Path) -> None:
    # Behind a proxy (the Istio sidecar keeps idle upstream connections for an hour) uvicorn's
    # default 5 s keep-alive let a request race the server's close: a 503 made up by the proxy,
    # counted against the model. The image's uvicorn keeps them as long as `serve` does.
    from uvicorn.main import main as uvicorn_command

    from scoring.cli import KEEP_ALIVE_S, SHUTDOWN_TIMEOUT_S

    registry, _ = registered
    pkg = build_package(registry.get("Diabetes-Ridge", 1), tmp_path / "p", image_registry="r").path
    options = uvicorn_command.make_context("uvicorn", dockerfile_command(pkg)).params
    assert options["app"] == "asgi:build" and options["factory"]
    assert options["timeout_keep_alive"] == KEEP_ALIVE_S
    # Was uvicorn's default (none): a stopping pod waited for every request in flight, a body
    # trickling in too, until Kubernetes killed it. `serve`'s timeout, in which a body still
    # arriving gets its 408 (scoring.httpguard tells the app the server is stopping).
    assert options["timeout_graceful_shutdown"] == SHUTDOWN_TIMEOUT_S
    assert options["http"] == "scoring.httpguard:GuardedHttpToolsProtocol"
    assert options["access_log"] is False  # a log line per request, as `serve` does not
    # Was "auto": a POST carrying `Upgrade: websocket` hung unanswered (no WebSocket routes).
    assert options["ws"] == "none"


def dockerfile_command(pkg: Path) -> list[str]:
    """The arguments of the package's Dockerfile CMD, a `uvicorn` command."""
    (cmd,) = [
        line
        for line in (pkg / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        if line.startswith("CMD ")
    ]
    program, *args = json.loads(cmd.removeprefix("CMD "))
    assert program == "uvicorn"
    return list(args)


def image_entry(
    registered: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **env: str | None
) -> Any:
    """The package's asgi.py as a module, with `env` set (None: unset) for its build()."""
    registry, _ = registered
    pkg = build_package(registry.get("Diabetes-Ridge", 1), tmp_path / "p", image_registry="r").path
    spec = importlib.util.spec_from_file_location("packaged_asgi", pkg / "asgi.py")
    assert spec is not None and spec.loader is not None
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return entry


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        pytest.param(None, (), id="unset-no-auth"),
        pytest.param("s3cret", (b"s3cret",), id="set"),
        # Was: the value taken whole: a rotation "k1 k2" 401d both keys, a secret file's
        # trailing newline stopped the start; now scoring.auth.api_keys_from_env, as serve.
        pytest.param("k1 k2", (b"k1", b"k2"), id="two-keys"),
        pytest.param("k1,k2", (b"k1", b"k2"), id="comma-separated"),
        pytest.param("s3cret\n", (b"s3cret",), id="trailing-newline"),
        pytest.param(" ", SystemExit, id="blank-fails-closed"),
        pytest.param(" , ", SystemExit, id="only-separators-fails-closed"),
        # Was a traceback and status 1: create_app's own refusal was outside the one-line catch.
        pytest.param("ké", SystemExit, id="a-key-no-header-can-carry-fails-closed"),
    ],
)
def test_the_image_takes_its_api_key_from_the_environment_as_serve_does(
    registered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str | None, expected: Any
) -> None:
    # Was: asgi.py never read AML_ROLLOUT_API_KEY, so a Deployment given the key, as the serve
    # docs say, served /score to anyone.
    entry = image_entry(registered, tmp_path, monkeypatch, AML_ROLLOUT_API_KEY=key)
    if expected is SystemExit:  # one line and status 2, as `serve` (was: a traceback)
        with pytest.raises(SystemExit) as stopped:
            entry.build()
        assert stopped.value.code == 2
    else:
        assert entry.build().state.scoring.api_keys == expected


@pytest.mark.parametrize(
    ("colour", "expected"),
    [
        pytest.param(None, "green", id="unset-green"),
        pytest.param("", "green", id="blank-green"),
        pytest.param("blue", "blue", id="blue"),
        # Was served as given: metrics labelled colour="Blue" (or ""), a query on blue read 0.
        pytest.param("Blue", None, id="capitalised-refused"),
        pytest.param("canary", None, id="other-refused"),
    ],
)
def test_the_image_runs_as_blue_or_green_only(
    registered,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    colour: str | None,
    expected: str | None,
) -> None:
    entry = image_entry(
        registered, tmp_path, monkeypatch, AML_ROLLOUT_API_KEY=None, AML_ROLLOUT_COLOUR=colour
    )
    if expected is None:
        with pytest.raises(SystemExit) as stopped:
            entry.build()
        assert stopped.value.code == 2
        assert f"AML_ROLLOUT_COLOUR is {colour!r}, not 'blue' or 'green'" in caplog.text
    else:
        assert entry.build().state.scoring.colour == expected


@pytest.mark.slow
def test_the_image_s_command_logs_the_model_it_loaded(registered, tmp_path: Path) -> None:
    # Was silent: under `uvicorn asgi:build` nothing configured logging, so the line saying which
    # model and sha256 a pod loaded (what `kubectl logs` is read for) was dropped. Run as the
    # Dockerfile's CMD does, from the package folder, on this machine.
    registry, _ = registered
    pkg = build_package(registry.get("Diabetes-Ridge", 1), tmp_path / "p", image_registry="r").path
    # On a socket bound here and inherited (uvicorn --fd), not a free port uvicorn binds later:
    # another test's server could take that one in between (and answer /readyz 404 for it).
    # Fine for a log line; not for serving: uvicorn wraps the fd as AF_UNIX, so it sets no
    # TCP_NODELAY and answers wait ~40 ms on delayed ACKs (`serve --fd` does not).
    with listening_socket() as listener:
        port = listener.getsockname()[1]
        fd = listener.fileno()
        cmd = [sys.executable, "-m", "uvicorn", "asgi:build", "--factory", "--fd", str(fd)]
        env = {**os.environ, "PYTHONPATH": str(pkg)}
        server = subprocess.Popen(
            cmd, cwd=pkg, env=env, stderr=subprocess.PIPE, text=True, pass_fds=[fd]
        )
    with server:
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                        break
                time.sleep(0.1)
        finally:
            server.terminate()
        _, err = server.communicate(timeout=30)
    assert "loaded model Diabetes-Ridge version 1 (Ridge, sha256 " in err


@pytest.mark.slow
def test_the_image_s_command_exits_when_its_model_cannot_load(registered, tmp_path: Path) -> None:
    # Was: the loader logged the error and the server ran on with /healthz 200, so the pod stayed
    # Running 0/1, never restarted, and the deploy waited its ready timeout for "readiness probe
    # failed". Now it exits non-zero with the reason: CrashLoopBackOff, and the error in its logs.
    registry, _ = registered
    pkg = build_package(registry.get("Diabetes-Ridge", 1), tmp_path / "p", image_registry="r").path
    with (pkg / "model" / "model.skops").open("ab") as model_file:
        model_file.write(b"x")
    cmd = [sys.executable, "-m", "uvicorn", "asgi:build", "--factory", "--port", "0"]
    env = {**os.environ, "PYTHONPATH": str(pkg)}
    with subprocess.Popen(cmd, cwd=pkg, env=env, stderr=subprocess.PIPE, text=True) as server:
        try:
            _, err = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            pytest.fail("the server kept running with a model that cannot load")
    assert server.returncode == 3, err
    assert "cannot serve" in err and "sha256" in err, err


def test_a_swapped_model_file_is_not_packaged(registered, tmp_path: Path) -> None:
    registry, _ = registered
    version = registry.get("Diabetes-Ridge", 1)
    with pytest.raises(IntegrityError, match="refusing to package"):
        build_package(version, tmp_path / "p", image_registry="r", registration={"sha256": "0"})
    assert not (tmp_path / "p").exists()


def test_missing_score_py_fails_clearly(registered, tmp_path: Path, monkeypatch) -> None:
    registry, _ = registered
    (tmp_path / "scoring").mkdir()
    (tmp_path / "scoring" / "__init__.py").write_text("")
    fake = importlib.machinery.ModuleSpec(
        "scoring", None, origin=str(tmp_path / "scoring/__init__.py")
    )
    monkeypatch.setattr(package_module.importlib.util, "find_spec", lambda _name: fake)
    with pytest.raises(ComponentError, match=r"score\.py is missing"):
        build_package(registry.get("Diabetes-Ridge", 1), tmp_path / "p", image_registry="r")


@pytest.mark.parametrize(
    ("registry", "message"),
    [
        pytest.param("", "image_registry", id="empty"),
        pytest.param("a b", "not a", id="space"),
        pytest.param("acr.io/Team", "'Team' is not a repository path component", id="upper-path"),
        pytest.param("acr_io.com/x", "'acr_io.com' is not a registry host", id="bad-host"),
        pytest.param("localhost:5000/a..b", "'a..b' is not a repository", id="double-dot"),
    ],
)
def test_bad_image_registry(registry: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        image_name(registry, "m", 1)


@pytest.mark.parametrize(
    ("registry", "model", "image"),
    [
        ("localhost:5000", "Diabetes-Ridge", "localhost:5000/diabetes-ridge:3"),
        ("myacr.azurecr.io/ml/models", "churn_v2", "myacr.azurecr.io/ml/models/churn_v2:3"),
        ("team", "m.x", "team/m.x:3"),  # a Docker Hub namespace
        ("MyACR.azurecr.io", "m", "MyACR.azurecr.io/m:3"),  # hosts are case-insensitive
    ],
)
def test_image_names(registry: str, model: str, image: str) -> None:
    assert image_name(registry, model, 3) == image


@pytest.mark.parametrize("model", ["m.", "a..b", "-m", "m__-x"])
def test_a_model_name_that_makes_no_image_name_is_refused(model: str) -> None:
    # Was: an image reference no registry takes, found only when pushing it.
    with pytest.raises(ConfigError, match=f"model name {re.escape(repr(model))} does not make"):
        image_name("localhost:5000", model, 1)


def test_main_packages_the_registered_version(registered, tmp_path: Path) -> None:
    registry, root = registered
    argv = ["--registration", str(root / "registration"), "--registry", f"local:{registry.root}",
            "--image-registry", "localhost:5000", "--package", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((tmp_path / "out" / "package.json").read_text())["image"] == (
        "localhost:5000/diabetes-ridge:1"
    )
    assert main([*argv[:-1], str(tmp_path / "o2"), "--mode", "azureml"]) == 1  # no workspace


def test_main_packages_a_version_named_by_model_name_and_version(
    registered, tmp_path: Path
) -> None:
    """The deploy pipeline's way: no registration.json, the files mounted from the registry."""
    registry, _ = registered
    version = registry.get("Diabetes-Ridge", 1)
    argv = ["--model-name", "Diabetes-Ridge", "--model-version", "1",
            "--registered-model", str(version.path), "--registry", f"local:{registry.root}",
            "--image-registry", "acr.io", "--package", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "out" / "package.json").read_text())
    assert (manifest["model"], manifest["version"]) == ("Diabetes-Ridge", "1")
    assert manifest["sha256"] == version.sha256


def test_main_refuses_a_model_whose_name_differs_from_another_only_in_case(
    tmp_path: Path, caplog
) -> None:
    """Both would be <registry>/diabetes:1 (image repositories are lower case): registered
    before the register step refused such names, they are refused here."""
    from tests.pipelines.conftest import write_model_folder

    registry = LocalRegistry(tmp_path / "registry")
    for name in ("Diabetes", "diabetes"):
        registry.register(name, write_model_folder(tmp_path / name, name=name))
    argv = ["--model-name", "Diabetes", "--model-version", "1", "--registry",
            f"local:{registry.root}", "--image-registry", "acr.io",
            "--package", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 1
    assert "model name 'Diabetes' differs from the registered 'diabetes' only in case" in (
        caplog.text
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        pytest.param([], "no model version to package", id="neither"),
        pytest.param(["--model-name", "Diabetes-Ridge"], "both --model-name and --model-version",
                     id="name-without-version"),
        pytest.param(["--registration", "REG", "--model-name", "Diabetes-Ridge",
                      "--model-version", "1"], "not both", id="both"),
        pytest.param(["--model-name", "Diabetes-Ridge", "--model-version", "0"],
                     "--model-version: 0", id="version-zero"),
        pytest.param(["--model-name", "Diabetes-Ridge", "--model-version", "7"], "version 7",
                     id="unknown-version"),
    ],
)  # fmt: skip
def test_main_refuses_a_missing_or_double_reference(
    registered, tmp_path: Path, reference: list[str], message: str, caplog
) -> None:
    registry, root = registered
    reference = [str(root / "registration") if a == "REG" else a for a in reference]
    argv = [*reference, "--registry", f"local:{registry.root}", "--image-registry", "acr.io",
            "--package", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 1
    assert message in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(None, r"registration\.json not found", id="missing"),
        pytest.param('{"name": "Diabetes-Ridge", "vers', "is not valid JSON", id="truncated"),
        pytest.param("[1]", "is not a JSON object", id="not-an-object"),
        pytest.param('{"name": "Diabetes-Ridge", "sha256": "ab"}',
                     r"lacks the field\(s\) \['version'\]", id="no-version"),
        pytest.param('{"name": "Diabetes-Ridge", "version": "one", "sha256": "ab"}',
                     "version 'one' is not a registry version", id="version-not-a-number"),
        pytest.param('{"name": "Diabetes-Ridge", "version": 0, "sha256": "ab"}',
                     "version 0 is not a registry version", id="version-zero"),
    ],
)  # fmt: skip
def test_main_refuses_a_damaged_registration_in_one_line(
    registered, tmp_path: Path, content: str | None, message: str, caplog
) -> None:
    registry, _ = registered
    reg = tmp_path / "registration"
    reg.mkdir()
    if content is not None:
        (reg / "registration.json").write_text(content)
    argv = ["--registration", str(reg), "--registry", f"local:{registry.root}",
            "--image-registry", "acr.io", "--package", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 1
    [error] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert error.getMessage().startswith("packaging failed: "), error.getMessage()
    assert re.search(message, error.getMessage()), error.getMessage()
    assert not (tmp_path / "out").exists()


def test_a_damaged_model_json_is_not_packaged(registered, tmp_path: Path) -> None:
    """The model folder passed in (Azure ML: the train output) is read before anything else."""
    registry, root = registered
    folder = tmp_path / "model"
    shutil.copytree(root / "model", folder)
    (folder / "model.json").write_text('{"model_file": "model.skops"}')
    version = registry.get("Diabetes-Ridge", 1)
    without_path = type(version)(version.name, version.version, "azureml://x", version.sha256)
    with pytest.raises(ConfigError, match=r"model\.json lacks the field\(s\) \['sha256'\]"):
        build_package(without_path, tmp_path / "out", image_registry="acr.io", model_dir=folder)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        pytest.param(["diabetes-ridge"], None, id="one-folder-down"),
        pytest.param([""], None, id="flat"),
        pytest.param(["a", "b"], r"holds 2 model or package folders \(a, b\): give one of them",
                     id="two-candidates"),
        pytest.param([], r"holds neither package\.json .* nor model\.json", id="none"),
    ],
)  # fmt: skip
def test_the_registered_model_is_found_one_folder_down_as_the_other_steps_do(
    registered, tmp_path: Path, layout: list[str], message: str | None
) -> None:
    """Azure ML downloads a model asset into `<input>/<name>/`: the register step and scoring
    look one folder down (scoring.model.resolve_model_dir); the package step read
    `<input>/model.json` and failed with "not found"."""
    registry, root = registered
    given = tmp_path / "registered"
    given.mkdir()
    for sub in layout:
        shutil.copytree(root / "model", given / sub, dirs_exist_ok=True)
    version = registry.get("Diabetes-Ridge", 1)
    without_path = type(version)(version.name, version.version, "azureml://x", version.sha256)
    if message is None:
        result = build_package(
            without_path, tmp_path / "out", image_registry="acr.io", model_dir=given
        )
        manifest = json.loads((result.path / "package.json").read_text())
        assert manifest["sha256"] == version.sha256
        assert (result.path / "model" / "model.json").is_file()
        return
    with pytest.raises(ConfigError, match=message):
        build_package(without_path, tmp_path / "out", image_registry="acr.io", model_dir=given)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "library_versions", [None, ["x"], {"scikit-learn": "not a version"}], ids=str
)
def test_malformed_library_versions_are_not_packaged(
    registered, tmp_path: Path, library_versions: Any
) -> None:
    """A version registered before the register step checked them: a traceback here."""
    registry, root = registered
    folder = tmp_path / "model"
    shutil.copytree(root / "model", folder)
    record = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**record, "library_versions": library_versions}))
    version = registry.get("Diabetes-Ridge", 1)
    without_path = type(version)(version.name, version.version, "azureml://x", version.sha256)
    with pytest.raises(ConfigError, match=r"model\.json: library_versions"):
        build_package(without_path, tmp_path / "out", image_registry="acr.io", model_dir=folder)
    assert not (tmp_path / "out").exists()


def test_the_rollout_step_refuses_a_damaged_package_json(tmp_path: Path) -> None:
    (tmp_path / "package.json").write_text('{"model": "m", "vers')
    with pytest.raises(InvalidInput, match=r"^package: .*package\.json is not valid JSON"):
        read_package(tmp_path)
    (tmp_path / "package.json").write_text("[]")
    with pytest.raises(InvalidInput, match=r"^package: .*package\.json is not a JSON object"):
        read_package(tmp_path)


@pytest.mark.parametrize("version", ["1.0", "v2", "0", "-1", "²", "03", True])
def test_the_rollout_step_refuses_a_version_the_registry_cannot_hold(
    tmp_path: Path, version: object
) -> None:
    # Was a traceback (int('1.0')) on the first-release path, after the release was deployed.
    package = {"model": "m", "version": version, "sha256": "0" * 64, "image": "r/m:1"}
    (tmp_path / "package.json").write_text(json.dumps(package))
    with pytest.raises(InvalidInput, match=r"^package: .*package\.json: version .* is not a "):
        read_package(tmp_path)
    (tmp_path / "package.json").write_text(json.dumps({**package, "version": "3"}))
    assert read_package(tmp_path)["version"] == "3"


# ---- the output folder is replaced in place (Azure ML mounts it) ------------------------------


def test_packaging_again_replaces_the_content_not_the_folder(registered, tmp_path: Path) -> None:
    registry, _ = registered
    out = tmp_path / "out"
    build_package(registry.get("Diabetes-Ridge", 1), out, image_registry="r1")
    inode = out.stat().st_ino
    (out / "stale.txt").write_text("from an older package")
    (out / f"{package_module.STAGING_PREFIX}crashed").mkdir()  # a killed build's leftover
    build_package(registry.get("Diabetes-Ridge", 1), out, image_registry="r2")
    assert out.stat().st_ino == inode  # never removed nor renamed: a mount point stays put
    assert json.loads((out / "package.json").read_text())["image"] == "r2/diabetes-ridge:1"
    manifest_files = set(json.loads((out / "package.json").read_text())["files"])
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == manifest_files | {"package.json"}


@pytest.mark.parametrize(
    ("content", "refused"),
    [
        pytest.param({}, None, id="empty-folder"),
        pytest.param({"notes/todo.txt": "precious", "data.csv": "a,b"}, "['data.csv', 'notes']",
                     id="foreign-files-refused"),
        pytest.param({"data.csv": "a,b", "Dockerfile": "FROM x"}, "['data.csv']",
                     id="foreign-among-package-files-refused"),
        # a crash between removing the old package.json and writing the new one: a package's
        # entries only, which the next run replaces
        pytest.param({"Dockerfile": "FROM x", "k8s/values-blue.yaml": "", "model/model.json": "",
                      f"{package_module.STAGING_PREFIX}crashed/x": ""}, None,
                     id="half-replaced-package"),
    ],
)  # fmt: skip
def test_a_folder_that_holds_no_package_is_not_emptied(
    registered, tmp_path: Path, content: dict[str, str], refused: str | None
) -> None:
    """Run by hand into a folder holding other files, the step deleted them all."""
    registry, _ = registered
    out = tmp_path / "out"
    for name, text in content.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    if refused is None:
        build_package(registry.get("Diabetes-Ridge", 1), out, image_registry="r1")
        assert (out / "package.json").is_file()
        return
    with pytest.raises(ConfigError, match=re.escape(f"package: {out} holds {refused} and no "
                                                    "package.json")):  # fmt: skip
        build_package(registry.get("Diabetes-Ridge", 1), out, image_registry="r1")
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == set(content)


def test_the_entries_a_package_replaces_are_the_ones_it_writes(registered, tmp_path: Path) -> None:
    registry, _ = registered
    build_package(registry.get("Diabetes-Ridge", 1), tmp_path / "out", image_registry="r1")
    assert {p.name for p in (tmp_path / "out").iterdir()} == package_module.PACKAGE_ENTRIES


def test_a_crash_while_moving_leaves_no_package_that_looks_complete(
    registered, tmp_path: Path, monkeypatch
) -> None:
    registry, _ = registered
    out = tmp_path / "out"
    build_package(registry.get("Diabetes-Ridge", 1), out, image_registry="r1")
    renames = 0
    real_rename = Path.rename

    def crash_on_the_third_rename(self: Path, target: Any) -> Path:
        nonlocal renames
        renames += 1
        if renames == 3:
            raise OSError("killed")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_the_third_rename)
    with pytest.raises(OSError, match="killed"):
        build_package(registry.get("Diabetes-Ridge", 1), out, image_registry="r2")
    assert not (out / "package.json").exists()
    with pytest.raises(InvalidInput, match="run the package step first"):
        read_package(out)


def test_a_failed_build_leaves_the_old_package_intact(
    registered, tmp_path: Path, monkeypatch
) -> None:
    registry, _ = registered
    out = tmp_path / "out"
    build_package(registry.get("Diabetes-Ridge", 1), out, image_registry="r1")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def fail(*_args: Any) -> str:
        raise ComponentError("no requirements")

    monkeypatch.setattr(package_module, "requirements", fail)
    with pytest.raises(ComponentError):
        build_package(registry.get("Diabetes-Ridge", 1), out, image_registry="r2")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "x", "/mnt"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="needs a private mount namespace (unshare --mount)")
def test_the_package_step_writes_into_a_mount_point(registered, tmp_path: Path) -> None:
    """Azure ML mounts each uri_folder output (rw_mount): rename/rmdir of it fail with EBUSY."""
    registry, _ = registered
    out = tmp_path / "out"
    out.mkdir()
    step = [sys.executable, "-m", "components.package.main", "--model-name", "Diabetes-Ridge",
            "--model-version", "1", "--registry", f"local:{registry.root}",
            "--image-registry", "acr.io", "--package", str(out)]  # fmt: skip
    script = f"mount -t tmpfs out {out} && {shlex.join(step)} && ls -A {out}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    listed = done.stdout.split()
    assert "package.json" in listed and "model" in listed
    assert not [name for name in listed if name.startswith(package_module.STAGING_PREFIX)]


def test_the_image_refuses_a_request_head_over_the_cap(registered, tmp_path: Path) -> None:
    # Was: uvicorn's httptools protocol as is: a 64 MiB header value was read whole (the
    # process grew by 73 MB) and the request served; the pod binds 0.0.0.0. Run as the
    # Dockerfile's CMD runs it, from the package folder, on a socket bound here instead of its
    # `--host 0.0.0.0 --port`.
    from scoring.httpguard import MAX_HEAD_BYTES

    registry, _ = registered
    pkg = build_package(registry.get("Diabetes-Ridge", 1), tmp_path / "p", image_registry="r").path
    args = dockerfile_command(pkg)
    for option in ("--host", "--port"):
        at = args.index(option)
        del args[at : at + 2]
    with listening_socket() as listener:
        port, fd = listener.getsockname()[1], listener.fileno()
        env = {**os.environ, "PYTHONPATH": str(pkg)}
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", *args, "--fd", str(fd)],
            cwd=pkg,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=[fd],
        )
    with server:
        try:
            deadline = time.monotonic() + 60
            while True:
                assert server.poll() is None, "the image's command exited"
                assert time.monotonic() < deadline, "the image's server never became ready"
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                        break
                time.sleep(0.1)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as big:
                big.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nX-Big: ")
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    for _ in range(4 * MAX_HEAD_BYTES // 16384):
                        big.sendall(b"a" * 16384)
                answer = big.recv(4096)
            assert answer.startswith(b"HTTP/1.1 431 "), answer
            assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        finally:
            server.terminate()
        _, err = server.communicate(timeout=30)
    assert "Traceback" not in err, err
