"""The plain FastAPI + uvicorn reference the scoring benchmark compares against.

What a careful engineer writes in ten minutes: a pydantic request model, `Ridge.predict` on the
parsed rows, a dict back. Same model file (skops, same trust rules) and the same uvicorn settings
as `aml-rollout serve` (httptools, uvloop, access log off, one worker), so the difference measured
is the request path, not the setup. Run with
`uvicorn benchmarks.reference_server:create --factory` and `REFERENCE_MODEL_DIR` set.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel

from scoring.model import load_model


class ScoreRequest(BaseModel):
    """Rows of features."""

    data: list[list[float]]


def create() -> FastAPI:
    """The reference app for the model in REFERENCE_MODEL_DIR."""
    model = load_model(os.environ["REFERENCE_MODEL_DIR"])
    estimator = model.estimator
    app = FastAPI()

    @app.post("/score")
    async def score(request: ScoreRequest) -> dict[str, Any]:
        predictions = estimator.predict(np.asarray(request.data, dtype=np.float64))
        return {
            "predictions": predictions.tolist(),
            "model": model.identity.name,
            "version": model.identity.version,
        }

    return app
