"""The example model: Ridge regression, evaluated on a held-out split, saved as a model folder.

This is the part a user replaces with their own training code. What the rest of the system relies
on is only the model-folder contract it writes:

    model.skops         the estimator, serialised with skops (never pickle)
    model.json          name, framework, estimator, model_file, sha256 of model.skops,
                        feature_names, target, metrics {rmse, mse, r2} on the held-out split,
                        data_fingerprint (the whole data set), eval_fingerprint (the held-out
                        rows the metrics were measured on: the register gate compares only
                        metrics with the same one), library_versions,
                        params {alpha, test_fraction, seed}
    sample-input.json   {"data": [[...], ...]}: up to 100 held-out rows (sent by the load generator)
    heldout.csv         every held-out row, features and target (header: feature_names + target,
                        values exact): the register gate re-scores both models on those that
                        production did not train on when production was measured on
                        other data. Not part of the sha256
                        (which covers model.skops alone), and not copied into the package.
    train-rows.u64      which rows it trained on: the sorted little-endian uint64 `row_hashes` of
                        the training rows (8 bytes a row: 6.4 MB for 800 000), what the gate
                        leaves out when this model is production. Like heldout.csv, outside
                        the sha256 and the package.

Training is deterministic for a given seed and data: the split uses `seed`, Ridge's solver is
deterministic and runs on one BLAS thread (the sum order, and so the last bits, would otherwise
depend on the machine's thread count), and the skops zip is re-packed with fixed timestamps so
the same inputs give the same sha256 (skops stamps the current time into the zip otherwise).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import platform
import re
import zipfile
from array import array
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from aml_pipelines.errors import ConfigError
from aml_pipelines.registry.local import check_name

log = logging.getLogger(__name__)

MODEL_FILE = "model.skops"
MODEL_JSON = "model.json"
SAMPLE_INPUT = "sample-input.json"
METRICS_FILE = "metrics.json"
HELDOUT_FILE = "heldout.csv"
TRAIN_ROWS_FILE = "train-rows.u64"
SAMPLE_ROWS = 100
DIABETES_TARGET = "progression"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_VERSIONED_LIBRARIES = ("scikit-learn", "skops", "numpy", "scipy")


@dataclass(frozen=True)
class Dataset:
    """Features, target and a fingerprint identifying exactly these values."""

    features: np.ndarray
    target: np.ndarray
    feature_names: list[str]
    target_name: str
    source: str

    @property
    def fingerprint(self) -> str:
        """sha256 over column names and float64 values: same data, same fingerprint."""
        return self.fingerprint_of(self.features, self.target)

    def fingerprint_of(self, features: np.ndarray, target: np.ndarray) -> str:
        """The fingerprint of some rows of this data set (e.g. the held-out split)."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.feature_names, self.target_name]).encode())
        digest.update(np.ascontiguousarray(features, dtype=np.float64).tobytes())
        digest.update(np.ascontiguousarray(target, dtype=np.float64).tobytes())
        return f"sha256:{digest.hexdigest()}"


@dataclass(frozen=True)
class TrainParams:
    """Hyper-parameters and split settings; validated on construction."""

    alpha: float = 1.0
    test_fraction: float = 0.2
    seed: int = 42

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ConfigError(f"alpha must be a finite number >= 0, got {self.alpha}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(
                f"test_fraction must be strictly between 0 and 1, got {self.test_fraction}"
            )
        if not 0 <= self.seed < 2**32:  # numpy's RandomState accepts no other seed
            raise ConfigError(f"seed must be between 0 and 2**32 - 1, got {self.seed}")


@dataclass(frozen=True)
class TrainResult:
    """What one training run produced."""

    model_dir: Path
    metrics: dict[str, float]
    sha256: str
    data_fingerprint: str
    eval_fingerprint: str = ""


def load_diabetes_dataset() -> Dataset:
    """scikit-learn's bundled diabetes data (442 rows, 10 features): no download needed."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    return Dataset(
        features=np.asarray(bunch.data, dtype=np.float64),
        target=np.asarray(bunch.target, dtype=np.float64),
        feature_names=[str(name) for name in bunch.feature_names],
        target_name=DIABETES_TARGET,
        source="sklearn:diabetes",
    )


def _csv_files(data: Path) -> list[Path]:
    """The CSV files of `data`: the file itself, or a folder's *.csv files (`D.CSV` too: files
    exported on Windows)."""
    # Files only: Spark's df.write.csv("a.csv") makes a folder, which hid b.csv sorted after
    # it ("no CSV file found") or failed the step with "[Errno 21] Is a directory".
    files = (
        sorted(p for p in data.iterdir() if p.suffix.lower() == ".csv" and p.is_file())
        if data.is_dir()
        else [data]
    )
    if not files or not files[0].is_file():
        raise ConfigError(f"data: no CSV file found at {data}")
    return files


def _check_target(target: str, header: list[str]) -> None:
    if target not in header:
        raise ConfigError(f"target: column {target!r} not in the CSV header {header}")


def check_csv_target(data: Path, target: str) -> None:
    """What the train step would refuse of local CSV data by its first header alone: no CSV
    file, or no `target` column. Cheap (one line read), so a pipeline is checked before Azure ML
    runs its train step minutes after submission."""
    file = _csv_files(data)[0]
    try:
        with file.open(newline="", encoding="utf-8-sig") as fh:
            header = [name.strip() for name in next(csv.reader(fh), [])]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"data: {file.name} is not a UTF-8 CSV file ({exc})") from exc
    if not header:
        raise ConfigError(f"data: {file.name} is empty (no header row)")
    _check_target(target, header)


def load_csv_dataset(data: Path, target: str) -> Dataset:
    """Numeric CSV data: a file, or a folder (uri_folder) whose *.csv files share one header."""
    files = _csv_files(data)
    header: list[str] | None = None
    # Packed float64, row after row: a list of Python float lists took ~7x the data's size
    # (a CSV of a few GB was OOM-killed, with no error line).
    rows = array("d")
    for file in files:
        try:
            header = _read_csv(file, header, target, rows)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ConfigError(f"data: {file.name} is not a UTF-8 CSV file ({exc})") from exc
    assert header is not None
    if repeated := sorted({name for name in header if header.count(name) > 1}):
        # header.index() would pick the first copy: a repeated target would train on itself
        raise ConfigError(f"data: the CSV header repeats the column(s) {repeated}")
    if len(header) < 2:
        raise ConfigError(f"data: the CSV has no feature column besides the target {target!r}")
    if len(rows) < 4 * len(header):
        raise ConfigError(f"data: {len(rows) // len(header)} rows is too few to train and evaluate")
    values = np.frombuffer(rows, dtype=np.float64).reshape(-1, len(header))
    target_index = header.index(target)
    if values[:, target_index].min() == values[:, target_index].max():
        # Ridge fits it exactly (mse 0, r2 1.0): a "perfect" model of nothing, which the gate
        # would rank above any real one. Usually the wrong column, or a filter gone wrong.
        raise ConfigError(
            f"target: column {target!r} is constant ({values[0, target_index]} in all "
            f"{len(values)} rows): there is nothing to learn"
        )
    feature_index = [i for i in range(len(header)) if i != target_index]
    return Dataset(
        features=values[:, feature_index],
        target=values[:, target_index],
        feature_names=[header[i] for i in feature_index],
        target_name=target,
        source=str(data),
    )


def _read_csv(file: Path, header: list[str] | None, target: str, rows: array[float]) -> list[str]:
    """Append `file`'s rows to `rows` (flat); its header, which must equal `header` when given."""
    # utf-8-sig: a byte-order mark (Excel writes one) would become part of the first column name
    with file.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        file_header = [name.strip() for name in next(reader, [])]
        if not file_header:  # was "target: column 'y' not in the CSV header []"
            raise ConfigError(f"data: {file.name} is empty (no header row)")
        if header is not None and file_header != header:
            raise ConfigError(f"data: {file.name} has header {file_header}, expected {header}")
        # Before the rows: a typo'd target (or a file not comma-separated) was told only after
        # parsing the whole file, blamed on line 2's first value.
        _check_target(target, file_header)
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(file_header):
                raise ConfigError(
                    f"data: {file.name} line {line_no} has {len(row)} fields, "
                    f"expected {len(file_header)}"
                )
            # A bad value is named by line and column: in a wide CSV the line alone leaves the
            # user counting commas. NaN and inf parse as floats, and Ridge cannot use them.
            bad = next(
                (
                    (name, value)
                    for name, value in zip(file_header, row, strict=True)
                    if not _is_finite(value)
                ),
                None,
            )
            if bad is not None:
                raise ConfigError(
                    f"data: {file.name} line {line_no}, column {bad[0]!r}: "
                    f"{bad[1]!r} is not a finite number"
                )
            rows.extend(float(value) for value in row)
    return file_header


def _is_finite(text: str) -> bool:
    """A finite number in ASCII syntax: float() also reads PEP 515 underscores (`3_1` is 31)
    and any Unicode digits or spaces (`１２` is 12), so a code column or a mangled export
    trained as other numbers with no error. Without those, float() reads only number syntax."""
    if not text.isascii() or "_" in text:
        return False
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def load_dataset(data: Path | None, target: str | None) -> Dataset:
    """The user's CSV when `data` is given (then `target` is required), else the diabetes data."""
    if data is None:
        return load_diabetes_dataset()
    if not target:
        raise ConfigError("target: required when data is given (the name of the target column)")
    return load_csv_dataset(data, target)


def deterministic_skops(model: Any) -> bytes:
    """skops bytes that depend only on the model: equal models give equal sha256.

    skops names nodes and array files after `id()` of the objects and stamps the current time
    into the zip; both are renumbered / fixed here (ids in order of first appearance, which is
    all skops needs: they are memo keys). The result is loaded back and checked against the model.
    """
    import skops.io as sio

    raw = sio.dumps(model)
    with zipfile.ZipFile(io.BytesIO(raw)) as src:
        schema = src.read("schema.json").decode()
        ids = {int(m) for m in re.findall(r'"__id__": (\d+)', schema)}
        ids |= {int(Path(n).stem) for n in src.namelist() if n != "schema.json"}
        order = sorted(ids, key=lambda i: schema.find(str(i)) % (len(schema) + 1))
        renumber = {str(old): str(new) for new, old in enumerate(order, start=1)}
        schema = re.sub(r"\d{6,}", lambda m: renumber.get(m.group(), m.group()), schema)
        members = {"schema.json": schema.encode()}
        for member in src.namelist():
            if member != "schema.json":
                stem, suffix = member.split(".", 1)
                members[f"{renumber[stem]}.{suffix}"] = src.read(member)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for member in sorted(members):
            info = zipfile.ZipInfo(member, date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            dst.writestr(info, members[member])
    blob = out.getvalue()
    reloaded = sio.loads(blob, trusted=sio.get_untrusted_types(data=blob))
    if not (
        np.array_equal(reloaded.coef_, model.coef_) and reloaded.intercept_ == model.intercept_
    ):
        raise RuntimeError("skops normalisation changed the model; refusing to write it")
    return blob


def library_versions() -> dict[str, str]:
    """Versions of the libraries a scorer needs to load the model exactly as trained."""
    versions = {"python": platform.python_version()}
    for dist in _VERSIONED_LIBRARIES:
        versions[dist] = metadata.version(dist)
    return versions


def train(
    out_dir: Path,
    *,
    name: str,
    params: TrainParams,
    data: Path | None = None,
    target: str | None = None,
    metrics_dir: Path | None = None,
) -> TrainResult:
    """Fit Ridge on a seeded split, evaluate on the held-out part, write the model folder."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import train_test_split

    check_name(name)  # the registry's rule: refused here, before training, not after it
    dataset = load_dataset(data, target)
    # Checked before splitting: sklearn raises its own error when a side would be empty.
    rows = len(dataset.target)
    held_out = math.ceil(params.test_fraction * rows)  # how train_test_split sizes the test set
    if held_out < 2 or rows - held_out < 2:
        raise ConfigError(
            f"test_fraction: {params.test_fraction} leaves {rows - held_out} training and "
            f"{held_out} held-out rows of {rows}; both need at least 2 (r2 needs 2 held-out rows)"
        )
    x_train, x_test, y_train, y_test = train_test_split(
        dataset.features,
        dataset.target,
        test_size=params.test_fraction,
        random_state=params.seed,
    )
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

    try:
        # Finite values near float64's limit overflow inside the solver: an error, not a
        # warning followed by a model of NaNs. One BLAS thread: a multi-threaded BLAS sums in
        # another order with another thread count (from ~50 000 rows), so the same seed gave
        # another sha256 on another machine. Ridge's solve is cheap (800 000 rows: 0.09 s).
        with np.errstate(over="raise", invalid="raise"), threadpool_limits(1, user_api="blas"):
            model = Ridge(alpha=params.alpha).fit(x_train, y_train)
            predicted = model.predict(x_test)
    except (ValueError, FloatingPointError) as exc:
        raise ConfigError(f"data: Ridge cannot be fitted on {dataset.source}: {exc}") from exc
    metrics = held_out_metrics(y_test, predicted)
    if not all(math.isfinite(value) for value in metrics.values()):
        # Written as is, model.json held `Infinity` / `NaN` (not JSON), and the gate refused the
        # model for a reason that did not say this; forced, its mse=inf tag refused every
        # later candidate.
        shown = ", ".join(f"{key}={value:.6g}" for key, value in metrics.items())
        raise ConfigError(
            f"data: the held-out metrics are not finite ({shown}) on {dataset.source}: the "
            "error overflows float64 (values too large); rescale the target"
        )

    # The metrics hold only for these rows: another split of the same data gives other numbers.
    eval_fingerprint = dataset.fingerprint_of(x_test, y_test)

    out_dir.mkdir(parents=True, exist_ok=True)
    blob = deterministic_skops(model)
    (out_dir / MODEL_FILE).write_bytes(blob)
    sha256 = hashlib.sha256(blob).hexdigest()
    manifest = {
        "name": name,
        "framework": "sklearn",
        "estimator": "Ridge",
        "model_file": MODEL_FILE,
        "sha256": sha256,
        "feature_names": dataset.feature_names,
        "target": dataset.target_name,
        "metrics": metrics,
        "data_fingerprint": dataset.fingerprint,
        "eval_fingerprint": eval_fingerprint,
        "data_source": dataset.source,
        "library_versions": library_versions(),
        "params": {
            "alpha": params.alpha,
            "test_fraction": params.test_fraction,
            "seed": params.seed,
        },
        "rows": {"train": len(x_train), "test": len(x_test)},
    }
    _write_json(out_dir / MODEL_JSON, manifest)
    _write_json(out_dir / SAMPLE_INPUT, {"data": x_test[:SAMPLE_ROWS].tolist()})
    _write_held_out(out_dir / HELDOUT_FILE, dataset, x_test, y_test)
    (out_dir / TRAIN_ROWS_FILE).write_bytes(np.sort(row_hashes(x_train, y_train)).tobytes())
    if metrics_dir is not None:
        metrics_dir.mkdir(parents=True, exist_ok=True)
        _write_json(metrics_dir / METRICS_FILE, {"name": name, "sha256": sha256, **metrics})
    log.info(
        "trained %s on %s (%d train / %d held-out rows): mse=%.2f rmse=%.3f r2=%.4f sha256=%s",
        name,
        dataset.source,
        len(x_train),
        len(x_test),
        metrics["mse"],
        metrics["rmse"],
        metrics["r2"],
        sha256[:12],
    )
    return TrainResult(out_dir, metrics, sha256, dataset.fingerprint, eval_fingerprint)


def held_out_metrics(target: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """mse, rmse and r2 of `predicted` against `target`: what model.json's metrics hold.

    Values too large overflow to inf or NaN, returned as such (no warning): the callers judge.
    """
    from sklearn.metrics import mean_squared_error, r2_score

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        mse = float(mean_squared_error(target, predicted))
        r2 = float(r2_score(target, predicted))
    return {"mse": mse, "rmse": math.sqrt(mse), "r2": r2}


def _write_held_out(path: Path, dataset: Dataset, features: np.ndarray, target: np.ndarray) -> None:
    # repr() round-trips a float64 exactly: the rows read back have the same eval_fingerprint.
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([*dataset.feature_names, dataset.target_name])
        for row, value in zip(features.tolist(), target.tolist(), strict=True):
            writer.writerow([repr(float(v)) for v in (*row, value)])


def row_hashes(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """A 64-bit hash (little-endian uint64) of each row's whole content, features then target.

    A row is its float64 values (-0.0 taken as 0.0), so equal rows hash equal in any data set
    with these columns. Vectorised (splitmix64's finaliser folded over the columns): 800 000
    rows of 11 values hash in 0.5 s.
    """
    table = np.column_stack([features, target]).astype(np.float64) + 0.0  # -0.0 → 0.0
    words = np.ascontiguousarray(table).view("<u8")
    hashes = np.full(len(words), 0x9E3779B97F4A7C15 ^ words.shape[1], dtype="<u8")
    for column in words.T:  # uint64 arithmetic wraps, as the mixing needs
        hashes = _mix64(hashes ^ column)
    return hashes


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that spreads every input bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return np.asarray(x ^ (x >> np.uint64(31)))


def load_train_rows(model_dir: Path) -> np.ndarray | None:
    """The sorted `row_hashes` of the rows a model folder's model trained on (train-rows.u64),
    None when the folder has none (trained before it was written).

    Raises ConfigError when the file is not a sorted array of uint64, or holds another number
    of rows than model.json's rows.train.
    """
    path = model_dir / TRAIN_ROWS_FILE
    if not path.is_file():
        return None
    blob = path.read_bytes()
    if not blob or len(blob) % 8:
        raise ConfigError(f"{path}: {len(blob)} bytes is not an array of 64-bit hashes")
    hashes = np.frombuffer(blob, dtype="<u8")
    if np.any(hashes[1:] < hashes[:-1]):
        raise ConfigError(f"{path}: the hashes are not sorted (not written by train?)")
    manifest = json.loads((model_dir / MODEL_JSON).read_text(encoding="utf-8"))
    expected = (manifest.get("rows") or {}).get("train")
    if expected is not None and expected != len(hashes):
        raise ConfigError(f"{path}: {len(hashes)} rows, model.json's rows.train is {expected}")
    return hashes


def load_held_out(model_dir: Path) -> Dataset:
    """The held-out rows of a model folder (heldout.csv), checked against model.json.

    Raises ConfigError when the file is missing or malformed, its header is not model.json's
    feature_names + target, or its rows do not have model.json's eval_fingerprint (they are not
    the rows the metrics were measured on).
    """
    manifest = json.loads((model_dir / MODEL_JSON).read_text(encoding="utf-8"))
    features, target = list(manifest.get("feature_names") or []), str(manifest.get("target", ""))
    path = model_dir / HELDOUT_FILE
    if not path.is_file():
        raise ConfigError(f"{model_dir} has no {HELDOUT_FILE} (trained before it was written?)")
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            values = [[float(v) for v in row] for row in reader if row]
    except (UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise ConfigError(f"{path}: not a CSV of numbers ({exc})") from exc
    if header != [*features, target]:
        raise ConfigError(f"{path}: header {header} is not model.json's {[*features, target]}")
    if not values or any(len(row) != len(header) for row in values):
        raise ConfigError(f"{path}: no rows, or rows of another width than the header")
    table = np.asarray(values, dtype=np.float64)
    dataset = Dataset(table[:, :-1], table[:, -1], features, target, str(path))
    expected = manifest.get("eval_fingerprint")
    if expected and dataset.fingerprint != expected:
        raise ConfigError(
            f"{path}: its rows are not the ones model.json's metrics were measured on "
            f"(fingerprint {dataset.fingerprint[:19]}… vs eval_fingerprint {str(expected)[:19]}…)"
        )
    return dataset


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
