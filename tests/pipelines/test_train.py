"""The train component's library: the model-folder contract, determinism, CSV input, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from aml_pipelines.errors import ConfigError
from components.train.train import (
    TrainParams,
    held_out_metrics,
    load_held_out,
    load_train_rows,
    row_hashes,
    train,
)

CONTRACT_KEYS = {
    "name",
    "framework",
    "estimator",
    "model_file",
    "sha256",
    "feature_names",
    "target",
    "metrics",
    "data_fingerprint",
    "eval_fingerprint",
    "library_versions",
    "params",
}


def test_model_folder_follows_the_contract(tmp_path: Path) -> None:
    result = train(tmp_path / "model", name="diabetes", params=TrainParams(), metrics_dir=tmp_path)
    manifest = json.loads((tmp_path / "model" / "model.json").read_text())
    assert manifest.keys() >= CONTRACT_KEYS
    assert manifest["framework"] == "sklearn" and manifest["estimator"] == "Ridge"
    blob = (tmp_path / "model" / manifest["model_file"]).read_bytes()
    assert manifest["sha256"] == hashlib.sha256(blob).hexdigest() == result.sha256
    assert set(manifest["metrics"]) == {"mse", "rmse", "r2"}
    assert manifest["metrics"]["rmse"] == pytest.approx(manifest["metrics"]["mse"] ** 0.5)
    assert manifest["params"] == {"alpha": 1.0, "test_fraction": 0.2, "seed": 42}
    assert len(manifest["feature_names"]) == 10
    sample = json.loads((tmp_path / "model" / "sample-input.json").read_text())["data"]
    assert len(sample) == manifest["rows"]["test"] == 89  # all held-out rows (<= 100)
    assert all(len(row) == 10 for row in sample)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["mse"] == manifest["metrics"]["mse"]


def test_the_held_out_rows_are_the_ones_the_metrics_were_measured_on(tmp_path: Path) -> None:
    """register re-scores production on them: they must give back the very fingerprint and
    metrics, and rows edited afterwards must be refused, not scored."""
    import skops.io as sio

    train(tmp_path, name="diabetes", params=TrainParams())
    manifest = json.loads((tmp_path / "model.json").read_text())
    rows = load_held_out(tmp_path)
    assert rows.fingerprint == manifest["eval_fingerprint"] and len(rows.target) == 89
    blob = (tmp_path / "model.skops").read_bytes()
    model = sio.loads(blob, trusted=sio.get_untrusted_types(data=blob))
    assert held_out_metrics(rows.target, model.predict(rows.features)) == manifest["metrics"]

    header, first, *rest = (tmp_path / "heldout.csv").read_text().splitlines()
    edited = "0.5," + first.split(",", 1)[1]  # one value of one row changed
    (tmp_path / "heldout.csv").write_text("\n".join([header, edited, *rest]) + "\n")
    with pytest.raises(ConfigError, match=r"not the ones model\.json's metrics were measured on"):
        load_held_out(tmp_path)


def test_the_training_rows_are_written_as_sorted_hashes_of_their_content(tmp_path: Path) -> None:
    """The register gate leaves production's training rows out: train-rows.u64 must hold
    exactly them (the data less the held-out rows), told apart from any other row."""
    from sklearn.datasets import load_diabetes

    train(tmp_path, name="diabetes", params=TrainParams())
    bunch = load_diabetes()
    held_out = load_held_out(tmp_path)
    everything = row_hashes(bunch.data, bunch.target)
    assert len(set(everything.tolist())) == 442  # no two rows hash alike
    assert row_hashes(-0.0 * bunch.data[:1], bunch.target[:1]) == row_hashes(
        0.0 * bunch.data[:1], bunch.target[:1]
    )
    hashes = load_train_rows(tmp_path)
    assert hashes is not None and (tmp_path / "train-rows.u64").stat().st_size == 353 * 8
    expected = set(everything.tolist()) - set(
        row_hashes(held_out.features, held_out.target).tolist()
    )
    assert hashes.tolist() == sorted(expected)

    (tmp_path / "train-rows.u64").write_bytes(hashes[::-1].tobytes())
    with pytest.raises(ConfigError, match="not sorted"):
        load_train_rows(tmp_path)
    (tmp_path / "train-rows.u64").write_bytes(hashes[1:].tobytes())
    with pytest.raises(ConfigError, match=r"352 rows, model\.json's rows\.train is 353"):
        load_train_rows(tmp_path)
    (tmp_path / "train-rows.u64").write_bytes(b"1234567")
    with pytest.raises(ConfigError, match="7 bytes is not an array of 64-bit hashes"):
        load_train_rows(tmp_path)
    (tmp_path / "train-rows.u64").unlink()
    assert load_train_rows(tmp_path) is None  # trained before it was written


def test_model_loads_with_skops_and_predicts_the_sample(tmp_path: Path) -> None:
    import skops.io as sio

    train(tmp_path, name="m", params=TrainParams())
    blob = (tmp_path / "model.skops").read_bytes()
    assert not blob.startswith(b"\x80")  # a zip (skops), not a pickle
    model = sio.loads(blob, trusted=sio.get_untrusted_types(data=blob))
    sample = json.loads((tmp_path / "sample-input.json").read_text())["data"]
    assert model.predict(sample).shape == (len(sample),)


def test_training_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    first = train(tmp_path / "a", name="m", params=TrainParams(seed=7))
    again = train(tmp_path / "b", name="m", params=TrainParams(seed=7))
    other = train(tmp_path / "c", name="m", params=TrainParams(seed=8))
    assert first.sha256 == again.sha256 and first.metrics == again.metrics
    assert other.metrics != first.metrics
    assert first.data_fingerprint == other.data_fingerprint  # same data, different split
    # ... so the metrics were measured on other rows: the gate must be able to tell.
    assert first.eval_fingerprint == again.eval_fingerprint != other.eval_fingerprint
    assert first.eval_fingerprint.startswith("sha256:")


def test_alpha_changes_the_held_out_error(tmp_path: Path) -> None:
    base = train(tmp_path / "a", name="m", params=TrainParams(alpha=1.0))
    worse = train(tmp_path / "b", name="m", params=TrainParams(alpha=10.0))
    better = train(tmp_path / "c", name="m", params=TrainParams(alpha=0.1))
    assert better.metrics["mse"] < base.metrics["mse"] < worse.metrics["mse"]
    # Same data and split: the gate may compare them.
    assert base.eval_fingerprint == worse.eval_fingerprint == better.eval_fingerprint


def _write_csv(path: Path, rows: int = 40) -> None:
    lines = ["x1,x2,y"] + [f"{i},{(i * 7) % 5},{2 * i + 1}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")


def test_csv_folder_with_a_target_column(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _write_csv(data / "part-0.csv")
    result = train(
        tmp_path / "model", name="csv", params=TrainParams(alpha=0.0), data=data, target="y"
    )
    manifest = json.loads((tmp_path / "model" / "model.json").read_text())
    assert manifest["feature_names"] == ["x1", "x2"] and manifest["target"] == "y"
    assert result.metrics["r2"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("params", "target", "csv", "message"),
    [
        pytest.param({"alpha": -1.0}, None, False, "alpha", id="negative-alpha"),
        pytest.param({"test_fraction": 1.0}, None, False, "test_fraction", id="fraction-one"),
        pytest.param({"seed": -1}, None, False, "^seed must be", id="negative-seed"),
        pytest.param({"seed": 2**32}, None, False, "^seed must be", id="seed-too-big"),
        pytest.param(
            {"test_fraction": 0.999}, None, False, "^test_fraction: .* 0 training", id="no-training"
        ),
        pytest.param(
            {"test_fraction": 0.001}, None, False, "^test_fraction: .* 1 held-out", id="1-held-out"
        ),
        pytest.param(
            {"test_fraction": 0.97},
            "y",
            True,
            "^test_fraction: .* 1 training",
            id="one-training-row",
        ),
        pytest.param({}, None, True, "target: required", id="csv-without-target"),
        pytest.param({}, "nope", True, "'nope' not in the CSV header", id="unknown-target"),
    ],
)
def test_bad_input_names_the_field(
    tmp_path: Path, params: dict[str, float], target: str | None, csv: bool, message: str
) -> None:
    data = None
    if csv:
        data = tmp_path / "data.csv"
        _write_csv(data)
    with pytest.raises(ConfigError, match=message):
        train(tmp_path / "model", name="m", params=TrainParams(**params), data=data, target=target)


def test_a_csv_with_a_byte_order_mark(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    _write_csv(data)
    data.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())  # as Excel's "CSV UTF-8" writes it
    train(tmp_path / "m", name="m", params=TrainParams(), data=data, target="x1")
    manifest = json.loads((tmp_path / "m" / "model.json").read_text())
    assert (manifest["target"], manifest["feature_names"]) == ("x1", ["x2", "y"])


def test_non_numeric_csv_names_the_line_and_column(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("a,b,y\n1,2,3\n4,five,6\n")
    with pytest.raises(
        ConfigError, match=r"^data: d\.csv line 3, column 'b': 'five' is not a finite number"
    ):
        train(tmp_path / "m", name="m", params=TrainParams(), data=data, target="y")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"\xff\xfe\x00a,y\n", r"^data: d\.csv is not a UTF-8 CSV file", id="binary"),
        # the second y would be a feature: the model would learn the target from itself
        pytest.param(b"a,y,y\n" + b"1,2,2\n3,4,4\n5,6,6\n7,8,8\n9,1,1\n2,3,3\n",
                     r"^data: the CSV header repeats the column\(s\) \['y'\]",
                     id="repeated-target"),
        pytest.param(b"y\n1\n2\n3\n4\n5\n6\n", "^data: the CSV has no feature column",
                     id="target-only"),
        # finite, but they overflow inside the solver
        pytest.param(b"a,y\n1e308,1e308\n-1e308,-1e308\n1e308,1\n1,1e308\n2,2\n-1e308,3\n",
                     "^data: Ridge cannot be fitted", id="overflow"),
        # fitted, but the held-out error overflows: it wrote mse Infinity, r2 NaN (not JSON)
        pytest.param(b"a,b,y\n" + b"".join(b"%d,%d,%de158\n" % (i, i % 7, i * 37 % 100)
                                             for i in range(50)),
                     r"^data: the held-out metrics are not finite \(mse=inf, rmse=inf, r2=nan\)",
                     id="metrics-overflow"),
        pytest.param(b"", r"^data: d\.csv is empty \(no header row\)", id="empty"),
        # it said "the CSV holds NaN or infinite values", not where
        pytest.param(b"a,y\n1,2\n3,4\n5,NaN\n7,8\n", r"^data: d\.csv line 4, column 'y': 'NaN' is "
                     "not a finite number", id="nan"),
        pytest.param(b"a,y\n1,2\n-inf,4\n5,6\n7,8\n", r"^data: d\.csv line 3, column 'a': '-inf'",
                     id="infinite"),
        pytest.param(b"\n\n", r"^data: d\.csv is empty", id="blank-lines"),
        pytest.param(b"a,y\n", r"^data: 0 rows is too few", id="header-only"),
        pytest.param(b"a,y\n1,2\n", r"^data: 1 rows is too few", id="one-row"),
        # it trained, mse=0 and r2=1.0: a perfect model of nothing (the wrong column, a filter)
        pytest.param(b"a,y\n1,3\n2,3\n3,3\n4,3\n5,3\n6,3\n",
                     r"^target: column 'y' is constant \(3\.0 in all 6 rows\)",
                     id="constant-target"),
        # not comma-separated: the header is one column. It blamed line 2's first value, after
        # parsing the whole file (minutes for a large CSV) to learn that the target is missing.
        pytest.param(b"a;y\n1;2\n3;4\n5;6\n7;8\n",
                     r"^target: column 'y' not in the CSV header \['a;y'\]", id="semicolons"),
    ],
)  # fmt: skip
def test_a_bad_csv_is_one_error_naming_it(tmp_path: Path, content: bytes, message: str) -> None:
    data = tmp_path / "d.csv"
    data.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        train(tmp_path / "m", name="m", params=TrainParams(), data=data, target="y")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("name", ["", "a/b", "../m", "my model", "m" * 256])
def test_a_model_name_the_registry_refuses_is_refused_before_training(
    tmp_path: Path, name: str
) -> None:
    with pytest.raises(ConfigError, match=r"^model name .* is invalid"):
        train(tmp_path / "m", name=name, params=TrainParams())
    assert not (tmp_path / "m").exists()


def test_main_reports_an_unusable_output_folder_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from components.train.main import main

    (tmp_path / "file").write_text("not a folder")
    assert main(["--model-name", "m", "--model-dir", str(tmp_path / "file" / "model")]) == 1
    assert "training failed: [Errno 20] Not a directory" in caplog.text


def test_a_large_csv_is_held_as_floats_not_python_objects(tmp_path: Path) -> None:
    """A list of Python float lists took ~7x the data's float64 size (~8x the CSV's size in RSS:
    835 MB for a 100 MB CSV), so a CSV of a few GB was OOM-killed on a common cluster SKU, with
    no error line at all. Packed floats keep the peak near the data's own size."""
    import tracemalloc

    import numpy as np

    from components.train.train import load_csv_dataset

    rows, columns = 5000, 11
    values = np.arange(rows * columns, dtype=np.float64).reshape(rows, columns) % 97
    header = ",".join([f"x{i}" for i in range(columns - 1)] + ["y"])
    np.savetxt(tmp_path / "d.csv", values, delimiter=",", header=header, comments="", fmt="%g")
    tracemalloc.start()
    try:
        dataset = load_csv_dataset(tmp_path, "y")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert dataset.features.shape == (rows, columns - 1)
    np.testing.assert_array_equal(dataset.target, values[:, -1])
    assert peak < 3 * values.nbytes, f"peak {peak / values.nbytes:.1f}x the data"


def test_the_same_seed_gives_the_same_bytes_whatever_the_blas_thread_count(
    tmp_path: Path,
) -> None:
    """A multi-threaded BLAS sums in another order with another thread count: from ~50 000 rows
    the same data and seed gave another sha256 on 1 core than on 2 (a laptop's run-local vs a
    cluster node), which the docs promised would not happen."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    values = rng.normal(size=(60_000, 11))
    values[:, -1] = values[:, :-1] @ np.arange(10) + values[:, -1]
    header = ",".join([f"x{i}" for i in range(10)] + ["y"])
    np.savetxt(tmp_path / "d.csv", values, delimiter=",", header=header, comments="", fmt="%.6f")
    digests = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="blas"):
            result = train(
                tmp_path / f"m{threads}", name="m", params=TrainParams(), data=tmp_path, target="y"
            )
        digests.append(result.sha256)
    assert digests[0] == digests[1]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        # float() reads PEP 515 underscores: a code column `3_1` trained as 31
        pytest.param("3_1", "'3_1'", id="underscore"),
        # and any Unicode decimal digits: an export's full-width or Arabic-Indic digits
        pytest.param("１２", "'１２'", id="full-width-digits"),
        pytest.param("٣", "'٣'", id="arabic-indic-digit"),
        pytest.param("\u00a05", "'\\xa05'", id="non-ascii-space"),
    ],
)
def test_a_value_only_python_reads_as_a_number_is_refused(
    tmp_path: Path, value: str, shown: str
) -> None:
    data = tmp_path / "d.csv"
    rows = "".join(f"{i},{i % 3},{2 * i}\n" for i in range(9))
    data.write_text(f"a,b,y\n{rows}1,{value},3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        train(tmp_path / "m", name="m", params=TrainParams(), data=data, target="y")
    assert str(refused.value) == f"data: d.csv line 11, column 'b': {shown} is not a finite number"


def test_ascii_number_syntax_is_still_read(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    values = ["1", "+2", "-3.5", ".5", "6.", "7e1", "8E-1", " 9 ", "1.5e+2"]
    data.write_text("a,y\n" + "".join(f"{v},{i}\n" for i, v in enumerate(values)))
    train(tmp_path / "m", name="m", params=TrainParams(test_fraction=0.3), data=data, target="y")
    assert (tmp_path / "m" / "model.json").is_file()


@pytest.mark.parametrize(
    "folder",
    [
        # Spark's df.write.csv("a.csv") writes a folder: it hid b.csv ("no CSV file found")
        pytest.param("a.csv", id="folder-sorted-first"),
        # or failed the step with a bare "[Errno 21] Is a directory"
        pytest.param("z.csv", id="folder-sorted-last"),
    ],
)
def test_a_folder_named_like_a_csv_is_not_read_as_one(tmp_path: Path, folder: str) -> None:
    from components.train.train import check_csv_target

    data = tmp_path / "data"
    data.mkdir()
    (data / folder).mkdir()
    (data / folder / "part-0.csv").write_text("a,y\n1,2\n")
    _write_csv(data / "b.csv")
    check_csv_target(data, "x1")
    train(tmp_path / "m", name="m", params=TrainParams(), data=data, target="x1")
    manifest = json.loads((tmp_path / "m" / "model.json").read_text())
    assert manifest["target"] == "x1"
