"""The scoring core shared by the FastAPI server and score.py: body bytes in, answer dict out.

`Scorer.score(body)` validates (scoring.inputs), predicts (scoring.model) and returns
`{"predictions": [...], "model": name, "version": v, "colour": c}`. Predictions that come out
non-finite (inputs near the float limits) are refused as a 422 rather than sent as JSON null.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from scoring.errors import InputError
from scoring.inputs import DEFAULT_MAX_ROWS, parse_rows
from scoring.model import LoadedModel


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
            predictions = self.model.predictor.predict(x)
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
