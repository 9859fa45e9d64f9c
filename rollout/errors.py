"""Errors of the rollout engine, one tree so callers catch at the right depth.

    RolloutError
    ├── ConfigError            invalid spec or unknown backend kind (names the field)
    │   └── SettingError       one setting is invalid (`setting`, `problem`: a CLI names its option)
    ├── RouterError            the traffic router could not read or apply weights
    │   ├── ConflictError      optimistic concurrency lost (e.g. HTTP 409); retry after re-read
    │   ├── RouterUnavailable  nothing answers at the router's control plane (message has the URL)
    │   ├── WeightsUnsettled   the weights shown may not be what serves (a change under way, failed)
    │   └── RouterRefused      an answer no retry changes (no such namespace, not ours to move)
    │       └── DeployFailed   the workload was written but does not become ready
    ├── MetricsError           the metrics backend failed
    │   ├── NoValuesFound      the query answered, but with no series (no traffic yet)
    │   ├── ProviderUnavailable the backend is unreachable (message carries the URL)
    │   └── UnusableCounts     counts no judge can use (NaN, negative, errors > requests)
    ├── StateError             the state store failed or holds something unreadable
    │   └── LeaseHeldError     another controller holds the rollout's lease
    └── LocalStackError        a process of the embedded local stack failed to start or died

The CLI turns any RolloutError into one clear line and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rollout.core.types import Weights


class RolloutError(Exception):
    """Base of every error the engine raises on purpose."""


class ConfigError(RolloutError):
    """A spec or backend configuration is invalid; the message names the field."""


class SettingError(ConfigError):
    """One setting is invalid: `setting` is its spec field (`router.app`), `problem` says why.

    The message names the spec field; a command that took the value from an option of its own
    names the option instead (`--app: ...`), so the user reads what they typed.
    """

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class RouterError(RolloutError):
    """The traffic router could not read or apply weights."""


class ConflictError(RouterError):
    """An optimistic-concurrency write lost the race; re-read and retry."""


class RouterUnavailable(RouterError):
    """Nothing answers at the router's control plane (e.g. no Envoy at the admin URL)."""


class WeightsUnsettled(RouterError):
    """The data plane shows weights that may not be what serves: a change of them is under way,
    or the last one failed (an Azure endpoint Updating, Failed). `shown`: those weights (None
    when they are no valid split): someone set them, so someone drives the data plane."""

    def __init__(self, message: str, shown: Weights | None) -> None:
        super().__init__(message)
        self.shown = shown


class RouterRefused(RouterError):
    """The router answered, and refuses the action for a reason that asking again will not
    change: a namespace that does not exist, a release without what the router deploys, traffic
    held by a deployment that is not ours to move, traffic to a colour with nothing deployed,
    credentials or permissions the control plane refuses (401, 403), an object it refuses as
    invalid, an API it does not serve (no Istio). The controller does not retry it (a blip, a
    409, a 429, a 5xx, a timeout stay plain RouterError, and are retried); the message says what
    to fix."""


#: Why a colour's deployment that is gone refuses traffic for good, and what brings it back
#: (a RouterRefused of every router that deploys).
GONE = (
    " (deleted, or never deployed: no retry brings it back; a resumed `run` deploys the "
    "release its status gives that colour again)"
)


class DeployFailed(RouterRefused):
    """A deploy was written but its workload does not become ready (pods never ready, a progress
    deadline passed). An answer, not a blip: deploying again would only wait for it again."""


class MetricsError(RolloutError):
    """The metrics backend failed."""


class NoValuesFound(MetricsError):
    """The query answered with no series: no traffic yet, or a wrong label."""


class ProviderUnavailable(MetricsError):
    """The metrics backend cannot be reached."""


class UnusableCounts(MetricsError):
    """The backend answered counts that are no counts: NaN, infinite, negative, or more errors
    than requests (a metrics source of one's own, say). The tick is an Error, like an outage:
    judged, they could pass or fail a candidate on nonsense."""


class StateError(RolloutError):
    """The state store failed or holds something unreadable."""


class LeaseHeldError(StateError):
    """Another controller holds the lease of this rollout."""


class LocalStackError(RolloutError):
    """A process of the embedded local stack failed to start or died."""


def error_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the errors it was raised from or while handling, innermost last (SDKs raise
    again: azure-ai-ml, azure-monitor-query); a chain that loops is walked once."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__
