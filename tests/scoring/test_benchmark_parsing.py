"""The scoring benchmark: reading wrk's report (units, error lines), its arguments, --only."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from benchmarks.scoring import parse_wrk
from tests.squatter import Squatter, squat_first_start

WRK_OUTPUT = """\
Running 1s test @ http://127.0.0.1:5995/score
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   534.04us    1.03ms  15.04ms   90.20%
    Req/Sec     8.84k     3.90k   14.94k    60.00%
  Latency Distribution
     50%  136.00us
     75%  378.00us
     90%    1.53ms
     99%    4.25ms
  8790 requests in 1.00s, 1.75MB read
Requests/sec:   8765.57
Transfer/sec:      1.75MB
"""


def test_parse_wrk_reads_rate_and_percentiles_in_ms() -> None:
    result = parse_wrk(WRK_OUTPUT)
    assert result.rps == pytest.approx(8765.57)
    assert result.p50_ms == pytest.approx(0.136)
    assert result.p99_ms == pytest.approx(4.25)
    assert (result.non_2xx, result.errors) == (0, 0)


def test_parse_wrk_counts_failures() -> None:
    failing = WRK_OUTPUT.replace("     99%    4.25ms", "     99%    1.20s") + (
        "  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 7\n"
    )
    result = parse_wrk(failing)
    assert result.p99_ms == pytest.approx(1200.0)
    assert (result.non_2xx, result.errors) == (7, 3)


def test_only_ours_and_fastapi_never_create_the_azureml_venv(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import benchmarks.scoring as bench

    def no_venv() -> Path:
        raise AssertionError("pip-installed the AML server for a run that does not measure it")

    measured: list[str] = []

    def fake_measure(name: str, *_: object) -> dict[str, float]:
        measured.append(name)
        return {"rps_c1": 1.0, "rps_c8": 2.0, "p50_ms": 1.0, "p99_ms": 2.0}

    monkeypatch.setattr(bench.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(bench, "ensure_azureml_venv", no_venv)
    monkeypatch.setattr(bench, "build_model", lambda out: out)
    monkeypatch.setattr(bench, "measure", fake_measure)
    assert bench.main(["--only", "ours", "--only", "fastapi", "--json"]) == 0
    assert measured == ["ours", "fastapi"]
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["ratio_vs_fastapi"] == 1.0 and payload["ratio_vs_azureml"] is None


@pytest.mark.parametrize("seconds", ["0", "0.5", "-2", "nan"])
def test_seconds_below_one_is_exit_2(capsys: pytest.CaptureFixture[str], seconds: str) -> None:
    from benchmarks.scoring import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--seconds", seconds])
    assert exit_info.value.code == 2
    assert "--seconds must be at least 1" in capsys.readouterr().err


def test_a_venv_pip_cannot_create_is_an_error_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import benchmarks.scoring as bench
    from benchmarks.azureml_env import AzuremlEnvUnavailable

    def no_pip() -> None:
        raise AzuremlEnvUnavailable("`pip install ...` failed: No matching distribution found")

    monkeypatch.setattr(bench.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(bench, "ensure_azureml_venv", no_pip)
    assert bench.main(["--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: azureml-inference-server-http: `pip install ...` failed: No")
    assert "--only" in err


def test_without_wrk_one_error_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import benchmarks.scoring as bench

    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    assert bench.main(["--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: wrk is not installed: apt-get install -y wrk\n"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "squatted"),
    [
        pytest.param("ours", 0, id="ours-inherits-its-socket"),
        pytest.param("fastapi", 1, id="fastapi-moves-off-a-taken-port"),
    ],
)
def test_a_benchmarked_server_answers_on_a_port_no_other_server_holds(
    name: str, squatted: int, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Was: three free ports chosen up front, each bound by its server minutes later; one taken
    # meanwhile failed the run ("exited: ... address already in use"), or measured the taker.
    import benchmarks.scoring as bench

    squatter = Squatter()
    try:
        squat_first_start(squatter, monkeypatch)
        with bench.started(name, model_dir, Path("azmlinfsrv")) as url:
            assert len(squatter.servers) == squatted
            assert httpx.URL(url).port not in [s.server_address[1] for s in squatter.servers]
            body = {"data": [[0.0] * 10]}
            assert httpx.post(url, json=body, timeout=5).status_code == 200
    finally:
        squatter.close()


def test_without_json_stdout_is_the_json_line_and_the_ratios_go_to_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/scoring.md: "table on stderr, JSON on stdout". The ratio line went to stdout, and a
    run with --only printed `ours/azureml rps (c8): Nonex` for the server it did not measure."""
    import json

    import benchmarks.scoring as bench

    monkeypatch.setattr(bench.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(bench, "build_model", lambda out: out)
    monkeypatch.setattr(
        bench, "measure", lambda *_: {"rps_c1": 1.0, "rps_c8": 2.0, "p50_ms": 1.0, "p99_ms": 2.0}
    )
    assert bench.main(["--only", "ours", "--only", "fastapi"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["ratio_vs_fastapi"] == 1.0
    assert err.splitlines()[-1] == "ours/fastapi rps (c8): 1.0x"


SIGTERM_MID_RUN = """
import os, signal, sys, time
import benchmarks.scoring as bench

start = bench._start


def recorded_start(*args):
    proc, url = start(*args)
    print(proc.pid, flush=True)  # the server, in its own session: SIGTERM to us misses it
    return proc, url


def sigterm_mid_run(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)


bench.shutil.which = lambda name: f"/usr/bin/{name}"
bench.build_model = lambda out: out
bench.server_command = lambda *args: ([sys.executable, "-c", "import time; time.sleep(60)"], {})
bench._start = recorded_start
bench._wait_until_scoring = lambda *args: None
bench.run_wrk = sigterm_mid_run
sys.exit(bench.main(["--only", "fastapi", "--seconds", "1"]))
"""


def test_sigterm_stops_the_server_and_removes_the_temp_dir(tmp_path: Path) -> None:
    # A server (our stand-in: a sleeping process) in its own session, stopped only by the
    # `finally` SIGTERM skipped: it kept running, listening, and the temp dir stayed.
    import os
    import signal
    import subprocess
    import sys

    from rollout.local.process import pid_alive

    root = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        [sys.executable, "-c", SIGTERM_MID_RUN],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
        env={**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(root)},
    )
    server = int(run.stdout.split()[0])
    try:
        assert run.returncode == 130, run.stderr
        assert run.stderr.endswith("interrupted: the server is stopped and its temp dir removed\n")
        assert list(tmp_path.glob("bench-scoring-*")) == []
        assert not pid_alive(server)
    finally:
        if pid_alive(server):
            os.kill(server, signal.SIGKILL)
