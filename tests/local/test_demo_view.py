"""The demo's live panel: an ended rollout reads as ended, and the next line starts on its own.

Was: the promoted v2 showed `step 1 (blue 0 %)` next to Succeeded, and into a pipe (`make demo`)
the next line was glued to the panel's border: `╯Succeeded: Green_100: ...`.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from rich.console import Console
from rich.live import Live

from rollout.core.status import Status
from rollout.core.types import Phase, Release
from rollout.local.demo import _LiveView, end_live

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
