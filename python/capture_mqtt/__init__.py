"""capture-mqtt: the Python SDK for the MQTT broker of Capture, with a Rust core.

>>> import capture_mqtt as cm
>>> cm.raw_filter("AcmeCorp")
'v1/raw/AcmeCorp/+/+/+/#'
"""

from __future__ import annotations

from . import _logging
from ._core import (
    Command,
    DataPoint,
    MalformedMessage,
    Message,
    TopicInfo,
    __version__,
    command_payload,
    command_topic,
    data_topic,
    field_payload,
    measurement_payload,
    parse_command,
    parse_raw,
    parse_topic,
    raw_filter,
    raw_topic,
    topic_matches,
    validate_filter,
)
from .async_client import AsyncClient
from .auth import Auth, fetch_jwt
from .batch import Batch
from .client import Client, ConnectionEvent
from .collect import collect, collect_async
from .errors import (
    AuthenticationError,
    AuthorizationError,
    CaptureError,
    ClosedError,
    ConnectError,
    OutboxError,
    PayloadError,
    QueueFullError,
    TimeoutError,  # noqa: A004 - the documented public name, also a builtins.TimeoutError
    TopicError,
)
from .options import Reconnect
from .source import AsyncSourceClient, SourceClient, load_auth_config
from .subscription import AsyncSubscription, Subscription

_logging.start()

__all__ = [
    "AsyncClient",
    "AsyncSourceClient",
    "AsyncSubscription",
    "Auth",
    "AuthenticationError",
    "AuthorizationError",
    "Batch",
    "CaptureError",
    "Client",
    "ClosedError",
    "Command",
    "ConnectError",
    "ConnectionEvent",
    "DataPoint",
    "MalformedMessage",
    "Message",
    "OutboxError",
    "PayloadError",
    "QueueFullError",
    "Reconnect",
    "SourceClient",
    "Subscription",
    "TimeoutError",
    "TopicError",
    "TopicInfo",
    "__version__",
    "collect",
    "collect_async",
    "command_payload",
    "command_topic",
    "data_topic",
    "fetch_jwt",
    "field_payload",
    "load_auth_config",
    "measurement_payload",
    "parse_command",
    "parse_raw",
    "parse_topic",
    "raw_filter",
    "raw_topic",
    "topic_matches",
    "validate_filter",
]
