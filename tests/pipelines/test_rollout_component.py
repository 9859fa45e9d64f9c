"""The rollout component: input validation, the engine-missing error, and real dry-run rollouts."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from components.rollout.main import (
    EXIT_ENGINE_UNAVAILABLE,
    EXIT_PAUSED,
    EXIT_ROLLED_BACK,
    main,
)

SPEC = """
name: component-test
router: {{kind: memory}}
metrics: {{kind: simulated, seed: 3, rps: {rps}{canary}}}
steps: [50, 100]
analysis: {{interval_s: 0.02, min_requests: 50, max_step_duration_s: {max_step}}}
stable: {{model: m, version: "0"}}
"""


@pytest.fixture
def package(tmp_path: Path) -> Path:
    folder = tmp_path / "package"
    folder.mkdir()
    (folder / "package.json").write_text(
        json.dumps({"model": "m", "version": "1", "sha256": "ab" * 32, "image": "r/m:1"})
    )
    return folder


def _spec(tmp_path: Path, canary: str = "", rps: int = 2e5, max_step: float = 10) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.format(canary=canary, rps=rps, max_step=max_step))
    return path


@pytest.mark.parametrize(
    ("canary", "rps", "exit_code", "phase"),
    [
        pytest.param("", 2e5, 0, "Succeeded", id="healthy"),
        pytest.param(", canary: {error_rate: 0.3}", 2e5, EXIT_ROLLED_BACK, "RolledBack", id="5xx"),
        # too little traffic to decide: held for a human, and the step ends instead of waiting
        pytest.param("", 50, EXIT_PAUSED, "Paused", id="inconclusive-pauses"),
    ],
)  # fmt: skip
def test_runs_the_engine_on_a_dry_run_spec(
    tmp_path: Path, package: Path, canary: str, rps: float, exit_code: int, phase: str
) -> None:
    result = tmp_path / "result"
    max_step = 0.3 if phase == "Paused" else 10
    argv = [
        "--package",
        str(package),
        "--spec",
        str(_spec(tmp_path, canary, rps, max_step)),
        "--result",
        str(result),
    ]
    assert main(argv) == exit_code
    written = json.loads((result / "result.json").read_text())
    assert written["phase"] == phase
    assert written["candidate"]["version"] == "1" and written["candidate"]["image"] == "r/m:1"
    assert Path(written["ledger"]).is_file()
    assert written["tags"] is None  # no --registry: nothing to tag


def test_engine_not_available_fails_without_pretending(
    tmp_path: Path, package: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "rollout.api", None)  # import now raises ImportError
    result = tmp_path / "result"
    argv = ["--package", str(package), "--spec", str(_spec(tmp_path)), "--result", str(result)]
    assert main(argv) == EXIT_ENGINE_UNAVAILABLE
    assert "rollout engine not available" in caplog.text
    assert not (result / "result.json").exists()


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        pytest.param("no-package-json", "package.json not found", id="no-package"),
        pytest.param("no-image", "lacks ['image']", id="package-without-image"),
        pytest.param("no-spec", "spec:", id="no-spec"),
        pytest.param("bad-spec", "steps", id="invalid-spec"),
    ],
)
def test_bad_inputs_are_refused(
    tmp_path: Path, package: Path, break_it: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    spec = _spec(tmp_path)
    if break_it == "no-package-json":
        (package / "package.json").unlink()
    elif break_it == "no-image":
        (package / "package.json").write_text(
            json.dumps({"model": "m", "version": "1", "sha256": "a"})
        )
    elif break_it == "no-spec":
        spec.unlink()
    else:
        spec.write_text(spec.read_text().replace("[50, 100]", "[50, 40]"))
    argv = ["--package", str(package), "--spec", str(spec), "--result", str(tmp_path / "r")]
    assert main(argv) == 1
    assert message in caplog.text


@pytest.mark.parametrize(
    ("canary", "exit_code", "stages"),
    [
        pytest.param("", 0, {1: "archived", 2: "production"}, id="promoted"),
        pytest.param(", canary: {error_rate: 0.3}", EXIT_ROLLED_BACK,
                     {1: "production", 2: "rolled-back"}, id="rolled-back"),
    ],
)  # fmt: skip
def test_with_a_registry_the_tags_follow_traffic(
    tmp_path: Path, package: Path, canary: str, exit_code: int, stages: dict[int, str]
) -> None:
    """What keeps the registry true when the rollout runs inside an Azure ML job."""
    from aml_pipelines.registry.local import LocalRegistry
    from tests.pipelines.conftest import write_model_folder

    registry = LocalRegistry(tmp_path / "registry")
    registry.register("m", write_model_folder(tmp_path / "v1", name="m"), {"stage": "production"})
    registry.register("m", write_model_folder(tmp_path / "v2", name="m", salt="2"),
                      {"stage": "candidate"})  # fmt: skip
    (package / "package.json").write_text(
        json.dumps({"model": "m", "version": "2", "sha256": "ab" * 32, "image": "r/m:2"})
    )
    argv = ["--package", str(package), "--spec", str(_spec(tmp_path, canary)),
            "--registry", f"local:{registry.root}",
            "--result", str(tmp_path / "result")]  # fmt: skip
    assert main(argv) == exit_code
    assert {v.version: v.stage for v in registry.list_versions("m")} == stages
    assert json.loads((tmp_path / "result" / "result.json").read_text())["tags"] == "written"
    if exit_code == EXIT_ROLLED_BACK:
        assert registry.get("m", 2).tags["rollback_reason"]


def test_tags_that_cannot_be_written_fail_the_step(
    tmp_path: Path, package: Path, caplog: pytest.LogCaptureFixture
) -> None:
    argv = ["--package", str(package), "--spec", str(_spec(tmp_path)),
            "--registry", "nosuch:registry", "--result", str(tmp_path / "result")]  # fmt: skip
    assert main(argv) == 1
    assert "the rollout ended Succeeded but the registry tags were not written" in caplog.text


def test_a_version_the_registry_does_not_hold_fails_the_step(
    tmp_path: Path, package: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing to tag is not success: the registry would not follow the traffic that moved."""
    from aml_pipelines.registry.local import LocalRegistry
    from tests.pipelines.conftest import write_model_folder

    registry = LocalRegistry(tmp_path / "registry")  # holds "other", not the packaged m:1
    registry.register("other", write_model_folder(tmp_path / "v1", name="other"))
    argv = ["--package", str(package), "--spec", str(_spec(tmp_path)),
            "--registry", f"local:{registry.root}",
            "--result", str(tmp_path / "result")]  # fmt: skip
    assert main(argv) == 1
    assert "the rollout ended Succeeded but the registry tags were not written" in caplog.text
    assert "model 'm' version 1 not found" in caplog.text
    tags = json.loads((tmp_path / "result" / "result.json").read_text())["tags"]
    assert tags.startswith("not written: ") and "version 1 not found" in tags


@pytest.mark.parametrize(
    ("failure", "one_line"),
    [
        # an OSError the registry did not map (a disk, a socket): the user's to fix, one line
        pytest.param(ConnectionResetError(104, "Connection reset by peer"), True, id="oserror"),
        # nobody expected it: its traceback goes on, the outcome is recorded first
        pytest.param(RuntimeError("the SDK broke"), False, id="unexpected"),
    ],
)
@pytest.mark.parametrize("first_release", [False, True], ids=["rollout", "first-release"])
def test_tags_that_fail_unexpectedly_still_leave_the_outcome_in_result_json(
    tmp_path: Path,
    package: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: Exception,
    one_line: bool,
    first_release: bool,
) -> None:
    """Only PipelineError/ValueError were caught around the tagging: any other error left the
    first release's step with no result.json (written after the tags), and the rollout's
    result.json said nothing of the tags, so the pipeline lost the outcome of a release that had
    really moved traffic. It is recorded whatever the tagging raised, and the step fails; and
    before the tagging began, as pending: a step killed while tagging still leaves it."""
    from aml_pipelines.registry.local import LocalRegistry

    result = tmp_path / "result"
    while_tagging: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        while_tagging.append(json.loads((result / "result.json").read_text()))
        raise failure

    registry = _registry_holding_m1(tmp_path)
    monkeypatch.setattr(LocalRegistry, "set_tags", refuse)
    spec = _first(tmp_path) if first_release else _spec(tmp_path)
    argv = ["--package", str(package), "--spec", str(spec),
            "--registry", f"local:{registry.root}", "--result", str(result)]  # fmt: skip
    if one_line:
        assert main(argv) == 1
        assert "but the registry tags were not written: [Errno 104]" in caplog.text
    else:
        with pytest.raises(RuntimeError, match="the SDK broke"):
            main(argv)
    written = json.loads((result / "result.json").read_text())
    assert [w["tags"] for w in while_tagging] == ["pending"]
    assert while_tagging[0]["phase"] == written["phase"]
    if first_release:  # (the traffic read once tagged: slow to fail, it waits)
        assert while_tagging[0]["traffic"] is None
        assert while_tagging[0]["reason"].startswith(
            "first release of m deployed to green, its check Successful: "
        )
        assert while_tagging[0]["reason"].endswith(
            "(its tags being written, the traffic it serves read after)"
        )
    assert written["phase"] == "Succeeded"
    assert written["candidate"]["version"] == "1"
    assert written["tags"].startswith("not written: ")
    assert str(failure) in written["tags"]
    if first_release:
        assert (written["first_check"], written["traffic"]) == (
            "Successful",
            {"green": 100, "blue": 0},
        )
    assert registry.get("m", 1).stage == "candidate"


FIRST_SPEC = """
name: component-first
router: {{kind: memory, state_file: {routes}}}
metrics: {{kind: simulated, seed: 3, rps: {rps}, baseline: {{error_rate: {error_rate}}}}}
steps: [50, 100]
analysis: {{interval_s: 0.02, max_step_duration_s: {max_step}, latency: {{enabled: false}}{errors}}}
"""


def _first(
    tmp_path: Path,
    *,
    error_rate: float = 0.001,
    rps: float = 2e4,
    max_step: float = 10,
    errors: str = "",
) -> Path:
    """A spec with no `stable:` over an empty memory router: the model's first release."""
    path = tmp_path / "first.yaml"
    path.write_text(
        FIRST_SPEC.format(
            routes=tmp_path / "routes.json",
            rps=rps,
            error_rate=error_rate,
            max_step=max_step,
            errors=errors,
        )
    )
    return path


def _registry_holding_m1(tmp_path: Path, stage: str = "candidate") -> Any:
    from aml_pipelines.registry.local import LocalRegistry
    from tests.pipelines.conftest import write_model_folder

    registry = LocalRegistry(tmp_path / "registry")
    registry.register("m", write_model_folder(tmp_path / "v1", name="m"), {"stage": stage})
    return registry


def _green(tmp_path: Path) -> tuple[str | None, int]:
    from rollout.config import MemoryRouterConfig
    from rollout.core.types import Colour
    from rollout.routers.memory import MemoryRouter

    router = MemoryRouter.from_config(MemoryRouterConfig(state_file=tmp_path / "routes.json"))
    green = router.release(Colour.GREEN)
    return (green.version if green else None), router.get_weights().green


@pytest.mark.parametrize(
    ("spec_kw", "exit_code", "check", "says"),
    [
        pytest.param({}, 0, "Successful", "is below the limit 10 %", id="clean-passes"),
        pytest.param({"error_rate": 0.3}, 1, "Failed", "is above the limit 10 %",
                     id="over-max-rate-fails"),
        pytest.param({"rps": 20, "max_step": 0.3}, EXIT_PAUSED, "Inconclusive", "undecided",
                     id="too-little-traffic-is-a-humans-call"),
        pytest.param({"errors": ", errors: {max_rate: null}"}, 0, "unjudged",
                     "sets no absolute limit", id="no-limit-deploys-unjudged"),
    ],
)  # fmt: skip
def test_a_models_first_release_is_deployed_and_checked_on_the_absolute_limits(
    tmp_path: Path,
    package: Path,
    spec_kw: dict[str, Any],
    exit_code: int,
    check: str,
    says: str,
) -> None:
    """The deploy pipeline's first run on an empty endpoint: nothing to compare the candidate
    with, so it is judged on the spec's limits, as the trigger's delivery does, and tagged."""
    registry = _registry_holding_m1(tmp_path)
    result = tmp_path / "result"
    argv = ["--package", str(package), "--spec", str(_first(tmp_path, **spec_kw)),
            "--registry", f"local:{registry.root}", "--result", str(result)]  # fmt: skip
    assert main(argv) == exit_code
    # It stays deployed whatever the verdict: there is nothing to fall back to.
    assert _green(tmp_path) == ("1", 100)
    summary = json.loads((result / "result.json").read_text())
    assert summary["first_check"] == check
    assert summary["traffic"] == {"green": 100, "blue": 0}  # as read back from the router
    assert summary["reason"].startswith("first release of m: deployed to green with all traffic")
    assert says in summary["reason"]
    assert summary["tags"] == "written"
    tags = registry.get("m", 1).tags
    assert (tags["stage"], tags["first_check"]) == ("production", check)
    assert (says in tags.get("first_check_reason", "")) == (check != "Successful")


def test_without_a_registry_a_first_release_is_checked_and_not_tagged(
    tmp_path: Path, package: Path
) -> None:
    result = tmp_path / "result"
    argv = ["--package", str(package), "--spec", str(_first(tmp_path, error_rate=0.3)),
            "--result", str(result)]  # fmt: skip
    assert main(argv) == 1
    assert json.loads((result / "result.json").read_text())["first_check"] == "Failed"
    assert _green(tmp_path) == ("1", 100)


def test_a_production_version_elsewhere_is_no_first_release(
    tmp_path: Path, package: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Green serving nothing while the registry holds a production version is an emptied data
    plane, not a first release: the candidate is not made production unjudged; the engine says
    what to do."""
    from tests.pipelines.conftest import write_model_folder

    registry = _registry_holding_m1(tmp_path, stage="production")
    registry.register("m", write_model_folder(tmp_path / "v2", name="m", salt="2"))
    (package / "package.json").write_text(
        json.dumps({"model": "m", "version": "2", "sha256": "ab" * 32, "image": "r/m:2"})
    )
    argv = ["--package", str(package), "--spec", str(_first(tmp_path)),
            "--registry", f"local:{registry.root}",
            "--result", str(tmp_path / "result")]  # fmt: skip
    assert main(argv) == 1
    assert "green serves nothing" in caplog.text
    assert _green(tmp_path) == (None, 100)
    assert registry.get("m", 2).stage != "production"


@pytest.mark.parametrize(
    "second",
    [
        pytest.param("2", id="next-version-starts-a-new-rollout"),
        pytest.param("1", id="same-version-again-reports-its-ended-rollout"),
    ],
)
def test_a_rollout_state_that_outlives_the_job_does_not_block_the_next_one(
    tmp_path: Path, package: Path, second: str
) -> None:
    """With a state store that outlives the step (`state.kind: kubernetes`, or `run-local
    --run-dir` the same folder), the next job's rollout found the last one's ended status: it
    refused ("has ended ... --restart starts a new rollout"), so every pipeline run after the
    first failed at its rollout step. An ended rollout of ANOTHER version is history; one of
    the same version (a retried step) is reported as it ended, not rolled out twice."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        SPEC.format(canary="", rps=2e5, max_step=10).replace(
            "{kind: memory}", f"{{kind: memory, state_file: {tmp_path / 'routes.json'}}}"
        )
    )
    result = tmp_path / "result"  # the state store both jobs share
    argv = ["--package", str(package), "--spec", str(spec), "--result", str(result)]
    assert main(argv) == 0
    if second != "1":
        (package / "package.json").write_text(
            json.dumps({"model": "m", "version": second, "sha256": "cd" * 32, "image": "r/m:2"})
        )
    assert main(argv) == 0
    written = json.loads((result / "result.json").read_text())
    assert (written["phase"], written["candidate"]["version"]) == ("Succeeded", second)
    assert _green(tmp_path)[0] == second


def test_sigterm_stops_the_step_like_ctrl_c(
    tmp_path: Path, package: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Azure ML stops a cancelled job's step with SIGTERM. Python's default action ended the step
    at once: no line in its log saying what happened to the rollout, and the lease (a
    Kubernetes Lease with `state.kind: kubernetes`) left to expire before anyone could resume."""
    import fcntl
    import os
    import signal
    import threading

    class Killed(Exception):
        """Stands in for the default action (the process dies), without killing pytest."""

    def default(signum: int, frame: Any) -> None:
        raise Killed

    previous = signal.signal(signal.SIGTERM, default)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    result = tmp_path / "result"
    # little traffic: the judge keeps looking for seconds, so the signal lands mid-rollout
    argv = ["--package", str(package), "--spec", str(_spec(tmp_path, rps=50)),
            "--result", str(result)]  # fmt: skip
    try:
        timer.start()
        code = main(argv)
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert code == 130
    assert "interrupted: the rollout stopped without a verdict" in caplog.text
    with (result / "component-test.lock").open("a") as fh:  # the lease was released
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.usefixtures("interrupt_lost")
def test_a_stop_whose_interrupt_was_lost_still_stops_the_step(
    tmp_path: Path, package: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The KeyboardInterrupt of Ctrl-C or SIGTERM is lost when it lands in a finalizer ("Exception
    ignored"): the step went on judging as if never stopped (run-local's Ctrl-C test, once in a
    parallel suite). The signal's event is still set, and the next wait stops on it."""
    # little traffic: undecided for seconds (held, exit 5, if the stop is not seen)
    argv = ["--package", str(package), "--spec", str(_spec(tmp_path, rps=50, max_step=0.5)),
            "--result", str(tmp_path / "result")]  # fmt: skip
    assert main(argv) == 130
    assert "interrupted: the rollout stopped without a verdict" in caplog.text


@pytest.mark.parametrize(
    ("superseded", "exit_code", "green", "stages"),
    [
        # green still serves m:1: the retried step reports the promotion (a new rollout of m:1,
        # judged against the failing canary below, would roll back)
        pytest.param(False, 0, "1", {1: "production", 2: None}, id="still-served-is-reported"),
        # m:2 promoted since: the old result is history, m:1 is rolled out again against m:2
        # (and rolls back); replayed, it tagged m:1 production while green served m:2
        pytest.param(True, EXIT_ROLLED_BACK, "2", {1: "rolled-back", 2: "production"},
                     id="superseded-rolls-out-anew"),
    ],
)  # fmt: skip
def test_an_ended_rollout_is_replayed_only_while_its_outcome_serves(
    tmp_path: Path, package: Path, superseded: bool, exit_code: int, green: str,
    stages: dict[int, str], caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Re-running an old run's rollout step (`run-local --run-dir` of an earlier run) found its
    ended rollout of the same version and replayed its outcome into the registry, whatever the
    router served since: the registry then named a production version that served nothing."""
    from aml_pipelines.registry.local import LocalRegistry
    from tests.pipelines.conftest import write_model_folder

    registry = LocalRegistry(tmp_path / "registry")
    for version in (1, 2):
        registry.register("m", write_model_folder(tmp_path / f"v{version}", name="m",
                                                  salt=str(version)))  # fmt: skip
    spec = tmp_path / "spec.yaml"

    def roll_out(version: int, result: str, canary: str = "") -> int:
        spec.write_text(
            SPEC.format(canary=canary, rps=2e5, max_step=10).replace(
                "{kind: memory}", f"{{kind: memory, state_file: {tmp_path / 'routes.json'}}}"
            )
        )
        (package / "package.json").write_text(json.dumps(
            {"model": "m", "version": str(version), "sha256": f"{version:02}" * 32,
             "image": f"r/m:{version}"}))  # fmt: skip
        return main(["--package", str(package), "--spec", str(spec),
                     "--registry", f"local:{registry.root}",
                     "--result", str(tmp_path / result)])  # fmt: skip

    assert roll_out(1, "run-a") == 0
    if superseded:
        assert roll_out(2, "run-b") == 0
    caplog.clear()
    assert roll_out(1, "run-a", canary=", canary: {error_rate: 0.3}") == exit_code
    assert _green(tmp_path)[0] == green
    assert {v.version: v.stage for v in registry.list_versions("m")} == stages
    assert ("that outcome no longer serves" in caplog.text) == superseded
