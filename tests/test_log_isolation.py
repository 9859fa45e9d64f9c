"""tests/conftest.py leaves every logger as the test found it, those the test created too.

Checked by running two tests in a fresh pytest: the first configures loggers as a command does
(`setup_logging` sets httpx to WARNING; azure-ai-ml's import creates loggers with handlers of
their own), the second must see them as they were before the first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CONFIGURING_THEN_ANOTHER_TEST = """
import logging

BEFORE = logging.getLogger("meta.before")  # exists before the tests, configured at import
BEFORE.setLevel(logging.INFO)
FRESH = (logging.NOTSET, True, [], False)


def state(name):
    found = logging.getLogger(name)
    return (found.level, found.propagate, found.handlers, found.disabled)


def test_a_test_configures_loggers():
    for name in ("meta.before", "meta.created", "meta.created.child"):
        found = logging.getLogger(name)
        found.setLevel(logging.ERROR)
        found.propagate = False
        found.addHandler(logging.NullHandler())
        found.disabled = True


def test_the_next_test_sees_them_as_they_were():
    assert state("meta.before") == (logging.INFO, True, [], False)
    assert state("meta.created") == FRESH
    assert state("meta.created.child") == FRESH
"""


#: The same for the Azure loggers a command quiets, and the import hook it installs (a test
#: running a command quieted them for every later test of its xdist worker, whose caplog saw no
#: Azure record).
QUIETING_THEN_ANOTHER_TEST = """
import logging
import sys

from rollout.azure_credential import QuietAzureML, quiet_azure_logs


def test_a_command_quiets_the_azure_logs():
    quiet_azure_logs()


def test_the_next_test_sees_them_as_they_were():
    for name in ("azure", "azure.identity", "azure.ai.ml"):
        assert logging.getLogger(name).level == logging.NOTSET, name
    assert not [f for f in sys.meta_path if isinstance(f, QuietAzureML)]
"""


@pytest.mark.parametrize(
    "two_tests",
    [
        pytest.param(CONFIGURING_THEN_ANOTHER_TEST, id="loggers-a-test-configures"),
        pytest.param(QUIETING_THEN_ANOTHER_TEST, id="azure-loggers-a-command-quiets"),
    ],
)
@pytest.mark.parametrize(
    ("options", "passes"),
    [
        pytest.param(["-p", "tests.conftest"], True, id="with-the-suites-conftest"),
        pytest.param([], False, id="without-it-they-leak"),
    ],
)
def test_a_test_leaves_the_loggers_as_it_found_them(
    tmp_path: Path, two_tests: str, options: list[str], passes: bool
) -> None:
    """Was: only the `azure*` loggers that existed before a test had their level restored; one
    a test created (azure-ai-ml imported in it, a logger of its own) kept the level, handlers
    and propagation it set for every later test of its xdist worker."""
    (tmp_path / "test_two.py").write_text(two_tests)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *options, "-p", "no:cacheprovider", "-o", "addopts=",
         "-q", str(tmp_path / "test_two.py")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert (done.returncode == 0) is passes, done.stdout + done.stderr
    assert ("2 passed" if passes else "1 failed, 1 passed") in done.stdout
