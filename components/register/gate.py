"""The evaluation gate: is the candidate at least as good as the model serving production?

Pure decision logic (no registry, no I/O): the caller finds the production version — the one
tagged `stage=production`, never simply the latest registered — and passes its tags. With no
production model the first candidate passes: there is nothing to be worse than.

Lower is better for `mse` and `rmse`, higher for `r2`. `max_regression` allows a relative slack
(0.02 = up to 2 % worse still passes); the default 0 refuses anything worse.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from aml_pipelines.errors import ConfigError
from aml_pipelines.registry.base import ModelVersion

LOWER_IS_BETTER = {"mse": True, "rmse": True, "r2": False}


@dataclass(frozen=True)
class GateDecision:
    """The verdict and the numbers behind it, for the log and the registry tags."""

    passed: bool
    reason: str
    metric: str
    candidate: float
    baseline: float | None = None
    baseline_version: int | None = None


def evaluate_gate(
    candidate_metrics: Mapping[str, float],
    production: ModelVersion | None,
    *,
    metric: str = "mse",
    max_regression: float = 0.0,
) -> GateDecision:
    """Compare the candidate's `metric` with the production version's tag of the same name."""
    if metric not in LOWER_IS_BETTER:
        raise ConfigError(f"metric: {metric!r} is not one of {sorted(LOWER_IS_BETTER)}")
    if not (math.isfinite(max_regression) and max_regression >= 0):
        raise ConfigError(f"max_regression: must be >= 0, got {max_regression}")
    if metric not in candidate_metrics:
        raise ConfigError(f"metric: the candidate's model.json has no {metric!r} metric")
    candidate = float(candidate_metrics[metric])
    if not math.isfinite(candidate):
        return GateDecision(False, f"candidate {metric} is {candidate}", metric, candidate)
    if production is None:
        return GateDecision(
            True,
            f"no production model yet: the first candidate passes ({metric}={candidate:.6g})",
            metric,
            candidate,
        )
    label = f"{production.name}:{production.version}"
    raw = production.tags.get(metric)
    try:
        baseline = float(raw) if raw is not None else math.nan
    except ValueError:
        baseline = math.nan
    if not math.isfinite(baseline):
        return GateDecision(
            False,
            f"production {label} has no usable {metric!r} tag ({raw!r}); cannot compare",
            metric,
            candidate,
            None,
            production.version,
        )
    lower = LOWER_IS_BETTER[metric]
    limit = baseline + abs(baseline) * max_regression * (1 if lower else -1)
    passed = candidate <= limit if lower else candidate >= limit
    direction = "lower" if lower else "higher"
    verdict = "not worse than" if passed else "worse than"
    slack = f" (slack {max_regression:.1%}, limit {limit:.6g})" if max_regression else ""
    return GateDecision(
        passed,
        f"candidate {metric}={candidate:.6g} is {verdict} production {label} "
        f"{metric}={baseline:.6g} ({direction} is better){slack}",
        metric,
        candidate,
        baseline,
        production.version,
    )
