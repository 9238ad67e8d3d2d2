"""One table for the whole suite: reads what bench_receive, bench_push and bench_live wrote to
results/ in this run, checks each target of the performance issue, and writes summary.json and
summary.png.

    python benchmarks/report.py
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        sys.exit(f"{path} is missing: run `make bench` (it runs every benchmark, then this report)")
    return dict(json.loads(path.read_text()))


def _by_scenario(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["scenario"]: row for row in rows}


Row = dict[str, Any]


def build() -> list[Row]:
    receive = _by_scenario(_load("receive")["rows"])
    push = _by_scenario(_load("push")["rows"])
    live = _load("live")
    latency = _by_scenario(live["latency"])
    slow = _by_scenario(live["slow"])
    ceiling = receive["broker"]["rate"]
    rows: list[Row] = []

    def rate(
        name: str, ours: Row, paho: Row | None, aio: Row | None, *, target: float, share_target: float = 0
    ) -> None:
        base = aio if paho is None else paho
        assert base is not None
        ratio = ours["rate"] / base["rate"]
        share = ours["rate"] / ceiling if share_target or "receive" in name else None
        met = ratio >= target and (share is None or share >= share_target)
        wanted = f">= {target:g}x" + (f", >= {share_target:.0%} of ceiling" if share_target else "")
        rows.append(
            {
                "scenario": name,
                "unit": "msg/s",
                "paho": paho["rate"] if paho else None,
                "aiomqtt": aio["rate"] if aio else None,
                "capture_mqtt": ours["rate"],
                "ratio": ratio,
                "share_of_ceiling": share,
                "target": wanted,
                "met": met,
            }
        )

    rate("receive, sync iterator", receive["cm_iter"], receive["paho"], None, target=4)
    rate("receive, callback", receive["cm_callback"], receive["paho"], None, target=4)
    rate("receive, async for", receive["cm_async"], None, receive["aiomqtt"], target=5)
    rate("receive, batches -> pandas", receive["cm_frame"], receive["paho_frame"], None, target=5, share_target=0.75)
    rate("push measurement, QoS 0", push["cm_m0"], push["paho_m0"], None, target=5)
    rate("push measurement, QoS 1", push["cm_m1"], push["paho_m1"], None, target=5)
    rate("push field, QoS 1", push["cm_f1"], push["paho_f1"], None, target=5)
    rate("push_frame 1M rows, QoS 1", push["cm_frame"], push["paho_frame"], None, target=20)
    rate("publish() loop, QoS 0", push["cm_loop0"], push["paho_loop0"], None, target=2)
    rate("publish() loop, QoS 0, TLS", push["cm_loop0_tls"], push["paho_loop0_tls"], None, target=2)
    push_data = _load("push")
    share = push_data["push_qos0_vs_mosquitto_pub"]
    rows.append(
        {
            "scenario": "push QoS 0 vs mosquitto_pub -l",
            "unit": "share",
            "paho": None,
            "aiomqtt": None,
            "capture_mqtt": push["cm_m0"]["rate"],
            "ratio": share,
            "share_of_ceiling": share,
            "target": ">= 80% of mosquitto_pub -l",
            "met": share >= 0.8,
        }
    )
    syscalls = push_data["write_syscalls_per_10k_qos0"]
    if syscalls is not None:
        rows.append(
            {
                "scenario": "write syscalls, 10,000 QoS 0 publishes",
                "unit": "calls",
                "paho": None,
                "aiomqtt": None,
                "capture_mqtt": syscalls,
                "ratio": None,
                "share_of_ceiling": None,
                "target": "<= 100",
                "met": syscalls <= 100,
            }
        )

    def latency_row(name: str, ours: str, base: str) -> None:
        for quantile in ("p50", "p99"):
            mine, theirs = latency[ours][f"{quantile}_ms"], latency[base][f"{quantile}_ms"]
            rows.append(
                {
                    "scenario": f"latency {quantile} at 2k/s, {name}",
                    "unit": "ms",
                    "paho": theirs if base == "paho" else None,
                    "aiomqtt": theirs if base == "aiomqtt" else None,
                    "capture_mqtt": mine,
                    "ratio": theirs / mine,
                    "share_of_ceiling": None,
                    "target": f"<= {base}",
                    "met": mine <= theirs,
                }
            )

    latency_row("callback", "cm_callback", "paho")
    latency_row("iterator", "cm_iter", "paho")
    latency_row("async for", "cm_async", "aiomqtt")

    def memory_row(name: str, ours: float, paho: float, met: bool, target: str) -> None:
        rows.append(
            {
                "scenario": name,
                "unit": "MB",
                "paho": paho,
                "aiomqtt": None,
                "capture_mqtt": ours,
                "ratio": paho / ours if ours > 0 else None,
                "share_of_ceiling": None,
                "target": target,
                "met": met,
            }
        )

    peaks = [
        ("peak RSS, receive 100k", receive["cm_iter"], receive["paho"]),
        ("peak RSS, batches -> pandas", receive["cm_frame"], receive["paho_frame"]),
        ("peak RSS, push_frame 1M rows", push["cm_frame"], push["paho_frame"]),
    ]
    for name, ours, paho in peaks:
        memory_row(name, ours["rss_mb"], paho["rss_mb"], ours["rss_mb"] <= paho["rss_mb"], "<= paho")
    cm_slow = slow["cm_slow"]
    memory_row(
        "RSS growth, consumer 10x too slow",
        cm_slow["rss_last_mb"] - cm_slow["rss_first_mb"],
        slow["paho_slow"]["rss_last_mb"] - slow["paho_slow"]["rss_first_mb"],
        cm_slow["rss_last_mb"] - cm_slow["rss_first_mb"] <= 2,
        "flat (< 2 MB)",
    )
    return rows


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "msg/s":
        return f"{value:,.0f}"
    return f"{value:.3f}" if unit == "ms" else f"{value:.0f}"


def _ratio(row: Row) -> str:
    if row["ratio"] is None:
        return "-"
    return f"{row['ratio']:.1f}x" if row["unit"] == "msg/s" else f"{row['ratio']:.2f}x"


def main() -> int:
    rows = build()
    columns: list[tuple[str, int, Callable[[Row], str]]] = [
        ("scenario", 36, lambda r: r["scenario"]),
        ("unit", 5, lambda r: r["unit"]),
        ("paho-mqtt", 10, lambda r: _number(r["paho"], r["unit"])),
        ("aiomqtt", 9, lambda r: _number(r["aiomqtt"], r["unit"])),
        ("capture-mqtt", 12, lambda r: _number(r["capture_mqtt"], r["unit"])),
        ("x better", 8, _ratio),
        ("ceiling", 7, lambda r: "-" if r["share_of_ceiling"] is None else f"{r['share_of_ceiling']:.0%}"),
        ("target", 27, lambda r: r["target"]),
        ("met", 3, lambda r: "yes" if r["met"] else "NO"),
    ]
    print("\ncapture-mqtt against paho-mqtt and aiomqtt, same Mosquitto per benchmark, this run")
    print(" ".join(name.ljust(width) if i == 0 else name.rjust(width) for i, (name, width, _) in enumerate(columns)))
    for row in rows:
        print(" ".join(fn(row).ljust(w) if i == 0 else fn(row).rjust(w) for i, (_, w, fn) in enumerate(columns)))
    met = sum(row["met"] for row in rows)
    print(f"\n{met} of {len(rows)} targets met; table in {RESULTS / 'summary.json'}, chart in summary.png")
    (RESULTS / "summary.json").write_text(json.dumps(rows, indent=1))
    chart(rows)
    return 0


def chart(rows: list[Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["unit"] == "msg/s"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [r["scenario"] for r in shown]
    ax.barh(names, [r["ratio"] for r in shown], color=["tab:green" if r["met"] else "tab:orange" for r in shown])
    for i, r in enumerate(shown):
        ax.text(r["ratio"], i, f" {r['ratio']:.1f}x", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("capture-mqtt throughput / pure-Python client (paho-mqtt; aiomqtt for async for)")
    ax.set_title("capture-mqtt vs pure-Python MQTT clients, same Mosquitto (green: target met)")
    fig.tight_layout()
    fig.savefig(RESULTS / "summary.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
