"""What the benchmarks share: realistic raw-tree messages, and a local broker."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import datetime
from typing import Any

COMPANY = "AcmeCorp"
FILTER = f"v1/raw/{COMPANY}/#"


@dataclass(frozen=True, slots=True)
class PurePythonPoint:
    """What a pure-Python client builds for each message: the fields a DataPoint offers."""

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
    """Capture's example payload with varying sources, measurements, keys, values and tag sets."""
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
        topic = f"v1/raw/{COMPANY}/{source}/System_Monitoring_Requester/{measurement}/{key}"
        messages.append((topic, json.dumps({"Value": value, "Tags": tags, "UtcTimestamp": stamp}).encode()))
    return messages


def pure_python_point(topic: str, payload: bytes) -> PurePythonPoint:
    """json.loads and datetime.fromisoformat: the pure-Python way to the same fields."""
    body = json.loads(payload)
    _, _, company, source_id, connection_tag, measurement, key = topic.split("/")
    stamp = datetime.fromisoformat(body["UtcTimestamp"])
    return PurePythonPoint(
        topic, company, source_id, connection_tag, measurement, key, body["Value"], body["Tags"], stamp
    )
