"""Capture's payloads through the Python API: reading raw points and commands, writing pushes and
commands, every timestamp form, and the errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

import capture_mqtt as cm

TOPIC = "v1/raw/AcmeCorp/fe453df1-b4a0-492d-a12c-505988eea849/System_Monitoring_Requester/Monitoring/CPU_Temp"
EXAMPLE = b"""{
"Value": 55,
"Tags": {
"Connection_Tag": "System_Monitoring_Requester",
"MachineName": "MyMachine",
"SerialNumber": "77777"
},
"UtcTimestamp": "2024-11-08T10:22:06.26Z"
}"""
EXAMPLE_TIME = datetime(2024, 11, 8, 10, 22, 6, 260000, tzinfo=UTC)


def test_the_capture_page_example() -> None:
    received = datetime(2025, 1, 1, tzinfo=UTC)
    point = cm.parse_raw(TOPIC, EXAMPLE, qos=1, retain=True, received_at=received)
    assert point.topic == TOPIC
    assert point.company == "AcmeCorp"
    assert point.source_id == "fe453df1-b4a0-492d-a12c-505988eea849"
    assert point.connection_tag == "System_Monitoring_Requester"
    assert point.measurement == "Monitoring"
    assert point.key == "CPU_Temp"
    assert point.value == 55
    assert type(point.value) is int
    assert point.tags == {
        "Connection_Tag": "System_Monitoring_Requester",
        "MachineName": "MyMachine",
        "SerialNumber": "77777",
    }
    assert point.timestamp == EXAMPLE_TIME
    assert point.timestamp.tzinfo is not None
    assert point.timestamp.utcoffset() == timedelta(0)
    assert point.timestamp_ns == 1_731_061_326_260_000_000
    assert point.received_at == received
    assert (point.qos, point.retain) == (1, True)
    assert point.to_dict()["value"] == 55
    assert repr(point) == (
        "DataPoint(company='AcmeCorp', source_id='fe453df1-b4a0-492d-a12c-505988eea849', "
        "connection_tag='System_Monitoring_Requester', measurement='Monitoring', key='CPU_Temp', "
        "value=55, timestamp='2024-11-08T10:22:06.260Z')"
    )


def test_data_points_are_frozen_values() -> None:
    a = cm.parse_raw(TOPIC, EXAMPLE, received_at=EXAMPLE_TIME)
    b = cm.parse_raw(TOPIC, EXAMPLE.decode(), received_at=EXAMPLE_TIME)
    assert a == b
    with pytest.raises(AttributeError):
        a.value = 1  # type: ignore[misc]
    a.tags["MachineName"] = "changed"
    assert a.tags["MachineName"] == "MyMachine", "tags is a fresh dict; the point does not change"


@pytest.mark.parametrize(
    "value",
    [
        55,
        -3,
        2**63 - 1,
        2**64 - 1,
        23.4,
        1e300,
        0.1,
        "text",
        "Température 温度 🌡",
        "data:image/png;base64,iVBORw0KGgo=",
        True,
        False,
        None,
        [1, "a", None, 2.5],
        {"a": {"b": [1.5]}},
    ],
)
def test_every_value_type_is_kept_exactly(value: Any) -> None:
    payload = json.dumps({"Value": value, "Tags": {}})
    point = cm.parse_raw(TOPIC, payload)
    assert point.value == value
    assert type(point.value) is type(value)


def test_unicode_topics_and_tags() -> None:
    topic = cm.raw_topic("Acmé", "src-ü", "Conn 1", "Température", "温度")
    point = cm.parse_raw(topic, json.dumps({"Value": 1, "Tags": {"Ort": "Zürich"}}))
    assert (point.company, point.source_id, point.measurement, point.key) == (
        "Acmé",
        "src-ü",
        "Température",
        "温度",
    )
    assert point.tags == {"Ort": "Zürich"}


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ('"2024-11-08T10:22:06Z"', datetime(2024, 11, 8, 10, 22, 6, tzinfo=UTC)),
        ('"2024-11-08T10:22:06.2Z"', datetime(2024, 11, 8, 10, 22, 6, 200000, tzinfo=UTC)),
        ('"2024-11-08T10:22:06.26Z"', EXAMPLE_TIME),
        ('"2024-11-08T10:22:06.123Z"', datetime(2024, 11, 8, 10, 22, 6, 123000, tzinfo=UTC)),
        ('"2024-11-08T10:22:06.1234Z"', datetime(2024, 11, 8, 10, 22, 6, 123400, tzinfo=UTC)),
        ('"2024-11-08T10:22:06.12345Z"', datetime(2024, 11, 8, 10, 22, 6, 123450, tzinfo=UTC)),
        ('"2024-11-08T10:22:06.123456Z"', datetime(2024, 11, 8, 10, 22, 6, 123456, tzinfo=UTC)),
        ('"2024-11-08T10:22:06.1234567Z"', datetime(2024, 11, 8, 10, 22, 6, 123456, tzinfo=UTC)),
        ('"2024-11-08T10:22:06.12345678Z"', datetime(2024, 11, 8, 10, 22, 6, 123456, tzinfo=UTC)),
        ('"2024-11-08T10:22:06.123456789Z"', datetime(2024, 11, 8, 10, 22, 6, 123456, tzinfo=UTC)),
        ('"2024-11-08T12:22:06.26+02:00"', EXAMPLE_TIME),
        ('"2024-11-08T05:22:06.26-05:00"', EXAMPLE_TIME),
        ('"2024-11-08T10:22:06.26"', EXAMPLE_TIME),
        ("1731061326260", EXAMPLE_TIME),
    ],
)
def test_every_timestamp_form(stamp: str, expected: datetime) -> None:
    point = cm.parse_raw(TOPIC, f'{{"Value": 1, "UtcTimestamp": {stamp}}}')
    assert point.timestamp == expected


def test_nanoseconds_are_kept_in_timestamp_ns() -> None:
    point = cm.parse_raw(TOPIC, '{"Value": 1, "UtcTimestamp": "2024-11-08T10:22:06.123456789Z"}')
    assert point.timestamp_ns % 1_000_000_000 == 123_456_789


def test_missing_timestamp_is_the_time_of_receipt() -> None:
    received = datetime(2025, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)
    for payload in ('{"Value": 1}', '{"Value": 1, "UtcTimestamp": null}'):
        assert cm.parse_raw(TOPIC, payload, received_at=received).timestamp == received
    before = datetime.now(UTC)
    point = cm.parse_raw(TOPIC, '{"Value": 1}')
    assert before <= point.timestamp <= datetime.now(UTC)
    assert point.timestamp == point.received_at


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty"),
        (b"{", "EOF"),
        (b"not json", "expected a JSON object"),
        (b"[55]", "expected a JSON object"),
        (b"55", "expected a JSON object"),
        (b'{"Tags": {}}', 'no "Value"'),
        (b'{"Value": 1, "UtcTimestamp": "yesterday"}', "ISO 8601"),
        (b'{"Value": 1, "UtcTimestamp": true}', "UtcTimestamp"),
        (b'{"Value": 1, "Tags": {"a": [1]}}', "list or object"),
        (b'{"Value": "\xff\xfe"}', "unicode"),
        (b'{"Value": ' + b"[" * 1000 + b"]" * 1000 + b"}", "recursion"),
    ],
)
def test_malformed_payloads_raise_payload_error_with_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(cm.PayloadError, match=reason):
        cm.parse_raw(TOPIC, payload)


def test_a_topic_outside_the_raw_tree_is_a_payload_error() -> None:
    with pytest.raises(cm.PayloadError, match="not a raw-tree topic"):
        cm.parse_raw("v1/sources/S/data/read/C/M/K", b'{"Value": 1}')


def test_payload_must_be_bytes_or_str() -> None:
    with pytest.raises(TypeError, match="payload must be bytes or str"):
        cm.parse_raw(TOPIC, 55)  # type: ignore[arg-type]
    assert cm.parse_raw(TOPIC, bytearray(b'{"Value": 2}')).value == 2
    assert cm.parse_raw(TOPIC, memoryview(b'{"Value": 3}')).value == 3


# Writing


def test_field_payload_matches_capture_page() -> None:
    payload = cm.field_payload(55, tags={"MachineName": "MyMachine"}, timestamp="2024-11-08T10:22:06.26Z")
    assert json.loads(payload) == {
        "Value": 55,
        "Tags": {"MachineName": "MyMachine"},
        "UtcTimestamp": "2024-11-08T10:22:06.260Z",
    }


def test_measurement_payload_matches_capture_page() -> None:
    payload = cm.measurement_payload(
        {"CPU_Temp": 55, "CPU_Load": 23.4}, tags={"MachineName": "MyMachine"}, timestamp=EXAMPLE_TIME
    )
    assert payload == (
        b'{"Fields":{"CPU_Temp":55,"CPU_Load":23.4},"Tags":{"MachineName":"MyMachine"},'
        b'"UtcTimestamp":"2024-11-08T10:22:06.260Z"}'
    )


@pytest.mark.parametrize(
    ("timestamp", "written"),
    [
        (None, None),
        (EXAMPLE_TIME, "2024-11-08T10:22:06.260Z"),
        (
            datetime(2024, 11, 8, 11, 22, 6, 260999, tzinfo=timezone(timedelta(hours=1))),
            "2024-11-08T10:22:06.260Z",
        ),
        (1731061326260, 1731061326260),
        ("2024-11-08T12:22:06.26+02:00", "2024-11-08T10:22:06.260Z"),
    ],
)
def test_push_timestamps_every_form(timestamp: Any, written: Any) -> None:
    body = json.loads(cm.field_payload(1, timestamp=timestamp))
    assert body.get("UtcTimestamp") == written


@pytest.mark.parametrize(
    ("timestamp", "message"),
    [
        (1731061326, "epoch seconds"),
        (1731061326260000, "microseconds"),
        (1731061326.26, "as an int"),
        (True, "bool"),
        ("08/11/2024", "ISO 8601"),
        (object(), "has type object"),
        (2**70, "64 bits"),
    ],
)
def test_push_timestamps_refused(timestamp: Any, message: str) -> None:
    with pytest.raises(cm.PayloadError, match=message) as info:
        cm.field_payload(1, timestamp=timestamp)
    assert info.value.field == "UtcTimestamp"


@pytest.mark.parametrize("value", [55, -1, 2**64 - 1, 23.4, True, "on", ""])
def test_push_values_round_trip(value: Any) -> None:
    payload = cm.field_payload(value, tags={"t": "v"})
    point = cm.parse_raw(TOPIC, payload)
    assert point.value == value
    assert type(point.value) is type(value)
    assert point.tags == {"t": "v"}


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"Temp": float("nan")}, "Temp", "NaN or infinity"),
        ({"Temp": float("inf")}, "Temp", "NaN or infinity"),
        ({"Temp": float("-inf")}, "Temp", "NaN or infinity"),
        ({"Temp": None}, "Temp", "None"),
        ({"Temp": [1, 2]}, "Temp", "has type list"),
        ({"Temp": {"a": 1}}, "Temp", "has type dict"),
        ({"Temp": b"x"}, "Temp", "has type bytes"),
        ({"Temp": 2**64}, "Temp", "64 bits"),
        ({}, "Fields", "at least one field"),
        ({1: 2}, "Fields", "not a str"),
    ],
)
def test_unpushable_values_name_the_field(fields: dict[Any, Any], field: str, message: str) -> None:
    with pytest.raises(cm.PayloadError, match=message) as info:
        cm.measurement_payload(fields)
    assert info.value.field == field


def test_tags_must_be_strings() -> None:
    with pytest.raises(cm.PayloadError, match='tag "Line" has type int') as info:
        cm.field_payload(1, tags={"Line": 5})  # type: ignore[dict-item]
    assert info.value.field == "Tags.Line"
    with pytest.raises(cm.PayloadError, match="dict of str to str"):
        cm.field_payload(1, tags=["a"])  # type: ignore[arg-type]


# Commands


def test_command_payload_follows_the_documented_template() -> None:
    payload = cm.command_payload("Conn/Meas/Var", 55, mapping="ns=2;s=Var")
    assert json.loads(payload) == {"Topic": "Conn/Meas/Var", "Mapping": "ns=2;s=Var", "Data": "55"}
    assert json.loads(cm.command_payload(("C", "M", "V"), True))["Data"] == "true"
    assert json.loads(cm.command_payload(("C", "M", "V"), "on"))["Data"] == "on"
    assert json.loads(cm.command_payload(("C", "M", "V"), 23.5, data_as="json"))["Data"] == 23.5
    assert json.loads(cm.command_payload(("C", "M", "V"), [1, {"a": None}], data_as="json"))["Data"] == [
        1,
        {"a": None},
    ]
    assert "Mapping" not in json.loads(cm.command_payload(("C", "M", "V"), 1))


@pytest.mark.parametrize(
    ("topic", "segment"),
    [
        ("Conn/Meas", "topic"),
        (("C", "", "V"), "measurement"),
        (("C+", "M", "V"), "connection_tag"),
        (("C", "M", "V#"), "variable"),
        (("C", "M", "a/b"), "variable"),
    ],
)
def test_command_targets_are_checked(topic: Any, segment: str) -> None:
    with pytest.raises(cm.TopicError) as info:
        cm.command_payload(topic, 1)
    assert info.value.segment == segment


def test_command_data_errors() -> None:
    with pytest.raises(cm.PayloadError, match="NaN"):
        cm.command_payload(("C", "M", "V"), float("nan"))
    with pytest.raises(ValueError, match="data_as"):
        cm.command_payload(("C", "M", "V"), 1, data_as="xml")  # type: ignore[arg-type]


def test_parse_command_round_trip() -> None:
    payload = cm.command_payload(("Conn", "Meas", "Setpoint"), 42, mapping="ns=2;s=SP")
    command = cm.parse_command("v1/sources/S1/cmd/writedata", payload)
    assert (command.source_id, command.verb) == ("S1", "writedata")
    assert (command.topic, command.connection, command.measurement, command.variable) == (
        "Conn/Meas/Setpoint",
        "Conn",
        "Meas",
        "Setpoint",
    )
    assert (command.mapping, command.data, command.raw, command.extra) == ("ns=2;s=SP", "42", payload, {})


def test_parse_command_keeps_unknown_keys_and_odd_topics() -> None:
    command = cm.parse_command("v1/sources/S1/cmd/writedata", '{"Topic": "OnlyOne", "Data": 5, "RequestId": "r-1"}')
    assert (command.connection, command.measurement, command.variable) == ("OnlyOne", None, None)
    assert command.data == 5
    assert command.extra == {"RequestId": "r-1"}
    with pytest.raises(cm.PayloadError, match="not a command topic"):
        cm.parse_command("v1/raw/A/B/C/D/E", "{}")
    with pytest.raises(cm.PayloadError, match="Topic must be a string"):
        cm.parse_command("v1/sources/S1/cmd/writedata", '{"Topic": 5}')


@pytest.mark.parametrize(
    ("at", "text"),
    [
        (datetime(1833, 1, 1, 0, 0, 0, 6000, tzinfo=UTC), "1833-01-01T00:00:00.006Z"),
        (datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC), "1969-12-31T23:59:59.500Z"),
        (datetime(2261, 12, 31, 23, 59, 59, 999000, tzinfo=UTC), "2261-12-31T23:59:59.999Z"),
        (datetime(2024, 11, 8, 11, 22, 6, 260000, tzinfo=timezone(timedelta(hours=1))), "2024-11-08T10:22:06.260Z"),
    ],
)
def test_aware_datetimes_keep_their_milliseconds_far_from_the_epoch(at: datetime, text: str) -> None:
    """Aware datetimes take a fast path (float seconds plus exact microseconds): no rounding slips."""
    assert json.loads(cm.field_payload(1, timestamp=at))["UtcTimestamp"] == text
