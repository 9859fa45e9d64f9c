"""The MetricsProvider contract every metrics backend implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from rollout.core.types import Observation


@runtime_checkable
class MetricsProvider(Protocol):
    def observe(self, since: float, now: float) -> Observation:
        """Per-colour counts (requests, 5xx errors, latency histogram) between `since` and `now`.

        Only default-route (un-pinned) traffic counts. Never raises for an unreachable backend:
        returns an Observation with `error` set, so the judge can say Verdict.ERROR.
        """

    def is_online(self) -> bool:
        """True when the backend answers a trivial query."""
