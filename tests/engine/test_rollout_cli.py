"""`aml-rollout rollout ...` end to end through typer: messages, exit codes, steering, explain."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rollout.cli import app
from rollout.commands.rollout import (
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_PAUSED,
    EXIT_PROMOTED,
    EXIT_ROLLED_BACK,
    EXIT_RUNNING,
)
from rollout.core.status import Status
from tests.engine.specs import write_spec

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["rollout", *args])
    return result.exit_code, result.output


def test_validate_accepts_a_good_spec(tmp_path: Path) -> None:
    code, out = invoke("validate", str(write_spec(tmp_path)))
    assert code == 0
    assert "ok" in out and "plan [10, 50, 100]" in out


_ENVOY = {"kind": "envoy", "admin_url": "http://127.0.0.1:9", "routes_file": "routes.json"}


_ISTIO = {"kind": "istio", "namespace": "ml", "app": "diabetes"}


def _model_folder(folder: Path) -> Path:
    """A model folder as the scoring server finds one (its model.json; no model file: nothing
    here starts a server)."""
    folder.mkdir(exist_ok=True)
    (folder / "model.json").write_text(json.dumps({"name": "m"}))
    return folder


def _deployable_candidate(router: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """A candidate the router can deploy: an image for istio, a model folder for envoy."""
    if router["kind"] == "istio":
        return {"model": "m", "version": "2", "image": "registry/m:2"}
    return {"model": "m", "version": "2", "model_dir": str(_model_folder(tmp_path / "pkg2"))}


@pytest.mark.parametrize(
    ("router", "fields", "message"),
    [
        pytest.param(
            _ISTIO,
            {},
            "names no container image, and the istio router deploys images: give the spec's "
            "`{field}:` {{model: m, version: '{version}', image:",
            id="istio-without-image",
        ),
        pytest.param(
            _ENVOY,
            {},
            "names no model folder, and the envoy router serves a release from its package or "
            "model folder: name it in the spec's `{field}:` {{model: m,",
            id="envoy-without-model-folder",
        ),
        pytest.param(
            _ENVOY,
            {"model_dir": "no-such-pkg"},
            "has no model folder no-such-pkg (its `model_dir:`",
            id="envoy-model-folder-not-there",
        ),
    ],
)
@pytest.mark.parametrize("field", ["candidate", "stable"])
def test_validate_refuses_a_release_the_router_cannot_deploy(
    tmp_path: Path, field: str, router: dict[str, str], fields: dict[str, str], message: str
) -> None:
    """Was: validate said ok, then `run` refused the same candidate (check_deployable); and the
    stable release was not checked at all, though on an empty green the controller deploys
    `stable:` first (and `bootstrap` deploys it), which the router then refused."""
    version = "2" if field == "candidate" else "1"
    release = {"model": "m", "version": version, **fields}
    releases = (
        {"candidate": release}
        if field == "candidate"
        else {"candidate": _deployable_candidate(router, tmp_path), "stable": release}
    )
    spec = write_spec(tmp_path, router=router, metrics={"kind": "static"}, **releases)
    code, out = invoke("validate", str(spec))
    said = " ".join(out.split())
    assert code == EXIT_ERROR, said
    assert f"{field}: m:{version} " + message.format(field=field, version=version) in said, said
    if field == "stable":
        assert "candidate: m:2" not in said, said  # the candidate is deployable: not blamed


def test_validate_says_it_checked_the_candidate_deploys(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "pkg")
    candidate = {"model": "m", "version": "2", "model_dir": str(folder)}
    spec = write_spec(
        tmp_path, router=_ENVOY, candidate=candidate, stable=None, metrics={"kind": "static"}
    )
    code, out = invoke("validate", str(spec))
    assert code == 0, out
    assert f"candidate m:2 deployable by the envoy router (model folder {folder})" in " ".join(
        out.split()
    ), out


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        pytest.param({"analysis": {"alpha": 0.7}}, "analysis.alpha", id="alpha-out-of-range"),
        pytest.param(  # was "String should match pattern '^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$'"
            {"name": "Diabetes"},
            "name: use lower-case letters, digits, '-', '_' and '.', beginning and ending with a "
            "letter or digit; got 'Diabetes'",
            id="name-upper-case",
        ),
        pytest.param({"steps": [50, 10, 100]}, "weights must increase", id="steps-not-increasing"),
        pytest.param({"steps": [10, 50]}, "last weight must be 100", id="plan-without-promotion"),
        pytest.param(
            {"steps": [0, 100]}, "must send the candidate traffic", id="unjudged-promotion"
        ),
        pytest.param({"steps": [100]}, "must send the candidate traffic", id="big-bang"),
        # Was two lines of pydantic's union: "steps.list[int]: ...; steps.literal['seed']: ...".
        pytest.param(
            {"steps": "sed"},
            "steps: expected a list of whole-number weights ending at 100 (e.g. [0, 5, 25, 50, "
            "100]), or seed; got 'sed'",
            id="plan-misspelt",
        ),
        pytest.param({"steps": "5, 25, 100"}, "or seed; got '5, 25, 100'", id="plan-unbracketed"),
        pytest.param(  # was "Input should be a valid string"
            {"candidate": {"model": "m", "version": 2}},
            "candidate.version: read as the number 2: quote the version",
            id="version-a-number",
        ),
        pytest.param({"steps": [5, "x", 100]}, "or seed; got [5, 'x', 100]", id="plan-not-numbers"),
        pytest.param({"router": {"kind": "nginx"}}, "router", id="unknown-router-kind"),
        pytest.param(
            {"metrics": {"kind": "prometheus", "preset": "custom"}},
            "queries",
            id="custom-preset-without-queries",
        ),
        pytest.param({"analysis": {"intervall_s": 5}}, "analysis.intervall_s", id="typo-field"),
        pytest.param({"header": "x api"}, "header: not a valid", id="bad-header"),
        pytest.param(  # was accepted: the router would render a match no request carries
            {"router": {"kind": "istio", "header": "x(colour)"}},
            "router.header: ",
            id="bad-router-header",
        ),
        # The path the user wrote, not pydantic's: was `router.istio.namspace`,
        # `metrics.prometheus.preset`, `state.kubernetes.namespace` (the union's tag).
        pytest.param(
            {"router": {"kind": "istio", "namspace": "ml", "app": "d"}},
            "router.namspace: unknown field: did you mean namespace?",
            id="router-path-without-tag",
        ),
        pytest.param(
            {"metrics": {"kind": "prometheus", "url": "http://p", "preset": "envoi"}},
            "metrics.preset: ",
            id="metrics-path-without-tag",
        ),
        pytest.param(
            {"state": {"kind": "kubernetes"}},
            "state.namespace: Field required",
            id="state-path-without-tag",
        ),
        pytest.param(
            {"metrics": {"kind": "static", "ticks": [{"blue": {"requests": "x"}}]}},
            "metrics.ticks.0.blue.requests: ",
            id="nested-path-without-tag",
        ),
    ],
)
def test_validate_names_the_bad_field(
    tmp_path: Path, patch: dict[str, object], message: str
) -> None:
    path = write_spec(tmp_path, **patch)  # type: ignore[arg-type]
    code, out = invoke("validate", str(path))
    assert code == EXIT_ERROR
    assert message in out
    assert "Traceback" not in out


def test_validate_explains_a_key_yaml_read_as_a_boolean(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text('name: x\nnotify: {url: "http://x", on: [Paused]}\n')  # `on:` is true
    code, out = invoke("validate", str(path))
    assert code == EXIT_ERROR
    assert "notify: a key YAML reads as a boolean (an unquoted on, off, yes or no)" in " ".join(
        out.split()
    )


def test_validate_reports_the_other_problems_with_a_boolean_key(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text('name: x\nsteps: [3, 1]\nnotify: {url: "http://x", on: [Paused]}\n')
    code, out = invoke("validate", str(path))
    text = " ".join(out.split())
    assert code == EXIT_ERROR and "reads as a boolean" in text and "steps" in text
    assert "Keys should be strings" not in text


def test_a_spec_from_before_lease_ttl_s_was_dropped_still_loads(tmp_path: Path) -> None:
    code, out = invoke("validate", str(write_spec(tmp_path, state={"lease_ttl_s": 30})))
    assert code == 0, out


def test_validate_reports_a_missing_file(tmp_path: Path) -> None:
    code, out = invoke("validate", str(tmp_path / "nope.yaml"))
    assert code == EXIT_ERROR and "cannot read spec" in out


def test_validate_reports_a_spec_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\n", encoding="utf-16")  # what Windows PowerShell 5 `>` writes
    code, out = invoke("validate", str(path))
    assert code == EXIT_ERROR and "not UTF-8 text" in out, out


def test_run_promotes_with_exit_0_then_explain_tells_the_story(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    code, out = invoke("run", str(spec), "--simulated-time", "-q")
    assert code == EXIT_PROMOTED, out
    assert "Succeeded" in out
    code, out = invoke("explain", str(tmp_path / "state" / "cli.ledger.jsonl"))
    assert code == 0
    assert "Promoting: Blue_100: canary not worse" in out
    assert "Green_100: promoted m:2" in out
    code, out = invoke("status", str(spec))
    assert code == EXIT_PROMOTED and "Succeeded" in out
    # Was "stable m:1 (green)": after the promotion green serves m:2.
    assert "m:2 (green: promoted)" in out and "m:1 (replaced)" in out
    code, out = invoke("status", str(spec), "--watch", "--timeout", "5")
    assert code == EXIT_PROMOTED and "Green_100" in out
    code, out = invoke("status", str(spec), "--json")
    assert json.loads(out)["phase"] == "Succeeded"
    code, out = invoke("run", str(spec), "--simulated-time", "-q")
    assert code == EXIT_PROMOTED and "already ended (Succeeded)" in out


@pytest.mark.parametrize("field", ["state_file", "journal"])
def test_a_memory_router_file_in_a_missing_folder_is_one_line_not_a_traceback(
    tmp_path: Path, field: str
) -> None:
    missing = tmp_path / "no-such-dir" / "routes.json"
    spec = write_spec(tmp_path, router={"kind": "memory", field: str(missing)})
    code, out = invoke("run", str(spec), "--simulated-time", "-q")
    assert code == EXIT_ERROR, out
    assert f"memory router: cannot write {missing}: No such file or directory" in out
    assert "Traceback" not in out


def test_run_rolls_back_with_exit_3(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, canary_error=0.08)
    code, out = invoke("run", str(spec), "--simulated-time")
    assert code == EXIT_ROLLED_BACK, out
    code, out = invoke("explain", str(tmp_path / "state" / "cli.ledger.jsonl"))
    assert "rolled back at step 10 %: canary error rate" in out


def test_run_prints_the_explain_hint_on_one_line_however_long(tmp_path: Path) -> None:
    # Was wrapped at the console's width: pasted, it ran `explain` without its ledger. And in a
    # folder with a space, the pasted hint gave `explain` two arguments.
    folder = tmp_path / ("a-long-folder-name-" * 10) / "my rollouts"
    folder.mkdir(parents=True)
    code, out = invoke("run", str(write_spec(folder, canary_error=0.08)), "--simulated-time")
    assert code == EXIT_ROLLED_BACK, out
    ledger = folder / "state" / "cli.ledger.jsonl"
    hint = f"ledger: {ledger}  (aml-rollout rollout explain {shlex.quote(str(ledger))})"
    assert hint in out.splitlines()


def test_run_held_for_a_human_exits_4(tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path,
        metrics={"kind": "static", "ticks": [{"error": "connection refused"}]},
    )
    code, out = invoke("run", str(spec), "--simulated-time")
    assert code == EXIT_PAUSED, out
    assert "held for a human" in out


def test_a_candidate_that_cannot_be_deployed_exits_5_and_stays_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rollout.core.types import Colour, Release
    from rollout.errors import DeployFailed
    from rollout.routers.memory import MemoryRouter

    deploy = MemoryRouter.deploy
    tries: list[str] = []

    def never_ready_blue(self: MemoryRouter, colour: Colour, release: Release) -> None:
        deploy(self, colour, release)
        if colour is Colour.BLUE:
            tries.append(release.ref)
            raise DeployFailed("Deployment ml/cli-blue: ImagePullBackOff")

    monkeypatch.setattr(MemoryRouter, "deploy", never_ready_blue)
    spec = str(write_spec(tmp_path))
    code, out = invoke("run", spec, "--simulated-time")
    assert code == EXIT_FAILED, out
    assert "Failed: m:2 could not be deployed to blue: Deployment ml/cli-blue" in out
    assert invoke("status", spec)[0] == EXIT_FAILED
    code, out = invoke("run", spec, "--simulated-time")  # a Job retrying: no deploy again
    assert code == EXIT_FAILED and "already ended (Failed)" in out
    assert tries == ["m:2"]
    code, out = invoke("explain", spec)
    assert "could not be deployed to blue" in out


@pytest.mark.parametrize(
    ("command", "metrics"),
    [
        pytest.param(
            ["run"], {"kind": "prometheus", "url": "http://127.0.0.1:9"}, id="run-prometheus"
        ),
        pytest.param(
            ["bootstrap", "--check"],
            {"kind": "prometheus", "url": "http://127.0.0.1:9"},
            id="bootstrap-check-prometheus",
        ),
        pytest.param(
            ["run"],
            {
                "kind": "azuremonitor",
                "workspace_id": "00000000-0000-0000-0000-000000000000",
                "endpoint": "https://ml.eastus.inference.ml.azure.com",
            },
            id="run-azuremonitor",
        ),
    ],
)
def test_simulated_time_is_refused_on_live_metrics(
    tmp_path: Path, command: list[str], metrics: dict[str, str]
) -> None:
    # Was accepted: a live rollout ran on a fake clock, a ledger line per tick with no wait,
    # max_step_duration_s elapsing in minutes, and resumed without it the ledger went back.
    spec = write_spec(tmp_path, metrics=metrics)
    code, out = invoke(command[0], str(spec), *command[1:], "--simulated-time")
    assert code == EXIT_ERROR, out
    assert " ".join(out.split()) == (
        f"error: --simulated-time: for dry runs on simulated or static metrics; these are "
        f"{metrics['kind']} (metrics.kind): a live rollout waits in wall time"
    )
    assert not list((tmp_path / "state").glob("*.json*"))


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["run", "--simulated-time"], id="run"),
        pytest.param(["bootstrap", "--release", "m:2"], id="bootstrap"),
    ],
)
def test_a_model_folder_that_is_not_there_is_refused_before_anything_is_stored(
    tmp_path: Path, command: list[str]
) -> None:
    # Was: the rollout began, Failed at blue's deploy ("cannot deploy to blue: ./pkg is not a
    # folder"), exit 5, and stayed Failed: the spec fixed, `run` said "already ended (Failed)".
    router = {"kind": "envoy", "admin_url": "http://127.0.0.1:9", "routes_file": "routes.json"}
    candidate = {"model": "m", "version": "2", "model_dir": str(tmp_path / "pkg")}
    spec = write_spec(tmp_path, router=router, candidate=candidate, metrics={"kind": "static"})
    code, out = invoke(command[0], str(spec), *command[1:])
    said = " ".join(out.split())
    assert code == EXIT_ERROR, out
    assert f"m:2 has no model folder {tmp_path / 'pkg'} (its `model_dir:`" in said, out
    assert not (tmp_path / "state" / "cli.status.json").exists()


@pytest.mark.parametrize(
    ("candidate", "message"),
    [
        pytest.param(
            {"model": "m", "version": "2"},
            "candidate: m:2 names no model folder, and the envoy router serves a release from "
            "its package or model folder: name it in the spec's `candidate:` "
            "{model: m, version: '2', model_dir: <package folder>}",
            # Was: begun, Failed at blue's deploy ("the release has no model_dir"), exit 5, and
            # then "already ended": what `--candidate M:V` always gave on the local stack.
            id="no-model-folder",
        ),
        pytest.param(
            {"model": "m", "version": "2", "sha256": "b" * 64, "model_dir": "pkg"},
            "candidate: m:2 is sha256 bbbbbbbbbbbb…, but its model folder holds aaaaaaaaaaaa… "
            "(MODEL_JSON): another model's folder",
            # Was: deployed and recorded as m:2 (sha bbbb…) while blue served the other model.
            id="another-model-in-the-folder",
        ),
    ],
)
def test_an_envoy_candidate_it_cannot_serve_as_named_is_refused_before_anything_is_stored(
    tmp_path: Path, candidate: dict[str, str], message: str
) -> None:
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({"name": "m", "sha256": "a" * 64}))
    if "model_dir" in candidate:
        candidate = {**candidate, "model_dir": str(folder)}
    router = {"kind": "envoy", "admin_url": "http://127.0.0.1:9", "routes_file": "routes.json"}
    spec = write_spec(tmp_path, router=router, candidate=candidate, metrics={"kind": "static"})
    code, out = invoke("run", str(spec), "--simulated-time")
    assert code == EXIT_ERROR, out
    message = message.replace("MODEL_JSON", str(folder / "model.json"))
    assert message in " ".join(out.split()), out
    assert not (tmp_path / "state" / "cli.status.json").exists()


def test_the_api_refuses_an_envoy_candidate_it_cannot_serve_before_storing_anything(
    tmp_path: Path,
) -> None:
    # Was: `run_rollout` skipped the CLI's check: on a running Envoy the rollout began and
    # Failed at blue's deploy, needing --restart, where the CLI refused with exit 2.
    from rollout.api import open_store, run_rollout
    from rollout.controller import FakeClock
    from rollout.core.types import Release
    from rollout.errors import ConfigError

    router = {"kind": "envoy", "admin_url": "http://127.0.0.1:9", "routes_file": "routes.json"}
    spec = write_spec(tmp_path, router=router, metrics={"kind": "static"})
    with pytest.raises(ConfigError, match="candidate: m:7 names no model folder"):
        run_rollout(spec, candidate=Release("m", "7"), clock=FakeClock(0.0))
    assert open_store(spec).load() is None
    assert not (tmp_path / "state" / "cli.ledger.jsonl").exists()


def test_run_without_a_usable_lock_file_is_a_clear_error(tmp_path: Path) -> None:
    # As a state dir another user created would be (a directory: root ignores permissions).
    (tmp_path / "state" / "cli.lock").mkdir(parents=True)
    code, out = invoke("run", str(write_spec(tmp_path)), "--simulated-time", "-q")
    assert code == EXIT_ERROR, out
    assert "cannot take the lease" in out and "cli.lock" in out


def test_steering_an_unstarted_rollout_is_a_clear_error(tmp_path: Path) -> None:
    code, out = invoke("pause", str(write_spec(tmp_path)))
    assert code == EXIT_ERROR and "has not started" in out


@pytest.mark.parametrize("command", ["status", "pause"])
def test_a_rollout_not_found_says_where_it_was_looked_for(tmp_path: Path, command: str) -> None:
    # The usual mistakes: `.rollout` under another working directory, a --state-dir of another
    # spec. Both read as "not started" when the rollout runs, unless the place is named.
    spec = write_spec(tmp_path)
    assert invoke("run", str(spec), "--simulated-time", "-q")[0] == EXIT_PROMOTED
    elsewhere = tmp_path / "elsewhere"
    code, out = invoke(command, str(spec), "--state-dir", str(elsewhere))
    assert code == (EXIT_RUNNING if command == "status" else EXIT_ERROR), out
    said = "".join(out.split())  # a long path is folded over lines, never cut
    assert f"no{elsewhere / 'cli.status.json'},nodirectory{elsewhere}:" in said
    (tmp_path / "other").mkdir()
    other = write_spec(tmp_path / "other", name="other")
    code, out = invoke(command, str(other), "--state-dir", str(tmp_path / "state"))
    said = "".join(out.split())
    assert f"no{tmp_path / 'state' / 'other.status.json'};thatdirectoryholdsrolloutcli:" in said


@pytest.mark.parametrize(("command", "code"), [("status", EXIT_RUNNING), ("abort", EXIT_ERROR)])
def test_a_memory_state_store_says_its_status_is_out_of_reach(
    tmp_path: Path, command: str, code: int
) -> None:
    # Was "no status found" (and "has not started") for a rollout its `run` was driving.
    spec = write_spec(tmp_path, state={"kind": "memory"})
    got, out = invoke(command, str(spec))
    said = " ".join(out.split())
    assert got == code and "keeps the status inside the running controller's process" in said
    assert ("is out of reach" in said) == (command == "abort") and "has not started" not in said


def _ticked_once(tmp_path: Path) -> Path:
    """The spec of a rollout run for one tick only: it is left running, Progressing (the
    routes outlive the run, in their file)."""
    spec = write_spec(
        tmp_path,
        metrics={"kind": "static", "ticks": []},
        router={"kind": "memory", "state_file": str(tmp_path / "routes.json")},
    )
    from rollout.api import run_rollout
    from rollout.controller import FakeClock

    run_rollout(spec, clock=FakeClock(0.0), max_ticks=1)
    return spec


def test_steering_commands_are_queued_for_the_controller(tmp_path: Path) -> None:
    spec = _ticked_once(tmp_path)
    from rollout.api import run_rollout
    from rollout.controller import FakeClock

    code, out = invoke("status", str(spec))
    assert code == EXIT_RUNNING and "Progressing" in out
    assert invoke("pause", str(spec))[0] == 0
    # Said as typed (was "queued set_weight for rollout cli"), with the weight asked for.
    code, out = invoke("set-weight", str(spec), "50")
    assert code == 0 and out.startswith("queued set-weight 50 for rollout cli"), out
    code, out = invoke("set-weight", str(spec), "30")
    assert code == EXIT_ERROR and "not in the plan" in out
    lines = (tmp_path / "state" / "cli.commands.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["pause", "set_weight"]
    code, out = invoke("status", str(spec))
    assert "queued" in out and "pause, set-weight 50" in out
    result = run_rollout(spec, clock=FakeClock(100.0), max_ticks=1)
    assert result.phase.value == "Paused" and result.status.blue_weight == 50
    code, out = invoke("status", str(spec))  # an operator's pause: the controller still guards
    assert code == EXIT_RUNNING and "Paused" in out and "queued" not in out


@pytest.mark.parametrize(
    ("phase", "command", "said"),
    [
        pytest.param(
            "Promoting",
            ["set-weight", "50"],
            "is Promoting: the promotion of diabetes:2 is under way (blue at 100 %, green next), "
            "and ends on its own unless aborted; set-weight cannot act on it (nothing queued)",
            id="set-weight-while-promoting",
        ),
        pytest.param(
            "Finalising",
            ["promote"],
            "is Finalising: the promotion of diabetes:2 is under way (green gets it, blue goes)",
            id="promote-while-finalising",
        ),
        pytest.param(
            "RollingBack",
            ["set-weight", "50"],
            "is RollingBack: the rollback is under way (blue back to 0 %), and ends on its own; "
            "set-weight cannot act on it",
            id="set-weight-while-rolling-back",
        ),
        pytest.param("RollingBack", ["pause"], "is RollingBack", id="pause"),
        pytest.param(
            "Finalising",
            ["abort"],
            "is Finalising: the promotion of diabetes:2 is under way (green gets it, blue goes), "
            "and ends on its own; abort cannot act on it",
            id="abort-once-green-got-the-candidate",
        ),
    ],
)
def test_a_command_is_refused_while_the_rollout_promotes_or_rolls_back(
    tmp_path: Path, phase: str, command: list[str], said: str
) -> None:
    # Was "queued abort ...; the controller acts at its next tick" during a promotion; the
    # machine never read it, and `status` showed it queued for ever.
    spec = write_spec(tmp_path)
    from rollout.api import open_store
    from rollout.core.types import Phase
    from tests.core.helpers import V2

    store = open_store(spec)
    store.save(Status(name="cli", phase=Phase(phase), candidate=V2))
    code, out = invoke(command[0], str(spec), *command[1:])
    out = " ".join(out.split())
    assert code == EXIT_ERROR and f"rollout 'cli' {said}" in out, out
    assert "no controller is running: `aml-rollout rollout run" in out
    assert store.commands() == []


@pytest.mark.parametrize(
    ("phase", "pending"),
    [
        pytest.param("Promoting", (), id="promoting"),
        # Was refused for good: a deploy to green failing so (no quota) stopped every `run`.
        pytest.param("Finalising", ("green",), id="finalising-its-deploy-to-green-unapplied"),
    ],
)
def test_abort_is_queued_while_the_rollout_promotes(
    tmp_path: Path, phase: str, pending: tuple[str, ...]
) -> None:
    """Was refused ("the promotion ... is under way"): a promotion whose weights the router
    refuses for good stopped every `run` in Promoting, with no way out. Green still serves the
    stable release there, and the machine rolls back on the abort."""
    spec = write_spec(tmp_path)
    from rollout.api import open_store
    from rollout.core.status import Deploy
    from rollout.core.types import Colour, Phase
    from tests.core.helpers import V2

    store = open_store(spec)
    deploys = tuple(Deploy(Colour(colour), V2) for colour in pending)
    store.save(Status(name="cli", id="r1", phase=Phase(phase), candidate=V2, pending=deploys))
    code, out = invoke("abort", str(spec))
    assert code == 0 and out.startswith("queued abort for rollout cli"), out
    assert [c.kind for c in store.commands()] == ["abort"]


def test_resume_of_a_rollout_that_is_not_paused_says_so_and_queues_nothing(
    tmp_path: Path,
) -> None:
    # Was: "queued resume ...; the controller acts at its next tick", then ignored by it.
    spec = _ticked_once(tmp_path)
    code, out = invoke("resume", str(spec))
    assert code == 0 and " ".join(out.split()) == (
        "rollout cli is Progressing, not paused: nothing to resume"
    )
    commands = tmp_path / "state" / "cli.commands.jsonl"
    assert not commands.exists() or not commands.read_text().strip()
    # A pause queued and not read yet: the resume answers it.
    assert invoke("pause", str(spec))[0] == 0
    code, out = invoke("resume", str(spec))
    assert code == 0 and out.startswith("queued resume"), out
    kinds = [json.loads(line)["kind"] for line in commands.read_text().splitlines()]
    assert kinds == ["pause", "resume"]


def test_a_held_rollout_resumes_when_run_again_after_resume(tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path,
        metrics={"kind": "static", "ticks": [{"error": "connection refused"}]},
    )
    assert invoke("run", str(spec), "--simulated-time")[0] == EXIT_PAUSED
    code, out = invoke("status", str(spec), "--watch", "--timeout", "60")
    assert code == EXIT_PAUSED and "held for a human" in out  # returned at once, not after 60 s
    assert invoke("resume", str(spec))[0] == 0
    code, out = invoke("resume", str(spec))  # was: "is Paused, not paused: nothing to resume"
    assert code == 0 and " ".join(out.split()) == (
        "rollout cli is Paused, and a resume of it is already queued: nothing more to resume"
    )
    code, out = invoke("run", str(spec), "--simulated-time")
    assert "resumed by" in out, out  # handled, then held again: metrics are still down
    assert code == EXIT_PAUSED


def test_a_simulated_rollout_resumed_in_simulated_time_does_not_go_back_in_time(
    tmp_path: Path,
) -> None:
    spec = write_spec(
        tmp_path,
        metrics={"kind": "static", "ticks": [{"error": "connection refused"}]},
    )
    assert invoke("run", str(spec), "--simulated-time")[0] == EXIT_PAUSED  # 3 h of fake time
    assert invoke("resume", str(spec))[0] == 0
    assert invoke("run", str(spec), "--simulated-time")[0] == EXIT_PAUSED
    ledger = (tmp_path / "state" / "cli.ledger.jsonl").read_text().splitlines()
    times = [json.loads(line)["at"] for line in ledger]
    assert times == sorted(times)


def test_run_refuses_to_report_another_candidates_outcome(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    assert invoke("run", str(spec), "--simulated-time", "-q")[0] == EXIT_PROMOTED
    code, out = invoke("run", str(spec), "--simulated-time", "--candidate", "m:3")
    assert code == EXIT_ERROR
    assert "of m:2 has ended (Succeeded), and m:3 was asked for" in " ".join(out.split())
    assert "already ended" not in out  # one message, the one that says what to do
    code, out = invoke("run", str(spec), "--simulated-time", "-q", "--candidate", "m:2")
    assert code == EXIT_PROMOTED and "already ended (Succeeded)" in out
    code, out = invoke(
        "run", str(spec), "--simulated-time", "-q", "--candidate", "m:3", "--restart"
    )
    assert code == EXIT_PROMOTED, out


def test_a_spec_edited_to_name_the_next_candidate_gets_one_message(tmp_path: Path) -> None:
    # The operator's way: after a promotion, the spec's `candidate:` is edited to the next
    # release. `run` printed "already ended (Succeeded); `--restart` starts a new one" and then
    # the error below, as if the old rollout's outcome were this one's.
    spec = write_spec(tmp_path)
    assert invoke("run", str(spec), "--simulated-time", "-q")[0] == EXIT_PROMOTED
    edited = yaml.safe_load(spec.read_text())
    edited["candidate"]["version"] = "3"
    spec.write_text(yaml.safe_dump(edited))
    code, out = invoke("run", str(spec), "--simulated-time")
    assert code == EXIT_ERROR
    assert "of m:2 has ended (Succeeded), and m:3 was asked for" in " ".join(out.split())
    assert "already ended" not in out


def test_a_spec_of_the_same_name_on_another_data_plane_cannot_resume_or_steer_it(
    tmp_path: Path,
) -> None:
    # dev.yaml copied to prod.yaml with another data plane but the same `name:`, run from the
    # same folder: prod's `run` would have resumed dev's rollout on prod (blue jumping to dev's
    # step unjudged), its `pause`/`status` paused and shown dev's.
    dev = write_spec(tmp_path, metrics={"kind": "static", "ticks": [{"error": "refused"}]})
    assert invoke("run", str(dev), "--simulated-time", "-q")[0] == EXIT_PAUSED
    prod = tmp_path / "prod.yaml"
    data = yaml.safe_load(dev.read_text())
    data["router"] = {"kind": "memory", "state_file": str(tmp_path / "prod-routes.json")}
    prod.write_text(yaml.safe_dump(data))
    for command in (["run", str(prod), "--simulated-time", "-q"], ["pause", str(prod)]):
        code, out = invoke(*command)
        said = " ".join(out.split())
        assert code == EXIT_ERROR, out
        assert "the stored rollout 'cli' drives memory, and this spec's router is memory " in said
        assert "Give this spec its own `name:` (or --state-dir)" in said
    assert invoke("status", str(prod))[0] == EXIT_ERROR
    assert invoke("status", str(dev))[0] == EXIT_PAUSED  # its own spec still drives it
    # A status written before rollouts remembered their router is not refused.
    status_file = tmp_path / "state" / "cli.status.json"
    stored = json.loads(status_file.read_text())
    del stored["router"]
    status_file.write_text(json.dumps(stored))
    assert invoke("status", str(prod))[0] == EXIT_PAUSED


def test_a_spec_of_the_same_name_after_the_other_ended_gets_one_message(tmp_path: Path) -> None:
    # `run` printed "rollout cli already ended (Succeeded); `--restart` starts a new one" (the
    # other data plane's rollout, as if this spec's), then the error saying it is not its own.
    dev = write_spec(tmp_path)
    assert invoke("run", str(dev), "--simulated-time", "-q")[0] == EXIT_PROMOTED
    prod = tmp_path / "prod.yaml"
    data = yaml.safe_load(dev.read_text())
    data["router"] = {"kind": "memory", "state_file": str(tmp_path / "prod-routes.json")}
    prod.write_text(yaml.safe_dump(data))
    code, out = invoke("run", str(prod), "--simulated-time", "-q")
    assert code == EXIT_ERROR, out
    assert "another spec of the same name shares its state" in " ".join(out.split())
    assert "already ended" not in out


def test_aborting_a_rollout_to_roll_out_another_candidate_says_how_at_each_step(
    tmp_path: Path,
) -> None:
    # Held at m:2, the spec edited to name m:3: `abort` and `run` must say `--candidate m:2`
    # applies the abort; they said `run SPEC` (refused: m:3 asked) and "end it first (abort)",
    # which the operator had just done.
    spec = write_spec(tmp_path, metrics={"kind": "static", "ticks": [{"error": "refused"}]})
    assert invoke("run", str(spec), "--simulated-time", "-q")[0] == EXIT_PAUSED
    data = yaml.safe_load(spec.read_text())
    data["candidate"] = {"model": "m", "version": "3"}
    spec.write_text(yaml.safe_dump(data))
    code, out = invoke("abort", str(spec))
    assert code == 0 and f"`aml-rollout rollout run {spec} --candidate m:2` acts on it" in out
    code, out = invoke("run", str(spec), "--simulated-time", "-q")
    said = " ".join(out.split())
    assert (
        code == EXIT_ERROR and "an abort of it is queued: apply it with `--candidate m:2`" in said
    )
    code, out = invoke("run", str(spec), "--simulated-time", "-q", "--candidate", "m:2")
    assert code == EXIT_ROLLED_BACK, out
    code, out = invoke("run", str(spec), "--simulated-time", "-q", "--restart")
    assert code == EXIT_PAUSED, out
    assert json.loads(invoke("status", str(spec), "--json")[1])["candidate"]["version"] == "3"


def test_error_text_is_printed_as_is_not_as_markup(tmp_path: Path) -> None:
    path = write_spec(tmp_path, name="[bold]x")
    code, out = invoke("validate", str(path))
    assert code == EXIT_ERROR and "got '[bold]x'" in out


@pytest.mark.parametrize(
    "model",
    [
        pytest.param("fraud[/]eu", id="closing-tag"),  # was a MarkupError traceback, exit 1
        pytest.param("fraud[eu]", id="tag"),  # was shown as "fraud:2"
        pytest.param("fraud:rocket:", id="emoji-code"),  # was shown with an emoji
    ],
)
def test_names_are_printed_as_they_are_not_as_markup_or_emoji(tmp_path: Path, model: str) -> None:
    spec = write_spec(
        tmp_path,
        candidate={"model": model, "version": "2"},
        stable={"model": model, "version": "1"},
    )
    assert invoke("run", str(spec), "--simulated-time", "-q")[0] == EXIT_PROMOTED
    for command in ("status", "explain"):
        code, out = invoke(command, str(spec))
        assert code == EXIT_PROMOTED, out
        assert f"{model}:2" in out, out
    named = tmp_path / f"{model.replace('/', '')}.yaml"
    spec.rename(named)
    code, out = invoke("validate", str(named))
    assert code == EXIT_PROMOTED and f"ok {named}:" in " ".join(out.split()), out


def test_explain_takes_the_ledger_the_spec_or_the_status_file(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, canary_error=0.08)
    assert invoke("run", str(spec), "--simulated-time", "-q")[0] == EXIT_ROLLED_BACK
    state = tmp_path / "state"
    for given in (state / "cli.ledger.jsonl", spec, state / "cli.status.json"):
        code, out = invoke("explain", str(given))
        assert code == 0 and "rolled back at step 10 %" in out, given
    code, out = invoke("explain", str(state / "cli.commands.jsonl.missing"))
    assert code == EXIT_ERROR and "cannot read ledger" in out
    notes = tmp_path / "notes.txt"
    notes.write_text("not a ledger\n")
    code, out = invoke("explain", str(notes))
    assert code == EXIT_ERROR and "is not a rollout ledger" in " ".join(out.split())
    commands = state / "cli.commands.jsonl"  # JSON lines, but not a ledger's
    commands.write_text(json.dumps({"id": "1", "kind": "pause", "rollout": "x"}) + "\n")
    code, out = invoke("explain", str(commands))
    assert code == EXIT_ERROR and "is not a rollout ledger" in " ".join(out.split()), out


@pytest.mark.parametrize(
    "content",
    [
        pytest.param('{"at": 1', id="torn"),  # a controller killed in its first append
        pytest.param('\n{"event": "sta', id="torn-after-a-blank-line"),
        pytest.param('{"actions": [{"colour": "bl', id="torn-tick"),  # keys come sorted
        pytest.param('{"a', id="torn-in-the-first-key"),
    ],
)
def test_explain_of_a_ledger_holding_only_a_torn_line_says_so(tmp_path: Path, content: str) -> None:
    # Was "not a rollout ledger (no ledger lines): give the rollout's <name>.ledger.jsonl".
    ledger = tmp_path / "r.ledger.jsonl"
    ledger.write_text(content)
    code, out = invoke("explain", str(ledger))
    assert code == 0, out
    assert " ".join(out.split()) == (
        "the ledger is empty but for a torn line (its writer stopped in the middle of it): "
        "the rollout has not ticked yet"
    )


@pytest.mark.parametrize(
    "content",
    [
        # Was "the ledger is empty but for a torn line ...", exit 0: any one line without its
        # newline read as a ledger line cut short.
        pytest.param(b"hello", id="a-word"),
        pytest.param(b"\x7fELF\x02\x01\x01\x00\x00\x00\x03\x00>\x00", id="binary"),
        pytest.param(b'{"name": "x", "ver', id="another-tools-torn-json"),
        pytest.param(b'{"at": 1796074208.2, "\xc3\xa9', id="torn-but-not-ascii"),
        # Was told as a story ("[0 s] build: ..."), exit 0: any record with a phase was a tick.
        pytest.param(b'{"status": "ok", "phase": "build"}\n', id="another-tools-phase"),
        # Was "... (unsupported operand type(s) for -: 'str' and 'str')": Python's words.
        pytest.param(b'{"event": "deploy", "at": "yesterday"}\n', id="a-text-time"),
        pytest.param(b'{"event": "deploy"}\n', id="an-event-without-time"),
        pytest.param(b'{"at": 1.0, "phase": 3}\n', id="a-phase-not-a-phase"),
        pytest.param(b'{"at": 1.0, "phase": ["Paused"]}\n', id="a-phase-list"),
    ],
)
def test_explain_of_a_file_that_is_no_ledger_says_so(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    code, out = invoke("explain", str(path))
    assert code == EXIT_ERROR, out
    assert " ".join(out.split()) == (
        f"error: {path} is not a rollout ledger (no ledger lines): give the rollout's "
        "<name>.ledger.jsonl, or its spec"
    )


def test_status_says_when_no_controller_drives_the_rollout(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, metrics={"kind": "static", "ticks": []})
    from rollout.api import open_store, run_rollout
    from rollout.controller import FakeClock

    run_rollout(spec, clock=FakeClock(0.0), max_ticks=1)
    code, out = invoke("status", str(spec))
    assert code == EXIT_RUNNING and "none running" in out
    code, out = invoke("abort", str(spec))
    assert code == 0 and "no controller is running" in " ".join(out.split())
    store = open_store(spec)
    with store.lease("ann's controller"):
        assert "ann's controller pid" in (store.controller() or "")
        code, out = invoke("status", str(spec))
        assert "ann's controller pid" in out and "none running" not in out
    assert store.controller() is None


def test_status_shows_actions_decided_but_not_applied(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    from dataclasses import replace

    from rollout.api import open_store
    from rollout.core.status import SetWeights
    from rollout.core.types import Phase

    store = open_store(spec)
    store.save(replace(Status(name="cli", phase=Phase.PROGRESSING), pending=(SetWeights(10),)))
    code, out = invoke("status", str(spec))
    assert code == EXIT_RUNNING
    assert "not applied" in out and "set weights blue 10 % / green 90 %" in out, out


def test_status_watch_into_a_pipe_says_when_no_controller_drives_the_rollout(
    tmp_path: Path,
) -> None:
    # The controller Ctrl-C'd mid-step: its last status stays, and the watch went silent as if
    # the step were waiting for requests.
    spec = write_spec(tmp_path)
    from rollout.api import open_store
    from rollout.core.types import Phase

    store = open_store(spec)
    store.save(Status(name="cli", phase=Phase.PROGRESSING, reason="step 10 %"))
    code, out = invoke("status", str(spec), "--watch", "--timeout", "1")
    assert code == EXIT_RUNNING
    assert "no controller running" in " ".join(out.split()), out
    with store.lease("ann's controller"):
        out = invoke("status", str(spec), "--watch", "--timeout", "1")[1]
    assert "step 10 %" in out and "no controller" not in out, out


def test_status_watch_into_a_pipe_of_a_rollout_not_started_says_so_once(tmp_path: Path) -> None:
    # Was: nothing at all until the timeout (an hour by default), where the terminal view says
    # "not started" and where it looked.
    spec = write_spec(tmp_path)
    code, out = invoke("status", str(spec), "--watch", "--timeout", "0")
    assert code == EXIT_RUNNING
    said = "".join(out.split())
    assert said.count("notstarted") == 1, out
    assert f"notstarted(no{tmp_path / 'state' / 'cli.status.json'}" in said, out


class WatchClock:
    """The `time` a watch sees: its sleeps return at once, moving the clock on, and what a test
    scheduled at a second happens when the clock reaches it."""

    def __init__(self, at: dict[float, Callable[[], None]] | None = None) -> None:
        self.now = 0.0
        self.at = dict(at or {})

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        for when in sorted(t for t in self.at if t <= self.now):
            self.at.pop(when)()

    def strftime(self, fmt: str, *_: object) -> str:
        return f"t+{self.now:g}"


def _watched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **at: Callable[[], None]) -> Path:
    """A spec whose rollout is Progressing (its file status), watched on a `WatchClock` that
    runs `at["t2"]` at 2 s, `at["t4"]` at 4 s."""
    spec = write_spec(tmp_path)
    from rollout.api import open_store
    from rollout.core.types import Phase

    open_store(spec).save(Status(name="cli", phase=Phase.PROGRESSING, reason="step 10 %"))
    clock = WatchClock({float(key[1:]): then for key, then in at.items()})
    monkeypatch.setattr("rollout.commands.rollout.time", clock)
    return spec


def _save(spec: Path, phase: str, reason: str) -> Callable[[], None]:
    from rollout.api import open_store
    from rollout.core.types import Phase

    return lambda: open_store(spec).save(Status(name="cli", phase=Phase(phase), reason=reason))


def test_status_watch_into_a_pipe_says_when_the_status_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: nothing more until the timeout (an hour) once the status file or its state dir was
    # deleted, where the terminal view says "not started".
    status_file = tmp_path / "state" / "cli.status.json"
    spec = _watched(tmp_path, monkeypatch, t2=status_file.unlink)
    code, out = invoke("status", str(spec), "--watch", "--timeout", "5")
    assert code == EXIT_RUNNING
    lines = out.splitlines()
    assert len(lines) == 2 and "step 10 %" in lines[0], out
    assert lines[1].startswith(f"t+2 no status any more (no {status_file}"), out


def test_status_watch_goes_on_through_a_failed_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was exit 2 at the first failed read (a Kubernetes API blip), though a pipe follows on.
    status_file = tmp_path / "state" / "cli.status.json"
    spec = _watched(
        tmp_path,
        monkeypatch,
        t2=lambda: status_file.write_text("{torn"),
        t4=_save(tmp_path / "spec.yaml", "RolledBack", "rolled back at step 10 %"),
    )
    code, out = invoke("status", str(spec), "--watch", "--timeout", "60")
    assert code == EXIT_ROLLED_BACK, out
    lines = out.splitlines()
    assert len(lines) == 3, out  # the failure said once, not at every refresh
    assert lines[1].startswith(f"t+2 cannot read the status: {status_file} is not a rollout")
    assert lines[1].endswith("; watching on")
    assert lines[2].startswith("t+4 RolledBack") and "rolled back at step 10 %" in lines[2]


def test_status_watch_in_a_terminal_goes_on_through_failed_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The live view exited 2 at a status or a lease it could not read once.
    import io

    from rollout.commands import rollout as commands

    state = tmp_path / "state"
    spec = _watched(
        tmp_path,
        monkeypatch,
        t2=lambda: (state / "cli.status.json").write_text("{torn"),
        t3=lambda: (state / "cli.lock").symlink_to(state / "cli.lock"),  # ELOOP at its open
        t5=_save(tmp_path / "spec.yaml", "RolledBack", "rolled back at step 10 %"),
    )
    screen = io.StringIO()
    terminal = commands._Output(file=screen, force_terminal=True, width=200, highlight=False)
    monkeypatch.setattr(commands, "_out", terminal)
    code, out = invoke("status", str(spec), "--watch", "--timeout", "60")
    assert code == EXIT_ROLLED_BACK, out
    assert "rolled back at step 10 %" in screen.getvalue()


def test_status_watch_json_prints_a_json_line_per_change_until_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: the status once, pretty-printed, and exit 6 at once: `--json` won over `--watch`.
    spec = _watched(
        tmp_path, monkeypatch, t2=_save(tmp_path / "spec.yaml", "RolledBack", "rolled back")
    )
    result = runner.invoke(
        app, ["rollout", "status", str(spec), "--watch", "--json", "--timeout", "60"]
    )
    assert result.exit_code == EXIT_ROLLED_BACK, result.output
    said = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(s["phase"], s["reason"]) for s in said] == [
        ("Progressing", "step 10 %"),
        ("RolledBack", "rolled back"),
    ]


def test_status_watch_of_a_memory_state_store_does_not_wait_for_what_it_cannot_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: "out of reach of `status`", then a wait for it until the timeout (an hour).
    spec = write_spec(tmp_path, state={"kind": "memory"})
    clock = WatchClock()
    monkeypatch.setattr("rollout.commands.rollout.time", clock)
    code, out = invoke("status", str(spec), "--watch")
    assert code == EXIT_RUNNING
    assert "keeps the status inside the running controller's process" in " ".join(out.split())
    assert clock.now == 0.0


def test_status_does_not_show_weights_not_applied_as_served(tmp_path: Path) -> None:
    # A controller interrupted while deploying blue left the shadow step's weights decided:
    # status showed "20 % mirrored to blue" while Envoy mirrored nothing.
    spec = write_spec(tmp_path)
    from dataclasses import replace

    from rollout.api import open_store
    from rollout.core.status import Deploy, SetWeights
    from rollout.core.types import Colour, Phase, Release

    store = open_store(spec)
    progressing = Status(name="cli", phase=Phase.PROGRESSING, mirror=20)
    deploy = Deploy(Colour.BLUE, Release("m", "2"))
    store.save(replace(progressing, pending=(deploy, SetWeights(0, mirror=20))))
    out = " ".join(invoke("status", str(spec))[1].split())
    assert "20 % mirrored to blue (decided, not applied yet)" in out, out
    store.save(replace(progressing, pending=(SetWeights(0, mirror=20),), applied=1))
    out = " ".join(invoke("status", str(spec))[1].split())
    assert "20 % mirrored to blue plan" in out and "not applied" not in out, out


def test_explain_of_a_missing_ledger_is_a_clear_error(tmp_path: Path) -> None:
    code, out = invoke("explain", str(tmp_path / "none.jsonl"))
    assert code == EXIT_ERROR and "cannot read ledger" in out


def test_explain_of_a_spec_not_run_yet_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was "cannot read ledger .rollout/cli.ledger.jsonl: No such file or directory".
    spec = write_spec(tmp_path, state={"dir": ".rollout"})
    monkeypatch.chdir(tmp_path / "..")
    code, out = invoke("explain", str(spec))
    assert code == EXIT_ERROR
    assert " ".join(out.split()) == (
        "error: rollout 'cli' has no ledger .rollout/cli.ledger.jsonl: not run yet, or run "
        "from another directory (run this from where `run` ran, or give --state-dir)"
    ), out


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        pytest.param(
            {"phase": "Progressing", "checks": {"errors": {"canary_requests": 3}}},
            "no 'log_e_worse'",
            id="a-check-without-its-e-values",
        ),
        pytest.param({"phase": "Progressing", "tick": 1, "at": "noon"}, "str", id="a-text-time"),
        pytest.param({"phase": "Paused", "checks": ["errors"]}, "list", id="checks-not-a-map"),
    ],
)
def test_explain_of_a_ledger_line_of_another_shape_is_one_line(
    tmp_path: Path, line: dict[str, object], problem: str
) -> None:
    # Was a traceback (KeyError, TypeError): a line edited by hand, or another tool's JSON lines.
    ledger = tmp_path / "r.ledger.jsonl"
    ledger.write_text(json.dumps({"event": "start", "at": 1.0, "name": "r"}) + "\n")
    with ledger.open("a") as fh:
        fh.write(json.dumps(line) + "\n")
    code, out = invoke("explain", str(ledger))
    text = " ".join(out.split())
    assert code == EXIT_ERROR and "Traceback" not in out and len(out.splitlines()) == 1, out
    assert f"{ledger}: a line is not a ledger record this version can tell" in text
    assert problem in text


@pytest.mark.parametrize(
    ("candidate", "line"),
    [
        pytest.param(
            None,
            "candidate: diabetes:2 names no model folder, and the envoy router serves a release "
            "from its package or model folder",
            id="as-shown",
        ),
        pytest.param(
            'candidate: {model: diabetes, version: "2", model_dir: pkg}',
            "green serves nothing on envoy",
            id="with-the-candidates-model-folder",
        ),
    ],
)
def test_the_quick_start_spec_stops_with_the_line_the_doc_promises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, candidate: str | None, line: str
) -> None:
    # docs/engine.md promised "green serves nothing on envoy ..." of its spec pasted as is;
    # it stopped first on the candidate's missing model folder. Neither line asks Envoy or
    # Prometheus anything (the second comes from the router's own record of what it deployed).
    doc = (Path(__file__).resolve().parents[2] / "docs" / "engine.md").read_text()
    assert f'("{line}' in " ".join(doc.split()), line
    spec = "# rollout.yaml" + doc.split("```yaml\n# rollout.yaml")[1].split("```")[0]
    if candidate is not None:
        spec = spec.replace('candidate: {model: diabetes, version: "2"}', candidate)
    (tmp_path / "rollout.yaml").write_text(spec)
    _model_folder(tmp_path / "pkg")
    monkeypatch.chdir(tmp_path)
    code, out = invoke("run", "rollout.yaml")
    assert code == EXIT_ERROR, out
    assert " ".join(out.split()).startswith(f"error: {line}"), out


def test_the_documented_dry_run_runs_as_documented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # docs/engine.md shows a dry-run spec and the line `run` prints for it: both stay true.
    doc = (Path(__file__).resolve().parents[2] / "docs" / "engine.md").read_text()
    block = doc.split("```yaml\n# dry-run.yaml")[1].split("```")[0]
    shown = doc.split("$ aml-rollout rollout run dry-run.yaml --simulated-time")[1]
    outcome = shown.split("\n")[1]
    (tmp_path / "dry-run.yaml").write_text("# dry-run.yaml" + block)
    monkeypatch.chdir(tmp_path)
    code, out = invoke("run", "dry-run.yaml", "--simulated-time", "-q")
    assert code == EXIT_ROLLED_BACK, out
    # One line as printed, however long: a CI log or a pipe gets no breaks in mid-sentence.
    assert out.splitlines()[0] == outcome


def test_a_dry_run_without_a_stable_release_says_how_to_name_one(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    data = yaml.safe_load(spec.read_text())
    del data["stable"]
    spec.write_text(yaml.safe_dump(data))
    code, out = invoke("run", str(spec), "--simulated-time")
    assert code == EXIT_ERROR
    assert "green serves nothing" in out and "`stable:`" in " ".join(out.split())
    assert "aml-rollout rollout bootstrap SPEC --release m:2" in " ".join(out.split())


def test_a_first_release_is_bootstrapped_then_the_next_is_rolled_out_against_it(
    tmp_path: Path,
) -> None:
    routes = tmp_path / "routes.json"
    spec = write_spec(tmp_path, router={"kind": "memory", "state_file": str(routes)})
    data = yaml.safe_load(spec.read_text())
    data["stable"] = data["candidate"] = {"model": "m", "version": "1"}  # a first release
    spec.write_text(yaml.safe_dump(data))
    code, out = invoke("run", str(spec), "--simulated-time")
    assert code == EXIT_ERROR  # was: "green already serves m:1", while green served nothing
    assert "`stable:` names the candidate m:1" in " ".join(out.split())

    code, out = invoke("bootstrap", str(spec))
    assert code == 0, out
    assert "green serves m:1 with all traffic" in out
    code, out = invoke("status", str(spec))  # was only "not started"
    assert code == EXIT_RUNNING and "not started" in out
    assert "m:1 with all traffic, bootstrapped (a first release, unjudged)" in " ".join(out.split())
    served = json.loads(routes.read_text())
    assert served["weights"] == {"blue": 0, "green": 100}
    assert served["releases"]["green"]["version"] == "1"
    assert invoke("bootstrap", str(spec)) == (0, "green already serves m:1: nothing to do\n")
    code, out = invoke("bootstrap", str(spec), "--release", "m:2")
    assert code == EXIT_ERROR and "green already serves m:1: roll m:2 out instead" in out

    code, out = invoke("run", str(spec), "--candidate", "m:2", "--simulated-time")
    assert code == 0, out
    code, story = invoke("explain", str(spec))
    assert code == 0
    assert "bootstrapped green with m:1 (a first release, unjudged" in " ".join(story.split())
    assert "started rollout cli: candidate m:2 (blue) against m:1 (green)" in story


def test_status_of_a_long_ledger_does_not_hold_it_to_find_the_last_bootstrap(
    tmp_path: Path,
) -> None:
    # Measured: `status` with no status (state.kind memory, or the file moved aside) read a
    # 75 MB ledger whole: 472 MB resident.
    import tracemalloc

    from rollout.commands.rollout import _bootstrapped
    from rollout.config import load_spec
    from tests.engine.test_explain_outage import _long_ledger

    spec = load_spec(write_spec(tmp_path))
    ledger = tmp_path / "state" / "cli.ledger.jsonl"
    ledger.parent.mkdir()
    _long_ledger(ledger, 1500)
    size = ledger.stat().st_size
    tracemalloc.start()
    try:
        said = _bootstrapped(spec, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert said is None and peak < size / 4, (peak, size)  # the last line is a tick: no
    with ledger.open("a") as fh:
        for line in (
            {"event": "bootstrap", "at": 2.0, "release": {"model": "m", "version": "1"}},
            {"event": "first-check", "at": 3.0, "verdict": "Failed", "reason": "too slow"},
            {"event": "first-check", "at": 4.0, "verdict": "Successful", "reason": "ok"},
        ):
            fh.write(json.dumps(line) + "\n")
    assert _bootstrapped(spec, None) == (
        "m:1 with all traffic, bootstrapped (a first release, judged on the absolute limits: "
        "Successful: ok); roll out the next one with `aml-rollout rollout run`"
    )


@pytest.mark.parametrize(
    ("green_error", "code", "verdict", "said"),
    [
        pytest.param(0.001, EXIT_PROMOTED, "Successful", "below the limit 10 %", id="kept"),
        pytest.param(0.3, EXIT_FAILED, "Failed", "above the limit 10 %", id="breached"),
    ],
)
def test_bootstrap_check_judges_the_first_release_on_absolute_limits(
    tmp_path: Path, green_error: float, code: int, verdict: str, said: str
) -> None:
    routes = tmp_path / "routes.json"
    spec = write_spec(tmp_path, router={"kind": "memory", "state_file": str(routes)})
    data = yaml.safe_load(spec.read_text())
    data["metrics"]["baseline"]["error_rate"] = green_error
    spec.write_text(yaml.safe_dump(data))
    got, out = invoke("bootstrap", str(spec), "--release", "m:1", "--check", "--simulated-time")
    flat = " ".join(out.split())
    assert got == code, out
    assert "m:1 to green with all traffic, then judged on the absolute limits every 10 s" in flat
    assert f"{verdict} (" in flat and said in flat
    if verdict == "Failed":  # nothing to roll back to: it serves on, and a fix is the way out
        assert "m:1 still serves all traffic (there is nothing to roll back to)" in flat
    assert json.loads(routes.read_text())["weights"] == {"blue": 0, "green": 100}
    got, out = invoke("status", str(spec))
    assert got == EXIT_RUNNING
    assert f"bootstrapped (a first release, judged on the absolute limits: {verdict}:" in " ".join(
        out.split()
    )
    got, story = invoke("explain", str(spec))
    assert f"first release m:1 judged on the absolute limits: {verdict}: error rate" in " ".join(
        story.split()
    )
    # Run again: green serves it already, so it is only judged afresh.
    got, out = invoke("bootstrap", str(spec), "--release", "m:1", "--check", "--simulated-time")
    assert got == code and "then judged on the absolute limits" in out


def test_bootstrap_check_of_the_release_green_serves_named_by_its_ref_judges_it(
    tmp_path: Path,
) -> None:
    # Was: "green already serves m:1: roll m:1 out instead": the release was deployed with its
    # sha256 and image (by the spec's `stable:`, or the trigger's delivery), and `--release m:1`
    # carries neither, so it did not match green's copy. The command the trigger and the docs
    # give for judging a first release again.
    routes = tmp_path / "routes.json"
    spec = write_spec(tmp_path, router={"kind": "memory", "state_file": str(routes)})
    data = yaml.safe_load(spec.read_text())
    data["stable"] = {"model": "m", "version": "1", "sha256": "ab" * 32, "image": "r/m:1"}
    spec.write_text(yaml.safe_dump(data))
    assert invoke("bootstrap", str(spec))[0] == 0
    del data["stable"]
    spec.write_text(yaml.safe_dump(data))
    got, out = invoke("bootstrap", str(spec), "--release", "m:1", "--check", "--simulated-time")
    assert got == EXIT_PROMOTED, out
    assert "then judged on the absolute limits" in " ".join(out.split())
    assert json.loads(routes.read_text())["releases"]["green"]["sha256"] == "ab" * 32
    got, story = invoke("explain", str(spec))
    assert "first release m:1 judged on the absolute limits: Successful" in " ".join(story.split())


def test_bootstrap_check_errors_are_one_line(tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path, analysis={"errors": {"max_rate": None}, "latency": {"enabled": False}}
    )
    code, out = invoke("bootstrap", str(spec), "--check", "--simulated-time")
    assert code == EXIT_ERROR and "checking a first release needs an absolute limit" in out
    code, out = invoke("bootstrap", str(write_spec(tmp_path)), "--simulated-time")
    assert code == EXIT_ERROR and "--simulated-time: only with --check" in out
    spec = write_spec(tmp_path, metrics={"kind": "static", "ticks": [{"error": "refused"}]})
    code, out = invoke("bootstrap", str(spec), "--check", "--simulated-time", "--quiet")
    assert (code, out) == (EXIT_ERROR, "error: metrics unreadable: refused\n")


def test_bootstrap_refuses_while_a_rollout_is_active(tmp_path: Path) -> None:
    routes = tmp_path / "routes.json"
    spec = write_spec(
        tmp_path,
        router={"kind": "memory", "state_file": str(routes)},
        metrics={"kind": "static", "ticks": [{"error": "connection refused"}]},
    )
    code, out = invoke("run", str(spec), "--simulated-time")
    assert code == EXIT_PAUSED, out  # held for a human: not over
    routes.unlink()  # the data plane lost everything, the rollout is still on
    code, out = invoke("bootstrap", str(spec), "--release", "m:1")
    assert code == EXIT_ERROR
    assert "rollout 'cli' is Paused: bootstrap fills an empty green" in " ".join(out.split())
    assert not routes.exists()


def test_bootstrap_needs_a_release(tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    data = yaml.safe_load(spec.read_text())
    del data["stable"], data["candidate"]
    spec.write_text(yaml.safe_dump(data))
    code, out = invoke("bootstrap", str(spec))
    assert code == EXIT_ERROR and "--release: name the first release" in out
    code, out = invoke("bootstrap", str(spec), "--release", "m")
    assert code == EXIT_ERROR and "--release: expected MODEL:VERSION, got 'm'" in out


def test_the_readme_spec_validates(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("A rollout spec (all fields in docs/engine.md):")[1]
    (tmp_path / "rollout.yaml").write_text(block.split("```yaml\n")[1].split("```")[0])
    code, out = invoke("validate", str(tmp_path / "rollout.yaml"))
    assert code == 0, out


def test_bootstrap_check_without_traffic_is_a_humans_call(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, metrics={"kind": "static", "ticks": [{}]})
    code, out = invoke("bootstrap", str(spec), "--check", "--simulated-time", "--quiet")
    flat = " ".join(out.split())
    assert code == EXIT_PAUSED, out
    assert "Inconclusive (undecided): first release m:1: undecided after 3.0 h: no requests" in flat


def test_bootstrap_check_interrupted_says_how_to_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rollout.api

    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(rollout.api, "bootstrap_checked", interrupted)
    code, out = invoke("bootstrap", str(write_spec(tmp_path)), "--check", "--quiet")
    assert code == 130
    assert "interrupted: m:1 not judged; `aml-rollout rollout bootstrap --check` finishes" in out


@pytest.mark.usefixtures("interrupt_lost")
def test_run_stops_on_a_signal_whose_interrupt_was_lost(tmp_path: Path) -> None:
    """Ctrl-C's or SIGTERM's KeyboardInterrupt is lost when it lands in a finalizer: `run` went
    on as if never stopped. The signal's event is set all the same; the next wait stops on it."""
    analysis = {"interval_s": 0.01, "min_requests": 10**6, "max_step_duration_s": 0.3,
                "latency": {"enabled": False}}  # fmt: skip
    code, out = invoke("run", str(write_spec(tmp_path, analysis=analysis)))
    assert code == 130, out
    # Was "(its lease released)", said too after a release that failed (logged just above).
    assert "interrupted: the rollout stays where it is; `aml-rollout" in out
    assert "released" not in out


def test_a_simulated_rollout_waiting_for_a_human_ticks_in_wall_time(tmp_path: Path) -> None:
    """`run --simulated-time --no-stop-when-paused` on a held rollout (or one an operator
    paused): the fake clock spun through ticks while it waited, a ledger line each, until the
    disk filled; now a tick a second, which still hears `resume` from another terminal."""
    analysis = {"min_requests": 10**6, "max_step_duration_s": 30, "latency": {"enabled": False}}
    spec = write_spec(tmp_path, 0.0, analysis=analysis)
    ledger = tmp_path / "state" / "cli.ledger.jsonl"

    def paused_lines() -> int:
        text = ledger.read_text() if ledger.exists() else ""
        return sum('"phase": "Paused"' in line for line in text.splitlines())

    command = ["rollout", "run", str(spec), "--simulated-time", "--no-stop-when-paused", "-q"]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "rollout.cli", *command], cwd=root)
    try:
        deadline = time.monotonic() + 30
        while paused_lines() == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        held = paused_lines()
        time.sleep(2.0)  # wall time is what is measured here
        grown = paused_lines() - held
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert held > 0 and grown <= 4, grown


@pytest.mark.parametrize(("verdict", "shown"), [("Successful", True), ("Inconclusive", False)])
def test_status_of_a_held_rollout_says_when_the_evidence_now_passes(
    tmp_path: Path, verdict: str, shown: bool
) -> None:
    """Held, the judge keeps counting, but the reason stays why it held ("15 of 200 canary
    requests needed" under a not-worse e-value of 6e19): the view says the step now passes."""
    from dataclasses import replace

    from rich.console import Console

    from rollout.commands.rollout import _status_view
    from rollout.config import load_spec
    from rollout.core.machine import new_status
    from rollout.core.types import Phase, Release, Verdict

    spec = load_spec(write_spec(tmp_path))
    status = new_status(
        spec, now=0.0, candidate=Release("m", "2"), stable=Release("m", "1"), rollout_id="r"
    )
    status = replace(
        status,
        phase=Phase.PAUSED,
        held=True,
        blue_weight=10,  # its reason's step (at 0 %, no step of the plan, resume is refused)
        verdict=Verdict(verdict),
        reason="held for a human: step 10 % inconclusive after 600 s: 15 of 100 canary requests",
    )
    console = Console(record=True, width=200)
    console.print(_status_view(spec, status, None))
    text = console.export_text()
    assert ("the evidence now passes this step: `resume` lets it advance" in text) is shown


def _held_at_10(tmp_path: Path) -> Path:
    """A spec whose rollout is held for a human at blue 10 % (0 % is no step of its plan, and
    resume would be refused there), no controller running."""
    spec = write_spec(tmp_path)
    from rollout.api import open_store
    from rollout.core.types import Phase

    held = Status(
        name="cli", phase=Phase.PAUSED, held=True, blue_weight=10, reason="held for a human: drift"
    )
    open_store(spec).save(held)
    return spec


def test_status_watch_into_a_pipe_says_a_held_rollout_waits_for_an_answer_not_a_run(
    tmp_path: Path,
) -> None:
    # Was "(no controller running: `aml-rollout rollout run SPEC` resumes it)": run again, a
    # held rollout stays held (exit 4) until someone answers it.
    spec = _held_at_10(tmp_path)
    code, out = invoke("status", str(spec), "--watch", "--timeout", "1")
    assert code == EXIT_PAUSED
    assert (
        "(no controller running: answer with resume, promote or abort, then `aml-rollout "
        "rollout run SPEC`)"
    ) in " ".join(out.split()), out


def test_status_of_a_held_rollout_answered_says_run_acts_on_the_answer(tmp_path: Path) -> None:
    # Was "none running: answer with resume, promote or abort, then ..." under "queued resume".
    spec = _held_at_10(tmp_path)
    assert invoke("resume", str(spec))[0] == 0
    code, out = invoke("status", str(spec))
    assert code == EXIT_PAUSED
    assert "none running: `aml-rollout rollout run SPEC` acts on the queued resume" in " ".join(
        out.split()
    ), out
    assert "answer with" not in out


@pytest.mark.parametrize("merged", [False, True], ids=["stdout", "stdout-and-stderr"])
def test_run_outlives_a_reader_that_went_away(tmp_path: Path, merged: bool) -> None:
    """`run | head -1` (or `2>&1 | head -1`): rich exited the controller (status 1, no word) at
    its next line, leaving the canary at its weight with nothing guarding it. It now goes on to
    the end."""
    routes = tmp_path / "routes.json"
    spec = write_spec(tmp_path, router={"kind": "memory", "state_file": str(routes)})
    with subprocess.Popen(
        [sys.executable, "-m", "rollout.cli", "rollout", "run", str(spec), "--simulated-time"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        assert "started: blue at 10 %" in proc.stdout.readline()
        proc.stdout.close()  # the reader goes away, as `head -1` does
        assert proc.wait(timeout=120) == EXIT_PROMOTED
        if proc.stderr is not None:
            assert "stdout closed: the rollout goes on" in proc.stderr.read()
    assert json.loads(routes.read_text())["releases"]["green"]["version"] == "2"


def _held_by_drift(tmp_path: Path, green: str, **extra: object) -> Path:
    """A rollout of m:2 held: blue taken over by m:3 at 50 %, green serving m:`green`."""
    from dataclasses import replace

    from rollout.api import open_store
    from rollout.config import load_spec
    from rollout.core.machine import new_status, step
    from rollout.core.types import Phase, Release, Served, Weights

    path = write_spec(tmp_path, **extra)
    spec = load_spec(path)
    v1, v2, v3 = (Release("m", v) for v in "123")
    status = new_status(spec, now=0.0, candidate=v2, stable=v1, rollout_id="r")
    status = replace(status, phase=Phase.PROGRESSING, blue_weight=10)
    served = Served(weights=Weights.blue_at(50), blue=v3, green=Release("m", green))
    held = step(spec, status, None, 10.0, served).status
    assert held.held
    open_store(spec).save(held)
    return path


def test_status_of_a_rollout_held_by_drift_shows_what_the_data_plane_served(
    tmp_path: Path,
) -> None:
    spec = _held_by_drift(tmp_path, green="1")
    code, out = invoke("status", str(spec))
    text = " ".join(out.split())
    assert code == EXIT_PAUSED
    assert "data plane blue m:3, green m:1: blue 50 % / green 50 %" in text, text
    assert "answer with resume or abort (blue serves another release)" in text, text
    assert "promote refused: blue serves m:3, not m:2: another rollout's?" in text, text
    data = json.loads(invoke("status", str(spec), "--json")[1])
    assert data["served"]["weights"] == {"blue": 50, "green": 50, "mirror": 0}
    assert data["served"]["blue"]["version"] == "3"
    code, out = invoke("resume", str(spec))
    assert code == 0 and out.startswith("queued resume"), out


@pytest.mark.parametrize(
    ("args", "what"),
    [
        pytest.param(("promote",), "promoted", id="promote"),
        pytest.param(("set-weight", "@", "50"), "set to 50 %", id="set-weight"),
        pytest.param(("set-weight", "@", "100"), "set to 100 %", id="set-weight-100"),
    ],
)
def test_promote_and_set_weight_are_refused_while_blue_serves_another_release(
    tmp_path: Path, args: tuple[str, ...], what: str
) -> None:
    """Was: queued without a word; the controller then sent users to another rollout's
    never-judged canary (all of them for a promote, which then removed it)."""
    spec = _held_by_drift(tmp_path, green="1")
    argv = [str(spec) if a == "@" else a for a in args]
    if len(argv) == 1:
        argv.append(str(spec))
    code, out = invoke(*argv)
    text = " ".join(out.split())
    assert code == EXIT_ERROR, text
    assert f"rollout cli cannot be {what}: blue serves m:3, not m:2: another rollout's?" in text
    assert "resume first" in text and "or abort" in text, text
    commands = tmp_path / "state" / "cli.commands.jsonl"
    assert not commands.exists() or not commands.read_text().strip()


def test_resume_of_a_rollout_the_plan_no_longer_has_is_refused(tmp_path: Path) -> None:
    """Was: queued, resumed, then held again one interval later for the same reason."""
    spec = write_spec(tmp_path, steps=[25, 50, 100])
    from rollout.api import open_store
    from rollout.core.types import Phase

    store = open_store(spec)
    store.save(Status(name="cli", id="r1", phase=Phase.PAUSED, held=True, blue_weight=10))
    code, out = invoke("resume", str(spec))
    text = " ".join(out.split())
    assert (
        code == EXIT_ERROR and "rollout cli cannot be resumed: blue is at 10 %, which the " in text
    )
    assert text.endswith("set-weight to a planned weight, promote or abort"), text
    assert store.commands() == []


def test_a_rollout_held_after_green_moved_on_is_not_offered_resume(tmp_path: Path) -> None:
    """Was: "answer with resume, promote or abort", and `resume` queued a command the
    controller then ignored ("resume: ignored, green now serves ...")."""
    spec = _held_by_drift(tmp_path, green="3")
    code, out = invoke("status", str(spec))
    text = " ".join(out.split())
    assert code == EXIT_PAUSED
    assert "data plane blue m:3, green m:3: blue 50 % / green 50 %" in text, text
    assert "resume refused: green now serves m:3, not m:1" in text, text
    assert "none running: answer with abort" in text and "resume, promote" not in text, text
    code, out = invoke("resume", str(spec))
    text = " ".join(out.split())
    assert code == EXIT_ERROR
    assert "rollout cli cannot be resumed: green now serves m:3, not m:1" in text, text
    assert text.endswith("abort it"), text
    commands = tmp_path / "state" / "cli.commands.jsonl"
    assert not commands.exists() or not commands.read_text().strip()
    assert invoke("abort", str(spec))[0] == 0


def _held_then_green_moved_on(tmp_path: Path) -> Path:
    """A rollout of m:2 held (as `_held_by_drift`, green m:1), its data plane a file that
    outlives the controller; since the hold, another rollout promoted m:3 to green."""
    from rollout.config import load_spec
    from rollout.core.types import Colour, Release
    from rollout.routers.memory import MemoryRouter

    routes = {"kind": "memory", "state_file": str(tmp_path / "routes.json")}
    spec = _held_by_drift(tmp_path, green="1", router=routes)
    router = MemoryRouter.from_config(load_spec(spec).router)  # type: ignore[arg-type]
    router.deploy(Colour.GREEN, Release("m", "3"))
    return spec


def test_resume_is_refused_when_green_moved_on_after_the_hold(tmp_path: Path) -> None:
    """Measured live: the winner of two rollouts on one Envoy promoted while the loser sat held
    with no controller; its status still said green served its stable release, and `resume`
    queued a command the next `run` ignored ("resume: ignored, green now serves ...")."""
    spec = _held_then_green_moved_on(tmp_path)
    code, out = invoke("resume", str(spec))
    text = " ".join(out.split())
    assert code == EXIT_ERROR, text
    assert "rollout cli cannot be resumed: green now serves m:3, not m:1" in text, text
    commands = tmp_path / "state" / "cli.commands.jsonl"
    assert not commands.exists() or not commands.read_text().strip()


def test_status_of_a_held_rollout_no_controller_drives_reads_the_data_plane_now(
    tmp_path: Path,
) -> None:
    """Measured live: after the other rollout promoted, `status` still showed the data plane of
    the hold's last tick and offered resume (which is refused)."""
    spec = _held_then_green_moved_on(tmp_path)
    _, out = invoke("status", str(spec))
    text = " ".join(out.split())
    assert "data plane blue nothing, green m:3: blue 0 % / green 100 % (read now)" in text, text
    assert "resume refused: green now serves m:3, not m:1" in text, text
    assert "answer with abort" in text, text


def test_status_of_an_abort_that_left_the_data_plane_alone_does_not_claim_blue_0(
    tmp_path: Path,
) -> None:
    """Was: "weights blue 0 % / green 100 %" after an abort that moved nothing (blue served
    another rollout's canary at 50 %): the status's weights, never applied, read as served."""
    from rollout.config import load_spec
    from rollout.core.types import Colour, Release, Weights
    from rollout.routers.memory import MemoryRouter

    routes = {"kind": "memory", "state_file": str(tmp_path / "routes.json")}
    spec = _held_by_drift(tmp_path, green="1", router=routes)
    router = MemoryRouter.from_config(load_spec(spec).router)  # type: ignore[arg-type]
    router.deploy(Colour.GREEN, Release("m", "1"))
    router.deploy(Colour.BLUE, Release("m", "3"))
    router.set_weights(Weights.blue_at(50))
    assert invoke("abort", str(spec))[0] == 0
    assert invoke("run", str(spec), "--simulated-time")[0] == EXIT_ROLLED_BACK
    code, out = invoke("status", str(spec))
    text = " ".join(out.split())
    assert code == EXIT_ROLLED_BACK
    assert "weights none set: the abort left the data plane as it is" in text, text
    assert "blue 0 %" not in text, text
    assert "data plane blue m:3, green m:1: blue 50 % / green 50 % (read now)" in text, text
    # the other rollout ended since: what the data plane serves now is what the status says
    router.set_weights(Weights.blue_at(0))
    router.remove(Colour.BLUE)
    text = " ".join(invoke("status", str(spec))[1].split())
    assert "weights blue 0 % / green 100 % plan" in text, text
    assert "data plane blue nothing, green m:1: blue 0 % / green 100 % (read now)" in text, text


def documented_yaml_blocks() -> list[object]:
    """Every ```yaml block of README.md and docs/*.md, and the spec triggers.md writes with a
    heredoc, as (where, text): a user copies them as they are."""
    root = Path(__file__).resolve().parents[2]
    blocks = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = page.read_text()
        for block in text.split("```yaml\n")[1:]:
            body = block.split("```")[0]
            line = text.count("\n", 0, text.index(body)) + 1
            blocks.append(pytest.param(body, id=f"{page.name}:{line}"))
        for block in text.split("<<'YAML'\n")[1:]:
            body = block.split("\nYAML\n")[0]
            line = text.count("\n", 0, text.index(body)) + 1
            blocks.append(pytest.param(body, id=f"{page.name}:{line}"))
    return blocks


#: Blocks that are not rollout specs, by their first line, and what they are instead.
NOT_SPECS = {
    "name: err-10x-100rps": "scenario",  # engine.md: a benchmark scenario (--scenario)
    "  - name: aml-rollout-default": "yaml",  # kubernetes.md: a VirtualService route
    "apiVersion: batch/v1": "yaml",  # kubernetes.md: the controller's Job
    # engine.md's quick start: an Envoy spec without the candidate's model folder, whose refusal
    # (by validate, as by run: check_deployable) the page quotes.
    "# rollout.yaml": "candidate: diabetes:2 names no model folder, and the envoy router serves a "
    "release from its package or model folder",
}


@pytest.mark.parametrize("block", documented_yaml_blocks())
def test_every_documented_yaml_block_loads_as_what_it_shows(tmp_path: Path, block: str) -> None:
    """A spec shown in the docs validates; a scenario loads; a Kubernetes object parses."""
    from benchmarks.analysis import Scenario

    path = tmp_path / "block.yaml"
    path.write_text(block)
    kind = NOT_SPECS.get(block.splitlines()[0], "spec")
    if kind == "scenario":
        assert Scenario.load(path).name == "err-10x-100rps"
    elif kind == "yaml":
        assert yaml.safe_load(block)
    elif kind.startswith("candidate: "):  # a valid spec whose candidate the docs say is refused
        code, out = invoke("validate", str(path))
        assert code == EXIT_ERROR and kind in " ".join(out.split()), out
    else:
        code, out = invoke("validate", str(path))
        assert code == 0, out


@pytest.mark.parametrize(
    ("router", "needs"),
    [
        pytest.param(_ENVOY, "model folder", id="envoy"),
        pytest.param({"kind": "istio", "namespace": "ml", "app": "diabetes"}, "image", id="istio"),
    ],
)
def test_validate_without_a_candidate_names_the_spec_field_not_run_candidate(
    tmp_path: Path, router: dict[str, str], needs: str
) -> None:
    """Was: "`run --candidate` checks its model folder then", a workflow always refused: a
    MODEL:VERSION on the command line carries no folder or image (only a release the spec
    names has one)."""
    spec = write_spec(
        tmp_path, router=router, metrics={"kind": "static"}, candidate=None, stable=None
    )
    code, out = invoke("validate", str(spec))
    said = " ".join(out.split())
    assert code == 0, out
    assert "`run --candidate` checks" not in said
    assert f"the {router['kind']} router deploys a candidate with its {needs}:" in said, out
    assert "name it in the spec's `candidate:`" in said, out


@pytest.mark.parametrize(
    ("status", "said", "not_said"),
    [
        pytest.param(  # was: "answer with resume, promote or abort", and resume was refused
            {"phase": "Paused", "held": True, "blue_weight": 10},
            (
                "resume refused: blue is at 10 %, which the plan [25, 50, 100] no longer has",
                "none running: answer with set-weight, promote or abort, then `aml-rollout "
                "rollout run SPEC`",
            ),
            "resume, promote",
            id="held-off-plan",
        ),
        pytest.param(  # was: "resume it with run", which stopped at the same deploy every time
            {
                "phase": "Finalising",
                "blue_weight": 100,
                "pending": [
                    {"type": "deploy", "colour": "green", "release": {"model": "m", "version": "2"}}
                ],
            },
            (
                "none running: its deploy to green is not applied: `aml-rollout rollout run SPEC` "
                "tries it again; if it fails for good, `aml-rollout rollout abort SPEC` first",
            ),
            "resume it with",
            id="finalising-deploy-unapplied",
        ),
    ],
)
def test_status_of_an_undriven_rollout_names_the_answers_that_work(
    tmp_path: Path, status: dict[str, object], said: tuple[str, ...], not_said: str
) -> None:
    spec = write_spec(tmp_path, steps=[25, 50, 100])
    from rollout.api import open_store

    base = Status(name="cli", id="r1").to_dict()
    open_store(spec).save(Status.from_dict({**base, **status}))
    _, out = invoke("status", str(spec))
    text = " ".join(out.split())
    assert all(line in text for line in said) and not_said not in text, text


@pytest.mark.parametrize(
    ("green", "answer"),
    [
        pytest.param(
            "1", "clear: answer with resume (it sets the data plane back) or abort", id="ours"
        ),
        pytest.param("3", "clear, and resume cannot: green now serves m:3, not m:1", id="moved-on"),
    ],
)
def test_pause_of_a_rollout_held_for_a_data_plane_change_is_refused(
    tmp_path: Path, green: str, answer: str
) -> None:
    """Was: queued, logged as an operator's pause ("was held for a human: the data plane
    changed ..."), then held again by the same tick: `run` returned at once, no one guarding."""
    spec = _held_by_drift(tmp_path, green=green)
    code, out = invoke("pause", str(spec))
    text = " ".join(out.split())
    assert code == EXIT_ERROR, text
    assert (
        "rollout cli is held for a change of its data plane, which a pause does not clear" in text
    )
    assert answer in text, text
    commands = tmp_path / "state" / "cli.commands.jsonl"
    assert not commands.exists() or not commands.read_text().strip()


# ---- validate checks the stable release as it checks the candidate ---------------------------


def test_validate_tells_a_bad_candidate_and_a_bad_stable_at_once(tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path,
        router=_ENVOY,
        candidate={"model": "m", "version": "2"},
        stable={"model": "m", "version": "1", "model_dir": "gone"},
        metrics={"kind": "static"},
    )
    code, out = invoke("validate", str(spec))
    said = " ".join(out.split())
    assert code == EXIT_ERROR, said
    assert "candidate: m:2 names no model folder" in said, said
    assert "stable: m:1 has no model folder gone" in said, said


@pytest.mark.parametrize(
    ("router", "stable", "told"),
    [
        pytest.param(
            _ISTIO,
            {"model": "m", "version": "1", "image": "registry/m:1"},
            "stable m:1 deployable by the istio router (image registry/m:1)",
            id="istio",
        ),
        pytest.param(
            _ENVOY,
            {"model": "m", "version": "1", "model_dir": "{pkg1}"},
            "stable m:1 deployable by the envoy router (model folder {pkg1})",
            id="envoy",
        ),
    ],
)
def test_validate_says_it_checked_both_releases_deploy(
    tmp_path: Path, router: dict[str, str], stable: dict[str, str], told: str
) -> None:
    pkg1 = _model_folder(tmp_path / "pkg1")
    stable = {key: value.format(pkg1=pkg1) for key, value in stable.items()}
    candidate = _deployable_candidate(router, tmp_path)
    spec = write_spec(
        tmp_path, router=router, candidate=candidate, stable=stable, metrics={"kind": "static"}
    )
    code, out = invoke("validate", str(spec))
    said = " ".join(out.split())
    assert code == 0, said
    assert "candidate m:2 deployable by the" in said, said
    assert told.format(pkg1=pkg1) in said, said


def test_an_abort_queued_while_promoting_says_when_it_comes_too_late(tmp_path: Path) -> None:
    # Was "the controller acts at its next tick" alone: once the running controller has begun
    # deploying the candidate to green, the abort is dropped (a ledger note), not acted on.
    spec = write_spec(tmp_path)
    from rollout.api import open_store
    from rollout.core.types import Phase
    from tests.core.helpers import V2

    store = open_store(spec)
    store.save(Status(name="cli", id="r1", phase=Phase.PROMOTING, candidate=V2))
    with store.lease("ann's controller"):
        code, out = invoke("abort", str(spec))
    said = " ".join(out.split())
    assert code == 0, said
    assert said == (
        "queued abort for rollout cli; the controller acts at its next tick (unless it has "
        "begun deploying the candidate to green by then: the promotion then completes, and "
        "the ledger says the abort was dropped)"
    )


@pytest.mark.parametrize(
    ("model", "shown"),
    [
        # ESC recoloured the terminal and OSC 0 set its title; BEL, DEL and C1 (CSI) likewise.
        pytest.param("m\x1b[31mRED\x1b]0;pwned\x07", "m\\x1b[31mRED\\x1b]0;pwned\\x07", id="esc"),
        pytest.param("m\x7f\x9b31m\x08", "m\\x7f\\x9b31m\\x08", id="del-c1-backspace"),
    ],
)
def test_control_characters_in_names_are_shown_escaped_never_sent_to_the_terminal(
    tmp_path: Path, model: str, shown: str
) -> None:
    spec = write_spec(
        tmp_path,
        candidate={"model": model, "version": "2"},
        stable={"model": model, "version": "1"},
    )
    assert invoke("run", str(spec), "--simulated-time", "-q")[0] == EXIT_PROMOTED
    for command in (["explain"], ["status"], ["status", "--watch"]):
        code, out = invoke(*command, str(spec))
        assert code == EXIT_PROMOTED, out
        assert not [c for c in out if (ord(c) < 32 and c != "\n") or 127 <= ord(c) < 160], out
        assert f"{shown}:2" in out, (command, out)
