"""`aml-rollout up` as a user runs it: URLs printed, curl-able, and a clean stop.

Stopped by `--duration` and by SIGTERM (what Ctrl-C in a terminal and a process manager send
end the same way): afterwards no scoring process is recorded as running and every port the
stack printed is free again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from rollout.local.process import kill_group, pid_alive, port_is_free
from tests.cli import CLI, run_cli, stop_and_wait
from tests.local.conftest import MakeRelease

pytestmark = pytest.mark.slow


def ports_in(text: str) -> set[int]:
    return {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", text)}


def scoring_pids(workdir: Path) -> list[int]:
    return [
        int(json.loads(p.read_text())["pid"]) for p in (workdir / "workloads").glob("*.proc.json")
    ]


def process_state(pid: int) -> str | None:
    """The State line of /proc/<pid>/status ("Z (zombie)", "S (sleeping)"); None once reaped."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in status.splitlines()
                 if line.startswith("State:")), None)  # fmt: skip


def start_up(workdir: Path | None, *options: str) -> tuple[subprocess.Popen[str], str]:
    """Start `aml-rollout up` and read its output until it has printed the URLs (90 s at most)."""
    process = subprocess.Popen(
        [*CLI, "up", *(["--workdir", str(workdir)] if workdir else []), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert process.stdout is not None
    output = ""
    deadline = time.monotonic() + 90
    while "GET: which colour" not in output and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        output += line
    return process, output


def test_up_with_a_duration_prints_the_urls_and_stops_clean(tmp_path: Path) -> None:
    done = run_cli("up", "--duration", "2", "--workdir", str(tmp_path / "stack"), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "x-api-version" not in done.stdout  # no candidate: no blue curl line
    assert "/score" in done.stdout and "stack stopped" in done.stdout
    ports = ports_in(done.stdout)
    assert len(ports) >= 4
    assert all(port_is_free(p) for p in ports)
    assert scoring_pids(tmp_path / "stack") == []


def test_up_serves_until_sigterm_then_stops_clean(tmp_path: Path) -> None:
    process, output = start_up(tmp_path / "stack")
    try:
        url = re.search(r"(http://127\.0\.0\.1:\d+)/score", output)
        assert url, output
        answer = httpx.get(f"{url.group(1)}/score", timeout=10).json()
        assert answer["colour"] == "green"
        pids = scoring_pids(tmp_path / "stack")
        assert pids and all(pid_alive(p) for p in pids)
    finally:
        rest, _ = stop_and_wait(process)
    assert process.returncode == 0, output + rest
    assert "stack stopped" in rest
    assert not any(pid_alive(p) for p in pids)
    assert all(port_is_free(p) for p in ports_in(output))


def test_up_reaps_a_server_another_process_stopped(
    tmp_path: Path, make_release: MakeRelease
) -> None:
    # Was: a controller in another process rolled back past blue (stopped it by PID), and blue
    # stayed a zombie (<defunct>) under `up` until `up` exited: only its parent can reap it.
    green, blue = make_release("1"), make_release("2")
    assert green.model_dir and blue.model_dir
    options = ("--model-dir", green.model_dir, "--candidate-dir", blue.model_dir)
    process, output = start_up(tmp_path / "stack", *options)
    try:
        records = [
            json.loads(p.read_text()) for p in (tmp_path / "stack/workloads").glob("*.proc.json")
        ]
        blue_pid = next((int(r["pid"]) for r in records if r["colour"] == "blue"), None)
        assert blue_pid is not None, output
        kill_group(blue_pid)  # as another process's controller stops it
        deadline = time.monotonic() + 5
        while process_state(blue_pid) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_state(blue_pid) is None, f"blue is {process_state(blue_pid)} under `up`"
        assert process.poll() is None, output
    finally:
        rest, _ = stop_and_wait(process)
    assert process.returncode == 0, output + rest


def test_up_in_a_temporary_folder_keeps_it_when_a_rollout_left_its_ledger() -> None:
    # Was: the temporary folder was removed at stop, with the ledger of the rollout the user had
    # just run against the stack (the spec `up` writes keeps its state there).
    process, output = start_up(None)
    found = re.search(r"(\S*aml-rollout-stack-\w+)", output)
    assert found, output
    workdir = Path(found.group(1))
    try:
        (workdir / "state").mkdir(exist_ok=True)
        (workdir / "state" / "local.ledger.jsonl").write_text("{}\n")
        rest, _ = stop_and_wait(process)
        assert process.returncode == 0, output + rest
        assert "stack stopped" in rest
        assert f"kept {workdir}" in rest and "local.ledger.jsonl" in rest
        assert (workdir / "state" / "local.ledger.jsonl").read_text() == "{}\n"
        assert scoring_pids(workdir) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


def test_up_killed_hard_takes_its_children_along(tmp_path: Path) -> None:
    """SIGKILL runs no cleanup: Linux's parent-death signal stops Envoy, Prometheus and green."""
    process, output = start_up(tmp_path / "stack")
    try:
        ports = ports_in(output)
        pids = scoring_pids(tmp_path / "stack")
        assert len(ports) >= 4 and pids, output
        assert not any(port_is_free(p) for p in ports)
    finally:
        process.kill()
        process.communicate(timeout=30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in pids) and all(port_is_free(p) for p in ports):
            break
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in pids), "green's scoring server outlived `up`"
    assert all(port_is_free(p) for p in ports), "a port of the stack is still bound"


def test_the_demos_default_folder_is_new_even_within_one_second(tmp_path: Path) -> None:
    # Was runs/demo-<second>: two demos started in the same second shared it, and the second
    # was refused ("another local stack runs in .../stack") about a folder the user never chose.
    from datetime import UTC, datetime

    from rollout.commands.stack import default_demo_folder

    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    folders = [default_demo_folder(tmp_path / "runs", now) for _ in range(3)]
    assert [f.name for f in folders] == [
        "demo-20260101T120000",
        "demo-20260101T120000-2",
        "demo-20260101T120000-3",
    ]
    assert all(f.is_dir() for f in folders)
