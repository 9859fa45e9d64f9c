"""The fault knob: injected errors and latency for demos and tests, off by default.

A rollout demo needs a candidate that misbehaves on demand; so does the canary judge's test.
`FaultKnob.draw()` decides per request whether to answer 500 and how long to wait first. The
random source is injected (seeded in tests). Setting the knob logs a WARNING, and the server
exports it as gauges, so an injected failure is never mistaken for a real one.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FaultDraw:
    """What to do to one request."""

    error: bool
    delay_s: float


@dataclass(slots=True)
class FaultKnob:
    """Error rate in [0, 1] and added latency in milliseconds (>= 0)."""

    error_rate: float = 0.0
    latency_ms: float = 0.0
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self.set(self.error_rate, self.latency_ms, announce=False)

    @property
    def active(self) -> bool:
        """Whether any fault is being injected."""
        return self.error_rate > 0 or self.latency_ms > 0

    def set(self, error_rate: float, latency_ms: float, *, announce: bool = True) -> None:
        """Change the knob (ValueError when out of range); logs a WARNING while it is on."""
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"fault error rate must be within [0, 1], got {error_rate}")
        if not 0.0 <= latency_ms <= 60_000:
            raise ValueError(f"fault latency must be within [0, 60000] ms, got {latency_ms}")
        self.error_rate = float(error_rate)
        self.latency_ms = float(latency_ms)
        if announce or self.active:
            level = logging.WARNING if self.active else logging.INFO
            log.log(
                level,
                "fault knob %s: error_rate=%.4f latency_ms=%.1f (injected on purpose)",
                "ON" if self.active else "off",
                self.error_rate,
                self.latency_ms,
            )

    def draw(self) -> FaultDraw:
        """The fault for one request (no fault, cheaply, when the knob is off)."""
        error = self.error_rate > 0 and self.rng.random() < self.error_rate
        return FaultDraw(error=error, delay_s=self.latency_ms / 1000.0)
