"""The Azure SDKs' logs as quieted: `quiet_azure_logs` holds when azure-ai-ml is imported after it.

The router imports azure-ai-ml lazily (seconds of imports), so in `rollout run` the quieting
comes first. azure-ai-ml's import sets its own loggers to INFO, each with a handler of its own
on stderr (`initialize_logger_info`): without the import hook, every deployment write printed
"Check: endpoint <name> exists" whatever the process' logging said. Checked in a clean
interpreter (a test process has imported azure-ai-ml long before), at the wire: the router
deploys against the fake ARM server.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rollout.azure_credential import QuietAzureML, quiet_azure_logs

ROOT = Path(__file__).resolve().parents[2]

#: A process logging its own INFO lines (a pipeline step, `rollout run --verbose`).
DEPLOY_AFTER_QUIETING = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    from rollout.azure_credential import QuietAzureML, quiet_azure_logs
    quiet_azure_logs()
    {again}
    assert "azure.ai.ml" not in sys.modules  # imported below, as the router does: after
    from azure.ai.ml import MLClient
    from rollout.core.types import Colour
    from rollout.routers.azureml import AzureMLRouter
    from tests.fakes.arm import FakeArm, StaticCredential
    from tests.routers.contract import V1
    SUB, RG, WS = "00000000-0000-0000-0000-000000000001", "ml-rg", "ml-ws"
    with FakeArm() as arm:
        arm.add_workspace(SUB, RG, WS)
        arm.lro(r"/onlineEndpoints/[^/]+(/deployments/[^/]+)?$")
        scale = {{"scaleSettings": {{"scaleType": "Default"}}}}
        arm.defaults(r"/onlineEndpoints/[^/]+/deployments/[^/]+$", scale)
        client = MLClient(StaticCredential(), SUB, RG, WS, transport=arm.transport())
        AzureMLRouter(client, "ep-quiet", environment="azureml:env:1").deploy(Colour.GREEN, V1)
    print(logging.getLogger("azure.ai.ml").getEffectiveLevel())
    """
)


def _deploy_in_a_clean_interpreter(again: str = "") -> subprocess.CompletedProcess[str]:
    return _in_a_clean_interpreter(DEPLOY_AFTER_QUIETING.format(again=again))


def _in_a_clean_interpreter(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -c script` (or `python *args` when `script` is empty) from the repository."""
    return subprocess.run(
        [sys.executable, *(["-c", script] if script else args)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    "again",
    [
        pytest.param("", id="once"),
        # Each command quiets again (rollout run, then a pipeline step's setup): one hook still.
        pytest.param("quiet_azure_logs()", id="twice"),
    ],
)
def test_azure_ai_ml_imported_after_the_quieting_logs_no_info_lines(again: str) -> None:
    done = _deploy_in_a_clean_interpreter(again)
    assert done.returncode == 0, done.stderr
    # The process' own INFO lines still show: the SDK's do not (was: "Check: endpoint ...").
    assert "rollout.routers.azureml: deployed diabetes:1 as ep-quiet/green" in done.stderr
    assert "Check: endpoint" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("azure")] == []
    assert done.stdout.split() == [str(logging.WARNING)]


def test_a_quieting_that_fails_does_not_fail_the_import() -> None:
    script = textwrap.dedent(
        """
        import rollout.azure_credential as credential
        credential.quiet_azure_logs()
        def broken() -> None:
            raise RuntimeError("a logging setup azure-ai-ml changed")
        credential.quiet_azure_ml_loggers = broken
        import azure.ai.ml
        print(azure.ai.ml.__spec__.loader.__class__.__name__)
        """
    )
    done = _in_a_clean_interpreter(script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["SourceFileLoader"]  # the module keeps its own loader


def test_the_quieting_applies_to_azure_ai_ml_already_imported() -> None:
    """In a process that imported azure-ai-ml first (this one), the hook has nothing to wait
    for: its loggers are quieted at once; quieting again installs no second hook."""
    import azure.ai.ml  # noqa: F401

    quiet_azure_logs()
    quiet_azure_logs()
    assert logging.getLogger("azure.ai.ml").getEffectiveLevel() == logging.WARNING
    # Its effective level: the one azure-ai-ml's import set to INFO (WARNING now), or, where an
    # earlier test in this worker imported it, reset to NOTSET after that test (tests/conftest.py
    # puts back the loggers a test created), inheriting azure.ai.ml's.
    endpoint_utils = logging.getLogger("azure.ai.ml._utils._endpoint_utils")
    assert endpoint_utils.getEffectiveLevel() == logging.WARNING
    assert endpoint_utils.level in (logging.NOTSET, logging.WARNING)
    assert sum(isinstance(finder, QuietAzureML) for finder in sys.meta_path) == 1


def test_the_hook_s_spec_copies_and_pickles_as_a_plain_one() -> None:
    """Was: copy, deepcopy and pickle of the spec the hook finds recursed for ever (the wrapper
    loader forwarded `_loader` itself, missing on a half-built copy)."""
    import copy
    import importlib
    import pickle

    from rollout.azure_credential import _QuietingLoader

    spec = QuietAzureML().find_spec("azure.ai.ml", importlib.import_module("azure.ai").__path__)
    assert spec is not None and isinstance(spec.loader, _QuietingLoader)
    copied = copy.deepcopy(spec.loader)
    assert copied._loader.name == spec.loader._loader.name  # type: ignore[attr-defined]
    assert copy.copy(spec).name == "azure.ai.ml"
    restored = pickle.loads(pickle.dumps(spec.loader))
    assert isinstance(restored, _QuietingLoader)
