"""Awaiting a native operation without a thread hop.

An operation runs on the network runtime and, when it ends, its id goes on its session's completion
list, whose doorbell descriptor turns readable when the list turns non-empty. The event loop watches
that descriptor (``add_reader``): one wake-up settles every operation that ended meanwhile, and no
network thread takes the interpreter lock. Where a loop has no ``add_reader`` (or the platform no
descriptor), the wait runs in a worker thread instead.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

_LOCK = threading.Lock()


class _Watch:
    """The operations awaited on one session's completion list, across event loops."""

    def __init__(self, completions: Any, fd: int) -> None:
        self.completions = completions
        self.fd = fd
        self.pending: dict[int, tuple[Any, asyncio.Future[Any]]] = {}
        self.waiting: dict[asyncio.AbstractEventLoop, int] = {}  # awaited operations per loop
        self.readers: set[asyncio.AbstractEventLoop] = set()

    def add(self, op: Any, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any] | None:
        """A future for `op`'s end; None when `loop` cannot watch descriptors (Windows' Proactor)."""
        with _LOCK:
            watching = loop in self.readers
        if not watching:
            try:
                loop.add_reader(self.fd, self.ring)
            except NotImplementedError:
                return None
        future: asyncio.Future[Any] = loop.create_future()
        with _LOCK:
            self.pending[op.id] = (op, future)
            self.waiting[loop] = self.waiting.get(loop, 0) + 1
            self.readers.add(loop)
        return future

    def ring(self) -> None:
        running = asyncio.get_running_loop()
        ready = self.completions.take_ready()
        with _LOCK:
            settled = [self.pending.pop(op_id) for op_id in ready if op_id in self.pending]
            for _, future in settled:
                self.waiting[future.get_loop()] -= 1
        others = set()
        for op, future in settled:
            loop = future.get_loop()
            if loop is running:
                _settle(op, future)
            else:
                loop.call_soon_threadsafe(_settle, op, future)
                others.add(loop)
        self.release_if_idle(running)
        for loop in others:
            loop.call_soon_threadsafe(self.release_if_idle, loop)

    def release_if_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        # Called on `loop` itself: a loop with nothing awaited stops watching the descriptor.
        with _LOCK:
            if self.waiting.get(loop, 1) != 0:
                return
            del self.waiting[loop]
            self.readers.discard(loop)
            if not self.readers:
                _WATCHES.pop((self.fd, self.completions.key()), None)
        loop.remove_reader(self.fd)


def _settle(op: Any, future: asyncio.Future[Any]) -> None:
    if future.done():  # the awaiting task was cancelled; the operation ended anyway
        return
    try:
        future.set_result(op.result())
    except BaseException as err:
        future.set_exception(err)


_WATCHES: dict[tuple[int, int], _Watch] = {}


async def wait_operation(op: Any) -> Any:
    """Awaits a native operation: its value, or its error."""
    if op.done():
        return op.result()
    completions = op.completions()
    fd = completions.fd()
    loop = asyncio.get_running_loop()
    if fd is None:
        return await asyncio.to_thread(op.wait)
    key = (fd, completions.key())
    with _LOCK:
        watch = _WATCHES.get(key)
        if watch is None:
            watch = _WATCHES[key] = _Watch(completions, fd)
    future = watch.add(op, loop)
    if future is None:
        return await asyncio.to_thread(op.wait)
    op.start()
    return await future
