"""The interoperability scenarios: each runs once with this SDK and once with paho-mqtt, the
control, against one broker, bounded in time, and returns a :class:`Cell` (passed, failed, or not
applicable to that broker, with what was seen)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import capture_mqtt as cm
from capture_mqtt.testing import wait_until

from .brokers import Broker

Client = Literal["sdk", "paho"]
COMPANY = "Interop"
#: Messages per stream (INTEROP_MESSAGES; the issue's 10,000 by default).
MESSAGES = int(os.environ.get("INTEROP_MESSAGES", "10000"))


@dataclass(frozen=True)
class Cell:
    status: Literal["pass", "fail", "n/a"]
    detail: str = ""
    #: The distinct readings that arrived, where a row counts them.
    count: int | None = None


def passed(detail: str = "") -> Cell:
    return Cell("pass", detail)


def failed(detail: str) -> Cell:
    return Cell("fail", detail)


def not_applicable(detail: str) -> Cell:
    return Cell("n/a", detail)


def _topic(name: str, key: str = "K") -> str:
    return cm.raw_topic(COMPANY, name, "C", "M", key)


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


#: A wait for messages ends when none has come for this long (what is lost does not come later).
STALL = 3.0


def _await(progress: Callable[[], int], count: int, budget: float) -> None:
    """Waits until `progress()` reaches `count`, `budget` seconds pass, or nothing more has come
    for `STALL` seconds."""
    deadline = time.monotonic() + budget
    last, since = -1, time.monotonic()
    while (now := time.monotonic()) < deadline:
        done = progress()
        if done >= count:
            return
        if done != last:
            last, since = done, now
        elif now - since > STALL:
            return
        time.sleep(0.02)  # polling a counter that callbacks on paho's thread advance


def _settle(progress: Callable[[], int], quiet: float = 1.0, budget: float = 30.0) -> None:
    """Waits until `progress()` has not changed for `quiet` seconds (copies a broker sends per
    subscription may come after a mark that only one of them matches), or `budget` seconds pass."""
    deadline = time.monotonic() + budget
    last, since = progress(), time.monotonic()
    while (now := time.monotonic()) < deadline and now - since < quiet:
        time.sleep(0.05)  # polling a counter that callbacks on paho's thread advance
        if (done := progress()) != last:
            last, since = done, time.monotonic()


def _budget(count: int) -> float:
    """Seconds allowed to move `count` messages: generous for the slowest broker (amqtt)."""
    return 20.0 + count / 400


# The two clients, side by side


def sdk(broker: Broker, *, v5: bool = False, **options: Any) -> cm.Client:
    options.setdefault("connect_timeout", 10.0)
    options.setdefault("reconnect", cm.Reconnect(min_delay=0.1, max_delay=1.0))
    port = broker.v5_port if v5 else broker.port
    return cm.Client(
        broker.host, transport="mqtt", port=port, account_kind="unknown", protocol=5 if v5 else 3, **options
    )


class Paho:
    """paho-mqtt as a user writes it: loop_start, callbacks, subscriptions made again in
    on_connect (paho does not restore them itself)."""

    def __init__(
        self,
        broker: Broker,
        *,
        client_id: str = "",
        clean_session: bool = True,
        v5: bool = False,
        connect_properties: Properties | None = None,
    ) -> None:
        version = paho.MQTTv5 if v5 else paho.MQTTv311
        # An id of its own: a broker may refuse an empty one (rumqttd does; MQTT-3.1.3-6 and -9 allow it).
        kwargs: dict[str, Any] = {"client_id": client_id or _unique("paho"), "protocol": version}
        if not v5:
            kwargs["clean_session"] = clean_session
        #: MQTT 5: the CONNACK's properties, and the subscription identifiers of each message.
        self.connack: Any = None
        self.sub_ids: list[list[int]] = []
        self.published: list[Any] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, **kwargs)
        self.client.reconnect_delay_set(1, 2)
        self.client.max_inflight_messages_set(100)
        self.lock = threading.Lock()
        self.messages: list[tuple[str, bytes]] = []
        self.filters: list[tuple[str, int]] = []
        self.subacks: list[Any] = []
        self.unsubacks: list[Any] = []
        self.disconnects: list[Any] = []
        self.connects = 0
        self.slow: Callable[[str], float] | None = None
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda _c, _u, _mid, codes, _p: self.subacks.append(codes)
        self.client.on_unsubscribe = lambda _c, _u, _mid, codes, _p: self.unsubacks.append(codes)
        self.client.on_disconnect = lambda _c, _u, _f, reason, _p: self.disconnects.append(reason)
        self.client.on_publish = lambda _c, _u, _mid, reason, _p: self.published.append(reason)
        port = broker.v5_port if v5 else broker.port
        self.client.connect(broker.host, port, keepalive=30, properties=connect_properties)
        self.client.loop_start()
        try:
            wait_until(lambda: self.connects > 0, timeout=10)
        except AssertionError:
            self.close()
            raise

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            return
        self.connack = properties
        self.connects += 1
        if self.filters and self.connects > 1:
            self.client.subscribe(self.filters)

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        if self.slow is not None:
            time.sleep(self.slow(message.topic))  # the slow consumer of the scenario
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload)))
            ids = getattr(message.properties, "SubscriptionIdentifier", []) if message.properties else []
            self.sub_ids.append(ids if isinstance(ids, list) else [ids])

    def subscribe(self, *filters: tuple[str, int], sub_id: int | None = None) -> None:
        before = len(self.subacks)
        self.filters += list(filters)
        properties = None
        if sub_id is not None:
            properties = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
            properties.SubscriptionIdentifier = sub_id
        self.client.subscribe(list(filters), properties=properties)
        wait_until(lambda: len(self.subacks) > before, timeout=10)

    def unsubscribe(self, topic: str) -> None:
        before = len(self.unsubacks)
        self.filters = [f for f in self.filters if f[0] != topic]
        self.client.unsubscribe(topic)
        wait_until(lambda: len(self.unsubacks) > before, timeout=10)

    def publish(self, topic: str, payload: bytes, qos: int) -> Any:
        return self.client.publish(topic, payload, qos=qos)

    def payloads(self, prefix: str = "") -> list[bytes]:
        with self.lock:
            return [p for t, p in self.messages if t.startswith(prefix)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def __enter__(self) -> Paho:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _values(count: int) -> list[bytes]:
    return [cm.field_payload(i) for i in range(count)]


def _sdk_values(items: list[Any]) -> list[int]:
    return [int(p.value) for p in items]


def _paho_values(payloads: list[bytes]) -> list[int]:
    return [int(json.loads(p)["Value"]) for p in payloads]


def _check_sequence(got: list[int], count: int) -> Cell:
    if got == list(range(count)):
        return Cell("pass", f"{count:,} in order", count)
    missing = count - len(set(got))
    doubles = len(got) - len(set(got))
    order = "in order" if got == sorted(got) else "out of order"
    return Cell("fail", f"{len(got):,} of {count:,} ({missing:,} missing, {doubles:,} doubled, {order})", len(set(got)))


# Scenarios


#: How far a paced publisher may run ahead of what its reader has received: under what a broker
#: with Capture's limits holds for a client (32 in flight and 1,000 queued), so that it never drops.
WINDOW = 900


def _paced(publish: Callable[[bytes], object], values: list[bytes], received: Callable[[], int] | None) -> None:
    """Publishes `values`, at most `WINDOW` ahead of `received()` (None: at full speed)."""
    deadline = time.monotonic() + _budget(len(values))
    for i, value in enumerate(values):
        if received is not None and i % 100 == 0:
            while i - received() >= WINDOW and time.monotonic() < deadline:
                time.sleep(0.002)  # polling the reader's counter, which its network thread advances
        publish(value)


def stream(
    broker: Broker,
    client: Client,
    *,
    qos: int,
    way: str = "get",
    count: int = MESSAGES,
    v5: bool = False,
    paced: bool = True,
) -> Cell:
    """`count` readings published and consumed with exact values and order. The publisher is paced
    to what the reader has received (`WINDOW`), so that the broker's queue never overflows: what is
    measured is the client. Unpaced, a burst at full speed: whatever the reader does not take in time
    beyond the broker's queue is dropped by the broker. Under MQTT 5 both clients also keep to the
    receive maximum of the other side: no disconnect."""
    if v5 and not broker.mqtt5:
        return not_applicable("MQTT 3.1.1 only")
    topic = _topic(_unique("stream"))
    values = _values(count)
    if client == "paho":
        with Paho(broker, v5=v5) as reader, Paho(broker, v5=v5) as writer:
            reader.subscribe((topic, qos))
            _paced(lambda v: writer.publish(topic, v, qos), values, (lambda: len(reader.messages)) if paced else None)
            _await(lambda: len(reader.payloads()), count, _budget(count))
            cell = _check_sequence(_paho_values(reader.payloads()), count)
            return _with_disconnects(cell, reader.disconnects + writer.disconnects, _receive_maximum(writer))
    if way == "async for":
        return asyncio.run(_stream_async(broker, topic, qos, values, paced=paced))
    events: list[cm.ConnectionEvent] = []
    with sdk(broker, v5=v5) as sdk_reader, sdk(broker, v5=v5) as sdk_writer:
        sdk_reader.on_event(events.append)
        sdk_writer.on_event(events.append)
        sub = sdk_reader.subscribe(topic, qos=qos)
        received = (lambda: int(sdk_reader.stats["received"])) if paced else None
        _paced(lambda v: sdk_writer.publish(topic, v, qos=qos, wait=False), values, received)
        got = list(_consume(sub, way, count, _budget(count)))
        return _with_disconnects(_check_sequence(got, count), [e.reason for e in events if e.kind == "disconnected"])


def _receive_maximum(peer: Paho) -> str:
    value = getattr(peer.connack, "ReceiveMaximum", None) if peer.connack else None
    return f"; the broker's receive maximum {value}" if value else ""


def _with_disconnects(cell: Cell, disconnects: list[Any], note: str = "") -> Cell:
    if cell.status == "pass" and disconnects:
        return failed(f"{cell.detail}, but disconnected: {disconnects[:3]}")
    return Cell(cell.status, cell.detail + note)


def _consume(sub: Any, way: str, count: int, budget: float) -> Iterator[int]:
    deadline = time.monotonic() + budget
    taken = 0
    if way == "get":
        while taken < count and (left := deadline - time.monotonic()) > 0:
            point = sub.get(timeout=min(left, STALL))
            if point is None:
                return
            taken += 1
            yield int(point.value)
    elif way == "iterator":
        # The iterator has no timeout of its own: the subscription is closed at the deadline.
        watchdog = threading.Timer(budget, sub.close)
        watchdog.start()
        try:
            for point in sub:
                taken += 1
                yield int(point.value)
                if taken >= count:
                    return
        finally:
            watchdog.cancel()
    elif way == "batches":
        while taken < count and time.monotonic() < deadline:
            batch = sub.batch(max_rows=count - taken, timeout=1.0)
            column = batch.to_pandas()["value"].tolist() if len(batch) else []
            taken += len(column)
            yield from (int(v) for v in column)


async def _stream_async(broker: Broker, topic: str, qos: int, values: list[bytes], *, paced: bool) -> Cell:
    count = len(values)
    async with cm.AsyncClient(
        broker.host, transport="mqtt", port=broker.port, account_kind="unknown", connect_timeout=10
    ) as reader:
        sub = await reader.subscribe(topic, qos=qos)
        with sdk(broker) as writer:
            # The reader receives in its network thread whatever this loop does (its queue holds
            # 10,000), so the pacing may block the loop.
            received = (lambda: int(reader.stats["received"])) if paced else None
            _paced(lambda v: writer.publish(topic, v, qos=qos, wait=False), values, received)
            got: list[int] = []

            async def take() -> None:
                async for point in sub:
                    got.append(int(point.value))  # type: ignore[union-attr]  # a raw-tree filter: DataPoints
                    if len(got) >= count:
                        return

            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(take(), _budget(count))
        return _check_sequence(got, count)


def persistent_backlog(broker: Broker, client: Client, *, declared_first: bool, count: int = 500) -> Cell:
    """A persistent session keeps what is published while its client is away; the client comes
    back declaring its subscription before connecting, or after."""
    client_id = _unique("keeper")
    topic = _topic(client_id)
    values = _values(count)
    if client == "paho":
        with Paho(broker, client_id=client_id, clean_session=False) as first:
            first.subscribe((topic, 1))
        with Paho(broker) as writer:
            for value in values:
                writer.publish(topic, value, 1).wait_for_publish(10)
        # paho has nothing to declare before connecting: its on_message takes what comes.
        with Paho(broker, client_id=client_id, clean_session=False) as back:
            if not declared_first:
                back.subscribe((topic, 1))
            _await(lambda: len(back.payloads()), count, _budget(count))
            return _check_sequence(_paho_values(back.payloads()), count)
    with sdk(broker, client_id=client_id, clean_session=False) as first:
        first.subscribe(topic, qos=1)  # kept by the session
    with sdk(broker) as sdk_writer:
        for value in values:
            sdk_writer.publish(topic, value, qos=1)
    returning = sdk(broker, client_id=client_id, clean_session=False, connect=not declared_first)
    with returning:
        sub = returning.subscribe(topic, qos=1)
        if declared_first:
            returning.connect()
        return _check_sequence(list(_consume(sub, "get", count, _budget(count))), count)


def _each_got_all(subs: list[Any], count: int) -> Cell:
    """Each SDK subscription got exactly `count` readings, and nothing more."""
    counts = [sum(1 for _ in _consume(sub, "get", count, _budget(count))) for sub in subs]
    more = any(sub.get(timeout=0.5) is not None for sub in subs)
    if counts == [count] * len(subs) and not more:
        return passed(f"each subscription got all {count}")
    return failed(f"the subscriptions got {counts} of {count}" + (" and more" if more else ""))


def overlapping(broker: Broker, client: Client, *, mixed_qos: bool, count: int = 200, v5: bool = False) -> Cell:
    """Two overlapping subscriptions, the same reading `count` times: each subscription gets every
    one (a broker may send one copy per matching subscription, or one in all). Under MQTT 5 each
    subscription has an identifier, and each message names the subscriptions it matched."""
    if v5 and not broker.mqtt5:
        return not_applicable("MQTT 3.1.1 only")
    name = _unique("overlap")
    topic = _topic(name)
    wide, narrow = cm.raw_filter(COMPANY, name), topic
    qos_wide, qos_narrow = (0, 1) if mixed_qos else (1, 1)
    reading = cm.field_payload(42)
    if client == "paho":
        with Paho(broker, v5=v5) as reader, Paho(broker, v5=v5) as writer:
            if v5:
                reader.subscribe((wide, qos_wide), sub_id=1)
                reader.subscribe((narrow, qos_narrow), sub_id=2)
            else:
                reader.subscribe((wide, qos_wide), (narrow, qos_narrow))
            for _ in range(count):
                writer.publish(topic, reading, 1)
            writer.publish(_topic(name, "end"), reading, 1).wait_for_publish(10)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: any(True for t, _ in reader.messages if t.endswith("/end")), timeout=20)
            _settle(lambda: len(reader.messages))
            with reader.lock:
                messages, sub_ids = list(reader.messages), list(reader.sub_ids)
            copies = len([t for t, _ in messages if t == topic])
            if v5:
                # Each copy names the subscriptions it is for: a program can route by them.
                per_id = {1: 0, 2: 0}
                for (message_topic, _), ids in zip(messages, sub_ids, strict=True):
                    for sub_id in ids if message_topic == topic else []:
                        per_id[sub_id] = per_id.get(sub_id, 0) + 1
                detail = f"{copies} copies, by subscription identifier {per_id[1]} / {per_id[2]}"
                return passed(detail) if per_id == {1: count, 2: count} else failed(detail)
            # paho has no routing of its own: one callback per copy the broker sent.
            if copies >= count:
                return passed(f"{copies} copies of {count} readings")
            return failed(f"{copies} copies of {count} readings")
    with sdk(broker, v5=v5) as sdk_reader, sdk(broker, v5=v5) as sdk_writer:
        subs = [sdk_reader.subscribe(wide, qos=qos_wide), sdk_reader.subscribe(narrow, qos=qos_narrow)]
        for _ in range(count):
            sdk_writer.publish(topic, reading, qos=1, wait=False)
        return _each_got_all(subs, count)


def resubscribe_higher_qos(broker: Broker, client: Client, *, count: int = 200) -> Cell:
    """The same filter subscribed at QoS 0, then again at QoS 1: the second subscription replaces
    the first (MQTT-3.8.4-3), so each message comes once. With the SDK, two subscriptions of one
    filter at different QoS: it subscribes the filter at the broker again at the higher QoS."""
    name = _unique("again")
    topic, end = _topic(name), _topic(name, "end")
    wide = cm.raw_filter(COMPANY, name)
    reading = cm.field_payload(3)
    if client == "paho":
        with Paho(broker) as reader, Paho(broker) as writer:
            reader.subscribe((wide, 0))
            reader.subscribe((wide, 1))
            for _ in range(count):
                writer.publish(topic, reading, 1)
            writer.publish(end, reading, 1).wait_for_publish(10)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: any(True for t, _ in reader.messages if t == end), timeout=20)
            _settle(lambda: len(reader.messages))
            copies = len([t for t, _ in reader.messages if t == topic])
            detail = f"{copies} copies of {count} readings"
            return passed(detail) if copies == count else failed(detail)
    with sdk(broker) as sdk_reader, sdk(broker) as sdk_writer:
        subs = [sdk_reader.subscribe(wide, qos=0), sdk_reader.subscribe(wide, qos=1)]
        for _ in range(count):
            sdk_writer.publish(topic, reading, qos=1, wait=False)
        return _each_got_all(subs, count)


def puback_order(broker: Broker, client: Client, *, count: int = 300) -> Cell:
    """Two QoS 1 subscriptions that do not overlap, read at different speeds: acknowledgements in
    the order the broker expects (in order of arrival), nothing lost, no disconnect."""
    name = _unique("order")
    slow_topic, fast_topic = _topic(name, "slow"), _topic(name, "fast")
    values = _values(count)
    if client == "paho":
        with Paho(broker) as reader, Paho(broker) as writer:
            reader.slow = lambda t: 0.002 if t.endswith("slow") else 0.0
            reader.subscribe((slow_topic, 1), (fast_topic, 1))
            for value in values:
                writer.publish(slow_topic, value, 1)
                writer.publish(fast_topic, value, 1)
            _await(lambda: len(reader.payloads()), 2 * count, _budget(2 * count))
            slow_values = _paho_values([p for t, p in reader.messages if t == slow_topic])
            fast_values = _paho_values([p for t, p in reader.messages if t == fast_topic])
            if slow_values == fast_values == list(range(count)) and not reader.disconnects:
                return passed(f"2 x {count}, no disconnect")
            return failed(f"{len(slow_values)} + {len(fast_values)} of 2 x {count}, disconnects: {reader.disconnects}")
    events: list[cm.ConnectionEvent] = []
    with sdk(broker) as sdk_reader, sdk(broker) as sdk_writer:
        sdk_reader.on_event(events.append)
        slow_sub = sdk_reader.subscribe(slow_topic, qos=1, queue_size=10)
        fast_sub = sdk_reader.subscribe(fast_topic, qos=1)
        slow: list[int] = []

        def read_slowly() -> None:  # its own consumer thread, as a program would have it
            for point in _consume(slow_sub, "get", count, _budget(count)):
                slow.append(point)
                time.sleep(0.002)  # the slow consumer of the scenario

        slow_reader = threading.Thread(target=read_slowly)
        slow_reader.start()
        for value in values:
            sdk_writer.publish(slow_topic, value, qos=1, wait=False)
            sdk_writer.publish(fast_topic, value, qos=1, wait=False)
        fast = list(_consume(fast_sub, "get", count, _budget(count)))
        slow_reader.join()
        dropped = [e.reason for e in events if e.kind == "disconnected"]
        if slow == fast == list(range(count)) and not dropped:
            return passed(f"2 x {count}, no disconnect")
        return failed(f"{len(slow)} + {len(fast)} of 2 x {count}, disconnects: {dropped}")


def publishing(broker: Broker, client: Client, *, qos: int, count: int = MESSAGES) -> Cell:
    """`count` publishes by the client under test, counted by one subscriber that keeps up: this
    SDK at QoS 1 (a paho subscriber falls behind a fast publisher and a broker with a queue limit
    drops what it has not read, which would blame the publisher)."""
    topic = _topic(_unique("publish"))
    values = _values(count)
    with sdk(broker) as control, control.subscribe(topic, qos=1) as received:
        with contextlib.ExitStack() as stack:
            if client == "paho":
                paho_writer = stack.enter_context(Paho(broker))
                for value in values:
                    paho_writer.publish(topic, value, qos)
            else:
                writer = stack.enter_context(sdk(broker))
                for value in values:
                    writer.publish(topic, value, qos=qos, wait=False)
            # The writer stays connected while the control reads.
            got = list(_consume(received, "get", count, _budget(count)))
        return _check_sequence(got, count)


def large_payloads(broker: Broker, client: Client, *, count: int = 5) -> Cell:
    """256 KiB payloads both ways, intact."""
    topic = f"interop/{_unique('large')}"
    payloads = [bytes([i]) * (256 * 1024) for i in range(count)]
    if client == "paho":
        with Paho(broker) as peer:
            peer.subscribe((topic, 1))
            for payload in payloads:
                peer.publish(topic, payload, 1).wait_for_publish(20)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: len(peer.payloads()) >= count, timeout=30)
            got = peer.payloads()
    else:
        with sdk(broker) as sdk_peer, sdk_peer.subscribe(topic, qos=1, decode="bytes") as sub:
            for payload in payloads:
                sdk_peer.publish(topic, payload, qos=1)
            got = [m.payload for m in (sub.get(timeout=30) for _ in payloads) if m is not None]
    if got == payloads:
        return passed(f"{count} x 256 KiB")
    return failed(f"{len(got)} of {count} intact: {[len(g) for g in got]}")


def oversize(broker: Broker, client: Client) -> Cell:
    """A publish over the broker's packet limit: refused (an error, or the broker's disconnect),
    and the client goes on."""
    limit = broker.max_packet_size
    if limit is None:
        return not_applicable("no packet limit")
    topic = f"interop/{_unique('big')}"
    after = f"interop/{_unique('after')}"
    if client == "paho":
        with Paho(broker) as peer:
            peer.subscribe((after, 1))
            peer.publish(topic, b"x" * (limit + 1024), 1)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: peer.disconnects, timeout=10)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: peer.connects > 1 and peer.client.is_connected(), timeout=10)
            peer.publish(after, b"ok", 1)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: peer.payloads(after) == [b"ok"], timeout=10)
            if peer.payloads(after) == [b"ok"]:
                return passed("disconnected by the broker, went on after reconnecting")
            return failed(f"disconnects {peer.disconnects}, then nothing")
    with sdk(broker, max_packet_size=4 * limit) as sdk_peer, sdk_peer.subscribe(after, qos=1, decode="bytes") as sub:
        refusal = ""
        try:
            sdk_peer.publish(topic, b"x" * (limit + 1024), qos=1, timeout=10)
        except cm.CaptureError as err:
            refusal = type(err).__name__
        sdk_peer.publish(after, b"ok", qos=1, timeout=20)
        message = sub.get(timeout=10)
        if refusal and message is not None and message.payload == b"ok":
            return passed(f"{refusal}, then went on")
        return failed(f"refusal: {refusal or 'none'}; afterwards: {message}")


def unsubscribe(broker: Broker, client: Client) -> Cell:
    """After an unsubscribe, nothing more arrives for that filter; another subscription goes on."""
    name = _unique("unsub")
    gone, kept = _topic(name, "gone"), _topic(name, "kept")
    reading = cm.field_payload(1)
    if client == "paho":
        with Paho(broker) as peer:
            peer.subscribe((gone, 1), (kept, 1))
            peer.unsubscribe(gone)
            peer.publish(gone, reading, 1)
            peer.publish(kept, reading, 1)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: peer.payloads(kept), timeout=10)
            late = [t for t, _ in peer.messages if t == gone]
            return passed() if peer.payloads(kept) and not late else failed(f"after unsubscribe: {late}")
    with sdk(broker) as sdk_peer:
        gone_sub = sdk_peer.subscribe(gone, qos=1)
        kept_sub = sdk_peer.subscribe(kept, qos=1)
        gone_sub.close()
        sdk_peer.publish(gone, reading, qos=1)
        sdk_peer.publish(kept, reading, qos=1)
        got = kept_sub.get(timeout=10)
        stats = sdk_peer.stats
        if got is not None and not stats.get("unrouted", 0):
            return passed()
        return failed(f"kept: {got}; stats {stats}")


def restart(broker: Broker, client: Client, *, count: int = 400) -> Cell:
    """The broker restarts mid-stream (QoS 1). Where it keeps sessions, every reading arrives;
    where it does not, every reading published once the reader is back (its subscription made
    again: by the SDK itself, by paho in on_connect) arrives."""
    client_id = _unique("restart")
    topic, ready = _topic(client_id), _topic(client_id, "ready")
    wide = cm.raw_filter(COMPANY, client_id)
    values = _values(count)
    half = count // 2
    clean = not broker.durable_sessions
    if client == "paho":
        with (
            Paho(broker, client_id=client_id, clean_session=clean) as reader,
            Paho(broker, client_id=client_id + "-w", clean_session=clean) as writer,
        ):
            reader.subscribe((wide, 1))
            for value in values[:half]:
                writer.publish(topic, value, 1)
            _await(lambda: len(reader.payloads(topic)), half // 2, _budget(count))
            broker.restart()
            _until_back(lambda: writer.publish(ready, b"{}", 1), lambda: bool(reader.payloads(ready)))
            for value in values[half:]:
                writer.publish(topic, value, 1)
            _await(lambda: len(set(reader.payloads(topic))), count, _budget(count))
            return _restart_cell(_paho_values(reader.payloads(topic)), count, broker.durable_sessions)
    with (
        sdk(broker, client_id=client_id, clean_session=clean) as sdk_reader,
        sdk(broker, client_id=client_id + "-w", clean_session=clean) as sdk_writer,
    ):
        sub = sdk_reader.subscribe(wide, qos=1, decode="bytes")
        got: list[int] = []

        def take(limit: float) -> None:
            while len(set(got)) < count and (message := sub.get(timeout=limit)) is not None:
                if message.topic == topic:  # not one of the ready marks
                    got.append(_paho_values([message.payload])[0])
                    limit = min(limit, STALL)

        for value in values[:half]:
            sdk_writer.publish(topic, value, qos=1, wait=False)
        # As for paho: the restart comes once the reader has a quarter.
        _await(lambda: int(sdk_reader.stats["received"]), half // 2, _budget(count))
        broker.restart()
        _until_back(
            lambda: sdk_writer.publish(ready, b"{}", qos=1, wait=False), lambda: _drain_until_ready(sub, topic, got)
        )
        for value in values[half:]:
            sdk_writer.publish(topic, value, qos=1, wait=False)
        take(_budget(count))
        return _restart_cell(got, count, broker.durable_sessions)


def _drain_until_ready(sub: Any, topic: str, got: list[int]) -> bool:
    """Takes what arrived; True once the ready mark is among it."""
    while (message := sub.get(timeout=0.3)) is not None:
        if message.topic != topic:
            return True
        got.append(_paho_values([message.payload])[0])
    return False


def _until_back(mark: Callable[[], object], seen: Callable[[], bool], budget: float = 30.0) -> None:
    """Publishes a ready mark until the reader sees one: both are back, and subscribed."""
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        mark()
        if wait_until_or_none(seen, 0.5):
            return


def wait_until_or_none(condition: Callable[[], bool], timeout: float) -> bool:
    with contextlib.suppress(AssertionError):
        return bool(wait_until(condition, timeout=timeout))
    return False


def _restart_cell(got: list[int], count: int, durable: bool) -> Cell:
    unique = set(got)
    doubles = len(got) - len(unique)
    again = f" ({doubles} sent again, QoS 1)" if doubles else ""
    if unique == set(range(count)):
        return passed(f"all {count}{again}")
    after = set(range(count // 2, count))
    if not durable and after <= unique:
        lost = count // 2 - len(unique & set(range(count // 2)))
        return passed(f"every reading after the restart; {lost} of the first half lost with the broker's memory{again}")
    return failed(f"{len(unique)} of {count} readings ({len(after - unique)} of those after the restart missing)")


def shared(broker: Broker, client: Client, *, count: int = 1000) -> Cell:
    """A shared subscription ($share/group/...) split between two clients: every reading once."""
    if not broker.shared_subscriptions:
        return not_applicable("no shared subscriptions")
    name = _unique("shared")
    topic = _topic(name)
    group = f"$share/{name}/{topic}"
    values = _values(count)
    if client == "paho":
        with Paho(broker) as one, Paho(broker) as two, Paho(broker) as writer:
            one.subscribe((group, 1))
            two.subscribe((group, 1))
            for value in values:
                writer.publish(topic, value, 1)
            _await(lambda: len(one.payloads()) + len(two.payloads()), count, _budget(count))
            got = _paho_values(one.payloads() + two.payloads())
            split = (len(one.payloads()), len(two.payloads()))
    else:
        with sdk(broker) as sdk_one, sdk(broker) as sdk_two, sdk(broker) as sdk_writer:
            subs = [sdk_one.subscribe(group, qos=1), sdk_two.subscribe(group, qos=1)]
            for value in values:
                sdk_writer.publish(topic, value, qos=1, wait=False)
            deadline = time.monotonic() + _budget(count)
            taken: list[list[int]] = [[], []]
            while sum(map(len, taken)) < count and time.monotonic() < deadline:
                for i, sub in enumerate(subs):
                    point = sub.get(timeout=0.05)
                    if point is not None:
                        taken[i].append(int(point.value))  # type: ignore[union-attr]  # raw tree: DataPoints
            got = taken[0] + taken[1]
            split = (len(taken[0]), len(taken[1]))
    if sorted(got) == list(range(count)) and min(split) > 0:
        return passed(f"split {split[0]} / {split[1]}")
    return failed(f"{len(got)} of {count}, split {split}")


def v5_broker_packet_limit(broker: Broker, client: Client) -> Cell:
    """MQTT 5: the broker's Maximum Packet Size (CONNACK) is kept by the client: a larger publish
    fails in the client, before it is sent, and the connection stays up. (The SDK is given a
    larger limit of its own, so that only the broker's stops it.)"""
    if not broker.mqtt5:
        return not_applicable("MQTT 3.1.1 only")
    with Paho(broker, v5=True) as probe:
        limit = getattr(probe.connack, "MaximumPacketSize", None)
    if limit is None:
        return not_applicable("the broker advertises no Maximum Packet Size")
    topic, after = f"interop/{_unique('big')}", f"interop/{_unique('after')}"
    big = b"x" * (limit + 1024)
    if client == "paho":
        with Paho(broker, v5=True) as peer:
            peer.subscribe((after, 1))
            info = peer.publish(topic, big, 1)
            peer.publish(after, b"ok", 1)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: peer.payloads(after) == [b"ok"], timeout=10)
            seen = f"the broker's limit {limit}; publish rc {info.rc}; disconnects {peer.disconnects}"
            if peer.payloads(after) == [b"ok"] and not peer.disconnects and info.rc != 0:
                return passed(f"refused in the client ({seen})")
            return failed(seen)
    events: list[cm.ConnectionEvent] = []
    with (
        sdk(broker, v5=True, max_packet_size=4 * limit) as sdk_peer,
        sdk_peer.subscribe(after, qos=1, decode="bytes") as sub,
    ):
        sdk_peer.on_event(events.append)
        refusal = ""
        try:
            sdk_peer.publish(topic, big, qos=1, timeout=10)
        except (cm.CaptureError, ValueError) as err:
            refusal = f"{type(err).__name__}: {err}"
        sdk_peer.publish(after, b"ok", qos=1, timeout=20)
        message = sub.get(timeout=10)
        dropped = [e.reason for e in events if e.kind == "disconnected"]
        if refusal and message is not None and message.payload == b"ok" and not dropped:
            return passed(f"refused in the client ({refusal[:80]})")
        return failed(f"refusal: {refusal or 'none'}; disconnects {dropped}; afterwards: {message}")


def v5_client_packet_limit(broker: Broker, client: Client, *, limit: int = 64 * 1024) -> Cell:
    """MQTT 5: the client's own Maximum Packet Size (CONNECT) is kept by the broker: a larger
    message is not sent to it (MQTT-3.1.2-25) and what follows arrives."""
    if not broker.mqtt5:
        return not_applicable("MQTT 3.1.1 only")
    name = _unique("small")
    big_topic, small_topic, wide = f"interop/{name}/big", f"interop/{name}/small", f"interop/{name}/#"
    with sdk(broker) as writer:
        if client == "paho":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.MaximumPacketSize = limit
            with Paho(broker, v5=True, connect_properties=properties) as paho_reader:
                paho_reader.subscribe((wide, 1))
                writer.publish(big_topic, b"x" * (2 * limit), qos=1)
                writer.publish(small_topic, b"ok", qos=1)
                with contextlib.suppress(AssertionError):
                    wait_until(lambda: paho_reader.payloads(small_topic), timeout=10)
                got = [(t.rsplit("/", 1)[1], len(m)) for t, m in paho_reader.messages]
                disconnects = list(paho_reader.disconnects)
        else:
            events: list[cm.ConnectionEvent] = []
            with sdk(broker, v5=True, max_packet_size=limit) as reader, reader.subscribe(wide, decode="bytes") as sub:
                reader.on_event(events.append)
                writer.publish(big_topic, b"x" * (2 * limit), qos=1)
                writer.publish(small_topic, b"ok", qos=1)
                messages = []
                while (message := sub.get(timeout=5)) is not None:
                    messages.append(message)
                    if message.topic == small_topic:
                        break
                got = [(m.topic.rsplit("/", 1)[1], len(m.payload)) for m in messages]
                disconnects = [e.reason for e in events if e.kind == "disconnected"]
    if got == [("small", 2)] and not disconnects:
        return passed("the larger message was not sent; the next one came")
    return failed(f"received {got}; disconnects {disconnects}")


def v5_success_codes(broker: Broker, client: Client) -> Cell:
    """MQTT 5: reason codes under 0x80 are successes. A QoS 1 publish nobody subscribes to may be
    acknowledged with 0x10 (no matching subscribers); a QoS 2 subscription may be granted a lower
    QoS. Neither is an error, and messages flow."""
    if not broker.mqtt5:
        return not_applicable("MQTT 3.1.1 only")
    name = _unique("codes")
    nobody, topic = f"interop/{name}/nobody", f"interop/{name}/flow"
    if client == "paho":
        with Paho(broker, v5=True) as peer:
            peer.publish(nobody, b"x", 1).wait_for_publish(10)
            puback = peer.published[-1] if peer.published else None
            peer.subscribe((topic, 2))
            granted = peer.subacks[-1][0]
            peer.publish(topic, b"ok", 1)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: peer.payloads(topic), timeout=10)
            seen = f"PUBACK {puback}, SUBACK {granted}"
            ok = puback is not None and not puback.is_failure and not granted.is_failure and peer.payloads(topic)
            return passed(seen) if ok else failed(seen)
    with sdk(broker, v5=True) as sdk_peer:
        try:
            sdk_peer.publish(nobody, b"x", qos=1, timeout=10)
            sub = sdk_peer.subscribe(topic, qos=2, decode="bytes")
        except cm.CaptureError as err:
            return failed(f"{type(err).__name__}: {err}")
        sdk_peer.publish(topic, b"ok", qos=1)
        message = sub.get(timeout=10)
        if message is not None and message.payload == b"ok":
            return passed("the publish succeeded, the subscription was made, the message came")
        return failed(f"nothing came: {message}")


Scenario = Callable[[Broker, Client], Cell]


def run_cell(scenario: Scenario, broker: Broker, client: Client) -> Cell:
    """One cell: a scenario that raises is a failed cell, not a dead run."""
    try:
        return scenario(broker, client)
    except Exception as err:
        return failed(f"{type(err).__name__}: {err}"[:200])


#: The rows of the table: a name, and how to run it for one broker and one client.
SCENARIOS: list[tuple[str, Scenario]] = [
    ("stream QoS 0, get", lambda b, c: stream(b, c, qos=0, way="get")),
    ("stream QoS 1, get", lambda b, c: stream(b, c, qos=1, way="get")),
    ("stream QoS 1, iterator", lambda b, c: stream(b, c, qos=1, way="iterator")),
    ("stream QoS 1, async for", lambda b, c: stream(b, c, qos=1, way="async for")),
    ("stream QoS 1, batches", lambda b, c: stream(b, c, qos=1, way="batches")),
    ("a QoS 1 burst at full speed", lambda b, c: stream(b, c, qos=1, paced=False)),
    ("persistent session, subscription declared first", lambda b, c: persistent_backlog(b, c, declared_first=True)),
    ("persistent session, subscribe after connecting", lambda b, c: persistent_backlog(b, c, declared_first=False)),
    ("overlapping subscriptions, repeated readings", lambda b, c: overlapping(b, c, mixed_qos=False)),
    ("overlapping subscriptions, mixed QoS", lambda b, c: overlapping(b, c, mixed_qos=True)),
    ("the same filter subscribed again at a higher QoS", resubscribe_higher_qos),
    ("two QoS 1 subscriptions read at different speeds", puback_order),
    ("publishing, QoS 0", lambda b, c: publishing(b, c, qos=0)),
    ("publishing, QoS 1", lambda b, c: publishing(b, c, qos=1)),
    ("256 KiB payloads both ways", large_payloads),
    ("a publish over the broker's packet limit", oversize),
    ("unsubscribe", unsubscribe),
    ("broker restart mid-stream", restart),
    ("shared subscription", shared),
    ("MQTT 5: stream QoS 1 within the receive maximum", lambda b, c: stream(b, c, qos=1, v5=True)),
    ("MQTT 5: subscription identifiers", lambda b, c: overlapping(b, c, mixed_qos=False, v5=True)),
    ("MQTT 5: the broker's maximum packet size", v5_broker_packet_limit),
    ("MQTT 5: the client's maximum packet size", v5_client_packet_limit),
    ("MQTT 5: success reason codes (0x10, granted QoS)", v5_success_codes),
]

#: Rows whose outcome depends on speed: a burst at full speed through a broker's queue loses what
#: the reader did not take in time, whatever the client. There the SDK must get at least as many
#: readings as paho, not all of them.
MEASURED = {"a QoS 1 burst at full speed"}

#: Cells where the SDK fails for what the broker does, with the explanation and the section of the
#: specification it departs from; the table prints them, and neither `make interop` nor the tests
#: count them as the SDK's failures (the tests check that they still fail, so that the list stays
#: true).
KNOWN: dict[tuple[str, str], str] = {
    ("amqtt", "persistent session, subscription declared first"): (
        "amqtt 0.12 keeps no session for a client without a username, so nothing is kept while it is away "
        "(MQTT 3.1.1 section 3.1.2.4: the server keeps the session of a client that asked for one, MQTT-3.1.2-4, "
        "and stores its QoS 1 and 2 messages while it is away, MQTT-3.1.2-5); paho fails too"
    ),
    ("amqtt", "persistent session, subscribe after connecting"): (
        "as above: amqtt keeps no session for a client without a username (MQTT-3.1.2-4, -5); paho fails too"
    ),
    ("RabbitMQ", "the same filter subscribed again at a higher QoS"): (
        "RabbitMQ 3.10 keeps the QoS 0 subscription beside the QoS 1 one that should replace it, so every "
        "message comes twice (MQTT 3.1.1 section 3.8.4, MQTT-3.8.4-3); paho fails too"
    ),
    ("RabbitMQ", "overlapping subscriptions, mixed QoS"): (
        "the SDK subscribes the wider filter at QoS 0, then again at QoS 1 when the narrower QoS 1 subscription "
        "comes; RabbitMQ 3.10 keeps the QoS 0 subscription beside the new one, so every message comes twice "
        "(MQTT 3.1.1 section 3.8.4, MQTT-3.8.4-3: a SUBSCRIBE for an existing filter replaces that subscription). "
        "Each subscription gets every reading, and some twice (QoS 1 is at least once); paho, subscribing both "
        "filters at once, gets one copy per filter"
    ),
}
