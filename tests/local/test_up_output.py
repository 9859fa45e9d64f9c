"""What `aml-rollout up` prints to copy and paste survives an 80-column terminal intact.

Was: rich hard-wrapped the curl lines inside the quoted `-H`/`-d` arguments, so a pasted command
sent a header holding a newline (Envoy answers 400). And the spec it writes loads again, with the
product's plan (the shadow step first).
"""

from __future__ import annotations

import io
import shlex
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from rich.console import Console

from rollout.commands.stack import _print_spec_hint, _print_urls, _write_spec
from rollout.config import load_spec
from rollout.core.status import SetWeights
from rollout.core.types import Colour, Phase, Release, Weights
from rollout.local.stack import LocalStack
from rollout.routers.envoy import Endpoint

URL = "http://127.0.0.1:45678"


def fake_stack(workdir: Path) -> SimpleNamespace:
    served = {Colour.GREEN: Endpoint("127.0.0.1", 41001), Colour.BLUE: Endpoint("127.0.0.1", 41002)}
    return SimpleNamespace(
        url=URL,
        envoy=SimpleNamespace(admin_url="http://127.0.0.1:45679"),
        prometheus=SimpleNamespace(url="http://127.0.0.1:45680"),
        workloads=SimpleNamespace(endpoint_of=served.get),
        workdir=workdir,
    )


def render(tmp_path: Path) -> list[str]:
    out = io.StringIO()
    console = Console(file=out, width=80, color_system=None)
    _print_urls(console, fake_stack(tmp_path), blue=True)
    spec = tmp_path / "a-folder-with-a-rather-long-name-to-cross-80-columns" / "rollout.yaml"
    _print_spec_hint(console, spec, blue=True)
    return out.getvalue().splitlines()


def test_curl_lines_are_whole_at_80_columns(tmp_path: Path) -> None:
    curls = [line for line in render(tmp_path) if line.startswith("curl ")]
    assert len(curls) == 3
    for line in curls:
        argv = shlex.split(line, comments=True)  # every quote closed on the same line
        assert argv[:3] == ["curl", "-s", f"{URL}/score"]
    posts = [shlex.split(line) for line in curls if " -d " in line]
    assert len(posts) == 2
    for argv in posts:
        assert "content-type: application/json" in argv
        body = argv[argv.index("-d") + 1]
        assert body.startswith('{"data": [[0.03,') and body.endswith("-0.02]]}")
    assert any("x-api-version: blue" in shlex.split(line) for line in curls)


def test_the_rollout_hint_is_one_line(tmp_path: Path) -> None:
    lines = render(tmp_path)
    hint = [line for line in lines if "aml-rollout rollout run" in line]
    assert len(hint) == 1
    assert hint[0].endswith("/a-folder-with-a-rather-long-name-to-cross-80-columns/rollout.yaml")


def test_the_rollout_hint_pastes_as_one_command_whatever_the_folder(tmp_path: Path) -> None:
    # Was unquoted: with a space in --workdir, `rollout run` got two arguments, neither a spec.
    out = io.StringIO()
    spec = tmp_path / "my stack" / "rollout.yaml"
    _print_spec_hint(Console(file=out, width=80, color_system=None), spec, blue=True)
    hints = [line for line in out.getvalue().splitlines() if "aml-rollout rollout run" in line]
    assert len(hints) == 1
    command = hints[0].split("roll blue out live:", 1)[1]
    assert shlex.split(command) == ["aml-rollout", "rollout", "run", str(spec)]


def test_the_spec_up_writes_loads(tmp_path: Path) -> None:
    spec = load_spec(_write_spec(LocalStack(tmp_path), None, Console()))  # (never started)
    assert (spec.plan, spec.shadow_percent) == ((0, 5, 25, 50, 100), 5)
    assert spec.router.kind == "envoy" and spec.metrics.kind == "prometheus"
    # Latency against an SLO, not green's p99 bucket (1-5 ms here): that rolled back a healthy
    # candidate at the shadow step. Errors keep the product's defaults.
    latency = spec.analysis.latency
    assert (latency.threshold, latency.slo_ms) == ("slo", 250)
    assert spec.analysis.errors == type(spec.analysis.errors)()


def test_up_again_on_a_folder_keeps_its_specs_edits_and_candidate(tmp_path: Path) -> None:
    """Was: `up --workdir D`, as the router's error says to resume a rollout, rewrote D's spec
    whole: a user's edits were lost and its candidate became null."""
    path = _write_spec(LocalStack(tmp_path), None, Console())
    edited = yaml.safe_load(path.read_text(encoding="utf-8"))
    edited["analysis"]["alpha"] = 0.01
    edited["candidate"] = {"model": "m", "version": "2", "model_dir": "/pk/m2"}
    path.write_text(yaml.safe_dump(edited), encoding="utf-8")
    again = LocalStack(tmp_path)  # a new stack: its own ports
    out = io.StringIO()
    spec = load_spec(_write_spec(again, None, Console(file=out)))
    assert spec.analysis.alpha == 0.01
    assert spec.candidate is not None and spec.candidate.model_dir == "/pk/m2"
    assert spec.metrics.url == again.metrics_config().url  # what names the stack is new
    assert out.getvalue() == ""


def test_up_again_moves_a_spec_that_no_longer_loads_aside(tmp_path: Path) -> None:
    path = tmp_path / "rollout.yaml"
    path.write_text("analysis: {alpha: 7}\n", encoding="utf-8")
    out = io.StringIO()
    spec = load_spec(_write_spec(LocalStack(tmp_path), None, Console(file=out, width=300)))
    assert spec.analysis.alpha == 0.05
    assert (tmp_path / "rollout.yaml.previous").read_text(encoding="utf-8") == (
        "analysis: {alpha: 7}\n"
    )
    assert f"moved to {tmp_path / 'rollout.yaml.previous'}" in out.getvalue()


def test_the_get_hint_says_what_get_score_answers_as_the_docs_do(tmp_path: Path) -> None:
    """GET /score answers the colour too (scoring.scorer.Scorer.identity); the hint left it out
    while docs/local-stack.md named it."""
    (get,) = [line for line in render(tmp_path) if line.startswith("curl ") and " -d " not in line]
    docs = (Path(__file__).parents[2] / "docs" / "local-stack.md").read_text(encoding="utf-8")
    (documented,) = [line for line in docs.splitlines() if "# GET:" in line]
    assert get.partition("#")[2] == documented.partition("#")[2]
    assert "colour, model and version" in get


# ------------------------------------------------------- `up` started again under a rollout


def test_the_spec_up_writes_holds_a_rollout_only_after_a_restarts_worth_of_error_ticks(
    tmp_path: Path,
) -> None:
    """Was: the product's 4 unreadable ticks (4 s at `up`'s 1 s interval): a rollout was held
    for a human 4 s after Prometheus ended, before `up` could be started again."""
    from rollout.commands.stack import RESTART_TICKS

    spec = load_spec(_write_spec(LocalStack(tmp_path), None, Console()))
    assert spec.analysis.max_consecutive_errors == RESTART_TICKS
    assert RESTART_TICKS * spec.analysis.interval_s >= 60  # a minute at least, to restart `up`


def stored_rollout(workdir: Path, **fields: object) -> None:
    """The spec `up` writes in `workdir`, and a rollout status of it in `workdir/state`."""
    from rollout.core.status import Status
    from rollout.state.file import FileStateStore

    _write_spec(LocalStack(workdir), None, Console(file=io.StringIO()))
    FileStateStore(workdir / "state", "local").save(Status(name="local", **fields))  # type: ignore[arg-type]


GREEN = Release("diabetes", "1", sha256="a" * 64, model_dir="/m/1")
BLUE = Release("diabetes", "2", sha256="b" * 64, model_dir="/m/2")
SHADOW = {"phase": Phase.PROGRESSING, "mirror": 5, "stable": GREEN, "candidate": BLUE}


@pytest.mark.parametrize(
    ("fields", "green", "blue", "served", "said"),
    [
        pytest.param(SHADOW, GREEN, BLUE, Weights.blue_at(0, 5), "weights restored", id="shadow"),
        pytest.param(
            {**SHADOW, "phase": Phase.PAUSED, "mirror": 0, "blue_weight": 25, "held": True},
            GREEN,
            BLUE,
            Weights.blue_at(25),
            "weights restored",
            id="held-at-25",
        ),
        pytest.param(
            SHADOW, GREEN, None, Weights.blue_at(0), "blue serves nothing", id="no-candidate-dir"
        ),
        pytest.param(
            {**SHADOW, "blue_weight": 5, "mirror": 0},
            replace(GREEN, sha256="c" * 64),
            BLUE,
            Weights.blue_at(0),
            "green serves diabetes:1, not diabetes:1",
            id="another-green",
        ),
        pytest.param(
            {**SHADOW, "pending": (SetWeights(5),), "blue_weight": 5, "mirror": 0},
            GREEN,
            BLUE,
            Weights.blue_at(0),
            "actions left to apply",
            id="actions-pending",
        ),
        pytest.param(
            {**SHADOW, "phase": Phase.ROLLED_BACK}, GREEN, BLUE, Weights.blue_at(0), "", id="ended"
        ),
        pytest.param(None, GREEN, BLUE, Weights.blue_at(0), "", id="no-rollout"),
    ],
)
def test_up_again_serves_the_weights_of_the_rollout_in_progress_in_its_folder(
    tmp_path: Path,
    fields: dict[str, object] | None,
    green: Release,
    blue: Release | None,
    served: Weights,
    said: str,
) -> None:
    """Was: `up --workdir D` started again always served blue 0 % (no mirror): a rollout's
    `run` then read a data plane it had not set and held for a human, blaming "another rollout
    ..., or a hand edit". Its weights are served again when the colours serve its releases."""
    from rollout.commands.stack import _rollout_in_progress, _weights_to_serve

    if fields is not None:
        stored_rollout(tmp_path, **fields)
    weights, words = _weights_to_serve(_rollout_in_progress(tmp_path), green, blue)
    assert weights == served
    assert said in words
    assert bool(words) is bool(said)


def test_up_again_asks_for_the_ports_its_rollouts_spec_names_while_free(tmp_path: Path) -> None:
    """Was: new Envoy admin and Prometheus ports at each start, so a `rollout run` still running
    never reached the stack started again: it ticked Errors until held for a human."""
    import socket

    from rollout.commands.stack import _rollout_in_progress

    stored_rollout(tmp_path, **SHADOW)
    spec = yaml.safe_load((tmp_path / "rollout.yaml").read_text())
    with socket.socket() as free_a, socket.socket() as taken:
        free_a.bind(("127.0.0.1", 0))
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin, busy = free_a.getsockname()[1], taken.getsockname()[1]
        free_a.close()
        spec["router"]["admin_url"] = f"http://127.0.0.1:{admin}"
        spec["metrics"]["url"] = f"http://127.0.0.1:{busy}"
        (tmp_path / "rollout.yaml").write_text(yaml.safe_dump(spec))
        resumed = _rollout_in_progress(tmp_path)
        assert resumed is not None
        assert resumed.ports() == (admin, None)  # a port taken since: a new one


def test_prometheus_ended_says_how_long_a_rollout_holds_and_how_it_goes_on(
    tmp_path: Path,
) -> None:
    """Was: "its weights hold; stop `up` and start it again": the rollout was held for a human
    after 4 ticks, and did not go on by itself once `up` was back."""
    from rollout.commands.stack import _OutageAdvice, _up_again, _watch

    stack = SimpleNamespace(
        workloads=SimpleNamespace(reap=lambda: None, endpoint_of=lambda colour: None),
        envoy=SimpleNamespace(ended=lambda: None),
        prometheus=SimpleNamespace(ended=lambda: "prometheus was killed by SIGKILL"),
        router=SimpleNamespace(release=lambda colour: None),
    )
    again = _up_again(tmp_path / "a b", GREEN, BLUE)
    colours = ["--model-dir", "/m/1", "--candidate-dir", "/m/2"]
    assert shlex.split(again)[2:] == ["--workdir", str(tmp_path / "a b"), *colours]
    out = io.StringIO()
    advice = _OutageAdvice(120, again, tmp_path / "rollout.yaml")
    _watch(Console(file=out, width=80, soft_wrap=True), stack, set(), None, advice)  # as `up`
    text = " ".join(out.getvalue().split())
    assert "after 120 such ticks in a row (analysis.max_consecutive_errors)" in text
    assert "held for a human" in text
    assert f"`{again}`" in text
    assert f"rollout resume {tmp_path / 'rollout.yaml'}" in text
