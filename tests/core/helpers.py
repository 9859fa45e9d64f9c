"""Builders shared by the core and engine tests: specs, observations, releases."""

from __future__ import annotations

from typing import Any

from rollout.config import RolloutSpec, spec_from_dict
from rollout.core.types import ColourCounts, Observation, Release

V1 = Release(model="diabetes", version="1", sha256="1" * 64)
V2 = Release(model="diabetes", version="2", sha256="2" * 64)


def make_spec(**overrides: Any) -> RolloutSpec:
    """A small spec: plan 10 → 50 → 100, 10 s interval, 100 canary requests per step."""
    return spec_from_dict(spec_data(**overrides))


def spec_data(**overrides: Any) -> dict[str, Any]:
    """make_spec's spec as the dict a YAML file holds (mappings in `overrides` merged one level)."""
    data: dict[str, Any] = {
        "name": "t",
        "steps": [10, 50, 100],
        "analysis": {
            "interval_s": 10,
            "min_requests": 100,
            "max_step_duration_s": 600,
            "latency": {"enabled": False},
        },
        "candidate": {"model": "diabetes", "version": "2", "sha256": "2" * 64},
        "stable": {"model": "diabetes", "version": "1", "sha256": "1" * 64},
        "state": {"kind": "memory"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def obs(
    blue: tuple[int, int] = (0, 0),
    green: tuple[int, int] = (0, 0),
    *,
    at: float = 0.0,
    since: float = 0.0,
    error: str | None = None,
    blue_buckets: tuple[tuple[float, int], ...] = (),
    green_buckets: tuple[tuple[float, int], ...] = (),
) -> Observation:
    """An observation of cumulative (requests, errors) per colour since the step began."""
    return Observation(
        since=since,
        at=at,
        blue=ColourCounts(requests=blue[0], errors=blue[1], latency_buckets=blue_buckets),
        green=ColourCounts(requests=green[0], errors=green[1], latency_buckets=green_buckets),
        error=error,
    )
