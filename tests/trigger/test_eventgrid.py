"""Parsing Event Grid deliveries: both schemas, the handshake, and every malformed shape named."""

from __future__ import annotations

import json
from typing import Any

import pytest

from aml_pipelines.trigger.eventgrid import (
    MODEL_REGISTERED,
    BadEvent,
    ModelRegistered,
    Other,
    Rejected,
    Validation,
    parse,
)

TOPIC = (
    "/subscriptions/0000/resourceGroups/rg/providers/"
    "Microsoft.MachineLearningServices/workspaces/ws"
)


def eg_event(
    event_id: str = "e1", name: str = "diabetes", version: str = "3", **data: Any
) -> dict[str, Any]:
    """A ModelRegistered event in the Event Grid schema, as Azure ML publishes it."""
    return {
        "id": event_id,
        "topic": TOPIC,
        "subject": f"models/{name}:{version}",
        "eventType": MODEL_REGISTERED,
        "eventTime": "2026-11-25T10:00:00.000Z",
        "data": {
            "ModelName": name,
            "ModelVersion": version,
            "ModelTags": {"stage": "candidate"},
            "ModelProperties": {"mse": "2900.1"},
            **data,
        },
        "dataVersion": "2",
        "metadataVersion": "1",
    }


def cloud_event(
    event_id: str = "c1", name: str = "diabetes", version: str = "3", **data: Any
) -> dict[str, Any]:
    """The same event in CloudEvents 1.0 structured mode."""
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": TOPIC,
        "type": MODEL_REGISTERED,
        "subject": f"models/{name}:{version}",
        "time": "2026-11-25T10:00:00Z",
        "datacontenttype": "application/json",
        "data": {
            "ModelName": name,
            "ModelVersion": version,
            "ModelTags": {"stage": "candidate"},
            "ModelProperties": {},
            **data,
        },
    }


def validation_event(code: str = "512d38b6-c7b8-40c8-89fe-f46f9e9622b6") -> dict[str, Any]:
    return {
        "id": "2d1781af-3a4c-4d7c-bd0c-e34b19da4e66",
        "topic": TOPIC,
        "subject": "",
        "data": {
            "validationCode": code,
            "validationUrl": "https://rp-eastus2.eventgrid.azure.net/x",
        },
        "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
        "eventTime": "2026-11-25T10:00:00Z",
        "metadataVersion": "1",
        "dataVersion": "1",
    }


def _camel(event: dict[str, Any]) -> dict[str, Any]:
    """The event with its data keys as Azure's Event Grid SDKs read them (`modelName`, ...):
    the REST spec's casing, where the docs' examples write `ModelName`."""
    data = {key[0].lower() + key[1:]: value for key, value in event["data"].items()}
    return {**event, "data": data}


def _body(payload: Any) -> bytes:
    return json.dumps(payload).encode()


#: What eg_event() reads as.
EG_DIABETES_3 = ModelRegistered(
    "e1", "diabetes", 3, {"stage": "candidate"}, {"mse": "2900.1"}, "eventgrid", TOPIC
)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(
            [eg_event()],
            [EG_DIABETES_3],
            id="eventgrid-schema",
        ),
        pytest.param(
            cloud_event(),
            [
                ModelRegistered(
                    "c1", "diabetes", 3, {"stage": "candidate"}, {}, "cloudevents", TOPIC
                )
            ],
            id="cloudevents-structured",
        ),
        pytest.param(
            [cloud_event("c1"), cloud_event("c2", version="4")],
            [
                ModelRegistered(
                    "c1", "diabetes", 3, {"stage": "candidate"}, {}, "cloudevents", TOPIC
                ),
                ModelRegistered(
                    "c2", "diabetes", 4, {"stage": "candidate"}, {}, "cloudevents", TOPIC
                ),
            ],
            id="cloudevents-batch",
        ),
        pytest.param(
            [validation_event("abc")],
            [Validation("2d1781af-3a4c-4d7c-bd0c-e34b19da4e66", "abc")],
            id="validation",
        ),
        pytest.param(
            [{**eg_event(), "eventType": "Microsoft.MachineLearningServices.RunCompleted"}],
            [Other("e1", "Microsoft.MachineLearningServices.RunCompleted")],
            id="other-type",
        ),
        pytest.param(
            [eg_event(ModelName=None, ModelVersion=None, ModelTags=None)],
            [ModelRegistered("e1", "diabetes", 3, {}, {"mse": "2900.1"}, "eventgrid", TOPIC)],
            id="name-and-version-from-subject",
        ),
        pytest.param(  # Azure's own CloudEvents example sends the version as a number
            cloud_event(ModelVersion=3),
            [
                ModelRegistered(
                    "c1", "diabetes", 3, {"stage": "candidate"}, {}, "cloudevents", TOPIC
                )
            ],
            id="version-as-a-number",
        ),
        pytest.param(
            [_camel(eg_event())],
            [EG_DIABETES_3],
            id="eventgrid-camel-case-data",
        ),
        pytest.param(
            _camel(cloud_event(ModelVersion=3)),
            [
                ModelRegistered(
                    "c1", "diabetes", 3, {"stage": "candidate"}, {}, "cloudevents", TOPIC
                )
            ],
            id="cloudevents-camel-case-data",
        ),
    ],
)
def test_parses(payload: Any, expected: list[Any]) -> None:
    assert parse(_body(payload)) == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"{not json", "body is not JSON", id="not-json"),
        pytest.param(b"\xff\xfe", "body is not JSON", id="not-utf8"),
        # json's RecursionError escaped: a 500 (retried by Event Grid for a day), a traceback
        pytest.param(b"[" * 100_000, "body is not JSON", id="nested-too-deep"),
        pytest.param(b"42", "must be a JSON array or object", id="number"),
        pytest.param(b"[]", "holds no events", id="empty"),
        pytest.param(_body({"id": "x"}), "must be a CloudEvent", id="object-not-cloudevent"),
        pytest.param(_body(["x"]), "event [0] is not a JSON object", id="array-of-strings"),
        pytest.param(
            _body([{k: v for k, v in eg_event().items() if k != "eventType"}]),
            "lacks required field(s) eventType",
            id="eventgrid-missing-type",
        ),
        pytest.param(_body([{**eg_event(), "id": ""}]), "'id' must be", id="empty-id"),
        pytest.param(
            _body({k: v for k, v in cloud_event().items() if k != "id"}),
            "lacks required field(s) id",
            id="cloudevent-without-id",
        ),
        pytest.param(
            _body({**cloud_event(), "specversion": "0.3"}), "not supported", id="specversion"
        ),
        pytest.param(
            _body([eg_event(version="latest")]), "'latest' is not a positive integer", id="ver"
        ),
        # Each was accepted: 0 (or "") taken for a missing ModelVersion, the subject's used
        # instead; int() read "1_0" as 10, " 7 " as 7, an Arabic-Indic digit as 3.
        pytest.param(
            _body([{**eg_event(ModelVersion=0), "subject": "models/diabetes:5"}]),
            "model version 0 is not a positive integer",
            id="ver-0-not-missing",
        ),
        pytest.param(
            _body([{**eg_event(ModelVersion=""), "subject": "models/diabetes:5"}]),
            "model version '' is not a positive integer",
            id="ver-empty-not-missing",
        ),
        pytest.param(
            _body([{**eg_event(ModelName=""), "subject": "models/diabetes:3"}]),
            "no model name",
            id="name-empty-not-missing",
        ),
        pytest.param(
            _body([eg_event(version="1_0")]), "'1_0' is not a positive integer", id="ver-1_0"
        ),
        pytest.param(
            _body([eg_event(version=" 7 ")]), "' 7 ' is not a positive integer", id="ver-spaces"
        ),
        pytest.param(
            _body([eg_event(version="\u0663")]),
            "'\u0663' is not a positive integer",
            id="ver-non-ascii-digit",
        ),
        pytest.param(_body([eg_event(version="+3")]), "'+3' is not", id="ver-plus"),
        pytest.param(_body([eg_event(version="03")]), "'03' is not", id="ver-leading-zero"),
        pytest.param(_body([eg_event(ModelVersion=True)]), "True is not", id="ver-bool"),
        pytest.param(_body([eg_event(ModelVersion=3.0)]), "3.0 is not", id="ver-float"),
        pytest.param(
            _body([{**eg_event(), "subject": "models/other:3"}]), "contradicts", id="contradict"
        ),
        pytest.param(_body([{**eg_event(), "data": "x"}]), "must be a JSON object", id="data-str"),
        # Accepted, "a/b" shared the cursor file of model "a_b" (cursor-a_b.json), renamed it
        # and closed its open versions as Failed (the registry refuses the name).
        pytest.param(
            _body([eg_event(name="a/b")]),
            "model name 'a/b' is invalid",
            id="name-the-registry-refuses",
        ),
        # Accepted: the registry's read of it then failed (ENAMETOOLONG) on every retry.
        pytest.param(
            _body([eg_event(version="9" * 300)]),
            "model version of 300 digits is above 2147483647",
            id="version-too-large",
        ),
        # Past CPython's 4300 digits, int() raised ValueError: a 500 and a traceback.
        pytest.param(
            _body([eg_event(version="9" * 5000)]),
            "model version of 5000 digits is above 2147483647",
            id="version-past-ints-digit-limit",
        ),
        pytest.param(
            _body([eg_event(version="9" * 5000, ModelVersion=None)]),
            "model version of 5000 digits is above 2147483647",
            id="subject-version-past-ints-digit-limit",
        ),
        # Accepted: `$` matched before the newline; its cursor file was model "a_"'s.
        pytest.param(
            _body([eg_event(name="a\n")]),
            "model name 'a\\n' is invalid",
            id="name-with-a-trailing-newline",
        ),
        pytest.param(
            _body([eg_event(ModelTags=["a"])]), "ModelTags must be a JSON object", id="tags-list"
        ),
        pytest.param(
            _body([{**validation_event(), "data": {}}]), "validationCode", id="validation-no-code"
        ),
        pytest.param(
            _body({**cloud_event(), "subject": 5}),
            "'subject' must be a string, not int",
            id="cloudevent-subject-number",
        ),
        pytest.param(
            _body({**cloud_event(), "subject": {"a": 1}}),
            "'subject' must be a string, not dict",
            id="cloudevent-subject-object",
        ),
        pytest.param(
            _body([{**eg_event(), "subject": 5}]),
            "'subject' must be a string",
            id="eventgrid-subject-number",
        ),
        pytest.param(
            _body({**cloud_event(), "time": 123}), "'time' must be a string", id="time-number"
        ),
        pytest.param(  # was azure-core's nested DeserializationError repr, quotes and all
            _body([{**eg_event(), "eventTime": "yesterday"}]),
            "event [0]: 'eventTime' 'yesterday' is not an RFC 3339 timestamp",
            id="eventgrid-time-garbage",
        ),
        pytest.param(
            _body([{**eg_event(), "eventTime": 5}]),
            "event [0]: 'eventTime' must be a string, not int",
            id="eventgrid-time-number",
        ),
        pytest.param(
            _body({**cloud_event(), "time": "not-a-time"}),
            "'time' 'not-a-time' is not an RFC 3339 timestamp",
            id="time-garbage",
        ),
        pytest.param(
            _body({**cloud_event(), "Bad-Ext": 1}), "is not a CloudEvent", id="bad-extension"
        ),
        pytest.param(
            _body([{**cloud_event("c1"), "subject": 5}, {**cloud_event("c2"), "time": 1}]),
            "no event is valid; event [0]: 'subject' must be a string",
            id="every-event-of-a-batch-bad",
        ),
    ],
)
def test_rejects_with_a_clear_message(body: bytes, message: str) -> None:
    with pytest.raises(BadEvent, match=None) as info:
        parse(body)
    assert message in str(info.value)


def test_a_malformed_event_in_a_batch_is_rejected_alone() -> None:
    # A 400 would make Event Grid drop the whole batch (it never retries 400): the valid
    # events would be lost with the one that can never be parsed.
    body = _body([cloud_event("c1"), {**cloud_event("c2"), "subject": 5}, {"id": 7}])
    records = parse(body)
    assert records == [
        ModelRegistered("c1", "diabetes", 3, {"stage": "candidate"}, {}, "cloudevents", TOPIC),
        Rejected(1, "c2", "event [1]: 'subject' must be a string, not int"),
        Rejected(2, None, "event [2] lacks required field(s) eventType, subject, data, "
                 "dataVersion, eventTime"),
    ]  # fmt: skip


def test_a_version_past_ints_digit_limit_in_a_batch_is_rejected_alone() -> None:
    # Was a ValueError out of parse: the webhook's 500 sank the valid event with it (Event Grid
    # retries the whole batch for a day).
    records = parse(_body([eg_event("e1", version="1" * 5000), eg_event("e2", version="4")]))
    assert [type(record) for record in records] == [Rejected, ModelRegistered]
    assert isinstance(records[0], Rejected)
    assert "model version of 5000 digits is above 2147483647" in records[0].error
