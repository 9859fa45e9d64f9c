"""`aml-rollout serve` and `aml-rollout load`.

Only typer, rich and the stdlib are imported at module level: uvicorn, fastapi, sklearn, skops,
httpx and prometheus_client are imported inside the command bodies so `aml-rollout --help` stays
fast. A model that cannot be served (sha256 mismatch, untrusted types, missing files) stops
`serve` before it binds its port, with one red line and exit code 2; so does a port already in
use or an address it cannot bind (checked before "serving … on …" is logged), or an `--fd` that
is not a listening TCP socket. `--fd` is how the local stack starts servers without a free-port
race: it binds port 0 itself and hands the listening socket down (`rollout.local.workloads`).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import signal
import socket
import threading
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from scoring.auth import API_KEY_ENV, api_key_problem, api_keys_from_env, split_api_keys

if TYPE_CHECKING:
    from scoring.loadgen import LoadReport

EXIT_USER_ERROR = 2
#: `load` ran, but no request got a 2xx answer.
EXIT_LOAD_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
#: How long `serve` keeps an idle client connection open (uvicorn's default is 5 s). A proxy in
#: front (Envoy, an Istio sidecar, a load balancer) must close idle connections first: a
#: request it sends on a connection the server is closing at that moment comes back as a 503
#: the proxy makes up, which the rollout judge would count against the model. Above the 60 s
#: aml-rollout gives the local Envoy and Istio's proxies (rollout.routers.base.UPSTREAM_IDLE_S)
#: and of common load balancers.
KEEP_ALIVE_S = 75
#: Seconds uvicorn waits, once told to stop (SIGTERM, Ctrl-C), for the requests in flight to be
#: answered before it cancels them (and answers them 500). A predict (or a fault knob's delay)
#: of up to that finishes and answers; a body still arriving is answered 408 within
#: scoring.app.SHUTDOWN_BODY_GRACE_S. A stop with nothing in flight does not wait. Inside
#: Kubernetes' 30 s termination grace, with room for the pod's own stop; the package image's
#: uvicorn is given the same. (Was 3 s: a 4 s request cut and answered 500.)
SHUTDOWN_TIMEOUT_S = 20


class ColourOption(StrEnum):
    """The two colours a server can run as (and a load can pin)."""

    BLUE = "blue"
    GREEN = "green"


def _fail(message: str, code: int = EXIT_USER_ERROR) -> typer.Exit:
    # Escaped: a message quotes paths and URLs, whose `[...]` rich would take as markup.
    Console(stderr=True, soft_wrap=True, emoji=False).print(
        f"[bold red]error:[/] {escape(message)}", highlight=False
    )
    return typer.Exit(code)


def serve(
    model_dir: Annotated[
        Path, typer.Option(help="Package folder (package.json + model/) or model folder.")
    ],
    colour: Annotated[
        ColourOption,
        typer.Option(envvar="AML_ROLLOUT_COLOUR", help="The colour this server runs as."),
    ] = ColourOption.GREEN,
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port to listen on.")] = 8000,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    fd: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Serve on this inherited listening TCP socket (a file descriptor) instead of "
            "binding --host/--port: the parent binds port 0 and passes it, so no other process "
            "can take the port in between.",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="Model version label (default: package.json, else 0).")
    ] = None,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            help="Require `Authorization: Bearer KEY` on /score (repeatable; each value may hold "
            f"several keys separated by whitespace or commas, as the env var {API_KEY_ENV} the "
            "package image reads, which is preferred).",
            show_default=False,
        ),
    ] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Largest accepted request body.")] = 1 << 20,
    max_buffered_body_bytes: Annotated[
        int,
        typer.Option(
            help="Most bytes of request bodies buffered at once, across requests: a body that "
            "would pass it is answered 429 with Retry-After: 1 (at least --max-body-bytes)."
        ),
    ] = 32 << 20,
    max_rows: Annotated[int, typer.Option(help="Most rows accepted in one request.")] = 1000,
    fault_error_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Demo knob: fraction of requests answered 500.")
    ] = 0.0,
    fault_latency_ms: Annotated[
        float, typer.Option(min=0.0, max=60_000, help="Demo knob: latency added to each request.")
    ] = 0.0,
    trust: Annotated[
        list[str] | None,
        typer.Option(help="Extra type to trust when loading the skops file (repeatable)."),
    ] = None,
    log_level: Annotated[
        str,
        typer.Option(help="Log level: critical, error, warning, info, debug or trace (uvicorn's)."),
    ] = "info",
) -> None:
    """Serve a packaged model as the blue or green scoring server."""
    # uvicorn's names, not Python's: `warn`, `fatal` and `notset` passed a check against
    # logging's and were a KeyError traceback from uvicorn after the model loaded; `trace` was
    # refused. uvicorn.config also registers TRACE with logging.
    from uvicorn.config import LOG_LEVELS

    level = log_level.lower()
    if level not in LOG_LEVELS:
        raise _fail(f"--log-level: unknown level {log_level!r} ({', '.join(LOG_LEVELS)})")
    if max_rows < 1 or max_body_bytes < 1:
        raise _fail(
            f"--max-rows and --max-body-bytes must be at least 1 "
            f"(got {max_rows} and {max_body_bytes})"
        )
    if max_buffered_body_bytes < 1:
        raise _fail(f"--max-buffered-body-bytes must be at least 1 (got {max_buffered_body_bytes})")
    if max_buffered_body_bytes < max_body_bytes:
        # A body of the largest size allowed would be a 429 every time, retried for ever.
        raise _fail(
            f"--max-buffered-body-bytes must be at least --max-body-bytes "
            f"(got {max_buffered_body_bytes} < {max_body_bytes})"
        )
    for name, value in (
        ("--fault-error-rate", fault_error_rate),
        ("--fault-latency-ms", fault_latency_ms),
    ):
        if math.isnan(value):  # passes typer's min/max (every comparison with NaN is false)
            raise _fail(f"{name}: nan is not a number")
    if api_key:
        # Split as the env var is. A value holding no key stays, as an empty key, for the check
        # below to refuse: dropped, `--api-key ""` would have served without auth.
        api_keys = tuple(key for value in api_key for key in split_api_keys(value) or ("",))
    else:  # parsed as the image parses it (not typer's envvar: it split on whitespace only)
        try:
            api_keys = api_keys_from_env(os.environ.get(API_KEY_ENV))
        except ValueError as exc:  # set but blank: fail closed, not open
            raise _fail(str(exc)) from None
    if (problem := api_key_problem(api_keys)) is not None:
        raise _fail(f"--api-key / {API_KEY_ENV}: {problem}")
    # An unusable --fd is refused before the model's 2-4 s load, as other bad options are.
    inherited = None if fd is None else _inherited_socket(fd)
    logging.basicConfig(
        level=LOG_LEVELS[level], format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from scoring.errors import ScoringError
    from scoring.model import load_model

    try:
        model = load_model(model_dir, version=version, extra_trusted=trust or ())
    except ScoringError as exc:
        raise _fail(str(exc)) from None

    import uvicorn

    from scoring.app import create_app
    from scoring.faults import FaultKnob
    from scoring.httpguard import GuardedHttpToolsProtocol

    app = create_app(
        model,
        colour=colour.value,
        api_keys=api_keys,
        fault=FaultKnob(fault_error_rate, fault_latency_ms),
        max_body_bytes=max_body_bytes,
        max_rows=max_rows,
        max_buffered_body_bytes=max_buffered_body_bytes,
    )
    # Bound here, before "serving ... on" is logged: a busy port or a bad --host is one red line
    # and exit 2, not a "serving" line followed by uvicorn's errno and shutdown lines (exit 3).
    sock = _listen_socket(host, port) if inherited is None else inherited
    bound_host, bound_port = sock.getsockname()[:2]
    logging.getLogger("scoring").info(
        "serving %s version %s as %s on http://%s:%d (auth %s)",
        model.identity.name,
        model.identity.version,
        colour.value,
        f"[{bound_host}]" if ":" in bound_host else bound_host,  # an IPv6 address, as URLs write it
        bound_port,
        # How many: a value split where it was not meant to be (a passphrase) is seen.
        f"on, {len(api_keys)} key{'s' if len(api_keys) > 1 else ''}" if api_keys else "off",
    )
    config = uvicorn.Config(
        app,
        access_log=False,
        # httptools, with a bound on each request head's size and time (uvicorn has neither).
        http=GuardedHttpToolsProtocol,
        loop="uvloop",
        log_level=level,
        timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S,
        timeout_keep_alive=KEEP_ALIVE_S,
        # No route is a WebSocket. With uvicorn's "auto", a request carrying `Upgrade:
        # websocket` (a POST /score too) went to the websocket protocol and was never answered.
        ws="none",
    )
    # uvicorn stops gracefully on SIGTERM, then raises it again on itself once its handlers are
    # put back: by the default action, a clean stop ended as a kill (exit -15). As a Ctrl-C
    # does, it ends here in a KeyboardInterrupt: exit 0.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()


def _listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host:port` (uvicorn listens on it); _fail when it cannot be."""
    if not 0 <= port <= 65535:
        raise _fail(f"--port {port}: not within 0..65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise _fail(f"--host {host!r}: not an address of this machine ({exc})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own bind
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise _fail(
                f"--port {port}: {host}:{port} is already in use (another server?); "
                "choose another port"
            ) from None
        raise _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _inherited_socket(fd: int) -> socket.socket:
    """The listening TCP socket at file descriptor `fd` (uvicorn serves on it); _fail if it is not.

    Checked before uvicorn gets it: a wrong number would otherwise be a traceback from deep in
    asyncio, or a server accepting on a socket nobody connects to. Not uvicorn's `fd=`: it wraps
    the descriptor as AF_UNIX, so the event loop sets no TCP_NODELAY on connections and each
    answer waits ~40 ms for a delayed ACK (measured with benchmarks.scoring: 23 rps at c1).
    """
    try:
        sock = socket.socket(fileno=fd)  # family and type are read from the descriptor
    except OSError as exc:
        raise _fail(f"--fd {fd}: not an open socket ({exc.strerror or exc})") from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        sock.detach()  # not ours to close
        raise _fail(f"--fd {fd}: not a TCP socket")
    if not listening:
        sock.detach()
        raise _fail(f"--fd {fd}: not listening (bind and listen the socket before passing it)")
    return sock


def load(
    url: Annotated[str, typer.Option(help="Scoring URL, e.g. http://127.0.0.1:8000/score.")],
    rps: Annotated[
        float | None, typer.Option(min=0.001, help="Requests per second (default: flat out).")
    ] = None,
    requests: Annotated[
        int | None, typer.Option(min=1, help="Number of requests (default 100 without --duration).")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(min=0.001, max=86_400, help="Seconds to send for.")
    ] = None,
    colour: Annotated[
        ColourOption | None, typer.Option(help="Pin a colour with the x-api-version header.")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=1024, help="Open connections.")] = 8,
    sample: Annotated[
        Path | None,
        typer.Option(help="sample-input.json (or a model/package folder) to take rows from."),
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Rows per request.")] = 1,
    api_key: Annotated[
        str | None,
        typer.Option(
            help=f"Bearer key (default: the first key in {API_KEY_ENV}, read as `serve` reads it).",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=0.01, help="Per-request timeout (the whole answer), seconds.")
    ] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Send bounded scoring load and print counts by version and status, p50/p99."""
    import asyncio

    from scoring.loadgen import LoadStats, failure_hint, normalise_url, read_sample, run_load

    if requests is None and duration is None:
        requests = 100
    if api_key is None:
        try:
            api_key = next(iter(api_keys_from_env(os.environ.get(API_KEY_ENV))), None)
        except ValueError as exc:
            raise _fail(str(exc)) from None
    stats = LoadStats()
    # Ctrl-C on a long run: the counts so far are what the user waited for. The first one asks
    # the workers to stop (they finish the requests in flight, which are counted); cancelling
    # the run's task instead could be lost inside httpx's connection handling, and the run went
    # on to its end. A second one stops at once.
    stop = threading.Event()

    def on_sigint(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        rows = read_sample(sample) if sample is not None else None
        asyncio.run(
            run_load(
                url,
                rps=rps,
                requests=requests,
                duration=duration,
                concurrency=concurrency,
                colour=colour.value if colour else None,
                rows=rows,
                batch=batch,
                api_key=api_key,
                timeout=timeout,
                stats=stats,
                stop=stop,
            )
        )
    except ValueError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:  # the second Ctrl-C: requests in flight are not counted
        stats.finish()
    finally:
        signal.signal(signal.SIGINT, previous)
    interrupted = stop.is_set()
    report = stats.snapshot()
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        _print_load_report(report)
        if rps is not None and not interrupted and report.rps < 0.9 * rps:
            # The requests fell behind their schedule: their latencies include that wait.
            typer.echo(
                f"note: {report.rps:.1f} requests/s of the {rps:g} asked: the server (or this "
                "client: raise --concurrency) could not keep up; latencies count each request "
                "from when it was due",
                err=True,
            )
    if interrupted:
        raise _fail(
            f"interrupted: the report covers the {report.sent} requests"
            " that finished before Ctrl-C",
            EXIT_INTERRUPTED,
        )
    hint = failure_hint(report, normalise_url(url), key_sent=bool(api_key))
    if hint is not None:
        raise _fail(hint, EXIT_LOAD_FAILED)


def _print_load_report(report: LoadReport) -> None:
    console = Console(emoji=False)
    versions = Table("version (colour/model:version)", "requests", title="answered by")
    for key, count in report.by_version.items():
        versions.add_row(key, str(count))
    statuses = Table("status", "requests", title="status")
    for key, count in report.by_status.items():
        statuses.add_row(key, str(count))
    console.print(versions, statuses)
    summary = f"{report.sent} requests in {report.elapsed_s:.2f} s ({report.rps:.1f}/s)"
    if report.answered:
        # Percentiles of HTTP answers only: a transport error has no server latency to show.
        summary += (
            f", p50 {report.p50_ms:.2f} ms, p99 {report.p99_ms:.2f} ms, max {report.max_ms:.2f} ms"
        )
        if report.answered < report.sent:
            summary += f" (over the {report.answered} answered)"
    else:
        summary += ", no answer to time"
    console.print(summary, soft_wrap=True)
