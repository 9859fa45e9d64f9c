"""Parse Azure Event Grid deliveries (Event Grid schema and CloudEvents 1.0) into plain records.

Pure functions, no I/O: `parse(body)` returns one record per event, or raises `BadEvent` with a
message that says what is wrong (the webhook answers it as a 400).

A malformed event in a batch that also holds good ones becomes a `Rejected` record (index, id,
what is wrong) and the others are parsed as usual: the webhook acknowledges the batch and logs the
rejected events. Answering 400 would make Event Grid drop (or dead-letter) the whole batch — a
400 is never retried — losing the valid events with the one that can never be parsed anyway. A
body that is not a batch of events at all, or one in which no event parses, is a BadEvent.

Accepted shapes (what Event Grid sends to a webhook):
- Event Grid schema: a JSON array of events (`id`, `eventType`, `subject`, `data`,
  `dataVersion`, `eventTime`); the subscription handshake is one
  `Microsoft.EventGrid.SubscriptionValidationEvent` whose `data.validationCode` must be echoed;
- CloudEvents 1.0 structured mode: one JSON object with `specversion` (content type
  `application/cloudevents+json`), or a JSON array of them (batch,
  `application/cloudevents-batch+json`). CloudEvents validation is an HTTP OPTIONS handshake,
  handled by the webhook, not here.

Events are read through the azure-eventgrid package's `EventGridEvent.from_dict` and azure-core's
`CloudEvent.from_dict`. Both are lenient (EventGridEvent accepts `{}`, CloudEvent invents an id
when none is given, which would defeat de-duplication), so required fields are checked here first.

`Microsoft.MachineLearningServices.ModelRegistered` carries `data.ModelName`, `data.ModelVersion`
(a string, or a number), `data.ModelTags` and `data.ModelProperties`; its subject is
`models/{name}:{version}`. Those are the keys of Microsoft's event schema page; Azure's Event Grid
SDKs (generated from the REST spec) read them camel-cased, `modelName` ..., so either is read —
reading only one would lose the tags of the other, and `serve`'s tag filter would then answer
every event 200 as filtered: acknowledged, and never sent again.
The data is authoritative; the subject fills in a missing (absent or null) name or version and must
not contradict.
The workspace is in neither: it is the event's `topic` (Event Grid schema) or `source`
(CloudEvents), the workspace's ARM id, kept in `ModelRegistered.topic` for the webhook's filter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aml_pipelines.errors import ConfigError, TriggerError
from aml_pipelines.registry.local import check_name

MODEL_REGISTERED = "Microsoft.MachineLearningServices.ModelRegistered"
SUBSCRIPTION_VALIDATION = "Microsoft.EventGrid.SubscriptionValidationEvent"
#: The highest version number taken (Azure ML's are far below it). A 300-digit version was
#: accepted, and the registry's read of a folder name that long failed (ENAMETOOLONG) on every
#: retry of its delivery, for ever.
MAX_VERSION = 2**31 - 1
_SUBJECT = re.compile(r"^models/(?P<name>[^:/]+):(?P<version>[^:/]+)$")
_VERSION = re.compile(r"[1-9][0-9]*")
_EVENTGRID_REQUIRED = ("id", "eventType", "subject", "data", "dataVersion", "eventTime")
_CLOUDEVENT_REQUIRED = ("id", "source", "type", "specversion")
#: Event Grid delivers at most 5,000 events per batch.
MAX_EVENTS = 5_000


class BadEvent(TriggerError):
    """A delivery that is not a well-formed Event Grid or CloudEvents payload."""


@dataclass(frozen=True)
class Validation:
    """The Event Grid subscription handshake: answer `{"validationResponse": code}`."""

    event_id: str
    code: str


@dataclass(frozen=True)
class ModelRegistered:
    """A model version was registered in an Azure ML workspace."""

    event_id: str
    model: str
    version: int
    tags: Mapping[str, str] = field(default_factory=dict)
    properties: Mapping[str, str] = field(default_factory=dict)
    schema: str = "eventgrid"  # or "cloudevents"
    #: The workspace's ARM id: Event Grid's `topic`, CloudEvents' `source` ("" when absent).
    topic: str = ""


@dataclass(frozen=True)
class Other:
    """Any other event type (e.g. SubscriptionDeletedEvent): acknowledged, not acted on."""

    event_id: str
    event_type: str


@dataclass(frozen=True)
class Rejected:
    """A malformed event of a batch whose other events parsed: logged and reported, not acted on."""

    index: int
    event_id: str | None
    error: str


Record = Validation | ModelRegistered | Other | Rejected


def parse(body: bytes) -> list[Record]:
    """Parse one delivery; raises BadEvent naming the first problem."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadEvent(f"body is not JSON: {exc}") from None
    except RecursionError:  # not a ValueError: it escaped as a 500, which Event Grid retries
        raise BadEvent("body is not JSON: arrays or objects nested too deeply") from None
    if isinstance(payload, dict):
        if "specversion" not in payload:
            raise BadEvent(
                "a single JSON object must be a CloudEvent (no 'specversion'); "
                "Event Grid schema deliveries are JSON arrays"
            )
        items: list[Any] = [payload]
    elif isinstance(payload, list):
        items = payload
    else:
        raise BadEvent(f"body must be a JSON array or object, not {type(payload).__name__}")
    if not items:
        raise BadEvent("body holds no events")
    if len(items) > MAX_EVENTS:
        raise BadEvent(f"body holds {len(items)} events; at most {MAX_EVENTS} are accepted")
    records: list[Record] = []
    for index, item in enumerate(items):
        try:
            records.append(_parse_one(item, index))
        except BadEvent as exc:
            event_id = item.get("id") if isinstance(item, dict) else None
            records.append(
                Rejected(index, event_id if isinstance(event_id, str) else None, str(exc))
            )
    if all(isinstance(r, Rejected) for r in records):
        first = records[0]
        assert isinstance(first, Rejected)
        raise BadEvent(first.error if len(records) == 1 else f"no event is valid; {first.error}")
    return records


def _parse_one(item: Any, index: int) -> Record:
    where = f"event [{index}]"
    if not isinstance(item, dict):
        raise BadEvent(f"{where} is not a JSON object")
    if "specversion" in item:
        return _cloud_event(item, where)
    return _eventgrid_event(item, where)


def _require(item: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in item]
    if missing:
        raise BadEvent(f"{where} lacks required field(s) {', '.join(missing)}")
    event_id = item["id"]
    if not isinstance(event_id, str) or not event_id.strip():
        raise BadEvent(f"{where}: 'id' must be a non-empty string")


def _optional_string(item: dict[str, Any], key: str, where: str) -> None:
    value = item.get(key)
    if value is not None and not isinstance(value, str):
        raise BadEvent(f"{where}: {key!r} must be a string, not {type(value).__name__}")


def _eventgrid_event(item: dict[str, Any], where: str) -> Record:
    from azure.eventgrid import EventGridEvent

    _require(item, _EVENTGRID_REQUIRED, where)
    _optional_string(item, "subject", where)
    _optional_string(item, "topic", where)
    _optional_string(item, "eventTime", where)
    try:
        event = EventGridEvent.from_dict(item)
    except Exception as exc:  # azure-core's DeserializationError and friends
        if _parses_with(item, "eventTime", "2000-01-01T00:00:00Z"):
            raise BadEvent(
                f"{where}: 'eventTime' {item['eventTime']!r} is not an RFC 3339 timestamp "
                "(e.g. 2024-05-01T10:00:00Z)"
            ) from None
        raise BadEvent(f"{where} is not an Event Grid event: {exc}") from None
    event_type = str(event.event_type)
    where = f"{where} ({event.id})"
    if event_type == SUBSCRIPTION_VALIDATION:
        code = event.data.get("validationCode") if isinstance(event.data, dict) else None
        if not isinstance(code, str) or not code:
            raise BadEvent(f"{where}: validation event without data.validationCode")
        return Validation(event.id, code)
    if event_type == MODEL_REGISTERED:
        return _model_registered(
            event.id, event.subject, event.data, "eventgrid", where, event.topic or ""
        )
    return Other(event.id, event_type)


def _cloud_event(item: dict[str, Any], where: str) -> Record:
    from azure.core.messaging import CloudEvent

    _require(item, _CLOUDEVENT_REQUIRED, where)
    if item["specversion"] != "1.0":
        raise BadEvent(f"{where}: specversion {item['specversion']!r} is not supported (1.0 is)")
    _optional_string(item, "subject", where)
    _optional_string(item, "time", where)
    try:
        event: CloudEvent[Any] = CloudEvent.from_dict(item)
    except Exception as exc:  # from_dict raises what its field parsers raise (TypeError, ...)
        if "time" in item and _parses_without(item, "time"):
            raise BadEvent(
                f"{where}: 'time' {item['time']!r} is not an RFC 3339 timestamp "
                "(e.g. 2024-05-01T10:00:00Z)"
            ) from None
        raise BadEvent(f"{where} is not a CloudEvent: {exc}") from None
    where = f"{where} ({event.id})"
    if event.type == MODEL_REGISTERED:
        return _model_registered(
            event.id, event.subject, event.data, "cloudevents", where, str(event.source or "")
        )
    return Other(event.id, event.type)


def _parses_with(item: dict[str, Any], key: str, value: str) -> bool:
    """True when `item` is a valid Event Grid event once `key` is `value` (so `key` is the
    problem)."""
    from azure.eventgrid import EventGridEvent

    try:
        EventGridEvent.from_dict({**item, key: value})
    except Exception:
        return False
    return True


def _parses_without(item: dict[str, Any], key: str) -> bool:
    """True when `item` is a valid CloudEvent once `key` is left out (so `key` is the problem)."""
    from azure.core.messaging import CloudEvent

    try:
        CloudEvent.from_dict({k: v for k, v in item.items() if k != key})
    except Exception:
        return False
    return True


def _model_registered(
    event_id: str, subject: str | None, data: Any, schema: str, where: str, topic: str
) -> ModelRegistered:
    if not isinstance(data, dict):
        raise BadEvent(f"{where}: ModelRegistered data must be a JSON object")
    from_subject = _SUBJECT.match(subject or "")
    # Only an absent (or null) field is missing: a 0 or "" taken for missing let the subject
    # stand in for data that says otherwise (data.ModelVersion=0, subject models/m:5 → v5).
    name = _data(data, "ModelName")
    if name is None and from_subject:
        name = from_subject["name"]
    raw_version = _data(data, "ModelVersion")
    if raw_version is None and from_subject:
        raw_version = from_subject["version"]
    if not isinstance(name, str) or not name:
        raise BadEvent(f"{where}: no model name (data.ModelName or subject models/NAME:VERSION)")
    try:
        # A name no registry holds would still get a cursor, whose file name (characters
        # outside [A-Za-z0-9._-] replaced) could be another model's.
        check_name(name)
    except ConfigError as exc:
        raise BadEvent(f"{where}: {exc}") from None
    # ASCII digits, no sign, no leading zero, as the registry writes a version: int() alone
    # read "1_0" as 10, " 7 " as 7 and "\u0663" (an Arabic-Indic digit) as 3. A JSON number
    # is its digits (a bool, "True", and a float, "3.0", are not).
    if not (isinstance(raw_version, str | int) and _VERSION.fullmatch(str(raw_version))):
        raise BadEvent(f"{where}: model version {raw_version!r} is not a positive integer")
    digits = str(raw_version)
    # By length first: int() of more than 4300 digits raises ValueError (CPython's limit).
    if len(digits) > len(str(MAX_VERSION)) or int(digits) > MAX_VERSION:
        raise BadEvent(f"{where}: model version of {len(digits)} digits is above {MAX_VERSION}")
    version = int(digits)
    if from_subject and (from_subject["name"], from_subject["version"]) != (name, str(version)):
        raise BadEvent(
            f"{where}: subject {subject!r} contradicts data ModelName={name!r} "
            f"ModelVersion={raw_version!r}"
        )
    return ModelRegistered(
        event_id=event_id,
        model=name,
        version=version,
        tags=_str_map(_data(data, "ModelTags"), "ModelTags", where),
        properties=_str_map(_data(data, "ModelProperties"), "ModelProperties", where),
        schema=schema,
        topic=topic,
    )


def _data(data: dict[str, Any], key: str) -> Any:
    """`data[key]` as the docs spell it (`ModelTags`), else camel-cased (`modelTags`)."""
    value = data.get(key)
    return value if value is not None else data.get(key[0].lower() + key[1:])


def _str_map(value: Any, name: str, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadEvent(f"{where}: data.{name} must be a JSON object")
    return {str(k): str(v) for k, v in value.items()}
