"""What the steering commands and `status` say, and that the commands they print work as printed.

Findings of a review of the operator CLI: a user with no passwd entry could not steer; the
"no controller is running" hint dropped --state-dir and did not quote the spec; an operator's
pause was said to resume with `run`."""

from __future__ import annotations

import getpass
import os
import shlex
from pathlib import Path

import pytest

from rollout.commands.rollout import EXIT_ERROR, EXIT_ROLLED_BACK, EXIT_RUNNING
from rollout.core.status import Status
from rollout.core.types import Phase
from tests.cli import invoke_rollout as invoke
from tests.cli import one_line
from tests.core.helpers import V2
from tests.engine.specs import write_spec

# --------------------------------------------------------------------- a user without a name


@pytest.mark.parametrize("error", [KeyError, OSError], ids=["keyerror-3.11", "oserror-3.13"])
def test_a_user_without_a_passwd_entry_can_steer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[Exception]
) -> None:
    # Was a traceback (exit 1, nothing queued) for an arbitrary uid in a container: abort
    # too, so an operator there could not stop a bad canary.
    spec = write_spec(tmp_path)
    from rollout.api import open_store
    from rollout.controller import current_user, default_owner

    store = open_store(spec)
    store.save(Status(name="cli", id="r1", phase=Phase.PROGRESSING, blue_weight=10))

    def no_name() -> str:
        raise error("getpwuid(): uid not found: 12345")

    monkeypatch.setattr(getpass, "getuser", no_name)
    code, out = invoke("abort", str(spec))
    assert code == 0, out
    assert "queued abort for rollout cli" in out
    (queued,) = store.commands()
    assert queued is not None and queued.by == f"uid {os.getuid()}"
    # One name for a user, the controller's lease owner included.
    assert current_user() == f"uid {os.getuid()}"
    assert default_owner() == f"uid {os.getuid()}'s controller"


def test_a_user_with_a_name_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from rollout.controller import current_user, default_owner

    monkeypatch.setattr(getpass, "getuser", lambda: "ann")
    assert current_user() == "ann"
    assert default_owner() == "ann's controller"


# ------------------------------------------------------------------ hints to copy and paste


def _spec_elsewhere(tmp_path: Path) -> tuple[Path, Path]:
    """A spec at a path with a space, its state in a directory given by --state-dir only."""
    where = tmp_path / "my specs"
    where.mkdir()
    spec = write_spec(where, metrics={"kind": "static", "ticks": []})
    moved = spec.with_name("my spec.yaml")
    spec.rename(moved)
    return moved, tmp_path / "ops state"


def test_the_no_controller_hint_is_a_command_that_acts_on_the_queued_one(tmp_path: Path) -> None:
    # Was "`aml-rollout rollout run /…/my specs/my spec.yaml` acts on it": split by the
    # shell, and without --state-dir `run` read the default state, where the rollout is not.
    spec, state = _spec_elsewhere(tmp_path)
    from rollout.api import run_rollout
    from rollout.controller import FakeClock

    run_rollout(spec, state_dir=state, clock=FakeClock(0.0), max_ticks=1)
    code, out = invoke("abort", str(spec), "--state-dir", str(state))
    printed = shlex.join(["aml-rollout", "rollout", "run", str(spec), "--state-dir", str(state)])
    assert code == 0, out
    assert one_line(out) == (
        f"queued abort for rollout cli; no controller is running: `{printed}` acts on it"
    )
    argv = shlex.split(printed)
    assert argv[:2] == ["aml-rollout", "rollout"]
    code, out = invoke(*argv[2:])
    assert code == EXIT_ROLLED_BACK, out
    assert "aborted" in out


def test_the_no_controller_hint_names_the_stored_candidate(tmp_path: Path) -> None:
    spec, state = _spec_elsewhere(tmp_path)
    from rollout.api import open_store

    store = open_store(spec, state)
    store.save(Status(name="cli", id="r1", phase=Phase.PROGRESSING, blue_weight=10, candidate=V2))
    code, out = invoke("pause", str(spec), "--state-dir", str(state))
    where = ["--state-dir", str(state)]
    printed = shlex.join(
        ["aml-rollout", "rollout", "run", str(spec), *where, "--candidate", "diabetes:2"]
    )
    assert code == 0, out
    assert f"no controller is running: `{printed}` acts on it" in one_line(out), out


def test_the_hint_without_state_dir_quotes_the_spec_alone(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    from rollout.api import open_store

    open_store(spec).save(Status(name="cli", id="r1", phase=Phase.PROGRESSING, blue_weight=10))
    code, out = invoke("pause", str(spec))
    assert code == 0, out
    said = shlex.join(["aml-rollout", "rollout", "run", str(spec)])
    assert f"no controller is running: `{said}` acts on it" in one_line(out), out


def test_the_under_way_refusal_says_a_command_that_finishes_it(tmp_path: Path) -> None:
    spec, state = _spec_elsewhere(tmp_path)
    from rollout.api import open_store

    store = open_store(spec, state)
    store.save(Status(name="cli", phase=Phase.ROLLING_BACK, candidate=V2))
    code, out = invoke("pause", str(spec), "--state-dir", str(state))
    printed = shlex.join(["aml-rollout", "rollout", "run", str(spec), "--state-dir", str(state)])
    assert code == EXIT_ERROR, out
    assert f"no controller is running: `{printed}` finishes it" in one_line(out), out
    assert store.commands() == []


# ------------------------------------------------------------------ an operator's pause


def test_status_of_an_unguarded_operator_pause_says_run_keeps_it_paused(tmp_path: Path) -> None:
    # Was "resume it with `aml-rollout rollout run SPEC`": run only guards it, still Paused,
    # until someone queues `rollout resume`.
    spec = write_spec(tmp_path)
    from rollout.api import open_store

    paused = Status(name="cli", id="r1", phase=Phase.PAUSED, blue_weight=10, reason="paused by ann")
    open_store(spec).save(paused)
    said = (
        "none running: the pause is unguarded: `aml-rollout rollout run SPEC` guards it again "
        "(it stays paused), `aml-rollout rollout resume SPEC` lets it advance"
    )
    code, out = invoke("status", str(spec))
    assert code == EXIT_RUNNING
    assert said in one_line(out), out
    assert "resume it with" not in out
    code, out = invoke("status", str(spec), "--watch", "--timeout", "0")
    assert f"(no controller running: {said.removeprefix('none running: ')})" in one_line(out)


def test_status_of_an_undriven_progressing_rollout_still_says_run_resumes_it(
    tmp_path: Path,
) -> None:
    spec = write_spec(tmp_path)
    from rollout.api import open_store

    open_store(spec).save(Status(name="cli", id="r1", phase=Phase.PROGRESSING, blue_weight=10))
    _, out = invoke("status", str(spec))
    assert "none running: resume it with `aml-rollout rollout run SPEC`" in one_line(out), out
