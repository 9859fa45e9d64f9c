"""Fuzzing POST /score: thousands of generated bodies, good and bad, and never a 5xx.

A 5xx is counted against the model by the canary judge, so malformed input must always be the
client's 4xx. The app is called as a raw ASGI callable (no HTTP client in between) so the
examples run in about a millisecond each.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from scoring.app import create_app
from scoring.model import LoadedModel
from tests.scoring.conftest import RawCaller

FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)

numbers = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False) | st.integers(-1000, 1000)
good_rows = st.lists(st.lists(numbers, min_size=10, max_size=10), min_size=1, max_size=20)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=12) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=30,
)
bad_rows = st.lists(
    st.lists(json_values | numbers, min_size=0, max_size=12), min_size=0, max_size=5
)


@st.composite
def mutated_good(draw: st.DrawFn) -> bytes:
    """A valid body with one byte inserted, deleted or replaced."""
    body = orjson.dumps({"data": draw(good_rows)})
    at = draw(st.integers(0, len(body) - 1))
    byte = bytes([draw(st.integers(0, 255))])
    how = draw(st.sampled_from(["insert", "delete", "replace"]))
    if how == "insert":
        return body[:at] + byte + body[at:]
    if how == "delete":
        return body[:at] + body[at + 1 :]
    return body[:at] + byte + body[at + 1 :]


bad_bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(orjson.dumps),
    st.builds(lambda d: orjson.dumps({"data": d}), json_values),
    st.builds(lambda d: orjson.dumps({"data": d}), bad_rows),
    st.builds(lambda d, k: orjson.dumps({k: d}), good_rows, st.text(max_size=6)),
    mutated_good(),
    st.sampled_from(
        [
            b'{"data": [[NaN,1,1,1,1,1,1,1,1,1]]}',
            b'{"data": [[Infinity,1,1,1,1,1,1,1,1,1]]}',
            b'{"data": [[1e999,1,1,1,1,1,1,1,1,1]]}',
            b'{"data": [[1e308,1e308,1e308,1e308,1e308,1e308,1e308,1e308,1e308,1e308]]}',
            b'{"data": [[99999999999999999999999,1,1,1,1,1,1,1,1,1]]}',
        ]
    ),
)


@pytest.fixture(scope="module")
def caller(loaded: LoadedModel) -> Iterator[RawCaller]:
    c = RawCaller(create_app(loaded, colour="blue", registry=CollectorRegistry(), max_rows=10))
    yield c
    c.runner.close()


@pytest.mark.slow
@settings(FUZZ, max_examples=1000)
@given(body=bad_bodies)
def test_bad_bodies_never_get_a_5xx(caller: RawCaller, body: bytes) -> None:
    status, answer = caller.post(body)
    assert status in (200, 400, 413, 422), (status, answer)
    if status != 200:
        assert isinstance(json.loads(answer)["error"], str)


@settings(FUZZ, max_examples=300)
@given(rows=good_rows)
def test_good_bodies_get_one_prediction_per_row(
    caller: RawCaller, loaded: LoadedModel, rows: list[list[float]]
) -> None:
    status, answer = caller.post(orjson.dumps({"data": rows}))
    if len(rows) > 10:
        assert status == 413
        return
    assert status == 200, answer
    predictions = orjson.loads(answer)["predictions"]
    assert len(predictions) == len(rows)


# --- schemathesis: bodies generated from the served OpenAPI document ----------------------------


@pytest.fixture(scope="module")
def schema_caller(loaded: LoadedModel) -> Iterator[tuple[RawCaller, Any]]:
    import schemathesis

    # A small row limit keeps generated batches (and the test) small.
    app = create_app(loaded, colour="green", registry=CollectorRegistry(), max_rows=20)
    operation = schemathesis.openapi.from_dict(app.openapi())["/score"]["POST"]
    c = RawCaller(app)
    yield c, operation
    c.runner.close()


def _encode(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    return json.dumps(body).encode()  # the stdlib writes integers beyond 64 bits too


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "allowed"),
    [
        pytest.param("positive", {200, 422}, id="schema-conforming"),
        pytest.param("negative", {400, 413, 422}, id="schema-violating"),
    ],
)
def test_openapi_generated_bodies_never_get_a_5xx(
    schema_caller: tuple[RawCaller, Any], mode: str, allowed: set[int]
) -> None:
    from schemathesis import GenerationMode

    caller, operation = schema_caller
    statuses: list[int] = []

    @settings(FUZZ, max_examples=200)
    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    def check(case: Any) -> None:
        status, answer = caller.post(_encode(case.body))
        statuses.append(status)
        assert status in allowed, (case.body, status, answer)

    check()
    assert len(statuses) >= 100
