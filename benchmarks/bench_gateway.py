"""The cost of the emulator's Capture gateway: receive throughput through it against straight to Mosquitto.

A persistent session is registered and left; N realistic raw-tree messages are published at QoS 0
straight to the broker, which queues them for the session; the consumer (capture-mqtt, iterating the
subscription) comes back either through the gateway or straight to Mosquitto and drains them. Rates are
messages per second from the first message to the last; medians of BENCH_REPEATS runs (default 5), the
two paths alternating within one run against one broker.

    .venv/bin/python benchmarks/bench_gateway.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import COMPANY, FILTER, make_messages  # noqa: E402

MESSAGES = int(os.environ.get("BENCH_MESSAGES", "100000"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))


def drain(publish_port: int, consume_port: int, messages: list[tuple[str, bytes]]) -> float:
    import capture_mqtt as cm

    session = f"bench-gateway-{os.getpid()}"
    options = {"transport": "mqtt", "client_id": session, "clean_session": False, "company": COMPANY}
    with cm.Client("127.0.0.1", port=consume_port, connect=False, **options) as client:  # type: ignore[arg-type]
        client.subscribe(FILTER)
        client.connect()
    with cm.Client("127.0.0.1", transport="mqtt", port=publish_port) as publisher:
        for topic, payload in messages:
            publisher.publish(topic, payload, qos=0)
        publisher.publish("bench/flush", b"", qos=1)  # acknowledged after every QoS 0 one before it
    with cm.Client("127.0.0.1", port=consume_port, connect=False, **options) as client:  # type: ignore[arg-type]
        sub = client.subscribe(FILTER, decode="raw", queue_size=100_000)
        client.connect()
        first = sub.get(timeout=30)
        assert first is not None, "the backlog did not arrive"
        started = time.perf_counter()
        for count, _ in enumerate(sub, start=2):
            if count == len(messages):
                break
        return len(messages) / (time.perf_counter() - started)


def main() -> int:
    from capture_mqtt import _core
    from capture_mqtt.testing import UNLIMITED, Mosquitto

    messages = make_messages(MESSAGES)
    rates: dict[str, list[float]] = {"direct": [], "gateway": []}
    with Mosquitto(anonymous=True, tls=False, websockets=False, limits=UNLIMITED) as broker:
        gateway = _core._Gateway(broker.mqtt_port, max_packet=1024 * 1024)
        try:
            for _ in range(REPEATS):
                rates["direct"].append(drain(broker.mqtt_port, broker.mqtt_port, messages))
                rates["gateway"].append(drain(broker.mqtt_port, gateway.port, messages))
        finally:
            gateway.stop()
    direct, through = statistics.median(rates["direct"]), statistics.median(rates["gateway"])
    print(f"gateway cost: {MESSAGES:,} raw-tree messages drained at QoS 0, median of {REPEATS}, one Mosquitto")
    print(f"{'straight to Mosquitto':32} {direct:>10,.0f} msg/s")
    print(f"{'through the Capture gateway':32} {through:>10,.0f} msg/s  ({through / direct:.0%} of straight)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
