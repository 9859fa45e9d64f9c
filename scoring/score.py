"""Azure ML scoring script: `init()` and `run(raw_data)`, the contract of AML online endpoints.

It works unchanged under `azureml-inference-server-http` (`azmlinfsrv --entry_script score.py`)
and in a managed online endpoint: `init()` loads the model from `AZUREML_MODEL_DIR` (a package
folder, a model folder, or a folder holding one of them, as AML mounts registered models) with
the same sha256 and skops checks as `aml-rollout serve`; `run(raw)` receives the request body as
a string and returns a JSON-serialisable dict.

Bad input: when the AML server's `AMLResponse` class is importable (it is under
azureml-inference-server-http and in AML images), `run` answers a 4xx with `{"error": ...}`;
without it the server would wrap any return value in a 200, so the error dict is returned as is
and the caller must read the `error` field. The colour comes from `AML_ROLLOUT_COLOUR`
(defaulting to AML's deployment name, then "green"), the version from package.json or
`AML_ROLLOUT_MODEL_VERSION`.

`aml-rollout serve` does not go through this file: it runs the same Scorer behind a faster
ASGI route, and adds metrics, auth and the fault knob.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from scoring.errors import InputError
from scoring.model import load_model
from scoring.scorer import Scorer

log = logging.getLogger(__name__)

_scorer: Scorer | None = None


def _aml_response(body: dict[str, Any], status: int) -> Any:
    """An AMLResponse carrying `status` where the AML server provides the class, else `body`."""
    try:
        from azureml_inference_server_http.api.aml_response import AMLResponse
    except ImportError:
        try:
            from azureml.contrib.services.aml_response import AMLResponse
        except ImportError:
            return body
    return AMLResponse(body, status, json_str=True)


def init() -> None:
    """Load the model from AZUREML_MODEL_DIR (raises ModelLoadError with a clear message)."""
    global _scorer
    model_dir = os.environ.get("AZUREML_MODEL_DIR")
    if not model_dir:
        raise RuntimeError("AZUREML_MODEL_DIR is not set: it must point at the model folder")
    model = load_model(model_dir, version=os.environ.get("AML_ROLLOUT_MODEL_VERSION") or None)
    colour = os.environ.get("AML_ROLLOUT_COLOUR") or os.environ.get("AZUREML_DEPLOYMENT_NAME")
    _scorer = Scorer(model, colour or "green")
    log.info("score.py ready: %s", _scorer.identity())


def run(raw_data: str) -> Any:
    """Score a request body (a JSON string); returns predictions and the model identity."""
    if _scorer is None:
        return _aml_response({"error": "init() has not run"}, 503)
    try:
        return _scorer.score(raw_data)
    except InputError as exc:
        return _aml_response({"error": exc.message}, exc.status)
