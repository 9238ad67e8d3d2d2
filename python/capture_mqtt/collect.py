"""``collect``: gather live data into one Batch, with a progress bar, for notebooks and scripts."""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from ._core import DataPoint
from .async_client import AsyncClient
from .batch import Batch
from .client import Client
from .errors import ClosedError
from .subscription import AsyncSubscription, Subscription

__all__ = ["collect", "collect_async"]

log = logging.getLogger("capture_mqtt")


def _progress_bar(progress: bool | None, total: float | None, unit: str) -> Any:
    if progress is False:
        return None
    try:
        tqdm = importlib.import_module("tqdm.auto").tqdm
    except ImportError:
        if progress:
            log.warning("progress=True needs tqdm: pip install 'capture-mqtt[progress]'")
        return None
    return tqdm(total=total, unit=unit, desc="collecting", dynamic_ncols=True)


class _Progress:
    """A bar over the seconds when time is the limit (the rows beside it), else over the rows."""

    def __init__(self, progress: bool | None, seconds: float | None, max_rows: int | None) -> None:
        self.by_time = max_rows is None and seconds is not None
        self.seconds = float(seconds or 0)
        self.start = time.monotonic()
        self.bar = _progress_bar(progress, seconds if self.by_time else max_rows, "s" if self.by_time else "rows")

    def update(self, added: int, rows: int) -> None:
        if self.bar is None:
            return
        if self.by_time:
            self.bar.n = round(min(self.seconds, time.monotonic() - self.start), 1)
            self.bar.set_postfix(rows=rows, refresh=False)
            self.bar.refresh()
        elif added:
            self.bar.update(added)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_limits(seconds: float | None, max_rows: int | None) -> None:
    if seconds is None and max_rows is None:
        raise ValueError("give seconds=..., max_rows=... or both: collect needs to know when to stop")
    if seconds is not None and seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")


def collect(
    source: Client | Subscription[DataPoint],
    filter: str | None = None,
    *,
    seconds: float | None = None,
    max_rows: int | None = None,
    progress: bool | None = None,
    tag_columns: Sequence[str] = (),
    qos: int = 0,
) -> Batch:
    """Gathers data points into one :class:`Batch` for ``seconds`` or until ``max_rows``, whichever
    comes first. ``source`` is a client (``filter`` then defaults to the client's company's raw tree;
    the subscription is closed at the end) or a subscription. Shows a progress bar when tqdm is
    installed (``progress=False`` hides it). Ctrl-C (or the notebook's stop button) ends it early and
    keeps what arrived.

    >>> import capture_mqtt as cm
    >>> with cm.Client.from_env() as client:
    ...     batch = cm.collect(client, seconds=10, max_rows=5, progress=False)
    >>> len(batch), set(batch.to_pandas()["key"])
    (5, {'CPU_Temp'})
    """
    _check_limits(seconds, max_rows)
    if isinstance(source, Client):
        subscription = source.subscribe(filter, qos=qos) if filter else source.subscribe_raw(qos=qos)
    elif filter is not None:
        raise ValueError("filter= goes with a client; a subscription already has its filter")
    else:
        subscription = source
    gathering = _Gathering(seconds, max_rows, progress, tag_columns)
    try:
        while (request := gathering.next_request()) is not None:
            try:
                part = subscription.batch(request[0], timeout=request[1], tag_columns=tag_columns)
            except ClosedError:
                break
            gathering.add(part)
    except KeyboardInterrupt:
        log.info("collect interrupted: keeping the %d rows gathered", gathering.rows)
    finally:
        gathering.close()
        if isinstance(source, Client):
            with contextlib.suppress(Exception):
                subscription.close()
    return gathering.result()


async def collect_async(
    source: AsyncClient | AsyncSubscription[DataPoint],
    filter: str | None = None,
    *,
    seconds: float | None = None,
    max_rows: int | None = None,
    progress: bool | None = None,
    tag_columns: Sequence[str] = (),
    qos: int = 0,
) -> Batch:
    """:func:`collect` for asyncio: the same options, awaited without blocking the event loop.

    >>> import asyncio
    >>> import capture_mqtt as cm
    >>> async def main():
    ...     async with cm.AsyncClient.from_env() as client:
    ...         return await cm.collect_async(client, seconds=10, max_rows=5, progress=False)
    >>> len(asyncio.run(main()))
    5
    """
    _check_limits(seconds, max_rows)
    if isinstance(source, AsyncClient):
        subscription = await (source.subscribe(filter, qos=qos) if filter else source.subscribe_raw(qos=qos))
    elif filter is not None:
        raise ValueError("filter= goes with a client; a subscription already has its filter")
    else:
        subscription = source
    gathering = _Gathering(seconds, max_rows, progress, tag_columns)
    try:
        while (request := gathering.next_request()) is not None:
            try:
                part = await subscription.batch(request[0], timeout=request[1], tag_columns=tag_columns)
            except ClosedError:
                break
            gathering.add(part)
    finally:
        gathering.close()
        if isinstance(source, AsyncClient):
            with contextlib.suppress(Exception):
                await subscription.close()
    return gathering.result()


class _Gathering:
    """What both call styles of collect share: the limits, the parts and the progress bar."""

    def __init__(
        self, seconds: float | None, max_rows: int | None, progress: bool | None, tag_columns: Sequence[str]
    ) -> None:
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.max_rows = max_rows
        self.tag_columns = tag_columns
        self.bar = _Progress(progress, seconds, max_rows)
        self.parts: list[Batch] = []
        self.rows = 0

    def next_request(self) -> tuple[int, float] | None:
        """The next batch to ask for (rows, seconds to wait), or None when done."""
        if self.max_rows is not None and self.rows >= self.max_rows:
            return None
        left = None if self.deadline is None else self.deadline - time.monotonic()
        if left is not None and left <= 0:
            return None
        chunk = 50_000 if self.max_rows is None else min(50_000, self.max_rows - self.rows)
        return chunk, 0.25 if left is None else min(0.25, left)

    def add(self, part: Batch) -> None:
        if len(part):
            self.parts.append(part)
            self.rows += len(part)
        self.bar.update(len(part), self.rows)

    def close(self) -> None:
        self.bar.close()

    def result(self) -> Batch:
        return Batch.concat(self.parts, tag_columns=self.tag_columns)
