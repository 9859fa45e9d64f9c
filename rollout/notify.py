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
(the rollback a tick applies is never waited on a webhook), two attempts of at most `timeout_s`
each in all (so a slow webhook holds the next tick at most 2 x `timeout_s`, 120 s at the
most), reading only the answer's status line; a failure
is a warning in the log (naming the webhook by scheme and host only: an incoming webhook's path
is its secret), not an error of the rollout. A controller killed between persisting a
phase and posting about it does not post it after a restart (at most once per phase change).
A 307 or 308 redirect (which keeps the POST and its body) on the same host, never from https
to plain http, is followed, up to `REDIRECTS` times within the same `timeout_s`; a 301, 302 or
303 (after which a client sends a GET, without the body) is not, and the warning says where it
pointed, by scheme and host.
"""

from __future__ import annotations

import logging
import threading
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

#: POST attempts per message: a 5xx is retried once, and so is a connection error or timeout
#: met before the request went out. A POST sent that got no answer (a slow webhook, a
#: connection dropped) is not sent again: the webhook may have it (at most once).
ATTEMPTS = 2

#: Redirects followed per attempt; only those that keep the method and body (307, 308).
REDIRECTS = 3
KEEPS_POST = (307, 308)


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
        for _ in range(ATTEMPTS):
            attempt = _Attempt(self.config.url, body, self.config.timeout_s)
            answer = attempt.run()
            if answer is None:  # a slow webhook (or one dripping its answer), or a short timeout_s
                problem = f"no answer within {self.config.timeout_s:g} s (notify.timeout_s)"
            elif isinstance(answer, httpx.HTTPError):
                problem = f"{type(answer).__name__}: {answer}"
            elif isinstance(answer, Exception):  # best effort: nothing here may fail the rollout
                problem = f"{type(answer).__name__}: {answer}"
                break
            elif 200 <= answer < 300:
                return
            else:
                problem = f"HTTP {answer}" + (f" ({attempt.moved})" if attempt.moved else "")
                if answer < 500:  # the webhook refuses it: asking again won't help
                    break
                continue  # it answered that it failed: asking again posts it at most once
            if attempt.sent:
                # Measured: a webhook answering after timeout_s got every message twice.
                problem += "; not posted again (the webhook may have received it)"
                break
        shown = shown_url(self.config.url)
        log.warning(
            "could not notify %s that %s: %s", shown, what, problem.replace(self.config.url, shown)
        )


class _Attempt:
    """One POST, given `timeout_s` in all. httpx's timeout bounds each read, not the request: a
    webhook sending its answer a byte at a time held the controller's tick for as long as it
    liked (a rollback delayed 30 s). So the POST runs on a daemon thread joined for at most
    `timeout_s`, and reads only the status line (the body is never read). A thread given up on
    is left to its own per-read timeout; it holds one socket and logs nothing, and sends nothing
    if it had not begun to send the request (its connection came late): `sent` stays as read."""

    def __init__(self, url: str, body: dict[str, Any], timeout_s: float) -> None:
        self.url, self.body, self.timeout_s = url, body, timeout_s
        self.answer: int | Exception | None = None
        #: Whether the request began to go out: the webhook may have it, whatever came back.
        self.sent = False
        #: A redirect not followed: where it pointed (scheme and host) and why not.
        self.moved = ""
        self._given_up = False
        self._lock = threading.Lock()

    def run(self) -> int | Exception | None:
        """The status code, the exception raised, or None if no answer came within timeout_s."""
        thread = threading.Thread(target=self._post, name="notify", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        with self._lock:
            self._given_up = thread.is_alive()
            return None if self._given_up else self.answer

    def _trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's `trace` extension: notes the request going out, or stops it from going
        out once given up on (a retry may be under way). A proxy's CONNECT, sent with the
        POST's own extensions, is not the POST: a proxy refusing the tunnel posted nothing."""
        request = info.get("request")
        if getattr(request, "method", b"") == b"CONNECT":
            return
        if event.endswith(".send_request_headers.started"):
            with self._lock:
                if self._given_up:
                    raise _GivenUp("given up on before the request was sent")
                self.sent = True

    def _post(self) -> None:
        try:
            with httpx.Client(timeout=self.timeout_s) as client:
                request: httpx.Request | None = client.build_request(
                    "POST", self.url, json=self.body, extensions={"trace": self._trace}
                )
                followed = 0
                while request is not None:
                    # Its redirect's request carries the trace: a hop given up on is not sent.
                    response = client.send(request, stream=True)
                    response.close()  # the body is never read
                    self.answer = response.status_code
                    request, self.moved = _redirect(response, followed)
                    followed += 1
        except httpx.TimeoutException:
            self.answer = None
        except Exception as exc:  # handed to the caller, which logs it
            self.answer = exc


def _redirect(response: httpx.Response, followed: int) -> tuple[httpx.Request | None, str]:
    """The request following `response` (a 307 or 308 to http(s), `followed` redirects in), or
    None and why a redirect is not followed ("" when `response` is none)."""
    following = response.next_request  # httpx's, with its method as a redirect changes it
    if following is None:
        return None, ""
    code = response.status_code
    where = f"redirected to {shown_url(str(following.url))}, not followed"
    if code not in KEEPS_POST:
        return None, f"{where}: a {code} turns the POST into a GET"
    if following.url.scheme not in ("http", "https"):
        return None, f"{where}: not http(s)"
    if response.url.scheme == "https" and following.url.scheme != "https":
        return None, f"{where}: from https to plain http (the token and body would go in clear)"
    if following.url.host != response.url.host:
        # A webhook (or whoever answers for it) must not steer the controller's POSTs to any
        # host it likes (an internal one included): a moved webhook is `notify.url`'s to say.
        return None, f"{where}: another host (set notify.url to it if it is the webhook's)"
    if followed >= REDIRECTS:
        return None, f"{where}: {REDIRECTS} redirects followed already"
    return following, ""


class _GivenUp(Exception):
    """Raised in an attempt's thread to stop a request its caller no longer waits for."""


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
