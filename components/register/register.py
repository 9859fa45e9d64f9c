"""Register a trained model folder after the gate: the library behind the register component.

    model folder ──► check sha256 ──► find production (tag stage=production) and a rolled-back
                  version with the same sha256 ──► gate
                  (measured on other data: both re-scored on the candidate's heldout.csv rows
                   that production did not train on (its train-rows.u64), production loaded as
                   the scoring server loads it)
                                                          refused: GateRefused (unless force)
                  ──► registry.register(name, source, tags) ──► registration.json

Tags written on the new version: its metrics (mse, rmse, r2), `stage=candidate`, `source_run`,
`git_commit`, `sha256`, `data_fingerprint`, `eval_fingerprint` (when model.json has it: the next
gate compares only metrics measured on the same held-out data, see gate.py) and the gate outcome
(`gate=passed|forced`, `gate_baseline`). Re-running the step in the same run (same `source_run`)
with the same bits registers nothing new: registration.json names the version that run
registered before (given `rollout_by=pipeline-job` if this attempt's job rolls it out; a
candidate loses the tag if it does not). The
registry itself is injected, so the same code runs against the local folder registry and Azure
ML; `source` lets Azure ML register the job-output URI of the folder instead of uploading local
files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aml_pipelines.errors import ConfigError, GateRefused, IntegrityError, RegistryError
from aml_pipelines.fileio import read_json_object, sha256_file, write_json
from aml_pipelines.registry.base import (
    ROLLOUT_BY_JOB,
    ROLLOUT_BY_TAG,
    STAGE_TAG,
    ModelRegistry,
    ModelVersion,
    Stage,
)
from components.register.gate import (
    DATA_FINGERPRINT,
    EVAL_FINGERPRINT,
    LOWER_IS_BETTER,
    GateDecision,
    Rescored,
    comparability,
    evaluate_gate,
)

if TYPE_CHECKING:
    import numpy as np

    from components.train.train import Dataset
    from scoring.model import LoadedModel

log = logging.getLogger(__name__)

REGISTRATION_FILE = "registration.json"
#: The model.json fields this step relies on (the model-folder contract, components/train).
MANIFEST_FIELDS = ("name", "model_file", "sha256", "metrics")


@dataclass(frozen=True)
class Registration:
    """What the register step produced: the new version and the gate's reasoning."""

    version: ModelVersion
    decision: GateDecision
    forced: bool

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.version.name,
            "version": self.version.version,
            "uri": self.version.uri,
            "sha256": self.version.sha256,
            "stage": self.version.stage,
            "gate": {
                "passed": self.decision.passed,
                "forced": self.forced,
                "metric": self.decision.metric,
                "candidate": self.decision.candidate,
                "baseline": self.decision.baseline,
                "baseline_version": self.decision.baseline_version,
                "reason": self.decision.reason,
                "comparable": self.decision.comparable,
            },
        }


def library_versions_of(manifest: Mapping[str, object], path: Path) -> dict[str, str]:
    """model.json's `library_versions` (`{}` when absent), each a PEP 440 version string:
    ConfigError naming the field otherwise (the package step pins the image's libraries to them,
    and the register step refuses the folder before it is registered). `python` is any string:
    it is never pinned (the image has its own CPython), and a Python built from source says
    "3.13.0a1+", no PEP 440 version."""
    from packaging.version import InvalidVersion, Version

    versions = manifest.get("library_versions", {})
    if not isinstance(versions, dict):
        raise ConfigError(
            f"{path}: library_versions must be an object of library names and versions, "
            f"not {versions!r}"
        )
    for library, version in versions.items():
        if library == "python" and isinstance(version, str):
            continue
        try:
            if not isinstance(version, str):
                raise InvalidVersion
            Version(version)
        except InvalidVersion:
            raise ConfigError(
                f"{path}: library_versions.{library} is {version!r}, not a version (PEP 440, "
                'such as "1.5.2")'
            ) from None
    return dict(versions)


def check_case_twin(registry: ModelRegistry, name: str) -> None:
    """ConfigError when the registry holds a model whose name differs from `name` only in case:
    image repositories are lower case, so both would package as one image (package.image_name),
    each push overwriting the other's and a rollout of one serving the other's model."""
    twins = [other for other in registry.names() if other != name and other.lower() == name.lower()]
    if twins:
        raise ConfigError(
            f"model name {name!r} differs from the registered {twins[0]!r} only in case: both "
            f"would package as the image repository {name.lower()!r}; name the model otherwise"
        )


def production_version(registry: ModelRegistry, name: str) -> ModelVersion | None:
    """The version tagged stage=production (the highest, if several carry the tag)."""
    tagged = registry.find_by_tag(name, STAGE_TAG, Stage.PRODUCTION)
    if len(tagged) > 1:
        log.warning(
            "%d versions of %s are tagged production (%s); comparing with the highest",
            len(tagged),
            name,
            [v.version for v in tagged],
        )
    return max(tagged, key=lambda v: v.version, default=None)


def rolled_back_version(registry: ModelRegistry, name: str, sha256: str) -> ModelVersion | None:
    """The latest version tagged stage=rolled-back whose model has these bits, if any."""
    rolled_back = registry.find_by_tag(name, STAGE_TAG, Stage.ROLLED_BACK)
    return max(
        (v for v in rolled_back if v.sha256 == sha256), key=lambda v: v.version, default=None
    )


def _registered_by(
    registry: ModelRegistry, name: str, source_run: str, sha256: str
) -> ModelVersion | None:
    """The version this same run registered with these bits, if any (a re-run of the step).

    A step re-run after it registered (killed before registration.json was written, a retried
    node, `run-local --run-dir` again) must not add a second version of the same model.
    """
    if source_run == "unknown":
        return None
    earlier = registry.find_by_tag(name, "source_run", source_run)
    return max((v for v in earlier if v.sha256 == sha256), key=lambda v: v.version, default=None)


#: Fewer held-out rows left than this and the comparison is not made (refused as not
#: comparable): an mse over a handful of rows is decided by their few largest residuals.
MIN_RESCORE_ROWS = 30


def rescore_production(
    production: ModelVersion, model_dir: Path, metric: str, folder: Path | None = None
) -> Rescored:
    """Both models' `metric` on the held-out rows neither trained on, or why not.

    Those are the candidate's held-out rows (heldout.csv) that production did not train on, a
    row being its whole content (features and target): with another split or data many of the
    candidate's held-out rows may be production's training rows, on which production scores
    better than on rows it never saw. Production's training rows are its folder's
    train-rows.u64; a folder without one (trained before it was written) leaves only the rows
    its heldout.csv holds too (fair, but a data refresh's new rows are not among them). Fewer
    than MIN_RESCORE_ROWS left: not scored.

    Production's model is loaded as the scoring server loads it (sha256 checked, skops with the
    trusted-types allow-list), so a file the server would refuse is not run here either. It is
    loaded from `folder` (the step's `production_model` input: production's files, which Azure
    ML mounts, its registry downloading none) when given, else from the registry's own folder.
    A given folder is trusted only if its model is `production`'s registered sha256: the
    pipeline bound the version that was production at submission, which may have changed since.
    A given folder refused falls back to the registry's own folder, when that is another one.
    """
    from components.train.train import held_out_metrics, load_held_out, load_train_rows
    from scoring.errors import ModelLoadError
    from scoring.model import load_model

    label = f"{production.name}:{production.version}"
    try:
        rows = load_held_out(model_dir)
    except (ConfigError, OSError, ValueError) as exc:
        return Rescored(None, why_not=f"the candidate's held-out rows: {exc}")
    registry_folder = Path(production.path) if production.path is not None else None
    loaded: tuple[LoadedModel, Path] | None = None
    refused = None
    if folder is not None:
        loaded, refused = _load_production(production, folder, "the production_model folder")
        if loaded is None and registry_folder is not None and not _same(folder, registry_folder):
            log.warning("%s; re-scoring from the registry's folder instead", refused)
            loaded, refused = _load_production(production, registry_folder)
    elif registry_folder is not None:
        loaded, refused = _load_production(production, registry_folder)
    else:
        refused = (
            f"{label} has no local folder to load its model from (the registry "
            "downloads none) and the step's production_model input is not bound"
        )
    if loaded is None:
        return Rescored(None, why_not=str(refused))
    model, where = loaded
    if list(model.feature_names) != rows.feature_names:
        return Rescored(
            None,
            why_not=f"{label} takes the features {list(model.feature_names)}, the candidate's "
            f"rows have {rows.feature_names}",
        )
    try:
        trained_on = load_train_rows(where)
    except (ConfigError, OSError) as exc:
        return Rescored(None, why_not=f"{label}'s training rows: {exc}")
    held_out = len(rows.target)
    if trained_on is not None:
        unseen = _not_trained_on(trained_on, rows)
        kept = f"not trained on by {label}"
    else:
        try:
            theirs = load_held_out(where)
        except (ConfigError, OSError, ValueError) as exc:
            return Rescored(
                None, why_not=f"{label}'s held-out rows (the ones it did not train on): {exc}"
            )
        columns = [*rows.feature_names, rows.target_name]
        if [*theirs.feature_names, theirs.target_name] != columns:
            return Rescored(
                None,
                why_not=f"{label}'s held-out rows have the columns "
                f"{[*theirs.feature_names, theirs.target_name]}, the candidate's {columns}",
            )
        unseen = _held_out_by(theirs, rows)
        kept = (
            f"held out by {label} too (the others it trained on, or cannot be told not to have: "
            f"its folder has no training rows)"
        )
    if unseen.sum() < MIN_RESCORE_ROWS:
        return Rescored(
            None,
            rows=int(unseen.sum()),
            held_out=held_out,
            why_not=f"only {int(unseen.sum())} of the candidate's {held_out} held-out rows were "
            f"{kept}: fewer than the {MIN_RESCORE_ROWS} a fair comparison needs",
        )
    features, target = rows.features[unseen], rows.target[unseen]
    try:
        candidate_model = load_model(model_dir, version="candidate")
    except ModelLoadError as exc:
        return Rescored(None, why_not=f"the candidate's model cannot be loaded: {exc}")
    scores = []
    for who, predictor in ((label, model.predictor), ("the candidate", candidate_model.predictor)):
        try:
            scores.append(held_out_metrics(target, predictor.predict(features))[metric])
        except Exception as exc:  # whatever the estimator raises, it cannot be scored
            return Rescored(None, why_not=f"{who} cannot predict the rows ({exc})")
    return Rescored(scores[0], scores[1], rows=len(target), held_out=held_out)


def _not_trained_on(trained_on: np.ndarray, candidate: Dataset) -> np.ndarray:
    """Which of the candidate's held-out rows are not among production's training rows
    (`trained_on`: their sorted row hashes)."""
    import numpy as np

    from components.train.train import row_hashes

    hashes = row_hashes(candidate.features, candidate.target)
    at = np.minimum(np.searchsorted(trained_on, hashes), len(trained_on) - 1)
    return np.asarray(trained_on[at] != hashes)


def _held_out_by(production: Dataset, candidate: Dataset) -> np.ndarray:
    """Which of the candidate's held-out rows production held out too (a row: its `row_hashes`,
    the identity train-rows.u64 holds)."""
    import numpy as np

    from components.train.train import row_hashes

    theirs = row_hashes(production.features, production.target)
    return np.isin(row_hashes(candidate.features, candidate.target), theirs)


def _load_production(
    production: ModelVersion, where: Path, given: str | None = None
) -> tuple[tuple[LoadedModel, Path], None] | tuple[None, str]:
    """Production's model loaded from `where` (and the model folder it loaded from: `where`,
    or the one model folder `where` holds, as Azure ML may mount it), or why not: `given` names
    a folder the step was given (None: the registry's own folder, named after the version)."""
    from scoring.errors import ModelLoadError
    from scoring.model import load_model

    label = f"{production.name}:{production.version}"
    try:
        loaded = load_model(where, version=str(production.version))
    except ModelLoadError as exc:
        return None, f"{given or label} cannot be loaded: {exc}"
    if loaded.identity.sha256 == production.sha256:
        return (loaded, loaded.model_dir), None
    if given is None:
        return None, f"{label}'s model file is not the registered sha256 {production.sha256}"
    return None, (
        f"{given} holds the model with sha256 {loaded.identity.sha256[:12]}…, not {label}'s "
        f"registered sha256 {production.sha256[:12]}… (production changed since the job was "
        "submitted, or the folder is another model's)"
    )


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name one folder (run-local binds the registry's own folder)."""
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def register_model(
    model_dir: Path,
    registry: ModelRegistry,
    *,
    metric: str = "mse",
    max_regression: float = 0.0,
    force: bool = False,
    rollout_in_job: bool = False,
    source: str | Path | None = None,
    source_run: str = "unknown",
    git_commit: str = "unknown",
    out_dir: Path | None = None,
    production_model: Path | None = None,
) -> Registration:
    """Gate the model folder against production, register it, write registration.json.

    `production_model`: a folder holding production's model files (the pipeline binds the
    version production was at submission; see rescore_production), to re-score production
    from when the registry has no folder of its own (Azure ML) or as well as it.

    `rollout_in_job`: the job running this step rolls the version out itself (the training
    pipeline's rollout step); the version is tagged `rollout_by=pipeline-job` so that a trigger
    watching the same registry does not start a second rollout of it.
    """
    model_json = model_dir / "model.json"
    if not model_json.is_file():
        raise RegistryError(f"{model_dir} is not a model folder: model.json is missing")
    if out_dir is not None:
        # Before registering: a version registered without its registration.json is a version
        # the rest of the pipeline never hears of.
        out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_json_object(model_json, required=MANIFEST_FIELDS)
    metrics = manifest["metrics"]
    if not isinstance(metrics, dict):
        raise ConfigError(f"{model_json}: metrics must be an object, got {metrics!r}")
    for key in LOWER_IS_BETTER:
        if key in metrics and (
            isinstance(metrics[key], bool) or not isinstance(metrics[key], int | float)
        ):
            raise ConfigError(f"{model_json}: metrics.{key} is {metrics[key]!r}, not a number")
    library_versions_of(manifest, model_json)
    name = str(manifest["name"])
    model_file = model_dir / str(manifest["model_file"])
    if not model_file.is_file():
        raise RegistryError(f"{model_dir}: model file {manifest['model_file']!r} is missing")
    actual = sha256_file(model_file)
    if actual != manifest["sha256"]:
        raise IntegrityError(
            f"{model_file} has sha256 {actual}, but model.json records {manifest['sha256']}"
        )

    fingerprints = {
        key: str(manifest[key]) for key in (EVAL_FINGERPRINT, DATA_FINGERPRINT) if manifest.get(key)
    }
    production = production_version(registry, name)
    # A re-run of the step that registered production's model is not a new candidate of it.
    rerun = (
        production is not None
        and source_run != "unknown"
        and production.tags.get("source_run") == source_run
    )
    rescored = None
    if (
        production is not None
        and production.sha256 != actual
        and comparability(fingerprints, production.tags)[0] is False
    ):
        rescored = rescore_production(production, model_dir, metric, production_model)
    decision = evaluate_gate(
        metrics,
        production,
        metric=metric,
        max_regression=max_regression,
        fingerprints=fingerprints,
        sha256=None if rerun else actual,
        rescored=rescored,
        rolled_back=rolled_back_version(registry, name, actual),
    )
    if decision.passed and decision.comparable is None and production is not None:
        log.warning("gate passed, comparison UNCHECKED: %s", decision.reason)
    elif decision.passed:
        log.info("gate passed: %s", decision.reason)
    elif force:
        log.warning("gate REFUSED but --force given, registering anyway: %s", decision.reason)
    else:
        raise GateRefused(f"gate refused {name}: {decision.reason} (use --force to override)")

    tags = {
        **{key: repr(float(metrics[key])) for key in ("mse", "rmse", "r2") if key in metrics},
        STAGE_TAG: Stage.CANDIDATE,
        "source_run": source_run,
        "git_commit": git_commit,
        "sha256": actual,
        DATA_FINGERPRINT: str(manifest.get(DATA_FINGERPRINT, "")),
        **(
            {EVAL_FINGERPRINT: fingerprints[EVAL_FINGERPRINT]}
            if EVAL_FINGERPRINT in fingerprints
            else {}
        ),
        "gate": "passed" if decision.passed else "forced",
        "gate_metric": metric,
    }
    if rollout_in_job:
        tags[ROLLOUT_BY_TAG] = ROLLOUT_BY_JOB
    if decision.baseline_version is not None:
        tags["gate_baseline"] = f"{name}:{decision.baseline_version}"
    if (version := _registered_by(registry, name, source_run, actual)) is not None:
        log.info(
            "%s version %s holds this model already, registered by this run (%s): "
            "not registering it again",
            name,
            version.version,
            source_run,
        )
        if rollout_in_job and version.tags.get(ROLLOUT_BY_TAG) != ROLLOUT_BY_JOB:
            # Registered by an earlier attempt that left delivery to the triggers (`run-local
            # --until package`); this job's rollout step delivers it now: the triggers must not.
            version = registry.set_tags(name, version.version, {ROLLOUT_BY_TAG: ROLLOUT_BY_JOB})
            log.info(
                "%s version %s tagged %s=%s", name, version.version, ROLLOUT_BY_TAG, ROLLOUT_BY_JOB
            )
        elif (
            not rollout_in_job
            and version.stage == Stage.CANDIDATE
            and version.tags.get(ROLLOUT_BY_TAG) == ROLLOUT_BY_JOB
        ):
            # Tagged by an earlier attempt whose job was to roll it out (`run-local --until
            # rollout`, its rollout step failed); nothing in this one does: with the tag kept
            # the triggers skip it, and no one ever delivered it.
            version = registry.set_tags(name, version.version, {ROLLOUT_BY_TAG: ""})
            log.info(
                "%s version %s: tag %s=%s removed: nothing in this run rolls it out, the "
                "triggers deliver it (one that closed it as skipped already does not)",
                name,
                version.version,
                ROLLOUT_BY_TAG,
                ROLLOUT_BY_JOB,
            )
    else:
        check_case_twin(registry, name)
        version = registry.register(name, source if source is not None else model_dir, tags)
        log.info("registered %s version %s (%s) at %s", name, version.version, metric, version.uri)
    registration = Registration(version, decision, forced=not decision.passed)
    if out_dir is not None:
        write_json(out_dir / REGISTRATION_FILE, registration.as_json())
    return registration
