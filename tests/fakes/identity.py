"""A fake Azure ML identity endpoint: what `MSI_ENDPOINT` points at inside an Azure ML job.

azure-identity's managed-identity credential asks it for a token with a GET whose query names
the resource and, for a user-assigned identity, `clientid`. The fake answers every request with
a token and records the query, so a test sees which identity a credential asked for without any
network to Azure:

    with FakeIdentityEndpoint() as identity:
        monkeypatch.setenv("MSI_ENDPOINT", identity.url)
        monkeypatch.setenv("MSI_SECRET", "s")
        ...build a DefaultAzureCredential, ask it for a token...
    assert identity.client_ids() == [CLIENT_ID]
"""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes.server import LocalServer

#: Variables that make DefaultAzureCredential pick another credential, or another identity.
AZURE_CREDENTIAL_ENV = (
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_FEDERATED_TOKEN_FILE",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "DEFAULT_IDENTITY_CLIENT_ID",
)


class FakeIdentityEndpoint:
    """A token endpoint on 127.0.0.1 recording every query it is asked (see the docstring)."""

    def __init__(self) -> None:
        self.queries: list[dict[str, list[str]]] = []
        self._server = LocalServer(self._handler_class())

    @property
    def url(self) -> str:
        return f"{self._server.url}/msi/token"

    def client_ids(self) -> list[str | None]:
        """The `clientid` of every token request (None: the system-assigned identity)."""
        return [query.get("clientid", [None])[0] for query in self.queries]

    def __enter__(self) -> FakeIdentityEndpoint:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class _Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                endpoint.queries.append(parse_qs(urlsplit(self.path).query))
                body = json.dumps(
                    {
                        "access_token": "fake-token",
                        "expires_on": int(time.time()) + 3600,
                        "token_type": "Bearer",
                    }
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:  # quiet test output
                pass

        return _Handler
