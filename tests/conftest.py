"""Suite-wide settings.

Hypothesis' per-example deadline (200 ms) is a timing assertion, and timing belongs in the
benchmarks: on two pytest workers over a loaded 2-core machine, an example that writes and
fsyncs files took 278 ms and failed `test_tags_round_trip` (a fresh clone's `.ci/run`).

A process a test starts and leaves running fails the session, and is killed (see `tests.leaks`).
"""

import logging
import os
import sys
import threading
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import settings

from tests import leaks

settings.register_profile("aml-rollout", deadline=None)
settings.load_profile("aml-rollout")


@pytest.fixture(autouse=True)
def loggers_as_they_were() -> Iterator[None]:
    """Every logger as it was before the test, and no import hook of `quiet_azure_logs` left
    behind: a command a test runs quiets `azure`, `azure.identity` and `azure.ai.ml` (and
    azure-ai-ml's own loggers), `httpx` and others for the rest of its xdist worker otherwise,
    and a later test's caplog sees none of their records.

    A logger's level, handlers, propagation and `disabled` are put back; one the test created
    (azure-ai-ml imported in it, a logger of the test's own) is reset to a new logger's
    (NOTSET, no handler, propagating): was, only the `azure*` loggers that existed before were
    restored, and only their level. The root logger is pytest's (caplog's handlers and level).
    """
    from rollout.azure_credential import QuietAzureML

    before = {
        name: (found.level, found.propagate, found.disabled, list(found.handlers))
        for name, found in list(logging.Logger.manager.loggerDict.items())
        if isinstance(found, logging.Logger)
    }
    hooks = set(map(id, sys.meta_path))
    yield
    fresh = (logging.NOTSET, True, False, [])
    for name, found in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(found, logging.Logger):
            level, found.propagate, found.disabled, handlers = before.get(name, fresh)
            found.setLevel(level)  # through setLevel: it clears the loggers' level caches
            found.handlers[:] = handlers
    sys.meta_path[:] = [
        finder
        for finder in sys.meta_path
        if id(finder) in hooks or not isinstance(finder, QuietAzureML)
    ]


@pytest.fixture
def interrupt_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """`sigterm_as_interrupt` as after a Ctrl-C whose KeyboardInterrupt landed in a finalizer and
    was lost ("Exception ignored"): its event is set, and nothing is raised."""
    import rollout.commands.stack

    @contextmanager
    def lost() -> Iterator[threading.Event]:
        stopping = threading.Event()
        stopping.set()  # as the handler does, before its KeyboardInterrupt went astray
        yield stopping

    monkeypatch.setattr(rollout.commands.stack, "sigterm_as_interrupt", lost)


#: The session's tag (kept here too: a test may change os.environ for a while).
_TAG = pytest.StashKey[str]()
#: PIDs of xdist's workers, which carry the tag like every child of the controller.
_WORKER_PIDS = pytest.StashKey[set[int]]()


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: the tag came with its environment
        config.workeroutput["pid"] = os.getpid()  # type: ignore[attr-defined]
        return
    # Before xdist starts its workers (at session start): they inherit it, as every child does.
    # Set afresh even when inherited: a pytest run by a test has its own leaks to find.
    os.environ[leaks.TAG] = config.stash[_TAG] = leaks.new_tag()
    config.stash[_WORKER_PIDS] = set()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """An xdist worker is done: its PID is no leak, should it still be exiting."""
    pid = getattr(node, "workeroutput", {}).get("pid")  # none from a worker that crashed
    if pid is not None:
        node.config.stash[_WORKER_PIDS].add(pid)


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> Generator[None]:
    """Once xdist's workers are gone (its own sessionfinish), before the summary: leaks fail."""
    result = yield
    if hasattr(session.config, "workerinput"):
        return result
    exclude = {os.getpid(), *session.config.stash[_WORKER_PIDS]}
    found: list[leaks.Leak] = []
    for _ in range(3):  # again after each kill: a dying leak may have started another
        more = leaks.tagged_processes(session.config.stash[_TAG], exclude=exclude)
        if not more:
            break
        leaks.kill(more)
        found += more
    if found:
        _report(
            session,
            "leaked processes",
            f"the tests left {len(found)} process(es) running (now killed); a test must stop "
            "and wait for what it starts:",
            found,
        )
        if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    orphans = leaks.left_by_dead_sessions()
    if orphans:
        _report(
            session,
            "processes left by a killed test session",
            f"{len(orphans)} process(es) started by a test session that was killed still run "
            "(not this session's: left alone, kill them by PID):",
            orphans,
        )
    return result


def _report(session: pytest.Session, title: str, first: str, found: list[leaks.Leak]) -> None:
    lines = [first, *(f"  {leak}" for leak in found)]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        print("\n".join(lines), file=sys.stderr)
        return
    reporter.write_line("")  # after the progress line, which ends in no newline
    reporter.section(title, red=True)
    for line in lines:
        reporter.write_line(line, red=True)
