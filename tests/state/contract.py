"""The StateStore contract, as one suite every store runs (memory, file, kubernetes).

Subclass `StateStoreContract` in a store's test module and provide two fixtures on one fresh
rollout named "r": `store`, and `twin` — the same rollout seen by another instance (another
process, another node; the memory store, which lives in one object, gives the same instance).
The tests speak only the Protocol: whatever keeps the state, a controller must read back what it
saved, commands must come back in order at positions that never move (the status remembers how
many it has read), concurrent pushes must lose nothing, and one lease holder at a time, named to
the next.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from rollout.core.status import Command, Deploy, SetWeights, Status
from rollout.core.types import Colour, Phase, Release
from rollout.errors import LeaseHeldError
from rollout.state.base import StateStore

V2 = Release(model="diabetes", version="2", sha256="2" * 64, image="registry.local/diabetes:2")


def a_status(tick: int = 3) -> Status:
    return Status(
        name="r",
        id="rollout-1",
        phase=Phase.PROGRESSING,
        step_index=1,
        blue_weight=25,
        tick=tick,
        candidate=V2,
        reason="step 25 %: waiting for evidence",
        commands=(Command(id="p", kind="pause", by="ann"),),
        commands_read=1,
        pending=(SetWeights(25), Deploy(Colour.BLUE, V2)),
        applied=1,
    )


class StateStoreContract:
    def test_a_rollout_never_started_has_no_status_commands_or_controller(
        self, store: StateStore
    ) -> None:
        assert isinstance(store, StateStore)
        assert store.load() is None
        assert store.commands() == []
        assert store.controller() is None

    def test_a_saved_status_reads_back_whole_from_another_instance(
        self, store: StateStore, twin: StateStore
    ) -> None:
        store.save(a_status())
        assert twin.load() == a_status()

    def test_the_last_save_wins(self, store: StateStore, twin: StateStore) -> None:
        store.save(a_status(3))
        store.save(replace(a_status(4), phase=Phase.PAUSED, pending=(), applied=0))
        loaded = twin.load()
        assert loaded is not None
        assert (loaded.tick, loaded.phase, loaded.pending) == (4, Phase.PAUSED, ())

    def test_commands_come_back_in_order_at_positions_that_never_move(
        self, store: StateStore, twin: StateStore
    ) -> None:
        for i in range(5):
            store.push_command(Command(id=f"c{i}", kind="pause", by="ann", at=float(i)))
        first = twin.commands()
        twin.push_command(Command(id="s", kind="set_weight", weight=50, by="bob"))
        store.push_command(Command(id="a", kind="abort", by="ann", rollout="rollout-1"))
        later = store.commands()
        assert later[: len(first)] == first
        assert [c.id for c in later] == ["c0", "c1", "c2", "c3", "c4", "s", "a"]
        assert later[5].weight == 50 and later[6].rollout == "rollout-1"

    def test_concurrent_pushes_lose_nothing_and_repeat_nothing(
        self, store: StateStore, twin: StateStore
    ) -> None:
        failures: list[BaseException] = []

        def push(writer: StateStore, who: int) -> None:
            try:
                for i in range(8):
                    writer.push_command(Command(id=f"{who}-{i}", kind="pause"))
            except BaseException as exc:  # reported below, not lost in the thread
                failures.append(exc)

        threads = [
            threading.Thread(target=push, args=(store if w % 2 else twin, w)) for w in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, [repr(f) for f in failures]
        ids = [c.id for c in store.commands()]
        assert sorted(ids) == sorted(f"{w}-{i}" for w in range(4) for i in range(8))
        for w in range(4):  # each writer's own commands stay in its order
            assert [i for i in ids if i.startswith(f"{w}-")] == [f"{w}-{i}" for i in range(8)]

    def test_commands_need_no_lease(self, store: StateStore, twin: StateStore) -> None:
        with twin.lease("ann's controller"):
            store.push_command(Command(id="1", kind="promote", by="bob"))
            assert [c.id for c in twin.commands()] == ["1"]

    def test_a_second_controller_is_refused_naming_the_first(
        self, store: StateStore, twin: StateStore
    ) -> None:
        with store.lease("ann's controller"):
            with pytest.raises(LeaseHeldError) as refused:
                twin.lease("bob's controller").__enter__()
            assert "already driven by another controller" in str(refused.value)
            assert "ann's controller" in str(refused.value)
            assert "ann's controller" in (store.controller() or "")  # still the holder

    def test_the_holder_is_named_while_it_holds_and_nobody_after(
        self, store: StateStore, twin: StateStore
    ) -> None:
        with store.lease("ann's controller"):
            assert "ann's controller" in (twin.controller() or "")
        assert twin.controller() is None

    def test_a_released_lease_is_taken_at_once_by_the_next(
        self, store: StateStore, twin: StateStore
    ) -> None:
        with store.lease("ann's controller"):
            store.save(a_status())
        with twin.lease("bob's controller"):
            assert twin.load() == a_status()
            twin.save(a_status(4))
            assert "bob's controller" in (store.controller() or "")
        loaded = store.load()
        assert loaded is not None and loaded.tick == 4

    def test_reading_needs_no_lease(self, store: StateStore, twin: StateStore) -> None:
        store.save(a_status())
        store.push_command(Command(id="1", kind="pause"))
        with store.lease("ann's controller"):
            assert twin.load() == a_status()
            assert [c.id for c in twin.commands()] == ["1"]
