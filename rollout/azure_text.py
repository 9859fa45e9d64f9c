"""One line out of an Azure SDK's error text, for our one-line errors.

azure-ai-ml colours its validation and asset errors with terminal escape codes (its first line
in black, unreadable on a dark terminal; escape codes in a log, the ledger, a job's std_log) and
wraps them in paragraphs of advice; azure-identity's credential errors run to a page. Used by the
`azureml` router and by aml_pipelines' submission and registry, so both say the same thing the
same way. Only `re` here: no SDK is imported.
"""

from __future__ import annotations

import re
from typing import Any

#: A terminal colour code (colorama's `Fore.RED`, `Style.RESET_ALL`, ...).
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """`text` without terminal colour codes."""
    return _ANSI.sub("", text)


def one_line(message: str) -> str:
    """azure-ai-ml's (or azure-identity's) multi-paragraph text, cut to its substance, one line."""
    message = strip_ansi(message)
    for boilerplate in ("Resolutions:", "Additional Resources:", "To mitigate this issue"):
        message = message.split(boilerplate, 1)[0]
    return " ".join(message.split())


def error_line(error: Any) -> str:
    """An Azure error (an exception, or the `error` it carries) as one line of its message."""
    return one_line(str(getattr(error, "message", None) or error))


def innermost_error(error: Any) -> dict[str, Any]:
    """The innermost `innererror` with a message under a service's error (an azure-core
    ODataV4Format: its `innererror` dict, nested in turn), {} when there is none. Log
    Analytics says its substance there ("Failed to resolve table ... named 'X'") under a
    generic "The request had some invalid properties"."""
    found: dict[str, Any] = {}
    inner = getattr(error, "innererror", None)
    while isinstance(inner, dict):
        if inner.get("message"):
            found = inner
        inner = inner.get("innererror")
    return found


def http_detail(exc: Any) -> str:
    """An azure-core HttpResponseError's substance, said once: `Code: message` from the
    service's error (the exception's own text repeats them, "(code) message Code: ... Message:
    ..."), with its innermost `innererror` in parentheses when it says more, else its message."""
    error = getattr(exc, "error", None)
    code, message = getattr(error, "code", None), getattr(error, "message", None)
    if not (code and message):
        return error_line(exc)
    detail = f"{code}: {one_line(message)}"
    inner = innermost_error(error)
    said = one_line(str(inner.get("message", "")))
    if said and said != one_line(message):
        detail += f" ({inner['code']}: {said})" if inner.get("code") else f" ({said})"
    return detail
