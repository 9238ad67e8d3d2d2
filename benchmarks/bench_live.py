"""Live behaviour at a steady rate: publish-to-callback latency, and a consumer that is too slow.

Latency: one publisher process sends realistic raw-tree messages at a steady 2,000 per second, each
carrying its send time (a ``SentNs`` tag); the subscriber under test (paho-mqtt with json.loads,
capture-mqtt with a callback or an iterator, aiomqtt and capture-mqtt with ``async for``) records
``now - SentNs`` for every message it hands to user code. p50 and p99 per client, same broker, one run.

Slow consumer: the publisher sends at 10x what the consumer handles, for a while; the subscriber's RSS
is sampled every second. capture-mqtt's queue is bounded (``overflow="drop_oldest"``), so its RSS must
stay flat and its drops are counted; paho-mqtt is shown beside it.

    python benchmarks/bench_live.py
    BENCH_LATENCY_MESSAGES=4000 BENCH_SLOW_SECONDS=10 python benchmarks/bench_live.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import COMPANY, FILTER, make_messages  # noqa: E402 - the benchmarks folder is not a package

RATE = 2_000
LATENCY_MESSAGES = int(os.environ.get("BENCH_LATENCY_MESSAGES", "10000"))
SLOW_SECONDS = float(os.environ.get("BENCH_SLOW_SECONDS", "20"))
SLOW_RATE = 20_000  # messages per second published; the consumer takes 2,000
RESULTS = HERE / "results"

LATENCY = {
    "paho": "paho-mqtt + json.loads, callback",
    "cm_callback": "capture-mqtt, callback",
    "cm_iter": "capture-mqtt, sync iterator",
    "aiomqtt": "aiomqtt + json.loads, async for",
    "cm_async": "capture-mqtt, async for",
}
LATENCY_BASELINE = {"cm_callback": "paho", "cm_iter": "paho", "cm_async": "aiomqtt"}
SLOW = {"paho_slow": "paho-mqtt, consumer 10x too slow", "cm_slow": "capture-mqtt, consumer 10x too slow"}


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def stamped(topic: str, payload: bytes) -> bytes:
    body = json.loads(payload)
    body["Tags"]["SentNs"] = str(time.time_ns())
    return json.dumps(body).encode()


# Children


def publisher(port: int, count: int, rate: float) -> None:
    """Publishes `count` messages at a steady `rate`, stamping each just before it is sent. It uses
    capture-mqtt's client, whose writes happen on its own network thread at once: with paho-mqtt's
    loop thread competing for the interpreter lock, the publisher itself added up to 20 ms."""
    import capture_mqtt as cm

    messages = make_messages(min(count, 50_000))
    with cm.Client("127.0.0.1", transport="mqtt", port=port) as client:
        started = time.perf_counter()
        for i in range(count):
            due = started + i / rate
            while (left := due - time.perf_counter()) > 0:
                time.sleep(min(left, 0.001))
            topic, payload = messages[i % len(messages)]
            client.publish(topic, stamped(topic, payload), qos=0, wait=False)
        client.publish(f"v1/raw/{COMPANY}/done/x/x/x", b'{"Value": 0, "Tags": {"SentNs": "0"}}', qos=1)


def paho_latency(port: int, note: Callable[[str], None], done: threading.Event) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, m: note(json.loads(m.payload)["Tags"]["SentNs"])
    client.connect("127.0.0.1", port)
    client.subscribe(FILTER)
    client.loop_start()
    time.sleep(0.5)
    print("ready", flush=True)
    done.wait(120)
    client.loop_stop()


def cm_latency(scenario: str, port: int, note: Callable[[str], None], done: threading.Event) -> None:
    import capture_mqtt as cm

    with cm.Client("127.0.0.1", transport="mqtt", port=port) as client:
        if scenario == "cm_callback":
            client.subscribe(FILTER, decode="raw", callback=lambda point: note(point.tags["SentNs"]))
            print("ready", flush=True)
            done.wait(120)
            return
        with client.subscribe(FILTER, decode="raw") as sub:
            print("ready", flush=True)
            for point in sub:
                note(point.tags["SentNs"])
                if done.is_set():
                    break


def asyncio_latency(scenario: str, port: int, note: Callable[[str], None], done: threading.Event) -> None:
    import asyncio

    async def main() -> None:
        if scenario == "aiomqtt":
            import aiomqtt

            async with aiomqtt.Client("127.0.0.1", port) as client:
                await client.subscribe(FILTER)
                print("ready", flush=True)
                async for message in client.messages:
                    note(json.loads(message.payload)["Tags"]["SentNs"])
                    if done.is_set():
                        break
        else:
            import capture_mqtt as cm

            async with cm.AsyncClient("127.0.0.1", transport="mqtt", port=port) as cm_client:
                sub = await cm_client.subscribe(FILTER, decode="raw")
                print("ready", flush=True)
                async for point in sub:
                    note(point.tags["SentNs"])
                    if done.is_set():
                        break

    asyncio.run(main())


def latency_subscriber(scenario: str, port: int, count: int) -> None:
    latencies: list[int] = []
    done = threading.Event()

    def note(sent: str) -> None:
        if sent != "0":
            latencies.append(time.time_ns() - int(sent))
        if len(latencies) >= count or sent == "0":
            done.set()

    if scenario == "paho":
        paho_latency(port, note, done)
    elif scenario in ("cm_callback", "cm_iter"):
        cm_latency(scenario, port, note, done)
    else:
        asyncio_latency(scenario, port, note, done)
    ordered = sorted(latencies)
    result = {
        "messages": len(ordered),
        "p50_ms": ordered[len(ordered) // 2] / 1e6,
        "p99_ms": ordered[int(len(ordered) * 0.99)] / 1e6,
        "rss_mb": rss_mb(),
    }
    print(json.dumps(result), flush=True)


def slow_subscriber(scenario: str, port: int, seconds: float) -> None:
    """Handles 2,000 messages a second (a sleep per message) and samples its RSS every second."""
    per_message = 1 / 2_000
    samples: list[float] = []
    handled = 0
    stop_at = time.monotonic() + seconds + 1
    next_sample = time.monotonic()

    def handle() -> None:
        nonlocal handled, next_sample
        handled += 1
        deadline = time.perf_counter() + per_message
        while time.perf_counter() < deadline:
            pass
        if time.monotonic() >= next_sample:
            samples.append(rss_mb())
            next_sample += 1.0

    dropped = 0
    if scenario == "paho_slow":
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        client = mqtt.Client(CallbackAPIVersion.VERSION2)

        def on_message(client: Any, userdata: Any, message: Any) -> None:
            json.loads(message.payload)
            handle()

        client.on_message = on_message
        client.connect("127.0.0.1", port)
        client.subscribe(FILTER)
        client.loop_start()
        time.sleep(0.5)
        print("ready", flush=True)
        while time.monotonic() < stop_at:
            time.sleep(0.1)
        client.loop_stop()
    else:
        import capture_mqtt as cm

        with (
            cm.Client("127.0.0.1", transport="mqtt", port=port) as cm_client,
            cm_client.subscribe(FILTER, queue_size=10_000, overflow="drop_oldest") as sub,
        ):
            print("ready", flush=True)
            while time.monotonic() < stop_at:
                if sub.get(timeout=0.1) is not None:
                    handle()
            dropped = sub.stats["dropped"]
    half = samples[len(samples) // 4 :] or samples
    print(
        json.dumps(
            {
                "handled": handled,
                "dropped": dropped,
                "rss_first_mb": half[0] if half else 0.0,
                "rss_last_mb": samples[-1] if samples else 0.0,
                "rss_peak_mb": max(samples, default=0.0),
                "samples": samples,
            }
        ),
        flush=True,
    )


# Parent


def run_pair(subscriber_args: list[str], port: int, count: int, rate: float) -> dict[str, Any]:
    sub = subprocess.Popen(
        [sys.executable, __file__, "--child", *subscriber_args], stdout=subprocess.PIPE, text=True, cwd=HERE.parent
    )
    assert sub.stdout is not None
    assert sub.stdout.readline().strip() == "ready"
    subprocess.run(
        [sys.executable, __file__, "--publisher", str(port), str(count), str(rate)], check=True, cwd=HERE.parent
    )
    out, _ = sub.communicate(timeout=180)
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> int:
    from capture_mqtt.testing import UNLIMITED, Mosquitto

    RESULTS.mkdir(exist_ok=True)
    latency: dict[str, dict[str, Any]] = {}
    slow: dict[str, dict[str, Any]] = {}
    with Mosquitto(anonymous=True, tls=False, websockets=False, limits=UNLIMITED) as broker:
        port = broker.mqtt_port
        for scenario in LATENCY:
            latency[scenario] = run_pair([scenario, str(port), str(LATENCY_MESSAGES)], port, LATENCY_MESSAGES, RATE)
            print(f"  {scenario:12} p50 {latency[scenario]['p50_ms']:.3f} ms", file=sys.stderr, flush=True)
        count = int(SLOW_SECONDS * SLOW_RATE)
        for scenario in SLOW:
            slow[scenario] = run_pair([scenario, str(port), str(SLOW_SECONDS)], port, count, SLOW_RATE)
            print(f"  {scenario:12} RSS {slow[scenario]['rss_last_mb']:.0f} MB", file=sys.stderr, flush=True)
    print(f"\nlatency at a steady {RATE:,} messages/s, {LATENCY_MESSAGES:,} messages, one Mosquitto")
    print(f"{'scenario':40} {'p50 ms':>8} {'p99 ms':>8} {'p50 vs base':>12} {'p99 vs base':>12}")
    rows = []
    for scenario, label in LATENCY.items():
        row = latency[scenario]
        base = LATENCY_BASELINE.get(scenario)
        p50_ratio = row["p50_ms"] / latency[base]["p50_ms"] if base else None
        p99_ratio = row["p99_ms"] / latency[base]["p99_ms"] if base else None
        rows.append(
            {
                "scenario": scenario,
                "label": label,
                **row,
                "baseline": base,
                "p50_ratio": p50_ratio,
                "p99_ratio": p99_ratio,
            }
        )
        extra = f"{p50_ratio:11.2f}x {p99_ratio:11.2f}x" if base else ""
        print(f"{label:40} {row['p50_ms']:8.3f} {row['p99_ms']:8.3f} {extra}")
    print(f"\nslow consumer: {SLOW_RATE:,} messages/s published for {SLOW_SECONDS:g} s, 2,000/s handled")
    print(f"{'scenario':40} {'handled':>9} {'dropped':>9} {'RSS early':>10} {'RSS end':>8} {'peak':>7}")
    slow_rows = []
    for scenario, label in SLOW.items():
        row = slow[scenario]
        slow_rows.append({"scenario": scenario, "label": label, **row})
        print(
            f"{label:40} {row['handled']:9,} {row['dropped']:9,} {row['rss_first_mb']:9.0f}M "
            f"{row['rss_last_mb']:7.0f}M {row['rss_peak_mb']:6.0f}M"
        )
    (RESULTS / "live.json").write_text(
        json.dumps({"rate": RATE, "messages": LATENCY_MESSAGES, "latency": rows, "slow": slow_rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        scenario, port, amount = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        if scenario in SLOW:
            slow_subscriber(scenario, port, float(amount))
        else:
            latency_subscriber(scenario, port, int(amount))
    elif len(sys.argv) > 1 and sys.argv[1] == "--publisher":
        publisher(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        sys.exit(main())
