"""Micro-benchmark: cm.parse_raw against json.loads + datetime.fromisoformat + building the same fields.

Both sides turn a realistic raw-tree message (Capture's example payload, with varying sources,
measurements, keys and tag sets) into the same fields: topic levels, value, tags, aware UTC timestamp.
Run with `make bench` (or `python benchmarks/bench_parse.py`); prints messages per second and the ratio.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from common import PurePythonPoint, make_messages, pure_python_point

import capture_mqtt as cm

MESSAGES = 200_000
REPEATS = 5


def pure_python(messages: list[tuple[str, bytes]]) -> list[PurePythonPoint]:
    return [pure_python_point(topic, payload) for topic, payload in messages]


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
