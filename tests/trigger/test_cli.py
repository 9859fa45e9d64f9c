"""`aml-rollout trigger watch|serve` as real processes, with the real delivery path: the local
registry, the package component and the rollout engine (memory router persisted to a file,
simulated traffic on the wall clock, short analysis interval).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from aml_pipelines.errors import TriggerError
from aml_pipelines.registry.local import LocalRegistry
from aml_pipelines.trigger.store import Step, TriggerStore
from rollout.cli import app
from rollout.local.process import listening_socket
from tests.cli import stop_and_wait
from tests.trigger.fakes import register
from tests.trigger.test_eventgrid import eg_event
from tests.trigger.test_watcher_process import _until

ROOT = Path(__file__).resolve().parents[2]
SECRET = "cli-secret-0123456789"


def _spec(tmp: Path, canary_error_rate: float = 0.02, baseline_error_rate: float = 0.05) -> Path:
    # A high base error rate and request rate make "not worse" quick to show, and a healthy
    # canary better than the baseline keeps the chance of a (legitimate, alpha-bounded) false
    # rollback negligible, so the test cannot flake on it. Latency is off: simulated latency
    # adds nothing here.
    spec = {
        "name": "diabetes",
        "router": {"kind": "memory", "state_file": str(tmp / "routes.json")},
        "metrics": {
            "kind": "simulated",
            "seed": 3,
            "rps": 4000,
            "baseline": {"error_rate": baseline_error_rate},
            "canary": {"error_rate": canary_error_rate},
        },
        "steps": [10, 50, 100],
        "analysis": {
            "interval_s": 0.2,
            "min_step_duration_s": 0.4,
            "min_requests": 20,
            "latency": {"enabled": False},
        },
        "state": {"dir": str(tmp / "rollout")},
    }
    path = tmp / "rollout.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _cli(tmp: Path, *args: str) -> list[str]:
    common = ["--registry", f"local:{tmp / 'registry'}", "--spec", str(tmp / "rollout.yaml")]
    return [
        sys.executable,
        "-c",
        "from rollout.cli import main; main()",
        "trigger",
        *args,
        *common,
        "--state-dir",
        str(tmp / "trigger"),
    ]


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, **kw)


def _registry_list(tmp: Path) -> dict[str, str]:
    """`aml-rollout registry list` → {version: serving colour}."""
    result = CliRunner().invoke(
        app,
        [
            "registry",
            "list",
            "diabetes",
            "--registry",
            f"local:{tmp / 'registry'}",
            "--rollout-spec",
            str(tmp / "rollout.yaml"),
        ],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    # borderless: cells are separated by two or more spaces ("blue 25%" keeps its one space)
    rows = [re.split(r"\s{2,}", line) for line in result.output.splitlines()]
    return {cells[1]: cells[3] for cells in rows if cells[0] == "diabetes"}


def _ledger_starts(tmp: Path) -> int:
    path = tmp / "rollout" / "diabetes.ledger.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return sum(1 for line in lines if json.loads(line).get("event") == "start")


def _status(tmp: Path) -> dict[str, Any]:
    path = tmp / "rollout" / "diabetes.status.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data


@pytest.fixture
def registry(tmp_path: Path) -> LocalRegistry:
    registry = LocalRegistry(tmp_path / "registry")
    register(registry, tmp_path, stage="production")
    register(registry, tmp_path, stage="candidate")
    _spec(tmp_path)
    return registry


def test_watch_once_promotes_and_the_registry_follows(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    first = _run(_cli(tmp_path, "watch", "--model", "diabetes", "--once"))
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("diabetes v2: Succeeded ")
    assert [v.stage for v in registry.list_versions("diabetes")] == ["archived", "production"]
    assert _registry_list(tmp_path) == {"1": "-", "2": "green"}
    package = json.loads((tmp_path / "rollout/packages/diabetes/2/package.json").read_text())
    assert package["version"] == "2"
    again = _run(_cli(tmp_path, "watch", "--model", "diabetes", "--once"))
    assert again.returncode == 0, again.stderr
    assert again.stdout == "diabetes: no new version to deliver\n"
    shown = CliRunner().invoke(
        app, ["trigger", "status", "--state-dir", str(tmp_path / "trigger")], terminal_width=200
    )
    assert shown.exit_code == 0, shown.output
    (row,) = [line for line in shown.output.splitlines() if line.startswith("│ diabetes ")]
    assert [c.strip() for c in row.split("│")[1:6]] == ["diabetes", "2", "done", "Succeeded", "1"]
    assert _ledger_starts(tmp_path) == 1  # exactly one rollout for v2


def test_watch_once_stopped_by_sigterm_keeps_the_rollout_and_says_so(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    # A CI job cancelled: SIGTERM killed `watch --once` on the spot (rc -15, not a word), its
    # rollout's lease left to expire. It now stops as `rollout run` does: exit 130, the rollout
    # kept for the next pass to resume.
    spec = yaml.safe_load((tmp_path / "rollout.yaml").read_text())
    spec["analysis"]["min_step_duration_s"] = 60  # v2 stays at its first step meanwhile
    (tmp_path / "rollout.yaml").write_text(yaml.safe_dump(spec))
    watcher = subprocess.Popen(
        _cli(tmp_path, "watch", "--model", "diabetes", "--once"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while _status(tmp_path).get("phase") != "Progressing" and watcher.poll() is None:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    _, err = stop_and_wait(watcher)  # SIGTERM; killed if it outlives the wait: nothing leaks
    assert watcher.returncode == 130, err
    assert "interrupted: the delivery of diabetes v2 resumes on the next pass" in err, err
    assert _status(tmp_path)["phase"] == "Progressing"  # kept, not ended
    entry = TriggerStore(tmp_path / "trigger").load("diabetes").entries[2]
    assert entry.step is Step.STARTED


@pytest.mark.parametrize(
    ("entered", "started", "lock_held", "said"),
    [
        pytest.param(
            2, 2, False, "the delivery of diabetes v2 resumes on the next pass (its rollout is "
            "kept)", id="this-pass-was-delivering",
        ),
        # Was "the delivery of diabetes v3 resumes on the next pass": the rollout is another
        # process's (serve's), still running, which this pass only waited for.
        pytest.param(
            None, 3, True, "this pass waited for another process delivering on the endpoint "
            "(diabetes v3 is started; that process carries it on)", id="waited-for-another",
        ),
        pytest.param(
            None, 3, False, "nothing of this pass was being delivered; diabetes v3, started by "
            "an earlier run, resumes on the next pass", id="left-by-an-earlier-run",
        ),
        pytest.param(None, None, False, "nothing was being delivered", id="nothing"),
        # v2 entered and closed (Failed for good), the pass then waited for v3's turn.
        pytest.param(2, None, False, "nothing was being delivered", id="entered-then-closed"),
    ],
)  # fmt: skip
def test_an_interrupted_pass_says_what_it_leaves(
    tmp_path: Path,
    registry: LocalRegistry,
    entered: int | None,
    started: int | None,
    lock_held: bool,
    said: str,
) -> None:
    from aml_pipelines.trigger.cli import _interrupted
    from aml_pipelines.trigger.dispatch import Dispatcher
    from tests.trigger.fakes import ResumableDelivery

    store = TriggerStore(tmp_path / "trigger")
    dispatcher = Dispatcher(store, registry, ResumableDelivery(tmp_path / "engine", registry))
    if started is not None:
        store.accept("diabetes", started, "watch")
        store.update("diabetes", started, lambda e: dataclasses.replace(e, step=Step.STARTED))
    elif entered is not None:
        store.accept("diabetes", entered, "watch")
        store.update("diabetes", entered, lambda e: dataclasses.replace(e, step=Step.DONE))
    dispatcher.entered = None if entered is None else ("diabetes", entered)
    other = store.lock("deliver", "another trigger's delivery")  # another process's, as flock sees
    if lock_held:
        other.acquire(blocking=False)
    try:
        assert _interrupted(dispatcher, "diabetes") == said
    finally:
        other.release()


def test_watch_once_prints_what_it_delivered_before_an_error_stops_the_pass(
    tmp_path: Path, registry: LocalRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: the pass's outcome lines were printed only after it ended, so a router down for v3
    # (exit 2) left stdout empty although v2 had been promoted: a CI log lost what was delivered.
    from aml_pipelines.delivery import EngineDelivery
    from aml_pipelines.errors import TriggerError

    register(registry, tmp_path, stage="candidate")  # v3
    real = EngineDelivery.deliver

    def deliver(self: EngineDelivery, version: Any, **kw: Any) -> Any:
        if version.version == 3:
            raise TriggerError("router unreachable: connection refused")
        return real(self, version, **kw)

    monkeypatch.setattr(EngineDelivery, "deliver", deliver)
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(app, _cli(tmp_path, "watch", "--model", "diabetes", "--once")[3:])
    assert isinstance(done.exception, TriggerError)  # main() prints it as one line, exit 2
    assert done.stdout.startswith("diabetes v2: Succeeded ")
    entries = TriggerStore(tmp_path / "trigger").load("diabetes").entries
    assert (entries[2].outcome, entries[3].step) == ("Succeeded", Step.STARTED)


def test_watch_rolls_back_a_bad_candidate_with_the_ledger_reason(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    _spec(tmp_path, canary_error_rate=0.3)
    done = _run(_cli(tmp_path, "watch", "--model", "diabetes", "--once"))
    assert done.returncode == 3, done.stderr  # as `rollout run`'s: a CI step can tell
    assert done.stdout.startswith("diabetes v2: RolledBack ")
    v1, v2 = registry.list_versions("diabetes")
    assert (v1.stage, v2.stage) == ("production", "rolled-back")
    assert v2.tags["rollback_reason"] == _status(tmp_path)["reason"]
    assert "canary error rate" in v2.tags["rollback_reason"]


def test_watch_says_a_first_release_failed_its_check_and_tags_it(tmp_path: Path) -> None:
    """A model's first version over errors.max_rate: it serves all traffic (nothing to fall
    back to), so it is production — but the delivery is reported Failed, not Succeeded."""
    registry = LocalRegistry(tmp_path / "registry")
    register(registry, tmp_path, stage="candidate")
    _spec(tmp_path, baseline_error_rate=0.3)  # green's traffic: the first release's
    done = _run(_cli(tmp_path, "watch", "--model", "diabetes", "--once"))
    assert done.returncode == 5, done.stderr  # failed, as `rollout bootstrap --check` says
    assert done.stdout.startswith(
        "diabetes v1: Failed first release of diabetes: deployed to green with all traffic; "
        "its check on the absolute limits Failed: error rate "
    )
    assert "It still serves all traffic" in done.stdout
    assert "diabetes:1: first-release check, look 1: Failed: error rate" in done.stderr
    assert "WARNING" in done.stderr and "Traceback" not in done.stderr
    v1 = registry.get("diabetes", 1)
    assert (v1.stage, v1.tags["first_check"]) == ("production", "Failed")
    assert "is above the limit 10 %" in v1.tags["first_check_reason"]
    entry = TriggerStore(tmp_path / "trigger").load("diabetes").entries[1]
    assert (entry.step, entry.outcome) == (Step.DONE, "Failed")
    again = _run(_cli(tmp_path, "watch", "--model", "diabetes", "--once"))
    assert again.stdout == "diabetes: no new version to deliver\n"
    assert again.returncode == 0, again.stderr  # nothing new: the failure was told once


@pytest.mark.parametrize(
    ("phases", "code"),
    [
        pytest.param([], 0, id="nothing-new"),
        pytest.param(["Succeeded"], 0, id="promoted"),
        pytest.param(["superseded", "skipped", "Submitted", "Succeeded"], 0, id="none-failed"),
        pytest.param(["RolledBack"], 3, id="rolled-back"),
        pytest.param(["Inconclusive"], 4, id="first-release-undecided"),
        pytest.param(["Failed"], 5, id="failed"),
        pytest.param(["missing"], 5, id="missing-not-delivered"),
        pytest.param(["RolledBack", "Succeeded"], 3, id="a-rollback-then-a-promotion"),
        pytest.param(["Inconclusive", "RolledBack"], 4, id="undecided-over-rolled-back"),
        pytest.param(["RolledBack", "Failed", "Succeeded"], 5, id="failed-is-the-worst"),
    ],
)
def test_watch_once_exits_with_the_worst_outcome(phases: list[str], code: int) -> None:
    from aml_pipelines.trigger.cli import once_exit_code

    assert once_exit_code(phases) == code


@pytest.mark.parametrize(
    ("secret", "said"),
    [
        pytest.param("Abc-123_xyz.~0123456789", None, id="url-safe"),
        # openssl rand -base64 32: in ?key= the '+' arrives as a space, a 401 at the handshake
        pytest.param("k7+Qz/0aB9=cD4eF5gH6iJ", "'+', '/', '='", id="base64"),
        # a Kubernetes secret made with `echo` instead of `echo -n`
        pytest.param("s3cret-0123456789abcdef\n", "'\\n'", id="trailing-newline"),
    ],
)
def test_serve_warns_of_a_secret_a_url_would_change(secret: str, said: str | None) -> None:
    from aml_pipelines.trigger.cli import secret_warning

    warning = secret_warning(secret, "AML_ROLLOUT_TRIGGER_SECRET")
    if said is None:
        assert warning is None
    else:
        assert warning is not None
        assert warning.startswith(f"$AML_ROLLOUT_TRIGGER_SECRET holds {said}: characters")
        assert secret not in warning


PREVIOUS = "cli-previous-0123456789"


@pytest.mark.parametrize(
    ("env", "previous_env", "expected", "error"),
    [
        pytest.param({"NEW": SECRET}, None, (SECRET, ()), None, id="no-rotation"),
        pytest.param(
            {"NEW": SECRET, "OLD": PREVIOUS}, "OLD", (SECRET, (PREVIOUS,)), None, id="rotation"
        ),
        pytest.param(
            {"NEW": SECRET}, "OLD", None, "--previous-secret-env: set $OLD", id="previous-unset"
        ),
        pytest.param(
            {"NEW": SECRET, "OLD": "short"}, "OLD", None, "at least 16", id="previous-too-short"
        ),
        pytest.param({"OLD": PREVIOUS}, "OLD", None, "--secret-env: set $NEW", id="new-unset"),
    ],
)
def test_serve_reads_a_previous_secret_for_a_rotation(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    env: dict[str, str],
    previous_env: str | None,
    expected: tuple[str, tuple[str, ...]] | None,
    error: str | None,
) -> None:
    from aml_pipelines.errors import ConfigError
    from aml_pipelines.trigger.cli import read_secrets

    for name in ("NEW", "OLD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if error is None:
        with caplog.at_level(logging.INFO):
            assert read_secrets("NEW", previous_env) == expected
        said = "accepting the previous secret from $OLD too: a rotation is under way" in caplog.text
        assert said == bool(previous_env)
    else:
        with pytest.raises(ConfigError, match=re.escape(error)) as raised:
            read_secrets("NEW", previous_env)
        assert SECRET not in str(raised.value) and PREVIOUS not in str(raised.value)


def test_serve_warns_of_a_previous_secret_equal_to_the_new_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from aml_pipelines.trigger.cli import read_secrets

    monkeypatch.setenv("NEW", SECRET)
    monkeypatch.setenv("OLD", SECRET)  # the old value copied into both: nothing rotates
    read_secrets("NEW", "OLD")
    assert "$OLD holds the same secret as $NEW: no rotation is under way" in caplog.text
    assert SECRET not in caplog.text


def test_serve_refuses_a_previous_secret_env_that_is_unset(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    env = {**os.environ, "AML_ROLLOUT_TRIGGER_SECRET": SECRET}
    env.pop("AML_OLD_SECRET", None)
    result = _run(
        _cli(tmp_path, "serve", "--port", "0", "--previous-secret-env", "AML_OLD_SECRET"), env=env
    )
    assert result.returncode == 2, result.stderr
    assert "--previous-secret-env: set $AML_OLD_SECRET" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigkilled_watcher_resumes_the_rollout_from_the_state_store(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    cmd = _cli(tmp_path, "watch", "--model", "diabetes", "--interval", "0.2")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _until(
            lambda: (
                _status(tmp_path).get("phase") == "Progressing"
                and _status(tmp_path).get("step_index", 0) >= 1
            ),
            "the rollout to reach its second step",
            timeout=30,
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.communicate()
    assert registry.get("diabetes", 2).stage == "candidate"
    weight = _status(tmp_path)["blue_weight"]
    assert _registry_list(tmp_path) == {"1": f"green {100 - weight}%", "2": f"blue {weight}%"}

    resumed = _run(_cli(tmp_path, "watch", "--model", "diabetes", "--once"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the delivery of diabetes v2 (attempt 2)" in resumed.stderr
    assert _ledger_starts(tmp_path) == 1  # resumed, not started again
    assert registry.get("diabetes", 2).stage == "production"
    entry = TriggerStore(tmp_path / "trigger").load("diabetes").entries[2]
    assert (entry.step, entry.outcome, entry.attempts) == (Step.DONE, "Succeeded", 2)


def test_serve_delivers_a_registered_event(tmp_path: Path, registry: LocalRegistry) -> None:
    # Another model's open version in the shared state folder (the default one), accepted by
    # its own trigger for its own endpoint: `serve --model diabetes` rolled it out on this
    # spec's endpoint, in place of diabetes (its worker drained every cursor in the folder).
    register(registry, tmp_path, name="aaa-other", stage="candidate")
    TriggerStore(tmp_path / "trigger").accept("aaa-other", 1, "watch")
    env = {**os.environ, "AML_ROLLOUT_TRIGGER_SECRET": SECRET}
    cmd = _cli(tmp_path, "serve", "--port", "0", "--model", "diabetes")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line
        url = line.split()[2].split("?")[0]
        response = httpx.post(
            url,
            params={"key": SECRET},
            content=json.dumps([eg_event("ev-1", version="2")]),
            headers={"content-type": "application/json"},
            timeout=10,
        )
        assert response.status_code == 200
        assert response.json()["accepted"] == [{"model": "diabetes", "version": 2}]
        done: Callable[[], bool] = lambda: registry.get("diabetes", 2).stage == "production"  # noqa: E731
        _until(done, "the delivery of v2", timeout=30)
        other = TriggerStore(tmp_path / "trigger").load("aaa-other").entries[1]
        assert (other.step, registry.get("aaa-other", 1).stage) == (Step.PENDING, "candidate")
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down, then re-raises the signal: the conventional "terminated" status.
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("models", [[], ["--model", "diabetes"]])
def test_serve_without_a_model_warns_that_any_model_is_rolled_out_on_the_endpoint(
    tmp_path: Path, registry: LocalRegistry, models: list[str]
) -> None:
    # Without --model an event of another model of the workspace was rolled out on this spec's
    # endpoint, replacing its model, and nothing said so.
    env = {**os.environ, "AML_ROLLOUT_TRIGGER_SECRET": SECRET}
    cmd = _cli(tmp_path, "serve", "--port", "0", *models)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("listening on ")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    finally:
        proc.kill()
    warned = "no --model: a version of any model registered in " in stderr
    assert warned == (not models), stderr
    if warned:
        assert f"is rolled out on the endpoint of {tmp_path / 'rollout.yaml'}, in place" in stderr


def test_serve_refuses_to_start_without_a_secret(tmp_path: Path, registry: LocalRegistry) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AML_ROLLOUT_TRIGGER_SECRET"}
    result = _run(_cli(tmp_path, "serve", "--port", "0"), env=env)
    assert result.returncode == 2
    assert "set $AML_ROLLOUT_TRIGGER_SECRET to the shared secret" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        pytest.param(["--port", "{busy}"], "--host/--port: cannot listen on", id="port-in-use"),
        pytest.param(
            ["--port", "0", "--ssl-certfile", "{tmp}/no.pem", "--ssl-keyfile", "{tmp}/no.key"],
            "--ssl-certfile/--ssl-keyfile: cannot load",
            id="missing-certificate",
        ),
        pytest.param(
            ["--port", "0", "--ssl-certfile", "{tmp}/no.pem"],
            "cannot load {tmp}/no.pem (no --ssl-keyfile: the key must be in that file)",
            id="certificate-without-key",
        ),
        pytest.param(  # was a traceback (uvicorn asserts on it)
            ["--port", "0", "--ssl-keyfile", "{tmp}/key.pem"],
            "--ssl-keyfile {tmp}/key.pem: give the certificate too (--ssl-certfile cert.pem)",
            id="key-without-certificate",
        ),
    ],
)
def test_serve_that_cannot_listen_is_one_clear_line(
    tmp_path: Path, registry: LocalRegistry, args: list[str], said: str
) -> None:
    env = {**os.environ, "AML_ROLLOUT_TRIGGER_SECRET": SECRET}
    with listening_socket() as taken:
        busy = str(taken.getsockname()[1])
        filled = [a.format(busy=busy, tmp=tmp_path) for a in args]
        result = _run(_cli(tmp_path, "serve", *filled), env=env)
    assert result.returncode == 2, result.stderr
    assert said.format(tmp=tmp_path) in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""  # never "listening on"


def test_bad_tag_option_is_one_clear_line(tmp_path: Path, registry: LocalRegistry) -> None:
    result = _run(_cli(tmp_path, "watch", "--model", "diabetes", "--once", "--tag", "stage"))
    assert result.returncode == 2
    assert "--tag 'stage': expected KEY=VALUE" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_second_watch_command_exits_with_the_holders_pid(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    first = subprocess.Popen(
        _cli(tmp_path, "watch", "--model", "diabetes", "--interval", "0.2"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lock = tmp_path / "trigger" / "watch-diabetes.lock"
    try:
        # Up to 60 s, as `_run` gives a command: the first watcher's start (its imports, on a
        # box at load 8-12) took more than 15 s now and then. How long is not the point; one
        # that died is told at once, with what it said.
        def holds() -> bool:
            assert first.poll() is None, first.communicate()
            return lock.exists() and lock.read_text() == str(first.pid)

        _until(holds, "the first watcher to hold the lock", timeout=60)
        second = _run(_cli(tmp_path, "watch", "--model", "diabetes", "--once"))
        assert second.returncode == 2
        assert "a watcher of model 'diabetes' is already running" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0
    finally:
        first.kill()
        first.communicate()


@pytest.mark.parametrize("command", ["watch", "serve"])
def test_a_registry_folder_that_does_not_exist_is_one_clear_line(
    tmp_path: Path, command: str
) -> None:
    # It used to be an empty registry: `--once` said "no new version to deliver" and exited 0,
    # and without it the trigger polled a typo forever.
    _spec(tmp_path)
    args = ["--model", "diabetes", *(["--once"] if command == "watch" else ["--port", "0"])]
    env = {**os.environ, "AML_ROLLOUT_TRIGGER_SECRET": SECRET}
    result = _run(_cli(tmp_path, command, *args), env=env)
    assert result.returncode == 2, result.stdout
    assert f"{tmp_path / 'registry'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "trigger").exists()  # refused before anything was written


def test_watch_warns_when_the_registry_has_no_such_model(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    result = _run(_cli(tmp_path, "watch", "--model", "diabetis", "--once"))
    assert result.returncode == 0, result.stderr
    assert "has no model 'diabetis' (it holds: diabetes)" in result.stderr
    assert result.stdout == "diabetis: not in the registry\n"


def test_serve_warns_about_a_model_filter_that_names_no_model(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    env = {**os.environ, "AML_ROLLOUT_TRIGGER_SECRET": SECRET}
    cmd = _cli(tmp_path, "serve", "--port", "0", "--model", "diabetes", "--model", "diabetis")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("listening on ")  # a warning, still serving
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert "has no model 'diabetis' (it holds: diabetes)" in stderr
    assert "'diabetes' (" not in stderr  # the model it has is not warned about


@pytest.mark.parametrize(
    ("held", "args", "refusal", "expected"),
    [
        pytest.param(
            ["diabetes"], ["--model", "diabetis"],
            "no trigger state for model 'diabetis' in {dir} (it holds: diabetes)", "",
            id="model-typo-names-the-models-held",
        ),
        pytest.param(
            [], ["--model", "diabetes"], "no trigger state for model 'diabetes' in {dir} "
            "(it holds none)", "", id="model-in-an-empty-folder",
        ),
        pytest.param(["diabetes"], ["--model", "diabetes"], None, "│ diabetes ", id="model-held"),
        pytest.param([], [], None, "no trigger state in {dir}", id="empty-folder-every-model"),
    ],
)  # fmt: skip
def test_status_of_a_model_the_state_folder_lacks(
    tmp_path: Path, held: list[str], args: list[str], refusal: str | None, expected: str
) -> None:
    """`no trigger state in DIR` for a mistyped --model sent the user to another state folder;
    an unknown model is an error, as for `registry show`."""
    for model in held:
        TriggerStore(tmp_path / "trigger").accept(model, 2, "watch")
    state_dir = str(tmp_path / "trigger")
    shown = CliRunner().invoke(
        app, ["trigger", "status", *args, "--state-dir", state_dir], terminal_width=200
    )
    if refusal is None:
        assert shown.exit_code == 0, shown.output
        assert expected.format(dir=state_dir) in shown.output
    else:
        # main() makes it one red line and exit code 2 (as the unreadable-cursor test sees)
        assert isinstance(shown.exception, TriggerError), shown.output
        assert str(shown.exception) == refusal.format(dir=state_dir)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        # Such a cursor was skipped: `no trigger state`, and its versions never delivered.
        pytest.param("[1, 2]", "no model name in it", id="not-an-object"),
        pytest.param('{"versions": {}}', "no model name in it", id="no-model"),
        # Was a traceback: AttributeError: 'NoneType' object has no attribute 'items'.
        pytest.param(
            '{"model": "diabetes", "versions": null}', "no versions in it", id="versions-null"
        ),
    ],
)
def test_status_of_a_damaged_cursor_is_one_clear_line(
    tmp_path: Path, content: str, why: str
) -> None:
    cursor = tmp_path / "trigger" / "cursor-diabetes.json"
    cursor.parent.mkdir()
    cursor.write_text(content)
    cmd = [sys.executable, "-c", "from rollout.cli import main; main()", "trigger", "status"]
    shown = _run([*cmd, "--state-dir", str(cursor.parent)])
    assert shown.returncode == 2, shown.stderr
    assert f"trigger cursor {cursor} is unreadable: {why}" in shown.stderr
    assert "Traceback" not in shown.stderr


def test_status_shows_a_reason_as_written_brackets_included(tmp_path: Path) -> None:
    store = TriggerStore(tmp_path / "trigger")
    store.accept("diabetes", 2, "watch")
    reason = "registry 'local:/tmp/[red]reg' has no version 2"
    store.update("diabetes", 2, lambda entry: dataclasses.replace(entry, reason=reason))
    shown = CliRunner().invoke(
        app,
        ["trigger", "status", "--state-dir", str(tmp_path / "trigger")],
        env={"COLUMNS": "200"},  # rich's width: the reason on one line
    )
    assert shown.exit_code == 0, shown.output
    assert reason in shown.output


def test_a_state_dir_that_is_a_file_is_one_clear_line(
    tmp_path: Path, registry: LocalRegistry
) -> None:
    """A --state-dir naming a file (or unwritable) ended in a FileExistsError traceback."""
    (tmp_path / "trigger").write_text("")
    done = _run(_cli(tmp_path, "watch", "--model", "diabetes", "--once"))
    assert done.returncode == 2, done.stderr
    assert f"cannot create the lock {tmp_path / 'trigger'}" in done.stderr
    assert "check --state-dir" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "interval",
    [
        pytest.param("nan", id="nan-never-polled-again"),
        pytest.param("inf", id="inf-overflowed-after-the-first-poll"),
        pytest.param("1e12", id="beyond-what-a-wait-takes"),
    ],
)
def test_watch_refuses_an_interval_it_cannot_wait(
    tmp_path: Path, registry: LocalRegistry, interval: str
) -> None:
    from aml_pipelines.errors import ConfigError

    args = _cli(tmp_path, "watch", "--model", "diabetes", "--once", "--interval", interval)[3:]
    refused = CliRunner().invoke(app, args)
    assert isinstance(refused.exception, ConfigError)  # main() prints it as one line, exit 2
    assert str(refused.exception) == (
        f"--interval: {float(interval)} is not a number of seconds from 0.1 to 86400"
    )
    assert not (tmp_path / "trigger").exists()  # refused before anything started


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param("aml_pipelines.trigger.cli:_setup_logging", id="trigger-watch-serve"),
        pytest.param("components.common:setup_logging", id="pipeline-rollout-step"),
    ],
)
def test_a_notification_logs_no_webhook_token(caplog: pytest.LogCaptureFixture, setup: str) -> None:
    # Was: at INFO, httpx logged "HTTP Request: POST <the full URL>" for every notification, and
    # an incoming webhook's path is its secret (token): in the trigger's and the step's logs.
    import importlib
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from rollout.config import NotifyConfig
    from rollout.core.types import Release, Verdict
    from rollout.notify import WebhookNotifier

    posted: list[str] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            posted.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    module, _, name = setup.partition(":")
    setup_logging = getattr(importlib.import_module(module), name)
    names = ("azure", "azure.identity", "httpx", "httpcore")
    levels = {n: logging.getLogger(n).level for n in names}
    with ThreadingHTTPServer(("127.0.0.1", 0), Hook) as server:
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{server.server_port}/services/T0/B0/TOKENSECRET"
        try:
            with caplog.at_level(logging.INFO):
                setup_logging()
                WebhookNotifier(NotifyConfig.model_validate({"url": url})).first_release(
                    "diabetes", Release("diabetes", "1"), Verdict.SUCCESSFUL, "within the limits"
                )
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)
            server.shutdown()
            thread.join(5)
    assert posted == ["/services/T0/B0/TOKENSECRET"]  # the notification went out
    assert "TOKENSECRET" not in caplog.text
