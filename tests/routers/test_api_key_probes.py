"""With an API key from a Secret (`manifests --api-key-secret`, the chart's `apiKeySecret`), the
pod's probes and Prometheus' scrape must still get through without one: a readiness probe
answered 401 keeps every pod unready, and the deploy fails at its ready timeout.

The paths are read from the Deployment as built (the chart renders the same object, see
test_manifests.py), and served by the scoring app configured as the package image configures it
(`scoring.auth.api_keys_from_env` on the value the kubelet puts in AML_ROLLOUT_API_KEY).
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from rollout.core.types import Colour
from rollout.routers import istio_manifests as m
from scoring.app import create_app
from scoring.auth import API_KEY_ENV, api_keys_from_env
from scoring.model import load_model
from tests.routers.contract import V1
from tests.scoring.conftest import AppClient, make_model_dir

#: What `kubectl create secret generic ... --from-file=api-key=key.txt` may hold: two keys (a
#: rotation) and the file's trailing newline.
SECRET_VALUE = "old-key,new-key\n"


def scoring_container() -> dict[str, Any]:
    layout = m.IstioLayout(namespace="ml", app="diabetes", api_key_secret="diabetes-api-key")
    (container,) = m.deployment(layout, Colour.GREEN, V1)["spec"]["template"]["spec"]["containers"]
    return dict(container)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The scoring app as the pod runs it: its keys from the Secret's value."""
    (from_secret,) = [e for e in scoring_container()["env"] if e["name"] == API_KEY_ENV]
    assert from_secret["valueFrom"]["secretKeyRef"] == {
        "name": "diabetes-api-key",
        "key": "api-key",
    }
    loaded = load_model(make_model_dir(tmp_path_factory.mktemp("model")), version="1")
    keys = api_keys_from_env(SECRET_VALUE)
    return create_app(loaded, registry=CollectorRegistry(), api_keys=keys)


def probe_paths() -> list[str]:
    container = scoring_container()
    return [container[probe]["httpGet"]["path"] for probe in ("readinessProbe", "livenessProbe")]


def test_the_probes_are_the_scoring_server_s_health_routes() -> None:
    assert probe_paths() == ["/readyz", "/healthz"]


@pytest.mark.parametrize("path", [*probe_paths(), "/metrics"])
def test_probes_and_the_scrape_need_no_key(keyed: Any, path: str) -> None:
    with AppClient(keyed) as client:
        assert client.get(path).status_code == 200


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        pytest.param(None, 401, id="no-key"),
        pytest.param("Bearer old-key", 200, id="old-key"),
        pytest.param("Bearer new-key", 200, id="new-key"),
        pytest.param("Bearer old-key,new-key", 401, id="the-secret-value-whole"),
    ],
)
def test_score_needs_a_key_from_the_secret(
    keyed: Any, authorization: str | None, status: int
) -> None:
    headers = {"authorization": authorization} if authorization else {}
    with AppClient(keyed) as client:
        assert client.get("/score", headers=headers).status_code == status
