"""``AsyncClient``: the asyncio facade over the one implementation ``Client`` uses. Every call that
may wait is a native operation, awaited through the session's doorbell (see ``_aio.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, Self, Unpack, cast, overload

from . import _core
from ._core import Command, DataPoint, MalformedMessage, Message
from .client import _LIVE, _BaseClient, _settle_soon
from .errors import ClosedError
from .options import (
    DEFAULT_QUEUE_SIZE,
    AsyncSubscribeOptions,
    AsyncUrlOptions,
    ClientOptions,
    Overflow,
    _env_options,
    _url_options,
)
from .subscription import AsyncSubscription

__all__ = ["AsyncClient"]


class AsyncClient(_BaseClient):
    """The asyncio client: ``async with cm.AsyncClient(...) as client`` connects, and
    ``async for point in await client.subscribe(...)`` delivers data points in chunks.

    >>> import capture_mqtt as cm
    >>> cm.AsyncClient("broker.example", connect=False)
    AsyncClient(address='mqtts://broker.example:8883', not connected)
    """

    def __init__(self, host: str, *, connect: Literal[False] = False, **options: Unpack[ClientOptions]) -> None:
        # Connecting needs an event loop: it happens in `async with` or `await connect()`.
        if connect:
            raise TypeError(
                "an AsyncClient connects in `async with cm.AsyncClient(...)` or with `await client.connect()`, "
                "not in its constructor: leave out connect=True"
            )
        super().__init__(host, **options)

    @classmethod
    def from_url(cls, url: str, **options: Unpack[AsyncUrlOptions]) -> Self:
        """Like :meth:`Client.from_url`.

        >>> import capture_mqtt as cm
        >>> cm.AsyncClient.from_url("mqtt://127.0.0.1:1883").address
        'mqtt://127.0.0.1:1883'
        """
        merged: dict[str, Any] = {**_url_options(url), **options}
        return cls(merged.pop("host"), **merged)

    @classmethod
    def from_env(cls, **options: Unpack[AsyncUrlOptions]) -> Self:
        """Like :meth:`Client.from_env`.

        >>> import capture_mqtt as cm
        >>> client = cm.AsyncClient.from_env()  # CAPTURE_MQTT_URL="mqtt://alice:...@127.0.0.1:...?company=AcmeCorp"
        >>> client.company
        'AcmeCorp'
        """
        merged: dict[str, Any] = {**_env_options(), **options}
        return cls(merged.pop("host"), **merged)

    async def connect(self, *, wait: bool = True) -> None:
        """Connects; raises the connection's error. ``wait=False``: as :meth:`Client.connect`.

        >>> import asyncio
        >>> import capture_mqtt as cm
        >>> async def main():
        ...     client = cm.AsyncClient.from_env()
        ...     await client.connect()
        ...     connected = client.is_connected
        ...     await client.close()
        ...     return connected
        >>> asyncio.run(main())
        True
        """
        if self._closed:
            raise ClosedError("the client is closed")
        if wait:
            await self._native.connect()
        else:
            self._native.start()

    async def close(self) -> None:
        """Disconnects cleanly; subscriptions end. Idempotent.

        >>> import asyncio
        >>> import capture_mqtt as cm
        >>> async def main():
        ...     async with cm.AsyncClient.from_env() as client:
        ...         pass
        ...     return client.is_connected
        >>> asyncio.run(main())
        False
        """
        if self._closed:
            return
        self._closed = True
        # The dispatcher thread ends after the session's last event: it tells the loop so.
        loop = asyncio.get_running_loop()
        ended = loop.create_future()
        self._dispatcher_ended.append(functools.partial(_settle_soon, loop, ended))
        await self._native.close_op(2.0)
        if self._dispatcher.is_alive():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(ended), timeout=3.0)
        _LIVE.discard(self)

    async def __aenter__(self) -> Self:
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @overload
    async def subscribe(
        self, filter: str, *, decode: Literal["raw"], **options: Unpack[AsyncSubscribeOptions]
    ) -> AsyncSubscription[DataPoint]: ...
    @overload
    async def subscribe(
        self, filter: str, *, decode: Literal["bytes"], **options: Unpack[AsyncSubscribeOptions]
    ) -> AsyncSubscription[Message]: ...
    @overload
    async def subscribe(
        self, filter: str, *, decode: Literal["command"], **options: Unpack[AsyncSubscribeOptions]
    ) -> AsyncSubscription[Command]: ...
    @overload
    async def subscribe(
        self, filter: str, *, decode: Literal["auto"] = "auto", **options: Unpack[AsyncSubscribeOptions]
    ) -> AsyncSubscription[DataPoint | Message]: ...
    async def subscribe(
        self,
        filter: str,
        *,
        qos: int = 0,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        overflow: Overflow = "block",
        on_malformed: Callable[[MalformedMessage], object] | None = None,
        decode: Literal["auto", "raw", "bytes", "command"] = "auto",
        timeout: float = 10.0,
    ) -> AsyncSubscription[Any]:
        """Subscribes; ``async for`` over the result. Same rules as :meth:`Client.subscribe`.

        >>> import asyncio
        >>> import capture_mqtt as cm
        >>> async def main():
        ...     async with cm.AsyncClient.from_env() as client:
        ...         sub = await client.subscribe("v1/raw/AcmeCorp/+/+/Monitoring/#")
        ...         async for point in sub:
        ...             return point.key, point.value
        >>> asyncio.run(main())
        ('CPU_Temp', 55)
        """
        native = await self._native_subscribe(
            filter, qos=qos, decode=decode, queue_size=queue_size, overflow=overflow, timeout=timeout
        )
        return AsyncSubscription(native, on_malformed=on_malformed)

    async def subscribe_raw(
        self,
        source: str = "+",
        connection: str = "+",
        measurement: str = "+",
        key: str = "#",
        **options: Unpack[AsyncSubscribeOptions],
    ) -> AsyncSubscription[DataPoint]:
        """Subscribes to the client's company's raw tree.

        >>> import asyncio
        >>> import capture_mqtt as cm
        >>> async def main():
        ...     async with cm.AsyncClient.from_env() as client:
        ...         sub = await client.subscribe_raw(measurement="Monitoring")
        ...         return (await sub.get(timeout=10)).source_id
        >>> asyncio.run(main())
        'src-1'
        """
        extra = cast("dict[str, Any]", options)  # an untyped caller may still pass decode=
        decode = extra.pop("decode", "raw")
        subscription: AsyncSubscription[DataPoint] = await self.subscribe(
            self._raw_filter_for(source, connection, measurement, key), decode=decode, **extra
        )
        return subscription

    async def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        wait: bool | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Publishes and waits (without blocking the event loop) for the acknowledgement, or, with a
        durable outbox (``outbox=``), until it is on disk; ``wait=True`` waits for the broker in any
        case, ``wait=False`` only until it is queued.

        >>> import asyncio
        >>> import capture_mqtt as cm
        >>> async def main():
        ...     async with cm.AsyncClient.from_env() as client:
        ...         await client.publish("v1/sources/src-1/cmd/writedata", cm.command_payload("Line1/Valve/Open", True))
        ...         return client.stats["acknowledged"]
        >>> asyncio.run(main())
        1
        """
        op = self._native.publish(
            topic, payload, qos=qos, retain=retain, wait=self._wait_default(wait), timeout=timeout
        )
        if op is not None:
            await op

    async def send_command(
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
    ) -> None:
        """Like :meth:`Client.send_command`, awaitable.

        >>> import asyncio
        >>> import capture_mqtt as cm
        >>> async def main():
        ...     async with cm.AsyncClient.from_env() as client:
        ...         await client.send_command("src-1", "Line1/Valve/Open", True)
        ...         return client.stats["acknowledged"]
        >>> asyncio.run(main())
        1
        """
        command_topic = _core.command_topic(source_id)
        payload = _core.command_payload(topic, data, mapping=mapping, data_as=data_as)
        await self.publish(command_topic, payload, qos=qos, wait=wait, timeout=timeout)
