"""Property tests (hypothesis): whatever the SDK writes, it reads back the same; no input crashes it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

import capture_mqtt as cm

# A topic level: any non-empty text without '/', '+', '#' or NUL.
names = st.text(min_size=1, max_size=12).filter(lambda s: not any(c in s for c in "/+#\0"))
scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(),
)
tag_dicts = st.dictionaries(st.text(min_size=1), st.text(), max_size=4)
# Millisecond-precision times in the range nanosecond timestamps cover.
times = st.datetimes(min_value=datetime(1700, 1, 1), max_value=datetime(2260, 1, 1), timezones=st.just(UTC)).map(
    lambda t: t.replace(microsecond=t.microsecond // 1000 * 1000)
)


@given(names, names, names, names, names, scalars, tag_dicts, times)
def test_field_push_reads_back_as_a_raw_point(
    company: str,
    source: str,
    connection: str,
    measurement: str,
    key: str,
    value: int | float | bool | str,
    tags: dict[str, str],
    at: datetime,
) -> None:
    topic = cm.raw_topic(company, source, connection, measurement, key)
    point = cm.parse_raw(topic, cm.field_payload(value, tags=tags, timestamp=at))
    assert (point.company, point.source_id, point.connection_tag, point.measurement, point.key) == (
        company,
        source,
        connection,
        measurement,
        key,
    )
    assert point.value == value
    assert type(point.value) is type(value)
    assert point.tags == tags
    assert point.timestamp == at
    assert cm.topic_matches(cm.raw_filter(company, measurement=measurement), topic)


@given(st.dictionaries(names, scalars, min_size=1, max_size=6), tag_dicts)
def test_measurement_push_round_trips(fields: dict[str, int | float | bool | str], tags: dict[str, str]) -> None:
    import json

    body = json.loads(cm.measurement_payload(fields, tags=tags, timestamp=1_731_061_326_260))
    assert body["Fields"] == fields
    assert body["Tags"] == tags
    assert body["UtcTimestamp"] == 1_731_061_326_260


@given(names, names, names, st.one_of(st.none(), st.text()), scalars)
def test_commands_round_trip(
    connection: str, measurement: str, variable: str, mapping: str | None, data: object
) -> None:
    payload = cm.command_payload((connection, measurement, variable), data, mapping=mapping, data_as="json")
    command = cm.parse_command("v1/sources/S/cmd/writedata", payload)
    assert (command.connection, command.measurement, command.variable) == (connection, measurement, variable)
    assert command.mapping == mapping
    assert command.data == data


@given(st.binary(max_size=300), st.text(max_size=80))
def test_arbitrary_input_is_a_payload_error_or_a_point(payload: bytes, topic: str) -> None:
    for t in (topic, "v1/raw/A/B/C/D/E"):
        try:
            point = cm.parse_raw(t, payload)
        except cm.PayloadError:
            continue
        assert point.topic == t


@given(st.datetimes(min_value=datetime(1980, 1, 1), max_value=datetime(2200, 1, 1)))
def test_naive_datetimes_are_what_the_caller_says(naive: datetime) -> None:
    naive = naive.replace(microsecond=naive.microsecond // 1000 * 1000)
    topic = "v1/raw/A/B/C/D/E"
    aware = naive.replace(tzinfo=UTC)
    with pytest.raises(cm.PayloadError, match="naive datetime"):
        cm.field_payload(1, timestamp=naive)
    assert cm.parse_raw(topic, cm.field_payload(1, timestamp=naive, naive="utc")).timestamp == aware
    local = naive.astimezone(UTC)  # Python's own reading of a naive datetime: local time
    assert cm.parse_raw(topic, cm.field_payload(1, timestamp=naive, naive="local")).timestamp == local
    elsewhere = aware.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert cm.parse_raw(topic, cm.field_payload(1, timestamp=elsewhere)).timestamp == aware
