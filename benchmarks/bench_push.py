"""Pushing data as a source: paho-mqtt and capture-mqtt side by side against one Mosquitto.

Each scenario runs in its own process and pushes the same rows (three fields, two tags, a timestamp):
measurement level and field level, at QoS 0 and QoS 1, counted from the first push until the broker has
everything (QoS 1: every acknowledgement; QoS 0: a final QoS 1 message, acknowledged after all before
it). paho-mqtt builds payloads with json.dumps and datetime.isoformat; its in-flight window is raised to
1,000 so that QoS 1 is not throttled by its default of 20. push_frame sends a whole DataFrame; paho
sends the same rows in a Python loop.

    python benchmarks/bench_push.py
    BENCH_PUSHES=20000 BENCH_FRAME_ROWS=100000 BENCH_REPEATS=1 python benchmarks/bench_push.py
    BENCH_ONLY=paho_m1,cm_m1,cm_m1_batch,cm_m1_always,cm_m1_never python benchmarks/bench_push.py
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

HERE = Path(__file__).resolve().parent
PUSHES = int(os.environ.get("BENCH_PUSHES", "50000"))
FRAME_ROWS = int(os.environ.get("BENCH_FRAME_ROWS", "1000000"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
# A comma-separated subset of the scenarios (the ratios need their baselines in it too).
ONLY = [name for name in os.environ.get("BENCH_ONLY", "").split(",") if name]
RESULTS = HERE / "results"
SOURCE = "5b0f2c1e-6d1a-4c55-9d64-2f3f4b6c7a10"
TOPIC = f"v1/sources/{SOURCE}/data/read/PLC/Press"
START = datetime(2024, 11, 8, 10, 22, 6, tzinfo=UTC)

SCENARIOS = {
    "paho_m0": ("paho-mqtt, measurement level, QoS 0", "push"),
    "cm_m0": ("capture-mqtt push(), QoS 0", "push"),
    "paho_m1": ("paho-mqtt, measurement level, QoS 1", "push"),
    "cm_m1": ("capture-mqtt push(), QoS 1", "push"),
    "cm_m1_batch": ("capture-mqtt push(), QoS 1, outbox on disk (batch)", "push"),
    "cm_m1_always": ("capture-mqtt push(), QoS 1, outbox on disk (always)", "push"),
    "cm_m1_never": ("capture-mqtt push(), QoS 1, outbox on disk (never)", "push"),
    "paho_f1": ("paho-mqtt, field level, QoS 1", "push"),
    "cm_f1": ("capture-mqtt push_field(), QoS 1", "push"),
    "paho_frame": ("paho-mqtt, DataFrame rows in a loop, QoS 1", "frame"),
    "cm_frame": ("capture-mqtt push_frame(), QoS 1", "frame"),
    "paho_loop0": ("paho-mqtt publish() loop, QoS 0, defaults", "push"),
    "cm_loop0": ("capture-mqtt publish() loop, QoS 0, defaults", "push"),
    "paho_loop0_tls": ("paho-mqtt publish() loop, QoS 0, over TLS", "push"),
    "cm_loop0_tls": ("capture-mqtt publish() loop, QoS 0, over TLS", "push"),
    "mosquitto_pub": ("mosquitto_pub -l, QoS 0 (the C client)", "push"),
}
BASELINE = {
    "cm_m0": "paho_m0",
    "cm_m1": "paho_m1",
    "cm_m1_batch": "paho_m1",
    "cm_m1_always": "paho_m1",
    "cm_m1_never": "paho_m1",
    "cm_f1": "paho_f1",
    "cm_frame": "paho_frame",
    "cm_loop0": "paho_loop0",
    "cm_loop0_tls": "paho_loop0_tls",
}
if ONLY:
    unknown = sorted(set(ONLY) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"BENCH_ONLY names unknown scenarios: {unknown}; choose among {sorted(SCENARIOS)}")
    SCENARIOS = {name: SCENARIOS[name] for name in ONLY}
# Write syscalls (strace -c) per this many QoS 0 publishes from capture-mqtt's publish() loop.
SYSCALL_PUBLISHES = 10_000
LOOP_PAYLOAD = json.dumps({"Fields": {"Temperature": 61.5, "Pressure": 1.52, "Count": 7}, "Tags": {"Line": "2"}})


def row(i: int) -> tuple[dict[str, Any], dict[str, str], datetime]:
    fields = {"Temperature": 60 + (i % 100) / 10, "Pressure": 1.5 + (i % 7) / 100, "Count": i}
    return fields, {"MachineName": f"Press{i % 4}", "Line": "2"}, START + timedelta(milliseconds=i)


def wait_until_connected(client: Any) -> None:
    # A client with a durable outbox connects in the background.
    deadline = time.monotonic() + 10
    while not client.is_connected and time.monotonic() < deadline:
        time.sleep(0.01)


def report(started: float) -> None:
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def settle(infos: list[Any]) -> None:
    """Waits for paho's outstanding publishes: past 65,535 unacknowledged ones its packet ids wrap and
    messages are lost, so the baseline waits every 10,000 (which only helps paho)."""
    for info in infos:
        info.wait_for_publish()
    infos.clear()


def run_paho(port: int, n: int, qos: int, field_level: bool) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = []
    started = time.perf_counter()
    for i in range(n):
        fields, tags, stamp = row(i)
        iso = stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if field_level:
            for key, value in fields.items():
                body = json.dumps({"Value": value, "Tags": tags, "UtcTimestamp": iso})
                infos.append(client.publish(f"{TOPIC}/{key}", body, qos=qos))
        else:
            body = json.dumps({"Fields": fields, "Tags": tags, "UtcTimestamp": iso})
            infos.append(client.publish(TOPIC, body, qos=qos))
        if qos and len(infos) >= 10_000:
            settle(infos)
    last = client.publish(TOPIC, "{}", qos=1)
    if qos:
        for info in infos:
            info.wait_for_publish()
    last.wait_for_publish()
    report(started)
    client.disconnect()
    client.loop_stop()


def run_paho_loop(port: int, n: int, ca_file: str | None = None) -> None:
    """The plain loop a user writes: publish(topic, payload) with paho's defaults."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    if ca_file:
        client.tls_set(ca_certs=ca_file)
    client.connect("127.0.0.1", port)
    client.loop_start()
    started = time.perf_counter()
    for _ in range(n):
        client.publish(TOPIC, LOOP_PAYLOAD)
    client.publish(TOPIC, "{}", qos=1).wait_for_publish()
    report(started)
    client.disconnect()
    client.loop_stop()


def run_cm_loop(port: int, n: int, ca_file: str | None = None) -> None:
    """The same loop with capture-mqtt's defaults (QoS 0 waits for nothing)."""
    import capture_mqtt as cm

    transport: Literal["mqtts", "mqtt"] = "mqtts" if ca_file else "mqtt"
    with cm.Client("127.0.0.1", transport=transport, port=port, ca_file=ca_file) as client:
        started = time.perf_counter()
        for _ in range(n):
            client.publish(TOPIC, LOOP_PAYLOAD, qos=0)
        client.publish(TOPIC, "{}", qos=1)
        report(started)


def run_mosquitto_pub(port: int, n: int) -> None:
    """The C client reading lines from stdin, QoS 0: the ceiling of this broker and machine."""
    lines = (LOOP_PAYLOAD + "\n") * n
    started = time.perf_counter()
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", TOPIC, "-l", "-q", "0"],
        input=lines.encode(),
        check=True,
    )
    report(started)


def write_syscalls(port: int) -> int | None:
    """Write syscalls made by the whole process for SYSCALL_PUBLISHES QoS 0 publishes, from strace -c
    (less those of a run with no publishes, so that start-up and shutdown do not count)."""
    import shutil

    if shutil.which("strace") is None:
        return None

    def count(n: int) -> int:
        done = subprocess.run(
            [
                "strace",
                "-f",
                "-c",
                "-e",
                "trace=write,writev,sendto,sendmsg",
                sys.executable,
                __file__,
                "--child",
                "cm_loop0",
                str(port),
                str(n),
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=HERE.parent,
        )
        total = 0
        for line in done.stderr.splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[-1] in {"write", "writev", "sendto", "sendmsg"}:
                total += int(parts[3])
        return total

    return count(SYSCALL_PUBLISHES) - count(0)


def run_cm(port: int, n: int, qos: int, field_level: bool, sync: str | None = None) -> None:
    import tempfile

    import capture_mqtt as cm

    durable: dict[str, Any] = {}
    if sync is not None:  # a durable outbox on local disk, in a fresh folder
        durable = {"outbox": tempfile.mkdtemp(prefix="bench-outbox-", dir=RESULTS), "outbox_sync": sync}
    with cm.SourceClient("127.0.0.1", transport="mqtt", port=port, source_id=SOURCE, password="-", **durable) as src:
        if durable:
            wait_until_connected(src)
        handles = []
        started = time.perf_counter()
        for i in range(n):
            fields, tags, stamp = row(i)
            if field_level:
                for key, value in fields.items():
                    handles.append(
                        src.push_field("PLC", "Press", key, value, tags=tags, timestamp=stamp, qos=qos, wait=False)
                    )
            else:
                handles.append(src.push("PLC", "Press", fields, tags=tags, timestamp=stamp, qos=qos, wait=False))
        src.push("PLC", "Press", {"Last": 1}, qos=1)
        for handle in handles:
            handle.wait(60)
        report(started)
    if durable:
        import shutil

        shutil.rmtree(durable["outbox"], ignore_errors=True)


def frame(n: int) -> Any:
    import pandas as pd

    return pd.DataFrame(
        {
            "time": pd.date_range(START, periods=n, freq="ms"),
            "Temperature": 60 + (pd.RangeIndex(n) % 100) / 10,
            "Pressure": 1.5 + (pd.RangeIndex(n) % 7) / 100,
            "Count": pd.RangeIndex(n),
            "MachineName": [f"Press{i % 4}" for i in range(n)],
        }
    )


def run_paho_frame(port: int, n: int) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    data = frame(n)
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    started = time.perf_counter()
    infos = []
    for stamp, temperature, pressure, count, machine in data.itertuples(index=False):
        body = json.dumps(
            {
                "Fields": {"Temperature": float(temperature), "Pressure": float(pressure), "Count": int(count)},
                "Tags": {"MachineName": machine},
                "UtcTimestamp": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            }
        )
        infos.append(client.publish(TOPIC, body, qos=1))
        if len(infos) >= 10_000:
            settle(infos)
    settle(infos)
    report(started)
    client.disconnect()
    client.loop_stop()


def run_cm_frame(port: int, n: int) -> None:
    import capture_mqtt as cm

    data = frame(n)
    with cm.SourceClient("127.0.0.1", transport="mqtt", port=port, source_id=SOURCE, password="-") as src:
        started = time.perf_counter()
        sent = src.push_frame(
            data, connection="PLC", measurement="Press", timestamp_column="time", tag_columns=["MachineName"]
        )
        assert sent == n
        report(started)


def child(argv: list[str]) -> None:
    scenario, port, n = argv[0], int(argv[1]), int(argv[2])
    ca_file = argv[3] if len(argv) > 3 else None
    qos = 0 if scenario.endswith("0") else 1
    sync = scenario.removeprefix("cm_m1_") if scenario.startswith("cm_m1_") else None
    field_level = "_f" in scenario
    if scenario.startswith("paho_loop0"):
        run_paho_loop(port, n, ca_file)
    elif scenario.startswith("cm_loop0"):
        run_cm_loop(port, n, ca_file)
    elif scenario == "mosquitto_pub":
        run_mosquitto_pub(port, n)
    elif scenario == "paho_frame":
        run_paho_frame(port, n)
    elif scenario == "cm_frame":
        run_cm_frame(port, n)
    elif scenario.startswith("paho"):
        run_paho(port, n, qos, field_level)
    else:
        run_cm(port, n, qos, field_level, sync)


def main() -> int:
    from capture_mqtt.testing import UNLIMITED, Mosquitto

    RESULTS.mkdir(exist_ok=True)
    rows: dict[str, dict[str, float]] = {}
    with Mosquitto(anonymous=True, tls=True, websockets=False, limits=UNLIMITED) as broker:
        for scenario, (_, kind) in SCENARIOS.items():
            n = FRAME_ROWS if kind == "frame" else PUSHES
            runs = []
            tls = scenario.endswith("_tls")
            port = broker.mqtts_port if tls else broker.mqtt_port
            for _ in range(REPEATS):
                done = subprocess.run(
                    [sys.executable, __file__, "--child", scenario, str(port), str(n)]
                    + ([str(broker.ca_file)] if tls else []),
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=HERE.parent,
                )
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            seconds = statistics.median(r["seconds"] for r in runs)
            rows[scenario] = {
                "messages": n,
                "rate": n / seconds,
                "seconds": seconds,
                "rss_mb": max(r["rss_mb"] for r in runs),
            }
            print(f"  {scenario:11} {rows[scenario]['rate']:>10,.0f} rows/s", file=sys.stderr, flush=True)
        syscalls = write_syscalls(broker.mqtt_port)
    print(f"\npush benchmark: {PUSHES:,} pushes (push_frame: {FRAME_ROWS:,} rows), median of {REPEATS}, one Mosquitto")
    print(f"{'scenario':46} {'rows/s':>10} {'vs paho':>8} {'seconds':>8} {'peak RSS':>9}")
    table = []
    for scenario, (label, _) in SCENARIOS.items():
        current = rows[scenario]
        base = BASELINE.get(scenario)
        ratio = current["rate"] / rows[base]["rate"] if base in rows else None
        table.append({"scenario": scenario, "label": label, **current, "ratio": ratio, "baseline": base})
        ratio_text = f"{ratio:7.1f}x" if ratio else f"{'':8}"
        print(f"{label:46} {current['rate']:>10,.0f} {ratio_text} {current['seconds']:8.2f} {current['rss_mb']:7.0f}MB")
    if "cm_m0" in rows and "mosquitto_pub" in rows:
        ceiling = rows["cm_m0"]["rate"] / rows["mosquitto_pub"]["rate"]
        print(f"push() QoS 0 at {ceiling:.0%} of mosquitto_pub -l's rate")
    for sync in ("batch", "always", "never"):
        if f"cm_m1_{sync}" in rows and "cm_m1" in rows:
            share = rows[f"cm_m1_{sync}"]["rate"] / rows["cm_m1"]["rate"]
            print(f"push() QoS 1 with a durable outbox (sync={sync!r}) at {share:.0%} of the in-memory rate")
    print(f"write syscalls for {SYSCALL_PUBLISHES:,} QoS 0 publish() calls (strace -c): {syscalls}")
    if ONLY:
        return 0  # a subset does not replace the recorded results
    (RESULTS / "push.json").write_text(
        json.dumps(
            {
                "pushes": PUSHES,
                "frame_rows": FRAME_ROWS,
                "rows": table,
                "push_qos0_vs_mosquitto_pub": ceiling,
                "write_syscalls_per_10k_qos0": syscalls,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        sys.exit(main())
