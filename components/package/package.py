"""Turn a registered model version into a deployable package folder.

    <package>/
      model/                 the registered model folder (model.skops, model.json, sample input)
      scoring/               the `scoring` package's server modules (copied from this checkout)
      score.py               Azure ML entry (init()/run()): the scoring package's score.py
      asgi.py                the container's entry: the scoring package's FastAPI app on ./
      requirements.txt       pinned: the model's library versions + the server's libraries +
                             everything those pull in on the image (see `requirements`)
      Dockerfile             python:3.11.7-slim-bookworm, non-root, `uvicorn asgi:build --factory`
      .dockerignore          keeps a killed build's staging folder out of the image
      k8s/values-blue.yaml   values for charts/aml-rollout deploying this version as blue / green
      k8s/values-green.yaml
      package.json           {model, version, sha256, image, entry, files, ...}

The model bits are checked three ways before anything is written: the registry re-hashes the
stored version, the model file must match the version's sha256, and (when a registration record
is given) the registration's sha256. The package is built in a hidden temp folder *inside* the
output folder, then its entries are moved into place with package.json last: package.json is the
completion marker. The output folder itself is never removed or renamed — on Azure ML a
`uri_folder` output is a mount point (rw_mount), and rename(2)/rmdir(2) on it fail with EBUSY. The
old package.json is removed before any old file is, so a crash part-way leaves a folder without
package.json (the rollout step refuses it: "run the package step first"), never a mix of two
versions that looks complete; a crash while building leaves the old package as it was.

`mode="azureml"` writes the same folder, then asks Azure ML to build the serving environment
itself (`ml_client.models.package`, experimental in azure-ai-ml) with the folder as code and
score.py as the scoring script; the environment Azure ML returns is recorded in package.json.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from aml_pipelines.closure import ClosureError, closure, target_environment
from aml_pipelines.errors import ComponentError, ConfigError, IntegrityError
from aml_pipelines.fileio import fsync_dir, read_json_object, sha256_file, write_json
from aml_pipelines.registry.base import ModelVersion
from components.register.register import library_versions_of
from components.train.train import HELDOUT_FILE, TRAIN_ROWS_FILE
from scoring.cli import KEEP_ALIVE_S, SHUTDOWN_TIMEOUT_S

log = logging.getLogger(__name__)

PACKAGE_JSON = "package.json"
MODEL_SUBDIR = "model"
COLOURS = ("blue", "green")
MODES = ("local", "azureml")
#: The build folder inside the output folder (hidden; a crash's leftover goes with the next build).
STAGING_PREFIX = ".package-tmp-"
#: What a package holds at its top level: all the step removes from a folder it packages into.
PACKAGE_ENTRIES = frozenset(
    {MODEL_SUBDIR, "scoring", "score.py", "asgi.py", "requirements.txt", "Dockerfile"}
    | {".dockerignore", "k8s", PACKAGE_JSON}
)
SERVER_PORT = 8000
# Server-side modules of the scoring package that the image does not need (CLI, load generator).
_SCORING_EXCLUDED = {"cli.py", "loadgen.py"}
# Libraries the server imports, pinned to what this environment runs (and was tested with).
_SERVER_LIBRARIES = ("fastapi", "uvicorn", "orjson", "prometheus-client", "pydantic")
_EXTRAS = {"uvicorn": "[standard]"}
_MODEL_LIBRARIES = ("scikit-learn", "skops", "numpy", "scipy")

ASGI_ENTRY = '''"""Container entry: the scoring package's app serving this package folder."""

import logging
import os
from pathlib import Path

from scoring.app import create_app, exit_on_load_failure
from scoring.auth import API_KEY_ENV, api_keys_from_env

# uvicorn configures only its own loggers: without this, the line saying which model (and
# sha256) this pod loaded, the one `kubectl logs` is read for, would be dropped.
logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def build():
    """uvicorn asgi:build --factory (colour from AML_ROLLOUT_COLOUR: blue or green, default green).

    AML_ROLLOUT_API_KEY, read as `aml-rollout serve` reads it: when set, /score needs
    `Authorization: Bearer <key>` with one of its keys (separated by whitespace or commas);
    set but blank refuses to start (a secret not injected).
    Either variable wrong is one line in the log and exit status 2 (as `serve`), not a traceback.
    The model loads in the background (/healthz answers meanwhile); if it cannot load, the
    process exits with status 3 and the reason in its log, so the container is restarted.
    """
    try:
        colour = os.environ.get("AML_ROLLOUT_COLOUR") or "green"
        if colour not in ("blue", "green"):
            # Served as given, its metrics were labelled `colour="Blue"`: a query on blue read 0.
            raise ValueError(f"AML_ROLLOUT_COLOUR is {colour!r}, not 'blue' or 'green'")
        return create_app(  # which refuses a key it cannot compare (ValueError) too
            Path(__file__).parent,
            colour=colour,
            api_keys=api_keys_from_env(os.environ.get(API_KEY_ENV)),
            on_load_failure=exit_on_load_failure,
        )
    except ValueError as exc:
        logging.getLogger("asgi").critical("cannot start: %s", exc)
        raise SystemExit(2) from None
'''

# The image's Python is environment.yml's (the steps'), on a fixed Debian: `python:3.11-slim`
# took each patch release and Debian as pushed (tests/pipelines/test_environment.py).
# The image's uvicorn runs as `aml-rollout serve` does: idle connections kept KEEP_ALIVE_S (the
# proxy in front must close them first, or it answers a racing request 503 itself), no access
# log, no WebSocket protocol (no route needs it; under "auto" a POST carrying `Upgrade:
# websocket` was handed to it and never answered), and httptools with a bound on a request
# head's size and time (scoring.httpguard: a 64 MiB header was read whole, and connections that
# sent their headers a byte at a time, or nothing, were held for ever), and SHUTDOWN_TIMEOUT_S
# to answer the requests in flight once stopped (uvicorn's default waited for ever, for a body
# trickling in too; the protocol tells the app, which answers such a body 408 in time).
DOCKERFILE = """\
# Image for {model} version {version} (sha256 {sha256}).
# Build: docker build -t {image} .
FROM python:3.11.7-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 AZUREML_MODEL_DIR=/app
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
RUN useradd --uid 10001 --no-create-home scorer
USER 10001
EXPOSE {port}
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/healthz')"
CMD ["uvicorn", "asgi:build", "--factory", "--host", "0.0.0.0", "--port", "{port}", \\
     "--timeout-keep-alive", "{keep_alive}", "--timeout-graceful-shutdown", "{shutdown}", \\
     "--no-access-log", "--ws", "none", \\
     "--http", "scoring.httpguard:GuardedHttpToolsProtocol"]
"""


def _image_python(dockerfile: str) -> str:
    """The X.Y.Z of the Dockerfile's `FROM python:X.Y.Z-...`."""
    found = re.search(r"^FROM python:(\d+\.\d+\.\d+)-", dockerfile, re.MULTILINE)
    if found is None:
        raise ComponentError("the package Dockerfile does not start FROM python:X.Y.Z-...")
    return found[1]


#: The image's Python: the platform requirements.txt is pinned for.
IMAGE_PYTHON = _image_python(DOCKERFILE)


@dataclass(frozen=True)
class PackageResult:
    """The package folder written and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def image(self) -> str:
        return str(self.manifest["image"])


#: An OCI repository path component (distribution spec): lower-case alphanumerics, separated by
#: one `.`, one or two `_`, or dashes.
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
#: A registry host (a DNS name, or `localhost`), with an optional port.
_HOST = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?"
)


def image_name(image_registry: str, model: str, version: int | str) -> str:
    """`<registry>/<model>:<version>`, the model lower-cased as OCI repository names must be.

    ConfigError for what no registry would take, before anything is built: a registry that is not
    `host[:port][/path]` with a lower-case path, a model name that does not make a path component
    once lower-cased (`m.`, `a..b`), a version that is not a valid tag.
    """
    registry = image_registry.strip().rstrip("/")
    if not registry or any(c.isspace() for c in registry):
        raise ConfigError(f"image_registry: {image_registry!r} is not a registry host[/path]")
    first, *path = registry.split("/")
    # docker's rule: the first component is a host when it has a `.` or a `:`, or is localhost.
    if "." in first or ":" in first or first == "localhost":
        if not _HOST.fullmatch(first):
            raise ConfigError(f"image_registry: {first!r} is not a registry host[:port]")
    else:
        path = [first, *path]
    for component in path:
        if not _PATH_COMPONENT.fullmatch(component):
            raise ConfigError(
                f"image_registry: {component!r} is not a repository path component (lower-case "
                "letters and digits, separated by '.', '_' or '-')"
            )
    repository = model.lower()
    if not _PATH_COMPONENT.fullmatch(repository):
        raise ConfigError(
            f"model name {model!r} does not make an image repository name: lower-cased, it must "
            "be letters and digits, separated by single '.', '_' or '-'"
        )
    tag = str(version)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag):
        raise ConfigError(f"version {tag!r} is not an image tag")
    return f"{registry}/{repository}:{tag}"


def scoring_sources() -> Path:
    """The folder of the `scoring` package; it must hold score.py (the AML entry)."""
    spec = importlib.util.find_spec("scoring")
    if spec is None or spec.origin is None:
        raise ComponentError("the `scoring` package is not importable: cannot package a model")
    folder = Path(spec.origin).parent
    if not (folder / "score.py").is_file():
        raise ComponentError(
            f"{folder / 'score.py'} is missing: the scoring package must provide the score.py "
            "entry before models can be packaged"
        )
    return folder


def requirements(library_versions: dict[str, str]) -> str:
    """Pinned requirements: the model's libraries as trained, the server's as tested here, then
    everything those pull in on the image (Linux x86_64, the Dockerfile's CPython; extras such
    as uvicorn[standard] followed), each at the version this environment runs.

    A model library trained at another version than the one installed here is pinned as trained,
    but its own dependencies are named by that version's metadata, which is not here to read:
    they are left to pip when the image is built (a comment says which library, a warning is
    logged) and everything else stays pinned. Refusing instead would leave no way to package a
    model trained before the last environment upgrade. ClosureError when a pinned package
    refuses a trained version: that image would never build.
    """
    model = {
        dist: library_versions.get(dist) or metadata.version(dist) for dist in _MODEL_LIBRARIES
    }
    server = {dist: metadata.version(dist) for dist in _SERVER_LIBRARIES}
    top = [Requirement(f"{dist}=={version}") for dist, version in model.items()] + [
        Requirement(f"{dist}{_EXTRAS.get(dist, '')}=={version}") for dist, version in server.items()
    ]
    try:
        found = closure(
            top, target_environment(IMAGE_PYTHON), pinned=model, top_name="requirements.txt"
        )
    except ClosureError as exc:
        raise ClosureError(
            f"cannot pin the image's requirements: {exc} (the model's library_versions do not "
            "go with this environment's packages)",
            package=exc.package,
            installed=exc.installed,
        ) from exc
    lines = ["# the model's libraries, pinned to the versions it was trained with"]
    lines += map(str, top[: len(model)])
    lines.append("# the scoring server's libraries, pinned to the versions it was tested with")
    lines += map(str, top[len(model) :])
    lines.append(
        f"# what those pull in on the image (Linux x86_64, CPython {IMAGE_PYTHON}), pinned to the "
        "versions tested here"
    )
    for name in found.unread:
        log.warning(
            "the model was trained with %s %s, this environment runs %s: the image pins it as "
            "trained and leaves its own dependencies to pip",
            name,
            found.versions[name],
            _installed(name),
        )
        lines.append(
            f"# {name} {found.versions[name]} is not the version installed here "
            f"({_installed(name)}): its own dependencies are pip's choice\n"
            "# when the image is built; only those something else here needs are pinned below"
        )
    tops = {canonicalize_name(r.name) for r in top}
    lines += [
        f"{name}=={found.versions[name]}" for name in sorted(found.versions) if name not in tops
    ]
    return "\n".join(lines) + "\n"


def _installed(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def helm_values(colour: str, image: str, model: ModelVersion) -> str:
    """Values for charts/aml-rollout that deploy this version as `colour`.

    The chart's shape exactly: `<colour>: {image, model, version, sha256}` (a colour with an
    empty image gets no Deployment) and `containerPort`; the chart sets AML_ROLLOUT_COLOUR itself.
    `helm upgrade --install <release> charts/aml-rollout -f k8s/values-<colour>.yaml` (the
    chart's default weights send everything to green: blue alone also needs
    `--set weights.green=0,weights.blue=100`, or the chart refuses to route to a colour it
    deploys nothing for).
    """
    values = {
        colour: {
            "image": image,
            "model": model.name,
            "version": str(model.version),
            "sha256": model.sha256,
        },
        "containerPort": SERVER_PORT,
    }
    header = (
        f"# {model.name} version {model.version} as the {colour} deployment (charts/aml-rollout)\n"
    )
    return header + yaml.safe_dump(values, sort_keys=False)


def model_folder(given: Path) -> Path:
    """The model folder `given` names: itself, or the one model folder it holds one level down
    (Azure ML downloads a model asset into `<input>/<name>/`), found as the register step and
    the scoring server find it (`scoring.model.resolve_model_dir`); ConfigError naming the
    candidates when it holds several, or saying it holds none."""
    from scoring.errors import ModelLoadError
    from scoring.model import resolve_model_dir

    try:
        folder, _ = resolve_model_dir(given)
    except ModelLoadError as exc:
        raise ConfigError(f"model folder: {exc}") from None
    return folder


def build_package(
    model: ModelVersion,
    out_dir: Path,
    *,
    image_registry: str,
    model_dir: Path | None = None,
    registration: dict[str, Any] | None = None,
    mode: str = "local",
    ml_client: Any = None,
) -> PackageResult:
    """Write the package for `model` into `out_dir` (replacing the content of an existing one;
    ConfigError for a folder holding anything else, see `_check_replaceable`)."""
    if mode not in MODES:
        raise ConfigError(f"mode: {mode!r} is not one of {list(MODES)}")
    if mode == "azureml" and ml_client is None:
        raise ConfigError("mode: azureml needs a workspace (an MLClient)")
    source = model.path or (model_folder(model_dir) if model_dir is not None else None)
    if source is None:
        raise ConfigError(
            f"{model.name}:{model.version} has no local folder ({model.uri}); pass the model folder"
        )
    model_json = read_json_object(source / "model.json", required=("model_file", "sha256"))
    # Checked at registration too; a version registered before that was not.
    library_versions = library_versions_of(model_json, source / "model.json")
    model_file = source / str(model_json["model_file"])
    actual = sha256_file(model_file)
    expected = {model.sha256, str(model_json["sha256"])}
    if registration is not None:
        expected.add(str(registration["sha256"]))
    if expected != {actual}:
        raise IntegrityError(
            f"refusing to package {model.name}:{model.version}: {model_file} has sha256 {actual}, "
            f"expected {sorted(expected - {actual})}"
        )
    scoring = scoring_sources()
    image = image_name(image_registry, model.name, model.version)
    _check_replaceable(out_dir)

    out_dir.mkdir(parents=True, exist_ok=True)
    # The image's server (uid 10001) reads the folder itself too: a builder's umask 077 made
    # it 0700. An Azure ML output mount may refuse a chmod; what is inside is made readable.
    with contextlib.suppress(OSError):
        out_dir.chmod(0o755)
    staging = out_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    try:
        shutil.copytree(
            source,
            staging / MODEL_SUBDIR,
            # The held-out rows (with their targets) and the training rows' hashes serve the
            # register gate, not the server: labelled data stays out of the image.
            ignore=shutil.ignore_patterns(".registry.json", HELDOUT_FILE, TRAIN_ROWS_FILE),
        )
        (staging / "scoring").mkdir()
        for module in sorted(scoring.glob("*.py")):
            if module.name not in _SCORING_EXCLUDED:
                shutil.copy2(module, staging / "scoring" / module.name)
        shutil.copy2(scoring / "score.py", staging / "score.py")
        (staging / "asgi.py").write_text(ASGI_ENTRY, encoding="utf-8")
        (staging / "requirements.txt").write_text(requirements(library_versions), encoding="utf-8")
        (staging / "Dockerfile").write_text(
            DOCKERFILE.format(
                model=model.name,
                version=model.version,
                sha256=actual,
                image=image,
                port=SERVER_PORT,
                keep_alive=KEEP_ALIVE_S,
                shutdown=SHUTDOWN_TIMEOUT_S,
            ),
            encoding="utf-8",
        )
        # A killed build leaves its staging folder here until the next build: never in an image.
        (staging / ".dockerignore").write_text(f"{STAGING_PREFIX}*\n", encoding="utf-8")
        (staging / "k8s").mkdir()
        for colour in COLOURS:
            (staging / "k8s" / f"values-{colour}.yaml").write_text(
                helm_values(colour, image, model), encoding="utf-8"
            )
        files = {
            p.relative_to(staging).as_posix(): sha256_file(p)
            for p in sorted(staging.rglob("*"))
            if p.is_file()
        }
        manifest: dict[str, Any] = {
            "model": model.name,
            "version": str(model.version),
            "sha256": actual,
            "image": image,
            "source_uri": model.uri,
            "model_dir": MODEL_SUBDIR,
            "entry": {"aml": "score.py", "asgi": "asgi:build"},
            "port": SERVER_PORT,
            "metrics": model_json.get("metrics", {}),
            "tags": dict(model.tags),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": files,
        }
        if mode == "azureml":
            environment = _package_in_azureml(ml_client, model, staging)
            manifest["azureml_environment"] = f"{environment.name}:{environment.version}"
        write_json(staging / PACKAGE_JSON, manifest)
        _make_readable(staging)
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("packaged %s:%s as %s in %s", model.name, model.version, image, out_dir)
    return PackageResult(out_dir, manifest)


def _make_readable(folder: Path) -> None:
    """Make everything in `folder` readable by anyone, whatever the umask and mkstemp chose.

    The image copies the package as root and runs the server as uid 10001: a file only its owner
    may read (package.json was 0600, written through mkstemp) kept the model from loading there.
    """
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _check_replaceable(out_dir: Path) -> None:
    """ConfigError unless `out_dir` is missing, empty, or a package (package.json), whose content
    the new one replaces: files of anything else are not the step's to delete. A folder without
    package.json holding a package's entries only is one a crash left half-replaced."""
    if (out_dir / PACKAGE_JSON).is_file() or not out_dir.is_dir():
        return
    foreign = sorted(
        entry.name
        for entry in out_dir.iterdir()
        if entry.name not in PACKAGE_ENTRIES and not entry.name.startswith(STAGING_PREFIX)
    )
    if foreign:
        raise ConfigError(
            f"package: {out_dir} holds {foreign} and no package.json: it is not a package "
            "folder, and packaging into it would delete them; give an empty or new folder"
        )


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Replace the content of `out_dir` by the package in `staging` (a folder inside it).

    package.json goes first (out) and last (in): between the two, the folder is not a package.
    """
    (out_dir / PACKAGE_JSON).unlink(missing_ok=True)
    fsync_dir(out_dir)
    for old in out_dir.iterdir():
        if old == staging:
            continue
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    for new in sorted(staging.iterdir()):
        if new.name != PACKAGE_JSON:
            new.rename(out_dir / new.name)
    fsync_dir(out_dir)
    (staging / PACKAGE_JSON).rename(out_dir / PACKAGE_JSON)
    fsync_dir(out_dir)


def _package_in_azureml(ml_client: Any, model: ModelVersion, folder: Path) -> Any:
    """Ask Azure ML to build the serving environment from `folder` (experimental API)."""
    from aml_pipelines.pipeline import quiet_sdk

    quiet_sdk()  # `models.package` and its classes log "experimental" notices on every call
    from azure.ai.ml.entities import AzureMLOnlineInferencingServer, CodeConfiguration, ModelPackage

    request = ModelPackage(
        target_environment=f"{model.name}-serving",
        inferencing_server=AzureMLOnlineInferencingServer(
            code_configuration=CodeConfiguration(code=str(folder), scoring_script="score.py")
        ),
    )
    log.info("asking Azure ML to package %s:%s", model.name, model.version)
    return ml_client.models.package(model.name, str(model.version), request)
