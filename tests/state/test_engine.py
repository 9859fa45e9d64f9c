"""The engine on the kubernetes state store: controller, CLI and a pod's SIGTERM, over real HTTP.

The fake kube-apiserver runs in this process; controllers (in-process, or a real `aml-rollout
rollout run` subprocess) talk to it over HTTP through the unmodified kubernetes client. Router
and metrics are the in-process ones (memory router, simulated traffic), as in tests/engine.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from rollout.api import run_rollout
from rollout.cli import app
from rollout.config import RolloutSpec, spec_from_dict
from rollout.controller import FakeClock
from rollout.core.status import Command, Status
from rollout.core.types import Colour, Phase, Release, Weights
from rollout.routers.memory import MemoryRouter
from tests.cli import stop_and_wait
from tests.engine.specs import spec_dict
from tests.fakes.kube_apiserver import FakeKubeApiServer
from tests.state.helpers import NAMESPACE, kube_store, lease_of, successor

ROOT = Path(__file__).resolve().parents[2]


def spec_data(api: FakeKubeApiServer, work: Path, canary_error: float = 0.01) -> dict[str, Any]:
    return spec_dict(
        work,
        canary_error,
        seed=5,
        name="diabetes",
        router={"kind": "memory", "state_file": str(work / "routes.json")},
        state={
            "kind": "kubernetes",
            "namespace": NAMESPACE,
            "api_url": api.url,
            "lease_ttl_s": 5,
            "dir": str(work / "ledger"),
        },
    )


def spec(api: FakeKubeApiServer, work: Path, canary_error: float = 0.01) -> RolloutSpec:
    return spec_from_dict(spec_data(api, work, canary_error))


def stored(api: FakeKubeApiServer) -> Status | None:
    return kube_store(api, "diabetes").load()


@pytest.mark.parametrize(
    ("canary_error", "phase", "green"),
    [
        pytest.param(0.01, Phase.SUCCEEDED, "2", id="healthy-promoted"),
        pytest.param(0.08, Phase.ROLLED_BACK, "1", id="faulty-rolled-back"),
    ],
)
def test_a_rollout_runs_to_its_end_with_its_state_in_the_cluster(
    api: FakeKubeApiServer, tmp_path: Path, canary_error: float, phase: Phase, green: str
) -> None:
    result = run_rollout(spec(api, tmp_path, canary_error), clock=FakeClock(1000.0))
    assert result.phase is phase, result.reason
    router = MemoryRouter(state_file=tmp_path / "routes.json")
    assert router.get_weights() == Weights.blue_at(0)
    served = router.release(Colour.GREEN)
    assert served is not None and served.version == green
    final = stored(api)
    assert final is not None and final.phase is phase and final.pending[final.applied :] == ()
    assert "holderIdentity" not in lease_of(api, "diabetes")["spec"]  # released
    assert result.ledger_path == tmp_path / "ledger" / NAMESPACE / "diabetes.ledger.jsonl"
    ticks = [json.loads(line) for line in result.ledger_path.read_text().splitlines()]
    assert ticks[0]["event"] == "start" and len(ticks) == final.tick + 1
    # Ended: run again, and it is reported as it is, not started over.
    again = run_rollout(spec(api, tmp_path, canary_error), clock=FakeClock(5000.0))
    assert (again.phase, again.status.tick) == (phase, final.tick)


def test_an_abort_queued_on_another_node_reaches_the_controller(
    api: FakeKubeApiServer, tmp_path: Path
) -> None:
    cli = kube_store(api, "diabetes")  # `aml-rollout rollout abort` on someone's laptop

    def abort_at_tick_1(status: Status, record: dict[str, Any]) -> None:
        if status.tick == 1:
            cli.push_command(Command(id="a1", kind="abort", by="ann", rollout=status.id))

    result = run_rollout(spec(api, tmp_path), clock=FakeClock(1000.0), on_tick=abort_at_tick_1)
    assert result.phase is Phase.ROLLED_BACK
    assert "abort" in result.reason


def test_a_rescheduled_controller_resumes_where_the_last_one_stopped(
    api: FakeKubeApiServer, tmp_path: Path
) -> None:
    first = run_rollout(spec(api, tmp_path), clock=FakeClock(1000.0), max_ticks=1)
    assert first.phase is Phase.PROGRESSING
    # Another pod, on another node: a fresh store, nothing local but the router's data plane.
    resumed = run_rollout(spec(api, tmp_path), clock=FakeClock(2000.0))
    assert resumed.phase is Phase.SUCCEEDED
    assert resumed.status.id == first.status.id  # the same rollout, not a new one
    assert lease_of(api, "diabetes")["spec"]["leaseTransitions"] == 1


def test_status_names_the_controller_holding_the_lease(
    api: FakeKubeApiServer, tmp_path: Path
) -> None:
    path = tmp_path / "rollout.yaml"
    path.write_text(yaml.safe_dump(spec_data(api, tmp_path)))
    run_rollout(spec(api, tmp_path), clock=FakeClock(1000.0), max_ticks=2)
    with kube_store(api, "diabetes").lease("ann's controller"):
        shown = CliRunner().invoke(app, ["rollout", "status", str(path)])
    assert "ann's controller pid" in shown.output
    shown = CliRunner().invoke(app, ["rollout", "status", str(path)])
    assert "none running" in shown.output


def test_a_sigterm_stops_the_controller_and_releases_its_lease(
    api: FakeKubeApiServer, tmp_path: Path
) -> None:
    data = spec_data(api, tmp_path)
    data["analysis"]["interval_s"] = 60  # it waits, as a controller mostly does
    data["state"]["lease_ttl_s"] = 60
    path = tmp_path / "rollout.yaml"
    path.write_text(yaml.safe_dump(data))
    controller = subprocess.Popen(
        [sys.executable, "-c", "from rollout.cli import main; main()", "rollout", "run", str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (api.exists("leases", "aml-rollout-diabetes", NAMESPACE, "coordination.k8s.io")
                   and (stored(api) or Status("x")).tick >= 1):  # fmt: skip
            assert controller.poll() is None, controller.communicate()
            assert time.monotonic() < deadline, "the controller did not start"
            time.sleep(0.05)
        _, err = stop_and_wait(controller, timeout=15)
    finally:
        controller.kill()
    assert controller.returncode == 130, err
    assert "interrupted: the rollout stays where it is" in err
    assert "holderIdentity" not in lease_of(api, "diabetes")["spec"]  # the next one need not wait
    kept = stored(api)
    assert kept is not None and not kept.terminal


@pytest.mark.parametrize(
    ("taken_over", "blue"),
    [
        # The controller stops instead of retrying into the rollout a successor now drives.
        pytest.param(True, 0, id="taken-over-stops"),
        # Nobody took it (an API server restarting longer than the renew deadline): its
        # renewal, guarded by the Lease's resourceVersion, goes through, and the action is
        # retried. Was: stopped at once, a decided rollback left unapplied.
        pytest.param(False, 10, id="lapsed-renewed-goes-on"),
    ],
)
def test_a_controller_whose_lease_ran_out_between_attempts_acts_only_if_it_renews_it(
    api: FakeKubeApiServer, tmp_path: Path, taken_over: bool, blue: int
) -> None:
    """Between two attempts at a router action the lease ran out (a partition, a long pause)."""
    from rollout.controller import Controller
    from rollout.errors import RouterError, StateError
    from rollout.metrics.factory import make_metrics

    offset = [0.0]
    store = kube_store(api, "diabetes", ttl=30, monotonic=lambda: time.monotonic() + offset[0])
    rollout_spec = spec(api, tmp_path)
    shared = MemoryRouter()
    attempts: list[int] = []

    class CutOff(MemoryRouter):
        def set_weights(self, weights: Weights) -> None:
            if weights.blue == 10:
                attempts.append(weights.blue)
            if attempts == [10]:  # the first step's first try fails,
                offset[0] = 21.0  # and the 20 s renew deadline of a 30 s lease passes
                if taken_over:
                    bobs.enter_context(successor(api, "diabetes").lease("bob"))
                raise RouterError("the API server did not answer")
            super().set_weights(weights)

    router = CutOff()
    controller = Controller(
        rollout_spec,
        router,
        make_metrics(rollout_spec.metrics, router=shared),
        store,
        clock=FakeClock(1000.0),
    )
    with contextlib.ExitStack() as bobs:
        if taken_over:
            with pytest.raises(StateError, match="taken over by bob"):
                controller.run(max_ticks=1)
            assert attempts == [10]  # no retry once the lease was gone
        else:
            assert controller.run(max_ticks=1).phase is Phase.PROGRESSING
            assert attempts == [10, 10]
    assert router.get_weights().blue == blue


def test_a_rollback_whose_save_meets_a_500_is_still_applied(
    api: FakeKubeApiServer, tmp_path: Path
) -> None:
    """Every status save meets one 500 first (etcd timing out): each is tried again, and the
    faulty candidate is rolled back. Was: StateError on the save of the rollback decision, `run`
    exit 2, blue still serving the candidate."""
    from rollout.controller import Controller
    from rollout.metrics.factory import make_metrics
    from tests.fakes.kube_apiserver import ApiError

    def etcd_timeout(_: object) -> None:
        raise ApiError(500, "InternalError", "etcdserver: request timed out")

    def blip_next_save(status: Status, record: object) -> None:
        api.before_next_write("configmaps", "aml-rollout-diabetes-status", etcd_timeout)

    paused: list[float] = []
    store = kube_store(api, "diabetes", ttl=30, sleep=paused.append)
    rollout_spec = spec(api, tmp_path, canary_error=0.08)
    router = MemoryRouter()
    controller = Controller(
        rollout_spec,
        router,
        make_metrics(rollout_spec.metrics, router=router),
        store,
        clock=FakeClock(1000.0),
        on_tick=blip_next_save,
    )
    assert controller.run().phase is Phase.ROLLED_BACK
    assert router.get_weights() == Weights.blue_at(0)
    assert paused and set(paused) == {1.0}  # one pause per blip
    final = stored(api)
    assert final is not None and final.phase is Phase.ROLLED_BACK


def test_a_stop_whose_interrupt_was_lost_ends_a_save_riding_out_an_outage(
    api: FakeKubeApiServer, tmp_path: Path
) -> None:
    """A SIGTERM's KeyboardInterrupt is lost when it lands in a finalizer: `run`'s
    RealClock(stopping) sees the stop at its next wait. Was: not at the store's waits
    (time.sleep): a save the API server answers 503 went on for up to 10 minutes."""
    import threading

    from rollout.controller import RealClock
    from tests.fakes.kube_apiserver import ApiError

    stopping, handle, refused = threading.Event(), api.handle, list[float]()

    def restarting(method: str, path: str, *args: Any) -> tuple[int, dict[str, Any]]:
        if method == "PATCH" and path.endswith("/aml-rollout-diabetes-status") and not refused:
            refused.append(time.monotonic())
            stopping.set()  # the stop comes, its raise lost, while the API server is down
            raise ApiError(503, "ServiceUnavailable", "the API server is restarting")
        return handle(method, path, *args)

    api.handle = restarting  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        run_rollout(spec(api, tmp_path), clock=RealClock(stopping))
    assert refused and time.monotonic() - refused[0] < 0.5  # not the 1 s pause, nor more
    assert stored(api) is None  # was: the save tried again a second later, and landed
    assert "holderIdentity" not in lease_of(api, "diabetes")["spec"]  # released


def test_one_rollout_name_in_two_namespaces_keeps_two_ledgers(
    api: FakeKubeApiServer, tmp_path: Path
) -> None:
    """A staging and a production rollout of one name, run from one directory: two rollouts
    (status, commands and Lease are each namespace's), two ledgers. Was: one shared
    `<dir>/diabetes.ledger.jsonl`, and `explain` of production's spec told staging's
    promotion, production's rollback nowhere."""
    from rollout.api import ledger_path_of

    api.seed({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ml-staging"}},
             "namespaces")  # fmt: skip
    specs = {}
    for ns, canary_error in (("ml-staging", 0.01), (NAMESPACE, 0.08)):
        (tmp_path / ns).mkdir()  # each its own data plane
        data = spec_data(api, tmp_path / ns, canary_error)
        data["state"] |= {"namespace": ns, "dir": str(tmp_path / "ledger")}
        specs[ns] = spec_from_dict(data)
    staging = run_rollout(specs["ml-staging"], clock=FakeClock(1000.0))
    prod = run_rollout(specs[NAMESPACE], clock=FakeClock(1000.0))
    assert (staging.phase, prod.phase) == (Phase.SUCCEEDED, Phase.ROLLED_BACK)
    assert prod.ledger_path == tmp_path / "ledger" / NAMESPACE / "diabetes.ledger.jsonl"
    for ns, result in (("ml-staging", staging), (NAMESPACE, prod)):
        assert ledger_path_of(specs[ns]) == result.ledger_path
        records = [json.loads(line) for line in result.ledger_path.read_text().splitlines()]
        assert [r["rollout_id"] for r in records if r.get("event") == "start"] == [result.status.id]
    assert not (tmp_path / "ledger" / "diabetes.ledger.jsonl").exists()


def test_a_ledger_written_before_namespaces_named_it_is_still_read(
    api: FakeKubeApiServer, tmp_path: Path
) -> None:
    """Upgraded: the rollout's ledger is the shared `<dir>/<name>.ledger.jsonl` of the version
    before, until the rollout writes its namespace's (a file or memory store's are unchanged)."""
    from rollout.api import ledger_path_of

    kube = spec(api, tmp_path)
    old = tmp_path / "ledger" / "diabetes.ledger.jsonl"
    new = tmp_path / "ledger" / NAMESPACE / "diabetes.ledger.jsonl"
    assert ledger_path_of(kube) == new  # none at all: where `run` will write it
    old.parent.mkdir(parents=True)
    old.write_text('{"event": "start", "at": 1.0, "name": "diabetes"}\n')
    assert ledger_path_of(kube) == old
    assert run_rollout(kube, clock=FakeClock(1000.0), max_ticks=1).ledger_path == new
    assert ledger_path_of(kube) == new
    data = spec_data(api, tmp_path)
    for kind, name in (
        ("file", "diabetes.ledger.jsonl"),
        ("memory", "diabetes.memory.ledger.jsonl"),
    ):
        local = spec_from_dict(data | {"state": {"kind": kind, "dir": str(tmp_path / "ledger")}})
        assert ledger_path_of(local) == tmp_path / "ledger" / name


def test_a_first_release_check_names_the_ledger_it_wrote_not_an_old_shared_one(
    api: FakeKubeApiServer, tmp_path: Path
) -> None:
    """Upgraded, with the version before's shared ledger there: the check writes its
    namespace's and named the shared one (whose lines are not the check's)."""
    from aml_pipelines.delivery import check_first_release
    from rollout.routers.factory import make_router

    data = spec_data(api, tmp_path)
    data.pop("stable")
    data["analysis"]["errors"] = {"max_rate": 0.05}
    first = spec_from_dict(data)
    old = tmp_path / "ledger" / "diabetes.ledger.jsonl"
    old.parent.mkdir(parents=True)
    old.write_text('{"event": "start", "at": 1.0, "name": "diabetes", "rollout_id": "old"}\n')
    *_, ledger = check_first_release(
        first,
        Release("m", "1"),
        state_dir=None,
        router=make_router(first.router),
        clock=FakeClock(1000.0),
    )
    assert ledger == tmp_path / "ledger" / NAMESPACE / "diabetes.ledger.jsonl"
    events = [json.loads(line).get("event") for line in ledger.read_text().splitlines()]
    assert "first-check" in events
