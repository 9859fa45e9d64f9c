"""What `aml-rollout up` prints to copy and paste survives an 80-column terminal intact.

Was: rich hard-wrapped the curl lines inside the quoted `-H`/`-d` arguments, so a pasted command
sent a header holding a newline (Envoy answers 400). And the spec it writes loads again, with the
product's plan (the shadow step first).
"""

from __future__ import annotations

import io
import shlex
from pathlib import Path
from types import SimpleNamespace

import yaml
from rich.console import Console

from rollout.commands.stack import _print_spec_hint, _print_urls, _write_spec
from rollout.config import load_spec
from rollout.core.types import Colour
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
