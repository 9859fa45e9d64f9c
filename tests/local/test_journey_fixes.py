"""What a new user met following the README and docs (a user-journey review), each fixed.

- A package folder served under whatever release the spec names (its package.json says another
  model or version): refused by `validate`, `run` and the envoy router's scoring servers.
- `validate` said ok for a spec whose `stable:` names the candidate, which `run` refuses while green
  serves nothing (now a warning: on a green serving another release `run` goes on), and for a model
  folder of several packages, which the scoring server refuses at deploy.
- The unreachable-admin error of a stack `up` ran gave a plain `aml-rollout up` (a new stack
  and spec: the rollout abandoned), not the command that starts that stack again.
- `explain` cut the restart command mid-backtick (the ledger kept 200 characters).
- The demo's last words printed a load generator's backlog as its client-side p99.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from rollout.cli import app
from rollout.core.types import Colour, Release
from rollout.errors import DeployFailed, RouterUnavailable
from tests.engine.specs import write_spec

runner = CliRunner()
SHA = "d3a0" + "0" * 60
ENVOY = {"kind": "envoy", "admin_url": "http://127.0.0.1:9", "routes_file": "routes.json"}


def _package(folder: Path, **package: str) -> Path:
    """A package folder as the package component writes it (package.json + model/model.json),
    without the model file: what the checks read before any server starts."""
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.json").write_text(json.dumps({"name": "diabetes", "sha256": SHA}))
    (folder / "package.json").write_text(json.dumps({"sha256": SHA, **package}))
    return folder


def _validate(tmp_path: Path, **releases: object) -> tuple[int, str]:
    spec = write_spec(tmp_path, router=ENVOY, metrics={"kind": "static"}, **releases)
    result = runner.invoke(app, ["rollout", "validate", str(spec)])
    return result.exit_code, " ".join(result.output.split())


# ----------------------------------------------------------- 1: package.json names the release


@pytest.mark.parametrize(
    ("release", "message"),
    [
        pytest.param(
            {"model": "diabetes", "version": "3"},
            "candidate: diabetes:3 names version 3, but its model folder {folder} is the package "
            "of diabetes:2 ({folder}/package.json): another release's package",
            id="bumped-version-same-sha256",
        ),
        pytest.param(
            {"model": "iris", "version": "2"},
            "candidate: iris:2 names model iris, but its model folder {folder} is the package "
            "of diabetes:2 ({folder}/package.json): another release's package",
            id="another-model",
        ),
    ],
)
def test_validate_refuses_a_package_of_another_release(
    tmp_path: Path, release: dict[str, str], message: str
) -> None:
    # Was: `validate` said "candidate diabetes:3 deployable", and `run` promoted v2's bits as
    # diabetes:3 (the spec's sha256 was v2's, so the sha256 check matched).
    folder = _package(tmp_path / "packages" / "diabetes" / "2", model="diabetes", version="2")
    candidate = {**release, "sha256": SHA, "model_dir": str(folder)}
    code, said = _validate(tmp_path, candidate=candidate, stable=None)
    assert code == 2, said
    assert message.format(folder=folder) in said, said


def test_run_refuses_a_package_of_another_release_before_deploying(tmp_path: Path) -> None:
    folder = _package(tmp_path / "pkg", model="diabetes", version="2")
    candidate = {"model": "diabetes", "version": "3", "model_dir": str(folder)}
    spec = write_spec(tmp_path, router=ENVOY, metrics={"kind": "static"}, candidate=candidate)
    result = runner.invoke(app, ["rollout", "run", str(spec)])
    said = " ".join(result.output.split())
    assert result.exit_code == 2, said
    assert "is the package of diabetes:2" in said, said
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


def test_validate_accepts_the_package_of_the_release_it_names(tmp_path: Path) -> None:
    folder = _package(tmp_path / "pkg", model="diabetes", version=2)  # type: ignore[arg-type]
    candidate = {"model": "diabetes", "version": "2", "model_dir": str(folder)}
    code, said = _validate(tmp_path, candidate=candidate, stable=None)
    assert code == 0, said


def test_a_bare_model_folder_or_a_package_without_a_version_takes_the_releases(
    tmp_path: Path,
) -> None:
    from rollout.api import check_deployable
    from rollout.config import load_spec

    spec = load_spec(write_spec(tmp_path, router=ENVOY, metrics={"kind": "static"}))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.json").write_text(json.dumps({"name": "diabetes", "sha256": SHA}))
    unversioned = _package(tmp_path / "unversioned", model="diabetes")
    for folder in (bare, unversioned):
        check_deployable(spec, Release("diabetes", "9", model_dir=str(folder)), "candidate")


def test_the_scoring_server_refuses_a_package_of_another_release(tmp_path: Path) -> None:
    # The controller's own check: a recorded release (a resume) pointing at a package folder a
    # later run rewrote with another version.
    from rollout.local.workloads import ScoringProcesses

    folder = _package(tmp_path / "pkg", model="diabetes", version="2")
    workloads = ScoringProcesses(tmp_path / "workloads")
    release = Release("diabetes", "9", sha256=SHA, model_dir=str(folder))
    with pytest.raises(DeployFailed) as refused:
        workloads.start(Colour.GREEN, release)
    # For green, a promotion's deploy (a rollout begun before the check): the way out named.
    assert re.fullmatch(
        r"cannot deploy diabetes:9 to green: .* is the package of diabetes:2 \(.*\), not of "
        r"diabetes:9; if a rollout is promoting it, abort that rollout \(`aml-rollout rollout "
        r"abort SPEC`, then `run`\): all traffic goes back to green's release",
        str(refused.value),
    ), refused.value
    with pytest.raises(DeployFailed) as refused:
        workloads.start(Colour.BLUE, release)
    assert str(refused.value).endswith("not of diabetes:9"), refused.value
    assert workloads.records() == []


def test_the_version_a_server_answers_comes_from_package_json_when_it_names_one(
    tmp_path: Path,
) -> None:
    # `--version` overrode package.json's: the server answered the spec's version whatever the
    # package held. Kept only for a folder that records none.
    from rollout.local.workloads import ScoringProcesses

    workloads = ScoringProcesses(tmp_path / "workloads")
    package = _package(tmp_path / "pkg", model="diabetes", version="2")
    bare = tmp_path / "bare"
    bare.mkdir()
    argv = workloads._serve_argv(Release("diabetes", "2"), str(package), Colour.BLUE, 3)
    assert "--version" not in argv
    argv = workloads._serve_argv(Release("diabetes", "2"), str(bare), Colour.BLUE, 3)
    assert argv[argv.index("--version") + 1] == "2"


# ------------------------------------------- 4: validate on stable: = candidate, and a model folder


def test_validate_warns_of_a_stable_release_that_is_the_candidate(tmp_path: Path) -> None:
    # A warning, not an error: `run` refuses it only while green serves nothing; on a green
    # serving another release it reads no `stable:` and rolls the candidate out.
    folder = _package(tmp_path / "pkg2", model="m", version="2")
    release = {"model": "m", "version": "2", "model_dir": str(folder)}
    code, said = _validate(tmp_path, candidate=release, stable=release)
    assert code == 0, said
    assert (
        "warning: `stable:` names the candidate m:2: `run` refuses it while green serves nothing "
        "(a rollout compares the candidate with another release; for a service's first release, "
        "`aml-rollout rollout bootstrap SPEC --release m:2`), and reads no `stable:` while green "
        "serves another release" in said
    ), said


def test_validate_says_nothing_of_a_stable_release_of_other_bits(tmp_path: Path) -> None:
    candidate = {"model": "m", "version": "2", "model_dir": str(_package(tmp_path / "a"))}
    stable = {**candidate, "version": "1"}
    code, said = _validate(tmp_path, candidate=candidate, stable=stable)
    assert (code, "warning" in said) == (0, False), said


def test_validate_refuses_a_model_folder_holding_several_packages(tmp_path: Path) -> None:
    # The scoring server cannot pick one: begun, the rollout Failed at its deploy and stayed
    # Failed with the spec fixed ("already ended").
    for version in ("1", "2"):
        _package(tmp_path / "packages" / version, model="m", version=version)
    release = {"model": "m", "version": "2", "model_dir": str(tmp_path / "packages")}
    code, said = _validate(tmp_path, candidate=release)
    assert code == 2, said
    assert (
        f"candidate: m:2's model folder {tmp_path / 'packages'} cannot be served: "
        f"{tmp_path / 'packages'} holds 2 model or package folders (1, 2): give one of them"
    ) in said, said


# ------------------------------------------------- 3: the unreachable admin of a stack `up` ran


def test_an_unreachable_admin_of_a_stack_gives_the_command_that_starts_it_again(
    tmp_path: Path,
) -> None:
    from rollout.routers.envoy import EnvoyFiles, EnvoyRouter

    stack = tmp_path / "wd"
    (stack / "envoy").mkdir(parents=True)
    (stack / "envoy" / "envoy.json").write_text("{}")  # `up`'s bootstrap: a stack's folder
    releases = {
        colour: {
            "release": {"model": "m", "version": version, "model_dir": f"/pk/{version}"},
            "endpoint": {"host": "127.0.0.1", "port": 8001},
        }
        for colour, version in (("green", "1"), ("blue", "2"))
    }
    (stack / "releases.json").write_text(json.dumps(releases))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))  # bound, not listening: refused for the whole test
        router = EnvoyRouter(
            admin_url=f"http://127.0.0.1:{probe.getsockname()[1]}",
            files=EnvoyFiles(stack / "envoy" / "routes.json"),
            releases_file=stack / "releases.json",
        )
        with pytest.raises(RouterUnavailable) as unreachable:
            router.deploy(Colour.BLUE, Release("m", "2", model_dir="/pk/2"))
        router.close()
    said = str(unreachable.value)
    assert f"`aml-rollout up --workdir {stack} --model-dir /pk/1 --candidate-dir /pk/2`" in said
    assert "use the spec it writes" not in said


# --------------------------------------------------------------- 5: explain keeps the hint whole


def test_why_the_data_plane_was_unread_keeps_the_restart_command_whole() -> None:
    from rollout.controller import UNREAD_CHARS, clipped

    stack = "/tmp/day-journey/up1/wd"
    folders = f"--model-dir {stack}/packages/diabetes/1 --candidate-dir {stack}/packages/diabetes/2"
    why = (
        "cannot read Envoy's config at http://127.0.0.1:42371: [Errno 111] Connection refused "
        f"(no Envoy there any more; a stack `aml-rollout up` ran in {stack} starts again with "
        f"`aml-rollout up --workdir {stack} {folders}`, and the rollout resumes on it)"
    )
    assert clipped(why, UNREAD_CHARS) == why


def test_a_longer_reason_is_cut_at_a_word_and_says_so() -> None:
    from rollout.controller import clipped

    assert clipped("one two three four", 12) == "one two…"
    assert clipped("one two three four", 18) == "one two three four"
    assert clipped("x" * 30, 10) == "x" * 9 + "…"  # no space to cut at
    assert clipped("why: " + "x" * 30, 20) == "why: " + "x" * 14 + "…"  # one long word
    assert all(len(clipped("ab cd " * 50, n)) <= n for n in range(1, 60))


# ------------------------------------------------------- 7: the demo's load on a busy machine


def _final(sent: int, seconds: float, p99_ms: float) -> SimpleNamespace:
    return SimpleNamespace(
        sent=sent,
        elapsed_s=seconds,
        rps=sent / seconds,
        by_version={"green/diabetes:1": sent},
        p99_ms=p99_ms,
    )


def test_the_load_summary_says_when_the_load_generator_fell_behind() -> None:
    # Measured at load average 7: 8738 requests in 151 s (58 of 120 req/s), and the client's
    # "p99 77346.4 ms" was the generator's backlog, not anyone's latency.
    from rollout.local.demo import load_summary

    lines = load_summary(_final(8738, 151.0, 77346.4), {"blue": 10.4}, 151.0, 120.0)
    text = "\n".join(lines)
    assert "load: 8738 requests in 151 s, 58 of the 120 req/s asked" in lines[0], text
    assert "the load generator fell behind" in lines[0], text
    assert lines[1].startswith("latency: p99 as Envoy measured it"), text
    assert "client-side p99 77346.4 ms" not in text
    assert "client-side p99 not shown: the load generator fell behind" in lines[2], text


def test_the_load_summary_gives_the_client_p99_when_the_rate_was_kept() -> None:
    from rollout.local.demo import load_summary

    lines = load_summary(_final(18000, 150.0, 12.34), {"blue": 10.4}, 150.0, 120.0)
    assert lines[0].startswith("load: 18000 requests in 150 s, 120 of the 120 req/s asked"), lines
    assert "fell behind" not in "\n".join(lines)
    assert lines[2] == (
        "         client-side p99 12.3 ms (this process's load generator, its own delays on a "
        "busy machine included)"
    )


def test_a_package_of_another_model_without_a_version_is_named_plainly(tmp_path: Path) -> None:
    folder = _package(tmp_path / "pkg", model="diabetes")
    candidate = {"model": "iris", "version": "2", "model_dir": str(folder)}
    code, said = _validate(tmp_path, candidate=candidate, stable=None)
    assert code == 2, said
    assert f"is the package of diabetes:(no version) ({folder}/package.json)" in said, said
