"""Live data end to end against a real Mosquitto: every way of consuming, with exact values; overlapping
filters; bounded memory under each overflow policy; malformed messages; unsubscribing; shared
subscriptions; batches for pandas."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import UTC, datetime
from typing import Any, Literal

import pytest

import capture_mqtt as cm
from capture_mqtt.testing import Mosquitto, wait_for_many

from .conftest import COMPANY, PASSWORDS, async_client, connect
from .test_connect import wait_until

TOPIC = f"v1/raw/{COMPANY}/src-1/Conn/Monitoring/CPU_Temp"
STAMP = datetime(2024, 11, 8, 10, 22, 6, 260000, tzinfo=UTC)

# (topic, payload, expected value, expected tags, expected timestamp or None for "time of receipt")
CASES: list[tuple[str, str, Any, dict[str, str], datetime | None]] = [
    (
        TOPIC,
        '{"Value": 55, "Tags": {"MachineName": "M1"}, "UtcTimestamp": "2024-11-08T10:22:06.26Z"}',
        55,
        {"MachineName": "M1"},
        STAMP,
    ),
    (
        f"v1/raw/{COMPANY}/src-1/Conn/Monitoring/CPU_Load",
        '{"Value": 23.4, "UtcTimestamp": 1731061326260}',
        23.4,
        {},
        STAMP,
    ),
    (
        f"v1/raw/{COMPANY}/src-2/Conn/Line/State",
        '{"Value": "Läuft ✓", "Tags": {"Ort": "Zürich"}, "UtcTimestamp": "2024-11-08T11:22:06.260+01:00"}',
        "Läuft ✓",
        {"Ort": "Zürich"},
        STAMP,
    ),
    (
        f"v1/raw/{COMPANY}/src-2/Conn/Line/Running",
        '{"Value": true, "UtcTimestamp": "2024-11-08T10:22:06.260000000Z"}',
        True,
        {},
        STAMP,
    ),
    (f"v1/raw/{COMPANY}/src-2/Conn/Line/Big", '{"Value": 9007199254740993}', 9007199254740993, {}, None),
    (
        f"v1/raw/{COMPANY}/src-3/Edge/Files/Photo",
        '{"Value": "data:image/png;base64,iVBORw0KGgo="}',
        "data:image/png;base64,iVBORw0KGgo=",
        {},
        None,
    ),
    (
        f"v1/raw/{COMPANY}/src-3/Edge/Shape/List",
        '{"Value": [1, 2.5, "x"], "Tags": {"n": 5}}',
        [1, 2.5, "x"],
        {"n": "5"},
        None,
    ),
]


def publish_cases(pipeline: cm.Client, qos: int = 1) -> None:
    for topic, payload, *_ in CASES:
        pipeline.publish(topic, payload, qos=qos)


def check(points: list[Any]) -> None:
    assert len(points) == len(CASES), points
    for point, (topic, _, value, tags, stamp) in zip(points, CASES, strict=True):
        assert point.topic == topic
        assert point.value == value
        assert type(point.value) is type(value)
        assert point.tags == tags
        if stamp is not None:
            assert point.timestamp == stamp
        else:
            assert abs((point.timestamp - point.received_at).total_seconds()) < 0.001


def test_iterator_and_get_deliver_exact_values(broker: Mosquitto) -> None:
    with connect(broker) as client, client.subscribe_raw(qos=1) as sub, connect(broker, "pipeline") as pipeline:
        publish_cases(pipeline)
        got = [sub.get(timeout=5) for _ in CASES[:3]]
        for point in sub:
            got.append(point)
            if len(got) == len(CASES):
                break
        check(got)
        assert sub.get(timeout=0.1) is None
        assert sub.stats == {"received": 7, "delivered": 7, "malformed": 0, "dropped": 0, "queued": 0}


def test_callback_runs_off_the_network_thread_and_survives_exceptions(broker: Mosquitto) -> None:
    got: list[Any] = []
    threads: set[str] = set()
    errors: list[BaseException] = []

    def on_point(point: Any) -> None:
        threads.add(threading.current_thread().name)
        got.append(point)
        if len(got) == 2:
            raise RuntimeError("a bug in user code")

    with (
        connect(broker) as client,
        client.subscribe_raw(qos=1, callback=on_point, on_error=errors.append),
        connect(broker, "pipeline") as pipeline,
    ):
        publish_cases(pipeline)
        wait_until(lambda: len(got) == len(CASES), what="all points through the callback")
    check(got)
    assert [str(e) for e in errors] == ["a bug in user code"]
    assert all(name.startswith("capture-mqtt-callback") for name in threads)


def test_async_for_delivers_in_chunks(broker: Mosquitto) -> None:
    async def main() -> list[Any]:
        async with async_client(broker, "alice") as client:
            sub = await client.subscribe_raw(qos=1)
            with connect(broker, "pipeline") as pipeline:
                publish_cases(pipeline)
            got = []
            async for point in sub:
                got.append(point)
                if len(got) == len(CASES):
                    break
            assert await sub.get(timeout=0.1) is None
            await sub.close()
            return got

    check(asyncio.run(main()))


def test_batches_to_pandas_with_exact_values(broker: Mosquitto) -> None:
    with connect(broker) as client, client.subscribe_raw(qos=1) as sub, connect(broker, "pipeline") as pipeline:
        publish_cases(pipeline)
        wait_until(lambda: sub.stats["queued"] == len(CASES), what="the points to arrive")
        batch = sub.batch(max_rows=100, timeout=1, tag_columns=["MachineName"])
    assert len(batch) == len(CASES)
    frame = batch.to_pandas()
    assert list(frame["key"]) == ["CPU_Temp", "CPU_Load", "State", "Running", "Big", "Photo", "List"]
    assert list(frame["value"][:2]) == [55.0, 23.4]
    assert frame["value"][3] == 1.0
    assert frame["value"][4] == float(9007199254740993)
    assert frame["value_text"][2] == "Läuft ✓"
    assert frame["value_text"][6] == '[1,2.5,"x"]'
    assert frame["MachineName"][0] == "M1"
    assert str(frame["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert frame["timestamp"][0] == STAMP
    assert frame["tags"][2]["Ort"] == "Zürich" and frame["tags"][2]["MachineName"] is None
    assert frame["tags"][0]["MachineName"] == "M1"
    assert list(frame["value_type"].astype(str)) == ["int", "float", "string", "bool", "int", "string", "json"]
    assert batch.to_pandas(tags="dict")["tags"][0] == {"MachineName": "M1"}
    assert dict(batch.to_pandas(tags="arrow")["tags"][2]) == {"Ort": "Zürich"}
    arrow = batch.to_arrow()
    assert arrow.num_rows == len(CASES)
    assert batch.to_polars().height == len(CASES)
    wide = batch.to_wide()
    assert wide.loc[("src-1", STAMP), "Monitoring/CPU_Temp"] == 55
    assert wide.loc[("src-1", STAMP), "MachineName"] == "M1"


def _point(source: str, key: str, value: str, second: int, machine: str) -> cm.DataPoint:
    payload = (
        f'{{"Value": {value}, "Tags": {{"MachineName": "{machine}"}}, "UtcTimestamp": "2024-11-08T10:22:{second:02}Z"}}'
    )
    return cm.parse_raw(f"v1/raw/{COMPANY}/{source}/PLC/Press/{key}", payload)


def test_wide_frames_are_shaped_for_analysis() -> None:
    """Indexed by source then time, in time order per source (so that a plot of one source is one
    line), with the requested tag columns, and each key in its natural dtype."""
    points = []
    for second in (3, 1, 2):  # arriving out of order, two machines interleaved
        for source, machine in (("src-b", "Press2"), ("src-a", "Press1")):
            points += [
                _point(source, "Count", str(second * 10), second, machine),
                _point(source, "Running", "true" if second % 2 else "false", second, machine),
                _point(source, "Temp", f"{second}.5" if second != 2 else "2", second, machine),
                _point(source, "Mode", '"Auto"', second, machine),
                _point(source, "Mixed", "1" if second == 1 else '"one"', second, machine),
            ]
    wide = cm.Batch.from_points(points, tag_columns=["MachineName"]).to_wide()
    assert list(wide.index.names) == ["source_id", "timestamp"]
    assert [source for source, _ in wide.index] == ["src-a"] * 3 + ["src-b"] * 3
    times = [stamp.second for _, stamp in wide.index]
    assert times == [1, 2, 3, 1, 2, 3], "sorted by time within each source"
    assert wide.columns[0] == "MachineName"
    assert wide["MachineName"].tolist() == ["Press1"] * 3 + ["Press2"] * 3
    dtypes = {column: str(dtype) for column, dtype in wide.dtypes.items()}
    assert dtypes == {
        "MachineName": "string",
        "Press/Count": "Int64",
        "Press/Mode": "string",
        "Press/Mixed": "object",
        "Press/Running": "boolean",
        "Press/Temp": "float64",
    }
    assert wide["Press/Count"].tolist()[3:] == [10, 20, 30]  # src-b
    assert wide["Press/Running"].tolist()[:3] == [True, False, True]  # src-a
    assert wide["Press/Mixed"].tolist()[:3] == [1.0, "one", "one"]
    # The long frame's tags index like dicts; each tag is also a column of its own.
    long = cm.Batch.from_points(points).to_pandas()
    assert long.tags[0]["MachineName"] == "Press2"
    assert set(long.tags.struct.field("MachineName")) == {"Press1", "Press2"}


def test_batches_loop_ends_when_the_subscription_closes(broker: Mosquitto) -> None:
    with connect(broker) as client, connect(broker, "pipeline") as pipeline:
        sub = client.subscribe_raw(qos=1)
        # One QoS level: MQTT keeps order within a level, and QoS 0 may overtake QoS 1.
        for i in range(2500):
            pipeline.publish(TOPIC, cm.field_payload(i), qos=1, wait=i % 100 == 99)
        pipeline.publish(TOPIC, cm.field_payload(-1), qos=1)
        rows = 0
        values: list[float] = []
        for batch in sub.batches(max_rows=1000, timeout=0.5):
            assert 0 < len(batch) <= 1000
            rows += len(batch)
            values += batch.to_pandas()["value"].tolist()
            if values[-1] == -1:
                sub.close()
        assert rows == 2501
        assert values == [*map(float, range(2500)), -1.0]


def test_collect_gathers_for_a_time_or_a_row_count(broker: Mosquitto) -> None:
    with connect(broker) as client, connect(broker, "pipeline") as pipeline:
        stop = threading.Event()

        def stream() -> None:
            i = 0
            while not stop.is_set():
                pipeline.publish(TOPIC, cm.field_payload(i), qos=0)
                i += 1
                time.sleep(0.001)

        thread = threading.Thread(target=stream)
        thread.start()
        try:
            started = time.monotonic()
            by_time = cm.collect(client, seconds=1.0, progress=False)
            assert 0.9 < time.monotonic() - started < 3
            assert len(by_time) > 50
            by_rows = cm.collect(client, max_rows=100, progress=True)
            assert len(by_rows) == 100
        finally:
            stop.set()
            thread.join()
    with pytest.raises(ValueError, match="seconds"):
        cm.collect(client)


@pytest.mark.parametrize("protocol", [3, 5])
def test_overlapping_filters_get_exactly_their_messages(broker: Mosquitto, protocol: int) -> None:
    with connect(broker, protocol=protocol) as client, connect(broker, "pipeline") as pipeline:
        everything = client.subscribe_raw(qos=1)
        monitoring = client.subscribe_raw(measurement="Monitoring", qos=1)
        same_filter = client.subscribe_raw(measurement="Monitoring", qos=0)
        temps = client.subscribe_raw(key="CPU_Temp", qos=1)
        wait_until(lambda: all(s._native.is_active for s in (everything, monitoring, temps)), what="grants")
        publish_cases(pipeline)
        pipeline.publish(TOPIC, CASES[0][1], qos=1)  # the same message again: a genuine repeat
        expected = {
            "everything": [c[0] for c in CASES] + [TOPIC],
            "monitoring": [c[0] for c in CASES if "/Monitoring/" in c[0]] + [TOPIC],
            "same_filter": [c[0] for c in CASES if "/Monitoring/" in c[0]] + [TOPIC],
            "temps": [TOPIC, TOPIC],
        }
        for name, sub in [
            ("everything", everything),
            ("monitoring", monitoring),
            ("same_filter", same_filter),
            ("temps", temps),
        ]:
            got: list[str] = []
            while len(got) < len(expected[name]):
                point = sub.get(timeout=5)
                assert point is not None, f"{name} (MQTT {protocol}) got only {got}"
                got.append(point.topic)
            assert got == expected[name], name
            assert sub.get(timeout=0.3) is None, f"{name} (MQTT {protocol}) got a duplicate"


@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest"])
def test_drop_policies_bound_memory_and_count_exactly(
    broker: Mosquitto, overflow: Literal["drop_newest", "drop_oldest"]
) -> None:
    with connect(broker) as client, connect(broker, "pipeline") as pipeline:
        sub = client.subscribe_raw(queue_size=100, overflow=overflow)
        for i in range(1000):
            pipeline.publish(TOPIC, cm.field_payload(i), qos=1)
        wait_until(lambda: sub.stats["received"] == 1000, what="all messages to arrive")
        stats = sub.stats
        assert stats["queued"] == 100
        assert stats["dropped"] == 900
        values = [p.value for p in wait_for_many(sub, 100)]
        assert values == (list(range(100)) if overflow == "drop_newest" else list(range(900, 1000)))
        assert sub.stats["delivered"] == 100


@pytest.mark.parametrize("qos", [0, 1])
def test_block_policy_loses_nothing_and_keeps_the_connection(fresh_broker: Mosquitto, qos: int) -> None:
    events: list[cm.ConnectionEvent] = []
    with (
        connect(fresh_broker, keepalive=1, on_event=events.append) as client,
        connect(fresh_broker, "pipeline") as pipeline,
    ):
        sub = client.subscribe_raw(queue_size=50, overflow="block", qos=qos)
        # Within what Capture's broker keeps for a client that is not reading (the client's queue,
        # 32 in flight and 1,000 queued): nothing is lost.
        for i in range(1000):
            pipeline.publish(TOPIC, cm.field_payload(i), qos=1)
        time.sleep(3.5)  # a stalled consumer, for longer than 1.5 keepalives
        assert sub.stats["queued"] <= 50  # the client's bound, whatever the broker's window does
        assert client.is_connected
        values = [p.value for p in wait_for_many(sub, 1000)]
        assert values == list(range(1000))
        assert sub.stats["dropped"] == 0
        assert [e.kind for e in events] == ["connected"]


def test_malformed_messages_are_counted_and_handed_over(broker: Mosquitto) -> None:
    bad: list[cm.MalformedMessage] = []
    with (
        connect(broker) as client,
        client.subscribe_raw(qos=1, on_malformed=bad.append) as sub,
        connect(broker, "pipeline") as pipeline,
    ):
        pipeline.publish(TOPIC, b'{"Value": 1}', qos=1)
        pipeline.publish(TOPIC, b"not json", qos=1)
        pipeline.publish(TOPIC, b"\xff\xfe", qos=1)
        pipeline.publish(f"v1/raw/{COMPANY}/a/b/c/d/too-deep", b'{"Value": 2}', qos=1)
        pipeline.publish(TOPIC, b'{"Value": 3}', qos=1)
        assert [p.value for p in wait_for_many(sub, 2)] == [1, 3]
        assert sub.stats["malformed"] == 3
    assert [m.payload for m in bad] == [b"not json", b"\xff\xfe", b'{"Value": 2}']
    assert "more than 7 levels" in bad[2].reason
    assert bad[0].topic == TOPIC


def test_close_unsubscribes_at_the_broker(broker: Mosquitto) -> None:
    with connect(broker) as client, connect(broker, "pipeline") as pipeline:
        sub = client.subscribe_raw(qos=1)
        pipeline.publish(TOPIC, cm.field_payload(1), qos=1)
        assert sub.get(timeout=5) is not None
        sub.close()
        with pytest.raises(cm.ClosedError, match=r"the subscription to \"v1/raw/.*\" has ended"):
            sub.get(timeout=1)
        assert client.is_connected
        for i in range(5):
            pipeline.publish(TOPIC, cm.field_payload(i), qos=1)
        time.sleep(0.5)
        assert client.stats["unrouted"] == 0, "the broker still sends what nobody subscribes to"


def test_shared_subscriptions_split_one_stream(broker: Mosquitto) -> None:
    group = f"$share/ingest/v1/raw/{COMPANY}/#"
    with (
        connect(broker, protocol=5) as first,
        connect(broker, protocol=5) as second,
        connect(broker, "pipeline") as pipeline,
    ):
        subs = [first.subscribe(group, decode="raw", qos=1), second.subscribe(group, decode="raw", qos=1)]
        for i in range(200):
            pipeline.publish(TOPIC, cm.field_payload(i), qos=1)
        got: list[int] = []
        deadline = time.monotonic() + 10
        while len(got) < 200 and time.monotonic() < deadline:
            for sub in subs:
                point = sub.get(timeout=0.05)
                if point is not None:
                    got.append(point.value)
        assert sorted(got) == list(range(200)), "every message once, across the group"
        assert all(s.stats["received"] > 0 for s in subs), [s.stats for s in subs]


def test_plain_mqtt_filters_deliver_messages(broker: Mosquitto) -> None:
    with connect(broker, "pipeline") as client:
        sub = client.subscribe("plant/+/status")
        client.publish("plant/line1/status", json.dumps({"ok": True}), qos=1)
        message = sub.get(timeout=5)
        assert isinstance(message, cm.Message)
        assert (message.topic, json.loads(message.payload), message.qos) == ("plant/line1/status", {"ok": True}, 0)


def test_collect_stops_on_ctrl_c_and_keeps_what_arrived(broker: Mosquitto, tmp_path: Any) -> None:
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "collect.py"
    script.write_text(
        "import capture_mqtt as cm\n"
        f"c = cm.Client('127.0.0.1', transport='mqtt', port={broker.mqtt_port}, username='alice',"
        f" password={PASSWORDS['alice']!r}, company={COMPANY!r})\n"
        "print('ready', flush=True)\n"
        "batch = cm.collect(c, seconds=60, progress=False)\n"
        "print('rows', len(batch), flush=True)\n"
    )
    with connect(broker, "pipeline") as pipeline:
        process = subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=dict(os.environ)
        )
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 1.5
        i = 0
        while time.monotonic() < deadline:
            pipeline.publish(TOPIC, cm.field_payload(i), qos=0)
            i += 1
            time.sleep(0.002)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=20)
    assert process.returncode == 0
    assert time.monotonic() - started < 10
    rows = int(out.split()[-1])
    assert 0 < rows <= i


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"queue_size": 0}, "queue_size must be a positive int, got 0"),
        ({"queue_size": -3}, "queue_size must be a positive int, got -3"),
        ({"overflow": "newest"}, 'overflow must be "block", "drop_oldest" or "drop_newest", not "newest"'),
    ],
)
def test_bad_subscription_options_are_refused_in_the_same_words_in_both_call_styles(
    broker: Mosquitto, options: dict[str, Any], words: str
) -> None:
    with connect(broker) as client, pytest.raises(ValueError, match="must be") as refused:
        client.subscribe("v1/raw/AcmeCorp/#", **options)
    assert str(refused.value) == words

    async def async_refusal() -> str:
        async with async_client(broker) as client:
            with pytest.raises(ValueError, match="must be") as refused:
                await client.subscribe("v1/raw/AcmeCorp/#", **options)
            return str(refused.value)

    assert asyncio.run(async_refusal()) == words
