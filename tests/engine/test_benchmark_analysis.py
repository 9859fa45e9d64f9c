"""The statistics benchmark runs, and its last line is the JSON the issue specifies."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from benchmarks.analysis import SCENARIO_DIR, Scenario, main, slow_rates

KEYS = {
    "scenario", "policy", "runs", "total_rps", "error_ratio", "latency_ratio", "p_rollback",
    "p_promote", "mean_decision_s", "mean_bad_canary_requests", "false_rollback_upper95",
    "en_over_wald",
}  # fmt: skip


def test_a_small_run_prints_the_specified_json(capsys: pytest.CaptureFixture[str]) -> None:
    scenarios = [SCENARIO_DIR / "err-50x-100rps.yaml", SCENARIO_DIR / "aa-100rps.yaml"]
    args = ["--json", "--runs", "4", "--jobs", "1"]
    for path in scenarios:
        args += ["--scenario", str(path)]
    assert main(args) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {(r["scenario"], r["policy"]): r for r in payload["results"]}
    assert set(rows) == {
        (s, p) for s in ("err-50x-100rps", "aa-100rps") for p in ("ours", "flagger")
    }
    for row in rows.values():
        assert row.keys() >= KEYS
        assert row["runs"] == 4
    assert rows[("err-50x-100rps", "ours")]["p_rollback"] == 1.0
    # Caught in the default plan's shadow step: blue's errors went to mirrored copies only.
    assert rows[("err-50x-100rps", "ours")]["mean_bad_mirrored_requests"] > 0
    assert rows[("err-50x-100rps", "flagger")]["mean_bad_mirrored_requests"] == 0
    assert rows[("err-50x-100rps", "ours")]["false_rollback_upper95"] is None
    assert rows[("aa-100rps", "ours")]["false_rollback_upper95"] is not None
    assert rows[("aa-100rps", "ours")]["en_over_wald"] is None
    # The oracle reference: regression scenarios only, beside the two policies.
    (oracle,) = payload["oracle"]
    assert oracle["scenario"] == "err-50x-100rps" and oracle["runs"] == 4
    assert oracle["p_rollback"] == 1.0  # power one: it always gets there
    assert oracle["mean_canary_requests_to_reject"] >= 1 and oracle["en_over_wald"] > 0


def test_default_scenarios_load() -> None:
    names = {Scenario.load(p).name for p in Path(SCENARIO_DIR).glob("*.yaml")}
    assert {"aa-10rps", "aa-100rps", "err-10x-10rps", "err-50x-100rps", "lat-1.3x-100rps"} <= names


def test_the_oracle_needs_at_least_the_data_processing_floor() -> None:
    # Any power-one test at level alpha needs E[N] >= ln(1/alpha) / KL canary requests; the
    # oracle SPRT overshoots its threshold, so it needs more (seeded: deterministic).
    from benchmarks.analysis import oracle_reference

    row = oracle_reference(Scenario.load(SCENARIO_DIR / "err-10x-10rps.yaml"), runs=2000)
    assert row is not None
    p0, p1 = 0.001, 0.01
    kl = p1 * math.log(p1 / p0) + (1 - p1) * math.log((1 - p1) / (1 - p0))
    assert math.log(20) / kl < row["mean_canary_requests_to_reject"] < 3 * math.log(20) / kl
    assert oracle_reference(Scenario.load(SCENARIO_DIR / "aa-10rps.yaml"), runs=10) is None


def test_latency_scenario_compares_about_one_percent_slow_requests() -> None:
    base, canary = slow_rates(Scenario.load(SCENARIO_DIR / "lat-1.3x-100rps.yaml"))
    assert 0.005 < base < 0.02
    assert canary > 3 * base


def test_wald_reference_is_the_sprts_real_expected_n() -> None:
    # ANCHORS.md: "a Wald SPRT needs on average about 18 canary requests for a 50x rise, 187 for
    # 10x, 583 for 5x, 5,420 for 2x"; Wald's formula, blind to the overshoot, says less.
    from benchmarks.analysis import wald_formula, wald_reference

    for name, anchor in [("err-50x-100rps", 18), ("err-10x-10rps", 187), ("err-5x-100rps", 583)]:
        scenario = Scenario.load(SCENARIO_DIR / f"{name}.yaml")
        exact, formula = wald_reference(scenario), wald_formula(scenario)
        assert exact is not None and formula is not None
        assert exact == pytest.approx(anchor, rel=0.01)
        assert formula < exact
    assert wald_reference(Scenario.load(SCENARIO_DIR / "aa-10rps.yaml")) is None


def test_sprt_expected_n_agrees_with_running_the_sprt() -> None:
    from benchmarks.oracle import sprt_expected_n

    p0, p1 = 0.001, 0.01
    up, down = math.log(p1 / p0), math.log1p(-p1) - math.log1p(-p0)
    upper, lower = math.log(0.8 / 0.05), math.log(0.2 / 0.95)
    rng = np.random.default_rng(11)
    lengths = []
    for _ in range(3000):  # one request at a time, stopping at either boundary
        llr, n = 0.0, 0
        while lower < llr < upper:
            n += 1
            llr += up if rng.random() < p1 else down
        lengths.append(n)
    standard_error = np.std(lengths) / math.sqrt(len(lengths))
    assert abs(np.mean(lengths) - sprt_expected_n(p0, p1)) < 4 * standard_error


def test_a_spec_without_a_shadow_step_runs_the_live_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The "before" column of docs/engine.md: the plan [5, 25, 50, 100], no mirror anywhere.
    spec = tmp_path / "live.yaml"
    spec.write_text("steps: [5, 25, 50, 100]\n")
    scenario = SCENARIO_DIR / "err-50x-100rps.yaml"
    args = ["--json", "--runs", "2", "--jobs", "1", "--policy", "ours"]
    assert main([*args, "--scenario", str(scenario), "--spec", str(spec)]) == 0
    *_, summary, last = capsys.readouterr().out.strip().splitlines()
    (row,) = json.loads(last)["results"]
    assert row["p_rollback"] == 1.0
    assert row["mean_bad_mirrored_requests"] == 0 and row["mean_bad_canary_requests"] > 0
    # Counted in words that agree with the count (it said "1 scenarios x 1 policies ... 1 jobs").
    assert re.fullmatch(r"# 1 scenario x 1 policy x 2 runs in \d+\.\d s with 1 job", summary)


GOOD = "name: s\nrps: 10\nbaseline: {error_rate: 0.001}\n"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param(None, "cannot read scenario: No such file", id="missing-file"),
        pytest.param("name: s\nrps: [10\n", "not valid YAML: line 3, column 1", id="bad-yaml"),
        pytest.param("- a\n", "expected a mapping", id="not-a-mapping"),
        pytest.param("", "the file is empty (no settings in it)", id="empty-file"),
        pytest.param(
            GOOD + "canary: {eror_rate: 0.01}\n",
            "canary.eror_rate: unknown field: did you mean error_rate?",
            id="typo",
        ),
        pytest.param(
            GOOD + "duration: 60\n",
            "duration: unknown field: did you mean duration_s?",
            id="top-level-typo",
        ),
        pytest.param("rps: 10\nbaseline: {}\n", "name: Field required", id="no-name"),
        pytest.param("name: s\nbaseline: {}\n", "rps: Field required", id="no-rps"),
        pytest.param("name: s\nrps: 10\n", "baseline: Field required", id="no-baseline"),
        pytest.param(GOOD.replace("10", "-1"), "rps: give a rate", id="negative-rps"),
        pytest.param(GOOD.replace("10", "[[0, 10], [60]]"), "rps: give a rate", id="bad-point"),
        pytest.param(GOOD.replace("10", "[]"), "rps: give a rate", id="empty-profile"),
        # The simulation's own limit, met at load time: it was a traceback in a worker.
        pytest.param(
            GOOD.replace("10", "2000000000"), "rps: give a rate from 0 to 1e+09", id="rps>max"
        ),
        pytest.param(GOOD.replace("10", ".inf"), "rps: give a rate", id="rps-inf"),
        pytest.param(GOOD.replace("10", "1" + "0" * 400), "rps: give a rate", id="rps-overflow"),
        pytest.param(GOOD.replace("10", "[[.inf, 10]]"), "rps: give a rate", id="t-inf"),
        pytest.param(
            GOOD + "duration_s: .inf\n", "duration_s: Input should be a finite", id="dur-inf"
        ),
        # Read as specs are: no traceback for what YAML's constructors choke on, no key lost.
        pytest.param(
            GOOD + "duration_s: 2024-13-45\n",
            "line 4, column 13: '2024-13-45' is not a date (month must be in 1..12)",
            id="not-a-date",
        ),
        pytest.param(GOOD + "seed: 0x_\n", "'0x_' is not a whole number", id="bad-hex"),
        pytest.param(
            GOOD + "baseline: {error_rate: 0.002}\n",
            "duplicate key 'baseline' (first on line 3)",
            id="key-given-twice",
        ),
        pytest.param(GOOD + "duration_s: 0\n", "duration_s: Input should be greater", id="dur-0"),
        pytest.param(
            GOOD + "seed: -1\n",
            "seed: Input should be greater than or equal to 0",
            id="negative-seed",
        ),
        pytest.param(
            GOOD + "canary: {error_rate: 2}\n", "canary.error_rate: Input should be", id="rate>1"
        ),
    ],
)
def test_a_bad_scenario_is_one_line_naming_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None, problem: str
) -> None:
    path = tmp_path / "scenario.yaml"
    if text is not None:
        path.write_text(text)
    assert main(["--json", "--runs", "1", "--jobs", "1", "--scenario", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ")
    assert problem in err


def test_a_profile_scenario_loads_as_points(tmp_path: Path) -> None:
    path = tmp_path / "profile.yaml"
    path.write_text(GOOD.replace("rps: 10", "rps: [[0, 10], [60, 20]]"))
    scenario = Scenario.load(path)
    assert scenario.rps == [(0.0, 10.0), (60.0, 20.0)]
    assert scenario.canary == scenario.baseline  # no canary: A/A


def test_a_bad_spec_is_one_line_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("steps: [5, 25]\nanalysis: {alpah: 0.1}\n")
    args = ["--runs", "1", "--jobs", "2", "--scenario", str(SCENARIO_DIR / "err-50x-100rps.yaml")]
    assert main([*args, "--spec", str(spec)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"error: {spec}: ") and "analysis.alpah" in err


@pytest.mark.parametrize("option", ["--runs", "--jobs"])
@pytest.mark.parametrize("value", ["0", "-2", "x"])
def test_runs_and_jobs_must_be_whole_numbers_from_one(
    capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([option, value, "--scenario", str(SCENARIO_DIR / "err-50x-100rps.yaml")])
    assert exit_info.value.code == 2
    assert f"argument {option}: " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("rps", "t0", "t1", "expected"),
    [
        pytest.param(10.0, 0, 60, 600, id="constant"),
        pytest.param([(0, 10), (60, 100)], 0, 120, 600 + 6000, id="two-steps"),
        pytest.param([(60, 100), (0, 10)], 30, 90, 300 + 3000, id="unsorted-mid-step"),
        pytest.param([(60, 100)], 0, 120, 12000, id="before-the-first-point-its-rate"),
        pytest.param([(0, 10), (60, 0)], 60, 3600, 0, id="quiet-after"),
    ],
)
def test_expected_requests_integrates_the_profile(
    rps: float | list[tuple[float, float]], t0: float, t1: float, expected: float
) -> None:
    from rollout.metrics.static import expected_requests

    assert expected_requests(rps, t0, t1) == pytest.approx(expected)


def test_flagger_draws_from_the_rps_profile_not_its_first_point() -> None:
    from benchmarks.flagger import simulate as simulate_flagger
    from rollout.config import SimulatedMetricsConfig

    # A/A: promoted after five passing checks at 10..50 %; 10 rps for the first minute only.
    cfg = SimulatedMetricsConfig(rps=[(0.0, 10.0), (60.0, 1000.0)])
    outcome = simulate_flagger(cfg, 3600.0, np.random.default_rng(1))
    assert outcome.decision == "promote"
    # ~60 + 1000 x 60 x (0.2 + 0.3 + 0.4 + 0.5) = 84,060 canary requests, not 10 rps' 900
    assert outcome.canary_requests == pytest.approx(84_060, rel=0.02)


@pytest.mark.parametrize(
    ("starts_at", "promoted_at"),
    [
        pytest.param(30.0, 300.0, id="mid-interval-counts-its-half"),
        pytest.param(60.0, 360.0, id="first-interval-empty-a-failed-check"),
    ],
)
def test_flagger_integrates_the_profile_over_each_interval(
    starts_at: float, promoted_at: float
) -> None:
    # Traffic from 30 s on: the first minute holds 30 s of it, enough for a passing check; it
    # was drawn at the minute's first rate (0), a "no values" failure, as if it began at 60 s.
    from benchmarks.flagger import simulate as simulate_flagger
    from rollout.config import SimulatedMetricsConfig, TrafficModel

    clean = TrafficModel(error_rate=0.0)
    cfg = SimulatedMetricsConfig(rps=[(0.0, 0.0), (starts_at, 100.0)], baseline=clean)
    outcome = simulate_flagger(cfg, 3600.0, np.random.default_rng(1))
    assert (outcome.decision, outcome.decided_at) == ("promote", promoted_at)


def test_harm_after_a_promotion_follows_the_profile(tmp_path: Path) -> None:
    path = tmp_path / "quiet-after.yaml"
    path.write_text(
        "name: q\nrps: [[0, 100], [1800, 0]]\nbaseline: {error_rate: 0.001}\n"
        "canary: {error_rate: 0.01}\n"
    )
    scenario = Scenario.load(path)
    assert scenario.mean_rps == pytest.approx(50.0)
    assert scenario.errors_after(1800.0) == 0.0  # no traffic left to harm
    assert scenario.errors_after(900.0) == pytest.approx(900 * 100 * 0.01)


LATE_ONSET = (
    "name: late\nrps: 100\nduration_s: 3600\nbaseline: {error_rate: 0.001}\n"
    "canary: {error_rate: 0.05, from_s: 1800}\n"
)


@pytest.mark.parametrize(
    ("promoted_at", "expected"),
    [
        # Until the onset the candidate errs as the baseline does; the regression after it.
        pytest.param(300.0, 1500 * 100 * 0.001 + 1800 * 100 * 0.05, id="before-the-onset"),
        pytest.param(2000.0, 1600 * 100 * 0.05, id="after-the-onset"),
    ],
)
def test_harm_after_a_promotion_starts_at_the_regressions_onset(
    tmp_path: Path, promoted_at: float, expected: float
) -> None:
    path = tmp_path / "late.yaml"
    path.write_text(LATE_ONSET)
    assert Scenario.load(path).errors_after(promoted_at) == pytest.approx(expected)


def test_flaggers_harm_after_a_promotion_starts_at_the_regressions_onset(tmp_path: Path) -> None:
    from benchmarks.flagger import simulate as simulate_flagger

    path = tmp_path / "late.yaml"
    path.write_text(LATE_ONSET)
    scenario = Scenario.load(path)
    outcome = simulate_flagger(scenario.metrics(1), 3600.0, np.random.default_rng(1))
    # Five passing checks by 300 s, long before the onset: ~9 errors served at 10..50 %, then
    # 1,500 s at the baseline's rate and 1,800 s at the regression's (not 3,300 s of it: 16,500).
    assert (outcome.decision, outcome.decided_at) == ("promote", 300.0)
    assert outcome.bad_canary == pytest.approx(150 + 9000, abs=40)


def test_bad_until_the_decision_is_never_negative_on_a_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ramp.yaml"
    path.write_text("name: ramp\nrps: [[0, 10], [60, 20]]\nbaseline: {error_rate: 0.001}\n")
    args = ["--json", "--runs", "20", "--jobs", "1", "--policy", "flagger"]
    assert main([*args, "--scenario", str(path)]) == 0
    (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert row["p_promote"] == 1.0
    assert 0 <= row["mean_bad_until_decision"] < row["mean_bad_canary_requests"]


def test_readme_quotes_the_en_over_wald_range_of_the_docs_table() -> None:
    # README's "E[N] is A–B× ... Wald's formula ... would read C–D" against the measured table in
    # docs/engine.md (ours, error scenarios, the starred partial row left out).
    import re

    from benchmarks.analysis import wald_formula, wald_reference

    root = Path(__file__).resolve().parents[2]
    table = re.findall(
        r"^\| (err-[\w.-]+) \| ours \|.* \| ([\d.]+) \|$",
        (root / "docs" / "engine.md").read_text(encoding="utf-8"),
        re.M,
    )
    assert len(table) >= 7
    exact, formula = [], []
    for name, ratio in table:
        scenario = Scenario.load(SCENARIO_DIR / f"{name}.yaml")
        wald, approx = wald_reference(scenario), wald_formula(scenario)
        assert wald is not None and approx is not None
        exact.append(float(ratio))
        formula.append(float(ratio) * wald / approx)
    readme = " ".join((root / "README.md").read_text(encoding="utf-8").split())
    found = re.search(r"E\[N\] is ([\d.]+)–([\d.]+)×.*?would read (\d+\.\d+)–(\d+\.\d+)", readme)
    assert found is not None
    assert [float(x) for x in found.groups()] == [
        min(exact),
        max(exact),
        round(min(formula), 1),
        round(max(formula), 1),
    ]


@pytest.mark.parametrize(
    ("baseline", "canary"),
    [
        pytest.param("{error_rate: 0.001}", "{error_rate: 0.0005}", id="fewer-errors"),
        pytest.param("{error_rate: 0.001}", "{latency_ms: {median: 15}}", id="faster"),
        pytest.param("{error_rate: 0.0}", "{error_rate: 0.01}", id="errors-on-a-clean-baseline"),
    ],
)
def test_a_scenario_without_an_sprt_reference_runs_with_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], baseline: str, canary: str
) -> None:
    # No worse rate to detect, or no baseline rate to compare with: Wald's SPRT and the oracle
    # have nothing to test; the rows still come, with EN/Wald "-" (null), not a traceback.
    path = tmp_path / "scenario.yaml"
    path.write_text(f"name: s\nrps: 100\nbaseline: {baseline}\ncanary: {canary}\n")
    assert main(["--json", "--runs", "2", "--jobs", "1", "--scenario", str(path)]) == 0

    def not_json(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    last = capsys.readouterr().out.strip().splitlines()[-1]
    payload = json.loads(last, parse_constant=not_json)  # strict: no NaN or Infinity
    assert payload["oracle"] == []
    assert [row["policy"] for row in payload["results"]] == ["ours", "flagger"]
    assert all(row["wald_expected_n"] is None for row in payload["results"])
    assert all(row["en_over_wald"] is None for row in payload["results"])


def test_docs_usage_line_names_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    import re

    with pytest.raises(SystemExit):
        main(["--help"])
    options = set(re.findall(r"--[a-z]+", capsys.readouterr().out)) - {"--help"}
    docs = (Path(__file__).resolve().parents[2] / "docs" / "engine.md").read_text(encoding="utf-8")
    usage = re.search(r"^python -m benchmarks\.analysis (.*)$", docs, re.M)
    assert usage is not None
    assert set(re.findall(r"--[a-z]+", usage.group(1))) == options


def test_two_scenarios_with_one_name_are_refused_not_merged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A copy of a scenario, tweaked but not renamed: its runs would be merged into the
    # original's rows (runs doubled, both rows the same).
    original = SCENARIO_DIR / "err-10x-100rps.yaml"
    variant = tmp_path / "variant.yaml"
    variant.write_text(original.read_text().replace("error_rate: 0.01,", "error_rate: 0.05,"))
    args = ["--runs", "1", "--jobs", "1", "--scenario", str(original), "--scenario", str(variant)]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: {variant}: name: 'err-10x-100rps' is also the name in {original}\n"
    assert main(["--runs", "1", "--scenario", str(original), "--scenario", str(original)]) == 2
    assert capsys.readouterr().err == f"error: {original}: given twice\n"


def test_any_scenario_name_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The name labels rows only; it used to become the rollout's name, which must be a DNS label.
    path = tmp_path / "named.yaml"
    path.write_text(GOOD.replace("name: s", "name: 'Err 10x / my_variant'"))
    assert main(["--json", "--runs", "1", "--jobs", "1", "--scenario", str(path)]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert {row["scenario"] for row in rows} == {"Err 10x / my_variant"}


def test_fr_ub95_is_the_two_sided_clopper_pearson_upper_end() -> None:
    # docs/engine.md: "58 rollbacks in 2,000 runs read 0.037" (aa-100rps's 0.029).
    from benchmarks.analysis import summarise
    from benchmarks.flagger import Outcome

    scenario = Scenario.load(SCENARIO_DIR / "aa-100rps.yaml")
    outcomes = [Outcome("rollback", 100.0, 500, 0.0)] * 58 + [
        Outcome("promote", 700.0, 9000, 1.0)
    ] * 1942
    row = summarise(scenario, "ours", [(o, o.bad_canary) for o in outcomes])
    assert row["p_rollback"] == 0.029
    assert f"{row['false_rollback_upper95']:.3f}" == "0.037"


@pytest.mark.parametrize(
    ("canary", "aa"),
    [
        pytest.param("{}", True, id="no-canary"),
        pytest.param("{error_rate: 0.001, from_s: 600}", True, id="same-model-later"),
        pytest.param("{latency_ms: {median: 20, sigma: 1.2}}", False, id="tail-only"),
        pytest.param("{latency_ms: {median: 26}}", False, id="slower-median"),
        pytest.param("{error_rate: 0.002}", False, id="more-errors"),
    ],
)
def test_a_and_a_means_the_canary_model_is_the_baselines(
    tmp_path: Path, canary: str, aa: bool
) -> None:
    # A tail-only regression (same median, wider sigma) was A/A: its correct rollbacks were
    # reported as false ones (FR ub95 1.0) and it had no Wald reference, no oracle row.
    from benchmarks.analysis import summarise, wald_reference
    from benchmarks.flagger import Outcome

    path = tmp_path / "s.yaml"
    path.write_text(
        "name: s\nrps: 100\nbaseline: {error_rate: 0.001, latency_ms: {median: 20, sigma: 0.4}}\n"
        + ("" if canary == "{}" else f"canary: {canary}\n")
    )
    scenario = Scenario.load(path)
    assert scenario.is_aa is aa
    row = summarise(scenario, "ours", [(Outcome("rollback", 60.0, 100, 0.0), 0.0)] * 10)
    assert (row["false_rollback_upper95"] is not None) is aa
    assert (wald_reference(scenario) is None) is aa


def test_a_tail_only_regression_is_judged_on_slow_requests(tmp_path: Path) -> None:
    from benchmarks.analysis import reference_rates

    path = tmp_path / "tail.yaml"
    path.write_text(
        "name: tail\nrps: 100\nbaseline: {latency_ms: {median: 20, sigma: 0.4}}\n"
        "canary: {latency_ms: {median: 20, sigma: 1.2}}\n"
    )
    scenario = Scenario.load(path)
    assert reference_rates(scenario) == slow_rates(scenario)
    base, canary = slow_rates(scenario)
    assert canary > 3 * base


LATE = (
    "name: late\nseed: 5\nrps: 100\nduration_s: 3600\nbaseline: {error_rate: 0.001}\n"
    "canary: {error_rate: 0.05, from_s: FROM}\n"
)


@pytest.mark.parametrize("policy", ["ours", "flagger"])
def test_canary_requests_before_the_regression_began_are_not_counted(
    tmp_path: Path, policy: str
) -> None:
    # Decided (promoted) before the canary turns bad at 3,000 s: it served no canary request of
    # the regression. All its requests were counted, against a Wald and an oracle that start at
    # the onset.
    from benchmarks.analysis import _chunk

    path = tmp_path / "late.yaml"
    path.write_text(LATE.replace("FROM", "3000"))
    outcomes = [o for o, _ in _chunk((policy, Scenario.load(path), 0, 3, None))]
    assert all(o.decided_at is not None and o.decided_at < 3000 for o in outcomes)
    assert [o.canary_requests for o in outcomes] == [0, 0, 0]


def test_en_over_wald_counts_from_the_onset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 50x from 200 s on: ~5,000 canary requests were served before it (EN/Wald read 261 where
    # the same regression from 0 s reads 5); a rollback before the onset rejected nothing.
    path = tmp_path / "late.yaml"
    path.write_text(LATE.replace("FROM", "200"))
    args = ["--json", "--runs", "10", "--jobs", "1", "--policy", "ours", "--scenario", str(path)]
    assert main(args) == 0
    (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert 0 < row["mean_canary_requests_to_reject"] < 1500


def test_wald_reference_keeps_the_digits_the_docs_quote() -> None:
    # docs/engine.md: "18.0, 186.4, 583.0 and 5,408 canary requests at 50x, 10x, 5x, 2x".
    from benchmarks.oracle import sprt_expected_n

    quoted = [f"{sprt_expected_n(0.001, 0.001 * t):.1f}" for t in (50, 10, 5, 2)]
    assert quoted == ["18.0", "186.4", "583.0", "5408.1"]


@pytest.mark.timeout(10)
def test_wald_reference_at_a_low_base_rate_takes_no_longer() -> None:
    # Request by request it took ~30 s at 0.001 % and ~50 min at 0.00001 %. The SPRT's E[N] for
    # 2x then nears its continuous-time limit: base rate x E[N] about the same at every rate.
    from benchmarks.oracle import sprt_expected_n

    scaled = [p * sprt_expected_n(p, 2 * p) for p in (1e-4, 1e-7)]
    assert scaled[1] == pytest.approx(scaled[0], rel=1e-3)
    assert scaled[0] == pytest.approx(5.413, abs=5e-4)


def test_an_oracle_cut_at_its_request_cap_reports_no_e_n(tmp_path: Path) -> None:
    # Was: the mean over the runs that rolled back (none: NaN, and --json died on it; some: a
    # mean biased low, 0.92x Wald, below what any level-0.05 test can do).
    from benchmarks.analysis import oracle_reference

    scenario = tmp_path / "rare.yaml"
    scenario.write_text(
        "name: rare-1.5x\nseed: 4\nrps: 100\nduration_s: 600\n"
        "baseline: {error_rate: 0.0000001, latency_ms: {median: 20, sigma: 0.4}}\n"
        "canary: {error_rate: 0.00000015, latency_ms: {median: 20, sigma: 0.4}}\n"
    )
    row = oracle_reference(Scenario.load(scenario), runs=3)
    assert row is not None
    assert row["cut_at_max_requests"] == 3 and row["p_rollback"] == 0.0
    assert row["mean_canary_requests_to_reject"] is None and row["en_over_wald"] is None
    json.dumps(row, allow_nan=False)
    full = oracle_reference(Scenario.load(SCENARIO_DIR / "err-10x-10rps.yaml"), runs=50)
    assert full is not None and full["cut_at_max_requests"] == 0 and full["en_over_wald"] > 1
