"""Errors of the scoring service.

    ScoringError                 base; `exit_code` for the CLI
    ├── ModelLoadError           the model folder cannot be served (missing file, bad JSON)
    │   ├── IntegrityError       model.skops does not match the sha256 recorded in model.json
    │   └── UntrustedTypesError  the skops file holds types outside the allow-list
    └── InputError               a request body the model cannot score; carries the HTTP status

`InputError` is the only one raised per request: the server turns it into a 4xx JSON answer,
never a 5xx (the canary judge counts 5xx against the model).
"""

from __future__ import annotations


class ScoringError(Exception):
    """Base class of every error the scoring package raises on purpose."""

    exit_code = 2


class ModelLoadError(ScoringError):
    """The model folder is missing a file, holds bad metadata or cannot be deserialised."""


class IntegrityError(ModelLoadError):
    """The model file's sha256 differs from the one recorded in model.json."""


class UntrustedTypesError(ModelLoadError):
    """The skops file references types that are not on the allow-list."""


class InputError(ScoringError):
    """A scoring request that cannot be scored; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
