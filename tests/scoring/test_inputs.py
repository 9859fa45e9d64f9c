"""Request-body validation: every malformed input is a named 4xx error, good input is exact."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from scoring.errors import InputError
from scoring.inputs import parse_rows

ROW = [0.1] * 10


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        pytest.param(b"", 400, "empty request body", id="empty-body"),
        pytest.param(b"{", 400, "malformed JSON", id="truncated-json"),
        pytest.param(b'{"data": [[NaN]]}', 400, "malformed JSON", id="nan-literal"),
        pytest.param(b'{"data": [[1e400]]}', 400, "malformed JSON", id="overflowing-double"),
        # Was: "malformed JSON: str is not valid UTF-8: surrogates not allowed: line 1 column 1".
        pytest.param(
            b"\xff\xfe{\x00}\x00", 400, r"^body is not UTF-8 \(byte 0xff at 0\)$", id="utf16"
        ),
        pytest.param(
            b'{"data": [[1]], "x": "\xff"}',
            400,
            r"^body is not UTF-8 \(byte 0xff at 22\)$",
            id="bad-byte-late",
        ),
        pytest.param(
            gzip.compress(b'{"data": [[1]]}'),
            400,
            r"^body is not UTF-8: it looks gzip-compressed; send it uncompressed",
            id="gzip-without-content-encoding",
        ),
        pytest.param(b"[1, 2]", 422, "must be a JSON object", id="array-body"),
        pytest.param(b'"data"', 422, "got string", id="string-body"),
        pytest.param(b"{}", 422, "field 'data' is required", id="no-data"),
        pytest.param(b'{"data": null}', 422, "field 'data' is required", id="null-data"),
        pytest.param(b'{"data": {"a": 1}}', 422, "must be a list of rows, got object", id="dict"),
        pytest.param(b'{"data": []}', 422, "is empty", id="empty-batch"),
        pytest.param(b'{"data": [1, 2]}', 422, r"data\[0\] must be a list", id="flat-list"),
        pytest.param(
            b'{"data": [[1, 2]]}', 422, r"has 2 values, the model expects 10", id="narrow"
        ),
        pytest.param(
            b'{"data": [[1,2,3,4,5,6,7,8,9,"10"]]}', 422, r"data\[0\]\[9\] .* got string", id="str"
        ),
        pytest.param(b'{"data": [[true,2,3,4,5,6,7,8,9,10]]}', 422, "got boolean", id="boolean"),
        pytest.param(b'{"data": [[null,2,3,4,5,6,7,8,9,10]]}', 422, "got null", id="null"),
        pytest.param(
            b'{"data": [[[1],2,3,4,5,6,7,8,9,10]]}', 422, "got array", id="nested-too-deep"
        ),
    ],
)
def test_bad_bodies_are_named_4xx_errors(body: bytes, status: int, message: str) -> None:
    with pytest.raises(InputError, match=message) as caught:
        parse_rows(body, 10)
    assert caught.value.status == status


def test_too_many_rows_is_413() -> None:
    body = b'{"data": [' + b",".join([b"[1,2,3,4,5,6,7,8,9,10]"] * 6) + b"]}"
    with pytest.raises(InputError, match="has 6 rows, the limit is 5") as caught:
        parse_rows(body, 10, max_rows=5)
    assert caught.value.status == 413


def test_good_body_is_parsed_exactly() -> None:
    x = parse_rows(b'{"data": [[1,2,3,4,5,6,7,8,9,10], [0.5,0,0,0,0,0,0,0,0,-1e-3]]}', 10)
    assert x.dtype == np.float64
    np.testing.assert_array_equal(x[1], [0.5, 0, 0, 0, 0, 0, 0, 0, 0, -1e-3])
    assert x.shape == (2, 10)


def test_width_comes_from_the_caller_not_a_constant() -> None:
    assert parse_rows(b'{"data": [[1, 2, 3]]}', 3).shape == (1, 3)
