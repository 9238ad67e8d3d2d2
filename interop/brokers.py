"""The MQTT brokers the interoperability suite runs against, each started on a free 127.0.0.1 port
and stopped by PID. A broker that cannot be had on this machine says why (``unavailable``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from capture_mqtt.testing.mosquitto import CAPTURE_LIMITS, Mosquitto, free_port


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited at start (code {process.returncode})")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)  # polling a port that is not open yet: nothing to wait on
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


class Broker(ABC):
    """What every broker of the suite offers; each starts and stops its own way."""

    name: ClassVar[str]
    #: MQTT 5, shared subscriptions ($share/...), sessions kept across a restart, the largest packet
    #: it takes (None: no limit the suite knows of).
    mqtt5: ClassVar[bool] = False
    shared_subscriptions: ClassVar[bool] = False
    durable_sessions: ClassVar[bool] = False
    max_packet_size: ClassVar[int | None] = None
    host = "127.0.0.1"
    port = 0

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this broker cannot run here, or None."""
        return None

    @abstractmethod
    def start(self) -> None:
        """Starts the broker and returns once it listens."""

    @abstractmethod
    def stop(self) -> None:
        """Stops the broker (its process, by PID)."""

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return ""

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MosquittoBroker(Broker):
    """Debian's Mosquitto with Capture's limits (32 in flight, 1,000 queued, 1 MB), persistence on."""

    name = "Mosquitto"
    mqtt5 = True
    shared_subscriptions = True
    durable_sessions = True
    max_packet_size = CAPTURE_LIMITS.max_packet_size

    @classmethod
    def unavailable(cls) -> str | None:
        return None if shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists() else "mosquitto not installed"

    def __init__(self) -> None:
        self._broker = Mosquitto(anonymous=True, tls=False, websockets=False, persistence=True)
        self.port = self._broker.mqtt_port

    def start(self) -> None:
        self._broker.start()

    def stop(self) -> None:
        self._broker.stop()

    def restart(self) -> None:
        # SIGTERM, so that the sessions are saved, as in an orderly broker restart.
        self._broker.stop()
        self._broker.start()

    def log_text(self) -> str:
        path = self._broker.log_file
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        self._broker.close()

    def __exit__(self, *exc: object) -> None:
        self._broker.close()


class AmqttBroker(Broker):
    """amqtt, a pure-Python broker from PyPI (MQTT 3.1.1; sessions live in memory only)."""

    name = "amqtt"

    @classmethod
    def unavailable(cls) -> str | None:
        return None if cls._binary().exists() else "amqtt is not installed (pip install amqtt==0.12.1)"

    @staticmethod
    def _binary() -> Path:
        return Path(sys.executable).parent / "amqtt"

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="capture-mqtt-amqtt-"))
        self.port = free_port()
        self.log_file = self.workdir / "amqtt.log"
        (self.workdir / "amqtt.yaml").write_text(
            "listeners:\n"
            "  default:\n"
            "    type: tcp\n"
            f"    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n"
            "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 - our venv's amqtt, our own config file
                [str(self._binary()), "-c", str(self.workdir / "amqtt.yaml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        _wait_for_port(self.port, self._process, "amqtt")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


#: Every broker of the suite, in the table's order.
ALL: list[type[Broker]] = [MosquittoBroker, AmqttBroker]
