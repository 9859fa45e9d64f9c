"""Errors of the Azure ML side.

    PipelineError
    ├── ConfigError           an argument, a config value or input data is invalid (names the field)
    ├── ComponentError        a component YAML does not load or validate
    ├── StepFailed            a step's command exited non-zero or was killed (carries the exit code)
    │   ├── RolloutNotPromoted  the rollout step's verdict: rolled back or paused (not a crash)
    │   └── ModelNotRegistered  the register gate refused the model (not a crash)
    ├── RunTerminated         run-local was sent SIGTERM or SIGHUP (the running step stopped first)
    ├── GateRefused           the register gate refused a worse model
    ├── RegistryError         the model registry failed
    │   ├── ModelNotFound     no such model or version
    │   └── IntegrityError    a stored model does not match its recorded sha256
    ├── AzureNotConfigured    credentials or workspace coordinates are missing
    ├── ClosureError          installed packages cannot give a requirement list's closure
    └── TriggerError          a registration trigger failed

The CLI prints one clear line and exits non-zero for each; never a traceback.
"""

from __future__ import annotations

import signal


class PipelineError(Exception):
    """Base of every error the Azure ML side raises on purpose."""


class ConfigError(PipelineError):
    """An argument, a config value (e.g. an unknown registry kind) or input data is invalid."""


class ComponentError(PipelineError):
    """A component YAML does not load or validate."""


def describe_exit(code: int) -> str:
    """How a step ended, from its wait status: `exit code N`, or the signal that killed it."""
    if code >= 0:
        return f"exit code {code}"
    # The OOM killer's SIGKILL is the usual one: a CSV too large for the machine.
    hint = " (out of memory?)" if -code == signal.SIGKILL else ""
    return f"killed by {signal_name(-code)}{hint}"


def signal_name(signum: int) -> str:
    """`SIGTERM` for 15; `signal 64` for a number with no name here."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StepFailed(PipelineError):
    """A pipeline step's command exited non-zero, or was killed by a signal.

    `exit_code` is the step's exit code, or 128 + the signal's number for a killed step (as a
    shell reports it: 137 for SIGKILL), never the negative wait status (-9 exited as 247).
    """

    def __init__(self, step: str, exit_code: int) -> None:
        verb = "failed with" if exit_code >= 0 else "was"
        super().__init__(f"step {step!r} {verb} {describe_exit(exit_code)}")
        self.step = step
        self.exit_code = exit_code if exit_code >= 0 else 128 - exit_code


class RunTerminated(PipelineError):
    """run-local was sent SIGTERM or SIGHUP: the running step was stopped first (exit 128 + n)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated ({signal_name(signum)})")
        self.signum = signum
        self.exit_code = 128 + signum


class RolloutNotPromoted(StepFailed):
    """The rollout step ended with a verdict other than promotion: rolled back, or paused.

    A StepFailed, so scripts and callers still see a non-zero exit; its own class so that the
    local runner's caller reports an outcome, not a crash.
    """

    def __init__(self, exit_code: int, outcome: str, reason: str, ledger: str) -> None:
        super().__init__("rollout", exit_code)
        self.outcome = outcome
        self.reason = reason
        self.ledger = ledger
        detail = f": {reason}" if reason else ""
        where = f" — see the ledger: {ledger}" if ledger else ""
        self.args = (f"rollout: {outcome} (exit {exit_code}){detail}{where}",)


class ModelNotRegistered(StepFailed):
    """The register step's gate refused the model (exit 3): an outcome, like a rollback.

    The gate did its job: a model worse than production never reaches the registry. The reason
    is the step's own log line (`gate refused ...`), emitted just before.
    """

    def __init__(self, exit_code: int) -> None:
        super().__init__("register", exit_code)
        self.args = (
            f"register: not registered, the gate refused the model (exit {exit_code}); "
            "`--param force=true` registers it anyway",
        )


class GateRefused(PipelineError):
    """The register gate refused a model that is worse than production."""


class RegistryError(PipelineError):
    """The model registry failed."""


class ModelNotFound(RegistryError):
    """No such model or version in the registry."""


class IntegrityError(RegistryError):
    """A stored model does not match its recorded sha256 (corrupted or tampered)."""


class AzureNotConfigured(PipelineError):
    """Azure credentials or workspace coordinates are missing."""


class ClosureError(PipelineError):
    """The installed packages cannot give a requirement list's closure: a needed package is not
    installed (`installed` None), or a requirer refuses the version there is (`installed`, or the
    version asked for instead of it)."""

    def __init__(self, message: str, *, package: str, installed: str | None) -> None:
        super().__init__(message)
        self.package = package
        self.installed = installed


class TriggerError(PipelineError):
    """A registration trigger failed."""
