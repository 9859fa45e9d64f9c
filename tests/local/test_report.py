"""The HTML report from ledgers written by the real Ledger: weights, decisions, self-contained."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rollout.api import bootstrap, bootstrap_checked, run_rollout
from rollout.config import spec_from_dict
from rollout.controller import FakeClock
from rollout.core.types import Phase, Release
from rollout.ledger import Ledger
from rollout.report import render_html, stories_from_ledger, story_from_ledger, write_report
from tests.metrics.fake_prometheus import FakePrometheus

T0 = 1_700_000_000.0


def tick(at: float, phase: str, weight: int, reason: str, *, blue: int | None = None) -> dict:
    actions = [] if blue is None else [{"type": "set_weights", "blue": blue}]
    return {
        "tick": int(at - T0),
        "at": at,
        "phase": phase,
        "weight": weight,
        "verdict": "Inconclusive",
        "reason": reason,
        "actions": actions,
        "counts": {"blue": {"requests": 10, "errors": 1}, "green": {"requests": 90, "errors": 0}},
    }


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    path = tmp_path / "diabetes-v3.ledger.jsonl"
    book = Ledger(path, fsync=False)
    book.append(tick(T0 + 1, "Progressing", 10, "started: blue at 10 %", blue=10))
    book.append(tick(T0 + 2, "Progressing", 10, "step 10 % has 11 of 100 canary requests"))
    book.append(tick(T0 + 3, "Progressing", 50, "step 10 % passed", blue=50))
    book.append(
        tick(T0 + 4, "RolledBack", 0, "rolled back at step 50 %: canary error rate 29 %", blue=0)
    )
    return path


def test_story_has_the_served_weights_and_each_decision(ledger: Path) -> None:
    story = story_from_ledger(ledger)
    assert story.name == "diabetes-v3"
    assert story.outcome == "RolledBack"
    assert [v for _, v in story.weights.points] == [10, 10, 50, 0]
    assert [d.kind for d in story.decisions] == ["passed", "passed", "rolled back"]
    assert story.end - story.start == pytest.approx(3.0)


def test_the_shadow_step_is_drawn_as_blue_mirrored(tmp_path: Path, ledger: Path) -> None:
    path = tmp_path / "shadow.ledger.jsonl"
    book = Ledger(path, fsync=False)
    book.append({**tick(T0 + 1, "Progressing", 0, "started", blue=0), "mirror": 5})
    book.append(tick(T0 + 2, "Progressing", 10, "the shadow step (5 % mirrored) passed", blue=10))
    story = story_from_ledger(path)
    assert [v for _, v in story.mirror.points] == [5, 0]
    assert "blue mirrored (shadow)" in render_html([story], title="t")
    # A rollout without a shadow step has no such line, nor its legend.
    plain = story_from_ledger(ledger)
    assert plain.mirror.points == []
    assert "blue mirrored (shadow)" not in render_html([plain], title="t")


def test_html_is_self_contained_with_charts_and_the_reasons(ledger: Path) -> None:
    page = render_html([story_from_ledger(ledger)], title="t")
    assert page.count("<svg") == 1  # weights only: no Prometheus series given
    assert "<script" not in page
    assert not re.findall(r"(?:src|href)=", page)  # nothing fetched from anywhere
    assert "canary error rate 29 %" in page
    assert page.count('stroke-dasharray="4 3"') == 3


def test_report_survives_an_unreadable_prometheus(ledger: Path, tmp_path: Path) -> None:
    with FakePrometheus() as prom:  # answers /api/v1/query only: query_range fails
        out = write_report(tmp_path / "r.html", [ledger], prometheus_url=prom.url)
    assert out.read_text().count("<svg") == 1


def test_an_empty_ledger_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.ledger.jsonl").write_text("")
    with pytest.raises(ValueError, match="no ticks"):
        story_from_ledger(tmp_path / "x.ledger.jsonl")


def test_a_rollout_restarted_on_the_same_ledger_is_its_own_story(tmp_path: Path) -> None:
    # `run --restart` appends to the rollout's ledger: a rollback then a promotion was drawn
    # as one "Succeeded" rollout spanning both, the rollback's rows and marker inside it.
    path = tmp_path / "diabetes.ledger.jsonl"
    book = Ledger(path, fsync=False)
    book.append({"event": "bootstrap", "at": T0 - 10, "release": {"model": "diabetes"}})
    for rollout_id, t0, end, reason in (
        ("first", T0, "RolledBack", "rolled back at step 10 %: canary error rate 29 %"),
        ("second", T0 + 60, "Succeeded", "Green_100: promoted diabetes:3; blue removed"),
    ):
        book.append({"event": "start", "at": t0, "name": "diabetes", "rollout_id": rollout_id})
        for record in (
            tick(t0 + 1, "Progressing", 10, "started: blue at 10 %", blue=10),
            tick(t0 + 2, end, 0 if end == "RolledBack" else 100, reason, blue=0),
        ):
            book.append({**record, "tick": int(record["at"] - t0), "rollout_id": rollout_id})
    page = write_report(tmp_path / "r.html", [path]).read_text(encoding="utf-8")
    assert page.count("<h2>diabetes: ") == 2  # one story each
    assert page.index("RolledBack") < page.index("Succeeded")
    latest = story_from_ledger(path)
    assert latest.outcome == "Succeeded"
    assert latest.end - latest.start == pytest.approx(2.0)
    assert [d.kind for d in latest.decisions] == ["passed", "promoted"]


def test_the_start_tick_is_not_drawn_as_a_step_passed(tmp_path: Path) -> None:
    # Ticks count from 1: the guard `tick != 0` let the start tick ("started: blue at 0 %")
    # through as a grey "step passed" line at +0 s.
    path = tmp_path / "d.ledger.jsonl"
    book = Ledger(path, fsync=False)
    started = tick(T0 + 1, "Progressing", 0, "started: blue at 0 %", blue=0)
    book.append({**started, "tick": 1, "phase_before": "Initializing", "mirror": 5})
    passed = tick(T0 + 2, "Progressing", 5, "the shadow step passed; blue to 5 %", blue=5)
    book.append({**passed, "tick": 2, "phase_before": "Progressing"})
    story = story_from_ledger(path)
    assert [(d.at, d.kind) for d in story.decisions] == [(T0 + 2, "passed")]


def test_an_operators_set_weight_is_not_drawn_as_a_step_passed(tmp_path: Path) -> None:
    # `set-weight 50` mid-step was a grey "step passed" line on the charts.
    path = tmp_path / "d.ledger.jsonl"
    book = Ledger(path, fsync=False)
    book.append(tick(T0 + 1, "Progressing", 5, "started: blue at 5 %", blue=5))
    jump = tick(T0 + 2, "Paused", 50, "weight set to 50 % by ann", blue=50)
    book.append({**jump, "commands": ["set_weight: weight set to 50 % by ann"]})
    story = story_from_ledger(path)
    assert [d.kind for d in story.decisions] == ["passed", "operator"]
    assert "purple: weight set by an operator" in render_html([story], title="t")


def test_a_candidate_that_failed_to_deploy_is_not_drawn_as_a_step_passed(tmp_path: Path) -> None:
    # Blue's deploy failed for good, blue set to 0 %: was a grey "step passed" line.
    path = tmp_path / "d.ledger.jsonl"
    book = Ledger(path, fsync=False)
    book.append(tick(T0 + 1, "Progressing", 5, "started: blue at 5 %", blue=5))
    failed = "m:2 could not be deployed to blue: pods never ready"
    book.append(tick(T0 + 2, "Failed", 0, failed, blue=0))
    story = story_from_ledger(path)
    assert [d.kind for d in story.decisions] == ["passed", "failed"]
    assert "red: rollback or failure" in render_html([story], title="t")


def test_ticks_a_drifted_data_plane_served_are_shaded_and_marked_not_counted(
    tmp_path: Path,
) -> None:
    # A data plane changed under the rollout: its held tick and its resume's counted another
    # release's requests, which the judge left out. The report drew blue at 10 % "served" and
    # listed those counts as any tick's, evidence that was never the candidate's.
    drift = "the data plane changed under this rollout"
    path = tmp_path / "d.ledger.jsonl"
    book = Ledger(path, fsync=False)
    book.append(tick(T0 + 1, "Progressing", 10, "started: blue at 10 %", blue=10))
    book.append(tick(T0 + 2, "Progressing", 10, "step 10 % has 10 of 100"))
    held = tick(T0 + 3, "Paused", 10, f"held for a human: {drift}")
    book.append({**held, "not_counted": drift, "drift": "blue serves m:3, not m:2"})
    book.append({**tick(T0 + 9, "Progressing", 10, "resumed", blue=10), "not_counted": drift})
    book.append(tick(T0 + 10, "Progressing", 10, "step 10 % has 10 of 100"))
    story = story_from_ledger(path)
    [span] = story.not_counted
    assert (span.start, span.end) == (T0 + 2, T0 + 9)  # what the held and resume ticks counted
    assert span.text == f"not counted: {drift} (blue serves m:3, not m:2)"
    page = render_html([story], title="t")
    assert page.count("<rect") == 1 and f"<title>{span.text}</title>" in page
    assert page.count("10/1 not counted") == 2  # blue's cells of the two ticks, and no other
    assert page.count("90/0 not counted") == 2


def table_rows(page: str) -> list[list[str]]:
    """The report table's rows below its header, each as its cells' text."""
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", page.partition("<table>")[2])
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows[1:]]


CANDIDATE = {"model": "diabetes", "version": "3", "sha256": None, "image": None}
STABLE = {"model": "diabetes", "version": "2", "sha256": None, "image": None}


@pytest.mark.parametrize(
    ("event", "row"),
    [
        pytest.param(
            {"event": "start", "name": "diabetes", "rollout_id": "r1", "plan": [0, 10, 100],
             "candidate": CANDIDATE, "stable": STABLE},
            "started rollout diabetes: candidate diabetes:3 (blue) against diabetes:2 (green), "
            "plan [0, 10, 100]",
            id="start",  # was a row of empty cells above the first tick
        ),
        pytest.param(
            {"event": "restore", "served": "blue 0 %",
             "describe": ["set weights blue 10 % / green 90 %"]},
            "resumed with a data plane serving blue 0 %: set weights blue 10 % / green 90 %",
            id="restore",
        ),
        pytest.param(
            {"event": "not-applied", "rollout_id": "r1",
             "describe": ["set weights blue 50 % / green 50 %"], "error": "HTTP 503 busy"},
            "controller stopped: could not set weights blue 50 % / green 50 %: HTTP 503 busy "
            "(the next `run` applies it first)",
            id="not-applied",
        ),
        pytest.param(
            {"event": "skipped", "describe": ["set weights blue 50 % / green 50 %"]},
            "not applied, an abort being queued: set weights blue 50 % / green 50 %",
            id="skipped",
        ),
    ],
)  # fmt: skip
def test_a_ledger_event_reads_as_what_happened_in_the_table(
    tmp_path: Path, event: dict, row: str
) -> None:
    path = tmp_path / "diabetes.ledger.jsonl"
    book = Ledger(path, fsync=False)
    if event["event"] != "start":  # an event inside a rollout: after its start
        book.append({"event": "start", "at": T0 - 1, "name": "diabetes", "plan": [10, 100]})
    book.append({**event, "at": T0})
    book.append(tick(T0 + 1, "Progressing", 10, "started: blue at 10 %", blue=10))
    rows = table_rows(render_html([story_from_ledger(path)], title="t"))
    at = "0.0" if event["event"] == "start" else "1.0"
    assert rows[-2] == [at, row]
    assert rows[-1] == [
        "1.0" if event["event"] == "start" else "2.0",
        "Progressing", "10", "Inconclusive", "10/1", "90/0", "started: blue at 10 %",
    ]  # fmt: skip


def test_ticks_that_judged_or_counted_nothing_say_so(tmp_path: Path) -> None:
    """A rollout the controller drove: its first tick deploys blue and reads no metrics, the
    promotion's last ticks count nothing. They showed an empty verdict and "/" for counts."""
    spec = spec_from_dict({
        "name": "d",
        "router": {"kind": "memory", "state_file": str(tmp_path / "routes.json")},
        "metrics": {"kind": "simulated", "seed": 1, "rps": 100,
                    "baseline": {"error_rate": 0.01}, "canary": {"error_rate": 0.01}},
        "steps": [0, 50, 100],
        "mirror_percent": 5,
        "analysis": {"interval_s": 10, "min_requests": 50, "latency": {"enabled": False}},
        "state": {"dir": str(tmp_path / "state")},
    })  # fmt: skip
    bootstrap(spec, Release("d", "1"))
    result = run_rollout(spec, candidate=Release("d", "2"), clock=FakeClock(T0))
    assert result.phase is Phase.SUCCEEDED, result.reason
    rows = table_rows(render_html([story_from_ledger(result.ledger_path)], title="t"))
    assert rows[1][:6] == ["0.0", "Progressing", "0", "deployed blue", "—", "—"]
    assert rows[1][6].startswith("started: blue at 0 %")
    finalising = [row for row in rows if row[1:2] == ["Finalising"]]
    assert finalising and all(row[4:6] == ["—", "—"] for row in finalising)
    assert not [row for row in rows if "/" in row[4:6]]  # no count cell of a tick reads "/"


def test_a_first_release_checked_after_a_rollout_is_not_that_rollouts_end(tmp_path: Path) -> None:
    """`bootstrap --check` after a promotion appends a first-check line, no rollout's: folded
    into the rollout's section, it was taken as its last line (outcome "", the check's reason)."""
    spec = spec_from_dict({
        "name": "d",
        "router": {"kind": "memory", "state_file": str(tmp_path / "routes.json")},
        "metrics": {"kind": "simulated", "seed": 1, "rps": 100,
                    "baseline": {"error_rate": 0.0}, "canary": {"error_rate": 0.0}},
        "steps": [50, 100],
        "analysis": {"interval_s": 10, "min_requests": 50, "latency": {"enabled": False},
                     "errors": {"max_rate": 0.1}},
        "state": {"dir": str(tmp_path / "state")},
    })  # fmt: skip
    assert bootstrap_checked(spec, Release("d", "1"), clock=FakeClock(T0)).verdict.value
    result = run_rollout(spec, candidate=Release("d", "2"), clock=FakeClock(T0 + 1000))
    assert result.phase is Phase.SUCCEEDED, result.reason
    bootstrap_checked(spec, Release("d", "2"), clock=FakeClock(T0 + 5000))
    [story] = stories_from_ledger(result.ledger_path)
    assert (story.outcome, story.reason) == (result.phase.value, result.reason)
    assert not [row for row in story.rows if "first release" in row.get("event", "")]
    assert story.end < T0 + 5000  # the section ends with the rollout


@pytest.mark.parametrize(
    ("after", "outcome", "reason"),
    [
        pytest.param(
            [{"event": "first-check", "release": CANDIDATE, "verdict": "Successful",
              "reason": "error rate 0 % is below the limit 10 %"}],
            "RolledBack", "rolled back at step 10 %: canary error rate 29 %",
            id="first-check",
        ),
        pytest.param(
            [{"event": "bootstrap", "release": CANDIDATE, "by": "ann"},
             {"event": "first-check", "release": CANDIDATE, "verdict": "Successful",
              "reason": "error rate 0 % is below the limit 10 %"}],
            "RolledBack", "rolled back at step 10 %: canary error rate 29 %",
            id="bootstrap-and-check",
        ),
        pytest.param(
            [{"event": "not-applied", "rollout_id": "r1",
              "describe": ["set weights blue 0 % / green 100 %"], "error": "HTTP 503 busy"}],
            "RolledBack",
            "controller stopped: could not set weights blue 0 % / green 100 %: HTTP 503 busy "
            "(the next `run` applies it first)",
            id="not-applied",  # the outcome its last tick decided, the stop in explain's words
        ),
    ],
)  # fmt: skip
def test_a_rollouts_outcome_is_its_last_phase_whatever_line_follows(
    tmp_path: Path, after: list[dict], outcome: str, reason: str
) -> None:
    path = tmp_path / "d.ledger.jsonl"
    book = Ledger(path, fsync=False)
    book.append({"event": "start", "at": T0, "name": "d", "rollout_id": "r1", "plan": [10]})
    book.append({**tick(T0 + 1, "Progressing", 10, "started: blue at 10 %", blue=10),
                 "rollout_id": "r1"})  # fmt: skip
    book.append({**tick(T0 + 2, "RolledBack", 0, "rolled back at step 10 %: canary error rate "
                        "29 %", blue=0), "rollout_id": "r1"})  # fmt: skip
    for index, line in enumerate(after):
        book.append({**line, "at": T0 + 3 + index})
    [story] = stories_from_ledger(path)
    assert (story.outcome, story.reason) == (outcome, reason)
    events = [row["event"].partition(" ")[0] for row in story.rows if "event" in row]
    # A bootstrap's lines are no rollout's; the rollout's own stop is its row.
    assert events == ["started"] + (["controller"] if "stopped" in reason else [])


def test_a_dry_run_s_ledger_is_told_under_its_rollout_s_name(tmp_path: Path) -> None:
    # Was "d.memory": a memory store's rollout (a dry run) writes <name>.memory.ledger.jsonl.
    path = tmp_path / "d.memory.ledger.jsonl"
    book = Ledger(path, fsync=False)
    book.append({"event": "start", "at": T0, "name": "d", "rollout_id": "r1", "plan": [10]})
    book.append({**tick(T0 + 1, "Progressing", 10, "started: blue at 10 %", blue=10),
                 "rollout_id": "r1"})  # fmt: skip
    [story] = stories_from_ledger(path)
    assert story.name == "d"


def _one_tick_ledger(tmp_path: Path, counts: object) -> Path:
    path = tmp_path / "d.ledger.jsonl"
    book = Ledger(path, fsync=False)
    book.append({"event": "start", "at": T0, "name": "d", "rollout_id": "r1", "plan": [10]})
    book.append({**tick(T0 + 1, "Progressing", 10, "step 10 % waits", blue=10), "counts": counts})
    return path


@pytest.mark.parametrize(
    ("counts", "cells"),
    [
        pytest.param(
            {"blue": {"requests": "<script>alert(1)</script>", "errors": 0},
             "green": {"requests": 90, "errors": "<b>"}},
            ["&lt;script&gt;alert(1)&lt;/script&gt;/0", "90/&lt;b&gt;"],
            id="markup-in-a-count",
        ),
        pytest.param({"blue": 5, "green": {"requests": 90, "errors": 0}}, ["?", "90/0"],
                     id="a-count-not-a-mapping"),
        pytest.param([1, 2], ["?", "?"], id="counts-not-a-mapping"),
    ],
)  # fmt: skip
def test_a_hand_edited_count_is_escaped_and_one_of_another_shape_is_no_traceback(
    tmp_path: Path, counts: object, cells: list[str]
) -> None:
    # A ledger edited by hand (or written by another tool) put a <script> in the
    # "no JavaScript" report, and a count that was no mapping was an AttributeError traceback
    # where `explain` tells the same ledger.
    page = write_report(tmp_path / "r.html", [_one_tick_ledger(tmp_path, counts)]).read_text()
    assert "<script" not in page and "<b>" not in page
    [row] = [r for r in table_rows(page) if r[1:2] == ["Progressing"]]
    assert row[4:6] == cells


def test_a_ledger_line_of_another_shape_is_one_clear_error(tmp_path: Path) -> None:
    path = _one_tick_ledger(tmp_path, {})
    with path.open("a") as f:
        f.write('{"at": 1700000009.0, "phase": "Progressing", "weight": "ten"}\n')
    with pytest.raises(ValueError, match=r"d\.ledger\.jsonl: a line is not a ledger record"):
        write_report(tmp_path / "r.html", [path])


def test_a_ledger_of_a_bootstrap_only_holds_no_rollout(tmp_path: Path) -> None:
    # docs/local-stack.md: a bootstrap's lines are no rollout. A first release checked by
    # `trigger watch` was drawn as a rollout whose outcome was "" in red.
    path = tmp_path / "d.ledger.jsonl"
    book = Ledger(path, fsync=False)
    book.append({"event": "bootstrap", "at": T0, "release": CANDIDATE, "by": "ann"})
    checked = {"verdict": "Successful", "reason": "error rate 0 % is below the limit 10 %"}
    book.append({"event": "first-check", "at": T0 + 1, "release": CANDIDATE, **checked})
    with pytest.raises(ValueError, match="no rollout in this ledger, only a bootstrap's lines"):
        stories_from_ledger(path)


def test_a_rollout_stopped_before_its_first_tick_is_not_drawn_as_a_failure(
    tmp_path: Path,
) -> None:
    path = tmp_path / "d.ledger.jsonl"
    book = Ledger(path, fsync=False)
    book.append({"event": "bootstrap", "at": T0 - 9, "release": CANDIDATE, "by": "ann"})
    book.append({"event": "start", "at": T0, "name": "d", "rollout_id": "r1", "plan": [10]})
    [story] = stories_from_ledger(path)
    assert (story.outcome, story.reason) == ("Initializing", "the rollout has not ticked yet")
    page = render_html([story], title="t")
    assert "<h2>d: <span>Initializing</span></h2>" in page


def test_a_bootstrap_only_ledger_beside_rollouts_is_left_out_not_the_whole_report(
    tmp_path: Path, ledger: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Was: one such ledger (the demo's state folder holds diabetes-v1's) lost the whole report.
    first = tmp_path / "diabetes-v1.ledger.jsonl"
    Ledger(first, fsync=False).append(
        {"event": "bootstrap", "at": T0, "release": CANDIDATE, "by": "ann"}
    )
    page = write_report(tmp_path / "r.html", [first, ledger]).read_text()
    assert "<h2>diabetes-v3: " in page and "diabetes-v1" not in page
    assert "diabetes-v1.ledger.jsonl: no rollout in this ledger" in caplog.text
    with pytest.raises(ValueError, match="no rollout in these ledgers"):
        write_report(tmp_path / "r.html", [first, first])


def test_a_time_out_of_range_is_one_line_naming_the_ledger(tmp_path: Path) -> None:
    # Was: an OverflowError traceback from the page's "started" date.
    path = tmp_path / "d.ledger.jsonl"
    Ledger(path, fsync=False).append(tick(1e300, "Progressing", 10, "started", blue=10))
    with pytest.raises(ValueError, match=r"d\.ledger\.jsonl: a line's time `at` is no time"):
        write_report(tmp_path / "r.html", [path])
