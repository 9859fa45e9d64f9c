"""A small, fast rollout spec for engine tests: memory router, seeded simulated traffic."""

from __future__ import annotations

from pathlib import Path

import yaml


def spec_dict(
    tmp_path: Path, canary_error: float = 0.01, *, seed: int = 2, **extra: object
) -> dict[str, object]:
    """The spec as a dict; `extra` replaces top-level sections (name, router, state, ...)."""
    return {
        "name": "cli",
        "steps": [10, 50, 100],
        "router": {"kind": "memory"},
        "metrics": {
            "kind": "simulated",
            "seed": seed,
            "rps": 200,
            "baseline": {"error_rate": 0.01},
            "canary": {"error_rate": canary_error},
        },
        "analysis": {"min_requests": 100, "latency": {"enabled": False}},
        "candidate": {"model": "m", "version": "2"},
        "stable": {"model": "m", "version": "1"},
        "state": {"dir": str(tmp_path / "state")},
        **extra,
    }


def write_spec(tmp_path: Path, canary_error: float = 0.01, **extra: object) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(tmp_path, canary_error, **extra)))
    return path
