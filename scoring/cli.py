"""`aml-rollout serve` and `aml-rollout load` (uvicorn, fastapi and httpx imported inside)."""

from __future__ import annotations


def serve() -> None:
    """Serve a packaged model."""
    raise NotImplementedError("scoring issue")


def load() -> None:
    """Send bounded load."""
    raise NotImplementedError("scoring issue")
