"""``Subscription`` and ``AsyncSubscription``: what ``subscribe()`` returns, in each call style, over
one native subscription (its bounded queue, its counters and its doorbell)."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from . import _core
from ._core import MalformedMessage
from .batch import Batch
from .errors import ClosedError

__all__ = ["AsyncSubscription", "Subscription"]

log = logging.getLogger("capture_mqtt")

#: What a subscription yields: DataPoint (raw tree), Message (other topics) or Command (a source's).
ItemT = TypeVar("ItemT")


class _SubscriptionBase:
    def __init__(self, native: Any, on_malformed: Callable[[MalformedMessage], object] | None) -> None:
        self._native = native
        self._on_malformed = on_malformed

    @property
    def filter(self) -> str:
        """The subscription's filter."""
        return str(self._native.filter)

    @property
    def stats(self) -> dict[str, int]:
        """Counters at this moment: received, delivered, malformed, dropped, queued."""
        return dict(self._native.stats())

    def _batch(self, taken: tuple[_core._Batch, list[MalformedMessage]]) -> Batch:
        native, malformed = taken
        for item in malformed:
            self._keep(item)
        return Batch(native)

    def _keep(self, item: Any) -> bool:
        if type(item) is _core.MalformedMessage:
            log.debug("malformed message on %r: %s", item.topic, item.reason)
            if self._on_malformed is not None:
                try:
                    self._on_malformed(item)
                except Exception:
                    log.exception("an on_malformed hook raised; the stream goes on")
            return False
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(filter={self.filter!r}, stats={self.stats})"


class Subscription(_SubscriptionBase, Generic[ItemT]):
    """A live subscription: iterate it, ``get`` one item, or let a callback consume it.

    Malformed messages are counted in ``stats["malformed"]`` and passed to ``on_malformed``
    (a :class:`MalformedMessage` with topic, raw bytes and reason); the stream goes on.

    >>> import capture_mqtt as cm
    >>> with cm.Client.from_env() as client, client.subscribe_raw(measurement="Monitoring") as sub:
    ...     first = sub.get(timeout=10)
    ...     for point in sub:
    ...         break
    >>> first.key, point.key
    ('CPU_Temp', 'CPU_Temp')
    """

    def __init__(
        self,
        native: Any,
        *,
        callback: Callable[[ItemT], object] | None = None,
        on_malformed: Callable[[MalformedMessage], object] | None = None,
        on_error: Callable[[BaseException], object] | None = None,
    ) -> None:
        super().__init__(native, on_malformed)
        self._on_error = on_error
        self._thread: threading.Thread | None = None
        if callback is not None:
            self._thread = threading.Thread(
                target=self._run_callback, args=(callback,), name=f"capture-mqtt-callback-{self.filter}", daemon=True
            )
            self._thread.start()

    def _run_callback(self, callback: Callable[[ItemT], object]) -> None:
        for item in self._items(report_errors=True):
            try:
                callback(item)
            except Exception as err:
                self._report(err, "a callback raised; the stream goes on")

    def _items(self, *, report_errors: bool = False) -> Iterator[ItemT]:
        # Items come in chunks: one wait (with the interpreter lock released) per chunk.
        native, keep = self._native, self._keep
        while True:
            try:
                items = native.get_many(1024, None)
            except ClosedError:
                return
            except Exception as err:
                if not report_errors:
                    raise
                self._report(err)  # the subscription failed (authorization)
                return
            for item in items:
                if keep(item):
                    yield item

    def _report(self, err: BaseException, what: str = "it ended") -> None:
        # Reported once: to on_error when there is one, else logged (a callback has no caller to raise to).
        if self._on_error is not None:
            try:
                self._on_error(err)
            except Exception:
                log.exception("an on_error hook raised")
        else:
            log.error("subscription to %r: %s: %s", self.filter, what, err, exc_info=err)

    def get(self, timeout: float | None = None) -> ItemT | None:
        """The next item, waiting up to ``timeout`` seconds (forever with None); None on timeout.
        Raises :class:`ClosedError` once the subscription has ended and everything was read.

        >>> import capture_mqtt as cm
        >>> with cm.Client.from_env() as client, client.subscribe_raw(measurement="Monitoring") as sub:
        ...     point = sub.get(timeout=10)
        ...     nothing = client.subscribe_raw(measurement="NoSuchMeasurement").get(timeout=0.1)
        >>> point.value, nothing
        (55, None)
        """
        while True:
            item = self._native.get(timeout)
            if item is None or self._keep(item):
                return item  # type: ignore[no-any-return]  # the native queue holds ItemT

    def __iter__(self) -> Iterator[ItemT]:
        return self._items()

    def batch(self, max_rows: int = 10_000, timeout: float | None = 1.0, *, tag_columns: Sequence[str] = ()) -> Batch:
        """Up to ``max_rows`` data points as one columnar :class:`Batch`, built in Rust: returns when it
        has ``max_rows`` or after ``timeout`` seconds (possibly empty). ``tag_columns`` copies those tags
        into columns of their own. Raises :class:`ClosedError` once the subscription has ended.

        >>> import capture_mqtt as cm
        >>> with cm.Client.from_env() as client, client.subscribe_raw(measurement="Monitoring") as sub:
        ...     batch = sub.batch(max_rows=3, timeout=10)
        >>> len(batch), batch.to_pandas()["value"].tolist()
        (3, [55.0, 55.0, 55.0])
        """
        return self._batch(self._native.batch(max_rows, timeout, list(tag_columns)).wait())

    def batches(
        self, max_rows: int = 10_000, timeout: float | None = 1.0, *, tag_columns: Sequence[str] = ()
    ) -> Iterator[Batch]:
        """Batches until the subscription ends (empty ones are skipped): ``for b in sub.batches(): ...``.

        >>> import capture_mqtt as cm
        >>> with cm.Client.from_env() as client, client.subscribe_raw(measurement="Monitoring") as sub:
        ...     sizes = []
        ...     for batch in sub.batches(max_rows=2, timeout=10):
        ...         sizes.append(len(batch))
        ...         if len(sizes) == 3:
        ...             break
        >>> sizes
        [2, 2, 2]
        """
        while True:
            try:
                batch = self.batch(max_rows, timeout, tag_columns=tag_columns)
            except ClosedError:
                return
            if len(batch):
                yield batch

    def close(self) -> None:
        """Stops delivery and unsubscribes at the broker.

        >>> import capture_mqtt as cm
        >>> with cm.Client.from_env() as client:
        ...     sub = client.subscribe_raw(measurement="Monitoring")
        ...     sub.close()
        ...     sub.get(timeout=1)
        Traceback (most recent call last):
        ...
        capture_mqtt.errors.ClosedError: the subscription to "v1/raw/AcmeCorp/+/+/Monitoring/#" has ended ...
        """
        self._native.close().wait()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncSubscription(_SubscriptionBase, Generic[ItemT]):
    """A subscription for asyncio: ``async for item in sub``. Items reach the event loop in chunks
    (one wake-up per chunk, not per message).

    >>> import asyncio
    >>> import capture_mqtt as cm
    >>> async def main():
    ...     async with cm.AsyncClient.from_env() as client:
    ...         async with await client.subscribe_raw(measurement="Monitoring") as sub:
    ...             async for point in sub:
    ...                 return point.measurement
    >>> asyncio.run(main())
    'Monitoring'
    """

    def __init__(self, native: Any, *, on_malformed: Callable[[MalformedMessage], object] | None = None) -> None:
        super().__init__(native, on_malformed)
        self._buffer: collections.deque[ItemT] = collections.deque()
        self._bell: int | None = native.bell_fd()
        self._waiting: asyncio.Future[None] | None = None

    async def _readable(self) -> None:
        # The event loop watches the subscription's doorbell descriptor itself: no thread of the
        # network runtime takes the interpreter lock to wake it, and one wake-up covers a chunk.
        if self._bell is None:
            await self._native.readable()
            return
        if self._waiting is not None:  # another coroutine waits already: share its wake-up
            await asyncio.shield(self._waiting)
            return
        if self._native.arm():
            return
        loop = asyncio.get_running_loop()
        waiting = self._waiting = loop.create_future()

        def ring() -> None:
            if not waiting.done():
                waiting.set_result(None)

        try:
            loop.add_reader(self._bell, ring)
        except NotImplementedError:  # a loop that cannot watch a descriptor (Windows' Proactor)
            try:
                await self._native.readable()  # waits in a worker thread on such a loop
            finally:
                ring()
                self._waiting = None
                self._native.clear_bell()
            return
        try:
            await waiting
        finally:
            loop.remove_reader(self._bell)
            self._waiting = None
            self._native.clear_bell()

    def __aiter__(self) -> AsyncIterator[ItemT]:
        return self

    async def __anext__(self) -> ItemT:
        while True:
            if self._buffer:
                return self._buffer.popleft()
            try:
                items = self._native.drain(4096)
            except ClosedError:
                raise StopAsyncIteration from None
            if items:
                self._buffer.extend(item for item in items if self._keep(item))
                continue
            await self._readable()

    async def batch(
        self, max_rows: int = 10_000, timeout: float | None = 1.0, *, tag_columns: Sequence[str] = ()
    ) -> Batch:
        """Like :meth:`Subscription.batch`, without blocking the event loop.

        >>> import asyncio
        >>> import capture_mqtt as cm
        >>> async def main():
        ...     async with cm.AsyncClient.from_env() as client:
        ...         sub = await client.subscribe_raw(measurement="Monitoring")
        ...         return len(await sub.batch(max_rows=3, timeout=10))
        >>> asyncio.run(main())
        3
        """
        if self._buffer:
            raise RuntimeError("batch() after a partial async iteration would reorder items; use one or the other")
        return self._batch(await self._native.batch(max_rows, timeout, list(tag_columns)))

    async def batches(
        self, max_rows: int = 10_000, timeout: float | None = 1.0, *, tag_columns: Sequence[str] = ()
    ) -> AsyncIterator[Batch]:
        """Like :meth:`Subscription.batches`: ``async for b in sub.batches(): ...`` until the
        subscription ends (empty batches are skipped).

        >>> import asyncio
        >>> import capture_mqtt as cm
        >>> async def main():
        ...     async with cm.AsyncClient.from_env() as client:
        ...         sub = await client.subscribe_raw(measurement="Monitoring")
        ...         async for batch in sub.batches(max_rows=2, timeout=10):
        ...             return len(batch)
        >>> asyncio.run(main())
        2
        """
        while True:
            try:
                batch = await self.batch(max_rows, timeout, tag_columns=tag_columns)
            except ClosedError:
                return
            if len(batch):
                yield batch

    async def get(self, timeout: float | None = None) -> ItemT | None:
        """The next item, or None after ``timeout`` seconds.

        >>> import asyncio
        >>> import capture_mqtt as cm
        >>> async def main():
        ...     async with cm.AsyncClient.from_env() as client:
        ...         sub = await client.subscribe_raw(measurement="Monitoring")
        ...         return (await sub.get(timeout=10)).value, await sub.get(timeout=0)
        >>> asyncio.run(main())[0]
        55
        """
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except TimeoutError:
            return None
        except StopAsyncIteration:
            raise ClosedError("the subscription has ended") from None

    async def close(self) -> None:
        """Stops delivery and unsubscribes at the broker.

        >>> import asyncio
        >>> import capture_mqtt as cm
        >>> async def main():
        ...     async with cm.AsyncClient.from_env() as client:
        ...         sub = await client.subscribe_raw(measurement="Monitoring")
        ...         await sub.close()
        ...         return [point async for point in sub]
        >>> asyncio.run(main())
        []
        """
        await self._native.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
