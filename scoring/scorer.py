"""The scoring core shared by the FastAPI server and score.py: body bytes in, answer dict out.

`Scorer.score(body)` validates (scoring.inputs), predicts (scoring.model) and returns
`{"predictions": [...], "model": name, "version": v, "colour": c}`. Predictions that come out
non-finite (inputs near the float limits) are refused as a 422 rather than sent as JSON null.
So is a finite value beyond float32's range given to an estimator that computes in float32
(trees, gradient boosting): its own validation refuses it with a ValueError, which is the
input's fault; any other exception from the model stays a 500.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from scoring.errors import InputError
from scoring.inputs import DEFAULT_MAX_ROWS, parse_rows
from scoring.model import LoadedModel

_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True, slots=True)
class Scorer:
    """Scores request bodies with one loaded model on behalf of one colour."""

    model: LoadedModel
    colour: str
    max_rows: int = DEFAULT_MAX_ROWS

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
            except ValueError:
                too_large = np.abs(x) > _FLOAT32_MAX
                if not too_large.any():
                    raise  # the model's failure, not the input's: a counted 500
                i, j = np.argwhere(too_large)[0]
                raise InputError(
                    f"data[{i}][{j}] is too large for this model, which computes in float32 "
                    f"(at most {_FLOAT32_MAX:.4g} in magnitude)"
                ) from None
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
