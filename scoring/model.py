"""Loading a model folder and predicting with it.

A model folder (written by the train component) holds `model.skops` and `model.json` (name,
estimator, `sha256` of model.skops, `feature_names`, ...). A package folder (written by the package
component) holds `package.json` (model, version, sha256) and the model folder under `model/`.
`load_model` accepts either, checks the sha256 before deserialising anything, and loads with skops
refusing every type outside skops' defaults plus a short allow-list: a model file is code-adjacent
data and the scoring server must not run whatever a file asks for.

Prediction has two paths. Linear regressors (Ridge, LinearRegression, Lasso, ...) are served as
`X @ coef_ + intercept_` in numpy: the same arithmetic `Ridge.predict` does, without its per-call
input validation (~250 µs per call on a small box, against ~2 µs of arithmetic). Any other
estimator goes through its own `predict`. Input validation is ours (scoring.inputs) either way.
An estimator without a callable `predict`, or whose prediction of one row of zeros is not one
finite float64 (shape (1,)), refuses to load: it would say ready and then answer every request
500 (or, for a NaN, 422, which would hide the broken model from the judge).

This module imports numpy at top level and sklearn/skops only inside `load_model`, so score.py
stays importable cheaply and the package never imports the rollout engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from scoring.errors import IntegrityError, ModelLoadError, UntrustedTypesError

log = logging.getLogger(__name__)

MODEL_JSON = "model.json"
PACKAGE_JSON = "package.json"
DEFAULT_VERSION = "0"

# Types we accept beyond skops' own trusted defaults (which already cover scikit-learn estimators
# and numpy arrays). Anything else in a file refuses the load; callers may extend this explicitly.
ALLOWED_EXTRA_TYPES: frozenset[str] = frozenset(
    {
        "numpy.dtype",
        "numpy.float64",
        "numpy.float32",
        "numpy.int64",
        "numpy.int32",
        "numpy.bool_",
        "numpy.random._generator.Generator",
        "numpy.random._pcg64.PCG64",
        "numpy.random.mtrand.RandomState",
    }
)

FloatArray = npt.NDArray[np.float64]


class Predictor(Protocol):
    """Turns a validated (n_rows, n_features) float64 array into n_rows predictions."""

    def predict(self, x: FloatArray) -> FloatArray:
        """Predictions for every row of `x` (already validated: finite, right width)."""
        ...


@dataclass(frozen=True, slots=True)
class LinearPredictor:
    """`x @ coef + intercept`, the arithmetic of sklearn's LinearModel.predict without checks."""

    coef: FloatArray
    intercept: FloatArray | float

    def predict(self, x: FloatArray) -> FloatArray:
        """Predictions for every row of `x`."""
        out: FloatArray = x @ self.coef + self.intercept
        return out


@dataclass(frozen=True, slots=True)
class EstimatorPredictor:
    """Any estimator with a `predict` method (the slow, general path)."""

    estimator: Any

    def predict(self, x: FloatArray) -> FloatArray:
        """Predictions for every row of `x`."""
        return np.asarray(self.estimator.predict(x), dtype=np.float64)


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """What a server says it serves: shown by GET /score and used as metric labels."""

    name: str
    version: str
    sha256: str
    estimator: str


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A verified, deserialised model ready to predict."""

    identity: ModelIdentity
    feature_names: tuple[str, ...]
    predictor: Predictor
    estimator: Any
    model_dir: Path

    @property
    def n_features(self) -> int:
        """How many numbers each input row must hold."""
        return len(self.feature_names)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} not found") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def resolve_model_dir(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """The model folder inside `path` and the package metadata, if `path` is a package.

    Accepts a package folder (package.json + model/), a bare model folder (model.json) or a
    folder holding exactly one of those (Azure ML mounts a registered folder under
    AZUREML_MODEL_DIR/<name>).
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model dir {path} does not exist or is not a folder")
    if (path / PACKAGE_JSON).is_file():
        return path / "model", _read_json(path / PACKAGE_JSON)
    if (path / MODEL_JSON).is_file():
        return path, None
    children = [c for c in sorted(path.iterdir()) if c.is_dir()]
    candidates = [c for c in children if (c / PACKAGE_JSON).is_file() or (c / MODEL_JSON).is_file()]
    if len(candidates) == 1:
        return resolve_model_dir(candidates[0])
    if candidates:  # e.g. a demo's packages/<model>/, one package per version
        names = ", ".join(c.name for c in candidates)
        raise ModelLoadError(
            f"{path} holds {len(candidates)} model or package folders ({names}): give one of them"
        )
    raise ModelLoadError(
        f"{path} holds neither {PACKAGE_JSON} (package folder) nor {MODEL_JSON} (model folder)"
    )


def recorded_sha256(path: Path) -> tuple[Path, str | None]:
    """The model.json of the model folder in `path` (a package or model folder, as
    `resolve_model_dir` finds it) and the sha256 it records; None when it cannot be read or
    names none (the server's own load says why)."""
    try:
        folder, _ = resolve_model_dir(path)
        found = _read_json(folder / MODEL_JSON).get("sha256")
    except ModelLoadError:
        return Path(path) / MODEL_JSON, None
    return folder / MODEL_JSON, found if isinstance(found, str) else None


def _predictor_for(estimator: Any) -> Predictor:
    from sklearn.base import is_regressor
    from sklearn.linear_model._base import LinearModel

    coef = getattr(estimator, "coef_", None)
    if (
        isinstance(estimator, LinearModel)
        and is_regressor(estimator)
        and isinstance(coef, np.ndarray)
        and coef.ndim == 1
    ):
        intercept = estimator.intercept_
        return LinearPredictor(
            coef=np.ascontiguousarray(coef, dtype=np.float64),
            intercept=float(intercept) if np.ndim(intercept) == 0 else np.asarray(intercept),
        )
    return EstimatorPredictor(estimator)


def _smoke_test(predictor: Predictor, n_features: int, model_file: Path) -> None:
    """Predict one row of zeros: a model that cannot answer it must not load and say ready.

    Otherwise /readyz would say 200 and every request fail with 500 (a classifier with string
    labels, a multi-output regressor, a predict that needs other input), or with 422 (NaN or
    infinite parameters: a non-finite prediction is taken for an input beyond the model's range).
    """
    try:
        out = predictor.predict(np.zeros((1, n_features), dtype=np.float64))
    except Exception as exc:  # whatever the estimator raises, it is the model's fault
        raise ModelLoadError(
            f"{model_file}: cannot predict one row of {n_features} zeros "
            f"({type(exc).__name__}: {exc}); a scoring model must return one number per row"
        ) from exc
    if not isinstance(out, np.ndarray) or out.dtype != np.float64 or out.shape != (1,):
        shape = getattr(out, "shape", None)
        raise ModelLoadError(
            f"{model_file}: predicting one row gave {type(out).__name__} of shape {shape}, "
            "expected one float per row (shape (1,))"
        )
    if not np.isfinite(out).all():
        # NaN or infinite coefficients, intercept or leaves: every answer would be refused as
        # "out of the model's numeric range", a 422 the judge does not count against the model.
        raise ModelLoadError(
            f"{model_file}: predicting one row of {n_features} zeros gave {out[0]}, "
            "not a finite number (NaN or infinite parameters?)"
        )


def load_model(
    path: Path | str,
    *,
    version: str | None = None,
    extra_trusted: Iterable[str] = (),
) -> LoadedModel:
    """Verify and load the model under `path` (a package or a model folder).

    Raises IntegrityError when model.skops does not match model.json's sha256 (or the package's),
    UntrustedTypesError when the file holds types beyond skops' defaults, ALLOWED_EXTRA_TYPES and
    `extra_trusted`, ModelLoadError for anything else missing or malformed. `version` overrides
    the version read from package.json ("0" for a bare model folder).
    """
    import skops.io as sio

    model_dir, package = resolve_model_dir(Path(path))
    meta = _read_json(model_dir / MODEL_JSON)
    name = meta.get("name")
    features = meta.get("feature_names")
    expected_sha = meta.get("sha256")
    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"{model_dir / MODEL_JSON}: field 'name' must be a non-empty string")
    if (
        not isinstance(features, list)
        or not features
        or not all(isinstance(f, str) for f in features)
    ):
        raise ModelLoadError(
            f"{model_dir / MODEL_JSON}: field 'feature_names' must be a non-empty list of strings"
        )
    if not isinstance(expected_sha, str) or len(expected_sha) != 64:
        raise ModelLoadError(f"{model_dir / MODEL_JSON}: field 'sha256' must be a hex sha256")
    named = str(meta.get("model_file", "model.skops"))
    model_file = model_dir / named
    if not model_file.resolve().is_relative_to(model_dir.resolve()):
        # It would load here and nowhere else: the package copies the folder, not its outside.
        raise ModelLoadError(
            f"{model_dir / MODEL_JSON}: field 'model_file' must name a file in the folder, "
            f"not {named!r}"
        )
    if not model_file.is_file():
        raise ModelLoadError(f"model file {model_file} not found")

    try:
        actual_sha = sha256_of(model_file)
    except OSError as exc:  # e.g. a file the server's user may not read
        raise ModelLoadError(f"cannot read model file {model_file}: {exc.strerror or exc}") from exc
    if actual_sha != expected_sha.lower():
        raise IntegrityError(
            f"refusing to load {model_file}: sha256 is {actual_sha}, "
            f"but {MODEL_JSON} records {expected_sha}"
        )
    if package is not None and package.get("sha256") not in (None, "", actual_sha):
        raise IntegrityError(
            f"refusing to load {model_file}: sha256 is {actual_sha}, "
            f"but {PACKAGE_JSON} records {package.get('sha256')}"
        )

    try:
        untrusted = sio.get_untrusted_types(file=model_file)
    except Exception as exc:  # skops raises a variety of errors on a corrupt file
        raise ModelLoadError(f"{model_file}: not a readable skops file ({exc})") from exc
    allowed = ALLOWED_EXTRA_TYPES | frozenset(extra_trusted)
    refused = sorted(set(untrusted) - allowed)
    if refused:
        raise UntrustedTypesError(
            f"refusing to load {model_file}: it holds untrusted types {refused} "
            "(pass them as extra trusted types only if you know where the file comes from)"
        )
    try:
        estimator = sio.load(model_file, trusted=list(untrusted) or None)
    except Exception as exc:
        raise ModelLoadError(f"{model_file}: cannot deserialise ({exc})") from exc
    n_in = getattr(estimator, "n_features_in_", len(features))
    if n_in != len(features):
        raise ModelLoadError(
            f"{model_file}: estimator expects {n_in} features, model.json lists {len(features)}"
        )

    if version is None:
        version = str(package.get("version", DEFAULT_VERSION)) if package else DEFAULT_VERSION
    identity = ModelIdentity(
        name=str(package.get("model", name)) if package else name,
        version=version,
        sha256=actual_sha,
        estimator=type(estimator).__name__,
    )
    if not callable(getattr(estimator, "predict", None)):
        raise ModelLoadError(
            f"{model_file}: a {type(estimator).__name__} has no predict method, "
            "so it cannot score (is this a transformer rather than a model?)"
        )
    predictor = _predictor_for(estimator)
    _smoke_test(predictor, len(features), model_file)
    log.info(
        "loaded model %s version %s (%s, sha256 %s, %s path)",
        identity.name,
        identity.version,
        identity.estimator,
        actual_sha[:12],
        "linear fast" if isinstance(predictor, LinearPredictor) else "estimator",
    )
    return LoadedModel(
        identity=identity,
        feature_names=tuple(features),
        predictor=predictor,
        estimator=estimator,
        model_dir=model_dir,
    )
