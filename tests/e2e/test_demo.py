"""`aml-rollout demo` (what `make demo` runs) end to end: the story happens and is written down."""

from __future__ import annotations

from pathlib import Path

import pytest

from aml_pipelines.registry.local import LocalRegistry
from rollout.ledger import read_ledger
from rollout.local.demo import DEMO_MIRROR_PERCENT
from tests.cli import run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_demo_promotes_then_rolls_back_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = run_cli("demo", "--out", str(out), timeout=290)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # each outcome starts its own line after the live panel, which says who serves at the end
    assert "╯Succeeded" not in done.stdout and "╯RolledBack" not in done.stdout
    assert "\nSucceeded: Green_100" in done.stdout
    assert "done: green serves diabetes:2 (100 %)" in done.stdout
    report = out / "report.html"
    assert f"report:  {report}" in done.stdout
    page = report.read_text()
    assert page.count("<svg") == 6  # per rollout: weights, error rate, p99
    ledgers = {p.name: read_ledger(p) for p in (out / "stack" / "state").glob("*.ledger.jsonl")}
    # v1, a first release, checked on the absolute limits from the real Prometheus
    assert "first release v1 checked on absolute limits: Successful: error rate 0 %" in done.stdout
    assert [r["event"] for r in ledgers["diabetes-v1.ledger.jsonl"]] == ["bootstrap", "first-check"]
    assert ledgers["diabetes-v2.ledger.jsonl"][-1]["phase"] == "Succeeded"
    # promoted on both checks: errors, and latency against the demo's 250 ms SLO
    reasons = " ".join(str(e.get("reason", "")) for e in ledgers["diabetes-v2.ledger.jsonl"])
    assert "error rate shown < 1 %" in reasons
    assert "slow-request rate (> 250 ms) shown < 1 %" in reasons
    assert ledgers["diabetes-v3.ledger.jsonl"][-1]["phase"] == "RolledBack"
    # the default plan: v2 went through the shadow step; v3 (40 % errors) never left it, and
    # the load generator's clients got no answer from it (no answer naming v3, no 5xx)
    v2_steps = [(e.get("weight"), e.get("mirror", 0)) for e in ledgers["diabetes-v2.ledger.jsonl"]]
    assert (0, DEMO_MIRROR_PERCENT) in v2_steps and (50, 0) in v2_steps
    assert f"\nRolledBack: rolled back at the shadow step ({DEMO_MIRROR_PERCENT} % mirrored)" in (
        done.stdout
    )
    assert "\nusers never received an answer from v3: it was judged on " in done.stdout
    assert "blue/diabetes:3" not in done.stdout.rsplit("\nload: ", 1)[1]
    registry = LocalRegistry(out / "registry")
    stages = {v.version: v.stage for v in registry.list_versions("diabetes")}
    assert stages == {1: "archived", 2: "production", 3: "rolled-back"}
    # the stack is gone: no scoring process recorded as running
    assert not list((out / "stack" / "workloads").glob("*.proc.json"))
