"""The register step: the gate's decision table, then registration against the local registry."""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from aml_pipelines.errors import ConfigError, GateRefused, IntegrityError
from aml_pipelines.registry.base import ModelVersion, Stage
from aml_pipelines.registry.local import LocalRegistry
from components.register.gate import GateDecision, Rescored, evaluate_gate
from components.register.main import EXIT_GATE_REFUSED, main
from components.register.register import register_model
from components.train.train import TrainParams, train
from tests.pipelines.conftest import MakeModel


def _production(**tags: str) -> ModelVersion:
    return ModelVersion("m", 4, "file:///x", "0" * 64, {"stage": "production", **tags})


PROD = _production(mse="10", rmse="3.5", r2="0.5")
OVERFLOWED = _production(mse="inf", rmse="inf", r2="-inf")


@pytest.mark.parametrize(
    ("candidate", "production", "metric", "slack", "passed", "reason"),
    [
        pytest.param({"mse": 9.0}, None, "mse", 0, True, "first candidate", id="no-production"),
        pytest.param({"mse": 9.0}, PROD, "mse", 0, True, "not worse", id="better"),
        pytest.param({"mse": 10.0}, PROD, "mse", 0, True, "not worse", id="equal"),
        pytest.param({"mse": 11.0}, PROD, "mse", 0, False, "worse than production m:4", id="worse"),
        pytest.param({"mse": 10.1}, PROD, "mse", 0.02, True, "slack 2.0%", id="within-slack"),
        pytest.param({"rmse": 3.0}, PROD, "rmse", 0, True, "lower is better", id="rmse"),
        pytest.param({"r2": 0.4}, PROD, "r2", 0, False, "higher is better", id="r2-lower-worse"),
        pytest.param({"mse": 1.0}, _production(), "mse", 0, False, "no usable", id="no-tag"),
        pytest.param(
            {"mse": 1.0}, _production(mse="?"), "mse", 0, False, "no usable", id="bad-tag"
        ),
        pytest.param({"mse": float("nan")}, None, "mse", 0, False, "mse is nan", id="nan"),
        # a forced model whose held-out error overflowed: every later candidate was refused
        pytest.param({"mse": 1e6}, OVERFLOWED, "mse", 0, True, "any finite mse", id="inf-mse"),
        pytest.param({"rmse": 1e3}, OVERFLOWED, "rmse", 0.1, True, "any finite", id="inf-rmse"),
        pytest.param({"r2": -5.0}, OVERFLOWED, "r2", 0, True, "any finite", id="minus-inf-r2"),
        pytest.param(
            {"mse": 1.0}, _production(mse="nan"), "mse", 0, False, "no usable", id="nan-tag"
        ),
        pytest.param(
            {"mse": 1.0}, _production(mse="-inf"), "mse", 0, False, "no usable", id="minus-inf-mse"
        ),
    ],
)
def test_gate_decisions(candidate, production, metric, slack, passed, reason) -> None:
    decision = evaluate_gate(candidate, production, metric=metric, max_regression=slack)
    assert decision.passed is passed
    assert reason in decision.reason


@pytest.mark.parametrize(
    ("production_there", "candidate_there", "passed"),
    [
        pytest.param(10.0, 1000.0, False, id="rescored-worse"),
        pytest.param(10.0, 5.0, True, id="rescored-better"),
    ],
)
def test_an_overflowed_production_tag_yields_to_a_rescore_on_the_same_rows(
    production_there: float, candidate_there: float, passed: bool
) -> None:
    # Was: "any finite mse is better" decided before the re-score, which it threw away.
    decision = evaluate_gate(
        {"mse": 1.0},
        _production(mse="inf", eval_fingerprint="sha256:eval-a"),
        fingerprints={"eval_fingerprint": "sha256:eval-b"},
        rescored=Rescored(production_there, candidate_there, rows=50, held_out=60),
    )
    assert decision.passed is passed
    assert "re-scored on the 50 of the candidate's 60 held-out rows" in decision.reason
    assert "the mse tags (inf vs candidate 1) were measured on other data" in decision.reason


SAME = {"eval_fingerprint": "sha256:eval-a", "data_fingerprint": "sha256:data-a"}
PROD_EVAL_A = _production(mse="10", **SAME)
PROD_DATA_A = _production(mse="10", data_fingerprint="sha256:data-a")


@pytest.mark.parametrize(
    ("fingerprints", "production", "mse", "passed", "comparable", "reason"),
    [
        pytest.param(SAME, PROD_EVAL_A, 9.0, True, True, "not worse", id="same-held-out-rows"),
        pytest.param(SAME, PROD_EVAL_A, 11.0, False, True, "worse than", id="same-rows-worse"),
        pytest.param(
            {**SAME, "eval_fingerprint": "sha256:eval-b"},
            PROD_EVAL_A,
            1.0,
            False,
            False,
            "measured on different data (eval_fingerprint sha256:eval-b… vs sha256:eval-a…)",
            id="other-split-of-the-same-data-refused-however-good",
        ),
        pytest.param(
            {"data_fingerprint": "sha256:data-b"},
            PROD_DATA_A,
            1.0,
            False,
            False,
            "measured on different data (data_fingerprint",
            id="other-data-refused",
        ),
        pytest.param(
            {"eval_fingerprint": "sha256:eval-b", "data_fingerprint": "sha256:data-b"},
            PROD_DATA_A,
            20.0,
            False,
            False,
            "not comparable",
            id="production-without-eval-fingerprint-on-other-data",
        ),
        pytest.param(
            SAME,
            PROD_DATA_A,
            9.0,
            True,
            None,
            "UNCHECKED whether both were measured on the same data: same data_fingerprint, but "
            "the production version has no eval_fingerprint",
            id="same-data-split-unknown-passes-loudly",
        ),
        pytest.param(
            {},
            PROD,
            9.0,
            True,
            None,
            "the candidate and the production version have no eval_fingerprint",
            id="no-fingerprints-passes-loudly",
        ),
    ],
)
def test_gate_compares_only_metrics_measured_on_the_same_data(
    fingerprints, production, mse, passed, comparable, reason
) -> None:
    decision = evaluate_gate({"mse": mse}, production, fingerprints=fingerprints)
    assert (decision.passed, decision.comparable) == (passed, comparable)
    assert reason in decision.reason


@pytest.mark.parametrize(
    ("metric", "slack", "message"),
    [
        pytest.param("mae", 0.0, "metric: 'mae'", id="unknown-metric"),
        pytest.param("mse", -0.1, "max_regression", id="negative-slack"),
    ],
)
def test_gate_configuration_errors(metric: str, slack: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        evaluate_gate({"mse": 1.0}, None, metric=metric, max_regression=slack)


def test_latest_registered_is_not_the_baseline(tmp_path: Path, make_model: MakeModel) -> None:
    registry = LocalRegistry(tmp_path / "reg")
    register_model(make_model(mse=10.0), registry)
    # v1 is only a candidate: a worse v2 passes, because nothing is in production yet.
    second = register_model(make_model(mse=50.0), registry)
    assert second.version.version == 2 and second.decision.passed


def test_gate_against_production_then_register(tmp_path: Path, make_model: MakeModel) -> None:
    registry = LocalRegistry(tmp_path / "reg")
    first = register_model(
        make_model(mse=10.0),
        registry,
        source_run="run-1",
        git_commit="abc",
        out_dir=tmp_path / "o1",
    )
    assert first.version.tags["stage"] == Stage.CANDIDATE
    assert first.version.tags["source_run"] == "run-1"
    assert first.version.tags["git_commit"] == "abc"
    assert float(first.version.tags["mse"]) == 10.0
    written = json.loads((tmp_path / "o1" / "registration.json").read_text())
    assert {k: written[k] for k in ("name", "version", "uri", "sha256")} == {
        "name": "m",
        "version": 1,
        "uri": first.version.uri,
        "sha256": first.version.sha256,
    }
    registry.set_tags("m", 1, {"stage": Stage.PRODUCTION})

    with pytest.raises(GateRefused, match=r"mse=20 is worse than production m:1 mse=10"):
        register_model(make_model(mse=20.0), registry, out_dir=tmp_path / "o2")
    assert not (tmp_path / "o2" / "registration.json").exists()
    assert [v.version for v in registry.list_versions("m")] == [1]

    forced = register_model(make_model(mse=20.0), registry, force=True)
    assert forced.forced and forced.version.tags["gate"] == "forced"
    better = register_model(make_model(mse=5.0), registry)
    assert better.version.version == 3 and better.version.tags["gate_baseline"] == "m:1"


def test_the_model_production_already_serves_is_not_registered_again(
    tmp_path: Path, make_model: MakeModel
) -> None:
    """Unchanged data, seed and code train the same bytes (train is deterministic, and Azure ML
    re-uses its output): each resubmission passed the gate on equal numbers, registered a new
    version of production's own model and rolled it out, a full judged rollout of no change."""
    registry = LocalRegistry(tmp_path / "reg")
    folder = make_model(mse=10.0, eval_fingerprint="sha256:a")
    register_model(folder, registry, source_run="run-1")
    registry.set_tags("m", 1, {"stage": Stage.PRODUCTION})

    with pytest.raises(GateRefused, match=r"is production m:1's own model \(same sha256 "):
        register_model(folder, registry, source_run="run-2", out_dir=tmp_path / "o2")
    assert [v.version for v in registry.list_versions("m")] == [1]
    assert not (tmp_path / "o2" / "registration.json").exists()
    forced = register_model(folder, registry, source_run="run-3", force=True)
    assert (forced.version.version, forced.version.tags["gate"]) == (2, "forced")
    # A re-run of the step that registered it still names its version (nothing new either).
    assert register_model(folder, registry, source_run="run-1").version.version == 1


def test_a_model_evaluated_on_other_data_is_not_gated_on_its_numbers(
    tmp_path: Path, make_model: MakeModel, caplog: pytest.LogCaptureFixture
) -> None:
    registry = LocalRegistry(tmp_path / "reg")
    first = register_model(make_model(mse=10.0, eval_fingerprint="sha256:a"), registry)
    assert first.version.tags["eval_fingerprint"] == "sha256:a"
    registry.set_tags("m", 1, {"stage": Stage.PRODUCTION})

    # A far lower mse, on other held-out rows: it proves nothing, so it is not registered.
    with pytest.raises(GateRefused, match=r"measured on different data.*not comparable"):
        register_model(make_model(mse=1.0, eval_fingerprint="sha256:b"), registry)
    assert [v.version for v in registry.list_versions("m")] == [1]

    forced = register_model(
        make_model(mse=1.0, eval_fingerprint="sha256:b"),
        registry,
        force=True,
        out_dir=tmp_path / "out",
    )
    assert forced.version.tags["gate"] == "forced"
    gate = json.loads((tmp_path / "out" / "registration.json").read_text())["gate"]
    assert gate["comparable"] is False and gate["forced"] is True

    registry.set_tags("m", 1, {"eval_fingerprint": ""})  # registered before the fingerprint
    with caplog.at_level("WARNING"):
        unchecked = register_model(make_model(mse=9.0, eval_fingerprint="sha256:a"), registry)
    assert unchecked.decision.passed and unchecked.decision.comparable is None
    assert "comparison UNCHECKED" in caplog.text


def test_a_version_the_job_rolls_out_itself_is_tagged_for_the_triggers(
    tmp_path: Path, make_model: MakeModel
) -> None:
    registry = LocalRegistry(tmp_path / "reg")
    alone = register_model(make_model(mse=10.0), registry)
    assert "rollout_by" not in alone.version.tags  # the triggers' to deliver
    code = main(
        ["--model", str(make_model(mse=9.0)), "--registry", f"local:{tmp_path / 'reg'}",
         "--rollout-in-job", "True", "--registration", str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 0
    assert registry.get("m", 2).tags["rollout_by"] == "pipeline-job"


def test_a_rerun_that_rolls_out_in_the_job_tags_its_reused_version_for_the_triggers(
    tmp_path: Path, make_model: MakeModel
) -> None:
    """`run-local --run-dir D` (registered untagged: the triggers' to deliver), then `run-local
    --run-dir D --until rollout`: the job's rollout step delivers the reused version, which
    kept saying a trigger should deliver it too (two controllers for one version)."""
    registry = LocalRegistry(tmp_path / "reg")
    folder = make_model()
    first = register_model(folder, registry, source_run="run-1/register")
    assert "rollout_by" not in first.version.tags
    again = register_model(
        folder, registry, source_run="run-1/register", rollout_in_job=True, out_dir=tmp_path
    )
    assert again.version.version == 1
    assert registry.get("m", 1).tags["rollout_by"] == "pipeline-job"
    assert again.version.tags["rollout_by"] == "pipeline-job"


@pytest.mark.parametrize(
    ("stage", "tagged"),
    [
        pytest.param(Stage.CANDIDATE, False, id="candidate-left-to-the-triggers"),
        # delivered already (the job's rollout promoted it): the tag records who delivered it
        pytest.param(Stage.PRODUCTION, True, id="production-keeps-it"),
    ],
)
def test_a_rerun_that_leaves_delivery_to_the_triggers_untags_its_reused_candidate(
    tmp_path: Path, make_model: MakeModel, stage: Stage, tagged: bool
) -> None:
    """`run-local --run-dir D --until rollout` (tagged; its rollout step failed), then `run-local
    --run-dir D`: the reused version kept rollout_by=pipeline-job, which the triggers skip, and
    nothing in this run rolls it out: no one ever delivered it."""
    registry = LocalRegistry(tmp_path / "reg")
    folder = make_model()
    register_model(folder, registry, source_run="run-1/register", rollout_in_job=True)
    registry.set_tags("m", 1, {"stage": stage})
    again = register_model(folder, registry, source_run="run-1/register", out_dir=tmp_path)
    assert again.version.version == 1
    assert ("rollout_by" in registry.get("m", 1).tags) is tagged
    assert ("rollout_by" in again.version.tags) is tagged


def test_a_name_differing_from_a_registered_one_only_in_case_is_refused(
    tmp_path: Path, make_model: MakeModel, caplog: pytest.LogCaptureFixture
) -> None:
    """`Diabetes` and `diabetes` both packaged as <registry>/diabetes:1: one push overwrote the
    other's image, and a rollout of one served the other's model."""
    registry = LocalRegistry(tmp_path / "reg")
    register_model(make_model(name="diabetes"), registry)
    argv = ["--model", str(make_model(name="Diabetes", salt="2")), "--registry",
            f"local:{registry.root}", "--registration", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 1
    assert (
        "model name 'Diabetes' differs from the registered 'diabetes' only in case" in caplog.text
    )
    assert registry.names() == ["diabetes"]


def test_a_model_folder_that_lies_about_its_hash_is_refused(
    tmp_path: Path, make_model: MakeModel
) -> None:
    folder = make_model()
    (folder / "model.skops").write_bytes(b"swapped")
    with pytest.raises(IntegrityError, match=r"model\.json records"):
        register_model(folder, LocalRegistry(tmp_path / "reg"))


def test_main_exit_codes(tmp_path: Path, make_model: MakeModel) -> None:
    registry = f"local:{tmp_path / 'reg'}"

    def run(mse: float, *extra: str) -> int:
        out = tmp_path / f"out-{mse}-{len(extra)}"
        return main(["--model", str(make_model(mse=mse)), "--registry", registry,
                     "--registration", str(out), *extra])  # fmt: skip

    assert run(10.0) == 0
    LocalRegistry(tmp_path / "reg").set_tags("m", 1, {"stage": "production"})
    assert run(20.0) == EXIT_GATE_REFUSED
    assert run(20.0, "--force", "True") == 0
    assert run(1.0, "--metric", "rmse") == 0
    assert main(["--model", str(tmp_path), "--registry", "nope:x", "--registration", "o"]) == 1
    with pytest.raises(SystemExit) as missing:
        main(["--model", str(tmp_path)])
    assert missing.value.code == 2  # argparse names the missing --registry


def _rewrite_manifest(folder: Path, change: str) -> None:
    manifest = folder / "model.json"
    record = json.loads(manifest.read_text())
    if change == "truncated":
        manifest.write_text(manifest.read_text()[:20])
    elif change == "list":
        manifest.write_text("[]")
    elif change == "no-metrics":
        del record["metrics"]
        manifest.write_text(json.dumps(record))
    elif change == "metrics-string":
        record["metrics"] = "mse=3"
        manifest.write_text(json.dumps(record))
    elif change == "mse-string":
        record["metrics"]["mse"] = "low"
        manifest.write_text(json.dumps(record))
    elif change == "no-model-file":
        (folder / "model.skops").unlink()
    elif change.startswith("library_versions="):
        record["library_versions"] = json.loads(change.partition("=")[2])
        manifest.write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param("truncated", r"model\.json is not valid JSON", id="truncated"),
        pytest.param("list", r"model\.json is not a JSON object", id="not-an-object"),
        pytest.param("no-metrics", r"model\.json lacks the field\(s\) \['metrics'\]",
                     id="no-metrics"),
        pytest.param("metrics-string", "metrics must be an object", id="metrics-not-an-object"),
        pytest.param("mse-string", "metrics.mse is 'low', not a number", id="metric-not-a-number"),
        pytest.param("no-model-file", "model file 'model.skops' is missing", id="no-model-file"),
        # passed here, then a traceback in the package step
        pytest.param("library_versions=null", "library_versions must be an object of library "
                     "names and versions, not None", id="library-versions-null"),
        pytest.param('library_versions=["x"]', r"library_versions must be .*, not \['x'\]",
                     id="library-versions-list"),
        pytest.param('library_versions={"scikit-learn": "not a version"}',
                     r"library_versions\.scikit-learn is 'not a version', not a version",
                     id="library-version-not-a-version"),
        pytest.param('library_versions={"scikit-learn": 1.5}',
                     r"library_versions\.scikit-learn is 1\.5, not a version",
                     id="library-version-a-number"),
    ],
)  # fmt: skip
def test_a_damaged_model_folder_is_one_error_and_nothing_is_registered(
    tmp_path: Path,
    make_model: MakeModel,
    caplog: pytest.LogCaptureFixture,
    change: str,
    message: str,
) -> None:
    folder = make_model()
    _rewrite_manifest(folder, change)
    argv = ["--model", str(folder), "--registry", f"local:{tmp_path / 'reg'}",
            "--registration", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 1
    [error] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert error.getMessage().startswith("registration failed: ")
    assert re.search(message, error.getMessage()), error.getMessage()
    assert LocalRegistry(tmp_path / "reg").names() == []


def test_a_python_built_from_source_is_no_damaged_model_folder(
    tmp_path: Path, make_model: MakeModel
) -> None:
    """Train writes `python` from platform.python_version(), "3.13.0a1+" on a Python built from
    source, which is no PEP 440 version; nothing pins it (the image has its own CPython). Was:
    the step refused the train step's own model.json."""
    folder = make_model()
    record = json.loads((folder / "model.json").read_text())
    record["library_versions"] = {**record["library_versions"], "python": "3.13.0a1+"}
    (folder / "model.json").write_text(json.dumps(record))
    argv = ["--model", str(folder), "--registry", f"local:{tmp_path / 'reg'}",
            "--registration", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    assert LocalRegistry(tmp_path / "reg").names() == [record["name"]]


@pytest.mark.parametrize(
    ("runs", "versions"),
    [
        # killed after registering, before registration.json; or `run-local --run-dir` again
        pytest.param(("run-1/register", "run-1/register"), [1, 1], id="same-run-registers-once"),
        pytest.param(("run-1/register", "run-2/register"), [1, 2], id="another-run-registers"),
        pytest.param(("unknown", "unknown"), [1, 2], id="no-run-id-registers"),
    ],
)
def test_a_rerun_of_the_step_does_not_register_the_model_twice(
    tmp_path: Path, make_model: MakeModel, runs: tuple[str, str], versions: list[int]
) -> None:
    registry = LocalRegistry(tmp_path / "reg")
    folder = make_model()
    for attempt, run in enumerate(runs):
        out = tmp_path / f"out-{attempt}"
        registration = register_model(folder, registry, source_run=run, out_dir=out)
        written = json.loads((out / "registration.json").read_text())
        assert written["version"] == registration.version.version == versions[attempt]
    assert [v.version for v in registry.list_versions("m")] == sorted(set(versions))


def test_an_unwritable_output_fails_before_anything_is_registered(
    tmp_path: Path, make_model: MakeModel, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("not a folder")
    argv = ["--model", str(make_model()), "--registry", f"local:{tmp_path / 'reg'}",
            "--registration", str(tmp_path / "file" / "out")]  # fmt: skip
    assert main(argv) == 1
    assert "registration failed: [Errno 20] Not a directory" in caplog.text
    assert LocalRegistry(tmp_path / "reg").names() == []


Trained = Callable[..., Path]
#: The diabetes rows each data folder of `trained` holds.
DATA_ROWS = {
    "old": slice(0, 400),
    "refreshed": slice(0, 442),
    "january": slice(0, 221),
    "february": slice(221, 442),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Ridge models of the diabetes data: "old" is its first 400 rows, "refreshed" all 442,
    "january" rows 0-220 and "february" rows 221-441 (new rows only);
    `trained(data, alpha, seed=42, test_fraction=0.2)`."""
    from sklearn.datasets import load_diabetes

    root = tmp_path_factory.mktemp("trained")
    bunch = load_diabetes()
    for folder, rows in DATA_ROWS.items():
        (root / folder).mkdir()
        with (root / folder / "data.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow([*bunch.feature_names, "progression"])
            for x, y in list(zip(bunch.data.tolist(), bunch.target.tolist(), strict=True))[rows]:
                writer.writerow([*x, y])

    def make(data: str, alpha: float, seed: int = 42, test_fraction: float = 0.2) -> Path:
        out = root / f"model-{data}-{alpha}-{seed}-{test_fraction}"
        if not out.exists():
            params = TrainParams(alpha=alpha, seed=seed, test_fraction=test_fraction)
            train(out, name="diabetes", params=params, data=root / data, target="progression")
        return out

    return make


@pytest.mark.parametrize(
    ("production_data", "candidate", "passed", "reason"),
    [
        pytest.param(
            "old",
            ("old", 0.1),
            True,
            r"candidate mse=3405\.94 is not worse than production diabetes:1 mse=3596\.39",
            id="same-data-compares-the-tags",
        ),
        pytest.param(
            "old",
            ("refreshed", 0.1),
            True,
            r"production diabetes:1 and the candidate re-scored on the 55 of the candidate's 89 "
            r"held-out rows that production did not train on either: mse 3316\.12 vs candidate "
            r"3030\.62: the candidate is not worse than production \(lower is "
            r"better\); the mse tags \(3596\.39 vs candidate 2856\.49\) were measured on other "
            r"data \(eval_fingerprint ",
            id="refreshed-data-better-candidate-passes",
        ),
        pytest.param(
            "old",
            ("refreshed", 10.0),
            False,
            r"production diabetes:1 and the candidate re-scored on the 55 of the candidate's 89 "
            r"held-out rows that production did not train on either: mse 3316\.12 vs candidate "
            r"4624\.54: the candidate is worse than production \(lower is better\); the mse tags "
            r"\(3596\.39 vs candidate 4443\.95\) were measured on other data",
            id="refreshed-data-worse-candidate-refused-with-both-numbers",
        ),
        pytest.param(
            "unloadable",
            ("refreshed", 0.1),
            False,
            r"measured on different data .*not comparable.*production could not be re-scored "
            r"on the candidate's held-out rows: diabetes:1 cannot be loaded: .*not a readable "
            r"skops file",
            id="unloadable-production-refused-as-before",
        ),
    ],
)
def test_after_a_data_refresh_production_is_rescored_on_the_candidates_rows(
    tmp_path: Path,
    make_model: MakeModel,
    trained: Trained,
    production_data: str,
    candidate: tuple[str, float],
    passed: bool,
    reason: str,
) -> None:
    registry = LocalRegistry(tmp_path / "reg")
    production = (
        make_model(name="diabetes", mse=3000.0, data_fingerprint="sha256:other")
        if production_data == "unloadable"  # fake bytes: skops refuses them
        else trained(production_data, 1.0)
    )
    register_model(production, registry)
    registry.set_tags("diabetes", 1, {"stage": Stage.PRODUCTION})

    if not passed:
        with pytest.raises(GateRefused, match=reason):
            register_model(trained(*candidate), registry, out_dir=tmp_path / "out")
        assert [v.version for v in registry.list_versions("diabetes")] == [1]
        return
    registered = register_model(trained(*candidate), registry, out_dir=tmp_path / "out")
    assert re.search(reason, registered.decision.reason), registered.decision.reason
    assert registered.decision.comparable is True
    assert registered.version.tags["gate"] == "passed"
    assert registered.version.tags["gate_baseline"] == "diabetes:1"


@pytest.mark.parametrize(
    ("mounted", "moved", "passed", "reason"),
    [
        pytest.param(
            ("old", 1.0),
            False,
            True,
            r"production diabetes:1 and the candidate re-scored on the 55 of the candidate's 89 "
            r"held-out rows that production did not train on either: mse 3316\.12 vs candidate "
            r"3030\.62: the candidate is not worse",
            id="production-folder-given-rescored",
        ),
        pytest.param(
            None,
            False,
            False,
            r"not comparable.*diabetes:1 has no local folder to load its model from",
            id="no-folder-refused-as-before",
        ),
        pytest.param(
            ("old", 0.5),
            False,
            False,
            r"not comparable.*the production_model folder holds the model with sha256 \w{12}…, "
            r"not diabetes:1's registered sha256 \w{12}…",
            id="another-models-folder-not-trusted",
        ),
        pytest.param(
            ("old", 1.0),
            True,
            False,
            r"not comparable.*the production_model folder holds the model with sha256 \w{12}…, "
            r"not diabetes:2's registered sha256 \w{12}… \(production changed since the job was "
            r"submitted",
            id="production-moved-since-submit-not-trusted",
        ),
    ],
)
def test_a_registry_without_files_rescores_production_from_the_folder_given(
    tmp_path: Path,
    trained: Trained,
    mounted: tuple[str, float] | None,
    moved: bool,
    passed: bool,
    reason: str,
) -> None:
    """Azure ML's registry downloads nothing (path None, as here): the pipeline mounts
    production's files as the step's production_model input, trusted only if still production's."""
    from aml_pipelines.registry.memory import MemoryRegistry

    registry = MemoryRegistry()
    register_model(trained("old", 1.0), registry, source="azureml://jobs/one/outputs/model")
    registry.set_tags("diabetes", 1, {"stage": Stage.PRODUCTION})
    if moved:  # another version became production after the job was submitted with v1's files
        register_model(trained("old", 0.5), registry, source="azureml://jobs/two/outputs/model")
        registry.set_tags("diabetes", 1, {"stage": Stage.ARCHIVED})
        registry.set_tags("diabetes", 2, {"stage": Stage.PRODUCTION})
    assert registry.get("diabetes", 1).path is None
    folder = trained(*mounted) if mounted is not None else None

    candidate = trained("refreshed", 0.1)
    if not passed:
        with pytest.raises(GateRefused, match=reason):
            register_model(candidate, registry, production_model=folder)
        return
    registered = register_model(candidate, registry, production_model=folder)
    assert re.search(reason, registered.decision.reason), registered.decision.reason
    assert registered.decision.comparable is True


def test_a_production_folder_mounted_one_level_down_is_rescored_from_where_it_loads(
    tmp_path: Path, trained: Trained
) -> None:
    """The model loads from a folder holding one model folder (as Azure ML mounts a registered
    folder for a deployment, under <dir>/<name>); its training and held-out rows were then looked
    for one level up: "[Errno 2] No such file ... model.json", refused as not comparable."""
    from aml_pipelines.registry.memory import MemoryRegistry

    registry = MemoryRegistry()
    register_model(trained("old", 1.0), registry, source="azureml://jobs/one/outputs/model")
    registry.set_tags("diabetes", 1, {"stage": Stage.PRODUCTION})
    mount = tmp_path / "mount"
    shutil.copytree(trained("old", 1.0), mount / "diabetes")
    registered = register_model(trained("refreshed", 0.1), registry, production_model=mount)
    assert registered.decision.comparable is True
    assert "re-scored on the 55 of the candidate's 89" in registered.decision.reason


@pytest.fixture
def old_in_production(tmp_path: Path, trained: Trained) -> LocalRegistry:
    """A local registry (production's files at hand) whose v1, the "old" model, is production."""
    registry = LocalRegistry(tmp_path / "reg")
    register_model(trained("old", 1.0), registry)
    registry.set_tags("diabetes", 1, {"stage": Stage.PRODUCTION})
    return registry


def test_a_folder_not_productions_falls_back_to_the_registrys_own_folder(
    old_in_production: LocalRegistry,
    trained: Trained,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The local registry has production's files: an untrusted folder is not the last word."""
    registry = old_in_production
    registered = register_model(
        trained("refreshed", 0.1), registry, production_model=trained("old", 0.5)
    )
    assert (
        "production diabetes:1 and the candidate re-scored on the 55 of the candidate's 89 "
        "held-out rows that production did not train on either: mse 3316.12 vs candidate 3030.62"
    ) in registered.decision.reason
    assert "re-scoring from the registry's folder instead" in caplog.text


def test_a_candidate_without_held_out_rows_is_not_rescored_twice(
    tmp_path: Path,
    old_in_production: LocalRegistry,
    trained: Trained,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The candidate's rows failing is no reason to load production from another folder."""
    registry = old_in_production
    candidate = shutil.copytree(trained("refreshed", 0.1), tmp_path / "candidate")
    (candidate / "heldout.csv").unlink()

    with pytest.raises(GateRefused, match="the candidate's held-out rows"):
        register_model(candidate, registry, production_model=trained("old", 1.0))
    assert "re-scoring from the registry's folder instead" not in caplog.text


def test_the_registrys_own_folder_given_as_production_model_is_loaded_once(
    old_in_production: LocalRegistry,
    trained: Trained,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """run-local binds the local registry's folder itself: a load failing there is not retried."""
    import scoring.model
    from scoring.errors import ModelLoadError

    registry = old_in_production
    production = registry.get("diabetes", 1)
    assert production.path is not None
    loads: list[Path] = []

    def unloadable(folder: Path, **_: object) -> None:
        loads.append(folder)
        raise ModelLoadError("disk gone")

    monkeypatch.setattr(scoring.model, "load_model", unloadable)
    with pytest.raises(GateRefused, match="the production_model folder cannot be loaded: disk"):
        register_model(trained("refreshed", 0.1), registry, production_model=Path(production.path))
    assert loads == [Path(production.path)]
    assert "re-scoring from the registry's folder instead" not in caplog.text


def _rows(folder: Path) -> dict[tuple[float, ...], int]:
    """A heldout.csv's rows (whole content) → how many times each."""
    with (folder / "heldout.csv").open(newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        rows = [tuple(float(v) for v in row) for row in reader]
    return {row: rows.count(row) for row in rows}


@pytest.mark.parametrize(
    ("seed", "test_fraction", "common", "reason"),
    [
        pytest.param(
            7,
            0.5,
            48,
            r"production diabetes:1 and the candidate re-scored on the 48 of the candidate's 200 "
            r"held-out rows that production did not train on either: mse ",
            id="enough-rows-in-common-both-scored-on-them",
        ),
        pytest.param(
            7,
            0.2,
            17,
            r"not comparable.*production could not be re-scored on the candidate's held-out "
            r"rows: only 17 of the candidate's 80 held-out rows were not trained on by diabetes:1",
            id="too-few-rows-in-common-not-comparable",
        ),
    ],
)
def test_another_split_is_not_judged_on_productions_training_rows(
    old_in_production: LocalRegistry,
    trained: Trained,
    seed: int,
    test_fraction: float,
    common: int,
    reason: str,
) -> None:
    """Another seed: most of the candidate's held-out rows were production's training rows,
    on which production looks better than it is; only the rows both held out are fair."""
    from scoring.model import load_model

    registry = old_in_production
    production = trained("old", 1.0)
    candidate = trained("old", 1.0, seed=seed, test_fraction=test_fraction)
    theirs, ours = _rows(production), _rows(candidate)
    fair = [row for row in ours for _ in range(ours[row]) if row in theirs]
    assert len(fair) == common  # the others production trained on

    decision = evaluate_gate_of(registry, candidate)
    assert re.search(reason, decision.reason), decision.reason
    if len(fair) < 30:
        assert decision.comparable is False and not decision.passed
        return
    table = np.array(fair)

    def mse(folder: Path) -> float:
        predicted = load_model(folder).predictor.predict(table[:, :-1])
        return float(np.mean((predicted - table[:, -1]) ** 2))

    assert decision.comparable is True
    assert decision.baseline == pytest.approx(mse(production), rel=1e-12)
    assert decision.candidate == pytest.approx(mse(candidate), rel=1e-12)
    assert decision.passed == (decision.candidate <= decision.baseline)


def evaluate_gate_of(registry: LocalRegistry, candidate: Path) -> GateDecision:
    """The gate's decision on `candidate`, refused or not (force: registered either way)."""
    return register_model(candidate, registry, force=True).decision


@pytest.mark.parametrize(
    ("removed", "reason"),
    [
        pytest.param(
            ("train-rows.u64",),
            r"production diabetes:1 and the candidate re-scored on the 43 of the candidate's 89 "
            r"held-out rows that production did not train on either: mse 3756\.6 vs candidate "
            r"3570\.15",
            id="trained-before-train-rows-falls-back-to-rows-both-held-out",
        ),
        pytest.param(
            ("heldout.csv",),
            r"production diabetes:1 and the candidate re-scored on the 55 of the candidate's 89 "
            r"held-out rows that production did not train on",
            id="training-rows-alone-suffice",
        ),
        pytest.param(
            ("train-rows.u64", "heldout.csv"),
            r"not comparable.*diabetes:1's held-out rows \(the ones it did not train on\): "
            r".*has no heldout\.csv",
            id="neither-not-comparable",
        ),
    ],
)
def test_a_production_folder_without_its_training_rows_falls_back_to_its_held_out_rows(
    tmp_path: Path, trained: Trained, removed: tuple[str, ...], reason: str
) -> None:
    """A production trained before train-rows.u64 existed: the rows both held out are fair
    (fewer, but never rows it trained on); without its held-out rows either, nothing is."""
    from aml_pipelines.registry.memory import MemoryRegistry

    registry = MemoryRegistry()
    register_model(trained("old", 1.0), registry, source="azureml://jobs/one/outputs/model")
    registry.set_tags("diabetes", 1, {"stage": Stage.PRODUCTION})
    folder = shutil.copytree(trained("old", 1.0), tmp_path / "production")
    for name in removed:
        (folder / name).unlink()

    if reason.startswith("not comparable"):
        with pytest.raises(GateRefused, match=reason):
            register_model(trained("refreshed", 0.1), registry, production_model=folder)
        return
    registered = register_model(trained("refreshed", 0.1), registry, production_model=folder)
    assert re.search(reason, registered.decision.reason), registered.decision.reason


def test_a_damaged_training_rows_file_is_not_comparable(tmp_path: Path, trained: Trained) -> None:
    """Rows lost from production's train-rows.u64 would score it on rows it trained on."""
    from aml_pipelines.registry.memory import MemoryRegistry

    registry = MemoryRegistry()
    register_model(trained("old", 1.0), registry, source="azureml://jobs/one/outputs/model")
    registry.set_tags("diabetes", 1, {"stage": Stage.PRODUCTION})
    folder = shutil.copytree(trained("old", 1.0), tmp_path / "production")
    (folder / "train-rows.u64").write_bytes((folder / "train-rows.u64").read_bytes()[8:])

    with pytest.raises(
        GateRefused,
        match=r"not comparable.*diabetes:1's training rows: .*train-rows\.u64: 319 rows, "
        r"model\.json's rows\.train is 320",
    ):
        register_model(trained("refreshed", 0.1), registry, production_model=folder)


ROLLED_BACK = ModelVersion(
    "m", 6, "file:///y", "b" * 64, {"stage": "rolled-back", "rollback_reason": "canary 29 % 5xx"}
)


@pytest.mark.parametrize(
    ("production", "rolled_back", "passed", "reason"),
    [
        pytest.param(PROD, ROLLED_BACK, False, "rolled back: canary 29 % 5xx",
                     id="rolled-back-bits"),
        pytest.param(None, ROLLED_BACK, False, "m:6's model", id="rolled-back-bits-no-production"),
        # (whether the candidate's bits are a rolled-back version's is the register step's
        # lookup: test_a_rolled_back_model_is_not_registered_again_as_a_new_candidate)
        pytest.param(PROD, None, True, "not worse", id="no-rolled-back-version-of-these-bits"),
    ],
)  # fmt: skip
def test_gate_refuses_the_bits_of_a_rolled_back_version(
    production: ModelVersion | None, rolled_back: ModelVersion | None, passed: bool, reason: str
) -> None:
    sha256 = rolled_back.sha256 if rolled_back is not None else "c" * 64
    decision = evaluate_gate(
        {"mse": 1.0}, production, metric="mse", sha256=sha256, rolled_back=rolled_back
    )
    assert decision.passed is passed
    assert reason in decision.reason


def test_a_rolled_back_model_is_not_registered_again_as_a_new_candidate(
    tmp_path: Path, make_model: MakeModel
) -> None:
    """Train is deterministic: a nightly retrain on unchanged data re-registered the model a
    rollout had just rolled back, as a candidate the triggers (or the job) rolled out again."""
    registry = f"local:{tmp_path / 'reg'}"
    reg = LocalRegistry(tmp_path / "reg")
    register_model(make_model(mse=10.0), reg, source_run="run-1")
    reg.set_tags("m", 1, {"stage": Stage.PRODUCTION})
    rejected = make_model(mse=5.0)
    register_model(rejected, reg, source_run="run-2")
    reg.set_tags("m", 2, {"stage": Stage.ROLLED_BACK, "rollback_reason": "canary 29 % 5xx"})

    with pytest.raises(GateRefused, match=r"m:2's model \(same sha256 .*rolled back: canary 29"):
        register_model(rejected, reg, source_run="run-3", out_dir=tmp_path / "o3")
    assert [v.version for v in reg.list_versions("m")] == [1, 2]
    assert not (tmp_path / "o3" / "registration.json").exists()
    out = str(tmp_path / "o4")
    argv = ["--model", str(rejected), "--registry", registry, "--registration", out]
    assert main(argv) == EXIT_GATE_REFUSED
    assert main([*argv, "--force", "true"]) == 0
    forced = reg.get("m", 3)
    assert (forced.sha256, forced.tags["gate"]) == (reg.get("m", 2).sha256, "forced")
