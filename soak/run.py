"""``make soak``: the reliability scenarios at full size; prints the figures and writes them into
docs/reliability.md. Sizes come from the environment (defaults in brackets): SOAK_MESSAGES [100000],
SOAK_RESTARTS [10], SOAK_EXIT_RUNS [100], SOAK_LOAD_SECONDS [60], SOAK_SLOW_SECONDS [60].

    python -m soak.run
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from soak import scenarios

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
FIGURES = Path(__file__).resolve().parent.parent / "target" / "soak-figures.json"


def _env(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def main() -> int:
    messages = int(_env("SOAK_MESSAGES", 100_000))
    restarts = int(_env("SOAK_RESTARTS", 10))
    runs = int(_env("SOAK_EXIT_RUNS", 100))
    load_seconds = _env("SOAK_LOAD_SECONDS", 60)
    slow_seconds = _env("SOAK_SLOW_SECONDS", 60)
    figures: dict[str, Any] = {}
    plan: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("restarts_sigterm", lambda: scenarios.broker_restarts(messages, restarts, kill=False)),
        ("restarts_sigkill", lambda: scenarios.broker_restarts(messages, restarts, kill=True)),
        ("stall", scenarios.stall),
        ("jwt_rotation", scenarios.jwt_rotation),
        ("exits", lambda: scenarios.exits(runs)),
        ("load", lambda: scenarios.load(load_seconds)),
        ("slow_consumer", lambda: scenarios.slow_consumer(slow_seconds)),
    ]
    started = time.monotonic()
    for name, run in plan:
        began = time.monotonic()
        figures[name] = run()
        figures[name]["took_s"] = round(time.monotonic() - began, 1)
        print(f"{name}: {json.dumps(figures[name], default=str)}", flush=True)
        # Kept as they come, so that a failure later loses nothing.
        FIGURES.write_text(json.dumps(figures, indent=1, default=str))
    verdicts = verdict(figures)
    for line in verdicts:
        print(line)
    write_doc(figures, verdicts, time.monotonic() - started)
    return 0 if all(line.startswith("ok") for line in verdicts) else 1


def verdict(f: dict[str, Any]) -> list[str]:
    """One line per claim: ``ok`` or ``FAILED``, with the figure behind it."""
    lines = []

    def claim(ok: bool, text: str) -> None:
        lines.append(f"{'ok' if ok else 'FAILED'}: {text}")

    term = f["restarts_sigterm"]
    claim(
        term["lost"] == 0 and not term["push_failures"],
        f"{term['restarts']} broker restarts (SIGTERM) during {term['messages']:,} QoS 1 pushes: "
        f"{term['lost']} lost, {term['duplicates']} duplicates",
    )
    claim(
        term["max_reconnect_s"] <= term["backoff_max_s"] + 1.0,
        f"reconnected at most {term['max_reconnect_s']:.2f} s after the broker was started again (backoff max "
        f"{term['backoff_max_s']:g} s)",
    )
    kill = f["restarts_sigkill"]
    claim(
        not kill["push_failures"] and not kill["unexpected"],
        f"{kill['restarts']} broker kills (SIGKILL): every push acknowledged, {kill['lost']:,} of "
        f"{kill['messages']:,} lost inside the killed broker, {kill['duplicates']} duplicates",
    )
    stall = f["stall"]
    noticed = stall["noticed_after_s"]
    claim(
        noticed is not None and noticed <= 1.5 * stall["keepalive_s"] + 0.5,
        f"a {stall['paused_s']:g} s stall noticed after {noticed or float('nan'):.2f} s (keepalive "
        f"{stall['keepalive_s']:g} s), reconnected {stall['reconnected_after_resume_s'] or float('nan'):.3f} s "
        "after the broker resumed",
    )
    jwt = f["jwt_rotation"]
    claim(
        jwt["reconnected"] == jwt["restarts"],
        f"JWT rotation: {jwt['reconnected']} of {jwt['restarts']} reconnects with a fresh token "
        f"({jwt['tokens_issued']} issued)",
    )
    exits = f["exits"]
    for mode in ("exit", "sigint", "sigkill"):
        row = exits[mode]
        clean_needed = mode != "sigkill"
        claim(
            row["hangs"] == 0
            and row["crashes"] == 0
            and (not clean_needed or row["clean_disconnects"] == row["connections"]),
            f"{exits['runs_per_mode']} runs ending by {mode}: {row['hangs']} hangs, {row['crashes']} crashes, "
            f"{row['clean_disconnects']} of {row['connections']} connections closed with DISCONNECT",
        )
    for name, row in f["load"].items():
        if not isinstance(row, dict):
            continue
        claim(
            row["delivered"] == row["expected"]
            and row["rss_end_mb"] - row["rss_start_mb"] < 10
            and row["threads"][1] <= row["threads"][0]
            and row["fds"][1] <= row["fds"][0],
            f"load {name}: {row['delivered']:,} of {row['expected']:,} delivered, RSS {row['rss_start_mb']:.0f} -> "
            f"{row['rss_end_mb']:.0f} MB, threads {row['threads']}, fds {row['fds']}",
        )
    for policy, row in f["slow_consumer"].items():
        if not isinstance(row, dict):
            continue
        blocking = policy.startswith("block")
        drops_ok = row["dropped"] == 0 if blocking else row["dropped"] > 0
        # Every policy is bounded by the client: the queue never passes queue_size.
        bounded = row["peak_queued"] <= row["queue_size"] and row["rss_end_mb"] - row["rss_start_mb"] < 10
        claim(
            row["balanced"] and drops_ok and bounded,
            f"slow consumer, {policy} (queue_size {row['queue_size']:,}): {row['received']:,} received = "
            f"{row['delivered']:,} delivered + "
            f"{row['dropped']:,} dropped + {row['queued']:,} queued (peak {row['peak_queued']:,}); RSS "
            f"{row['rss_start_mb']:.0f} -> "
            f"{row['rss_end_mb']:.0f} MB",
        )
    return lines


def write_doc(figures: dict[str, Any], verdicts: list[str], seconds: float) -> None:
    text = DOC.read_text() if DOC.exists() else "<!-- soak:start -->\n<!-- soak:end -->\n"
    block = (
        "<!-- soak:start -->\n"
        f"Last `make soak`: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {seconds / 60:.1f} minutes, "
        "2 cores.\n\n"
        + "\n".join(f"- {line}" for line in verdicts)
        + "\n\n<details><summary>All figures (JSON)</summary>\n\n```json\n"
        + json.dumps(figures, indent=1, default=str)
        + "\n```\n</details>\n<!-- soak:end -->"
    )
    text = re.sub(r"<!-- soak:start -->.*<!-- soak:end -->", lambda _: block, text, flags=re.S)
    DOC.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
