"""Fixtures for the scoring tests: a real Ridge model folder, the way the train component writes it.

`make_model_dir` is deliberately small: fit Ridge on the bundled diabetes data, dump it with
skops, write model.json (with the sha256) and sample-input.json from a held-out split.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import skops.io as sio
from prometheus_client import CollectorRegistry
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge
from sklearn.model_selection import train_test_split

from scoring.model import LoadedModel, load_model

MakeModelDir = Callable[..., Path]
T = TypeVar("T")


def make_model_dir(
    path: Path,
    *,
    alpha: float = 1.0,
    name: str = "diabetes",
    estimator: Any = None,
    target: Callable[[np.ndarray], Any] | None = None,
) -> Path:
    """Write model.skops, model.json and sample-input.json into `path`; return `path`.

    `target` turns the diabetes target into what `estimator` is fitted on (e.g. two columns).
    """
    data = load_diabetes()
    x_train, x_test, y_train, _ = train_test_split(
        data.data, data.target, test_size=0.2, random_state=42
    )
    y_fit = target(y_train) if target is not None else y_train
    model = (estimator if estimator is not None else Ridge(alpha=alpha)).fit(x_train, y_fit)
    path.mkdir(parents=True, exist_ok=True)
    sio.dump(model, path / "model.skops")
    sha = hashlib.sha256((path / "model.skops").read_bytes()).hexdigest()
    meta = {
        "name": name,
        "framework": "sklearn",
        "estimator": type(model).__name__,
        "model_file": "model.skops",
        "sha256": sha,
        "feature_names": list(data.feature_names),
        "target": "progression",
        "metrics": {"rmse": 0.0, "mse": 0.0, "r2": 0.0},
        "data_fingerprint": "test",
        "library_versions": {},
        "params": {"alpha": alpha, "test_fraction": 0.2, "seed": 42},
    }
    (path / "model.json").write_text(json.dumps(meta))
    (path / "sample-input.json").write_text(json.dumps({"data": x_test[:100].tolist()}))
    return path


def make_package_dir(path: Path, *, version: str = "3", **kwargs: Any) -> Path:
    """A package folder: package.json + model/ (what the package component writes)."""
    model_dir = make_model_dir(path / "model", **kwargs)
    sha = json.loads((model_dir / "model.json").read_text())["sha256"]
    name = kwargs.get("name", "diabetes")
    (path / "package.json").write_text(
        json.dumps(
            {"model": name, "version": version, "sha256": sha, "image": f"local/{name}:{version}"}
        )
    )
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def package_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_package_dir(tmp_path_factory.mktemp("package"), version="7")


@pytest.fixture(scope="session")
def loaded(model_dir: Path) -> LoadedModel:
    return load_model(model_dir, version="1")


@pytest.fixture(scope="session")
def holdout(model_dir: Path) -> np.ndarray:
    return np.array(json.loads((model_dir / "sample-input.json").read_text())["data"])


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


class AppClient:
    """A synchronous client for an ASGI app in-process (httpx.ASGITransport on one event loop).

    `lifespan=True` runs the app's startup/shutdown around the client's life, like a server.
    """

    def __init__(
        self, app: Any, *, peer: tuple[str, int] = ("127.0.0.1", 40000), lifespan: bool = False
    ) -> None:
        self.app = app
        self._runner = asyncio.Runner()
        self._http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=peer), base_url="http://scoring.test"
        )
        self._lifespan = app.router.lifespan_context(app) if lifespan else None

    def __enter__(self) -> AppClient:
        if self._lifespan is not None:
            self._runner.run(self._lifespan.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lifespan is not None:
            self._runner.run(self._lifespan.__aexit__(None, None, None))
        self._runner.run(self._http.aclose())
        self._runner.close()

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self._runner.run(self._http.request(method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", url, **kwargs)

    def run(self, scenario: Callable[[httpx.AsyncClient], Awaitable[T]]) -> T:
        """Run `scenario(client)` on the app's event loop (for concurrent requests)."""

        async def main() -> T:
            return await scenario(self._http)

        return self._runner.run(main())


@contextlib.contextmanager
def running_server(app: Any, *, lifespan: str = "on", **config: Any) -> Iterator[str]:
    """Serve `app` with a real uvicorn on a free loopback port in a thread; yields the base URL.
    `config`: more uvicorn.Config options (its HTTP protocol, timeouts)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, access_log=False, log_level="warning", lifespan=lifespan, **config)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class RawCaller:
    """Calls an ASGI app with one POST /score and returns (status, body)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.runner = asyncio.Runner()

    def post(self, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> tuple[int, bytes]:
        """`headers` go after the JSON content type, as a client sent them (none checked)."""
        return self.runner.run(self._post(body, headers))

    async def _post(self, body: bytes, headers: Sequence[tuple[bytes, bytes]]) -> tuple[int, bytes]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/score",
            "raw_path": b"/score",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), *headers],
            "client": ("127.0.0.1", 1234),
            "server": ("127.0.0.1", 80),
        }
        messages = iter([{"type": "http.request", "body": body, "more_body": False}])
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return next(messages, {"type": "http.disconnect"})

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        status = sent[0]["status"]
        return status, b"".join(m.get("body", b"") for m in sent[1:])
