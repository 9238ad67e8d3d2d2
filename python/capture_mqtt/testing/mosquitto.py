"""A real Mosquitto broker on free loopback ports, for tests and the local emulator.

Listeners: plain MQTT, MQTT over TLS, WebSocket over TLS (any path, e.g. ``/mqtt``) and plain
WebSocket, all on 127.0.0.1 only. Accounts are enforced either with a password file and an ACL file
(a denied subscription is granted but receives nothing) or with Mosquitto's dynamic-security plugin
(a denied subscription is answered with SUBACK 0x80).
"""

from __future__ import annotations

import base64
import contextlib
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self, TypeAlias

if TYPE_CHECKING:
    from .certs import TlsFiles

__all__ = ["Account", "Mosquitto", "MosquittoNotFoundError", "free_port"]

# Where Mosquitto's dynamic-security plugin is installed: Debian's multiarch folder (any machine),
# other Linux distributions, a local build. Homebrew's Mosquitto is built without plugins.
DYNSEC_PLUGINS = (
    "/usr/lib/*-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/lib64/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
Access: TypeAlias = Literal["read", "write", "readwrite"]


class MosquittoNotFoundError(RuntimeError):
    """Mosquitto is not installed (or not on the PATH)."""


class _PortTakenError(RuntimeError):
    """Mosquitto could not bind a port: another process took it after free_port() found it free."""


@dataclass
class Account:
    """A broker account and the topics it may use: ``acl`` holds (access, filter) pairs where access
    is ``"read"`` (subscribe and receive), ``"write"`` (publish) or ``"readwrite"``."""

    username: str
    password: str = field(repr=False)
    acl: list[tuple[Access, str]] = field(default_factory=list)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_mosquitto() -> str:
    """The path of the ``mosquitto`` binary, or a clear error saying how to install it.

    ``CAPTURE_MQTT_MOSQUITTO`` names the binary when it is somewhere else. Besides the ``PATH``, the
    places Debian, Homebrew (Intel and Apple silicon) and MacPorts install it are searched, since a
    notebook or an IDE often runs without the shell's ``PATH``.
    """
    if sys.platform == "win32":
        # The broker is driven with POSIX signals (reload, pause, a clean stop): not on Windows.
        raise MosquittoNotFoundError(
            "the emulator runs Mosquitto, which it controls with POSIX signals: it needs Linux or macOS. "
            "On Windows, run it in WSL; the SDK itself works on Windows"
        )
    override = os.environ.get("CAPTURE_MQTT_MOSQUITTO")
    if override:
        # A path, or a name looked up on the PATH; an executable file either way (not a folder).
        found = shutil.which(override)
        if found:
            return found
        raise MosquittoNotFoundError(f"CAPTURE_MQTT_MOSQUITTO is {override!r}, which is not an executable file")
    candidates = (
        shutil.which("mosquitto"),
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/opt/homebrew/sbin/mosquitto",
        "/opt/local/sbin/mosquitto",
    )
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise MosquittoNotFoundError(
        "Mosquitto is not installed: on Debian or Ubuntu run `sudo apt-get install mosquitto mosquitto-clients` "
        "(or `make test`, which installs it), on macOS `brew install mosquitto`; or set CAPTURE_MQTT_MOSQUITTO "
        "to the path of the mosquitto binary"
    )


def find_dynsec_plugin() -> str:
    """The path of Mosquitto's dynamic-security plugin, or a clear error."""
    # This machine's own architecture first, where several are installed (Debian multiarch).
    multiarch = str(sysconfig.get_config_var("MULTIARCH") or "")
    patterns = (f"/usr/lib/{multiarch}/mosquitto_dynamic_security.so",) if multiarch else ()
    for pattern in (*patterns, *DYNSEC_PLUGINS):
        for candidate in sorted(glob.glob(str(pattern))):
            return candidate
    raise MosquittoNotFoundError(
        "Mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so) is not installed: Debian's "
        "mosquitto package has it; Homebrew's Mosquitto is built without plugins. Use the password and ACL "
        "files instead (dynsec=False)"
    )


def _dynsec_password(password: str) -> dict[str, object]:
    # Mosquitto 2.0's dynamic-security hash: PBKDF2-HMAC-SHA512, 101 iterations, 64 bytes.
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": 101,
    }


def _passwd_hash(password: str) -> str:
    # A password-file line in Mosquitto 2.0's format ($7$: PBKDF2-HMAC-SHA512), written here rather
    # than by one mosquitto_passwd process per account.
    hashed = _dynsec_password(password)
    return f"$7${hashed['iterations']}${hashed['salt']}${hashed['password']}"


def connack_code(host: str, port: int, username: str, password: str, timeout: float = 2.0) -> int | None:
    """Connects once with MQTT 3.1.1 and returns the CONNACK return code (0 accepted, 4 bad username
    or password, 5 not authorized), or None when the broker does not answer."""

    def text(value: str) -> bytes:
        data = value.encode()
        return len(data).to_bytes(2, "big") + data

    body = text("MQTT") + bytes([4, 0xC2]) + (10).to_bytes(2, "big")
    body += text(f"capture-mqtt-probe-{os.urandom(4).hex()}") + text(username) + text(password)
    length, encoded = len(body), b""
    while True:
        byte, length = length % 128, length // 128
        encoded += bytes([byte | (0x80 if length else 0)])
        if not length:
            break
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"\x10" + encoded + body)
            answer = b""
            while len(answer) < 4:
                chunk = sock.recv(4 - len(answer))
                if not chunk:
                    return None
                answer += chunk
            if answer[0] == 0x20 and answer[3] == 0:
                sock.sendall(b"\xe0\x00")
            return answer[3] if answer[0] == 0x20 else None
    except OSError:
        return None


@dataclass(frozen=True)
class BrokerLimits:
    """Per-client limits of a test broker: messages in flight to the client, messages queued for it
    beyond those (the oldest kept, newer ones dropped when full), and the largest packet (bytes;
    0: none). The default is Capture's (EMQX's defaults: 32, 1,000, 1 MB); benchmarks use
    :data:`UNLIMITED`.

    >>> CAPTURE_LIMITS
    BrokerLimits(inflight=32, queued=1000, max_packet_size=1048576)
    """

    inflight: int = 32
    queued: int = 1000
    max_packet_size: int = 1024 * 1024


CAPTURE_LIMITS = BrokerLimits()
UNLIMITED = BrokerLimits(inflight=65535, queued=0, max_packet_size=0)


class Mosquitto:
    """A Mosquitto process on free 127.0.0.1 ports; stop it with :meth:`stop` or a ``with`` block.
    Its limits are Capture's unless ``limits`` says otherwise.

    >>> import capture_mqtt as cm
    >>> from capture_mqtt.testing.mosquitto import Mosquitto
    >>> with Mosquitto(anonymous=True, tls=False, websockets=False) as broker:
    ...     with cm.Client(broker.host, transport="mqtt", port=broker.mqtt_port) as client:
    ...         client.is_connected
    True
    """

    def __init__(
        self,
        *,
        accounts: list[Account] | None = None,
        anonymous: bool = False,
        dynsec: bool = False,
        tls: bool = True,
        websockets: bool = True,
        persistence: bool = False,
        extra_config: str = "",
        limits: BrokerLimits | None = None,
    ) -> None:
        self.binary = find_mosquitto()
        self.dynsec_plugin = find_dynsec_plugin() if dynsec else None
        self.limits = CAPTURE_LIMITS if limits is None else limits
        self.accounts = list(accounts or [])
        self.anonymous = anonymous
        self.dynsec = dynsec
        self.persistence = persistence
        self.extra_config = extra_config
        self.workdir = Path(tempfile.mkdtemp(prefix="capture-mqtt-broker-"))
        self.host = "127.0.0.1"
        self.mqtt_port = free_port()
        self.mqtts_port = free_port() if tls else None
        self.wss_port = free_port() if tls and websockets else None
        self.ws_port = free_port() if websockets else None
        self._started = False  # once started, the ports are fixed (restart() keeps them)
        self.tls: TlsFiles | None = None
        if tls:
            # The certificates need the `cryptography` package (the `testing` extra).
            from .certs import make_tls

            self.tls = make_tls()
        self.ca_file = self.workdir / "ca.pem"
        self.log_file = self.workdir / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._write_files()

    # Files

    def _write_files(self) -> None:
        if self.tls is not None:
            self.ca_file.write_bytes(self.tls.ca_pem)
            (self.workdir / "server.pem").write_bytes(self.tls.cert_pem)
            key = self.workdir / "server.key"
            key.write_bytes(self.tls.key_pem)
            key.chmod(0o600)
        self.write_accounts()
        lines = [
            # Run as whoever started it: as root, Mosquitto would otherwise switch to the user
            # "mosquitto", who cannot read this private folder. (Others are not switched.)
            *(["user root"] if os.geteuid() == 0 else []),
            "per_listener_settings false",
            f"allow_anonymous {'true' if self.anonymous else 'false'}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "queue_qos0_messages true",
            f"max_queued_messages {self.limits.queued}",
            f"max_inflight_messages {self.limits.inflight}",
            *([f"max_packet_size {self.limits.max_packet_size}"] if self.limits.max_packet_size else []),
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
        ]
        if self.dynsec:
            lines += [f"plugin {self.dynsec_plugin}", f"plugin_opt_config_file {self.workdir / 'dynsec.json'}"]
        elif not self.anonymous:
            lines += [f"password_file {self.workdir / 'passwd'}", f"acl_file {self.workdir / 'acl'}"]
        lines += ["", f"listener {self.mqtt_port} {self.host}"]
        tls_lines = [
            f"cafile {self.ca_file}",
            f"certfile {self.workdir / 'server.pem'}",
            f"keyfile {self.workdir / 'server.key'}",
        ]
        if self.mqtts_port:
            lines += ["", f"listener {self.mqtts_port} {self.host}", *tls_lines]
        if self.wss_port:
            # Without socket_domain, Debian's Mosquitto binds a WebSocket listener on every interface.
            lines += [
                "",
                f"listener {self.wss_port} {self.host}",
                "protocol websockets",
                "socket_domain ipv4",
                *tls_lines,
            ]
        if self.ws_port:
            lines += ["", f"listener {self.ws_port} {self.host}", "protocol websockets", "socket_domain ipv4"]
        lines += ["", self.extra_config]
        (self.workdir / "mosquitto.conf").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def write_accounts(self) -> None:
        """Writes the password and ACL files (or the dynamic-security file) from ``accounts``.
        A running broker reads them again on :meth:`reload`."""
        if self.dynsec:
            clients, roles = [], []
            for account in self.accounts:
                acls = []
                for access, pattern in account.acl:
                    if access in ("read", "readwrite"):
                        acls += [
                            {"acltype": "subscribePattern", "topic": pattern, "priority": 0, "allow": True},
                            {"acltype": "publishClientReceive", "topic": pattern, "priority": 0, "allow": True},
                        ]
                    if access in ("write", "readwrite"):
                        acls.append({"acltype": "publishClientSend", "topic": pattern, "priority": 0, "allow": True})
                roles.append({"rolename": f"role-{account.username}", "acls": acls})
                clients.append(
                    {
                        "username": account.username,
                        **_dynsec_password(account.password),
                        "roles": [{"rolename": f"role-{account.username}"}],
                    }
                )
            config = {
                "defaultACLAccess": {
                    "publishClientSend": False,
                    "publishClientReceive": False,
                    "subscribe": False,
                    "unsubscribe": True,
                },
                "clients": clients,
                "groups": [],
                "roles": roles,
            }
            (self.workdir / "dynsec.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
            return
        passwd = self.workdir / "passwd"
        # UTF-8, as MQTT sends user names and topics (not the locale's encoding).
        passwd.write_text(
            "".join(f"{a.username}:{_passwd_hash(a.password)}\n" for a in self.accounts), encoding="utf-8"
        )
        passwd.chmod(0o600)
        acl = []
        for account in self.accounts:
            acl.append(f"user {account.username}")
            acl += [f"topic {access} {pattern}" for access, pattern in account.acl]
            acl.append("")
        (self.workdir / "acl").write_text("\n".join(acl) + "\n", encoding="utf-8")

    # Process

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        return self._process.pid if self._process else None

    def start(self) -> Self:
        """Starts the broker and waits until every listener accepts connections."""
        if self._process is not None and self._process.poll() is None:
            return self
        for attempt in range(3):
            try:
                self._start()
            except _PortTakenError as taken:
                if self._started or attempt == 2:
                    raise RuntimeError(str(taken)) from None
                # Another process took a port between free_port() and the broker binding it (an
                # outgoing connection's ephemeral port, say). Nobody was told these ports yet: new ones.
                self.mqtt_port = free_port()
                self.mqtts_port = self.mqtts_port and free_port()
                self.wss_port = self.wss_port and free_port()
                self.ws_port = self.ws_port and free_port()
                self._write_files()
                continue
            self._started = True
            return self
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _start(self) -> None:
        # The broker's stderr goes to a file: the broker holds its own handle, ours is closed at once,
        # so nothing is left open for a ResourceWarning (a pipe would be, until someone read it).
        stderr_path = self.workdir / "stderr.log"
        with stderr_path.open("wb") as stderr:
            self._process = subprocess.Popen(
                [self.binary, "-c", str(self.workdir / "mosquitto.conf")],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        ports = [p for p in (self.mqtt_port, self.mqtts_port, self.wss_port, self.ws_port) if p]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = stderr_path.read_text(encoding="utf-8", errors="replace")
                self._process = None
                message = f"Mosquitto exited at start: {err.strip()}\n{self.log_tail()}"
                if "Address already in use" in message:  # in its log, or on stderr before the log opens
                    raise _PortTakenError(message)
                raise RuntimeError(message)
            if all(_accepts(self.host, port) for port in ports):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"Mosquitto did not open its ports within 15 s\n{self.log_tail()}")

    def stop(self) -> None:
        """Stops the broker (SIGTERM, then SIGKILL after 5 s)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def kill(self) -> None:
        """Kills the broker at once (SIGKILL): clients see the connection drop."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=5)

    def restart(self) -> Self:
        """Kills the broker and starts it again on the same ports."""
        self.kill()
        return self.start()

    def pause(self) -> None:
        """Freezes the broker (SIGSTOP): the network stalls without closing."""
        if self._process is not None:
            os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Unfreezes the broker (SIGCONT)."""
        if self._process is not None:
            os.kill(self._process.pid, signal.SIGCONT)

    def reload(self, *, until_accepted: tuple[str, str] | None = None) -> None:
        """Makes the running broker read its password and ACL files again (SIGHUP). With
        ``until_accepted=(username, password)`` it returns once that account can log in."""
        if self._process is None:
            return
        os.kill(self._process.pid, signal.SIGHUP)
        if until_accepted is None:
            time.sleep(0.2)
            return
        deadline = time.monotonic() + 10
        while connack_code(self.host, self.mqtt_port, *until_accepted) != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the broker did not accept the new account within 10 s\n{self.log_tail()}")
            time.sleep(0.01)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the broker's log, for error messages."""
        try:
            return "\n".join(self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no broker log)"

    def close(self) -> None:
        """Stops the broker and deletes its files."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()


def _accepts(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0
