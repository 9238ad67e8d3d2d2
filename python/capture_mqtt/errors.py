"""The exceptions of capture-mqtt. Every one is a :class:`CaptureError`.

Value errors (:class:`TopicError`, :class:`PayloadError`) are also :class:`ValueError`, so code that
already catches ``ValueError`` keeps working.
"""

from __future__ import annotations

import builtins

__all__ = [
    "AuthenticationError",
    "AuthorizationError",
    "CaptureError",
    "ClosedError",
    "ConnectError",
    "OutboxError",
    "PayloadError",
    "QueueFullError",
    "TimeoutError",
    "TopicError",
]


class CaptureError(Exception):
    """Base class of every error capture-mqtt raises.

    >>> import capture_mqtt as cm
    >>> issubclass(cm.TopicError, cm.CaptureError)
    True
    """


class TopicError(CaptureError, ValueError):
    """A topic or filter Capture would refuse, found before anything was sent.

    ``segment`` names the level that is wrong (``"company"``, ``"source_id"``, ``"filter"``, ...) and
    ``value`` holds the offending text.

    >>> import capture_mqtt as cm
    >>> try:
    ...     cm.raw_filter("+")
    ... except cm.TopicError as err:
    ...     print(err.segment, repr(err.value))
    company '+'
    """

    def __init__(self, message: str, *, segment: str | None = None, value: str | None = None) -> None:
        super().__init__(message)
        self.segment = segment
        self.value = value


class PayloadError(CaptureError, ValueError):
    """A payload that cannot be read, or a value that cannot be written; ``field`` names where.

    >>> import capture_mqtt as cm
    >>> try:
    ...     cm.measurement_payload({"Temp": float("nan")})
    ... except cm.PayloadError as err:
    ...     print(err.field)
    Temp
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ConnectError(CaptureError, ConnectionError):
    """The connection to the broker could not be made or was lost (TLS, DNS, refused, WebSocket).

    >>> import capture_mqtt as cm
    >>> issubclass(cm.ConnectError, ConnectionError)
    True
    """


class AuthenticationError(ConnectError):
    """The broker refused the credentials (wrong password, expired token, unknown account).

    ``username`` names the account; the secret never appears in the message.

    >>> import capture_mqtt as cm
    >>> issubclass(cm.AuthenticationError, cm.ConnectError)
    True
    """

    def __init__(self, message: str, *, username: str | None = None) -> None:
        super().__init__(message)
        self.username = username


class AuthorizationError(CaptureError, PermissionError):
    """A subscribe or publish outside the account's scope. Capture disconnects for these, Mosquitto's
    dynamic security answers SUBACK 0x80, MQTT 5 brokers a reason code: all become this error.

    ``topic`` is the filter or topic refused, ``action`` is ``"subscribe"`` or ``"publish"``, and
    ``account_kind`` is ``"user"``, ``"source"`` or ``"unknown"``; the message quotes the scope rule.

    >>> import capture_mqtt as cm
    >>> issubclass(cm.AuthorizationError, PermissionError)
    True
    """

    def __init__(
        self,
        message: str,
        *,
        topic: str | None = None,
        action: str | None = None,
        account_kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.topic = topic
        self.action = action
        self.account_kind = account_kind


class TimeoutError(CaptureError, builtins.TimeoutError):  # noqa: A001 - the documented public name
    """An operation did not finish in time (connect, acknowledgement, wait).

    >>> import capture_mqtt as cm
    >>> issubclass(cm.TimeoutError, TimeoutError)
    True
    """


class ClosedError(CaptureError):
    """The client or subscription was closed before or during the call.

    >>> import capture_mqtt as cm
    >>> issubclass(cm.ClosedError, cm.CaptureError)
    True
    """


class QueueFullError(CaptureError):
    """A publish could not be queued while offline: the offline queue was full with
    ``offline="raise"``, or the message was dropped from it with ``offline="drop_oldest"``.

    >>> import capture_mqtt as cm
    >>> issubclass(cm.QueueFullError, cm.CaptureError)
    True
    """


class OutboxError(CaptureError, OSError):
    """A durable outbox (``outbox=``) could not be opened: another process holds it (the message
    names it), or its folder cannot be written.

    >>> import capture_mqtt as cm
    >>> issubclass(cm.OutboxError, cm.CaptureError)
    True
    """
