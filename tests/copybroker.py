"""A scripted MQTT 3.1.1 broker for what Mosquitto never does: it sends one copy of a message per
client (as RabbitMQ does) or one per matching filter, the copies not back to back (as rumqttd
does), keeps an in-flight window per client, and checks that PUBACKs come in the order it sent
the messages (MQTT-4.6.0-2)."""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Literal

import capture_mqtt as cm

from .fakebroker import _encode, _read_packet, _string

Mode = Literal["per_client", "per_filter"]


@dataclass
class _Client:
    conn: socket.socket
    filters: dict[str, int] = field(default_factory=dict)
    outbox: queue.Queue[tuple[str, bytes, int] | None] = field(default_factory=queue.Queue)
    window: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(32))
    sent: list[int] = field(default_factory=list)
    next_pkid: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class CopyBroker:
    mode: Mode = "per_client"
    subscriptions: list[list[str]] = field(default_factory=list)
    out_of_order: list[tuple[int, int]] = field(default_factory=list)
    pubacks: int = 0

    def __post_init__(self) -> None:
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self.port = int(self._server.getsockname()[1])
        self._lock = threading.Lock()
        self._clients: list[_Client] = []
        # per_filter: the second copy of a message waits until after the next message's first.
        self._late: list[tuple[_Client, str, bytes, int]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            client = _Client(conn)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()
            threading.Thread(target=self._send, args=(client,), daemon=True).start()

    def _send(self, client: _Client) -> None:
        while True:
            item = client.outbox.get()
            if item is None:
                return
            topic, payload, qos = item
            body = _string(topic)
            header = 0x30
            if qos:
                client.window.acquire()
                with client.lock:
                    pkid = client.next_pkid
                    client.next_pkid = pkid % 65535 + 1
                    client.sent.append(pkid)
                body += struct.pack("!H", pkid)
                header |= 0x02
            with contextlib.suppress(OSError):
                client.conn.sendall(_encode(header, body + payload))

    def _route(self, topic: str, payload: bytes, qos: int) -> None:
        with self._lock:
            late, self._late = self._late, []
            for client in self._clients:
                matching = [q for f, q in client.filters.items() if cm.topic_matches(f, topic)]
                if not matching:
                    continue
                if self.mode == "per_client":
                    client.outbox.put((topic, payload, min(qos, max(matching))))
                else:
                    first, *rest = matching
                    client.outbox.put((topic, payload, min(qos, first)))
                    self._late += [(client, topic, payload, min(qos, q)) for q in rest]
            for client, t, p, q in late:
                client.outbox.put((t, p, q))

    def _serve(self, client: _Client) -> None:
        conn = client.conn
        with conn:
            try:
                while True:
                    header, body = _read_packet(conn)
                    kind = header >> 4
                    if kind == 1:  # CONNECT
                        conn.sendall(_encode(0x20, b"\x00\x00"))
                    elif kind == 8:  # SUBSCRIBE
                        pkid, rest, granted, names = body[:2], body[2:], b"", []
                        while rest:
                            (size,) = struct.unpack("!H", rest[:2])
                            name, qos = rest[2 : 2 + size].decode(), rest[2 + size]
                            rest = rest[3 + size :]
                            names.append(name)
                            client.filters[name] = qos
                            granted += bytes([qos])
                        with self._lock:
                            self.subscriptions.append(names)
                            if client not in self._clients:
                                self._clients.append(client)
                        conn.sendall(_encode(0x90, pkid + granted))
                    elif kind == 3:  # PUBLISH from a publisher
                        qos = (header >> 1) & 3
                        (size,) = struct.unpack("!H", body[:2])
                        topic = body[2 : 2 + size].decode()
                        payload = body[2 + size + (2 if qos else 0) :]
                        if qos:
                            conn.sendall(_encode(0x40, body[2 + size : 4 + size]))
                        self._route(topic, payload, qos)
                    elif kind == 4:  # PUBACK from a subscriber
                        (pkid,) = struct.unpack("!H", body[:2])
                        with client.lock:
                            expected = client.sent.pop(0) if client.sent else -1
                        with self._lock:
                            self.pubacks += 1
                            if pkid != expected:
                                self.out_of_order.append((expected, pkid))
                        client.window.release()
                    elif kind == 10:  # UNSUBSCRIBE
                        rest = body[2:]
                        while rest:
                            (size,) = struct.unpack("!H", rest[:2])
                            client.filters.pop(rest[2 : 2 + size].decode(), None)
                            rest = rest[2 + size :]
                        conn.sendall(_encode(0xB0, body[:2]))
                    elif kind == 12:  # PINGREQ
                        conn.sendall(_encode(0xD0, b""))
                    elif kind == 14:  # DISCONNECT
                        return
            except (ConnectionError, OSError):
                return
            finally:
                client.outbox.put(None)
                with self._lock:
                    self._clients = [c for c in self._clients if c is not client]

    def close(self) -> None:
        self._server.close()
