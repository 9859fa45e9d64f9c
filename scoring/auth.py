"""API keys of the scoring server: which ones are usable (stdlib only, so the CLI imports it fast).

A key that is empty, or only spaces, would silently mean "no auth": the server drops it and then
has no key to check. A key with spaces around it can never match, since the presented token is
stripped. Both are refused where keys come in (`aml-rollout serve`, `create_app`).
"""

from __future__ import annotations

from collections.abc import Iterable


def api_key_problem(keys: Iterable[str]) -> str | None:
    """Why these API keys cannot be used as given, or None when every one is usable."""
    for key in keys:
        if not key.strip():
            return "an empty API key would serve /score without auth; give a real key or none"
        if key != key.strip():
            return "an API key with spaces around it can never match; strip it"
    return None
