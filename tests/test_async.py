"""Awaited operations: one completion handle, woken through the session's doorbell, no thread hop.

Against the shared Capture-limits broker (32 in flight, 1,000 queued, 1 MB packets).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pytest

import capture_mqtt as cm
from capture_mqtt import _aio, _core
from capture_mqtt.testing import Mosquitto, wait_for_many

from .conftest import COMPANY, PASSWORDS, SOURCE_ID, NoReaderLoop, async_client, connect


@pytest.fixture
def no_thread_hops(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Fails a test whose async calls go through `asyncio.to_thread` (but on a loop without
    add_reader, where that is the way: the test's other checks still run)."""
    hops: list[Any] = []
    if os.environ.get("CAPTURE_MQTT_TEST_LOOP") == "no-add-reader":
        yield hops
        return

    async def refuse(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        hops.append(func)
        raise AssertionError(f"an async call hopped to a thread: {func!r}")

    monkeypatch.setattr(asyncio, "to_thread", refuse)
    yield hops
    assert hops == []


def test_every_async_operation_completes_without_a_thread_hop(broker: Mosquitto, no_thread_hops: list[Any]) -> None:
    async def main() -> None:
        async with async_client(broker, "pipeline") as pipeline, async_client(broker) as alice:
            sub = await alice.subscribe(f"v1/raw/{COMPANY}/#", qos=1, decode="raw")
            await pipeline.publish(f"v1/raw/{COMPANY}/s/C/M/K", cm.field_payload(1), qos=1)
            await pipeline.publish(f"v1/raw/{COMPANY}/s/C/M/K", cm.field_payload(2), qos=0)
            got = [await anext(aiter(sub)) for _ in range(2)]
            assert [p.value for p in got] == [1, 2]
            await alice.send_command(SOURCE_ID, "Conn/M/V", 5)
            await sub.close()
        async with cm.AsyncSourceClient(
            broker.host, transport="mqtt", port=broker.mqtt_port, source_id=SOURCE_ID, password=PASSWORDS[SOURCE_ID]
        ) as src:
            rows = pa.table({"UtcTimestamp": pa.array([1_731_061_326_000 + i for i in range(50)]), "Temp": range(50)})
            sent = await src.push_frame(rows, connection="Conn", measurement="Line", timestamp_column="UtcTimestamp")
            assert sent == 50

    asyncio.run(main())


@pytest.mark.doorbell
def test_a_burst_of_awaited_publishes_settles_in_chunks(broker: Mosquitto) -> None:
    # Under the broker's queue of 1,000 per client: a faster burst would be dropped by the broker on
    # its way to the reader (Capture's limit), whatever the client.
    n = 800
    with (
        connect(broker, "pipeline") as reader,
        reader.subscribe("bench/burst", qos=1, queue_size=n, decode="bytes") as sub,
    ):

        async def main() -> int:
            async with async_client(broker, "pipeline") as pipeline:
                rings = 0
                original = _aio._Watch.ring

                def counting(self: _aio._Watch) -> None:
                    nonlocal rings
                    rings += 1
                    original(self)

                _aio._Watch.ring = counting  # type: ignore[method-assign]
                try:
                    await asyncio.gather(*(pipeline.publish("bench/burst", str(i), qos=1) for i in range(n)))
                finally:
                    _aio._Watch.ring = original  # type: ignore[method-assign]
                assert pipeline.stats["acknowledged"] == n
                return rings

        rings = asyncio.run(main())
        assert 1 <= rings < n // 4, f"{rings} wake-ups for {n} acknowledgements"
        received = wait_for_many(sub, n, timeout=20)
        assert sorted(int(m.payload) for m in received) == list(range(n)), sub.stats


def test_a_cancelled_await_leaves_the_client_usable(broker: Mosquitto) -> None:
    async def main() -> None:
        async with async_client(broker, "pipeline") as pipeline:
            task = asyncio.ensure_future(pipeline.publish("bench/cancel", b"x", qos=1))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # Later operations on the same doorbell settle as usual.
            await asyncio.gather(*(pipeline.publish("bench/cancel", b"y", qos=1) for _ in range(100)))
            await asyncio.wait_for(pipeline.publish("bench/cancel", b"z", qos=1), timeout=10)

    asyncio.run(main())


def test_an_awaited_operation_raises_its_error(broker: Mosquitto) -> None:
    async def main() -> None:
        async with async_client(broker) as alice:
            with pytest.raises(cm.TopicError, match="no wildcard"):
                await alice.publish("a/+/b", b"x")
            with pytest.raises(ValueError, match="qos must be 0, 1 or 2, got 3"):
                await alice.publish("a/b", b"x", qos=3)
        with pytest.raises(cm.ClosedError):
            await alice.publish(f"v1/sources/{SOURCE_ID}/cmd/writedata", b"x")

    asyncio.run(main())


def test_the_handle_is_waited_on_or_awaited(broker: Mosquitto) -> None:
    with connect(broker, "pipeline") as pipeline:
        handle = pipeline.publish("bench/handle", b"x", qos=1, wait=False)
        assert isinstance(handle, _core._Operation)
        handle.wait(10)
        assert handle.done()

        async def later() -> None:
            again = pipeline.publish("bench/handle", b"y", qos=1, wait=False)
            assert again is not None
            await again

        asyncio.run(later())
        assert pipeline.stats["acknowledged"] == 2


def test_two_event_loops_await_on_one_client(broker: Mosquitto) -> None:
    import threading

    with connect(broker, "pipeline") as pipeline:
        errors: list[BaseException] = []

        def run() -> None:
            async def main() -> None:
                handles = [pipeline.publish("bench/loops", b"x", qos=1, wait=False) for _ in range(200)]
                await asyncio.gather(*(h for h in handles if h is not None))

            try:
                asyncio.run(main())
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not errors and all(not t.is_alive() for t in threads)
        assert pipeline.stats["acknowledged"] == 400


def test_awaits_leave_nothing_behind_across_loops_and_cancellations(broker: Mosquitto) -> None:
    raw = f"v1/raw/{COMPANY}/s/C/M/K"
    with connect(broker, "pipeline") as pipeline, pipeline.subscribe(raw, qos=1, decode="raw") as sub:
        native = sub._native

        async def abandon() -> None:
            task = asyncio.ensure_future(native.batch(10, None))  # waits for rows that never come
            await asyncio.sleep(0.05)
            task.cancel()

        asyncio.run(abandon())  # the loop ends with that await cancelled

        async def twice() -> int:
            op = native.batch(1, None)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(_aio.wait_operation(op), 0.05)  # the first await gives up
            pipeline.publish(raw, cm.field_payload(1))
            batch, malformed = await op  # the second one gets it
            handles = [pipeline.publish("bench/idle", b"x", qos=1, wait=False) for _ in range(50)]
            await asyncio.gather(*(h for h in handles if h is not None))
            return len(batch) + len(malformed)

        assert asyncio.run(twice()) == 1
        assert _aio._WATCHES == {}, "a finished await left its watch behind"


def test_a_loop_that_cannot_watch_descriptors_still_awaits(broker: Mosquitto) -> None:
    """Windows' Proactor loop has no add_reader: awaits fall back to a worker thread there."""

    async def main() -> int:
        async with async_client(broker, "pipeline") as pipeline:
            await asyncio.gather(*(pipeline.publish("bench/proactor", b"x", qos=1) for _ in range(20)))
            return pipeline.stats["acknowledged"]

    loop = NoReaderLoop()
    try:
        assert loop.run_until_complete(main()) == 20
    finally:
        loop.close()
    assert _aio._WATCHES == {}


def test_the_asyncio_tests_run_on_the_loop_make_test_asks_for() -> None:
    """`make test` runs the asyncio tests twice: on the default loop, and with
    CAPTURE_MQTT_TEST_LOOP=no-add-reader on one without add_reader, as on Windows."""
    loop = asyncio.new_event_loop()
    try:
        if os.environ.get("CAPTURE_MQTT_TEST_LOOP") == "no-add-reader":
            assert type(loop) is NoReaderLoop
        else:
            assert isinstance(loop, asyncio.SelectorEventLoop)
            assert type(loop) is not NoReaderLoop
    finally:
        loop.close()
