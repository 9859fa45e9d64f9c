"""`explain` tells a metrics outage that changed nothing, and when the metrics came back; it
reads a ledger one line at a time."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from rollout.ledger import explain, iter_ledger, latest_ticks, read_ledger
from rollout.report import render_html, stories_from_ledger

T0 = 1_700_000_000.0
DOWN = "metrics unreadable (Prometheus at http://127.0.0.1:9090 is unreachable); holding"
COUNTS = {"blue": {"requests": 10, "errors": 0}, "green": {"requests": 190, "errors": 0}}


def tick(n: int, reason: str, *, verdict: str, counts: bool = True, **extra: Any) -> dict:
    record = {
        "tick": n,
        "at": T0 + n,
        "phase": extra.pop("phase", "Progressing"),
        "phase_before": extra.pop("phase_before", "Progressing"),
        "weight": 5,
        "verdict": verdict,
        "reason": reason,
        "actions": [],
        **extra,
    }
    if counts:
        record["counts"] = COUNTS
    return record


def test_an_outage_that_changed_nothing_is_told_with_its_end() -> None:
    # Measured on the live stack: Prometheus down 12 s mid-step, the weights held, and explain
    # went from "blue to 5 %" straight to the promotion, the outage nowhere.
    records = [
        {"event": "start", "at": T0, "name": "d", "plan": [5, 100]},
        tick(1, "step 5 % has 10 of 100 canary requests needed", verdict="Inconclusive"),
        *(tick(n, DOWN, verdict="Error", counts=False) for n in (2, 3, 4)),
        tick(5, "step 5 % has 40 of 100 canary requests needed", verdict="Inconclusive"),
        tick(6, "step 5 % has 80 of 100 canary requests needed", verdict="Inconclusive"),
        {"event": "start", "at": T0 + 10, "name": "d", "plan": [5, 100]},
        tick(1, DOWN, verdict="Error", counts=False, at=T0 + 11),
        tick(
            2,
            "held for a human: metrics unreadable 4 times in a row",
            verdict="Inconclusive",
            counts=False,
            phase="Paused",
            at=T0 + 12,
        ),
    ]
    story = explain(records)
    assert story[1:3] == [f"[2 s] {DOWN}", "[5 s] metrics readable again after 3 s"]
    # The second rollout: its outage, then its hold (no "readable again": it never was).
    assert story[3].startswith("started rollout d")
    assert story[4:6] == [
        f"[1 s] {DOWN}",
        "[2 s] Paused: held for a human: metrics unreadable 4 times in a row",
    ]
    assert "readable again" not in " ".join(story[3:])


def test_the_ticks_a_drifted_data_plane_served_are_told_as_not_counted() -> None:
    # Measured on a memory router edited by hand: the story said the hold and the resume, not
    # that the metrics of the held tick and of the resume's (spanning the hold) were left out.
    drift = "the data plane changed under this rollout"
    records = [
        {"event": "start", "at": T0, "name": "d", "plan": [5, 100]},
        tick(1, "step 5 % has 10 of 100 canary requests needed", verdict="Inconclusive"),
        tick(2, f"held for a human: {drift}", verdict="Inconclusive", phase="Paused",
             not_counted=drift),
        tick(3, f"held for a human: {drift}", verdict="Inconclusive", phase="Paused",
             phase_before="Paused", not_counted=drift),
        tick(4, "resumed by ann", verdict="Inconclusive", phase_before="Paused",
             commands=["resume: resumed by ann"], not_counted=drift),
        tick(5, "step 5 % has 10 of 100 canary requests needed", verdict="Inconclusive"),
        tick(6, f"held for a human: {drift}", verdict="Inconclusive", phase="Paused",
             not_counted=drift),
    ]  # fmt: skip
    story = explain(records)
    assert story[1:4] == [
        f"[2 s] Paused: held for a human: {drift}",
        "[4 s] operator resume: resumed by ann → Progressing",
        f"[4 s] ticks 2–4 not counted as the candidate's evidence: {drift}",
    ]
    assert story[5] == f"[6 s] tick 6 not counted as the candidate's evidence: {drift}"
    assert story[6].startswith("[6 s] still Paused")


def test_a_refused_resume_is_told_as_changing_nothing_not_as_a_phase_entered_again() -> None:
    # Was "operator resume: ignored, ..." then a bare "Paused", read as held once more.
    held = "held for a human: the data plane changed under this rollout"
    records = [
        {"event": "start", "at": T0, "name": "d", "plan": [5, 100]},
        tick(1, held, verdict="Inconclusive", phase="Paused"),
        tick(2, held, verdict="Inconclusive", phase="Paused", phase_before="Paused",
             commands=["resume: ignored, green now serves m:5, not m:1: abort it"]),
    ]  # fmt: skip
    assert explain(records)[2] == (
        "[2 s] operator resume: ignored, green now serves m:5, not m:1: abort it → still Paused"
    )


def test_a_rollout_whose_start_line_was_lost_is_told_as_its_own_from_its_first_line() -> None:
    # A controller stopped between saving the status and appending the start line resumes
    # with no start line: its ticks were told as the previous rollout's, timed from its start
    # (the report cut there, at the new rollout_id).
    promoted = "Green_100: promoted m:2; blue removed"
    records = [
        {"event": "start", "at": T0, "name": "d", "plan": [5, 100], "rollout_id": "a"},
        tick(1, "started: blue at 5 %", verdict=None, phase_before="Initializing",
             actions=[{"type": "set_weights", "blue": 5}], rollout_id="a"),
        tick(2, promoted, verdict="Successful", phase="Succeeded", rollout_id="a"),
        tick(1, "started: blue at 5 %", verdict=None, phase_before="Initializing",
             actions=[{"type": "set_weights", "blue": 5}], rollout_id="b", at=T0 + 3600),
        tick(2, "Green_100: promoted m:3; blue removed", verdict="Successful", phase="Succeeded",
             rollout_id="b", at=T0 + 3610),
    ]  # fmt: skip
    story = explain(records)
    assert story[3:] == [
        "rollout b (its start line is missing from the ledger)",
        "[0 s] Progressing: started: blue at 5 %",
        "[10 s] Succeeded: Green_100: promoted m:3; blue removed",
    ]


def test_a_pause_of_a_paused_rollout_is_told_as_changing_nothing() -> None:
    # Was "operator pause: paused by ann → Paused", as if this pause had paused it.
    records = [
        {"event": "start", "at": T0, "name": "d", "plan": [5, 100]},
        tick(1, "paused by ann", verdict="Inconclusive", phase="Paused",
             commands=["pause: paused by ann"]),
        tick(2, "paused by ann", verdict="Inconclusive", phase="Paused", phase_before="Paused",
             commands=["pause: paused by ann"]),
    ]  # fmt: skip
    assert explain(records)[1:3] == [
        "[1 s] operator pause: paused by ann → Paused",
        "[2 s] operator pause: paused by ann → still Paused",
    ]


def test_a_data_plane_that_could_not_be_read_is_told_once_per_span() -> None:
    down = "deployment diabetes-blue has 2 containers"
    waiting = "step 5 % has 10 of 100 canary requests needed"
    records = [
        {"event": "start", "at": T0, "name": "d", "plan": [5, 100]},
        tick(1, waiting, verdict="Inconclusive"),
        *(tick(n, waiting, verdict="Inconclusive", data_plane_unread=down) for n in (2, 3, 4)),
        tick(5, waiting, verdict="Inconclusive"),
        tick(6, waiting, verdict="Inconclusive", data_plane_unread="HTTP 503"),
    ]
    story = explain(records)
    assert story[1:3] == [
        f"[4 s] ticks 2–4: what the data plane serves could not be read ({down}); changes to "
        "it went unnoticed",
        "[6 s] tick 6: what the data plane serves could not be read (HTTP 503); changes to it "
        "went unnoticed",
    ]
    assert story[3].startswith("[6 s] still Progressing")


def _long_ledger(path: Path, ticks: int) -> None:
    """A rollout of `ticks` ticks, each line a real one's shape and size (~1 KB)."""

    def check(n: int) -> dict[str, float]:
        keys = ("baseline_bad", "baseline_requests", "canary_bad", "canary_requests")
        logs = ("log_e_low", "log_e_ok", "log_e_ratio", "log_e_worse")
        return {
            **{k: n + i for i, k in enumerate(keys)},
            **{k: n / 7 + i for i, k in enumerate(logs)},
        }

    lines = [{"event": "start", "at": T0, "name": "d", "rollout_id": "r", "plan": [5, 100]}]
    lines += [
        tick(n, f"step 5 % has {n} of 9999 canary requests needed", verdict="Inconclusive",
             rollout_id="r", checks={"errors": check(n), "slow": check(n + 1)}, since=T0,
             tick_counts={c: {"errors": n, "requests": n + 1, "slow": n + 2} for c in COUNTS},
             judge="step 5 %", describe=[], held=False, step=1, threshold_ok=20.0,
             threshold_worse=20.0, worse_weights={"errors": 0.75, "slow": 0.25})
        for n in range(1, ticks + 1)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_explain_and_the_report_do_not_hold_the_whole_ledger(tmp_path: Path) -> None:
    # Measured: a 110 MB ledger took 890 MB to explain, 830 MB to report: every record held
    # (here both peaked at 7 times the ledger's size).
    ledger = tmp_path / "d.ledger.jsonl"
    _long_ledger(ledger, 1500)
    size = ledger.stat().st_size
    for tell, bound in (
        (lambda: explain(iter_ledger(ledger)), size / 4),  # a few lines at a time
        (lambda: render_html(stories_from_ledger(ledger), title="t"), size * 3),  # its rows
    ):
        tracemalloc.start()
        try:
            told = tell()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert told and peak < bound, (peak, size)


def test_a_ledger_read_while_its_rollout_writes_it_is_read_as_it_was(tmp_path: Path) -> None:
    # Read in two passes: a line appended between them was in the second alone.
    ledger = tmp_path / "d.ledger.jsonl"
    _long_ledger(ledger, 3)
    records = iter_ledger(ledger)
    first = next(records)
    with ledger.open("a") as fh:
        fh.write(json.dumps(tick(3, "done again", verdict="Inconclusive", rollout_id="r")) + "\n")
    assert [first.get("tick"), *(r["tick"] for r in records)] == [None, 1, 2, 3]
    assert [r.get("reason") for r in read_ledger(ledger)][-1] == "done again"


def _run(
    tenure: str | None, ticks: range | list[int], by: str, rollout_id: str = "r", **extra: Any
) -> list[dict[str, Any]]:
    stamp = {"tenure": tenure} if tenure else {}
    return [
        tick(n, f"{by} {n}", verdict="Inconclusive", rollout_id=rollout_id, **stamp, **extra)
        for n in ticks
    ]


@pytest.mark.parametrize(
    ("lines", "read"),
    [
        # Measured (real processes, a fake kube-apiserver): A frozen in a slow query, B took the
        # lease over and ran ticks 7..9; A woke and appended its tick 7 before its save was
        # refused. Read as B's ticks done again, explain dropped B's steps.
        pytest.param(
            [*_run("a", range(1, 7), "A"), *_run("b", range(7, 10), "B"), *_run("a", [7], "A")],
            [*(f"A {n}" for n in range(1, 7)), "B 7", "B 8", "B 9"],
            id="a-superseded-holders-line-hides-nothing",
        ),
        pytest.param(
            [
                *_run("a", range(1, 3), "A"),
                *_run("b", range(3, 5), "B"),
                *_run("a", [3], "A", phase="RolledBack"),  # a rollback that never happened
            ],
            ["A 1", "A 2", "B 3", "B 4"],
            id="nor-tells-a-decision-never-persisted",
        ),
        pytest.param(  # A killed between its tick 4's line and its save: B does tick 4 again
            [*_run("a", range(1, 5), "A"), *_run("b", range(4, 6), "B")],
            ["A 1", "A 2", "A 3", "B 4", "B 5"],
            id="a-tick-done-again-by-the-next-holder-is-still-left-out",
        ),
        pytest.param(
            [*_run("a", range(1, 3), "A"), *_run("b", [3], "B"), *_run("a2", range(4, 6), "A")],
            ["A 1", "A 2", "B 3", "A 4", "A 5"],
            id="a-holder-taking-the-lease-again-is-a-new-tenure",
        ),
        pytest.param(  # ledgers of earlier versions carry no tenure: read as they were
            [*_run(None, range(1, 7), "A"), *_run(None, range(7, 10), "B"), *_run(None, [7], "A")],
            [*(f"A {n}" for n in range(1, 7)), "A 7"],
            id="an-unstamped-ledger-reads-as-before",
        ),
        # Measured: a dry run (`state.kind: memory`, no lease) of the same name wrote the real
        # rollout's ledger while it ran; its tenure, begun later, hid every later real tick,
        # and `explain` told the dry run's RolledBack for a Succeeded rollout.
        pytest.param(
            [
                *_run("a", range(1, 3), "A"),
                *_run("d", range(1, 3), "D", rollout_id="dry"),
                *_run("a", range(3, 5), "A"),
            ],
            ["A 1", "A 2", "D 1", "D 2", "A 3", "A 4"],
            id="another-rollouts-tenure-supersedes-none-of-this-ones",
        ),
        pytest.param(
            [
                line
                for n in range(1, 4)
                for line in (*_run("a", [n], "A"), *_run("d", [n], "D", rollout_id="dry"))
            ],
            ["A 1", "D 1", "A 2", "D 2", "A 3", "D 3"],
            id="nor-when-their-lines-alternate",
        ),
        pytest.param(  # and within each rollout, a superseded tenure is still left out
            [
                *_run("a", range(1, 3), "A"),
                *_run("d", [1], "D", rollout_id="dry"),
                *_run("b", range(3, 5), "B"),
                *_run("a", [3], "A"),
                *_run("d", [2], "D", rollout_id="dry"),
            ],
            ["A 1", "A 2", "D 1", "B 3", "B 4", "D 2"],
            id="a-superseded-holder-among-two-rollouts",
        ),
    ],
)
def test_the_lines_of_a_controller_that_lost_its_lease_hide_no_later_holders_ticks(
    tmp_path: Path, lines: list[dict[str, Any]], read: list[str]
) -> None:
    ledger = tmp_path / "r.ledger.jsonl"
    ledger.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert [r["reason"] for r in read_ledger(ledger)] == read
    assert [r["reason"] for r in latest_ticks(lines)] == read


UNREACHABLE = "Prometheus at http://127.0.0.1:9 is unreachable"


def test_an_outage_while_paused_by_an_operator_is_told_as_an_outage(tmp_path: Path) -> None:
    # Measured: "[11 s] operator pause: paused by ann → Paused", "[21 s] paused by ann" (the
    # outage's first tick, told by its reason: the pause's), "[51 s] metrics readable again".
    from rollout.api import load_spec, open_store, run_rollout
    from rollout.controller import FakeClock
    from rollout.core.status import Command, Status
    from tests.engine.specs import write_spec

    def ok(blue: int, green: int) -> dict[str, Any]:
        return {"blue": {"requests": blue, "errors": 0}, "green": {"requests": green, "errors": 1}}

    down = {"error": UNREACHABLE}
    ticks = [ok(50, 450), ok(60, 540), down, down, down, ok(90, 810)]
    spec = load_spec(
        write_spec(tmp_path, metrics={"kind": "static", "ticks": ticks}, analysis={
            "min_requests": 100, "latency": {"enabled": False}})
    )  # fmt: skip
    store = open_store(spec)
    seen = [0]

    def pause_after_the_second_tick(status: Status, record: dict[str, Any]) -> None:
        seen[0] += 1
        if seen[0] == 2:
            store.push_command(Command(id="p", kind="pause", by="ann"))

    result = run_rollout(spec, clock=FakeClock(0.0), on_tick=pause_after_the_second_tick,
                         max_ticks=8)  # fmt: skip
    story = explain(iter_ledger(result.ledger_path))
    assert story[2:5] == [
        "[11 s] operator pause: paused by ann → Paused",
        f"[21 s] metrics unreadable ({UNREACHABLE})",
        "[51 s] metrics readable again after 30 s",
    ]


HELD = "held for a human: step 5 % inconclusive after 600 s: 10 of 100 canary requests needed"


@pytest.mark.parametrize(
    ("first_down", "told"),
    [
        pytest.param(
            tick(2, HELD, verdict="Error", counts=False, phase="Paused", phase_before="Paused",
                 metrics_error=UNREACHABLE),
            [f"[2 s] metrics unreadable ({UNREACHABLE})"],
            id="held-for-a-human-not-held-again",
        ),
        pytest.param(
            tick(2, "paused by ann", verdict="Error", counts=False, phase="Paused",
                 commands=["pause: paused by ann"], metrics_error=UNREACHABLE),
            [f"[2 s] metrics unreadable ({UNREACHABLE})",
             "[2 s] operator pause: paused by ann → Paused"],
            id="its-first-tick-carrying-a-command",
        ),
        pytest.param(
            tick(2, HELD, verdict="Error", counts=False, phase="Paused", phase_before="Paused",
                 metrics_error="metrics unusable: blue's error count is negative"),
            ["[2 s] metrics unusable: blue's error count is negative"],
            id="unusable-said-in-its-own-words",
        ),
        pytest.param(  # a ledger line without the error (earlier versions): its reason
            tick(2, "metrics unreadable (HTTP 503); holding", verdict="Error", counts=False),
            ["[2 s] metrics unreadable (HTTP 503); holding"],
            id="no-metrics-error-its-reason",
        ),
    ],
)  # fmt: skip
def test_the_first_tick_of_an_outage_is_told_from_its_metrics_error(
    first_down: dict[str, Any], told: list[str]
) -> None:
    # Its `reason` is the phase's (a pause's, a hold's): only the `metrics_error` says the outage.
    before = {"phase": first_down["phase_before"]}
    records = [
        {"event": "start", "at": T0, "name": "d", "plan": [5, 100]},
        tick(1, HELD if before["phase"] == "Paused" else "step 5 %", verdict="Inconclusive",
             **({"phase": "Paused", "phase_before": "Progressing"} if before["phase"] == "Paused"
                else {})),
        first_down,
        tick(3, first_down["reason"], verdict="Inconclusive", phase=first_down["phase"],
             phase_before=first_down["phase"]),
    ]  # fmt: skip
    after_tick_1 = [line for line in explain(records) if not line.startswith(("started", "[1 s]"))]
    assert after_tick_1[: len(told) + 1] == [*told, "[3 s] metrics readable again after 1 s"]


def test_a_hold_for_the_outage_on_its_first_tick_tells_it_once() -> None:
    # (max_consecutive_errors 1: the hold's reason names the error; not told twice.)
    held = f"held for a human: metrics unreadable 1 times in a row: {UNREACHABLE}"
    records = [
        {"event": "start", "at": T0, "name": "d", "plan": [5, 100]},
        tick(1, "step 5 %", verdict="Inconclusive"),
        tick(2, held, verdict="Error", counts=False, phase="Paused", metrics_error=UNREACHABLE),
    ]
    assert explain(records)[1:3] == [f"[2 s] Paused: {held}", f"[2 s] still Paused: {held}"]


def test_a_frozen_controller_s_line_after_a_restarted_rollout_began_is_stale(
    tmp_path: Path,
) -> None:
    # Measured (the first per-rollout ranking): A (rollout r1) lost its lease, B began rollout
    # r2 with `run --restart`; A woke and appended its tick. Ranked per rollout alone, A's line
    # was no longer stale: a third "rollout", the latest one the report and the demo told.
    def start(rollout_id: str, at: float) -> dict[str, Any]:
        return {"event": "start", "at": at, "rollout_id": rollout_id, "name": "r"}

    lines = [
        start("r1", T0),
        *_run("a", range(1, 4), "A", rollout_id="r1"),
        start("r2", T0 + 3.5),
        *_run("b", range(1, 3), "B", rollout_id="r2"),
        *_run("a", [4], "A", rollout_id="r1"),
    ]
    ledger = tmp_path / "r.ledger.jsonl"
    ledger.write_text("".join(json.dumps(line) + "\n" for line in lines))
    told = [r["reason"] for r in read_ledger(ledger) if "tick" in r]
    assert told == ["A 1", "A 2", "A 3", "B 1", "B 2"]
    assert [r["reason"] for r in latest_ticks(lines) if "tick" in r] == told
