"""Waiting for messages with a deadline, instead of sleeping in tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

__all__ = ["wait_for", "wait_for_many", "wait_until"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class _Gettable(Protocol[T_co]):
    def get(self, timeout: float | None = None) -> T_co | None: ...


def _describe(seen: list[Any]) -> str:
    if not seen:
        return "nothing arrived"
    shown = ", ".join(repr(item) for item in seen[-3:])
    return f"{len(seen)} other message(s) arrived, the last: {shown}"


def wait_for_many(
    subscription: _Gettable[T], count: int, predicate: Callable[[T], bool] | None = None, timeout: float = 10.0
) -> list[T]:
    """Takes messages from ``subscription`` until ``count`` of them satisfy ``predicate`` (every
    message when it is None) and returns those; messages that do not match are skipped. Fails with an
    ``AssertionError`` saying what did arrive when the deadline passes first.

    >>> from capture_mqtt.testing import wait_for_many
    >>> class Stub:
    ...     items = [1, 2, 3, 4]
    ...     def get(self, timeout=None):
    ...         return self.items.pop(0) if self.items else None
    >>> wait_for_many(Stub(), 2, lambda n: n % 2 == 0, timeout=0.1)
    [2, 4]
    """
    if count < 0 or timeout < 0:
        raise ValueError(f"count and timeout must not be negative, got count={count!r}, timeout={timeout!r}")
    deadline = time.monotonic() + timeout
    matched: list[T] = []
    skipped: list[T] = []
    while len(matched) < count:
        left = deadline - time.monotonic()
        item = subscription.get(timeout=max(0.0, left)) if left > 0 else None
        if item is None:
            raise AssertionError(
                f"only {len(matched)} of {count} expected message(s) arrived within {timeout} s; {_describe(skipped)}"
            )
        (matched if predicate is None or predicate(item) else skipped).append(item)
    return matched


def wait_for(subscription: _Gettable[T], predicate: Callable[[T], bool] | None = None, timeout: float = 10.0) -> T:
    """The first message from ``subscription`` that satisfies ``predicate`` (any message when it is
    None), skipping others; an ``AssertionError`` saying what did arrive when ``timeout`` passes first.

    >>> from capture_mqtt.testing import wait_for
    >>> class Stub:
    ...     items = ["boot", "ready"]
    ...     def get(self, timeout=None):
    ...         return self.items.pop(0) if self.items else None
    >>> wait_for(Stub(), lambda text: text == "ready", timeout=0.1)
    'ready'
    """
    return wait_for_many(subscription, 1, predicate, timeout)[0]


def wait_until(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Calls ``condition()`` until it returns something true and returns that; an ``AssertionError``
    when ``timeout`` passes first.

    >>> from capture_mqtt.testing import wait_until
    >>> wait_until(lambda: 42, timeout=0.1)
    42
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"the condition did not hold within {timeout} s")
        time.sleep(interval)
