"""The local clock for time that passed: `since_boot`, shared by the controller's `RealClock`
and the kubernetes store's lease (neither should import the other)."""

from __future__ import annotations

import time


def since_boot() -> float:
    """Seconds on a clock that never steps and counts the time the machine was suspended:
    CLOCK_BOOTTIME on Linux. CLOCK_MONOTONIC, time.monotonic's, stops during a suspend: a VM
    or laptop resumed an hour later would take its lease for fresh until its renewal thread
    met the take-over, and its rollout's step would not age for the traffic served meanwhile.
    Elsewhere, time.monotonic."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()
