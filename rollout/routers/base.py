"""The TrafficRouter contract every routing backend implements.

All methods are idempotent: the controller may call any of them again after a crash, and applying
the same thing twice must be harmless. Failures raise `rollout.errors.RouterError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from rollout.core.types import Colour, Release, Weights

#: Seconds a proxy in front of the scoring server (the local Envoy, an Istio sidecar or gateway)
#: keeps an idle upstream connection: below the server's keep-alive (scoring.cli.KEEP_ALIVE_S),
#: so the proxy, not the server, closes it. Else a request the proxy sends on a connection the
#: server closes at that moment fails (a 503 the proxy makes up, charged to the model); Envoy's
#: and Istio's default is an hour.
UPSTREAM_IDLE_S = 60

#: Called right before each write a router sends to a remote control plane. The controller sets
#: it to its lease check: an action on a slow API server can take longer than the lease, and a
#: controller that lost its lease meanwhile must not land the writes still to come (raises).
Fence = Callable[[], None]


def no_fence() -> None:
    """The fence of a router no controller drives (a script, a test): writes are never stopped."""


@runtime_checkable
class Fenced(Protocol):
    """A router whose single actions send several writes (reads between them): it calls
    `fence()` before each one."""

    fence: Fence


@runtime_checkable
class TrafficRouter(Protocol):
    def deploy(self, colour: Colour, release: Release) -> None:
        """Make `colour` serve `release` (create or replace its workload); traffic is unchanged."""

    def release(self, colour: Colour) -> Release | None:
        """The release `colour` serves now, or None when nothing is deployed there."""

    def set_weights(self, weights: Weights) -> None:
        """Route default (un-pinned) traffic by `weights`; header-pinned routes are untouched.

        `weights.mirror` % of that traffic is also copied to blue (answers discarded), which is
        refused when nothing is deployed there; 0 ends any mirror to blue.
        """

    def get_weights(self) -> Weights:
        """The weights (and mirror to blue) the data plane serves now, not what was written."""

    def remove(self, colour: Colour) -> None:
        """Remove `colour`'s workload (after promotion, blue); a no-op when already gone.

        Refused while `colour` takes live traffic; a mirror to blue ends with blue's removal.
        """
