"""The durable outbox: what a device pushed reaches Capture across crashes, restarts and outages."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

import capture_mqtt as cm
from capture_mqtt.testing import BrokerLimits, Mosquitto, wait_until

from .conftest import PASSWORDS, SOURCE_ID, capture_accounts, connect

# A device: pushes field values START..COUNT-1 at QoS 1 through a durable outbox, printing each
# value once push() returned (the record is then on disk), and waits for the acknowledgements.
DEVICE = """
import sys, time, capture_mqtt as cm
port, outbox, start, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with cm.SourceClient("127.0.0.1", transport="mqtt", port=port, source_id=sys.argv[5], password=sys.argv[6],
                     outbox=outbox, reconnect=cm.Reconnect(0.05, 0.5)) as src:  # connects in the background
    print("replayed", src.outbox_stats["replayed"], flush=True)
    for i in range(start, count):
        src.push_field("Conn", "Outbox", "V", i, wait=False)
        print(i, flush=(i % 50 == 0))
    sys.stdout.flush()
    if len(sys.argv) > 7:  # wait until everything was acknowledged
        deadline = time.monotonic() + 120
        while src.outbox_stats["records"] and time.monotonic() < deadline:
            time.sleep(0.05)
        print("drained", src.outbox_stats["records"], flush=True)
"""


def source(broker: Mosquitto, outbox: Path, **options: Any) -> cm.SourceClient:
    """A device in this process, with the durable outbox ``outbox``."""
    return cm.SourceClient(
        "127.0.0.1",
        transport="mqtt",
        port=broker.mqtt_port,
        source_id=SOURCE_ID,
        password=PASSWORDS[SOURCE_ID],
        outbox=outbox,
        **options,
    )


def device(broker: Mosquitto, outbox: Path, start: int, count: int, *, drain: bool = False) -> subprocess.Popen[str]:
    args = [str(broker.mqtt_port), str(outbox), str(start), str(count), SOURCE_ID, PASSWORDS[SOURCE_ID]]
    return subprocess.Popen(
        [sys.executable, "-c", DEVICE, *args, *(["drain"] if drain else [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def last_pushed(output: str, start: int) -> int:
    """The next value to push after a device's output (what it printed was on disk)."""
    numbers = [int(line) for line in output.splitlines() if line.isdigit()]  # not "replayed N"
    return max([start - 1, *numbers]) + 1


@pytest.fixture
def roomy_broker() -> Iterator[Mosquitto]:
    # The listener must not lose at the broker what these tests count.
    with Mosquitto(
        accounts=capture_accounts(), tls=False, websockets=False, limits=BrokerLimits(queued=1_000_000)
    ) as b:
        yield b


class Listener:
    """Capture's server side, as far as these tests go: every value pushed, in arrival order."""

    def __init__(self, broker: Mosquitto, *, start: bool = False) -> None:
        if start:
            broker.start()
        self.values: list[int] = []
        self.client = connect(broker, "pipeline")
        self.sub = self.client.subscribe(
            f"v1/sources/{SOURCE_ID}/data/read/#", decode="bytes", qos=1, queue_size=1_000_000, callback=self._take
        )

    def _take(self, message: cm.Message) -> None:
        import json

        data = json.loads(message.payload)
        # Field level ({"Value": ...}), or measurement level with the field V.
        self.values.append(int(data["Value"] if "Value" in data else data["Fields"]["V"]))

    def close(self) -> None:
        self.sub.close()
        self.client.close()


def check_every_value_once_in_order(values: list[int], count: int) -> int:
    """Every value arrived; first arrivals in order; returns the duplicates (allowed by QoS 1)."""
    first: list[int] = []
    seen: set[int] = set()
    for value in values:
        if value not in seen:
            seen.add(value)
            first.append(value)
    assert seen == set(range(count)), f"missing {sorted(set(range(count)) - seen)[:10]}"
    assert first == sorted(first), "first arrivals out of order"
    return len(values) - len(first)


def test_a_device_killed_again_and_again_loses_nothing(roomy_broker: Mosquitto, tmp_path: Path) -> None:
    count = int(os.environ.get("OUTBOX_KILL_MESSAGES", "100000"))
    kills = int(os.environ.get("OUTBOX_KILLS", "10"))
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    listener = Listener(roomy_broker)
    rng = random.Random(7)  # noqa: S311 - moments to kill at, not secrets
    start = 0
    starts = []
    try:
        for _ in range(kills):
            child = device(roomy_broker, outbox, start, count)
            time.sleep(rng.uniform(0.4, 1.2))  # a random moment: starting, replaying or pushing
            child.send_signal(signal.SIGKILL)
            output, _ = child.communicate(timeout=30)
            start = last_pushed(output, start)
            starts.append(start)
        assert any(0 < s < count for s in starts), f"no kill came mid-stream: {starts}"
        child = device(roomy_broker, outbox, start, count, drain=True)
        output, errors = child.communicate(timeout=180)
        assert child.returncode == 0, errors
        assert "drained 0" in output, output[-300:] + errors
        wait_until(lambda: len(set(listener.values)) >= count, timeout=60)
        duplicates = check_every_value_once_in_order(listener.values, count)
        print(f"{kills} kills (resumed at {starts}), {count} values, {duplicates} duplicates")
    finally:
        listener.close()


def test_an_outage_across_restarts_loses_nothing(roomy_broker: Mosquitto, tmp_path: Path) -> None:
    count = 50_000
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    listener = Listener(roomy_broker)
    try:
        roomy_broker.stop()  # the plant network is down
        start = 0
        for end in (20_000, 35_000, count):  # the device pushes and restarts twice while it is down
            child = device(roomy_broker, outbox, start, end)
            output, errors = child.communicate(timeout=60)
            assert child.returncode == 0, errors
            start = end
        # The store holds all of them, across the restarts.
        with cm.SourceClient(
            "127.0.0.1", transport="mqtt", source_id=SOURCE_ID, password="-", outbox=outbox, connect=False
        ) as peek:
            assert peek.outbox_stats is not None and peek.outbox_stats["records"] == count
            # The first record was pushed before the three restarts, and is the oldest held.
            age = peek.outbox_stats["oldest_age"]
            assert age is not None and age > 0, peek.outbox_stats
        roomy_broker.start()
        wait_until(lambda: listener.client.is_connected, timeout=30)
        child = device(roomy_broker, outbox, count, count, drain=True)
        output, errors = child.communicate(timeout=120)
        assert f"replayed {count}" in output and "drained 0" in output, output[-300:] + errors
        wait_until(lambda: len(set(listener.values)) >= count, timeout=60)
        check_every_value_once_in_order(listener.values, count)
    finally:
        listener.close()


def test_one_process_per_outbox(roomy_broker: Mosquitto, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    options: dict[str, Any] = {"transport": "mqtt", "port": roomy_broker.mqtt_port, "connect": False}
    with cm.SourceClient("127.0.0.1", source_id=SOURCE_ID, password=PASSWORDS[SOURCE_ID], outbox=outbox, **options):
        script = (
            "import sys, capture_mqtt as cm\n"
            "try:\n"
            "    cm.SourceClient('127.0.0.1', source_id='s', password='p', outbox=sys.argv[1], transport='mqtt',"
            " connect=False)\n"
            "except cm.OutboxError as err:\n"
            "    print(err)\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script, str(outbox)], capture_output=True, text=True, timeout=60, check=False
        )
    assert f"in use by process {os.getpid()}" in done.stdout, done.stdout + done.stderr
    assert "one process per outbox" in done.stdout
    # Once the holder closed, the outbox is free.
    with cm.SourceClient("127.0.0.1", source_id=SOURCE_ID, password=PASSWORDS[SOURCE_ID], outbox=outbox, **options):
        pass


def test_a_damaged_outbox_never_stops_the_device(roomy_broker: Mosquitto, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / "outbox.db").write_bytes(b"someone wrote over the outbox" * 100)
    listener = Listener(roomy_broker)
    try:
        with source(roomy_broker, outbox) as src:
            src.push_field("Conn", "Outbox", "V", 0)
            # Written to the new store, and removed once acknowledged.
            wait_until(lambda: src.outbox_stats is not None and src.outbox_stats["records"] == 0, timeout=10)
            assert src.outbox_stats is not None and src.outbox_stats["unsaved"] == 0
        assert any(p.name.startswith("outbox.damaged-") for p in outbox.iterdir())
        wait_until(lambda: listener.values == [0], timeout=10)
    finally:
        listener.close()


def test_with_an_outbox_a_push_returns_once_on_disk(roomy_broker: Mosquitto, tmp_path: Path) -> None:
    import asyncio

    import pandas as pd

    outbox = tmp_path / "outbox"
    listener = Listener(roomy_broker)
    roomy_broker.stop()  # an outage: nothing is acknowledged
    options: dict[str, Any] = {
        "transport": "mqtt",
        "port": roomy_broker.mqtt_port,
        "source_id": SOURCE_ID,
        "password": PASSWORDS[SOURCE_ID],
        "outbox": outbox,
        "reconnect": cm.Reconnect(0.05, 0.5),
    }
    try:
        with cm.SourceClient("127.0.0.1", **options) as src:
            # On disk is enough: none of these waits for the broker (each would time out otherwise).
            src.push_field("Conn", "Outbox", "V", 0, timeout=1)
            src.push("Conn", "Outbox", {"V": 1}, timeout=1)
            frame = pd.DataFrame({"V": [2, 3, 4]}, index=pd.date_range("2024-11-08", periods=3, freq="s", tz="UTC"))
            assert src.push_frame(frame, connection="Conn", measurement="Outbox", timeout=1) == 3
            # Asked to, a push still waits for the broker.
            with pytest.raises(cm.TimeoutError):
                src.push_field("Conn", "Outbox", "V", 5, wait=True, timeout=0.3)
            assert src.outbox_stats is not None and src.outbox_stats["records"] == 6

        async def async_device() -> None:
            async with cm.AsyncSourceClient("127.0.0.1", **options) as src:
                await asyncio.wait_for(src.push_field("Conn", "Outbox", "V", 6, timeout=1), 5)
                # The six from before go out first; then all seven are acknowledged and removed.
                stats = src.outbox_stats
                assert stats is not None and stats["records"] >= 1
                await asyncio.to_thread(wait_until, lambda: (src.outbox_stats or {"records": 1})["records"] == 0, 30)

        roomy_broker.start()
        wait_until(lambda: listener.client.is_connected, timeout=30)
        asyncio.run(async_device())
        wait_until(lambda: len(set(listener.values)) >= 7, timeout=30)
        check_every_value_once_in_order(listener.values, 7)
    finally:
        listener.close()


@pytest.mark.parametrize("offline", ["raise", "drop_oldest", "block"])
def test_outbox_max_bytes_bounds_the_outbox_under_the_offline_policy(
    offline: Literal["raise", "drop_oldest", "block"],
    roomy_broker: Mosquitto,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    roomy_broker.stop()  # an outage: nothing is acknowledged, so the outbox fills
    options: dict[str, Any] = {
        "transport": "mqtt",
        "port": roomy_broker.mqtt_port,
        "source_id": SOURCE_ID,
        "password": PASSWORDS[SOURCE_ID],
        "outbox": tmp_path / "outbox",
        "reconnect": cm.Reconnect(0.05, 0.5),
    }
    with cm.SourceClient("127.0.0.1", **(options | {"outbox": tmp_path / "measure"})) as measure:
        measure.push_field("Conn", "Outbox", "V", 10)  # the size of one of these messages
        size = (measure.outbox_stats or {"bytes": 0})["bytes"]
    with cm.SourceClient("127.0.0.1", outbox_max_bytes=20 * size, offline=offline, **options) as src:
        if offline == "raise":
            for value in range(10, 30):
                src.push_field("Conn", "Outbox", "V", value)
            with pytest.raises(cm.QueueFullError, match="would pass outbox_max_bytes="):
                src.push_field("Conn", "Outbox", "V", 30)
        elif offline == "drop_oldest":
            for value in range(10, 100):
                src.push_field("Conn", "Outbox", "V", value)
            # Said once (then at most every few seconds with a count), not once per drop.
            wait_until(lambda: "its oldest message was dropped" in caplog.text)
            assert caplog.text.count("its oldest message was dropped") == 1
        else:  # block: a push waits for room, up to its timeout, and says what is full
            for value in range(10, 30):
                src.push_field("Conn", "Outbox", "V", value, timeout=0.3)
            with pytest.raises(cm.TimeoutError, match=r"within 0\.3 s: the durable outbox holds outbox_max_bytes="):
                src.push_field("Conn", "Outbox", "V", 30, timeout=0.3)
        stats = src.outbox_stats
        assert stats is not None and stats["records"] == 20 and stats["bytes"] == 20 * size, stats
        assert stats["dropped"] == (90 - 20 if offline == "drop_oldest" else 0)
    # The device restarts once the broker is back: what the outbox held arrives, the oldest under
    # raise and block, the newest under drop_oldest.
    listener = Listener(roomy_broker, start=True)
    try:
        with cm.SourceClient("127.0.0.1", **options) as src:
            wait_until(lambda: (src.outbox_stats or {"records": 1})["records"] == 0, timeout=30)
        expected = list(range(80, 100)) if offline == "drop_oldest" else list(range(10, 30))
        wait_until(lambda: len(listener.values) >= 20, timeout=30)
        assert listener.values == expected
    finally:
        listener.close()


def test_max_queued_bounds_only_what_is_kept_in_memory(roomy_broker: Mosquitto, tmp_path: Path) -> None:
    import math

    roomy_broker.stop()  # an outage: the outbox holds more than max_queued
    with source(roomy_broker, tmp_path / "outbox", max_queued=5, offline="raise") as src:
        for value in range(30):
            src.push_field("Conn", "Outbox", "V", value, timeout=math.inf)  # no timeout at all is fine
        # QoS 0 is kept in memory only: max_queued counts those, not the 30 on disk.
        for value in range(5):
            src.push_field("Conn", "Outbox", "Q", value, qos=0)
        with pytest.raises(cm.QueueFullError, match="max_queued"):
            src.push_field("Conn", "Outbox", "Q", 5, qos=0)
        stats = src.outbox_stats
        assert stats is not None and stats["records"] == 30
        assert src.stats["queued"] == 35


# A device whose disk fills up: it pushes through a full disk (the store refuses), then the disk has
# room again. "fill" fills the outbox's file system (a small tmpfs) with a file; "rlimit" caps the size
# of the files this process may write (RLIMIT_FSIZE), the same for SQLite as a full disk.
FULL_DISK_DEVICE = """
import errno, json, logging, os, resource, sys, time, capture_mqtt as cm
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
port, outbox, mode = int(sys.argv[1]), sys.argv[2], sys.argv[5]
def drained(src):
    deadline = time.monotonic() + 30
    while src.outbox_stats["records"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return src.outbox_stats["records"] == 0
with cm.SourceClient("127.0.0.1", transport="mqtt", port=port, source_id=sys.argv[3], password=sys.argv[4],
                     outbox=outbox) as src:
    src.push_field("Conn", "Outbox", "V", 0, timeout=30)
    assert drained(src)
    filler = os.path.join(outbox, "filler")
    if mode == "fill":
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"x" * 65536)
                    f.flush()
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
    else:
        biggest = max(os.path.getsize(os.path.join(outbox, n)) for n in os.listdir(outbox))
        resource.setrlimit(resource.RLIMIT_FSIZE, (biggest, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    handles = [src.push_field("Conn", "Outbox", "V", i, wait=False) for i in range(1, 501)]
    for handle in handles:
        handle.wait(30)
    full = dict(src.outbox_stats)
    if mode == "fill":
        os.remove(filler)
    else:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    for i in range(501, 511):
        src.push_field("Conn", "Outbox", "V", i, timeout=30)
    assert drained(src)
    print(json.dumps({"full": full, "after": dict(src.outbox_stats)}), flush=True)
"""


@pytest.mark.parametrize("mode", ["fill", "rlimit"])
def test_a_full_disk_never_stops_the_device(mode: str, roomy_broker: Mosquitto, tmp_path: Path) -> None:
    import json

    outbox = tmp_path / "outbox"
    outbox.mkdir()
    if mode == "fill":
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(outbox)], capture_output=True, text=True, check=False
        )
        if mounted.returncode != 0:
            # Mounting needs root (make test runs as root on a fresh machine); the rlimit case covers
            # the same path without it and always runs.
            pytest.skip(f"a small tmpfs needs mount (root): {mounted.stderr.strip()}; the rlimit case runs instead")
    listener = Listener(roomy_broker)
    try:
        args = [str(roomy_broker.mqtt_port), str(outbox), SOURCE_ID, PASSWORDS[SOURCE_ID], mode]
        done = subprocess.run(
            [sys.executable, "-c", FULL_DISK_DEVICE, *args], capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr
        stats = json.loads(done.stdout.strip().splitlines()[-1])
        # Every push went on, kept in memory while the disk was full, and counted.
        assert stats["full"]["unsaved"] > 0, stats
        assert stats["after"]["unsaved"] == stats["full"]["unsaved"]
        assert stats["after"]["records"] == 0
        wait_until(lambda: len(set(listener.values)) >= 511, timeout=30)
        check_every_value_once_in_order(listener.values, 511)
        # Reported once when the store failed, and once when it took records again; not per push.
        warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
        failed = [line for line in warnings if "kept in memory only until the broker" in line]
        again = [line for line in warnings if "stores again" in line]
        assert len(failed) == 1 and len(again) == 1, done.stderr
        # Removing acknowledged records may fail on the full disk too: then once, and once when it works.
        unremoved = [line for line in warnings if "cannot remove" in line]
        removes_again = [line for line in warnings if "removes acknowledged records again" in line]
        assert len(unremoved) == len(removes_again) <= 1, done.stderr
        if mode == "fill":
            assert "disk of the outbox" in failed[0] and "is full" in failed[0], failed[0]
        assert f"{stats['full']['unsaved']} push(es)" in again[0]
    finally:
        listener.close()
        if mode == "fill":
            subprocess.run(["umount", str(outbox)], check=False)
