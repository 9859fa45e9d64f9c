"""The demo's live panel and its words about the faulty candidate.

An ended rollout reads as ended, the next line starts on its own, the shadow step shows its
mirror, and "users never received an answer from v3" is said only when the load generator saw
none while blue stayed at 0 %. Was: the promoted v2 showed `step 1 (blue 0 %)` next to
Succeeded, and into a pipe (`make demo`) the next line was glued to the panel's border:
`╯Succeeded: Green_100: ...`.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlparse

import pytest
from rich.console import Console
from rich.live import Live

from rollout.core.status import Status
from rollout.core.types import Phase, Release
from rollout.local.demo import Exposure, _LiveView, end_live, exposure
from tests.cli import run_cli
from tests.fakes.server import LocalServer
from tests.local.conftest import MakeRelease

V1 = Release(model="diabetes", version="1")
V2 = Release(model="diabetes", version="2")


class Load:
    def snapshot(self) -> SimpleNamespace:
        return SimpleNamespace(rps=120.0, p99_ms=4.2)


def rendered(status: Status) -> str:
    view = _LiveView("diabetes-v2", Load())
    view.tick(status, {"step": status.step_index, "verdict": "Successful", "reason": status.reason})
    out = io.StringIO()
    Console(file=out, width=120, color_system=None).print(view.render())
    return out.getvalue()


@pytest.mark.parametrize(
    ("phase", "serving"),
    [
        pytest.param(Phase.SUCCEEDED, "diabetes:2", id="promoted-candidate-serves"),
        pytest.param(Phase.ROLLED_BACK, "diabetes:1", id="rolled-back-stable-serves"),
    ],
)
def test_an_ended_rollout_says_who_serves_not_a_step(phase: Phase, serving: str) -> None:
    status = Status(name="d", phase=phase, step_index=1, blue_weight=0, candidate=V2, stable=V1)
    text = rendered(status)
    assert f"done: green serves {serving} (100 %)" in text
    assert "(blue 0 %)" not in text


def test_a_running_rollout_shows_its_step() -> None:
    status = Status(
        name="d", phase=Phase.PROGRESSING, step_index=1, blue_weight=50, candidate=V2, stable=V1
    )
    assert "1 (blue 50 %)" in rendered(status)


def test_the_line_after_a_live_panel_in_a_pipe_starts_fresh() -> None:
    out = io.StringIO()
    console = Console(file=out, width=80)
    with Live("panel", console=console, transient=False):
        pass
    end_live(console)
    console.print("Succeeded: promoted")
    assert out.getvalue().splitlines()[-1] == "Succeeded: promoted"


def test_the_shadow_step_shows_the_mirror() -> None:
    status = Status(
        name="d", phase=Phase.PROGRESSING, step_index=0, blue_weight=0, mirror=5, candidate=V2
    )
    text = rendered(status)
    assert "0 (shadow: blue 0 % + 5 % mirrored)" in text
    assert "blue 0 % / green 100 %, 5 % mirrored to blue (answers discarded)" in text


# ------------------------------------------------------------------- what users got from v3

V3 = Release(model="diabetes", version="3")


def load(by_status: dict[str, int], by_version: dict[str, int]) -> SimpleNamespace:
    return SimpleNamespace(by_status=by_status, by_version=by_version)


BEFORE = load({"200": 1000}, {"green/diabetes:2": 1000})
SHADOW_LEDGER = [
    {"event": "start"},
    {"weight": 0, "mirror": 5, "reason": "started"},
    {"weight": 0, "mirror": 5, "checks": {"errors": {"canary_requests": 9, "canary_bad": 4}}},
    {"weight": 0, "mirror": 5, "checks": {"errors": {"canary_requests": 20, "canary_bad": 11}}},
    {"weight": 0, "reason": "rolled back at the shadow step (5 % mirrored): ..."},
]


def test_a_shadow_rollback_nobody_saw_says_so_with_the_judges_counts() -> None:
    after = load({"200": 1400}, {"green/diabetes:2": 1400})
    seen = exposure(BEFORE, after, V3, SHADOW_LEDGER)
    assert seen == Exposure(
        answers=0, errors_5xx=0, max_weight=0, judged=20, judged_bad=11, mirror=5
    )
    assert seen.story("v3") == (
        "users never received an answer from v3: it was judged on 20 mirrored copies of their "
        "requests (5 % shadow, 11 answered 500), whose answers Envoy discarded"
    )


@pytest.mark.parametrize(
    ("after", "ledger", "told"),
    [
        pytest.param(
            load({"200": 1390, "500": 10}, {"green/diabetes:2": 1390}),
            SHADOW_LEDGER,
            "users received 0 answers from v3 and 10 5xx",
            id="client-5xx",
        ),
        pytest.param(
            load({"200": 1400}, {"green/diabetes:2": 1395, "blue/diabetes:3": 5}),
            SHADOW_LEDGER,
            "users received 5 answers from v3 and 0 5xx",
            id="answer-from-v3",
        ),
        pytest.param(
            load({"200": 1400}, {"green/diabetes:2": 1400}),
            [*SHADOW_LEDGER, {"weight": 5}],
            "blue reached 5 %",
            id="blue-took-live-traffic",
        ),
    ],
)
def test_otherwise_the_story_says_what_users_got(
    after: SimpleNamespace, ledger: list[dict[str, object]], told: str
) -> None:
    story = exposure(BEFORE, after, V3, ledger).story("v3")
    assert "never" not in story
    assert told in story


def test_the_outputs_are_one_line_each_at_80_columns(tmp_path: Path) -> None:
    # Was wrapped after "aml-rollout": pasted, the hint ran a command without its ledger.
    from rollout.local.demo import DemoResult, print_outputs

    # Brackets: printed, not read as markup. A space: the hint, pasted, still names one file
    # (was unquoted: `explain` got two arguments).
    out = tmp_path / "my runs" / "demo-[20260101T120000]"
    ledger = out / "stack" / "state" / "diabetes-v2.ledger.jsonl"
    result = DemoResult(out, out / "report.html", ledgers=[ledger])
    buffer = io.StringIO()
    print_outputs(Console(file=buffer, width=80), result, 52.4)
    lines = buffer.getvalue().splitlines()
    hints = [line for line in lines if line.startswith(f"ledger:  {ledger}   (")]
    assert len(hints) == 1
    hint = hints[0].removeprefix(f"ledger:  {ledger}   (").removesuffix(")")
    assert shlex.split(hint) == ["aml-rollout", "rollout", "explain", str(ledger)]
    assert f"report:  {out / 'report.html'}" in lines
    assert f"outputs: {out}   (52 s)" in lines


def test_a_demo_into_an_earlier_demos_folder_is_refused_before_anything_starts(
    make_release: MakeRelease, tmp_path: Path
) -> None:
    # Was: the stack started and v1 was trained, then "register: not registered, the gate
    # refused the model (exit 3); `--param force=true` registers it anyway" (no such option).
    from aml_pipelines.registry.local import LocalRegistry

    LocalRegistry(tmp_path / "registry").register(
        "diabetes", Path(str(make_release("1").model_dir))
    )
    done = run_cli("demo", "--out", str(tmp_path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == (
        f"error: {tmp_path} holds an earlier demo's registry (diabetes up to v1): the story "
        "starts from an empty one; give a new --out"
    )
    assert not (tmp_path / "stack").exists()


@pytest.mark.parametrize(
    ("where", "why"),
    [
        pytest.param("file", "it is not a folder", id="a-file"),
        pytest.param("file/out", "Not a directory", id="under-a-file"),
    ],
)
def test_a_demo_out_that_cannot_be_a_folder_says_so_in_one_line(
    tmp_path: Path, where: str, why: str
) -> None:
    # Was: a FileExistsError / NotADirectoryError traceback from mkdir.
    (tmp_path / "file").write_text("not a folder")
    done = run_cli("demo", "--out", str(tmp_path / where))
    assert done.returncode == 2, done.stdout + done.stderr
    assert (
        done.stderr.strip()
        == f"error: cannot write the demo's outputs in {tmp_path / where}: {why}"
    )


def test_a_rollout_interrupted_into_a_pipe_leaves_the_next_line_on_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Was: Ctrl-C in `make demo | tee log` printed `╰──...──╯interrupted: the stack is stopped`
    # (the line was ended only when the rollout returned).
    import rollout.api
    from rollout.local.demo import _rollout

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(rollout.api, "run_rollout", interrupted)
    stack = SimpleNamespace(
        spec=lambda *args, **kwargs: None,
        router=None,
        metrics=None,
        prometheus=SimpleNamespace(url="http://127.0.0.1:9"),
    )
    out = io.StringIO()
    console = Console(file=out, width=100)
    with pytest.raises(KeyboardInterrupt):
        _rollout(stack, "diabetes-v2", V2, Load(), console, clock=None)  # type: ignore[arg-type]
    console.print("interrupted: the stack is stopped")
    assert out.getvalue().splitlines()[-1] == "interrupted: the stack is stopped"


# ------------------------------------------------------- latency: Envoy's, not the client's alone


def test_the_panel_shows_the_latency_envoy_measured_and_labels_the_clients() -> None:
    # Was "load  118 req/s, p99 2261.3 ms": the load generator's own p99, its scheduling lag on a
    # busy machine included, next to a judge that saw no request above 250 ms.
    view = _LiveView("diabetes-v2", Load(), latency=lambda: {"blue": 6.31, "green": 4.8})
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(view.render())
    text = out.getvalue()
    assert "p99 as Envoy measured it (last 10 s): blue 6.3 ms, green 4.8 ms" in text
    assert "SLO 250 ms" in text
    assert "p99 4.2 ms" not in text  # the client's figure, unlabelled


def test_the_panel_says_when_envoys_latency_cannot_be_read() -> None:
    view = _LiveView("diabetes-v2", Load(), latency=dict)
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(view.render())
    assert "p99 as Envoy measured it (last 10 s): not available" in out.getvalue()


def test_the_final_load_lines_label_each_latency_by_who_measured_it() -> None:
    from rollout.local.demo import load_summary

    final = SimpleNamespace(
        sent=9098, rps=120.6, by_version={"green/diabetes:1": 9098}, p99_ms=2283.94
    )
    lines = load_summary(final, {"blue": 7.0, "green": 5.123}, 75.4, 120.0)
    assert lines[0] == (
        "load: 9098 requests in 75 s, 121 of the 120 req/s asked, "
        "by version {'green/diabetes:1': 9098}"
    )
    assert lines[1] == (
        "latency: p99 as Envoy measured it over the load's 75 s (what the judge reads): "
        "blue 7.0 ms, green 5.1 ms"
    )
    assert lines[2] == (
        "         client-side p99 2283.9 ms (this process's load generator, its own delays on a "
        "busy machine included)"
    )


class _Prometheus(BaseHTTPRequestHandler):
    answer: bytes = b""

    def do_GET(self) -> None:
        query = parse_qs(urlparse(self.path).query)["query"][0]
        assert "envoy_cluster_upstream_rq_time_bucket" in query and "[10s]" in query
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(self.answer)))
        self.end_headers()
        self.wfile.write(self.answer)

    def log_message(self, *args: object) -> None:
        pass


def test_envoys_p99_is_read_per_colour_from_prometheus() -> None:
    from rollout.local.demo import envoy_p99_ms

    # A colour with no requests in the window has a NaN quantile: left out, not "nan ms".
    _Prometheus.answer = json.dumps(
        {
            "status": "success",
            "data": {
                "resultType": "vector",
                "result": [
                    {"metric": {"envoy_cluster_name": "green"}, "value": [1, "4.95"]},
                    {"metric": {"envoy_cluster_name": "blue"}, "value": [1, "NaN"]},
                ],
            },
        }
    ).encode()
    server = LocalServer(_Prometheus)
    server.start()
    try:
        assert envoy_p99_ms(server.url, 10) == {"green": 4.95}
    finally:
        server.stop()
    assert envoy_p99_ms(server.url, 10) == {}  # stopped: nothing to show, no error


def test_envoys_latency_is_read_on_its_own_thread_never_in_a_redraw(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Was: read in `render`, in the controller's tick: every other tick held up to 0.7 s.
    from rollout.local import demo

    readers: list[str] = []

    def read(url: str, window_s: float, **_: object) -> dict[str, float]:
        readers.append(threading.current_thread().name)
        return {"blue": 1.0 + len(readers)}

    monkeypatch.setattr(demo, "envoy_p99_ms", read)
    with demo.EnvoyLatency("http://127.0.0.1:9") as latency:
        for _ in range(500):
            if readers:
                break
            time.sleep(0.01)
        view = _LiveView("diabetes-v2", Load(), latency=latency)
        out = io.StringIO()
        Console(file=out, width=200, color_system=None).print(view.render())
    assert re.search(r"p99 as Envoy measured it \(last 10 s\): blue \d+\.0 ms", out.getvalue())
    assert set(readers) == {"demo-latency"}
