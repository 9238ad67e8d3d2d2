"""``Client``: connecting to Capture's broker, subscribing and publishing, for scripts and notebooks;
and ``_BaseClient``, what it shares with ``AsyncClient`` (``async_client.py``).

Both wrap one native session (Rust: tokio + rumqttc). Network work never runs Python code: events,
token requests and subscription callbacks are run by a dispatcher thread per client.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self, TypedDict, Unpack, cast, overload

from . import _core
from ._core import Command, DataPoint, MalformedMessage, Message
from .auth import Auth
from .errors import ClosedError
from .options import (
    DEFAULT_PORTS,
    DEFAULT_QUEUE_SIZE,
    AccountKind,
    ClientOptions,
    Offline,
    OutboxSync,
    Overflow,
    Reconnect,
    SubscribeOptions,
    Transport,
    UrlOptions,
    _env_options,
    _outbox_path,
    _random_client_id,
    _read_ca,
    _url_options,
)
from .subscription import Subscription

__all__ = ["Client", "ConnectionEvent", "OutboxStats"]

log = logging.getLogger("capture_mqtt")


class OutboxStats(TypedDict):
    """A durable outbox's counters (``client.outbox_stats``)."""

    records: int
    """Records held: pushed, not yet acknowledged by the broker."""
    bytes: int
    """Topic and payload bytes held (what ``outbox_max_bytes`` bounds)."""
    replayed: int
    """Records found at start and sent again (pushed by an earlier process)."""
    dropped: int
    """Records dropped (``offline="drop_oldest"``) or lost to a damaged store."""
    unsaved: int
    """Pushes kept in memory only because the store could not take them (a full disk)."""
    oldest_age: float | None
    """Seconds since the oldest record held was pushed; None when none is held."""
    path: str
    """The store's file."""


@dataclass(frozen=True)
class ConnectionEvent:
    """Something that happened to a client's connection.

    ``kind`` is ``"connected"`` (with ``session_present``), ``"disconnected"`` (with ``reason``),
    ``"reconnecting"`` (with ``attempt`` and ``delay`` in seconds) or ``"closed"``.

    >>> import capture_mqtt as cm
    >>> cm.ConnectionEvent("reconnecting", attempt=1, delay=0.5).kind
    'reconnecting'
    """

    kind: str
    session_present: bool | None = None
    reason: str | None = None
    attempt: int | None = None
    delay: float | None = None


# Clients still open, closed at interpreter exit so that nothing hangs or crashes there.
_LIVE: weakref.WeakSet[_BaseClient] = weakref.WeakSet()


def _close_all_at_exit() -> None:
    for client in list(_LIVE):
        try:
            client._close_now(grace=0.5)
        except Exception:
            log.debug("closing a client at exit failed", exc_info=True)


atexit.register(_close_all_at_exit)


class _BaseClient:
    """What Client and AsyncClient share: options, the native session, the dispatcher thread."""

    def __init__(
        self,
        host: str,
        *,
        company: str | None = None,
        username: str | None = None,
        password: str | None = None,
        auth: Auth | None = None,
        transport: Transport = "mqtts",
        port: int | None = None,
        path: str = "/mqtt",
        ca_file: str | os.PathLike[str] | None = None,
        ca_pem: str | bytes | None = None,
        tls_insecure: bool = False,
        client_id: str | None = None,
        clean_session: bool = True,
        keepalive: float = 30.0,
        reconnect: bool | Reconnect = True,
        connect_timeout: float = 10.0,
        protocol: Literal[3, 5] = 3,
        on_event: Callable[[ConnectionEvent], object] | None = None,
        max_packet_size: int = 1024 * 1024,
        inflight: int = 512,
        account_kind: AccountKind = "user",
        scope: bool = True,
        source_id: str | None = None,
        offline: Offline = "block",
        max_queued: int = 10_000,
        outbox: str | os.PathLike[str] | None = None,
        outbox_sync: OutboxSync = "batch",
        outbox_max_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be a non-empty str, got {host!r}")
        if transport not in DEFAULT_PORTS:
            raise ValueError(f"transport must be one of {sorted(DEFAULT_PORTS)}, got {transport!r}")
        port = DEFAULT_PORTS[transport] if port is None else port
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port must be between 1 and 65535, got {port!r}")
        if protocol not in (3, 5):
            raise ValueError(f"protocol must be 3 (MQTT 3.1.1) or 5 (MQTT 5), got {protocol!r}")
        if keepalive < 1:
            raise ValueError(f"keepalive must be at least 1 second, got {keepalive}")
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be positive, got {connect_timeout}")
        if not clean_session and client_id is None:
            raise ValueError(
                "clean_session=False keeps a session on the broker under the client id; pass a fixed client_id"
            )
        if auth is not None and (username is not None or password is not None):
            raise ValueError("pass either auth=... or username/password, not both")
        if auth is None and username is not None:
            if password is None:
                raise ValueError(f"username {username!r} was given without a password")
            auth = Auth.password(username, password)
        policy = reconnect if isinstance(reconnect, Reconnect) else Reconnect()
        self.company = company
        self._auth = auth
        self._on_event: list[Callable[[ConnectionEvent], object]] = [on_event] if on_event else []
        self._native = _core._Session(
            host,
            transport=transport,
            port=port,
            path=path,
            ca_pem=_read_ca(ca_file, ca_pem),
            tls_insecure=tls_insecure,
            client_id=client_id or _random_client_id(),
            clean_session=clean_session,
            keepalive=float(keepalive),
            reconnect=bool(reconnect),
            min_delay=policy.min_delay,
            max_delay=policy.max_delay,
            jitter=policy.jitter,
            connect_timeout=float(connect_timeout),
            protocol=protocol,
            username=auth.username if auth else None,
            password=None if auth is None or auth.is_callable else auth.secret(),
            token_callable=bool(auth and auth.is_callable),
            account_kind=account_kind,
            company=company,
            source_id=source_id,
            # Capture has no anonymous access: a client without credentials talks to another broker.
            scope=bool(scope) and auth is not None,
            max_packet_size=max_packet_size,
            inflight=inflight,
            offline=offline,
            max_queued=max_queued,
            outbox=_outbox_path(outbox),
            outbox_sync=outbox_sync,
            outbox_max_bytes=outbox_max_bytes,
        )
        self._durable = outbox is not None
        self._closed = False
        self._dispatcher_ended: list[Callable[[], object]] = []
        self._dispatcher = threading.Thread(
            target=self._dispatch, name=f"capture-mqtt-dispatch-{self.client_id}", daemon=True
        )
        self._dispatcher.start()
        _LIVE.add(self)

    # Connection facts

    @property
    def address(self) -> str:
        """Where the client connects, without credentials (``mqtts://host:8883``)."""
        return str(self._native.address)

    @property
    def client_id(self) -> str:
        """The MQTT client id (random with a ``capture-mqtt-`` prefix unless one was given)."""
        return str(self._native.client_id)

    @property
    def is_connected(self) -> bool:
        """Whether the connection is up right now."""
        return bool(self._native.is_connected)

    @property
    def stats(self) -> dict[str, int]:
        """Counters at this moment: published, acknowledged, queued (offline), dropped (from the
        offline queue), received, unrouted (no subscription wanted them: dropped and logged), held (a
        persistent session's messages waiting for a matching subscribe()), oversize (packets over
        max_packet_size: dropped and logged), reconnects."""
        return dict(self._native.stats())

    def _publish(
        self, topic: str, payload: bytes | str, *, qos: int, retain: bool, wait: bool | None, timeout: float
    ) -> _core._Operation[None] | None:
        # The sync call style of a publish: blocks until done when waiting, else hands back the
        # operation (a handle with wait(timeout)).
        wait = self._wait_default(wait)
        op = self._native.publish(topic, payload, qos=qos, retain=retain, wait=wait, timeout=timeout, handle=not wait)
        if not wait:
            return op
        if op is not None:
            op.wait()
        return None

    def _wait_default(self, wait: bool | None) -> bool:
        # A QoS 1 message is safe once acknowledged, or once on disk in a durable outbox: without
        # one, a call waits for the broker; with one, it returns once the message is on disk (so a
        # device goes on during an outage), unless the caller asks to wait for the broker too.
        return (not self._durable) if wait is None else wait

    @property
    def outbox_stats(self) -> OutboxStats | None:
        """The durable outbox (``outbox=``) at this moment: records and bytes held, replayed (sent
        again after a restart), dropped, unsaved (kept in memory only: a full disk or a damaged
        store), the oldest record's age in seconds, and its path; None without a durable outbox."""
        stats = self._native.outbox_stats()
        return None if stats is None else cast(OutboxStats, dict(stats))

    def on_event(self, callback: Callable[[ConnectionEvent], object]) -> None:
        """Calls ``callback(event)`` for every :class:`ConnectionEvent`, on the dispatcher thread.

        >>> import capture_mqtt as cm
        >>> events = []
        >>> client = cm.Client.from_env(connect=False)
        >>> client.on_event(lambda event: events.append(event.kind))
        >>> client.connect()
        >>> client.close()
        >>> events
        ['connected', 'closed']
        """
        self._on_event.append(callback)

    def __repr__(self) -> str:
        who = f", username={self._auth.username!r}" if self._auth else ""
        state = "closed" if self._closed else ("connected" if self.is_connected else "not connected")
        return f"{type(self).__name__}(address={self.address!r}{who}, {state})"

    # The dispatcher thread: events and token requests, never on the network threads.

    def _dispatch(self) -> None:
        try:
            self._dispatch_jobs()
        finally:
            for ended in self._dispatcher_ended:
                ended()

    def _dispatch_jobs(self) -> None:
        native = self._native
        while True:
            try:
                job = native.next_job(0.5)
            except Exception:
                return
            if job is None:
                continue
            kind, payload = job
            if kind == "closed":
                return
            if kind == "token":
                self._answer_token(payload)
            elif kind == "event":
                name, session_present, reason, attempt, delay = payload
                event = ConnectionEvent(name, session_present, reason, attempt, delay)
                for callback in list(self._on_event):
                    try:
                        callback(event)
                    except Exception:
                        log.exception("an on_event callback raised; the client goes on")

    def _answer_token(self, request: Any) -> None:
        auth = self._auth
        if auth is None:
            request.fail("no credentials configured")
            return
        try:
            token = auth.secret()
        except Exception as err:
            log.warning("the token callable for %r failed: %s", auth.username, type(err).__name__)
            request.fail(f"the token callable raised {type(err).__name__}")
            return
        expiry = _core._jwt_expiry(token)
        if expiry is not None:
            log.debug("fresh token for %r expires at %s (epoch seconds)", auth.username, expiry)
        request.reply(token)

    # Closing

    def _close_now(self, grace: float = 2.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._native.close(grace)
        self._join_dispatcher(grace)

    def _join_dispatcher(self, grace: float) -> None:
        # The closed session ends the dispatcher's job queue: the thread ends after its last job.
        if self._dispatcher is not threading.current_thread():
            self._dispatcher.join(timeout=grace + 1.0)
        _LIVE.discard(self)

    # Subscribing

    def _raw_filter_for(self, source: str, connection: str, measurement: str, key: str) -> str:
        if self.company is None:
            raise ValueError("subscribe_raw needs the client's company: pass company=... to the client")
        return str(_core.raw_filter(self.company, source, connection, measurement, key))

    def _native_subscribe(
        self,
        filter: str,
        *,
        qos: int,
        decode: Literal["auto", "raw", "bytes", "command"],
        queue_size: int,
        overflow: Overflow,
        timeout: float,
    ) -> _core._Operation[_core._Subscription]:
        _core.validate_filter(filter)
        if decode == "auto":
            decode = "raw" if filter.split("/")[:2] == ["v1", "raw"] or "/v1/raw/" in filter else "bytes"
        return self._native.subscribe(
            filter, qos=qos, decode=decode, queue_size=queue_size, overflow=overflow, timeout=timeout
        )


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _settle_soon(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
    # From another thread; a loop that closed meanwhile has nobody waiting any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, future)


class Client(_BaseClient):
    """A connection to Capture's broker (or any MQTT broker), for scripts and notebooks. Thread-safe.

    The constructor connects before it returns and raises the connection's error
    (:class:`ConnectError`, :class:`AuthenticationError`, :class:`TimeoutError`); with
    ``connect=False`` it does not, so that subscriptions can be declared first (persistent sessions),
    and :meth:`connect` connects. Afterwards the client reconnects on its own with backoff and
    re-subscribes. Use it as a context manager, or call :meth:`close`.

    >>> import capture_mqtt as cm
    >>> client = cm.Client("broker.example", username="alice", password="secret", connect=False)
    >>> client
    Client(address='mqtts://broker.example:8883', username='alice', not connected)
    >>> client.close()
    """

    def __init__(self, host: str, *, connect: bool = True, **options: Unpack[ClientOptions]) -> None:
        super().__init__(host, **options)
        if connect:
            try:
                # With a durable outbox the client connects in the background: a device that starts
                # during an outage goes on, its pushes kept on disk until the broker is back.
                self.connect(wait=options.get("outbox") is None)
            except BaseException:
                self._close_now(grace=0.2)
                raise

    @classmethod
    def from_url(cls, url: str, **options: Unpack[UrlOptions]) -> Self:
        """A client from ``mqtts://user:secret@host:8883`` (or ``wss://.../mqtt``, ``mqtt://``,
        ``ws://``); ``?company=AcmeCorp`` sets the company. Keyword options override the URL.

        >>> import capture_mqtt as cm
        >>> c = cm.Client.from_url("wss://alice:secret@broker.example:8084/mqtt?company=AcmeCorp", connect=False)
        >>> c.address, c.company
        ('wss://broker.example:8084/mqtt', 'AcmeCorp')
        >>> c.close()
        """
        merged: dict[str, Any] = {**_url_options(url), **options}
        return cls(merged.pop("host"), **merged)

    @classmethod
    def from_env(cls, **options: Unpack[UrlOptions]) -> Self:
        """A client from environment variables: ``CAPTURE_MQTT_URL``, or ``CAPTURE_MQTT_HOST`` with
        ``CAPTURE_MQTT_PORT``, ``_TRANSPORT``, ``_PATH``, ``_USERNAME``, ``_PASSWORD``, ``_COMPANY``,
        ``_CA_FILE``, ``_CLIENT_ID`` and ``_TLS_INSECURE``. Keyword options override them.

        >>> import capture_mqtt as cm
        >>> import os
        >>> os.environ["CAPTURE_MQTT_URL"] = "mqtt://alice:secret@127.0.0.1:1883?company=AcmeCorp"
        >>> cm.Client.from_env(connect=False).company
        'AcmeCorp'
        >>> del os.environ["CAPTURE_MQTT_URL"]
        """
        merged: dict[str, Any] = {**_env_options(), **options}
        return cls(merged.pop("host"), **merged)

    def connect(self, *, wait: bool = True) -> None:
        """Connects (when constructed with ``connect=False``); raises the connection's error. With
        ``wait=False`` it starts connecting in the background and returns at once: a failed attempt
        is retried with backoff, as after a lost connection (a device that starts during an outage
        goes on pushing into its outbox).

        >>> import capture_mqtt as cm
        >>> cm.Client("127.0.0.1", transport="mqtt", port=1, connect=False).connect()
        Traceback (most recent call last):
        ...
        capture_mqtt.errors.ConnectError: connection refused by mqtt://127.0.0.1:1: ...
        """
        if self._closed:
            raise ClosedError("the client is closed")
        if wait:
            self._native.connect().wait()
        else:
            self._native.start()

    def close(self) -> None:
        """Disconnects cleanly and stops the client's threads; subscriptions end. Idempotent.

        >>> import capture_mqtt as cm
        >>> cm.Client("broker.example", connect=False).close()
        """
        self._close_now()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @overload
    def subscribe(
        self,
        filter: str,
        *,
        decode: Literal["raw"],
        callback: Callable[[DataPoint], object] | None = None,
        **options: Unpack[SubscribeOptions],
    ) -> Subscription[DataPoint]: ...
    @overload
    def subscribe(
        self,
        filter: str,
        *,
        decode: Literal["bytes"],
        callback: Callable[[Message], object] | None = None,
        **options: Unpack[SubscribeOptions],
    ) -> Subscription[Message]: ...
    @overload
    def subscribe(
        self,
        filter: str,
        *,
        decode: Literal["command"],
        callback: Callable[[Command], object] | None = None,
        **options: Unpack[SubscribeOptions],
    ) -> Subscription[Command]: ...
    @overload
    def subscribe(
        self,
        filter: str,
        *,
        decode: Literal["auto"] = "auto",
        callback: Callable[[DataPoint | Message], object] | None = None,
        **options: Unpack[SubscribeOptions],
    ) -> Subscription[DataPoint | Message]: ...
    def subscribe(
        self,
        filter: str,
        *,
        qos: int = 0,
        callback: Callable[[Any], object] | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        overflow: Overflow = "block",
        on_malformed: Callable[[MalformedMessage], object] | None = None,
        on_error: Callable[[BaseException], object] | None = None,
        decode: Literal["auto", "raw", "bytes", "command"] = "auto",
        timeout: float = 10.0,
    ) -> Subscription[Any]:
        """Subscribes to ``filter`` and returns a :class:`Subscription` to iterate, ``get`` from, or
        read in batches; with ``callback``, each item is passed to it on a dispatcher thread instead.

        Filters under ``v1/raw/`` yield :class:`DataPoint`; other filters yield :class:`Message`
        (``decode="raw"``, ``"bytes"`` or ``"command"`` says which, and types the subscription).
        Raises :class:`TopicError` for a filter Capture would refuse (nothing is sent), and
        :class:`AuthorizationError` when the broker refuses it.

        >>> import capture_mqtt as cm
        >>> with cm.Client.from_env() as client, client.subscribe("v1/raw/AcmeCorp/+/+/Monitoring/#") as sub:
        ...     point = sub.get(timeout=10)
        >>> point.measurement, point.key, point.value
        ('Monitoring', 'CPU_Temp', 55)
        """
        native = self._native_subscribe(
            filter, qos=qos, decode=decode, queue_size=queue_size, overflow=overflow, timeout=timeout
        ).wait()
        return Subscription(native, callback=callback, on_malformed=on_malformed, on_error=on_error)

    def subscribe_raw(
        self,
        source: str = "+",
        connection: str = "+",
        measurement: str = "+",
        key: str = "#",
        *,
        callback: Callable[[DataPoint], object] | None = None,
        **options: Unpack[SubscribeOptions],
    ) -> Subscription[DataPoint]:
        """Subscribes to the client's company's raw tree; the levels are names, ``+`` or ``#``.

        >>> import capture_mqtt as cm
        >>> with cm.Client.from_env() as client, client.subscribe_raw(measurement="Monitoring") as sub:
        ...     point = sub.get(timeout=10)
        >>> point.topic
        'v1/raw/AcmeCorp/src-1/Conn/Monitoring/CPU_Temp'
        """
        extra = cast("dict[str, Any]", options)  # an untyped caller may still pass decode=
        decode = extra.pop("decode", "raw")
        return self.subscribe(
            self._raw_filter_for(source, connection, measurement, key), decode=decode, callback=callback, **extra
        )

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        wait: bool | None = None,
        timeout: float = 30.0,
    ) -> Any:
        """Publishes a message; returns once the broker acknowledged it (QoS 1/2), or, with a durable
        outbox (``outbox=``), once it is on disk. QoS 0 returns at once (it goes out with the network
        thread's next write), as in every MQTT client. ``wait=True`` waits for the broker in any case;
        ``wait=False`` returns a handle with ``wait(timeout)`` at once. A message over
        the packet size limit (``max_packet_size``, or the broker's under MQTT 5) raises
        :class:`PayloadError` before anything is sent.

        >>> import capture_mqtt as cm
        >>> topic = "v1/sources/src-1/cmd/writedata"
        >>> with cm.Client.from_env() as client:
        ...     client.publish(topic, cm.command_payload("Line1/Valve/Open", True))  # returns once acknowledged
        ...     handle = client.publish(topic, cm.command_payload("Line1/Valve/Open", False), wait=False)
        ...     handle.wait(10)
        ...     client.stats["acknowledged"]
        2
        """
        return self._publish(topic, payload, qos=qos, retain=retain, wait=wait, timeout=timeout)

    def send_command(
        self,
        source_id: str,
        topic: str | tuple[str, str, str],
        data: Any,
        *,
        mapping: str | None = None,
        qos: int = 1,
        data_as: Literal["string", "json"] = "string",
        wait: bool | None = None,
        timeout: float = 30.0,
    ) -> Any:
        """Sends a ``writedata`` command to a source: ``topic`` is ``"Connection/Measurement/Variable"``
        or a 3-tuple, ``data`` the value to write (sent as a JSON string, as Capture's template shows,
        unless ``data_as="json"``), ``mapping`` the device-side address if needed. Checked before sending
        (:class:`TopicError`, :class:`PayloadError`); returns once the broker acknowledged it (with a
        durable outbox: once it is on disk; ``wait`` as in :meth:`publish`).

        >>> import capture_mqtt as cm
        >>> with cm.Client.from_env() as client:
        ...     client.send_command("src-1", "Line1/Valve/Open", True)
        ...     client.stats["acknowledged"]
        1
        """
        command_topic = _core.command_topic(source_id)
        payload = _core.command_payload(topic, data, mapping=mapping, data_as=data_as)
        return self.publish(command_topic, payload, qos=qos, wait=wait, timeout=timeout)
