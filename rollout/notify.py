"""Tell someone when a rollout enters a phase they should hear about: a JSON POST to a webhook.

    notify:
      url: https://hooks.example.com/rollouts      # any endpoint that takes a JSON POST
      phases: [Paused, Succeeded, RolledBack, Failed]  # the default

The body carries a one-line `text` (what Slack-style incoming webhooks display) and the fields
a script would want:

    {"text": "aml-rollout diabetes: RolledBack (blue 0 %) - rolled back at step 5 %: ...",
     "rollout": "diabetes", "phase": "RolledBack", "reason": "...", "held": false,
     "blue_weight": 0, "mirror_percent": 0, "candidate": "diabetes:2", "stable": "diabetes:1",
     "at": 1764400000.0}

(`mirror_percent`: what blue is mirrored in the shadow step, held there for a human say; the
text then reads `(blue 0 % + 5 % mirrored)`. `held`: Paused waiting for a human's answer — a
drift, an outage, a weight off the plan — rather than an operator's own `pause`.)

Best effort, and never in the way: the controller calls it after a tick's actions are applied
(a rollback is never delayed by a slow webhook), two attempts of `timeout_s` each, and a failure
is a warning in the log (naming the webhook by scheme and host only: an incoming webhook's path
is its secret), not an error of the rollout. A controller killed between persisting a
phase and posting about it does not post it after a restart (at most once per phase change).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import httpx

from rollout.config import NotifyConfig
from rollout.core.status import Status
from rollout.core.types import Phase, Release, Verdict

log = logging.getLogger(__name__)

#: The phase a first release's check is told as (an Error is the caller's to report).
FIRST_CHECK_PHASES = {
    Verdict.SUCCESSFUL: Phase.SUCCEEDED,
    Verdict.FAILED: Phase.FAILED,
    Verdict.INCONCLUSIVE: Phase.PAUSED,
}

#: POST attempts per message (a connection error, a timeout or a 5xx is retried once).
ATTEMPTS = 2


class WebhookNotifier:
    """Posts one message per phase change into one of `config.phases`."""

    def __init__(self, config: NotifyConfig) -> None:
        self.config = config
        self.phases = frozenset(config.phases)

    def message(self, status: Status) -> dict[str, Any]:
        """The JSON body for `status`."""

        def release(r: Release | None) -> str | None:
            return r.ref if r is not None else None

        text = f"aml-rollout {status.name}: {status.phase.value} ({status.weights.blue_share})"
        return {
            "text": f"{text} - {status.reason}" if status.reason else text,
            "rollout": status.name,
            "phase": status.phase.value,
            "reason": status.reason,
            # A script pages on a hold, not on the pause an operator just typed.
            "held": status.held,
            "blue_weight": status.blue_weight,
            "mirror_percent": status.mirror,
            "candidate": release(status.candidate),
            "stable": release(status.stable),
            "at": status.updated_at,
        }

    def entered(self, status: Status) -> None:
        """Post about `status` if its phase is one to tell (a failure is a logged warning)."""
        if status.phase in self.phases:
            self._post(self.message(status), f"rollout {status.name} is {status.phase.value}")

    def first_release(self, name: str, release: Release, verdict: Verdict, reason: str) -> None:
        """Post how the check of a service's first release ended (`bootstrap --check`), if its
        phase is one to tell: Succeeded (within the limits), Failed (a limit breached) or
        Paused (undecided: a human's call)."""
        phase = FIRST_CHECK_PHASES.get(verdict)
        if phase is None or phase not in self.phases:
            return
        text = f"aml-rollout {name}: first release {release.ref} {verdict.value} - {reason}"
        body = {
            "text": text,
            "rollout": name,
            "phase": phase.value,
            "reason": reason,
            "first_release": release.ref,
        }
        self._post(body, f"the first release of {name} is {verdict.value}")

    def _post(self, body: dict[str, Any], what: str) -> None:
        problem = ""
        with httpx.Client(timeout=self.config.timeout_s) as client:
            for _ in range(ATTEMPTS):
                try:
                    response = client.post(self.config.url, json=body)
                except httpx.TimeoutException:  # a slow webhook, or a timeout_s too short
                    problem = f"no answer within {self.config.timeout_s:g} s (notify.timeout_s)"
                    continue
                except httpx.HTTPError as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                    continue
                except Exception as exc:  # best effort: nothing here may fail the rollout
                    problem = f"{type(exc).__name__}: {exc}"
                    break
                if response.is_success:
                    return
                problem = f"HTTP {response.status_code}"
                if response.status_code < 500:  # the webhook refuses it: asking again won't help
                    break
        shown = shown_url(self.config.url)
        log.warning(
            "could not notify %s that %s: %s", shown, what, problem.replace(self.config.url, shown)
        )


def shown_url(url: str) -> str:
    """The webhook as a log may show it: scheme and host. An incoming webhook's path (or
    query) is its credential (`hooks.slack.com/services/T…/B…/<token>`), and logs travel
    further than the spec; user info is dropped too."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "the webhook"
    host = parts.netloc.rpartition("@")[2]
    if not parts.scheme or not host:
        return "the webhook"
    hidden = "/…" if parts.path.strip("/") or parts.query or parts.fragment else ""
    return f"{parts.scheme}://{host}{hidden}"
