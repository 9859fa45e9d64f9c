"""The MetricsProvider contract every metrics backend implements, and the check of what one
answers (`usable`): counts are finite numbers >= 0 and errors never exceed requests."""

from __future__ import annotations

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
    field of the first that is not (`ColourCounts.why_unusable`). One check at the boundary, for
    every backend, a source of one's own included: the core's arithmetic on such a count would
    pass or fail a candidate on nonsense."""
    if observation.error is not None:
        return observation
    for colour in Colour:
        if problem := observation.of(colour).why_unusable():
            raise UnusableCounts(
                f"metrics unusable: {colour.value} {problem}: check the metrics source"
            )
    return observation
