"""The options of a client and of a subscription, typed for IDEs and type checkers, and the two
other ways to give them: a URL and environment variables."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypedDict

from ._core import MalformedMessage
from .auth import Auth

if TYPE_CHECKING:
    from .client import ConnectionEvent

Transport: TypeAlias = Literal["mqtts", "wss", "mqtt", "ws"]
Overflow: TypeAlias = Literal["block", "drop_oldest", "drop_newest"]
Offline: TypeAlias = Literal["block", "raise", "drop_oldest"]
OutboxSync: TypeAlias = Literal["batch", "always", "never"]
AccountKind: TypeAlias = Literal["user", "source", "unknown"]

DEFAULT_PORTS = {"mqtts": 8883, "wss": 443, "mqtt": 1883, "ws": 80}
DEFAULT_QUEUE_SIZE = 10_000


class ConnectionOptions(TypedDict, total=False):
    """The keyword options of every client's constructor but the credentials (see :class:`Client`):
    where and how to connect, the session, flow control, and the durable outbox."""

    company: str | None
    auth: Auth | None
    transport: Transport
    port: int | None
    path: str
    ca_file: str | os.PathLike[str] | None
    ca_pem: str | bytes | None
    tls_insecure: bool
    client_id: str | None
    clean_session: bool
    keepalive: float
    reconnect: bool | Reconnect
    connect_timeout: float
    protocol: Literal[3, 5]
    on_event: Callable[[ConnectionEvent], object] | None
    max_packet_size: int
    inflight: int
    account_kind: AccountKind
    scope: bool
    offline: Offline
    max_queued: int
    outbox: str | os.PathLike[str] | None
    outbox_sync: OutboxSync
    outbox_max_bytes: int


class ClientOptions(ConnectionOptions, total=False):
    """The keyword options of ``Client(...)`` and ``AsyncClient(...)``."""

    username: str | None
    password: str | None
    source_id: str | None


class SourceOptions(ConnectionOptions, total=False):
    """The keyword options of ``SourceClient(...)`` besides its credentials."""

    connect: bool


class _UrlOptions(ClientOptions, total=False):
    host: str


class AsyncUrlOptions(_UrlOptions, total=False):
    """What ``AsyncClient.from_url`` and ``from_env`` take: the constructor's options, and ``host``,
    overriding the URL's or the environment's."""

    connect: Literal[False]


class UrlOptions(_UrlOptions, total=False):
    """What ``Client.from_url`` and ``from_env`` take (and, shared by both call styles, the source
    clients' ``from_url``, ``from_env`` and ``from_auth_config``; an async one refuses ``connect=True``)."""

    connect: bool


class AsyncSubscribeOptions(TypedDict, total=False):
    """The keyword options of ``AsyncClient.subscribe`` besides ``decode`` (see :meth:`Client.subscribe`)."""

    qos: int
    queue_size: int
    overflow: Overflow
    on_malformed: Callable[[MalformedMessage], object] | None
    timeout: float


class SubscribeOptions(AsyncSubscribeOptions, total=False):
    """The keyword options of ``Client.subscribe`` besides ``decode`` and ``callback``."""

    on_error: Callable[[BaseException], object] | None


@dataclass(frozen=True)
class Reconnect:
    """How to wait between reconnect attempts: exponential backoff from ``min_delay`` to ``max_delay``
    seconds, each delay varied by up to ``jitter`` (a fraction) either way.

    >>> import capture_mqtt as cm
    >>> cm.Reconnect(min_delay=0.1, max_delay=5.0).max_delay
    5.0
    """

    min_delay: float = 0.5
    max_delay: float = 30.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not (0 < self.min_delay <= self.max_delay):
            raise ValueError(f"need 0 < min_delay <= max_delay, got {self.min_delay} and {self.max_delay}")
        if not (0 <= self.jitter <= 1):
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter}")


def _read_ca(ca_file: str | os.PathLike[str] | None, ca_pem: str | bytes | None) -> list[bytes]:
    pems: list[bytes] = []
    if ca_file is not None:
        path = Path(ca_file)
        try:
            pems.append(path.read_bytes())
        except OSError as err:
            raise ValueError(f"ca_file {str(path)!r} cannot be read: {err.strerror}") from None
    if ca_pem is not None:
        pems.append(ca_pem.encode() if isinstance(ca_pem, str) else bytes(ca_pem))
    return pems


def _outbox_path(outbox: str | os.PathLike[str] | None) -> str | None:
    # A folder holds the outbox as outbox.db (with its WAL and lock files beside it).
    if outbox is None:
        return None
    path = Path(outbox)
    return str(path / "outbox.db" if path.is_dir() else path)


def _random_client_id() -> str:
    return f"capture-mqtt-{os.urandom(6).hex()}"


def _url_options(url: str) -> dict[str, Any]:
    parts = urllib.parse.urlsplit(url)
    transport = parts.scheme.lower()
    if transport not in DEFAULT_PORTS:
        raise ValueError(f"the URL scheme must be one of {sorted(DEFAULT_PORTS)}, got {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    options: dict[str, Any] = {"host": parts.hostname, "transport": transport, "port": parts.port}
    if parts.username is not None:
        options["username"] = urllib.parse.unquote(parts.username)
        options["password"] = urllib.parse.unquote(parts.password or "")
    if transport in ("ws", "wss") and parts.path:
        options["path"] = parts.path
    query = urllib.parse.parse_qs(parts.query)
    if "company" in query:
        options["company"] = query["company"][0]
    return options


ENV_VARIABLES = {
    "CAPTURE_MQTT_HOST": "host",
    "CAPTURE_MQTT_PORT": "port",
    "CAPTURE_MQTT_TRANSPORT": "transport",
    "CAPTURE_MQTT_PATH": "path",
    "CAPTURE_MQTT_USERNAME": "username",
    "CAPTURE_MQTT_PASSWORD": "password",
    "CAPTURE_MQTT_COMPANY": "company",
    "CAPTURE_MQTT_CA_FILE": "ca_file",
    "CAPTURE_MQTT_CLIENT_ID": "client_id",
}


def _env_options(environ: dict[str, str] | None = None, *, require_host: bool = True) -> dict[str, Any]:
    env = dict(os.environ if environ is None else environ)
    options: dict[str, Any] = {}
    if env.get("CAPTURE_MQTT_URL"):
        options.update(_url_options(env["CAPTURE_MQTT_URL"]))
    for variable, name in ENV_VARIABLES.items():
        value = env.get(variable)
        if value:
            options[name] = int(value) if name == "port" else value
    if require_host and "host" not in options:
        raise ValueError("set CAPTURE_MQTT_URL, or CAPTURE_MQTT_HOST (with CAPTURE_MQTT_USERNAME/_PASSWORD/_COMPANY)")
    if env.get("CAPTURE_MQTT_TLS_INSECURE", "").lower() in ("1", "true", "yes"):
        options["tls_insecure"] = True
    return options
