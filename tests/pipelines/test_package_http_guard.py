"""The package image's uvicorn bounds a request head as `aml-rollout serve` does.

Run as the Dockerfile's CMD runs it (its own arguments, from the package folder), on a socket
bound here instead of its `--host 0.0.0.0 --port`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from aml_pipelines.registry.local import LocalRegistry
from components.package.package import build_package
from components.register.register import register_model
from components.train.train import TrainParams, train
from rollout.local.process import listening_socket
from scoring.httpguard import MAX_HEAD_BYTES


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pkg")
    train(root / "model", name="Diabetes-Ridge", params=TrainParams())
    registry = LocalRegistry(root / "registry")
    register_model(root / "model", registry, out_dir=root / "registration")
    version = registry.get("Diabetes-Ridge", 1)
    return build_package(version, root / "p", image_registry="r").path


def image_command(package: Path, fd: int) -> list[str]:
    """The Dockerfile's CMD, listening on `fd` instead of its host and port."""
    (cmd,) = [
        line
        for line in (package / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        if line.startswith("CMD ")
    ]
    program, *args = json.loads(cmd.removeprefix("CMD "))
    assert program == "uvicorn"
    for option in ("--host", "--port"):
        at = args.index(option)
        del args[at : at + 2]
    return [sys.executable, "-m", "uvicorn", *args, "--fd", str(fd)]


def test_the_image_refuses_a_request_head_over_the_cap(package: Path) -> None:
    # Was: uvicorn's httptools protocol as is: a 64 MiB header value was read whole (the
    # process grew by 73 MB) and the request served; the pod binds 0.0.0.0.
    with listening_socket() as listener:
        port, fd = listener.getsockname()[1], listener.fileno()
        env = {**os.environ, "PYTHONPATH": str(package)}
        server = subprocess.Popen(
            image_command(package, fd),
            cwd=package,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=[fd],
        )
    with server:
        try:
            deadline = time.monotonic() + 60
            while True:
                assert server.poll() is None, "the image's command exited"
                assert time.monotonic() < deadline, "the image's server never became ready"
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                        break
                time.sleep(0.1)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as big:
                big.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nX-Big: ")
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    for _ in range(4 * MAX_HEAD_BYTES // 16384):
                        big.sendall(b"a" * 16384)
                answer = big.recv(4096)
            assert answer.startswith(b"HTTP/1.1 431 "), answer
            assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        finally:
            server.terminate()
        _, err = server.communicate(timeout=30)
    assert "Traceback" not in err, err
