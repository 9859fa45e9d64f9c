"""API keys of the scoring server: which ones are usable (stdlib only, so the CLI imports it fast).

A key that is empty, or only spaces, would silently mean "no auth": the server drops it and then
has no key to check. A key with spaces around it can never match, since the presented token is
stripped. Both are refused where keys come in (`aml-rollout serve`, `create_app`), and so is a
key that is not printable ASCII (`clé`): clients cannot send it in a header.

`AML_ROLLOUT_API_KEY` is read by `api_keys_from_env`, the one parser `serve` and the package
image both use: keys separated by whitespace and/or commas (a Bearer token holds neither), so
`k1 k2`, `k1,k2` and `k1, k2` mean the same, and a secret file's trailing newline is dropped.
They once differed: `serve` split on whitespace (typer), the image took the value whole, so a
two-key rotation 401d every client of the image and a trailing newline stopped it. Each
`serve --api-key` value is split the same way (`split_api_keys`): it took `old,new` as one key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

API_KEY_ENV = "AML_ROLLOUT_API_KEY"
_SEPARATORS = re.compile(r"[\s,]+")


def api_key_problem(keys: Iterable[str]) -> str | None:
    """Why these API keys cannot be used as given, or None when every one is usable."""
    for key in keys:
        if not key.strip():
            return "an empty API key would serve /score without auth; give a real key or none"
        if key != key.strip():
            return "an API key with spaces around it can never match; strip it"
        if key.lower() == "bearer":
            # A header value pasted whole, "Bearer <token>", is split into two keys: "Bearer"
            # then let `Authorization: Bearer Bearer` in.
            return "'Bearer' is the Authorization header's scheme, not a key: give the token alone"
        if not (key.isascii() and key.isprintable()):
            # Python's http.client, httpx and `aml-rollout load` cannot send such a header.
            return (
                "an API key must be printable ASCII: a client cannot send a non-ASCII or "
                "control character in its Authorization header"
            )
    return None


def split_api_keys(value: str) -> tuple[str, ...]:
    """The keys in `value`, separated by whitespace and/or commas; () when it holds none."""
    return tuple(key for key in _SEPARATORS.split(value) if key)


def api_keys_from_env(value: str | None) -> tuple[str, ...]:
    """The keys in AML_ROLLOUT_API_KEY's `value` (whitespace- and/or comma-separated); () unset.

    ValueError when it is set but holds no key: most likely a secret that was not injected, so
    the server fails closed rather than serving without auth.
    """
    if value is None:
        return ()
    keys = split_api_keys(value)
    if not keys:
        raise ValueError(
            f"{API_KEY_ENV} is set but holds no key: give a real key or unset it for no auth"
        )
    return keys
