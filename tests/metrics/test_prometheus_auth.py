"""Authentication and TLS of the Prometheus provider, at the wire.

The fake Prometheus (a real HTTP server) requires an exact `Authorization` header (401
otherwise) and serves HTTPS with a CA made in the test, so requests, prometheus-api-client and
the provider run unchanged. What is checked: each auth method sends the right header (bearer from
an environment variable or from a file read again after it changes, basic auth, an Entra ID token
for Azure Monitor managed Prometheus' scope, cached and refreshed before it expires, replaced
after a 401); the spec's rules (one method, TLS options only over https, no credentials in the
url) name the field; a missing secret or CA is a ConfigError at start; a refused credential, an
unreadable secret and an untrusted certificate are Observation errors naming the URL; secrets
never show in reprs, logs or errors.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import requests
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError
from azure.core.pipeline.transport import RequestsTransportResponse
from cryptography.hazmat.primitives import serialization

from rollout.config import PrometheusMetricsConfig, spec_from_dict
from rollout.errors import ConfigError, MetricsError
from rollout.metrics import prometheus_auth
from rollout.metrics.factory import make_metrics
from rollout.metrics.prometheus import PrometheusMetrics, envoy_preset
from rollout.metrics.prometheus_auth import PROMETHEUS_SCOPE, AzureBearerAuth
from tests.fakes.arm import StaticCredential
from tests.fakes.server import LocalServer
from tests.fakes.tls import Pki, make_pki
from tests.metrics.fake_prometheus import FakePrometheus

T0 = 1_700_000_000.0
TOKEN = "s3cr3t-token-value"
PASSWORD = "pä55-wörd"  # not latin-1-safe in every client: sent as UTF-8


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


@pytest.fixture
def prom() -> Iterator[FakePrometheus]:
    with FakePrometheus() as fake:
        fake.add("envoy_cluster_upstream_rq_completed", {"envoy_cluster_name": "blue"}, [])
        yield fake


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_prom(pki: Pki) -> Iterator[FakePrometheus]:
    with FakePrometheus(tls=pki.server_context()) as fake:
        yield fake


def provider(url: str, **fields: Any) -> PrometheusMetrics:
    built = make_metrics(PrometheusMetricsConfig(url=url, **fields))
    assert isinstance(built, PrometheusMetrics)
    return built


# ---------------------------------------------------------------------------------- the methods


@pytest.mark.parametrize(
    ("fields", "header"),
    [
        pytest.param({"bearer_token_env": "PROM_TOKEN"}, f"Bearer {TOKEN}", id="bearer-from-env"),
        pytest.param({"bearer_token_file": "token"}, f"Bearer {TOKEN}", id="bearer-from-file"),
        pytest.param(
            {"basic_auth": {"username": "rollout", "password_env": "PROM_PASSWORD"}},
            basic("rollout", PASSWORD),
            id="basic-password-from-env",
        ),
        pytest.param(
            {"basic_auth": {"username": "rollout", "password_file": "password"}},
            basic("rollout", PASSWORD),
            id="basic-password-from-file",
        ),
    ],
)
def test_each_method_sends_its_header(
    prom: FakePrometheus,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fields: dict[str, Any],
    header: str,
) -> None:
    monkeypatch.setenv("PROM_TOKEN", TOKEN)
    monkeypatch.setenv("PROM_PASSWORD", PASSWORD)
    (tmp_path / "token").write_text(f"{TOKEN}\n")  # a Secret's trailing newline is not the token's
    (tmp_path / "password").write_text(PASSWORD)
    monkeypatch.chdir(tmp_path)
    prom.require_authorization = header
    metrics = provider(prom.url, **fields)
    observation = metrics.observe(T0 - 10, T0)
    assert observation.error is None
    metrics.probe()
    assert prom.authorizations and set(prom.authorizations) == {header}


def test_without_credentials_a_401_is_an_error_naming_the_url(prom: FakePrometheus) -> None:
    prom.require_authorization = f"Bearer {TOKEN}"
    observation = provider(prom.url).observe(T0 - 10, T0)
    assert observation.error is not None
    assert prom.url in observation.error and "HTTP 401" in observation.error


@contextmanager
def redirecting(to: str) -> Iterator[str]:
    """A server answering every GET with a 308 to the same path under `to`; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(308)
            self.send_header("Location", f"{to}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with LocalServer(Handler) as server:
        yield server.url


def test_a_401_after_a_redirect_to_another_host_names_it_not_the_credentials(
    prom: FakePrometheus, monkeypatch: pytest.MonkeyPatch
) -> None:
    # requests sends no `Authorization` on to another host, so the right token got a 401 there,
    # and the error said Prometheus refused the token (naming the url that redirected).
    monkeypatch.setenv("PROM_TOKEN", TOKEN)
    prom.require_authorization = f"Bearer {TOKEN}"
    there = prom.url.replace("127.0.0.1", "localhost")
    with redirecting(there) as url:
        metrics = provider(url, bearer_token_env="PROM_TOKEN")
        observation = metrics.observe(T0 - 10, T0)
        with pytest.raises(MetricsError) as probed:
            metrics.probe()
        metrics.close()
    said = (
        f"Prometheus at {url} redirected the request to {there}, which refused it (HTTP 401): "
        f"credentials are not sent on to another host; set metrics.url to {there}"
    )
    assert (observation.error, str(probed.value)) == (said, said)
    assert set(prom.authorizations) == {None}


def test_a_token_file_is_read_again_when_it_changes(prom: FakePrometheus, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first-token")
    prom.require_authorization = "Bearer first-token"
    metrics = provider(prom.url, bearer_token_file=token_file)
    assert metrics.observe(T0 - 10, T0).error is None
    # The Secret is rotated: the server takes only the new token, and the provider, unchanged,
    # sends it from the next query on.
    token_file.write_text("second-token")
    prom.require_authorization = "Bearer second-token"
    assert metrics.observe(T0 - 10, T0).error is None
    # The file disappears mid-rollout: an Observation error (the judge waits), not a crash.
    token_file.unlink()
    observation = metrics.observe(T0 - 10, T0)
    assert observation.error is not None and prom.url in observation.error
    assert f"metrics.bearer_token_file: {token_file} does not exist" in observation.error


# ------------------------------------------------------------------------------ start and spec


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param(
            {"bearer_token_env": "PROM_UNSET"},
            "metrics.bearer_token_env: environment variable PROM_UNSET is not set (or empty)",
            id="env-unset",
        ),
        pytest.param(
            {"bearer_token_env": "PROM_EMPTY"},
            "metrics.bearer_token_env: environment variable PROM_EMPTY is not set (or empty)",
            id="env-empty",
        ),
        pytest.param(
            {"bearer_token_file": "missing"},
            "metrics.bearer_token_file: missing does not exist",
            id="file-missing",
        ),
        pytest.param(
            {"bearer_token_file": "empty"},
            "metrics.bearer_token_file: empty is empty",
            id="file-empty",
        ),
        pytest.param(
            {"basic_auth": {"username": "u", "password_env": "PROM_UNSET"}},
            "metrics.basic_auth.password_env: environment variable PROM_UNSET is not set",
            id="basic-env-unset",
        ),
        pytest.param(
            {"basic_auth": {"username": "u", "password_file": "missing"}},
            "metrics.basic_auth.password_file: missing does not exist",
            id="basic-file-missing",
        ),
        pytest.param(
            {"url": "https://p:9090", "ca_file": "missing"},
            "metrics.ca_file: missing does not exist",
            id="ca-missing",
        ),
        pytest.param(
            {"url": "https://p:9090", "ca_file": "empty"},
            "metrics.ca_file: empty holds no PEM CA certificate",
            id="ca-not-pem",
        ),
    ],
)
def test_a_secret_or_ca_that_is_not_there_fails_at_start_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fields: dict[str, Any], message: str
) -> None:
    monkeypatch.delenv("PROM_UNSET", raising=False)
    monkeypatch.setenv("PROM_EMPTY", "")
    (tmp_path / "empty").write_text("\n")
    monkeypatch.chdir(tmp_path)
    # The spec itself is valid: operator commands load it where the secrets are not.
    cfg = PrometheusMetricsConfig(**{"url": "http://p:9090", **fields})
    with pytest.raises(ConfigError) as caught:
        make_metrics(cfg)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        pytest.param(
            {"bearer_token_env": "A", "bearer_token_file": "/f"},
            "metrics.bearer_token_file: only one authentication method at a time; "
            "bearer_token_env and bearer_token_file are set",
            id="two-methods",
        ),
        pytest.param(
            {
                "url": "https://p",
                "basic_auth": {"username": "u", "password_env": "P"},
                "azure_auth": True,
            },
            "metrics.azure_auth: only one authentication method at a time; "
            "basic_auth and azure_auth are set",
            id="basic-and-azure",
        ),
        pytest.param(
            {"basic_auth": {"username": "u"}},
            "metrics.basic_auth: give the password as exactly one of",
            id="basic-without-password",
        ),
        pytest.param(
            {"basic_auth": {"username": "u", "password_env": "P", "password_file": "/f"}},
            "metrics.basic_auth: give the password as exactly one of",
            id="basic-with-two-passwords",
        ),
        pytest.param(
            {"basic_auth": {"username": "u", "password": "inline"}},
            "metrics.basic_auth.password: unknown field",
            id="no-inline-password",
        ),
        pytest.param(
            {"url": "http://p", "azure_auth": True},
            "metrics.url: azure_auth sends its token only over https",
            id="azure-over-http",
        ),
        pytest.param(
            {"url": "http://p", "ca_file": "/ca.pem"},
            "metrics.ca_file: applies to an https url",
            id="ca-over-http",
        ),
        pytest.param(
            {"url": "http://p", "cert_file": "/c.pem"},
            "metrics.cert_file: applies to an https url",
            id="client-cert-over-http",
        ),
        pytest.param(
            {"url": "https://p", "key_file": "/c.key"},
            "metrics.key_file: needs cert_file",
            id="key-without-cert",
        ),
        pytest.param(
            {"url": "https://p", "ca_file": "/ca.pem", "insecure_skip_verify": True},
            "metrics.insecure_skip_verify: excludes ca_file",
            id="ca-and-insecure",
        ),
        pytest.param(
            {"url": "https://rollout:hunter2@p"},
            "metrics.url: holds credentials",
            id="credentials-in-url",
        ),
    ],
)
def test_the_spec_names_the_field(metrics: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        spec_from_dict({"metrics": {"kind": "prometheus", **metrics}})
    assert message in str(caught.value)
    assert "hunter2" not in str(caught.value)


# ---------------------------------------------------------------------------------------- TLS


def test_a_private_ca_is_trusted_through_ca_file(tls_prom: FakePrometheus, pki: Pki) -> None:
    metrics = provider(tls_prom.url, ca_file=pki.ca_file)
    assert tls_prom.url.startswith("https://")
    assert metrics.observe(T0 - 10, T0).error is None
    assert tls_prom.queries


@pytest.mark.parametrize("with_other_ca", [False, True], ids=["system-cas", "another-ca"])
def test_an_unknown_ca_is_an_error_naming_the_url(
    tls_prom: FakePrometheus, tmp_path: Path, with_other_ca: bool
) -> None:
    fields = {"ca_file": make_pki(tmp_path, "other").ca_file} if with_other_ca else {}
    metrics = provider(tls_prom.url, **fields)
    observation = metrics.observe(T0 - 10, T0)
    assert observation.error is not None
    assert tls_prom.url in observation.error
    assert "TLS certificate not trusted" in observation.error
    with pytest.raises(MetricsError, match="TLS certificate not trusted"):
        metrics.probe()
    assert not tls_prom.queries


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_insecure_skip_verify_accepts_any_certificate_and_says_so(
    tls_prom: FakePrometheus, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="rollout.metrics.prometheus_auth"):
        metrics = provider(tls_prom.url, insecure_skip_verify=True)
    assert metrics.observe(T0 - 10, T0).error is None
    assert "metrics.insecure_skip_verify" in caplog.text and tls_prom.url in caplog.text


@pytest.fixture
def mtls_prom(pki: Pki) -> Iterator[FakePrometheus]:
    with FakePrometheus(tls=pki.server_context(require_client_cert=True)) as fake:
        yield fake


@pytest.mark.parametrize("one_file", [False, True], ids=["cert-and-key", "both-in-cert_file"])
def test_mutual_tls_sends_the_client_certificate(
    mtls_prom: FakePrometheus, pki: Pki, tmp_path: Path, one_file: bool
) -> None:
    if one_file:
        both = tmp_path / "client.pem"
        both.write_bytes(pki.client_cert_file.read_bytes() + pki.client_key_file.read_bytes())
        fields: dict[str, Any] = {"cert_file": both}
    else:
        fields = {"cert_file": pki.client_cert_file, "key_file": pki.client_key_file}
    metrics = provider(mtls_prom.url, ca_file=pki.ca_file, **fields)
    assert metrics.observe(T0 - 10, T0).error is None
    assert mtls_prom.queries


def test_a_server_asking_for_a_client_certificate_is_an_error_naming_cert_file(
    mtls_prom: FakePrometheus, pki: Pki
) -> None:
    observation = provider(mtls_prom.url, ca_file=pki.ca_file).observe(T0 - 10, T0)
    assert observation.error is not None
    assert mtls_prom.url in observation.error
    assert "mutual TLS" in observation.error and "metrics.cert_file" in observation.error
    assert not mtls_prom.queries


def test_a_refused_client_certificate_is_an_error_asking_about_it(
    mtls_prom: FakePrometheus, pki: Pki, tmp_path: Path
) -> None:
    other = make_pki(tmp_path, "other")
    metrics = provider(
        mtls_prom.url,
        ca_file=pki.ca_file,
        cert_file=other.client_cert_file,
        key_file=other.client_key_file,
    )
    observation = metrics.observe(T0 - 10, T0)
    assert observation.error is not None
    assert "refuse the client certificate in metrics.cert_file" in observation.error
    assert not mtls_prom.queries


@pytest.mark.parametrize(
    ("files", "message"),
    [
        pytest.param(
            {"cert_file": "missing"}, "metrics.cert_file: {tmp}/missing does not exist", id="none"
        ),
        pytest.param(
            {"cert_file": "client.pem", "key_file": "missing"},
            "metrics.key_file: {tmp}/missing does not exist",
            id="no-key",
        ),
        pytest.param(
            {"cert_file": "client.pem"},
            "metrics.cert_file: {tmp}/client.pem holds no private key and metrics.key_file is "
            "not set",
            id="cert-without-its-key",
        ),
        pytest.param(
            {"cert_file": "client.pem", "key_file": "encrypted.key"},
            "metrics.key_file: {tmp}/encrypted.key is encrypted (a passphrase-protected key): "
            "give an unencrypted key",
            id="encrypted-key",
        ),
        pytest.param(
            {"cert_file": "both-encrypted.pem"},
            "metrics.cert_file: {tmp}/both-encrypted.pem holds an encrypted "
            "(passphrase-protected) key: give an unencrypted key",
            id="encrypted-key-in-cert_file",
        ),
        pytest.param(
            {"cert_file": "client.pem", "key_file": "server.key"},
            "metrics.cert_file and key_file do not hold a PEM certificate and its private key",
            id="another-key",
        ),
    ],
)
def test_client_certificate_files_are_checked_when_the_provider_is_built(
    pki: Pki, tmp_path: Path, files: dict[str, str], message: str
) -> None:
    (tmp_path / "client.pem").write_bytes(pki.client_cert_file.read_bytes())
    (tmp_path / "server.key").write_bytes(pki.key_file.read_bytes())
    (tmp_path / "encrypted.key").write_bytes(encrypted(pki.client_key_file))
    (tmp_path / "both-encrypted.pem").write_bytes(
        pki.client_cert_file.read_bytes() + encrypted(pki.client_key_file)
    )
    fields = {name: tmp_path / value for name, value in files.items()}
    with pytest.raises(ConfigError) as caught:
        provider("https://p:9090", **fields)  # OpenSSL asking for a passphrase would block here
    assert str(caught.value).startswith(message.format(tmp=tmp_path))
    assert "(None)" not in str(caught.value)


def encrypted(key_file: Path) -> bytes:
    """The PEM private key in `key_file`, encrypted with a passphrase."""
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )


@pytest.mark.parametrize("one_file", [False, True], ids=["key_file", "key-in-cert_file"])
def test_a_key_encrypted_after_start_is_an_error_not_a_passphrase_prompt(
    mtls_prom: FakePrometheus, pki: Pki, tmp_path: Path, one_file: bool
) -> None:
    # requests loads the key again for every new connection: a key rotated to an encrypted one
    # must not make OpenSSL ask for a passphrase on the terminal (or fail as "PEM lib").
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_bytes(pki.client_cert_file.read_bytes())
    key.write_bytes(pki.client_key_file.read_bytes())
    if one_file:
        cert.write_bytes(cert.read_bytes() + key.read_bytes())
        fields: dict[str, Any] = {"cert_file": cert}
    else:
        fields = {"cert_file": cert, "key_file": key}
    metrics = provider(mtls_prom.url, ca_file=pki.ca_file, **fields)
    assert metrics.observe(T0 - 10, T0).error is None
    if one_file:
        cert.write_bytes(pki.client_cert_file.read_bytes() + encrypted(pki.client_key_file))
    else:
        key.write_bytes(encrypted(pki.client_key_file))
    metrics._client._session.close()  # the next query opens a new connection
    observation = metrics.observe(T0, T0 + 10)
    said = (
        f"metrics.cert_file: {cert} holds an encrypted (passphrase-protected) key"
        if one_file
        else f"metrics.key_file: {key} is encrypted (a passphrase-protected key)"
    )
    assert observation.error == f"Prometheus at {mtls_prom.url}: {said}: give an unencrypted key"


def test_the_pools_behind_a_proxy_refuse_a_passphrase_too() -> None:
    """Was: only the direct pools got the refusing key_password; with $HTTPS_PROXY set, a key
    rotated to an encrypted one brought OpenSSL's prompt back, and the tick hung."""
    from rollout.metrics.prometheus_auth import NoPassphraseAdapter

    def refuse() -> str:
        raise AssertionError("never called here")

    adapter = NoPassphraseAdapter(refuse)
    assert adapter.poolmanager.connection_pool_kw["key_password"] is refuse
    manager = adapter.proxy_manager_for("http://127.0.0.1:3128")
    assert manager.connection_pool_kw["key_password"] is refuse


# -------------------------------------------------------------------------------------- Azure


@pytest.mark.parametrize(
    ("url", "scope"),
    [
        ("https://ws-1a2b.eastus.prometheus.monitor.azure.com", PROMETHEUS_SCOPE),
        (
            "https://ws-1a2b.usgovvirginia.prometheus.monitor.azure.us",
            "https://prometheus.monitor.azure.us/.default",
        ),
        (
            "https://WS.chinanorth3.prometheus.monitor.azure.cn:443/",
            "https://prometheus.monitor.azure.cn/.default",
        ),
        ("https://prometheus.example.com", PROMETHEUS_SCOPE),
    ],
    ids=["public", "us-government", "china", "other-host"],
)
def test_azure_auth_asks_for_the_audience_of_the_workspace_cloud(
    url: str, scope: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prometheus_auth, "default_credential", StaticCredential)
    auth = provider(url, azure_auth=True).auth
    assert isinstance(auth, AzureBearerAuth)
    assert auth.scope == scope


def test_azure_auth_sends_an_entra_token_for_managed_prometheus(
    tls_prom: FakePrometheus, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    credential = StaticCredential()
    monkeypatch.setattr(prometheus_auth, "default_credential", lambda: credential)
    expected = StaticCredential().get_token(PROMETHEUS_SCOPE).token
    tls_prom.require_authorization = f"Bearer {expected}"
    metrics = provider(tls_prom.url, azure_auth=True, ca_file=pki.ca_file)
    assert metrics.observe(T0 - 10, T0).error is None
    assert PROMETHEUS_SCOPE == "https://prometheus.monitor.azure.com/.default"
    # One token for every query of the tick: it is cached until shortly before it expires.
    assert credential.scopes == [PROMETHEUS_SCOPE]
    assert len(tls_prom.authorizations) > 1


class ExpiringCredential:
    """Hands out `token-1`, `token-2`, ... each valid for an hour from the test's clock."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.issued = 0
        self.fail = False

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        assert scopes == (PROMETHEUS_SCOPE,)
        if self.fail:
            raise ClientAuthenticationError(
                "DefaultAzureCredential failed to retrieve a token from the included "
                "credentials.\nAttempted credentials: ..."
            )
        self.issued += 1
        return AccessToken(f"token-{self.issued}", int(self.clock[0]) + 3600)


@pytest.fixture
def clock() -> list[float]:
    return [T0]


def azure_provider(url: str, credential: ExpiringCredential, ca_file: Path) -> PrometheusMetrics:
    auth = AzureBearerAuth(credential, clock=lambda: credential.clock[0])
    return PrometheusMetrics(url, preset=envoy_preset(), auth=auth, verify=str(ca_file))


def test_azure_token_is_refreshed_before_it_expires(
    tls_prom: FakePrometheus, pki: Pki, clock: list[float]
) -> None:
    credential = ExpiringCredential(clock)
    metrics = azure_provider(tls_prom.url, credential, pki.ca_file)
    tls_prom.require_authorization = "Bearer token-1"
    assert metrics.observe(T0 - 10, T0).error is None
    clock[0] = T0 + 3600 - 301  # still five minutes and more to go: kept
    assert metrics.observe(T0 - 10, T0).error is None
    assert credential.issued == 1
    clock[0] = T0 + 3600 - 299  # within five minutes of expiry: replaced
    tls_prom.require_authorization = "Bearer token-2"
    assert metrics.observe(T0 - 10, T0).error is None
    assert credential.issued == 2


def test_a_refused_azure_token_is_replaced_on_the_next_query(
    tls_prom: FakePrometheus, pki: Pki, clock: list[float]
) -> None:
    credential = ExpiringCredential(clock)
    metrics = azure_provider(tls_prom.url, credential, pki.ca_file)
    tls_prom.require_authorization = "Bearer token-2"  # token-1 was revoked
    failed = metrics.observe(T0 - 10, T0)
    assert failed.error is not None and "HTTP 401" in failed.error
    assert metrics.observe(T0 - 10, T0).error is None
    assert credential.issued == 2


def test_a_forbidden_azure_identity_is_told_the_role_it_lacks(
    tls_prom: FakePrometheus, pki: Pki, clock: list[float]
) -> None:
    # Azure Monitor answers 403 to a valid token of an identity with no data role on the
    # workspace: "refused (HTTP 403)" alone did not say what to fix.
    tls_prom.status = 403
    metrics = azure_provider(tls_prom.url, ExpiringCredential(clock), pki.ca_file)
    observation = metrics.observe(T0 - 10, T0)
    assert observation.error == (
        f"Prometheus at {tls_prom.url} refused the request with "
        f"AzureBearerAuth('{PROMETHEUS_SCOPE}') (HTTP 403): the identity needs the Monitoring "
        "Data Reader role on the Azure Monitor workspace (a new role assignment takes minutes "
        "to apply)"
    )


def test_no_azure_token_is_an_error_naming_the_url(
    tls_prom: FakePrometheus, pki: Pki, clock: list[float]
) -> None:
    credential = ExpiringCredential(clock)
    credential.fail = True
    observation = azure_provider(tls_prom.url, credential, pki.ca_file).observe(T0 - 10, T0)
    assert observation.error == (
        f"Prometheus at {tls_prom.url}: metrics.azure_auth: no Entra ID token for "
        f"{PROMETHEUS_SCOPE}: DefaultAzureCredential failed to retrieve a token from the "
        "included credentials."
    )
    assert not tls_prom.authorizations


# ---------------------------------------------------------------------------------- no leaks


def test_secrets_stay_out_of_reprs_logs_errors_and_details(
    prom: FakePrometheus, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PROM_PASSWORD", PASSWORD)
    cfg = PrometheusMetricsConfig(
        url=prom.url, basic_auth={"username": "rollout", "password_env": "PROM_PASSWORD"}
    )
    prom.require_authorization = "Bearer something-else"
    prom.echo_authorization = True  # a proxy quoting the request in its error pages
    secrets = [PASSWORD, basic("rollout", PASSWORD).removeprefix("Basic ")]
    with caplog.at_level(logging.DEBUG):
        metrics = make_metrics(cfg)
        refused = metrics.observe(T0 - 10, T0)
        # Accepted, then failing: the error quotes the body, which quotes the header.
        prom.require_authorization, prom.status = basic("rollout", PASSWORD), 500
        failed = metrics.observe(T0 - 10, T0)
        prom.status = 200
        served = metrics.observe(T0 - 10, T0)
    assert served.error is None
    assert refused.error is not None and "HTTP 401" in refused.error
    assert "PROM_PASSWORD" in refused.error  # says which secret was refused, not what it is
    assert failed.error is not None and "HTTP 500" in failed.error
    assert "<redacted>" in failed.error
    seen = [repr(cfg), repr(metrics), refused.error, failed.error, str(served.detail), caplog.text]
    assert all(secret not in text for secret in secrets for text in seen)
    assert secrets[1] in prom.authorizations[-1]  # it was sent, so the checks above could fail


# ------------------------------------------------------ a credential that caches, as real ones do


class FakeEntra:
    """An azure-core transport playing Microsoft Entra ID's token endpoint (and MSAL's
    discovery) for a real azure-identity credential: each token request is issued `token-1`,
    `token-2`, ... for an hour; `requests` records each one's form fields. The credential caches
    what it is issued, as ClientSecretCredential, ManagedIdentityCredential and
    WorkloadIdentityCredential do."""

    def __init__(self) -> None:
        self.requests: list[dict[str, list[str]]] = []

    def __enter__(self) -> FakeEntra:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def send(self, request: Any, **kwargs: Any) -> Any:
        url = request.url
        if "openid-configuration" in url or "discovery/instance" in url:
            tenant = "https://login.microsoftonline.com/tenant"
            body: dict[str, Any] = {
                "token_endpoint": f"{tenant}/oauth2/v2.0/token",
                "authorization_endpoint": f"{tenant}/oauth2/v2.0/authorize",
                "issuer": f"{tenant}/v2.0",
                "tenant_discovery_endpoint": f"{tenant}/v2.0/.well-known/openid-configuration",
                "metadata": [],
            }
        else:
            # (azure-core's HttpRequest holds a form post as the dict it was given)
            self.requests.append({key: [str(v)] for key, v in request.data.items()})
            issued = f"token-{len(self.requests)}"
            body = {"access_token": issued, "expires_in": 3600, "token_type": "Bearer"}
        answer = requests.Response()
        answer.status_code, answer.url = 200, url
        answer._content = json.dumps(body).encode()
        answer.headers["Content-Type"] = "application/json"
        return RequestsTransportResponse(request, answer)


#: What a CAE-aware resource asks for when it refuses a revoked token (Microsoft's example).
CLAIMS = '{"access_token":{"nbf":{"essential":true,"value":"1700000000"}}}'
CHALLENGE = (
    'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/'
    'authorize", error="insufficient_claims", claims="'
    + base64.urlsafe_b64encode(CLAIMS.encode()).decode().rstrip("=")
    + '"'
)


@contextmanager
def refusing(token: str, challenge: str | None) -> Iterator[str]:
    """A Prometheus query API taking only `Authorization: Bearer <token>`; any other answers
    401 with `challenge` as its WWW-Authenticate. Yields its URL."""
    with FakePrometheus() as fake:
        fake.require_authorization, fake.challenge = f"Bearer {token}", challenge
        yield fake.url


def caching_provider(url: str) -> tuple[PrometheusMetrics, FakeEntra]:
    from azure.identity import ClientSecretCredential

    entra = FakeEntra()
    credential = ClientSecretCredential("tenant", "client", "secret", transport=entra)
    auth = AzureBearerAuth(credential)
    return PrometheusMetrics(url, preset=envoy_preset(), auth=auth), entra


def test_a_claims_challenge_gets_a_new_token_past_the_credentials_cache() -> None:
    """A token revoked under continuous access evaluation: Azure answers 401 with a claims
    challenge. Was: our cached token dropped, but the credential answered from its own cache,
    and the refused token was sent on every query until it neared expiry (an hour; up to a day
    for a managed identity), every tick an Error. Now the claims are asked for, which
    azure-identity takes past its cache."""
    with refusing("token-2", CHALLENGE) as url:
        metrics, entra = caching_provider(url)
        refused = metrics.observe(T0 - 10, T0)
        assert refused.error is not None and "HTTP 401" in refused.error
        assert metrics.observe(T0 - 10, T0).error is None
        assert metrics.observe(T0 - 10, T0).error is None  # kept, once issued
    assert len(entra.requests) == 2
    assert "claims" not in entra.requests[0]
    assert json.loads(entra.requests[1]["claims"][0]) == json.loads(CLAIMS)


@pytest.mark.parametrize(
    "challenge",
    [
        pytest.param(None, id="no-challenge"),
        pytest.param('Bearer realm="", error="invalid_token"', id="invalid-token"),
        pytest.param('Bearer error="insufficient_claims", claims="%%%"', id="claims-not-base64"),
    ],
)
def test_a_401_without_claims_is_sent_the_credentials_cached_token_again(
    challenge: str | None,
) -> None:
    """What is true of real credentials (azure-core's own policy does the same): a 401 that asks
    for no claims gets the token the credential holds, until it nears expiry. It says so."""
    with refusing("token-2", challenge) as url:
        metrics, entra = caching_provider(url)
        for _ in range(3):
            refused = metrics.observe(T0 - 10, T0)
            assert refused.error is not None and "HTTP 401" in refused.error
    assert len(entra.requests) == 1


class CliLikeCredential:
    """As AzureCliCredential (and azd's, PowerShell's): refuses any request carrying claims;
    hands out `token-1`, `token-2`, ... otherwise (the operator's `az login` gives a new one)."""

    def __init__(self) -> None:
        self.asked: list[str | None] = []

    def get_token(self, *scopes: str, claims: str | None = None, **kwargs: Any) -> AccessToken:
        from azure.identity import CredentialUnavailableError

        self.asked.append(claims)
        if claims:
            raise CredentialUnavailableError(
                "This credential doesn't support claims challenges. To authenticate with the "
                "required claims, please run: az login --claims-challenge ..."
            )
        issued = sum(1 for c in self.asked if not c)
        return AccessToken(f"token-{issued}", int(time.time()) + 3600)


def test_a_credential_refusing_claims_is_asked_again_without_them() -> None:
    """Was (the first claims fix): the claims were kept until a token came with them, which a
    CLI credential never gives: every later query failed for the process's life, the operator's
    `az login --claims-challenge` included. They are asked for once, then a token without."""
    credential = CliLikeCredential()
    with refusing("token-2", CHALLENGE) as url:
        metrics = PrometheusMetrics(url, preset=envoy_preset(), auth=AzureBearerAuth(credential))
        refused = metrics.observe(T0 - 10, T0)
        assert refused.error is not None and "HTTP 401" in refused.error
        assert metrics.observe(T0 - 10, T0).error is None
        assert metrics.observe(T0 - 10, T0).error is None
    assert credential.asked[0] is None and credential.asked[1] is not None
    assert credential.asked[2:] == [None]
