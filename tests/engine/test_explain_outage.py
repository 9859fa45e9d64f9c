"""`explain` tells a metrics outage that changed nothing, and when the metrics came back."""

from __future__ import annotations

from typing import Any

from rollout.ledger import explain

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
