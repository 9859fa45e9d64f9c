"""A small, fast rollout spec for engine tests: memory router, seeded simulated traffic."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_spec(tmp_path: Path, canary_error: float = 0.01, **extra: object) -> Path:
    spec = {
        "name": "cli",
        "steps": [10, 50, 100],
        "router": {"kind": "memory"},
        "metrics": {
            "kind": "simulated",
            "seed": 2,
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
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path
