"""A tiny scripted MQTT 3.1.1 broker that refuses like Capture does: it closes the connection when a
client subscribes or publishes outside ``allowed`` (instead of answering with an error code)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field

import capture_mqtt as cm


def _read_exact(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _read_packet(conn: socket.socket) -> tuple[int, bytes]:
    header = _read_exact(conn, 1)[0]
    multiplier, length = 1, 0
    while True:
        byte = _read_exact(conn, 1)[0]
        length += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            break
        multiplier *= 128
    return header, _read_exact(conn, length)


def _encode(header: int, body: bytes) -> bytes:
    length, encoded = len(body), b""
    while True:
        byte, length = length % 128, length // 128
        encoded += bytes([byte | (0x80 if length else 0)])
        if not length:
            return bytes([header]) + encoded + body


def _login(connect: bytes) -> tuple[str, str]:
    """The username and password of a CONNECT packet's body (MQTT 3.1.1)."""
    flags = connect[7]
    rest = connect[10:]
    fields = []
    while rest:
        (size,) = struct.unpack("!H", rest[:2])
        fields.append(rest[2 : 2 + size].decode())
        rest = rest[2 + size :]
    # client id, [will topic, will message], [username], [password]
    fields = fields[1:]
    if flags & 0x04:
        fields = fields[2:]
    username = fields.pop(0) if flags & 0x80 else ""
    password = fields.pop(0) if flags & 0x40 else ""
    return username, password


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


@dataclass
class FakeCapture:
    """Accepts any login; allows subscribing and publishing only to filters/topics under ``allowed``."""

    allowed: tuple[str, ...] = ("v1/raw/AcmeCorp/",)
    connections: int = 0
    subscriptions: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    published: list[str] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self.port = int(self._server.getsockname()[1])
        self._lock = threading.Lock()
        self._subscribers: list[tuple[socket.socket, list[str]]] = []
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _ok(self, topic: str) -> bool:
        return any(topic.startswith(prefix) for prefix in self.allowed)

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        filters: list[str] = []
        with conn:
            try:
                while True:
                    header, body = _read_packet(conn)
                    kind = header >> 4
                    if kind == 1:  # CONNECT
                        with self._lock:
                            self.connections += 1
                            self.logins.append(_login(body))
                        conn.sendall(_encode(0x20, b"\x00\x00"))
                    elif kind == 8:  # SUBSCRIBE
                        pkid, rest, granted = body[:2], body[2:], b""
                        while rest:
                            (size,) = struct.unpack("!H", rest[:2])
                            name = rest[2 : 2 + size].decode()
                            rest = rest[3 + size :]
                            if not self._ok(name):
                                with self._lock:
                                    self.refused.append(name)
                                return  # Capture's answer: the connection drops
                            with self._lock:
                                self.subscriptions.append(name)
                            filters.append(name)
                            granted += b"\x00"
                        with self._lock:
                            self._subscribers.append((conn, filters))
                        conn.sendall(_encode(0x90, pkid + granted))
                    elif kind == 3:  # PUBLISH
                        qos = (header >> 1) & 3
                        (size,) = struct.unpack("!H", body[:2])
                        topic = body[2 : 2 + size].decode()
                        if not self._ok(topic):
                            with self._lock:
                                self.refused.append(topic)
                            return
                        payload = body[2 + size + (2 if qos else 0) :]
                        with self._lock:
                            self.published.append(topic)
                            targets = [c for c, fs in self._subscribers if any(cm.topic_matches(f, topic) for f in fs)]
                        if qos:
                            conn.sendall(_encode(0x40, body[2 + size : 4 + size]))
                        for target in targets:
                            with contextlib.suppress(OSError):
                                target.sendall(_encode(0x30, _string(topic) + payload))
                    elif kind == 10:  # UNSUBSCRIBE
                        conn.sendall(_encode(0xB0, body[:2]))
                    elif kind == 12:  # PINGREQ
                        conn.sendall(_encode(0xD0, b""))
                    elif kind == 14:  # DISCONNECT
                        return
            except (ConnectionError, OSError):
                return
            finally:
                with self._lock:
                    self._subscribers = [(c, fs) for c, fs in self._subscribers if c is not conn]

    def close(self) -> None:
        self._stopped = True
        self._server.close()
