"""``capture-mqtt demo`` (and ``make demo``): a local Capture, a simulated plant, a user watching the live
stream, a command answered, and a pandas summary of what arrived. It stops by itself and leaves
nothing running."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import capture_mqtt as cm

__all__ = ["run_demo"]

LIVE_KEYS = ("Temperature", "Pressure", "Speed", "State", "Setpoint")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def run_demo(seconds: float = 12.0, sources: int = 3, rate: float = 5.0, out: TextIO | None = None) -> int:
    """Runs the demo for ``seconds`` and prints as it goes; Ctrl-C ends the watching early and still
    prints the summary. Returns the exit status (0, or 1 when no data arrived).

    >>> from capture_mqtt.demo import run_demo
    >>> import io
    >>> text = io.StringIO()
    >>> run_demo(seconds=2, sources=1, rate=5, out=text)
    0
    >>> "rows per machine and key" in text.getvalue()
    True
    """
    from .testing import CaptureEmulator
    from .testing.plant import SimulatedPlant

    out = out or sys.stdout

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    say("Starting a local Capture emulator (Mosquitto with Capture's listeners, accounts and server side)...")
    points: list[Any] = []
    with CaptureEmulator() as emu:
        acme = emu.add_company("AcmeCorp")
        alice = emu.add_user(acme, "alice")
        say(f"  mqtts://127.0.0.1:{emu.mqtts_port}  wss://127.0.0.1:{emu.wss_port}/mqtt  (CA: {emu.ca_file})")
        with (
            SimulatedPlant(emu, acme, sources=sources, rate=rate) as plant,
            emu.client(alice) as client,
            client.subscribe_raw(qos=1) as sub,
        ):
            say(
                f"Plant: {sources} presses pushing Temperature, Pressure, Speed and State {rate:g} times a second; "
                f"user 'alice' subscribed to {sub.filter}"
            )
            say()
            say(f"{'t':>4}  {'machine':<8}" + "".join(f"{key:>13}" for key in LIVE_KEYS) + f"{'points':>9}")
            latest: dict[tuple[str, str], Any] = {}
            started = time.monotonic()
            next_print = started + 1.0
            command_at = started + seconds / 2
            target = plant.machines[0]
            try:
                while (now := time.monotonic()) < started + seconds:
                    point = sub.get(timeout=0.1)
                    if point is not None:
                        points.append(point)
                        machine = point.tags.get("MachineName", "?")
                        latest[(machine, point.key)] = point.value
                        if point.key == "Setpoint":
                            say(f"      <- {machine} answered: Setpoint is now {point.value}")
                    if command_at and now >= command_at:
                        client.send_command(target.source.source_id, "PLC/Process/Setpoint", 95)
                        say(f"      -> alice sent writedata PLC/Process/Setpoint = 95 to {target.name}")
                        command_at = 0.0
                    if now >= next_print:
                        for m in plant.machines:
                            cells = "".join(f"{_cell(latest.get((m.name, key))):>13}" for key in LIVE_KEYS)
                            say(f"{now - started:>3.0f}s  {m.name:<8}{cells}{len(points):>9}")
                        next_print += 1.0
            except KeyboardInterrupt:
                say("(stopped early)")
        stats = emu.stats
    say()
    say(f"{len(points)} data points arrived; the emulator republished {stats['republished_pushes']} pushes.")
    if not points:
        say("No data arrived: see the warnings above.")
        return 1
    _summary(points, say)
    say("Everything is stopped. Next: README.md, notebooks/, `capture-mqtt --help`.")
    return 0


def _summary(points: list[Any], say: Any) -> None:
    try:
        frame = cm.Batch.from_points(points, tag_columns=["MachineName"]).to_pandas()
    except ImportError as err:
        say(f"(no pandas summary: {err})")
        return
    import pandas as pd

    numeric = frame[frame["value"].notna()]
    table = numeric.groupby(["MachineName", "key"])["value"].agg(["count", "mean", "min", "max"]).round(2)
    say("rows per machine and key (numeric values), as a pandas DataFrame from one columnar batch:")
    with pd.option_context("display.width", 120):
        say(table.to_string())
    states = frame[frame["key"] == "State"].groupby("MachineName")["value_text"].value_counts().unstack(fill_value=0)
    if len(states):
        say()
        say("State samples per machine:")
        say(states.to_string())
