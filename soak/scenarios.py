"""Reliability scenarios: broker faults, stalls, expiring credentials, process exits, load and slow
consumers. Each returns its figures as a dict; ``soak/run.py`` runs them at full size (``make soak``)
and writes ``docs/reliability.md``; ``tests/test_reliability.py`` runs them small in ``make test``."""

from __future__ import annotations

import collections
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import psutil

import capture_mqtt as cm
from capture_mqtt.testing import BrokerLimits, CaptureEmulator, Mosquitto

Figures = dict[str, Any]


def rss_mb() -> float:
    """This process's resident memory, in MB."""
    return float(psutil.Process().memory_info().rss) / 2**20


def threads_and_fds() -> tuple[int, int]:
    """Threads and open file descriptors (handles, on Windows) of this process."""
    process = psutil.Process()
    if sys.platform == "win32":
        return process.num_threads(), process.num_handles()
    return process.num_threads(), process.num_fds()


class EventLog:
    """Connection events of several clients, with the time each happened."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()

    def recorder(self, name: str) -> Callable[[cm.ConnectionEvent], None]:
        def record(event: cm.ConnectionEvent) -> None:
            with self._lock:
                self.events.append((time.monotonic(), name, event.kind))

        return record

    def first_after(self, name: str, kind: str, since: float) -> float | None:
        with self._lock:
            return next((t for t, who, k in self.events if who == name and k == kind and t >= since), None)


# Faults


def broker_restarts(messages: int, restarts: int, *, kill: bool, seed: int = 1) -> Figures:
    """A source pushes ``messages`` QoS 1 points (a sequence number each) at a steady pace while the
    broker is stopped (SIGTERM: Mosquitto saves its sessions) or killed (SIGKILL: it saves nothing)
    and started again ``restarts`` times at random moments; a user reads the raw tree through a
    persistent QoS 1 session. Counts what arrived, what was lost and what came twice, and how long
    each client took to reconnect once the broker was back."""
    rng = random.Random(seed)
    backoff = cm.Reconnect(min_delay=0.1, max_delay=2.0)
    log = EventLog()
    # The reader is offline while the broker restarts and catches up afterwards: Capture's 1,000
    # queued per client would drop at the broker what this scenario counts, so the broker keeps more.
    with CaptureEmulator(persistence=True, websockets=False, limits=BrokerLimits(queued=1_000_000)) as emu:
        company = emu.add_company("SoakCorp")
        user, source = emu.add_user(company, "soak-user"), emu.add_source(company)
        reader = cm.Client(
            **user.client_options("mqtt"),
            client_id="soak-user-session",
            clean_session=False,
            reconnect=backoff,
            connect=False,
            on_event=log.recorder("user"),
        )
        sub = reader.subscribe_raw(qos=1, queue_size=1_000_000)
        reader.connect()
        device = emu.source_client(
            source, "mqtt", reconnect=backoff, max_queued=1_000_000, on_event=log.recorder("source")
        )
        seen: collections.Counter[int] = collections.Counter()
        failures: list[str] = []
        duration = max(2.0, restarts * 1.3)

        def push_all() -> None:
            handles: collections.deque[Any] = collections.deque()
            started = time.monotonic()
            try:
                for seq in range(messages):
                    if seq % 200 == 0:
                        time.sleep(max(0.0, started + duration * seq / messages - time.monotonic()))
                    handles.append(device.push_field("PLC", "Soak", "Seq", seq, qos=1, wait=False))
                    while len(handles) > 20_000:
                        handles.popleft().wait(120)
                for handle in handles:
                    handle.wait(120)
            except cm.CaptureError as err:
                failures.append(f"push failed: {type(err).__name__}: {err}")

        def receive_all() -> None:
            quiet_since = time.monotonic()
            while len(seen) < messages and time.monotonic() - quiet_since < 10:
                point = sub.get(timeout=0.5)
                if point is not None:
                    seen[int(point.value)] += 1
                    quiet_since = time.monotonic()

        pusher = threading.Thread(target=push_all, name="soak-pusher")
        receiver = threading.Thread(target=receive_all, name="soak-receiver")
        receiver.start()
        pusher.start()
        back_at: list[float] = []
        while len(back_at) < restarts:
            time.sleep(rng.uniform(0.3, 1.0))
            if kill:
                emu.broker.kill()
            else:
                emu.broker.stop()
            time.sleep(rng.uniform(0.1, 0.6))
            # Timed from the start command: a client may be back before start() has returned.
            back_at.append(time.monotonic())
            emu.broker.start()
        pusher.join()
        receiver.join()
        delays = []
        for when in back_at:
            for name in ("user", "source"):
                connected = log.first_after(name, "connected", when)
                if connected is not None:
                    delays.append(connected - when)
        stats = {"user": reader.stats, "source": device.stats}
        reader.close()
        device.close()
    received = sum(seen.values())
    return {
        "messages": messages,
        "restarts": len(back_at),
        "signal": "SIGKILL" if kill else "SIGTERM",
        "received": len(seen),
        "lost": messages - len(seen),
        "duplicates": received - len(seen),
        "unexpected": sorted(set(seen) - set(range(messages)))[:5],
        "push_failures": failures,
        "max_reconnect_s": max(delays, default=float("nan")),
        "reconnects_seen": len(delays),
        "backoff_max_s": backoff.max_delay,
        "client_stats": stats,
    }


def stall(keepalive: float = 2.0, pause: float = 6.0) -> Figures:
    """The broker freezes (SIGSTOP) for longer than the keepalive: how long the client takes to notice,
    and to reconnect once the broker resumes."""
    log = EventLog()
    with (
        Mosquitto(anonymous=True, tls=False, websockets=False) as broker,
        cm.Client(
            broker.host,
            transport="mqtt",
            port=broker.mqtt_port,
            keepalive=keepalive,
            reconnect=cm.Reconnect(min_delay=0.1, max_delay=1.0),
            on_event=log.recorder("client"),
        ) as client,
    ):
        broker.pause()
        paused = time.monotonic()
        time.sleep(pause)
        # Timed from the resume command: the client's pending CONNECT can be answered before
        # resume() returns.
        resumed = time.monotonic()
        broker.resume()
        deadline = resumed + 15
        while not client.is_connected and time.monotonic() < deadline:
            time.sleep(0.01)
        noticed = log.first_after("client", "disconnected", paused)
        reconnected = log.first_after("client", "connected", resumed)
        events = [kind for _, _, kind in log.events]
    return {
        "keepalive_s": keepalive,
        "paused_s": pause,
        "noticed_after_s": None if noticed is None else noticed - paused,
        "reconnected_after_resume_s": None if reconnected is None else reconnected - resumed,
        "events": events,
    }


def jwt_rotation(restarts: int = 3) -> Figures:
    """A JWT user's token provider hands out a new token on every call (the old one stops working);
    after each broker restart the client must reconnect with a fresh token."""
    issued: list[str] = []
    with CaptureEmulator(websockets=False) as emu:
        company = emu.add_company("JwtCorp")
        user = emu.add_jwt_user(company, "rotating")

        def provider() -> str:
            token = user.token()
            issued.append(token)
            return token

        options = user.client_options("mqtt")
        options["auth"] = cm.Auth.jwt(user.username, provider)
        reconnected = 0
        with cm.Client(**options, reconnect=cm.Reconnect(min_delay=0.1, max_delay=1.0)) as client:
            for _ in range(restarts):
                emu.broker.restart()
                deadline = time.monotonic() + 15
                time.sleep(0.2)
                while not client.is_connected and time.monotonic() < deadline:
                    time.sleep(0.02)
                reconnected += client.is_connected
    return {"restarts": restarts, "reconnected": reconnected, "tokens_issued": len(issued)}


# Process exits

EXIT_CHILD = textwrap.dedent(
    """
    import sys, capture_mqtt as cm
    port, mode = int(sys.argv[1]), sys.argv[2]
    a = cm.Client("127.0.0.1", transport="mqtt", port=port, client_id=f"exit-a-{sys.argv[3]}", company="ExitCorp")
    b = cm.Client("127.0.0.1", transport="mqtt", port=port, client_id=f"exit-b-{sys.argv[3]}")
    sub = a.subscribe_raw()
    print("ready", flush=True)
    for point in sub:
        if mode == "exit":
            sys.exit(0)  # leaves both clients open
    """
)


def exits(runs: int) -> Figures:
    """Processes with two open clients that exit normally mid-iteration, are interrupted (SIGINT)
    mid-iteration, or are killed (SIGKILL), ``runs`` times each. Counts hangs (no exit within 10 s),
    crashes (a fatal signal, a panic or a traceback other than KeyboardInterrupt), and connections the
    broker saw end without a DISCONNECT in the exit and Ctrl-C cases."""
    figures: Figures = {"runs_per_mode": runs}
    with Mosquitto(anonymous=True, tls=False, websockets=False) as broker:
        stop = threading.Event()

        def stream() -> None:
            with cm.Client(broker.host, transport="mqtt", port=broker.mqtt_port) as publisher:
                topic = cm.raw_topic("ExitCorp", "src", "PLC", "M", "K")
                while not stop.wait(0.01):
                    publisher.publish(topic, cm.field_payload(1), qos=0)

        feeder = threading.Thread(target=stream, daemon=True)
        feeder.start()
        try:
            for mode in ("exit", "sigint", "sigkill"):
                hangs = crashes = 0
                for run in range(runs):
                    ident = f"{mode}-{run}"
                    child = subprocess.Popen(
                        [sys.executable, "-c", EXIT_CHILD, str(broker.mqtt_port), mode, ident],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                    assert child.stdout is not None
                    child.stdout.readline()
                    if mode != "exit":
                        time.sleep(0.05)
                        child.send_signal(signal.SIGINT if mode == "sigint" else signal.SIGKILL)
                    try:
                        _, err = child.communicate(timeout=10)
                    except subprocess.TimeoutExpired:
                        hangs += 1
                        child.kill()
                        child.communicate()
                        continue
                    # Python ends an uncaught KeyboardInterrupt by killing itself with SIGINT, after
                    # its exit handlers ran; any other signal is a crash.
                    expected = {"exit": 0, "sigint": -signal.SIGINT, "sigkill": -signal.SIGKILL}[mode]
                    fatal = child.returncode < 0 and child.returncode != expected
                    bad_text = "panicked" in err or ("Traceback" in err and "KeyboardInterrupt" not in err)
                    crashes += fatal or bad_text
                time.sleep(0.3)  # the broker logs the last disconnects
                log = broker.log_file.read_text(errors="replace")
                clean = sum(
                    f"Client exit-{side}-{mode}-{run} disconnected." in log for run in range(runs) for side in "ab"
                )
                figures[mode] = {
                    "hangs": hangs,
                    "crashes": crashes,
                    "clean_disconnects": clean,
                    "connections": 2 * runs,
                }
        finally:
            stop.set()
            feeder.join(timeout=5)
    return figures


# Load


def load(seconds: float, *, subscriptions: int = 100, clients: int = 50, rate: float = 1_000.0) -> Figures:
    """One client with ``subscriptions`` subscriptions, and ``clients`` clients in this process, under
    a steady stream for ``seconds``: every message delivered, RSS, threads and file descriptors flat."""
    figures: Figures = {}
    with Mosquitto(anonymous=True, tls=False, websockets=False) as broker:
        opts: dict[str, Any] = {"transport": "mqtt", "port": broker.mqtt_port, "company": "LoadCorp"}

        def publish_steadily(client: cm.Client, count: int, topic_of: Callable[[int], str]) -> None:
            started = time.monotonic()
            for i in range(count):
                if i % 50 == 0:
                    time.sleep(max(0.0, started + i / rate - time.monotonic()))
                client.publish(topic_of(i), cm.field_payload(i), qos=1, wait=False)
            client.publish(topic_of(0), cm.field_payload(-1), qos=1)

        def watch(run: Callable[[], None], counters: Callable[[], int], expected: int) -> Figures:
            # Sampled every second; compared from a third of the way in (after warm-up) to the end.
            samples: list[tuple[float, int, int]] = []
            worker = threading.Thread(target=run)
            worker.start()
            while worker.is_alive():
                samples.append((rss_mb(), *threads_and_fds()))
                worker.join(timeout=1.0)
            deadline = time.monotonic() + 30
            while counters() < expected and time.monotonic() < deadline:
                time.sleep(0.05)
            samples.append((rss_mb(), *threads_and_fds()))
            settled = samples[len(samples) // 3 :]
            first, last = settled[0], settled[-1]
            return {
                "expected": expected,
                "delivered": counters(),
                "rss_start_mb": first[0],
                "rss_end_mb": last[0],
                "threads": (first[1], last[1]),
                "fds": (first[2], last[2]),
            }

        count = int(seconds * rate)
        # One client, many subscriptions: each measurement has its own.
        with cm.Client(broker.host, **opts) as subscriber, cm.Client(broker.host, **opts) as publisher:
            got = collections.Counter[int]()
            lock = threading.Lock()

            def counted(index: int) -> Callable[[Any], None]:
                def on_point(point: Any) -> None:
                    with lock:
                        got[index] += 1

                return on_point

            subs = [
                subscriber.subscribe_raw(measurement=f"M{i}", qos=1, callback=counted(i)) for i in range(subscriptions)
            ]
            figures["many_subscriptions"] = watch(
                lambda: publish_steadily(
                    publisher, count, lambda i: cm.raw_topic("LoadCorp", "s", "c", f"M{i % subscriptions}", "k")
                ),
                lambda: sum(got.values()),
                count + 1,
            )
            figures["many_subscriptions"]["subscriptions"] = len(subs)
        # Many clients, each with the whole tree.
        readers = [cm.Client(broker.host, **opts) for _ in range(clients)]
        totals = [0] * clients

        def counter(index: int) -> Callable[[Any], None]:
            def on_point(point: Any) -> None:
                totals[index] += 1

            return on_point

        for index, reader in enumerate(readers):
            reader.subscribe_raw(qos=1, callback=counter(index))
        slower = max(1, int(count / 10))
        with cm.Client(broker.host, **opts) as publisher:
            figures["many_clients"] = watch(
                lambda: publish_steadily(publisher, slower, lambda i: cm.raw_topic("LoadCorp", "s", "c", "M", "k")),
                lambda: sum(totals),
                (slower + 1) * clients,
            )
            figures["many_clients"]["clients"] = clients
        for reader in readers:
            reader.close()
    return figures


def slow_consumer(seconds: float, *, rate: float = 5_000.0, queue_size: int = 1_000) -> Figures:
    """A consumer 10x slower than the stream, under each overflow policy: memory bounded, drops counted
    exactly (received = delivered + dropped + queued), none under ``block`` (QoS 1 waits at the broker)."""
    figures: Figures = {}
    with Mosquitto(anonymous=True, tls=False, websockets=False) as broker:
        opts: dict[str, Any] = {"transport": "mqtt", "port": broker.mqtt_port, "company": "SlowCorp"}
        # Under `block` a full queue stops the client reading the socket, so the broker holds back
        # the rest (and, past its own queue limit, drops at the broker): the client's queue and memory
        # stay within queue_size whatever the broker's in-flight window does (Mosquitto 2.0.11's is
        # broken: each in-order PUBACK releases a whole window).
        cases: list[tuple[str, Any, Literal[3, 5]]] = [
            ("drop_oldest", "drop_oldest", 3),
            ("drop_newest", "drop_newest", 3),
            ("block", "block", 5),
            ("block, MQTT 3.1.1", "block", 3),
        ]
        for name, policy, protocol in cases:
            with (
                cm.Client(broker.host, protocol=protocol, **opts) as reader,
                cm.Client(broker.host, **opts) as publisher,
            ):
                sub = reader.subscribe_raw(qos=1, queue_size=queue_size, overflow=policy)
                count = int(seconds * rate)
                samples: list[float] = []
                handled = 0
                peak_queued = 0

                def publish_all(count: int = count, publisher: cm.Client = publisher) -> None:
                    started = time.monotonic()
                    for i in range(count):
                        if i % 50 == 0:
                            time.sleep(max(0.0, started + i / rate - time.monotonic()))
                        publisher.publish(
                            cm.raw_topic("SlowCorp", "s", "c", "M", "k"), cm.field_payload(i), qos=1, wait=False
                        )

                worker = threading.Thread(target=publish_all)
                worker.start()
                next_sample = time.monotonic()
                while worker.is_alive():
                    if sub.get(timeout=0.1) is not None:
                        handled += 1
                        time.sleep(10 / rate)  # ten times slower than the stream
                    peak_queued = max(peak_queued, sub.stats["queued"])
                    if time.monotonic() >= next_sample:
                        samples.append(rss_mb())
                        next_sample += 1.0
                # The counters are read one by one: count once the last messages have landed.
                previous = -1
                while (stats := sub.stats)["received"] != previous:
                    previous = stats["received"]
                    time.sleep(0.5)
                settled = samples[len(samples) // 3 :] or samples
                figures[name] = {
                    "protocol": protocol,
                    "queue_size": queue_size,
                    "peak_queued": peak_queued,
                    "published": count,
                    "handled": handled,
                    **{k: stats[k] for k in ("received", "delivered", "dropped", "queued")},
                    "balanced": stats["received"] == stats["delivered"] + stats["dropped"] + stats["queued"],
                    "rss_start_mb": settled[0] if settled else 0.0,
                    "rss_end_mb": settled[-1] if settled else 0.0,
                }
                sub.close()
    return figures
