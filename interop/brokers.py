"""The MQTT brokers the interoperability suite runs against, each started on a free 127.0.0.1 port
and stopped by PID. A broker that cannot be had on this machine says why (``unavailable``)."""

from __future__ import annotations

import contextlib
import ctypes
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

#: prctl, looked up here: the child of a process with threads only calls it between fork and exec.
_PRCTL = ctypes.CDLL(None).prctl if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the thread that started it ends (Linux's
    PR_SET_PDEATHSIG), so that a killed test run leaves no broker behind. RabbitMQ's start script
    gets it, and stops its Erlang node on SIGTERM."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)


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

    @property
    def v5_port(self) -> int:
        """The port for MQTT 5 (the same as ``port`` unless the broker has a listener per version)."""
        return self.port

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
        try:
            self.start()
        except BaseException:
            self.__exit__(None, None, None)  # what did start, and the working directory, go
            raise
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


class _ProcessBroker(Broker):
    """A broker run as a child process of ours, in a working directory of its own: started in a new
    process group and stopped by that group's id (the broker's PID), so that helpers it starts
    (Erlang's port mapper, say) stop with it."""

    #: Seconds it may take to listen (a JVM or an Erlang node starts slowly).
    start_timeout = 30.0

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"capture-mqtt-{self.name.lower()}-"))
        self.port = free_port()
        self.log_file = self.workdir / f"{self.name.lower()}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def command(self) -> list[str]:
        """The command line that runs the broker in the foreground."""

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> None:
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 - a broker of the suite, with our own config files
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.environment(),
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl call, looked up before the fork
            )
        _wait_for_port(self.port, self._process, self.name, self.start_timeout)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        finally:
            # What the broker started and left behind in its group goes too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


class AmqttBroker(_ProcessBroker):
    """amqtt, a pure-Python broker from PyPI (MQTT 3.1.1; sessions live in memory only)."""

    name = "amqtt"

    @classmethod
    def unavailable(cls) -> str | None:
        return None if cls._binary().exists() else "amqtt is not installed (pip install amqtt==0.12.1)"

    @staticmethod
    def _binary() -> Path:
        return Path(sys.executable).parent / "amqtt"

    def command(self) -> list[str]:
        config = self.workdir / "amqtt.yaml"
        config.write_text(
            "listeners:\n"
            "  default:\n"
            "    type: tcp\n"
            f"    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n"
            "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        return [str(self._binary()), "-c", str(config)]


#: Where `make interop` builds rumqttd (interop/rumqttd, a package with its own Cargo.lock).
RUMQTTD = Path(__file__).resolve().parent.parent / "target" / "interop" / "release" / "rumqttd"


class RumqttdBroker(_ProcessBroker):
    """rumqttd 0.19, the rumqtt project's broker (Rust), built with cargo by `make interop`: MQTT
    3.1.1 and 5 on two listeners, Capture's in-flight and packet limits, sessions in memory only."""

    name = "rumqttd"
    mqtt5 = True
    shared_subscriptions = True
    max_packet_size = CAPTURE_LIMITS.max_packet_size

    @classmethod
    def unavailable(cls) -> str | None:
        if RUMQTTD.exists():
            return None
        return f"rumqttd is not built: {RUMQTTD} (make interop builds it with cargo from interop/rumqttd)"

    def __init__(self) -> None:
        super().__init__()
        self._v5_port = free_port()

    @property
    def v5_port(self) -> int:
        return self._v5_port

    def command(self) -> list[str]:
        listeners = ""
        for version, port in (("v4", self.port), ("v5", self.v5_port)):
            listeners += (
                f"[{version}.1]\n"
                f'name = "{version}"\n'
                f'listen = "127.0.0.1:{port}"\n'
                "next_connection_delay_ms = 1\n"
                f"[{version}.1.connections]\n"
                "connection_timeout_ms = 60000\n"
                f"max_payload_size = {self.max_packet_size}\n"
                f"max_inflight_count = {CAPTURE_LIMITS.inflight}\n"
                "dynamic_filters = true\n"
            )
        config = self.workdir / "rumqttd.toml"
        config.write_text(
            "id = 0\n"
            "[router]\n"
            "max_connections = 1000\n"
            "max_outgoing_packet_count = 200\n"
            "max_segment_size = 104857600\n"
            "max_segment_count = 10\n" + listeners
        )
        return [str(RUMQTTD), str(config)]


#: Debian's rabbitmq-server: the script that runs the node in the foreground as the calling user
#: (/usr/sbin/rabbitmq-server switches to the rabbitmq user and its directories).
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
EPMD = Path("/usr/bin/epmd")
#: Erlang's distribution listens on every interface unless told otherwise.
LOOPBACK_DISTRIBUTION = "-kernel inet_dist_use_interface {127,0,0,1}"


class RabbitMqBroker(_ProcessBroker):
    """RabbitMQ 3.10 (Debian) with its MQTT plugin (3.1.1): AMQP off, every port on 127.0.0.1,
    Erlang's port mapper (epmd) our own, on loopback and a free port, stopped with the broker.
    Sessions are durable queues: they survive a restart."""

    name = "RabbitMQ"
    durable_sessions = True
    start_timeout = 90.0  # an Erlang node with a fresh database: about 10 s here

    @classmethod
    def unavailable(cls) -> str | None:
        if not RABBITMQ_SERVER.exists() or not EPMD.exists():
            return f"not installed: {RABBITMQ_SERVER} (apt-get install rabbitmq-server)"
        return None

    def __init__(self) -> None:
        super().__init__()
        self.epmd_port = free_port()
        self.distribution_port = free_port()
        self.node = f"capture-mqtt-{self.port}@localhost"
        self._epmd: subprocess.Popen[bytes] | None = None
        for directory in ("home", "mnesia", "log", "conf.d"):
            (self.workdir / directory).mkdir()
        (self.workdir / "rabbitmq-env.conf").write_text("")
        (self.workdir / "advanced.config").write_text("[].\n")
        (self.workdir / "rabbitmq.conf").write_text(
            "listeners.tcp = none\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "mqtt.allow_anonymous = true\n"
            "mqtt.default_user = guest\n"
            "mqtt.default_pass = guest\n"
            "mqtt.vhost = /\n"
            "mqtt.exchange = amq.topic\n"
            f"mqtt.prefetch = {CAPTURE_LIMITS.inflight}\n"
            "loopback_users.guest = true\n"
            "log.console = true\n"
            "log.console.level = info\n"
            "log.file = false\n"
            "disk_free_limit.absolute = 1MB\n"
        )

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        work = self.workdir
        env.update(
            HOME=str(work / "home"),  # the Erlang cookie
            RABBITMQ_CONF_ENV_FILE=str(work / "rabbitmq-env.conf"),  # not /etc/rabbitmq's
            RABBITMQ_CONFIG_FILE=str(work / "rabbitmq.conf"),
            RABBITMQ_CONFIG_FILES=str(work / "conf.d"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(work / "advanced.config"),
            RABBITMQ_MNESIA_BASE=str(work / "mnesia"),
            RABBITMQ_LOG_BASE=str(work / "log"),
            RABBITMQ_PID_FILE=str(work / "rabbit.pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(work / "enabled_plugins"),
            RABBITMQ_ENABLED_PLUGINS="rabbitmq_mqtt",
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_DIST_PORT=str(self.distribution_port),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=LOOPBACK_DISTRIBUTION,
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_EPMD_PORT=str(self.epmd_port),
        )
        return env

    def command(self) -> list[str]:
        return [str(RABBITMQ_SERVER)]

    def start(self) -> None:
        if self._epmd is None:
            # Our own port mapper in the foreground: otherwise the node starts one as a daemon,
            # outside our process group, that outlives it.
            self._epmd = subprocess.Popen(  # noqa: S603 - Debian's epmd, loopback only
                [str(EPMD), "-address", "127.0.0.1", "-port", str(self.epmd_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=self.environment(),
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl call, looked up before the fork
            )
            _wait_for_port(self.epmd_port, self._epmd, "epmd")
        super().start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            epmd, self._epmd = self._epmd, None
            if epmd is not None:
                epmd.kill()  # nothing of its own to save
                epmd.wait(timeout=10)
            shutil.rmtree(self.workdir, ignore_errors=True)


#: Debian's ActiveMQ (`activemq`) and the jars its MQTT connector needs (`libmqtt-client-java`,
#: `libhawtdispatch-java`); `lib/optional` holds Spring and log4j, for the XML configuration.
ACTIVEMQ_CLASS_PATH = [
    "/usr/share/activemq/lib/*",
    "/usr/share/activemq/lib/optional/*",
    "/usr/share/java/mqtt-client.jar",
    "/usr/share/java/hawtdispatch.jar",
    "/usr/share/java/hawtdispatch-transport.jar",
]


class ActiveMqBroker(_ProcessBroker):
    """ActiveMQ 5.17 (Debian) with only its MQTT connector (3.1.1), KahaDB persistence, no JMX, a
    1 MB frame limit."""

    name = "ActiveMQ"
    durable_sessions = True
    max_packet_size = CAPTURE_LIMITS.max_packet_size

    @classmethod
    def unavailable(cls) -> str | None:
        if shutil.which("java") is None:
            return "java is not installed (apt-get install default-jre-headless)"
        missing = [entry for entry in ACTIVEMQ_CLASS_PATH if not list(Path("/").glob(entry.lstrip("/")))]
        if missing:
            packages = "activemq libmqtt-client-java libhawtdispatch-java"
            return f"not installed: {', '.join(missing)} (apt-get install {packages})"
        return None

    def command(self) -> list[str]:
        data = self.workdir / "data"
        (self.workdir / "activemq.xml").write_text(
            '<beans xmlns="http://www.springframework.org/schema/beans"\n'
            '       xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"\n'
            '       xsi:schemaLocation="http://www.springframework.org/schema/beans'
            " http://www.springframework.org/schema/beans/spring-beans.xsd"
            " http://activemq.apache.org/schema/core"
            ' http://activemq.apache.org/schema/core/activemq-core.xsd">\n'
            '  <broker xmlns="http://activemq.apache.org/schema/core" brokerName="interop" useJmx="false"\n'
            f'          persistent="true" dataDirectory="{data}" schedulerSupport="false" advisorySupport="false">\n'
            '    <managementContext><managementContext createConnector="false"/></managementContext>\n'
            "    <systemUsage><systemUsage>\n"
            '      <memoryUsage><memoryUsage limit="64 mb"/></memoryUsage>\n'
            '      <storeUsage><storeUsage limit="1 gb"/></storeUsage>\n'
            '      <tempUsage><tempUsage limit="256 mb"/></tempUsage>\n'
            "    </systemUsage></systemUsage>\n"
            f'    <persistenceAdapter><kahaDB directory="{data}/kahadb"/></persistenceAdapter>\n'
            "    <transportConnectors>\n"
            '      <transportConnector name="mqtt"'
            f' uri="mqtt://127.0.0.1:{self.port}?wireFormat.maxFrameSize={self.max_packet_size}"/>\n'
            "    </transportConnectors>\n"
            "  </broker>\n"
            "</beans>\n"
        )
        (self.workdir / "log4j.properties").write_text(
            "log4j.rootLogger=INFO, out\n"
            "log4j.logger.org.springframework=WARN\n"
            "log4j.logger.org.apache.xbean=WARN\n"
            "log4j.appender.out=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.out.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.out.layout.ConversionPattern=%d{HH:mm:ss,SSS} %-5p [%t] %c{1} - %m%n\n"
        )
        return [
            "java",
            "-Xms64m",
            "-Xmx256m",
            "-XX:+UseSerialGC",
            "-Djava.net.preferIPv4Stack=true",
            f"-Dlog4j.configuration=file:{self.workdir / 'log4j.properties'}",
            "-Dactivemq.home=/usr/share/activemq",
            f"-Dactivemq.base={self.workdir}",
            f"-Dactivemq.conf={self.workdir}",
            f"-Dactivemq.data={data}",
            "-cp",
            ":".join(ACTIVEMQ_CLASS_PATH),
            "org.apache.activemq.console.Main",
            "start",
            f"xbean:file:{self.workdir / 'activemq.xml'}",
        ]


#: Every broker of the suite, in the table's order.
ALL: list[type[Broker]] = [MosquittoBroker, AmqttBroker, RabbitMqBroker, RumqttdBroker, ActiveMqBroker]
