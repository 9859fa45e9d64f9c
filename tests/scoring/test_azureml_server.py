"""score.py under the real `azureml-inference-server-http` (Flask on gunicorn, its own venv).

The venv is created by benchmarks.azureml_env (pip from the package index, idempotent). The test
skips only when that install fails, with pip's reason; otherwise it runs the AML server the way
AML images do (`azmlinfsrv --entry_script score.py --model_dir DIR`) and checks the contract.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.azureml_env import (
    ROOT,
    AzuremlEnvUnavailable,
    ensure_azureml_venv,
    loopback_command,
)
from rollout.local.process import free_port
from scoring.model import LoadedModel

pytestmark = pytest.mark.slow


#: Ports tried before the fixture gives up (each taken by another process first).
PORT_ATTEMPTS = 3


@pytest.fixture(scope="module")
def aml_url(package_dir: Path) -> Iterator[str]:
    try:
        azmlinfsrv = ensure_azureml_venv()
    except AzuremlEnvUnavailable as exc:
        pytest.skip(f"azureml-inference-server-http cannot be installed here: {exc}")
    taken: list[str] = []
    for _ in range(PORT_ATTEMPTS):
        proc, url, problem = _start_aml_server(azmlinfsrv, package_dir)
        if problem is None:
            break
        taken.append(problem)
    else:
        pytest.fail("no port for the AML server: " + "; ".join(taken))
    try:
        yield url
    finally:
        _stop(proc)


def _start_aml_server(
    azmlinfsrv: Path, package_dir: Path
) -> tuple[subprocess.Popen[bytes], str, str | None]:
    """The AML server on a free port, and None once it answers there; else (stopped) why not.

    azmlinfsrv binds the port it is told, so another process (a parallel test's server) may
    take it first: then gunicorn retries for 5 s and exits ("Connection in use"), and meanwhile
    the other server answers. An answer counts only if it is ours (the colour set here).
    """
    port = free_port()
    env = os.environ | {"PYTHONPATH": str(ROOT), "AML_ROLLOUT_COLOUR": "blue"}
    proc = subprocess.Popen(
        [*loopback_command(azmlinfsrv), "--entry_script", str(ROOT / "scoring" / "score.py"),
         "--model_dir", str(package_dir), "--port", str(port), "--worker_count", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/score"
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            out = proc.communicate()[0].decode()
            assert "Connection in use" in out, out  # any other exit is the test's failure
            return proc, url, f"127.0.0.1:{port} was in use"
        assert time.monotonic() < deadline, "the AML server never answered"
        try:
            answer = httpx.post(url, json={"data": [[0.0] * 10]}, timeout=2)
        except httpx.TransportError:
            time.sleep(0.2)
            continue
        try:
            ours = answer.status_code == 200 and answer.json()["colour"] == "blue"
        except (ValueError, KeyError, TypeError):
            ours = False
        if ours:
            return proc, url, None
        _stop(proc)
        return proc, url, f"something else answers on 127.0.0.1:{port} (HTTP {answer.status_code})"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    # Gone already when it exited on a taken port (its group went with it).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # gunicorn master and its worker: our own group
    proc.communicate(timeout=30)


def test_score_py_serves_predictions_under_the_aml_server(
    aml_url: str, package_dir: Path, holdout: np.ndarray, loaded: LoadedModel
) -> None:
    response = httpx.post(aml_url, json={"data": holdout[:3].tolist()})
    assert response.status_code == 200
    body = response.json()
    assert (body["model"], body["version"], body["colour"]) == ("diabetes", "7", "blue")
    np.testing.assert_allclose(
        body["predictions"], loaded.estimator.predict(holdout[:3]), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize(
    ("content", "status"),
    [
        pytest.param(b"{", 400, id="malformed-json"),
        pytest.param(b'{"data": []}', 422, id="empty-batch"),
        pytest.param(b'{"data": [[1, 2]]}', 422, id="wrong-width"),
        pytest.param(b'{"data": [[true,2,3,4,5,6,7,8,9,10]]}', 422, id="wrong-type"),
        pytest.param(b'{"data": [' + b",".join([b"[1,2,3,4,5,6,7,8,9,10]"] * 1001) + b"]}",
                     413, id="too-many-rows"),
    ],
)  # fmt: skip
def test_bad_input_is_a_4xx_under_the_aml_server_too(
    aml_url: str, content: bytes, status: int
) -> None:
    response = httpx.post(aml_url, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert isinstance(response.json()["error"], str)


def listening_on(port: int) -> set[str]:
    """The IPv4 addresses a TCP socket listens on at `port` (from /proc/net/tcp)."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            addresses.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return addresses


def test_the_aml_server_listens_on_loopback_only(aml_url: str) -> None:
    # azmlinfsrv binds 0.0.0.0 (a constant, no option): a test server reachable from the network.
    assert listening_on(httpx.URL(aml_url).port or 0) == {"127.0.0.1"}
