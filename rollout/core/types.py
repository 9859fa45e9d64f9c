"""Value types shared by the core, the controller and every backend.

They are frozen dataclasses and string enums so they serialise to the ledger and the state store
as plain JSON and compare by value in tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Colour(StrEnum):
    """The two deployment slots: green serves production, blue is the candidate."""

    BLUE = "blue"
    GREEN = "green"

    @property
    def other(self) -> Colour:
        """The other slot."""
        return Colour.GREEN if self is Colour.BLUE else Colour.BLUE


class Phase(StrEnum):
    """Where a rollout is in its life; terminal phases are Succeeded, RolledBack and Failed."""

    INITIALIZING = "Initializing"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    PROMOTING = "Promoting"
    FINALISING = "Finalising"
    SUCCEEDED = "Succeeded"
    ROLLING_BACK = "RollingBack"
    ROLLED_BACK = "RolledBack"
    FAILED = "Failed"


class Verdict(StrEnum):
    """Outcome of one analysis: three-valued plus Error, as in Argo Rollouts' AnalysisPhase."""

    SUCCESSFUL = "Successful"
    FAILED = "Failed"
    INCONCLUSIVE = "Inconclusive"
    ERROR = "Error"


@dataclass(frozen=True, slots=True)
class Weights:
    """Percent of default-route traffic per colour; always integers summing to 100.

    `mirror` is the percent of that traffic also *copied* to blue while blue serves none (a
    shadow: blue answers the copies, the answers are discarded, users only ever see green's).
    """

    blue: int
    green: int
    mirror: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.blue <= 100 and 0 <= self.green <= 100):
            raise ValueError(
                f"weights must be within 0..100, got blue={self.blue} green={self.green}"
            )
        if self.blue + self.green != 100:
            raise ValueError(f"weights must sum to 100, got blue={self.blue} green={self.green}")
        if not 0 <= self.mirror <= 100:
            raise ValueError(f"mirror must be within 0..100, got {self.mirror}")
        if self.mirror and self.blue:
            raise ValueError(
                f"blue is mirrored only while it serves no live traffic, got blue={self.blue} "
                f"mirror={self.mirror}"
            )

    @classmethod
    def blue_at(cls, percent: int, mirror: int = 0) -> Weights:
        """Weights with `percent` on blue and the rest on green (`mirror` % copied to blue)."""
        return cls(blue=percent, green=100 - percent, mirror=mirror)

    @property
    def blue_share(self) -> str:
        """Blue's part in words (green has the rest): `blue 10 %`, `blue 0 % + 5 % mirrored`."""
        mirror = f" + {self.mirror} % mirrored" if self.mirror else ""
        return f"blue {self.blue} %{mirror}"

    def __str__(self) -> str:
        shadow = f", {self.mirror} % mirrored to blue" if self.mirror else ""
        return f"blue {self.blue} % / green {self.green} %{shadow}"

    def of(self, colour: Colour) -> int:
        """The weight of one colour."""
        return self.blue if colour is Colour.BLUE else self.green


@dataclass(frozen=True, slots=True)
class ColourCounts:
    """Counts for one colour over an observation window (exact integers where the source allows).

    `latency_buckets` is a cumulative histogram: pairs (upper bound in seconds, requests with
    latency <= bound), sorted by bound; empty when the source has no latency data. The core derives
    "slow" requests from it against an SLO or the baseline's p99 bucket.
    """

    requests: int = 0
    errors: int = 0
    latency_buckets: tuple[tuple[float, int], ...] = ()

    def slow(self, threshold_s: float) -> int:
        """Requests slower than the smallest bucket bound >= threshold_s (0 with no histogram);
        SLOW_UNKNOWN when requests came and every finite bound is below threshold_s: how many
        were slower is not in the histogram (its unit may be wrong), and 0 switched the check
        off unseen."""
        for bound, count in self.latency_buckets:
            if threshold_s <= bound < math.inf:  # (+Inf: "slower than +Inf" is always 0)
                return max(self.requests - count, 0)
        return SLOW_UNKNOWN if self.latency_buckets and self.requests > 0 else 0

    def why_unusable(self) -> str:
        """What makes these counts no counts, naming the field ("" when they are counts): a
        count NaN, infinite, negative or not a number, a bound NaN, more errors than requests
        (a custom source may hand over anything; the controller refuses it, `metrics.usable`)."""
        fields: list[tuple[str, object]] = [("requests", self.requests), ("errors", self.errors)]
        fields += [
            (f"latency_buckets count at {bound:g} s", count)
            for bound, count in self.latency_buckets
        ]
        for name, value in fields:
            if not _count(value):
                return f"{name} is {value!r} (a count is a finite number >= 0)"
        for bound, _ in self.latency_buckets:
            if not isinstance(bound, int | float) or math.isnan(bound):
                return f"latency_buckets bound is {bound!r}"
        if self.errors > self.requests:
            return f"errors {self.errors} > requests {self.requests}"
        return ""


def _count(value: object) -> bool:
    """A finite number >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value >= 0


#: A slow count the histogram cannot give (the core's UNKNOWN: never folded as a count).
SLOW_UNKNOWN = -1


@dataclass(frozen=True, slots=True)
class Observation:
    """What the metrics backend saw for both colours between `since` and `at` (epoch seconds).

    `error` is set when the backend could not be read (the judge then says Verdict.ERROR);
    `detail` carries the raw queries and values for the ledger. `fresh_series` says the counts
    begin anew here and do not continue earlier observations' (a simulated data plane in a new
    process): a step that counted before takes them as its new base instead of an increase.
    """

    since: float
    at: float
    blue: ColourCounts = field(default_factory=ColourCounts)
    green: ColourCounts = field(default_factory=ColourCounts)
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    fresh_series: bool = False

    def of(self, colour: Colour) -> ColourCounts:
        """The counts of one colour."""
        return self.blue if colour is Colour.BLUE else self.green


@dataclass(frozen=True, slots=True)
class Release:
    """One deployable model version: what a colour serves.

    `image` is the container image for Kubernetes; `model_dir` a local package folder for the
    local stack; `deployment` the Azure ML deployment name. Backends use the fields they need.
    """

    model: str
    version: str
    sha256: str = ""
    image: str | None = None
    model_dir: str | None = None
    deployment: str | None = None

    @property
    def ref(self) -> str:
        """`model:version`, how people and the Azure ML registry name a release."""
        return f"{self.model}:{self.version}"

    def unlike(self, other: Release) -> bool:
        """Whether `other` is another release: another model:version, or another sha256 or
        image where both name one (a router reads back only what it records: Azure ML's
        deployment tags carry no image)."""
        if self.ref != other.ref:
            return True
        pairs = ((self.sha256, other.sha256), (self.image, other.image))
        return any(a and b and a != b for a, b in pairs)


@dataclass(frozen=True, slots=True)
class Served:
    """What the data plane serves, as the controller read it before a tick: the default
    route's weights (and mirror) and each colour's release (None: nothing deployed there)."""

    weights: Weights
    blue: Release | None
    green: Release | None

    def of(self, colour: Colour) -> Release | None:
        """The release one colour serves."""
        return self.blue if colour is Colour.BLUE else self.green
