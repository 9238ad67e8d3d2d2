"""Reliability and security, the fast versions (``make soak`` runs the scenarios at full size): broker
faults, stalls, rotating credentials, process exits, load, slow consumers, malformed broker messages,
wrong arguments, and secrets."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest

import capture_mqtt as cm
from capture_mqtt.testing import Mosquitto, wait_for_many
from soak import scenarios

from .conftest import COMPANY, PASSWORDS, SOURCE_ID, capture_accounts, connect

# Faults


def test_no_push_is_lost_when_the_broker_restarts_during_a_stream() -> None:
    figures = scenarios.broker_restarts(4_000, 3, kill=False)
    assert figures["push_failures"] == []
    assert figures["restarts"] == 3
    assert figures["lost"] == 0, figures
    assert figures["unexpected"] == []
    assert figures["max_reconnect_s"] <= figures["backoff_max_s"] + 1.0, figures


def test_every_push_is_acknowledged_when_the_broker_is_killed() -> None:
    figures = scenarios.broker_restarts(3_000, 2, kill=True, seed=2)
    assert figures["push_failures"] == []
    assert figures["unexpected"] == []
    assert figures["reconnects_seen"] >= 2 * figures["restarts"], figures


def test_a_stalled_broker_is_noticed_within_one_and_a_half_keepalives() -> None:
    figures = scenarios.stall(keepalive=1.0, pause=3.0)
    assert figures["noticed_after_s"] is not None
    assert figures["noticed_after_s"] <= 1.5 * 1.0 + 0.5, figures
    assert figures["reconnected_after_resume_s"] is not None
    assert figures["reconnected_after_resume_s"] < 3, figures
    assert figures["events"][-1] == "connected"


def test_reconnects_use_a_fresh_jwt() -> None:
    figures = scenarios.jwt_rotation(restarts=2)
    assert figures["reconnected"] == 2
    assert figures["tokens_issued"] >= 3  # the first connect and one per reconnect


def test_processes_exit_cleanly_with_open_clients() -> None:
    figures = scenarios.exits(runs=5)
    for mode in ("exit", "sigint", "sigkill"):
        assert figures[mode]["hangs"] == 0, figures
        assert figures[mode]["crashes"] == 0, figures
    for mode in ("exit", "sigint"):
        assert figures[mode]["clean_disconnects"] == figures[mode]["connections"], figures


# Load


def test_many_subscriptions_and_many_clients_deliver_everything() -> None:
    figures = scenarios.load(3, subscriptions=100, clients=50, rate=500)
    for row in figures.values():
        assert row["delivered"] == row["expected"], figures
        assert row["threads"][1] <= row["threads"][0], figures
        assert row["fds"][1] <= row["fds"][0], figures


def test_a_slow_consumer_is_bounded_and_its_drops_are_counted_exactly() -> None:
    figures = scenarios.slow_consumer(3, rate=3_000, queue_size=500)
    for policy, row in figures.items():
        assert row["balanced"], (policy, row)
    for policy, row in figures.items():
        # Every policy, block included (on Mosquitto 2.0.11, whose in-flight window is broken).
        assert row["peak_queued"] <= 500, (policy, row)
    assert figures["drop_oldest"]["dropped"] > 0
    assert figures["drop_newest"]["dropped"] > 0
    assert figures["block"]["dropped"] == 0
    assert figures["block, MQTT 3.1.1"]["dropped"] == 0


# Bad input from the broker

GOOD_STAMP = "2024-11-08T10:22:06.26Z"


def _raw(key: str) -> str:
    return cm.raw_topic(COMPANY, SOURCE_ID, "PLC", "Fuzz", key)


MALFORMED: list[tuple[str, str, bytes]] = [
    ("invalid JSON", _raw("k"), b"not json at all"),
    ("truncated", _raw("k"), b'{"Value": 1, "UtcTimestamp": "2024-11-08T10:22'),
    ("empty payload", _raw("k"), b""),
    ("invalid UTF-8", _raw("k"), b'{"Value": "\xff\xfe", "UtcTimestamp": "' + GOOD_STAMP.encode() + b'"}'),
    ("a JSON array", _raw("k"), b"[1, 2, 3]"),
    ("tags not an object", _raw("k"), json.dumps({"Value": 1, "Tags": "x", "UtcTimestamp": GOOD_STAMP}).encode()),
    ("timestamp not a time", _raw("k"), json.dumps({"Value": 1, "UtcTimestamp": "yesterday"}).encode()),
    ("timestamp of a wrong type", _raw("k"), json.dumps({"Value": 1, "UtcTimestamp": [2024]}).encode()),
    ("no value", _raw("k"), json.dumps({"Tags": {}, "UtcTimestamp": GOOD_STAMP}).encode()),
    ("a number too large for a float", _raw("k"), b'{"Value": 1e999, "UtcTimestamp": "' + GOOD_STAMP.encode() + b'"}'),
    ("nested 100,000 deep", _raw("k"), b'{"Value": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("1 MB of garbage", _raw("k"), b"\x00\x01" * 500_000),
    ("a topic with no key", f"v1/raw/{COMPANY}/{SOURCE_ID}/PLC/Fuzz", cm.field_payload(1)),
    ("a topic with an extra level", _raw("k") + "/extra", cm.field_payload(1)),
]


def test_malformed_broker_messages_are_counted_and_the_stream_goes_on() -> None:
    good = [(_raw(f"good{i}"), cm.field_payload(i, timestamp=GOOD_STAMP)) for i in range(len(MALFORMED) + 1)]
    big_value = "x" * 1_000_000
    good.append((_raw("big"), cm.field_payload(big_value, timestamp=GOOD_STAMP)))  # 1 MB, but valid
    surfaced: list[Any] = []
    with (
        Mosquitto(accounts=capture_accounts(), tls=False, websockets=False) as broker,
        connect(broker) as client,
        client.subscribe_raw(qos=1, on_malformed=surfaced.append) as sub,
        connect(broker, "pipeline") as pipeline,
    ):
        for (topic, payload), bad in itertools.zip_longest(good, MALFORMED):
            pipeline.publish(topic, payload, qos=1)
            if bad is not None:
                pipeline.publish(bad[1], bad[2], qos=1)
        arrived = wait_for_many(sub, len(good))
        assert sub.get(timeout=0.5) is None
        stats = sub.stats
    assert [p.key for p in arrived] == [topic.rsplit("/", 1)[1] for topic, _ in good]
    assert arrived[-1].value == big_value
    assert stats["malformed"] == len(MALFORMED), [m.reason for m in surfaced]
    assert len(surfaced) == len(MALFORMED)
    assert all(m.reason for m in surfaced)
    assert [m.payload for m in surfaced] == [bad[2] for bad in MALFORMED]


# Wrong arguments: the documented exception, and nothing sent


class Spy:
    """Subscriptions to everything the tests below could send to (Capture's rules refuse a bare `#`)."""

    def __init__(self, client: cm.Client) -> None:
        self.subs = [client.subscribe(f, decode="bytes") for f in (f"v1/raw/{COMPANY}/#", "v1/sources/#", "a/#", "t/#")]

    def nothing_arrived(self, timeout: float = 0.5) -> bool:
        time.sleep(timeout)
        return all(sub.get(timeout=0) is None for sub in self.subs)


@pytest.fixture(scope="module")
def watched() -> Iterator[tuple[Mosquitto, Spy]]:
    """A broker and a spy on it, to check that nothing was sent."""
    with (
        Mosquitto(accounts=capture_accounts(), tls=False, websockets=False) as broker,
        connect(broker, "pipeline") as spy_client,
    ):
        yield broker, Spy(spy_client)


def _bad_calls(
    client: cm.Client, source: cm.SourceClient
) -> list[tuple[str, Callable[[], Any], type[Exception] | None, str]]:
    nan, naive = float("nan"), datetime(2024, 11, 8, 10, 0)
    sub_filter = cm.raw_filter(COMPANY)
    return [
        ("empty company", lambda: cm.raw_filter(""), cm.TopicError, "company"),
        ("wildcard company", lambda: cm.raw_filter("+"), cm.TopicError, "wildcard"),
        ("slash in a name", lambda: cm.raw_topic(COMPANY, "a/b", "c", "m", "k"), cm.TopicError, "a/b"),
        ("wildcard in a publish topic", lambda: client.publish("v1/raw/x/#", b"1"), cm.TopicError, "wildcard"),
        ("empty topic", lambda: client.publish("", b"1"), cm.TopicError, "non-empty"),
        ("qos 3", lambda: client.publish("a/b", b"1", qos=3), ValueError, "qos"),
        ("payload of a wrong type", lambda: client.publish("a/b", 12), TypeError, "int"),  # type: ignore[arg-type]
        ("wildcard company filter", lambda: client.subscribe("v1/raw/+/#"), cm.TopicError, "company"),
        ("empty filter", lambda: client.subscribe(""), cm.TopicError, ""),
        ("queue of size 0", lambda: client.subscribe(sub_filter, queue_size=0), ValueError, "queue_size"),
        ("unknown overflow", lambda: client.subscribe(sub_filter, overflow="bogus"), ValueError, "overflow"),  # type: ignore[call-overload]
        ("NaN value", lambda: source.push_field("PLC", "M", "k", nan), cm.PayloadError, "NaN"),
        ("infinite value", lambda: source.push("PLC", "M", {"k": math.inf}), cm.PayloadError, "inf"),
        ("no fields", lambda: source.push("PLC", "M", {}), cm.PayloadError, "field"),
        ("huge int", lambda: source.push("PLC", "M", {"k": 2**70}), cm.PayloadError, "2"),
        ("empty connection", lambda: source.push("", "M", {"k": 1}), cm.TopicError, "connection"),
        ("wildcard measurement", lambda: source.push_field("PLC", "+", "k", 1), cm.TopicError, "+"),
        ("negative epoch", lambda: source.push_field("PLC", "M", "k", 1, timestamp=-5), cm.PayloadError, "-5"),
        (
            "timestamp of a wrong type",
            lambda: source.push_field("PLC", "M", "k", 1, timestamp=[1]),
            cm.PayloadError,
            "",
        ),
        (
            "tag value not text",
            lambda: source.push_field("PLC", "M", "k", 1, tags={"a": object()}),  # type: ignore[dict-item]
            cm.PayloadError,
            "a",
        ),
        (
            "another source's topic",
            lambda: source.publish("v1/sources/other/data/read/c/m", b"{}"),
            cm.TopicError,
            "own",
        ),
        ("command to no source", lambda: client.send_command("", "a/b/c", 1), cm.TopicError, "source"),
        ("command topic of two parts", lambda: client.send_command("s", "a/b", 1), cm.TopicError, "a/b"),
        ("negative collect", lambda: cm.collect(client, seconds=-1), ValueError, "seconds"),
        ("naive datetime", lambda: cm.field_payload(1, timestamp=naive), cm.PayloadError, 'naive="utc"'),
        ("naive datetime said to be UTC", lambda: cm.field_payload(1, timestamp=naive, naive="utc"), None, ""),
        # mypy catches this one in a user's script; at run time it is a ValueError.
        ("naive= misspelt", lambda: cm.field_payload(1, timestamp=naive, naive="UTC"), ValueError, "naive must be"),  # type: ignore[arg-type]
    ]


def test_wrong_arguments_raise_the_documented_error_and_send_nothing(watched: tuple[Mosquitto, Spy]) -> None:
    broker, spy = watched
    with (
        connect(broker) as client,
        cm.SourceClient(
            broker.host, transport="mqtt", port=broker.mqtt_port, source_id=SOURCE_ID, password=PASSWORDS[SOURCE_ID]
        ) as source,
    ):
        unexpected = []
        for name, call, error, fragment in _bad_calls(client, source):
            if error is None:
                assert b"2024-11-08T10:00:00.000Z" in call(), name
                continue
            try:
                call()
            except error as err:
                if fragment not in str(err):
                    unexpected.append(f"{name}: {type(err).__name__}: {err}")
            except Exception as err:
                unexpected.append(f"{name}: expected {error.__name__}, got {type(err).__name__}: {err}")
            else:
                unexpected.append(f"{name}: no error")
        with client.subscribe_raw() as sub, pytest.raises(ValueError, match="timeout"):
            sub.get(timeout=-1)
        assert not unexpected, "\n".join(unexpected)
    assert spy.nothing_arrived(), "something was sent"


def test_closed_clients_raise_closed_error(watched: tuple[Mosquitto, Spy]) -> None:
    broker, spy = watched
    client = connect(broker)
    sub = client.subscribe_raw()
    client.close()
    with pytest.raises(cm.ClosedError):
        client.publish("a/b", b"1")
    with pytest.raises(cm.ClosedError):
        client.subscribe_raw()
    with pytest.raises(cm.ClosedError, match="the client is closed"):
        sub.get(timeout=0.1)
    assert spy.nothing_arrived(0.3)


# Secrets


def test_no_secret_in_reprs_errors_or_cli_output(capture_emulator: Any, capture_company: Any) -> None:
    emu = capture_emulator
    user, token, jwt_user, source = (
        emu.add_user(capture_company, "secretive"),
        emu.add_api_token(capture_company),
        emu.add_jwt_user(capture_company, "secretive-jwt"),
        emu.add_source(capture_company),
    )
    texts: list[str] = []
    secrets = [user.password, token.token_value, jwt_user.password, source.password]
    for account in (user, token, jwt_user, source):
        texts += [repr(account), str(account)]
    with emu.client(user) as client, emu.source_client(source) as device:
        texts += [repr(client), str(client), repr(device), repr(cm.Auth.api_token(token.token_id, token.token_value))]
    wrong = user.client_options() | {"password": user.password + "-wrong", "reconnect": False}
    with pytest.raises(cm.AuthenticationError) as refused:
        cm.Client(**wrong)
    texts += [str(refused.value), repr(refused.value), repr(refused.value.args)]
    with pytest.raises(cm.AuthenticationError) as portal:
        cm.fetch_jwt(jwt_user.username, jwt_user.password + "x", base_url=emu.portal_url)
    texts += [str(portal.value)]
    secrets.append(jwt_user.token())
    assert not [text for text in texts for secret in secrets if secret in text]
    time.sleep(0.2)
