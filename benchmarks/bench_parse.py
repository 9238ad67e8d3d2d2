"""Micro-benchmark: cm.parse_raw against json.loads + datetime.fromisoformat + building the same fields.

Both sides turn a realistic raw-tree message (Capture's example payload, with varying sources,
measurements, keys and tag sets) into the same fields: topic levels, value, tags, aware UTC timestamp.
Run with `make bench` (or `python benchmarks/bench_parse.py`); prints messages per second and the ratio.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import capture_mqtt as cm

MESSAGES = 200_000
REPEATS = 5


@dataclass(frozen=True, slots=True)
class PurePythonPoint:
    """What a pure-Python client builds for each message: the same fields a DataPoint offers."""

    topic: str
    company: str
    source_id: str
    connection_tag: str
    measurement: str
    key: str
    value: Any
    tags: dict[str, str]
    timestamp: datetime


def make_messages(count: int, seed: int = 7) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    sources = [f"{rng.getrandbits(128):032x}" for _ in range(20)]
    measurements = {
        "Monitoring": ["CPU_Temp", "CPU_Load", "Mem_Used", "Disk_Free"],
        "Energy": ["Power_kW", "Voltage_L1", "Current_L1", "Cos_Phi"],
        "Line": ["Speed", "State", "Operator", "Count"],
    }
    messages = []
    for i in range(count):
        source = rng.choice(sources)
        measurement = rng.choice(list(measurements))
        key = rng.choice(measurements[measurement])
        value: Any
        if key in {"State", "Operator"}:
            value = rng.choice(["Running", "Stopped", "Alice", "Bob"])
        elif key == "Count":
            value = rng.randrange(1_000_000)
        else:
            value = round(rng.uniform(0, 500), rng.randrange(1, 4))
        tags = {"Connection_Tag": "System_Monitoring_Requester", "MachineName": f"Machine{i % 7}"}
        if i % 3 == 0:
            tags["SerialNumber"] = str(rng.randrange(10_000, 99_999))
        stamp = f"2024-11-08T10:{(i // 60) % 60:02d}:{i % 60:02d}.{rng.randrange(1000):03d}Z"
        topic = f"v1/raw/AcmeCorp/{source}/System_Monitoring_Requester/{measurement}/{key}"
        payload = json.dumps({"Value": value, "Tags": tags, "UtcTimestamp": stamp}).encode()
        messages.append((topic, payload))
    return messages


def pure_python(messages: list[tuple[str, bytes]]) -> list[PurePythonPoint]:
    out = []
    for topic, payload in messages:
        body = json.loads(payload)
        _, _, company, source_id, connection_tag, measurement, key = topic.split("/")
        stamp = datetime.fromisoformat(body["UtcTimestamp"]).astimezone(UTC)
        value, tags = body["Value"], body["Tags"]
        out.append(PurePythonPoint(topic, company, source_id, connection_tag, measurement, key, value, tags, stamp))
    return out


def capture_mqtt(messages: list[tuple[str, bytes]]) -> list[cm.DataPoint]:
    parse = cm.parse_raw
    return [parse(topic, payload) for topic, payload in messages]


def capture_mqtt_read_all(messages: list[tuple[str, bytes]]) -> list[tuple[Any, ...]]:
    """parse_raw and then read every field, as a consumer touching all of them would."""
    out = []
    for topic, payload in messages:
        p = cm.parse_raw(topic, payload)
        fields = (p.company, p.source_id, p.connection_tag, p.measurement, p.key, p.value, p.tags, p.timestamp)
        out.append(fields)
    return out


def timed(fn: Callable[[list[tuple[str, bytes]]], object], messages: list[tuple[str, bytes]]) -> float:
    runs = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn(messages)
        runs.append(time.perf_counter() - start)
    return len(messages) / statistics.median(runs)


def main() -> int:
    messages = make_messages(MESSAGES)
    # Both sides must see the same data.
    reference = pure_python(messages[:1000])
    ours = capture_mqtt(messages[:1000])
    for a, b in zip(reference, ours, strict=True):
        assert (a.company, a.source_id, a.measurement, a.key, a.value, a.tags, a.timestamp) == (
            b.company,
            b.source_id,
            b.measurement,
            b.key,
            b.value,
            b.tags,
            b.timestamp,
        )
    baseline = timed(pure_python, messages)
    rows = [
        ("json.loads + fromisoformat + dataclass", baseline),
        ("cm.parse_raw", timed(capture_mqtt, messages)),
        ("cm.parse_raw + read every field", timed(capture_mqtt_read_all, messages)),
    ]
    print(f"parse benchmark: {MESSAGES:,} raw-tree messages, median of {REPEATS} runs")
    print(f"{'method':42} {'msg/s':>12} {'ratio':>7}")
    for name, rate in rows:
        print(f"{name:42} {rate:12,.0f} {rate / baseline:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
