"""The MetricsProvider contract every metrics backend implements, and the check of what one
answers (`usable`): counts are finite numbers >= 0 and errors never exceed requests."""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

from rollout.core.types import Colour, Observation
from rollout.errors import UnusableCounts


@runtime_checkable
class MetricsProvider(Protocol):
    def observe(self, since: float, now: float) -> Observation:
        """Per-colour counts (requests, 5xx errors, latency histogram) between `since` and `now`.

        Only default-route (un-pinned) traffic counts. Never raises for an unreachable backend:
        returns an Observation with `error` set, so the judge can say Verdict.ERROR. Counts are
        finite and >= 0, errors at most requests (`usable` makes any other tick an Error).
        """

    def history(self, since: float, now: float) -> Observation:
        """The same counts for a window before the rollout began, when green served everything.

        The judge picks the baseline's p99 bucket from green's histogram here, so the latency
        check runs from the first tick. A backend that keeps no history returns an empty
        Observation (or one with `error` set); the judge then picks it from the first step.
        """

    def probe(self) -> None:
        """Raise MetricsError, one line naming the backend and what is wrong, unless it answers a
        trivial query as the backend it should be. Cheap, and reads no traffic: the controller
        asks it before a new rollout deploys anything (a scripted source hands out no tick)."""


def usable(observation: Observation) -> Observation:
    """`observation`, once its counts are counts: raises UnusableCounts naming the colour and
    field of the first that is not (NaN, infinite, negative, not a number, or more errors than
    requests). One check at the boundary, for every backend, a source of one's own included:
    the core's arithmetic on such a count would pass or fail a candidate on nonsense."""
    if observation.error is not None:
        return observation
    for colour in Colour:
        counts = observation.of(colour)
        fields: list[tuple[str, object]] = [
            ("requests", counts.requests),
            ("errors", counts.errors),
        ]
        fields += [
            (f"latency_buckets count at {bound:g} s", count)
            for bound, count in counts.latency_buckets
        ]
        for name, value in fields:
            if not _count(value):
                raise UnusableCounts(
                    f"metrics unusable: {colour.value} {name} is {value!r} (a count is a finite "
                    "number >= 0): check the metrics source"
                )
        for bound, _ in counts.latency_buckets:
            if not isinstance(bound, int | float) or math.isnan(bound):
                raise UnusableCounts(
                    f"metrics unusable: {colour.value} latency_buckets bound is {bound!r}: "
                    "check the metrics source"
                )
        if counts.errors > counts.requests:
            raise UnusableCounts(
                f"metrics unusable: {colour.value} errors {counts.errors} > requests "
                f"{counts.requests}: check the metrics source"
            )
    return observation


def _count(value: object) -> bool:
    """A finite number >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value >= 0
