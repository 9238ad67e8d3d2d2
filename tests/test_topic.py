"""Capture's topic grammar through the Python API: every form on Capture's page, and the errors."""

from __future__ import annotations

import pytest

import capture_mqtt as cm

EXAMPLE_TOPIC = "v1/raw/AcmeCorp/fe453df1-b4a0-492d-a12c-505988eea849/System_Monitoring_Requester/Monitoring/CPU_Temp"


def test_raw_filter_examples_from_capture_page() -> None:
    assert cm.raw_filter("AcmeCorp", source="#") == "v1/raw/AcmeCorp/#"
    assert cm.raw_filter("AcmeCorp", measurement="Monitoring") == "v1/raw/AcmeCorp/+/+/Monitoring/#"
    assert cm.raw_filter("AcmeCorp") == "v1/raw/AcmeCorp/+/+/+/#"
    assert (
        cm.raw_filter(
            "AcmeCorp",
            "fe453df1-b4a0-492d-a12c-505988eea849",
            "System_Monitoring_Requester",
            "Monitoring",
            "CPU_Temp",
        )
        == EXAMPLE_TOPIC
    )


@pytest.mark.parametrize("company", ["+", "#", "", "Acme/Corp", "Acme+", "Acme#Corp", "Acme\0"])
def test_company_must_be_exact(company: str) -> None:
    with pytest.raises(cm.TopicError) as info:
        cm.raw_filter(company)
    assert info.value.segment == "company"
    assert info.value.value == company
    assert isinstance(info.value, ValueError)
    assert "company" in str(info.value)


def test_company_wildcard_error_says_what_to_do() -> None:
    with pytest.raises(cm.TopicError, match=r"Capture rejects a wildcard in the company segment"):
        cm.raw_filter("+")


@pytest.mark.parametrize(
    ("kwargs", "segment"),
    [
        ({"source": "a/b"}, "source_id"),
        ({"connection": ""}, "connection_tag"),
        ({"measurement": "M+"}, "measurement"),
        ({"key": "K#"}, "key"),
        ({"source": "#", "measurement": "Monitoring"}, "measurement"),
    ],
)
def test_raw_filter_names_the_wrong_level(kwargs: dict[str, str], segment: str) -> None:
    with pytest.raises(cm.TopicError) as info:
        cm.raw_filter("AcmeCorp", **kwargs)
    assert info.value.segment == segment


def test_topic_builders() -> None:
    assert cm.raw_topic("AcmeCorp", "S1", "Conn", "Meas", "Key") == "v1/raw/AcmeCorp/S1/Conn/Meas/Key"
    assert cm.data_topic("S1", "Conn", "Meas") == "v1/sources/S1/data/read/Conn/Meas"
    assert cm.data_topic("S1", "Conn", "Meas", "Key") == "v1/sources/S1/data/read/Conn/Meas/Key"
    assert cm.command_topic("S1") == "v1/sources/S1/cmd/writedata"
    assert cm.command_topic("S1", "other") == "v1/sources/S1/cmd/other"


@pytest.mark.parametrize(
    ("call", "segment"),
    [
        (lambda: cm.raw_topic("AcmeCorp", "+", "C", "M", "K"), "source_id"),
        (lambda: cm.raw_topic("AcmeCorp", "S", "C", "M", "a/b"), "key"),
        (lambda: cm.data_topic("", "C", "M"), "source_id"),
        (lambda: cm.data_topic("S", "C#", "M"), "connection_tag"),
        (lambda: cm.data_topic("S", "C", "M", "+"), "key"),
        (lambda: cm.command_topic("S/1"), "source_id"),
        (lambda: cm.command_topic("S", ""), "verb"),
    ],
)
def test_topic_builders_refuse_bad_names(call: object, segment: str) -> None:
    with pytest.raises(cm.TopicError) as info:
        call()  # type: ignore[operator]
    assert info.value.segment == segment


def test_parse_topic_all_three_trees() -> None:
    raw = cm.parse_topic(EXAMPLE_TOPIC)
    assert (raw.kind, raw.company, raw.source_id, raw.connection_tag, raw.measurement, raw.key) == (
        "raw",
        "AcmeCorp",
        "fe453df1-b4a0-492d-a12c-505988eea849",
        "System_Monitoring_Requester",
        "Monitoring",
        "CPU_Temp",
    )
    assert raw.verb is None
    field = cm.parse_topic("v1/sources/S1/data/read/Conn/Meas/Key")
    assert (field.kind, field.source_id, field.key, field.company) == ("data", "S1", "Key", None)
    measurement = cm.parse_topic("v1/sources/S1/data/read/Conn/Meas")
    assert (measurement.kind, measurement.measurement, measurement.key) == ("data", "Meas", None)
    command = cm.parse_topic("v1/sources/S1/cmd/writedata")
    assert (command.kind, command.source_id, command.verb) == ("command", "S1", "writedata")
    assert repr(command) == (
        "TopicInfo(kind='command', company=None, source_id='S1', connection_tag=None, "
        "measurement=None, key=None, verb='writedata')"
    )


@pytest.mark.parametrize("topic", ["", "v1/raw/A/B/C/D", "v1/raw/A/B/C/D/E/F", "v1/sources/S/cmd", "x/y"])
def test_parse_topic_refuses_other_topics(topic: str) -> None:
    with pytest.raises(cm.TopicError, match="not a Capture topic"):
        cm.parse_topic(topic)


@pytest.mark.parametrize(
    "good",
    [
        "v1/raw/AcmeCorp/#",
        "v1/raw/AcmeCorp/+/+/Monitoring/#",
        "$share/ingest/v1/raw/AcmeCorp/#",
        "v1/sources/S/cmd/+",
    ],
)
def test_validate_filter_accepts(good: str) -> None:
    assert cm.validate_filter(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        "#",
        "v1/#",
        "v1/raw/#",
        "v1/raw/+/#",
        "+/raw/+/x",
        "v1/raw/A/#/x",
        "v1/raw/A/x#",
        "",
        "$share//v1/raw/A/#",
    ],
)
def test_validate_filter_refuses(bad: str) -> None:
    with pytest.raises(cm.TopicError):
        cm.validate_filter(bad)


def test_topic_matches() -> None:
    assert cm.topic_matches("v1/raw/AcmeCorp/#", EXAMPLE_TOPIC)
    assert cm.topic_matches("v1/raw/AcmeCorp/+/+/Monitoring/#", EXAMPLE_TOPIC)
    assert cm.topic_matches("$share/g/v1/raw/AcmeCorp/+/+/+/CPU_Temp", EXAMPLE_TOPIC)
    assert not cm.topic_matches("v1/raw/AcmeCorp/+/+/Other/#", EXAMPLE_TOPIC)
    assert not cm.topic_matches("v1/raw/Other/#", EXAMPLE_TOPIC)
