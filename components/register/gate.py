"""The evaluation gate: is the candidate at least as good as the model serving production?

Pure decision logic (no registry, no I/O): the caller finds the production version — the one
tagged `stage=production`, never simply the latest registered — and passes its tags. With no
production model the first candidate passes: there is nothing to be worse than.

The candidate must be another model than production's (another sha256): the same bytes again
(unchanged data, seed and code) are refused, there being nothing new to roll out. Nor may it be
the model of a version tagged `stage=rolled-back` (the caller looks it up by sha256): a retrain
on unchanged data trains the bytes a rollout just rejected, and registered again they passed on
their numbers and were rolled out again.

Lower is better for `mse` and `rmse`, higher for `r2`. `max_regression` allows a relative slack
(0.02 = up to 2 % worse still passes); the default 0 refuses anything worse. A production tag
at the worst value there is (mse or rmse `inf`: a forced model whose held-out error overflowed)
is beaten by any finite candidate; a NaN one cannot be compared (refused).

**Only comparable metrics are compared.** A metric measured on other evaluation data says nothing
about which model is better: a lower mse on easier held-out rows would pass a worse model, a
higher one on harder rows refuse a better one. The candidate's fingerprints (model.json) are
checked against the production version's tags, most precise first:

    eval_fingerprint   the held-out rows the metrics were measured on (data and split)
    data_fingerprint   the whole data set (a different one means different held-out rows)

Known to differ (a data refresh, another seed or split) → the tags' numbers are not compared;
instead the caller re-scores both models on the held-out rows neither trained on (the
candidate's held-out rows that are not production's training rows, on which production looks
better than it is; for a production trained before its folder listed them, those its held-out
rows hold too) and passes both numbers (`Rescored`): they are then judged on those rows as usual
(`comparable=True`, the reason says "re-scored on the N of the candidate's M held-out rows").
When they could not be re-scored (no held-out rows in either folder, too few rows left, a
model that cannot be loaded) → refused, whatever the numbers say, with why (`comparable=False`;
`force` registers it anyway, tagged `gate=forced`). Cannot be told (a fingerprint missing on
either side — a model registered before eval_fingerprint existed, or training code that writes
none; or the same data set with no eval_fingerprint, so the split may differ) → the numbers
decide, and the reason says the comparison is unchecked (`comparable=None`; the register step
logs it as a warning).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from aml_pipelines.errors import ConfigError
from aml_pipelines.registry.base import ModelVersion

LOWER_IS_BETTER = {"mse": True, "rmse": True, "r2": False}
EVAL_FINGERPRINT = "eval_fingerprint"
DATA_FINGERPRINT = "data_fingerprint"


@dataclass(frozen=True)
class GateDecision:
    """The verdict and the numbers behind it, for the log and the registry tags."""

    passed: bool
    reason: str
    metric: str
    candidate: float
    baseline: float | None = None
    baseline_version: int | None = None
    #: True: measured on the same held-out data; False: known not to be; None: not checked.
    comparable: bool | None = None


@dataclass(frozen=True)
class Rescored:
    """Both models' metric on the held-out rows neither trained on, or why it could not be."""

    #: Production's metric on those rows.
    value: float | None
    #: The candidate's metric on the same rows.
    candidate: float | None = None
    #: How many rows: those of the candidate's `held_out` rows that production did not train on.
    rows: int = 0
    held_out: int = 0
    why_not: str = ""


def evaluate_gate(
    candidate_metrics: Mapping[str, float],
    production: ModelVersion | None,
    *,
    metric: str = "mse",
    max_regression: float = 0.0,
    fingerprints: Mapping[str, str] | None = None,
    sha256: str | None = None,
    rescored: Rescored | None = None,
    rolled_back: ModelVersion | None = None,
) -> GateDecision:
    """Compare the candidate's `metric` with the production version's tag of the same name.

    `fingerprints` are the candidate's `eval_fingerprint` / `data_fingerprint` (see the module
    docstring): metrics measured on other data than production's are not compared. `sha256`, the
    candidate model file's: production's own model is refused, there being nothing new.
    `rescored`: production's `metric` on the candidate's held-out rows, used when the
    fingerprints say the tags' numbers were measured on different data. `rolled_back`: a
    version tagged `stage=rolled-back` whose model is the candidate's (same sha256): refused.
    """
    if metric not in LOWER_IS_BETTER:
        raise ConfigError(f"metric: {metric!r} is not one of {sorted(LOWER_IS_BETTER)}")
    if not (math.isfinite(max_regression) and max_regression >= 0):
        raise ConfigError(f"max_regression: must be >= 0, got {max_regression}")
    if metric not in candidate_metrics:
        raise ConfigError(f"metric: the candidate's model.json has no {metric!r} metric")
    candidate = float(candidate_metrics[metric])
    if not math.isfinite(candidate):
        return GateDecision(False, f"candidate {metric} is {candidate}", metric, candidate)
    if rolled_back is not None:
        # Before production: the first release of a model is tagged production whatever its
        # check said, but a rollback says these bytes failed in front of traffic.
        why = rolled_back.tags.get("rollback_reason") or "no reason recorded"
        return GateDecision(
            False,
            f"the candidate is {rolled_back.name}:{rolled_back.version}'s model (same sha256 "
            f"{rolled_back.sha256[:12]}…), rolled back: {why}; registered again it would be "
            "rolled out again",
            metric,
            candidate,
            None,
            production.version if production is not None else None,
        )
    if production is None:
        return GateDecision(
            True,
            f"no production model yet: the first candidate passes ({metric}={candidate:.6g})",
            metric,
            candidate,
        )
    label = f"{production.name}:{production.version}"
    if sha256 and sha256 == production.sha256:
        # Same data, seed and code train the same bytes: registering them again would start a
        # judged rollout of no change.
        return GateDecision(
            False,
            f"the candidate is production {label}'s own model (same sha256 {sha256[:12]}…): "
            "nothing new to register or roll out",
            metric,
            candidate,
            None,
            production.version,
            comparable=True,
        )
    raw = production.tags.get(metric)
    try:
        baseline = float(raw) if raw is not None else math.nan
    except ValueError:
        baseline = math.nan
    comparable, why = comparability(fingerprints or {}, production.tags)
    if comparable is False and rescored is not None and (both := _usable(rescored)):
        # Both re-scored on the same rows: that comparison decides, whatever the tags say.
        there, candidate_there = both
        decision = _judge(
            metric,
            candidate_there,
            there,
            max_regression,
            production.version,
            True,
            f"production {label} and the candidate re-scored on the {rescored.rows} of the "
            f"candidate's {rescored.held_out} held-out rows that production did not train on "
            f"either: {metric} {there:.6g} vs candidate {candidate_there:.6g}",
        )
        return replace(
            decision,
            reason=f"{decision.reason}; the {metric} tags ({baseline:.6g} vs candidate "
            f"{candidate:.6g}) were measured on other data ({why})",
        )
    if baseline == (math.inf if LOWER_IS_BETTER[metric] else -math.inf):
        # The worst value there is (a forced model whose held-out error overflowed): refused as
        # "no usable tag", it refused every candidate after it. With no re-score on the same
        # rows (above), a finite value is better whatever data each was measured on.
        return GateDecision(
            True,
            f"production {label}'s {metric} is {baseline} (its held-out error overflowed): any "
            f"finite {metric} is better ({metric}={candidate:.6g})",
            metric,
            candidate,
            None,
            production.version,
        )
    if not math.isfinite(baseline):
        return GateDecision(
            False,
            f"production {label} has no usable {metric!r} tag ({raw!r}); cannot compare",
            metric,
            candidate,
            None,
            production.version,
        )
    if comparable is False:  # and no re-score on the same rows (above)
        not_rescored = (
            "; production could not be re-scored on the candidate's held-out rows: "
            + (
                rescored.why_not
                or f"its {metric} there is {rescored.value}, the candidate's {rescored.candidate}"
            )
            if rescored is not None
            else ""
        )
        return GateDecision(
            False,
            f"candidate {metric}={candidate:.6g} and production {label} "
            f"{metric}={baseline:.6g} were measured on different data ({why}): not "
            f"comparable, so neither better nor worse{not_rescored}",
            metric,
            candidate,
            baseline,
            production.version,
            comparable=False,
        )
    return _judge(
        metric,
        candidate,
        baseline,
        max_regression,
        production.version,
        comparable,
        "",
        label=label,
        why=why,
    )


def _usable(rescored: Rescored) -> tuple[float, float] | None:
    """Production's and the candidate's values re-scored on the same rows, when both are
    finite (else None)."""
    value, candidate = rescored.value, rescored.candidate
    if (
        value is None
        or candidate is None
        or not (math.isfinite(value) and math.isfinite(candidate))
    ):
        return None
    return value, candidate


def _judge(
    metric: str,
    candidate: float,
    baseline: float,
    max_regression: float,
    baseline_version: int,
    comparable: bool | None,
    rescored: str,
    *,
    label: str = "",
    why: str = "",
) -> GateDecision:
    """Candidate against baseline, lower or higher is better, with the slack."""
    lower = LOWER_IS_BETTER[metric]
    limit = baseline + abs(baseline) * max_regression * (1 if lower else -1)
    passed = candidate <= limit if lower else candidate >= limit
    direction = "lower" if lower else "higher"
    verdict = "not worse than" if passed else "worse than"
    slack = f" (slack {max_regression:.1%}, limit {limit:.6g})" if max_regression else ""
    unchecked = f"; UNCHECKED whether both were measured on the same data: {why}" if why else ""
    reason = (
        f"{rescored}: the candidate is {verdict} production ({direction} is better){slack}"
        if rescored
        else f"candidate {metric}={candidate:.6g} is {verdict} production {label} "
        f"{metric}={baseline:.6g} ({direction} is better){slack}{unchecked}"
    )
    return GateDecision(
        passed, reason, metric, candidate, baseline, baseline_version, comparable=comparable
    )


def comparability(
    candidate: Mapping[str, str], production: Mapping[str, str]
) -> tuple[bool | None, str]:
    """(comparable, why): were both models' metrics measured on the same held-out data?

    True with "" when the eval fingerprints match; False or None with the reason otherwise (see
    the module docstring). Empty values count as missing.
    """
    ours, theirs = candidate.get(EVAL_FINGERPRINT) or "", production.get(EVAL_FINGERPRINT) or ""
    if ours and theirs:
        if ours == theirs:
            return True, ""
        return False, f"{EVAL_FINGERPRINT} {_short(ours)} vs {_short(theirs)}"
    data, prod_data = candidate.get(DATA_FINGERPRINT) or "", production.get(DATA_FINGERPRINT) or ""
    if data and prod_data and data != prod_data:
        return False, f"{DATA_FINGERPRINT} {_short(data)} vs {_short(prod_data)}"
    sides = (("the candidate", ours), ("the production version", theirs))
    lacking = " and ".join(side for side, value in sides if not value)
    verb = "have" if not (ours or theirs) else "has"
    if data and data == prod_data:
        return None, (
            f"same {DATA_FINGERPRINT}, but {lacking} {verb} no {EVAL_FINGERPRINT} "
            "(the held-out split may differ)"
        )
    return None, f"{lacking} {verb} no {EVAL_FINGERPRINT}, and no {DATA_FINGERPRINT} to compare"


def _short(fingerprint: str) -> str:
    """`sha256:` and 12 hex digits: enough to tell two apart in a log line."""
    algorithm, _, digest = fingerprint.rpartition(":")
    return f"{algorithm}:{digest[:12]}…" if algorithm else f"{digest[:12]}…"
