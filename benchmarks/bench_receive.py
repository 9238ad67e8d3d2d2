"""Receiving raw-tree data: paho-mqtt, aiomqtt and capture-mqtt side by side against one Mosquitto.

Every scenario runs in its own process (for a clean peak RSS). It first registers a persistent
session and leaves; one publisher process then sends the same N realistic messages at QoS 0, which the
broker queues for the session; the consumer comes back and drains them as fast as it can. So the
publisher's speed plays no part: only the consumer and the broker are measured. The broker's own
ceiling is mosquitto_sub to /dev/null draining the same backlog in the same run. Rates are messages per
second from the first message to the last one processed; each scenario runs REPEATS times, median kept.

    python benchmarks/bench_receive.py            # make bench runs this
    BENCH_MESSAGES=50000 BENCH_REPEATS=1 python benchmarks/bench_receive.py
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import COMPANY, FILTER, make_messages, pure_python_point  # noqa: E402

MESSAGES = int(os.environ.get("BENCH_MESSAGES", "100000"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
RESULTS = HERE / "results"

SCENARIOS: dict[str, str] = {
    "broker": "mosquitto_sub to /dev/null (the broker's ceiling)",
    "paho": "paho-mqtt + json.loads + fields, callback",
    "cm_iter": "capture-mqtt: for point in sub",
    "cm_iter_read": "capture-mqtt: for point in sub, reading value and timestamp",
    "cm_callback": "capture-mqtt: callback",
    "aiomqtt": "aiomqtt + json.loads + fields, async for",
    "cm_async": "capture-mqtt: async for",
    "paho_frame": "paho-mqtt + json.loads, then one pandas DataFrame",
    "cm_frame": "capture-mqtt: sub.batches() into one pandas DataFrame",
}
BASELINE = {
    "cm_iter": "paho",
    "cm_iter_read": "paho",
    "cm_callback": "paho",
    "cm_async": "aiomqtt",
    "cm_frame": "paho_frame",
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(first: float, last: float) -> None:
    print(json.dumps({"seconds": last - first, "rss_mb": peak_rss_mb()}), flush=True)


# Scenarios, each in its own process: print "ready" once subscribed, then the result as JSON.


def run_paho(port: int, n: int, frame: bool) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    if frame:
        import pandas as pd  # imported before timing, as in a notebook

    rows: list[Any] = []
    marks: list[float] = []

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        if not marks:
            marks.append(time.perf_counter())
        if frame:
            point = pure_python_point(message.topic, message.payload)
            rows.append({**point.__dict__} if hasattr(point, "__dict__") else _as_dict(point))
        else:
            rows.append(pure_python_point(message.topic, message.payload))
        if len(rows) == n:
            client.disconnect()

    prime_paho(port)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=SESSION, clean_session=False)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    while len(rows) < n:
        time.sleep(0.001)
    if frame:
        pd.DataFrame(rows)
    last = time.perf_counter()
    client.loop_stop()
    report(marks[0], last)


SESSION = "bench-consumer"


def primed() -> None:
    """Tells the orchestrator the session exists, and waits for the backlog to be published."""
    print("ready", flush=True)
    assert sys.stdin.readline().strip() == "go"


def prime_paho(port: int) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=SESSION, clean_session=False)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe(FILTER)
    time.sleep(0.3)  # time for the SUBACK; paho offers no wait for it outside a callback
    client.disconnect()
    client.loop_stop()
    primed()


def _as_dict(point: Any) -> dict[str, Any]:
    return {name: getattr(point, name) for name in point.__slots__}


def run_cm(port: int, n: int, mode: str) -> None:
    import capture_mqtt as cm

    if mode == "frame":
        import pandas  # noqa: F401 - imported before timing, as in a notebook
        import pyarrow  # noqa: F401

    options: dict[str, Any] = {"transport": "mqtt", "port": port, "client_id": SESSION, "clean_session": False}
    with cm.Client("127.0.0.1", connect=False, **options) as client:
        client.subscribe(FILTER)
        client.connect()
    primed()
    with cm.Client("127.0.0.1", connect=False, company=COMPANY, **options) as client:
        if mode == "callback":
            got: list[Any] = []
            marks: list[float] = []

            def on_point(point: Any) -> None:
                if not marks:
                    marks.append(time.perf_counter())
                got.append(point)

            client.subscribe(FILTER, decode="raw", callback=on_point, queue_size=100_000)
            client.connect()
            while len(got) < n:
                time.sleep(0.001)
            report(marks[0], time.perf_counter())
            return
        sub = client.subscribe(FILTER, decode="raw", queue_size=100_000)
        client.connect()
        if mode == "frame":
            parts = [sub.batch(max_rows=1, timeout=None)]
            first = time.perf_counter()
            rows = len(parts[0])
            while rows < n:
                part = sub.batch(max_rows=min(50_000, n - rows), timeout=0.2)
                parts.append(part)
                rows += len(part)
            cm.Batch.concat(parts).to_pandas()
            report(first, time.perf_counter())
            return
        points = [sub.get()]
        first = time.perf_counter()
        for point in sub:
            if mode == "iter_read":
                point.value, point.timestamp  # noqa: B018 - reading the fields is the work measured
            points.append(point)
            if len(points) == n:
                break
        report(first, time.perf_counter())


def run_cm_async(port: int, n: int) -> None:
    import capture_mqtt as cm

    options: dict[str, Any] = {"transport": "mqtt", "port": port, "client_id": SESSION, "clean_session": False}

    async def prime() -> None:
        client = cm.AsyncClient("127.0.0.1", **options)
        await client.subscribe(FILTER)
        await client.connect()
        await client.close()

    async def main() -> None:
        client = cm.AsyncClient("127.0.0.1", **options)
        sub = await client.subscribe(FILTER, decode="raw", queue_size=100_000)
        async with client:
            points: list[Any] = []
            first = 0.0
            async for point in sub:
                if not points:
                    first = time.perf_counter()
                points.append(point)
                if len(points) == n:
                    break
            report(first, time.perf_counter())

    asyncio.run(prime())
    primed()
    asyncio.run(main())


def run_aiomqtt(port: int, n: int) -> None:
    import aiomqtt

    async def prime() -> None:
        async with aiomqtt.Client("127.0.0.1", port, identifier=SESSION, clean_session=False) as client:
            await client.subscribe(FILTER)

    async def main() -> None:
        async with aiomqtt.Client("127.0.0.1", port, identifier=SESSION, clean_session=False) as client:
            points: list[Any] = []
            first = 0.0
            async for message in client.messages:
                if not points:
                    first = time.perf_counter()
                points.append(pure_python_point(str(message.topic), message.payload))
                if len(points) == n:
                    break
            report(first, time.perf_counter())

    asyncio.run(prime())
    primed()
    asyncio.run(main())


def run_publisher(port: int, n: int) -> None:
    import capture_mqtt as cm

    messages = make_messages(n)
    with cm.Client("127.0.0.1", transport="mqtt", port=port) as client:
        print("go", flush=True)
        started = time.perf_counter()
        for topic, payload in messages[:-1]:
            client.publish(topic, payload, qos=0, wait=False)
        # The last one acknowledged means every one before it was written.
        client.publish(messages[-1][0], messages[-1][1], qos=1)
        print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)


def child(argv: list[str]) -> None:
    role, port, n = argv[0], int(argv[1]), int(argv[2])
    runners = {
        "publish": lambda: run_publisher(port, n),
        "paho": lambda: run_paho(port, n, frame=False),
        "paho_frame": lambda: run_paho(port, n, frame=True),
        "cm_iter": lambda: run_cm(port, n, "iter"),
        "cm_iter_read": lambda: run_cm(port, n, "iter_read"),
        "cm_callback": lambda: run_cm(port, n, "callback"),
        "cm_frame": lambda: run_cm(port, n, "frame"),
        "cm_async": lambda: run_cm_async(port, n),
        "aiomqtt": lambda: run_aiomqtt(port, n),
    }
    runners[role]()


# The orchestrator.


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True, cwd=HERE.parent
    )


def publish_backlog(port: int, n: int) -> None:
    publisher = spawn("publish", str(port), str(n))
    assert publisher.stdout is not None
    assert publisher.stdout.readline().strip() == "go"
    publisher.stdout.read()
    assert publisher.wait(timeout=600) == 0
    time.sleep(0.2)


def one_run(scenario: str, port: int, n: int) -> dict[str, float]:
    if scenario == "broker":
        sub = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", FILTER, "-c", "-i", SESSION, "-q", "0"]
        subprocess.run([*sub, "-E"], check=True)
        publish_backlog(port, n)
        started = time.perf_counter()
        subprocess.run([*sub, "-C", str(n)], check=True, stdout=subprocess.DEVNULL)
        return {"seconds": time.perf_counter() - started, "rss_mb": 0.0}
    consumer = subprocess.Popen(
        [sys.executable, __file__, "--child", scenario, str(port), str(n)],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
        cwd=HERE.parent,
    )
    assert consumer.stdout is not None
    assert consumer.stdin is not None
    line = consumer.stdout.readline().strip()
    assert line == "ready", f"{scenario} did not start: {line!r}"
    publish_backlog(port, n)
    consumer.stdin.write("go\n")
    consumer.stdin.flush()
    result = json.loads(consumer.stdout.readline())
    consumer.wait(timeout=60)
    return dict(result)


def main() -> int:
    from capture_mqtt.testing import UNLIMITED, Mosquitto

    RESULTS.mkdir(exist_ok=True)
    rows: dict[str, dict[str, float]] = {}
    with Mosquitto(anonymous=True, tls=False, websockets=False, limits=UNLIMITED) as broker:
        for scenario in SCENARIOS:
            runs = [one_run(scenario, broker.mqtt_port, MESSAGES) for _ in range(REPEATS)]
            seconds = statistics.median(r["seconds"] for r in runs)
            rows[scenario] = {
                "rate": MESSAGES / seconds,
                "seconds": seconds,
                "rss_mb": max(r["rss_mb"] for r in runs),
            }
            print(f"  {scenario:14} {rows[scenario]['rate']:>10,.0f} msg/s", file=sys.stderr, flush=True)
    ceiling = rows["broker"]["rate"]
    print(f"\nreceive benchmark: {MESSAGES:,} raw-tree messages at QoS 0, median of {REPEATS}, one Mosquitto")
    print(f"{'scenario':62} {'msg/s':>10} {'vs baseline':>12} {'of ceiling':>11} {'peak RSS':>9}")
    table = []
    for scenario, label in SCENARIOS.items():
        row = rows[scenario]
        base = BASELINE.get(scenario)
        ratio = row["rate"] / rows[base]["rate"] if base else None
        share = row["rate"] / ceiling
        table.append({"scenario": scenario, "label": label, **row, "ratio": ratio, "baseline": base, "share": share})
        ratio_text = f"{ratio:11.1f}x" if ratio else f"{'':12}"
        rss = f"{row['rss_mb']:7.0f}MB" if row["rss_mb"] else f"{'':9}"
        print(f"{label:62} {row['rate']:>10,.0f} {ratio_text} {share:10.0%} {rss}")
    (RESULTS / "receive.json").write_text(
        json.dumps({"messages": MESSAGES, "repeats": REPEATS, "rows": table}, indent=1)
    )
    chart(table)
    return 0


def chart(table: list[dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [row["scenario"] for row in table]
    rates = [row["rate"] for row in table]
    colors = ["#888" if s == "broker" else "#1f77b4" if s.startswith("cm") else "#ff7f0e" for s in labels]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.barh(labels[::-1], rates[::-1], color=colors[::-1])
    ax.set_xlabel("messages per second (higher is better)")
    ax.set_title(f"Receiving {MESSAGES:,} Capture raw-tree messages from one Mosquitto")
    fig.tight_layout()
    fig.savefig(RESULTS / "receive.png", dpi=100)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        sys.exit(main())
