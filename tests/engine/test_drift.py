"""The controller and a data plane changed under it: two rollouts on one data plane, hand edits."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from rollout.controller import UNREAD_CHARS, Controller, FakeClock
from rollout.core.status import Command, SetWeights
from rollout.core.types import Colour, Phase, Release, Weights
from rollout.errors import RolloutError, RouterError, WeightsUnsettled
from rollout.ledger import Ledger, explain, read_ledger
from rollout.routers.memory import MemoryRouter
from rollout.state.file import FileStateStore
from tests.core.helpers import V1, V2, make_spec
from tests.engine.test_controller import Told, simulated

V3 = Release(model="diabetes", version="3", sha256="3" * 64)


def controller(tmp_path: Path, router: MemoryRouter, name: str = "t", **spec: object) -> Controller:
    parsed = make_spec(name=name, **spec)
    return Controller(
        parsed,
        router,
        simulated(router, 0.01),
        FileStateStore(tmp_path, name),
        ledger=Ledger(tmp_path / f"{name}.ledger.jsonl", fsync=False),
        clock=FakeClock(1000.0),
    )


def test_a_second_rollout_of_another_name_is_refused_while_the_first_drives_the_data_plane(
    tmp_path: Path,
) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    first = controller(tmp_path, router, "a").run(max_ticks=1)
    assert first.phase is Phase.PROGRESSING and first.blue_weight == 10
    second = controller(tmp_path, router, "b", candidate={"model": "diabetes", "version": "3"})
    with pytest.raises(RolloutError) as refused:
        second.run(max_ticks=5)
    assert str(refused.value) == (
        "memory already sends blue 10 % to blue (diabetes:2): another rollout drives it (one "
        "with another `name:` or state directory), or a hand edit. Let that rollout end, or "
        "abort it, before rolling diabetes:3 out; if none is running, send all traffic back "
        "to green first"
    )
    assert router.get_weights() == Weights.blue_at(10)  # nothing of the first was touched
    assert router.release(Colour.BLUE) == V2
    assert not (tmp_path / "b.ledger.jsonl").exists()


class MidChange(MemoryRouter):
    """An Azure endpoint Updating (another rollout's change under way) or Failed: the weights it
    shows may not serve yet, but someone set them."""

    def get_weights(self) -> Weights:
        raise WeightsUnsettled("endpoint is in provisioning state Updating", super().get_weights())


def test_a_rollout_is_refused_on_a_data_plane_another_is_changing(tmp_path: Path) -> None:
    """Was: the RouterError of weights that cannot be read yet was taken for a new endpoint
    ("nothing drives it"), and a rollout began over another's traffic mid-change."""
    router = MidChange(releases={Colour.GREEN: V1, Colour.BLUE: V2})
    MemoryRouter.set_weights(router, Weights.blue_at(10))
    second = controller(tmp_path, router, "b", candidate={"model": "diabetes", "version": "3"})
    with pytest.raises(RolloutError, match=r"already sends blue 10 % to blue .*another rollout"):
        second.run(max_ticks=5)
    assert router.release(Colour.BLUE) == V2  # nothing of the first was touched


def test_a_rollout_whose_blue_was_taken_over_holds_and_resume_takes_it_back(
    tmp_path: Path,
) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl = controller(tmp_path, router)
    assert ctl.run(max_ticks=1).blue_weight == 10
    # Another rollout (or a hand) deploys its own candidate to blue and mirrors to it.
    router.deploy(Colour.BLUE, V3)
    router.set_weights(Weights.blue_at(0, 5))
    held = ctl.run(max_ticks=5, stop_when_paused=True)
    assert held.phase is Phase.PAUSED and held.held
    assert router.release(Colour.BLUE) == V3  # not fought over
    assert router.get_weights() == Weights.blue_at(0, 5)
    assert (
        "the data plane changed under this rollout (blue serves diabetes:3, not diabetes:2; "
        "it sends blue 0 % + 5 % mirrored, not blue 10 %)" in held.reason
    )
    story = "\n".join(explain(read_ledger(tmp_path / "t.ledger.jsonl")))
    assert "blue serves diabetes:3, not diabetes:2" in story

    ctl.store.push_command(Command(id="r", kind="resume", by="ann", rollout=held.id))
    resumed = ctl.run(max_ticks=1)
    assert resumed.phase is Phase.PROGRESSING
    assert router.release(Colour.BLUE) == V2 and router.get_weights() == Weights.blue_at(10)
    final = ctl.run(max_ticks=500)
    assert final.phase is Phase.SUCCEEDED and router.release(Colour.GREEN) == V2


def test_weights_edited_by_hand_under_a_running_controller_hold_it(tmp_path: Path) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl = controller(tmp_path, router)
    status = ctl.run(max_ticks=1)
    router.set_weights(Weights.blue_at(50))  # someone "helps" by hand
    status = ctl.tick(status)
    assert status.phase is Phase.PAUSED and status.held
    assert "it sends blue 50 %, not blue 10 %" in status.reason
    assert router.get_weights() == Weights.blue_at(50)


def test_a_restart_finishes_the_ended_rollout_s_unapplied_actions_first(tmp_path: Path) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl = controller(tmp_path, router)
    status = ctl.run(max_ticks=1)
    # Stopped right after deciding its rollback: blue still at 10 %, the ending not applied.
    ended = replace(
        status, phase=Phase.ROLLED_BACK, blue_weight=0, pending=(SetWeights(0),), applied=0
    )
    ctl.store.save(ended)
    again = controller(tmp_path, router).run(max_ticks=1, restart=True)
    assert again.id != status.id and again.phase is Phase.PROGRESSING
    assert router.get_weights() == Weights.blue_at(10)  # the new rollout's first step


def test_a_rollout_of_an_ended_one_s_leftover_blue_at_0_begins(tmp_path: Path) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1, Colour.BLUE: V3})
    assert controller(tmp_path, router).run(max_ticks=1).blue_weight == 10
    assert router.release(Colour.BLUE) == V2


def test_the_reads_leave_a_simulated_rollout_as_it_was(tmp_path: Path) -> None:
    """The reads of what the data plane serves are not observations: a seeded simulated
    rollout decides tick for tick as it did without them (the analysis benchmark drives this
    controller), and no tick of it is taken for a drift."""

    def ticks(where: Path, read: bool) -> list[tuple[Any, ...]]:
        router = MemoryRouter(releases={Colour.GREEN: V1})
        ctl = controller(where, router)
        if not read:
            ctl._served = lambda: None  # type: ignore[method-assign]
        assert ctl.run(max_ticks=500).phase is Phase.SUCCEEDED
        lines = read_ledger(where / "t.ledger.jsonl")
        assert not any("drift" in line or "not_counted" in line for line in lines)
        return [(r.get("tick"), r.get("weight"), r.get("tick_counts")) for r in lines]

    assert ticks(tmp_path / "read", True) == ticks(tmp_path / "unread", False)


class Unreadable(MemoryRouter):
    """Deployments the router cannot read for a while (edited by hand into a shape it does not
    know); the simulated traffic still reads the weights."""

    unreadable = False
    why = "deployment diabetes-blue has 2 containers"

    def release(self, colour: Colour) -> Release | None:
        if self.unreadable:
            raise RouterError(self.why)
        return super().release(colour)


def test_a_data_plane_that_cannot_be_read_is_said_once_and_the_rollout_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    router = Unreadable(releases={Colour.GREEN: V1})
    ctl = controller(tmp_path, router)
    status = ctl.run(max_ticks=1)
    router.unreadable = True
    for _ in range(3):
        status = ctl.tick(status)
    assert status.phase is Phase.PROGRESSING  # guarding goes on
    said = [r.getMessage() for r in caplog.records if "data plane" in r.getMessage()]
    assert said == [
        "cannot read what the data plane serves (deployment diabetes-blue has 2 containers): "
        "changes made to it under this rollout go unnoticed until it can be read"
    ]
    router.unreadable = False
    ctl.tick(status)
    assert caplog.records[-1].getMessage() == (
        "the data plane can be read again: checking it for changes"
    )
    # The ledger says it too (was: only the log, gone with the controller's terminal).
    ticks = [r for r in read_ledger(tmp_path / "t.ledger.jsonl") if "tick" in r]
    assert [r.get("data_plane_unread") for r in ticks] == [
        None,
        *["deployment diabetes-blue has 2 containers"] * 3,
        None,
    ]
    story = explain(read_ledger(tmp_path / "t.ledger.jsonl"))
    said = [line for line in story if "could not be read" in line]
    assert len(said) == 1 and said[0].endswith(
        "ticks 2–4: what the data plane serves could not be read (deployment diabetes-blue "
        "has 2 containers); changes to it went unnoticed"
    ), story


def test_run_again_without_resume_leaves_a_held_rollout_s_data_plane_as_the_hold_says(
    tmp_path: Path,
) -> None:
    """Was: `run` restored the weights while the rollout stayed held, its reason then false."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl = controller(tmp_path, router)
    status = ctl.run(max_ticks=1)
    router.set_weights(Weights.blue_at(50))
    held = ctl.tick(status)
    again = controller(tmp_path, router).run(max_ticks=3, stop_when_paused=True)
    assert again.held and again.reason == held.reason
    assert router.get_weights() == Weights.blue_at(50)  # the human has not said so yet
    ctl.store.push_command(Command(id="r", kind="resume", by="ann", rollout=held.id))
    resumed = controller(tmp_path, router).run(max_ticks=1)
    assert resumed.phase is Phase.PROGRESSING
    assert router.get_weights() == Weights.blue_at(10)


def test_a_rollout_paused_by_an_operator_then_held_for_a_changed_data_plane_is_told(
    tmp_path: Path,
) -> None:
    """Paused stays the phase, so no phase change told it: the webhook said nothing while the
    rollout came to wait for a human's answer."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    told = Told()
    ctl = controller(tmp_path, router)
    ctl.notifier = told
    status = ctl.run(max_ticks=1)
    ctl.store.push_command(Command(id="p", kind="pause", by="ann", rollout=status.id))
    status = ctl.tick(status)
    assert status.phase is Phase.PAUSED and not status.held
    router.set_weights(Weights.blue_at(50))
    status = ctl.tick(status)
    assert status.held
    assert told.phases == [Phase.PROGRESSING, Phase.PAUSED, Phase.PAUSED]
    ctl.tick(status)
    assert len(told.phases) == 3  # once, not at every held tick


@pytest.mark.parametrize("driven", [True, False], ids=["controller-running", "run-after-abort"])
def test_an_abort_leaves_another_rollout_s_canary_on_blue_as_it_is(
    tmp_path: Path, driven: bool
) -> None:
    """Was: the abort set blue to 0 %, taking its traffic off the other rollout's canary."""
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl = controller(tmp_path, router)
    status = ctl.run(max_ticks=1)
    router.deploy(Colour.BLUE, V3)  # another rollout's canary, at its 50 %
    router.set_weights(Weights.blue_at(50))
    held = ctl.tick(status)
    assert held.held and "abort leaves the data plane as it is" in held.reason
    ctl.store.push_command(Command(id="a", kind="abort", by="ann", rollout=held.id))
    # Driven: the running controller's next tick; else queued while none ran, `run` applies it.
    ended = ctl.tick(held) if driven else controller(tmp_path, router).run(max_ticks=3)
    assert ended.phase is Phase.ROLLED_BACK and ended.pending == ()
    assert ended.reason == (
        "aborted by ann: the data plane is left as it is (blue serves diabetes:3, not "
        "diabetes:2: another rollout's?)"
    )
    assert router.get_weights() == Weights.blue_at(50) and router.release(Colour.BLUE) == V3
    # Nor does a restart apply anything of it before refusing to begin on the other's canary.
    with pytest.raises(RolloutError, match="already sends blue 50 %"):
        controller(tmp_path, router).run(max_ticks=1, restart=True)
    assert router.get_weights() == Weights.blue_at(50)


def test_an_abort_of_a_rollout_whose_weights_were_edited_by_hand_sets_blue_to_0(
    tmp_path: Path,
) -> None:
    router = MemoryRouter(releases={Colour.GREEN: V1})
    ctl = controller(tmp_path, router)
    status = ctl.run(max_ticks=1)
    router.set_weights(Weights.blue_at(50))
    held = ctl.tick(status)
    assert "abort sets blue to 0 %" in held.reason
    ctl.store.push_command(Command(id="a", kind="abort", by="ann", rollout=held.id))
    ended = ctl.run(max_ticks=3)
    assert ended.phase is Phase.ROLLED_BACK
    assert router.get_weights() == Weights.blue_at(0)


def test_a_long_reason_the_data_plane_could_not_be_read_is_cut_in_the_ledger(
    tmp_path: Path,
) -> None:
    router = Unreadable(releases={Colour.GREEN: V1})
    router.why = "deployment diabetes-blue: " + "x" * 5000
    ctl = controller(tmp_path, router)
    status = ctl.run(max_ticks=1)
    router.unreadable = True
    ctl.tick(status)
    last = read_ledger(tmp_path / "t.ledger.jsonl")[-1]
    assert last["data_plane_unread"] == router.why[: UNREAD_CHARS - 1] + "…"


class SlowDeploy(MemoryRouter):
    """A deploy that takes `seconds` of the controller's fake clock (a scoring server starting)."""

    def __init__(self, clock: FakeClock, seconds: float, **kw: Any) -> None:
        super().__init__(**kw)
        self.clock, self.seconds = clock, seconds

    def deploy(self, colour: Colour, release: Release) -> None:
        self.clock.sleep(self.seconds)
        super().deploy(colour, release)


def test_a_step_begun_with_a_deploy_counts_from_when_the_deploy_is_served(tmp_path: Path) -> None:
    """Measured on the local stack: of the 14 canary requests the first tick of the rollout
    that took blue over counted, 7 were answers of the other rollout's candidate, mirrored
    to blue while its own deploy took 7 s (the step's counts began at the decision)."""
    clock = FakeClock(1000.0)
    router = SlowDeploy(clock, 7.0, releases={Colour.GREEN: V1})
    sinces = _sinces(tmp_path, router, clock, ticks=2)
    assert router.release(Colour.BLUE) == V2
    assert sinces[0] == 1007.0, sinces  # not 1000: the decision, before the deploy


def _sinces(tmp_path: Path, router: MemoryRouter, clock: FakeClock, *, ticks: int) -> list[float]:
    """Where each tick's counts began (its ledger line's `since`), a healthy rollout driven for
    `ticks` on `router` by `clock`."""
    ledger = tmp_path / "t.ledger.jsonl"
    Controller(
        make_spec(name="t"),
        router,
        simulated(router, 0.01),
        FileStateStore(tmp_path, "t"),
        ledger=Ledger(ledger, fsync=False),
        clock=clock,
    ).run(max_ticks=ticks)
    return [line["since"] for line in read_ledger(ledger) if "since" in line]


class SlowWeights(MemoryRouter):
    """Weights that take `seconds` of the controller's fake clock to be served (an Azure ML
    endpoint's traffic update: minutes); when each change was served, by blue weight."""

    def __init__(self, clock: FakeClock, seconds: float, **kw: Any) -> None:
        super().__init__(**kw)
        self.clock, self.seconds = clock, seconds
        self.served_at: dict[int, float] = {}

    def set_weights(self, weights: Weights) -> None:
        self.clock.sleep(self.seconds)
        super().set_weights(weights)
        self.served_at.setdefault(weights.blue, self.clock.now())


def test_a_step_begun_with_a_weight_change_counts_from_when_the_weights_are_served(
    tmp_path: Path,
) -> None:
    """The first tick of a step counted from the decision: while the router's update ran, the
    previous step's split still served, and the tick judged traffic of two splits as one (a
    blip on both colours then reads as the canary's: the canary's share of bad events given
    the new split)."""
    clock = FakeClock(1000.0)
    router = SlowWeights(clock, 30.0, releases={Colour.GREEN: V1})
    sinces = _sinces(tmp_path, router, clock, ticks=4)
    assert 50 in router.served_at, sinces
    assert router.served_at[50] in sinces, (router.served_at, sinces)
