"""A bound on one Azure request, retries included: azure-core's RetryPolicy with a time budget.

azure-core retries a throttled (429) or failed (408, 5xx, connection or read error) request up
to 3 times, sleeping each Retry-After as the service sends it, however long (ARM may say 900 s,
a day), and gives each attempt a 300 s read timeout. A rollback behind that waits hours, whatever
bound the caller put on the operation. `BoundedRetryPolicy(budget_s)` keeps azure-core's retries
inside `budget_s` per request: each attempt's connect and read timeouts are cut to what remains
of the budget, no retry starts once it is spent, and a Retry-After longer than what remains is
not waited for: the request ends at once with the service's answer (the 429), which the caller
reports. The waits counted are the ones asked of the transport (so a fake transport that only
records them is bounded the same way).

azure-core is imported only when a policy is built.
"""

from __future__ import annotations

import time
from typing import Any


def bounded_retry_policy(budget_s: float) -> Any:
    """An azure-core RetryPolicy keeping each request, its retries and their waits, within
    `budget_s` seconds (pass as `retry_policy=` to an SDK client)."""
    from azure.core.pipeline.policies import RetryPolicy

    class BoundedRetryPolicy(RetryPolicy):  # type: ignore[type-arg]
        def configure_retries(self, options: dict[str, Any]) -> dict[str, Any]:
            settings: dict[str, Any] = super().configure_retries(options)
            settings["aml_rollout_start"] = time.monotonic()
            settings["aml_rollout_waited"] = 0.0
            return settings

        def _remaining(self, settings: dict[str, Any]) -> float:
            elapsed = time.monotonic() - settings["aml_rollout_start"]
            spent = max(elapsed, settings["aml_rollout_waited"])
            return float(settings["timeout"]) - float(spent)

        def is_retry(self, settings: dict[str, Any], response: Any) -> bool:
            retry_after = self.get_retry_after(response)
            if retry_after is not None and retry_after > self._remaining(settings):
                return False  # the service's answer (a 429, say) goes back as it is
            return bool(super().is_retry(settings, response))

        def sleep(self, settings: dict[str, Any], transport: Any, response: Any = None) -> None:
            wait = self.get_retry_after(response) if response is not None else None
            if not wait:
                wait = self.get_backoff_time(settings)
            wait = max(0.0, min(wait, self._remaining(settings)))
            settings["aml_rollout_waited"] += wait
            if wait:
                transport.sleep(wait)

        def _configure_timeout(
            self, request: Any, absolute_timeout: float, is_response_error: bool
        ) -> None:
            # azure-core cuts only the connect timeout to the budget left; the read one too.
            super()._configure_timeout(request, absolute_timeout, is_response_error)
            options = request.context.options
            config = getattr(request.context.transport, "connection_config", None)
            read = options.get("read_timeout") or getattr(config, "read_timeout", None)
            if isinstance(read, (int, float)):
                options["read_timeout"] = min(read, absolute_timeout)

    return BoundedRetryPolicy(timeout=budget_s)
