"""Pushing data as a source and sending commands, end to end against a real Mosquitto with Capture-like
scopes. A test pipeline plays Capture's server side: every push to data/read is republished on the raw
tree by the core's own codec (one message per field, Connection_Tag added, a missing timestamp filled)."""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import capture_mqtt as cm
from capture_mqtt import _core
from capture_mqtt.testing import BrokerLimits, CaptureEmulator, Mosquitto, Source, User, wait_for_many

from .conftest import COMPANY, PASSWORDS, SOURCE_ID, capture_accounts, connect
from .test_connect import wait_until

STAMP = datetime(2024, 11, 8, 10, 22, 6, 260000, tzinfo=UTC)


class Pipeline:
    """Capture's server side: republishes every push on the raw tree."""

    def __init__(self, broker: Mosquitto, **options: Any) -> None:
        self.client = connect(broker, "pipeline", **options)
        self.sub = self.client.subscribe("v1/sources/+/data/read/#", decode="bytes", qos=1, callback=self._republish)

    def _republish(self, message: cm.Message) -> None:
        for topic, payload in _core._to_raw(COMPANY, message.topic, message.payload):
            self.client.publish(topic, payload, qos=1)

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def pipeline(broker: Mosquitto) -> Iterator[Pipeline]:
    running = Pipeline(broker)
    yield running
    running.close()


def source(broker: Mosquitto, **options: Any) -> cm.SourceClient:
    options.setdefault("connect_timeout", 5)
    return cm.SourceClient(
        broker.host,
        transport="mqtt",
        port=broker.mqtt_port,
        source_id=SOURCE_ID,
        password=PASSWORDS[SOURCE_ID],
        **options,
    )


def receive(sub: cm.Subscription[Any], count: int, timeout: float = 10) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        item = sub.get(timeout=max(0.0, deadline - time.monotonic()))
        assert item is not None, f"only {len(got)} of {count} arrived"
        got.append(item)
    return got


def test_pushes_at_every_level_and_timestamp_form_arrive_on_the_raw_tree(broker: Mosquitto, pipeline: Pipeline) -> None:
    with source(broker) as src, connect(broker) as user, user.subscribe_raw(qos=1) as raw:
        src.push("Conn", "Monitoring", {"CPU_Temp": 55, "CPU_Load": 23.4}, tags={"MachineName": "M1"}, timestamp=STAMP)
        src.push_field("Conn", "Line", "State", "Läuft ✓", timestamp=STAMP.replace(tzinfo=None), naive="utc")
        src.push_field("Conn", "Line", "Running", True, timestamp=1731061326260)
        src.push_field("Conn", "Line", "Speed", 1.5, timestamp="2024-11-08T11:22:06.26+01:00")
        src.push_field("Conn", "Line", "Count", 2**53 + 1, timestamp=STAMP.astimezone(timezone(timedelta(hours=-5))))
        before = datetime.now(UTC)
        src.push_field("Conn", "Line", "Stamped", 0)
        points = {p.key: p for p in receive(raw, 7)}
    assert points["CPU_Temp"].value == 55 and type(points["CPU_Temp"].value) is int
    assert points["CPU_Load"].value == 23.4
    assert points["CPU_Temp"].tags == {"Connection_Tag": "Conn", "MachineName": "M1"}
    assert points["CPU_Temp"].source_id == SOURCE_ID
    assert points["CPU_Temp"].company == COMPANY
    assert points["State"].value == "Läuft ✓"
    assert points["Running"].value is True
    assert points["Count"].value == 2**53 + 1
    for key in ("CPU_Temp", "CPU_Load", "State", "Running", "Speed", "Count"):
        assert points[key].timestamp == STAMP, key
    assert before - timedelta(seconds=1) <= points["Stamped"].timestamp <= datetime.now(UTC)


def test_push_frame_sends_a_large_frame_in_order_slice_by_slice(
    broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pandas as pd
    import polars as pl
    import pyarrow as pa

    from capture_mqtt import source as source_module

    monkeypatch.setattr(source_module, "FRAME_SLICE_ROWS", 1_000)
    rows = 2_500
    frame = pd.DataFrame(
        {"Count": range(rows)}, index=pd.date_range("2024-11-08", periods=rows, freq="ms", tz="UTC", name="time")
    )
    frames = [
        ("pandas", frame),
        ("polars", pl.DataFrame({"Count": range(rows)})),
        ("arrow", pa.table({"Count": range(rows)})),
    ]
    with (
        source(broker) as src,
        connect(broker, "pipeline") as listener,
        listener.subscribe(f"v1/sources/{SOURCE_ID}/data/read/#", qos=1, decode="bytes") as pushed,
    ):
        for kind, data in frames:
            assert src.push_frame(data, connection="Conn", measurement=kind) == rows
            counts = [json.loads(m.payload)["Fields"]["Count"] for m in receive(pushed, rows)]
            assert counts == list(range(rows)), kind
        src.push_frame(frame, connection="Conn", measurement="again")
        bodies = [json.loads(m.payload) for m in receive(pushed, rows)]
        # The time index survives the slicing: the first and the last row keep their own times.
        assert [bodies[0]["UtcTimestamp"], bodies[-1]["UtcTimestamp"]] == [
            "2024-11-08T00:00:00.000Z",
            "2024-11-08T00:00:02.499Z",
        ]


def test_push_frame_sends_every_row_from_pandas_and_polars(broker: Mosquitto, pipeline: Pipeline) -> None:
    import pandas as pd
    import polars as pl

    frame = pd.DataFrame(
        {
            "time": pd.date_range("2024-11-08 10:22:06.260", periods=4, freq="s", tz="UTC"),
            "Temp": [55.5, math.nan, 57.0, 58.0],
            "Count": [1, 2, 3, 4],
            "Machine": ["M1", "M2", None, "M1"],
        }
    )
    with source(broker) as src, connect(broker) as user, user.subscribe_raw(qos=1) as raw:
        sent = src.push_frame(
            frame, connection="Conn", measurement="Press", timestamp_column="time", tag_columns=["Machine"]
        )
        assert sent == 4
        points = receive(raw, 7)  # 4 rows x 2 fields, less the NaN
        assert raw.get(timeout=0.3) is None
        by = {(p.key, p.timestamp): p for p in points}
        assert by[("Temp", STAMP)].value == 55.5
        assert by[("Temp", STAMP)].tags == {"Connection_Tag": "Conn", "Machine": "M1"}
        assert ("Temp", STAMP + timedelta(seconds=1)) not in by, "NaN is a missing value"
        assert by[("Count", STAMP + timedelta(seconds=2))].tags == {"Connection_Tag": "Conn"}
        assert type(by[("Count", STAMP)].value) is int
        indexed = frame.set_index("time")[["Count"]]
        assert src.push_frame(indexed, connection="Conn", measurement="Indexed") == 4
        assert {p.timestamp for p in receive(raw, 4)} == {STAMP + timedelta(seconds=i) for i in range(4)}
        assert src.push_frame(pl.from_pandas(frame[["Count", "Machine"]]), connection="Conn", measurement="Polars") == 4
        assert len(receive(raw, 4)) == 4
        with pytest.raises(cm.PayloadError, match='column "When"'):
            src.push_frame(frame, connection="Conn", measurement="M", timestamp_column="When")
        with pytest.raises(TypeError, match="__arrow_c_stream__"):
            src.push_frame([1, 2], connection="Conn", measurement="M")


NEW_YORK_SCRIPT = """
import datetime, json, sys
import pandas as pd
import capture_mqtt as cm

wall = datetime.datetime(2024, 11, 8, 10, 22, 6, 260000)  # naive: 10:22 on a New York clock
out = {}
try:
    cm.field_payload(1, timestamp=wall)
except cm.PayloadError as err:
    out["refused"] = str(err)
for naive in ("utc", "local"):
    out[naive] = json.loads(cm.field_payload(1, timestamp=wall, naive=naive))["UtcTimestamp"]
frame = pd.DataFrame({"time": [pd.Timestamp(wall)], "V": [1]})
with cm.SourceClient("127.0.0.1", transport="mqtt", port=int(sys.argv[1]), source_id=sys.argv[2],
                     password=sys.argv[3]) as src:
    try:
        src.push_frame(frame, connection="Conn", measurement="NY", timestamp_column="time")
    except cm.PayloadError as err:
        out["frame_refused"] = str(err)
    out["frame_sent"] = src.push_frame(frame, connection="Conn", measurement="NY", timestamp_column="time",
                                       naive="local")
    out["published"] = src.stats["published"]
print(json.dumps(out))
"""


def test_naive_timestamps_are_refused_unless_said_what_they_mean_in_new_york(
    broker: Mosquitto, pipeline: Pipeline
) -> None:
    """On a machine whose clock is in New York a naive datetime is 5 hours from UTC in November:
    refused by default, local or UTC on request, for calls and for frames."""
    env = os.environ | {"TZ": "America/New_York"}
    with connect(broker) as user, user.subscribe_raw(measurement="NY", qos=1) as raw:
        done = subprocess.run(
            [sys.executable, "-c", NEW_YORK_SCRIPT, str(broker.mqtt_port), SOURCE_ID, PASSWORDS[SOURCE_ID]],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert "naive datetime" in out["refused"] and 'naive="local"' in out["refused"]
        assert out["utc"] == "2024-11-08T10:22:06.260Z"
        assert out["local"] == "2024-11-08T15:22:06.260Z"  # EST is UTC-5
        assert 'column "time"' in out["frame_refused"] and "tz-naive" in out["frame_refused"]
        assert out["frame_sent"] == 1 and out["published"] == 1, "the refused frame sent nothing"
        point = raw.get(timeout=5)
        assert point is not None and point.timestamp == datetime(2024, 11, 8, 15, 22, 6, 260000, tzinfo=UTC)


def test_commands_reach_the_source(broker: Mosquitto) -> None:
    got: list[cm.Command] = []
    with source(broker) as src, connect(broker) as user:
        src.on_command(got.append)
        time.sleep(0.2)
        user.send_command(SOURCE_ID, "Conn/Meas/Setpoint", 42, mapping="ns=2;s=SP")
        user.send_command(SOURCE_ID, ("Conn", "Meas", "Mode"), {"auto": True}, data_as="json")
        wait_until(lambda: len(got) == 2, what="both commands")
    first, second = got
    assert (first.source_id, first.verb, first.connection, first.measurement, first.variable) == (
        SOURCE_ID,
        "writedata",
        "Conn",
        "Meas",
        "Setpoint",
    )
    assert (first.mapping, first.data) == ("ns=2;s=SP", "42")
    assert json.loads(first.raw) == {"Topic": "Conn/Meas/Setpoint", "Mapping": "ns=2;s=SP", "Data": "42"}
    assert second.data == {"auto": True}
    assert second.mapping is None


def test_commands_iterator_and_async_variant(broker: Mosquitto) -> None:
    with source(broker) as src, connect(broker) as user, src.commands() as commands:
        user.send_command(SOURCE_ID, ("C", "M", "V"), 1)
        command = commands.get(timeout=5)
        assert isinstance(command, cm.Command) and command.variable == "V"

    async def main() -> Any:
        async with cm.AsyncSourceClient(
            broker.host, transport="mqtt", port=broker.mqtt_port, source_id=SOURCE_ID, password=PASSWORDS[SOURCE_ID]
        ) as src:
            commands = await src.commands()
            await asyncio.to_thread(lambda: connect(broker).send_command(SOURCE_ID, ("C", "M", "X"), 2))
            async for command in commands:
                await src.push_field("C", "M", "Ack", 1)
                return command
            return None

    assert asyncio.run(main()).variable == "X"


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.send_command("", ("C", "M", "V"), 1), cm.TopicError),
        (lambda c: c.send_command("S/1", ("C", "M", "V"), 1), cm.TopicError),
        (lambda c: c.send_command("S1", ("C", "M+", "V"), 1), cm.TopicError),
        (lambda c: c.send_command("S1", "C/M", 1), cm.TopicError),
        (lambda c: c.send_command("S1", ("C", "M", "V"), math.nan), cm.PayloadError),
    ],
)
def test_bad_commands_are_refused_before_sending(broker: Mosquitto, call: Any, error: type[Exception]) -> None:
    with connect(broker) as user:
        with pytest.raises(error):
            call(user)
        assert user.stats["published"] == 0


def test_bad_pushes_name_the_field_and_send_nothing(broker: Mosquitto) -> None:
    with source(broker) as src:
        with pytest.raises(cm.PayloadError, match="Temp") as info:
            src.push("Conn", "M", {"Ok": 1, "Temp": math.inf})
        assert info.value.field == "Temp"
        with pytest.raises(cm.PayloadError, match="has type object"):
            src.push_field("Conn", "M", "K", object())
        with pytest.raises(cm.TopicError):
            src.push("Conn/x", "M", {"a": 1})
        with pytest.raises(cm.TopicError, match="own v1/sources/<SourceID>"):
            src.subscribe("v1/sources/other-source/cmd/+")
        with pytest.raises(cm.TopicError, match="raw tree"):
            src.subscribe_raw()
        with pytest.raises(cm.TopicError, match="cannot access other sources"):
            src.publish("v1/sources/other-source/data/read/C/M", b"{}")
        assert src.stats["published"] == 0

    async def async_source_refuses_the_raw_tree() -> None:
        async_src = cm.AsyncSourceClient("127.0.0.1", transport="mqtt", source_id=SOURCE_ID, password="-")
        try:
            with pytest.raises(cm.TopicError, match="raw tree"):
                await async_src.subscribe_raw()
        finally:
            await async_src.close()

    asyncio.run(async_source_refuses_the_raw_tree())


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_every_qos_and_handles(broker: Mosquitto, pipeline: Pipeline, qos: int) -> None:
    with source(broker) as src, connect(broker) as user, user.subscribe_raw(qos=1) as raw:
        handles = [src.push_field("Conn", "Q", "V", i, qos=qos, wait=False) for i in range(20)]
        for handle in handles:
            handle.wait(10)
        assert sorted(p.value for p in receive(raw, 20)) == list(range(20))
        if qos:
            assert src.stats["acknowledged"] == 20


def test_auth_config_is_read_tolerantly(broker: Mosquitto, tmp_path: Path) -> None:
    config = tmp_path / "auth.json"
    config.write_text(
        json.dumps({"Source": {"SourceID": SOURCE_ID, "SECRET": PASSWORDS[SOURCE_ID]}, "Broker": "127.0.0.1"})
    )
    with cm.SourceClient.from_auth_config(config, transport="mqtt", port=broker.mqtt_port) as src:
        assert src.is_connected and src.source_id == SOURCE_ID
    assert cm.load_auth_config(config)["host"] == "127.0.0.1"
    variants = [
        {"UserName": "u1", "Password": "p", "Id": "s1", "Port": "8883"},
        {"username": "s1", "password": "p"},
        {"source_id": "s1", "secret": "p", "host": "h"},
    ]
    for data in variants:
        config.write_text(json.dumps(data))
        loaded = cm.load_auth_config(config)
        assert loaded["source_id"] == "s1" and loaded["password"] == "p"
    config.write_text(json.dumps({"SourceId": "s1", "Name": "Press 1"}))
    with pytest.raises(ValueError, match="no password") as info:
        cm.load_auth_config(config)
    assert "sourceid" in str(info.value) and "name" in str(info.value)
    config.write_text("not json")
    with pytest.raises(ValueError, match="not JSON"):
        cm.load_auth_config(config)


def test_pushes_made_offline_wait_and_go_out_in_order() -> None:
    # A broker that keeps its sessions over a restart, so that the listener misses nothing.
    fresh_broker = Mosquitto(accounts=capture_accounts(), tls=False, websockets=False, persistence=True).start()
    with fresh_broker, source(fresh_broker, reconnect=cm.Reconnect(min_delay=0.05, max_delay=0.2)) as src:
        listener = connect(fresh_broker, "pipeline", client_id="offline-listener", clean_session=False, connect=False)
        sub = listener.subscribe(f"v1/sources/{SOURCE_ID}/data/read/#", qos=1)
        listener.connect()
        wait_until(lambda: sub._native.is_active, what="the listener's subscription")
        fresh_broker.stop()
        wait_until(lambda: not src.is_connected, what="the source to notice")
        handles = [src.push_field("Conn", "Offline", "V", i, wait=False) for i in range(300)]
        assert src.stats["queued"] == 300
        fresh_broker.start()
        for handle in handles:
            handle.wait(15)
        values = [json.loads(m.payload)["Value"] for m in receive(sub, 300, timeout=15)]
        assert values == list(range(300))
        listener.close()


def test_a_full_offline_queue_under_block_waits_for_room_only_up_to_the_timeout(fresh_broker: Mosquitto) -> None:
    with source(fresh_broker, max_queued=10, reconnect=cm.Reconnect(min_delay=0.05, max_delay=0.2)) as src:
        fresh_broker.stop()
        wait_until(lambda: not src.is_connected, what="the source to notice")
        handles = [src.push_field("Conn", "M", "V", i, wait=False) for i in range(10)]
        # No room: even a push that does not wait for the broker waits for room, and not for ever.
        with pytest.raises(cm.TimeoutError, match="offline and its queue of max_queued=10 is full") as waited:
            src.push_field("Conn", "M", "V", 10, wait=False, timeout=0.3)
        assert "raise max_queued" in str(waited.value)
        fresh_broker.start()
        for handle in handles:
            handle.wait(15)


@pytest.mark.parametrize("policy", ["raise", "drop_oldest"])
def test_a_full_offline_queue_raises_or_drops_the_oldest(fresh_broker: Mosquitto, policy: str) -> None:
    with source(
        fresh_broker, offline=policy, max_queued=10, reconnect=cm.Reconnect(min_delay=0.05, max_delay=0.2)
    ) as src:
        fresh_broker.stop()
        wait_until(lambda: not src.is_connected, what="the source to notice")
        handles = [src.push_field("Conn", "M", "V", i, wait=False) for i in range(10)]
        if policy == "raise":
            with pytest.raises(cm.QueueFullError, match="offline"):
                src.push_field("Conn", "M", "V", 10, wait=False)
            assert src.stats["dropped"] == 0
        else:
            handles += [src.push_field("Conn", "M", "V", i, wait=False) for i in range(10, 15)]
            assert src.stats["dropped"] == 5
            with pytest.raises(cm.QueueFullError, match="dropped"):
                handles[0].wait(1)
        assert src.stats["queued"] == 10
        fresh_broker.start()
        for handle in handles[5 if policy == "drop_oldest" else 0 :]:
            handle.wait(15)


def test_a_broker_restart_mid_stream_loses_nothing(tmp_path: Path) -> None:
    total = 50_000
    # The listener is offline while the broker restarts, and Capture's 1,000 queued per client would
    # drop at the broker what this test counts: the broker keeps more here, so that the count is the
    # pushing side's.
    roomy = BrokerLimits(queued=100_000)
    with Mosquitto(accounts=capture_accounts(), tls=False, websockets=False, persistence=True, limits=roomy) as broker:
        listener = connect(broker, "pipeline", client_id="restart-listener", clean_session=False, connect=False)
        sub = listener.subscribe(f"v1/sources/{SOURCE_ID}/data/read/#", qos=1, queue_size=100_000)
        listener.connect()
        wait_until(lambda: sub._native.is_active, what="the listener's subscription")
        events: list[str] = []
        src = source(
            broker, reconnect=cm.Reconnect(min_delay=0.05, max_delay=0.3), on_event=lambda e: events.append(e.kind)
        )
        restarted = threading.Event()

        def restart() -> None:
            time.sleep(0.5)
            broker.stop()  # graceful: Mosquitto saves what it holds, as a real broker's storage would
            time.sleep(0.3)
            broker.start()
            restarted.set()

        threading.Thread(target=restart, daemon=True).start()
        handles = [src.push_field("Conn", "Stream", "V", i, wait=False) for i in range(total)]
        for handle in handles:
            handle.wait(60)
        assert restarted.wait(10)
        seen: Counter[int] = Counter()
        deadline = time.monotonic() + 60
        while len(seen) < total and time.monotonic() < deadline:
            for message in sub._native.get_many(10_000, 0.5):
                seen[json.loads(message.payload)["Value"]] += 1
        duplicates = sum(seen.values()) - len(seen)
        print(f"restart mid-stream: {total} pushed, {len(seen)} distinct arrived, {duplicates} duplicates")
        assert sorted(seen) == list(range(total)), f"lost {total - len(seen)}"
        # The pushes may all have been acknowledged before the restart: the reconnect can come after.
        wait_until(lambda: events.count("connected") >= 2, what="the source's reconnect")
        assert "disconnected" in events
        src.close()
        listener.close()


def test_more_than_65535_in_flight_pushes_all_arrive() -> None:
    total = 70_000
    # The subject is the pushing side's packet ids. The listener shares the client's network thread
    # with the source, and under load it can fall more than Capture's 1,000 queued behind: the broker
    # would then drop what this test counts, so it keeps more here.
    roomy = BrokerLimits(queued=100_000)
    with (
        Mosquitto(accounts=capture_accounts(), tls=False, websockets=False, limits=roomy) as broker,
        source(broker) as src,
        connect(broker, "pipeline") as listener,
    ):
        sub = listener.subscribe(f"v1/sources/{SOURCE_ID}/data/read/#", qos=1, queue_size=100_000)
        handles = [src.push_field("Conn", "Burst", "V", i, wait=False) for i in range(total)]
        for handle in handles:
            handle.wait(60)
        seen: set[int] = set()
        deadline = time.monotonic() + 60
        while len(seen) < total and time.monotonic() < deadline:
            for message in sub._native.get_many(10_000, 0.5):
                seen.add(json.loads(message.payload)["Value"])
        assert len(seen) == total
        assert src.stats["acknowledged"] == total


def test_the_async_clients_send_commands_push_frames_and_read_auth_configs(
    capture_emulator: CaptureEmulator, capture_client: cm.Client, capture_user: User, capture_source: Source
) -> None:
    import pandas as pd

    frame = pd.DataFrame(
        {"Temperature": [20.5, 21.0, 21.5]},
        index=pd.date_range("2024-11-08 10:00", periods=3, freq="s", tz="UTC", name="time"),
    )

    async def main() -> tuple[int, cm.Command | None]:
        async with cm.AsyncSourceClient.from_auth_config(
            capture_source.auth_config_path, ca_file=capture_emulator.ca_file
        ) as src:
            assert src.source_id == capture_source.source_id
            sent = await src.push_frame(frame, connection="PLC", measurement="Climate")
            commands = await src.commands()
            async with cm.AsyncClient(**capture_user.client_options()) as user:
                await user.send_command(src.source_id, ("PLC", "Climate", "Setpoint"), 22)
            async for command in commands:
                return sent, command
            return sent, None

    with capture_client.subscribe_raw(measurement="Climate", qos=1) as sub:
        sent, command = asyncio.run(main())
        points = wait_for_many(sub, 3)
    assert sent == 3
    assert [p.value for p in points] == [20.5, 21.0, 21.5]
    assert command is not None and (command.variable, command.data) == ("Setpoint", "22")


def test_the_async_source_client_is_built_from_a_url_and_the_environment_like_the_sync_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "mqtt://src-1:s3cret@127.0.0.1:1883"
    monkeypatch.setenv("CAPTURE_MQTT_URL", url)
    with cm.SourceClient.from_url(url, connect=False) as by_url, cm.SourceClient.from_env(connect=False) as by_env:
        assert by_url.source_id == by_env.source_id == "src-1"

    # The async twins, built and not connected (an AsyncClient connects in `async with`).
    by_url_source = cm.AsyncSourceClient.from_url(url).source_id
    by_env_source = cm.AsyncSourceClient.from_env().source_id
    assert by_url_source == by_env_source == "src-1"
    with pytest.raises(TypeError, match="async with"):
        cm.AsyncClient("127.0.0.1", connect=True)  # type: ignore[arg-type]  # what the check refuses, typed or not


def test_an_async_subscription_yields_batches_like_the_sync_one(
    capture_user: User, capture_source_client: cm.SourceClient
) -> None:
    async def main() -> list[float]:
        values: list[float] = []
        async with cm.AsyncClient(**capture_user.client_options()) as user:
            sub = await user.subscribe_raw(measurement="Batches", qos=1)
            for value in range(5):
                capture_source_client.push_field("PLC", "Batches", "V", float(value))
            async for batch in sub.batches(max_rows=2, timeout=0.2):
                assert 0 < len(batch) <= 2
                values += batch.to_pandas()["value"].tolist()
                if len(values) == 5:
                    await sub.close()  # ends the iteration
        return values

    assert asyncio.run(main()) == [0.0, 1.0, 2.0, 3.0, 4.0]


# Deliberate differences between the call styles, each with its reason. Any other public method
# that exists in one style must exist in the other.
ONLY_SYNC = {
    # Callbacks run on a dispatcher thread; asyncio code reads `async for cmd in await src.commands()`.
    ("SourceClient", "on_command"),
}
ONLY_ASYNC: set[tuple[str, str]] = set()


@pytest.mark.parametrize(
    ("sync", "async_"),
    [
        (cm.Client, cm.AsyncClient),
        (cm.SourceClient, cm.AsyncSourceClient),
        (cm.Subscription, cm.AsyncSubscription),
    ],
    ids=["Client", "SourceClient", "Subscription"],
)
def test_every_public_method_exists_in_both_call_styles(sync: type, async_: type) -> None:
    def public(kind: type) -> set[str]:
        return {name for name in dir(kind) if not name.startswith("_")}

    only_sync = {(sync.__name__, name) for name in public(sync) - public(async_)}
    only_async = {(sync.__name__, name) for name in public(async_) - public(sync)}
    assert only_sync <= ONLY_SYNC, f"{async_.__name__} lacks {sorted(n for _, n in only_sync - ONLY_SYNC)}"
    assert only_async <= ONLY_ASYNC, f"{sync.__name__} lacks {sorted(n for _, n in only_async - ONLY_ASYNC)}"


def test_every_waiting_function_has_an_async_twin() -> None:
    """Module-level calls that wait (collect) exist in both call styles, the async one named ``*_async``."""
    waiting = {"collect"}
    for name in waiting:
        assert inspect.iscoroutinefunction(getattr(cm, f"{name}_async")), f"cm.{name}_async is missing"
        sync_params = set(inspect.signature(getattr(cm, name)).parameters)
        assert sync_params == set(inspect.signature(getattr(cm, f"{name}_async")).parameters)


def test_push_frame_reads_the_column_types_polars_and_pyarrow_give(broker: Mosquitto, pipeline: Pipeline) -> None:
    """Narrow ints and floats, unsigned ints, text views, dictionaries and numeric tags all arrive as
    their values: the core converts these columns itself (frame_columns.rs), not with Arrow's cast."""
    import polars as pl
    import pyarrow as pa

    frame = pl.DataFrame(
        {
            "time": pl.Series([STAMP + timedelta(seconds=i) for i in range(3)]).dt.cast_time_unit("us"),
            "Temp": pl.Series([1.5, None, 0.1], dtype=pl.Float32),
            "Parts": pl.Series([1, 2, 255], dtype=pl.UInt8),
            "Note": ["ok", "a note longer than twelve bytes", None],
            "Line": pl.Series(["L1", "L2", "L1"], dtype=pl.Categorical),
            "Shift": pl.Series([1, 2, None], dtype=pl.Int16),
        }
    )
    with source(broker) as src, connect(broker) as user, user.subscribe_raw(qos=1) as raw:
        assert (
            src.push_frame(
                frame, connection="Conn", measurement="Types", timestamp_column="time", tag_columns=["Line", "Shift"]
            )
            == 3
        )
        by = {(p.key, p.timestamp): p for p in receive(raw, 7)}  # 3 rows x 3 fields, less two nulls
        assert by[("Temp", STAMP)].value == 1.5
        assert by[("Temp", STAMP + timedelta(seconds=2))].value == pytest.approx(0.1)
        assert ("Temp", STAMP + timedelta(seconds=1)) not in by
        assert by[("Parts", STAMP + timedelta(seconds=2))].value == 255
        assert by[("Note", STAMP + timedelta(seconds=1))].value == "a note longer than twelve bytes"
        assert by[("Parts", STAMP)].tags == {"Connection_Tag": "Conn", "Line": "L1", "Shift": "1"}
        assert by[("Parts", STAMP + timedelta(seconds=2))].tags == {"Connection_Tag": "Conn", "Line": "L1"}
        large = pa.table({"V": pa.array([1, 2], pa.int8()), "Tag": pa.array(["a", "b"], pa.large_string())})
        assert src.push_frame(large, connection="Conn", measurement="Large", tag_columns=["Tag"]) == 2
        assert sorted(p.tags["Tag"] for p in receive(raw, 2)) == ["a", "b"]
        # Tag columns of missing values only: an all-None column (type null), and a categorical with
        # no categories (an empty dictionary), as pandas and Polars give them.
        missing = pa.table(
            {"V": [1, 2], "Gone": pa.nulls(2), "Line": pa.array([None, None], pa.string()).dictionary_encode()}
        )
        assert src.push_frame(missing, connection="Conn", measurement="Missing", tag_columns=["Gone", "Line"]) == 2
        assert [p.tags for p in receive(raw, 2)] == [{"Connection_Tag": "Conn"}] * 2
        dated = pa.table({"V": [1], "Day": pa.array([date(2024, 11, 8)], pa.date32())})
        with pytest.raises(cm.PayloadError, match=r'column "Day": a tag column must hold text, numbers or booleans'):
            src.push_frame(dated, connection="Conn", measurement="M", tag_columns=["Day"])
        far = pa.table({"t": pa.array([10**13], pa.timestamp("s", tz="UTC")), "V": [1]})
        with pytest.raises(cm.PayloadError, match="outside the years 1677 to 2262"):
            src.push_frame(far, connection="Conn", measurement="M", timestamp_column="t")
