"""The scoring core shared by the FastAPI server and score.py: body bytes in, answer dict out.

`Scorer.score(body)` validates (scoring.inputs), predicts (scoring.model) and returns
`{"predictions": [...], "model": name, "version": v, "colour": c}`. Predictions that come out
non-finite (inputs near the float limits) are refused as a 422 rather than sent as JSON null.
So is an input that drives a step of the model out of its numeric range: scikit-learn's own
validation then refuses the step's input with a ValueError ("Input X contains infinity or a
value too large for dtype('float32')", or NaN), which is the input's fault, since the rows are
finite and the model scored a row of zeros at load. A tree or gradient boosting computes in
float32, so a value beyond ±3.4e38 does it; so does a scaler that pushes 1e38 past float32's
range, or 1e307 past float64's. Any other exception from the model stays a (counted) 500.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from scoring.errors import InputError
from scoring.inputs import DEFAULT_MAX_ROWS, parse_rows
from scoring.model import FloatArray, LinearPredictor, LoadedModel

_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: scikit-learn's finiteness check (sklearn.utils.validation._assert_all_finite_element_wise).
_NOT_FINITE = re.compile(r"Input (X )?contains (NaN|infinity or a value too large)")


def _out_of_range(exc: ValueError) -> bool:
    return _NOT_FINITE.match(str(exc)) is not None


def _first_failing_row(predict: Callable[[FloatArray], Any], x: FloatArray) -> int | None:
    """The first row of `x` that `predict` refuses as out of range, by bisection (~log2 calls).

    None if no single row fails alone (rows are scored independently, so not expected).
    """
    lo, hi = 0, len(x)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            predict(x[lo:mid])
        except ValueError as exc:
            if not _out_of_range(exc):
                raise
            hi = mid
        else:
            lo = mid
    try:
        predict(x[lo:hi])
    except ValueError as exc:
        if _out_of_range(exc):
            return lo
        raise
    return None


@dataclass(frozen=True, slots=True)
class Scorer:
    """Scores request bodies with one loaded model on behalf of one colour."""

    model: LoadedModel
    colour: str
    max_rows: int = DEFAULT_MAX_ROWS

    @property
    def inline(self) -> bool:
        """Whether scoring is cheap enough to run on the event loop: the linear fast path.

        Any other estimator's predict can take tens of milliseconds (a forest, a pipeline) and
        must not hold the loop: the server runs it on its predict thread.
        """
        return isinstance(self.model.predictor, LinearPredictor)

    def identity(self) -> dict[str, Any]:
        """What GET /score answers: the model identity and the colour serving it."""
        ident = self.model.identity
        return {
            "model": ident.name,
            "version": ident.version,
            "colour": self.colour,
            "sha256": ident.sha256,
            "estimator": ident.estimator,
            "feature_names": list(self.model.feature_names),
        }

    def score(self, body: bytes | str) -> dict[str, Any]:
        """Predictions for a request body; InputError (4xx) for anything that cannot be scored."""
        x = parse_rows(body, self.model.n_features, self.max_rows)
        with np.errstate(all="ignore"):
            try:
                predictions = self.model.predictor.predict(x)
            except ValueError as exc:
                if not _out_of_range(exc):
                    raise  # the model's failure, not the input's: a counted 500
                raise self._out_of_range_error(x, str(exc)) from None
        if not np.isfinite(predictions).all():
            row = int(np.argwhere(~np.isfinite(predictions))[0][0])
            raise InputError(
                f"data[{row}] is out of the model's numeric range (prediction overflows)"
            )
        ident = self.model.identity
        return {
            "predictions": predictions.tolist(),
            "model": ident.name,
            "version": ident.version,
            "colour": self.colour,
        }

    def _out_of_range_error(self, x: FloatArray, message: str) -> InputError:
        """The 422 for rows that drive the model out of its range, naming the first such row."""
        with np.errstate(all="ignore"):
            row = _first_failing_row(self.model.predictor.predict, x)
        if row is None:
            return InputError("data drives the model outside its numeric range")
        too_large = np.abs(x[row]) > _FLOAT32_MAX
        if "float32" in message and too_large.any():
            j = int(np.argmax(too_large))
            return InputError(
                f"data[{row}][{j}] is too large for this model, which computes in float32 "
                f"(at most {_FLOAT32_MAX:.4g} in magnitude)"
            )
        return InputError(
            f"data[{row}] drives the model outside its numeric range "
            "(a value overflows inside the model)"
        )
