"""Suite-wide settings.

Hypothesis' per-example deadline (200 ms) is a timing assertion, and timing belongs in the
benchmarks: on two pytest workers over a loaded 2-core machine, an example that writes and
fsyncs files took 278 ms and failed `test_tags_round_trip` (a fresh clone's `.ci/run`).
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import settings

settings.register_profile("aml-rollout", deadline=None)
settings.load_profile("aml-rollout")


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
