"""Awaiting a native operation without a thread hop.

An operation runs on the network runtime and, when it ends, its id goes on its session's completion
list, whose doorbell descriptor turns readable when the list turns non-empty. Each event loop that
awaits an operation of that list watches the descriptor (``add_reader``) while it awaits any: one
wake-up settles every operation that ended meanwhile, and no network thread takes the interpreter
lock. Where a loop cannot watch descriptors (Windows' Proactor) or the platform has none, the wait
runs in a worker thread instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

_LOCK = threading.Lock()


class _Watch:
    """The awaits on one completion list, across event loops; lives while any await is pending."""

    def __init__(self, completions: Any, fd: int, key: int) -> None:
        self.completions = completions
        self.fd = fd
        self.key = key
        self.pending: dict[int, list[tuple[Any, asyncio.Future[Any]]]] = {}
        self.waiting: dict[asyncio.AbstractEventLoop, int] = {}  # pending awaits per loop (each has a reader)

    def ring(self) -> None:
        """On a watching loop: settles every operation announced since the last ring."""
        running = asyncio.get_running_loop()
        ready = self.completions.take_ready()
        with _LOCK:
            settled = [(op_id, self.pending.pop(op_id)) for op_id in ready if op_id in self.pending]
        for _, awaits in settled:
            op = awaits[0][0]
            try:
                outcome: tuple[bool, Any] = (True, op.result())
            except BaseException as err:
                outcome = (False, err)
            for _, future in awaits:
                loop = future.get_loop()
                if loop is running:
                    _settle(future, outcome)
                    continue
                try:
                    loop.call_soon_threadsafe(_settle, future, outcome)
                except RuntimeError:  # that loop is closed: nobody awaits there any more
                    self.forget(future, loop_closed=True)

    def forget(self, future: asyncio.Future[Any], *, loop_closed: bool = False) -> None:
        """When an await ends (settled or cancelled), on its loop: a loop with nothing left to
        await stops watching, and a watch with nothing left goes."""
        loop = future.get_loop()
        with _LOCK:
            if future.cancelled():
                for op_id, awaits in list(self.pending.items()):
                    kept = [entry for entry in awaits if entry[1] is not future]
                    if kept:
                        self.pending[op_id] = kept
                    elif len(kept) != len(awaits):
                        del self.pending[op_id]
            left = self.waiting.get(loop, 0) - 1
            if left > 0:
                self.waiting[loop] = left
                return
            self.waiting.pop(loop, None)
            if not self.waiting and _WATCHES.get(self.key) is self:
                del _WATCHES[self.key]
        if not loop_closed and not loop.is_closed():
            loop.remove_reader(self.fd)


def _settle(future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if future.done():  # its task was cancelled; the operation ended anyway
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


_WATCHES: dict[int, _Watch] = {}


#: How long a worker thread waits for an operation at a time, on a loop that cannot watch a descriptor.
_THREAD_SLICE = 0.1
_THREADS = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="capture-mqtt-await")
#: The slice a worker thread is waiting, by operation (its `id()`, with the operation held so that the
#: number is not reused): an await cancelled during it leaves it running, and the next await of the
#: operation takes its outcome (an operation gives its value once).
_SLICES: dict[int, tuple[Any, concurrent.futures.Future[tuple[bool, Any] | None]]] = {}
_SLICES_LOCK = threading.Lock()


def _wait_slice(op: Any) -> tuple[bool, Any] | None:
    """In a worker thread: the operation's outcome, or None when it has not finished in a slice."""
    try:
        return True, op.wait(_THREAD_SLICE)
    except TimeoutError as err:
        return (False, err) if op.done() else None  # after done(): the operation's own error
    except BaseException as err:
        return False, err


def _forget_empty_slice(key: int, done: concurrent.futures.Future[tuple[bool, Any] | None]) -> None:
    if done.exception() is None and done.result() is None:
        with _SLICES_LOCK:
            entry = _SLICES.get(key)
            if entry is not None and entry[1] is done:
                del _SLICES[key]


def _has_slice(op: Any) -> bool:
    with _SLICES_LOCK:
        entry = _SLICES.get(id(op))
        return entry is not None and entry[0] is op


async def _wait_in_thread(op: Any) -> Any:
    """Waits for `op` in worker threads, a slice at a time: a cancelled await frees its thread within
    a slice, and what that thread took is kept for the next await of the operation."""
    key = id(op)
    while True:
        with _SLICES_LOCK:
            entry = _SLICES.get(key)
            if entry is None or entry[0] is not op:
                entry = _SLICES[key] = (op, _THREADS.submit(_wait_slice, op))
                entry[1].add_done_callback(lambda done: _forget_empty_slice(key, done))
        waiting = entry[1]
        outcome = await asyncio.shield(asyncio.wrap_future(waiting))
        if outcome is None:
            continue
        with _SLICES_LOCK:
            if _SLICES.get(key) is entry:
                del _SLICES[key]
        ok, value = outcome
        if ok:
            return value
        raise value


async def wait_operation(op: Any) -> Any:
    """Awaits a native operation: its value, or its error."""
    if _has_slice(op):  # a worker thread waits for it, or took its outcome for this await
        return await _wait_in_thread(op)
    if op.done():
        return op.result()
    completions = op.completions()
    fd = completions.fd()
    if fd is None:
        return await _wait_in_thread(op)
    loop = asyncio.get_running_loop()
    key = completions.key()
    future: asyncio.Future[Any] = loop.create_future()
    with _LOCK:
        watch = _WATCHES.get(key)
        if watch is None:
            watch = _WATCHES[key] = _Watch(completions, fd, key)
        watching = loop in watch.waiting
        watch.waiting[loop] = watch.waiting.get(loop, 0) + 1
        watch.pending.setdefault(op.id, []).append((op, future))
    if not watching:
        try:
            loop.add_reader(fd, watch.ring)
        except NotImplementedError:  # this loop cannot watch a descriptor: wait in a thread
            future.cancel()
            watch.forget(future, loop_closed=True)
            return await _wait_in_thread(op)
    future.add_done_callback(watch.forget)
    op.start()
    return await future
