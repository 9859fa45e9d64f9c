"""Webhook notifications (rollout/notify.py) against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from rollout.api import run_rollout
from rollout.config import NotifyConfig, RolloutSpec, load_spec
from rollout.core.status import Status
from rollout.core.types import Phase
from rollout.errors import ConfigError
from rollout.notify import WebhookNotifier
from tests.engine.specs import write_spec


@dataclass
class Webhook:
    """A local endpoint that records what it is sent and answers `status` (after `delay_s`)."""

    url: str = ""
    status: int = 200
    delay_s: float = 0.0
    received: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            hook.received.append(json.loads(body))
            time.sleep(hook.delay_s)
            self.send_response(hook.status)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    hook.url = f"http://127.0.0.1:{server.server_port}/hook"
    yield hook
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port nothing listens on: held bound (not listening) by the block, so no other process
    (a parallel test's server) can take it and answer, as it could once released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def spec(tmp_path: Path, canary_error: float, **notify: Any) -> RolloutSpec:
    return load_spec(write_spec(tmp_path, canary_error, notify=notify))


def run(spec: RolloutSpec) -> Phase:
    from rollout.controller import FakeClock

    return run_rollout(spec, clock=FakeClock(0.0)).phase


def test_a_rollback_is_posted_once_with_its_reason(tmp_path: Path, webhook: Webhook) -> None:
    assert run(spec(tmp_path, 0.08, url=webhook.url)) is Phase.ROLLED_BACK
    (message,) = webhook.received  # RollingBack is not in the default list, RolledBack is
    assert message["phase"] == "RolledBack" and message["rollout"] == "cli"
    assert message["candidate"] == "m:2" and message["stable"] == "m:1"
    assert message["blue_weight"] == 0
    assert message["reason"].startswith("rolled back at step 10 %: canary error rate")
    assert message["text"] == f"aml-rollout cli: RolledBack (blue 0 %) - {message['reason']}"


def test_a_promotion_is_posted_and_only_the_phases_asked_for(
    tmp_path: Path, webhook: Webhook
) -> None:
    phases = ["Promoting", "Succeeded"]
    assert run(spec(tmp_path, 0.01, url=webhook.url, phases=phases)) is Phase.SUCCEEDED
    assert [m["phase"] for m in webhook.received] == phases


def test_a_rollout_the_webhook_does_not_want_to_hear_about_posts_nothing(
    tmp_path: Path, webhook: Webhook
) -> None:
    assert run(spec(tmp_path, 0.01, url=webhook.url, phases=["RolledBack"])) is Phase.SUCCEEDED
    assert webhook.received == []


@pytest.mark.parametrize(
    ("status", "attempts"),
    [pytest.param(503, 2, id="server-error-retried-once"), pytest.param(404, 1, id="refused")],
)
def test_a_failing_webhook_is_a_warning_never_a_failed_rollout(
    tmp_path: Path,
    webhook: Webhook,
    caplog: pytest.LogCaptureFixture,
    status: int,
    attempts: int,
) -> None:
    webhook.status = status
    with caplog.at_level(logging.WARNING, logger="rollout.notify"):
        assert run(spec(tmp_path, 0.08, url=webhook.url)) is Phase.ROLLED_BACK
    assert len(webhook.received) == attempts
    host = webhook.url.removesuffix("/hook")
    assert f"could not notify {host}/… that rollout cli is RolledBack: HTTP {status}" in (
        caplog.text
    )


def test_the_webhooks_path_never_reaches_the_log(
    tmp_path: Path, webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    # An incoming webhook's path is its credential (hooks.slack.com/services/T…/B…/<token>):
    # whoever reads the controller's log could post to the channel.
    secret = f"{webhook.url}/services/T0/B0/s3cr3tt0ken?key=also-secret"
    webhook.status = 404
    with caplog.at_level(logging.WARNING, logger="rollout.notify"):
        assert run(spec(tmp_path, 0.08, url=secret)) is Phase.ROLLED_BACK
    assert "could not notify http://127.0.0.1:" in caplog.text
    assert "s3cr3tt0ken" not in caplog.text and "also-secret" not in caplog.text


def test_an_unreachable_or_slow_webhook_does_not_stop_the_rollout(
    tmp_path: Path, webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    webhook.delay_s = 2.0  # longer than the timeout
    with caplog.at_level(logging.WARNING, logger="rollout.notify"):
        assert run(spec(tmp_path, 0.08, url=webhook.url, timeout_s=0.5)) is Phase.ROLLED_BACK
        (tmp_path / "down").mkdir()
        with refused_port() as port:
            closed = f"http://127.0.0.1:{port}/hook"
            assert run(spec(tmp_path / "down", 0.08, url=closed)) is Phase.ROLLED_BACK
    # Was "ReadTimeout: timed out": nothing said the wait is notify.timeout_s.
    assert "no answer within 0.5 s (notify.timeout_s)" in caplog.text
    assert "ConnectError" in caplog.text
    # Nothing went out on a closed port: that one was tried again.
    (refused,) = [r.getMessage() for r in caplog.records if "ConnectError" in r.getMessage()]
    assert "not posted again" not in refused


def test_a_webhook_that_received_the_post_but_answers_slowly_is_not_posted_again(
    webhook: Webhook, caplog: pytest.LogCaptureFixture
) -> None:
    # Was posted twice (the timeout retried): a Slack channel got every message twice, though
    # at most once per phase change is the promise.
    webhook.delay_s = 3.0
    # 1 s: time enough to send the POST on a loaded machine (one never sent is tried again;
    # 0.3 s was not, now and then, with the suite running on 2 cores).
    notifier = WebhookNotifier(NotifyConfig(url=webhook.url, timeout_s=1.0))
    with caplog.at_level(logging.WARNING, logger="rollout.notify"):
        notifier.entered(Status(name="x", phase=Phase.ROLLED_BACK))
    assert len(webhook.received) == 1
    assert "no answer within 1 s (notify.timeout_s); not posted again" in caplog.text


def test_a_proxy_refusing_the_tunnel_is_tried_again_nothing_was_posted(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # httpcore sends the proxy's CONNECT with the POST's own trace hook: it was taken for the
    # POST going out, so a proxy's 502 was not retried and "may have received it" was said.
    connects: list[bytes] = []
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen(4)

        def refuse_tunnels() -> None:
            for _ in range(2):
                try:
                    conn, _ = proxy.accept()
                except OSError:
                    return
                with conn:
                    connects.append(conn.recv(4096).split(b"\r\n")[0])
                    conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")

        threading.Thread(target=refuse_tunnels, daemon=True).start()
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        notifier = WebhookNotifier(NotifyConfig(url="https://hooks.example.com/x", timeout_s=2))
        with caplog.at_level(logging.WARNING, logger="rollout.notify"):
            notifier.entered(Status(name="x", phase=Phase.ROLLED_BACK))
    assert connects == [b"CONNECT hooks.example.com:443 HTTP/1.1"] * 2
    assert "ProxyError" in caplog.text and "not posted again" not in caplog.text


def test_the_notifier_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    """Even for a URL only httpx refuses (validation keeps such URLs out of specs)."""
    notifier = WebhookNotifier(
        NotifyConfig.model_construct(url="http://[::1", phases=[Phase.ROLLED_BACK], timeout_s=1.0)
    )
    with caplog.at_level(logging.WARNING, logger="rollout.notify"):
        notifier.entered(Status(name="x", phase=Phase.ROLLED_BACK))
    assert "could not notify the webhook that rollout x is RolledBack: InvalidURL" in caplog.text


@pytest.mark.parametrize(
    ("notify", "field_name"),
    [
        pytest.param({"url": "hooks.example.com"}, "notify.url", id="not-http"),
        pytest.param({"url": "http://[::1"}, "notify.url", id="httpx-refuses-it"),
        pytest.param({"url": "https://"}, "notify.url", id="no-host"),
        pytest.param({"url": "http://x", "phases": ["Initializing"]}, "notify.phases", id="init"),
        pytest.param({"url": "http://x", "phases": ["Done"]}, "notify.phases", id="bad-phase"),
        pytest.param({"url": "http://x", "phases": []}, "notify.phases", id="empty"),
        pytest.param({"url": "http://x", "timeout_s": 0}, "notify.timeout_s", id="timeout"),
    ],
)
def test_a_bad_notify_section_names_the_field(
    tmp_path: Path, notify: dict[str, Any], field_name: str
) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps({"name": "x", "notify": notify}))
    with pytest.raises(ConfigError, match=field_name.replace(".", r"\.")):
        load_spec(path)


def test_the_documented_notify_section_loads(tmp_path: Path) -> None:
    # YAML, not JSON: a bare `on:` key would load as the boolean true.
    doc = (Path(__file__).resolve().parents[2] / "docs" / "engine.md").read_text()
    block = doc.split("```yaml\nnotify:")[1].split("```")[0]
    (tmp_path / "spec.yaml").write_text("name: x\nnotify:" + block)
    notify = load_spec(tmp_path / "spec.yaml").notify
    assert notify is not None
    assert notify.phases == [Phase.PAUSED, Phase.SUCCEEDED, Phase.ROLLED_BACK, Phase.FAILED]


def test_a_rollout_held_in_the_shadow_step_says_blue_is_mirrored() -> None:
    held = Status(name="d", phase=Phase.PAUSED, blue_weight=0, mirror=5, reason="held for a human")
    message = WebhookNotifier(NotifyConfig(url="http://127.0.0.1:9/")).message(held)
    assert message["text"] == "aml-rollout d: Paused (blue 0 % + 5 % mirrored) - held for a human"
    assert (message["blue_weight"], message["mirror_percent"]) == (0, 5)


@pytest.mark.parametrize(
    ("green_error", "phases", "told"),
    [
        pytest.param(0.3, None, "Failed", id="breach-told-as-failed"),
        pytest.param(0.001, None, "Succeeded", id="kept-told-as-succeeded"),
        pytest.param(0.001, ["Failed"], None, id="only-failures-wanted"),
    ],
)
def test_a_first_release_check_is_posted_as_its_outcome(
    tmp_path: Path, webhook: Webhook, green_error: float, phases: list[str] | None, told: str | None
) -> None:
    from rollout.api import bootstrap_checked
    from rollout.controller import FakeClock
    from rollout.core.types import Release

    notify: dict[str, Any] = {"url": webhook.url, **({"phases": phases} if phases else {})}
    path = write_spec(tmp_path, notify=notify)
    data = yaml.safe_load(path.read_text())
    data["metrics"]["baseline"]["error_rate"] = green_error
    path.write_text(yaml.safe_dump(data))
    check = bootstrap_checked(load_spec(path), Release("m", "1"), clock=FakeClock(0.0))
    if told is None:
        assert webhook.received == []
        return
    (message,) = webhook.received
    assert message["phase"] == told and message["first_release"] == "m:1"
    assert message["reason"] == check.reason
    assert (
        message["text"]
        == f"aml-rollout cli: first release m:1 {check.verdict.value} - {check.reason}"
    )


@pytest.mark.parametrize(
    ("held", "reason"),
    [
        pytest.param(
            True, "held for a human: the data plane changed under this rollout", id="hold"
        ),
        pytest.param(False, "paused by ann", id="operator-pause"),
    ],
)
def test_a_pause_says_whether_it_waits_for_a_human(held: bool, reason: str) -> None:
    # Both were {"phase": "Paused"}: a script paging on holds paged on every typed `pause`.
    paused = Status(name="d", phase=Phase.PAUSED, blue_weight=10, held=held, reason=reason)
    message = WebhookNotifier(NotifyConfig(url="http://127.0.0.1:9/")).message(paused)
    assert message["held"] is held and message["reason"] == reason


@contextlib.contextmanager
def dripping_webhook(at_once: bytes, dripped: bytes) -> Iterator[str]:
    """A webhook that answers `at_once`, then `dripped` a byte every 0.05 s: each read well
    inside any timeout, the whole far beyond one. Stopped on exit."""
    stop = threading.Event()
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)

    def answer(conn: socket.socket) -> None:
        # The client gives up after timeout_s and closes: the rest of the drip finds it gone.
        with conn, contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.recv(65536)
            conn.sendall(at_once)
            for byte in dripped:
                if stop.wait(0.05):
                    return
                conn.sendall(bytes([byte]))

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = server.accept()
                threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/hook"
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


@pytest.mark.parametrize(
    ("at_once", "dripped", "timeout_s", "warning"),
    [
        # Was 10 s here (3 s with 60 bytes): the body was read, 0.05 s a byte, though only the
        # status says anything. 1 s: the status line, sent at once, must be read within the
        # timeout, and 0.2 s was not always time enough on a loaded 2-core box (a warning);
        # the body's 10 s stays far beyond it.
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n",
            b"x" * 200,
            1.0,
            None,
            id="slow-body",
        ),
        # Was 6 s (two attempts of 60 bytes): each read came within the timeout.
        pytest.param(
            b"", b"HTTP/1.1 200 OK" + b" " * 45, 0.2, "no answer within 0.2 s", id="slow-head"
        ),
    ],
)
def test_a_webhook_dripping_its_answer_holds_the_tick_at_most_two_timeouts(
    caplog: pytest.LogCaptureFixture,
    at_once: bytes,
    dripped: bytes,
    timeout_s: float,
    warning: str | None,
) -> None:
    with dripping_webhook(at_once, dripped) as url:
        notifier = WebhookNotifier(NotifyConfig(url=url, timeout_s=timeout_s))
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="rollout.notify"):
            notifier.entered(Status(name="x", phase=Phase.ROLLED_BACK))
        took = time.monotonic() - started
    assert took < 2 * timeout_s + 0.3
    if warning is None:
        assert "could not notify" not in caplog.text
    else:
        host = url.removesuffix("/hook")
        assert f"could not notify {host}/… that rollout x is RolledBack: {warning}" in caplog.text


#: path → (status, Location) of the redirecting webhook; `{base}` is its own scheme and host.
REDIRECTS = {
    "/307": (307, "/hook"),
    "/308": (308, "{base}/hook"),
    "/loop": (307, "/loop"),
    "/301": (301, "https://moved.example/services/T0/B0/s3cr3t?token=also-secret"),
    "/302": (302, "https://moved.example/services/T0/B0/s3cr3t?token=also-secret"),
    "/303": (303, "https://moved.example/services/T0/B0/s3cr3t?token=also-secret"),
    "/ftp": (307, "ftp://files.example/s3cr3t"),
    "/elsewhere": (307, "http://internal.example/s3cr3t"),
}


@pytest.fixture
def redirecting() -> Iterator[Webhook]:
    """A webhook answering `REDIRECTS` on their paths and 200 elsewhere; `received` holds each
    request's method, path and body, a GET included."""
    hook = Webhook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            hook.received.append({"method": self.command, "path": self.path, "body": body})
            status, location = REDIRECTS.get(self.path, (200, ""))
            self.send_response(status)
            if location:
                self.send_header("Location", location.format(base=hook.url))
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    hook.url = f"http://127.0.0.1:{server.server_port}"
    yield hook
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def notify_rolled_back(url: str, caplog: pytest.LogCaptureFixture) -> None:
    notifier = WebhookNotifier(NotifyConfig(url=url))
    with caplog.at_level(logging.WARNING, logger="rollout.notify"):
        notifier.entered(Status(name="x", phase=Phase.ROLLED_BACK))


@pytest.mark.parametrize("path", ["/307", "/308"])
def test_a_redirect_that_keeps_the_post_is_followed(
    redirecting: Webhook, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    # Was: any 3xx treated as a 4xx, the message lost with one warning (a webhook moved, an
    # http:// URL of an https-only endpoint).
    notify_rolled_back(redirecting.url + path, caplog)
    posted = [(r["method"], r["path"]) for r in redirecting.received]
    assert posted == [("POST", path), ("POST", "/hook")]
    assert json.loads(redirecting.received[-1]["body"])["phase"] == "RolledBack"
    assert "could not notify" not in caplog.text


@pytest.mark.parametrize(
    ("path", "posts", "told"),
    [
        pytest.param(
            f"/{status}", 1,
            f"HTTP {status} (redirected to https://moved.example/…, not followed: a {status} "
            "turns the POST into a GET)",
            id=f"{status}-not-followed",
        )
        for status in (301, 302, 303)
    ]
    + [
        pytest.param("/ftp", 1, "HTTP 307 (redirected to ftp://files.example/…, not followed: "
                     "not http(s))", id="not-http"),
        pytest.param("/elsewhere", 1, "HTTP 307 (redirected to http://internal.example/…, not "
                     "followed: another host (set notify.url to it if it is the webhook's))",
                     id="another-host"),
        pytest.param("/loop", 4, "HTTP 307 (redirected to {base}/…, not followed: 3 redirects "
                     "followed already)", id="bounded"),
    ],
)  # fmt: skip
def test_a_redirect_not_followed_says_where_to_by_scheme_and_host_only(
    redirecting: Webhook, caplog: pytest.LogCaptureFixture, path: str, posts: int, told: str
) -> None:
    notify_rolled_back(redirecting.url + path, caplog)
    assert [r["method"] for r in redirecting.received] == ["POST"] * posts  # never a GET
    said = f"could not notify {redirecting.url}/… that rollout x is RolledBack: "
    assert said + told.format(base=redirecting.url) in caplog.text
    assert "s3cr3t" not in caplog.text and "also-secret" not in caplog.text


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param(
            "HTTPS://hooks.example.com/services/T0/B0/TOKENSECRET",
            "must be an http:// or https:// URL, got 'HTTPS://hooks.example.com/…'",
            id="upper-case-scheme",
        ),
        pytest.param(
            "https://hooks.example.com:99999/services/T0/B0/TOKENSECRET",
            "not a usable URL (Port out of range 0-65535): 'https://hooks.example.com:99999/…'",
            id="port-out-of-range",
        ),
        pytest.param(
            "https://hooks.example.com/services/T0/B0/TOKEN SECRET",
            "has a space or a control character in it: 'https://hooks.example.com/…'",
            id="space-in-the-path",
        ),
        pytest.param(
            "https://bot:TOKENSECRET@hooks.example.com:9x/services?token=TOKENSECRET",
            "not a usable URL (Port could not be cast to integer value as '9x'): "
            "'https://hooks.example.com:9x/…'",
            id="user-info-and-query",
        ),
        pytest.param(
            "https://bot:TOKEN\u2100SECRET@hooks.example.com/x",
            "not a usable URL (netloc 'hooks.example.com' contains invalid characters under "
            "NFKC normalization): 'https://hooks.example.com/…'",
            id="odd-character-in-the-password",
        ),
        pytest.param(
            "https:///services/T0/B0/TOKENSECRET", "has no host: 'https:///…'", id="no-host"
        ),
        pytest.param(
            "hooks.example.com/services/T0/B0/TOKENSECRET?u=http://x",
            "must be an http:// or https:// URL, got one with no scheme://",
            id="no-scheme",
        ),
        pytest.param(
            "\ufeffhttps://hooks.example.com/services/T0/B0/TOKENSECRET",
            "must be an http:// or https:// URL: remove the '\\ufeff' before its scheme",
            id="a-bom-pasted-before-it",
        ),
        pytest.param(
            " https://hooks.example.com/services/T0/B0/TOKENSECRET",
            "must be an http:// or https:// URL: remove the ' ' before its scheme",
            id="a-space-pasted-before-it",
        ),
    ],
)
def test_a_bad_notify_url_is_shown_by_scheme_and_host_only(
    tmp_path: Path, url: str, message: str
) -> None:
    # Was: the whole URL echoed in the error (`validate`/`run` output, a CI log): an incoming
    # webhook's path or query is its token.
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps({"name": "x", "notify": {"url": url}}))
    with pytest.raises(ConfigError) as refused:
        load_spec(path)
    assert f"notify.url: {message}" in str(refused.value)
    assert "TOKEN" not in str(refused.value)


def test_a_redirect_from_https_to_plain_http_is_not_followed() -> None:
    # Was: followed, the webhook's path (its token) and the body sent in clear.
    from rollout.notify import _redirect

    response = httpx.Response(308, request=httpx.Request("POST", "https://hooks.example/a/b"))
    response.next_request = httpx.Request("POST", "http://hooks.example/a/b")
    following, why = _redirect(response, 0)
    assert following is None
    assert why == (
        "redirected to http://hooks.example/…, not followed: from https to plain http (the "
        "token and body would go in clear)"
    )
    response.next_request = httpx.Request("POST", "https://hooks.example/c")
    assert _redirect(response, 0) == (response.next_request, "")
