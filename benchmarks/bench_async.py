"""The cost of one awaited call: aiomqtt and capture-mqtt's AsyncClient side by side against one Mosquitto.

Each scenario awaits N publishes one after the other (QoS 0: the call's own cost; QoS 1: the call
and the broker's acknowledgement), then N QoS 1 publishes at once with ``asyncio.gather`` (how much
a burst of awaited completions costs the event loop). Prints microseconds per call, medians of
BENCH_REPEATS runs (default 5), and capture-mqtt's speed relative to aiomqtt's.

    .venv/bin/python benchmarks/bench_async.py
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))
CALLS = {"seq0": 20_000, "seq1": 5_000, "gather1": 5_000}
SCENARIOS = {
    "seq0": "await publish(qos=0), one after the other",
    "seq1": "await publish(qos=1), one after the other",
    "gather1": "asyncio.gather of publish(qos=1)",
}
TOPIC = "bench/async"
PAYLOAD = b'{"Value": 21.5, "UtcTimestamp": "2024-11-08T10:00:00.000Z"}'


async def drive(client: Any, scenario: str, n: int) -> float:
    """The scenario's publishes on a connected client of either library (same call shape)."""
    for _ in range(100):  # warm up
        await client.publish(TOPIC, PAYLOAD, qos=1)
    started = time.perf_counter()
    if scenario == "gather1":
        await asyncio.gather(*(client.publish(TOPIC, PAYLOAD, qos=1) for _ in range(n)))
    else:
        qos = 0 if scenario == "seq0" else 1
        for _ in range(n):
            await client.publish(TOPIC, PAYLOAD, qos=qos)
    return time.perf_counter() - started


async def run_cm(port: int, scenario: str, n: int) -> float:
    import capture_mqtt as cm

    async with cm.AsyncClient("127.0.0.1", transport="mqtt", port=port, inflight=65_535) as client:
        return await drive(client, scenario, n)


async def run_aiomqtt(port: int, scenario: str, n: int) -> float:
    import aiomqtt

    client = aiomqtt.Client("127.0.0.1", port, max_inflight_messages=65_535, max_queued_outgoing_messages=0)
    async with client:
        return await drive(client, scenario, n)


def child(argv: list[str]) -> None:
    library, scenario, port = argv[0], argv[1], int(argv[2])
    run: Any = run_cm if library == "cm" else run_aiomqtt
    seconds = asyncio.run(run(port, scenario, CALLS[scenario]))
    print(json.dumps({"seconds": seconds}))


def main() -> int:
    import subprocess

    from capture_mqtt.testing import UNLIMITED, Mosquitto

    results: dict[tuple[str, str], float] = {}
    with Mosquitto(anonymous=True, tls=False, websockets=False, limits=UNLIMITED) as broker:
        for scenario in SCENARIOS:
            for library in ("aiomqtt", "cm"):
                runs = []
                for _ in range(REPEATS):
                    done = subprocess.run(
                        [sys.executable, __file__, "--child", library, scenario, str(broker.mqtt_port)],
                        capture_output=True,
                        text=True,
                        check=True,
                        cwd=HERE.parent,
                    )
                    runs.append(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])
                results[(library, scenario)] = statistics.median(runs) / CALLS[scenario] * 1e6
                print(f"  {library:8} {scenario:8} {results[(library, scenario)]:8.1f} µs/call", file=sys.stderr)
    print(f"\nasync call cost: microseconds per awaited call, median of {REPEATS}, one Mosquitto")
    print(f"{'scenario':44} {'aiomqtt':>9} {'capture-mqtt':>13} {'speed-up':>9}")
    for scenario, label in SCENARIOS.items():
        theirs, ours = results[("aiomqtt", scenario)], results[("cm", scenario)]
        print(f"{label:44} {theirs:9.1f} {ours:13.1f} {theirs / ours:8.1f}x")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        sys.exit(main())
