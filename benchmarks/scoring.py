"""Scoring throughput: our server vs azureml-inference-server-http vs a plain FastAPI reference.

    python -m benchmarks.scoring [--seconds 5] [--json]

One server at a time, on this machine, each with ONE worker and the same model (Ridge on the
diabetes data, written by the train component), the same 1-row payload and the same client:

- ours:     `aml-rollout serve` (raw ASGI /score in FastAPI, uvicorn + httptools + uvloop)
- azureml:  the same scoring/score.py under `azmlinfsrv` (Flask on gunicorn, sync worker),
            in its own venv (benchmarks.azureml_env)
- fastapi:  benchmarks.reference_server (pydantic body, Ridge.predict), same uvicorn settings

Client: `wrk` (Debian package `wrk`), one thread. It is C and event-driven, so on a 2-core box it
costs the servers far less CPU than any Python client would, and it is the same binary for all
three. Per server: a warm-up, then closed-loop runs at 1 and 8 connections (rps and p50/p99), then
a run paced at half of that server's own c8 rps (wrk's `delay()` hook, 8 connections) whose
p50/p99 are the "latency under load" figures in the JSON. Any non-2xx answer fails the run.

With `--json` the last line is
`{"servers": {"ours"|"azureml"|"fastapi": {"rps_c1", "rps_c8", "p50_ms", "p99_ms"}},
"ratio_vs_azureml": float, "ratio_vs_fastapi": float}` (ratios of rps_c8; p50/p99 at half of max).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from benchmarks.azureml_env import (
    ROOT,
    AzuremlEnvUnavailable,
    ensure_azureml_venv,
    loopback_command,
)
from rollout.local.process import free_port, listening_socket

SERVERS = ["ours", "azureml", "fastapi"]
ROW = [0.0381, 0.0507, 0.0617, 0.0219, -0.0442, -0.0348, -0.0434, -0.0026, 0.0199, -0.0176]
PAYLOAD = json.dumps({"data": [ROW]})


@dataclass(frozen=True)
class WrkResult:
    """One wrk run."""

    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    errors: int


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip()).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def parse_wrk(output: str) -> WrkResult:
    """Requests/sec, the 50 % and 99 % latency lines and error counts from `wrk --latency`."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return WrkResult(
        rps=rps,
        p50_ms=p50,
        p99_ms=p99,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        errors=sum(int(g) for g in errors.groups()) if errors else 0,
    )


def run_wrk(
    url: str,
    connections: int,
    seconds: float,
    workdir: Path,
    rate: float | None = None,
    latency_ms: float = 0.0,
) -> WrkResult:
    """wrk at `connections` for `seconds`. With `rate`, each connection waits between requests
    (wrk's `delay()` hook) so the total is about `rate` requests per second; `latency_ms`, the
    expected answer time, is taken off the wait since each connection waits after its answer."""
    script = workdir / "post.lua"
    lua = [
        'wrk.method = "POST"',
        f"wrk.body = {json.dumps(PAYLOAD)}",
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    if rate:
        wait_ms = max(connections / rate * 1000 - latency_ms, 0.0)
        lua.append(f"function delay() return {wait_ms:.3f} end")
    script.write_text("\n".join(lua) + "\n")
    duration = f"-d{max(1, round(seconds))}s"  # wrk takes whole seconds
    argv = ["wrk", "-t1", f"-c{connections}", duration, "--latency", "-s", str(script), url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 30)
    result = parse_wrk(out.stdout)
    if result.non_2xx or result.errors:
        raise RuntimeError(
            f"{url}: {result.non_2xx} non-2xx answers, {result.errors} socket errors"
        )
    return result


#: Servers that serve on a socket bound here on port 0 and inherited (`serve --fd`): no other
#: process can take the port first. The others take a port: one taken first is detected and
#: retried. Not uvicorn's own `--fd`: it wraps the socket as AF_UNIX, so no TCP_NODELAY is set
#: and each answer waits ~40 ms for a delayed ACK (measured: fastapi c1 23 rps, not 1,000).
ON_INHERITED_SOCKET = ("ours",)
#: Ports a server is started on before the run gives up (each taken by another process first).
PORT_ATTEMPTS = 3


def server_command(
    name: str, model_dir: Path, azmlinfsrv: Path, listen: int
) -> tuple[list[str], dict[str, str]]:
    """argv and environment of one server; `listen` is its socket's file descriptor (the
    servers in ON_INHERITED_SOCKET) or its port (the others)."""
    env = dict(os.environ)
    uvicorn_flags = ["--http", "httptools", "--loop", "uvloop", "--no-access-log",
                     "--log-level", "warning", "--workers", "1"]  # fmt: skip
    commands = {
        "ours": (
            [sys.executable, "-c", "from rollout.cli import main; main()", "serve",
             "--model-dir", str(model_dir), "--fd", str(listen), "--log-level", "warning"],
            env,
        ),
        "azureml": (
            [*loopback_command(azmlinfsrv), "--entry_script", str(ROOT / "scoring" / "score.py"),
             "--model_dir", str(model_dir), "--port", str(listen), "--worker_count", "1"],
            env | {"PYTHONPATH": str(ROOT)},
        ),
        "fastapi": (
            [sys.executable, "-m", "uvicorn", "benchmarks.reference_server:create", "--factory",
             "--host", "127.0.0.1", "--port", str(listen), *uvicorn_flags],
            env | {"REFERENCE_MODEL_DIR": str(model_dir)},
        ),
    }  # fmt: skip
    return commands[name]


@contextmanager
def started(name: str, model_dir: Path, azmlinfsrv: Path) -> Iterator[str]:
    """Run a server (own session) until the block ends; yields its /score URL once it answers
    200. A port another process took first (the server exits saying so, or another server
    answers 4xx there) is retried on a new one, up to PORT_ATTEMPTS times."""
    with tempfile.TemporaryFile() as log:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            proc, url = _start(name, model_dir, azmlinfsrv, log)
            try:
                taken = _wait_until_scoring(proc, name, url, log)
            except BaseException:
                _stop(proc)
                raise
            if taken is None:
                break
            _stop(proc)
            if attempt == PORT_ATTEMPTS:
                raise RuntimeError(f"{name}: {taken}")
            print(f"{name}: {taken}; trying another port", file=sys.stderr, flush=True)
        try:
            yield url
        finally:
            _stop(proc)


def _start(
    name: str, model_dir: Path, azmlinfsrv: Path, log: IO[bytes]
) -> tuple[subprocess.Popen[bytes], str]:
    log.seek(0)
    log.truncate()
    if name not in ON_INHERITED_SOCKET:
        port = free_port()
        argv, env = server_command(name, model_dir, azmlinfsrv, port)
        proc = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return proc, f"http://127.0.0.1:{port}/score"
    with listening_socket() as sock:  # our copy closed once it started
        argv, env = server_command(name, model_dir, azmlinfsrv, sock.fileno())
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=[sock.fileno()],
        )
        return proc, f"http://127.0.0.1:{sock.getsockname()[1]}/score"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    # Gone already when it exited on a taken port (its group went with it).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # our own process group: server and workers
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_until_scoring(
    proc: subprocess.Popen[bytes], name: str, url: str, log: IO[bytes]
) -> str | None:
    """None once `url` answers 200; why not, when another process holds the port."""
    headers = {"content-type": "application/json"}
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            log.seek(0)
            out = log.read().decode(errors="replace")
            # gunicorn's words (azmlinfsrv), then serve's and uvicorn's
            if any(w in out for w in ("Connection in use", "already in use")):
                return f"{url} was in use"
            raise RuntimeError(f"{name} exited: {out[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not answer within 120 s")
        try:
            status = httpx.post(url, content=PAYLOAD, headers=headers, timeout=2).status_code
        except httpx.TransportError:
            status = 0
        if status == 200:
            return None
        if 400 <= status < 500:  # ours answer 503 while they load, never "not found"
            return f"something else answers on {url} (HTTP {status})"
        time.sleep(0.2)


def measure(
    name: str, model_dir: Path, azmlinfsrv: Path, seconds: float, workdir: Path
) -> dict[str, float]:
    """Warm up, then c1, c8 and half-of-max-rate runs against one server."""
    with started(name, model_dir, azmlinfsrv) as url:
        run_wrk(url, 8, 1.0, workdir)  # warm-up: JIT-free, but caches, allocator and sockets
        c1 = run_wrk(url, 1, seconds, workdir)
        c8 = run_wrk(url, 8, seconds, workdir)
        half = run_wrk(url, 8, seconds, workdir, rate=c8.rps / 2, latency_ms=c1.p50_ms)
    print(
        f"{name:8} c1 {c1.rps:8.0f} rps p50 {c1.p50_ms:6.2f} p99 {c1.p99_ms:6.2f} ms | "
        f"c8 {c8.rps:8.0f} rps p50 {c8.p50_ms:6.2f} p99 {c8.p99_ms:6.2f} ms | "
        f"at {half.rps:6.0f} rps p50 {half.p50_ms:6.2f} p99 {half.p99_ms:6.2f} ms",
        file=sys.stderr,
        flush=True,
    )
    return {"rps_c1": round(c1.rps, 1), "rps_c8": round(c8.rps, 1),
            "p50_ms": round(half.p50_ms, 3), "p99_ms": round(half.p99_ms, 3)}  # fmt: skip


def build_model(out: Path) -> Path:
    """The example model, written by the train component (Ridge on diabetes, default params)."""
    from components.train.train import TrainParams, train

    train(out, name="diabetes", params=TrainParams())
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table on stderr and the JSON result on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="length of each timed run (whole seconds, >= 1)"
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON result line")
    parser.add_argument(
        "--only",
        choices=SERVERS,
        action="append",
        help="measure this server (repeat; default: all)",
    )
    args = parser.parse_args(argv)
    if not args.seconds >= 1:
        parser.error(f"--seconds must be at least 1 (wrk runs whole seconds), not {args.seconds:g}")
    if shutil.which("wrk") is None:
        print("error: wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    wanted = args.only or SERVERS
    # Only when measured: creating .venv-azureml pip-installs the AML server (minutes, network).
    try:
        azmlinfsrv = ensure_azureml_venv() if "azureml" in wanted else Path("azmlinfsrv")
    except AzuremlEnvUnavailable as exc:
        print(
            f"error: azureml-inference-server-http: {exc} (or leave it out: --only)",
            file=sys.stderr,
        )
        return 2
    from rollout.commands.stack import EXIT_INTERRUPTED, sigterm_as_interrupt

    servers: dict[str, dict[str, float]] = {}
    try:
        # SIGTERM as Ctrl-C: the `finally`s stop the server (its own session: the signal misses
        # it) and remove the temp dir; by default both outlived us.
        with (
            sigterm_as_interrupt(),
            tempfile.TemporaryDirectory(prefix="bench-scoring-") as tmp,
        ):
            workdir = Path(tmp)
            model_dir = build_model(workdir / "model")
            for name in SERVERS:
                if name in wanted:
                    servers[name] = measure(name, model_dir, azmlinfsrv, args.seconds, workdir)
    except KeyboardInterrupt:
        print("interrupted: the server is stopped and its temp dir removed", file=sys.stderr)
        return EXIT_INTERRUPTED

    def ratio(other: str) -> float | None:
        if "ours" not in servers or other not in servers:
            return None  # a partial run (--only): JSON null, never NaN
        return round(servers["ours"]["rps_c8"] / servers[other]["rps_c8"], 2)

    result = {
        "servers": servers,
        "ratio_vs_azureml": ratio("azureml"),
        "ratio_vs_fastapi": ratio("fastapi"),
    }
    ratios = {other: result[f"ratio_vs_{other}"] for other in ("azureml", "fastapi")}
    measured = [f"ours/{other} rps (c8): {x}x" for other, x in ratios.items() if x is not None]
    if measured and not args.json:
        print(", ".join(measured), file=sys.stderr)  # stdout is the JSON line alone
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
