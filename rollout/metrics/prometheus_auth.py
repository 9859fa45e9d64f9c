"""How the Prometheus provider signs its requests and checks TLS: the spec's fields → requests.

The spec says where a secret is (an environment variable, a file), never the secret. This module
reads it, twice over:

- at start (`http_auth`, `tls_verify`, called when the provider is built): an environment variable
  that is unset or empty, a file that is missing, unreadable or empty, a CA file holding no PEM
  certificate — each a ConfigError naming the spec's field, before the first tick, instead of a
  401 or a TLS failure at it. (Not at spec validation: `status`, `pause` and the other operator
  commands load the spec on machines that do not hold the controller's secrets.)
- per request, a `requests.auth.AuthBase` sets `Authorization`:
  `BearerAuth` with a token from `bearer_token_env` (read once) or `bearer_token_file` (read
  again for every request, as Prometheus does with `credentials_file`: a rotated Kubernetes
  Secret is used from the next query on, no restart); `BasicAuth` with the password from
  `password_env` or `password_file` alike; `AzureBearerAuth` with an Entra ID token for Azure
  Monitor managed Prometheus (scope `https://prometheus.monitor.azure.com/.default`, or the
  US Government / China cloud's when the url's host is in it, as Flagger and KEDA do) from
  `rollout.azure_credential.default_credential()`, kept until REFRESH_MARGIN_S before it expires.
  A 401 carrying a claims challenge (`WWW-Authenticate: Bearer error="insufficient_claims",
  claims="..."`: Azure revoked the token under continuous access evaluation) has the next query
  ask for a token with those claims, which azure-identity's credentials fetch past their own
  cache: the revoked token is replaced on the next query. Asked once: a credential that refuses
  claims (az, azd, PowerShell: they ask for `az login --claims-challenge`) is asked again without
  them (logged), so the operator's re-login is taken. Any other 401 cannot replace it: the
  credentials answer `get_token` from their cache until the token nears expiry (azure-identity
  offers no way past it but claims; azure-core's own policy does the same), so the same token is
  sent again and each tick is an Error until then (an hour for a service principal, up to a day
  for a managed identity).
  A secret that cannot be read then (a deleted file, no token) raises MetricsError, which the
  provider turns into an Observation error: the judge says Error and waits.

Secrets stay out of reprs, logs and messages: the auth objects print their source, never the
value, and `redact` blanks out every value they sent from a text — a proxy that echoes request
headers in its 401 page would otherwise carry the token into an Observation's error, hence into
the ledger.

TLS: `tls_verify` gives requests' `verify`: the CA file, False with `insecure_skip_verify` (a
warning is logged once, at start), True otherwise (the system's CAs); `tls_client_cert` gives
its `cert` for mutual TLS (`cert_file`, `key_file`), loaded once at start to check them. An
encrypted key is refused there and on every later connection (`NoPassphraseAdapter`): OpenSSL
would otherwise ask for its passphrase on the terminal.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from requests import PreparedRequest, Response
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase

from rollout.azure_credential import default_credential
from rollout.config import PrometheusMetricsConfig
from rollout.errors import ConfigError, MetricsError

log = logging.getLogger(__name__)

#: The audience of Azure Monitor managed Prometheus' query API, as an OAuth 2.0 scope.
PROMETHEUS_SCOPE = "https://prometheus.monitor.azure.com/.default"
#: A query endpoint's host suffix → its cloud's audience (US Government, China; else public).
SOVEREIGN_SCOPES = {
    ".prometheus.monitor.azure.us": "https://prometheus.monitor.azure.us/.default",
    ".prometheus.monitor.azure.cn": "https://prometheus.monitor.azure.cn/.default",
}
#: A cached Entra ID token is replaced this long before it expires (azure-core's margin too).
REFRESH_MARGIN_S = 300.0
REDACTED = "<redacted>"


class Secret(Protocol):
    """Where a secret comes from."""

    field: str

    def value(self) -> str:
        """The secret now; MetricsError (naming the field, not the value) when it cannot be read."""
        ...


class EnvSecret:
    """A secret in an environment variable, read once: a process' environment does not change."""

    def __init__(self, field: str, name: str, env: dict[str, str] | None = None) -> None:
        self.field = field
        self.name = name
        value = (os.environ if env is None else env).get(name, "").strip()
        if not value:
            raise ConfigError(f"{field}: environment variable {name} is not set (or empty)")
        self._value = value

    def value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"EnvSecret(${self.name})"


class FileSecret:
    """A secret in a file, read again every time (surrounding whitespace stripped)."""

    def __init__(self, field: str, path: Path) -> None:
        self.field = field
        self.path = path
        try:
            self.value()
        except MetricsError as exc:
            raise ConfigError(str(exc)) from None

    def value(self) -> str:
        try:
            text = self.path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise MetricsError(f"{self.field}: {self.path} does not exist") from None
        except OSError as exc:
            raise MetricsError(f"{self.field}: cannot read {self.path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise MetricsError(f"{self.field}: {self.path} is not UTF-8 text") from None
        if not text:
            raise MetricsError(f"{self.field}: {self.path} is empty")
        return text

    def __repr__(self) -> str:
        return f"FileSecret({self.path})"


class _Auth(AuthBase):
    """Remembers what it sent, so that `redact` can take it out of any text."""

    def __init__(self) -> None:
        self._sent: set[str] = set()

    def _remember(self, *values: str) -> None:
        self._sent.update(v for v in values if v)

    def redact(self, text: str) -> str:
        """`text` with every secret value this object ever sent replaced by REDACTED."""
        for value in sorted(self._sent, key=len, reverse=True):
            text = text.replace(value, REDACTED)
        return text


def _bearer_token(token: str, field: str) -> str:
    # A bearer token is visible ASCII (RFC 6750). Anything else would fail in requests with a
    # message that quotes the header, secret included; say which field holds it instead.
    if not token.isascii() or not token.isprintable() or " " in token:
        raise MetricsError(f"{field}: holds characters a bearer token cannot have")
    return token


class BearerAuth(_Auth):
    """`Authorization: Bearer <token>` with the token read from `secret` for every request."""

    def __init__(self, secret: Secret) -> None:
        super().__init__()
        self.secret = secret

    def __call__(self, request: PreparedRequest) -> PreparedRequest:
        token = _bearer_token(self.secret.value(), self.secret.field)
        self._remember(token)
        request.headers["Authorization"] = f"Bearer {token}"
        return request

    def __repr__(self) -> str:
        return f"BearerAuth({self.secret!r})"


class BasicAuth(_Auth):
    """`Authorization: Basic ...` with the password read from `secret` for every request."""

    def __init__(self, username: str, secret: Secret) -> None:
        super().__init__()
        self.username = username
        self.secret = secret

    def __call__(self, request: PreparedRequest) -> PreparedRequest:
        password = self.secret.value()
        # UTF-8 (RFC 7617's charset): requests' own HTTPBasicAuth encodes str as latin-1 and
        # fails on other characters.
        pair = base64.b64encode(f"{self.username}:{password}".encode()).decode("ascii")
        self._remember(password, pair)
        request.headers["Authorization"] = f"Basic {pair}"
        return request

    def __repr__(self) -> str:
        return f"BasicAuth({self.username!r}, {self.secret!r})"


class AzureBearerAuth(_Auth):
    """An Entra ID bearer token for `scope` from an azure-core TokenCredential, cached."""

    field = "metrics.azure_auth"

    def __init__(
        self,
        credential: Any,
        *,
        scope: str = PROMETHEUS_SCOPE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.credential = credential
        self.scope = scope
        self._clock = clock
        self._token: Any = None  # azure.core.credentials.AccessToken
        self._claims: str | None = None  # a 401's claims challenge, for the next token
        self._lock = threading.Lock()

    def __call__(self, request: PreparedRequest) -> PreparedRequest:
        token = self._current()
        self._remember(token)
        request.headers["Authorization"] = f"Bearer {token}"
        request.register_hook("response", self._on_response)  # type: ignore[no-untyped-call]
        return request

    def _current(self) -> str:
        from azure.core.exceptions import AzureError

        with self._lock:
            if self._token is None or self._clock() >= self._token.expires_on - REFRESH_MARGIN_S:
                # Claims are what takes azure-identity's credentials past their own cache:
                # without, a revoked token comes back. Asked for once: the CLI credentials
                # (az, azd, PowerShell) refuse any request carrying claims, and kept, every
                # later query failed, the operator's re-login included.
                claims, self._claims = self._claims, None
                try:
                    self._token = self._token_for(claims)
                except AzureError as exc:
                    if not claims:
                        raise self._no_token(exc) from exc
                    log.warning(
                        "%s: the credential did not answer the claims challenge (%s); asking "
                        "for a token without it",
                        self.field,
                        _first_line(exc),
                    )
                    try:
                        self._token = self._token_for(None)
                    except AzureError as again:
                        raise self._no_token(again) from again
            return _bearer_token(str(self._token.token), self.field)

    def _token_for(self, claims: str | None) -> Any:
        return self.credential.get_token(self.scope, **({"claims": claims} if claims else {}))

    def _no_token(self, exc: Exception) -> MetricsError:
        # The first line says which credentials were tried and why each failed; the rest is
        # troubleshooting links.
        return MetricsError(f"{self.field}: no Entra ID token for {self.scope}: {_first_line(exc)}")

    def _on_response(self, response: Response, **kwargs: Any) -> Response:
        if response.status_code == 401:
            with self._lock:
                self._token = None  # revoked or not yet valid: ask again next time
                self._claims = claims_challenge(response.headers.get("WWW-Authenticate", ""))
        return response

    def close(self) -> None:
        """Close the credential (DefaultAzureCredential holds HTTP sessions)."""
        close = getattr(self.credential, "close", None)
        if callable(close):
            close()

    def __repr__(self) -> str:
        return f"AzureBearerAuth({self.scope!r})"


_CHALLENGE_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*"([^"]*)"')


def claims_challenge(header: str) -> str | None:
    """The claims a 401's `WWW-Authenticate: Bearer ..., error="insufficient_claims",
    claims="<base64url JSON>"` asks for, decoded (what azure-core's BearerTokenCredentialPolicy
    passes to `get_token`); None when it asks for none or they cannot be read."""
    if not header.lstrip().lower().startswith("bearer"):
        return None
    params = {key.lower(): value for key, value in _CHALLENGE_PARAM.findall(header)}
    encoded = params.get("claims", "")
    if params.get("error") != "insufficient_claims" or not encoded:
        return None
    try:
        claims = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")
    except (binascii.Error, ValueError):  # (UnicodeDecodeError is a ValueError)
        return None
    return claims or None


def http_auth(cfg: PrometheusMetricsConfig) -> BearerAuth | BasicAuth | AzureBearerAuth | None:
    """The auth the spec asks for, its secret read once now (ConfigError naming the field)."""
    if cfg.bearer_token_env is not None:
        return BearerAuth(EnvSecret("metrics.bearer_token_env", cfg.bearer_token_env))
    if cfg.bearer_token_file is not None:
        return BearerAuth(FileSecret("metrics.bearer_token_file", cfg.bearer_token_file))
    if cfg.basic_auth is not None:
        basic = cfg.basic_auth
        secret: Secret
        if basic.password_env is not None:
            secret = EnvSecret("metrics.basic_auth.password_env", basic.password_env)
        else:
            assert basic.password_file is not None  # the config allows exactly one
            secret = FileSecret("metrics.basic_auth.password_file", basic.password_file)
        return BasicAuth(basic.username, secret)
    if cfg.azure_auth:
        return AzureBearerAuth(default_credential(), scope=azure_scope(cfg.url))
    return None


def azure_scope(url: str) -> str:
    """The Entra ID scope of the Azure Monitor workspace at `url`, by the cloud its host is in."""
    host = (urlsplit(url).hostname or "").lower()
    for suffix, scope in SOVEREIGN_SCOPES.items():
        if host.endswith(suffix):
            return scope
    return PROMETHEUS_SCOPE


def tls_client_cert(cfg: PrometheusMetricsConfig) -> str | tuple[str, str] | None:
    """requests' `cert` for mutual TLS (checked now: ConfigError naming the field), or None."""
    if cfg.cert_file is None:
        return None
    cert, key = cfg.cert_file, cfg.key_file
    for name, path in (("cert_file", cert), ("key_file", key)):
        if path is not None and not path.is_file():
            raise ConfigError(f"metrics.{name}: {path} does not exist")
    chain = (str(cert), str(key)) if key is not None else str(cert)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
            cert, key, password=refuse_passphrase(chain)
        )
    except EncryptedKey as exc:
        raise ConfigError(str(exc)) from None
    except ssl.SSLError as exc:
        if key is None and b"PRIVATE KEY-----" not in _head(cert):
            raise ConfigError(
                f"metrics.cert_file: {cert} holds no private key and metrics.key_file is not "
                "set: name the key's file in key_file (or append the key to cert_file)"
            ) from None
        holder = "cert_file and key_file do" if key is not None else "cert_file does"
        reason = f" ({exc.reason})" if exc.reason else ""
        raise ConfigError(
            f"metrics.{holder} not hold a PEM certificate and its private key{reason}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"metrics.cert_file: cannot read {cert}: {exc.strerror}") from None
    return chain


class EncryptedKey(ssl.SSLError):
    """The client key is encrypted: refused, where OpenSSL would ask for a passphrase."""

    def __str__(self) -> str:
        return str(self.args[0])  # SSLError's own str() is the repr of its args


def refuse_passphrase(chain: str | tuple[str, str]) -> Callable[[], str]:
    """A passphrase callback for loading `chain` (requests' `cert`) that raises EncryptedKey.

    Without one, OpenSSL asks for the passphrase of an encrypted key on the terminal (and,
    with none, fails as "PEM lib"): a controller must never wait on a prompt. The spec has no
    passphrase field, so an encrypted key is an error naming the file that holds it.
    """
    if isinstance(chain, tuple):
        said = f"metrics.key_file: {chain[1]} is encrypted (a passphrase-protected key)"
    else:
        said = f"metrics.cert_file: {chain} holds an encrypted (passphrase-protected) key"

    def refuse() -> str:
        raise EncryptedKey(f"{said}: give an unencrypted key")

    return refuse


class NoPassphraseAdapter(HTTPAdapter):
    """requests' HTTPAdapter whose connections load the client key with `refuse_passphrase`.

    urllib3 loads `cert` again for every new connection; left to itself it checks a separate
    key file for encryption but not a key inside the certificate file, where OpenSSL prompts.
    """

    def __init__(self, refuse: Callable[[], str], **kwargs: Any) -> None:
        self._refuse = refuse  # before HTTPAdapter.__init__, which builds the pool manager
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        # urllib3 passes key_password to SSLContext.load_cert_chain, which takes a callable.
        super().init_poolmanager(*args, key_password=self._refuse, **kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        # Through $HTTPS_PROXY the pools are the proxy manager's, built here, not above: without
        # it a key rotated to an encrypted one made OpenSSL prompt again behind a proxy.
        return super().proxy_manager_for(proxy, key_password=self._refuse, **proxy_kwargs)


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as file:
            return file.read(1 << 20)
    except OSError:
        return b""


def tls_verify(cfg: PrometheusMetricsConfig) -> bool | str:
    """requests' `verify`: the CA file (checked now: ConfigError naming it), False, or True."""
    if cfg.insecure_skip_verify:
        log.warning(
            "metrics.insecure_skip_verify: the TLS certificate of %s is not verified; anyone on "
            "the path can read the queries and forge the counts the rollout is judged on",
            cfg.url,
        )
        return False
    if cfg.ca_file is None:
        return True
    path = cfg.ca_file
    try:
        ssl.create_default_context(cafile=str(path))
    except FileNotFoundError:
        raise ConfigError(f"metrics.ca_file: {path} does not exist") from None
    except ssl.SSLError:
        raise ConfigError(f"metrics.ca_file: {path} holds no PEM CA certificate") from None
    except OSError as exc:
        raise ConfigError(f"metrics.ca_file: cannot read {path}: {exc.strerror}") from None
    return str(path)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
